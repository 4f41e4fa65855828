"""The ``meta.init: zoo-student`` pre-phase: the whole zoo distilled into one fresh network on the pseudo bank,
before ECI meta-training, as the meta-learner's starting point (the usual stronger initialisation of later
data-free meta-learning work).  Zoo distillation *during* meta-training is :mod:`purer.distill`.

Example:
    >>> student = zoo_student(teachers, bank, inversion, "conv4", steps=300, seed=0)   # doctest: +SKIP
"""
from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm

from .distill import distillation_loss
from .inversion import EpisodeInversion, PseudoBank
from .batchnorm import batch_stats_only
from .meta.init import random_model
from .zoo.architectures import Classifier
from .zoo.teacher import Teacher


def zoo_student(teachers: Sequence[Teacher], bank: PseudoBank, inversion: EpisodeInversion, arch: str,
                steps: int, seed: int, arch_args: dict | None = None, lr: float = 1e-3, temperature: float = 4.0,
                progress: bool = False) -> Classifier:
    """Data-free distillation of the whole zoo into one ``arch`` student over all bank classes.

    A pre-phase before ECI meta-training (``meta.init: zoo-student``), the usual
    stronger initialisation of later data-free meta-learning work.  Each of
    ``steps`` iterations:

    1. one plain :meth:`EpisodeInversion.step` on the bank, from teachers drawn by
       :meth:`EpisodeInversion.sample_teachers` (the bank and the inversion state go
       on into meta-training, which keeps updating them);
    2. one Adam step of the student on the bank images (detached) of those teachers'
       classes, one forward pass over all of them: for each teacher, its
       :func:`distillation_loss` between the student's logits restricted to the
       teacher's bank classes and the teacher's logits, averaged over the teachers.

    Pure knowledge distillation: no cross-entropy on the bank class labels, since
    the teachers' soft outputs already carry the label (the bank is inverted
    towards it) and also how alike a teacher finds its classes.  The student's
    BatchNorm uses batch statistics, as the meta-learners' does.  The result is
    deterministic given ``seed``, the bank and the inversion state (no draw uses the
    global RNG), so every process of a multi-process run can run it and agree.

    Args:
        teachers: the zoo, in the bank's order.
        bank: the pseudo-image bank built from ``teachers``; updated in place.
        inversion: the :class:`EpisodeInversion` of ``bank``; its state advances by ``steps``.
        arch, arch_args: the student's architecture (the meta-learner's), at the
            bank's channels and size.
        steps: pre-phase iterations (>= 1).
        seed: seed of the student's initial weights.
        lr: the student's Adam learning rate.
        temperature: T of the distillation loss.
        progress: show a tqdm bar ("zoo student").

    Returns:
        The student, a :class:`~purer.zoo.Classifier` with ``bank.num_classes``
        outputs (bank class order); :func:`with_new_head` makes it a learner's model.
    """
    if steps < 1:
        raise ValueError(f"distillation needs steps >= 1, got {steps}")
    if inversion.bank is not bank:
        raise ValueError("the inversion must update the given bank")
    student = batch_stats_only(random_model(arch, bank.num_classes, bank.channels, bank.image_size, arch_args,
                                            seed=seed)).train().to(inversion.device)
    optimizer = torch.optim.Adam(student.parameters(), lr=lr)
    bar = tqdm(range(steps), desc="zoo student", disable=not progress)
    for step in bar:
        chosen = inversion.sample_teachers()
        inversion.step(teachers=chosen)
        images = [bank.teacher_images(i) for i in chosen]
        logits = student(torch.cat(images)).split([len(x) for x in images])
        loss = logits[0].new_zeros(())
        for i, x, s in zip(chosen, images, logits):
            with torch.no_grad():
                target = teachers[i](x)
            loss = loss + distillation_loss(s[:, bank.teacher_classes[i]], target, temperature) / len(chosen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 25 == 0:  # one synchronisation per 25 steps on a GPU
            bar.set_postfix(kd=f"{loss.item():.3f}")
    return student
