"""Where a meta-learner starts: random weights, a given model, the average of teachers, or the zoo distilled.

Each function but :func:`distill_zoo` returns a fresh :class:`~purer.zoo.Classifier`
whose head has ``way`` outputs, ready for :class:`~purer.meta.MAML`,
:class:`~purer.meta.ANIL` or :class:`~purer.meta.ProtoNet` (which uses only its
encoder); :func:`distill_zoo` returns a student over all bank classes, which
:func:`with_new_head` turns into one.

Example:
    >>> model = random_model("conv4", way=5, in_channels=1, image_size=32, seed=0)
    >>> model.head.out_features
    5
"""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from tqdm.auto import tqdm

from ..zoo.architectures import Classifier, build_model
from ..zoo.teacher import Teacher
from .base import batch_stats_only

if TYPE_CHECKING:  # purer.inversion imports purer.meta.base; a runtime import here would be circular
    from ..inversion import EpisodeInversion, PseudoBank


def random_model(arch: str, way: int, in_channels: int, image_size: int, arch_args: dict | None = None,
                 seed: int | None = None) -> Classifier:
    """A randomly initialised ``arch`` with a ``way``-output head (seeded if ``seed`` is given)."""
    if seed is None:
        return build_model(arch, way, in_channels, image_size, arch_args)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(arch, way, in_channels, image_size, arch_args)


def from_model(model: Classifier | Teacher, way: int) -> Classifier:
    """A trainable copy of ``model`` (a Classifier or a Teacher's network).

    The head is kept when it already has ``way`` outputs, else replaced by a
    fresh ``nn.Linear(feature_dim, way)`` (a teacher's classes are not the task's).
    """
    net = model.model if isinstance(model, Teacher) else model
    if not isinstance(net, Classifier):
        raise ValueError(f"expected a purer.zoo.Classifier or Teacher, got {type(model).__name__}")
    net = copy.deepcopy(net)
    if net.head.out_features != way:
        net.head = nn.Linear(net.feature_dim, way)
    for p in net.parameters():
        p.requires_grad_(True)
    return net.train()


def average_teachers(teachers: Sequence[Teacher], way: int) -> Classifier:
    """The elementwise mean of same-architecture teachers' weights (the release's initialisation).

    The head is averaged too when every teacher has ``way`` classes, else it is a
    fresh ``way``-output head. BatchNorm running statistics are averaged like any
    other tensor, although meta-learners ignore them (they use batch statistics).

    Raises:
        ValueError: no teachers, or teachers that differ in architecture or input.
    """
    if not teachers:
        raise ValueError("average_teachers needs at least one teacher")
    key = lambda t: (t.config.arch, t.config.in_channels, t.config.image_size, sorted(t.config.arch_args.items()))
    kinds = {repr(key(t)) for t in teachers}
    if len(kinds) > 1:
        raise ValueError(f"cannot average teachers of different architectures or inputs: {sorted(kinds)}; "
                         f"pick a same-architecture subset of the zoo")
    states = [t.model.state_dict() for t in teachers]
    mean = {k: (torch.stack([s[k].float() for s in states]).mean(0).to(states[0][k].dtype)
                if states[0][k].is_floating_point() else states[0][k]) for k in states[0]}
    net = copy.deepcopy(teachers[0].model)
    net.load_state_dict(mean)
    return from_model(net, way)


def with_new_head(model: Classifier, way: int, seed: int | None = None) -> Classifier:
    """A trainable copy of ``model`` with a fresh ``way``-output head, initialised as :func:`random_model`'s.

    PyTorch's default ``nn.Linear`` initialisation, seeded if ``seed`` is given; the
    release's MAML has no special head initialisation (no zero head) to follow.
    """
    net = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        net.head = nn.Linear(net.feature_dim, way)
    for p in net.parameters():
        p.requires_grad_(True)
    return net.train()


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float = 4.0) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, mean over the batch.

    Both logits are ``[B, n]`` over the same ``n`` classes (a teacher's); the ``T^2``
    keeps the gradient's size independent of ``T`` (Hinton et al., 2015).
    """
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, -1), F.log_softmax(teacher_logits / t, -1),
                    log_target=True, reduction="batchmean") * t * t


def _teacher_images(bank: "PseudoBank", i: int) -> torch.Tensor:
    """Detached bank images ``[n_i * P, C, S, S]`` of teacher ``i``'s classes (class-major)."""
    return rearrange(bank.snapshot(bank.teacher_classes[i]), "n p c h w -> (n p) c h w")


def distill_zoo(teachers: Sequence[Teacher], bank: "PseudoBank", inversion: "EpisodeInversion", arch: str,
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
                                            seed=seed)).train()
    optimizer = torch.optim.Adam(student.parameters(), lr=lr)
    bar = tqdm(range(steps), desc="distil zoo", disable=not progress)
    for _ in bar:
        chosen = inversion.sample_teachers()
        inversion.step(teachers=chosen)
        images = [_teacher_images(bank, i) for i in chosen]
        logits = student(torch.cat(images)).split([len(x) for x in images])
        loss = torch.zeros(())
        for i, x, s in zip(chosen, images, logits):
            with torch.no_grad():
                target = teachers[i](x)
            loss = loss + distillation_loss(s[:, bank.teacher_classes[i]], target, temperature) / len(chosen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(kd=f"{loss.item():.3f}")
    return student


@torch.no_grad()
def teacher_agreement(model: Classifier, teachers: Sequence[Teacher], bank: "PseudoBank") -> float:
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
