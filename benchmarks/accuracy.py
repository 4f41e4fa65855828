"""The accuracy benchmark: PURER's variants beside every baseline, one dataset at a time.

    python benchmarks/accuracy.py run glyphs disjoint --variants baselines --seeds 0
    python benchmarks/accuracy.py run glyphs disjoint --variants eci-maml eci-protonet --seeds 0 1 2
    python benchmarks/accuracy.py run icons disjoint
    python benchmarks/accuracy.py collect glyphs      # -> benchmarks/results/accuracy_glyphs.{json,md}

``run`` starts ``recipes/purer.py`` (the user's entry point, nothing re-implemented)
once per (variant, seed), ``--jobs`` at a time, each on one thread, into
``runs/benchmarks/<dataset>/<scenario>/<variant>/seed<k>``; a finished run (its
``results.json`` exists) is skipped and an interrupted one resumes from its
checkpoint, so the command can simply be repeated. The variant ``baselines``
computes the scenario's baseline rows (run it with one seed; they are cached by
config); the PURER variants run without them.
Every run selects on meta-val (the meta-iteration kept, test-time lr and steps)
and tests once on the same seeded meta-test task lists.

``collect`` gathers every finished run of a dataset into one table. A row seen
over several training seeds reports the mean over seeds of its meta-test accuracy,
the mean of the per-seed 95% confidence intervals over the 600 tasks, the seeds,
and each seed's figures (``per_seed``) and their standard deviation (``seed_sd``).

Scenarios (the zoo): ``disjoint`` 12 Conv4 teachers on disjoint 5-class blocks of
meta-train; ``random100`` 100 Conv4 teachers on random 5-class subsets (shared
classes share a bank class); ``sh`` the paper's SH mix of 12 Conv4 / ResNet-10 /
ResNet-18 teachers; ``disjoint-20way`` the disjoint zoo with 20-way 1-shot
meta-test tasks (ProtoNet variants only); ``ablations`` the disjoint zoo at 1,000
iterations, 5-way 1-shot, for the ``ablate-*`` variants beside eci-maml; ``select``,
``sh-select`` and ``resnet10-select`` the Conv4, SH and ResNet-10 zoos of the same classes
at that budget (choosing the default, diagnosing SH); ``mh`` glyph and icon teachers in
one zoo, ``icons40`` its icon half alone (see the comments in :data:`SCENARIOS`).
"""
from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
RUNS = REPO / "runs" / "benchmarks"

# Settings shared by every benchmark run (on top of the recipe's embedded defaults): each scenario's budget is
# trained in full (no early stopping; the p2 part turns the recipe's early stopping back on).
COMMON = ["meta.train.iterations=2000", "meta.train.val_every=250", "meta.train.patience=0", "meta.val_tasks=100",
          "eval.tasks=600", "checkpoint_every=250", "picture_every=1000", "threads=1"]
DATASETS = {"glyphs": [], "icons": ["data.dataset=icons"], "mh": ["data.dataset=glyphs+icons"]}
ALL_BASELINES = "[nc-pixels, nc-best-teacher, nc-all-teachers, finetune-best-teacher, maml-random, " \
                "maml-avg-teachers, protonet-random, protonet-avg-teachers, maml-real, protonet-real]"
