"""benchmarks/accuracy.py's ``collect``: seeds averaged, rows renamed after their variant."""
import json
from pathlib import Path

import pytest
from benchmark_scripts import load_benchmark

@pytest.fixture(scope="module")
def bench():
    return load_benchmark("accuracy")


def fake_run(root: Path, variant: str, seed: int, rows: list[tuple[str, float, float]], seconds: float = 60.0,
             selected: str | None = None) -> None:
    out = root / "glyphs" / "disjoint" / variant / f"seed{seed}"
    out.mkdir(parents=True)
    results = {"seconds": seconds, "zoo": {"models": 12},
               "meta_train": {"best_iteration": 500, "val_accuracy": 80.0, "switch_fired": 3},
               "rows": [{"method": m, "way": 5, "shot": 1, "accuracy": a, "ci95": c, "tasks": 600,
                         "test_cost": {"models": 1}, **({"selected": True} if m == selected else {})}
                        for m, a, c in rows]}
    (out / "results.json").write_text(json.dumps(results))


def test_collect_averages_seeds_and_names_rows_after_the_variant(bench, tmp_path):
    fake_run(tmp_path, "baselines", 0, [("purer", 20.0, 1.0), ("nc-pixels", 70.0, 0.8)])
    fake_run(tmp_path, "eci-maml", 0, [("purer", 80.0, 1.0), ("purer+icfil", 82.0, 1.0)])
    fake_run(tmp_path, "eci-maml", 1, [("purer", 84.0, 0.6), ("purer+icfil", 85.0, 0.6)])
    fake_run(tmp_path, "ei-maml", 0, [("purer", 77.0, 0.9)])
    report = bench.collect("glyphs", tmp_path)
    rows = {r["method"]: r for r in report["rows"]}
    # "eci-maml" is PURER as published: its one name is "paper"
    assert set(rows) == {"paper", "paper+icfil", "nc-pixels", "ei-maml"}
    eci = rows["paper"]
    assert eci["accuracy"] == 82.0 and eci["ci95"] == 0.8 and eci["seeds"] == [0, 1]
    assert eci["seed_sd"] == pytest.approx(2.83, abs=0.01)
    assert eci["per_seed"] == [[0, 80.0, 1.0], [1, 84.0, 0.6]]
    assert rows["nc-pixels"]["seeds"] == [0] and "seed_sd" not in rows["nc-pixels"]
    table = bench.markdown(report)
    assert "| paper | 82.00 ± 0.80 (sd 2.83) | 0,1 | models=1 |" in table
    assert len(report["runs"]) == 4


def test_collect_carries_the_rows_no_run_here_replaces(bench, tmp_path):
    previous = tmp_path / "accuracy_glyphs.json"
    old_run = {"scenario": "disjoint", "seed": 0, "seconds": 60.0, "zoo_models": 12,
               "meta_train": {"best_iteration": 500, "val_accuracy": 80.0, "switch_fired": 3}}
    old_row = {"scenario": "disjoint", "way": 5, "shot": 1, "ci95": 1.0, "seeds": [0], "tasks": 600,
               "test_cost": {"models": 1}}
    previous.write_text(json.dumps({"runs": [{**old_run, "variant": "baselines", "seconds": 30.0},
                                             {**old_run, "variant": "eci-maml"}],
                                    "rows": [{**old_row, "method": "nc-pixels", "accuracy": 70.0},
                                             {**old_row, "method": "eci-maml+icfil", "accuracy": 79.0}]}))
    fake_run(tmp_path / "runs", "eci-maml", 0, [("purer", 81.0, 1.0)])
    report = bench.collect("glyphs", tmp_path / "runs", previous)
    rows = {r["method"]: r for r in report["rows"]}
    assert set(rows) == {"paper", "nc-pixels"}  # the old eci-maml+icfil row went with its variant (paper)
    assert "carried_from" in rows["nc-pixels"] and rows["nc-pixels"]["variant"] == "baselines"
    assert "carried_from" not in rows["paper"]
    assert [r["variant"] for r in report["runs"]] == ["paper", "baselines"]
    assert "| nc-pixels † | 70.00 ± 1.00 | 0 | models=1 |" in bench.markdown(report)


