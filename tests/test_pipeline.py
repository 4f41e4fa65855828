"""End to end through recipes/purer.py on a tiny fabricated dataset: run, errors, resume after SIGKILL,
two processes."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from purer.pipeline import CHECKPOINTED, checkpointed_state
from recipe_runs import ITERATIONS, REPO, RECIPE, accuracies, overrides, recipe


def test_run_writes_every_output(baseline_run):
    out = baseline_run
    results = json.loads((out / "results.json").read_text())
    assert results["selected_on"] == "val" and results["dataset"] == "folder"
    assert {"dataset", "way", "query", "tasks", "seed", "rows"} <= set(results)
    methods = [r["method"] for r in results["rows"]]
    assert methods[:4] == ["purer", "purer+icfil", "purer+support-ce", "purer+simpleshot"]
    # one row per shot carries the calibration (or none) chosen on meta-val, the best there
    mine = [r for r in results["rows"] if r["method"].startswith("purer")]
    selected = [r for r in mine if r.get("selected")]
    assert len(selected) == 1 and selected[0]["val_accuracy"] == max(r["val_accuracy"] for r in mine)
    assert results["calibration"] == {"1": {"purer": "none"}.get(selected[0]["method"],
                                                                  selected[0]["method"].removeprefix("purer+"))}
    icfil = next(r for r in mine if r["method"] == "purer+icfil")["calibration"]
    control = next(r for r in mine if r["method"] == "purer+support-ce")["calibration"]
    assert control == {"steps": icfil["calibration_steps"], "lr": icfil["calibration_lr"]}  # ICFIL's budget
    assert {"nc-pixels", "nc-best-teacher", "maml-random"} <= set(methods)
    for r in results["rows"]:
        assert {"method", "way", "shot", "accuracy", "ci95", "test_cost"} <= set(r)
        assert 0 <= r["accuracy"] <= 100 and r["ci95"] >= 0
    summary = results["meta_train"]
    assert summary["switch_fired"] == len(summary["fired_at"]) > 0  # patience 1 after warm-up 1: it fires
    # every firing before the last iteration made the next bank update adversarial
    assert summary["adversarial_steps"] == len([i for i in summary["fired_at"] if i < summary["iterations"]])
    table = (out / "results.md").read_text()
    assert "| purer+icfil |" in table and "± " in table
    assert (out / "config.yaml").is_file()
    assert list((out / "pictures").glob("pseudo_episode_*.png")) and (out / "pictures" / "bank_final.png").is_file()
    assert (out / "pictures" / "training.png").is_file()
    assert list((out / "logs").rglob("events.out.tfevents*"))
    kept = sorted((p.parent.name for p in (out / "checkpoints").glob("checkpoint_*/COMPLETE")),
                  key=lambda name: int(name.split("_")[1]))
    assert kept == [f"checkpoint_{ITERATIONS - 2}", f"checkpoint_{ITERATIONS}"]  # the two newest, the last at the end
    final = out / "checkpoints" / f"checkpoint_{ITERATIONS}"
    assert sorted(p.name for p in final.iterdir()) == sorted(["COMPLETE", "run.json", "rng_0.pt"]
                                                             + [f"{name}.pt" for name in CHECKPOINTED])
    assert checkpointed_state(final, "state")["iteration"] == ITERATIONS
    assert set(checkpointed_state(final, "switch")) == {"iteration", "best", "stale", "fired"}
    assert all(k.startswith("logits.") for k in checkpointed_state(final, "bank"))


def test_the_meta_learner_is_saved_and_reloads_to_the_same_accuracy(tiny_root, baseline_run):
    from purer.data import load_split
    from purer.evaluate import evaluate, task_list
    from purer.pipeline import load_meta_learner

    folder = baseline_run / "meta_learner"
    config = json.loads((folder / "config.json").read_text())
    assert config["learner"] == "ta-maml" and config["task_adaptive"]["init"] == "l2f"  # the default, L2F
    assert config["selected"]["iteration"] >= 0
    learner = load_meta_learner(folder)
    test = load_split("folder", "test", str(tiny_root), 16)
    result = evaluate(learner, test, task_list(test, 5, 1, 3, 6, 0), adapt_kwargs=config["test_time"]["1"],
                      progress=False)
    purer_row = next(r for r in json.loads((baseline_run / "results.json").read_text())["rows"]
                     if r["method"] == "purer")
    assert round(result.accuracy, 2) == purer_row["accuracy"]


def test_a_corrupt_meta_learner_is_a_clear_error(baseline_run, tmp_path):
    from purer.pipeline import RunError, load_meta_learner

    broken = tmp_path / "meta_learner"
    shutil.copytree(baseline_run / "meta_learner", broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(RunError, match="cannot load a meta-learner"):
        load_meta_learner(broken)


def test_baselines_are_reused_when_nothing_changed(tiny_root, baseline_run, tmp_path):
    res = recipe(overrides(tiny_root, tmp_path / "again", **{"cache_dir": str(baseline_run / "cache")}))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "reusing" in res.stdout
    assert accuracies(tmp_path / "again") == accuracies(baseline_run)  # the run is deterministic too


@pytest.mark.parametrize("args,fragment", [
    (["meta.lerner=maml"], "unknown config key 'meta.lerner'"),
    (["meta.learner=reptile"], "meta.learner must be one of"),
    (["inversion.seed=3"], "use seed=3 instead"),
    (["eval.grid.lr=[]"], "at least one lr"),
    (["eval.tasks=0"], "eval.tasks, eval.val_tasks and meta.val_tasks must be >= 1"),
    (["meta.train.meta_batch=0"], "meta_batch >= 1"),
    (["eval.way=20", "eval.calibrations=[icfil]"], "only a calibration that reads its features alone can classify"),
    (["data.dataset=folder", "data.root=/nonexistent/data"], "/nonexistent/data"),
    (["data.root=/dev/null/purer"], "cannot write the glyph cache"),
])
def test_bad_config_is_one_clear_line(args, fragment, tmp_path):
    res = recipe(args + [f"output_dir={tmp_path}"])
    assert res.returncode == 2
    assert fragment in res.stderr and "Traceback" not in res.stderr


def test_impossible_way_is_a_clear_error(tiny_root, tmp_path):
    res = recipe(overrides(tiny_root, tmp_path, **{"eval.way": 9, "meta.way": 9}))
    assert res.returncode == 2 and "cannot sample 9-way" in res.stderr and "Traceback" not in res.stderr


def test_a_5_way_learner_is_meta_tested_at_another_way_by_its_features_alone(tiny_root, baseline_run, tmp_path):
    # the baseline run's checkpoints resumed with eval.way=6: the same learner (eval settings do not train), and
    # at a way its 5-way head cannot take the only row is SimpleShot's, the same as SimpleShot on the saved learner
    from purer.calibrate import SimpleShot, calibration_accuracies
    from purer.data import load_split
    from purer.evaluate import task_list
    from purer.pipeline import load_meta_learner

    out = tmp_path / "way6"
    shutil.copytree(baseline_run / "checkpoints", out / "checkpoints")
    res = recipe(overrides(tiny_root, out, **{"eval.way": 6, "eval.baselines": "[]",
                                              "cache_dir": str(baseline_run / "cache")}) + ["--resume"])
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["way"], r.get("selected")) for r in results["rows"]] == [("purer+simpleshot", 6, True)]
    assert results["calibration"] == {"1": "simpleshot"} and "paired_vs_purer" not in results["rows"][0]
    learner = load_meta_learner(out / "meta_learner")
    reference = load_meta_learner(baseline_run / "meta_learner")
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in learner.state_dict().items())
    test = load_split("folder", "test", str(tiny_root), 16)
    accs, _ = calibration_accuracies(learner, [SimpleShot()], test, task_list(test, 6, 1, 3, 6, 0))
    assert round(100 * float(accs[0].mean()), 2) == results["rows"][0]["accuracy"]


def test_a_zoo_recipe_the_data_cannot_satisfy_is_a_clear_error(tiny_root, tmp_path):
    res = recipe(overrides(tiny_root, tmp_path, **{"zoo.path": str(tmp_path / "zoo5"), "zoo.num_models": 5}))
    assert res.returncode == 2 and "need 25 classes" in res.stderr and "Traceback" not in res.stderr


def test_an_unknown_meta_architecture_is_a_clear_error(tiny_root, tmp_path):
    res = recipe(overrides(tiny_root, tmp_path, **{"meta.arch": "conv5"}))
    assert res.returncode == 2 and "unknown architecture 'conv5'" in res.stderr and "Traceback" not in res.stderr


def test_teachers_sharing_a_class_share_its_bank_images(tiny_root, tmp_path):
    """Three random 5-class subsets of 10 classes overlap; each shared class is one bank class."""
    out = tmp_path / "overlap"
    res = recipe(overrides(tiny_root, out, 1, **{"zoo.path": str(tmp_path / "zoo_random"), "zoo.num_models": 3,
                                                 "zoo.subsets": "random", "zoo.epochs": 1,
                                                 "cache_dir": str(out / "cache"), "eval.baselines": "[]",
                                                 "eval.calibrations": "[]"}))
    assert res.returncode == 0, res.stderr[-3000:]
    from purer.zoo.store import Zoo
    names = {c for t in Zoo(tmp_path / "zoo_random").load_teachers() for c in t.class_ids}
    assert json.loads((out / "results.json").read_text())["meta_train"]["bank_classes"] == len(names) < 15


def test_a_zoo_of_other_models_is_used_as_it_is(tiny_root, baseline_run, tmp_path):
    from purer.zoo.store import Zoo

    built = Zoo(tiny_root.parent / "tiny_zoo")
    model, config = built.load_model(built.ids()[0])
    mine = Zoo(tmp_path / "my_zoo", create=True)
    mine.add("mine", model, config)  # e.g. a registered model; the recipe must not pre-train into this zoo
    out = tmp_path / "user_zoo"
    res = recipe(overrides(tiny_root, out, 1, **{"zoo.path": str(mine.path), "cache_dir": str(out / "cache"),
                                                 "eval.baselines": "[]", "eval.calibrations": "[]"}))
    assert res.returncode == 0, res.stderr[-3000:]
    assert mine.ids() == ["mine"] and json.loads((out / "results.json").read_text())["zoo"]["models"] == 1
    # config.yaml records the zoo the run used, not the zoo-building defaults it never applied
    used = yaml.safe_load((out / "config.yaml").read_text())["zoo"]
    assert (used["path"], used["num_models"], used["classes_per_model"], used["build_if_missing"]) == \
        (str(mine.path), 1, config.num_classes, False)


def test_a_used_output_dir_is_refused_and_overwrite_replaces_its_run(tiny_root, baseline_run, tmp_path):
    """A fresh run into another run's folder used to delete its checkpoints (two newest kept across runs), and
    --resume then continued the other run."""
    out = tmp_path / "used"
    shutil.copytree(baseline_run, out, ignore=shutil.ignore_patterns("cache", ".lock"))
    def files() -> list[Path]:
        return sorted(p.relative_to(out) for p in out.rglob("*") if p.name != ".lock")  # the lock is taken first

    before = files()
    args = overrides(tiny_root, out, 1, **{"cache_dir": str(baseline_run / "cache"), "eval.baselines": "[]",
                                           "eval.calibrations": "[]"})
    res = recipe(args)
    assert res.returncode == 2 and "already holds a finished run" in res.stderr
    assert files() == before  # nothing written, nothing deleted
    res = recipe(args + ["--overwrite"])
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    kept = sorted(p.parent.name for p in (out / "checkpoints").glob("checkpoint_*/COMPLETE"))
    assert kept == ["checkpoint_1"] and results["meta_train"]["iterations"] == 1
    assert json.loads((out / "checkpoints" / "checkpoint_1" / "run.json").read_text())["run_id"] == results["run_id"]
    assert not (out / ".replaced").exists()  # the replaced run's outputs went once the new run had a checkpoint


def test_val_every_zero_validates_the_final_state_only(tiny_root, baseline_run, tmp_path):
    out = tmp_path / "no_val"
    res = recipe(overrides(tiny_root, out, 2, **{"meta.train.val_every": 0, "cache_dir": str(baseline_run / "cache")}))
    assert res.returncode == 0, res.stderr[-3000:]
    assert [step for step, _ in json.loads((out / "results.json").read_text())["meta_train"]["val_curve"]] == [2]


def test_zero_iterations_evaluate_the_initialisation_and_write_strict_json(tiny_root, baseline_run, tmp_path):
    out = tmp_path / "untrained"
    res = recipe(overrides(tiny_root, out, 0, **{"cache_dir": str(baseline_run / "cache")}))
    assert res.returncode == 0, res.stderr[-3000:]

    def reject(constant):
        raise AssertionError(f"results.json holds {constant}, which is not JSON")

    summary = json.loads((out / "results.json").read_text(), parse_constant=reject)["meta_train"]
    assert summary["val_accuracy"] is None and summary["val_curve"] == []


def test_a_run_from_the_best_teacher_names_it_and_resumes_to_the_same_results(tiny_root, baseline_run, tmp_path):
    # with a weight average and an annealed outer lr too: a resumed run equals this one only if the average and
    # the lr schedule's initial lr are checkpointed
    fast = {"meta.init": "best-teacher", "cache_dir": str(baseline_run / "cache"), "eval.baselines": "[]",
            "eval.calibrations": "[]", "meta.train.average": 0.5, "meta.train.schedule": "cosine"}
    out = tmp_path / "best_teacher"
    res = recipe(overrides(tiny_root, out, 4, **fast))
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "results.json").read_text())["meta_train"]
    start = summary["start_teacher"]
    # the start is validated too (iteration 0), so the selection may keep it
    steps = [step for step, _ in summary["val_curve"]]
    assert steps[0] == 0 and len(steps) > 1
    assert summary["best_iteration"] == max(summary["val_curve"], key=lambda sv: sv[1])[0]
    assert (tiny_root.parent / "tiny_zoo" / start["model_id"] / "config.json").is_file()
    assert f"starts from teacher {start['model_id']} ({start['val_accuracy']}% on meta-val" in res.stdout
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoints" / "checkpoint_2", resumed / "checkpoints" / "checkpoint_2")
    res = recipe(overrides(tiny_root, resumed, 4, **fast) + ["--resume"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert accuracies(resumed) == accuracies(out)


def test_resume_after_sigkill_gives_the_same_results(tiny_root, baseline_run, tmp_path):
    out = tmp_path / "killed"
    args = overrides(tiny_root, out, **{"cache_dir": str(baseline_run / "cache")})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(RECIPE), "--no-progress", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = out / "checkpoints" / "checkpoint_4" / "COMPLETE"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker.exists() and not (out / "results.json").exists()
    res = recipe(args + ["--resume"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout
    assert accuracies(out) == accuracies(baseline_run)


def test_the_baselines_worker_dies_with_a_killed_run(tiny_root, tmp_path):
    """SIGKILL gives a run no chance to stop its background worker, which used to compute on for minutes."""
    out = tmp_path / "killed_worker"
    # Not cached, so the worker starts; long enough that it cannot end on its own while the test waits.
    args = overrides(tiny_root, out, 200, **{"eval.baselines": "[maml-real]", "eval.baseline_train_iterations": 50000})
    proc = subprocess.Popen([sys.executable, str(RECIPE), "--no-progress", *args], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if "background process" in line:
            break

    def workers() -> set[int]:
        """The run's pool worker (not multiprocessing's resource tracker, which ends with its pipe)."""
        found = set()
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                cmdline = (stat.parent / "cmdline").read_bytes()
            except OSError:  # gone meanwhile
                continue
            if int(fields[1]) == proc.pid and fields[0] != "Z" and b"spawn_main" in cmdline:
                found.add(int(stat.parent.name))
        return found

    deadline = time.time() + 60
    while not workers() and time.time() < deadline:
        time.sleep(0.1)
    alive = workers()
    assert alive, "no worker started"
    time.sleep(5)  # past its start-up (a worker killed while starting ends anyway): it is computing rows
    proc.kill()
    proc.wait()
    deadline = time.time() + 10
    while alive and time.time() < deadline:
        time.sleep(0.2)
        alive = {pid for pid in alive if Path(f"/proc/{pid}").exists()
                 and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"}
    for pid in alive:  # a failing test leaves no orphan behind
        os.kill(pid, signal.SIGKILL)
    assert not alive, f"processes {alive} outlived the killed run"


def test_resume_with_another_network_is_a_clear_error(tiny_root, baseline_run, tmp_path):
    out = tmp_path / "changed"
    shutil.copytree(baseline_run / "checkpoints", out / "checkpoints")
    res = recipe(overrides(tiny_root, out, **{"meta.arch_args": "{width: 8}"}) + ["--resume"])
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "belong to a run with other settings (meta.arch_args.width: None there, 8 here)" in res.stderr


def test_a_finished_run_resumed_with_a_larger_budget_is_the_longer_run(tiny_root, baseline_run, tmp_path):
    # a run of 6 iterations, finished (meta-tested), then --resume with the baseline run's 10: the four more
    # iterations continue its last checkpoint and give the 10-iteration run's learner and rows
    out = tmp_path / "extended"
    args = overrides(tiny_root, out, 6, **{"cache_dir": str(baseline_run / "cache")})
    res = recipe(args)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["meta_train"]["iterations"] == 6
    first = checkpointed_state(out / "checkpoints" / "checkpoint_6", "state")["seconds"]
    res = recipe(overrides(tiny_root, out, **{"cache_dir": str(baseline_run / "cache")}) + ["--resume"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout and "(iteration 6)" in res.stdout
    summary = json.loads((out / "results.json").read_text())["meta_train"]
    # the timings are the whole run's: the first session's six iterations and the resumed session's four
    whole = checkpointed_state(out / "checkpoints" / f"checkpoint_{ITERATIONS}", "state")["seconds"]
    assert all(whole[k] > first[k] for k in ("inversion", "distill", "meta"))
    assert all(summary[f"seconds_{k}"] == round(v, 1) for k, v in whole.items())
    assert summary == {**json.loads((baseline_run / "results.json").read_text())["meta_train"],
                       **{k: summary[k] for k in summary if k.startswith("seconds")}}
    assert accuracies(out) == accuracies(baseline_run)
    last = out / "checkpoints" / f"checkpoint_{ITERATIONS}"
    assert json.loads((last / "run.json").read_text())["settings"]["meta.train.iterations"] == ITERATIONS


def test_early_stopping_ends_meta_training_and_more_patience_trains_on(tiny_root, baseline_run, tmp_path):
    # an outer lr too small to change the learner: every meta-val score equals the first, so the first one after
    # it sets no new best; patience 1 stops at the second (iteration 6), and --resume with patience 2 trains on from
    # there to the third (iteration 9), of a budget of 10
    out = tmp_path / "patient"
    fast = {"cache_dir": str(baseline_run / "cache"), "eval.baselines": "[]", "eval.calibrations": "[]",
            "meta.train.outer_lr": 1e-12}
    res = recipe(overrides(tiny_root, out, **fast, **{"meta.train.patience": 1}))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "meta.train.patience=1: meta-training stops once meta-val (every 3 iterations) sets no new best 1 times " \
           "in a row; meta.train.iterations=10 is the ceiling" in res.stdout
    assert "meta-training stops at iteration 6 of 10 (keeping iteration 3)" in res.stdout
    summary = json.loads((out / "results.json").read_text())["meta_train"]
    assert summary["iterations_run"] == 6 and [s for s, _ in summary["val_curve"]] == [3, 6]
    assert summary["best_iteration"] == 3
    assert (out / "checkpoints" / "checkpoint_6" / "COMPLETE").is_file()
    res = recipe(overrides(tiny_root, out, **fast, **{"meta.train.patience": 2}) + ["--resume"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "(iteration 6)" in res.stdout and "stops at iteration 9 of 10 (keeping iteration 3)" in res.stdout
    summary = json.loads((out / "results.json").read_text())["meta_train"]
    assert summary["iterations_run"] == 9 and [s for s, _ in summary["val_curve"]] == [3, 6, 9]
    res = recipe(overrides(tiny_root, out, **fast, **{"meta.train.patience": 2}) + ["--resume"])  # stopped: stays so
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["meta_train"]["iterations_run"] == 9


def test_a_checkpoint_from_before_a_setting_existed_resumes_with_its_default(tiny_root, baseline_run, tmp_path):
    # checkpoints written before meta.train.average and meta.train.schedule existed: no such settings in run.json,
    # no average.pt; with both at their defaults the run resumes to the same results
    out = tmp_path / "older"
    old = out / "checkpoints" / "checkpoint_8"
    shutil.copytree(baseline_run / "checkpoints" / "checkpoint_8", old)
    (old / "average.pt").unlink()
    record = json.loads((old / "run.json").read_text())
    for key in ("meta.train.average", "meta.train.schedule"):
        del record["settings"][key]
    (old / "run.json").write_text(json.dumps(record))
    res = recipe(overrides(tiny_root, out, **{"cache_dir": str(baseline_run / "cache")}) + ["--resume"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert accuracies(out) == accuracies(baseline_run)
    # not with another value than the default the older code had
    shutil.rmtree(out)
    shutil.copytree(baseline_run / "checkpoints" / "checkpoint_8", old)
    (old / "run.json").write_text(json.dumps(record))
    res = recipe(overrides(tiny_root, out, **{"meta.train.average": 0.5}) + ["--resume"])
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "(meta.train.average: 0.0 there, 0.5 here)" in res.stderr


@pytest.mark.parametrize("change,fragment", [
    ({"meta.train.iterations": 3}, "is at iteration 4, past meta.train.iterations=3; give meta.train.iterations >= 4"),
    ({"meta.train.iterations": 20, "meta.train.schedule": "cosine"},
     "meta.train.iterations can change only under meta.train.schedule=constant"),
])
def test_a_budget_change_that_cannot_continue_the_run_is_one_line(change, fragment, tmp_path):
    from purer.pipeline import RunConfig, RunError
    from purer.pipeline.rundir import run_identity

    checkpoint = tmp_path / "checkpoint_4"
    checkpoint.mkdir()
    started = RunConfig()
    started.meta.train.schedule = change.get("meta.train.schedule", "constant")
    (checkpoint / "run.json").write_text(json.dumps(run_identity(started, None)))
    now = RunConfig()
    now.meta.train.iterations = change["meta.train.iterations"]
    now.meta.train.schedule = started.meta.train.schedule
    with pytest.raises(RunError) as e:
        run_identity(now, checkpoint)
    assert fragment in str(e.value) and "\n" not in str(e.value)
    now.meta.train.iterations = 4  # down to the checkpoint is fine under the constant schedule, not the cosine one
    if started.meta.train.schedule == "constant":
        assert run_identity(now, checkpoint)["settings"]["meta.train.iterations"] == 4


def test_resume_compares_only_the_settings_the_run_uses(tmp_path):
    """A pixel bank's checkpoint resumes after the generator's defaults change, and one that records a setting this
    purer no longer compares (meta.train.patience) still resumes; a generator's run keeps its settings."""
    from purer.pipeline import RunConfig, RunError
    from purer.pipeline.rundir import run_identity
    from purer.zoo import ModelConfig

    checkpoint = tmp_path / "checkpoint_4"
    checkpoint.mkdir()
    started = RunConfig()
    started.inversion.generator.width = started.inversion.generator.width // 2
    identity = run_identity(started, None)
    assert "inversion.generator.width" in identity["settings"]
    identity["settings"]["meta.train.patience"] = 2  # an older purer compared it
    (checkpoint / "run.json").write_text(json.dumps(identity))
    now = RunConfig()
    grey, colour = ([ModelConfig("conv4", 1, ["a"], in_channels=c)] * 2 for c in (1, 3))
    assert now.inversion.synthesizer_for(grey) == "pixels" and now.inversion.synthesizer_for(colour) == "generator"
    assert run_identity(now, checkpoint, grey)["run_id"] == identity["run_id"]
    assert "inversion.generator.width" not in run_identity(now, checkpoint, grey)["settings"]
    with pytest.raises(RunError, match=r"inversion\.generator\.width: "):
        run_identity(now, checkpoint, colour)
    with pytest.raises(RunError, match=r"inversion\.generator\.width: "):  # without the zoo's teachers, all count
        run_identity(now, checkpoint)


