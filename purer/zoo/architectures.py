"""Architectures registry: every zoo model is a :class:`Classifier` = ``encoder`` + linear ``head``.

Splitting each network into a feature encoder and a linear head lets the same
model serve as a teacher (logits), a feature extractor (nearest centroid,
ProtoNet, ICFIL's contrastive loss) and a meta-learner (MAML adapts all weights,
ANIL only the head), without custom layers.

Registered names: ``conv4``, ``resnet10``, ``resnet18`` (3x3 stem for small
images) and ``tv:<name>`` for any torchvision classification model (e.g.
``tv:mobilenet_v3_small``), all for any input channel count and image size.

Example:
    >>> m = build_model("conv4", num_classes=5, in_channels=1, image_size=28)
    >>> m(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 5])
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    """Decorator adding an encoder factory ``f(in_channels, image_size, **arch_args) -> nn.Module``."""

    def deco(fn):
        _REGISTRY[name] = fn
        return fn

    return deco


def available() -> list[str]:
    return sorted(_REGISTRY) + ["tv:<torchvision model name>"]


class Classifier(nn.Module):
    """``head(encoder(x))``; ``encoder`` maps ``[B, C, H, W]`` to flat features ``[B, D]``.

    Attributes:
        build_args: what :func:`build_model` needs to rebuild the encoder
            (``{"arch", "arch_args", "in_channels", "image_size"}``), or ``None`` for a
            hand-made encoder; a saved meta-learner records it (see
            :meth:`purer.meta.MetaLearner.save_pretrained`).
    """

    def __init__(self, encoder: nn.Module, feature_dim: int, num_classes: int, build_args: dict | None = None):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(feature_dim, num_classes)
        self.feature_dim = feature_dim
        self.build_args = build_args

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


def _torchvision_encoder(name: str, in_channels: int, **arch_args) -> nn.Module:
    import torchvision

    try:
        net = torchvision.models.get_model(name, weights=None, **arch_args)
    except ValueError as e:
        raise ValueError(f"unknown torchvision model {name!r}: {e}") from None
    convs = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    if convs and convs[0][1].in_channels != in_channels:
        n, c = convs[0]
        _replace(net, n, nn.Conv2d(in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.dilation,
                                   c.groups, c.bias is not None))
    linears = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"torchvision model {name!r} has no final nn.Linear to use as the head")
    _replace(net, linears[-1], nn.Identity())
    return nn.Sequential(net, nn.Flatten())


def _replace(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def build_model(arch: str, num_classes: int, in_channels: int = 3, image_size: int = 32,
                arch_args: dict | None = None) -> Classifier:
    """Build a registered architecture as a :class:`Classifier`.

    Args:
        arch: a registered name (``conv4``, ``resnet10``, ``resnet18``) or ``tv:<name>``.
        num_classes: outputs of the linear head.
        in_channels: image channels (1 for glyphs, 3 for colour).
        image_size: input side in pixels; sets the feature size of flattening encoders.
        arch_args: extra keyword arguments of the architecture (e.g. ``{"width": 64}``).

    Raises:
        ValueError: unknown architecture or bad arguments.
    """
    arch_args = dict(arch_args or {})
    if arch.startswith("tv:"):
        encoder = _torchvision_encoder(arch[3:], in_channels, **arch_args)
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
        except RuntimeError as e:
            raise ValueError(f"{arch!r} cannot take {in_channels}x{image_size}x{image_size} images: {e}") from None
        encoder.train(was_training)
    return Classifier(encoder, int(dim), num_classes, {"arch": arch, "arch_args": arch_args,
                                                       "in_channels": in_channels, "image_size": image_size})
