"""benchmarks/selection.py cross: the default chosen across zoos on meta-val, never far below PURER as published."""
import json
from pathlib import Path

import pytest
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


def test_across_zoos_variants_are_compared_on_the_training_seeds_they_share(tmp_path, monkeypatch):
    """A variant run on three seeds is not compared by its mean against another's one lucky seed."""
    sel = load()
    monkeypatch.setattr(sel, "RESULTS", tmp_path)
    rows = [{"variant": v, "seed": seed, "shot": 1, "val_accuracy": acc}
            for v, seed, acc in (("paper", 0, 80), ("default", 0, 90), ("new", 0, 90.5), ("new", 1, 84), ("new", 2, 85))]
    (tmp_path / "selection_glyphs_a.json").write_text(json.dumps({"rows": rows}))
    report = sel.cross([("glyphs", "a")])
    assert {r["variant"]: r["val_accuracy"]["glyphs/a"] for r in report["rows"]} == {"paper": 80, "default": 90,
                                                                                     "new": 90.5}
    assert report["chosen"] == "new" and report["seeds"] == {"glyphs/a": [0]}
    assert "glyphs/a 0" in sel.cross_markdown(report)


def test_a_tie_in_mean_rank_goes_to_the_better_meta_val_over_the_seeds_the_tied_variants_share(tmp_path, monkeypatch):
    """Two variants tied on the one seed every variant ran are told apart by the three seeds both ran."""
    sel = load()
    monkeypatch.setattr(sel, "RESULTS", tmp_path)
    runs = {"a": [("paper", 0, 80), ("lucky", 0, 91), ("steady", 0, 90), ("lucky", 1, 84), ("steady", 1, 89),
                  ("lucky", 2, 85), ("steady", 2, 88)],
            "b": [("paper", 0, 70), ("lucky", 0, 74), ("steady", 0, 75), ("lucky", 1, 74), ("steady", 1, 75)]}
    for zoo, scores in runs.items():
        rows = [{"variant": v, "seed": seed, "shot": 1, "val_accuracy": acc} for v, seed, acc in scores]
        (tmp_path / f"selection_glyphs_{zoo}.json").write_text(json.dumps({"rows": rows}))
    report = sel.cross([("glyphs", "a"), ("glyphs", "b")])
    rows = {r["variant"]: r for r in report["rows"]}
    assert rows["lucky"]["mean_rank"] == rows["steady"]["mean_rank"] == 1.5
    assert rows["lucky"]["mean_val"] == rows["steady"]["mean_val"] == 82.5  # seed 0, which paper ran too
    assert report["chosen"] == "steady"
    assert report["tie_break"] == {"variants": ["lucky", "steady"],
                                   "seeds": {"glyphs/a": [0, 1, 2], "glyphs/b": [0, 1]},
                                   "mean_val": {"lucky": 80.33, "steady": 82.0}}
    assert "tied at mean rank with lucky" in sel.cross_markdown(report)
    one = sel.cross([("glyphs", "b")])  # no tie: no tie-break
    assert "tie_break" not in one


def test_among_named_variants_each_zoo_compares_them_on_every_seed_they_share(tmp_path, monkeypatch):
    """``among``: only the named variants and paper, each zoo on the seeds the named ones share (paper, run on seed 0
    alone, on its own), so a variant's lucky seed 0 of older code no longer decides."""
    sel = load()
    monkeypatch.setattr(sel, "RESULTS", tmp_path)
    rows = [{"variant": v, "seed": seed, "shot": 1, "val_accuracy": acc}
            for v, seed, acc in (("paper", 0, 80), ("old", 0, 95), ("a", 0, 90), ("a", 1, 86), ("a", 2, 86),
                                 ("b", 0, 89), ("b", 1, 89), ("b", 2, 89))]
    (tmp_path / "selection_glyphs_z.json").write_text(json.dumps({"rows": rows}))
    full = sel.cross([("glyphs", "z")])
    assert full["chosen"] == "old" and full["seeds"] == {"glyphs/z": [0]}
    report = sel.cross([("glyphs", "z")], among=["a", "b"])
    assert {r["variant"]: r["val_accuracy"]["glyphs/z"] for r in report["rows"]} == {"paper": 80, "a": 87.33, "b": 89}
    assert report["chosen"] == "b" and report["seeds"] == {"glyphs/z": [0, 1, 2]} and report["among"] == ["a", "b"]
    assert "among a, b; paper on its own seeds" in sel.cross_markdown(report)
    with pytest.raises(SystemExit, match="c was not scored on every zoo"):
        sel.cross([("glyphs", "z")], among=["a", "c"])


