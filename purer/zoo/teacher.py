"""A zoo model's config (the ``config.json`` contract) and the in-memory :class:`Teacher`.

Everything downstream (inversion, baselines, ICFIL) feeds images in ``[0, 1]``
pixel space; :meth:`Teacher.prepare` turns them into what this teacher was
trained on (channels, size, normalisation), differentiably, so one pseudo-image
bank serves a heterogeneous zoo.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Iterable

import torch
from torch import nn

from ..resample import resize
from .architectures import Classifier, build_model


@dataclass
class ModelConfig:
    """What ``<zoo>/<model_id>/config.json`` holds.

    Attributes:
        arch: registered architecture name (see :mod:`purer.zoo.architectures`).
        num_classes: outputs of the head; ``len(class_ids)``.
        class_ids: the global name of each output class, ``class_ids[local_label]``.
            Two models share a class only where they give it the same id.
        in_channels, image_size: the input the model expects.
        mean, std: per-channel normalisation applied to ``[0, 1]`` images.
        dataset: where the training data came from (e.g. ``"glyphs"``).
        arch_args: extra architecture keyword arguments (e.g. ``{"width": 32}``).
        sha256: hex digest of ``model.safetensors``.
        metrics: free-form numbers, e.g. ``{"heldout_acc": 0.97, "best_epoch": 12}``.
    """

    arch: str
    num_classes: int
    class_ids: list[str]
    in_channels: int = 3
    image_size: int = 32
    mean: list[float] = field(default_factory=lambda: [0.0])
    std: list[float] = field(default_factory=lambda: [1.0])
    dataset: str = ""
    arch_args: dict = field(default_factory=dict)
    sha256: str = ""
    metrics: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.num_classes != len(self.class_ids):
            raise ValueError(f"num_classes={self.num_classes} but {len(self.class_ids)} class_ids")
        if len(self.class_ids) != len(set(self.class_ids)):
            raise ValueError("class_ids must be distinct")
        for name in ("mean", "std"):
            v = getattr(self, name)
            if len(v) not in (1, self.in_channels):
                raise ValueError(f"{name} has {len(v)} values for {self.in_channels} channels")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config.json keys: {sorted(unknown)}")
        missing = {"arch", "num_classes", "class_ids"} - set(d)
        if missing:
            raise ValueError(f"config.json lacks {sorted(missing)}")
        return cls(**{k: v for k, v in d.items()})

    def build(self) -> Classifier:
        return build_model(self.arch, self.num_classes, self.in_channels, self.image_size, self.arch_args)


#: The zoos a per-zoo rule (:func:`zoo_rule`) is for, by the suffix of its setting's name.
ZOO_RULES = {"colour": "a zoo of colour teachers", "heterogeneous": "a zoo of teachers of several architectures"}


def zoo_rule(config, name: str, models: Iterable[ModelConfig]) -> str:
    """Which of a setting's per-zoo rules decides for a zoo of teachers ``models``: the setting ``name`` of
    ``config`` (e.g. ``inversion.synthesizer``) has a rule for a zoo whose teachers all take colour (3-channel)
    input, ``<name>_colour``, and one for a zoo of teachers of more than one architecture,
    ``<name>_heterogeneous``.  The colour rule first, then the other, each only where it is set (not ``None``);
    else ``name`` itself.  Returns the name of the deciding setting."""
    models = list(models)
    if models and all(m.in_channels == 3 for m in models) and getattr(config, f"{name}_colour") is not None:
        return f"{name}_colour"
    if len({m.arch for m in models}) > 1 and getattr(config, f"{name}_heterogeneous") is not None:
        return f"{name}_heterogeneous"
    return name


def rule_zoo(name: str, setting: str) -> str | None:
    """The zoo, in words, whose rule ``setting`` is (:func:`zoo_rule`'s answer for the setting ``name``, e.g.
    ``synthesizer_colour``: "a zoo of colour teachers"); ``None`` where ``name`` itself decides."""
    return None if setting == name else ZOO_RULES[setting.removeprefix(f"{name}_")]


def prepare_input(x: torch.Tensor, in_channels: int, image_size: int, mean: torch.Tensor,
                  std: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` images in ``[0, 1]`` -> a model's input: channels, size, normalisation.

    Grey images are repeated to 3 channels; colour images are averaged to 1.
    Differentiable in ``x``.
    """
    x = convert_input(x, in_channels, image_size)
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def convert_input(x: torch.Tensor, in_channels: int, image_size: int) -> torch.Tensor:
    """``[B, C, H, W]`` images -> ``in_channels`` channels at ``image_size`` (the input shape, not normalised)."""
    if x.ndim != 4:
        raise ValueError(f"images must be [B, C, H, W], got {tuple(x.shape)}")
    c = x.shape[1]
    if c != in_channels:
        if c == 1:
            x = x.expand(-1, in_channels, -1, -1)
        elif in_channels == 1:
            x = x.mean(1, keepdim=True)
        else:
            raise ValueError(f"cannot feed {c}-channel images to a {in_channels}-channel model")
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = resize(x, image_size)  # bilinear, deterministic on a GPU (unlike F.interpolate's backward)
    return x


class Teacher(nn.Module):
    """A pre-trained zoo model, kept in eval mode, with its input contract.

    Args:
        model: the :class:`Classifier` with loaded weights.
        config: its :class:`ModelConfig`.
        model_id: its directory name in the zoo.

    ``teacher(x)`` takes ``[B, C, H, W]`` images in ``[0, 1]`` and returns logits
    ``[B, num_classes]``; ``teacher.features(x)`` returns ``[B, D]``.
    """

    def __init__(self, model: Classifier, config: ModelConfig, model_id: str = ""):
        super().__init__()
        self.model = model.eval()
        self.config = config
        self.model_id = model_id
        # On the network's device: a teacher wrapped around a model already on a GPU (ICFIL's per-task network)
        # must not normalise with CPU tensors.
        device = next(model.parameters(), torch.empty(0)).device
        self.register_buffer("mean", torch.tensor(config.mean, dtype=torch.float32, device=device), persistent=False)
        self.register_buffer("std", torch.tensor(config.std, dtype=torch.float32, device=device), persistent=False)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> "Teacher":
        # Teachers are never trained: their BN running statistics are the inversion's target.
        return super().train(False)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return prepare_input(x, self.config.in_channels, self.config.image_size, self.mean, self.std)

    def prepare_shape(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`prepare` but the normalisation (which a batch of teachers applies each its own)."""
        return convert_input(x, self.config.in_channels, self.config.image_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.prepare(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(self.prepare(x))

    @property
    def class_ids(self) -> list[str]:
        return self.config.class_ids
