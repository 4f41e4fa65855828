"""R_bn: how far a batch's feature statistics lie from a teacher's BatchNorm running statistics.

Episode inversion asks that images fed to a teacher reproduce, at every BatchNorm
layer, the mean and variance the teacher saw on its (lost) training data.  The
statistics are those of each BN layer's *input* over ``N, H, W``; the distance per
layer is the plain (not squared) L2 norm of the mean difference plus that of the
variance difference, summed over layers, as in the reference release.

Example:
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)).eval()
    >>> with BNStatsHook(net) as bn:
    ...     _ = net(torch.rand(8, 1, 8, 8))
    >>> bn.loss().shape
    torch.Size([])
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..batchnorm import batch_statistics


def bn_distance(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor) -> torch.Tensor:
    """``||mean(x) - running_mean||_2 + ||var(x) - running_var||_2`` for one BN layer's input.

    Args:
        x: ``[B, C, *]`` the input of a BatchNorm layer (``[B, C]``, ``[B, C, L]`` or ``[B, C, H, W]``).
        running_mean, running_var: ``[C]`` the layer's running statistics.

    Returns:
        A 0-dim tensor, differentiable in ``x``.  The variance is the biased one
        (over ``B`` and all spatial positions), the estimate BatchNorm normalises with.
    """
    if x.ndim < 2 or x.shape[1] != running_mean.shape[0]:
        raise ValueError(f"BN input must be [B, C, ...] with C={running_mean.shape[0]}, got {tuple(x.shape)}")
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()  # statistics in full precision under mixed-precision autocast
    mean, var = batch_statistics(x)
    return torch.linalg.vector_norm(mean - running_mean) + torch.linalg.vector_norm(var - running_var)


def weighted_sum(terms: list[torch.Tensor], first_weight: float = 1.0, mean: bool = False) -> torch.Tensor:
    """``first_weight * terms[0] + sum(terms[1:])`` (the R_bn of recorded per-layer terms), divided by the
    number of terms if ``mean`` (per-layer normalised: a deep network's many BN layers do not outweigh a
    shallow one's few in a mixed zoo)."""
    total = torch.stack(terms).sum()
    if first_weight != 1:
        total = total + (first_weight - 1) * terms[0]
    return total / len(terms) if mean else total


class BNStatsHook:
    """Context manager recording :func:`bn_distance` at every BatchNorm layer of ``model``.

    Every forward pass inside the ``with`` block appends one term per BN call;
    :meth:`loss` sums them (R_bn) and :meth:`clear` forgets them.  The hooks are
    removed when the block exits, also when it exits by an exception, so a
    teacher is never left instrumented.

    Args:
        model: any module; its BatchNorm layers must track running statistics.

    Raises:
        ValueError: a BatchNorm layer has no running statistics (``track_running_stats=False``),
            so there is no target to match.
    """

    def __init__(self, model: nn.Module):
        self.layers = [m for m in model.modules() if isinstance(m, _BatchNorm)]
        for m in self.layers:
            if m.running_mean is None or m.running_var is None:
                raise ValueError(f"{m} has no running statistics (track_running_stats=False); "
                                 "R_bn needs a model trained with tracked BN statistics")
        self.terms: list[torch.Tensor] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._device = next(model.parameters(), torch.empty(0)).device

    def _record(self, module: _BatchNorm, inputs: tuple[torch.Tensor, ...]) -> None:
        self.terms.append(bn_distance(inputs[0], module.running_mean, module.running_var))

    def __enter__(self) -> "BNStatsHook":
        self.clear()
        self._handles = [m.register_forward_pre_hook(self._record) for m in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def loss(self, first_weight: float = 1.0, mean: bool = False) -> torch.Tensor:
        """R_bn: the sum of the recorded terms (a 0-dim tensor; zero for a model without BN).

        ``first_weight`` multiplies the first layer's term (DeepInversion's first-BN
        multiplier: the first layer's statistics are those of the image itself);
        ``mean`` divides by the number of layers (see :func:`weighted_sum`)."""
        return weighted_sum(self.terms, first_weight, mean) if self.terms else torch.zeros((), device=self._device)

    def clear(self) -> None:
        self.terms = []
