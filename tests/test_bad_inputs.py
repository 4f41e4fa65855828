"""Bad inputs that used to be accepted silently: each is now a one-line error (or, where the run goes on, one
line saying what it did), never a traceback.  One table: the input, the exit code and the line expected.
(A teacher without BatchNorm, a warning, is tested in test_inversion.py: no registered architecture lacks BN.)"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from purer.pipeline.rundir import RunLock
from purer.zoo.pretrain import PretrainConfig, pretrain_zoo
from purer.zoo.store import Zoo, sha256_file
from recipe_runs import REPO, overrides, recipe


@pytest.fixture(scope="module")
def tiny_zoo(tiny_root, tmp_path_factory) -> Path:
    """The 2-model zoo the recipe builds on ``tiny_root`` (see recipe_runs.overrides), built in-process."""
    path = tmp_path_factory.mktemp("zoo") / "tiny_zoo"
    pretrain_zoo(PretrainConfig(dataset="folder", data_root=str(tiny_root), image_size=16, num_models=2, epochs=2),
                 Zoo(path, create=True), progress=False)
    return path


class Case:
    """What a case needs: a scratch folder, the tiny data and zoo, and what must outlive the command."""

    def __init__(self, tmp: Path, root: Path, zoo: Path):
        self.tmp, self.root, self.zoo, self.keep = tmp, root, zoo, []
        self.out = tmp / "run"

    def run(self, *extra: str, zoo: Path | None = None, **kw) -> list[str]:
        """Recipe arguments of a cheap run into ``self.out`` (one iteration, no baselines, no ICFIL)."""
        args = {"zoo.path": str(zoo or self.zoo), "eval.baselines": "[]", "eval.calibrations": "[]",
                "cache_dir": str(self.tmp / "cache"), **kw}
        return ["recipe", *overrides(self.root, self.out, 1, **args), *extra]

    def copy_zoo(self) -> Path:
        return Path(shutil.copytree(self.zoo, self.tmp / "zoo"))

    def nan_weights(self) -> dict[str, torch.Tensor]:
        model, _ = Zoo(self.zoo).load_model("conv4-000")
        state = {k: v.clone() for k, v in model.state_dict().items()}
        state["head.weight"][0, 0] = float("nan")
        return state

    def poisoned_zoo(self) -> Path:
        """A zoo whose first model's weights hold a NaN, with a matching checksum (as a zoo written before the
        check, or by another tool, may)."""
        zoo = self.copy_zoo()
        weights = zoo / "conv4-000" / "model.safetensors"
        save_file(self.nan_weights(), str(weights))
        config = json.loads((zoo / "conv4-000" / "config.json").read_text())
        config["sha256"] = sha256_file(weights)
        (zoo / "conv4-000" / "config.json").write_text(json.dumps(config))
        return zoo


def nan_register(c: Case) -> list[str]:
    save_file(c.nan_weights(), str(c.tmp / "diverged.safetensors"))
    return ["zoo", "register", str(c.tmp / "diverged.safetensors"), "--arch", "conv4", "--class-ids", "a,b,c,d,e",
            "--in-channels", "3", "--image-size", "16", "--mean", "0", "--std", "1", "--zoo", str(c.tmp / "new_zoo")]


def half_built(c: Case) -> list[str]:
    return c.run(zoo=c.copy_zoo(), **{"zoo.build_if_missing": "false", "zoo.num_models": 6})


def finished_with_other_settings(c: Case) -> list[str]:
    zoo = c.copy_zoo()
    Zoo(zoo).remove("conv4-001")  # as if killed after the first model
    return c.run(zoo=zoo, **{"zoo.epochs": 3})


def output_dir_is_a_file(c: Case) -> list[str]:
    c.out.write_text("not a folder")
    return c.run()


def output_dir_under_a_file(c: Case) -> list[str]:
    (c.tmp / "file").write_text("not a folder")
    c.out = c.tmp / "file" / "run"
    return c.run()


def cache_dir_is_a_file(c: Case) -> list[str]:
    (c.tmp / "cache").write_text("not a folder")
    return c.run()


def finished_run_folder(c: Case) -> list[str]:
    c.out.mkdir()
    (c.out / "results.json").write_text("{}")
    (c.out / "config.yaml").write_text("the finished run's\n")
    return c.run()


def locked_output_dir(c: Case) -> list[str]:
    c.out.mkdir()
    c.keep.append(RunLock(c.out))  # another run holds the folder
    return c.run()


CASES = {
    # (input, exit code, the line expected on stderr or stdout)
    "nan-register": (nan_register, 2, "purer-zoo: error: {tmp}/diverged.safetensors: tensor 'head.weight' holds "
                                      "NaN or Inf values (a diverged training?); retrain or re-export the model"),
    "nan-verify": (lambda c: ["zoo", "verify", "--zoo", str(c.poisoned_zoo())], 1,
                   "purer-zoo: verify: conv4-000: {tmp}/zoo/conv4-000/model.safetensors: tensor 'head.weight' holds "
                   "NaN or Inf values"),
    "nan-run": (lambda c: c.run(zoo=c.poisoned_zoo()), 2, "purer: error: {tmp}/zoo/conv4-000/model.safetensors: "
                                                          "tensor 'head.weight' holds NaN or Inf values"),
    "negative-inner-lr": (lambda c: c.run(**{"meta.maml.inner_lr": -0.1}), 2,
                          "purer: error: meta.maml: the inner loop needs inner_lr > 0 and inner_steps >= 1, got "
                          "inner_lr=-0.1 and inner_steps=1"),
    "negative-inner-steps": (lambda c: c.run(**{"meta.maml.inner_steps": -3}), 2,
                             "purer: error: meta.maml: the inner loop needs inner_lr > 0 and inner_steps >= 1, got "
                             "inner_lr=0.1 and inner_steps=-3"),
    "zero-queries": (lambda c: c.run(**{"eval.query": 0}), 2,
                     "purer: error: config: eval.query and meta.query must be >= 1 query per class, got 0 and 3"),
    "too-few-queries": (lambda c: c.run(**{"eval.shots": "[6]"}), 2,
                        "purer: error: folder/val: its smallest class has 8 images, so 6-shot tasks on it keep 2 "
                        "queries per class, fewer than 3; lower eval.shots, or set eval.query=2 to accept that"),
    "capped-queries": (lambda c: c.run(**{"eval.query": 30}), 0,
                       "eval: 1-shot meta-test tasks keep 7-7 queries per class (eval.query=30, capped by class "
                       "sizes; results.json's queries_per_class says so)"),
    "half-built-zoo": (half_built, 2, "purer: error: the zoo at {tmp}/zoo holds 2 of the 6 models zoo.num_models "
                                      "asks for (an interrupted pre-training?); finish it with "
                                      "zoo.build_if_missing=true, or use it as it is with zoo.num_models=2"),
    "finish-with-other-settings": (finished_with_other_settings, 2,
                                   "purer: error: cannot pre-train the zoo at {tmp}/zoo: zoo {tmp}/zoo was "
                                   "pre-trained with epochs=2, not epochs=3; finish it with its own settings or use "
                                   "another zoo directory"),
    "output-dir-is-a-file": (output_dir_is_a_file, 2, "purer: error: output_dir {tmp}/run is not a writable "
                                                      "directory (File exists); set output_dir to one"),
    "output-dir-under-a-file": (output_dir_under_a_file, 2, "purer: error: output_dir {tmp}/file/run is not a "
                                                            "writable directory (Not a directory); set output_dir "
                                                            "to one"),
    "cache-dir-is-a-file": (cache_dir_is_a_file, 2, "purer: error: cache_dir {tmp}/cache is not a writable directory "
                                                    "(File exists); set cache_dir to one"),
    "finished-run-folder": (finished_run_folder, 2,
                            "purer: error: output_dir {tmp}/run already holds a finished run (results.json, "
                            "config.yaml); continue an interrupted run with --resume, replace it with --overwrite, "
                            "or use another output_dir"),
    "resume-and-overwrite": (lambda c: c.run("--resume", "--overwrite"), 2,
                             "purer: error: --resume continues the run in output_dir and --overwrite replaces it; "
                             "give one of them"),
    "locked-output-dir": (locked_output_dir, 2, "purer: error: output_dir {tmp}/run is in use by another run (pid "),
    "fp16": (lambda c: c.run(**{"mixed_precision": "fp16"}), 2,
             "purer: error: config: mixed_precision fp16 is not supported: the bank's gradients pass back through "
             "the teachers' float16 activations with no loss scaling; use bf16"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_bad_input_is_one_line(name, tiny_root, tiny_zoo, tmp_path):
    setup, code, expected = CASES[name]
    case = Case(tmp_path, tiny_root, tiny_zoo)
    kind, *args = setup(case)
    if kind == "recipe":
        res = recipe(args)
    else:
        res = subprocess.run([sys.executable, "-m", "purer.zoo", *args], cwd=REPO, capture_output=True, text=True,
                             timeout=300)
    output = res.stderr + res.stdout
    assert res.returncode == code, output[-3000:]
    assert "Traceback" not in output
    line = expected.format(tmp=tmp_path)
    assert any(out_line.startswith(line) for out_line in output.splitlines()), output[-3000:]
    if name == "finished-run-folder":  # a refused run leaves the folder as it was
        assert (case.out / "config.yaml").read_text() == "the finished run's\n"
    if name == "capped-queries":
        results = json.loads((case.out / "results.json").read_text())
        assert results["query"] == 30 and results["queries_per_class"] == {"1": [7, 7]}
