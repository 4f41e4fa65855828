"""Test-time calibration after (or instead of) the inner loop: one small family behind one interface.

A *calibrator* takes a meta-learner and one task's real support set and returns a
predictor for that task's queries: ``calibrator.adapt(learner, support_x, support_y,
way) -> predictor``, ``predictor(query_x) -> logits``.  ``adapt`` is the learner's own
``adapt`` followed by the member's :meth:`Calibrator.calibrate`, so rows that follow one
learner can share its adaptation (:func:`calibration_accuracies`).  It never changes the
meta-learner's own weights, so tasks do not leak into each other.  Each member has a
``name`` (its row in the results, ``purer+<name>``), a config dataclass (if it has settings) whose fields
are the settings a grid may search on meta-val (:func:`select_calibration`), and a
test-time cost.  The members:

* ``none`` (:class:`NoCalibration`): the learner's own adaptation, nothing after it;
* ``icfil`` (:class:`~purer.calibrate.icfil.ICFIL`): invert the adapted learner into a
  pseudo support set and calibrate on real + pseudo support (METHOD.md part 4);
* ``support-ce`` (:class:`~purer.calibrate.support_ce.SupportCE`): ICFIL's control, the
  same calibration steps as plain cross-entropy on the real support;
* ``simpleshot`` (:class:`~purer.calibrate.simpleshot.SimpleShot`): no inner loop, the
  nearest L2-normalised centroid of the meta-learned features (:attr:`Calibrator.adapts`
  is false: rows of it alone run no inner loop).

:meth:`Calibrator.wrap` turns a (learner, calibrator) pair into a
:class:`~purer.meta.MetaLearner` for :func:`purer.evaluate.evaluate`; the run and the
benchmarks see only this interface.

Example:
    >>> cal = calibrator("support-ce", icfil=ICFILConfig())                      # doctest: +SKIP
    >>> predict = cal.adapt(learner, support_x, support_y, way=5)                 # doctest: +SKIP
    >>> logits = predict(query_x)                                                 # doctest: +SKIP
    >>> evaluate(cal.wrap(learner), test_set, tasks, method="purer+support-ce")   # doctest: +SKIP
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Callable, ClassVar, Sequence

import torch

from ..data.episodes import EpisodeSource, ImageSet, TaskSpec
from ..meta.base import MetaLearner
from ..meta.maml import ANIL, MAML
from ..meta.mtl import MTL
from ..meta.protonet import ProtoNet, neg_sq_distances, prototypes
from ..zoo.architectures import Classifier


@dataclass
class CalibratedTask:
    """One task's calibrated predictor: a private network (the meta-learner is untouched).

    Attributes:
        learner: gives the input contract (``learner.prepare``).
        model: the adapted (and calibrated) network; its BatchNorm uses batch statistics
            like the meta-learner's.  For ProtoNet its head is unused.
        prototypes: ``[N, D]`` for ProtoNet (from the real support with the calibrated
            encoder), else ``None``.
        pseudo_x: ``[N*M, C, H, W]`` the pseudo support in ``[0, 1]``, class-major (empty
            without one).
        pseudo_y: ``[N*M]`` its labels.
        stats: 0-dim tensors from the calibration (e.g. ``inversion_acc``, ``r_bn``,
            ``calibration_loss``), left on the device.
    """

    learner: MetaLearner
    model: Classifier
    prototypes: torch.Tensor | None
    pseudo_x: torch.Tensor
    pseudo_y: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Network inputs ``[B, C', H', W']`` (already prepared) -> logits ``[B, N]``."""
        if self.prototypes is None:
            return self.model(x)
        return neg_sq_distances(self.model.encoder(x), self.prototypes)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, H, W]`` in ``[0, 1]`` -> logits ``[B, N]``."""
        return self.logits(self.learner.prepare(x))


class Calibrator(ABC):
    """A test-time calibration: ``adapt(learner, support_x, support_y, way) -> predictor``.

    Subclasses declare ``class X(Calibrator, name="...")`` and set :attr:`config_type`
    (a dataclass; its fields, ``section.field`` for nested dataclasses, are the settings
    :func:`select_calibration` may search).

    Args:
        config: the settings (default: ``config_type()``).
    """

    name: ClassVar[str] = ""
    config_type: ClassVar[type] = type(None)
    #: Whether :meth:`calibrate` reads the learner's adaptation (rows that do not skip the inner loop).  A member
    #: that does not reads only the learner's features (:meth:`MetaLearner.embed`), never its way-sized head, so it
    #: classifies tasks of any way (:meth:`purer.pipeline.RunConfig.test_rows`).
    adapts: ClassVar[bool] = True
    members: ClassVar[dict[str, type["Calibrator"]]] = {}

    def __init_subclass__(cls, name: str = "", **kwargs):
        super().__init_subclass__(**kwargs)
        if name:
            cls.name = name
            Calibrator.members[name] = cls

    def __init__(self, config: Any = None):
        self.config = config if config is not None else self.config_type()

    @abstractmethod
    def calibrate(self, learner: MetaLearner, adapted: Any, support_x: torch.Tensor, support_y: torch.Tensor,
                  way: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """The task's predictor ``query [B, C, H, W] -> [B, N]`` after the learner's own adaptation ``adapted``
        (``learner.adapt`` on this support: every calibration starts from it, so rows can share one)."""

    def adapt(self, learner: MetaLearner, support_x: torch.Tensor, support_y: torch.Tensor, way: int,
              **test_time: Any) -> Callable[[torch.Tensor], torch.Tensor]:
        """Support ``[N*K, C, H, W]`` in ``[0, 1]``, labels ``[N*K]`` -> a predictor ``query [B, C, H, W] -> [B, N]``:
        ``learner.adapt`` (``test_time``: its inner lr and steps; skipped for a member that does not read it,
        :attr:`adapts`), then :meth:`calibrate`.  Works under ``torch.no_grad()`` too."""
        check_support(support_x, support_y)
        adapted = None
        if self.adapts:
            with torch.enable_grad():
                adapted = learner.adapt(support_x, support_y, way, **test_time)
        return self.calibrate(learner, adapted, support_x, support_y, way)

    def predict(self, learner: MetaLearner, support_x: torch.Tensor, support_y: torch.Tensor, way: int,
                query_x: torch.Tensor, **test_time: Any) -> torch.Tensor:
        """Query logits ``[B, N]`` for ``query_x [B, C, H, W]`` after :meth:`adapt`."""
        return self.adapt(learner, support_x, support_y, way, **test_time)(query_x)

    def test_cost(self, learner: MetaLearner) -> dict:
        """What a test task needs beyond ``learner.test_cost()``."""
        return {}

    def settings(self) -> dict:
        """The settings a results row records (the config's top-level scalar fields; none without a dataclass)."""
        if not is_dataclass(self.config):
            return {}
        return {k: v for k, v in dataclasses.asdict(self.config).items() if not isinstance(v, dict)}

    def with_settings(self, settings: dict[str, Any]) -> "Calibrator":
        """A calibrator of this kind with ``settings`` applied (see :func:`with_settings`)."""
        if not is_dataclass(self.config):
            if settings:
                raise ValueError(f"calibration {self.name!r} has no settings, got {sorted(settings)}")
            return self
        return type(self)(with_settings(self.config, settings))

    def wrap(self, learner: MetaLearner) -> MetaLearner:
        """``learner`` followed by this calibration, as a :class:`MetaLearner` for :func:`purer.evaluate.evaluate`."""
        return CalibratedLearner(learner, self)


class NoCalibration(Calibrator, name="none"):
    """The learner's own adaptation and nothing after it (the plain ``purer`` row)."""

    config_type = dict

    def calibrate(self, learner, adapted, support_x, support_y, way):
        return lambda x: learner.predict(adapted, x)

    def wrap(self, learner: MetaLearner) -> MetaLearner:
        return learner  # nothing to add: it keeps the learner's own (batched) evaluation


class CalibratedLearner(MetaLearner):
    """A meta-learner followed by a calibrator at test time; ``adapt`` returns the calibrator's predictor.

    Test-time settings of the wrapped learner (its ``tunable``, e.g. inner lr and
    steps) pass through ``adapt``.  Meta-test only: it cannot be meta-trained.
    """

    def __init__(self, learner: MetaLearner, calibrator: Calibrator):
        super().__init__(None)
        self.learner = learner
        self.calibrator = calibrator
        self.tunable = learner.tunable

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, way: int, *, create_graph: bool = False,
              **test_time: Any) -> Callable[[torch.Tensor], torch.Tensor]:
        if create_graph:
            raise ValueError(f"{self.calibrator.name} is a meta-test stage and is not differentiable; meta-train "
                             "the wrapped learner itself")
        return self.calibrator.adapt(self.learner, support_x, support_y, way, **test_time)

    def predict(self, adapted: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return adapted(x)

    def test_cost(self) -> dict:
        return {**self.learner.test_cost(), **self.calibrator.test_cost(self.learner)}


def adapted_model(learner: MetaLearner, adapted: Any) -> tuple[Classifier, bool]:
    """A private :class:`Classifier` copy of ``learner`` under its ``adapted`` state (what a calibrator trains).

    MAML (and its task-adaptive members L2F and ALFA): the network with the fast
    weights; ANIL: the network with the adapted head; MTL: its frozen encoder with
    the scaled and shifted weights written in, and the adapted head (the calibration
    then trains all of it, as after MAML); ProtoNet: the encoder with a linear head
    equivalent to the prototypes
    (``-||f - c||^2 = 2 c.f - ||c||^2 - ||f||^2`` and the last term is the same for
    every class, so ``W = 2 c``, ``b = -||c||^2`` give the same softmax).

    Returns:
        ``(model, is_prototypical)``; every parameter of ``model`` is a fresh leaf
        with ``requires_grad=True``.

    Raises:
        TypeError: for a learner other than MAML (and family), ANIL, MTL or ProtoNet.
    """
    if isinstance(learner, MTL):
        model, is_proto = learner.adapted_classifier(adapted), False
    elif isinstance(learner, MAML):
        model = copy.deepcopy(learner.model)
        target = model.head if isinstance(learner, ANIL) else model
        with torch.no_grad():
            for name, p in target.named_parameters():
                p.copy_(adapted[name])
        is_proto = False
    elif isinstance(learner, ProtoNet):
        protos = adapted.detach()
        with protos.device:  # the head is made on the device, not copied there
            model = Classifier(copy.deepcopy(learner.encoder), protos.shape[1], protos.shape[0])
        with torch.no_grad():
            model.head.weight.copy_(2 * protos)
            model.head.bias.copy_(-protos.pow(2).sum(1))
        is_proto = True
    else:
        raise TypeError(f"calibration covers MAML, ANIL and ProtoNet learners (and MAML's L2F and ALFA members, MTL), "
                        f"got {type(learner).__name__}; add a case to purer.calibrate.base.adapted_model for it")
    model.train(learner.training)
    for p in model.parameters():
        p.requires_grad_(True)
    return model, is_proto


def fine_tune(model: Classifier, is_proto: bool, loss_fn: Callable[[], torch.Tensor], steps: int, lr: float
              ) -> torch.Tensor:
    """``steps`` Adam steps at ``lr`` on ``model`` (the encoder alone for a ProtoNet, whose head stands for its
    prototypes) minimising ``loss_fn()``; returns the last loss (detached; zero without steps)."""
    params = list((model.encoder if is_proto else model).parameters())
    optimizer = torch.optim.Adam(params, lr=lr)
    loss = torch.zeros((), device=params[0].device)
    for _ in range(steps):
        loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return loss.detach()


def real_logits(model: Classifier, features: torch.Tensor, protos: torch.Tensor | None) -> torch.Tensor:
    """Logits of ``features`` under the per-task model: its head, or the prototypes for a ProtoNet."""
    return model.head(features) if protos is None else neg_sq_distances(features, protos)


def finish(learner: MetaLearner, model: Classifier, is_proto: bool, support_x: torch.Tensor, support_y: torch.Tensor,
           way: int, pseudo_x: torch.Tensor, pseudo_y: torch.Tensor, stats: dict) -> CalibratedTask:
    """The calibrated predictor of ``model``: frozen, with ProtoNet prototypes from the real support."""
    for p in model.parameters():
        p.requires_grad_(False)
    protos = None
    if is_proto:
        with torch.no_grad():
            protos = prototypes(model.encoder(learner.prepare(support_x)), support_y, way)
    return CalibratedTask(learner, model, protos, pseudo_x, pseudo_y, stats)


def check_support(support_x: torch.Tensor, support_y: torch.Tensor) -> None:
    if support_x.ndim != 4 or support_y.shape != support_x.shape[:1]:
        raise ValueError(f"support_x must be [N*K, C, H, W] and support_y [N*K], got "
                         f"{tuple(support_x.shape)} and {tuple(support_y.shape)}")


def with_settings(config: Any, settings: dict[str, Any]) -> Any:
    """A copy of the dataclass ``config`` with ``settings`` applied; keys are field names, ``<section>.<field>``
    for a nested dataclass field (e.g. ``{"calibration_lr": 1e-3, "inversion.lr": 0.1}``).

    Raises:
        ValueError: for a key that names no setting.
    """
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    names = {f.name for f in fields(config)}
    for key, value in settings.items():
        head, _, rest = key.partition(".")
        section = getattr(config, head, None) if head in names else None
        if head not in names or (rest and not (is_dataclass(section) and rest in {f.name for f in fields(section)})):
            sections = [n for n in sorted(names) if is_dataclass(getattr(config, n))]
            raise ValueError(f"unknown {type(config).__name__} setting {key!r}; valid: "
                             f"{', '.join(n for n in sorted(names) if n not in sections)}"
                             + "".join(f" and {n}.<{type(getattr(config, n)).__name__} field>" for n in sections))
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            top[head] = value
    for head, values in nested.items():
        top[head] = dataclasses.replace(top.get(head, getattr(config, head)), **values)
    return dataclasses.replace(config, **top)


def calibration_accuracies(learner: MetaLearner, calibrators: Sequence[Calibrator], source: EpisodeSource,
                           tasks: Sequence[TaskSpec], *, adapt_kwargs: dict | None = None, chunk: int = 50
                           ) -> tuple[torch.Tensor, list[float]]:
    """Every calibrator's accuracy on every task, the learner adapted *once* per task for all of them.

    What :func:`purer.evaluate.task_accuracies` gives for each ``calibrator.wrap(learner)``, for one inner loop
    per task instead of one per calibrator: the rows of a meta-test (plain, ICFIL, support CE, and any
    calibration grid's candidates) all start from the same ``learner.adapt_task`` (``adapt_kwargs``: its inner
    lr and steps) and differ only in what follows.  Where the learner adapts tasks together on its device
    (:meth:`MetaLearner.tasks_together`, e.g. vmap on a GPU) the plain rows take that batched path and the
    calibrations share one adaptation per task among themselves.

    Returns:
        ``([len(calibrators), len(tasks)]`` accuracies in ``[0, 1]`` on the learner's device, not read back;
        each calibrator's seconds: the shared adaptation plus its own calibration and prediction, so the rows'
        seconds overlap).
    """
    adapt_kwargs = dict(adapt_kwargs or {})
    device = next(itertools.chain(learner.parameters(), learner.buffers())).device
    accs = torch.zeros(len(calibrators), len(tasks), device=device)
    seconds = [0.0] * len(calibrators)
    plain = [j for j, c in enumerate(calibrators) if isinstance(c, NoCalibration)]
    rest = list(range(len(calibrators)))
    if plain and learner.tasks_together(device):
        from ..evaluate import task_accuracies

        start = time.perf_counter()
        accs[plain] = task_accuracies(learner, source, tasks, adapt_kwargs=adapt_kwargs, chunk=chunk)
        for j in plain:
            seconds[j] = time.perf_counter() - start
        rest = [j for j in rest if j not in plain]
    if not rest or not tasks:
        return accs, seconds
    from ..evaluate import task_batches

    adapts = any(calibrators[j].adapts for j in rest)  # an inner loop only where a row reads it
    was_training = learner.training
    learner.eval()
    try:
        with torch.no_grad():
            k = 0
            for batch in task_batches(source, tasks, chunk, device):
                for t in range(len(batch)):
                    sx, qx = batch.support_x[t], batch.query_x[t]
                    start = time.perf_counter()
                    adapted = learner.adapt_task(sx, batch.support_y, batch.way, qx, **adapt_kwargs) if adapts \
                        else None
                    shared = time.perf_counter() - start
                    for j in rest:
                        start = time.perf_counter()
                        logits = calibrators[j].calibrate(learner, adapted, sx, batch.support_y, batch.way)(qx)
                        accs[j, k] = (logits.argmax(-1) == batch.query_y).float().mean()
                        seconds[j] += (shared if calibrators[j].adapts else 0.0) + time.perf_counter() - start
                    k += 1
    finally:
        learner.train(was_training)
    return accs, seconds


AccuraciesFn = Callable[[MetaLearner, Sequence[Calibrator], ImageSet, Sequence[TaskSpec], dict], list[float]]


def select_calibration(calibrator: Calibrator, grid: dict[str, Sequence[Any]], learner: MetaLearner,
                       val_source: ImageSet, val_tasks: Sequence[TaskSpec], adapt_kwargs: dict | None = None,
                       accuracies_fn: AccuraciesFn | None = None) -> tuple[Calibrator, float, list[dict]]:
    """Grid search of a calibrator's settings on meta-val tasks (never on meta-test).

    Args:
        calibrator: the settings not searched.
        grid: ``{setting: candidate values}`` (keys as in :func:`with_settings`); every
            combination is evaluated on the same tasks, all after one shared adaptation per task
            (:func:`calibration_accuracies`).
        learner: the meta-learner the calibration follows.
        val_source, val_tasks: meta-val images and a fixed task list over them.
        adapt_kwargs: the learner's own test-time settings (e.g. inner lr and steps).
        accuracies_fn: ``accuracies_fn(learner, candidates, source, tasks, adapt_kwargs) -> [accuracy in percent
            per candidate]`` (default: :func:`calibration_accuracies` here; a run passes one that splits the
            tasks over processes).

    Returns:
        ``(best calibrator, its meta-val accuracy in percent, one row per combination
        {"settings", "accuracy"})``; ties go to the earlier combination.
    """
    if accuracies_fn is None:
        def accuracies_fn(lrn, cals, source, tasks, kwargs):
            return [100 * float(a.mean()) for a in calibration_accuracies(lrn, cals, source, tasks,
                                                                          adapt_kwargs=kwargs)[0]]
    keys = list(grid)
    combos = [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
    candidates = [calibrator.with_settings(settings) for settings in combos]
    scores = accuracies_fn(learner, candidates, val_source, val_tasks, dict(adapt_kwargs or {}))
    table = [{"settings": settings, "accuracy": acc} for settings, acc in zip(combos, scores)]
    best = max(range(len(candidates)), key=lambda j: (scores[j], -j))
    return candidates[best], scores[best], table
