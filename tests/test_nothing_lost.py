"""Nothing lost, round two: SIGTERM (clusters' preemption), --overwrite that checks first, baseline cache keys that
name every input, classes too small for a task, all through the recipe as a user runs it."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recipe_runs import REPO, RECIPE, accuracies, overrides, recipe, write_tiny_dataset


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(RECIPE), "--no-progress", *args], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(path: Path, proc: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.time() + seconds
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert path.exists(), f"{path} never appeared"


@pytest.mark.parametrize("stage", ["meta-training", "meta-test"])
def test_sigterm_keeps_the_work_and_resume_finishes_it(stage, tiny_root, baseline_run, tmp_path):
    """A cluster's SIGTERM (SLURM preemption, Kubernetes eviction) stops the run at the next safe point with its
    work saved, exit 143; --resume then gives the rows of the run that was never stopped."""
    out = tmp_path / "preempted"
    args = overrides(tiny_root, out, **{"cache_dir": str(baseline_run / "cache"), "checkpoint_every": 100})
    proc = start(args)
    if stage == "meta-training":
        wait_for(out / "pictures" / "pseudo_episode_000001.png", proc)  # after the first meta-iteration
    else:
        wait_for(out / "metatest_rows.json", proc)  # after the first meta-test row
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 128 + signal.SIGTERM, log[-2000:]
    assert "stopped (SIGTERM)" in log or stage == "meta-test", log[-2000:]
    assert "Traceback" not in log and not (out / "results.json").exists()
    assert list((out / "checkpoints").glob("checkpoint_*/COMPLETE"))
    if stage == "meta-test":
        kept = json.loads((out / "metatest_rows.json").read_text())
        assert sum(len(rows) for rows in kept.values()) >= 1
    res = recipe(args + ["--resume"])
    assert res.returncode == 0, res.stderr[-3000:]
    if stage == "meta-test":
        assert "meta-test: reusing" in res.stdout  # the finished rows are not computed again
    assert accuracies(out) == accuracies(baseline_run)


def test_overwrite_checks_every_input_before_touching_the_old_run(tiny_root, baseline_run, tmp_path):
    out = tmp_path / "finished"
    shutil.copytree(baseline_run, out, ignore=shutil.ignore_patterns(".lock"))
    def listing() -> list:
        return sorted(p.relative_to(out) for p in out.rglob("*") if p.name != ".lock")

    before = listing()
    # a typo in data.root: refused before anything of the finished run is touched
    res = recipe(overrides(tiny_root, out, **{"data.root": str(tiny_root) + "-typo"}) + ["--overwrite"])
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert listing() == before
    # a run that fails after its inputs were checked (an unknown network) gives the old outputs back
    res = recipe(overrides(tiny_root, out, **{"meta.arch": "no-such-net", "cache_dir": str(baseline_run / "cache")})
                 + ["--overwrite"])
    assert res.returncode == 2 and "no-such-net" in res.stderr and "Traceback" not in res.stderr
    assert listing() == before
    assert (out / "results.json").read_text() == (baseline_run / "results.json").read_text()
    # (a run that gets going replaces the old one for good: test_pipeline.py's overwrite test)


def test_the_baseline_cache_misses_when_any_input_changes(tmp_path):
    """Every input that changes a number is in the key: each teacher's config (a re-registration with other
    normalisation), the data, the task lists, the code; the same inputs hit."""
    from meta_synthetic import template_images, tiny_teacher
    from purer.pipeline import RunConfig
    from purer.pipeline import baselines as b

    data = template_images(num_classes=12)
    splits = {"train": data, "val": template_images(5, seed=1), "test": template_images(5, seed=2)}
    teachers = [tiny_teacher(data, [0, 1, 2], seed=0)]
    cfg = RunConfig(cache_dir=str(tmp_path))

    def path(c=cfg, s=splits, t=teachers) -> Path:
        return b._baseline_plan(c, s, t)[1]

    base = path()
    assert path() == base
    renormalised = dataclasses.replace(teachers[0].config, mean=[0.0], std=[1.0])
    other_teacher = [type(teachers[0])(teachers[0].model, renormalised, teachers[0].model_id)]
    changed = {
        "teacher config": path(t=other_teacher),
        "data": path(s={**splits, "test": template_images(5, seed=3)}),
        "task list": path(c=dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, seed=1))),
        "settings": path(c=dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, val_tasks=31))),
    }
    code = b.code_version
    b.code_version = lambda: "other code"
    try:
        changed["code"] = path()
    finally:
        b.code_version = code
    assert all(p != base for p in changed.values()), {k: p == base for k, p in changed.items()}


def one_small_class(root: Path, keep: int) -> Path:
    """The tiny dataset with test class test00 cut to ``keep`` images."""
    data = write_tiny_dataset(root)
    for image in sorted((data / "test" / "test00").iterdir())[keep:]:
        image.unlink()
    return data


def test_a_class_too_small_for_a_task_is_named_and_recorded(tmp_path):
    data = one_small_class(tmp_path / "data", keep=1)
    out = tmp_path / "run"
    res = recipe(overrides(data, out, 1, **{"eval.baselines": "[]", "eval.calibrations": "[]",
                                            "zoo.path": str(tmp_path / "zoo")}))
    assert res.returncode == 0, res.stderr[-3000:]
    assert ("purer: warning: folder/test: 1 class(es) too small for a 1-shot task with a query are left out of "
            "its tasks: test00 (1 image); they are drawn from the other 5") in res.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["task_classes"]["test"]["1"] == {"classes": 5, "dropped": {"test00": 1},
                                                    "every_task_same_classes": True}
    assert "every task holds the same classes" in (out / "results.md").read_text()


def test_fewer_classes_than_the_way_is_one_line_naming_the_way_out(tmp_path):
    data = one_small_class(tmp_path / "data", keep=1)
    for image in sorted((data / "test" / "test01").iterdir())[1:]:
        image.unlink()
    res = recipe(overrides(data, tmp_path / "run", 1, **{"eval.baselines": "[]", "zoo.path": str(tmp_path / "zoo")}))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert ("purer: error: folder/test: cannot sample 5-way 1-shot tasks: they need 5 classes of at least 2 images, "
            "but only 4 of 6 have that (too small: test00 (1), test01 (1)); lower eval.way") in res.stderr
