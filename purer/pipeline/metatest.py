"""Meta-test: the meta-learner's rows, plain and after each calibration, every setting chosen on meta-val.

Test-time settings (inner lr and steps) are chosen on meta-val from one shared grid,
and a calibrator's own settings on meta-val too (``eval.calibration_grid``); meta-test
runs once, on a fixed seeded task list per shot shared by every row, so rows are
paired.  Per shot the learner adapts once per task and every row continues from that
adaptation (:func:`purer.calibrate.calibration_accuracies`).  Every evaluation splits
its tasks over the run's processes.  Finished rows, and the finished blocks of tasks of
the rows being computed, are kept in ``<output_dir>/metatest_rows.json`` at once, so a
run stopped during meta-test (a signal, a crash) resumes without computing them again.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from .. import host
from ..calibrate import Calibrator, calibration_accuracies, calibrator, select_calibration
from ..data import ImageSet, TaskSpec
from ..evaluate import EvalResult, fingerprint, paired_difference, select_test_time, task_accuracies, task_list
from ..meta import MetaLearner
from ..yaml_config import to_dict
from .distributed import Dist
from .report import write_json
from .run_config import RunConfig
from .signals import StopSignals

ROWS_FILE = "metatest_rows.json"
#: Meta-test tasks of a shot are computed in this many blocks, each kept as it finishes (a stop loses at most one).
BLOCKS = 10


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
    """The meta-test work a run has finished, kept in ``<output_dir>/metatest_rows.json`` as it finishes: whole
    rows, and the blocks of tasks (:data:`BLOCKS` per shot) of the rows being computed.

    Work is found again only for the same learner (its weights' hash), dataset and meta-test settings
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
        mine = stored.get(self.key, {})
        self.rows: dict = {k: v for k, v in mine.items() if not k.endswith("/blocks")}
        self.blocks: dict = {k: v for k, v in mine.items() if k.endswith("/blocks")}
        self._all = stored

    def get(self, shot: int, name: str) -> tuple[dict, np.ndarray] | None:
        found = self.rows.get(f"{shot}/{name}")
        return None if found is None else (found["row"], np.asarray(found["task_acc"]))

    def put(self, shot: int, name: str, row: dict, task_acc: np.ndarray) -> None:
        self.rows[f"{shot}/{name}"] = {"row": row, "task_acc": task_acc.tolist()}
        self.blocks.pop(f"{shot}/blocks", None)
        self._save()

    def block(self, shot: int, names: Sequence[str], b: int) -> tuple[np.ndarray, list[float]] | None:
        """Block ``b`` of the rows ``names`` of ``shot``: accuracies ``[len(names), tasks in the block]`` and each
        row's seconds, if finished."""
        found = self.blocks.get(f"{shot}/blocks", {})
        if found.get("names") != list(names) or str(b) not in found["done"]:
            return None
        acc, seconds = found["done"][str(b)]
        return np.asarray(acc), seconds

    def put_block(self, shot: int, names: Sequence[str], b: int, acc: np.ndarray, seconds: list[float]) -> None:
        entry = self.blocks.get(f"{shot}/blocks")
        if entry is None or entry["names"] != list(names):
            entry = self.blocks[f"{shot}/blocks"] = {"names": list(names), "done": {}}
        entry["done"][str(b)] = [acc.tolist(), seconds]
        self._save()

    def _save(self) -> None:
        if self.path is not None and self.write:
            self._all[self.key] = {**self.rows, **self.blocks}
            write_json(self.path, self._all)


def calibration_accuracies_split(learner: MetaLearner, calibrators: Sequence[Calibrator], source: ImageSet,
                                 tasks: Sequence[TaskSpec], dist: Dist, adapt_kwargs: dict | None = None
                                 ) -> tuple[np.ndarray, list[float]]:
    """:func:`purer.calibrate.calibration_accuracies` (every calibrator after one shared adaptation per task) with
    the tasks split over processes and gathered in order (one host read): ``[len(calibrators), len(tasks)]``
    accuracies and each calibrator's seconds in this process."""
    if not tasks:
        raise ValueError("evaluate needs a non-empty task list")
    local, seconds = calibration_accuracies(learner, calibrators, source, dist.share(tasks), adapt_kwargs=adapt_kwargs)
    return host.values(dist.gather_tasks(local.T.contiguous(), len(tasks)).T.double(), "result"), seconds


def evaluate_purer(cfg: RunConfig, learner: MetaLearner, splits: dict[str, ImageSet], dist: Dist, progress: bool,
                   out: Path | None = None, stop: StopSignals | None = None, dataset: str = "") -> tuple[list[dict], dict]:
    """The meta-learner's rows (``purer``, ``purer+<calibration>``; :meth:`RunConfig.test_rows`: at a way its head
    cannot take, only the rows that read its features), every setting chosen on meta-val, and per shot the
    calibration chosen on meta-val (``{"name", "settings", "val_accuracy"}``; name ``none`` when no calibration
    beats the plain learner there).

    Per shot the learner adapts once per task and every row continues from that adaptation
    (:func:`purer.calibrate.calibration_accuracies`): a calibration's candidates are scored on meta-val in one
    pass, and one pass over meta-test computes every row, in :data:`BLOCKS` blocks of tasks.  Rows and blocks
    already finished (``out``'s :data:`ROWS_FILE`) are reused; a stop signal (``stop``) ends it between blocks
    with :class:`~purer.pipeline.signals.Stopped`, the finished work kept.
    """
    e, rows, chosen_calibration = cfg.eval, [], {}
    finished = FinishedRows(out / ROWS_FILE if out is not None else None, cfg, learner, dataset or cfg.data.dataset,
                            write=dist.main)
    if (finished.rows or finished.blocks) and dist.main:
        blocks = sum(len(b["done"]) for b in finished.blocks.values())
        print(f"meta-test: reusing {len(finished.rows)} finished row(s) and {blocks} block(s) of tasks of this "
              f"learner from {out / ROWS_FILE}")

    def val_accuracies(lrn, cals, source, tasks, kwargs) -> list[float]:
        return [100 * float(a.mean()) for a in calibration_accuracies_split(lrn, cals, source, tasks, dist, kwargs)[0]]

    def split_eval(candidate, source, tasks, adapt_kwargs=None):
        return evaluate_split(candidate, source, tasks, dist, adapt_kwargs=adapt_kwargs)

    names = cfg.test_rows()  # without the plain learner at a way its head cannot take
    for shot in e.shots:
        missing = [n for n in names if finished.get(shot, n) is None]
        if missing:
            test_tasks = task_list(splits["test"], e.way, shot, e.query, e.tasks, e.seed)
            val_tasks = task_list(splits["val"], e.way, shot, e.query, e.val_tasks, e.seed)
            # The inner lr and steps, chosen with the plain learner; rows without it run no inner loop.
            chosen = select_test_time(learner, splits["val"], val_tasks, e.grid, evaluate_fn=split_eval) \
                if "none" in names else None
            settings = chosen.settings if chosen is not None else {}
            cals, val_accuracy = [], []  # per missing row, its calibrator chosen on meta-val and that accuracy
            for name in missing:
                if name == "none":
                    cal, acc = calibrator("none"), chosen.val_accuracy
                else:
                    cal, acc, _ = select_calibration(calibrator(name, cfg.icfil), e.calibration_grid.get(name) or {},
                                                     learner, splits["val"], val_tasks, settings, val_accuracies)
                cals.append(cal)
                val_accuracy.append(acc)
            accs, seconds = _test_blocks(learner, cals, missing, splits["test"], test_tasks, settings, shot,
                                         finished, dist, progress, stop)
            for r, (name, cal) in enumerate(zip(missing, cals)):
                result = EvalResult("purer" if name == "none" else f"purer+{name}", e.way, shot, accs[r],
                                    cal.wrap(learner).test_cost(), fingerprint(test_tasks), dict(settings))
                extra = {} if name == "none" else {"calibration": cal.settings()}
                finished.put(shot, name, result.row(val_accuracy=round(val_accuracy[r], 2), **extra,
                                                    seconds=round(seconds[r], 1)), result.task_acc)
        def result(name: str) -> EvalResult:
            row, task_acc = finished.get(shot, name)
            return EvalResult(row["method"], e.way, shot, task_acc, row["test_cost"], row["tasks_id"])

        plain = result("none") if "none" in names else None
        best: dict = {}
        for name in names:
            row = finished.get(shot, name)[0]
            if plain is not None and name != "none":
                diff, ci = paired_difference(result(name), plain)
                row = {**row, "paired_vs_purer": [round(diff, 2), round(ci, 2)]}
            rows.append(row)
            if not best or row["val_accuracy"] > best["val_accuracy"]:
                best = {"name": name, "settings": row.get("calibration", {}), "val_accuracy": row["val_accuracy"],
                        "row": row}
        best.pop("row")["selected"] = True
        chosen_calibration[shot] = best
        if stop is not None and dist.any(stop.requested is not None):
            stop.check(True)
    return rows, chosen_calibration


def _test_blocks(learner: MetaLearner, cals: Sequence[Calibrator], names: Sequence[str], test: ImageSet,
                 tasks: list[TaskSpec], settings: dict, shot: int, finished: FinishedRows, dist: Dist, progress: bool,
                 stop: StopSignals | None) -> tuple[np.ndarray, list[float]]:
    """The rows ``names`` (calibrators ``cals``) on the meta-test tasks in :data:`BLOCKS` blocks, each kept in
    ``finished`` as it ends (a stop signal ends the pass between blocks); accuracies ``[rows, tasks]`` and each
    row's seconds."""
    bounds = np.linspace(0, len(tasks), min(BLOCKS, len(tasks)) + 1).round().astype(int)
    accs, seconds = [], np.zeros(len(cals))
    label = " ".join("purer" if n == "none" else f"purer+{n}" for n in names)
    with tqdm(total=len(tasks), desc=f"meta-test {shot}-shot: {label}", disable=not (progress and dist.main),
              leave=False) as bar:
        for b, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            found = finished.block(shot, names, b)
            if found is None:
                found = calibration_accuracies_split(learner, cals, test, tasks[lo:hi], dist, settings)
                finished.put_block(shot, names, b, *found)
                if stop is not None and hi < len(tasks) and dist.any(stop.requested is not None):
                    stop.check(True)
            accs.append(found[0])
            seconds += found[1]
            bar.update(hi - lo)
    return np.concatenate(accs, axis=1), seconds.tolist()


def own_teachers(teachers, dataset: str) -> list:
    """The teachers trained on ``dataset`` (all of them when none says so): a dataset's baselines are those
    a user of that dataset's own zoo has."""
    return [t for t in teachers if t.config.dataset == dataset] or list(teachers)

