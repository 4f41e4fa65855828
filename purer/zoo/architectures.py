"""Architectures registry: every zoo model is a :class:`Classifier` = ``encoder`` + linear ``head``.

Splitting each network into a feature encoder and a linear head lets the same
model serve as a teacher (logits), a feature extractor (nearest centroid,
ProtoNet, ICFIL's contrastive loss) and a meta-learner (MAML adapts all weights,
ANIL only the head), without custom layers.

Names: ``conv4``, ``resnet10``, ``resnet18`` (3x3 stem for small images),
``resnet12`` (the few-shot ResNet-12), and networks defined elsewhere (see
:mod:`purer.zoo.external`): ``tv:<name>`` for any torchvision classification
model (e.g. ``tv:mobilenet_v3_small``), ``timm:<name>`` for any timm classifier,
and a user's own class as ``package.module:Name`` or ``path/to/file.py:Name``;
all for any input channel count and image size.  The last three load
checkpoints under their library's own tensor names (:meth:`Classifier.native_names`).

Example:
    >>> m = build_model("conv4", num_classes=5, in_channels=1, image_size=28)
    >>> m(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 5])
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .external import canonical_arch, is_import_path, timm_classifier, torchvision_classifier, user_classifier

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    """Decorator adding an encoder factory ``f(in_channels, image_size, **arch_args) -> nn.Module``."""

    def deco(fn):
        _REGISTRY[name] = fn
        return fn

    return deco


def available() -> list[str]:
    return sorted(_REGISTRY) + ["tv:<torchvision model>", "timm:<timm model>", "package.module:Class",
                                "path/to/file.py:Class"]


def is_known(arch: str) -> bool:
    """Whether ``arch`` names an architecture :func:`build_model` can try (without importing anything)."""
    return arch in _REGISTRY or arch.startswith(("tv:", "timm:")) or is_import_path(arch)


class Classifier(nn.Module):
    """``head(encoder(x))``; ``encoder`` maps ``[B, C, H, W]`` to flat features ``[B, D]``.

    Attributes:
        build_args: what :func:`build_model` needs to rebuild the encoder
            (``{"arch", "arch_args", "in_channels", "image_size"}``), or ``None`` for a
            hand-made encoder; a saved meta-learner records it (see
            :meth:`purer.meta.MetaLearner.save_pretrained`).
        native_head: for a network built whole by its own library (``tv:``, ``timm:``, a
            user's class), the dotted name of its head there (``fc``, ``classifier.3``);
            ``encoder.0`` is that network with the head replaced by ``nn.Identity``.
            ``None``: purer's own architectures, whose names are the Classifier's.
    """

    def __init__(self, encoder: nn.Module, feature_dim: int, num_classes: int, build_args: dict | None = None,
                 native_head: str | None = None):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(feature_dim, num_classes)
        self.feature_dim = feature_dim
        self.build_args = build_args
        self.native_head = native_head

    def native_names(self) -> dict[str, str] | None:
        """``{state_dict name: the name in the library's own model}`` (``encoder.0.conv1.weight`` ->
        ``conv1.weight``, ``head.weight`` -> ``fc.weight``), or ``None`` for purer's own architectures."""
        if self.native_head is None:
            return None
        return {k: f"{self.native_head}.{k[len('head.'):]}" if k.startswith("head.") else k[len("encoder.0."):]
                for k in self.state_dict()}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.MaxPool2d(2))