ZOO_BUDGET = ["meta.train.iterations=1000", "eval.calibrations=[simpleshot]", "eval.baseline_train_iterations=1000"]
SCENARIOS = {
    "disjoint": [f"eval.baselines={ALL_BASELINES}"],
    # The other zoos re-run only the baselines that depend on the zoo (random init, raw pixels and real data
    # do not: read them from the disjoint scenario, same data and task lists), and skip ICFIL (its cost).
    "random100": ["zoo.num_models=100", "zoo.subsets=random", "eval.calibrations=[]",
                  "eval.baselines=[nc-best-teacher, nc-all-teachers, maml-avg-teachers]"],
    # SH: Conv4, ResNet-10 and ResNet-18 teachers (width 32) on the disjoint zoo's classes; the ResNet-10 side
    # alone beside it. Teachers of several architectures cannot be averaged: no avg-teachers rows.
    "sh": ["zoo.spec=model_zoo/specs/glyphs-mix.yaml", "eval.calibrations=[]",
           "eval.baselines=[nc-best-teacher, nc-all-teachers]"],
    "resnet10": ["zoo.spec=model_zoo/specs/glyphs-resnet10.yaml", "eval.calibrations=[]",
                 "eval.baselines=[nc-best-teacher, nc-all-teachers]"],
    # MH: one zoo of glyph (grey, 32 px) and icon (colour, 40 px) teachers, meta-tested on each dataset beside
    # each one's baselines; and the icon teachers alone, the single-dataset zoo the MH icon rows compare with.
    "mh": ["zoo.spec=model_zoo/specs/mh-glyphs-icons.yaml", "eval.calibrations=[]",
           "eval.baselines=[nc-pixels, nc-best-teacher, nc-all-teachers, maml-random, protonet-random]"],
    "icons40": ["zoo.spec=model_zoo/specs/icons-conv4-40px.yaml", "eval.calibrations=[]",
                "eval.baselines=[nc-best-teacher, nc-all-teachers, maml-avg-teachers]"],
    # 20-way 1-shot meta-test of a ProtoNet meta-trained on 5-way pseudo tasks (a MAML head is fixed to its
    # training way, so the eci-maml variant does not apply here).
    "disjoint-20way": ["meta.learner=protonet", "eval.way=20", "eval.shots=[1]", "eval.calibrations=[]",
                       "eval.baselines=[nc-pixels, nc-best-teacher, nc-all-teachers, protonet-random, "
                       "protonet-avg-teachers]"],
    # What each part buys: the disjoint zoo, a shorter budget, 1-shot only; compare the ablate-* variants
    # with eci-maml run in this same scenario (curriculum on/off: eci-maml vs ei-maml of the disjoint scenario).
    "ablations": ["meta.train.iterations=1000", "eval.shots=[1]", "eval.calibrations=[]", "eval.baselines=[]"],
    # Choosing the default: the disjoint zoo, 1,000 iterations, compared on the runs' meta-val accuracy (the
    # 1-shot meta-test rows are kept for the record, never used to choose).
    "select": ["meta.train.iterations=1000", "eval.shots=[1]", "eval.calibrations=[]", "eval.baselines=[]"],
    # Diagnosing SH at the same budget: the mixed zoo and its ResNet-10 side, to compare with "select" (the
    # Conv4 zoo of the same classes).
    "sh-select": ["zoo.spec=model_zoo/specs/glyphs-mix.yaml", "meta.train.iterations=1000", "eval.shots=[1]",
                  "eval.calibrations=[]", "eval.baselines=[]"],
    "resnet10-select": ["zoo.spec=model_zoo/specs/glyphs-resnet10.yaml", "meta.train.iterations=1000",
                        "eval.shots=[1]", "eval.calibrations=[]", "eval.baselines=[]"],
    # Every zoo at one budget (1,000 iterations, both shots), the default chosen across them on meta-val
    # (benchmarks/selection.py cross): the disjoint Conv4 zoo (glyphs or icons), 100 Conv4 teachers on random
    # overlapping 5-class subsets, the SH mix, and 20-way 1-shot tasks on the disjoint zoo (a ProtoNet).  The
    # baselines run here with the real-data upper bounds trained as long as the method.
    "zoo-disjoint": [*ZOO_BUDGET, f"eval.baselines={ALL_BASELINES}"],
    "zoo-random100": [*ZOO_BUDGET, "zoo.spec=model_zoo/specs/glyphs-random100.yaml",
                      "eval.baselines=[nc-best-teacher, nc-all-teachers, finetune-best-teacher, maml-avg-teachers]"],
    "zoo-sh": [*ZOO_BUDGET, "zoo.spec=model_zoo/specs/glyphs-mix.yaml",
               "eval.baselines=[nc-best-teacher, nc-all-teachers, finetune-best-teacher]"],
    "zoo-20way": [*ZOO_BUDGET, "meta.learner=protonet", "eval.way=20", "eval.shots=[1]",
                  "eval.baselines=[nc-pixels, nc-best-teacher, nc-all-teachers, protonet-random, "
                  "protonet-avg-teachers, protonet-real]"],
    # The default's own learner at 20-way: zoo-disjoint's runs (L2F, meta-trained on 5-way pseudo tasks) on
    # zoo-20way's 20-way 1-shot tasks, read through their features (RunConfig.test_rows: the head is 5-way).
    # Meta-training is zoo-disjoint's (TRAINED_IN): a run here continues that run's checkpoints.
    "zoo-disjoint-20way": [*ZOO_BUDGET, "eval.way=20", "eval.shots=[1]",
                           "eval.baselines=[nc-best-teacher, nc-all-teachers]"],
}
#: Scenarios that differ from another only in how they meta-test: a run starts from the checkpoints of that
#: scenario's run of the same variant and seed (the recipe's --resume refuses them if any training setting
#: differs), so its learner is meta-trained once.
TRAINED_IN = {"zoo-disjoint-20way": "zoo-disjoint"}
# The rows a variant adds: the pipeline's "purer" / "purer+<calibration>" rows are renamed after the variant.
# "baselines" runs the scenario's baseline rows alone (no meta-training; its untrained "purer" row is dropped);
# every other variant runs without them, so the baselines compute once, beside the meta-training runs.
# A PURER variant is "<curriculum>-<learner>" and any "+<part>"s, e.g. "eci-maml+kd-both+div": ECI or EI (no
# curriculum), MAML or ProtoNet, and the parts below.  "paper" is PURER as published
# (recipes/configs/purer-paper.yaml); DEFAULT is what the recipe runs with no arguments.
CURRICULA = {"eci": [], "ei": ["switch.lambda_adv=0"]}
LEARNERS = {"maml": [], "protonet": ["meta.learner=protonet"],
            # the few-shot canon (benchmarks/learners.py): the MAML family keeps the recipe's inner loop (1 step at
            # lr 0.1); E3BM ensembles 3 epochs of it; MTL freezes the zoo student's encoder; calibrations only
            # where they can follow
            "matching": ["meta.learner=matching", "eval.calibrations=[]"],
            "matching-fce": ["meta.learner=matching", "meta.matching.fce=true", "eval.calibrations=[]"],
            "relation": ["meta.learner=relation", "eval.calibrations=[]"],
            "mtl": ["meta.learner=mtl", "meta.init=zoo-student"],
            "l2f": ["meta.learner=l2f"], "alfa": ["meta.learner=alfa"],
            "metal": ["meta.learner=metal", "eval.calibrations=[]"],
            "tao": ["meta.learner=tao", "eval.calibrations=[]"],
            "e3bm": ["meta.learner=e3bm", "meta.maml.inner_steps=3", "eval.calibrations=[]"],
            "e3bm-mtl": ["meta.learner=e3bm", "meta.e3bm.base=mtl", "meta.init=zoo-student", "eval.calibrations=[]"]}
