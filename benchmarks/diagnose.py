"""What limits a PURER run: the inversion's realism, or the meta-learner's generalisation?

    python benchmarks/diagnose.py runs/benchmarks/glyphs/disjoint/eci-maml/seed* \
        --out benchmarks/results/diagnosis_glyphs.json [--tasks 300]

Reads each finished run (``meta_learner/``, ``config.yaml``, its newest checkpoint for
the final pseudo-image bank) and scores the selected meta-learner, with the
test-time settings the run chose for 1-shot, on 5-way 1-shot tasks (15 queries,
as the meta-test) drawn from:

1. the final **bank** (pseudo tasks over the zoo's classes);
2. **real images of the zoo's classes** (the meta-train classes the teachers know);
3. **real images of the other meta-train classes** (no teacher knows them);
4. the **meta-test** split (the run's own figure, on this script's task list).

Reading: 1 >> 2 means the pseudo images are easier than the real ones they stand
for (realism); 2 >> 4 with 3 close to 4 means the learner fits the zoo's classes
but does not transfer (too few or too alike classes); 2 close to 4 means the
learner generalises as far as it learns, so a better learner or longer training
is the lever. Also reports how often the teachers recognise their bank images
and their real images. Writes one report per run to ``--out``.

    python benchmarks/diagnose.py runs/benchmarks/glyphs/zoo-disjoint/default+it3000/seed0 \
        --adversary --out adversary.json

``--adversary`` asks instead how hard the Gradient Switch pulls on the bank: at the run's
last checkpoint (its final bank and learner), per bank class, the gradient norm of the
adversarial term ``-lambda_adv * L_outer`` (mean over fresh pseudo tasks that read the
class) against that of its teacher's inversion loss in a plain step
(:func:`adversary_balance`).  The bank's Adam moments are per class, so a term a hundred
times larger than the priors' sets the step size of the plain steps that follow too.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from purer.yaml_config import load_config
from purer.data import EpisodeSampler, load_split
from purer.evaluate import evaluate, task_list
from purer.inversion import PseudoBank
from purer.pipeline import (ECI, RunConfig, build_bank, checkpointed_state, latest_checkpoint, load_meta_learner,
                            zoo_path)
from purer.pipeline.distributed import Dist
from purer.zoo.store import Zoo


def run_zoo(run: Path) -> tuple[RunConfig, list]:
    """A finished run's settings (its ``config.yaml``) and its zoo's teachers."""
    cfg = load_config(RunConfig, run / "config.yaml")
    return cfg, Zoo(zoo_path(cfg)).load_teachers()


def bank_from_checkpoint(run: Path, teachers, cfg: RunConfig, channels: int) -> PseudoBank:
    """The run's final bank, from its last checkpoint (at its last iteration: the budget, or its early stop)."""
    final = latest_checkpoint(run)
    ran = json.loads((run / "results.json").read_text())["meta_train"].get("iterations_run", cfg.meta.train.iterations)
    if final is None or final.name != f"checkpoint_{ran}":
        raise SystemExit(f"{run}: no complete final checkpoint (checkpoint_{ran})")
    bank = build_bank(cfg, teachers, channels)
    bank.load_state_dict(checkpointed_state(final, "bank"))
    return bank


@torch.no_grad()
def teacher_recognition(teachers, bank: PseudoBank, train) -> dict:
    """Share of bank images, and of real meta-train images, that their teacher labels as their class."""
    index = {name: i for i, name in enumerate(train.class_names)}
    hits = {"bank": [0, 0], "real": [0, 0]}
    for t, classes in zip(teachers, bank.teacher_classes):
        x = bank.snapshot(classes).clamp(0, 1)
        y = torch.arange(len(classes)).repeat_interleave(x.shape[1])
        hits["bank"][0] += int((t(x.flatten(0, 1)).argmax(-1) == y).sum())
        hits["bank"][1] += len(y)
        for label, cid in enumerate(t.config.class_ids):
            real = train.float_images(train.members(index[cid]))
            hits["real"][0] += int((t(real).argmax(-1) == label).sum())
            hits["real"][1] += len(real)
    return {k: round(100 * a / n, 2) for k, (a, n) in hits.items()}