def write_reports(folder: Path, reports: dict[str, tuple[dict[str, float], dict]]) -> None:
    """One selection report per zoo: ``{zoo: ({variant: meta-val}, extra report keys)}`` (1-shot rows)."""
    for zoo, (scores, extra) in reports.items():
        rows = [{"variant": v, "seed": 0, "shot": 1, "val_accuracy": acc} for v, acc in scores.items()]
        (folder / f"selection_glyphs_{zoo}.json").write_text(json.dumps({"rows": rows, **extra}))


@pytest.mark.parametrize("variant,property_,where_same", [("default+kd-union", "shared_classes", False),
                                                          ("default+tv-release", "colour_teachers", False),
                                                          ("default+pixels-colour", "grey_teachers", True),
                                                          ("default+pixels-sh", "several_archs", False)])
def test_a_variant_is_the_default_on_a_zoo_without_what_tells_them_apart(tmp_path, monkeypatch, variant, property_,
                                                                         where_same):
    """A union head is the per-teacher heads where no two teachers share a class; the release's R_tv weight
    for colour teachers is the default's where no teacher is colour; the colour rule does not apply where a teacher
    is grey, nor the rule of several architectures to a zoo of one."""
    sel = load()
    monkeypatch.setattr(sel, "RESULTS", tmp_path)
    zoos = [("glyphs", "without"), ("glyphs", "with")]
    reports = {"without": ({"paper": 80, "default": 85}, {property_: where_same}),
               "with": ({"paper": 80, "default": 82, variant: 84}, {property_: not where_same})}
    write_reports(tmp_path, reports)
    report = sel.cross(zoos)
    rows = {r["variant"]: r for r in report["rows"]}
    assert rows[variant]["val_accuracy"] == {"glyphs/without": 85, "glyphs/with": 84}
    assert rows[variant]["stands_in"] == {"glyphs/without": "default"}
    assert report["chosen"] == variant and "85.00 (1) = default" in sel.cross_markdown(report)
    # where the part matters (or a report does not say), nothing stands in: the variant must have run there
    for extra in ({property_: not where_same}, {}):
        write_reports(tmp_path, {"without": (reports["without"][0], extra)})
        assert variant not in {r["variant"] for r in sel.cross(zoos)["rows"]}


def test_variants_run_before_each_synthesizer_rule_line_up_across_zoos(tmp_path, monkeypatch):
    """The pixel bank on every zoo was run as +pixels-sh on SH and +pixels-colour on a colour zoo (each turning off
    the rule of its zoo): one row, default+pixels-colour+pixels-sh, stands for both, and for default on a grey zoo of
    one architecture."""
    sel = load()
    monkeypatch.setattr(sel, "RESULTS", tmp_path)
    grey = {"colour_teachers": False, "grey_teachers": True, "shared_classes": False, "several_archs": False}
    write_reports(tmp_path, {"grey": ({"paper": 80, "default": 85}, grey),
                             "sh": ({"paper": 80, "default": 88, "default+pixels-sh": 86}, {**grey, "several_archs": True}),
                             "colour": ({"paper": 40, "default": 45, "default+pixels-colour": 43},
                                        {**grey, "colour_teachers": True, "grey_teachers": False})})
    rows = {r["variant"]: r for r in sel.cross([("glyphs", "grey"), ("glyphs", "sh"), ("glyphs", "colour")])["rows"]}
    both = rows["default+pixels-colour+pixels-sh"]
    assert both["val_accuracy"] == {"glyphs/grey": 85, "glyphs/sh": 86, "glyphs/colour": 43}
    assert both["stands_in"] == {"glyphs/grey": "default", "glyphs/sh": "default+pixels-sh",
                                 "glyphs/colour": "default+pixels-colour"}
    assert rows["default"]["mean_rank"] == 1.0
    # a rank counts the runs above, not the names that stand for one: on the grey zoo only default's run is above paper
    assert rows["paper"]["ranks"] == {"glyphs/grey": 2, "glyphs/sh": 3, "glyphs/colour": 3}


