"""The differentiable augmentation of episode inversion: one affine warp per image, one call per step.

A teacher classifies its bank images after a random shift (the release rolls by
+-2 px), a random square crop resized back to the bank size, and optionally a
horizontal flip.  All three are affine, so each image's augmentation is one
``2 x 3`` matrix and a whole inversion step (every sampled teacher's images) is
warped by one call, forward and backward.  The warp is axis-aligned, so it runs as
two small matrix products per image (:func:`purer.resample.affine_resample`), which
are deterministic on a GPU where ``grid_sample``'s backward is not.  The matrices are
drawn on the CPU from a generator the caller seeds (per step and teacher), so the
same draws happen on every device and in every process.

Example:
    >>> aug = RandomAffineAugment(jitter=2, crop_scale=(0.8, 1.0), image_size=32)
    >>> theta = aug.sample(8, torch.Generator().manual_seed(0))      # [8, 2, 3]
    >>> aug(torch.rand(8, 1, 32, 32), theta).shape
    torch.Size([8, 1, 32, 32])
"""
from __future__ import annotations

import torch
from torch import nn

from ..resample import affine_resample


class RandomAffineAugment(nn.Module):
    """Shift, square crop-and-resize and flip as one affine warp per image (``[B, C, S, S] -> [B, C, S, S]``).

    Args:
        jitter: the largest shift, in pixels of a side of ``image_size`` (uniform in ``[-jitter, jitter]``
            along each axis); pixels shifted in repeat the border (the release's roll wraps them around).
        crop_scale: area range of the square crop (uniform), placed uniformly where it fits;
            ``(1.0, 1.0)``: no crop.
        flip: mirror half of the images left-right.
        image_size: the side the jitter is measured in.

    The warp is bilinear; output pixel ``p`` (normalised coordinates) reads the
    input at ``side * (f * p_x, p_y) + centre - shift``.
    """

    def __init__(self, jitter: int, crop_scale: tuple[float, float], flip: bool, image_size: int):
        super().__init__()
        lo, hi = crop_scale
        if jitter < 0 or not 0 < lo <= hi <= 1:
            raise ValueError(f"need jitter >= 0 and 0 < crop_scale[0] <= crop_scale[1] <= 1, got {jitter}, "
                             f"{crop_scale}")
        self.jitter, self.crop_scale, self.flip, self.image_size = jitter, (lo, hi), flip, image_size

    @property
    def identity(self) -> bool:
        return self.jitter == 0 and self.crop_scale == (1.0, 1.0) and not self.flip

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` random affine matrices ``[n, 2, 3]`` (CPU, float32), drawn from ``generator``."""
        u = torch.rand(n, 6, generator=generator)
        lo, hi = self.crop_scale
        side = (lo + (hi - lo) * u[:, 0]).sqrt()  # crop side as a share of the image side
        centre = (1 - side)[:, None] * (2 * u[:, 1:3] - 1)
        shift = (2 * self.jitter / self.image_size) * (2 * u[:, 3:5] - 1)
        mirror = torch.where(u[:, 5] < 0.5, -1.0, 1.0) if self.flip else torch.ones(n)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = side * mirror
        theta[:, 1, 1] = side
        theta[:, :, 2] = centre - shift
        return theta

    def forward(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """Warp ``x [B, C, S, S]`` by ``theta [B, 2, 3]`` (on ``x``'s device), as ``grid_sample`` would with
        bilinear sampling, border padding and ``align_corners=False``."""
        if self.identity:
            return x
        if theta.shape != (x.shape[0], 2, 3):
            raise ValueError(f"theta must be [{x.shape[0]}, 2, 3] for {tuple(x.shape)} images, got {tuple(theta.shape)}")
        theta = theta.to(x.dtype)
        return affine_resample(x, torch.stack([theta[:, 0, 0], theta[:, 1, 1]], 1), theta[:, :, 2])
