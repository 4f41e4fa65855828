"""Decode once: a second load of the same files reads no image file and gives the same tensors; touching a file,
or another size, decodes again; another process reads the same entry; an unwritable cache only warns."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import purer.data.folders as folders
from purer import PurerWarning
from purer.data import load_split
from recipe_runs import REPO
from test_folders import make_cifar_fs_release, make_miniimagenet, make_tree, write_image


def folder_layout(root: Path) -> tuple[Path, Path]:
    for split in ("train", "val", "test"):
        make_tree(root / split, {f"{split}-a": 3, f"{split}-b": 2})
    return root, root / "train" / "train-a" / "000.png"


def cifar_fs_layout(root: Path) -> tuple[Path, Path]:
    make_cifar_fs_release(root)
    return root, root / "data" / "woman" / "000.png"


def miniimagenet_layout(root: Path) -> tuple[Path, Path]:
    make_miniimagenet(root)
    return root, next((root / "images").glob("n02*.jpg"))


def cub_layout(root: Path) -> tuple[Path, Path]:
    for i in range(200):
        write_image(root / "images" / f"{i + 1:03d}.Bird_{i}" / "0.jpg", size=(6, 5))
    return root, root / "images" / "001.Bird_0" / "0.jpg"


LAYOUTS = {"folder": folder_layout, "cifar_fs": cifar_fs_layout, "miniimagenet": miniimagenet_layout,
           "cub": cub_layout}


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("PURER_DECODED_CACHE", str(tmp_path / "decoded"))
    return tmp_path / "decoded"


@pytest.fixture
def opened(monkeypatch) -> list[Path]:
    """Every image file Pillow opens from now on."""
    calls, real = [], Image.open

    def counting(path, *args, **kwargs):
        calls.append(Path(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(folders.Image, "open", counting)
    return calls


def no_image_opens(monkeypatch) -> None:
    def fails(path, *args, **kwargs):
        raise AssertionError(f"decoded {path} again")

    monkeypatch.setattr(folders.Image, "open", fails)


@pytest.mark.parametrize("dataset", list(LAYOUTS))
def test_a_second_load_reads_no_image_file_and_touching_one_decodes_again(dataset, tmp_path, cache, opened,
                                                                          monkeypatch):
    root, some_file = LAYOUTS[dataset](tmp_path / dataset)
    first = load_split(dataset, "train", root, image_size=8)
    assert len(opened) == len(first.images) and len(list(cache.iterdir())) == 1
    with monkeypatch.context() as m:
        no_image_opens(m)
        again = load_split(dataset, "train", root, image_size=8)
    assert torch.equal(again.images, first.images) and torch.equal(again.labels, first.labels)
    assert again.class_names == first.class_names

    opened.clear()
    load_split(dataset, "train", root, image_size=10)  # another size is another entry
    assert len(opened) == len(first.images)
    st = some_file.stat()
    os.utime(some_file, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # `touch`
    opened.clear()
    touched = load_split(dataset, "train", root, image_size=8)
    assert len(opened) == len(first.images) and torch.equal(touched.images, first.images)


def test_a_replaced_file_of_another_size_decodes_again(tmp_path, cache):
    root, some_file = folder_layout(tmp_path / "data")
    before = load_split("folder", "train", root, image_size=8).images
    mtime = some_file.stat().st_mtime_ns
    Image.new("RGB", (8, 8), (255, 255, 255)).save(some_file, format="BMP")  # other bytes, another size
    os.utime(some_file, ns=(mtime, mtime))  # even with the old modification time
    after = load_split("folder", "train", root, image_size=8).images
    assert not torch.equal(after, before) and bool((after[0] == 255).all())


def test_another_process_reads_the_same_entry(tmp_path, cache):
    root, _ = miniimagenet_layout(tmp_path / "mini")
    expected = load_split("miniimagenet", "test", root, image_size=8).images
    code = ("import sys, torch; from PIL import Image\n"
            "def fails(*a, **k): raise SystemExit('decoded again')\n"
            "Image.open = fails\n"
            f"from purer.data import load_split\n"
            f"images = load_split('miniimagenet', 'test', {str(root)!r}, image_size=8).images\n"
            f"torch.save(images, {str(tmp_path / 'seen.pt')!r})\n")
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert torch.equal(torch.load(tmp_path / "seen.pt"), expected)


def test_an_unwritable_cache_only_warns(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("PURER_DECODED_CACHE", str(tmp_path / "a-file" / "decoded"))
    root, _ = folder_layout(tmp_path / "data")
    with pytest.warns(PurerWarning, match="cannot write the decoded-image cache at .*PURER_DECODED_CACHE"):
        data = load_split("folder", "val", root, image_size=8)
    assert data.images.shape == (5, 3, 8, 8)


def test_a_corrupt_entry_is_decoded_again(tmp_path, cache, opened):
    root, _ = folder_layout(tmp_path / "data")
    first = load_split("folder", "test", root, image_size=8).images
    (entry,) = cache.iterdir()
    entry.write_bytes(b"truncated")
    opened.clear()
    assert torch.equal(load_split("folder", "test", root, image_size=8).images, first) and opened
    assert load_split("folder", "test", root, image_size=8).images.shape == first.shape


def test_the_default_place_is_under_the_data_root(tmp_path, monkeypatch):
    from purer.data.decoded import cache_dir

    monkeypatch.delenv("PURER_DECODED_CACHE", raising=False)
    monkeypatch.setenv("PURER_DATA_ROOT", str(tmp_path))
    assert cache_dir() == tmp_path / "decoded"
    monkeypatch.delenv("PURER_DATA_ROOT")
    assert cache_dir() == Path.home() / ".cache" / "purer" / "decoded"