def test_variants_run_before_the_distillation_rule_line_up_across_zoos(tmp_path, monkeypatch):
    """Runs made before ``distill.images``' rule are named +kd-own on a zoo with a grey teacher (where the rule
    distils on the step's images) and keep their names where the rule gives each teacher its own classes' images (a
    zoo of colour teachers); the synthesizer rules' names join in any combination.  One row stands for each such
    variant on every zoo."""
    sel = load()
    monkeypatch.setattr(sel, "RESULTS", tmp_path)
    grey = {"colour_teachers": False, "grey_teachers": True, "shared_classes": False, "several_archs": False}
    write_reports(tmp_path, {
        "grey": ({"paper": 80, "default": 87, "default+kd-own": 85, "default+it4000+kd-own": 84}, grey),
        "sh": ({"paper": 80, "default": 88, "default+kd-own": 86, "default+it4000+kd-own+pixels-sh": 83},
               {**grey, "several_archs": True}),
        "colour": ({"paper": 40, "default": 45, "default+kd-step": 43, "default+it4000": 44},
                   {**grey, "colour_teachers": True, "grey_teachers": False})})
    zoos = [("glyphs", "grey"), ("glyphs", "sh"), ("glyphs", "colour")]
    rows = {r["variant"]: r for r in sel.cross(zoos)["rows"]}
    older = rows["default+it4000+kd-own+pixels-sh"]
    assert older["val_accuracy"] == {"glyphs/grey": 84, "glyphs/sh": 83, "glyphs/colour": 44}
    assert older["stands_in"] == {"glyphs/grey": "default+it4000+kd-own", "glyphs/colour": "default+it4000"}
    assert rows["default+kd-own"]["val_accuracy"] == {"glyphs/grey": 85, "glyphs/sh": 86, "glyphs/colour": 45}
    assert rows["default+kd-step"]["val_accuracy"] == {"glyphs/grey": 87, "glyphs/sh": 88, "glyphs/colour": 43}
    assert rows["default"]["mean_rank"] == 1.0 and rows["default"]["ranks"] == dict.fromkeys(
        ("glyphs/grey", "glyphs/sh", "glyphs/colour"), 1)
    assert not any("kd-own" in v and "kd-step" in v for v in rows)  # kd-step distils on the step's images everywhere
    among = {r["variant"]: r for r in sel.cross(zoos, among=["default", "default+kd-own", "default+kd-step"])["rows"]}
    assert among["default"]["mean_rank"] == 1.0 and among["default+kd-own"]["ranks"]["glyphs/colour"] == 1
    assert among["default+kd-step"]["ranks"]["glyphs/sh"] == 1


def test_shared_classes_reads_the_bank_against_the_teachers_outputs(tmp_path):
    sel = load()
    for bank, shared in ((60, False), (57, True)):
        (tmp_path / "results.json").write_text(json.dumps(
            {"zoo": {"models": 12, "classes": [5]}, "meta_train": {"bank_classes": bank}}))
        assert sel.shared_classes(tmp_path / "results.json") is shared


