"""purer: data-free meta-learning from a model zoo (PURER, CVPR 2023)."""

__version__ = "0.1.0"
