"""MTL's hard-task (HT) meta-batch, as a sampler option for any learner and any episode source.

Description:
    Meta-transfer learning (Sun, Liu et al., CVPR 2019, section 4.2) learns more from the tasks it fails on:
    after each meta-batch, every task's *failure class* (the class its query set was classified worst on)
    is recorded, and "harder" tasks are re-sampled from the failure classes' data.  Here: each task's failure
    class is the one of lowest query accuracy (the lower label on ties); once ``way`` distinct failure
    classes are pooled, the next meta-batch's last ``hard`` tasks are drawn from them (``way`` classes of the
    pool, fresh support and query instances) and the pool empties.  Beside the Gradient Switch, which makes
    the pseudo *images* harder, this makes the *class combinations* harder; both run in ECI meta-training
    (``meta.hard_tasks``), and the failure classes come back to the host in the switch's one read per
    iteration.

References:
    Sun, Liu, Chua, Schiele, "Meta-Transfer Learning for Few-Shot Learning", CVPR 2019.

Example:
    >>> hard = HardTasks([6] * 10, way=3, shot=1, query=2, hard=1, seed=0)
    >>> specs = [EpisodeSampler([6] * 10, 3, 1, 2, seed=0).task(i) for i in range(2)]
    >>> pool = hard.record([], specs, [0, 2])                   # the classes tasks 0 and 1 failed on
    >>> batch, pool = hard.batch(pool + [9], 1, specs)          # three distinct failure classes: one hard task
    >>> sorted(batch[-1].classes.tolist()) == sorted({int(specs[0].classes[0]), int(specs[1].classes[2]), 9}), pool
    (True, [])
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..data.episodes import EpisodeSampler, TaskSpec


def failure_labels(logits: torch.Tensor) -> torch.Tensor:
    """Each task's failure class: query logits ``[T, N*Q, N]`` of class-major queries (``Q`` of label 0, then
    label 1, ...) -> ``[T]`` the label of lowest query accuracy (the lowest such label on ties), on the device."""
    t, b, n = logits.shape
    labels = torch.arange(n, device=logits.device).repeat_interleave(b // n)
    correct = (logits.argmax(-1) == labels).float().view(t, n, b // n)
    return correct.mean(-1).argmin(-1)


class HardTasks:
    """The hard-task meta-batch over a source with ``class_sizes`` (see the module docstring).

    Args:
        class_sizes: images per class of the episode source (e.g. the pseudo bank's).
        way, shot, query: the tasks' shape.
        hard: tasks of a meta-batch replaced by hard ones when the pool is ready (>= 1).
        seed: seeds the hard tasks (task ``k`` of iteration ``it`` depends only on ``(seed, it, k)``).

    The pool of failure classes is plain data (a list of class indices) that the caller keeps, e.g. in a
    checkpointed training state.
    """

    def __init__(self, class_sizes: Sequence[int], way: int, shot: int, query: int | None, hard: int, seed: int):
        if hard < 1:
            raise ValueError(f"hard tasks per meta-batch must be >= 1, got {hard}")
        self.sizes = np.asarray(list(class_sizes), dtype=np.int64)
        self.way, self.shot, self.query, self.hard, self.seed = way, shot, query, hard, seed

    def batch(self, pool: list[int], it: int, specs: list[TaskSpec]) -> tuple[list[TaskSpec], list[int]]:
        """Meta-batch ``specs`` of iteration ``it``, its last ``hard`` tasks re-sampled from the pool's classes
        if it holds ``way`` of them (then the pool empties); and the pool after it."""
        if len(pool) < self.way:
            return specs, pool
        sizes = np.zeros_like(self.sizes)
        sizes[pool] = self.sizes[pool]  # only the failure classes are eligible
        sampler = EpisodeSampler(sizes, self.way, self.shot, self.query, seed=self.seed)
        hard = min(self.hard, len(specs))
        return specs[:len(specs) - hard] + [sampler.task(it * self.hard + k) for k in range(hard)], []

    def record(self, pool: list[int], specs: Sequence[TaskSpec], failures: Sequence[int]) -> list[int]:
        """The pool after adding each task's failure class (``failures[t]``: a label of task ``t``), distinct."""
        pool = list(pool)
        for spec, label in zip(specs, failures):
            c = int(spec.classes[int(label)])
            if c not in pool:
                pool.append(c)
        return pool
