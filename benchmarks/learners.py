"""The few-shot canon's learners meta-trained on pseudo episodes: chosen on meta-val, the winner meta-tested.

    python benchmarks/accuracy.py run glyphs select --jobs 1 --seeds 0 --variants paper paper+kd-logit \\
        eci-matching eci-relation eci-mtl eci-l2f eci-alfa eci-e3bm eci-metal eci-tao \\
        eci-matching+kd-logit ... eci-tao+kd-logit              # each learner, PURER as published and + distillation
    python benchmarks/learners.py glyphs                       # meta-val table, choose -> learners_glyphs.{json,md}
    python benchmarks/accuracy.py run glyphs select --jobs 1 --seeds 1 2 --variants <chosen> paper+kd-logit
    python benchmarks/learners.py glyphs --test                # + the chosen and MAML meta-tested over their seeds

Every run is one of ``benchmarks/accuracy.py``'s ``select`` scenario (the disjoint zoo, 1,000 ECI iterations,
meta-val every 250 on 100 tasks, 1-shot meta-test rows kept for the record).  Choosing: each seed-0 run's
selected learner (with the test-time settings its run chose on meta-val) is scored on the protocol of
``benchmarks/selection.py``: the same seeded 300 meta-val tasks per shot (5-way, 15 queries, task seed 1), paired
differences to MAML of the same variant; the best mean over 1- and 5-shot among the learners the calibrations can
follow (the default runs the whole pipeline, ICFIL included: no transductive learner, no ensemble) is chosen, and
the best of all is named.  Meta-test is not read to choose.  ``--test`` then reports the chosen variant, the
recipe's default, MAML with the same distillation (``paper+kd-logit``, the default before) and PURER as published
over every seed run: 1-shot from the runs' own meta-test rows, 5-shot by the pipeline's own meta-test (test-time lr and steps
chosen on meta-val from the run's grid, then 600 seeded test tasks: :func:`purer.pipeline.evaluate_purer`, no
calibration rows), next to the baselines of ``benchmarks/results/accuracy_glyphs.json`` (disjoint scenario, the
same seeded task lists).  Seconds per iteration: the run's inversion, distillation and meta-update time over its
iterations (meta-val excluded; the zoo-student pre-phase of MTL apart), measured beside other jobs on a shared
2-core machine.  Scores are cached in each run folder (``metaval300.json``, ``metatest5.json``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np
import torch

from purer.data import load_split
from purer.evaluate import EvalResult, evaluate, paired_difference, task_list, fingerprint
from purer.meta import MetaLearner
from purer.pipeline import RunConfig, evaluate_purer
from purer.pipeline.distributed import Dist
from purer.pipeline.run_config import NOT_CALIBRATABLE
from purer.yaml_config import load_config

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
RUNS = REPO / "runs" / "benchmarks"
SCENARIO, TASKS, SEED, SHOTS = "select", 300, 1, (1, 5)
# The recipe's default learner with its distillation (chosen by this benchmark), MAML with the same distillation
# (the default before it, and the reference of the +kd-logit rows' paired differences), PURER as published.
DEFAULT, MAML_KD, PAPER = "eci-l2f+kd-logit", "paper+kd-logit", "paper"
# The rows of the baselines table (disjoint scenario, same task lists) shown beside the chosen learner.
BASELINES = ("maml-random", "maml-avg-teachers", "nc-pixels", "nc-best-teacher", "finetune-best-teacher",
             "nc-all-teachers", "maml-real")
NOTES: list[str] = []  # what was cut or differs, written into the results file (set from the command line)


def learner_of(variant: str) -> tuple[str, str]:
    """``(learner, variant)`` of a run folder's name: ``eci-mtl+kd-logit`` -> ``(mtl, +kd-logit)``."""
    base, sep, parts = variant.partition("+")
    learner = "maml" if base == "paper" else base.partition("-")[2]
    return learner, (sep + parts) or "PURER as published"


