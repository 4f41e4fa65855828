"""benchmarks/selection.py cross: the default chosen across zoos on meta-val, never far below PURER as published."""
import json
from benchmark_scripts import load_benchmark

def load():
    return load_benchmark("selection")


def test_cross_zoo_choice_takes_the_best_mean_rank_that_never_falls_far_below_paper(tmp_path, monkeypatch):
    sel = load()
    monkeypatch.setattr(sel, "RESULTS", tmp_path)
    val = {"a": {"paper": 80, "x": 85, "y": 82}, "b": {"paper": 70, "x": 68.5, "y": 71}}  # x wins a, loses b by 1.5
    for zoo, scores in val.items():
        rows = [{"variant": v, "seed": 0, "shot": shot, "val_accuracy": acc} for v, acc in scores.items()
                for shot in (1, 5)]
        (tmp_path / f"selection_glyphs_{zoo}.json").write_text(json.dumps({"rows": rows}))
    report = sel.cross([("glyphs", "a"), ("glyphs", "b")])
    rows = {r["variant"]: r for r in report["rows"]}
    assert not rows["x"]["eligible"] and rows["x"]["worst_vs_reference"] == -1.5
    assert report["chosen"] == "y" and rows["y"]["mean_rank"] == 1.5
    assert "**y**" in sel.cross_markdown(report) and "x (not eligible)" in sel.cross_markdown(report)


def test_a_union_head_variant_is_the_default_on_a_zoo_without_shared_classes(tmp_path, monkeypatch):
    sel = load()
    monkeypatch.setattr(sel, "RESULTS", tmp_path)
    val = {"disjoint": ({"paper": 80, "default": 85}, False),
           "overlap": ({"paper": 80, "default": 82, "default+kd-union": 84}, True)}
    for zoo, (scores, shared) in val.items():
        rows = [{"variant": v, "seed": 0, "shot": 1, "val_accuracy": acc} for v, acc in scores.items()]
        (tmp_path / f"selection_glyphs_{zoo}.json").write_text(json.dumps({"rows": rows, "shared_classes": shared}))
    report = sel.cross([("glyphs", "disjoint"), ("glyphs", "overlap")])
    rows = {r["variant"]: r for r in report["rows"]}
    assert rows["default+kd-union"]["val_accuracy"] == {"glyphs/disjoint": 85, "glyphs/overlap": 84}
    assert rows["default+kd-union"]["stands_in"] == {"glyphs/disjoint": "default"}
    assert report["chosen"] == "default+kd-union" and "85.00 (1) = default" in sel.cross_markdown(report)
    # where teachers do share classes, nothing stands in: the variant must have run there
    (tmp_path / "selection_glyphs_disjoint.json").write_text(json.dumps(
        {"rows": [{"variant": v, "seed": 0, "shot": 1, "val_accuracy": a} for v, a in val["disjoint"][0].items()],
         "shared_classes": True}))
    assert "default+kd-union" not in {r["variant"] for r in sel.cross([("glyphs", "disjoint"), ("glyphs", "overlap")])["rows"]}


def test_shared_classes_reads_the_bank_against_the_teachers_outputs(tmp_path):
    sel = load()
    for bank, shared in ((60, False), (57, True)):
        (tmp_path / "results.json").write_text(json.dumps(
            {"zoo": {"models": 12, "classes": [5]}, "meta_train": {"bank_classes": bank}}))
        assert sel.shared_classes(tmp_path / "results.json") is shared


def test_the_release_tv_variant_is_the_default_on_a_zoo_without_colour_teachers(tmp_path, monkeypatch):
    sel = load()
    monkeypatch.setattr(sel, "RESULTS", tmp_path)
    val = {"grey": ({"paper": 80, "default": 85}, False),
           "colour": ({"paper": 40, "default": 45, "default+tv-release": 43}, True)}
    for zoo, (scores, colour) in val.items():
        rows = [{"variant": v, "seed": 0, "shot": 1, "val_accuracy": acc} for v, acc in scores.items()]
        (tmp_path / f"selection_x_{zoo}.json").write_text(json.dumps({"rows": rows, "colour_teachers": colour}))
    rows = {r["variant"]: r for r in sel.cross([("x", "grey"), ("x", "colour")])["rows"]}
    assert rows["default+tv-release"]["stands_in"] == {"x/grey": "default"}
    assert rows["default+tv-release"]["val_accuracy"] == {"x/grey": 85, "x/colour": 43}


def test_colour_teachers_reads_the_zoos_model_configs(tmp_path):
    sel = load()
    for channels, colour in ((1, False), (3, True)):
        zoo = tmp_path / f"zoo{channels}"
        for k in range(2):
            (zoo / f"m{k}").mkdir(parents=True)
            (zoo / f"m{k}" / "config.json").write_text(json.dumps({"in_channels": channels if k else 1}))
        (tmp_path / "results.json").write_text(json.dumps({"zoo": {"path": str(zoo)}}))
        assert sel.colour_teachers(tmp_path / "results.json") is colour
    (tmp_path / "results.json").write_text(json.dumps({"zoo": {"path": str(tmp_path / "gone")}}))
    assert sel.colour_teachers(tmp_path / "results.json") is True
