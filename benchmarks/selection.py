"""Choosing among PURER's variants on meta-val, never on meta-test.

    python benchmarks/selection.py glyphs select     # -> benchmarks/results/selection_glyphs_select.{json,md}
    python benchmarks/selection.py cross glyphs:zoo-disjoint glyphs:zoo-random100 glyphs:zoo-sh icons:zoo-disjoint
                                                     # -> benchmarks/results/selection_cross_zoo.{json,md}

For every finished run of ``benchmarks/accuracy.py`` under ``runs/benchmarks/<dataset>/<scenario>/``,
the run's selected meta-learner (``meta_learner/``, with the test-time settings and, per shot, the calibration
its run chose on meta-val: what a user of the run gets, e.g. SimpleShot at 1-shot, :func:`chosen_calibration`)
is scored on a fixed list of 300 meta-val tasks per shot (5-way, 15 queries, task seed 1: more tasks than a
run's own selection uses, so that variants a point or two apart can be told apart).  The variant with the
best mean over shots, on the training seeds every variant ran, is marked ``chosen``; every variant is scored
on the same tasks, so each run is paired with the chosen variant's run of its training seed.  A report keeps
its per-task accuracies, so scoring a zoo again evaluates only the runs that are new or changed.  Meta-test is
not read.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np
import torch

from purer.calibrate import chosen_calibration
from purer.data import load_split
from purer.evaluate import evaluate, fingerprint, mean_ci95, task_list
from purer.meta import MetaLearner
from purer.pipeline import RunConfig
from purer.yaml_config import load_config

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
RUNS = REPO / "runs" / "benchmarks"
TASKS, SEED = 300, 1


def score(dataset: str, scenario: str, shots: tuple[int, ...] = (1, 5), root: Path = RUNS,
          previous: Path | None = None, only: set[str] | None = None) -> dict:
    """Meta-val accuracy of every finished run of the scenario (see the module docstring); with ``previous`` (a
    report of this scenario), its rows of the (variant, seed)s that have no run here, marked ``carried_from`` (the
    commit that last changed its scores): the runs behind a report live on the machine that made them, and the
    tasks are the same, so a variant run later is scored beside them.  A run whose learner (:func:`learner_id`) was
    scored on these tasks in ``previous`` keeps that row's per-task accuracies, whatever its folder is called now:
    only new or changed learners are evaluated again.  With ``only`` (variant names), the runs of other variants
    that ``previous`` has rows for keep those rows as they are, without evaluating their learners (for a report
    written before reports kept per-task accuracies: such rows have no paired differences)."""
    runs = sorted((root / dataset / scenario).glob("*/seed*/meta_learner/config.json"))
    if not runs:
        raise SystemExit(f"no finished runs under {root / dataset / scenario}")
    cfg = load_config(RunConfig, runs[0].parents[1] / "config.yaml")
    val = load_split(cfg.data.dataset, "val", cfg.data.root, cfg.data.image_size)
    tasks = {shot: task_list(val, cfg.eval.way, shot, 15, TASKS, SEED) for shot in shots}
    ids = {shot: fingerprint(t) for shot, t in tasks.items()}
    old_report = json.loads(previous.read_text()) if previous is not None and previous.is_file() else {"rows": []}
    # a learner already scored on these tasks (under any variant name) keeps its scores
    before = {(r["learner"], r["shot"], r["tasks_id"]): r for r in old_report["rows"] if "learner" in r and "task_acc" in r}
    as_before = {} if only is None else {(r["variant"], r["seed"], r["shot"]): r for r in old_report["rows"]
                                         if r["variant"] not in only and "carried_from" not in r}
    rows = []
    for folder in runs:
        variant, seed = folder.parts[-4], int(folder.parts[-3][4:])
        if variant == "baselines":  # its learner is untrained: not a candidate
            continue
        if all((variant, seed, shot) in as_before for shot in shots):
            rows += [{k: v for k, v in as_before[variant, seed, shot].items() if k not in ("chosen", "vs_chosen")}
                     for shot in shots]
            continue
        learner, learner_hash = None, learner_id(folder.parent)
        for shot in shots:
            # what the run delivers at this shot: its learner and the calibration it chose on its own meta-val
            cal = chosen_calibration(folder.parent, shot)
            how = {} if cal.name == "none" else {"calibration": cal.name}
            old = before.get((learner_hash, shot, ids[shot]))
            if old is not None and old.get("calibration", "none") == cal.name:
                rows.append({"variant": variant, "seed": seed, "shot": shot, **how,
                             **{k: old[k] for k in ("val_accuracy", "ci95", "learner", "tasks_id", "task_acc")}})
                continue
            learner = learner or MetaLearner.from_pretrained(folder.parent)
            r = evaluate(cal.wrap(learner), val, tasks[shot], method=variant,
                         adapt_kwargs=learner.test_time_settings(shot), progress=False)
            rows.append({"variant": variant, "seed": seed, "shot": shot, **how, "val_accuracy": round(r.accuracy, 2),
                         "ci95": round(r.ci95, 2), "learner": learner_hash, "tasks_id": r.tasks_id,
                         "task_acc": [round(float(a), 6) for a in r.task_acc]})
    rows += carried(previous, {(r["variant"], r["seed"]) for r in rows}, {r["learner"] for r in rows if "learner" in r})
    chosen, seeds = choose(rows)
    if as_before and old_report.get("chosen") == chosen:
        # a kept row paired with the same chosen variant's first seed (as reports without per-task accuracies
        # paired every row) is paired on the same seed when it is of that seed: it keeps that difference
        first = min(r["seed"] for r in rows if r["variant"] == chosen)
        for r in rows:
            old = as_before.get((r["variant"], r["seed"], r["shot"]), {})
            if "task_acc" not in r and r["seed"] == first and "vs_chosen" in old and not r["chosen"]:
                r["vs_chosen"] = old["vs_chosen"]
    return {"dataset": dataset, "scenario": scenario, "tasks": TASKS, "task_seed": SEED, "split": "val",
            "chosen": chosen, "seeds": seeds, "shared_classes": shared_classes(runs[0].parents[1] / "results.json"),
            # what this machine cannot read of the zoo, as the previous report had it
            **{k: old_report[k] for k in ZOO_KEYS if k in old_report}, **zoo_inputs(runs[0].parents[1] / "results.json"),
            "rows": rows}


#: The keys of a scored row that every report has (rows of older reports have no per-task accuracies).
SCORED = ("variant", "seed", "shot", "val_accuracy", "ci95")


def learner_id(folder: Path) -> str:
    """A hash of a run's saved meta-learner (``meta_learner/``: weights, config, test-time settings): a row scored
    from it stays valid while it is unchanged."""
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def seed_means(per: dict[str, dict[int, list[float]]]) -> tuple[dict[str, float], list[int]]:
    """Each variant's mean meta-val over the training seeds all the variants of ``per`` (variant -> seed -> scores)
    ran with, or over all its own seeds where they share none (a variant run on more seeds would otherwise be
    compared by its mean against another's one seed); and those shared seeds."""
    common = set.intersection(*(set(seeds) for seeds in per.values())) if per else set()
    return ({v: statistics.fmean(acc for seed in (common or seeds) for acc in seeds[seed]) for v, seeds in per.items()},
            sorted(common))


def choose(rows: list[dict]) -> tuple[str, list[int]]:
    """Mark the ``chosen`` variant of a report's rows (the best mean over shots on the training seeds every variant
    ran, :func:`seed_means`) and give every other row with per-task accuracies its paired difference to the chosen
    variant's run of the same training seed and shot (``vs_chosen``: mean, 95% CI; none where the chosen variant
    has no such run).  Returns the chosen variant and the seeds it was chosen on."""
    per: dict[str, dict[int, list[float]]] = {}
    for r in rows:
        per.setdefault(r["variant"], {}).setdefault(r["seed"], []).append(r["val_accuracy"])
    means, seeds = seed_means(per)
    chosen = max(means, key=means.get)
    mine = {(r["seed"], r["shot"]): r for r in rows if r["variant"] == chosen and "task_acc" in r}
    for r in rows:
        r["chosen"] = r["variant"] == chosen
        r.pop("vs_chosen", None)
        ref = mine.get((r["seed"], r["shot"]))
        if not r["chosen"] and ref is not None and "task_acc" in r and r["tasks_id"] == ref["tasks_id"]:
            d, ci = mean_ci95(np.asarray(r["task_acc"]) - np.asarray(ref["task_acc"]))
            r["vs_chosen"] = [round(100 * d, 2), round(100 * ci, 2)]
    return chosen, seeds


def carried(previous: Path | None, present: set[tuple[str, int]], learners: set[str] = frozenset()) -> list[dict]:
    """The rows of the report ``previous`` whose (variant, seed) is not in ``present`` (see :func:`score`), marked with
    the commit that last changed the report's scores; a row of a learner in ``learners`` (scored here, its run
    folder since renamed) is not carried."""
    if previous is None or not previous.is_file():
        return []
    # the commit that last changed the report's scores (not merely its other keys)
    commit = subprocess.run(["git", "log", "-1", "--format=%h", "-G", '"val_accuracy"', "--", str(previous)], cwd=REPO,
                            capture_output=True, text=True).stdout.strip() or "unknown"
    # per-task accuracies, where the report kept them, still pair the row with the runs scored here
    keep = (*SCORED, "calibration", "learner", "tasks_id", "task_acc")
    return [{**{k: r[k] for k in keep if k in r}, "carried_from": r.get("carried_from", commit)}
            for r in json.loads(previous.read_text())["rows"]
            if (r["variant"], r["seed"]) not in present and r.get("learner") not in learners]


def shared_classes(results: Path) -> bool:
    """Whether the zoo of a run (its ``results.json``) has teachers that share a class: its bank has fewer
    classes than the teachers have outputs (the bank merges the classes teachers name alike).  Unknown (teachers
    of several class counts): ``True``."""
    data = json.loads(results.read_text())
    zoo, bank = data["zoo"], data["meta_train"]["bank_classes"]
    return len(zoo["classes"]) != 1 or bank < zoo["models"] * zoo["classes"][0]


#: The report keys of :func:`zoo_inputs`.
ZOO_KEYS = ("colour_teachers", "grey_teachers", "several_archs")


def zoo_inputs(results: Path) -> dict[str, bool]:
    """The report keys of the teachers of the zoo of a run (its ``results.json``), from their configs:
    ``colour_teachers``, whether a teacher takes colour input (whose R_tv weight is ``inversion.a_tv_colour``),
    ``grey_teachers``, whether one takes other input (so ``inversion.synthesizer_colour`` does not apply), and
    ``several_archs``, whether they are of more than one architecture (``inversion.synthesizer_heterogeneous``
    applies, from the run's record of its zoo); what cannot be read is left out (unknown, so no run stands in for
    another there), e.g. the input channels of a zoo folder no longer there."""
    zoo = json.loads(results.read_text())["zoo"]
    found = {"several_archs": len(zoo["archs"]) > 1} if "archs" in zoo else {}
    channels = [json.loads(c.read_text()).get("in_channels", 3) for c in Path(zoo["path"]).glob("*/config.json")]
    if channels:
        found.update(colour_teachers=3 in channels, grey_teachers=any(c != 3 for c in channels))
    return found


def markdown(report: dict) -> str:
    shots = sorted({r["shot"] for r in report["rows"]})
    lines = [f"# Choosing the default on meta-val: {report['dataset']}, scenario {report['scenario']}", "",
             f"{report['tasks']} meta-val tasks per shot (5-way, 15 queries, task seed {report['task_seed']}), "
             "the same for every variant; mean ± 95% CI (%), and the paired difference to the chosen variant's run "
             "of the same training seed. Chosen (best mean over shots, on the training seeds every variant ran: "
             f"{', '.join(map(str, report.get('seeds', []))) or 'none shared, each its own'}): "
             f"**{report['chosen']}**. A calibration in brackets: the one the run chose for that shot on its own "
             "meta-val, scored with it.", "",
             "| variant | seed | " + " | ".join(f"{s}-shot | vs chosen" for s in shots) + " |",
             "|---|---|" + "---|---|" * len(shots)]
    cell = {(r["variant"], r["seed"], r["shot"]): r for r in report["rows"]}
    for variant, seed in sorted({(r["variant"], r["seed"]) for r in report["rows"]},
                                key=lambda vs: (-statistics.fmean(cell[vs + (s,)]["val_accuracy"] for s in shots), vs)):
        parts = []
        for s in shots:
            r = cell[variant, seed, s]
            diff = r.get("vs_chosen")
            how = f" ({r['calibration']})" if "calibration" in r else ""
            parts += [f"{r['val_accuracy']:.2f} ± {r['ci95']:.2f}{how}",
                      f"{diff[0]:+.2f} ± {diff[1]:.2f}" if diff else ""]
        mark = " †" if "carried_from" in cell[variant, seed, shots[0]] else ""
        lines.append(f"| {variant}{mark} | {seed} | " + " | ".join(parts) + " |")
    commits = sorted({r["carried_from"] for r in report["rows"] if "carried_from" in r})
    if commits:
        lines += ["", f"† scored on the same tasks by an earlier report (commit {', '.join(commits)}); its run is not "
                      "on this machine, so it is paired only where that report kept its per-task accuracies."]
    return "\n".join(lines) + "\n"


#: How far below PURER as published a default may fall on any zoo's meta-val (points, mean over shots).
MARGIN = 1.0
#: Variant parts (``benchmarks/accuracy.py``) that change nothing on a zoo whose properties (keys of a :func:`score`
#: report) have the given values, unless the variant also has one of the parts named with them: there a variant
#: with the part is the same model as the variant without it, whose run stands for it.  On a zoo whose teachers
#: share no class the union head's rows split into the per-teacher heads (``DistillConfig.heads``); on a zoo
#: without colour teachers ``inversion.a_tv_colour`` weighs nothing; on a zoo with a grey teacher
#: ``inversion.synthesizer_colour`` never applies, and on a zoo of one architecture
#: ``inversion.synthesizer_heterogeneous`` never does, so where neither applies no generator runs and its width
#: changes nothing (unless the variant's ``gen1`` runs it); ``gen1`` changes nothing where a rule already gives the
#: generator (on a zoo of colour teachers only, or of several architectures), unless the variant turns that rule off.
#: What the teachers are distilled on has a rule too (``DistillConfig.images``): ``kd-own`` changes nothing where the
#: rule already gives each teacher its own classes' images (a zoo of colour teachers only), and ``kd-step`` nothing
#: where it does not apply (a zoo with a grey teacher: the recipe distils on the step's images there).
SAME_WITHOUT = {"kd-union": [({"shared_classes": False}, ())], "tv-release": [({"colour_teachers": False}, ())],
                "kd-own": [({"grey_teachers": False}, ())], "kd-step": [({"grey_teachers": True}, ())],
                "pixels-colour": [({"grey_teachers": True}, ())], "pixels-sh": [({"several_archs": False}, ())],
                "w32": [({"grey_teachers": True, "several_archs": False}, ("gen1",))],
                "gen1": [({"grey_teachers": False}, ("pixels-colour",)), ({"several_archs": True}, ("pixels-sh",))]}
#: The parts whose entries above hold for the recipe's defaults (its synthesizer rules on) only.
RULE_PARTS = {"pixels-colour", "pixels-sh", "w32", "gen1"}


def stand_in(variant: str, report: dict) -> str | None:
    """The variant whose run is the same model as ``variant`` on the zoo of ``report`` (:data:`SAME_WITHOUT`): its
    name without the parts that change nothing there; ``None`` if it has no such part (or the report does not say
    what its zoo holds)."""
    base, *parts = variant.split("+")
    if base != "default" and set(parts) & RULE_PARTS:
        return None  # PURER as published and the named variants turn both rules off: a part of them is not a no-op

    def changes_nothing(part: str) -> bool:
        return any(all(k in report and report[k] is v for k, v in where.items()) and not set(unless) & set(parts)
                   for where, unless in SAME_WITHOUT.get(part, ()))

    kept = [p for p in parts if not changes_nothing(p)]
    return "+".join([base, *kept]) if len(kept) < len(parts) else None


#: The parts that switch a per-zoo rule off (``benchmarks/accuracy.py``): each teacher on its own classes' images
#: where the rule would distil on the step's, and the pixel bank where a rule would give the generator; each with
#: the parts that set that setting on every zoo themselves (a variant with one has no such rule to turn off).
RULES_OFF = {"kd-own": {"kd-step"}, "pixels-colour": set(), "pixels-sh": set()}


def rules_off(variant: str) -> list[str]:
    """``variant`` with each combination of per-zoo rules off (its other parts kept, the rules' parts last in one
    order): on each zoo the variant some run there stands for, so a variant run on each zoo before some of the rules
    (under names that turn off only the rules that apply to that zoo) is compared across zoos."""
    base, *parts = variant.split("+")
    kept = [base, *(p for p in parts if p not in RULES_OFF)]
    rules = [r for r, decided_by in RULES_OFF.items() if not decided_by & set(parts)]
    return ["+".join([*kept, *off]) for n in range(len(rules) + 1) for off in itertools.combinations(rules, n)]


def cross(zoos: list[tuple[str, str]], reference: str = "paper", among: list[str] | None = None) -> dict:
    """The default chosen across zoos, from each zoo's :func:`score` report (``selection_<dataset>_<scenario>.json``).

    Per zoo, each variant's meta-val is the mean over shots and over the training seeds that every variant there ran
    with (all its seeds where they share none); the variants are ranked per zoo.  Eligible are the
    variants run on every zoo whose meta-val is nowhere more than :data:`MARGIN` points below ``reference``'s;
    the chosen one has the best mean rank among them (ties: the better mean meta-val over the training seeds the tied
    variants share, then over the seeds every variant shares).  On a zoo without the
    property that tells it apart, a variant with a part of :data:`SAME_WITHOUT` takes the meta-val of the variant it
    is the same model as there (:func:`stand_in`; marked in ``stands_in``).  Meta-test is not read.

    With ``among`` (variant names), only those variants and ``reference`` are compared, each zoo on the training
    seeds those variants share (``reference`` on its own seeds): e.g. the variants run on today's code, on every
    seed they ran, without the rows of older code (whose seed 0 was drawn by other code) or the seed 0 that an
    older variant limits the whole table to.
    """
    per_seed: dict[str, dict[str, dict[int, list[float]]]] = {}  # variant -> zoo -> training seed -> meta-val rows
    stands_in: dict[str, dict[str, str]] = {}
    reports = {(d, s): json.loads((RESULTS / f"selection_{d}_{s}.json").read_text()) for d, s in zoos}
    named = {r["variant"] for report in reports.values() for r in report["rows"]}
    candidates_elsewhere = sorted(named | {u for v in named for u in rules_off(v)})
    for (dataset, scenario), report in reports.items():
        per: dict[str, dict[int, list[float]]] = {}
        for r in report["rows"]:
            per.setdefault(r["variant"], {}).setdefault(r["seed"], []).append(r["val_accuracy"])
        for variant in candidates_elsewhere:
            same = stand_in(variant, report)
            if variant not in per and same in per:
                per[variant] = per[same]
                stands_in.setdefault(variant, {})[f"{dataset}/{scenario}"] = same
        for variant, seeds in per.items():
            per_seed.setdefault(variant, {})[f"{dataset}/{scenario}"] = seeds
    names = [f"{d}/{s}" for d, s in zoos]
    candidates = {v: z for v, z in per_seed.items() if set(z) == set(names)
                  and (among is None or v in among or v == reference)}
    for v in [reference, *(among or [])]:
        if v not in candidates:
            raise SystemExit(f"{v} was not scored on every zoo ({', '.join(names)})")
    # Per zoo, every variant on the training seeds they all ran with (seed_means); with ``among``, those variants
    # on the seeds they share and the reference on its own
    shared_by = [v for v in candidates if among is None or v != reference]
    per_zoo = {zoo: seed_means({v: candidates[v][zoo] for v in shared_by}) for zoo in names}
    if among is not None:
        for zoo in names:
            per_zoo[zoo][0][reference] = seed_means({reference: candidates[reference][zoo]})[0][reference]
    common = {zoo: seeds for zoo, (_, seeds) in per_zoo.items()}
    everywhere = {v: {zoo: per_zoo[zoo][0][v] for zoo in names} for v in candidates}
    ranks = {v: {} for v in everywhere}
    for zoo in names:  # 1 + how many runs are better there (equal meta-val, equal rank); a stand-in is its run's
        runs = {stands_in.get(u, {}).get(zoo, u): everywhere[u][zoo] for u in everywhere}
        for v in everywhere:
            ranks[v][zoo] = 1 + sum(x > everywhere[v][zoo] for x in runs.values())
    rows = []
    for v, z in everywhere.items():
        worst = min(z[zoo] - everywhere[reference][zoo] for zoo in names)
        rows.append({"variant": v, "val_accuracy": {k: round(x, 2) for k, x in z.items()},
                     "mean_val": round(statistics.fmean(z.values()), 2),
                     "mean_rank": round(statistics.fmean(ranks[v].values()), 2), "ranks": ranks[v],
                     "worst_vs_reference": round(worst, 2), "eligible": worst >= -MARGIN,
                     "stands_in": stands_in.get(v, {})})
    eligible = [r for r in rows if r["eligible"]]
    best_rank = min(r["mean_rank"] for r in eligible)
    tied = sorted(r["variant"] for r in eligible if r["mean_rank"] == best_rank)
    # A tie in mean rank goes to the better mean meta-val over the training seeds the tied variants share on each
    # zoo (more than every variant shares, where the tied ones ran more seeds).
    tied_zoo = {zoo: seed_means({v: candidates[v][zoo] for v in tied}) for zoo in names}
    shared = {zoo: seeds for zoo, (_, seeds) in tied_zoo.items()}
    tie_val = {v: statistics.fmean(tied_zoo[zoo][0][v] for zoo in names) for v in tied}
    chosen = max(tied, key=lambda v: (tie_val[v], statistics.fmean(everywhere[v].values())))
    rows.sort(key=lambda r: (r["mean_rank"], -r["mean_val"]))
    report = {"zoos": names, "reference": reference, "margin": MARGIN, "chosen": chosen, "rows": rows,
              "seeds": common, "split": "val", "tasks": TASKS, "task_seed": SEED}
    if among is not None:
        report["among"] = sorted(among)
    if len(tied) > 1:
        report["tie_break"] = {"variants": tied, "seeds": shared,
                               "mean_val": {v: round(x, 2) for v, x in tie_val.items()}}
    return report


def tie_break(report: dict) -> str:
    """How :func:`cross` broke a tie in mean rank, for its table's header."""
    t = report.get("tie_break")
    if t is None:
        return ""
    seeds = ", ".join(f"{z} {', '.join(map(str, s))}" for z, s in t["seeds"].items())
    vals = ", ".join(f"{v} {x:.2f}" for v, x in sorted(t["mean_val"].items(), key=lambda kv: -kv[1]))
    return (f" (tied at mean rank with {', '.join(v for v in t['variants'] if v != report['chosen'])}; the tie goes "
            f"to the better mean meta-val over the training seeds the tied variants share: {seeds}; {vals})")


def cross_markdown(report: dict) -> str:
    zoos = report["zoos"]
    lines = ["# Choosing the default across zoos, on meta-val", "",
             f"Meta-val accuracy (%, {report['tasks']} tasks per shot, task seed {report['task_seed']}, mean over "
             "1- and 5-shot; 1-shot only where a zoo's tasks are 1-shot; over the training seeds every variant of a "
             "zoo ran with" + (f" (among {', '.join(report['among'])}; {report['reference']} on its own seeds)"
                               if "among" in report else "") + ": "
             + ", ".join(f"{z} {', '.join(map(str, s)) or 'none shared, each its own'}"
                         for z, s in report.get("seeds", {}).items())
             + ") of each variant on each zoo, its rank there "
             f"(1 = best), and how far below {report['reference']} it falls on its worst zoo. Eligible: nowhere more "
             f"than {report['margin']:g} point below {report['reference']}; chosen: the best mean rank among them: "
             f"**{report['chosen']}**{tie_break(report)}. Meta-test was not read. \"= v\": on that zoo the variant "
             "is the same model as v (no two teachers share a class, none is colour or all are, they are of one "
             "architecture or of several), and v's run stands for it.",
             "",
             "| variant | " + " | ".join(zoos) + " | mean | mean rank | worst vs " + report["reference"] + " |",
             "|---|" + "---|" * (len(zoos) + 3)]
    for r in report["rows"]:
        cells = [f"{r['val_accuracy'][z]:.2f} ({r['ranks'][z]})" + (f" = {r['stands_in'][z]}" if z in r.get("stands_in", {})
                 else "") for z in zoos]
        name = f"**{r['variant']}**" if r["variant"] == report["chosen"] else r["variant"]
        lines.append(f"| {name}{'' if r['eligible'] else ' (not eligible)'} | " + " | ".join(cells)
                     + f" | {r['mean_val']:.2f} | {r['mean_rank']:.2f} | {r['worst_vs_reference']:+.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dataset", help="a dataset, or 'cross' to choose across the zoos named after it")
    p.add_argument("scenario", nargs="+", help="the scenario, or (with cross) <dataset>:<scenario> per zoo")
    p.add_argument("--only", nargs="+", metavar="VARIANT",
                   help="evaluate only these variants' runs; every other run keeps its row of the report as it is")
    p.add_argument("--among", nargs="+", metavar="VARIANT",
                   help="cross: compare only these variants (and paper), on every seed they share "
                        "(-> selection_cross_zoo_among.{json,md})")
    a = p.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if a.dataset == "cross":
        report = cross([tuple(z.split(":", 1)) for z in a.scenario], among=a.among)
        name = "selection_cross_zoo_among" if a.among else "selection_cross_zoo"
        (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
        (RESULTS / f"{name}.md").write_text(cross_markdown(report))
        print(cross_markdown(report))
        return
    torch.set_num_threads(1)
    name = f"selection_{a.dataset}_{a.scenario[0]}"
    report = score(a.dataset, a.scenario[0], previous=RESULTS / f"{name}.json", only=set(a.only) if a.only else None)
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
