"""Readers for users' image datasets on disk: class-per-folder trees and the standard
few-shot layouts (CIFAR-FS, MiniImageNet, CUB-200-2011).

Every reader decodes the images with Pillow once (later loads read the decoded
set back from :mod:`purer.data.decoded`'s cache) and returns an in-memory
:class:`~purer.data.ImageSet` (``[M, C, H, W]`` uint8).  Nothing is downloaded: a
missing or malformed dataset raises ``FileNotFoundError`` / ``ValueError`` naming
the path and the layout that was expected there.

Layouts (``<split>`` is ``train`` | ``val`` | ``test``):

=================  ==============================================================
class folders      ``root/<class>/<image files>``
split folders      ``root/<split>/<class>/<image files>``; the split folder may
                   also be called ``meta-train`` / ``meta-val`` / ``meta-test``
                   (or ``meta_train`` ...), and ``val`` may be ``validation``
CIFAR-FS           ``root/data/<class>/*.png`` with
                   ``root/splits/bertinetto/<split>.txt`` (one class per line),
                   or a pre-split ``root/<split>/<class>/`` tree
MiniImageNet       ``root/images/*.jpg`` (or ``root/images/<label>/*.jpg``) with
                   ``<split>.csv`` (header ``filename,label``) in ``root/``,
                   ``root/split/`` or ``root/splits/``
CUB-200-2011       ``root/images/<NNN.Class_Name>/*.jpg``, ``root`` being
                   ``CUB_200_2011`` or its parent
=================  ==============================================================
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from einops import rearrange
from PIL import Image
from tqdm import tqdm

from . import decoded
from .episodes import SPLITS, ImageSet

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})
# Folder names that archivers and file browsers leave behind; never classes.
_JUNK_DIRS = frozenset({"__MACOSX"})
_PROGRESS_MIN_FILES = 1000

SPLIT_FOLDER_NAMES = {
    "train": ("train", "meta-train", "meta_train"),
    "val": ("val", "validation", "meta-val", "meta_val"),
    "test": ("test", "meta-test", "meta_test"),
}

CIFAR_FS_SIZE = 32
MINIIMAGENET_SIZE = 84
CUB_SIZE = 84
CUB_NUM_CLASSES = 200


# ----------------------------------------------------------------------------- decoding

def _is_visible(p: Path) -> bool:
    return not p.name.startswith(".") and p.name not in _JUNK_DIRS


def _class_dirs(root: Path) -> list[Path]:
    return sorted((d for d in root.iterdir() if d.is_dir() and _is_visible(d)), key=lambda d: d.name)


def _image_files(folder: Path) -> list[Path]:
    return sorted((f for f in folder.iterdir()
                   if f.is_file() and _is_visible(f) and f.suffix.lower() in IMAGE_EXTENSIONS),
                  key=lambda f: f.name)


def _pil_mode(channels: int) -> str:
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    return "L" if channels == 1 else "RGB"


def _decode(path: Path, mode: str, image_size: int | None) -> np.ndarray:
    """One image file as a ``[H, W, C]`` uint8 array in Pillow ``mode``."""
    try:
        with Image.open(path) as im:
            if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
                # Converting straight to RGB would expose whatever colour the encoder left
                # under transparent pixels (often black); icons are drawn to be seen on white.
                im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA"))
            im = im.convert(mode)
            if image_size is not None and im.size != (image_size, image_size):
                # Bilinear with Pillow's antialiasing: torchvision's default for PIL images,
                # which the few-shot reference pipelines resize with.
                im = im.resize((image_size, image_size), Image.Resampling.BILINEAR)
            arr = np.array(im)  # a writable copy, so torch.from_numpy may share it
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # Pillow reports corrupt or truncated files with any of these, none naming the file.
        raise ValueError(f"cannot read image {path}: {e}") from e
    return arr if arr.ndim == 3 else arr[:, :, None]


def load_image_files(files: Sequence[Path], labels: Sequence[int], class_names: Sequence[str],
                     image_size: int | None = None, channels: int = 3, name: str = "") -> ImageSet:
    """Decode ``files`` into an :class:`ImageSet` with ``labels[i]`` for ``files[i]`` (read back from the
    decoded-image cache when the same files were decoded at the same size before, see :mod:`purer.data.decoded`).

    Args:
        files: image paths, any format Pillow reads.
        labels: ``[M]`` class index of each file, into ``class_names``.
        class_names: the class names, ``class_names[label]``.
        image_size: resize every image to ``image_size x image_size`` (aspect ratio is
            not kept, as in the usual few-shot pipelines); ``None`` keeps the files'
            size, which must then be the same for all.
        channels: 3 (RGB) or 1 (grayscale).  Transparent pixels are composited on white.
        name: the set's name.

    Returns:
        An :class:`ImageSet` with ``images`` ``[M, channels, H, W]`` uint8.

    Raises:
        ValueError: for a file Pillow cannot decode (naming it), or for files of
            different sizes when ``image_size`` is ``None``.
    """
    if len(files) != len(labels):
        raise ValueError(f"{len(files)} files but {len(labels)} labels")
    if not files:
        raise ValueError(f"no image files for {name or 'the image set'}")
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    mode = _pil_mode(channels)
    key = decoded.cache_key(files, mode, image_size)
    images = decoded.read(key, len(files), channels)
    if images is None:
        images = _decode_files(files, mode, image_size, channels, name)
        decoded.write(key, images)
    return ImageSet(images, torch.as_tensor(list(labels), dtype=torch.long), class_names, name)


def _decode_files(files: Sequence[Path], mode: str, image_size: int | None, channels: int, name: str) -> torch.Tensor:
    """``[M, channels, H, W]`` uint8: every file decoded (see :func:`load_image_files`)."""
    images: torch.Tensor | None = None
    first = files[0]
    progress = tqdm(files, desc=f"reading {name}" if name else "reading images", unit="img",
                    disable=len(files) < _PROGRESS_MIN_FILES)
    for i, path in enumerate(progress):
        arr = _decode(Path(path), mode, image_size)
        if images is None:
            # Preallocated so that peak memory is one copy of the set, not a list plus a stack.
            images = torch.empty((len(files), channels, *arr.shape[:2]), dtype=torch.uint8)
        elif arr.shape[:2] != tuple(images.shape[2:]):
            raise ValueError(
                f"images differ in size: {path} is {arr.shape[1]}x{arr.shape[0]} but {first} is "
                f"{images.shape[3]}x{images.shape[2]} (width x height); pass image_size=... to resize them all")
        images[i] = torch.from_numpy(rearrange(arr, "h w c -> c h w"))
    return images


def _load_class_dirs(class_dirs: Sequence[Path], class_names: Sequence[str], image_size: int | None,
                     channels: int, name: str) -> ImageSet:
    files: list[Path] = []
    labels: list[int] = []
    for label, folder in enumerate(class_dirs):
        found = _image_files(folder)
        if not found:
            raise ValueError(f"class folder {folder} has no image files "
                             f"({', '.join(sorted(IMAGE_EXTENSIONS))}); remove it or add images")
        files += found
        labels += [label] * len(found)
    return load_image_files(files, labels, class_names, image_size, channels, name)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"no {what} at {path}")


# ----------------------------------------------------------------------------- generic trees

def load_class_folders(root: str | Path, image_size: int | None = None, channels: int = 3,
                       name: str | None = None) -> ImageSet:
    """A class-per-folder tree ``root/<class>/<image files>`` as an :class:`ImageSet`.

    Classes are the visible sub-folders of ``root``, sorted by name; images are the
    visible ``png/jpg/jpeg/bmp/gif/webp`` files (any case) directly inside each,
    sorted by name.  Other files and deeper folders are ignored.

    Args:
        root: the tree's top folder.
        image_size: resize to this square size; ``None`` keeps the size of the files,
            which must then all have one size.
        channels: 3 (RGB) or 1 (grayscale).
        name: the set's name (default: the folder's name).

    Returns:
        ``images`` ``[M, channels, H, W]`` uint8, ``labels`` ``[M]``, ``class_names``.

    Example:
        >>> s = load_class_folders("my_data/train", image_size=32)  # doctest: +SKIP
        >>> s.images.shape, s.class_names[:2]  # doctest: +SKIP
        (torch.Size([600, 3, 32, 32]), ['apple', 'bee'])
    """
    root = Path(root)
    layout = f"expected {root}/<class>/<image files>"
    _require_dir(root, f"class-per-folder dataset ({layout})")
    class_dirs = _class_dirs(root)
    if not class_dirs:
        raise ValueError(f"no class folders in {root}: {layout}")
    return _load_class_dirs(class_dirs, [d.name for d in class_dirs], image_size, channels,
                            root.name if name is None else name)


def _split_dir(root: Path, split: str) -> Path | None:
    """The folder of ``split`` under ``root`` under any of its accepted names, if exactly one exists."""
    found = [root / n for n in SPLIT_FOLDER_NAMES[split] if (root / n).is_dir()]
    if len(found) > 1:
        raise ValueError(f"ambiguous {split} split in {root}: both {found[0].name}/ and {found[1].name}/ exist; "
                         "keep one")
    return found[0] if found else None


def load_split_folders(root: str | Path, split: str, image_size: int | None = None) -> ImageSet:
    """The ``split`` of a tree ``root/{train,val,test}/<class>/<image files>``.

    The split folders may also be named ``meta-train`` / ``meta-val`` / ``meta-test``
    (or with ``_``), and ``val`` may be ``validation``.

    Args:
        root: the folder holding the split folders.
        split: ``"train"`` | ``"val"`` | ``"test"``.
        image_size: resize to this square size; ``None`` keeps the files' size.

    Returns:
        An RGB :class:`ImageSet` named ``"<root name>/<split>"``.
    """
    _check_split(split)
    root = Path(root)
    _require_dir(root, f"dataset (expected {root}/{{train,val,test}}/<class>/<image files>)")
    folder = _split_dir(root, split)
    if folder is None:
        raise FileNotFoundError(f"no {split} split in {root}: expected {root}/{split}/<class>/<image files> "
                                f"(also accepted: {', '.join(SPLIT_FOLDER_NAMES[split][1:])})")
    return load_class_folders(folder, image_size=image_size, name=f"{root.name}/{split}")


# ----------------------------------------------------------------------------- few-shot benchmarks

def _read_class_list(path: Path) -> list[str]:
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise ValueError(f"split file {path} lists no classes (expected one class name per line)")
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise ValueError(f"split file {path} lists class {n!r} twice")
        seen.add(n)
    return names


def load_cifar_fs(root: str | Path, split: str, image_size: int | None = CIFAR_FS_SIZE) -> ImageSet:
    """The ``split`` of CIFAR-FS (Bertinetto et al., ICLR 2019): 64 / 16 / 20 classes of CIFAR-100.

    Two layouts are detected:

    - the release: ``root/data/<class>/*.png`` and ``root/splits/bertinetto/<split>.txt``
      (one class per line; classes keep the file's order);
    - pre-split folders: ``root/<split>/<class>/*.png`` (see :func:`load_split_folders`).

    Args:
        root: the CIFAR-FS folder.
        split: ``"train"`` | ``"val"`` | ``"test"``.
        image_size: square size (``None``: 32, the native size).

    Returns:
        An RGB :class:`ImageSet` named ``"cifar_fs/<split>"``.
    """
    _check_split(split)
    root = Path(root)
    size = CIFAR_FS_SIZE if image_size is None else image_size
    layout = (f"expected {root}/data/<class>/*.png and {root}/splits/bertinetto/{{train,val,test}}.txt, "
              f"or {root}/{{train,val,test}}/<class>/*.png")
    if not root.is_dir():
        raise FileNotFoundError(f"no CIFAR-FS at {root}: {layout}")
    data = root / "data"
    if data.is_dir():
        split_file = root / "splits" / "bertinetto" / f"{split}.txt"
        if not split_file.is_file():
            raise FileNotFoundError(f"CIFAR-FS split file {split_file} not found: {layout}")
        names = _read_class_list(split_file)
        class_dirs = [data / n for n in names]
        for n, d in zip(names, class_dirs):
            if not d.is_dir():
                raise FileNotFoundError(f"class {n!r} listed in {split_file} has no folder {d}")
        return _load_class_dirs(class_dirs, names, size, 3, f"cifar_fs/{split}")
    if any(_split_dir(root, s) is not None for s in SPLITS):
        s = load_split_folders(root, split, image_size=size)
        s.name = f"cifar_fs/{split}"
        return s
    raise FileNotFoundError(f"no CIFAR-FS at {root}: {layout}")


def _find_split_csv(root: Path, split: str) -> Path:
    candidates = [root / f"{split}.csv", root / "split" / f"{split}.csv", root / "splits" / f"{split}.csv"]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(f"no MiniImageNet {split} split at {root}: expected {root}/images/*.jpg and "
                            f"{split}.csv (header filename,label) in {root}/, {root}/split/ or {root}/splits/")


def load_miniimagenet(root: str | Path, split: str, image_size: int | None = MINIIMAGENET_SIZE) -> ImageSet:
    """The ``split`` of MiniImageNet with Ravi & Larochelle's (ICLR 2017) 64 / 16 / 20 class split.

    Layout: the images in ``root/images/`` (flat, as in the usual release, or under
    ``root/images/<label>/``) and ``<split>.csv`` with the header ``filename,label``,
    looked for in ``root/``, then ``root/split/``, then ``root/splits/`` (the first
    found is used).  Classes keep the order in which the CSV first names them.

    Args:
        root: the MiniImageNet folder.
        split: ``"train"`` | ``"val"`` | ``"test"``.
        image_size: square size (``None``: 84, the usual size).

    Returns:
        An RGB :class:`ImageSet` named ``"miniimagenet/<split>"``.
    """
    _check_split(split)
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no MiniImageNet at {root}: expected {root}/images/*.jpg and "
                                f"{root}/{{train,val,test}}.csv (header filename,label)")
    csv_path = _find_split_csv(root, split)
    images_dir = root / "images"
    _require_dir(images_dir, f"MiniImageNet image folder (expected {images_dir}/*.jpg, listed by {csv_path})")
    with csv_path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"filename", "label"} <= set(reader.fieldnames):
            raise ValueError(f"{csv_path} must start with the header 'filename,label', got {reader.fieldnames}")
        rows = [(r["filename"].strip(), r["label"].strip()) for r in reader]
    if not rows:
        raise ValueError(f"{csv_path} lists no images")
    class_index: dict[str, int] = {}
    files: list[Path] = []
    labels: list[int] = []
    for filename, label in rows:
        flat, nested = images_dir / filename, images_dir / label / filename
        path = flat if flat.is_file() else nested
        if not path.is_file():
            raise FileNotFoundError(f"image {filename!r} (class {label}) listed in {csv_path} is neither "
                                    f"{flat} nor {nested}")
        files.append(path)
        labels.append(class_index.setdefault(label, len(class_index)))
    size = MINIIMAGENET_SIZE if image_size is None else image_size
    return load_image_files(files, labels, list(class_index), size, 3, f"miniimagenet/{split}")


def cub_split_classes(split: str, num_classes: int = CUB_NUM_CLASSES) -> list[int]:
    """Indices (into the name-sorted CUB class folders) of ``split``'s classes.

    The split of Chen et al., "A Closer Look at Few-shot Classification" (ICLR 2019),
    used by most few-shot papers on CUB: class ``i`` goes to train if ``i % 2 == 0``,
    to val if ``i % 4 == 1``, to test if ``i % 4 == 3`` (100 / 50 / 50 classes).
    """
    _check_split(split)
    keep = {"train": lambda i: i % 2 == 0, "val": lambda i: i % 4 == 1, "test": lambda i: i % 4 == 3}[split]
    return [i for i in range(num_classes) if keep(i)]


def load_cub(root: str | Path, split: str, image_size: int | None = CUB_SIZE) -> ImageSet:
    """The ``split`` of CUB-200-2011 with the class split of :func:`cub_split_classes`.

    Layout: ``root/images/<NNN.Class_Name>/*.jpg`` with all 200 class folders, where
    ``root`` is the ``CUB_200_2011`` folder or its parent.  Images are resized to a
    square without keeping the aspect ratio, as in the usual few-shot pipelines.

    Args:
        root: ``CUB_200_2011`` or the folder containing it.
        split: ``"train"`` | ``"val"`` | ``"test"``.
        image_size: square size (``None``: 84).

    Returns:
        An RGB :class:`ImageSet` named ``"cub/<split>"``; class names are the folder
        names (``"001.Black_footed_Albatross"`` ...).
    """
    _check_split(split)
    root = Path(root)
    images_dir = next((d for d in (root / "images", root / "CUB_200_2011" / "images") if d.is_dir()), None)
    if images_dir is None:
        raise FileNotFoundError(f"no CUB-200-2011 at {root}: expected {root}/images/<NNN.Class_Name>/*.jpg "
                                f"or {root}/CUB_200_2011/images/<NNN.Class_Name>/*.jpg")
    class_dirs = _class_dirs(images_dir)
    if len(class_dirs) != CUB_NUM_CLASSES:
        raise ValueError(f"{images_dir} has {len(class_dirs)} class folders, expected the {CUB_NUM_CLASSES} of "
                         "CUB-200-2011 (the standard split is defined on all of them)")
    chosen = [class_dirs[i] for i in cub_split_classes(split)]
    size = CUB_SIZE if image_size is None else image_size
    return _load_class_dirs(chosen, [d.name for d in chosen], size, 3, f"cub/{split}")
