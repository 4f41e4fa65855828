"""The built-in glyph dataset: splits, cleaning, determinism, the cache and the font-directory builder."""
import re
import shutil
import time
import unicodedata

import pytest
import torch

from purer.data import load_split
from purer.data.glyphs import (GLYPH_SPLITS, GlyphConfig, build_font_dataset, glyph_cache_path, load_glyphs,
                               main, matplotlib_font_dir, read_glyph_report)

FONTS = matplotlib_font_dir()
NAME = re.compile(r"^(\w+):(.) \(U\+([0-9A-F]{4,6})\)$")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The default (28 px) dataset, built cold once into a fresh cache; also the time it took."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("glyph_cache")
    start = time.perf_counter()
    sets = {split: load_glyphs(split, data_root=root) for split in GLYPH_SPLITS}
    return root, sets, time.perf_counter() - start


def _font_dir(tmp_path, *names, copies=None):
    """A directory with copies of some of matplotlib's font files (``copies``: extra ``{new name: source}``)."""
    d = tmp_path / "fonts"
    (d / "sub").mkdir(parents=True)
    for n in names:
        shutil.copy(FONTS / n, d / "sub" / n)
    for new, src in (copies or {}).items():
        shutil.copy(FONTS / src, d / new)
    return d


def test_splits_are_large_disjoint_and_by_script(built):
    _, sets, _ = built
    names = {split: set(s.class_names) for split, s in sets.items()}
    assert not (names["train"] & names["val"] or names["train"] & names["test"] or names["val"] & names["test"])
    assert sum(map(len, names.values())) >= 200
    assert len(names["train"]) >= 65 and len(names["val"]) >= 16 and len(names["test"]) >= 20
    for split, s in sets.items():
        assert s.name == f"glyphs/{split}"
        assert s.images.dtype == torch.uint8 and s.image_shape == (1, 28, 28)
        assert min(s.class_sizes()) >= 20  # 5 shots + 15 queries
        for n in s.class_names:
            script, ch, code = NAME.match(n).groups()
            assert script in GLYPH_SPLITS[split] and ord(ch) == int(code, 16)
            assert unicodedata.category(ch).startswith("L")


def test_images_are_white_glyphs_centred_on_black(built):
    _, sets, _ = built
    x = sets["test"].float_images()
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], -1)
    assert border.max() == 0  # the margin is background
    assert (x.mean((1, 2, 3)) < 0.5).all() and (x.amax((1, 2, 3)) > 0.9).all()
    # within a class no two images are the same
    s = sets["val"]
    for c in range(len(s.class_names)):
        imgs = s.images[s.members(c)].flatten(1)
        assert torch.unique(imgs, dim=0).shape[0] == imgs.shape[0]


def test_lookalikes_and_fallback_faces_are_removed(built):
    root, sets, _ = built
    all_names = {n for s in sets.values() for n in s.class_names}
    assert "latin:A (U+0041)" in all_names and "latin:o (U+006F)" in all_names
    for twin in ("greek:Α (U+0391)", "cyrillic:А (U+0410)", "greek:ο (U+03BF)", "armenian:օ (U+0585)"):
        assert twin not in all_names
    report = read_glyph_report(data_root=root)
    assert ("greek:Α (U+0391)", "latin:A (U+0041)") in report.lookalikes
    assert "LastResortHE-Regular.ttf" in report.dropped_faces
    assert "cmex10.ttf (latin)" in report.dropped_faces
    assert "DejaVuSans.ttf" in report.faces and "STIXGeneral.ttf" in report.faces


def test_cache_hit_is_fast_and_identical(built):
    root, sets, cold = built
    assert glyph_cache_path(28, root).exists()
    assert not list(glyph_cache_path(28, root).parent.glob("*.tmp"))
    start = time.perf_counter()
    again = load_glyphs("test", data_root=root)
    assert time.perf_counter() - start < cold / 5
    assert torch.equal(again.images, sets["test"].images) and torch.equal(again.labels, sets["test"].labels)
    assert again.class_names == sets["test"].class_names
    via_sources = load_split("glyphs", "val", root=root)
    assert torch.equal(via_sources.images, sets["val"].images)


def test_env_var_sets_the_default_root(built, monkeypatch):
    root, _, _ = built
    monkeypatch.setenv("PURER_DATA_ROOT", str(root))
    assert glyph_cache_path(28) == glyph_cache_path(28, root)


def test_bad_split_size_and_unwritable_root(tmp_path):
    with pytest.raises(ValueError, match="unknown glyph split 'meta-test'"):
        load_glyphs("meta-test", data_root=tmp_path)
    with pytest.raises(ValueError, match="at least 8"):
        load_glyphs("train", image_size=4, data_root=tmp_path)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    start = time.perf_counter()
    with pytest.raises(OSError, match="writable directory"):
        load_glyphs("train", data_root=blocker)
    assert time.perf_counter() - start < 1  # fails before building


