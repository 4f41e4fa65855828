"""PNG grids of what the inversion synthesised: the bank (a row per class) and pseudo episodes.

Pictures carry labels (class names, the teachers that know each class, support / query headers);
``labelled=False`` gives the bare pixel grid.

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

from .. import host
from ..data.episodes import Episode
from .bank import PseudoBank


def image_grid(images: torch.Tensor, pad: int = 1, scale: int = 1, pad_value: float = 1.0) -> torch.Tensor:
    """Tile ``[R, K, C, H, W]`` images in ``[0, 1]`` into one picture ``[C, R*(H+pad)+pad, K*(W+pad)+pad]``.

    Row ``r`` shows ``images[r]``; ``scale`` enlarges every pixel (nearest) so tiny
    images stay visible; cells are separated by ``pad`` pixels of ``pad_value``.
    """
    if images.ndim != 5:
        raise ValueError(f"image_grid expects [rows, columns, C, H, W], got shape {tuple(images.shape)}")
    x = host.read(images.detach().float().clamp(0, 1), "picture")
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


def class_labels(bank: PseudoBank, teacher_ids: Sequence[str] | None = None) -> list[str]:
    """A row label per bank class: its name and the teachers that know it (``teacher_ids[i]`` names teacher ``i``)."""
    if teacher_ids is None:
        return list(bank.class_names)
    return [f"{name} ({', '.join(teacher_ids[i] for i in bank.class_teachers[k])})"
            for k, name in enumerate(bank.class_names)]


def save_bank_grid(bank: PseudoBank, path: str | Path, classes: Sequence[int] | None = None,
                   images_per_class: int | None = None, scale: int = 2,
                   teacher_ids: Sequence[str] | None = None, labelled: bool = True) -> Path:
    """PNG of the bank: one row per class (default all), ``images_per_class`` columns (default all).

    ``labelled``: each row is headed by its class name and the teachers that know it (``teacher_ids``);
    otherwise the bare grid ``[C, rows * (S * scale + 1) + 1, columns * (S * scale + 1) + 1]``.
    """
    classes = list(range(bank.num_classes) if classes is None else classes)
    grid = image_grid(bank.snapshot(classes)[:, :images_per_class], scale=scale)
    if not labelled:
        return save_image(grid, path)
    names = class_labels(bank, teacher_ids)
    return _save_labelled(grid, path, [names[k] for k in classes], bank.image_size * scale, [])


def save_episode_grid(episode: Episode, path: str | Path, scale: int = 2, row_labels: Sequence[str] | None = None,
                      labelled: bool = True) -> Path:
    """PNG of an episode: one row per label, the K support images, a blank column, the Q query images.

    ``labelled``: "support" / "query" headers, and each row headed by ``row_labels`` (default: the
    episode's class names); otherwise the bare grid.
    """
    way = episode.way
    support = rearrange(episode.support_x, "(n k) c h w -> n k c h w", n=way)
    query = rearrange(episode.query_x, "(n q) c h w -> n q c h w", n=way)
    gap = torch.ones_like(support[:, :1])
    grid = image_grid(torch.cat([support.detach(), gap, query.detach()], 1), scale=scale)
    if not labelled:
        return save_image(grid, path)
    cell, k, q = episode.support_x.shape[-1] * scale + 1, support.shape[1], query.shape[1]
    headers = [(1 + cell * k / 2, "support"), (1 + cell * (k + 1 + q / 2), "query")]
    return _save_labelled(grid, path, list(row_labels or episode.classes), cell - 1, headers)


def _save_labelled(grid: torch.Tensor, path: str | Path, rows: Sequence[str], cell: int,
                   headers: Sequence[tuple[float, str]]) -> Path:
    """``grid`` ``[C, H, W]`` as a PNG with a text label left of each row of ``cell``-pixel images and
    ``headers`` ``(x, text)`` above it, the grid's pixels drawn one to one."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    c, h, w = grid.shape
    left, top, dpi = 7 * max(len(r) for r in rows) + 12, 18 if headers else 4, 100
    width, height = w + left, h + top
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi, facecolor="white")
    FigureCanvasAgg(fig)
    ax = fig.add_axes((left / width, 0, w / width, h / height))
    image = rearrange(grid.clamp(0, 1), "c h w -> h w c").numpy()
    ax.imshow(image[..., 0] if c == 1 else image, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    for r, text in enumerate(rows):
        ax.text(-4, 1 + r * (cell + 1) + cell / 2, text, ha="right", va="center", fontsize=8)
    for x, text in headers:
        ax.text(x, -3, text, ha="center", va="bottom", fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
