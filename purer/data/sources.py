"""One entry point for every real image source: ``load_split(dataset, split, ...)``.

Datasets: ``glyphs`` (built-in, rendered from matplotlib's fonts, cached),
``icons`` (the colour icon benchmark, built once from Debian icon themes by
``python -m purer.data.icons build``), ``folder`` (a class-per-folder tree),
``cifar_fs``, ``miniimagenet`` and ``cub`` (the standard few-shot layouts), all
read from disk, never downloaded.
"""
from __future__ import annotations

from pathlib import Path

from .episodes import SPLITS, ImageSet

DATASETS = ("glyphs", "icons", "folder", "cifar_fs", "miniimagenet", "cub")
#: The image size ``recipes/purer.py`` reads data at (``purer.pipeline.DataConfig.image_size``): Conv4
#: at 32 px ends in 2x2x32 = 128 features, at 28 px in only 32 (METHOD.md).
RECIPE_IMAGE_SIZE = 32


def load_split(dataset: str, split: str, root: str | Path | None = None, image_size: int | None = None) -> ImageSet:
    """The ``split`` ("train" | "val" | "test") of ``dataset`` as an :class:`ImageSet`.

    Args:
        dataset: one of :data:`DATASETS`.
        split: meta-train, meta-val or meta-test classes.
        root: where the data lies (for ``glyphs``: the cache directory, default
            ``$PURER_DATA_ROOT`` or ``~/.cache/purer``; for ``icons``: the built
            dataset, default ``$PURER_DATA_ROOT/icons`` or ``~/.cache/purer/icons``).
        image_size: resize to this square size (``None``: the dataset's default).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if dataset == "glyphs":
        from .glyphs import load_glyphs

        return load_glyphs(split, image_size=image_size or 28, data_root=root)
    if dataset == "icons":
        from .icons import load_icons

        return load_icons(split, root, image_size=image_size)
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
    if root is None:
        raise ValueError(f"dataset {dataset!r} needs a root path (where its files lie on disk)")
    from . import folders

    if dataset == "folder":
        return folders.load_split_folders(root, split, image_size=image_size)
    return getattr(folders, f"load_{dataset}")(root, split, image_size=image_size)
