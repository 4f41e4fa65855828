"""ECI meta-training (PURER's loop): the algorithm in :class:`ECI`, the run around it in :func:`meta_train_eci`.

One meta-iteration (:meth:`ECI.iteration`):

1. **invert**: one bank update by episode inversion from a few sampled teachers (pixels, or a
   meta-learnt generator's images: ``inversion.synthesizer`` and its rules for a zoo of colour teachers or of
   several architectures, :meth:`~purer.inversion.InversionConfig.synthesizer_for`);
   adversarial (``- lambda_adv * L_outer`` on a fresh pseudo task) when the Gradient
   Switch fired at the previous iteration;
2. **meta-update** on a meta-batch of pseudo episodes (detached from the bank), at the iteration's
   outer lr (``meta.train.schedule``), with
   the zoo's outputs distilled into the learner beside them when ``distill`` is on; with
   ``meta.hard_tasks``, some of the meta-batch's tasks are re-sampled from the classes
   earlier tasks failed on (MTL's hard-task meta-batch, :mod:`purer.meta.hard_tasks`);
3. **feedback**: the meta-batch's pseudo-query accuracy goes to the Gradient Switch
   (the one read on the host every iteration: the switch decides on it; the hard-task
   sampler's failure classes come in the same read).

The meta-learner never sees a real meta-train image; the iteration kept is the best
on meta-val.  Around the loop, as collaborators it calls: :class:`~purer.pipeline.checkpoints.Checkpoints`
(a resumed run equals an uninterrupted one), :class:`~purer.pipeline.signals.StopSignals`
(Ctrl-C, SIGTERM, SIGUSR1 stop at the next iteration with a checkpoint),
:class:`~purer.pipeline.tracker.Tracker` (numbers, read every ``log_every``) and
:class:`~purer.pipeline.pictures.Pictures`.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .. import host
from ..data import EpisodeSampler, ImageSet
from ..distill import ZooDistillation
from ..evaluate import task_list
from ..inversion import GeneratorInversion, GradientSwitch, build_synthesizer
from ..meta import HardTasks, MetaLearner, WeightAverage, failure_labels
from ..meta.train import BestLearner, meta_step, set_outer_lr
from ..student import zoo_student
from ..zoo.teacher import Teacher, rule_zoo
from .build import best_start_teacher, build_bank, build_learner, teacher_kinds
from .checkpoints import Checkpoints, latest_checkpoint
from .distributed import Dist, autocast_dtype, bank_grad_sync, task_sync, term_sync
from .metatest import evaluate_split
from .pictures import Pictures
from .run_config import RunConfig, RunError
from .signals import StopSignals
from .tracker import Tracker


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
    hard_pool: list = field(default_factory=list)  # bank classes pooled for the next hard tasks (meta.hard_tasks)
    hard_batches: int = 0  # meta-batches that held hard tasks
    # seconds spent so far, over every session of the run (a resumed run reports the whole run's)
    seconds: dict = field(default_factory=lambda: dict.fromkeys(("zoo_student", "inversion", "distill", "meta"), 0.0))

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


class ECI:
    """The objects of ECI meta-training and its meta-iteration, as PURER's three steps.

    Args:
        cfg: the run's configuration.
        teachers: the zoo, on ``dist.device``.
        val_sets: the meta-val split of each dataset (the learner takes the most channels any has).
        dist: the run's processes (work is split over them; see :mod:`purer.pipeline.distributed`).
        autocast: the teachers' lower precision (mixed precision), or ``None``.
        pre_phase: run the ``meta.init: zoo-student`` pre-phase now (not on resume: the checkpoint holds its result).
        progress: show the pre-phase's bar.

    Everything is built on ``dist.device``; :meth:`objects` is what a checkpoint holds.
    """

    def __init__(self, cfg: RunConfig, teachers: Sequence[Teacher], val_sets: dict[str, ImageSet], dist: Dist,
                 autocast: torch.dtype | None = None, pre_phase: bool = True, progress: bool = False):
        m, device = cfg.meta, dist.device
        self.cfg, self.dist, self.teachers, self.val_sets = cfg, dist, list(teachers), val_sets
        channels = max(v.image_shape[0] for v in val_sets.values())
        size = cfg.data.image_size
        self.bank = build_bank(cfg, teachers, channels, device)
        self.inversion = build_synthesizer(teachers, self.bank, dataclasses.replace(cfg.inversion, seed=cfg.seed),
                                           autocast=autocast)
        self.switch = GradientSwitch(cfg.switch)
        self.val_tasks = {name: task_list(v, m.way, m.shot, m.query, m.val_tasks, seed=cfg.eval.seed)
                          for name, v in val_sets.items()}
        start, zoo_student_seconds, self.start_teacher = None, 0.0, None
        if m.init == "best-teacher":  # chosen again on resume: the same tasks give the same teacher
            found = best_start_teacher(m, teachers, val_sets, self.val_tasks, channels, size, autocast)
            if found is None:  # no teacher is the learner's network: it starts from random initialisation
                self.start_teacher = {"model_id": None, "learner": f"{m.arch} {channels}x{size}px",
                                      "zoo": teacher_kinds(teachers)}
            else:
                start, score = found
                self.start_teacher = {"model_id": start.model_id, "val_accuracy": round(score, 2)}
        elif m.init == "zoo-student" and pre_phase:
            # A pre-phase on the run's bank (resume finds it done: the checkpoint holds bank and learner).
            # Every process runs all of it, deterministic from the seed, so their banks and learners agree.
            began = time.perf_counter()
            try:
                start = zoo_student(teachers, self.bank, self.inversion, m.arch, m.zoo_student_steps, cfg.seed,
                                    arch_args=m.arch_args, progress=progress and dist.main)
            except ValueError as e:  # an unknown meta.arch or bad arch_args
                raise RunError(f"meta (init={m.init}, arch={m.arch}): {e}") from None
            zoo_student_seconds = time.perf_counter() - began
        #: the learner's start knows something (a teacher, the zoo's student, the averaged teachers)
        self.pretrained = m.init != "random" and (m.init != "best-teacher" or start is not None)
        self.learner = build_learner(cfg, teachers, channels, size, start).to(device)
        self.learner.task_batching = m.task_batching
        with torch.no_grad():  # the learner's embedding size, for the distillation's heads and maps
            feature_dim = self.learner.embed(torch.zeros(2, channels, size, size, device=device)).shape[-1]
        self.distillation = ZooDistillation(teachers, feature_dim, cfg.distill, self.inversion.augment,
                                            seed=cfg.seed, autocast=autocast,
                                            classes=self.bank.teacher_classes).to(device)
        # The heads and maps train with the learner (one Adam step on episodic + distillation loss).
        self.optimizer = torch.optim.Adam([*self.learner.parameters(), *self.distillation.parameters()],
                                          lr=m.train.outer_lr)
        self.best, self.state = BestLearner(self.learner), TrainState()
        self.state.seconds["zoo_student"] = zoo_student_seconds
        self.average = WeightAverage(self.learner, m.train.average)  # what meta-val scores, when on
        self.train_tasks = EpisodeSampler(self.bank.class_sizes(), m.way, m.shot, m.query, seed=cfg.seed)
        self.fresh_tasks = EpisodeSampler(self.bank.class_sizes(), m.way, m.shot, m.query, seed=cfg.seed + 10_000)
        # MTL's hard-task meta-batch: the meta-batch's failure classes come back with the switch's one read.
        self.hard_tasks = HardTasks(self.bank.class_sizes(), m.way, m.shot, m.query, m.hard_tasks,
                                    seed=cfg.seed + 30_000) if m.hard_tasks else None
        self._batch, self._failures = [], None  # this iteration's task specs and failure labels (hard tasks)

    def objects(self) -> dict:
        """What a checkpoint holds, by name (:data:`purer.pipeline.checkpoints.CHECKPOINTED`)."""
        return {"bank": self.bank, "inversion": self.inversion, "switch": self.switch, "learner": self.learner,
                "optimizer": self.optimizer, "best": self.best, "state": self.state, "distill": self.distillation,
                "average": self.average}

    # ---- the algorithm ------------------------------------------------------------------------------------
    def iteration(self) -> dict[str, torch.Tensor]:
        """One meta-iteration (invert, meta-update, feedback); its numbers, as device tensors."""
        it = self.state.iteration
        t0 = time.perf_counter()
        inverted = self.invert(it)
        t1 = time.perf_counter()
        loss, query_acc, distilled, t2 = self.meta_update(it)
        self.feedback(query_acc)
        self.average.update(self.learner, self.state.iteration)
        seconds = self.state.seconds
        seconds["inversion"] += t1 - t0
        seconds["distill"] += t2 - t1
        seconds["meta"] += time.perf_counter() - t2
        return {"meta/loss": loss, "meta/pseudo_query_acc": query_acc,
                **{f"inversion/{k}": v for k, v in inverted.items() if k != "extra"},
                **{f"distill/{k}": v for k, v in distilled.items()}}

    def invert(self, it: int) -> dict[str, torch.Tensor]:
        """Step 1: ``inversion.steps_per_iteration`` bank updates, the last adversarial if the switch fired.

        One process adds the adversarial term (the one after the teachers in the work split), so the summed
        bank gradient has it once; ``lambda_adv`` 0 is plain EI: the switch still counts, the bank never turns
        adversarial."""
        for _ in range(self.cfg.inversion.steps_per_iteration - 1):  # more plain bank updates first, if asked
            self._bank_step(self.inversion.sample_teachers(), None)
        chosen = self.inversion.sample_teachers()
        adversarial = None
        if self.state.adversarial_next and self.cfg.switch.lambda_adv > 0:
            adversarial = self.fresh_tasks.task(it)
            self.state.adversarial_steps += 1
        return self._bank_step(chosen, adversarial)

    def _bank_step(self, chosen: list[int], adversarial) -> dict[str, torch.Tensor]:
        d, inv = self.dist, self.inversion
        owner = {i: d.owner(k) for k, i in enumerate(chosen)}
        extra_owner = d.owner(len(chosen))
        mine = [i for i in chosen if owner[i] == d.rank]
        extra = None
        if adversarial is not None and extra_owner == d.rank:
            extra = self.switch.adversarial_loss(self.learner, adversarial)
        if isinstance(inv, GeneratorInversion):  # flat terms: (gradient, images, numbers) per teacher
            layout = {i: (owner[i], inv.term_size(i)) for i in chosen}
            if adversarial is not None:
                layout[len(self.teachers)] = (extra_owner, inv.term_size(len(self.teachers)))
            return inv.step(extra_loss=extra, teachers=mine, total=len(chosen), sync=term_sync(d, layout))
        layout = {}
        for rank in range(d.world):
            for term, classes in inv.term_classes([i for i in chosen if owner[i] == rank]).items():
                layout[term] = (rank, classes)
        if adversarial is not None:
            layout[len(self.teachers)] = (extra_owner, sorted({int(c) for c in adversarial.classes}))
        sync = bank_grad_sync(d, layout, [p.shape for p in self.bank.logits])
        return inv.step(extra_loss=extra, teachers=mine, total=len(chosen), sync=sync)

    def meta_update(self, it: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], float]:
        """Step 2: one outer step on the meta-batch's pseudo episodes, with zoo distillation beside it.

        The meta-batch's tasks and the distilled teachers are one list of work items split over processes,
        each a row of the outer gradient after the tasks' (so the sum is the one-process sum).  Returns the
        mean query loss and accuracy, the distillation's numbers and when distillation's passes ended."""
        d, mb = self.dist, self.cfg.meta.train.meta_batch
        mine = [j for j in range(mb) if d.owner(j) == d.rank]
        specs = [self.train_tasks.task(it * mb + j) for j in range(mb)]
        seen: list[torch.Tensor] = []
        if self.hard_tasks is not None:
            pooled = len(self.state.hard_pool)
            specs, self.state.hard_pool = self.hard_tasks.batch(self.state.hard_pool, it, specs)
            self.state.hard_batches += pooled > len(self.state.hard_pool)
        self._batch = specs
        with torch.no_grad():
            episodes = [self.bank.episode(specs[j]).detach() for j in mine]
        distilled = self.distillation.sample_teachers() if self.cfg.distill.active else []
        items = self.distillation.work_items(distilled)
        mine_distilled = [i for k, item in enumerate(items) if d.owner(mb + k) == d.rank for i in item]
        terms, dstats = self.distillation.losses(self.learner, self.bank, mine_distilled, it, ensemble=distilled) \
            if mine_distilled else ([], {})
        t_distilled = time.perf_counter()
        set_outer_lr(self.optimizer, self.cfg.meta.train, it)
        row = sum(p.numel() for group in self.optimizer.param_groups for p in group["params"]) + 2
        sync = task_sync(d, self._row_owners(mb, len(items)), row)
        loss, query_acc = meta_step(self.learner, self.optimizer, episodes, total=mb, sync=sync, extra=terms,
                                    observe=None if self.hard_tasks is None else
                                    lambda logits: seen.append(failure_labels(logits)))
        if self.hard_tasks is not None:  # every process gets every task's failure label, in task order
            self._failures = d.gather_tasks(torch.cat(seen).float() if seen else query_acc.new_zeros(0), mb)
        return loss, query_acc, dstats, t_distilled

    def _row_owners(self, tasks: int, distilled: int) -> list[int]:
        """The process of every row of the outer gradient: the tasks' (one per task, or one per process whose
        tasks go through the learner together), then one per distillation work item
        (:meth:`ZooDistillation.work_items`: a distilled teacher, or the whole step)."""
        d = self.dist
        if self.learner.tasks_together(d.device):
            task_rows = sorted({d.owner(j) for j in range(tasks)})
        else:
            task_rows = [d.owner(j) for j in range(tasks)]
        return task_rows + [d.owner(tasks + k) for k in range(distilled)]

    def feedback(self, query_acc: torch.Tensor) -> None:
        """Step 3: the pseudo-query accuracy to the Gradient Switch, which decides whether the next bank update
        is adversarial (the one host read per iteration)."""
        s = self.state
        if self._failures is None:
            acc = host.value(query_acc, "switch")
        else:  # the hard-task sampler's failure classes in the same read
            values = host.read(torch.cat([query_acc.reshape(1).float(), self._failures]), "switch").tolist()
            acc, failures = values[0], [int(v) for v in values[1:]]
            s.hard_pool = self.hard_tasks.record(s.hard_pool, self._batch, failures)
            self._failures = None
        s.adversarial_next = self.switch.update(acc)
        s.iteration += 1
        s.pseudo_query.append([s.iteration, acc])
        if s.adversarial_next:
            s.fired_at.append(s.iteration)

    # ---- selection on meta-val ----------------------------------------------------------------------------
    def validation_due(self) -> bool:
        """Meta-val after this iteration? Every ``val_every`` (0: the final state only) and at the end."""
        n, t = self.state.iteration, self.cfg.meta.train
        return bool(t.val_every and n % t.val_every == 0) or n == t.iterations

    def converged(self) -> bool:
        """Early stopping (``meta.train.patience``): meta-val has set no new best in its last ``patience`` scores."""
        return self.cfg.meta.train.converged(self.state.val)

    def validate(self) -> dict[str, float]:
        """Score the learner (its weight average, with ``meta.train.average``) on meta-val (the mean over
        datasets) and keep it if it is the best so far."""
        s = self.state
        with self.average.swapped_in(self.learner):
            scores = {name: evaluate_split(self.learner, v, self.val_tasks[name], self.dist).accuracy
                      for name, v in self.val_sets.items()}
            score = sum(scores.values()) / len(scores)
            s.val.append([s.iteration, score])
            if score > s.best_val:
                s.best_val, s.best_iteration = score, s.iteration
                self.best.keep(self.learner)
        logs = {"val/accuracy": score}
        if len(scores) > 1:
            logs.update({f"val/accuracy/{name}": v for name, v in scores.items()})
        return logs

    def tv_weights(self) -> dict[str, float]:
        """R_tv's weight for each kind of teacher the zoo holds, ``colour`` (3 channels) and ``grey`` (1; any
        other count by its number of channels): :meth:`~purer.inversion.InversionConfig.tv_weight`."""
        kind = lambda c: {3: "colour", 1: "grey"}.get(c, f"{c}-channel")
        kinds = {kind(t.config.in_channels): t.config.in_channels for t in self.teachers}
        return {kind: self.cfg.inversion.tv_weight(c) for kind, c in sorted(kinds.items())}

    @property
    def synthesizer(self) -> str:
        """What makes the bank's images in this run (:meth:`~purer.inversion.InversionConfig.synthesizer_for`)."""
        return "generator" if isinstance(self.inversion, GeneratorInversion) else "pixels"

    def summary(self) -> dict:
        s, m = self.state, self.cfg.meta
        return {"iterations": m.train.iterations, "iterations_run": s.iteration, "bank_classes": self.bank.num_classes,
                "best_iteration": s.best_iteration, "val_accuracy": round(s.best_val, 2) if s.val else None,
                "switch_fired": self.switch.fired, "fired_at": s.fired_at, "adversarial_steps": s.adversarial_steps,
                **({"hard_batches": s.hard_batches} if self.hard_tasks is not None else {}),
                "val_curve": s.val, "tv_weight": self.tv_weights(), "synthesizer": self.synthesizer,
                **({"start_teacher": self.start_teacher} if self.start_teacher is not None else {}),
                **{f"seconds_{k}": round(v, 1) for k, v in s.seconds.items()}}