def test_collect_does_not_carry_a_variant_whose_runs_are_here_under_another_name(bench, tmp_path):
    """Run folders renamed (e.g. a variant's name after a default changed) take their rows with them."""
    fake_run(tmp_path / "runs", "default", 0, [("purer", 81.0, 1.0)], seconds=61.0)
    fake_run(tmp_path / "runs", "paper", 0, [("purer", 79.0, 1.0)])
    previous = tmp_path / "accuracy_glyphs.json"
    previous.write_text(json.dumps(bench.collect("glyphs", tmp_path / "runs")))
    (tmp_path / "runs" / "glyphs" / "disjoint" / "default").rename(tmp_path / "runs" / "glyphs" / "disjoint" / "default+avg")
    rows = {r["method"]: r for r in bench.collect("glyphs", tmp_path / "runs", previous)["rows"]}
    assert set(rows) == {"default+avg", "paper"} and rows["default+avg"]["accuracy"] == 81.0
    # a run made elsewhere (another record) is still carried
    fake_run(tmp_path / "other", "paper", 0, [("purer", 79.0, 1.0)])
    rows = {r["method"]: r for r in bench.collect("glyphs", tmp_path / "other", previous)["rows"]}
    assert set(rows) == {"default", "paper"} and "carried_from" in rows["default"]


def test_collect_keeps_the_seeds_of_a_variant_run_only_elsewhere(bench, tmp_path):
    """Seeds 1 and 2 run here, seed 0 elsewhere (in the results file): one row over the three seeds, the carried
    seed marked; a seed run here again replaces its record."""
    def with_val(root, seed, val):  # the run's meta-val accuracy on its row
        results = root / "glyphs" / "disjoint" / "default" / f"seed{seed}" / "results.json"
        data = json.loads(results.read_text())
        data["rows"][0]["val_accuracy"] = val
        results.write_text(json.dumps(data))

    fake_run(tmp_path / "elsewhere", "default", 0, [("purer", 80.0, 1.0)], seconds=50.0)
    with_val(tmp_path / "elsewhere", 0, 84.0)
    previous = tmp_path / "accuracy_glyphs.json"
    previous.write_text(json.dumps(bench.collect("glyphs", tmp_path / "elsewhere")))
    fake_run(tmp_path / "runs", "default", 1, [("purer", 84.0, 0.6)])
    fake_run(tmp_path / "runs", "default", 2, [("purer", 82.0, 0.8)])
    with_val(tmp_path / "runs", 1, 86.0)
    with_val(tmp_path / "runs", 2, 85.0)
    report = bench.collect("glyphs", tmp_path / "runs", previous)
    (row,) = report["rows"]
    assert row["seeds"] == [0, 1, 2] and row["per_seed"][0] == [0, 80.0, 1.0] and row["accuracy"] == 82.0
    assert row["ci95"] == 0.8 and list(row["seeds_carried_from"]) == [0] and "carried_from" not in row
    assert sorted((r["seed"], "carried_from" in r) for r in report["runs"]) == [(0, True), (1, False), (2, False)]
    assert "| default | 82.00 ± 0.80 (sd 2.00) | 0 †,1,2 | models=1 |" in bench.markdown(report)
    assert row["val_accuracy"] == 85.0 and row["val_per_seed"] == [[0, 84.0], [1, 86.0], [2, 85.0]]
    previous.write_text(json.dumps(report))  # collected again, seed 0 still carried, its meta-val kept
    again = bench.collect("glyphs", tmp_path / "runs", previous)["rows"][0]
    assert again["seeds"] == [0, 1, 2] and again["val_per_seed"] == row["val_per_seed"]
    fake_run(tmp_path / "runs", "default", 0, [("purer", 86.0, 0.5)])
    (row,) = bench.collect("glyphs", tmp_path / "runs", previous)["rows"]
    assert row["per_seed"][0] == [0, 86.0, 0.5] and "seeds_carried_from" not in row


