"""benchmarks/icfil.py on a finished tiny run: it repeats the run's rows and adds the real-support control."""
import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "icfil.py"


def test_icfil_study_repeats_the_run_and_adds_the_control(baseline_run, tmp_path):
    spec = importlib.util.spec_from_file_location("icfil_benchmark", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main([str(baseline_run), "--out", str(tmp_path)])
    report = json.loads((tmp_path / "icfil.json").read_text())
    rows = {r["method"]: r for r in report["rows"]}
    assert set(rows) == {"purer", "purer+icfil", "purer+real-support-ce"}
    for method in ("purer", "purer+icfil"):  # the same learner, settings and tasks as the run
        assert rows[method]["accuracy"] == rows[method]["run_accuracy"]
    assert rows["purer+real-support-ce"]["tasks"] == rows["purer"]["tasks"] == 6
    assert [(p["a"], p["b"]) for p in report["paired"]] == [
        ("purer+icfil", "purer"), ("purer+real-support-ce", "purer"), ("purer+icfil", "purer+real-support-ce")]
    assert "| 1 | purer+icfil - purer |" in (tmp_path / "icfil.md").read_text()