def test_resume_keeps_null_settings_and_the_synthesizer_a_rule_chose(tmp_path):
    """A run with a null setting (PURER as published: ``inversion.a_tv_colour: null``) resumes; an SH checkpoint
    of a purer without the heterogeneous rule (a pixel bank) resumes only with the rule off, and a zoo of one
    architecture resumes whatever the rule."""
    from purer.pipeline import RunConfig, RunError
    from purer.pipeline.rundir import run_identity
    from purer.zoo import ModelConfig

    def started(cfg, *models, drop=()):
        checkpoint = tmp_path / f"run{len(list(tmp_path.iterdir()))}" / "checkpoint_4"
        checkpoint.mkdir(parents=True)
        identity = run_identity(cfg, None, models or None)
        for key in drop:  # what an older purer did not record
            identity["settings"].pop(key)
        (checkpoint / "run.json").write_text(json.dumps(identity))
        return checkpoint, identity["run_id"]

    paper = RunConfig()
    paper.inversion.a_tv_colour = paper.inversion.synthesizer_colour = None
    paper.inversion.synthesizer_heterogeneous = None
    colour = [ModelConfig("conv4", 1, ["a"], in_channels=3)] * 2
    checkpoint, run_id = started(paper, *colour)
    assert run_identity(paper, checkpoint, colour)["run_id"] == run_id
    with pytest.raises(RunError, match=r"inversion\.synthesizer: 'pixels' there, 'generator' here"):
        run_identity(RunConfig(), checkpoint, colour)  # the colour rule's generator would take over its bank
    # a checkpoint of a purer that left null settings out (and knew no rules) resumes too
    checkpoint, run_id = started(paper, drop=["inversion.a_tv_colour", "inversion.synthesizer_colour",
                                              "inversion.synthesizer_heterogeneous"])
    assert run_identity(paper, checkpoint, colour)["run_id"] == run_id
    sh = [ModelConfig(arch, 1, ["a"], in_channels=1) for arch in ("conv4", "resnet10")]
    conv4 = sh[:1] * 2
    before = RunConfig()
    before.inversion.synthesizer_heterogeneous = None
    checkpoint, run_id = started(before, drop=["inversion.synthesizer_heterogeneous"])  # it recorded the rules
    with pytest.raises(RunError, match=r"inversion\.synthesizer: 'pixels' there, 'generator' here"):
        run_identity(RunConfig(), checkpoint, sh)
    assert run_identity(before, checkpoint, sh)["run_id"] == run_id
    checkpoint, run_id = started(before, *conv4)
    assert run_identity(RunConfig(), checkpoint, conv4)["run_id"] == run_id


