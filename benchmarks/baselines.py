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
   meta-train split, keeping the state best on meta-val.

Writes benchmarks/results/baselines.json (``results.json`` rows, each with its
wall time) and baselines.md. Runs on --threads intra-op threads (default 1) so as
not to starve other jobs on a shared CPU.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch

from purer.baselines import METHODS, BaselineConfig, run_baselines
from purer.data import load_split
from purer.meta import MetaTrainConfig
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
             f"{report['meta_batch']}), state best on meta-val. Accuracy and 95% CI "
             f"(1.96 * sample std / sqrt(tasks)) in percent. {report['threads']} thread(s); total "
             f"{report['total_seconds'] / 60:.1f} min.", "",
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
    return "\n".join(lines) + "\n"


def main(zoo: str = str(DEFAULT_ZOO), num_models: int = 12, image_size: int = 32, way: int = 5,
         shots: tuple[int, ...] = (1, 5), tasks: int = 600, val_tasks: int = 50, iterations: int = 600,
         seeds: tuple[int, ...] = (0,), methods: tuple[str, ...] = METHODS, threads: int = 1,
         out: str = str(RESULTS)) -> dict:
    torch.set_num_threads(threads)
    start = time.perf_counter()
    teachers = glyph_zoo(Path(zoo), num_models, image_size)
    splits = {s: load_split("glyphs", s, image_size=image_size) for s in ("train", "val", "test")}
    config = BaselineConfig(way=way, shots=tuple(shots), test_tasks=tasks, val_tasks=val_tasks,
                            train_seeds=tuple(seeds), train=MetaTrainConfig(iterations=iterations,
                                                                            val_every=max(1, iterations // 6)))
    rows = run_baselines(splits, teachers, config, methods=methods,
                         log=lambda r: print(f"{r['method']:<24} {r['shot']}-shot {r['accuracy']:6.2f} ± "
                                             f"{r['ci95']:.2f}  {r.get('settings', '')}  {r['seconds']:.0f}s",
                                             flush=True))
    report = {"dataset": "glyphs", "image_size": image_size, "way": way, "query": config.query, "tasks": tasks,
              "val_tasks": val_tasks, "seed": config.task_seed, "seeds": list(seeds), "selected_on": "val",
              "grid": {"lr": list(config.grid.lr), "steps": list(config.grid.steps)},
              "real_iterations": iterations, "meta_batch": config.train.meta_batch,
              "zoo": {"path": zoo, "models": len(teachers), "arch": teachers[0].config.arch},
              "threads": threads, "total_seconds": round(time.perf_counter() - start, 1), "rows": rows}
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "baselines.json").write_text(json.dumps(report, indent=1) + "\n")
    (out_dir / "baselines.md").write_text(markdown(report))
    print(f"wrote {out_dir / 'baselines.json'} and baselines.md in {report['total_seconds'] / 60:.1f} min")
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
    p.add_argument("--iterations", type=int, default=600, help="real-data meta-training iterations per shot")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args()
    main(a.zoo, a.num_models, a.image_size, a.way, tuple(a.shots), a.tasks, a.val_tasks, a.iterations,
         tuple(a.seeds), tuple(a.methods), a.threads, a.out)