PARTS = {
    "kd-logit": ["distill.logit=1.0"],
    "kd-feature": ["distill.feature=1.0"],
    "kd-both": ["distill.logit=1.0", "distill.feature=1.0"],
    "kd-logit3": ["distill.logit=3.0"],
    "kd-feature0.3": ["distill.feature=0.3"],
    # Three times the teachers distilled per step (the default 4): on a 12-teacher zoo every teacher each step, on
    # random100 12 of its 100; the cost per step stays bounded whatever the zoo's size.
    "kd12": ["distill.teachers_per_step=12"],
    "kd-union": ["distill.logit=1.0", "distill.heads=union"],
    "kd-union-std": ["distill.logit=1.0", "distill.heads=union", "distill.standardize=true"],
    "kd-std": ["distill.logit=1.0", "distill.standardize=true"],
    # Each distilled teacher on the images of every teacher of the step, not only its own classes': how it answers
    # classes it was not trained on (what its features do for a meta-test task's novel classes); on every zoo, where
    # the recipe's rule (distill.images_colour) gives a zoo of colour teachers its own classes' images (both rules
    # null: the same on every zoo whatever the recipe's rules).
    "kd-step": ["distill.images=step", "distill.images_colour=null", "distill.images_heterogeneous=null"],
    # Each teacher on its own classes' images on every zoo, as before the rule (distill.images: step for a zoo whose
    # teachers are not all colour).  The runs on such zoos made before the rule carry this part in their names.
    "kd-own": ["distill.images=own"],
    "no-kd": ["distill.logit=0", "distill.feature=0"],  # the default without distillation (sh-mix.yaml's setting until L2F)
    # Start from the zoo's meta-val-best teacher of the learner's network (nc-best-teacher's), a fresh head.
    "init-best": ["meta.init=best-teacher"],
    # Relational distillation beside the default's logits: the learner's (centred) cosine similarities between
    # a teacher's bank images follow the mean of the step's teachers' (the geometry nc-all-teachers reads).
    "rel10": ["distill.relation=10"],
    "rel30": ["distill.relation=30"],
    # A stronger total-variation prior (the published 1e-4 on an L2 norm over the whole batch moves each pixel
    # little): smoother bank images.
    "tv0.01": ["inversion.a_tv=0.01"],
    "tv0.001": ["inversion.a_tv=0.001"],
    "tv-release": ["inversion.a_tv_colour=null"],  # the release's one R_tv weight for colour teachers too
    # Meta-val scores (and the run keeps) an exponential moving average of the learner's weights.
    "avg": ["meta.train.average=0.99"],
    # Pseudo tasks of the test's way (a ProtoNet's head is not tied to its training way): the 20-way scenario.
    "way20": ["meta.way=20"],
    # Two and three times the zoo-* scenarios' budget (random100's meta-val was still climbing steeply at 1,000).
    "it2000": ["meta.train.iterations=2000"],
    "it3000": ["meta.train.iterations=3000"],
    # A higher ceiling for the budget rule: every run of it3000+p2 that stopped early is the same run under it;
    # random100's runs reached 3,000 with meta-val near its best (here resumed from their 3,000 checkpoints).
    "it4000": ["meta.train.iterations=4000"],
    # Early stopping: with it3000 a ceiling, meta-training ends once 2 meta-vals in a row (500 iterations) set no
    # new best (the disjoint zoo's meta-val peaks near 1,000 iterations, random100's still climbs at 3,000);
    # "default+it3000+p2" is the recipe's budget rule.
    "p2": ["meta.train.patience=2"],
    # A tenth of the Gradient Switch's adversarial weight: on the disjoint zoos meta-val falls after ~1,000
    # iterations while the bank's R_bn rises, the adversary's gradient on a bank class ~100-300 times its
    # teacher's (benchmarks/diagnose.py --adversary).
    "adv1": ["switch.lambda_adv=1"],
    # A tenth of the outer lr: fine-tuning a pretrained start (init-best) gently.
    "lr1e-4": ["meta.train.outer_lr=1e-4"],
    # MAML++'s cosine annealing of the outer lr over the run (to 0 at its last iteration).
    "cos": ["meta.train.schedule=cosine"],
    "bn10": ["inversion.first_bn_weight=10"],
    "div": ["inversion.a_div=1.0"],
    "steps2": ["inversion.steps_per_iteration=2"],
    "bnmean": ["inversion.bn_layers=mean"],
    "ht": ["meta.hard_tasks=1"],  # MTL's hard-task meta-batch, one hard task per meta-batch when ready
    # The meta-learnt generator instead of the pixel bank: FREE's 5 adaptation steps at width 32, and one step of a
    # generator of width 8 (what costs about a pixel-bank iteration on one CPU thread).
    "gen": ["inversion.synthesizer=generator", "inversion.generator.steps=5", "inversion.generator.width=32"],
    "gen1-w8": ["inversion.synthesizer=generator", "inversion.generator.steps=1", "inversion.generator.width=8"],
    # The pixel bank for a zoo of colour teachers too, as before the colour rule (inversion.synthesizer_colour: the
    # one-step generator for such a zoo).  The icon runs made before the rule carry this part in their names.
    "pixels-colour": ["inversion.synthesizer_colour=null"],
    # The pixel bank for a zoo of several architectures too, as before that rule (inversion.synthesizer_heterogeneous:
    # the generator for such a zoo).  The SH runs made before the rule carry this part in their names.
    "pixels-sh": ["inversion.synthesizer_heterogeneous=null"],
    # The colour rule's generator for every zoo, grey ones too.
    "gen1": ["inversion.synthesizer=generator"],
    # The generator at width 32, the default before width 64 was chosen (the runs made with it carry this part).
    "w32": ["inversion.generator.width=32"],
}
VARIANTS = {"baselines": ["meta.train.iterations=0", "eval.calibrations=[]"],
            "paper": ["--config", "recipes/configs/purer-paper.yaml"]}