def test_resume_compares_what_the_distillation_rule_chose(tmp_path):
    """A checkpoint of a purer before ``distill.images``' rule (each teacher on its own classes' images; or before
    ``distill.images`` itself) resumes today where the rule gives that (a zoo of colour teachers), is refused on a
    zoo with a grey teacher, of one architecture or several (where the rule distils on the step's images), and
    resumes there with ``distill.images: own``; a run without distillation does not compare what it would distil on."""
    from purer.pipeline import RunConfig, RunError
    from purer.pipeline.rundir import run_identity
    from purer.zoo import ModelConfig

    def started(cfg, drop):
        checkpoint = tmp_path / f"run{len(list(tmp_path.iterdir()))}" / "checkpoint_4"
        checkpoint.mkdir(parents=True)
        identity = run_identity(cfg, None)
        for key in drop:  # what an older purer did not record
            identity["settings"].pop(key, None)
        (checkpoint / "run.json").write_text(json.dumps(identity))
        return checkpoint, identity["run_id"]

    grey = [ModelConfig("conv4", 1, ["a"], in_channels=1)] * 2
    colour = [ModelConfig("conv4", 1, ["a"], in_channels=3)] * 2
    sh = [ModelConfig(arch, 1, ["a"], in_channels=1) for arch in ("conv4", "resnet10")]
    before = RunConfig()
    before.distill.images = "own"
    own = RunConfig()
    own.distill.images = "own"
    rules = ["distill.images_colour", "distill.images_heterogeneous"]
    for drop in (rules, ["distill.images", *rules]):
        checkpoint, run_id = started(before, drop)
        assert run_identity(RunConfig(), checkpoint, colour)["run_id"] == run_id
        for models in (grey, sh):
            with pytest.raises(RunError, match=r"distill\.images: 'own' there, 'step' here\)"):
                run_identity(RunConfig(), checkpoint, models)
            assert run_identity(own, checkpoint, models)["run_id"] == run_id
    # a run of the step's images on a colour zoo, made before the rule: the refusal names the rule that decides
    step = RunConfig()
    step.distill.images = "step"
    checkpoint, run_id = started(step, rules)
    with pytest.raises(RunError, match=r"distill\.images: 'step' there, 'own' here \(by distill\.images_colour for "
                                       r"this zoo\)"):
        run_identity(step, checkpoint, colour)
    step.distill.images_colour = None
    assert run_identity(step, checkpoint, colour)["run_id"] == run_id
    off = RunConfig()
    off.distill.logit = 0.0
    checkpoint, run_id = started(off, [])
    assert "distill.images" not in json.loads((checkpoint / "run.json").read_text())["settings"]
    off.distill.images = "own"
    assert run_identity(off, checkpoint, grey)["run_id"] == run_id
    # an older run without distillation that recorded own resumes under today's default (step on a grey zoo)
    checkpoint = tmp_path / "older_off" / "checkpoint_4"
    checkpoint.mkdir(parents=True)
    identity = run_identity(off, None)
    identity["settings"]["distill.images"] = "own"
    (checkpoint / "run.json").write_text(json.dumps(identity))
    off.distill.images = "step"
    assert run_identity(off, checkpoint, grey)["run_id"] == identity["run_id"]


