"""Shared test settings: tiny tensors run fastest on one thread, and the CI machine has two cores."""
from pathlib import Path

import pytest
import torch

from recipe_runs import overrides, recipe, write_tiny_dataset

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    """A tiny class-per-folder dataset for end-to-end recipe runs (see recipe_runs.write_tiny_dataset)."""
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture(scope="module")
def baseline_run(tiny_root, tmp_path_factory) -> Path:
    """A finished 6-iteration recipe run on ``tiny_root`` (with ICFIL and three baselines)."""
    out = tmp_path_factory.mktemp("run")
    res = recipe(overrides(tiny_root, out))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resource_tracker" not in res.stderr, res.stderr[-3000:]  # the baselines' worker exits cleanly
    return out
