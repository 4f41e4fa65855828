"""purer: data-free meta-learning from a model zoo (PURER, CVPR 2023).

Importing purer sets torch to one CPU thread unless ``OMP_NUM_THREADS`` is set: the
few-shot networks here are small, and torch's default (one thread per core) makes
them slower, badly so on a busy machine (20 meta-test tasks with ICFIL took 75-102 s
with torch's default against 2.7-3.6 s with one thread on a busy 2-core machine).
``torch.set_num_threads(n)`` after the import chooses otherwise; for more cores, run
more processes (``accelerate launch --num_processes N``).
"""
import os

import torch

__version__ = "0.1.0"

if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)


class PurerWarning(UserWarning):
    """A run goes on, but not as the method intends (e.g. a teacher without BatchNorm gives R_bn nothing)."""