def test_overrides_may_follow_flags_and_precede_them(tiny_root, tmp_path):
    args = overrides(tiny_root, tmp_path / "fresh")
    res = recipe(args[:3] + ["--resume"] + args[3:])
    assert res.returncode == 2 and "no complete checkpoint" in res.stderr


def test_resume_without_checkpoint_is_a_clear_error(tiny_root, tmp_path):
    res = recipe(overrides(tiny_root, tmp_path / "fresh") + ["--resume"])
    assert res.returncode == 2 and "no complete checkpoint" in res.stderr


def test_two_processes_match_one(tiny_root, baseline_run, tmp_path):
    """Two processes compute the run of one, bit for bit: the same bank and learner after training, so
    the same switch firings, meta-val curve and rows.  Only wall-clock times, the process count and the
    run id (a new run) may differ.  (Before per-task gradients were summed in one order, the learners
    differed in the last bits at iteration 1, Adam made that 1e-3 at iteration 2, and the adversarial
    step carried it into the bank: on another CPU the rows came out 55.56 against 66.67.)"""
    out = tmp_path / "two"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(REPO / "recipes" / "accelerate" / "two-processes.yaml")]
    res = recipe(overrides(tiny_root, out, **{"cache_dir": str(baseline_run / "cache")}), launcher=launcher)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "not passed to `accelerate launch`" not in res.stderr  # the shipped config gives every setting

    def without_times(results: dict) -> dict:
        results.pop("seconds"), results.pop("processes"), results.pop("run_id")
        for r in results["rows"]:
            r.pop("seconds", None)
        results["meta_train"] = {k: v for k, v in results["meta_train"].items() if not k.startswith("seconds")}
        return results

    one, two = (json.loads((o / "results.json").read_text()) for o in (baseline_run, out))
    assert (one["processes"], two["processes"]) == (1, 2)
    assert one["meta_train"]["adversarial_steps"] > 0  # the case that used to differ (see the fixture)
    assert without_times(two) == without_times(one)
    for part in ("bank", "learner", "best", "optimizer"):
        a, b = (checkpointed_state(o / "checkpoints" / f"checkpoint_{ITERATIONS}", part) for o in (baseline_run, out))
        assert identical(a, b), part


