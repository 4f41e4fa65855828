"""The baselines every results table compares against, and one function that runs them all.

Rows (``method`` names) produced by :func:`run_baselines`:

========================  ===============================================================
``nc-pixels``             nearest centroid on raw pixels (sanity row)
``nc-best-teacher``       nearest centroid on the penultimate features of the one teacher
                          that is best on meta-val
``nc-all-teachers``       nearest centroid on all teachers' features, each teacher's
                          features L2-normalised, then concatenated (N models at test time)
``finetune-best-teacher`` fine-tune that teacher on the support set with a new head
``maml-random``           MAML adapting from random weights
``protonet-random``       ProtoNet on a random encoder
``maml-avg-teachers``     MAML from the average of same-architecture teachers
``protonet-avg-teachers`` ProtoNet on that averaged encoder
``maml-real``             upper bound: MAML meta-trained on the real meta-train split
``protonet-real``         upper bound: ProtoNet meta-trained on the real meta-train split
========================  ===============================================================

Every method with test-time settings (inner lr and steps) gets them from the same
grid on meta-val (:func:`purer.evaluate.select_test_time`), and every method is
scored on the same meta-test task list.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.func import functional_call, vmap

from .data.episodes import Episode, ImageSet, TaskBatch, TaskSpec, episode_labels
from .evaluate import TuningGrid, evaluate, select_test_time, task_list
from .meta.base import InputSpec, MetaLearner
from .meta.init import average_teachers, random_model
from .meta.maml import MAML, MAMLConfig, sgd_steps
from .meta.protonet import PrototypeClassifier, ProtoNet, prototypes
from .meta.train import MetaTrainConfig, meta_train, real_episodes
from .zoo.teacher import Teacher

METHODS = ("nc-pixels", "nc-best-teacher", "nc-all-teachers", "finetune-best-teacher", "maml-random",
           "protonet-random", "maml-avg-teachers", "protonet-avg-teachers", "maml-real", "protonet-real")


class FeatureSet:
    """An episode source over precomputed features: the same tasks as ``source``, features for images.

    Args:
        source: the image set the task specs index into.
        features: ``[M, D]``, row ``i`` the features of ``source.images[i]``.

    ``episode(spec)`` returns an :class:`Episode` whose ``support_x`` / ``query_x``
    are ``[N*K, D]`` / ``[N*Q, D]`` features, class-major like the image episode.
    """

    def __init__(self, source: ImageSet, features: torch.Tensor):
        if features.ndim != 2 or features.shape[0] != len(source):
            raise ValueError(f"features must be [{len(source)}, D] for {source.name or 'the source'}, "
                             f"got {tuple(features.shape)}")
        self.source, self.features = source, features
        self.class_names = source.class_names

    def class_sizes(self) -> list[int]:
        return self.source.class_sizes()

    def episode(self, spec: TaskSpec) -> Episode:
        way, dev = spec.way, self.features.device
        return Episode(self.features[self.source.index(spec.classes, spec.support).to(dev)],
                       episode_labels(way, spec.support.shape[1], dev),
                       self.features[self.source.index(spec.classes, spec.query).to(dev)],
                       episode_labels(way, spec.query.shape[1], dev), tuple(self.class_names[c] for c in spec.classes))

    def episodes(self, specs: Sequence[TaskSpec]) -> TaskBatch:
        """The tasks of ``specs`` (one shape) as a :class:`TaskBatch` of features ``[T, N*K, D]``."""
        way, shot, query = specs[0].way, specs[0].support.shape[1], specs[0].query.shape[1]
        classes, dev = np.stack([s.classes for s in specs]), self.features.device
        return TaskBatch(self.features[self.source.index(classes, np.stack([s.support for s in specs])).to(dev)],
                         episode_labels(way, shot, dev),
                         self.features[self.source.index(classes, np.stack([s.query for s in specs])).to(dev)],
                         episode_labels(way, query, dev), way)


class NearestCentroid(PrototypeClassifier):
    """Nearest class mean (squared Euclidean) on fixed features, without meta-learning.

    Args:
        teachers: whose penultimate features (:meth:`Teacher.features`, each teacher
            in eval mode with its own input contract) to use. Each teacher's features
            are L2-normalised before concatenation, so every teacher weighs the same
            whatever its feature scale. No teachers: raw pixels, flattened.

    The features of an image do not depend on the task (teachers use their running
    BatchNorm statistics), so :meth:`extract` can compute them once per split;
    ``adapt`` and ``predict`` take 2-D inputs ``[B, D]`` as such precomputed features.
    """

    def __init__(self, teachers: Sequence[Teacher] = ()):
        super().__init__(None)
        self.teachers = nn.ModuleList(teachers)
        self.task_batching = "vmap"  # fixed features, no per-task weights: a batch of tasks is always cheaper

    def _query_logits_together(self, batch: TaskBatch) -> torch.Tensor:
        support, query = self.features_of(batch.support_x), self.features_of(batch.query_x)
        protos = vmap(prototypes, in_dims=(0, None, None))(support, batch.support_y, batch.way)
        return -(query.unsqueeze(2) - protos.unsqueeze(1)).pow(2).sum(-1)

    def features_of(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`features` of ``[T, B, ...]`` (T tasks' images or features at once) -> ``[T, B, D]``."""
        return self.features(x.flatten(0, 1)).view(*x.shape[:2], -1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` in ``[0, 1]`` -> ``[B, D]`` (``D`` = sum of the teachers' feature sizes, or C*H*W).

        ``[B, D]`` inputs are returned unchanged (already extracted).
        """
        if x.ndim == 2:
            return x
        if not len(self.teachers):
            return rearrange(x, "b c h w -> b (c h w)")
        return torch.cat([F.normalize(t.features(x), dim=-1) for t in self.teachers], dim=-1)

    @torch.no_grad()
    def extract(self, source: ImageSet, batch_size: int = 512, autocast: torch.dtype | None = None) -> FeatureSet:
        """The features of every image of ``source`` (on its device), as an episode source for
        :func:`purer.evaluate.evaluate`; ``autocast``: a lower precision for the teachers' passes."""
        dev = source.device
        with torch.autocast(dev.type, dtype=autocast) if autocast else contextlib.nullcontext():
            feats = [self.features(source.float_images(torch.arange(i, min(i + batch_size, len(source)), device=dev)))
                     for i in range(0, len(source), batch_size)]
        return FeatureSet(source, torch.cat(feats).float())

    def test_cost(self) -> dict:
        return {"params": sum(p.numel() for p in self.parameters()), "models": len(self.teachers)}


class FineTune(MetaLearner):
    """Fine-tune a teacher on each task's support set: all its weights and a new ``way``-output head.

    The head starts at zero, so the result does not depend on a random head draw;
    the teacher's BatchNorm keeps its running statistics (eval mode), as it was
    trained. Plain SGD, ``steps`` full-batch steps at ``lr`` (both tunable on meta-val).
    """

    tunable = ("lr", "steps")

    def __init__(self, teacher: Teacher, way: int, lr: float = 0.1, steps: int = 10):
        super().__init__(InputSpec.of(teacher.config))
        self.teacher, self.way, self.lr, self.steps = teacher, way, lr, steps

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, way: int, *, create_graph: bool = False,
              lr: float | None = None, steps: int | None = None) -> dict[str, torch.Tensor]:
        if way != self.way:
            raise ValueError(f"this FineTune was built for {self.way}-way tasks, got a {way}-way episode")
        encoder = self.teacher.model.encoder
        x = self.prepare(support_x)
        params = {f"encoder.{n}": p.detach().requires_grad_() for n, p in encoder.named_parameters()}
        params["head.weight"] = x.new_zeros(way, self.teacher.model.feature_dim, requires_grad=True)
        params["head.bias"] = x.new_zeros(way, requires_grad=True)
        return sgd_steps(params, lambda p: F.cross_entropy(self._logits(p, x), support_y),
                         self.lr if lr is None else lr, self.steps if steps is None else steps,
                         create_graph=create_graph)

    def _logits(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        enc = {n.removeprefix("encoder."): p for n, p in params.items() if n.startswith("encoder.")}
        return F.linear(functional_call(self.teacher.model.encoder, enc, (x,)), params["head.weight"],
                        params["head.bias"])

    def predict(self, adapted: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return self._logits(adapted, self.prepare(x))

    def test_cost(self) -> dict:
        return {"params": sum(p.numel() for p in self.teacher.model.encoder.parameters())
                + self.way * (self.teacher.model.feature_dim + 1), "models": 1}


def teacher_scores(teachers: Sequence[Teacher], val_source: ImageSet, val_tasks: Sequence[TaskSpec],
                   autocast: torch.dtype | None = None) -> list[float]:
    """Each teacher's nearest-centroid accuracy (percent) on its own features, on meta-val tasks."""
    scores = []
    for t in teachers:
        nc = NearestCentroid([t])
        scores.append(evaluate(nc, nc.extract(val_source, autocast=autocast), val_tasks, progress=False).accuracy)
    return scores


def best_teacher(teachers: Sequence[Teacher], val_source: ImageSet, val_tasks: Sequence[TaskSpec],
                 autocast: torch.dtype | None = None) -> tuple[Teacher, float]:
    """The teacher whose features give the best nearest-centroid accuracy (percent) on meta-val tasks."""
    if not teachers:
        raise ValueError("best_teacher needs at least one teacher")
    scores = teacher_scores(teachers, val_source, val_tasks, autocast)
    i = max(range(len(teachers)), key=scores.__getitem__)
    return teachers[i], scores[i]


def same_architecture(teachers: Sequence[Teacher]) -> bool:
    c = [(t.config.arch, t.config.in_channels, t.config.image_size, t.config.arch_args) for t in teachers]
    return bool(c) and all(x == c[0] for x in c)


@dataclass
class BaselineConfig:
    """What :func:`run_baselines` runs; defaults follow METHOD.md's protocol and the release.

    Attributes:
        way, shots, query: the tasks (5-way, 1 and 5 shot, 15 queries per class).
        test_tasks, val_tasks, task_seed: sizes and seed of the meta-test and meta-val task lists.
        train_seeds: seeds of the rows that depend on a training or initialisation seed
            (random init and real-data meta-training), one row per seed.
        arch, arch_args: the meta-learner network for random init and real-data training.
        maml: MAML inner loop during meta-training (second order, 1 step at lr 0.01).
        train: real-data meta-training (the upper bound), with meta-val selection.
        grid: the shared test-time grid.
    """

    way: int = 5
    shots: tuple[int, ...] = (1, 5)
    query: int = 15
    test_tasks: int = 600
    val_tasks: int = 100
    task_seed: int = 0
    train_seeds: tuple[int, ...] = (0,)
    arch: str = "conv4"
    arch_args: dict = field(default_factory=dict)
    maml: MAMLConfig = field(default_factory=MAMLConfig)
    train: MetaTrainConfig = field(default_factory=lambda: MetaTrainConfig(iterations=2000, val_every=250))
    grid: TuningGrid = field(default_factory=TuningGrid)


def run_baselines(splits: Mapping[str, ImageSet], teachers: Sequence[Teacher] = (),
                  config: BaselineConfig | None = None, methods: Sequence[str] | None = None,
                  progress: bool = True, log: Callable[[dict], None] | None = None,
                  autocast: torch.dtype | None = None) -> list[dict]:
    """Evaluate the baselines on ``splits["test"]`` with test-time settings chosen on ``splits["val"]``.

    Everything runs on the device of ``splits["test"]`` (teachers must be there too).

    Args:
        splits: ``{"train", "val", "test"}`` image sets (``"train"`` only for the ``*-real`` rows).
        teachers: the zoo; rows that need teachers are skipped without them, the
            ``*-avg-teachers`` rows unless all teachers share one architecture.
        config: tasks, seeds, architectures and training settings.
        methods: a subset of :data:`METHODS` (default: all that apply).
        progress: tqdm bars.
        log: called with each row as soon as it is ready.
        autocast: a lower precision for the teachers' feature extraction (mixed precision).

    Returns:
        ``results.json`` rows (see :meth:`purer.evaluate.EvalResult.row`) with extras:
        ``seconds`` (wall time of the row: training, selection and evaluation),
        ``val_accuracy`` and ``val_grid`` (meta-val scores of the selection), ``seed``
        for seeded rows and ``train_iterations`` for the real-data rows.
    """
    config = config or BaselineConfig()
    methods = list(METHODS if methods is None else methods)
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown baseline methods {sorted(unknown)}; choose from {METHODS}")
    needed = {"val", "test"} | ({"train"} if any(m.endswith("-real") for m in methods) else set())
    missing = needed - set(splits)
    if missing:
        raise ValueError(f"run_baselines needs splits {sorted(missing)} (a mapping split name -> ImageSet)")
    if not teachers:
        methods = [m for m in methods if "teacher" not in m]
    elif not same_architecture(teachers):
        methods = [m for m in methods if "avg-teachers" not in m]
    val, test = splits["val"], splits["test"]
    device = test.device
    c, size = test.image_shape[0], test.image_shape[1]
    data_spec = InputSpec(c, size)
    teacher_spec = InputSpec.of(teachers[0].config) if teachers else None
    way, rows = config.way, []

    for shot in config.shots:
        test_tasks = task_list(test, way, shot, config.query, config.test_tasks, config.task_seed)
        val_tasks = task_list(val, way, shot, config.query, config.val_tasks, config.task_seed)
        best = best_teacher(teachers, val, val_tasks, autocast)[0] if any("best-teacher" in m for m in methods) \
            else None

        def trained(kind: str, seed: int) -> tuple[MetaLearner, dict]:
            model = random_model(config.arch, way, c, size, config.arch_args, seed=seed)
            learner = MAML(model, way, data_spec, config.maml) if kind == "maml" else ProtoNet(model, data_spec)
            learner.to(device, non_blocking=True)  # built on the CPU from its seed: moved once
            history = meta_train(learner, real_episodes(splits["train"], way, shot, config.query, seed=seed),
                                 config.train, val=(val, val_tasks), progress=progress)
            return learner, {"train_iterations": config.train.iterations, "best_step": history.best_step}

        builders: dict[str, tuple[bool, Callable[[int], tuple[MetaLearner, dict]]]] = {
            "nc-pixels": (False, lambda s: (NearestCentroid(), {})),
            "nc-best-teacher": (False, lambda s: (NearestCentroid([best]), {"teacher": best.model_id})),
            "nc-all-teachers": (False, lambda s: (NearestCentroid(teachers), {})),
            "finetune-best-teacher": (False, lambda s: (FineTune(best, way), {"teacher": best.model_id})),
            "maml-random": (True, lambda s: (MAML(random_model(config.arch, way, c, size, config.arch_args, s),
                                                  way, data_spec, config.maml), {})),
            "protonet-random": (True, lambda s: (ProtoNet(random_model(config.arch, way, c, size,
                                                                       config.arch_args, s), data_spec), {})),
            "maml-avg-teachers": (False, lambda s: (MAML(average_teachers(teachers, way), way, teacher_spec,
                                                         config.maml), {})),
            "protonet-avg-teachers": (False, lambda s: (ProtoNet(average_teachers(teachers, way), teacher_spec),
                                                        {})),
            "maml-real": (True, lambda s: trained("maml", s)),
            "protonet-real": (True, lambda s: trained("protonet", s)),
        }
        for method in methods:
            seeded, build = builders[method]
            for seed in (config.train_seeds if seeded else (None,)):
                start = time.perf_counter()
                learner, extra = build(seed)
                learner.to(device, non_blocking=True)
                v, t = (learner.extract(val, autocast=autocast), learner.extract(test, autocast=autocast)) \
                    if isinstance(learner, NearestCentroid) else (val, test)
                chosen = select_test_time(learner, v, val_tasks, config.grid)
                result = evaluate(learner, t, test_tasks, method=method, adapt_kwargs=chosen.settings,
                                  progress=progress)
                row = result.row(val_accuracy=round(chosen.val_accuracy, 2), **extra,
                                 **({"val_grid": chosen.table} if chosen.settings else {}),
                                 **({"seed": seed} if seeded else {}),
                                 seconds=round(time.perf_counter() - start, 1))
                rows.append(row)
                if log is not None:
                    log(row)
    return rows
