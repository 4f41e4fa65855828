"""Decode once: image sets decoded from disk, cached as uint8 tensors for every later load.

Every reader of image files (class folders, CIFAR-FS, MiniImageNet, CUB: see
:func:`purer.data.folders.load_image_files`) asks here before decoding, so a
MiniImageNet-sized split is decoded once, and the run and its baselines worker
(another process) read the same tensor back.

The key is the decoder's version, Pillow's version, the colour mode, the image
size and every file's absolute path, byte size and modification time: touching,
replacing, adding or removing a file decodes the set again.  Entries live in
``$PURER_DECODED_CACHE`` if set, else ``$PURER_DATA_ROOT/decoded``, else
``~/.cache/purer/decoded``, one ``<key>.safetensors`` per set, and are never
deleted by purer (remove the folder to reclaim the space).  A cache that cannot
be written (read-only, full) gives one warning and the images are decoded as
before; an unreadable entry is decoded again and replaced.

Example:
    >>> key = cache_key(files, "RGB", 84)                       # doctest: +SKIP
    >>> images = read(key, len(files), 3)                       # doctest: +SKIP
    >>> if images is None:                                      # doctest: +SKIP
    ...     images = decode(files)                              # [M, 3, 84, 84] uint8
    ...     write(key, images)
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import PIL
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import PurerWarning

# Bump when decoding changes its output (resampling, alpha handling): old entries are then never read.
DECODE_VERSION = 1


def cache_dir() -> Path:
    """``$PURER_DECODED_CACHE``, else ``$PURER_DATA_ROOT/decoded``, else ``~/.cache/purer/decoded``."""
    if os.environ.get("PURER_DECODED_CACHE"):
        return Path(os.environ["PURER_DECODED_CACHE"])
    return Path(os.environ.get("PURER_DATA_ROOT") or Path.home() / ".cache" / "purer") / "decoded"


def cache_key(files: Sequence[Path], mode: str, image_size: int | None) -> str:
    """The hex key of decoding ``files`` in Pillow ``mode`` at ``image_size`` (``None``: the files' own size).

    Raises:
        FileNotFoundError: a file does not exist.
    """
    stats = []
    for f in files:
        path = Path(f).resolve()
        st = path.stat()
        stats.append((str(path), st.st_size, st.st_mtime_ns))
    text = json.dumps([DECODE_VERSION, PIL.__version__, mode, image_size, stats])
    return hashlib.sha256(text.encode()).hexdigest()


def read(key: str, count: int, channels: int) -> torch.Tensor | None:
    """The cached ``[count, channels, H, W]`` uint8 images of ``key``, or ``None`` (not cached, or unreadable)."""
    path = cache_dir() / f"{key}.safetensors"
    if not path.is_file():
        return None
    try:
        images = load_file(str(path))["images"]
    except (SafetensorError, OSError, KeyError):
        return None
    if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[:2]) != (count, channels):
        return None
    return images


def write(key: str, images: torch.Tensor) -> None:
    """Store ``images`` under ``key`` (atomically: a concurrent reader sees all of it or nothing); warn if the
    cache cannot be written."""
    folder = cache_dir()
    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key[:16]}-", suffix=".tmp", dir=folder)
        os.close(fd)
        save_file({"images": images.contiguous()}, tmp)
        mask = os.umask(0o022)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # as any new file, not safetensors' 0600
        os.replace(tmp, folder / f"{key}.safetensors")
    except (OSError, SafetensorError) as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        warnings.warn(f"cannot write the decoded-image cache at {folder} ({' '.join(str(e).split())}); images are "
                      "decoded on every load (set $PURER_DECODED_CACHE to a writable folder)", PurerWarning,
                      stacklevel=3)
