"""PNG grids of what the inversion synthesised: the bank (a row per class) and pseudo episodes.

Example:
    >>> save_bank_grid(bank, "bank.png", classes=range(10))      # doctest: +SKIP
    >>> save_episode_grid(bank.episode(spec), "episode.png")     # doctest: +SKIP
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from einops import rearrange
from PIL import Image

from ..data.episodes import Episode
from .bank import PseudoBank


def image_grid(images: torch.Tensor, pad: int = 1, scale: int = 1, pad_value: float = 1.0) -> torch.Tensor:
    """Tile ``[R, K, C, H, W]`` images in ``[0, 1]`` into one picture ``[C, R*(H+pad)+pad, K*(W+pad)+pad]``.

    Row ``r`` shows ``images[r]``; ``scale`` enlarges every pixel (nearest) so tiny
    images stay visible; cells are separated by ``pad`` pixels of ``pad_value``.
    """
    if images.ndim != 5:
        raise ValueError(f"image_grid expects [rows, columns, C, H, W], got shape {tuple(images.shape)}")
    x = images.detach().float().clamp(0, 1).cpu()
    if scale > 1:
        x = x.repeat_interleave(scale, -2).repeat_interleave(scale, -1)
    rows, cols, c, h, w = x.shape
    canvas = torch.full((rows, cols, c, h + pad, w + pad), pad_value)
    canvas[..., pad:, pad:] = x
    grid = rearrange(canvas, "r k c h w -> c (r h) (k w)")
    out = torch.full((c, grid.shape[1] + pad, grid.shape[2] + pad), pad_value)
    out[:, :-pad or None, :-pad or None] = grid
    return out


def save_image(image: torch.Tensor, path: str | Path) -> Path:
    """Write ``[C, H, W]`` in ``[0, 1]`` (C = 1 or 3) as a PNG; returns the path."""
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"save_image expects [1 or 3, H, W], got shape {tuple(image.shape)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    array = rearrange(pixels, "c h w -> h w c").numpy()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(path)
    return path


def save_bank_grid(bank: PseudoBank, path: str | Path, classes: Sequence[int] | None = None,
                   images_per_class: int | None = None, scale: int = 2) -> Path:
    """PNG of the bank: one row per class (default all), ``images_per_class`` columns (default all)."""
    images = bank.snapshot(classes)
    return save_image(image_grid(images[:, :images_per_class], scale=scale), path)


def save_episode_grid(episode: Episode, path: str | Path, scale: int = 2) -> Path:
    """PNG of an episode: one row per label, the K support images, a blank column, the Q query images."""
    way = episode.way
    support = rearrange(episode.support_x, "(n k) c h w -> n k c h w", n=way)
    query = rearrange(episode.query_x, "(n q) c h w -> n q c h w", n=way)
    gap = torch.ones_like(support[:, :1])
    return save_image(image_grid(torch.cat([support.detach(), gap, query.detach()], 1), scale=scale), path)
