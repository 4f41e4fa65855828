"""Where a meta-learner starts: random weights, a given model, or the average of teachers.

Each function returns a fresh :class:`~purer.zoo.Classifier` whose head has ``way``
outputs, ready for :class:`~purer.meta.MAML`, :class:`~purer.meta.ANIL` or
:class:`~purer.meta.ProtoNet` (which uses only its encoder).  The zoo distilled on
the pseudo bank (:func:`purer.student.zoo_student`) is another start; it needs the
bank, so it lives above both packages, and :func:`with_new_head` turns its student
into a learner's model.

Example:
    >>> model = random_model("conv4", way=5, in_channels=1, image_size=32, seed=0)
    >>> model.head.out_features
    5
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from ..zoo.architectures import Classifier, build_model
from ..zoo.teacher import Teacher


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