def val_scores(folder: Path, val, tasks: dict) -> tuple[dict[int, EvalResult], MetaLearner]:
    """The run's learner on the 300 meta-val tasks per shot (cached in ``metaval300.json``)."""
    cache = folder / "metaval300.json"
    learner = MetaLearner.from_pretrained(folder / "meta_learner")
    ids = {s: fingerprint(t) for s, t in tasks.items()}
    stored = json.loads(cache.read_text()) if cache.is_file() else {}
    out = {}
    for shot, t in tasks.items():
        hit = stored.get(str(shot))
        if hit and hit["tasks_id"] == ids[shot]:
            out[shot] = EvalResult(folder.parts[-2], 5, shot, np.asarray(hit["task_acc"]), hit["test_cost"],
                                   ids[shot], hit["settings"], hit["seconds"])
            continue
        r = evaluate(learner, val, t, method=folder.parts[-2], adapt_kwargs=learner.test_time_settings(shot),
                     progress=False)
        out[shot] = r
        stored[str(shot)] = {"tasks_id": r.tasks_id, "task_acc": r.task_acc.tolist(), "test_cost": r.test_cost,
                             "settings": r.settings, "seconds": r.seconds}
        cache.write_text(json.dumps(stored))
    return out, learner


def per_iteration(results: dict) -> dict:
    mt = results["meta_train"]
    n = max(mt["iterations"], 1)
    return {"seconds_per_iteration": round((mt["seconds_inversion"] + mt["seconds_distill"] + mt["seconds_meta"]) / n, 3),
            "meta_update": round((mt["seconds_distill"] + mt["seconds_meta"]) / n, 3),
            "inversion": round(mt["seconds_inversion"] / n, 3), "pre_phase_seconds": mt.get("seconds_zoo_student", 0.0),
            "run_minutes": round(results["seconds"] / 60, 1)}


def choose(dataset: str, root: Path = RUNS) -> dict:
    """Meta-val of every seed-0 run of the scenario; the chosen variant."""
    folders = sorted(p.parents[1] for p in (root / dataset / SCENARIO).glob("*/seed0/meta_learner/config.json"))
    if not folders:
        raise SystemExit(f"no finished runs under {root / dataset / SCENARIO}")
    cfg = load_config(RunConfig, folders[0] / "config.yaml")
    val = load_split(cfg.data.dataset, "val", cfg.data.root, cfg.data.image_size)
    tasks = {shot: task_list(val, cfg.eval.way, shot, 15, TASKS, SEED) for shot in SHOTS}
    scored, rows = {}, []
    for folder in folders:
        variant = folder.parts[-2]
        scores, learner = val_scores(folder, val, tasks)
        scored[variant] = scores
        results = json.loads((folder / "results.json").read_text())
        test1 = next(r for r in results["rows"] if r["method"] == "purer" and r["shot"] == 1)
        name, kind = learner_of(variant)
        rows.append({"variant": variant, "learner": name, "kind": kind, "learner_class": type(learner).__name__,
                     **{f"val_{s}shot": [round(scores[s].accuracy, 2), round(scores[s].ci95, 2)] for s in SHOTS},
                     "val_mean": round(statistics.fmean(scores[s].accuracy for s in SHOTS), 2),
                     "test_time": {str(s): scores[s].settings for s in SHOTS},
                     "metatest_1shot_record": [test1["accuracy"], test1["ci95"]],
                     "test_cost": test1["test_cost"], "best_iteration": results["meta_train"]["best_iteration"],
                     "switch_fired": results["meta_train"]["switch_fired"], **per_iteration(results)})
    for r in rows:  # paired against MAML of the same variant (PURER as published, or + distillation)
        ref = PAPER if "kd-logit" not in r["variant"] else MAML_KD
        if ref in scored and r["variant"] != ref:
            for s in SHOTS:
                d, ci = paired_difference(scored[r["variant"]][s], scored[ref][s])
                r[f"vs_maml_{s}shot"] = [round(d, 2), round(ci, 2)]
    # The default must run the whole pipeline: an inductive learner that ICFIL and support CE can follow.
    for r in rows:
        r["default_eligible"] = r["learner"] not in NOT_CALIBRATABLE
    best = max(rows, key=lambda r: r["val_mean"])["variant"]
    chosen = max((r for r in rows if r["default_eligible"]), key=lambda r: r["val_mean"])["variant"]
    return {"dataset": dataset, "scenario": SCENARIO, "split": "val", "tasks": TASKS, "task_seed": SEED,
            "chosen": chosen, "best_overall": best, "default": DEFAULT,
            "rows": sorted(rows, key=lambda r: -r["val_mean"])}


