"""A zoo of registered models is used as it is, whatever its size and ids, decided before the data is read,
and never written by a run (nor by pre-training)."""
from __future__ import annotations

from pathlib import Path

import pytest

from purer.pipeline import RunConfig, RunError
from purer.pipeline.build import check_zoo, load_zoo
from purer.yaml_config import load_config
from purer.zoo import ModelConfig, PretrainConfig, Zoo, pretrain_zoo
from recipe_runs import REPO, recipe
from zoo_synthetic import SIZE, separable_images, tiny_model


@pytest.fixture
def registered_zoo(tmp_path) -> Path:
    """Ten registered Conv4s, named as the recipe's own pre-training would name its first ten."""
    zoo = Zoo(tmp_path / "my_zoo", create=True)
    zoo.add_many((f"conv4-{i:03d}", tiny_model(seed=i),
                  ModelConfig("conv4", 5, [f"c{i}-{k}" for k in range(5)], 1, SIZE, [0.5], [0.25], "mine",
                              {"width": 8})) for i in range(10))
    return zoo.path


def user_zoo_config(zoo: Path, tmp_path: Path, **zoo_keys) -> RunConfig:
    overrides = [f"zoo.path={zoo}", f"data.root={tmp_path / 'no-data-here'}"]
    overrides += [f"zoo.{k}={v}" for k, v in zoo_keys.items()]
    return load_config(RunConfig, REPO / "recipes" / "configs" / "user-zoo.yaml", overrides)


@pytest.mark.parametrize("build_if_missing", [False, True])
def test_user_zoo_config_uses_a_registered_zoo_as_it_is_and_never_writes_it(registered_zoo, tmp_path,
                                                                            build_if_missing):
    cfg = user_zoo_config(registered_zoo, tmp_path, build_if_missing=str(build_if_missing).lower())
    assert cfg.zoo.num_models == 12  # the recipe's default; a registered zoo's size is its own
    before = {p.relative_to(registered_zoo): p.read_bytes() for p in registered_zoo.rglob("*") if p.is_file()}
    assert check_zoo(cfg) is None  # decided from zoo.json alone: the data root does not even exist
    teachers, used = load_zoo(cfg, dist=None, progress=False)  # no pre-training, so no processes to sync
    assert len(teachers) == 10 and used.num_models == 10 and not used.build_if_missing
    after = {p.relative_to(registered_zoo): p.read_bytes() for p in registered_zoo.rglob("*") if p.is_file()}
    assert after == before and Zoo(registered_zoo).pretrain_spec() is None


def test_pretraining_never_writes_into_a_registered_zoo(registered_zoo):
    before = (registered_zoo / "zoo.json").read_bytes()
    with pytest.raises(ValueError, match="no pre-training record of .* pre-train into another directory"):
        pretrain_zoo(PretrainConfig(image_size=SIZE, num_models=12, epochs=1), Zoo(registered_zoo),
                     data=separable_images(num_classes=60, per_class=4), progress=False)
    assert (registered_zoo / "zoo.json").read_bytes() == before


def test_an_empty_zoo_is_not_a_zoo(tmp_path):
    Zoo(tmp_path / "empty", create=True)
    cfg = user_zoo_config(tmp_path / "empty", tmp_path)
    with pytest.raises(RunError, match="no model zoo at .*empty \\(its zoo.json lists no models\\); build one"):
        check_zoo(cfg)


def test_the_run_decides_on_the_zoo_before_reading_the_data(registered_zoo, tmp_path):
    """With no data at data.root: a registered zoo passes (the error is the data's), a missing zoo stops the run
    first (the error is the zoo's)."""
    config = ["--config", str(REPO / "recipes" / "configs" / "user-zoo.yaml"), f"output_dir={tmp_path / 'run'}",
              f"cache_dir={tmp_path / 'cache'}", f"data.root={tmp_path / 'no-data-here'}"]
    res = recipe(config + [f"zoo.path={registered_zoo}"])
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("purer: error: no dataset (expected ")
    res = recipe(config + [f"zoo.path={tmp_path / 'no-zoo'}"])
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith(f"purer: error: no model zoo at {tmp_path / 'no-zoo'};")