def test_a_run_over_several_datasets_gets_a_table_per_dataset(bench, tmp_path):
    out = tmp_path / "mh" / "mh" / "default" / "seed0"
    out.mkdir(parents=True)
    rows = [{"method": "purer", "dataset": d, "way": 5, "shot": 1, "accuracy": a, "ci95": 1.0, "tasks": 600,
             "test_cost": {"models": 1}} for d, a in (("glyphs", 81.0), ("icons", 36.0))]
    (out / "results.json").write_text(json.dumps({"seconds": 60.0, "zoo": {"models": 24}, "rows": rows,
                                                  "meta_train": {"best_iteration": 1, "val_accuracy": 50.0,
                                                                 "switch_fired": 0}}))
    table = bench.markdown(bench.collect("mh", tmp_path))
    glyphs, icons = table.split("## mh, meta-test on glyphs")[1].split("## mh, meta-test on icons")
    assert "| default | 81.00 ± 1.00 | 0 |" in glyphs and "| default | 36.00 ± 1.00 | 0 |" in icons


def test_collect_refuses_to_mix_runs_of_different_code(bench, tmp_path):
    for variant, source in (("paper", "aaaa"), ("default", "bbbb")):
        fake_run(tmp_path, variant, 0, [("purer", 80.0, 1.0)])
        path = tmp_path / "glyphs" / "disjoint" / variant / "seed0" / "results.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "code": {"source": source}}))
    with pytest.raises(SystemExit, match="runs of different code"):
        bench.collect("glyphs", tmp_path)
    report = bench.collect("glyphs", tmp_path, allow_mixed_code=True)
    assert {r["method"]: r["code"] for r in report["rows"]} == {"paper": "aaaa", "default": "bbbb"}
    assert "| paper (code aaaa) |" in bench.markdown(report)
    fake_run(tmp_path, "paper", 1, [("purer", 82.0, 1.0)])  # a second seed on other code: the row names both
    path = tmp_path / "glyphs" / "disjoint" / "paper" / "seed1" / "results.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "code": {"source": "cccc"}}))
    report = bench.collect("glyphs", tmp_path, allow_mixed_code=True)
    assert {r["method"]: r["code"] for r in report["rows"]} == {"paper": "aaaa, cccc", "default": "bbbb"}


def test_default_plus_parts_is_the_recipe_default_with_only_those_parts(bench, tmp_path):
    assert bench.variant_args("default") == []
    assert bench.variant_args("default+kd-union") == ["distill.logit=1.0", "distill.heads=union"]
    assert bench.variant_args("paper+kd-union")[:2] == ["--config", "recipes/configs/purer-paper.yaml"]
    with pytest.raises(ValueError, match="unknown variant"):
        bench.variant_args("default+no-such-part")
    fake_run(tmp_path, "default+it3000+p2", 0, [("purer", 86.0, 0.6), ("purer+icfil", 86.5, 0.6)])
    fake_run(tmp_path, "default", 0, [("purer", 85.0, 0.7)])
    fake_run(tmp_path, "default+kd-union", 0, [("purer", 85.0, 0.7)])
    rows = {r["method"]: r for r in bench.collect("glyphs", tmp_path)["rows"]}
    # the scenarios' budget (2,000 iterations, no early stopping) is not the recipe's (early stopping under a
    # ceiling of 3,000): "default" there is not the recipe's default, default+it3000+p2 is
    assert rows["default+it3000+p2"].get("default") and rows["default+it3000+p2+icfil"].get("default")
    assert "default" not in rows["default"] and "default" not in rows["default+kd-union"]
    assert rows["default+kd-union"]["variant"] == "default+kd-union"
    assert bench.is_recipe_default("glyphs", "zoo-sh", "default+it3000+p2")
    assert not bench.is_recipe_default("glyphs", "zoo-20way", "default+it3000+p2")  # a ProtoNet, not L2F
    assert bench.is_recipe_default("glyphs", "zoo-disjoint-20way", "default+it3000+p2")  # L2F read at 20-way
    assert not bench.is_recipe_default("glyphs", "zoo-sh", "default+it3000+p2+pixels-sh")
    assert not bench.is_recipe_default("glyphs", "zoo-sh", "paper")


