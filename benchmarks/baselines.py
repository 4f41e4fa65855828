"""The baseline rows every results table compares against, on the built-in glyphs.

    python benchmarks/baselines.py [--zoo DIR] [--iterations N] [--tasks 600] [--val-tasks 50] [--seeds 0]

1. A glyph zoo (12 Conv4 teachers, disjoint 5-class blocks of the meta-train
   classes, 32 px, ``purer.zoo.pretrain`` defaults) is pre-trained unless --zoo
   already holds it.
2. ``purer.baselines.run_baselines`` on 5-way 1- and 5-shot tasks, 15 queries per
   class: every method's test-time inner lr and steps are chosen on --val-tasks
   meta-val tasks from the shared grid (lr 0.01/0.1/0.5 x steps 1/5/10), then it is
   scored once on the same --tasks meta-test tasks. The real-data upper bounds
   (MAML, ProtoNet) are meta-trained for --iterations steps per shot on the real
   meta-train split, keeping the state best on meta-val. Their MAML inner loop
   uses lr --train-inner-lr (default 0.1, 1 second-order step): at the release's
   0.01 MAML needs thousands of iterations on glyphs (83% meta-val 1-shot after
   200-400 iterations, against 88% at 0.1 after 200), too many for this budget.

Writes benchmarks/results/baselines.json (``results.json`` rows, each with its
wall time) and baselines.md (``--name`` changes the stem, e.g. for a run over
more ``--seeds`` of the seeded rows only). Runs --jobs single-threaded worker processes (one
(shot, method) each; default 2) so as not to starve other jobs on a shared CPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch

from purer.baselines import METHODS, BaselineConfig, run_baselines
from purer.data import load_split
from purer.meta import MAMLConfig, MetaTrainConfig
from purer.zoo.pretrain import PretrainConfig, pretrain_zoo
from purer.zoo.store import Zoo

RESULTS = Path(__file__).parent / "results"
DEFAULT_ZOO = Path(__file__).resolve().parents[1] / "runs" / "zoos" / "glyphs-conv4-12"


def glyph_zoo(path: Path, num_models: int, image_size: int) -> list:
    zoo = Zoo(path, create=True)
    pretrain_zoo(PretrainConfig(dataset="glyphs", image_size=image_size, num_models=num_models), zoo,
                 progress=False, log=print)
    return zoo.load_teachers()


def markdown(report: dict) -> str:
    lines = [f"# Baselines on {report['dataset']} ({report['way']}-way, {report['tasks']} meta-test tasks)", "",
             f"Zoo: {report['zoo']['models']} {report['zoo']['arch']} teachers at {report['image_size']} px. "
             f"Test-time lr/steps chosen on {report['val_tasks']} meta-val tasks from the shared grid; every row "
             f"on the same meta-test task list (seed {report['seed']}), {report['query']} queries per class. "
             f"Real-data rows: {report['real_iterations']} meta-training iterations per shot (meta-batch "
             f"{report['meta_batch']}; MAML second order, inner lr {report['train_maml']['inner_lr']}, "
             f"{report['train_maml']['inner_steps']} step), state best on meta-val. Accuracy and 95% CI "
             f"(1.96 * sample std / sqrt(tasks)) in percent. {report['jobs']} worker process(es) of "
             f"{report['threads']} thread(s); total {report['total_seconds'] / 60:.1f} min.", "",
             "| method | shot | accuracy | test-time lr, steps | meta-val acc | test cost (params, models) | "
             "wall time (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        s = r.get("settings")
        tt = f"{s['lr']}, {s['steps']}" if s else "-"
        seed = f" (seed {r['seed']})" if "seed" in r and len(report["seeds"]) > 1 else ""
        lines.append(f"| {r['method']}{seed} | {r['shot']} | {r['accuracy']:.2f} ± {r['ci95']:.2f} | {tt} | "
                     f"{r['val_accuracy']:.1f} | {r['test_cost']['params']:,}, {r['test_cost']['models']} | "
                     f"{r['seconds']:.0f} |")
    lines += ["", "nc-all-teachers L2-normalises each teacher's features before concatenating them. "
              "maml-*/finetune rows adapt with the test-time lr and steps shown; protonet/nc rows have no "
              "test-time settings. Wall time covers meta-training (real rows), selection and evaluation."]
    grid = report["grid"]
    edge = []
    for r in report["rows"]:
        at = [f"{k} {v}" for k, v in r.get("settings", {}).items() if v in (min(grid[k]), max(grid[k]))]
        if at:
            edge.append(f"{r['method']} {r['shot']}-shot ({', '.join(at)})")
    if edge:
        lines += ["", "Selected at the edge of the grid (a wider grid might do better): " + "; ".join(edge) + "."]
    return "\n".join(lines) + "\n"


_WORKER: dict = {}


def _init_worker(zoo: str, image_size: int, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER["teachers"] = Zoo(zoo).load_teachers()
    _WORKER["splits"] = {s: load_split("glyphs", s, image_size=image_size) for s in ("train", "val", "test")}


def _run(config: BaselineConfig, method: str) -> list[dict]:
    rows = run_baselines(_WORKER["splits"], _WORKER["teachers"], config, methods=[method], progress=False)
    for r in rows:
        print(f"{r['method']:<24} {r['shot']}-shot {r['accuracy']:6.2f} ± {r['ci95']:.2f}  "
              f"{r.get('settings', '')}  {r['seconds']:.0f}s", flush=True)
    return rows


def main(zoo: str = str(DEFAULT_ZOO), num_models: int = 12, image_size: int = 32, way: int = 5,
         shots: tuple[int, ...] = (1, 5), tasks: int = 600, val_tasks: int = 50, iterations: int = 500,
         train_inner_lr: float = 0.1, seeds: tuple[int, ...] = (0,), methods: tuple[str, ...] = METHODS,
         jobs: int = 2, threads: int = 1, out: str = str(RESULTS), name: str = "baselines") -> dict:
    torch.set_num_threads(threads)
    start = time.perf_counter()
    teachers = glyph_zoo(Path(zoo), num_models, image_size)
    config = BaselineConfig(way=way, test_tasks=tasks, val_tasks=val_tasks, train_seeds=tuple(seeds),
                            maml=MAMLConfig(inner_lr=train_inner_lr),
                            train=MetaTrainConfig(iterations=iterations, val_every=max(1, iterations // 5)))
    # One (shot, method) per job, each in a single-threaded process: parallel without intra-op overhead.
    work = [(shot, m) for shot in shots for m in methods]
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                             initargs=(zoo, image_size, threads)) as pool:
        futures = {key: pool.submit(_run, dataclasses.replace(config, shots=(key[0],)), key[1])
                   for key in sorted(work, key=lambda k: -k[0])}  # slow 5-shot jobs first
        rows = [r for key in work for r in futures[key].result()]
    report = {"dataset": "glyphs", "image_size": image_size, "way": way, "query": config.query, "tasks": tasks,
              "val_tasks": val_tasks, "seed": config.task_seed, "seeds": list(seeds), "selected_on": "val",
              "grid": {"lr": list(config.grid.lr), "steps": list(config.grid.steps)},
              "real_iterations": iterations, "meta_batch": config.train.meta_batch,
              "train_maml": dataclasses.asdict(config.maml),
              "zoo": {"path": zoo, "models": len(teachers), "arch": teachers[0].config.arch},
              "jobs": jobs, "threads": threads, "total_seconds": round(time.perf_counter() - start, 1),
              "rows": rows}
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out_dir / f"{name}.md").write_text(markdown(report))
    print(f"wrote {out_dir / name}.json and .md in {report['total_seconds'] / 60:.1f} min")
    return report


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--zoo", default=str(DEFAULT_ZOO), help="zoo directory (built if missing)")
    p.add_argument("--num-models", type=int, default=12)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--way", type=int, default=5)
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    p.add_argument("--tasks", type=int, default=600)
    p.add_argument("--val-tasks", type=int, default=50)
    p.add_argument("--iterations", type=int, default=500, help="real-data meta-training iterations per shot")
    p.add_argument("--train-inner-lr", type=float, default=0.1, help="MAML inner lr for real-data meta-training")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--jobs", type=int, default=2, help="worker processes, one (shot, method) each")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per worker")
    p.add_argument("--out", default=str(RESULTS), help="output directory")
    p.add_argument("--name", default="baselines", help="output file stem: <out>/<name>.json and .md")
    a = p.parse_args()
    main(a.zoo, a.num_models, a.image_size, a.way, tuple(a.shots), a.tasks, a.val_tasks, a.iterations,
         a.train_inner_lr, tuple(a.seeds), tuple(a.methods), a.jobs, a.threads, a.out, a.name)
