"""benchmarks/time_to_accuracy.py: a curve of meta-val against CPU-seconds from the pipeline's own ECI, and the
report that compares variants to PURER as published."""
import json

from recipe_runs import write_tiny_dataset
from benchmark_scripts import load_benchmark

def load():
    return load_benchmark("time_to_accuracy")


def test_a_curve_scores_meta_val_and_counts_only_the_iterations(tmp_path, monkeypatch):
    tta = load()
    data = write_tiny_dataset(tmp_path / "data")
    tiny = ["data.dataset=folder", f"data.root={data}", "data.image_size=16", f"zoo.path={tmp_path / 'zoo'}",
            "zoo.num_models=2", "zoo.epochs=1", "meta.query=3", "switch.warmup=1", "switch.patience=1"]
    out = tmp_path / "runs" / "paper" / "seed0"
    result = tta.curve("folder", "paper", 0, 4, 2, out, tiny, n_tasks=5)
    assert [p[0] for p in result["points"]] == [0, 2, 4] and result["points"][0][1] == 0
    assert result["points"][1][1] < result["points"][2][1]  # CPU-seconds grow with the iterations
    assert json.loads((out / "curve.json").read_text())["points"] == result["points"]


def test_the_report_measures_time_to_the_reference_s_best(tmp_path, monkeypatch):
    tta = load()
    monkeypatch.setattr(tta, "RUNS", tmp_path)
    curves = {"paper": [[0, 0, 20], [100, 50, 60], [200, 100, 70]], "fast": [[0, 0, 20], [100, 10, 72], [200, 20, 75]]}
    for variant, points in curves.items():
        out = tmp_path / "glyphs" / variant / "seed0"
        out.mkdir(parents=True)
        (out / "curve.json").write_text(json.dumps({"variant": variant, "seed": 0, "iterations": 200,
                                                    "points": points}))
    rep = tta.report("glyphs")
    rows = {r["variant"]: r for r in rep["rows"]}
    assert rep["target"] == 70 and rep["budget_cpu_seconds"] == 20
    assert rows["paper"]["mean_cpu_seconds_to_target"] == 100 and rows["fast"]["mean_cpu_seconds_to_target"] == 10
    assert rows["fast"]["speedup_vs_reference"] == 10 and rows["fast"]["best_at_budget"] == 75
    tta.plot(rep, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0 and "| fast | 0 | 10 | 10 | 10.0x |" in tta.markdown(rep)