def meta_train_eci(cfg: RunConfig, acc, dist: Dist, teachers: Sequence[Teacher], val_sets: dict[str, ImageSet],
                   out: Path, resume: bool, progress: bool, identity: dict, stop: StopSignals,
                   on_checkpoint: Callable[[], None] | None = None) -> tuple[MetaLearner, dict]:
    """ECI meta-training on pseudo episodes; returns the meta-val-best learner and a summary.

    ``val_sets``: the meta-val split of each dataset; the iteration kept is the best on the mean of their
    accuracies.  ``identity`` is written into every checkpoint (see :class:`Checkpoints`), and
    ``on_checkpoint()`` called after each.  A stop signal (``stop``) ends the loop at the next iteration
    with a checkpoint and :class:`~purer.pipeline.signals.Stopped`.
    """
    eci = ECI(cfg, teachers, val_sets, dist, autocast_dtype(acc), pre_phase=not resume, progress=progress)
    start = eci.start_teacher
    if start is not None and start["model_id"] is None:
        acc.print(f"meta.init=best-teacher: no teacher is the learner's network ({start['learner']}; the zoo has "
                  f"{start['zoo']}), so the learner starts from random initialisation")
    elif start is not None:
        acc.print(f"meta.init=best-teacher: the learner starts from teacher {start['model_id']} "
                  f"({start['val_accuracy']}% on meta-val by nearest centroid)")
    weights = eci.tv_weights()
    if "colour" in weights:
        colour_key = "a_tv_colour" if cfg.inversion.a_tv_colour is not None else "a_tv"
        acc.print("inversion: R_tv weight " + ", ".join(
            f"{w:g} for {kind} teachers (inversion.{colour_key if kind == 'colour' else 'a_tv'})"
            for kind, w in weights.items()))
    rule = cfg.inversion.synthesizer_key(t.config for t in teachers)
    if zoo := rule_zoo("synthesizer", rule):
        acc.print(f"inversion: the {eci.synthesizer} synthesizer for {zoo} (inversion.{rule})")
    if cfg.distill.active:
        rule = cfg.distill.images_key(t.config for t in teachers)
        zoo = rule_zoo("images", rule)
        what = {"own": "its own classes' bank images", "step": "the bank images of every teacher of the step"}
        acc.print(f"distill: each teacher distilled on {what[eci.distillation.images]}{f', for {zoo}' if zoo else ''} "
                  f"(distill.{rule})")
    m = cfg.meta.train
    if m.early_stopping:
        acc.print(f"meta.train.patience={m.patience}: meta-training stops once meta-val (every {m.val_every} "
                  f"iterations) sets no new best {m.patience} times in a row; meta.train.iterations={m.iterations} is "
                  "the ceiling")
    checkpoints = Checkpoints(out, eci.objects(), dist, identity)
    if resume:
        found = latest_checkpoint(out)
        if found is None:
            raise RunError(f"--resume: no complete checkpoint under {out / 'checkpoints'}")
        checkpoints.restore(found)
        acc.print(f"resumed from {found} (iteration {eci.state.iteration})")
    every = cfg.checkpoint_every
    pictures = Pictures(out / "pictures", eci.bank, [t.model_id for t in teachers], cfg.picture_every, dist.main)
    # a run resumed after its early stop trains no further
    end = eci.state.iteration if eci.converged() else m.iterations
    bar = tqdm(range(eci.state.iteration, end), initial=eci.state.iteration, total=m.iterations,
               desc="ECI meta-train", disable=not (progress and dist.main))
    tracker = Tracker(acc, cfg.log_every, bar)

    def save(n: int) -> None:
        checkpoints.save(n)
        if on_checkpoint is not None:
            on_checkpoint()

    if eci.state.iteration == 0 and eci.pretrained:
        # A start that already knows something (a teacher, the zoo's student, the averaged teachers) is a candidate
        # of the selection: meta-training keeps it unless meta-val finds it improved.
        tracker.note(eci.validate())
        tracker.flush(0, False, eci.switch.fired)
    for it in bar:
        tracker.add(eci.iteration())
        n = eci.state.iteration
        stopping = False
        if eci.validation_due():
            tracker.note(eci.validate())
            stopping = eci.converged()  # only a meta-val can end training early
        done = n == m.iterations or stopping
        tracker.flush(n, done, eci.switch.fired)
        pictures.episode(n, eci.train_tasks, it * cfg.meta.train.meta_batch)
        # The last checkpoint lets a run stopped during meta-test resume without retraining.
        saved = n % every == 0 or done
        if saved:
            save(n)
        if stopping and n < m.iterations:
            acc.print(f"meta.train.patience={m.patience}: meta-val set no new best in its last {m.patience} scores, "
                      f"so meta-training stops at iteration {n} of {m.iterations} (keeping iteration "
                      f"{eci.state.best_iteration})")
            break
        # With several processes, they agree on stopping every log_every iterations (a collective).
        if dist.world == 1 or n % cfg.log_every == 0 or n == m.iterations:
            if dist.any(stop.requested is not None):
                if not saved:
                    save(n)
                acc.print(f"stopped ({stop.requested or 'another process'}): checkpoint written at iteration "
                          f"{n}; continue with --resume")
                stop.check(True)
    pictures.final(eci.state.pseudo_query, eci.state.val, eci.state.fired_at)
    eci.learner.load_state_dict(eci.best.state)
    return eci.learner, eci.summary()
