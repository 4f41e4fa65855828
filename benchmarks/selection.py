"""Choosing among PURER's variants on meta-val, never on meta-test.

    python benchmarks/selection.py glyphs select     # -> benchmarks/results/selection_glyphs_select.{json,md}

For every finished run of ``benchmarks/accuracy.py`` under ``runs/benchmarks/<dataset>/<scenario>/``,
the run's selected meta-learner (``meta_learner/``, with the test-time settings its run chose on meta-val)
is scored on a fixed list of 300 meta-val tasks per shot (5-way, 15 queries, task seed 1: more tasks than a
run's own selection uses, so that variants a point or two apart can be told apart).  The variant with the
best mean over shots is marked ``chosen``; every variant is scored on the same tasks, so differences are
paired.  Meta-test is not read.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch

from purer.yaml_config import load_config
from purer.data import load_split
from purer.evaluate import evaluate, paired_difference, task_list
from purer.meta import MetaLearner
from purer.pipeline import RunConfig

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
RUNS = REPO / "runs" / "benchmarks"
TASKS, SEED = 300, 1


def score(dataset: str, scenario: str, shots: tuple[int, ...] = (1, 5), root: Path = RUNS) -> dict:
    """Meta-val accuracy of every finished run of the scenario (see the module docstring)."""
    runs = sorted((root / dataset / scenario).glob("*/seed*/meta_learner/config.json"))
    if not runs:
        raise SystemExit(f"no finished runs under {root / dataset / scenario}")
    cfg = load_config(RunConfig, runs[0].parents[1] / "config.yaml")
    val = load_split(cfg.data.dataset, "val", cfg.data.root, cfg.data.image_size)
    tasks = {shot: task_list(val, cfg.eval.way, shot, 15, TASKS, SEED) for shot in shots}
    rows, results = [], {}
    for folder in runs:
        variant, seed = folder.parts[-4], int(folder.parts[-3][4:])
        learner = MetaLearner.from_pretrained(folder.parent)
        for shot in shots:
            r = evaluate(learner, val, tasks[shot], method=variant, adapt_kwargs=learner.test_time_settings(shot),
                         progress=False)
            results[variant, seed, shot] = r
            rows.append({"variant": variant, "seed": seed, "shot": shot, "val_accuracy": round(r.accuracy, 2),
                         "ci95": round(r.ci95, 2)})
    means = {}
    for r in rows:
        means.setdefault(r["variant"], []).append(r["val_accuracy"])
    chosen = max(means, key=lambda v: statistics.fmean(means[v]))
    for r in rows:
        r["chosen"] = r["variant"] == chosen
        mine = [k for k in results if k[0] == chosen and k[2] == r["shot"]]
        if r["variant"] != chosen and mine:
            d, ci = paired_difference(results[r["variant"], r["seed"], r["shot"]], results[mine[0]])
            r["vs_chosen"] = [round(d, 2), round(ci, 2)]
    return {"dataset": dataset, "scenario": scenario, "tasks": TASKS, "task_seed": SEED, "split": "val",
            "chosen": chosen, "rows": rows}


def markdown(report: dict) -> str:
    shots = sorted({r["shot"] for r in report["rows"]})
    lines = [f"# Choosing the default on meta-val: {report['dataset']}, scenario {report['scenario']}", "",
             f"{report['tasks']} meta-val tasks per shot (5-way, 15 queries, task seed {report['task_seed']}), "
             "the same for every variant; mean ± 95% CI (%), and the paired difference to the chosen variant. "
             f"Chosen (best mean over shots): **{report['chosen']}**.", "",
             "| variant | seed | " + " | ".join(f"{s}-shot | vs chosen" for s in shots) + " |",
             "|---|---|" + "---|---|" * len(shots)]
    cell = {(r["variant"], r["seed"], r["shot"]): r for r in report["rows"]}
    for variant, seed in sorted({(r["variant"], r["seed"]) for r in report["rows"]},
                                key=lambda vs: -statistics.fmean(cell[vs + (s,)]["val_accuracy"] for s in shots)):
        parts = []
        for s in shots:
            r = cell[variant, seed, s]
            diff = r.get("vs_chosen")
            parts += [f"{r['val_accuracy']:.2f} ± {r['ci95']:.2f}", f"{diff[0]:+.2f} ± {diff[1]:.2f}" if diff else ""]
        lines.append(f"| {variant} | {seed} | " + " | ".join(parts) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dataset")
    p.add_argument("scenario")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    report = score(a.dataset, a.scenario)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"selection_{a.dataset}_{a.scenario}"
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
