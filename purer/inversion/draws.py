"""The seeded draws of a step over the zoo: which teachers, and how each teacher's images are augmented.

Episode inversion (:class:`~purer.inversion.EpisodeInversion`) and zoo distillation
(:class:`purer.distill.ZooDistillation`) both pick a few teachers per step and show
each of them augmented views of its bank images; both draw here, each from its own
stream, so the two never share (or shift) each other's random numbers.

* :class:`TeacherSampler`: ``teachers_per_step`` teachers per call, uniformly without
  replacement, from a generator whose state is checkpointed (a resumed run draws on).
* :func:`augmentation_draws`: the affine matrices of a step, one block per teacher, each
  drawn from a generator seeded by ``(*stream, step, teacher)``: a teacher's views do
  not depend on which other teachers were sampled, nor on which process or device
  computes it.  They are drawn on the CPU and reach the device in one copy.

Example:
    >>> sampler = TeacherSampler(num_teachers=12, per_step=4, seed=0)
    >>> len(sampler.sample())
    4
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..host import to_device
from .augment import RandomAffineAugment


class TeacherSampler:
    """``min(per_step, num_teachers)`` distinct teachers per :meth:`sample`, sorted.

    Args:
        num_teachers: the zoo's size.
        per_step: teachers per step.
        seed: seeds the generator (its state is part of :meth:`state_dict`).
    """

    def __init__(self, num_teachers: int, per_step: int, seed: int):
        if num_teachers < 1 or per_step < 1:
            raise ValueError(f"need at least one teacher and per_step >= 1, got {num_teachers} and {per_step}")
        self.num_teachers, self.per_step = num_teachers, per_step
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self) -> list[int]:
        n = self.num_teachers
        return sorted(torch.randperm(n, generator=self.generator)[:min(self.per_step, n)].tolist())

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def keyed_generator(*key: int) -> torch.Generator:
    """A CPU generator seeded by the integers ``key`` (e.g. ``(seed, stream, step, teacher)``): the same draws
    whichever process, device or order asks for them."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1)[0]))


def augmentation_draws(augment: RandomAffineAugment, stream: Sequence[int], step: int,
                       teachers: Sequence[int], counts: Sequence[int], device: torch.device | str) -> torch.Tensor:
    """The step's affine matrices ``[sum(counts), 2, 3]`` on ``device``: ``counts[j]`` for teacher ``teachers[j]``,
    each block drawn from the generator seeded by ``(*stream, step, teacher)``.

    ``stream`` keeps the users apart (the inversion draws ``(seed,)``, the distillation
    ``(seed, 1)``); the draw is on the CPU, so every device and process gets the same
    matrices, and moves to ``device`` in one copy.
    """
    blocks = []
    for i, n in zip(teachers, counts):
        blocks.append(augment.sample(n, keyed_generator(*stream, step, i)))
    return to_device(torch.cat(blocks) if blocks else torch.zeros(0, 2, 3), device)
