"""The GPU check: does purer compute the same thing on CUDA as on the CPU, and how fast is it there?

    python benchmarks/gpu_check.py            # under 5 minutes on one GPU; writes benchmarks/results/gpu.json

Without CUDA it prints one line and exits 0.  On a GPU machine it:

1. runs a tiny recipe (a fabricated 16 px class-per-folder dataset, a 2-teacher zoo, 6 ECI
   iterations) on CUDA and, with ``cpu=true``, on the CPU, and checks that the meta-test task
   lists agree (their fingerprints) and that the accuracies agree within ``RUN_TOLERANCE``
   points (training is chaotic: float rounding on another device may flip a few pseudo
   images' pixels and so a few query answers);
2. evaluates the CPU run's saved meta-learner on the same tasks on both devices: a fixed
   network must score within ``EVAL_TOLERANCE`` points (only float rounding differs);
3. times one ECI meta-iteration at the release's CIFAR-FS setting (13 Conv4 teachers, 32 px,
   16 bank images per class, 5-way 1-shot 15-query, 4 tasks, one second-order inner step),
   all 13 teachers per step and 4 per step, and at MiniImageNet's 84 px, in float32 and bf16,
   each with teachers and tasks batched (vmap) and looped;
4. times one 600-task meta-test (MAML, 5-way 1-shot, 10 test-time steps) with tasks adapted
   together (chunks of 50) and one by one;
5. with two or more GPUs, runs the tiny recipe in two processes and checks it against one.

It prints one table and exits non-zero on a mismatch.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import torch  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
RUN_TOLERANCE = 15.0  # points, whole tiny runs (6 tasks of 3 queries: one answer is 1.1 points)
EVAL_TOLERANCE = 1.0  # points, one fixed network evaluated on both devices


def recipe(args: list[str], launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    from recipe_runs import RECIPE

    cmd = (launcher or [sys.executable]) + [str(RECIPE), "--no-progress", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def rows(out: Path) -> dict:
    return {(r["method"], r["shot"]): r for r in json.loads((out / "results.json").read_text())["rows"]}


def check_runs(tmp: Path, problems: list[str]) -> dict:
    """Steps 1, 2 and 5: the tiny recipe on each device, a fixed learner on each device, two processes."""
    from purer.data import load_split
    from purer.evaluate import evaluate, task_list
    from purer.meta import MetaLearner
    from recipe_runs import overrides, write_tiny_dataset

    data = write_tiny_dataset(tmp / "data")
    report: dict = {}
    runs = {}
    for name, extra in (("cuda", {}), ("cpu", {"cpu": "true"})):
        out = tmp / name
        start = time.perf_counter()
        res = recipe(overrides(data, out, **{"eval.baselines": "[nc-pixels, maml-random]", **extra}))
        if res.returncode != 0:
            problems.append(f"the tiny recipe failed on {name}: {res.stderr.strip().splitlines()[-1:]}")
            return report
        runs[name] = rows(out)
        report[f"tiny_run_{name}_seconds"] = round(time.perf_counter() - start, 1)
    cuda, cpu = runs["cuda"], runs["cpu"]
    report["tiny_runs"] = {f"{m} {s}-shot": [cpu[m, s]["accuracy"], cuda[m, s]["accuracy"]] for m, s in cpu}
    for key in cpu:
        if cpu[key].get("tasks_id") != cuda[key].get("tasks_id"):
            problems.append(f"{key[0]} {key[1]}-shot: the meta-test task lists differ between CPU and CUDA")
        if abs(cpu[key]["accuracy"] - cuda[key]["accuracy"]) > RUN_TOLERANCE:
            problems.append(f"{key[0]} {key[1]}-shot: CPU {cpu[key]['accuracy']} vs CUDA {cuda[key]['accuracy']}, "
                            f"more than {RUN_TOLERANCE} points apart")

    learner = MetaLearner.from_pretrained(tmp / "cpu" / "meta_learner")
    test = load_split("folder", "test", str(data), 16)
    tasks = task_list(test, 5, 1, 3, 60, 0)
    accs = {}
    for device in ("cpu", "cuda"):
        accs[device] = evaluate(learner.to(device), test.to(device), tasks, progress=False,
                                adapt_kwargs=learner.test_time_settings(1)).accuracy
    report["fixed_learner"] = accs
    if abs(accs["cpu"] - accs["cuda"]) > EVAL_TOLERANCE:
        problems.append(f"one saved meta-learner scores {accs['cpu']:.2f} on the CPU and {accs['cuda']:.2f} on "
                        f"CUDA, more than {EVAL_TOLERANCE} points apart")

    if torch.cuda.device_count() >= 2:
        out = tmp / "two"
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        res = recipe(overrides(data, out, **{"eval.baselines": "[nc-pixels, maml-random]"}), launcher)
        if res.returncode != 0:
            problems.append(f"the two-process recipe failed: {res.stderr.strip().splitlines()[-1:]}")
        else:
            two = rows(out)
            report["two_processes"] = {f"{m} {s}-shot": [cuda[m, s]["accuracy"], two[m, s]["accuracy"]]
                                       for m, s in cuda}
            for key in cuda:
                if abs(cuda[key]["accuracy"] - two[key]["accuracy"]) > RUN_TOLERANCE:
                    problems.append(f"{key[0]} {key[1]}-shot: one GPU process {cuda[key]['accuracy']} vs two "
                                    f"{two[key]['accuracy']}")
    return report


def time_iterations() -> list[dict]:
    """Step 3: seconds per ECI meta-iteration (median of 5 after 2 warm-up iterations)."""
    from speed import Bench, Setting

    table = []
    for size in (32, 84):
        for per_step in (13, 4):
            for precision in ("fp32", "bf16"):
                for batching in ("vmap", "loop"):
                    s = Setting(teachers_per_step=per_step, image_size=size, detail=False)
                    bench = Bench(s, device="cuda", autocast=torch.bfloat16 if precision == "bf16" else None)
                    bench.inversion.batched = batching == "vmap"
                    bench.learner.task_batching = batching
                    for _ in range(2):
                        bench.iteration()
                    parts = [bench.iteration() for _ in range(5)]
                    med = {k: statistics.median(p[k] for p in parts) for k in parts[0]}
                    table.append({"setting": s.name, "precision": precision, "batching": batching,
                                  "inversion": med["inversion"], "meta_step": med["inner_loop"] + med["outer_update"],
                                  "meta_iteration": med["inversion"] + med["episodes"] + med["inner_loop"]
                                  + med["outer_update"]})
                    del bench
                    torch.cuda.empty_cache()
    return table


def time_meta_test() -> dict:
    """Step 4: one 600-task meta-test of a MAML learner, tasks together and one by one."""
    from purer.data import ImageSet
    from purer.evaluate import evaluate, task_list
    from purer.meta import MAML, MAMLConfig, InputSpec, random_model

    g = torch.Generator().manual_seed(0)
    images = torch.rand(20 * 40, 3, 32, 32, generator=g)
    data = ImageSet(images, torch.arange(20).repeat_interleave(40), [f"c{i}" for i in range(20)]).to("cuda")
    learner = MAML(random_model("conv4", 5, 3, 32, seed=0), 5, InputSpec(3, 32),
                   MAMLConfig(inner_lr=0.1, inner_steps=10)).to("cuda")
    tasks = task_list(data, 5, 1, 15, 600, 0)
    out = {}
    for batching, chunk in (("vmap", 50), ("loop", 50)):
        learner.task_batching = batching
        evaluate(learner, data, tasks[:50], progress=False, chunk=chunk)  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        result = evaluate(learner, data, tasks, progress=False, chunk=chunk)
        torch.cuda.synchronize()
        out[batching] = {"seconds": round(time.perf_counter() - start, 2), "accuracy": round(result.accuracy, 2)}
    return out


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA: the GPU check needs a GPU; nothing checked")
        return 0
    problems: list[str] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        report = check_runs(Path(tmp), problems)
    report["iterations"] = time_iterations()
    report["meta_test_600"] = time_meta_test()
    report["environment"] = {"gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(),
                             "torch": torch.__version__, "wall_seconds": round(time.perf_counter() - start, 1)}
    report["problems"] = problems
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gpu.json").write_text(json.dumps(report, indent=1) + "\n")

    print(f"{report['environment']['gpu']} x{report['environment']['gpus']}, torch {torch.__version__}")
    print(f"{'setting':18s} {'precision':9s} {'batching':8s} {'inversion':>10s} {'meta-step':>10s} {'iteration':>10s}")
    for r in report["iterations"]:
        print(f"{r['setting']:18s} {r['precision']:9s} {r['batching']:8s} {r['inversion']:10.4f} "
              f"{r['meta_step']:10.4f} {r['meta_iteration']:10.4f}")
    for batching, r in report["meta_test_600"].items():
        print(f"600-task meta-test, tasks {'together' if batching == 'vmap' else 'one by one'}: {r['seconds']} s")
    for key in ("tiny_runs", "fixed_learner", "two_processes"):
        if key in report:
            print(f"{key}: {report[key]}")
    print("\n".join(f"MISMATCH: {p}" for p in problems) or "CPU and CUDA agree")
    print(f"wrote {RESULTS / 'gpu.json'} ({report['environment']['wall_seconds']:.0f} s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
