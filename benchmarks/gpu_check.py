"""The GPU check: does purer compute on CUDA what it computes on the CPU, without stalling, and how fast?

    python benchmarks/gpu_check.py                   # on a GPU: every check (sized for about 8 minutes; not yet run on one);
                                                     # writes benchmarks/results/gpu.json
    python benchmarks/gpu_check.py --device cpu      # every step on the CPU, small, in under a minute: the test
                                                     # suite runs it (tests/test_gpu_check.py), so it cannot rot

Without CUDA and without ``--device`` it prints "no CUDA" and exits 0.  The steps:

1. **parity** (float64): the teachers' episode-inversion losses and the bank's gradients, with the teachers
   looped and stacked (``vmap``), and the meta-gradients of a meta-batch with the tasks looped and vmapped
   (second-order MAML, ANIL, ProtoNet), on the device against the CPU's looped reference; a zoo of two
   input contracts (Conv4 and ResNet-10 teachers of two sizes).
2. **syncs**: one ECI meta-iteration (adversarial, with zoo distillation) outside a logging step under
   ``torch.cuda.set_sync_debug_mode("error")``: only ``purer.host``'s named read (the Gradient Switch's
   number) may synchronise.  On the CPU: the same iteration on the ``meta`` device, counting host reads.
3. **vmap**: the shipped learners' vmapped meta-steps raise no functorch fallback warning (a slow path).
4. **speed and memory**: seconds per ECI meta-iteration at the release's CIFAR-FS setting (13 Conv4 teachers,
   16 bank images per class, 5-way 1-shot 15-query, 4 tasks), all 13 and 4 teachers per step, 32 and 84 px,
   float32 and bf16, teachers and tasks batched and looped; ``torch.cuda.max_memory_allocated``.
5. **meta-test**: 600 tasks of MAML (10 test-time steps) with the tasks vmapped together and one by one.
6. **recipe**: the tiny recipe (ICFIL, support-CE and SimpleShot rows included) twice with ``deterministic=true`` (the
   two ``results.json`` must be identical), once in bf16, and fp16 refused in one line; on a GPU also the
   default recipe end to end (glyphs, up to 3,000 iterations with early stopping, every calibration).
7. **two GPUs** (with two or more): the tiny recipe in two processes gives the rows of one.

It prints a summary and exits non-zero on any problem.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
PARITY_TOLERANCE = 1e-9  # float64: the device and the CPU differ by summation order only


@functools.cache
def _tiny_zoo_on_cpu():
    from meta_synthetic import template_images, tiny_teacher
    from test_device import resnet_teacher

    data = template_images(num_classes=12)
    zoo = [tiny_teacher(data, [3 * i, 3 * i + 1, 3 * i + 2], seed=i) for i in range(3)] + [
        resnet_teacher(data, [9, 10, 11])]
    splits = {"train": template_images(num_classes=6, seed=3, name="train"),
              "val": template_images(num_classes=5, seed=1, name="val"),
              "test": template_images(num_classes=5, seed=2, name="test")}
    return zoo, splits


def tiny_zoo(device: torch.device, dtype: torch.dtype = torch.float32):
    """Three Conv4 teachers (8 px) and a ResNet-10 teacher (12 px) on a synthetic 8 px dataset, and its splits
    (fresh copies on ``device``)."""
    zoo, splits = _tiny_zoo_on_cpu()
    return ([copy.deepcopy(t).to(device=device, dtype=dtype) for t in zoo],
            {k: v.to(device) for k, v in splits.items()})


def tiny_config(tmp: Path, **overrides):
    from test_device import config

    return config(tmp, **overrides)


def close(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest absolute difference of two tensors (on the CPU)."""
    return float((a.detach().cpu() - b.detach().cpu()).abs().max()) if a.numel() else 0.0