# Ablations of eci-maml (one part changed each; compare with eci-maml's plain row of the same seed).
ABLATIONS = {
    "lambda-adv-1": ["switch.lambda_adv=1"],
    "adversary-correct-only": ["switch.adversarial_queries=correct"],
    "bank-lr-0.05": ["inversion.lr=0.05"],
    "no-augmentation": ["inversion.augment=false"],
    "normalized-bank": ["inversion.space=normalized"],
    "teachers-per-step-1": ["inversion.teachers_per_step=1"],
    "teachers-per-step-12": ["inversion.teachers_per_step=12"],
    "bank-16-per-class": ["meta.images_per_class=16"],
    "init-avg-teachers": ["meta.init=avg-teachers"],
    "init-zoo-student": ["meta.init=zoo-student"],
}
VARIANTS.update({f"ablate-{k}": ["--config", "recipes/configs/purer-paper.yaml", *v, "eval.calibrations=[]"]
                 for k, v in ABLATIONS.items()})
DEFAULT = "default"  # the recipe's own defaults (recipes/configs/default.yaml); default+<part>... adds those parts
# Scenarios of carried rows that no longer exist here, and what they were.
SCENARIO_NOTES = {"sh-width64": "that commit's SH zoo, its ResNets at their default width 64"}


# One method, one name: ECI MAML with nothing added is PURER as published, "paper" (earlier results files
# called it "eci-maml"; collect renames their rows).
ALIASES = {"eci-maml": "paper"}


def canonical(variant: str) -> str:
    """``variant`` under its one name (``eci-maml+kd-logit`` -> ``paper+kd-logit``)."""
    base, sep, parts = variant.partition("+")
    return ALIASES.get(base, base) + sep + parts


def variant_args(variant: str) -> list[str]:
    """The recipe arguments of ``variant`` (see the comment above :data:`CURRICULA`)."""
    variant = canonical(variant)
    if variant in VARIANTS:
        return list(VARIANTS[variant])
    base, *parts = variant.split("+")
    curriculum, _, learner = base.partition("-")
    unknown = [p for p in parts if p not in PARTS]
    if (base not in ("paper", DEFAULT) and (curriculum not in CURRICULA or learner not in LEARNERS)) or unknown:
        raise ValueError(f"unknown variant {variant!r}: use baselines, ablate-<name>, or {DEFAULT} or paper or "
                         f"<{'|'.join(CURRICULA)}>-<{'|'.join(LEARNERS)}>, then [+part...] with parts {', '.join(PARTS)}")
    if base == DEFAULT:  # the recipe's defaults and only the parts named
        return [a for p in parts for a in PARTS[p]]
    # A named variant starts from PURER as published and adds only what its name says.
    args = list(VARIANTS["paper"])
    if base != "paper":
        args += [*CURRICULA[curriculum], *LEARNERS[learner]]
    return args + [a for p in parts for a in PARTS[p]]


#: Flat settings that say where a run writes, what data and zoo it runs on and how it is evaluated, not how it
#: trains (:func:`is_recipe_default` does not compare them).
NOT_THE_METHOD = ("output_dir", "cache_dir", "threads", "checkpoint_every", "picture_every", "seed", "data.",
                  "zoo.", "eval.", "icfil.")


