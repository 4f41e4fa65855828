"""Zoos of several architectures (SH) and of several datasets (MH) run end to end through the recipe."""
from __future__ import annotations

import json

import yaml

from recipe_runs import overrides, recipe, write_tiny_dataset


def test_a_zoo_of_three_architectures_runs_end_to_end(tiny_root, tmp_path):
    spec = tmp_path / "tiny-mix.yaml"
    spec.write_text(yaml.safe_dump({"dataset": "folder", "data_root": str(tiny_root), "image_size": 16,
                                    "num_models": 3, "classes_per_model": 3, "arch": "mix",
                                    "arch_args": {"width": 8}, "epochs": 1}))
    out = tmp_path / "sh"
    res = recipe(overrides(tiny_root, out, 3, **{"zoo.path": str(tmp_path / "zoo_mix"), "zoo.spec": str(spec),
                                                 "inversion.bn_layers": "mean", "distill.feature": 1.0,
                                                 "meta.init": "best-teacher",
                                                 # the folder's images are colour: the colour rules off, the
                                                 # synthesizer's rule of several architectures decides, and
                                                 # distill.images (no rule of several architectures by default)
                                                 "inversion.synthesizer_colour": "null",
                                                 "distill.images_colour": "null",
                                                 "eval.baselines": "[nc-best-teacher]", "eval.calibrations": "[]"}))
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["zoo"]["archs"] == ["conv4", "resnet10", "resnet18"]
    assert results["meta_train"]["synthesizer"] == "generator"
    assert ("inversion: the generator synthesizer for a zoo of teachers of several architectures "
            "(inversion.synthesizer_heterogeneous)") in res.stdout
    assert "distill: each teacher distilled on the bank images of every teacher of the step (distill.images)" in res.stdout
    assert {r["method"] for r in results["rows"]} == {"purer", "nc-best-teacher"}
    # meta.init=best-teacher finds no teacher that is the learner's Conv4 (width 32; the zoo's is 8):
    # the learner starts from random initialisation, the run says so, and that start is not a meta-val candidate
    start = results["meta_train"]["start_teacher"]
    assert start == {"model_id": None, "learner": "conv4 3x16px",
                     "zoo": "conv4 3x16px, resnet10 3x16px, resnet18 3x16px"}
    assert (f"meta.init=best-teacher: no teacher is the learner's network (conv4 3x16px; the zoo has {start['zoo']}), "
            "so the learner starts from random initialisation") in res.stdout
    assert [step for step, _ in results["meta_train"]["val_curve"]][0] > 0


def test_a_zoo_of_two_datasets_trains_one_learner_and_tests_it_on_each(tiny_root, tmp_path):
    colour = write_tiny_dataset(tmp_path / "colour", colour=True, prefix="c")
    spec = tmp_path / "tiny-mh.yaml"
    spec.write_text(yaml.safe_dump({"classes_per_model": 3, "num_models": 2, "epochs": 1, "parts": [
        {"dataset": "folder", "data_root": str(tiny_root), "image_size": 16},
        {"dataset": "cifar_fs", "data_root": str(colour), "image_size": 24}]}))
    out = tmp_path / "mh"
    res = recipe(overrides(tiny_root, out, 3, **{
        "data.dataset": "folder+cifar_fs", "data.root": f"{{folder: {tiny_root}, cifar_fs: {colour}}}",
        "zoo.path": str(tmp_path / "zoo_mh"), "zoo.spec": str(spec), "eval.baselines": "[nc-best-teacher]",
        "eval.calibrations": "[support-ce]"}))
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["zoo"]["datasets"] == ["cifar_fs", "folder"] and results["zoo"]["models"] == 4
    # the folder loader gives RGB: every teacher is colour, its R_tv weight inversion.a_tv_colour; the run says so
    assert results["meta_train"]["tv_weight"] == {"colour": 1e-3}
    assert "inversion: R_tv weight 0.001 for colour teachers (inversion.a_tv_colour)" in res.stdout
    # and the generator synthesizes a zoo of colour teachers (inversion.synthesizer_colour)
    assert results["meta_train"]["synthesizer"] == "generator"
    assert "inversion: the generator synthesizer for a zoo of colour teachers (inversion.synthesizer_colour)" in res.stdout
    assert ("distill: each teacher distilled on its own classes' bank images, for a zoo of colour teachers "
            "(distill.images_colour)") in res.stdout
    rows = {(r["dataset"], r["method"]) for r in results["rows"]}
    assert rows == {(d, m) for d in ("folder", "cifar_fs") for m in ("purer", "purer+support-ce", "nc-best-teacher")}
    # each dataset's best-teacher baseline comes from its own teachers
    best = {r["dataset"]: r["teacher"] for r in results["rows"] if r["method"] == "nc-best-teacher"}
    assert best["folder"].startswith("folder-") and best["cifar_fs"].startswith("cifar_fs-")
    learner = json.loads((out / "meta_learner" / "config.json").read_text())
    assert learner["in_channels"] == 3 and set(learner["test_time_by_dataset"]) == {"folder", "cifar_fs"}
    assert "folder:" in (out / "results.md").read_text() and "cifar_fs:" in (out / "results.md").read_text()
