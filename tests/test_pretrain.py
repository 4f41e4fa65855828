"""Pre-training teachers: class subsets, the 80/20 split, accuracy, and resuming an interrupted run."""
import json

import numpy as np
import pytest
import torch

from purer.zoo import PretrainConfig, Zoo, pretrain_zoo
from purer.zoo.pretrain import class_subsets, heldout_split
from zoo_synthetic import SIZE, interrupt_second_teacher, separable_images, while_another_process_writes


def tiny_cfg(**kw):
    base = dict(dataset="synthetic", image_size=SIZE, num_models=2, epochs=3, arch_args={"width": 8},
                batch_size=16, lr=5e-3, seed=0)
    return PretrainConfig(**{**base, **kw})


def test_disjoint_subsets_are_seeded_blocks():
    subsets = class_subsets(20, 4, 5, "disjoint", seed=1)
    flat = sum(subsets, [])
    assert len(set(flat)) == 20 and all(s == sorted(s) and len(s) == 5 for s in subsets)
    assert class_subsets(20, 2, 5, "disjoint", seed=1) == subsets[:2]  # a smaller zoo is a prefix
    assert class_subsets(20, 4, 5, "disjoint", seed=2) != subsets
    with pytest.raises(ValueError, match="need 25 classes"):
        class_subsets(20, 5, 5, "disjoint", seed=0)
    release = class_subsets(64, 13, 5, "disjoint", seed=0)  # the release's 13 teachers on CIFAR-FS's 64 classes
    assert [len(s) for s in release] == [5] * 12 + [4] and len(set(sum(release, []))) == 64


def test_random_subsets_may_overlap():
    subsets = class_subsets(8, 30, 5, "random", seed=0)
    assert all(len(set(s)) == 5 and max(s) < 8 for s in subsets)
    assert len({tuple(s) for s in subsets}) > 1
    assert class_subsets(8, 3, 5, "random", seed=0) == subsets[:3]
    with pytest.raises(ValueError, match="only 4 classes"):
        class_subsets(4, 1, 5, "random", seed=0)


def test_heldout_split_is_80_20_per_class():
    data = separable_images(num_classes=6, per_class=10)
    tr, tr_y, he, he_y = heldout_split(data, [4, 1], 0.2, seed=0)
    assert len(tr) == 16 and len(he) == 4
    assert set(tr.tolist()).isdisjoint(he.tolist())
    assert torch.equal(data.labels[tr], torch.tensor([4, 1]).repeat_interleave(8))
    assert tr_y.tolist() == [0] * 8 + [1] * 8 and he_y.tolist() == [0, 0, 1, 1]
    tr2, *_ = heldout_split(data, [4, 1], 0.2, seed=0)
    assert torch.equal(tr, tr2)


def test_config_validation_and_mix():
    with pytest.raises(ValueError, match="unknown arch"):
        PretrainConfig(arch="vgg")
    with pytest.raises(ValueError, match="subsets"):
        PretrainConfig(subsets="overlapping")
    with pytest.raises(ValueError, match="epochs"):
        PretrainConfig(epochs=0)
    cfg = PretrainConfig(arch="mix")
    assert [cfg.model_id(i) for i in range(4)] == ["conv4-000", "resnet10-001", "resnet18-002", "conv4-003"]


