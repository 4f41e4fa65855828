"""Distilling the zoo into one network on the pseudo bank (above both the inversion and the meta-learners).

:func:`distill_zoo` is the ``meta.init: distilled`` pre-phase: data-free knowledge
distillation of every teacher into one student over all bank classes, on the
bank's images, while the bank keeps being inverted.  :func:`distillation_loss` is
a true KL divergence on log-probabilities (the successors' public code passes
probabilities as ``F.kl_div``'s first argument, which is not one), and
:func:`teacher_agreement` measures how much of the zoo a student carries.

Example:
    >>> student = distill_zoo(teachers, bank, inversion, "conv4", steps=300, seed=0)   # doctest: +SKIP
    >>> teacher_agreement(student, teachers, bank)                                     # doctest: +SKIP
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from tqdm.auto import tqdm

from .inversion import EpisodeInversion, PseudoBank
from .meta.base import batch_stats_only
from .meta.init import random_model
from .zoo.architectures import Classifier
from .zoo.teacher import Teacher


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float = 4.0) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, mean over the batch.

    Both logits are ``[B, n]`` over the same ``n`` classes (a teacher's); the ``T^2``
    keeps the gradient's size independent of ``T`` (Hinton et al., 2015).
    """
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, -1), F.log_softmax(teacher_logits / t, -1),
                    log_target=True, reduction="batchmean") * t * t


def _teacher_images(bank: PseudoBank, i: int) -> torch.Tensor:
    """Detached bank images ``[n_i * P, C, S, S]`` of teacher ``i``'s classes (class-major)."""
    return rearrange(bank.snapshot(bank.teacher_classes[i]), "n p c h w -> (n p) c h w")


def distill_zoo(teachers: Sequence[Teacher], bank: PseudoBank, inversion: EpisodeInversion, arch: str,
                steps: int, seed: int, arch_args: dict | None = None, lr: float = 1e-3, temperature: float = 4.0,
                progress: bool = False) -> Classifier:
    """Data-free distillation of the whole zoo into one ``arch`` student over all bank classes.

    A pre-phase before ECI meta-training (``meta.init: distilled``), the usual
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
        progress: show a tqdm bar ("distil zoo").

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
    bar = tqdm(range(steps), desc="distil zoo", disable=not progress)
    for step in bar:
        chosen = inversion.sample_teachers()
        inversion.step(teachers=chosen)
        images = [_teacher_images(bank, i) for i in chosen]
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


@torch.no_grad()
def teacher_agreement(model: Classifier, teachers: Sequence[Teacher], bank: PseudoBank) -> float:
    """How often ``model`` (over all bank classes) picks a teacher's own answer on the bank.

    For every teacher, on the bank images of its classes: the share of images where
    the argmax of ``model``'s logits restricted to the teacher's bank classes equals
    the teacher's argmax; averaged over all those images.  Chance is
    ``1 / classes per teacher``.
    """
    agree, total = 0, 0
    for i, teacher in enumerate(teachers):
        x = _teacher_images(bank, i)
        picked = model(x)[:, bank.teacher_classes[i]].argmax(-1)
        agree += int((picked == teacher(x).argmax(-1)).sum())
        total += len(x)
    return agree / total