@register("conv4")
def conv4(in_channels: int, image_size: int, width: int = 32, depth: int = 4) -> nn.Module:
    """The few-shot Conv4: ``depth`` x [conv3x3(width), BN, ReLU, maxpool2], flattened."""
    layers = [conv_block(in_channels if i == 0 else width, width) for i in range(depth)]
    return nn.Sequential(*layers, nn.Flatten())


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def small_resnet(in_channels: int, blocks: tuple[int, ...], width: int = 64) -> nn.Module:
    """ResNet with a 3x3 stride-1 stem and no max-pool, for 28-84 px images."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                               nn.ReLU(inplace=True)]
    cin = width
    for stage, n in enumerate(blocks):
        cout = width * 2 ** stage
        for b in range(n):
            layers.append(BasicBlock(cin, cout, 2 if (stage > 0 and b == 0) else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers)


@register("resnet10")
def resnet10(in_channels: int, image_size: int, width: int = 64) -> nn.Module:
    return small_resnet(in_channels, (1, 1, 1, 1), width)


@register("resnet18")
def resnet18(in_channels: int, image_size: int, width: int = 64) -> nn.Module:
    return small_resnet(in_channels, (2, 2, 2, 2), width)


class DropBlock(nn.Module):
    """DropBlock (Ghiasi et al., NeurIPS 2018): in training, zero square ``block_size`` patches of ``[B, C, H, W]``
    feature maps (about ``drop_rate`` of the positions) and rescale the rest; the identity in eval mode or at
    ``drop_rate`` 0."""

    def __init__(self, drop_rate: float, block_size: int):
        super().__init__()
        self.drop_rate, self.block_size = drop_rate, block_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_rate == 0:
            return x
        _, _, h, w = x.shape
        size = min(self.block_size, h, w)
        # Block centres are drawn where a whole block fits, at the rate that drops drop_rate of the positions.
        gamma = self.drop_rate / size ** 2 * (h * w) / ((h - size + 1) * (w - size + 1))
        centres = torch.bernoulli(torch.full((x.shape[0], x.shape[1], h - size + 1, w - size + 1), gamma,
                                             device=x.device, dtype=x.dtype))
        pad = size - 1
        blocks = F.max_pool2d(F.pad(centres, (pad, pad, pad, pad)), size, stride=1)[..., :h, :w]
        keep = 1 - blocks
        return x * keep * (keep.numel() / keep.sum().clamp_min(1))


class ResNet12Block(nn.Module):
    """Three 3x3 conv-BN layers (leaky ReLU 0.1 between), a 1x1 conv-BN shortcut, leaky ReLU, max-pool 2,
    then DropBlock: ``[B, cin, H, W]`` -> ``[B, cout, H // 2, W // 2]``."""

    def __init__(self, cin: int, cout: int, drop_rate: float = 0.0, block_size: int = 1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv3, self.bn3 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.pool = nn.MaxPool2d(2)
        self.drop = DropBlock(drop_rate, block_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.leaky_relu(self.bn1(self.conv1(x)), 0.1)
        out = F.leaky_relu(self.bn2(self.conv2(out)), 0.1)
        out = self.bn3(self.conv3(out))
        return self.drop(self.pool(F.leaky_relu(out + self.shortcut(x), 0.1)))


@register("resnet12")
def resnet12(in_channels: int, image_size: int, widths: tuple[int, ...] | list[int] = (64, 160, 320, 640),
             drop_rate: float = 0.0, dropblock_size: int = 5) -> nn.Module:
    """The few-shot ResNet-12 (MetaOptNet, FEAT, DeepEMD): four :class:`ResNet12Block` of ``widths``, then
    global average pooling: ``[B, C, H, W]`` -> ``[B, widths[-1]]`` (640 features by default).

    ``drop_rate`` > 0 applies DropBlock of ``dropblock_size`` in the last two blocks during training, as
    MetaOptNet and FEAT pre-train it (0.1, 5); it is off by default and always off in eval mode.  It is a
    pre-training regulariser: leave it at 0 for a meta-learner (random masks inside MAML's inner loop, and
    under ``vmap``, are not what the method assumes).
    """
    if len(widths) != 4 or min(widths) < 1:
        raise TypeError(f"widths must be 4 positive channel counts, got {widths}")
    if not 0 <= drop_rate < 1:
        raise TypeError(f"drop_rate must lie in [0, 1), got {drop_rate}")
    blocks, cin = [], in_channels
    for i, cout in enumerate(widths):
        blocks.append(ResNet12Block(cin, cout, drop_rate if i >= 2 else 0.0, dropblock_size))
        cin = cout
    return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())


def build_model(arch: str, num_classes: int, in_channels: int = 3, image_size: int = 32,
                arch_args: dict | None = None) -> Classifier:
    """Build a registered architecture as a :class:`Classifier`.

    Args:
        arch: a registered name (``conv4``, ``resnet10``, ``resnet12``, ``resnet18``), ``tv:<name>``,
            ``timm:<name>`` or a user's ``package.module:Name`` / ``path/to/file.py:Name``
            (see :mod:`purer.zoo.external`).
        num_classes: outputs of the linear head.
        in_channels: image channels (1 for glyphs, 3 for colour).
        image_size: input side in pixels; sets the feature size of flattening encoders.
        arch_args: extra keyword arguments of the architecture (e.g. ``{"width": 64}``).

    Raises:
        ValueError: unknown architecture, one that cannot be imported, or bad arguments.
    """
    arch_args = dict(arch_args or {})
    arch = canonical_arch(arch)
    native_head = None
    if arch.startswith("tv:"):
        encoder, native_head = torchvision_classifier(arch[3:], num_classes, in_channels, arch_args)
    elif arch.startswith("timm:"):
        encoder, native_head = timm_classifier(arch[5:], num_classes, in_channels, arch_args)
    elif is_import_path(arch):
        encoder, native_head = user_classifier(arch, num_classes, in_channels, arch_args)
    elif arch in _REGISTRY:
        try:
            encoder = _REGISTRY[arch](in_channels, image_size, **arch_args)
        except TypeError as e:
            raise ValueError(f"bad arch_args {arch_args} for {arch!r}: {e}") from None
    else:
        raise ValueError(f"unknown architecture {arch!r}; available: {', '.join(available())}")
    with torch.no_grad():
        was_training = encoder.training
        encoder.eval()
        try:
            dim = encoder(torch.zeros(1, in_channels, image_size, image_size)).shape[-1]
        except (RuntimeError, AssertionError) as e:  # timm asserts a fixed-size model's input size
            raise ValueError(f"{arch!r} cannot take {in_channels}x{image_size}x{image_size} images: "
                             f"{' '.join(str(e).split())[:300]}") from None
        encoder.train(was_training)
    return Classifier(encoder, int(dim), num_classes, {"arch": arch, "arch_args": arch_args,
                                                       "in_channels": in_channels, "image_size": image_size},
                      native_head)