def test_colour_and_grey_teachers_read_the_zoos_model_configs(tmp_path):
    sel = load()
    for channels, archs, colour, grey, several in (((1, 1), ("conv4", "conv4"), False, True, False),
                                                   ((3, 1), ("conv4", "conv4"), True, True, False),
                                                   ((3, 3), ("conv4", "resnet10"), True, False, True)):
        zoo = tmp_path / f"zoo{channels}"
        for k, (c, arch) in enumerate(zip(channels, archs)):
            (zoo / f"m{k}").mkdir(parents=True)
            (zoo / f"m{k}" / "config.json").write_text(json.dumps({"in_channels": c, "arch": arch}))
        (tmp_path / "results.json").write_text(json.dumps({"zoo": {"path": str(zoo), "archs": sorted(set(archs))}}))
        inputs = sel.zoo_inputs(tmp_path / "results.json")
        assert inputs == {"colour_teachers": colour, "grey_teachers": grey, "several_archs": several}
    # the zoo folder gone: its channels unknown (nothing stands in on them), its architectures from the run's record
    (tmp_path / "results.json").write_text(json.dumps({"zoo": {"path": str(tmp_path / "gone"), "archs": ["conv4"]}}))
    assert sel.zoo_inputs(tmp_path / "results.json") == {"several_archs": False}
    (tmp_path / "results.json").write_text(json.dumps({"zoo": {"path": str(tmp_path / "gone")}}))
    assert sel.zoo_inputs(tmp_path / "results.json") == {}


def test_a_report_keeps_the_rows_of_runs_made_elsewhere_and_marks_them(tmp_path):
    sel = load()
    old = [{"variant": v, "seed": seed, "shot": 1, "val_accuracy": acc, "ci95": 1.0, "chosen": v == "default"}
           for v, seed, acc in (("default", 0, 90.0), ("default", 1, 89.0), ("paper", 0, 87.0))]
    (tmp_path / "old.json").write_text(json.dumps({"rows": old}))
    rows = sel.carried(tmp_path / "old.json", {("default", 1)})
    assert [(r["variant"], r["seed"]) for r in rows] == [("default", 0), ("paper", 0)]
    assert all(set(r) == {"variant", "seed", "shot", "val_accuracy", "ci95", "carried_from"} for r in rows)
    assert sel.carried(tmp_path / "missing.json", set()) == []
    report = {"dataset": "glyphs", "scenario": "s", "tasks": 300, "task_seed": 1, "chosen": "default",
              "rows": rows + [{"variant": "new", "seed": 0, "shot": 1, "val_accuracy": 91.0, "ci95": 1.0}]}
    text = sel.markdown(report)
    assert "| paper † | 0 |" in text and "| new | 0 |" in text and "earlier report (commit" in text


def test_a_zoo_chooses_on_the_seeds_every_variant_ran_and_pairs_each_run_with_the_chosen_runs_seed():
    """A variant's lucky extra seed does not choose it, and a seed-1 run is compared with the chosen seed-1 run,
    never with its seed 0."""
    sel = load()
    acc = {("steady", 0): [1, 1, 0, 1], ("steady", 1): [1, 0, 0, 1], ("other", 0): [1, 1, 1, 1],
           ("other", 1): [0, 0, 0, 1], ("lucky", 0): [1, 1, 1, 0]}
    rows = [{"variant": v, "seed": seed, "shot": 1, "val_accuracy": 25.0 * sum(a), "tasks_id": "t", "task_acc": a}
            for (v, seed), a in acc.items()]
    chosen, seeds = sel.choose(rows)
    assert (chosen, seeds) == ("other", [0])  # on seed 0 only: other 100, lucky 75, steady 75
    by = {(r["variant"], r["seed"]): r for r in rows}
    assert by["steady", 1]["vs_chosen"][0] == 25.0  # 50 against other's seed 1 (25), not its seed 0 (100)
    assert by["steady", 0]["vs_chosen"][0] == -25.0 and "vs_chosen" not in by["other", 0]
    assert by["other", 1]["chosen"] and not by["lucky", 0]["chosen"]
    # once every variant has both seeds, the choice reads both: other 62.5, steady 62.5, lucky 87.5
    rows.append({"variant": "lucky", "seed": 1, "shot": 1, "val_accuracy": 100.0, "tasks_id": "t", "task_acc": [1] * 4})
    assert sel.choose(rows) == ("lucky", [0, 1])
    assert by["other", 1]["vs_chosen"][0] == -75.0 and by["steady", 1]["vs_chosen"][0] == -50.0
    assert "vs_chosen" not in by["lucky", 0] and not by["other", 0]["chosen"]


