"""The PURER pipeline: zoo -> ECI meta-training on pseudo episodes -> meta-test with and without ICFIL.

``recipes/purer.py`` is a thin command line around :func:`run`.  One meta-iteration:

1. **Episode inversion**: one bank update from a few sampled teachers; adversarial
   (``- lambda_adv * L_outer`` on a fresh pseudo task) when the GradientSwitch fired
   at the previous iteration.
2. **Meta-update** on a meta-batch of pseudo episodes (detached from the bank).
3. **Feedback**: the meta-batch's pseudo-query accuracy goes to the GradientSwitch.

The meta-learner never sees a real meta-train image.  Model selection (the
meta-iteration kept, test-time inner lr and steps) uses the meta-val split only;
meta-test runs once, on a fixed seeded task list shared by every row.

Multi-process (Accelerate): a meta-batch's tasks are split across processes and
their meta-gradients summed (second-order MAML cannot rely on DDP hooks); an
inversion step's teachers are split the same way and the bank gradient summed;
evaluation tasks are split and gathered.  Every random draw depends on
``(seed, iteration, task or teacher)`` only, so one process and several give the
same run (up to float summation order), and a resumed run equals an
uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .baselines import METHODS as BASELINE_METHODS
from .baselines import BaselineConfig, run_baselines
from .calibrate import ICFIL, ICFILConfig
from .config import save_config, to_dict
from .data import Episode, EpisodeSampler, ImageSet, TaskSpec, load_split
from .evaluate import EvalResult, TuningGrid, evaluate, fingerprint, paired_difference, select_test_time, \
    task_list
from .inversion import EpisodeInversion, GradientSwitch, InversionConfig, PseudoBank, SwitchConfig
from .inversion.grid import save_bank_grid, save_episode_grid
from .meta import ANIL, MAML, MAMLConfig, MetaTrainConfig, ProtoNet
from .meta.train import meta_step
from .meta.base import InputSpec, MetaLearner
from .meta.init import average_teachers, distill_zoo, random_model, with_new_head
from .zoo.architectures import Classifier
from .zoo.pretrain import PretrainConfig, pretrain_zoo
from .zoo.store import Zoo, default_zoo_dir, read_safetensors
from .zoo.teacher import Teacher

LEARNERS = ("maml", "anil", "protonet")
# The rows a default run compares its MAML meta-learner with (fine-tuning and ProtoNet rows: see
# purer.baselines.METHODS, e.g. eval.baselines=[...] in a config).
DEFAULT_BASELINES = ("nc-pixels", "nc-best-teacher", "nc-all-teachers", "maml-random", "maml-avg-teachers",
                     "maml-real")
INITS = ("random", "avg-teachers", "distilled")


@dataclass
class DataConfig:
    """The real data: meta-val for selection, meta-test for the table, meta-train only for baselines.

    Attributes:
        dataset: a name of :func:`purer.data.load_split` (``glyphs`` is built in).
        root: where the dataset lies (``glyphs``: the cache directory).
        image_size: the side every image is resized to; Conv4 at 32 px ends in
            2x2x32 = 128 features, at 28 px in only 32 (METHOD.md).
    """

    dataset: str = "glyphs"
    root: str | None = None
    image_size: int = 32


@dataclass
class ZooConfig:
    """The model zoo: an existing directory, or one pre-trained on first use.

    Attributes:
        path: the zoo directory (default: ``model_zoo/zoos/<dataset>-<arch>-<models>x<classes>-<subsets>-<size>px``,
            with ``-<epochs>ep`` / ``-seed<seed>`` when those differ from the defaults).
        build_if_missing: pre-train the zoo from the fields below when ``path`` holds none (or
            finish one they started); a zoo holding other models is used as it is.
        num_models, classes_per_model, arch, subsets, epochs, seed: the pre-training
            recipe (see :class:`purer.zoo.pretrain.PretrainConfig`); teachers learn
            classes of the meta-train split only.
        merge_shared_classes: teachers whose ``class_ids`` name the same class share one
            bank class (METHOD.md part 1: a class is (model, local label) unless the zoo
            says two models share a class id), so with ``subsets: random`` a pseudo task
            never holds one class under two labels.  Set false for a zoo whose class ids
            are per-model labels (e.g. ``0..4`` of unrelated datasets).
    """

    path: str | None = None
    build_if_missing: bool = True
    num_models: int = 12
    classes_per_model: int = 5
    arch: str = "conv4"
    subsets: str = "disjoint"
    epochs: int = PretrainConfig.epochs
    seed: int = 0
    merge_shared_classes: bool = True


@dataclass
class MetaConfig:
    """The meta-learner and its training on pseudo episodes.

    Attributes:
        learner: ``maml`` | ``anil`` | ``protonet``.
        arch, arch_args: its network (any registered architecture).
        init: ``random``, ``avg-teachers`` (the release's initialisation; needs a
            same-architecture zoo) or ``distilled`` (the zoo distilled into ``arch``
            on the run's bank before meta-training; see :func:`purer.meta.init.distill_zoo`).
        distill_steps: iterations of the ``distilled`` pre-phase (one inversion step
            and one student step each).
        way, shot, query: the pseudo tasks it trains on (the release uses 15 queries;
            the default 5 makes an iteration about 2.5 times cheaper on a CPU).
        images_per_class: P, bank images per class (default ``shot + query``, as the release).
        maml: inner loop (MAML/ANIL).
        train: iterations, meta-batch, outer lr, and ``val_every`` (meta-val selection).
        val_tasks: size of the fixed meta-val task list used for selection.
    """

    learner: str = "maml"
    arch: str = "conv4"
    arch_args: dict = field(default_factory=dict)
    init: str = "random"
    distill_steps: int = 300
    way: int = 5
    shot: int = 1
    query: int = 5
    images_per_class: int | None = None
    # Inner lr 0.1, not the release's 0.01: on glyph meta-val (5-way 1-shot, 600 ECI iterations) 0.1 reached
    # 82% at 500 iterations where 0.01 reached 67% at 400; METHOD.md's prototype also adapts best at 0.1.
    maml: MAMLConfig = field(default_factory=lambda: MAMLConfig(inner_lr=0.1))
    train: MetaTrainConfig = field(default_factory=lambda: MetaTrainConfig(iterations=600, val_every=200))
    val_tasks: int = 50

    def __post_init__(self):
        if self.distill_steps < 1:
            raise ValueError(f"distill_steps must be >= 1, got {self.distill_steps}")


@dataclass
class EvalConfig:
    """Meta-test protocol: the same seeded task list for every row.

    Attributes:
        way, shots, query, tasks, seed: the meta-test task lists (one per shot).
        val_tasks: meta-val tasks for choosing test-time settings.
        grid: the shared grid of test-time inner lr and steps.
        icfil: also report the meta-learner with ICFIL.
        baselines: rows of :data:`purer.baselines.METHODS` to run (cached by config).
        baseline_train_iterations: real-data meta-training of the upper-bound rows.
    """

    way: int = 5
    shots: list[int] = field(default_factory=lambda: [1, 5])
    query: int = 15
    tasks: int = 600
    seed: int = 0
    val_tasks: int = 30
    grid: TuningGrid = field(default_factory=lambda: TuningGrid(steps=(1, 10)))
    icfil: bool = True
    baselines: list[str] = field(default_factory=lambda: list(DEFAULT_BASELINES))
    baseline_train_iterations: int = 300


@dataclass
class RunConfig:
    """Everything :func:`run` needs; ``recipes/configs/*.yaml`` set any of it.

    Attributes:
        output_dir: where results, pictures, logs and checkpoints go.
        seed: training seed (bank, meta-learner initialisation, pseudo tasks, teacher sampling).
        checkpoint_every: meta-iterations between checkpoints (``accelerator.save_state``).
        picture_every: meta-iterations between PNG grids of a pseudo episode.
        cache_dir: cached baseline rows (keyed by everything they depend on).
        threads: torch threads per process (``None``: torch's default). One is fastest for
            these small networks; use processes (``accelerate launch --num_processes``) for more cores.
    """

    data: DataConfig = field(default_factory=DataConfig)
    zoo: ZooConfig = field(default_factory=ZooConfig)
    inversion: InversionConfig = field(default_factory=InversionConfig)
    switch: SwitchConfig = field(default_factory=lambda: SwitchConfig(warmup=200))
    meta: MetaConfig = field(default_factory=MetaConfig)
    # A cheaper ICFIL than its library defaults: it runs on every meta-test task of both shots.
    icfil: ICFILConfig = field(default_factory=lambda: ICFILConfig(inversion_steps=5, calibration_steps=5))
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "runs/purer-glyphs"
    seed: int = 0
    checkpoint_every: int = 250
    picture_every: int = 500
    cache_dir: str = "runs/.cache"
    threads: int | None = 1

    def __post_init__(self):
        if self.meta.learner not in LEARNERS:
            raise ValueError(f"meta.learner must be one of {LEARNERS}, got {self.meta.learner!r}")
        if self.meta.init not in INITS:
            raise ValueError(f"meta.init must be one of {INITS}, got {self.meta.init!r}")
        unknown = set(self.eval.baselines) - set(BASELINE_METHODS)
        if unknown:
            raise ValueError(f"unknown eval.baselines {sorted(unknown)}; choose from {list(BASELINE_METHODS)}")
        if self.meta.learner != "protonet" and self.meta.way != self.eval.way:
            raise ValueError(f"a {self.meta.learner} meta-learner's head has meta.way={self.meta.way} outputs, so "
                             f"eval.way must match (got {self.eval.way}); ProtoNet alone can change the way")
        if min(self.eval.tasks, self.eval.val_tasks, self.meta.val_tasks) < 1 or not self.eval.shots:
            raise ValueError("eval.tasks, eval.val_tasks and meta.val_tasks must be >= 1, and eval.shots non-empty")
        if self.checkpoint_every < 1 or self.picture_every < 1:
            raise ValueError("checkpoint_every and picture_every must be >= 1")
        if self.inversion.seed != InversionConfig.seed:
            # The run's seed drives the inversion (see meta_train_eci); a second seed would be ignored.
            raise ValueError(f"inversion.seed is set by the run's seed; use seed={self.inversion.seed} instead")


class RunError(RuntimeError):
    """A problem with the run's inputs (dataset, zoo, task sizes) that the user can fix."""


# --------------------------------------------------------------------------------------------
# Distributed helpers (no-ops in one process)
# --------------------------------------------------------------------------------------------
class Dist:
    """The few collective operations the pipeline needs, over an ``accelerate.Accelerator``."""

    def __init__(self, accelerator):
        self.acc = accelerator
        self.rank = accelerator.process_index
        self.world = accelerator.num_processes

    @property
    def main(self) -> bool:
        return self.acc.is_main_process

    def share(self, items: Sequence) -> list:
        """This process's share of ``items`` (round robin)."""
        return list(items[self.rank::self.world])

    def sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        """In-place sum of ``tensors`` over processes (one flat all-reduce)."""
        if self.world == 1 or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        flat = self.acc.reduce(flat, reduction="sum")
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    def union(self, keys: Sequence[int]) -> list[int]:
        if self.world == 1:
            return sorted(keys)
        from accelerate.utils import gather_object

        return sorted({k for part in gather_object([list(keys)]) for k in part})

    def gather_tasks(self, local: np.ndarray, n: int) -> np.ndarray:
        """Per-task values computed round robin -> the full array in task order."""
        if self.world == 1:
            return local
        from accelerate.utils import gather_object

        out = np.empty(n)
        for rank, part in enumerate(gather_object([local.tolist()])):
            out[rank::self.world] = part
        return out

    def barrier(self) -> None:
        self.acc.wait_for_everyone()

    def any(self, flag: bool) -> bool:
        """``True`` if ``flag`` is set in any process."""
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)])
        self.sum_([t])
        return bool(t.item() > 0)


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


def bank_grad_sync(dist: Dist, bank: PseudoBank) -> Callable[[dict[int, torch.Tensor]], dict[int, torch.Tensor]] | None:
    """The inversion step's hook that sums the per-class bank gradients over processes."""
    if dist.world == 1:
        return None

    def sync(grads: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        full = {k: grads[k] if k in grads else torch.zeros_like(bank.logits[k]) for k in dist.union(list(grads))}
        dist.sum_(list(full.values()))
        return full

    return sync


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------
def zoo_path(cfg: RunConfig) -> Path:
    z = cfg.zoo
    if z.path:
        return Path(z.path)
    name = f"{cfg.data.dataset}-{z.arch}-{z.num_models}x{z.classes_per_model}-{z.subsets}-{cfg.data.image_size}px"
    # Every recipe field names the default directory, else a finished zoo built with other
    # epochs or another seed would be reused silently; defaults keep the short name.
    if z.epochs != ZooConfig.epochs:
        name += f"-{z.epochs}ep"
    if z.seed != ZooConfig.seed:
        name += f"-seed{z.seed}"
    return default_zoo_dir(name)


def load_zoo(cfg: RunConfig, dist: Dist, progress: bool) -> list[Teacher]:
    """The zoo's teachers, kept in memory; pre-trained on first use when allowed."""
    path = zoo_path(cfg)
    z = cfg.zoo
    try:
        spec = PretrainConfig(dataset=cfg.data.dataset, data_root=cfg.data.root, image_size=cfg.data.image_size,
                              num_models=z.num_models, classes_per_model=z.classes_per_model, arch=z.arch,
                              subsets=z.subsets, epochs=z.epochs, seed=z.seed)
        present = Zoo(path).ids() if (path / "zoo.json").exists() else None
    except (FileNotFoundError, ValueError) as e:
        raise RunError(f"zoo at {path}: {e}") from None
    # Build a missing zoo, or finish one this recipe started (an interrupted pre-training); a zoo
    # holding other models (e.g. registered ones) is used as it is and never written to.
    ours = {spec.model_id(i) for i in range(z.num_models)}
    if present is None or (z.build_if_missing and len(present) < z.num_models and set(present) <= ours):
        if not z.build_if_missing:
            raise RunError(f"no model zoo at {path}; build one with `purer-zoo pretrain --zoo {path}` or "
                           "`purer-zoo register`, or set zoo.build_if_missing=true")
        if dist.main:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # small teachers train fastest on one thread each
            try:
                print(f"pre-training a {z.num_models}-model zoo at {path} (once; later runs reuse it)")
                pretrain_zoo(spec, Zoo(path, create=True), progress=progress)
            except (FileNotFoundError, ValueError) as e:  # a zoo recipe the data cannot satisfy
                raise RunError(f"cannot pre-train the zoo at {path}: {e}") from None
            finally:
                torch.set_num_threads(threads)
        dist.barrier()
    try:
        teachers = Zoo(path).load_teachers()
    except (FileNotFoundError, ValueError) as e:  # a corrupt or foreign zoo directory
        raise RunError(str(e)) from None
    if not teachers:
        raise RunError(f"the model zoo at {path} is empty")
    return teachers


def build_learner(cfg: RunConfig, teachers: Sequence[Teacher], channels: int, size: int,
                  distilled: Classifier | None = None) -> MetaLearner:
    """The meta-learner of ``cfg.meta`` at its initialisation.

    ``distilled`` is the zoo's student (:func:`purer.meta.init.distill_zoo`) for
    ``init: distilled``: the learner takes its encoder and a fresh ``way``-output head
    (ProtoNet uses the encoder only).  On ``--resume`` there is none: a random model
    of the same shape stands in until the checkpoint's weights are loaded.
    """
    m = cfg.meta
    try:
        if m.init == "avg-teachers":
            model = average_teachers(teachers, m.way)
            spec = InputSpec.of(teachers[0].config)
        elif distilled is not None:
            model = with_new_head(distilled, m.way, seed=cfg.seed)
            spec = InputSpec(channels, size)
        else:
            model = random_model(m.arch, m.way, channels, size, m.arch_args, seed=cfg.seed)
            spec = InputSpec(channels, size)
    except ValueError as e:  # an unknown meta.arch or bad arch_args, or a zoo that cannot be averaged
        raise RunError(f"meta (init={m.init}, arch={m.arch}): {e}") from None
    return wrap_learner(m.learner, model, m.way, spec, m.maml)


def wrap_learner(kind: str, model: Classifier, way: int, spec: InputSpec, maml: MAMLConfig) -> MetaLearner:
    """``model`` as the meta-learner ``kind`` (one of :data:`LEARNERS`)."""
    if kind == "protonet":
        return ProtoNet(model, spec)
    return (ANIL if kind == "anil" else MAML)(model, way, spec, maml)


def build_bank(cfg: RunConfig, teachers: Sequence[Teacher], channels: int) -> PseudoBank:
    """The run's pseudo-image bank at its initialisation."""
    m = cfg.meta
    return PseudoBank(teachers, m.images_per_class or (m.shot + m.query), image_size=cfg.data.image_size,
                      channels=channels, merge_shared_classes=cfg.zoo.merge_shared_classes, seed=cfg.seed,
                      space=cfg.inversion.space)


def save_meta_learner(cfg: RunConfig, learner: MetaLearner, teachers: Sequence[Teacher], path: Path,
                      info: dict) -> None:
    """Write the meta-learner as a model folder: ``model.safetensors`` + ``config.json``.

    ``config.json`` says how to rebuild it (:func:`load_meta_learner`): the learner
    kind, its network (for ``init: avg-teachers`` the teachers' architecture), the
    input it expects, the inner loop, plus ``info`` (e.g. the meta-val selection and
    the test-time settings chosen per shot).
    """
    m, spec = cfg.meta, learner.input_spec
    arch, arch_args = (teachers[0].config.arch, teachers[0].config.arch_args) if m.init == "avg-teachers" \
        else (m.arch, m.arch_args)
    config = {"learner": m.learner, "arch": arch, "arch_args": arch_args, "way": m.way,
              "in_channels": spec.in_channels, "image_size": spec.image_size, "mean": list(spec.mean),
              "std": list(spec.std), "maml": dataclasses.asdict(m.maml), "dataset": cfg.data.dataset, **info}
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in learner.state_dict().items()}, str(path / "model.safetensors"))
    _write_json(path / "config.json", config)


def load_meta_learner(path: str | os.PathLike) -> MetaLearner:
    """A meta-learner written by a run (``<output_dir>/meta_learner``), ready to ``adapt`` and ``predict``.

    Example:
        >>> learner = load_meta_learner("runs/purer-glyphs/meta_learner")   # doctest: +SKIP
        >>> settings = json.load(open("runs/purer-glyphs/meta_learner/config.json"))["test_time"]["1"]  # doctest: +SKIP
        >>> logits = learner.predict(learner.adapt(support_x, support_y, 5, **settings), query_x)  # doctest: +SKIP
    """
    path = Path(path)
    try:
        c = json.loads((path / "config.json").read_text())
        model = random_model(c["arch"], c["way"], c["in_channels"], c["image_size"], c["arch_args"])
        spec = InputSpec(c["in_channels"], c["image_size"], tuple(c["mean"]), tuple(c["std"]))
        learner = wrap_learner(c["learner"], model, c["way"], spec, MAMLConfig(**c["maml"]))
        learner.load_state_dict(read_safetensors(path / "model.safetensors"))
    except (OSError, KeyError, ValueError, RuntimeError) as e:  # missing, foreign or corrupt files
        raise RunError(f"cannot load a meta-learner from {path}: {' '.join(str(e).split())[:300]}") from None
    return learner.eval()


# What a checkpoint of ECI meta-training holds, in the order Accelerate numbers the files.
CHECKPOINTED = ("bank", "inversion", "switch", "learner", "optimizer", "best", "state")


def checkpointed_state(checkpoint: str | os.PathLike, name: str) -> dict:
    """The state dict of one of :data:`CHECKPOINTED` in a checkpoint directory of a run."""
    return torch.load(Path(checkpoint) / f"custom_checkpoint_{CHECKPOINTED.index(name)}.pkl", weights_only=True)


def _detached(ep: Episode) -> Episode:
    return Episode(ep.support_x.detach(), ep.support_y, ep.query_x.detach(), ep.query_y, ep.classes)


@dataclass
class TrainState:
    """Progress of ECI meta-training that a checkpoint must restore."""

    iteration: int = 0
    adversarial_next: bool = False
    best_val: float = -math.inf
    best_iteration: int = 0
    val: list = field(default_factory=list)
    adversarial_steps: int = 0

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


def save_checkpoint(acc, dist: Dist, out: Path, iteration: int) -> None:
    """``accelerator.save_state`` into ``checkpoints/checkpoint_<iteration>``; a COMPLETE marker makes it valid.

    A run killed while saving leaves an unmarked directory that resume ignores; only
    the two newest complete checkpoints are kept.
    """
    root = out / "checkpoints"
    target = root / f"checkpoint_{iteration}"
    acc.save_state(str(target))
    dist.barrier()
    if dist.main:
        (target / "COMPLETE").write_text(str(iteration))
        for old in _checkpoints(root)[:-2]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def meta_train_eci(cfg: RunConfig, acc, dist: Dist, teachers: Sequence[Teacher], val_set: ImageSet, out: Path,
                   resume: bool, progress: bool) -> tuple[MetaLearner, dict]:
    """ECI meta-training on pseudo episodes; returns the meta-val-best learner and a summary."""
    m = cfg.meta
    channels, size = val_set.image_shape[0], cfg.data.image_size
    bank = build_bank(cfg, teachers, channels)
    inversion = EpisodeInversion(teachers, bank, dataclasses.replace(cfg.inversion, seed=cfg.seed))
    switch = GradientSwitch(cfg.switch)
    distilled, seconds_distill = None, 0.0
    if m.init == "distilled" and not resume:
        # A pre-phase on the run's bank (resume finds it done: the checkpoint holds bank and learner).
        # Every process runs all of it, deterministic from the seed, so their banks and learners agree.
        start = time.perf_counter()
        try:
            distilled = distill_zoo(teachers, bank, inversion, m.arch, m.distill_steps, cfg.seed,
                                    arch_args=m.arch_args, progress=progress and dist.main)
        except ValueError as e:  # an unknown meta.arch or bad arch_args
            raise RunError(f"meta (init={m.init}, arch={m.arch}): {e}") from None
        seconds_distill = time.perf_counter() - start
    learner = build_learner(cfg, teachers, channels, size, distilled)
    optimizer = torch.optim.Adam(learner.parameters(), lr=m.train.outer_lr)
    best, state = BestLearner(learner), TrainState()
    objects = {"bank": bank, "inversion": inversion, "switch": switch, "learner": learner, "optimizer": optimizer,
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
    val_tasks = task_list(val_set, m.way, m.shot, m.query, m.val_tasks, seed=cfg.eval.seed)
    sync = bank_grad_sync(dist, bank)
    mb = m.train.meta_batch
    times = {"inversion": 0.0, "meta": 0.0}
    bar = tqdm(range(state.iteration, m.train.iterations), initial=state.iteration, total=m.train.iterations,
               desc="ECI meta-train", disable=not (progress and dist.main))
    with DeferredInterrupt() as interrupt:
        for it in bar:
            t0 = time.perf_counter()
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
            loss, qacc = meta_step(learner, optimizer, [_detached(e) for e in episodes], total=mb,
                                   sync=dist.sum_ if dist.world > 1 else None)
            state.adversarial_next = switch.update(qacc)
            state.iteration = it + 1
            t2 = time.perf_counter()
            times["inversion"] += t1 - t0
            times["meta"] += t2 - t1
            logs = {"meta/loss": loss, "meta/pseudo_query_acc": qacc, "switch/fired": switch.fired,
                    **{f"inversion/{k}": v for k, v in inv.items()}}
            # val_every = 0: validate (and keep) the final state only, as MetaTrainConfig documents.
            if m.train.val_every and state.iteration % m.train.val_every == 0 or state.iteration == m.train.iterations:
                score = evaluate_split(learner, val_set, val_tasks, dist, progress=False).accuracy
                state.val.append([state.iteration, score])
                logs["val/accuracy"] = score
                if score > state.best_val:
                    state.best_val, state.best_iteration = score, state.iteration
                    best.keep(learner)
            acc.log(logs, step=state.iteration)
            if dist.main and (state.iteration % cfg.picture_every == 0 or state.iteration == 1):
                with torch.no_grad():
                    save_episode_grid(bank.episode(train_tasks.task(it * mb)), out / "pictures" /
                                      f"pseudo_episode_{state.iteration:06d}.png")
            bar.set_postfix(acc=f"{qacc:.2f}", ce=f"{inv['ce']:.2f}", fired=switch.fired)
            # The last checkpoint lets a run interrupted during meta-test resume without retraining.
            saved = state.iteration % cfg.checkpoint_every == 0 or state.iteration == m.train.iterations
            if saved:
                save_checkpoint(acc, dist, out, state.iteration)
            if dist.any(interrupt.requested):
                if not saved:
                    save_checkpoint(acc, dist, out, state.iteration)
                acc.print(f"interrupted: checkpoint written at iteration {state.iteration}; continue with --resume")
                raise KeyboardInterrupt
    if dist.main:
        save_bank_grid(bank, out / "pictures" / "bank_final.png", classes=list(range(min(20, bank.num_classes))))
    learner.load_state_dict(best.state)
    summary = {"iterations": m.train.iterations, "bank_classes": bank.num_classes,
               "best_iteration": state.best_iteration,
               "val_accuracy": round(state.best_val, 2) if state.val else None, "switch_fired": switch.fired,
               "adversarial_steps": state.adversarial_steps, "val_curve": state.val,
               "seconds_distill": round(seconds_distill, 1), "seconds_inversion": round(times["inversion"], 1),
               "seconds_meta": round(times["meta"], 1)}
    return learner, summary


def evaluate_split(learner: MetaLearner, source: ImageSet, tasks: Sequence[TaskSpec], dist: Dist, *,
                   method: str = "", adapt_kwargs: dict | None = None, progress: bool = False) -> EvalResult:
    """:func:`purer.evaluate.evaluate` with the tasks split over processes and gathered in order."""
    if dist.world == 1:
        return evaluate(learner, source, tasks, method=method, adapt_kwargs=adapt_kwargs, progress=progress)
    start = time.perf_counter()
    local = evaluate(learner, source, dist.share(tasks), method=method, adapt_kwargs=adapt_kwargs,
                     progress=progress and dist.main)
    accs = dist.gather_tasks(local.task_acc, len(tasks))
    return dataclasses.replace(local, task_acc=accs, tasks_id=fingerprint(tasks), seconds=time.perf_counter() - start)


# --------------------------------------------------------------------------------------------
# Baselines (cached), results files
# --------------------------------------------------------------------------------------------
def _baseline_plan(cfg: RunConfig, splits: dict[str, ImageSet], teachers: Sequence[Teacher]
                   ) -> tuple[BaselineConfig, Path, str]:
    """The baselines' settings, their cache file and the key naming everything they depend on."""
    e, m = cfg.eval, cfg.meta
    bcfg = BaselineConfig(way=e.way, shots=tuple(e.shots), query=e.query, test_tasks=e.tasks, val_tasks=e.val_tasks,
                          task_seed=e.seed, train_seeds=(cfg.seed,), arch=m.arch, arch_args=m.arch_args,
                          maml=m.maml, train=MetaTrainConfig(iterations=e.baseline_train_iterations,
                                                             meta_batch=m.train.meta_batch,
                                                             outer_lr=m.train.outer_lr,
                                                             val_every=max(1, e.baseline_train_iterations // 6)),
                          grid=e.grid)
    key = json.dumps({"data": to_dict(cfg.data), "baselines": dataclasses.asdict(bcfg), "methods": e.baselines,
                      "zoo": [t.config.sha256 for t in teachers],
                      "splits": {k: [len(v), v.class_names[:3]] for k, v in splits.items()}}, sort_keys=True,
                     default=str)
    path = Path(cfg.cache_dir) / f"baselines-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    return bcfg, path, key


def baseline_rows(cfg: RunConfig, splits: dict[str, ImageSet], teachers: Sequence[Teacher], progress: bool
                  ) -> list[dict]:
    """The baseline rows, reused from ``cache_dir`` when nothing they depend on changed."""
    if not cfg.eval.baselines:
        return []
    bcfg, path, key = _baseline_plan(cfg, splits, teachers)
    if path.is_file():
        print(f"baselines: reusing {path} (same data, zoo and settings)")
        return json.loads(path.read_text())["rows"]
    rows = run_baselines(splits, teachers, bcfg, methods=cfg.eval.baselines, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(path, {"key": json.loads(key), "rows": rows})
    return rows


def _baselines_worker(cfg: RunConfig) -> list[dict]:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    splits = {s: load_split(cfg.data.dataset, s, cfg.data.root, cfg.data.image_size) for s in ("train", "val", "test")}
    return baseline_rows(cfg, splits, Zoo(zoo_path(cfg)).load_teachers(), progress=False)


class Baselines:
    """The baseline rows, computed beside meta-training when that can use an idle core.

    In a single-process run whose baselines are not cached, a spawned worker
    process computes them while this process meta-trains (each on ``threads``
    threads), which roughly halves a first run's wall time on a 2-core machine.
    Otherwise they are computed (or read from the cache) when :meth:`rows` is called.
    """

    def __init__(self, cfg: RunConfig, splits: dict[str, ImageSet], teachers: Sequence[Teacher], dist: Dist,
                 progress: bool):
        self.cfg, self.splits, self.teachers, self.progress = cfg, splits, teachers, progress
        self.pool = self.pending = None
        if dist.world == 1 and cfg.eval.baselines and not _baseline_plan(cfg, splits, teachers)[1].is_file():
            import multiprocessing

            print("baselines: computing them in a background process while meta-training runs")
            self.pool = multiprocessing.get_context("spawn").Pool(1)
            self.pending = self.pool.apply_async(_baselines_worker, (cfg,))

    def rows(self) -> list[dict]:
        if self.pending is None:
            return baseline_rows(self.cfg, self.splits, self.teachers, self.progress)
        try:
            rows = self.pending.get()
        except BaseException:
            self.close()
            raise
        self.close(finished=True)
        return rows

    def close(self, finished: bool = False) -> None:
        """End the worker: let a finished one exit on its own (so it leaves nothing behind), else stop it
        at once (an error or an interrupt in the main process)."""
        if self.pool is not None:
            if finished:
                self.pool.close()
            else:
                self.pool.terminate()
            self.pool.join()
            self.pool = None


def results_table(rows: Sequence[dict], title: str = "") -> str:
    """A Markdown table of ``results.json`` rows: one line per method, one column per (way, shot)."""
    cols = sorted({(r["way"], r["shot"]) for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["method"], r["way"], r["shot"]): r for r in rows}
    head = ["method"] + [f"{w}-way {s}-shot" for w, s in cols] + ["test-time cost"]
    lines = [f"### {title}", ""] if title else []
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for meth in methods:
        vals, cost = [], ""
        for w, s in cols:
            r = cell.get((meth, w, s))
            vals.append(f"{r['accuracy']:.2f} ± {r['ci95']:.2f}" if r else "")
            cost = cost or (", ".join(f"{k}={v}" for k, v in r["test_cost"].items()) if r else "")
        lines.append("| " + " | ".join([meth] + vals + [cost]) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------------------------
def run(cfg: RunConfig, accelerator=None, resume: bool = False, progress: bool = True) -> dict:
    """Run the whole pipeline; write and return ``results.json``'s content.

    Raises:
        RunError: missing dataset or zoo, or task sizes the data cannot supply.
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    out = Path(cfg.output_dir)
    acc = accelerator or Accelerator(cpu=True, log_with="tensorboard",
                                     project_config=ProjectConfiguration(project_dir=str(out),
                                                                         logging_dir=str(out / "logs")))
    dist = Dist(acc)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    acc.init_trackers("purer", config=_flat_hparams(cfg))
    start = time.perf_counter()

    try:
        splits = {s: load_split(cfg.data.dataset, s, cfg.data.root, cfg.data.image_size)
                  for s in ("train", "val", "test")}
    except (OSError, ValueError) as e:  # missing or malformed data, or an unwritable glyph cache
        raise RunError(str(e)) from None
    _check_sizes(cfg, splits)
    teachers = load_zoo(cfg, dist, progress)

    baselines = Baselines(cfg, splits, teachers, dist, progress)
    try:
        learner, summary = meta_train_eci(cfg, acc, dist, teachers, splits["val"], out, resume, progress)
        rows = evaluate_purer(cfg, learner, splits, dist, progress)
        if dist.main:
            save_meta_learner(cfg, learner, teachers, out / "meta_learner", {
                "selected": {"iteration": summary["best_iteration"], "val_accuracy": summary["val_accuracy"]},
                "test_time": {str(r["shot"]): r.get("settings", {}) for r in rows if r["method"] == "purer"}})
        if dist.main:
            rows += baselines.rows()
    finally:
        baselines.close()
    results = {"dataset": cfg.data.dataset, "way": cfg.eval.way, "query": cfg.eval.query, "tasks": cfg.eval.tasks,
               "seed": cfg.eval.seed, "train_seed": cfg.seed, "selected_on": "val", "rows": rows,
               "zoo": {"path": str(zoo_path(cfg)), "models": len(teachers)}, "meta_train": summary,
               "processes": dist.world, "seconds": round(time.perf_counter() - start, 1)}
    if dist.main:
        _write_json(out / "results.json", results)
        table = results_table(rows, f"{cfg.data.dataset}: {cfg.eval.way}-way, {cfg.eval.tasks} meta-test tasks, "
                                    "mean ± 95% CI (%)")
        (out / "results.md").write_text(table)
        print("\n" + table)
    acc.end_training()
    return results


def evaluate_purer(cfg: RunConfig, learner: MetaLearner, splits: dict[str, ImageSet], dist: Dist,
                   progress: bool) -> list[dict]:
    """The meta-learner's rows (``purer``, ``purer+icfil``), settings chosen on meta-val."""
    e, rows = cfg.eval, []
    for shot in e.shots:
        test_tasks = task_list(splits["test"], e.way, shot, e.query, e.tasks, e.seed)
        val_tasks = task_list(splits["val"], e.way, shot, e.query, e.val_tasks, e.seed)
        chosen = select_test_time(learner, splits["val"], val_tasks, e.grid)
        plain = evaluate_split(learner, splits["test"], test_tasks, dist, method="purer",
                               adapt_kwargs=chosen.settings, progress=progress)
        rows.append(plain.row(val_accuracy=round(chosen.val_accuracy, 2), seconds=round(plain.seconds, 1)))
        if e.icfil:
            with_icfil = evaluate_split(ICFIL(cfg.icfil).wrap(learner), splits["test"], test_tasks, dist,
                                        method="purer+icfil", adapt_kwargs=chosen.settings, progress=progress)
            diff, ci = paired_difference(with_icfil, plain)
            rows.append(with_icfil.row(paired_vs_purer=[round(diff, 2), round(ci, 2)],
                                       seconds=round(with_icfil.seconds, 1)))
    return rows


def _check_sizes(cfg: RunConfig, splits: dict[str, ImageSet]) -> None:
    e, m = cfg.eval, cfg.meta
    for split, way, shots in (("val", e.way, e.shots), ("test", e.way, e.shots), ("val", m.way, [m.shot])):
        for shot in shots:
            try:
                EpisodeSampler(splits[split].class_sizes(), way, shot, e.query)
            except ValueError as err:
                raise RunError(f"{cfg.data.dataset}/{split}: {err}") from None


def _flat_hparams(cfg: RunConfig) -> dict[str, Any]:
    flat: dict[str, Any] = {}

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif isinstance(v, (int, float, str, bool)):
                flat[prefix + k] = v
            elif v is not None:
                flat[prefix + k] = str(v)

    walk(to_dict(cfg), "")
    return flat


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
