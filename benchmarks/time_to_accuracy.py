"""Time to accuracy: meta-val accuracy against the CPU-seconds of ECI meta-training, method by method.

    python benchmarks/time_to_accuracy.py run glyphs --variants paper default --seeds 0 1 2   # one job per run
    python benchmarks/time_to_accuracy.py report glyphs        # -> benchmarks/results/time_to_accuracy_<dataset>.{json,md,png}

A user waits for an accuracy, not an iteration.  Each run drives the library's own
:class:`purer.pipeline.ECI` (the loop ``recipes/purer.py`` runs) on one thread, the
variant's settings as ``benchmarks/accuracy.py`` names them (``paper``, ``default``,
``paper+kd-union`` ...), and every ``--every`` iterations scores the learner on one
fixed list of 300 meta-val tasks (5-way 1-shot, 15 queries, task seed 1: every run the
same tasks), with the learner's own inner loop.  Only the meta-iterations are timed
(the thread's CPU time, ``time.thread_time``: what a busy machine's other jobs do not
inflate), not the scoring.  ``report`` gathers the runs: per variant, the mean curve
over seeds; the CPU-seconds each needs to reach the best meta-val that PURER as
published (``paper``) reaches within its budget; and each one's accuracy at the same
CPU budget (the smallest any variant used).  A PNG of the curves goes beside the JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

RESULTS = REPO / "benchmarks" / "results"
RUNS = REPO / "runs" / "time_to_accuracy"
TASKS, SEED, SHOT = 300, 1, 1


def curve(dataset: str, variant: str, seed: int, iterations: int, every: int, out: Path,
          extra: list[str] | tuple = (), n_tasks: int = TASKS) -> dict:
    """One run: ECI meta-training of ``variant`` for ``iterations``, scored on meta-val every ``every``
    (``extra``: more recipe keys, e.g. another dataset and zoo)."""
    import torch

    from accuracy import DATASETS, variant_args
    from purer.data import SPLITS, load_split
    from purer.evaluate import evaluate, task_list
    from purer.pipeline import ECI, RunConfig, load_zoo
    from purer.pipeline.build import check_zoo
    from purer.pipeline.distributed import Dist
    from purer.yaml_config import load_config

    torch.set_num_threads(1)
    args = [*DATASETS.get(dataset, []), *variant_args(variant), f"seed={seed}", f"meta.train.iterations={iterations}",
            *extra]
    config = None
    if "--config" in args:
        i = args.index("--config")
        config, args = REPO / args[i + 1], args[:i] + args[i + 2:]
    cfg = load_config(RunConfig, config, args)
    dist = Dist(device="cpu")
    check_zoo(cfg)
    teachers, _ = load_zoo(cfg, dist, progress=False)
    splits = {s: load_split(cfg.data.dataset, s, cfg.data.root, cfg.data.image_size) for s in SPLITS}
    eci = ECI(cfg, teachers, {"val": splits["val"]}, dist)
    tasks = task_list(splits["val"], cfg.eval.way, SHOT, 15, n_tasks, SEED)
    points, cpu = [], 0.0

    def score() -> None:
        acc = evaluate(eci.learner, splits["val"], tasks, progress=False).accuracy
        points.append([eci.state.iteration, round(cpu, 2), round(acc, 2)])
        print(f"{variant} seed {seed}: iteration {eci.state.iteration}, {cpu:.0f} CPU-s, meta-val {acc:.2f}",
              flush=True)

    score()
    for _ in range(iterations):
        start = time.thread_time()
        eci.iteration()
        cpu += time.thread_time() - start
        if eci.state.iteration % every == 0:
            score()
    result = {"dataset": dataset, "variant": variant, "seed": seed, "iterations": iterations, "every": every,
              "tasks": n_tasks, "task_seed": SEED, "shot": SHOT, "points": points,
              "switch_fired": eci.switch.fired, "command": " ".join(sys.argv)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "curve.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def cmd_run(a) -> int:
    failed = 0
    for variant in a.variants:
        for seed in a.seeds:
            out = RUNS / a.dataset / variant / f"seed{seed}"
            if (out / "curve.json").is_file():
                print(f"done already: {out}")
                continue
            # one process per run: its own thread, nothing left over from the previous run
            res = subprocess.run([sys.executable, __file__, "one", a.dataset, variant, str(seed), str(a.iterations),
                                  str(a.every), "--tasks", str(a.tasks), *(["--set", *a.set] if a.set else [])], cwd=REPO)
            failed += res.returncode != 0
    return 1 if failed else 0


def first_reaching(points: list, target: float) -> float | None:
    return next((cpu for _, cpu, acc in points if acc >= target), None)


def report(dataset: str, reference: str = "paper") -> dict:
    runs: dict[str, list[dict]] = {}
    for path in sorted((RUNS / dataset).glob("*/seed*/curve.json")):
        r = json.loads(path.read_text())
        runs.setdefault(r["variant"], []).append(r)
    if reference not in runs:
        raise SystemExit(f"no {reference} runs under {RUNS / dataset}")
    target = statistics.fmean(max(acc for _, _, acc in r["points"]) for r in runs[reference])
    budget = min(r["points"][-1][1] for rs in runs.values() for r in rs)
    rows = []
    for variant, rs in runs.items():
        reach = [first_reaching(r["points"], target) for r in rs]
        at_budget = [max((acc for _, cpu, acc in r["points"] if cpu <= budget), default=float("nan")) for r in rs]
        final = [r["points"][-1][2] for r in rs]
        rows.append({"variant": variant, "seeds": [r["seed"] for r in rs],
                     "cpu_seconds_to_target": reach,
                     "mean_cpu_seconds_to_target": round(statistics.fmean(reach), 1) if None not in reach else None,
                     "best_at_budget": round(statistics.fmean(at_budget), 2), "final": round(statistics.fmean(final), 2),
                     "cpu_seconds": round(statistics.fmean(r["points"][-1][1] for r in rs), 1),
                     "iterations": rs[0]["iterations"]})
    ref = next(r for r in rows if r["variant"] == reference)
    for r in rows:
        if r["mean_cpu_seconds_to_target"] and ref["mean_cpu_seconds_to_target"]:
            r["speedup_vs_reference"] = round(ref["mean_cpu_seconds_to_target"] / r["mean_cpu_seconds_to_target"], 2)
    return {"dataset": dataset, "reference": reference, "target": round(target, 2), "budget_cpu_seconds": budget,
            "rows": rows, "runs": runs, "tasks": TASKS, "task_seed": SEED, "shot": SHOT}


def markdown(rep: dict) -> str:
    lines = [f"# Time to accuracy on {rep['dataset']}", "",
             f"Meta-val accuracy (5-way {rep['shot']}-shot, {rep['tasks']} tasks, task seed {rep['task_seed']}, the "
             "learner's own inner loop) against the CPU-seconds of ECI meta-training (one thread, the iterations "
             f"alone). Target: {rep['reference']}'s best meta-val within its budget, mean over seeds "
             f"({rep['target']:.2f}); budget: the fewest CPU-seconds any variant ran ({rep['budget_cpu_seconds']:.0f}).", "",
             "| variant | seeds | CPU-s to target (per seed) | mean | vs reference | best meta-val within the budget | "
             "final meta-val | CPU-s in all |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rep["rows"], key=lambda r: r["mean_cpu_seconds_to_target"] or 1e18):
        per = ", ".join("never" if c is None else f"{c:.0f}" for c in r["cpu_seconds_to_target"])
        mean = "never (some seed)" if r["mean_cpu_seconds_to_target"] is None else f"{r['mean_cpu_seconds_to_target']:.0f}"
        lines.append(f"| {r['variant']} | {','.join(map(str, r['seeds']))} | {per} | {mean} | "
                     f"{r.get('speedup_vs_reference', '')}{'x' if 'speedup_vs_reference' in r else ''} | "
                     f"{r['best_at_budget']:.2f} | {r['final']:.2f} | {r['cpu_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(rep: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, (variant, rs) in enumerate(sorted(rep["runs"].items())):
        for j, r in enumerate(rs):
            cpu, acc = zip(*[(c, a) for _, c, a in r["points"]])
            ax.plot(cpu, acc, color=f"C{i}", lw=0.9, alpha=0.8, label=variant if j == 0 else None)
    ax.axhline(rep["target"], color="grey", ls="--", lw=0.8, label=f"target ({rep['reference']}'s best)")
    ax.set_xlabel("ECI meta-training, CPU-seconds (one thread)")
    ax.set_ylabel(f"meta-val accuracy, 5-way {rep['shot']}-shot (%)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run (or finish) the curves")
    r.add_argument("dataset")
    r.add_argument("--variants", nargs="+", default=["paper", "default"])
    r.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    r.add_argument("--iterations", type=int, default=2000)
    r.add_argument("--every", type=int, default=100)
    r.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="more recipe keys for these runs")
    r.add_argument("--tasks", type=int, default=TASKS, help="meta-val tasks per score")
    one = sub.add_parser("one", help=argparse.SUPPRESS)
    for name in ("dataset", "variant"):
        one.add_argument(name)
    for name in ("seed", "iterations", "every"):
        one.add_argument(name, type=int)
    one.add_argument("--tasks", type=int, default=TASKS)
    one.add_argument("--set", nargs="+", default=[])
    g = sub.add_parser("report", help="write benchmarks/results/time_to_accuracy_<dataset>.{json,md,png}")
    g.add_argument("dataset")
    a = p.parse_args(argv)
    if a.cmd == "run":
        return cmd_run(a)
    if a.cmd == "one":
        curve(a.dataset, a.variant, a.seed, a.iterations, a.every, RUNS / a.dataset / a.variant / f"seed{a.seed}",
              a.set, a.tasks)
        return 0
    rep = report(a.dataset)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"time_to_accuracy_{a.dataset}"
    (RESULTS / f"{name}.json").write_text(json.dumps(rep, indent=1) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown(rep))
    plot(rep, RESULTS / f"{name}.png")
    print(markdown(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