def fake_runs(sel, monkeypatch, tmp_path, configs: dict[str, dict], acc: dict[str, list[float]]) -> list:
    """Finished runs of scenario ``s`` (variant -> its ``meta_learner/config.json``) whose scoring is faked: each
    variant's per-task accuracies ``acc``; returns the list ``(variant, shot, calibration)`` of what was evaluated."""
    import numpy as np
    from purer.evaluate import EvalResult

    for variant, config in configs.items():
        folder = tmp_path / "glyphs" / "s" / variant / "seed0"
        (folder / "meta_learner").mkdir(parents=True)
        (folder / "meta_learner" / "config.json").write_text(json.dumps(config))
        (folder / "meta_learner" / "model.safetensors").write_bytes(variant.encode())
        (folder / "results.json").write_text(json.dumps({"zoo": {"models": 2, "classes": [5], "path": str(tmp_path)},
                                                         "meta_train": {"bank_classes": 10}}))
    evaluated = []

    def fake_evaluate(learner, source, tasks, *, method, adapt_kwargs, progress):
        evaluated.append((method, len(tasks[0]), getattr(getattr(learner, "calibrator", None), "name", "none")))
        return EvalResult(method=method, way=5, shot=len(tasks[0]), task_acc=np.array(acc[method]), test_cost={},
                          tasks_id=f"tasks{len(tasks[0])}")

    monkeypatch.setattr(sel, "load_config", lambda cls, path: type("C", (), {
        "data": type("D", (), {"dataset": "glyphs", "root": None, "image_size": 8})(),
        "eval": type("E", (), {"way": 5})()})())
    monkeypatch.setattr(sel, "load_split", lambda *a: None)
    monkeypatch.setattr(sel, "task_list", lambda val, way, shot, query, tasks, seed: [[0] * shot])
    monkeypatch.setattr(sel, "fingerprint", lambda tasks: f"tasks{len(tasks[0])}")
    monkeypatch.setattr(sel, "evaluate", fake_evaluate)
    monkeypatch.setattr(sel.MetaLearner, "from_pretrained",
                        classmethod(lambda cls, folder: type("L", (), {"test_time_settings": lambda self, s: {},
                                                                      "tunable": ()})()))
    return evaluated