def test_distilling_on_the_steps_images_in_two_processes_matches_one(tiny_root, baseline_run, tmp_path):
    """``distill.images: step`` makes the step's distillation one work item (one row of the outer gradient): two
    processes train the bank and learner of one, bit for bit."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(REPO / "recipes" / "accelerate" / "two-processes.yaml")]
    runs = {}
    for name, launch in (("one", None), ("two", launcher)):
        runs[name] = tmp_path / name
        res = recipe(overrides(tiny_root, runs[name], **{"cache_dir": str(baseline_run / "cache"),
                                                          "distill.images": "step", "distill.images_colour": "null",
                                                          "eval.baselines": "[]",
                                                          "eval.calibrations": "[]"}), launcher=launch)
        assert res.returncode == 0, res.stderr[-3000:]
        assert "on the bank images of every teacher of the step (distill.images)" in res.stdout  # colour rule off
    for part in ("bank", "learner", "distill"):
        a, b = (checkpointed_state(o / "checkpoints" / f"checkpoint_{ITERATIONS}", part) for o in runs.values())
        assert identical(a, b), part


def identical(a, b) -> bool:
    """Nested dicts / lists of tensors and plain values, equal bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(identical(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b))
    return a == b


def test_ctrl_c_writes_a_checkpoint_and_resume_finishes(tiny_root, baseline_run, tmp_path):
    out = tmp_path / "interrupted"
    args = overrides(tiny_root, out, **{"cache_dir": str(baseline_run / "cache"), "checkpoint_every": 100})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(RECIPE), "--no-progress", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not list((out / "pictures").glob("pseudo_episode_*.png")) and time.time() < deadline:
        time.sleep(0.05)  # the first picture is written after the first meta-iteration
    proc.send_signal(signal.SIGINT)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 130, log[-2000:]
    assert "stopped (SIGINT): checkpoint written" in log and "Traceback" not in log
    assert list((out / "checkpoints").glob("checkpoint_*/COMPLETE"))
    res = recipe(args + ["--resume"])
    assert res.returncode == 0, res.stderr[-3000:]
    # Ctrl-C is honoured between meta-iterations, so the checkpoint is consistent and resuming it
    # gives the uninterrupted run (a checkpoint taken mid-iteration held a bank one step ahead).
    assert accuracies(out) == accuracies(baseline_run)


