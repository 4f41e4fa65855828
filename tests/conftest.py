"""Shared test settings: tiny tensors run fastest on one thread, and the CI machine has two cores; the decoded
images of the tests' throw-away datasets are cached in a throw-away folder, not in the user's cache."""
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from recipe_runs import overrides, recipe, write_tiny_dataset

torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def decoded_cache():
    """``$PURER_DECODED_CACHE`` for the session (the recipe's subprocesses inherit it)."""
    folder = tempfile.mkdtemp(prefix="purer-test-decoded-")
    before = os.environ.get("PURER_DECODED_CACHE")
    os.environ["PURER_DECODED_CACHE"] = folder
    yield Path(folder)
    if before is None:
        del os.environ["PURER_DECODED_CACHE"]
    else:
        os.environ["PURER_DECODED_CACHE"] = before
    shutil.rmtree(folder, ignore_errors=True)


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