def diagnose(run: Path, tasks: int) -> dict:
    cfg, teachers = run_zoo(run)
    learner = load_meta_learner(run / "meta_learner")
    settings = json.loads((run / "meta_learner" / "config.json").read_text())["test_time"].get("1", {})
    splits = {s: load_split(cfg.data.dataset, s, cfg.data.root, cfg.data.image_size) for s in ("train", "test")}
    train = splits["train"]
    known = sorted({train.class_names.index(c) for t in teachers for c in t.config.class_ids})
    other = sorted(set(range(len(train.class_names))) - set(known))
    bank = bank_from_checkpoint(run, teachers, cfg, splits["test"].image_shape[0])
    sources = {"bank (pseudo, zoo classes)": bank,
               "real, zoo classes": train.subset(known),
               "real, other meta-train classes": train.subset(other),
               "meta-test": splits["test"]}
    report = {"run": str(run), "tasks": tasks, "settings": settings, "zoo_classes": len(known),
              "other_classes": len(other), "accuracy": {}}
    for name, source in sources.items():
        if name.startswith("bank"):
            sampler = EpisodeSampler(source.class_sizes(), 5, 1, 15, seed=0)
            with torch.no_grad():
                result = evaluate(learner, source, [sampler.task(i) for i in range(tasks)], adapt_kwargs=settings,
                                  progress=False)
        else:
            result = evaluate(learner, source, task_list(source, 5, 1, 15, tasks, seed=0),
                              adapt_kwargs=settings, progress=False)
        report["accuracy"][name] = [round(result.accuracy, 2), round(result.ci95, 2)]
        print(f"{name:32s} {result.accuracy:6.2f} ± {result.ci95:.2f}", flush=True)
    report["teachers_recognise"] = teacher_recognition(teachers, bank, train)
    print("teachers recognise their own classes (%):", report["teachers_recognise"])
    return report


def adversary_balance(eci: ECI, tasks: int = 20) -> dict:
    """The Gradient Switch's pull on each bank class against its teacher's, at ``eci``'s current state.

    For every bank class: ``prior``, the gradient norm (on the class's bank logits) of its teacher's
    inversion loss as a plain step weighs it (divided by the teachers per step), and ``adversary``, the
    mean gradient norm of ``-lambda_adv * L_outer`` over those of ``tasks`` fresh pseudo tasks (the
    switch's own sampler, past the run's draws) that read the class.  Returns the medians over classes
    and the median of the per-class ratio adversary / prior."""
    inv, bank = eci.inversion, eci.bank
    per_step = min(eci.cfg.inversion.teachers_per_step, len(eci.teachers))
    prior: dict[int, float] = {}
    for i, classes in enumerate(bank.teacher_classes):
        loss, _ = inv.teacher_loss(i)
        grads = torch.autograd.grad(loss / per_step, [bank.logits[k] for k in classes])
        prior.update({k: float(g.norm()) for k, g in zip(classes, grads)})
    pulls: dict[int, list[float]] = {}
    for j in range(tasks):
        spec = eci.fresh_tasks.task(10**9 + j)
        classes = sorted({int(c) for c in spec.classes})
        loss = eci.switch.adversarial_loss(eci.learner, spec)(bank)
        grads = torch.autograd.grad(loss, [bank.logits[k] for k in classes])
        for k, g in zip(classes, grads):
            pulls.setdefault(k, []).append(float(g.norm()))
    bank.pop_touched()
    adversary = {k: sum(v) / len(v) for k, v in pulls.items()}
    median = lambda values: float(torch.tensor(list(values)).median())
    return {"lambda_adv": eci.cfg.switch.lambda_adv, "classes": len(adversary), "prior": median(prior.values()),
            "adversary": median(adversary.values()),
            "ratio": median(adversary[k] / prior[k] for k in adversary if prior.get(k))}


def run_balance(run: Path, tasks: int) -> dict:
    """:func:`adversary_balance` at ``run``'s last checkpoint (its final bank, learner and inversion step)."""
    final = latest_checkpoint(run)
    if final is None:
        raise SystemExit(f"{run}: no complete checkpoint")
    cfg, teachers = run_zoo(run)
    val = {cfg.data.dataset: load_split(cfg.data.dataset, "val", cfg.data.root, cfg.data.image_size)}
    eci = ECI(cfg, teachers, val, Dist(device="cpu"), pre_phase=False)
    for name in ("bank", "learner", "inversion"):
        getattr(eci, name).load_state_dict(checkpointed_state(final, name))
    report = {"run": str(run), "checkpoint": final.name, **adversary_balance(eci, tasks)}
    print(f"{final.name}: lambda_adv {report['lambda_adv']}, median |grad| per bank class: priors "
          f"{report['prior']:.2e}, adversary {report['adversary']:.2e}, ratio {report['ratio']:.1f}", flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="finished runs' output_dir")
    parser.add_argument("--out", type=Path, required=True, help="JSON file of the reports")
    parser.add_argument("--tasks", type=int, default=None,
                        help="tasks per source (default 300), or fresh pseudo tasks with --adversary (default 20)")
    parser.add_argument("--adversary", action="store_true",
                        help="the Gradient Switch's gradient on the bank against the priors' (see above)")
    args = parser.parse_args(argv)
    tasks = args.tasks if args.tasks is not None else 20 if args.adversary else 300
    if tasks < 1:
        parser.error(f"--tasks must be >= 1, got {tasks}")
    torch.set_num_threads(1)
    reports = []
    for run in args.runs:
        print(run, flush=True)
        reports.append(run_balance(run, tasks) if args.adversary else diagnose(run, tasks))
    args.out.write_text(json.dumps(reports, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
