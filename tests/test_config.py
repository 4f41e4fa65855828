from dataclasses import dataclass, field

import pytest

from purer.yaml_config import ConfigError, load_config, parse_overrides, save_config


@dataclass
class Inner:
    lr: float = 0.01
    steps: int = 1
    first_order: bool = False

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    shots: list[int] = field(default_factory=lambda: [1, 5])
    name: str = "x"
    root: str | None = None


def test_defaults_file_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("inner:\n  lr: 0.5\n  steps: 3\nname: from-file\n")
    cfg = load_config(Outer, f, ["inner.steps=7", "shots=[1]", "root=/data"])
    assert cfg.inner.lr == 0.5 and cfg.inner.steps == 7 and cfg.inner.first_order is False
    assert cfg.shots == [1] and cfg.name == "from-file" and cfg.root == "/data"
    assert isinstance(load_config(Outer, overrides=["inner.lr=1"]).inner.lr, float)


def test_round_trip(tmp_path):
    cfg = load_config(Outer, overrides=["inner.lr=0.25"])
    save_config(cfg, tmp_path / "r.yaml")
    assert load_config(Outer, tmp_path / "r.yaml") == cfg


@pytest.mark.parametrize("override,msg", [
    (["inner.lrr=1"], "unknown config key 'inner.lrr'"),
    (["nmae=x"], "unknown config key 'nmae'"),
    (["inner.steps=fast"], "inner.steps: expected int"),
    (["inner.first_order=1"], "expected bool"),
    (["shots"], "not of the form key=value"),
    (["inner.steps=-1"], "^inner: steps must be >= 0"),  # the section's own check, named by its path
])
def test_bad_overrides_are_clear(override, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(Outer, overrides=override)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("inner: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Outer, bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("inner:\n  lrate: 3\n")
    with pytest.raises(ConfigError, match="inner.lrate"):
        load_config(Outer, typo)


def test_parse_overrides_nested():
    assert parse_overrides(["a.b=1", "a.c=x", "d=[1, 2]"]) == {"a": {"b": 1, "c": "x"}, "d": [1, 2]}


def test_every_shipped_recipe_config_loads():
    from pathlib import Path

    from purer.pipeline import RunConfig

    configs = sorted((Path(__file__).resolve().parents[1] / "recipes" / "configs").glob("*.yaml"))
    assert {"default.yaml", "purer-paper.yaml", "mh.yaml", "sh-mix.yaml"} <= {c.name for c in configs}
    for path in configs:
        load_config(RunConfig, path)  # unknown keys or bad values raise
