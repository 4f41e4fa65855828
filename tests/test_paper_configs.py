"""recipes/configs/cifar-fs.yaml and miniimagenet.yaml load to the settings of the PURER release's run scripts
(Egg-Hu/PURER scripts/cifar_51_conv4.sh with main.py's defaults, as ../shared/design/METHOD.md lists them),
key by key; the +kd configs are the recipe's default method on the same data and zoo."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from purer.pipeline import RunConfig
from purer.yaml_config import load_config, to_dict
from recipe_runs import overrides, recipe

CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "configs"

# key: (the release's value, where it comes from)
RELEASE = {
    "zoo.num_models": (13, "ceil(64 meta-train classes / 5): one teacher per 5-class block"),
    "zoo.classes_per_model": (5, "--way_train 5"),
    "zoo.arch": ("conv4", "--pre_backbone conv4"),
    "zoo.subsets": ("disjoint", "node_classes: consecutive blocks"),
    "meta.learner": ("maml", "methods/maml.py"),
    "meta.arch": ("conv4", "--backbone conv4"),
    "meta.arch_args": ({}, "Conv4 of width 32"),
    "meta.init": ("avg-teachers", "--average (FedAvg of the teachers)"),
    "meta.way": (5, "--way_train 5"),
    "meta.shot": (1, "--num_sup_train 1"),
    "meta.query": (15, "--num_qur_train 15"),
    "meta.images_per_class": (None, "--synthesis_per_class 16 = K + Q (20 in the 5-shot script)"),
    "meta.maml.inner_lr": (0.01, "--inner_lr 0.01"),
    "meta.maml.inner_steps": (1, "--inner_update_num 1"),
    "meta.maml.first_order": (False, "--approx off"),
    "meta.train.iterations": (60000, "--episode_train 240000 tasks / --episode_batch 4"),
    "meta.train.meta_batch": (4, "--episode_batch 4"),
    "meta.train.outer_lr": (0.001, "--outer_lr 0.001, Adam"),
    "meta.train.val_every": (500, "--val_interval 2000 tasks / 4"),
    "inversion.teachers_per_step": (13, "every teacher, every step"),
    "inversion.lr": (0.25, "Adam(allData, lr=0.25)"),
    "inversion.betas": ((0.9, 0.999), "Adam's defaults"),
    "inversion.a_bn": (0.01, "bn_reg_scale 0.01"),
    "inversion.a_tv": (0.0001, "var_scale 0.0001"),
    "inversion.a_tv_colour": (None, "one var_scale for colour and grey teachers"),
    "inversion.synthesizer": ("pixels", "every synthetic image its own tensor (allData)"),
    "inversion.synthesizer_colour": (None, "the same for colour teachers"),
    "inversion.synthesizer_heterogeneous": (None, "the same for a zoo of several architectures"),
    "inversion.a_l2": (0.00001, "l2_coeff 0.00001"),
    "inversion.first_bn_weight": (1.0, "first_bn_multiplier 1"),
    "inversion.bn_layers": ("sum", "sum over BN layers"),
    "inversion.a_div": (0.0, "no diversity term"),
    "inversion.steps_per_iteration": (1, "one bank step per meta-iteration"),
    "inversion.space": ("normalized", "raw tensors fed to the teachers as they are"),
    "inversion.augment": (True, "random jitter"),
    "inversion.jitter": (2, "torch.roll by +-2 px"),
    "inversion.crop_scale": ((1.0, 1.0), "no crop"),
    "inversion.flip": (False, "no flip"),
    "switch.warmup": (4000, "--adv_start 4000"),
    "switch.patience": (6, "e_count == 6"),
    "switch.lambda_adv": (10.0, "--adv_scale 10.0"),
    "switch.adversarial_queries": ("all", "loss_outer on the whole query set"),
    "distill.logit": (0.0, "no distillation"),
    "distill.feature": (0.0, "no distillation"),
    "eval.way": (5, "--way_test 5"),
    "eval.shots": ([1], "--num_sup_test 1"),
    "eval.query": (15, "--num_qur_test 15"),
    "eval.tasks": (600, "--episode_test 600"),
    "eval.grid.lr": ((0.01,), "the test-time inner loop is the training one"),
    "eval.grid.steps": ((1,), "--test_inner_update_num 1"),
}
IMAGE_SIZE = {"cifar-fs.yaml": ("cifar_fs", 32), "miniimagenet.yaml": ("miniimagenet", 84)}


def value(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("name", list(IMAGE_SIZE))
def test_the_paper_configs_hold_the_releases_settings(name):
    cfg = load_config(RunConfig, CONFIGS / name)
    differ = {k: (value(cfg, k), v) for k, (v, _) in RELEASE.items() if value(cfg, k) != v}
    assert differ == {}, f"{name} differs from the release in {differ}"
    assert (cfg.data.dataset, cfg.data.image_size) == IMAGE_SIZE[name]
    # The bank holds K + Q images per class: the release's 16 at 1-shot, 20 at 5-shot.
    assert (cfg.meta.images_per_class or cfg.meta.shot + cfg.meta.query) == 16
    five = load_config(RunConfig, CONFIGS / name, ["meta.shot=5", "eval.shots=[5]"])
    assert (five.meta.images_per_class or five.meta.shot + five.meta.query) == 20


@pytest.mark.parametrize("name", list(IMAGE_SIZE))
def test_the_deliberate_differences_are_written_down_with_their_reasons(name):
    text = (CONFIGS / name).read_text()
    readme = " ".join((CONFIGS.parents[1] / "README.md").read_text().split())
    for said in ("best on 600 meta-val tasks", "weighted equally", "pre-trained by purer", "ICFIL"):
        assert said in text, said
    assert "cifar-fs.yaml" in readme and "the release's settings, except" in readme


@pytest.mark.parametrize("name,paper", [("cifar-fs-purer+kd.yaml", "cifar-fs.yaml"),
                                        ("miniimagenet-purer+kd.yaml", "miniimagenet.yaml")])
def test_the_kd_configs_are_the_default_method_on_the_papers_data_and_zoo(name, paper):
    kd, release = load_config(RunConfig, CONFIGS / name), load_config(RunConfig, CONFIGS / paper)
    default = RunConfig()
    for section in ("inversion", "distill", "meta", "eval"):
        ours = to_dict(getattr(kd, section))
        expected = to_dict(getattr(default, section))
        if section == "meta":
            expected["train"].update(iterations=60000, val_every=2000)
        assert ours == expected, section
    assert dataclasses.asdict(kd.zoo) == dataclasses.asdict(release.zoo)  # the same zoo folder
    assert kd.data == release.data and kd.switch.warmup == release.switch.warmup


def test_the_cifar_fs_config_runs(tiny_root, tmp_path):
    """The release's combination (normalised-space bank, averaged-teacher start, every teacher per step) runs,
    here for 3 iterations on the tiny dataset and a 2-teacher zoo."""
    out = tmp_path / "run"
    res = recipe(["--config", str(CONFIGS / "cifar-fs.yaml"), *overrides(tiny_root, out, 3, **{
        "zoo.path": str(tmp_path / "zoo"), "zoo.epochs": 1, "meta.train.val_every": 3, "switch.warmup": 1,
        "eval.baselines": "[]", "eval.calibrations": "[]"})])
    assert res.returncode == 0, res.stderr[-3000:]
    used = yaml.safe_load((out / "config.yaml").read_text())
    assert (used["inversion"]["space"], used["meta"]["init"], used["distill"]["logit"]) == ("normalized",
                                                                                          "avg-teachers", 0.0)
    assert json.loads((out / "results.json").read_text())["rows"][0]["method"] == "purer"