def meta_test(dataset: str, variant: str, root: Path = RUNS) -> dict:
    """The variant's meta-test over its seed runs: 1-shot from each run, 5-shot by the pipeline's meta-test."""
    seeds = []
    for folder in sorted((root / dataset / SCENARIO / variant).glob("seed*")):
        if not (folder / "meta_learner" / "config.json").is_file():
            continue
        results = json.loads((folder / "results.json").read_text())
        one = next(r for r in results["rows"] if r["method"] == "purer" and r["shot"] == 1)
        cache = folder / "metatest5.json"
        if cache.is_file():
            five = json.loads(cache.read_text())
        else:
            cfg = load_config(RunConfig, folder / "config.yaml", ["eval.shots=[5]", "eval.calibrations=[]",
                                                                  "eval.calibration_grid={}"])
            splits = {s: load_split(cfg.data.dataset, s, cfg.data.root, cfg.data.image_size) for s in ("val", "test")}
            learner = MetaLearner.from_pretrained(folder / "meta_learner")
            rows, _ = evaluate_purer(cfg, learner, splits, Dist(), progress=False)
            five = rows[0]
            cache.write_text(json.dumps(five))
        seeds.append({"seed": int(folder.name[4:]), "1": [one["accuracy"], one["ci95"]],
                      "5": [five["accuracy"], five["ci95"]], "settings_5shot": five.get("settings", {}),
                      **per_iteration(results)})
    if not seeds:
        return {}
    summary = {"variant": variant, "seeds": [s["seed"] for s in seeds], "per_seed": seeds}
    for shot in ("1", "5"):
        accs = [s[shot][0] for s in seeds]
        summary[shot] = {"accuracy": round(statistics.fmean(accs), 2),
                         "ci95": round(statistics.fmean(s[shot][1] for s in seeds), 2),
                         "seed_sd": round(statistics.stdev(accs), 2) if len(accs) > 1 else None}
    return summary


def baselines(dataset: str) -> list[dict]:
    path = RESULTS / f"accuracy_{dataset}.json"
    if not path.is_file():
        return []
    rows = [r for r in json.loads(path.read_text())["rows"] if r["scenario"] == "disjoint" and r["method"] in BASELINES]
    out = {}
    for r in rows:
        out.setdefault(r["method"], {"method": r["method"], "seeds": r["seeds"]})[str(r["shot"])] = \
            [r["accuracy"], r["ci95"]]
    return [out[m] for m in BASELINES if m in out]