@functools.cache
def is_recipe_default(dataset: str | None, scenario: str, variant: str) -> bool:
    """Whether ``variant``'s runs in ``scenario`` meta-train with the recipe's own settings (what ``accuracy_*.json``
    marks ``"default": true``): every setting but :data:`NOT_THE_METHOD` as the recipe has it on the scenario's
    data and zoo.  In the zoo-* scenarios (1,000 iterations, no early stopping) that is ``default+it3000+p2``."""
    from purer.pipeline import RunConfig
    from purer.pipeline.report import flat_hparams
    from purer.yaml_config import load_config

    variant = canonical(variant)
    if dataset not in DATASETS or scenario not in SCENARIOS or variant.split("+")[0] != DEFAULT:
        return False
    where = [a for a in (*DATASETS[dataset], *SCENARIOS[scenario]) if a.startswith(("data.", "zoo."))]
    run, recipe = (flat_hparams(load_config(RunConfig, None, args), keep_none=True)
                   for args in ([*COMMON, *DATASETS[dataset], *SCENARIOS[scenario], *variant_args(variant)], where))
    return all(run.get(k) == recipe.get(k) for k in {*run, *recipe} if not k.startswith(NOT_THE_METHOD))


def run_dir(dataset: str, scenario: str, variant: str, seed: int) -> Path:
    return RUNS / dataset / scenario / canonical(variant) / f"seed{seed}"


def command(dataset: str, scenario: str, variant: str, seed: int, extra: tuple[str, ...] = ()) -> list[str]:
    out = run_dir(dataset, scenario, variant, seed)
    args = [*COMMON, *DATASETS[dataset], *SCENARIOS[scenario], *variant_args(variant), *extra,
            f"seed={seed}", f"output_dir={out}", f"cache_dir={RUNS / '.cache'}"]
    if variant != "baselines":
        args.append("eval.baselines=[]")
    # A run killed before its first checkpoint left nothing to keep: start it again in its folder.
    resume = ["--resume"] if any(out.glob("checkpoints/checkpoint_*/COMPLETE")) else ["--overwrite"]
    return [sys.executable, str(REPO / "recipes" / "purer.py"), "--no-progress", *resume, *args]


def start_from_trained(dataset: str, scenario: str, variant: str, seed: int) -> Path | None:
    """Copy into this run's folder the checkpoints of the run whose meta-training it shares (:data:`TRAINED_IN`),
    if it has none and that run has some; the run copied from, or None."""
    out, source = run_dir(dataset, scenario, variant, seed), TRAINED_IN.get(scenario)
    if source is None or any(out.glob("checkpoints/checkpoint_*/COMPLETE")):
        return None
    trained = run_dir(dataset, source, variant, seed)
    if not any(trained.glob("checkpoints/checkpoint_*/COMPLETE")):
        return None
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # a copy cut short
    shutil.copytree(trained / "checkpoints", out / "checkpoints")
    return trained


