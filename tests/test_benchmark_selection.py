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