def parity(device: torch.device, tmp: Path, problems: list[str]) -> dict:
    """Step 1: float64 losses and gradients on ``device`` (looped and batched) against the CPU's looped ones."""
    import dataclasses

    from purer.data import EpisodeSampler, TaskBatch
    from purer.inversion import EpisodeInversion
    from purer.pipeline import RunConfig, build_bank, build_learner

    cfg: RunConfig = tiny_config(tmp)
    report: dict = {}

    def inversion_grads(dev, batching):
        teachers, _ = tiny_zoo(torch.device(dev), torch.float64)
        bank = build_bank(cfg, teachers, 1, dev).double()
        inv = EpisodeInversion(teachers, bank, dataclasses.replace(cfg.inversion, teacher_batching=batching))
        idx = list(range(len(teachers)))
        losses, _ = inv.teacher_losses(idx)
        touched = bank.pop_touched()
        grads = torch.autograd.grad(losses.sum(), [bank.logits[k] for k in touched])
        return losses, grads

    ref_losses, ref_grads = inversion_grads("cpu", "loop")
    for batching in ("loop", "vmap"):
        losses, grads = inversion_grads(device, batching)
        diff = max([close(losses, ref_losses)] + [close(g, r) for g, r in zip(grads, ref_grads)])
        report[f"inversion_{batching}"] = diff
        if diff > PARITY_TOLERANCE:
            problems.append(f"parity: teachers {batching}ed on {device} differ from the CPU by {diff:.2e}")

    def meta_grads(dev, kind, batching):
        teachers, splits = tiny_zoo(torch.device(dev), torch.float64)
        learner = build_learner(dataclasses.replace(cfg, meta=dataclasses.replace(cfg.meta, learner=kind)),
                                teachers, 1, 8).to(device=dev, dtype=torch.float64)
        learner.task_batching = batching
        data = splits["train"]
        specs = [EpisodeSampler(data.class_sizes(), 3, 1, 2, seed=0).task(i) for i in range(4)]
        batch = data.episodes(specs)
        batch = TaskBatch(batch.support_x.double(), batch.support_y, batch.query_x.double(), batch.query_y, 3)
        logits = learner.batch_query_logits(batch)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.query_y.repeat(len(batch)))
        return torch.autograd.grad(loss, list(learner.parameters()))

    for kind in ("maml", "anil", "protonet"):
        ref = meta_grads("cpu", kind, "loop")
        for batching in ("loop", "vmap"):
            diff = max(close(g, r) for g, r in zip(meta_grads(device, kind, batching), ref))
            report[f"meta_{kind}_{batching}"] = diff
            if diff > PARITY_TOLERANCE:
                problems.append(f"parity: {kind} meta-gradients, tasks {batching}ed on {device}, differ from the "
                                f"CPU by {diff:.2e}")
    return report


def syncs(device: torch.device, tmp: Path, problems: list[str]) -> dict:
    """Step 2: one ECI iteration outside a logging step synchronises only through purer.host's named read."""
    from purer.host import host_traffic
    from purer.pipeline import ECI
    from purer.pipeline.distributed import Dist

    cfg = tiny_config(tmp)
    run_on = device if device.type == "cuda" else torch.device("meta")
    teachers, splits = tiny_zoo(run_on)
    # On the meta device the start teacher's meta-val scores (tests/test_device.py's meta.init: best-teacher) have no
    # data: host_traffic answers their reads with zeros.
    with host_traffic() if run_on.type == "meta" else contextlib.nullcontext():
        eci = ECI(cfg, teachers, {"val": splits["val"]}, Dist(device=run_on))
    with host_traffic() as traffic:
        eci.iteration()  # a first iteration builds what is built once (stacked teachers, optimizer state)
    eci.state.adversarial_next = True
    report = {"device": str(run_on)}
    if run_on.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            eci.iteration()
            report["ok"] = True
        except RuntimeError as e:
            report["ok"] = False
            problems.append(f"syncs: an ECI iteration synchronised outside purer.host: {str(e).splitlines()[0]}")
        finally:
            torch.cuda.set_sync_debug_mode(0)
        return report
    with host_traffic() as traffic:
        eci.iteration()
    report.update(named=dict(traffic.named), stray=dict(traffic.stray), blocking=dict(traffic.blocking_copies))
    if traffic.stray or traffic.blocking_copies or dict(traffic.named) != {"switch": 1}:
        problems.append(f"syncs: one ECI iteration read {dict(traffic.named)} by name, {dict(traffic.stray)} "
                        f"elsewhere, and copied {dict(traffic.blocking_copies)} blocking")
    return report


