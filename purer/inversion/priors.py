"""Image priors of episode inversion: total variation (R_tv) and the L2 norm (R_l2).

Both follow the reference release: plain (not squared) L2 norms taken over the whole
batch, so the published coefficients (a_tv = 1e-4, a_l2 = 1e-5) keep their meaning.
Each prior is a function and an ``nn.Module``; the functions also take ``[T, B, C, H, W]``,
``T`` batches at once (one per teacher of an inversion step), and return ``[T]``.

Example:
    >>> x = torch.rand(2, 3, 8, 8)
    >>> total_variation(x).shape, l2_prior(x).shape
    (torch.Size([]), torch.Size([]))
    >>> bool(total_variation(torch.ones(2, 3, 8, 8)) == 0)
    True
"""
from __future__ import annotations

import torch
from torch import nn


def _check_images(x: torch.Tensor, name: str, min_side: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} expects a torch.Tensor, got {type(x).__name__}")
    if x.ndim not in (4, 5):
        raise ValueError(f"{name} expects images [B, C, H, W] or [T, B, C, H, W], got shape {tuple(x.shape)}")
    if x.shape[-2] < min_side or x.shape[-1] < min_side:
        raise ValueError(f"{name} needs images of at least {min_side}x{min_side} pixels, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} expects floating-point images, got dtype {x.dtype}")


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """R_tv: L2 norm of neighbour differences along rows, columns and both diagonals, summed.

    Args:
        x: ``[B, C, H, W]`` float images, ``H, W >= 2`` (or ``[T, B, C, H, W]``: T batches).

    Returns:
        A 0-dim tensor (``[T]``): ``sum_d ||x - shift_d(x)||_2`` over the four directions ``d``,
        each norm taken over the whole batch.
    """
    _check_images(x, "total_variation", 2)
    diffs = (
        x[..., :, 1:] - x[..., :, :-1],  # along rows (horizontal neighbours)
        x[..., 1:, :] - x[..., :-1, :],  # along columns
        x[..., 1:, 1:] - x[..., :-1, :-1],  # main diagonal
        x[..., 1:, :-1] - x[..., :-1, 1:],  # anti-diagonal
    )
    batch = (-4, -3, -2, -1)
    return sum(torch.linalg.vector_norm(d, dim=batch) for d in diffs)


def l2_prior(x: torch.Tensor) -> torch.Tensor:
    """R_l2: the L2 norm of the whole batch ``[B, C, H, W]`` (a 0-dim tensor; ``[T]`` for ``[T, B, C, H, W]``)."""
    _check_images(x, "l2_prior", 1)
    return torch.linalg.vector_norm(x, dim=(-4, -3, -2, -1))


class TotalVariation(nn.Module):
    """Module form of :func:`total_variation`: ``[B, C, H, W] -> []``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return total_variation(x)


class L2Prior(nn.Module):
    """Module form of :func:`l2_prior`: ``[B, C, H, W] -> []``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return l2_prior(x)