def test_collect_adds_the_row_meta_val_chose_per_seed(bench, tmp_path):
    """``<variant>+chosen``: per seed the row meta-val selected (SimpleShot for one seed, the plain learner for the
    other), averaged like any row, with the choices listed; a run with the plain row alone adds none."""
    fake_run(tmp_path, "default", 0, [("purer", 80.0, 1.0), ("purer+simpleshot", 83.0, 0.8)], selected="purer+simpleshot")
    fake_run(tmp_path, "default", 1, [("purer", 84.0, 0.6), ("purer+simpleshot", 83.0, 0.6)], selected="purer")
    fake_run(tmp_path, "paper", 0, [("purer", 77.0, 0.9)], selected="purer")
    path = tmp_path / "glyphs" / "disjoint" / "default" / "seed0" / "results.json"
    run = json.loads(path.read_text())
    run["rows"][1]["test_cost"] = {"models": 1, "inner_steps": 0}  # SimpleShot's, chosen by seed 0 alone
    path.write_text(json.dumps(run))
    rows = {r["method"]: r for r in bench.collect("glyphs", tmp_path)["rows"]}
    assert set(rows) == {"default", "default+simpleshot", "default+chosen", "paper"}
    chosen = rows["default+chosen"]
    assert chosen["per_seed"] == [[0, 83.0, 0.8], [1, 84.0, 0.6]] and chosen["accuracy"] == 83.5
    assert chosen["chosen"] == ["simpleshot", "none"] and chosen["variant"] == "default"
    assert chosen["test_cost"] == {"models": 1, "inner_steps": "0/-"}  # each seed's cost, not the first seed's


def test_a_baselines_run_adds_no_chosen_row(bench, tmp_path):
    """A baselines run meta-tests an untrained learner (its rows are dropped), so it has no row a user would get."""
    fake_run(tmp_path, "baselines", 0, [("purer", 20.0, 1.0), ("purer+simpleshot", 21.0, 1.0),
                                        ("nc-best-teacher", 80.0, 1.0)], selected="purer+simpleshot")
    assert {r["method"] for r in bench.collect("glyphs", tmp_path)["rows"]} == {"nc-best-teacher"}


def test_a_scenario_that_only_meta_tests_differently_continues_the_trained_runs_checkpoints(bench, tmp_path,
                                                                                           monkeypatch):
    monkeypatch.setattr(bench, "RUNS", tmp_path)
    trained = bench.run_dir("glyphs", "zoo-disjoint", "default", 0) / "checkpoints" / "checkpoint_750"
    trained.mkdir(parents=True)
    (trained / "COMPLETE").touch()
    assert bench.start_from_trained("glyphs", "zoo-disjoint-20way", "default", 1) is None  # seed 1 not trained
    assert bench.start_from_trained("glyphs", "zoo-20way", "default", 0) is None  # trains its own ProtoNet
    assert bench.start_from_trained("glyphs", "zoo-disjoint-20way", "default", 0) == trained.parents[1]
    out = bench.run_dir("glyphs", "zoo-disjoint-20way", "default", 0)
    assert (out / "checkpoints" / "checkpoint_750" / "COMPLETE").is_file()
    assert "--resume" in bench.command("glyphs", "zoo-disjoint-20way", "default", 0)
    assert bench.start_from_trained("glyphs", "zoo-disjoint-20way", "default", 0) is None  # has its own now


def test_a_row_whose_cost_differs_by_shot_shows_each_shots_cost(bench, tmp_path):
    """A chosen row that runs SimpleShot at 1-shot and the inner loop at 5-shot: both costs, each under its shot;
    a row of one cost shows it once (both tables: a run's results.md and the collected file)."""
    from purer.pipeline import results_table

    simple = {"models": 1, "inner_steps": 0}
    rows = [{"method": "purer+chosen", "way": 5, "shot": 1, "accuracy": 87.0, "ci95": 0.6, "test_cost": simple},
            {"method": "purer+chosen", "way": 5, "shot": 5, "accuracy": 97.0, "ci95": 0.2,
             "test_cost": {"models": 1, "inner_steps": 10}},
            *({"method": "nc", "way": 5, "shot": s, "accuracy": 80.0, "ci95": 0.7, "test_cost": {"models": 1}}
              for s in (1, 5))]
    table = results_table(rows)
    assert "| 1-shot: models=1, inner_steps=0; 5-shot: models=1, inner_steps=10 |" in table
    assert table.rstrip().endswith("| models=1 |")
    report = {"dataset": "glyphs", "runs": [], "rows": [{**r, "scenario": "zoo-disjoint", "seeds": [0]} for r in rows]}
    assert "| 0 | 1-shot: models=1, inner_steps=0; 5-shot: models=1, inner_steps=10 |" in bench.markdown(report)