def markdown(report: dict) -> str:
    v = report["val"]
    lines = [f"# The few-shot canon on pseudo episodes: {report['dataset']}, the disjoint zoo", "",
             "Each learner meta-trained on pseudo episodes by ECI (12 Conv4 teachers on disjoint 5-class blocks, "
             "1,000 iterations, seed 0; scenario `select` of `benchmarks/accuracy.py`), with PURER as published "
             "(`recipes/configs/purer-paper.yaml`) and with the default's zoo distillation (`distill.logit=1`). "
             f"Chosen on meta-val only: {v['tasks']} meta-val tasks per shot (5-way, 15 queries, task seed "
             f"{v['task_seed']}), the same for every run, each learner with the test-time settings its run chose on "
             "meta-val; paired differences to MAML of the same variant; the best mean of 1- and 5-shot wins. "
             "Seconds per iteration: inversion + distillation + meta-update over the run's iterations (meta-val "
             "excluded), measured beside other jobs on a shared 2-core CPU (read them as ±40%).", ""]
    lines += [f"- {n}" for n in report.get("notes", [])] + ([""] if report.get("notes") else [])
    lines += ["## Meta-val (seed 0)", "",
              "| learner | variant | 1-shot | vs MAML | 5-shot | vs MAML | mean | s / iteration (meta-update) | "
              "meta-test 1-shot (record, not used) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in v["rows"]:
        cells = []
        for s in SHOTS:
            acc, ci = r[f"val_{s}shot"]
            d = r.get(f"vs_maml_{s}shot")
            cells += [f"{acc:.2f} ± {ci:.2f}", f"{d[0]:+.2f} ± {d[1]:.2f}" if d else ""]
        name = f"**{r['learner']}**" if r["variant"] == v["chosen"] else r["learner"]
        pre = f", + {r['pre_phase_seconds']:.0f} s pre-phase" if r["pre_phase_seconds"] else ""
        lines.append(f"| {name} | {r['kind']} | " + " | ".join(cells) +
                     f" | {r['val_mean']:.2f} | {r['seconds_per_iteration']:.2f} ({r['meta_update']:.2f}){pre} | "
                     f"{r['metatest_1shot_record'][0]:.2f} ± {r['metatest_1shot_record'][1]:.2f} |")
    lines += ["", f"Chosen on meta-val: **{v['chosen']}** (the best of the learners ICFIL and support CE can "
              "follow, which the default must be: " + ", ".join(sorted({r["learner"] for r in v["rows"]
                                                                     if r["default_eligible"]})) + ")."]
    if v.get("best_overall", v["chosen"]) != v["chosen"]:
        lines += [f"Best of all on meta-val: {v['best_overall']} (not eligible as the default: its adaptation reads "
                  "the query images, or it has no linear head a calibration can adapt)."]
    lines.append("")
    tests = report.get("test", [])
    if tests:
        lines += ["## Meta-test (600 tasks per shot, 5-way, 15 queries; the same seeded task lists as the "
                  "baselines)", "", "| method | 1-shot | 5-shot | seeds | s / iteration |", "|---|---|---|---|---|"]
        for t in tests:
            cells = []
            for shot in ("1", "5"):
                sd = f" (sd {t[shot]['seed_sd']:.2f})" if t[shot]["seed_sd"] is not None else ""
                cells.append(f"{t[shot]['accuracy']:.2f} ± {t[shot]['ci95']:.2f}{sd}")
            secs = statistics.fmean(s["seconds_per_iteration"] for s in t["per_seed"])
            label = t["variant"] + (" (chosen)" if t["variant"] == v["chosen"] else "") + \
                (" (the recipe's default)" if t["variant"] == DEFAULT else "") + \
                (" (MAML + distillation, the default before)" if t["variant"] == MAML_KD else "") + \
                (" (PURER as published)" if t["variant"] == PAPER else "")
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {','.join(map(str, t['seeds']))} | {secs:.2f} |")
        for b in report.get("baselines", []):
            cells = [f"{b[s][0]:.2f} ± {b[s][1]:.2f}" if s in b else "" for s in ("1", "5")]
            lines.append(f"| {b['method']} † | " + " | ".join(cells) + f" | {','.join(map(str, b['seeds']))} | |")
        lines += ["", "Per seed (1-shot / 5-shot): " + "; ".join(
            f"{t['variant']}: " + ", ".join(f"seed {s['seed']} {s['1'][0]:.2f} / {s['5'][0]:.2f}" for s in t["per_seed"])
            for t in tests) + ".", "",
            "† `benchmarks/results/accuracy_glyphs.json`, scenario `disjoint`: rows that do not depend on the "
            "meta-training budget (baselines), on the same seeded meta-test task lists.", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dataset")
    p.add_argument("--test", action="store_true", help="also meta-test the chosen variant and the default, all seeds")
    p.add_argument("--note", action="append", default=[], help="a line for the results file (what was cut, why)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    report = {"dataset": a.dataset, "notes": a.note, "val": choose(a.dataset)}
    if a.test:
        chosen = report["val"]["chosen"]
        report["test"] = [t for t in (meta_test(a.dataset, v) for v in dict.fromkeys([chosen, DEFAULT, MAML_KD, PAPER])) if t]
        report["baselines"] = baselines(a.dataset)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"learners_{a.dataset}.json").write_text(json.dumps(report, indent=1) + "\n")
    (RESULTS / f"learners_{a.dataset}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
