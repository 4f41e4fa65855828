"""The colour icon benchmark builder, on tiny icon themes fabricated in tmp_path.

Every source file is a solid colour of its own (unless a test needs a copy), so
the colour of an output image tells which file the builder chose.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from purer.data import load_split
from purer.data import icons
from purer.data.icons import build_icon_dataset, load_icons, read_icon_report, split_classes, theme_families

NAMES = ["a-one", "a-two", "b-one", "c-one", "d-one", "e-one", "f-one", "g-one", "h-one"]
_colours = iter(())


@pytest.fixture(autouse=True)
def fresh_colours():
    """The same colours in every test, whatever ran before."""
    global _colours
    _colours = iter(np.random.default_rng(0).integers(0, 200, size=(500, 3)).tolist())  # < 200: never white


def icon(path: Path, colour=None, size=8, rgba: np.ndarray | None = None) -> tuple[int, int, int]:
    """Write a solid-colour (or given RGBA) PNG; return its colour."""
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = tuple(next(_colours)) if colour is None else tuple(colour)
    if rgba is None:
        rgba = np.zeros((size, size, 4), np.uint8)
        rgba[..., :3], rgba[..., 3] = colour, 255
    Image.fromarray(rgba, "RGBA").save(path)
    return colour


def red_square_on_transparent(size=16) -> np.ndarray:
    rgba = np.zeros((size, size, 4), np.uint8)
    q = size // 4
    rgba[q:-q, q:-q] = (220, 0, 0, 255)
    return rgba


@pytest.fixture
def themes(tmp_path):
    """Four families (Alpha + Alpha-Dark, Beta, Gamma, Delta) in three directory layouts.

    Returns the theme root and the colour each family's ``name`` should end up with.
    """
    root = tmp_path / "themes"
    want: dict[tuple[str, str], tuple] = {}
    # Alpha: size-first layout; a-one also at 16 and 256 px; c-copy is a copied alias of c-one.
    for n in NAMES:
        if n != "g-one":
            want["Alpha", n] = icon(root / "Alpha" / "48x48" / "apps" / f"{n}.png")
    icon(root / "Alpha" / "16x16" / "apps" / "a-one.png")
    icon(root / "Alpha" / "256x256" / "apps" / "a-one.png")
    icon(root / "Alpha" / "48x48" / "apps" / "c-copy.png", want["Alpha", "c-one"])
    # Alpha-Dark: its a-one must lose to the base theme's; g-one exists only here.
    icon(root / "Alpha-Dark" / "48x48" / "apps" / "a-one.png")
    want["Alpha", "g-one"] = icon(root / "Alpha-Dark" / "48x48" / "apps" / "g-one.png")
    # Beta: context-first layout; b-one only at 32 and 64 px (the larger wins); a symlinked alias.
    for n in NAMES:
        if n != "b-one":
            want["Beta", n] = icon(root / "Beta" / "apps" / "48" / f"{n}.png")
    icon(root / "Beta" / "apps" / "32" / "b-one.png")
    want["Beta", "b-one"] = icon(root / "Beta" / "apps" / "64" / "b-one.png")
    os.symlink("a-one.png", root / "Beta" / "apps" / "48" / "a-alias.png")
    # Gamma: Numix-style layout; d-one copies Alpha's, e-one nearly, h-one copies Beta's.
    for n in NAMES:
        if n not in ("d-one", "e-one", "h-one"):
            want["Gamma", n] = icon(root / "Gamma" / "48" / "apps" / f"{n}.png")
    icon(root / "Gamma" / "48" / "apps" / "d-one.png", want["Alpha", "d-one"])
    icon(root / "Gamma" / "48" / "apps" / "e-one.png", np.add(want["Alpha", "e-one"], 2))
    icon(root / "Gamma" / "48" / "apps" / "h-one.png", want["Beta", "h-one"])
    # Delta: f-one drawn on transparency, g-one white (blank on white), no h-one, one rare name.
    for n in NAMES:
        if n not in ("f-one", "g-one", "h-one"):
            want["Delta", n] = icon(root / "Delta" / "scalable" / "apps" / f"{n}.png")
    icon(root / "Delta" / "scalable" / "apps" / "f-one.png", rgba=red_square_on_transparent())
    icon(root / "Delta" / "scalable" / "apps" / "g-one.png", (255, 255, 255))
    icon(root / "Delta" / "scalable" / "apps" / "rare-one.png")
    icon(root / "Delta" / "scalable" / "apps" / "g-one-symbolic.png")
    (root / "Delta" / "index.theme").write_text("[Icon Theme]\nName=Delta\n")
    return root, want


def build(root: Path, out: Path, **kw) -> icons.IconReport:
    return build_icon_dataset(root, out, **{"min_families": 3, "size": 8, **kw})


def read(out: Path, split: str, name: str, family: str) -> np.ndarray:
    return np.asarray(Image.open(out / split / name / f"{family}.png"))


def where(report: icons.IconReport, name: str) -> str:
    return next(s for s, names in report.splits.items() if name in names)


# ----------------------------------------------------------------------------- families

def test_theme_families_merge_variants_and_symlinked_themes(tmp_path):
    for name in ["Mint-Y", "Mint-Y-Aqua", "Mint-Y-Dark-Aqua", "Mint-Y-Dark", "Papirus-Dark", "Papirus-Light",
                 "Yaru-bark-dark", "Yaru", "Other", "gnome"]:
        (tmp_path / name).mkdir()
    os.symlink("Other", tmp_path / "Other-link")
    fams = theme_families(tmp_path)
    assert fams == {
        "gnome": ["gnome"],
        "Mint-Y": ["Mint-Y", "Mint-Y-Aqua", "Mint-Y-Dark", "Mint-Y-Dark-Aqua"],
        "Other": ["Other"],
        "Papirus": ["Papirus-Dark", "Papirus-Light"],
        "Yaru": ["Yaru", "Yaru-bark-dark"],
    }
    with pytest.raises(FileNotFoundError, match="apt-get install"):
        theme_families(tmp_path / "missing")


def test_build_families_nearest_size_and_compositing(themes, tmp_path):
    root, want = themes
    out = tmp_path / "icons"
    report = build(root, out)
    assert report.families == {"Alpha": ["Alpha", "Alpha-Dark"], "Beta": ["Beta"], "Delta": ["Delta"],
                               "Gamma": ["Gamma"]}
    split = where(report, "a-one")
    # Alpha's own 48 px a-one, not the 16/256 px ones nor Alpha-Dark's.
    assert np.abs(read(out, split, "a-one", "Alpha").astype(int) - want["Alpha", "a-one"]).max() <= 1
    assert np.abs(read(out, where(report, "g-one"), "g-one", "Alpha").astype(int)
                  - want["Alpha", "g-one"]).max() <= 1
    # 32 and 64 px only: the larger one.
    assert np.abs(read(out, where(report, "b-one"), "b-one", "Beta").astype(int) - want["Beta", "b-one"]).max() <= 1
    f = read(out, where(report, "f-one"), "f-one", "Delta")
    assert f.shape == (8, 8, 3)
    assert (f[0, 0] == 255).all() and (f[-1, -1] == 255).all()  # transparent -> white
    assert f[4, 4, 0] > 200 and f[4, 4, 1] < 30  # the red square
    assert report.skipped_files["symbolic"] == 1


def test_aliases_copies_and_blank_images_are_dropped(themes, tmp_path):
    root, want = themes
    out = tmp_path / "icons"
    report = build(root, out)
    fams = {n: sorted(p.stem for p in (out / where(report, n) / n).iterdir()) for n in report.families_per_class}
    assert fams["a-one"] == ["Alpha", "Beta", "Delta", "Gamma"]
    assert fams["d-one"] == ["Alpha", "Beta", "Delta"]  # Gamma's copy of Alpha's dropped
    assert fams["e-one"] == ["Alpha", "Beta", "Delta"]  # Gamma's near copy dropped
    assert fams["g-one"] == ["Alpha", "Beta", "Gamma"]  # Delta's white icon dropped
    assert "h-one" not in fams and report.dropped_classes == {"h-one": 2}
    assert "c-copy" not in fams and "a-alias" not in fams and "rare-one" not in fams
    reasons = {(f, n): why.split(" (")[0] for f, n, why in report.dropped_images}
    assert reasons == {("Gamma", "d-one"): "copy", ("Gamma", "e-one"): "near copy",
                       ("Delta", "g-one"): "blank on white", ("Gamma", "h-one"): "copy"}
    assert report.rare_names == 3  # c-copy and a-alias (aliases in one family each) and rare-one
    assert report.families_per_class == {n: len(v) for n, v in fams.items()}


def test_alias_collapses_into_the_more_common_name(tmp_path):
    root = tmp_path / "themes"
    for t in ["A", "B", "C"]:
        for n in ["x-one", "y-one", "z-one"]:
            icon(root / t / "48x48" / "apps" / f"{n}.png")
    # In B, "w-one" is an alias of x-one by symlink and "v-one" by a copied file; C also has them.
    os.symlink("x-one.png", root / "B" / "48x48" / "apps" / "w-one.png")
    c = icon(root / "B" / "48x48" / "apps" / "v-one.png")
    icon(root / "B" / "48x48" / "apps" / "u-one.png", c)
    for n in ["w-one", "v-one", "u-one"]:
        icon(root / "C" / "48x48" / "apps" / f"{n}.png")
    icon(root / "A" / "48x48" / "apps" / "v-one.png")
    report = build_icon_dataset(root, tmp_path / "out", min_families=2, size=8)
    why = {(f, n): r for f, n, r in report.dropped_images}
    assert why == {("B", "w-one"): "alias (identical to B/x-one)", ("B", "u-one"): "alias (identical to B/v-one)"}
    assert report.families_per_class["v-one"] == 3 and report.families_per_class["x-one"] == 3
    assert "w-one" not in report.families_per_class and "u-one" not in report.families_per_class
    assert report.dropped_classes == {"u-one": 1, "w-one": 1}


# ----------------------------------------------------------------------------- splits and output

def test_split_keeps_name_groups_together_and_is_seeded():
    names = [f"{g}-{i}" for g in "abcdefghijklmnopqrst" for i in range(1 + ord(g) % 3)]
    a = split_classes(names, seed=0)
    assert sorted(sum(a.values(), [])) == sorted(names)
    group_split = {}
    for s, ns in a.items():
        for n in ns:
            assert group_split.setdefault(n.split("-")[0], s) == s
    sizes = np.array([len(a[s]) for s in ("train", "val", "test")]) / len(names)
    assert np.abs(sizes - [0.5, 0.15, 0.35]).max() < 0.1
    assert split_classes(names, seed=0) == a
    assert any(split_classes(names, seed=s) != a for s in range(1, 4))
    with pytest.raises(ValueError, match="empty"):
        split_classes(["a-1", "a-2", "b-1"])
    with pytest.raises(ValueError, match="three positive"):
        split_classes(names, fractions=(0.5, 0.5))


def test_output_layout_report_and_load_split(themes, tmp_path):
    root, _ = themes
    out = tmp_path / "icons"
    report = build(root, out, seed=3)
    on_disk = {s: sorted(p.name for p in (out / s).iterdir()) for s in ("train", "val", "test")}
    assert on_disk == report.splits and all(on_disk.values())
    assert sorted(sum(on_disk.values(), [])) == ["a-one", "a-two", "b-one", "c-one", "d-one", "e-one", "f-one",
                                                  "g-one"]
    assert where(report, "a-one") == where(report, "a-two")
    saved = json.loads((out / "report.json").read_text())
    assert saved["splits"] == report.splits and saved["settings"]["seed"] == 3
    assert read_icon_report(out).families_per_class == report.families_per_class
    for split in ("train", "val", "test"):
        s = load_split("icons", split, root=out)
        assert s.name == f"icons/{split}" and s.image_shape == (3, 8, 8)
        assert s.class_names == report.splits[split]
        assert s.class_sizes() == [report.families_per_class[n] for n in s.class_names]
    assert load_icons("train", out, image_size=16).image_shape == (3, 16, 16)
    with pytest.raises(FileNotFoundError, match="python -m purer.data.icons build"):
        load_split("icons", "train", root=tmp_path / "nothing")


def test_default_root_follows_purer_data_root(themes, tmp_path, monkeypatch):
    root, _ = themes
    monkeypatch.setenv("PURER_DATA_ROOT", str(tmp_path / "data"))
    build(root, None)
    assert (tmp_path / "data" / "icons" / "report.json").is_file()
    assert load_split("icons", "val").name == "icons/val"


def test_output_is_replaced_atomically(themes, tmp_path, monkeypatch):
    root, _ = themes
    out = tmp_path / "icons"
    build(root, out, seed=0)
    build(root, out, seed=1)  # an earlier build is replaced
    assert read_icon_report(out).settings["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["icons", "themes"]

    def fail(tmp, dest):
        raise OSError("disk full")

    monkeypatch.setattr(icons, "_replace_dir", fail)
    with pytest.raises(OSError, match="disk full"):
        build(root, out, seed=2)
    assert read_icon_report(out).settings["seed"] == 1  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["icons", "themes"]  # no temp folder left
    monkeypatch.undo()
    other = tmp_path / "mine"
    icon(other / "photo.png")
    with pytest.raises(FileExistsError, match="not an icon dataset"):
        build(root, other)
    assert (other / "photo.png").is_file()


def test_bad_inputs(themes, tmp_path):
    root, _ = themes
    with pytest.raises(FileNotFoundError, match="no icons found"):
        build_icon_dataset(tmp_path / "themes" / "Alpha" / "16x16", tmp_path / "o")
    for t in ["A", "B"]:
        for n in ["x-one", "x-two", "y-one"]:
            icon(tmp_path / "few" / t / "48x48" / "apps" / f"{n}.png")
    with pytest.raises(ValueError, match="3 classes in 2 name groups leave the val split empty"):
        build_icon_dataset(tmp_path / "few", tmp_path / "o", min_families=2)
    with pytest.raises(ValueError, match="min_families"):
        build(root, tmp_path / "o", min_families=0)
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- SVG and CLI

SVG = ('<?xml version="1.0"?>{doctype}<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" '
       'viewBox="0 0 16 16"{extra}><rect x="0" y="0" width="16" height="16" fill="{fill}"/></svg>')


def test_svg_icons_are_rendered(tmp_path):
    pytest.importorskip("cairosvg")
    root = tmp_path / "themes"
    (root / "S" / "scalable" / "apps").mkdir(parents=True)
    fills = {"x-one": "#204080", "y-one": "#802040", "z-one": "#408020"}
    for n, fill in fills.items():
        (root / "S" / "scalable" / "apps" / f"{n}.svg").write_text(SVG.format(doctype="", extra="", fill=fill))
    # An Illustrator-style file: a namespace declared through an internal entity.
    doctype = '<!DOCTYPE svg [<!ENTITY ns_ai "http://ns.adobe.com/AdobeIllustrator/10.0/">]>'
    (root / "S" / "scalable" / "apps" / "w-one.svg").write_text(
        SVG.format(doctype=doctype, extra=' xmlns:i="&ns_ai;"', fill="#606060"))
    out = tmp_path / "out"
    report = build_icon_dataset(root, out, min_families=1, size=8)
    assert not report.dropped_images
    for n, fill in {**fills, "w-one": "#606060"}.items():
        img = read(out, where(report, n), n, "S")
        assert np.abs(img.astype(int) - [int(fill[i:i + 2], 16) for i in (1, 3, 5)]).max() <= 1


def test_svg_without_cairosvg_says_how_to_install(tmp_path, monkeypatch):
    root = tmp_path / "themes"
    for n in ["x-one", "y-one", "z-one"]:
        p = root / "S" / "scalable" / "apps" / f"{n}.svg"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(SVG.format(doctype="", extra="", fill="#000000"))
    monkeypatch.setitem(sys.modules, "cairosvg", None)  # import cairosvg now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'purer\[icons\]'"):
        build_icon_dataset(root, tmp_path / "out", min_families=1)
    assert not (tmp_path / "out").exists()


def test_cli_build_preview_and_help(themes, tmp_path, capsys):
    root, _ = themes
    out, preview = tmp_path / "icons", tmp_path / "preview.png"
    assert icons.main(["build", "--themes", str(root), "--out", str(out), "--min-families", "3", "--size", "8",
                       "--preview", str(preview)]) == 0
    text = capsys.readouterr().out
    assert "4 families" in text and "near copy 1" in text, text
    assert Image.open(preview).mode == "RGB"
    with pytest.raises(SystemExit) as e:
        icons.main(["build", "--themes", str(tmp_path / "nothing"), "--out", str(out)])
    assert e.value.code == 2 and "no icon themes" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        icons.main(["build", "--help"])
    assert "apt-get install --no-install-recommends adwaita-icon-theme" in capsys.readouterr().out


def test_names_most_families_draw_alike_merge(tmp_path):
    def themes(root: Path, apart: str) -> tuple:
        for t in "ABCDEF" + apart:  # E, F and the apart ones make p-one the more common name
            for n in ["p-one", "q-one", "r-one", "s-one"]:
                if (t, n) != ("D", "p-one"):
                    c = icon(root / t / "48x48" / "apps" / f"{n}.png")
                    if n == "p-one" and t in "ABC":  # they draw gtk-p as their p-one; D has only gtk-p
                        icon(root / t / "48x48" / "apps" / "gtk-p.png", c)
        for t in apart:  # families that draw gtk-p apart from p-one
            icon(root / t / "48x48" / "apps" / "gtk-p.png")
        return icon(root / "D" / "48x48" / "apps" / "gtk-p.png")

    d = themes(tmp_path / "one", apart="")
    merged = build_icon_dataset(tmp_path / "one", tmp_path / "merged", min_families=2, size=8)
    assert merged.merged_names == {"gtk-p": "p-one"}
    assert merged.families_per_class["p-one"] == 6 and "gtk-p" not in merged.families_per_class
    assert (read(tmp_path / "merged", where(merged, "p-one"), "p-one", "D") == d).all()
    # 3 of the 7 families with both names draw them alike: under half, two classes.
    themes(tmp_path / "two", apart="GHIJ")
    apart = build_icon_dataset(tmp_path / "two", tmp_path / "apart", min_families=1, size=8)
    assert apart.merged_names == {} and apart.families_per_class["gtk-p"] == 5
    assert apart.families_per_class["p-one"] == 9
    assert sum(r.startswith("alias") for *_, r in apart.dropped_images) == 3


def test_names_merge_with_a_partner_they_resemble_not_through_a_chain(tmp_path):
    root = tmp_path / "themes"
    # A, B and C draw y-one as x-one; D and E draw z-one as y-one (but y-one apart from x-one).
    for t in "ABCDEF":
        x = icon(root / t / "48x48" / "apps" / "x-one.png")
        y = icon(root / t / "48x48" / "apps" / "y-one.png", x if t in "ABC" else None)
        if t in "DE":
            icon(root / t / "48x48" / "apps" / "z-one.png", y)
        for n in ["p-one", "q-one"]:
            icon(root / t / "48x48" / "apps" / f"{n}.png")
    for t in "GH":
        icon(root / t / "48x48" / "apps" / "z-one.png")
    report = build_icon_dataset(root, tmp_path / "out", min_families=2, size=8)
    # z-one resembles y-one, which joins x-one; z-one does not resemble x-one, so it stays.
    assert report.merged_names == {"y-one": "x-one"}
    assert report.families_per_class["x-one"] == 6 and report.families_per_class["z-one"] == 4