def vmap_fallbacks(device: torch.device, problems: list[str]) -> dict:
    """Step 3: the shipped learners' vmapped meta-steps use no functorch fallback (a slow per-sample loop)."""
    from purer.data import TaskBatch
    from purer.data.episodes import episode_labels
    from purer.meta import ANIL, MAML, ProtoNet, random_model, slow_vmap_operators

    report = {}
    for arch, args in (("conv4", {"width": 8}), ("resnet10", {"width": 8}), ("resnet18", {"width": 8})):
        for cls in (MAML, ANIL, ProtoNet):
            model = random_model(arch, 5, 1, 16, args, seed=0)
            learner = (cls(model, 5) if cls is not ProtoNet else cls(model)).to(device)
            learner.task_batching = "vmap"
            batch = TaskBatch(torch.rand(2, 5, 1, 16, 16), episode_labels(5, 1), torch.rand(2, 10, 1, 16, 16),
                              episode_labels(5, 2), 5).to(device)
            with slow_vmap_operators() as slow:
                learner.batch_query_logits(batch).sum().backward()
            report[f"{arch}/{cls.__name__}"] = slow
            if slow:
                problems.append(f"vmap: {cls.__name__} on {arch} falls back to a slow path for {', '.join(slow)}")
    return report


def iterations(device: torch.device, quick: bool) -> list[dict]:
    """Step 4: seconds per ECI meta-iteration (median of 5 after 2 warm-ups) and peak memory."""
    from speed import Bench, Setting

    table = []
    sizes, per_steps = ((16,), (2,)) if quick else ((32, 84), (13, 4))
    for size in sizes:
        for per_step in per_steps:
            for precision in ("fp32", "bf16"):
                for batching in ("vmap", "loop"):
                    s = Setting(teachers=3 if quick else 13, teachers_per_step=per_step, image_size=size,
                                images_per_class=2 if quick else 16, query=2 if quick else 15,
                                meta_batch=2 if quick else 4)
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    bench = Bench(s, device=str(device), autocast=torch.bfloat16 if precision == "bf16" else None,
                                  batching=batching)
                    for _ in range(1 if quick else 2):
                        bench.iteration()
                    parts = [bench.iteration() for _ in range(2 if quick else 5)]
                    med = {k: statistics.median(p[k] for p in parts) for k in parts[0]}
                    row = {"setting": s.name, "precision": precision, "batching": batching,
                           "inversion": round(med["inversion"], 4),
                           "meta_step": round(med["inner_loop"] + med["outer_update"], 4),
                           "meta_iteration": round(med["inversion"] + med["episodes"] + med["inner_loop"]
                                                   + med["outer_update"], 4),
                           "floor_share": round((med["teacher_passes"] + med["learner_passes"])
                                                / (med["inversion"] + med["episodes"] + med["inner_loop"]
                                                   + med["outer_update"]), 3)}
                    row["peak_memory_mb"] = round((torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                                                   else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
                                                  / 2 ** 20)
                    table.append(row)
                    del bench
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    return table


def meta_test(device: torch.device, quick: bool) -> dict:
    """Step 5: a meta-test of MAML (10 test-time steps), tasks vmapped together and one by one."""
    from purer.data import ImageSet
    from purer.evaluate import evaluate, task_list
    from purer.meta import MAML, InputSpec, MAMLConfig, random_model

    g = torch.Generator().manual_seed(0)
    size, n = (16, 20) if quick else (32, 600)
    data = ImageSet(torch.rand(20 * 40, 3, size, size, generator=g), torch.arange(20).repeat_interleave(40),
                    [f"c{i}" for i in range(20)]).to(device)
    learner = MAML(random_model("conv4", 5, 3, size, seed=0), 5, InputSpec(3, size),
                   MAMLConfig(inner_lr=0.1, inner_steps=10)).to(device)
    tasks = task_list(data, 5, 1, 15, n, 0)
    out = {"tasks": n}
    for batching in ("vmap", "loop"):
        learner.task_batching = batching
        evaluate(learner, data, tasks[:5], progress=False, chunk=5)  # warm-up
        result = evaluate(learner, data, tasks, progress=False, chunk=50)
        out[batching] = {"seconds": round(result.seconds, 2), "accuracy": round(result.accuracy, 2)}
    if abs(out["vmap"]["accuracy"] - out["loop"]["accuracy"]) > 0.5:
        out["problem"] = f"vmapped and looped meta-test differ: {out['vmap']['accuracy']} vs {out['loop']['accuracy']}"
    return out


def recipe_runs(device: torch.device, tmp: Path, quick: bool, problems: list[str]) -> dict:
    """Step 6 (and 7 with two GPUs): the recipe end to end, as a user runs it."""
    from recipe_runs import RECIPE, overrides, write_tiny_dataset

    data = write_tiny_dataset(tmp / "data")
    report: dict = {}
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cpu = ["cpu=true"] if device.type == "cpu" else []

    def run(name: str, extra: dict, launcher: list[str] | None = None, iterations: int = 2):
        out = tmp / name
        args = overrides(data, out, iterations, **{"eval.baselines": "[nc-pixels]", **extra})
        start = time.perf_counter()
        res = subprocess.run((launcher or [sys.executable]) + [str(RECIPE), "--no-progress", *args, *cpu], cwd=REPO,
                             capture_output=True, text=True, timeout=900, env=env)
        report[f"{name}_seconds"] = round(time.perf_counter() - start, 1)
        return res, out

    results = []
    for k in range(2):
        res, out = run(f"deterministic{k}", {"deterministic": "true"})
        if res.returncode != 0:
            problems.append(f"recipe: deterministic run failed: {res.stderr.strip().splitlines()[-1:]}")
            return report
        results.append(_comparable(json.loads((out / "results.json").read_text())))
    report["deterministic_identical"] = results[0] == results[1]
    if not report["deterministic_identical"]:
        problems.append("recipe: two runs with deterministic=true differ")
    report["rows"] = {f"{r['method']} {r['shot']}-shot": r["accuracy"] for r in results[0]["rows"]}
    res, _ = run("bf16", {"mixed_precision": "bf16", "eval.calibrations": "[]"})
    report["bf16_ok"] = res.returncode == 0
    if res.returncode != 0:
        problems.append(f"recipe: the bf16 run failed: {res.stderr.strip().splitlines()[-1:]}")
    res, _ = run("fp16", {"mixed_precision": "fp16"})
    report["fp16_refused"] = res.returncode == 2 and "fp16 is not supported" in res.stderr \
        and "Traceback" not in res.stderr
    if not report["fp16_refused"]:
        problems.append(f"recipe: fp16 was not refused in one line: {res.stderr.strip().splitlines()[-2:]}")
    if device.type == "cuda" and torch.cuda.device_count() >= 2:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        res, out = run("two", {"deterministic": "true"}, launcher)
        if res.returncode != 0:
            problems.append(f"two GPUs: the run failed: {res.stderr.strip().splitlines()[-1:]}")
        else:
            two = _comparable(json.loads((out / "results.json").read_text()))
            report["two_gpus_rows"] = {f"{r['method']} {r['shot']}-shot": r["accuracy"] for r in two["rows"]}
    if not quick:  # the default recipe end to end: glyphs, a 12-teacher zoo, up to 3,000 iterations, every calibration
        start = time.perf_counter()
        res = subprocess.run([sys.executable, str(RECIPE), "--no-progress", f"output_dir={tmp / 'default'}",
                              f"cache_dir={tmp / 'cache'}"], cwd=REPO, capture_output=True, text=True, timeout=3600,
                             env=env)
        report["default_recipe_seconds"] = round(time.perf_counter() - start, 1)
        if res.returncode != 0:
            problems.append(f"recipe: the default recipe failed: {res.stderr.strip().splitlines()[-1:]}")
        else:
            rows = json.loads((tmp / "default" / "results.json").read_text())["rows"]
            report["default_recipe_rows"] = {f"{r['method']} {r['shot']}-shot": r["accuracy"] for r in rows}
    return report


def _comparable(results: dict) -> dict:
    """results.json without what differs between two runs of one computation (times, the run id)."""
    results.pop("seconds"), results.pop("run_id")
    for r in results["rows"]:
        r.pop("seconds", None)
    results["meta_train"] = {k: v for k, v in results["meta_train"].items() if not k.startswith("seconds")}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", help="run on this device (default: cuda, if there is one)")
    parser.add_argument("--out", type=Path, help="where gpu.json goes (default benchmarks/results on a GPU, a temporary "
                                                 "folder otherwise)")
    args = parser.parse_args(argv)
    if args.device is None and not torch.cuda.is_available():
        print("no CUDA: the GPU check needs a GPU (or --device cpu for its quick form); nothing checked")
        return 0
    device = torch.device(args.device or "cuda")
    quick = device.type != "cuda"
    torch.set_num_threads(1)
    problems: list[str] = []
    start = time.perf_counter()
    report: dict = {"device": str(device), "quick": quick}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, step in (("parity", lambda: parity(device, tmp / "p", problems)),
                           ("syncs", lambda: syncs(device, tmp / "s", problems)),
                           ("vmap_fallbacks", lambda: vmap_fallbacks(device, problems)),
                           ("iterations", lambda: iterations(device, quick)),
                           ("meta_test", lambda: meta_test(device, quick)),
                           ("recipe", lambda: recipe_runs(device, tmp / "r", quick, problems))):
            t = time.perf_counter()
            with contextlib.redirect_stdout(sys.stderr):
                report[name] = step()
            report.setdefault("step_seconds", {})[name] = round(time.perf_counter() - t, 1)
            print(f"{name}: {time.perf_counter() - t:.1f} s", flush=True)
    if "problem" in report["meta_test"]:
        problems.append(report["meta_test"]["problem"])
    report["environment"] = {"gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                             "gpus": torch.cuda.device_count(), "torch": torch.__version__,
                             "wall_seconds": round(time.perf_counter() - start, 1)}
    report["problems"] = problems
    out = args.out or (RESULTS if device.type == "cuda" else Path(tempfile.gettempdir()) / "purer-gpu-check")
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(report, indent=1) + "\n")
    for r in report["iterations"]:
        print(f"{r['setting']:16s} {r['precision']:5s} {r['batching']:5s} iteration {r['meta_iteration']:.4f} s, "
              f"networks' passes {100 * r['floor_share']:.0f}%, peak {r['peak_memory_mb']} MB")
    mt = report["meta_test"]
    print(f"{mt['tasks']}-task meta-test: {mt['vmap']['seconds']} s vmapped, {mt['loop']['seconds']} s one by one")
    print("\n".join(f"PROBLEM: {p}" for p in problems) or f"{device}: every check passed")
    print(f"wrote {out / 'gpu.json'} ({report['environment']['wall_seconds']:.0f} s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
