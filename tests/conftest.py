"""Shared test settings: tiny tensors run fastest on one thread, and the CI machine has two cores."""
import torch

torch.set_num_threads(1)