def test_default_zoo_directory_names_every_pretraining_field():
    from purer.pipeline import RunConfig, ZooConfig, zoo_path

    default = zoo_path(RunConfig())
    assert default.name == "glyphs-conv4-12x5-disjoint-32px"  # the cached default zoo keeps its name
    others = {zoo_path(RunConfig(zoo=ZooConfig(**kw))) for kw in ({"seed": 1}, {"epochs": 3}, {"subsets": "random"})}
    assert len(others) == 3 and default not in others


def test_stop_signals_request_once_then_interrupt_and_keep_an_ignored_sigint():
    from purer.pipeline import StopSignals, Stopped

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    with pytest.raises(KeyboardInterrupt):
        with StopSignals() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.requested == "SIGINT"  # the first Ctrl-C only asks
            os.kill(os.getpid(), signal.SIGINT)  # the second one interrupts
    for name in ("SIGTERM", "SIGUSR1"):  # a cluster's warning and its termination only ask, once or twice
        with StopSignals() as stop:
            os.kill(os.getpid(), getattr(signal, name))
            os.kill(os.getpid(), getattr(signal, name))
            assert stop.requested == name
            with pytest.raises(Stopped, match=name):
                stop.check()
    assert {s: signal.getsignal(s) for s in before} == before
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopSignals() as stop:
            os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested is None and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before[signal.SIGINT])
