"""Seconds per ECI meta-update with ``distill.images: step``, the step's distillation as one work item (the learner
embeds the step's images once for all its teachers) against one work item per teacher (the learner embeds the same
images once per teacher, as before), side by side.

    python benchmarks/distill_speed.py glyphs:zoo-disjoint glyphs:zoo-sh   # -> benchmarks/results/distill_speed.{json,md}

Each zoo's config is the one ``benchmarks/accuracy.py`` runs for ``default+it3000+p2+kd-step`` in that scenario (its
zoo built under ``$PURER_ZOO_ROOT``).  One process, one thread: the two paths alternate on one :class:`ECI` (the
per-teacher path calls :meth:`ZooDistillation.losses` once per teacher, each its own row of the outer gradient), the
first two rounds of each are dropped and the median ``ECI.meta_update`` (distillation and outer step) is kept.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch

import accuracy
from purer.data import load_split
from purer.pipeline import ECI, RunConfig, load_zoo
from purer.pipeline.distributed import Dist
from purer.yaml_config import load_config

RESULTS = Path(__file__).resolve().parent / "results"
VARIANT = "default+it3000+p2+kd-step"
WARMUP = 2


def per_teacher(eci: ECI):
    """The old path on ``eci``'s distillation: ``(work_items, losses)`` with one item, and one term, per teacher."""
    losses = eci.distillation.losses

    def each(learner, bank, idx, step, ensemble=None):
        terms, stats = [], {}
        for i in idx:
            term, stats = losses(learner, bank, [i], step, ensemble)
            terms += term
        return terms, stats
    return (lambda teachers: [[i] for i in teachers]), each


def measure(cfg: RunConfig, rounds: int) -> dict[str, list[float]]:
    """Seconds of ``rounds`` meta-updates per path (``one item``, ``per teacher``), alternating which goes first."""
    dist = Dist(device="cpu")
    teachers, used = load_zoo(cfg, dist, False)
    cfg = dataclasses.replace(cfg, zoo=used)
    val = {cfg.data.dataset: load_split(cfg.data.dataset, "val", cfg.data.root, cfg.data.image_size)}
    eci = ECI(cfg, teachers, val, dist)
    d = eci.distillation
    if d.images != "step":
        raise SystemExit(f"distill_speed: this zoo's teachers are distilled on their own classes' images "
                         f"(distill.{cfg.distill.images_key(t.config for t in teachers)}); set it to step")
    paths = {"one item": (d.work_items, d.losses), "per teacher": per_teacher(eci)}
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    for it in range(rounds):
        for name in (list(paths) if it % 2 == 0 else list(paths)[::-1]):
            d.work_items, d.losses = paths[name]
            start = time.perf_counter()
            eci.meta_update(it)
            seconds[name].append(time.perf_counter() - start)
    return seconds


def summary(seconds: dict[str, list[float]]) -> dict:
    med = {name: statistics.median(s[WARMUP:] or s) for name, s in seconds.items()}
    return {"median_s": {k: round(v, 3) for k, v in med.items()},
            "speedup": round(med["per teacher"] / med["one item"], 2), "rounds": len(seconds["one item"])}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("zoos", nargs="+", help="<dataset>:<scenario> of benchmarks/accuracy.py")
    p.add_argument("--rounds", type=int, default=16)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    os.chdir(accuracy.REPO)  # the scenarios name their zoo specs from the checkout
    report = {"variant": VARIANT, "threads": 1, "torch": torch.__version__, "machine": platform.processor() or
              platform.machine(), "load_before": os.getloadavg(), "zoos": {}}
    for zoo in a.zoos:
        dataset, scenario = zoo.split(":", 1)
        args = [*accuracy.COMMON, *accuracy.DATASETS[dataset], *accuracy.SCENARIOS[scenario],
                *accuracy.variant_args(VARIANT)]
        report["zoos"][zoo] = summary(measure(load_config(RunConfig, None, args), a.rounds))
    report["load_after"] = os.getloadavg()
    lines = ["# kd-step's distillation: one work item against one per teacher", "",
             f"Median seconds per `ECI.meta_update` (distillation and outer step), {VARIANT}'s config, one thread, "
             f"the two paths alternating in one process; load average {report['load_before'][0]:.2f} before, "
             f"{report['load_after'][0]:.2f} after.", "",
             "| zoo | one work item (s) | one per teacher (s) | speed-up | rounds |", "|---|---|---|---|---|"]
    for zoo, r in report["zoos"].items():
        lines.append(f"| {zoo} | {r['median_s']['one item']:.3f} | {r['median_s']['per teacher']:.3f} | "
                     f"{r['speedup']:.2f}x | {r['rounds']} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "distill_speed.json").write_text(json.dumps(report, indent=1) + "\n")
    (RESULTS / "distill_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