def test_pretrained_teachers_are_accurate(tmp_path):
    data = separable_images(num_classes=10, per_class=20)
    zoo = Zoo(tmp_path / "zoo", create=True)
    ids = pretrain_zoo(tiny_cfg(num_models=2, epochs=6), zoo, data=data, progress=False)
    assert ids == ["conv4-000", "conv4-001"] == zoo.ids()
    assert zoo.verify() == []
    seen = set()
    for model_id in ids:
        cfg = zoo.config(model_id)
        m = cfg.metrics
        assert m["heldout_acc"] >= 0.9, m
        assert m["train_images"] == 80 and m["heldout_images"] == 20 and m["epochs"] == 6
        assert 1 <= m["best_epoch"] <= 6 and m["seconds"] > 0
        assert cfg.dataset == "synthetic" and cfg.in_channels == 1 and cfg.image_size == SIZE
        assert len(cfg.class_ids) == 5 and set(cfg.class_ids) <= set(data.class_names)
        seen |= set(cfg.class_ids)
        # the teacher's normalisation is the statistics of its own training images
        idx = torch.cat([data.members(data.class_names.index(c)) for c in cfg.class_ids])
        assert abs(cfg.mean[0] - float(data.float_images(idx).mean())) < 0.02
        # the stored teacher, fed [0, 1] images, classifies its classes
        teacher = zoo.load_teacher(model_id)
        labels = torch.cat([torch.full((len(idx) // 5,), k) for k in range(5)])
        assert float((teacher(data.float_images(idx)).argmax(1) == labels).float().mean()) >= 0.9
    assert len(seen) == 10  # disjoint blocks


def test_interrupted_pretrain_resumes(tmp_path, monkeypatch):
    data = separable_images(num_classes=10, per_class=10)
    cfg = tiny_cfg(epochs=1)
    zoo = Zoo(tmp_path / "zoo", create=True)
    interrupt_second_teacher(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        pretrain_zoo(cfg, zoo, data=data, progress=False)
    assert zoo.ids() == ["conv4-000"] and zoo.verify() == []
    first_sha = zoo.config("conv4-000").sha256

    monkeypatch.undo()
    log = []
    assert pretrain_zoo(cfg, zoo, data=data, progress=False, log=log.append) == ["conv4-000", "conv4-001"]
    assert zoo.ids() == ["conv4-000", "conv4-001"] and zoo.verify() == []
    assert "skipped" in log[0] and zoo.config("conv4-000").sha256 == first_sha

    # the same model index and seed reproduce the same weights
    other = Zoo(tmp_path / "other", create=True)
    pretrain_zoo(tiny_cfg(epochs=1, num_models=1), other, data=data, progress=False)
    assert other.config("conv4-000").sha256 == first_sha

    # zoo.json records the spec: finishing or extending with other settings would mix teachers
    with pytest.raises(ValueError, match="was pre-trained with seed=0, not seed=5; finish it with its own settings"):
        pretrain_zoo(tiny_cfg(epochs=1, seed=5), zoo, data=data, progress=False)
    assert zoo.pretrain_spec()["num_models"] == 2 and zoo.pretrain_spec()["epochs"] == 1
    manifest = json.loads(zoo.manifest_path.read_text())
    del manifest["pretrain"]  # models without a record (registered ones, or a zoo older than the record)
    zoo.manifest_path.write_text(json.dumps(manifest))
    before = zoo.manifest_path.read_bytes()
    with pytest.raises(ValueError, match="holds models it has no pre-training record of"):
        pretrain_zoo(tiny_cfg(epochs=1), zoo, data=data, progress=False)
    assert zoo.manifest_path.read_bytes() == before  # no record written into it


def test_two_runs_building_one_zoo_take_turns(tmp_path):
    # Two recipe runs started together on a missing zoo: the second waits, then reuses the first's models.
    data = separable_images(num_classes=10, per_class=10)
    then = ("from test_pretrain import tiny_cfg\nfrom zoo_synthetic import separable_images\nfrom purer.zoo import "
            "pretrain_zoo\npretrain_zoo(tiny_cfg(epochs=1), zoo, data=separable_images(num_classes=10, per_class=10), "
            "progress=False)")
    log = []

    def pretrain(on_wait):
        return pretrain_zoo(tiny_cfg(epochs=1), Zoo(tmp_path / "zoo"), data=data, progress=False,
                            log=lambda line: (on_wait if "waiting" in line else log.append)(line))

    waited, ids = while_another_process_writes(tmp_path / "zoo", then, pretrain)
    zoo = Zoo(tmp_path / "zoo")
    assert len(waited) == 1 and ids == zoo.ids() == ["conv4-000", "conv4-001"] and zoo.verify() == []
    assert len(log) == 2 and all("skipped" in line for line in log)


def test_image_size_must_match_the_data(tmp_path):
    with pytest.raises(ValueError, match="16x16 but image_size is 32"):
        pretrain_zoo(tiny_cfg(image_size=32), Zoo(tmp_path, create=True), data=separable_images(), progress=False)


def test_random_subsets_resnet(tmp_path):
    data = separable_images(num_classes=6, per_class=6)
    zoo = Zoo(tmp_path / "zoo", create=True)
    cfg = tiny_cfg(arch="resnet10", subsets="random", num_models=1, epochs=1, classes_per_model=3)
    assert pretrain_zoo(cfg, zoo, data=data, progress=False) == ["resnet10-000"]
    assert zoo.config("resnet10-000").arch_args == {"width": 8} and zoo.verify() == []
    assert np.isfinite(zoo.config("resnet10-000").metrics["heldout_loss"])


@pytest.mark.parametrize("name, models, subsets, arch", [("glyphs-conv4", 13, "disjoint", "conv4"),
                                                         ("glyphs-random100", 100, "random", "conv4"),
                                                         ("glyphs-mix", 12, "disjoint", "mix")])
def test_shipped_specs_load(name, models, subsets, arch):
    from pathlib import Path

    from purer.yaml_config import load_config

    cfg = load_config(PretrainConfig, Path(__file__).resolve().parents[1] / "model_zoo" / "specs" / f"{name}.yaml")
    assert (cfg.dataset, cfg.image_size, cfg.num_models, cfg.classes_per_model) == ("glyphs", 32, models, 5)
    assert (cfg.subsets, cfg.arch) == (subsets, arch)
