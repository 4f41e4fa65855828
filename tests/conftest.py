"""Shared test settings: tiny tensors run fastest on one thread, and the CI machine has two cores."""
from pathlib import Path

import pytest
import torch

from recipe_runs import write_tiny_dataset

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    """A tiny class-per-folder dataset for end-to-end recipe runs (see recipe_runs.write_tiny_dataset)."""
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny_data"))