def launch(cmd: list[str], out: Path) -> tuple[Path, int, float]:
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(out / "benchmark.log", "a") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        rc = subprocess.call(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    return out, rc, time.perf_counter() - start


def cmd_run(args) -> int:
    for variant in args.variants:
        variant_args(variant)  # an unknown name stops here, before any run starts
    jobs = []
    for variant in args.variants:
        for seed in args.seeds:
            out = run_dir(args.dataset, args.scenario, variant, seed)
            if (out / "results.json").is_file():
                print(f"done already: {out}")
                continue
            trained = start_from_trained(args.dataset, args.scenario, variant, seed)
            if trained is not None:
                print(f"{out}: continues the checkpoints of {trained}")
            jobs.append((command(args.dataset, args.scenario, variant, seed, tuple(args.set)), out))
    failed = 0
    with ThreadPoolExecutor(args.jobs) as pool:
        for out, rc, secs in pool.map(lambda j: launch(*j), jobs):
            print(f"{'ok' if rc == 0 else f'FAILED (rc {rc})'} {secs / 60:.1f} min: {out} (log: {out / 'benchmark.log'})")
            failed += rc != 0
    return 1 if failed else 0


def method_name(variant: str, pipeline_method: str) -> str:
    """A pipeline row's name in the table: ``purer[+<calibration>]`` becomes ``<variant>[+<calibration>]``."""
    if pipeline_method == "purer" or pipeline_method.startswith("purer+"):
        return variant + pipeline_method.removeprefix("purer")
    return pipeline_method


def collect(dataset: str, root: Path = RUNS, previous: Path | None = None, allow_mixed_code: bool = False) -> dict:
    """Every finished run of ``dataset`` under ``root`` -> rows averaged over training seeds; with
    ``previous`` (a results file), the rows of it that no run here replaces (:func:`carried`), and the seeds
    of a variant run here that were run only elsewhere (:func:`carried_seeds`).

    Rows computed by different code (``results.json``'s ``code.source``, a hash of purer's sources) are not
    mixed in one file: that is an error, unless ``allow_mixed_code``, which marks each row with its code (a
    carried seed counts with the code its results file records for it)."""
    groups: dict[tuple, list] = {}
    variant_of: dict[tuple, str] = {}
    runs = []
    for results in sorted((root / dataset).glob("*/*/seed*/results.json")):
        scenario, variant, seed = results.parts[-4], canonical(results.parts[-3]), int(results.parts[-2][4:])
        data = json.loads(results.read_text())
        runs.append({"scenario": scenario, "variant": variant, "seed": seed, "seconds": data["seconds"],
                     "meta_train": data["meta_train"], "zoo_models": data["zoo"]["models"],
                     "calibration": data.get("calibration", {}), "code": data.get("code")})
        for r in data["rows"]:
            if (variant == "baselines") == r["method"].startswith("purer"):
                continue  # a baselines run's untrained learner, or baseline rows elsewhere
            key = (scenario, r.get("dataset", dataset), method_name(variant, r["method"]), r["way"], r["shot"])
            variant_of[scenario, key[2]] = variant
            groups.setdefault(key, []).append((seed, r))
        for key, r in chosen_rows(data["rows"], variant, scenario, dataset):
            variant_of[scenario, key[2]] = variant
            groups.setdefault(key, []).append((seed, r))
    old = _previous(previous)  # read once, for the seeds and the rows it carries
    runs += carried_seeds(old, dataset, runs, groups, variant_of)
    codes = {(r.get("code") or {}).get("source") for r in runs}
    if len(codes) > 1 and not allow_mixed_code:
        by_code = {}
        for r in runs:
            name = f"{r['scenario']}/{r['variant']}/seed{r['seed']}"
            by_code.setdefault((r.get("code") or {}).get("source"), []).append(name)
        raise SystemExit("runs of different code would be mixed in one table: " + "; ".join(
            f"{code}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}" for code, names in by_code.items())
            + "; re-run them on one commit, or pass --allow-mixed-code to mark each row with its code")
    code_of: dict[tuple, set] = {}  # a row's seeds may come from several codes: it names them all
    for r in runs:
        code_of.setdefault((r["scenario"], r["variant"]), set()).add((r.get("code") or {}).get("source") or "unknown")
    rows = []
    for (scenario, data, method, way, shot), found in sorted(groups.items()):
        found.sort(key=lambda sr: sr[0])
        accs = [r["accuracy"] for _, r in found]
        first = found[0][1]
        row = {"scenario": scenario, "dataset": data, "method": method, "way": way, "shot": shot,
               "accuracy": round(statistics.fmean(accs), 2),
               "ci95": round(statistics.fmean(r["ci95"] for _, r in found), 2),
               "seeds": [s for s, _ in found], "tasks": first["tasks"], "test_cost": seeds_cost([r for _, r in found]),
               "per_seed": [[s, r["accuracy"], r["ci95"]] for s, r in found]}
        if len(found) > 1:
            row["seed_sd"] = round(statistics.stdev(accs), 2)
        if "settings" in first:
            row["settings"] = [r.get("settings") for _, r in found]
        if all("val_accuracy" in r for _, r in found):
            row["val_accuracy"] = round(statistics.fmean(r["val_accuracy"] for _, r in found), 2)
            row["val_per_seed"] = [[s, r["val_accuracy"]] for s, r in found]  # what a carried seed keeps
        row["variant"] = variant_of[scenario, method]
        if is_recipe_default(dataset, scenario, row["variant"]):  # with or without a calibration row
            row["default"] = True
        if len(codes) > 1:
            row["code"] = ", ".join(sorted(code_of[scenario, row["variant"]]))
        if all("chosen" in r for _, r in found):
            row["chosen"] = [r["chosen"] for _, r in found]
        if any("carried_from" in r for _, r in found):
            row["seeds_carried_from"] = {s: r["carried_from"] for s, r in found if "carried_from" in r}
        rows.append(row)
    here = [r for r in runs if "carried_from" not in r]
    carried_runs, carried_rows = carried(old, {(r["scenario"], r["variant"]) for r in runs},
                                         {run_key(r) for r in here})
    return {"dataset": dataset, "selected_on": "val", "runs": runs + carried_runs, "rows": rows + carried_rows,
            "code": sorted(c for c in codes if c) if len(codes) > 1 else next(iter(codes), None),
            "settings": {"common": COMMON, "datasets": DATASETS[dataset], "scenarios": SCENARIOS,
                         "variants": {v: variant_args(v) for v in sorted({r["variant"] for r in runs})}}}


def chosen_rows(rows: list[dict], variant: str, scenario: str, dataset: str) -> list[tuple[tuple, dict]]:
    """A run's learner as a user gets it, per shot: the row of the calibration (or none) meta-val chose
    (``"selected"``), as ``<variant>+chosen`` with the choice under ``"chosen"``; only where the run scored more
    than the plain learner (with one row it is that row); none for a baselines run, whose learner is untrained.
    ``(collect's group key, row)`` pairs."""
    if variant == "baselines":
        return []
    mine = [r for r in rows if r["method"] == "purer" or r["method"].startswith("purer+")]
    per_shot = collections.Counter((r["shot"], r.get("dataset")) for r in mine)
    return [((scenario, r.get("dataset", dataset), f"{variant}+chosen", r["way"], r["shot"]),
             {**r, "chosen": r["method"].removeprefix("purer").removeprefix("+") or "none"})
            for r in mine if r.get("selected") and per_shot[r["shot"], r.get("dataset")] > 1]


def seeds_cost(rows: list[dict]) -> dict:
    """The test-time cost of one row's seeds: a setting the seeds share as it is, one that differs (a chosen row
    whose seeds chose differently) as its per-seed values joined by "/" ("-" where a seed has none)."""
    keys = list(dict.fromkeys(k for r in rows for k in r["test_cost"]))
    values = {k: [r["test_cost"].get(k) for r in rows] for k in keys}
    return {k: v[0] if len(set(map(str, v))) == 1 else "/".join("-" if x is None else str(x) for x in v)
            for k, v in values.items()}


def run_key(run: dict) -> tuple:
    """What tells one run of a results file from every other: its scenario, seed, wall time and meta-training
    record (its meta-val curve and timings), whatever variant folder it lives in."""
    return run["scenario"], run["seed"], run["seconds"], json.dumps(run["meta_train"], sort_keys=True)


def _previous(path: Path | None) -> tuple[dict, str] | None:
    """The results file ``path`` and the commit that last wrote it (what its carried rows are marked with);
    ``None`` without one."""
    if path is None or not path.is_file():
        return None
    commit = subprocess.run(["git", "log", "-1", "--format=%h", "--", str(path)], cwd=REPO,
                            capture_output=True, text=True).stdout.strip() or "unknown"
    return json.loads(path.read_text()), commit


def _row_variant(row: dict) -> str:
    """A results file row's variant (rows written before rows named their variant had no "+part" variants)."""
    return canonical(row.get("variant") or ("baselines" if not row["method"].startswith(
        (DEFAULT, "paper", "eci", "ei", "ablate")) else row["method"].split("+")[0]))


def carried_seeds(previous: tuple[dict, str] | None, dataset: str, runs: list[dict], groups: dict[tuple, list],
                  variant_of: dict[tuple, str]) -> list[dict]:
    """The runs of the ``previous`` results file (:func:`_previous`) whose (scenario, variant) has runs here but
    not their seed: added to :func:`collect`'s ``groups`` (and ``variant_of``) seed by seed (accuracy and CI from
    the old row's ``per_seed``, meta-val accuracy from its ``val_per_seed`` or, before rows kept that, where the
    old row had that one seed) and returned, marked ``carried_from``, to join ``runs``.  A variant run here for
    some seeds keeps those run elsewhere."""
    if previous is None:
        return []
    seeds_here: dict[tuple[str, str], set[int]] = {}
    for r in runs:
        seeds_here.setdefault((r["scenario"], r["variant"]), set()).add(r["seed"])
    old, commit = previous
    added = [{**r, "variant": canonical(r["variant"]), "carried_from": r.get("carried_from", commit)}
             for r in old.get("runs", [])
             if r["seed"] not in seeds_here.get((r["scenario"], canonical(r["variant"])), {r["seed"]})]
    wanted = {(r["scenario"], r["variant"], r["seed"]): r["carried_from"] for r in added}
    for row in old["rows"]:
        variant, val = _row_variant(row), dict(map(tuple, row.get("val_per_seed", [])))
        for i, (seed, accuracy, ci95) in enumerate(row.get("per_seed", [])):
            if (row["scenario"], variant, seed) not in wanted:
                continue
            one = {"accuracy": accuracy, "ci95": ci95, "tasks": row["tasks"], "test_cost": row["test_cost"],
                   "carried_from": wanted[row["scenario"], variant, seed]}
            if seed in val:
                one["val_accuracy"] = val[seed]
            elif len(row["per_seed"]) == 1 and "val_accuracy" in row:
                one["val_accuracy"] = row["val_accuracy"]
            if "settings" in row:
                one["settings"] = row["settings"][i]
            key = (row["scenario"], row.get("dataset", dataset), canonical(row["method"]), row["way"], row["shot"])
            variant_of[row["scenario"], key[2]] = variant
            groups.setdefault(key, []).append((seed, one))
    return added


def carried(previous: tuple[dict, str] | None, present: set[tuple[str, str]],
            here: set[tuple] = frozenset()) -> tuple[list, list]:
    """Runs and rows of the ``previous`` results file (:func:`_previous`) whose (scenario, variant) has no run
    folder here.

    The runs behind a results file live on the machine that made them; collecting on another machine keeps
    the rows it cannot recompute (marked ``carried_from``: the commit that last wrote them) rather than drop
    them, and replaces a (scenario, variant) as a whole as soon as one of its runs exists here.  A (scenario,
    variant) whose runs are all here (``here``: :func:`run_key`) under another variant's name was renamed, and is
    not carried."""
    if previous is None:
        return [], []
    (old, commit), variant = previous, _row_variant
    of_variant: dict[tuple[str, str], list[dict]] = {}
    for r in old.get("runs", []):
        of_variant.setdefault((r["scenario"], canonical(r["variant"])), []).append(r)
    renamed = {k for k, rs in of_variant.items() if k not in present and all(run_key(r) in here for r in rs)}
    present = present | renamed
    runs = [{**r, "variant": canonical(r["variant"]), "carried_from": r.get("carried_from", commit)}
            for r in old.get("runs", []) if (r["scenario"], canonical(r["variant"])) not in present]
    rows = [{**{k: v for k, v in r.items() if k != "default"}, "method": canonical(r["method"]), "variant": variant(r),
             "carried_from": r.get("carried_from", commit),
             **({"default": True} if is_recipe_default(old.get("dataset"), r["scenario"], variant(r)) else {})}
            for r in old["rows"] if (r["scenario"], variant(r)) not in present]
    return runs, rows


def markdown(report: dict) -> str:
    from purer.pipeline.report import cost_text

    lines = [f"# Accuracy on {report['dataset']}", "",
             "Mean ± 95% CI over the meta-test tasks (%); rows over several training seeds show the mean over "
             "seeds (± the mean per-seed CI) and the seeds' standard deviation. Everything selected on meta-val; "
             "every row of a scenario on the same task lists.", ""]
    by_scenario: dict[str, list] = {}
    for r in report["rows"]:
        data = r.get("dataset", report["dataset"])  # several datasets in one run: a table for each
        by_scenario.setdefault(r["scenario"] + ("" if data == report["dataset"] else f", meta-test on {data}"),
                               []).append(r)
    for scenario, rows in by_scenario.items():
        cols = sorted({(r["way"], r["shot"]) for r in rows})
        cell = {(r["method"], r["way"], r["shot"]): r for r in rows}
        ours = (DEFAULT, "paper", "eci", "ei", "ablate")
        methods = sorted({r["method"] for r in rows},
                         key=lambda m: (not m.startswith(ours), not m.startswith(DEFAULT), m))
        head = ["method"] + [f"{w}-way {s}-shot" for w, s in cols] + ["seeds", "test-time cost"]
        lines += [f"## {scenario}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for m in methods:
            cells, seeds, costs = [], "", []
            for w, s in cols:
                r = cell.get((m, w, s))
                if r is None:
                    cells.append("")
                    continue
                sd = f" (sd {r['seed_sd']:.2f})" if "seed_sd" in r else ""
                cells.append(f"{r['accuracy']:.2f} ± {r['ci95']:.2f}{sd}")
                elsewhere = {str(k) for k in r.get("seeds_carried_from", {})}  # JSON's keys are strings
                seeds = seeds or ",".join(f"{x}{' †' if str(x) in elsewhere else ''}" for x in r["seeds"])
                costs.append((f"{s}-shot", r))
            mark = " †" if any("carried_from" in cell.get((m, w, s), {}) for w, s in cols) else ""
            code = next((cell[m, w, s]["code"] for w, s in cols if "code" in cell.get((m, w, s), {})), None)
            mark += f" (code {code})" if code else ""
            lines.append("| " + " | ".join([m + mark] + cells + [seeds, cost_text(costs)]) + " |")
        lines.append("")
    commits = sorted({r["carried_from"] for r in report["rows"] if "carried_from" in r}
                     | {c for r in report["rows"] for c in r.get("seeds_carried_from", {}).values()})
    if commits:
        notes = "".join(f"; {name}: {note}" for name, note in SCENARIO_NOTES.items() if name in by_scenario)
        lines += [f"† carried (a row, or a seed of it) from the results file of commit {', '.join(commits)}: its "
                  f"runs were not on the machine that collected this file (the scenario settings of that commit, "
                  f"the same task lists{notes}).", ""]
    lines += ["## Runs", "", "| scenario | variant | seed | minutes | best iteration | meta-val | switch fired |",
              "|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        mt = r["meta_train"]
        mark = " †" if "carried_from" in r else ""
        lines.append(f"| {r['scenario']} | {r['variant']}{mark} | {r['seed']} | {r['seconds'] / 60:.1f} | "
                     f"{mt['best_iteration']} | {mt['val_accuracy']} | {mt['switch_fired']} |")
    return "\n".join(lines) + "\n"


def cmd_collect(args) -> int:
    report = collect(args.dataset, previous=RESULTS / f"accuracy_{args.dataset}.json",
                     allow_mixed_code=args.allow_mixed_code)
    if not report["rows"]:
        print(f"no finished runs under {RUNS / args.dataset}", file=sys.stderr)
        return 1
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"accuracy_{args.dataset}.json").write_text(json.dumps(report, indent=1))
    (RESULTS / f"accuracy_{args.dataset}.md").write_text(markdown(report))
    print(markdown(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run (or finish) the benchmark runs of one scenario")
    r.add_argument("dataset", choices=sorted(DATASETS))
    r.add_argument("scenario", choices=sorted(SCENARIOS))
    r.add_argument("--variants", nargs="+", default=[DEFAULT, "paper"], metavar="VARIANT",
                   help=f"baselines, paper, {DEFAULT}, ablate-<{'|'.join(ABLATIONS)}>, or "
                        f"<{'|'.join(CURRICULA)}>-<{'|'.join(LEARNERS)}>[+<{'|'.join(PARTS)}>...] "
                        f"(default: {DEFAULT} paper)")
    r.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    r.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    r.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="recipe keys added to these runs, e.g. eval.calibrations=[] for the extra seeds of a "
                        "variant whose calibration rows one seed already gives (recorded in each run's config.yaml)")
    c = sub.add_parser("collect", help="write benchmarks/results/accuracy_<dataset>.{json,md}")
    c.add_argument("dataset", choices=sorted(DATASETS))
    c.add_argument("--allow-mixed-code", action="store_true",
                   help="collect runs of different code into one file, each row marked with its code's hash")
    args = parser.parse_args(argv)
    return cmd_run(args) if args.cmd == "run" else cmd_collect(args)


if __name__ == "__main__":
    sys.exit(main())
