"""Readers of users' datasets on disk: each layout fabricated in tmp_path with tiny images."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from purer.data import folders, load_split
from purer.data.folders import (
    cub_split_classes,
    load_class_folders,
    load_cifar_fs,
    load_cub,
    load_miniimagenet,
    load_split_folders,
)


def write_image(path: Path, color=(10, 20, 30), size=(8, 8), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG"}.get(path.suffix.lower())
    Image.new(mode, size, color).save(path, format=fmt)
    return path


def make_tree(root: Path, sizes: dict[str, int], ext=".png", size=(8, 8)) -> Path:
    for k, (cls, n) in enumerate(sizes.items()):
        for i in range(n):
            write_image(root / cls / f"{i:03d}{ext}", color=(k * 40, i * 10, 200), size=size)
    return root


# ----------------------------------------------------------------------------- class folders

def test_class_folders_classes_counts_and_pixels(tmp_path):
    root = make_tree(tmp_path / "set", {"zebra": 2, "ant": 3, "moth": 1})
    write_image(root / "ant" / "extra.JPEG")  # upper-case extension counts
    write_image(root / "ant" / ".hidden.png")
    (root / "ant" / "notes.txt").write_text("not an image")
    make_tree(root / ".cache", {"x": 1})
    make_tree(root, {"__MACOSX": 1})
    (root / "README.md").write_text("top-level files are not classes")

    s = load_class_folders(root)
    assert s.class_names == ["ant", "moth", "zebra"]
    assert s.class_sizes() == [4, 1, 2]
    assert s.images.shape == (7, 3, 8, 8) and s.images.dtype == torch.uint8
    assert s.name == "set"
    # zebra was written first (k=0), its second image (i=1) has colour (0, 10, 200); files sort by name.
    zebra_second = s.images[s.members(2)[1]]
    assert zebra_second[:, 0, 0].tolist() == [0, 10, 200]
    assert (zebra_second == zebra_second[:, :1, :1]).all()


def test_class_folders_resize_grayscale_and_name(tmp_path):
    root = make_tree(tmp_path / "set", {"a": 2, "b": 2}, size=(16, 12))
    s = load_class_folders(root, image_size=8, channels=1, name="mine")
    assert s.images.shape == (4, 1, 8, 8)
    assert s.name == "mine"
    with pytest.raises(ValueError, match="channels must be 1"):
        load_class_folders(root, channels=2)


def test_transparent_pixels_become_white(tmp_path):
    root = tmp_path / "icons"
    write_image(root / "a" / "0.png", color=(0, 0, 0, 0), mode="RGBA")
    write_image(root / "a" / "1.png", color=(255, 0, 0, 255), mode="RGBA")
    palette = Image.new("P", (8, 8), 0)  # index 0 transparent, index 1 red, as icon themes ship
    palette.putpalette([0, 0, 0, 255, 0, 0])
    palette.putpixel((1, 1), 1)
    palette.save(root / "a" / "2.png", transparency=0)
    s = load_class_folders(root)
    assert s.images[0, :, 0, 0].tolist() == [255, 255, 255]
    assert s.images[1, :, 0, 0].tolist() == [255, 0, 0]
    assert s.images[2, :, 0, 0].tolist() == [255, 255, 255] and s.images[2, :, 1, 1].tolist() == [255, 0, 0]


def test_progress_bar_for_many_files(tmp_path, monkeypatch, capsys):
    root = make_tree(tmp_path / "set", {"a": 3})
    load_class_folders(root)
    assert "reading" not in capsys.readouterr().err
    monkeypatch.setattr(folders, "_PROGRESS_MIN_FILES", 3)
    load_class_folders(root, image_size=4)  # another size: decoded, not read from the cache
    assert "reading set" in capsys.readouterr().err
    load_class_folders(root, image_size=4)
    assert "reading" not in capsys.readouterr().err  # read back from the cache: nothing to show


def test_mixed_sizes_need_image_size(tmp_path):
    root = tmp_path / "set"
    write_image(root / "a" / "0.png", size=(8, 8))
    write_image(root / "b" / "0.png", size=(16, 8))
    with pytest.raises(ValueError, match=r"b/0\.png is 16x8.*image_size"):
        load_class_folders(root)
    assert load_class_folders(root, image_size=8).images.shape == (2, 3, 8, 8)


def test_class_folders_bad_inputs(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"{missing}.*<class>/<image files>"):
        load_class_folders(missing)
    (tmp_path / "flat").mkdir()
    write_image(tmp_path / "flat" / "0.png")
    with pytest.raises(ValueError, match="no class folders in .*flat"):
        load_class_folders(tmp_path / "flat")
    root = make_tree(tmp_path / "set", {"a": 2})
    (root / "empty").mkdir()
    (root / "empty" / "readme.txt").write_text("")
    with pytest.raises(ValueError, match=r"class folder .*empty has no image files"):
        load_class_folders(root)


def test_corrupt_image_is_named(tmp_path):
    root = make_tree(tmp_path / "set", {"a": 2})
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ValueError, match=r"cannot read image .*a/broken\.png"):
        load_class_folders(root)
    good = write_image(root / "b" / "0.jpg")
    (root / "a" / "broken.png").write_bytes(good.read_bytes()[:40])  # a truncated JPEG
    with pytest.raises(ValueError, match=r"cannot read image .*a/broken\.png"):
        load_class_folders(root)

    with pytest.raises(FileNotFoundError, match="gone.png"):
        folders.load_image_files([root / "a" / "gone.png"], [0], ["a"])


# ----------------------------------------------------------------------------- split folders

@pytest.mark.parametrize("names", [("train", "val", "test"), ("meta-train", "validation", "meta-test"),
                                   ("meta_train", "meta-val", "test")])
def test_split_folders_accepts_aliases(tmp_path, names):
    for folder, classes in zip(names, (["a", "b", "c"], ["d"], ["e", "f"])):
        make_tree(tmp_path / "ds" / folder, {c: 2 for c in classes}, ext=".jpg")
    for split, classes in zip(("train", "val", "test"), (["a", "b", "c"], ["d"], ["e", "f"])):
        s = load_split_folders(tmp_path / "ds", split)
        assert s.class_names == classes and s.images.shape == (2 * len(classes), 3, 8, 8)
        assert s.name == f"ds/{split}"


def test_split_folders_bad_inputs(tmp_path):
    root = make_tree(tmp_path / "ds" / "train", {"a": 1}).parent
    with pytest.raises(FileNotFoundError, match=r"no test split in .*ds: expected .*ds/test/<class>"):
        load_split_folders(root, "test")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        load_split_folders(root, "dev")
    make_tree(root / "val", {"b": 1})
    make_tree(root / "validation", {"b": 1})
    with pytest.raises(ValueError, match="ambiguous val split .*both val/ and validation/"):
        load_split_folders(root, "val")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_split_folders(tmp_path / "nowhere", "train")


def test_load_split_dispatches_to_folder_reader(tmp_path):
    make_tree(tmp_path / "ds" / "val", {"a": 2, "b": 3}, size=(12, 12))
    s = load_split("folder", "val", root=tmp_path / "ds", image_size=8)
    assert s.class_sizes() == [2, 3] and s.image_shape == (3, 8, 8)


# ----------------------------------------------------------------------------- CIFAR-FS

def make_cifar_fs_release(root: Path) -> dict[str, list[str]]:
    splits = {"train": ["woman", "apple", "bee"], "val": ["cloud"], "test": ["tank", "lion"]}
    make_tree(root / "data", {c: 3 for cs in splits.values() for c in cs})
    for split, classes in splits.items():
        f = root / "splits" / "bertinetto" / f"{split}.txt"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("\n".join(classes) + "\n\n")  # trailing blank lines are common
    return splits


def test_cifar_fs_release_layout(tmp_path):
    splits = make_cifar_fs_release(tmp_path / "cifar100")
    for split, classes in splits.items():
        s = load_cifar_fs(tmp_path / "cifar100", split, image_size=8)
        assert s.class_names == classes  # the split file's order
        assert s.class_sizes() == [3] * len(classes)
        assert s.name == f"cifar_fs/{split}"
    default = load_split("cifar_fs", "test", root=tmp_path / "cifar100")
    assert default.images.shape == (6, 3, 32, 32) and default.images.dtype == torch.uint8


def test_cifar_fs_pre_split_layout(tmp_path):
    make_tree(tmp_path / "cfs" / "train", {"a": 2, "b": 2}, size=(32, 32))
    make_tree(tmp_path / "cfs" / "test", {"c": 2}, size=(32, 32))
    s = load_cifar_fs(tmp_path / "cfs", "train")
    assert s.class_names == ["a", "b"] and s.images.shape == (4, 3, 32, 32)
    assert s.name == "cifar_fs/train"
    with pytest.raises(FileNotFoundError, match="no val split"):
        load_cifar_fs(tmp_path / "cfs", "val")


def test_cifar_fs_bad_inputs(tmp_path):
    root = tmp_path / "cifar100"
    with pytest.raises(FileNotFoundError, match=r"no CIFAR-FS at .*cifar100: expected .*data/<class>/\*\.png and "
                                                r".*splits/bertinetto/\{train,val,test\}\.txt"):
        load_cifar_fs(root, "train")
    root.mkdir()
    (root / "misc").mkdir()
    with pytest.raises(FileNotFoundError, match="no CIFAR-FS at"):
        load_cifar_fs(root, "train")
    make_cifar_fs_release(root)
    (root / "splits" / "bertinetto" / "val.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"split file .*bertinetto/val\.txt not found"):
        load_cifar_fs(root, "val")
    (root / "splits" / "bertinetto" / "test.txt").write_text("tank\nunicorn\n")
    with pytest.raises(FileNotFoundError, match=r"class 'unicorn' listed in .*test\.txt has no folder .*data/unicorn"):
        load_cifar_fs(root, "test")
    (root / "splits" / "bertinetto" / "test.txt").write_text("tank\ntank\n")
    with pytest.raises(ValueError, match="lists class 'tank' twice"):
        load_cifar_fs(root, "test")


# ----------------------------------------------------------------------------- MiniImageNet

def make_miniimagenet(root: Path, csv_dir: str = "", nested: bool = False) -> dict[str, list[str]]:
    splits = {"train": ["n02", "n01"], "val": ["n03"], "test": ["n04", "n05"]}
    for split, classes in splits.items():
        rows = ["filename,label"]
        for k, wnid in enumerate(classes):
            for i in range(k + 2):
                name = f"{wnid}{i:08d}.jpg"
                write_image(root / "images" / (wnid if nested else "") / name, size=(10, 10))
                rows.append(f"{name},{wnid}")
        f = root / csv_dir / f"{split}.csv"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("\n".join(rows) + "\n")
    return splits


@pytest.mark.parametrize("csv_dir,nested", [("", False), ("split", False), ("splits", True)])
def test_miniimagenet_layouts(tmp_path, csv_dir, nested):
    splits = make_miniimagenet(tmp_path / "mini", csv_dir, nested)
    for split, classes in splits.items():
        s = load_miniimagenet(tmp_path / "mini", split, image_size=8)
        assert s.class_names == classes  # order of first appearance in the CSV
        assert s.class_sizes() == [k + 2 for k in range(len(classes))]
        assert s.images.shape == (sum(s.class_sizes()), 3, 8, 8)
    assert load_split("miniimagenet", "val", root=tmp_path / "mini").image_shape == (3, 84, 84)


def test_miniimagenet_bad_inputs(tmp_path):
    root = tmp_path / "mini"
    with pytest.raises(FileNotFoundError, match=r"no MiniImageNet at .*mini: expected .*images/\*\.jpg"):
        load_miniimagenet(root, "train")
    make_miniimagenet(root)
    (root / "test.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"test\.csv \(header filename,label\) in .*mini/, .*split/"):
        load_miniimagenet(root, "test")
    (root / "val.csv").write_text("name,class\nx.jpg,n03\n")
    with pytest.raises(ValueError, match=r"val\.csv must start with the header 'filename,label'"):
        load_miniimagenet(root, "val")
    (root / "val.csv").write_text("filename,label\nn0300000000.jpg,n03\nmissing.jpg,n03\n")
    with pytest.raises(FileNotFoundError, match=r"image 'missing\.jpg' \(class n03\) listed in .*val\.csv"):
        load_miniimagenet(root, "val")


# ----------------------------------------------------------------------------- CUB

@pytest.fixture(scope="module")
def cub_root(tmp_path_factory) -> Path:
    parent = tmp_path_factory.mktemp("cub")
    for i in range(200):
        # Image count encodes the class index parity so that the split mapping is visible in class_sizes.
        for j in range(1 + i % 4):
            write_image(parent / "CUB_200_2011" / "images" / f"{i + 1:03d}.Bird_{i}" / f"Bird_{i}_{j}.jpg",
                        size=(12, 9))
    return parent


def test_cub_split_mapping():
    train, val, test = (cub_split_classes(s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (100, 50, 50)
    assert train[:3] == [0, 2, 4] and val[:3] == [1, 5, 9] and test[:3] == [3, 7, 11]
    assert sorted(train + val + test) == list(range(200))


def test_cub_layout_and_split(cub_root):
    for root in (cub_root, cub_root / "CUB_200_2011"):
        s = load_cub(root, "val", image_size=8)
        assert len(s.class_names) == 50 and s.class_names[:2] == ["002.Bird_1", "006.Bird_5"]
        assert s.class_sizes() == [2] * 50  # classes i % 4 == 1 hold 2 images
        assert s.images.shape == (100, 3, 8, 8) and s.name == "cub/val"
    test = load_split("cub", "test", root=cub_root)
    assert test.class_sizes() == [4] * 50 and test.image_shape == (3, 84, 84)
    assert load_cub(cub_root, "train", image_size=8).class_sizes() == [1, 3] * 50


def test_cub_bad_inputs(tmp_path, cub_root):
    with pytest.raises(FileNotFoundError, match=r"no CUB-200-2011 at .*: expected .*images/<NNN\.Class_Name>"):
        load_cub(tmp_path, "train")
    make_tree(tmp_path / "images", {"001.A": 1, "002.B": 1})
    with pytest.raises(ValueError, match="has 2 class folders, expected the 200"):
        load_cub(tmp_path, "train")
    with pytest.raises(ValueError, match="unknown split"):
        load_cub(cub_root, "novel")
