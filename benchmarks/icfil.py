"""Does ICFIL help, and does it help more than plain fine-tuning on the real support?

    python benchmarks/icfil.py RUN_DIR [--out benchmarks/results]

RUN_DIR is a finished ``recipes/purer.py`` run (e.g. one of ``benchmarks/accuracy.py``).
Its selected meta-learner (``RUN_DIR/meta_learner``) is scored on the run's own
meta-test task lists with the run's test-time inner loop, three ways:

* the plain learner and the learner + ICFIL (``RUN_DIR/config.yaml``'s ``icfil``
  settings): these repeat the run's ``purer`` and ``purer+icfil`` rows, which the
  report checks;
* a control that spends ICFIL's calibration steps and lr on cross-entropy over the
  real support only (no inversion, no contrastive term), so that a gain of ICFIL can
  be told apart from a gain of merely fine-tuning longer.

Paired differences with 95% CIs and seconds per task go to ``icfil.json`` / ``icfil.md``.
Runs on one thread.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch

from purer.calibrate import ICFIL, with_settings
from purer.config import load_config
from purer.data import load_split
from purer.evaluate import evaluate, paired_difference, task_list
from purer.pipeline import RunConfig, load_meta_learner

RESULTS = Path(__file__).parent / "results"
CONTROL = {"inversion_steps": 0, "contrastive_weight": 0.0, "pseudo_ce_weight": 0.0}


def study(run: Path, progress: bool = True) -> dict:
    """The report of one run (see the module docstring)."""
    cfg = load_config(RunConfig, run / "config.yaml")
    learner = load_meta_learner(run / "meta_learner")
    test_time = json.loads((run / "meta_learner" / "config.json").read_text())["test_time"]
    run_rows = {(r["method"], r["shot"]): r["accuracy"]
                for r in json.loads((run / "results.json").read_text())["rows"]}
    test = load_split(cfg.data.dataset, "test", cfg.data.root, cfg.data.image_size)
    e = cfg.eval
    report = {"run": str(run), "dataset": cfg.data.dataset, "way": e.way, "query": e.query, "tasks": e.tasks,
              "seed": e.seed, "threads": torch.get_num_threads(), "learner": cfg.meta.learner,
              "icfil": dataclasses.asdict(cfg.icfil), "control": CONTROL, "rows": [], "paired": []}
    for shot in e.shots:
        tasks = task_list(test, e.way, shot, e.query, e.tasks, e.seed)
        settings = test_time[str(shot)]
        results = {}
        for method, learner_ in (("purer", learner), ("purer+icfil", ICFIL(cfg.icfil).wrap(learner)),
                                 ("purer+real-support-ce", ICFIL(with_settings(cfg.icfil, CONTROL)).wrap(learner))):
            r = evaluate(learner_, test, tasks, method=method, adapt_kwargs=settings, progress=progress)
            results[method] = r
            row = r.row(seconds_per_task=round(r.seconds / len(tasks), 4))
            if (method, shot) in run_rows:
                row["run_accuracy"] = run_rows[(method, shot)]
            report["rows"].append(row)
        for a, b in (("purer+icfil", "purer"), ("purer+real-support-ce", "purer"),
                     ("purer+icfil", "purer+real-support-ce")):
            d, ci = paired_difference(results[a], results[b])
            report["paired"].append({"shot": shot, "a": a, "b": b, "diff": round(d, 2), "ci95": round(ci, 2)})
    return report


def markdown(report: dict) -> str:
    lines = [f"# ICFIL against fine-tuning on the real support: {report['dataset']}, {report['way']}-way, "
             f"{report['tasks']} meta-test tasks ({report['query']} queries per class)", "",
             f"Meta-learner: `{report['run']}/meta_learner` ({report['learner']}, selected on meta-val by its run), "
             "with the run's test-time inner loop. ICFIL: the run's settings. The control spends ICFIL's "
             "calibration steps and lr on cross-entropy over the real support only.", "",
             "| shot | method | accuracy (%) | 95% CI | the run's figure | s / task |", "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['shot']} | {r['method']} | {r['accuracy']:.2f} | {r['ci95']:.2f} | "
                     f"{r.get('run_accuracy', '')} | {r['seconds_per_task']:.3f} |")
    lines += ["", "Paired differences on the same tasks (a difference counts when its 95% CI excludes 0):", "",
              "| shot | a - b | points | 95% CI | reading |", "|---|---|---|---|---|"]
    for p in report["paired"]:
        lo, hi = p["diff"] - p["ci95"], p["diff"] + p["ci95"]
        verdict = "a better" if lo > 0 else "b better" if hi < 0 else "no clear difference"
        lines.append(f"| {p['shot']} | {p['a']} - {p['b']} | {p['diff']:+.2f} | {p['ci95']:.2f} | {verdict} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a finished recipes/purer.py output directory")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    report = study(a.run)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "icfil.json").write_text(json.dumps(report, indent=1))
    (a.out / "icfil.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