def test_a_report_scores_again_only_the_runs_that_changed(tmp_path, monkeypatch):
    """Rescoring a zoo evaluates new or changed learners only; the rest keep their rows and per-task accuracies."""
    sel = load()
    evaluated = fake_runs(sel, monkeypatch, tmp_path, {"default": {}, "paper": {}},
                          {"default": [1.0, 0.5], "paper": [0.5, 0.5]})
    report = sel.score("glyphs", "s", shots=(1,), root=tmp_path)
    assert sorted(evaluated) == [("default", 1, "none"), ("paper", 1, "none")] and report["chosen"] == "default"
    assert {r["variant"]: r["vs_chosen"][0] for r in report["rows"] if "vs_chosen" in r} == {"paper": -25.0}
    (tmp_path / "report.json").write_text(json.dumps(report))
    evaluated.clear()
    again = sel.score("glyphs", "s", shots=(1,), root=tmp_path, previous=tmp_path / "report.json")
    assert evaluated == [] and again["rows"] == report["rows"]
    (tmp_path / "glyphs" / "s" / "paper" / "seed0" / "meta_learner" / "model.safetensors").write_bytes(b"retrained")
    sel.score("glyphs", "s", shots=(1,), root=tmp_path, previous=tmp_path / "report.json")
    assert evaluated == [("paper", 1, "none")]
    evaluated.clear()  # a run moved to another variant's folder is the same learner: its scores move with it
    (tmp_path / "glyphs" / "s" / "default").rename(tmp_path / "glyphs" / "s" / "default+renamed")
    moved = sel.score("glyphs", "s", shots=(1,), root=tmp_path, previous=tmp_path / "report.json")
    assert evaluated == [("paper", 1, "none")]
    assert [r["val_accuracy"] for r in moved["rows"] if r["variant"] == "default+renamed"] == [75.0]
    assert "default" not in {r["variant"] for r in moved["rows"]}  # not carried as a run made elsewhere
    (tmp_path / "moved.json").write_text(json.dumps({**moved, "rows": [*moved["rows"], *sel.carried(
        tmp_path / "report.json", set())]}))  # a report that carried the old name before it knew the learner
    again = sel.score("glyphs", "s", shots=(1,), root=tmp_path, previous=tmp_path / "moved.json")
    assert sorted(r["variant"] for r in again["rows"]) == ["default+renamed", "paper"]
    # --only: the other runs keep their rows of a report that has no per-task accuracies, unevaluated
    old = {"chosen": "default+renamed",
           "rows": [{"variant": "default+renamed", "seed": 0, "shot": 1, "val_accuracy": 90.0, "ci95": 1.0},
                    {"variant": "paper", "seed": 0, "shot": 1, "val_accuracy": 80.0, "ci95": 1.0,
                     "vs_chosen": [-10.0, 1.0]}]}
    (tmp_path / "old.json").write_text(json.dumps(old))
    evaluated.clear()
    kept = sel.score("glyphs", "s", shots=(1,), root=tmp_path, previous=tmp_path / "old.json", only={"paper"})
    assert evaluated == [("paper", 1, "none")]
    assert {r["variant"]: r["val_accuracy"] for r in kept["rows"]} == {"default+renamed": 90.0, "paper": 50.0}
    # a kept row keeps its difference to the same chosen variant's run of its seed
    (tmp_path / "old.json").write_text(json.dumps({**old, "rows": old["rows"] + [
        {"variant": "default+avg", "seed": 0, "shot": 1, "val_accuracy": 85.0, "ci95": 1.0, "vs_chosen": [-5.0, 1.0]}]}))
    (tmp_path / "glyphs" / "s" / "default+renamed").rename(tmp_path / "glyphs" / "s" / "default+avg")
    (tmp_path / "glyphs" / "s" / "paper").rename(tmp_path / "glyphs" / "s" / "default+renamed")
    kept = sel.score("glyphs", "s", shots=(1,), root=tmp_path, previous=tmp_path / "old.json", only={"paper"})
    assert {r["variant"]: r.get("vs_chosen") for r in kept["rows"]} == {"default+renamed": None,
                                                                        "default+avg": [-5.0, 1.0], "paper": None}


def test_a_run_is_scored_with_the_calibration_it_chose_for_each_shot(tmp_path, monkeypatch):
    """A run that chose SimpleShot at 1-shot on its meta-val is scored with it there (what its user gets) and plain at
    5-shot; a row scored plain before is scored again, one scored with the same calibration is kept."""
    sel = load()
    chose = {"calibration": {"1": {"name": "simpleshot", "settings": {}}, "5": {"name": "none", "settings": {}}}}
    evaluated = fake_runs(sel, monkeypatch, tmp_path, {"default": chose}, {"default": [1.0, 0.5]})
    report = sel.score("glyphs", "s", shots=(1, 5), root=tmp_path)
    assert sorted(evaluated) == [("default", 1, "simpleshot"), ("default", 5, "none")]
    assert {r["shot"]: r.get("calibration") for r in report["rows"]} == {1: "simpleshot", 5: None}
    assert "(simpleshot)" in sel.markdown(report)
    plain = {**report, "rows": [{k: v for k, v in r.items() if k != "calibration"} for r in report["rows"]]}
    (tmp_path / "plain.json").write_text(json.dumps(plain))
    evaluated.clear()
    sel.score("glyphs", "s", shots=(1, 5), root=tmp_path, previous=tmp_path / "plain.json")
    assert evaluated == [("default", 1, "simpleshot")]
    (tmp_path / "report.json").write_text(json.dumps(report))
    evaluated.clear()
    assert sel.score("glyphs", "s", shots=(1, 5), root=tmp_path, previous=tmp_path / "report.json")["rows"] \
        == report["rows"] and evaluated == []


