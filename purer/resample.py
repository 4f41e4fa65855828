"""Bilinear resampling as two small matrix products: deterministic on every device, forward and backward.

``F.grid_sample`` and bilinear ``F.interpolate`` accumulate their gradients with
atomic additions on CUDA, so their backward differs from run to run and raises under
``torch.use_deterministic_algorithms(True)``.  The resamplings purer differentiates
through (the inversion's shift / crop / flip augmentation, and converting images to a
teacher's size) are separable: each output row reads two input rows and each output
column two input columns, with weights that depend on the row (column) alone.  So an
image ``X [H, W]`` resamples to ``Ry @ X @ Rx^T``, two matrix products whose backward
is two more: deterministic, and the same numbers as ``grid_sample`` (border padding) and
``interpolate`` (``align_corners=False``, no antialiasing) up to float rounding.

Example:
    >>> x = torch.rand(2, 3, 8, 8)
    >>> torch.allclose(resize(x, 5), F.interpolate(x, size=(5, 5), mode="bilinear", align_corners=False), atol=1e-6)
    True
"""
from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: F401 (the docstring's example)


def interpolation_matrix(source: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear weights ``[..., n, size]``: row ``j`` reads input positions ``source[..., j]`` (in pixels,
    clamped into ``[0, size - 1]``, the border padding) from the ``size`` input positions."""
    pos = source.clamp(0, size - 1)
    low = pos.floor()
    frac = pos - low
    low = low.long()
    high = (low + 1).clamp(max=size - 1)
    grid = torch.arange(size, device=source.device)
    return ((grid == low[..., None]) * (1 - frac)[..., None]
            + (grid == high[..., None]) * frac[..., None]).to(source.dtype)


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, C, size, size]``, as ``F.interpolate(mode="bilinear", align_corners=False)``."""
    h, w = x.shape[-2:]
    rows = interpolation_matrix(_centres(size, h / size, x), h)
    cols = interpolation_matrix(_centres(size, w / size, x), w)
    return torch.einsum("yh,bchw,xw->bcyx", rows, x, cols)


def _centres(n: int, scale: float, like: torch.Tensor) -> torch.Tensor:
    """Where the ``n`` output pixel centres fall in the input (pixels), ``interpolate``'s convention."""
    return ((torch.arange(n, device=like.device, dtype=like.dtype) + 0.5) * scale - 0.5).clamp(min=0)


def affine_resample(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Warp ``x [B, C, H, W]`` by axis-aligned affine maps, as ``grid_sample(affine_grid(theta))`` with bilinear
    sampling, border padding and ``align_corners=False`` for ``theta = [[scale_x, 0, shift_x], [0, scale_y,
    shift_y]]``.

    Args:
        scale: ``[B, 2]`` (x, y) scales of the normalised coordinates (negative: a mirror).
        shift: ``[B, 2]`` (x, y) shifts of the normalised coordinates.
    """
    h, w = x.shape[-2:]
    rows = interpolation_matrix(_sampled(h, scale[:, 1], shift[:, 1], x), h)  # [B, H, H]
    cols = interpolation_matrix(_sampled(w, scale[:, 0], shift[:, 0], x), w)  # [B, W, W]
    return torch.einsum("byh,bchw,bxw->bcyx", rows, x, cols)


def _sampled(n: int, scale: torch.Tensor, shift: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[B, n]``: the input position (pixels) each output pixel of a side of ``n`` reads."""
    out = (2 * torch.arange(n, device=like.device, dtype=like.dtype) + 1) / n - 1  # normalised pixel centres
    src = scale[:, None] * out + shift[:, None]
    return ((src + 1) * n - 1) / 2
