"""Meta-test evaluation on a fixed, seeded task list, and test-time model selection on meta-val.

Protocol (METHOD.md): every method is scored on the *same* list of tasks (task
``i`` depends only on ``(seed, i)``), so differences between methods are paired;
settings that a method tunes at test time (inner lr and steps) are chosen on
meta-val tasks from one shared grid, never on meta-test.

Example:
    >>> tasks = task_list(test_set, way=5, shot=1)             # 600 tasks, 15 queries per class
    >>> chosen = select_test_time(learner, val_set, task_list(val_set, 5, 1, tasks=100))
    >>> result = evaluate(learner, test_set, tasks, method="maml", adapt_kwargs=chosen.settings)
    >>> result.row()   # {"method", "way", "shot", "accuracy", "ci95", "test_cost", ...}
"""
from __future__ import annotations

import hashlib
import itertools
import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import host
from .data.episodes import EpisodeSampler, EpisodeSource, TaskBatch, TaskSpec

if TYPE_CHECKING:
    from .meta.base import MetaLearner


def mean_ci95(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Mean and 95% confidence half-width ``1.96 * std / sqrt(n)`` of ``values``.

    ``std`` is the sample standard deviation (``ddof=1``); the half-width is 0 for
    a single value.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("mean_ci95 needs at least one value")
    ci = 1.96 * v.std(ddof=1) / np.sqrt(v.size) if v.size > 1 else 0.0
    return float(v.mean()), float(ci)


def task_list(source: EpisodeSource, way: int, shot: int, query: int | None = 15, tasks: int = 600,
              seed: int = 0) -> list[TaskSpec]:
    """``tasks`` seeded N-way K-shot task specs on ``source`` (``query`` per class, or as many as a class has)."""
    return EpisodeSampler(source.class_sizes(), way, shot, query, seed=seed).tasks(tasks)


def fingerprint(tasks: Sequence[TaskSpec]) -> str:
    """A short hash identifying a task list, to check that two results are paired."""
    blob = json.dumps([t.to_json() for t in tasks], separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class EvalResult:
    """Per-task accuracies of one method on one task list.

    Attributes:
        method, way, shot: what was evaluated.
        task_acc: ``[T]`` accuracy of each task, in ``[0, 1]``, in task-list order.
        test_cost: e.g. ``{"params": 113000, "models": 1}``; where ``settings`` give the inner loop's ``steps``
            (MAML's family, fine-tuning), also ``inner_steps``, unless the cost already says (SimpleShot: 0).
        tasks_id: :func:`fingerprint` of the task list.
        settings: the test-time settings used (e.g. ``{"lr": 0.1, "steps": 5}``).
        seconds: wall time of the evaluation.
    """

    method: str
    way: int
    shot: int
    task_acc: np.ndarray
    test_cost: dict
    tasks_id: str
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0

    def __post_init__(self):
        # The gradient steps a task takes at test time are part of its cost, beside the networks run.
        if "steps" in self.settings and "inner_steps" not in self.test_cost:
            self.test_cost = {**self.test_cost, "inner_steps": self.settings["steps"]}

    @property
    def accuracy(self) -> float:
        """Mean accuracy in percent."""
        return 100 * mean_ci95(self.task_acc)[0]

    @property
    def ci95(self) -> float:
        """95% confidence half-width in percent (see :func:`mean_ci95`)."""
        return 100 * mean_ci95(self.task_acc)[1]

    def row(self, **extra) -> dict:
        """A ``results.json`` row: method, way, shot, accuracy and ci95 (percent), test_cost, the task list's
        size and fingerprint (rows with one ``tasks_id`` are paired), and extras."""
        row = {"method": self.method, "way": self.way, "shot": self.shot, "accuracy": round(self.accuracy, 2),
               "ci95": round(self.ci95, 2), "test_cost": self.test_cost, "tasks": int(self.task_acc.size),
               "tasks_id": self.tasks_id}
        if self.settings:
            row["settings"] = self.settings
        row.update(extra)
        return row


def evaluate(learner: "MetaLearner", source: EpisodeSource, tasks: Sequence[TaskSpec], *, method: str = "",
             adapt_kwargs: dict | None = None, progress: bool = True, chunk: int = 50) -> EvalResult:
    """Accuracy of ``learner`` on every task of ``tasks`` (adapt on support, predict query).

    Tasks are taken ``chunk`` at a time (:meth:`MetaLearner.batch_query_logits`): a
    learner that adapts to tasks together on this device does so, others adapt one
    after another; either way the per-task accuracies are the same.  Accuracies stay
    on the device until the end (no synchronisation per task).

    Args:
        learner: any :class:`~purer.meta.MetaLearner` (its own weights are not changed).
        source: what the task specs index into (an :class:`~purer.data.ImageSet`, or
            any :class:`~purer.data.EpisodeSource` such as precomputed features).
        tasks: the fixed task list (see :func:`task_list`).
        method: the row's name.
        adapt_kwargs: test-time settings passed to ``learner.adapt`` (e.g. from
            :func:`select_test_time`).
        progress: show a tqdm bar.
        chunk: tasks gathered and adapted at once.
    """
    if not tasks:
        raise ValueError("evaluate needs a non-empty task list")
    start = time.perf_counter()
    accs = task_accuracies(learner, source, tasks, adapt_kwargs=adapt_kwargs, progress=progress, method=method,
                           chunk=chunk)
    return EvalResult(method, tasks[0].way, int(tasks[0].support.shape[1]), host.values(accs.double(), "result"),
                      learner.test_cost(), fingerprint(tasks), dict(adapt_kwargs or {}), time.perf_counter() - start)


def task_accuracies(learner: "MetaLearner", source: EpisodeSource, tasks: Sequence[TaskSpec], *,
                    adapt_kwargs: dict | None = None, progress: bool = False, method: str = "", chunk: int = 50
                    ) -> torch.Tensor:
    """The accuracy of ``learner`` on each task of ``tasks``, ``[len(tasks)]`` on the learner's device (not read
    back: :func:`evaluate` reads it once; a multi-process run gathers the processes' shares first).  Arguments
    as :func:`evaluate`'s; an empty task list gives an empty tensor."""
    adapt_kwargs = dict(adapt_kwargs or {})
    was_training = learner.training
    learner.eval()
    # The learner's device; a learner without weights (nearest centroid on raw pixels) works where the data is.
    weight = next(itertools.chain(learner.parameters(), learner.buffers()), None)
    accs = []
    try:
        with torch.no_grad(), tqdm(total=len(tasks), desc=f"eval {method}".strip(), disable=not progress,
                                   leave=False) as bar:
            for batch in task_batches(source, tasks, chunk, None if weight is None else weight.device):
                logits = learner.batch_query_logits(batch, **adapt_kwargs)
                accs.append((logits.argmax(-1) == batch.query_y).float().mean(1))
                bar.update(len(batch))
    finally:
        learner.train(was_training)
    return torch.cat(accs) if accs else torch.zeros(0, device=weight.device if weight is not None else "cpu")


def task_batches(source: EpisodeSource, tasks: Sequence[TaskSpec], chunk: int, device: torch.device | None
                 ) -> Iterator[TaskBatch]:
    """The tasks' episodes in task order, ``chunk`` tasks per :class:`TaskBatch` when the source can gather them
    together and they share one shape (else one per batch), moved to ``device`` (``None``: where the data is)."""
    batched = hasattr(source, "episodes") and len({(t.way, t.support.shape[1], t.query.shape[1]) for t in tasks}) == 1
    step = chunk if batched else 1
    for i in range(0, len(tasks), step):
        part = tasks[i:i + step]
        batch = source.episodes(part) if batched else TaskBatch.stack([source.episode(part[0])])
        yield batch.to(device) if device is not None else batch


def paired_difference(a: EvalResult, b: EvalResult) -> tuple[float, float]:
    """Mean and 95% CI (percent) of the per-task accuracy difference ``a - b`` on the same task list.

    Pairing removes the variance due to task difficulty, so the CI is usually much
    narrower than either row's.

    Raises:
        ValueError: if the two results were not computed on the same task list.
    """
    if a.tasks_id != b.tasks_id or a.task_acc.shape != b.task_acc.shape:
        raise ValueError(f"{a.method!r} and {b.method!r} were evaluated on different task lists; "
                         "evaluate both on the same task_list(...) to compare them")
    m, ci = mean_ci95(a.task_acc - b.task_acc)
    return 100 * m, 100 * ci


@dataclass
class TuningGrid:
    """The shared grid of test-time settings every method is tuned on (on meta-val)."""

    lr: tuple[float, ...] = (0.01, 0.1, 0.5)
    steps: tuple[int, ...] = (1, 5, 10)

    def __post_init__(self):
        if not self.lr or not self.steps:
            raise ValueError(f"the tuning grid needs at least one lr and one steps value, got lr={self.lr} "
                             f"steps={self.steps}")
        if min(self.lr) < 0 or min(self.steps) < 0:
            raise ValueError(f"grid lr and steps values must be >= 0, got lr={self.lr} steps={self.steps}")


@dataclass
class Selection:
    """Outcome of :func:`select_test_time`.

    Attributes:
        settings: the chosen ``adapt`` keyword arguments (``{}`` if nothing is tunable).
        val_accuracy: their meta-val accuracy in percent.
        table: meta-val accuracy (percent) of every grid point, keyed like ``"lr=0.1,steps=5"``
            (``"default"`` when nothing is tunable).
    """

    settings: dict
    val_accuracy: float
    table: dict[str, float]


def select_test_time(learner: "MetaLearner", val_source: EpisodeSource, val_tasks: Sequence[TaskSpec],
                     grid: TuningGrid | None = None, progress: bool = False,
                     evaluate_fn: Callable[..., EvalResult] | None = None) -> Selection:
    """The test-time settings from ``grid`` with the best mean accuracy on meta-val tasks.

    Only the settings in ``learner.tunable`` are searched; a learner without any
    (e.g. ProtoNet) gets ``{}`` (scored once). Ties go to the earlier grid point.
    ``evaluate_fn(learner, source, tasks, adapt_kwargs=...)`` scores a grid point (default
    :func:`evaluate`; a multi-process run passes one that splits the tasks).
    """
    grid = grid or TuningGrid()
    if evaluate_fn is None:
        evaluate_fn = lambda *a, **k: evaluate(*a, progress=progress, **k)  # noqa: E731
    names = [n for n in ("lr", "steps") if n in learner.tunable]
    best, table = None, {}
    for values in itertools.product(*(getattr(grid, n) for n in names)):
        kwargs = dict(zip(names, values))
        acc = evaluate_fn(learner, val_source, val_tasks, adapt_kwargs=kwargs).accuracy
        table[",".join(f"{k}={v}" for k, v in kwargs.items()) or "default"] = round(acc, 2)
        if best is None or acc > best.val_accuracy:
            best = Selection(kwargs, acc, table)
    return best
