"""ECI meta-training (PURER's loop) with its checkpointed state.

One meta-iteration:

1. **Episode inversion**: one bank update from a few sampled teachers; adversarial
   (``- lambda_adv * L_outer`` on a fresh pseudo task) when the GradientSwitch fired
   at the previous iteration.
2. **Meta-update** on a meta-batch of pseudo episodes (detached from the bank).
3. **Feedback**: the meta-batch's pseudo-query accuracy goes to the GradientSwitch.

The meta-learner never sees a real meta-train image; the iteration kept is the
best on meta-val.  Everything a resumed run needs (:data:`CHECKPOINTED`) is saved
with ``accelerator.save_state``, so a resumed run equals an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..data import EpisodeSampler, ImageSet
from ..distill import ZooDistillation
from ..student import zoo_student
from ..evaluate import task_list
from ..inversion import EpisodeInversion, GradientSwitch
from ..inversion.grid import class_labels, save_bank_grid, save_episode_grid, save_training_plot
from ..meta import MetaLearner
from ..meta.train import meta_step
from ..zoo.teacher import Teacher
from .build import build_bank, build_learner
from .run_config import RunConfig, RunError
from .distributed import Dist, autocast_dtype, bank_grad_sync, task_sync
from .metatest import evaluate_split


class DeferredInterrupt:
    """Within the block, the first Ctrl-C only sets :attr:`requested`; a second one interrupts at once.

    A KeyboardInterrupt in the middle of a meta-iteration would leave the bank one
    inversion step ahead of the iteration counter, so a checkpoint written then would
    resume into a different run; the loop honours the request between iterations.
    """

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)

    def __enter__(self) -> "DeferredInterrupt":
        # Signal handlers live in the main thread; an ignored SIGINT (a background job) stays ignored.
        previous = signal.getsignal(signal.SIGINT)
        if threading.current_thread() is threading.main_thread() and previous is not signal.SIG_IGN:
            self._previous = signal.default_int_handler if previous is None else previous
            signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


# What a checkpoint of ECI meta-training holds, in the order Accelerate numbers the files.
CHECKPOINTED = ("bank", "inversion", "switch", "learner", "optimizer", "best", "state", "distill")


def checkpointed_state(checkpoint: str | os.PathLike, name: str) -> dict:
    """The state dict of one of :data:`CHECKPOINTED` in a checkpoint directory of a run."""
    return torch.load(Path(checkpoint) / f"custom_checkpoint_{CHECKPOINTED.index(name)}.pkl", weights_only=True)


@dataclass
class TrainState:
    """Progress of ECI meta-training that a checkpoint must restore."""

    iteration: int = 0
    adversarial_next: bool = False
    best_val: float = -math.inf
    best_iteration: int = 0
    val: list = field(default_factory=list)
    adversarial_steps: int = 0
    pseudo_query: list = field(default_factory=list)  # [iteration, pseudo-query accuracy] (pictures/training.png)
    fired_at: list = field(default_factory=list)  # iterations at which the switch fired

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


class BestLearner:
    """The meta-learner weights best on meta-val so far (checkpointed with the run)."""

    def __init__(self, learner: MetaLearner):
        self.keep(learner)

    def keep(self, learner: MetaLearner) -> None:
        """Remember ``learner``'s current weights (a copy)."""
        self.state = {k: v.detach().clone() for k, v in learner.state_dict().items()}

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        self.state = {k: v.clone() for k, v in state.items()}


