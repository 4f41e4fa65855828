"""BatchNorm in one place: batch statistics, batch-statistics-only networks, and networks frozen at a batch.

Three parts of PURER look at a BatchNorm layer's batch statistics (the per-channel mean
and biased variance of its *input* over every dimension but the channels):

* R_bn (:mod:`purer.inversion.hooks`) compares them with a teacher's running statistics;
* the meta-learners (:mod:`purer.meta`) normalise with them, as is standard for MAML
  (:func:`batch_stats_only`; :func:`explicit_batch_norm` for second-order MAML under ``vmap``);
* ICFIL (:mod:`purer.calibrate.icfil`) freezes an adapted network at the real support's
  statistics (:func:`freeze_at`), so that inverting it matches them.

All three go through :func:`batch_statistics`.

Example:
    >>> x = torch.randn(8, 4, 5, 5)
    >>> mean, var = batch_statistics(x)
    >>> torch.allclose(var, x.var(dim=(0, 2, 3), unbiased=False), atol=1e-6)
    True
"""
from __future__ import annotations

import contextlib
import copy
import types
from typing import Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def _channels_last(x: torch.Tensor) -> bool:
    try:
        return x.is_contiguous(memory_format=torch.channels_last)
    except RuntimeError:  # under vmap (batched teachers or tasks), where the layout cannot be asked: not ours
        return False


class _BatchStatistics(torch.autograd.Function):
    """Per-channel mean and biased variance of ``[B, C, *]`` over all but ``C``, with a one-pass backward.

    The gradient of any loss of (mean, var) with respect to the input is, per
    channel, an affine function of the input, ``dL/dx = g_mean / n + 2 g_var (x - mean) / n``,
    so the backward is a single ``addcmul`` over the activation, in the activation's own
    memory layout (autograd's generic backward of the two means takes about six
    passes, and in the channels-last layout of a CPU run their gradient, added to the
    BatchNorm layer's own, went through a slow mixed-layout path: about 4x slower here).
    The backward is itself made of differentiable operations, so second derivatives
    (second-order MAML through batch-statistics BatchNorm) are exact.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Two plain means rather than torch.var_mean: the same biased variance, 7x faster on a CPU.
        if x.ndim == 4 and _channels_last(x):
            flat = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])  # a view: [B*H*W, C], channels innermost
            mean = flat.mean(0)
            return mean, (flat - mean).square_().mean(0)
        dims = [0, *range(2, x.ndim)]
        mean = x.mean(dims)
        return mean, (x - mean.view(1, -1, *[1] * (x.ndim - 2))).square().mean(dims)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0], output[0])

    @staticmethod
    def backward(ctx, g_mean: torch.Tensor | None, g_var: torch.Tensor | None) -> torch.Tensor:
        x, mean = ctx.saved_tensors
        n = x.numel() // mean.numel()
        g_mean = torch.zeros_like(mean) if g_mean is None else g_mean
        g_var = torch.zeros_like(mean) if g_var is None else g_var
        scale = g_var * (2.0 / n)
        shape = [1, -1] + [1] * (x.ndim - 2)
        return torch.addcmul((g_mean / n - scale * mean).view(shape), x, scale.view(shape))


def batch_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, C, *]`` -> per-channel mean ``[C]`` and biased variance ``[C]`` over the batch and space."""
    if x.ndim < 2:
        raise ValueError(f"batch statistics need [B, C, ...] inputs, got shape {tuple(x.shape)}")
    return _BatchStatistics.apply(x)


def batch_stats_only(model: nn.Module) -> nn.Module:
    """Make every BatchNorm layer of ``model`` (in place) normalise with batch statistics.

    Standard MAML practice: the running statistics are dropped, so they are never
    used (train or eval mode) nor updated, and a functional call has no buffer
    side effects.
    """
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
    return model


def _explicit_batch_norm(module: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    shape = [1, -1] + [1] * (x.ndim - 2)
    mean, var = batch_statistics(x)
    y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + module.eps)
    return y * module.weight.view(shape) + module.bias.view(shape) if module.affine else y


@contextlib.contextmanager
def explicit_batch_norm(model: nn.Module) -> Iterator[None]:
    """Within the block, ``model``'s batch-statistics BatchNorm layers compute with plain tensor ops.

    Needed for second-order MAML under ``vmap``: there, torch's fused batch_norm gives
    wrong second derivatives (torch 2.14; the per-task loop and this form agree to
    1e-14 in float64, see tests/test_meta.py), while the plain ops' batching rules
    are exact.  The layers are the same computation (biased batch variance, ``eps``).
    """
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    if any(m.track_running_stats for m in layers):
        raise ValueError("explicit_batch_norm is for batch-statistics BatchNorm (see batch_stats_only)")
    for m in layers:
        m.forward = types.MethodType(_explicit_batch_norm, m)
    try:
        yield
    finally:
        for m in layers:
            del m.forward


@torch.no_grad()
def freeze_at(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """A frozen copy of ``model`` whose BatchNorm layers normalise with the statistics of the batch ``x``.

    Each BatchNorm layer of the copy gets, as running statistics, the batch mean and
    biased variance of its input when ``model`` (batch-statistics BatchNorm, in train
    or eval mode) runs on ``x``; in eval mode the copy then normalises every batch as
    ``x`` was normalised, and R_bn on it measures how far a batch's statistics lie from
    ``x``'s.  ICFIL inverts an adapted meta-learner frozen at the real support this way.

    Args:
        model: a network whose BatchNorm layers use batch statistics (e.g. a meta-learner's).
        x: ``[B, C, H, W]`` its input batch (already prepared).

    Returns:
        The copy, in eval mode, with ``requires_grad=False`` everywhere, on ``model``'s device.
    """
    net = copy.deepcopy(model)
    seen: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        seen[module] = batch_statistics(inputs[0])

    net.train(model.training)
    layers = [m for m in net.modules() if isinstance(m, _BatchNorm)]
    handles = [m.register_forward_pre_hook(record) for m in layers]
    try:
        net(x)
    finally:
        for h in handles:
            h.remove()
    for m, (mean, var) in seen.items():
        m.track_running_stats = True
        m.running_mean, m.running_var = mean.clone(), var.clone()
        m.num_batches_tracked = torch.ones((), dtype=torch.long, device=mean.device)
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()