def test_build_is_deterministic_and_size_independent():
    a, ra = build_font_dataset(FONTS, ["armenian"], 16)
    b, _ = build_font_dataset(FONTS, ["armenian"], 16)
    c, _ = build_font_dataset(FONTS, ["armenian"], 12)
    assert torch.equal(a["armenian"].images, b["armenian"].images)
    assert torch.equal(a["armenian"].labels, b["armenian"].labels)
    assert c["armenian"].class_names == a["armenian"].class_names  # cleaning does not depend on the size
    assert c["armenian"].image_shape == (1, 12, 12)
    assert ra.augmented > 0 and min(a["armenian"].class_sizes()) == 20


def test_one_font_directory_per_script_and_per_split(tmp_path):
    d = _font_dir(tmp_path, "DejaVuSans.ttf")
    cfg = GlyphConfig(min_faces=1, min_instances=6)
    sets, report = build_font_dataset(d, ["latin", "greek"], 16, config=cfg, name="mine")
    assert set(sets) == {"latin", "greek"} and sets["greek"].name == "mine/greek"
    assert report.faces == ["sub/DejaVuSans.ttf"]
    assert all(n == 6 for s in sets.values() for n in s.class_sizes())  # 1 face + 5 distortions
    greek = set(sets["greek"].class_names)
    assert "greek:Ω (U+03A9)" in greek and "greek:Α (U+0391)" not in greek  # Alpha is Latin A here
    split_sets, _ = build_font_dataset(d, {"train": ["latin"], "test": ["greek"]}, 16, config=cfg)
    assert split_sets["test"].class_names == sets["greek"].class_names
    assert torch.equal(split_sets["test"].images, sets["greek"].images)
    with pytest.raises(ValueError, match="no class of 'latin'"):
        build_font_dataset(d, ["latin"], 16)  # one face, min_faces=4 by default


def test_fallback_face_duplicate_face_and_symbol_font(tmp_path):
    d = _font_dir(tmp_path, "DejaVuSans.ttf", "DejaVuSerif.ttf", "STIXGeneral.ttf", "cmr10.ttf",
                  "LastResortHE-Regular.ttf", "cmex10.ttf", copies={"copy_of_serif.ttf": "DejaVuSerif.ttf"})
    sets, report = build_font_dataset(d, ["latin"], 16, config=GlyphConfig(min_faces=3, min_instances=6))
    assert report.dropped_faces["sub/LastResortHE-Regular.ttf"].startswith("fallback face")
    assert "sub/cmex10.ttf (latin)" in report.dropped_faces
    assert report.dropped_renders["duplicate"] >= 52  # the copied face repeats every letter
    assert "latin:A (U+0041)" in sets["latin"].class_names


def test_bad_font_directory_and_scripts(tmp_path):
    with pytest.raises(FileNotFoundError, match="no font files"):
        build_font_dataset(tmp_path, ["latin"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_font_dataset(tmp_path / "missing", ["latin"])
    with pytest.raises(ValueError, match="unknown script 'klingon'"):
        build_font_dataset(FONTS, ["latin", "klingon"])
    with pytest.raises(ValueError, match="once"):
        build_font_dataset(FONTS, {"train": ["latin"], "test": ["latin"]})


def test_cli_prints_splits_and_saves_a_preview(built, tmp_path, capsys):
    root, sets, _ = built
    png = tmp_path / "preview.png"
    size = sets["train"].image_shape[-1]  # the fixture's cache (the CLI's default is the recipe's 32 px)
    assert main(["--data-root", str(root), "--image-size", str(size), "--preview", str(png)]) == 0
    out = capsys.readouterr().out
    assert "loaded from cache" in out
    assert re.search(rf"train\s+{len(sets['train'].class_names)} classes\s+instances/class min 20 median 20", out)
    assert png.stat().st_size > 1000
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as e:
        main(["--data-root", str(blocker), "--image-size", "20"])
    assert e.value.code == 2 and "writable" in capsys.readouterr().err


def test_the_report_summary_shows_a_few_examples_of_each_drop():
    from purer.data.glyphs import GlyphReport

    report = GlyphReport(faces=["a.ttf"], lookalikes=[(f"x{i}", "y") for i in range(9)], too_few_faces=["z"])
    assert "dropped 9 look-alike classes: x0 ~ y, x1 ~ y, x2 ~ y, x3 ~ y, x4 ~ y, ... (4 more)" in report.summary()
    assert "x8 ~ y" in str(report) and "more)" not in str(report)  # the full report lists every one