def test_a_stand_in_drops_only_the_parts_that_change_nothing_on_the_zoo():
    sel = load()
    grey = {"colour_teachers": False, "grey_teachers": True, "shared_classes": False, "several_archs": False}
    colour = {"colour_teachers": True, "grey_teachers": False, "shared_classes": False, "several_archs": False}
    assert sel.stand_in("default+avg+pixels-colour", grey) == "default+avg"
    assert sel.stand_in("default+it3000+p2+pixels-colour", grey) == "default+it3000+p2"
    assert sel.stand_in("default+kd-union+tv-release", grey) == "default"
    assert sel.stand_in("default+kd-union+tv-release", colour) == "default+tv-release"
    assert sel.stand_in("default+it3000+p2+pixels-colour", colour) is None
    assert sel.stand_in("default+avg", grey) is None and sel.stand_in("default+pixels-colour", {}) is None
    # the generator for every zoo is the colour rule's on a zoo of colour teachers only
    assert sel.stand_in("default+it3000+p2+gen1", colour) == "default+it3000+p2"
    assert sel.stand_in("default+it3000+p2+gen1", grey) is None
    # the colour rule's generator, and so its width, runs on a zoo of colour teachers only
    mixed = {"colour_teachers": True, "grey_teachers": True, "shared_classes": False, "several_archs": False}
    assert sel.stand_in("default+it3000+p2+pixels-colour", mixed) == "default+it3000+p2"
    assert sel.stand_in("default+it3000+p2+w32", grey) == "default+it3000+p2"
    assert sel.stand_in("default+it3000+p2+w32", mixed) == "default+it3000+p2"
    assert sel.stand_in("default+it3000+p2+w32", colour) is None
    assert sel.stand_in("default+it3000+p2+gen1+w32", grey) is None  # gen1 runs the generator there
    assert sel.stand_in("default+it3000+p2+gen1+w32", colour) == "default+it3000+p2+w32"
    assert sel.stand_in("default+it3000+p2+w32", {"colour_teachers": False}) is None  # unknown: not the same
    # a zoo of several architectures (SH, grey): its rule gives the generator, so gen1 changes nothing, and width does
    sh = {**grey, "several_archs": True}
    assert sel.stand_in("default+it3000+p2+gen1", sh) == "default+it3000+p2"
    assert sel.stand_in("default+it3000+p2+gen1+w32", sh) == "default+it3000+p2+w32"
    assert sel.stand_in("default+it3000+p2+w32", sh) is None
    assert sel.stand_in("default+it3000+p2+gen1+pixels-sh", sh) is None  # gen1 runs the generator the rule would not
    assert sel.stand_in("default+it3000+p2+pixels-sh", sh) is None
    assert sel.stand_in("default+it3000+p2+pixels-sh", grey) == "default+it3000+p2"
    # the pixel bank on every zoo, as before both rules
    assert sel.stand_in("default+it3000+p2+pixels-colour+pixels-sh", sh) == "default+it3000+p2+pixels-sh"
    assert sel.stand_in("default+it3000+p2+pixels-colour+pixels-sh", colour) == "default+it3000+p2+pixels-colour"
    # what the teachers are distilled on: their own classes' images where the rule gives them (a zoo of colour
    # teachers only), the step's elsewhere
    assert sel.stand_in("default+it3000+p2+kd-own", colour) == "default+it3000+p2"
    assert sel.stand_in("default+it3000+p2+kd-step", colour) is None
    for zoo in (grey, mixed, sh):
        assert sel.stand_in("default+it3000+p2+kd-own", zoo) is None
        assert sel.stand_in("default+it3000+p2+kd-step", zoo) == "default+it3000+p2"
    assert sel.stand_in("default+it4000+p2+kd-own+pixels-sh", sh) is None
    assert sel.stand_in("default+it4000+p2+kd-own+pixels-sh", grey) == "default+it4000+p2+kd-own"
    assert sel.stand_in("default+it4000+p2+kd-own+pixels-sh", colour) == "default+it4000+p2"
    # PURER as published turns both rules off: gen1 runs the generator there, and nothing stands in for it
    assert sel.stand_in("paper+gen1", sh) is None and sel.stand_in("paper+gen1", colour) is None
    assert sel.stand_in("paper+kd-union", grey) == "paper"
