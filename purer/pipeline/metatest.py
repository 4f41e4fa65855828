"""Meta-test: the meta-learner's rows, plain and after each calibration, every setting chosen on meta-val.

Test-time settings (inner lr and steps) are chosen on meta-val from one shared grid,
and a calibrator's own settings on meta-val too (``eval.calibration_grid``); meta-test
runs once, on a fixed seeded task list per shot shared by every row, so rows are
paired.  Every evaluation splits its tasks over the run's processes.  A finished row
is kept in ``<output_dir>/metatest_rows.json`` at once, so a run stopped during
meta-test (a signal, a crash) resumes without computing it again.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import host
from ..calibrate import Calibrator, calibrator, select_calibration
from ..data import ImageSet, TaskSpec
from ..evaluate import EvalResult, fingerprint, paired_difference, select_test_time, task_accuracies, task_list
from ..meta import MetaLearner
from ..yaml_config import to_dict
from .distributed import Dist
from .report import write_json
from .run_config import RunConfig
from .signals import StopSignals

ROWS_FILE = "metatest_rows.json"


def evaluate_split(learner: MetaLearner, source: ImageSet, tasks: Sequence[TaskSpec], dist: Dist, *,
                   method: str = "", adapt_kwargs: dict | None = None, progress: bool = False) -> EvalResult:
    """:func:`purer.evaluate.evaluate` with the tasks split over processes and gathered in order (one host read)."""
    if not tasks:
        raise ValueError("evaluate needs a non-empty task list")
    start = time.perf_counter()
    local = task_accuracies(learner, source, dist.share(tasks), adapt_kwargs=adapt_kwargs,
                            progress=progress and dist.main, method=method)
    accs = host.values(dist.gather_tasks(local, len(tasks)).double(), "result")
    return EvalResult(method, tasks[0].way, int(tasks[0].support.shape[1]), accs, learner.test_cost(),
                      fingerprint(tasks), dict(adapt_kwargs or {}), time.perf_counter() - start)


class FinishedRows:
    """The meta-test rows a run has finished, kept in ``<output_dir>/metatest_rows.json`` as they finish.

    A row is found again only for the same learner (its weights' hash), dataset and meta-test settings
    (``eval`` and ``icfil``), so a changed setting recomputes it.
    """

    def __init__(self, path: Path | None, cfg: RunConfig, learner: MetaLearner, dataset: str, write: bool):
        self.path, self.write = path, write
        weights = hashlib.sha256()
        for k, v in sorted(learner.state_dict().items()):
            weights.update(k.encode())
            weights.update(host.read(v, "checkpoint").numpy().tobytes())
        self.key = hashlib.sha256(json.dumps({"eval": to_dict(cfg.eval), "icfil": to_dict(cfg.icfil),
                                              "dataset": dataset, "learner": weights.hexdigest()},
                                             sort_keys=True, default=str).encode()).hexdigest()[:16]
        stored = json.loads(path.read_text()) if path is not None and path.is_file() else {}
        self.rows: dict = stored.get(self.key, {})
        self._all = stored

    def get(self, shot: int, name: str) -> tuple[dict, np.ndarray] | None:
        found = self.rows.get(f"{shot}/{name}")
        return None if found is None else (found["row"], np.asarray(found["task_acc"]))

    def put(self, shot: int, name: str, row: dict, task_acc: np.ndarray) -> None:
        self.rows[f"{shot}/{name}"] = {"row": row, "task_acc": task_acc.tolist()}
        if self.path is not None and self.write:
            self._all[self.key] = self.rows
            write_json(self.path, self._all)


def evaluate_purer(cfg: RunConfig, learner: MetaLearner, splits: dict[str, ImageSet], dist: Dist, progress: bool,
                   out: Path | None = None, stop: StopSignals | None = None, dataset: str = "") -> tuple[list[dict], dict]:
    """The meta-learner's rows (``purer``, ``purer+<calibration>``), every setting chosen on meta-val, and per
    shot the calibration chosen on meta-val (``{"name", "settings", "val_accuracy"}``; name ``none`` when no
    calibration beats the plain learner there).

    Rows already finished (``out``'s :data:`ROWS_FILE`) are reused; a stop signal (``stop``) ends it between
    rows with :class:`~purer.pipeline.signals.Stopped`, the finished rows kept.
    """
    e, rows, chosen_calibration = cfg.eval, [], {}
    finished = FinishedRows(out / ROWS_FILE if out is not None else None, cfg, learner, dataset or cfg.data.dataset,
                            write=dist.main)
    if finished.rows and dist.main:
        print(f"meta-test: reusing {len(finished.rows)} finished row(s) of this learner from {out / ROWS_FILE}")

    def split_eval(candidate, source, tasks, adapt_kwargs=None):
        return evaluate_split(candidate, source, tasks, dist, adapt_kwargs=adapt_kwargs)

    for shot in e.shots:
        test_tasks = task_list(splits["test"], e.way, shot, e.query, e.tasks, e.seed)
        val_tasks = task_list(splits["val"], e.way, shot, e.query, e.val_tasks, e.seed)
        chosen = None
        plain: EvalResult | None = None
        best: dict = {}
        for name in ["none", *e.calibrations]:
            method = "purer" if name == "none" else f"purer+{name}"
            found = finished.get(shot, name)
            if found is None:
                if chosen is None:
                    chosen = select_test_time(learner, splits["val"], val_tasks, e.grid, evaluate_fn=split_eval)
                row, result = _calibration_row(name, cfg, learner, splits, val_tasks, test_tasks, chosen, dist,
                                               progress, split_eval, method, plain)
                finished.put(shot, name, row, result.task_acc)
            else:
                row, task_acc = found
                result = EvalResult(method, e.way, shot, task_acc, row["test_cost"], row["tasks_id"])
            plain = plain or result
            rows.append(row)
            if not best or row["val_accuracy"] > best["val_accuracy"]:
                best = {"name": name, "settings": row.get("calibration", {}), "val_accuracy": row["val_accuracy"],
                        "row": row}
            if stop is not None and dist.any(stop.requested is not None):
                stop.check(True)
        best.pop("row")["selected"] = True
        chosen_calibration[shot] = best
    return rows, chosen_calibration


def _calibration_row(name: str, cfg: RunConfig, learner: MetaLearner, splits: dict[str, ImageSet],
                     val_tasks: list[TaskSpec], test_tasks: list[TaskSpec], chosen, dist: Dist, progress: bool,
                     split_eval, method: str, plain: EvalResult | None) -> tuple[dict, EvalResult]:
    """One row: the calibrator ``name`` (its settings chosen on meta-val if ``eval.calibration_grid`` searches
    any) after the learner's test-time settings ``chosen``, scored on meta-val and tested once, and compared
    task by task with the plain learner's row ``plain``."""
    cal: Calibrator = calibrator(name, cfg.icfil)
    grid = cfg.eval.calibration_grid.get(name)
    if grid:
        cal, val_accuracy, _ = select_calibration(cal, grid, learner, splits["val"], val_tasks, chosen.settings,
                                                  split_eval)
    elif name == "none":
        val_accuracy = chosen.val_accuracy
    else:
        val_accuracy = split_eval(cal.wrap(learner), splits["val"], val_tasks, chosen.settings).accuracy
    result = evaluate_split(cal.wrap(learner), splits["test"], test_tasks, dist, method=method,
                            adapt_kwargs=chosen.settings, progress=progress)
    extra = {}
    if plain is not None:
        diff, ci = paired_difference(result, plain)
        extra["paired_vs_purer"] = [round(diff, 2), round(ci, 2)]
    if name != "none":
        extra["calibration"] = cal.settings()
    return result.row(val_accuracy=round(val_accuracy, 2), **extra, seconds=round(result.seconds, 1)), result


def own_teachers(teachers, dataset: str) -> list:
    """The teachers trained on ``dataset`` (all of them when none says so): a dataset's baselines are those
    a user of that dataset's own zoo has."""
    return [t for t in teachers if t.config.dataset == dataset] or list(teachers)