def _checkpoints(root: Path) -> list[Path]:
    done = [p.parent for p in root.glob("checkpoint_*/COMPLETE")]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint of the run in ``out``, if any."""
    found = _checkpoints(out / "checkpoints")
    return found[-1] if found else None


def save_checkpoint(acc, dist: Dist, out: Path, iteration: int, identity: dict) -> None:
    """``accelerator.save_state`` into ``checkpoints/checkpoint_<iteration>``; a COMPLETE marker makes it valid.

    A run killed while saving leaves an unmarked directory that resume ignores; only
    the two newest complete checkpoints are kept.  ``run.json`` records ``identity``
    (run id and training settings; see :func:`purer.pipeline.rundir.run_identity`).
    """
    root = out / "checkpoints"
    target = root / f"checkpoint_{iteration}"
    acc.save_state(str(target))
    dist.barrier()
    if dist.main:
        (target / "run.json").write_text(json.dumps(identity, indent=1))
        (target / "COMPLETE").write_text(str(iteration))
        for old in _checkpoints(root)[:-2]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def meta_train_eci(cfg: RunConfig, acc, dist: Dist, teachers: Sequence[Teacher], val_sets: dict[str, ImageSet],
                   out: Path, resume: bool, progress: bool, identity: dict) -> tuple[MetaLearner, dict]:
    """ECI meta-training on pseudo episodes; returns the meta-val-best learner and a summary.

    ``val_sets``: the meta-val split of each dataset; the iteration kept is the best on the mean of their
    accuracies, and the learner takes the most channels any of them has.  ``identity`` is written into
    every checkpoint (see :func:`save_checkpoint`).
    """
    m = cfg.meta
    channels = max(v.image_shape[0] for v in val_sets.values())
    size, device = cfg.data.image_size, acc.device
    bank = build_bank(cfg, teachers, channels).to(device)
    inversion = EpisodeInversion(teachers, bank, dataclasses.replace(cfg.inversion, seed=cfg.seed),
                                 autocast=autocast_dtype(acc))
    switch = GradientSwitch(cfg.switch)
    student, seconds_zoo_student = None, 0.0
    if m.init == "zoo-student" and not resume:
        # A pre-phase on the run's bank (resume finds it done: the checkpoint holds bank and learner).
        # Every process runs all of it, deterministic from the seed, so their banks and learners agree.
        start = time.perf_counter()
        try:
            student = zoo_student(teachers, bank, inversion, m.arch, m.zoo_student_steps, cfg.seed,
                                  arch_args=m.arch_args, progress=progress and dist.main)
        except ValueError as e:  # an unknown meta.arch or bad arch_args
            raise RunError(f"meta (init={m.init}, arch={m.arch}): {e}") from None
        seconds_zoo_student = time.perf_counter() - start
    learner = build_learner(cfg, teachers, channels, size, student).to(device)
    learner.task_batching = m.task_batching
    with torch.no_grad():  # the learner's embedding size, for the distillation's heads and maps
        feature_dim = learner.embed(torch.zeros(2, channels, size, size, device=device)).shape[-1]
    distillation = ZooDistillation(teachers, feature_dim, cfg.distill, inversion.augment, seed=cfg.seed).to(device)
    # The heads and maps train with the learner (one Adam step on episodic + distillation loss).
    optimizer = torch.optim.Adam([*learner.parameters(), *distillation.parameters()], lr=m.train.outer_lr)
    best, state = BestLearner(learner), TrainState()
    objects = {"bank": bank, "inversion": inversion, "switch": switch, "learner": learner, "optimizer": optimizer,
               "distill": distillation,
               "best": best, "state": state}
    for name in CHECKPOINTED:
        acc.register_for_checkpointing(objects[name])
    if resume:
        found = _checkpoints(out / "checkpoints")
        if not found:
            raise RunError(f"--resume: no complete checkpoint under {out / 'checkpoints'}")
        try:
            acc.load_state(str(found[-1]))
        except (RuntimeError, ValueError, KeyError) as e:  # shapes or keys of another config
            raise RunError(f"--resume: {found[-1]} does not fit this config (resume with the settings the run "
                           f"started with, or use a new output_dir): {' '.join(str(e).split())[:400]}") from None
        acc.print(f"resumed from {found[-1]} (iteration {state.iteration})")

    train_tasks = EpisodeSampler(bank.class_sizes(), m.way, m.shot, m.query, seed=cfg.seed)
    fresh_tasks = EpisodeSampler(bank.class_sizes(), m.way, m.shot, m.query, seed=cfg.seed + 10_000)
    val_tasks = {name: task_list(v, m.way, m.shot, m.query, m.val_tasks, seed=cfg.eval.seed)
                 for name, v in val_sets.items()}
    labels = class_labels(bank, [t.model_id for t in teachers])  # picture rows: class (teachers)
    sync = bank_grad_sync(dist)
    mb = m.train.meta_batch
    times = {"inversion": 0.0, "meta": 0.0}
    # Per-step numbers stay on the device and are summed; they are read (one synchronisation) every
    # log_every iterations.
    logged: dict[str, torch.Tensor] = {}
    bar = tqdm(range(state.iteration, m.train.iterations), initial=state.iteration, total=m.train.iterations,
               desc="ECI meta-train", disable=not (progress and dist.main))
    with DeferredInterrupt() as interrupt:
        for it in bar:
            t0 = time.perf_counter()
            for _ in range(cfg.inversion.steps_per_iteration - 1):  # more plain bank updates first, if asked
                chosen = inversion.sample_teachers()
                inversion.step(teachers=dist.share(chosen), total=len(chosen), sync=sync)
            chosen = inversion.sample_teachers()
            extra = None
            if state.adversarial_next and dist.main and cfg.switch.lambda_adv > 0:
                # One process adds the adversarial term, so the summed bank gradient has it once
                # (lambda_adv 0 is plain EI: the switch still counts, the bank never turns adversarial).
                extra = switch.adversarial_loss(learner, fresh_tasks.task(it))
                state.adversarial_steps += 1
            inv = inversion.step(extra_loss=extra, teachers=dist.share(chosen), total=len(chosen), sync=sync)
            t1 = time.perf_counter()
            with torch.no_grad():
                episodes = [bank.episode(train_tasks.task(it * mb + j)) for j in dist.share(range(mb))]
            # Zoo distillation beside the episodic loss: its teachers split over processes like the tasks, each
            # teacher's term a row after the tasks' (so the sum is the one-process sum).
            distilled = dist.share(distillation.sample_teachers()) if cfg.distill.active else []
            terms, dstats = distillation.losses(learner, bank, distilled, it) if distilled else ([], {})
            meta_sync = task_sync(dist, [*dist.share(range(mb)), *(mb + i for i in distilled)])
            loss, qacc = meta_step(learner, optimizer, [e.detach() for e in episodes], total=mb,
                                   sync=meta_sync, extra=terms)
            query_acc = float(qacc)  # the one number read every step: the switch decides on it
            state.adversarial_next = switch.update(query_acc)
            state.iteration = it + 1
            state.pseudo_query.append([state.iteration, query_acc])
            if state.adversarial_next:
                state.fired_at.append(state.iteration)
            t2 = time.perf_counter()
            times["inversion"] += t1 - t0
            times["meta"] += t2 - t1
            for k, v in {"meta/loss": loss, "meta/pseudo_query_acc": qacc,
                         **{f"inversion/{k}": v for k, v in inv.items() if k != "extra"},
                         **{f"distill/{k}": v for k, v in dstats.items()}}.items():
                logged[k] = logged.get(k, 0) + v
            logs: dict[str, float] = {}
            if state.iteration % cfg.log_every == 0 or state.iteration == m.train.iterations:
                n = (state.iteration - 1) % cfg.log_every + 1
                logs = {k: float(v) / n for k, v in logged.items()}
                logs["switch/fired"] = switch.fired
                logged = {}
                bar.set_postfix(acc=f"{logs['meta/pseudo_query_acc']:.2f}", ce=f"{logs['inversion/ce']:.2f}",
                                fired=switch.fired)
            # val_every = 0: validate (and keep) the final state only, as MetaTrainConfig documents.
            if m.train.val_every and state.iteration % m.train.val_every == 0 or state.iteration == m.train.iterations:
                scores = {name: evaluate_split(learner, v, val_tasks[name], dist, progress=False).accuracy
                          for name, v in val_sets.items()}
                score = sum(scores.values()) / len(scores)
                if len(scores) > 1:
                    logs.update({f"val/accuracy/{name}": v for name, v in scores.items()})
                state.val.append([state.iteration, score])
                logs["val/accuracy"] = score
                if score > state.best_val:
                    state.best_val, state.best_iteration = score, state.iteration
                    best.keep(learner)
            if logs:
                acc.log(logs, step=state.iteration)
            if dist.main and (state.iteration % cfg.picture_every == 0 or state.iteration == 1):
                spec = train_tasks.task(it * mb)
                with torch.no_grad():
                    save_episode_grid(bank.episode(spec), out / "pictures" / f"pseudo_episode_{state.iteration:06d}.png",
                                      row_labels=[labels[int(c)] for c in spec.classes])
            # The last checkpoint lets a run interrupted during meta-test resume without retraining.
            saved = state.iteration % cfg.checkpoint_every == 0 or state.iteration == m.train.iterations
            if saved:
                save_checkpoint(acc, dist, out, state.iteration, identity)
            if dist.any(interrupt.requested):
                if not saved:
                    save_checkpoint(acc, dist, out, state.iteration, identity)
                acc.print(f"interrupted: checkpoint written at iteration {state.iteration}; continue with --resume")
                raise KeyboardInterrupt
    if dist.main:
        save_bank_grid(bank, out / "pictures" / "bank_final.png", classes=list(range(min(20, bank.num_classes))),
                       teacher_ids=[t.model_id for t in teachers])
        save_training_plot(out / "pictures" / "training.png", state.pseudo_query, state.val, state.fired_at)
    learner.load_state_dict(best.state)
    summary = {"iterations": m.train.iterations, "bank_classes": bank.num_classes,
               "best_iteration": state.best_iteration,
               "val_accuracy": round(state.best_val, 2) if state.val else None, "switch_fired": switch.fired,
               "adversarial_steps": state.adversarial_steps, "val_curve": state.val,
               "seconds_zoo_student": round(seconds_zoo_student, 1), "seconds_inversion": round(times["inversion"], 1),
               "seconds_meta": round(times["meta"], 1)}
    return learner, summary
