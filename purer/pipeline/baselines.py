"""The baselines beside the meta-learner's rows: cached by everything they depend on, computed in the background.

The baseline rows (:mod:`purer.baselines`) do not depend on meta-training, so they are
cached under ``cache_dir`` by a key naming every input that changes a number: the
data (a hash of every image, label and class name of each split), each teacher's whole
``config.json`` (weights' sha256, input contract, classes), the baselines' settings and
task lists, the mixed precision, and the code that computes them (a hash of its
source).  A single-process run whose baselines are not cached computes them in a
spawned worker process beside meta-training, which roughly halves a first run's wall
time on a 2-core machine.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import threading
import time
from pathlib import Path
from typing import Sequence

import torch

from .. import baselines as baselines_module
from .. import batchnorm, evaluate as evaluate_module
from ..baselines import BaselineConfig, run_baselines
from ..data import SPLITS, ImageSet, episodes as episodes_module, load_split
from ..evaluate import fingerprint, task_list
from ..meta import MetaTrainConfig, base as meta_base, init as meta_init, maml as meta_maml, \
    protonet as meta_protonet, train as meta_train
from ..yaml_config import to_dict
from ..zoo import architectures, teacher as teacher_module
from ..zoo.store import Zoo
from ..zoo.teacher import Teacher
from .build import zoo_path
from .distributed import Dist, autocast_dtype
from .metatest import own_teachers
from .report import write_json
from .run_config import RunConfig

# The code the baseline rows are computed by; its source is part of the cache key.
_CODE = (baselines_module, evaluate_module, batchnorm, episodes_module, meta_base, meta_init, meta_maml,
         meta_protonet, meta_train, architectures, teacher_module)


def code_version() -> str:
    """A hash of the source of the code that computes the baseline rows."""
    h = hashlib.sha256()
    for module in _CODE:
        h.update(inspect.getsource(module).encode())
    return h.hexdigest()[:16]


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
    tasks = {f"{split}/{shot}": fingerprint(task_list(splits[split], e.way, shot, e.query, n, e.seed))
             for split, n in (("val", e.val_tasks), ("test", e.tasks)) for shot in e.shots}
    key = json.dumps({"data": to_dict(cfg.data), "baselines": dataclasses.asdict(bcfg), "methods": e.baselines,
                      "zoo": [t.config.to_dict() for t in teachers], "mixed_precision": cfg.mixed_precision,
                      "splits": {k: v.fingerprint() for k, v in splits.items()}, "tasks": tasks,
                      "code": code_version()}, sort_keys=True, default=str)
    path = Path(cfg.cache_dir) / f"baselines-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    return bcfg, path, key


def baseline_rows(cfg: RunConfig, splits: dict[str, dict[str, ImageSet]], teachers: Sequence[Teacher],
                  progress: bool, autocast: torch.dtype | None = None, log=None) -> list[dict]:
    """The baseline rows of every dataset (each row names its ``dataset``; on the splits' device), reused from
    ``cache_dir`` when nothing they depend on changed (``log(row)``: see :func:`purer.baselines.run_baselines`)."""
    if not cfg.eval.baselines:
        return []
    rows = []
    for d in cfg.data.each():
        c, mine = dataclasses.replace(cfg, data=d), own_teachers(teachers, d.dataset)
        bcfg, path, key = _baseline_plan(c, splits[d.dataset], mine)
        if path.is_file():
            print(f"baselines: reusing {path} (same data, zoo, settings and code)")
            found = json.loads(path.read_text())["rows"]
        else:
            found = run_baselines(splits[d.dataset], mine, bcfg, methods=cfg.eval.baselines, progress=progress,
                                  log=log, autocast=autocast)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, {"key": json.loads(key), "rows": found})
        rows += [{**r, "dataset": d.dataset} for r in found]
    return rows


def _cached(cfg: RunConfig, splits: dict[str, dict[str, ImageSet]], teachers: Sequence[Teacher]) -> bool:
    """Whether every dataset's baseline rows are in the cache already."""
    return all(_baseline_plan(dataclasses.replace(cfg, data=d), splits[d.dataset],
                              own_teachers(teachers, d.dataset))[1].is_file() for d in cfg.data.each())


_finished_rows = None  # the worker's queue of finished rows (set by _start_worker)


def _start_worker(parent: int, finished_rows) -> None:
    """Pool initializer: report finished rows to the run, and end with the run's process.

    A SIGKILLed run cannot stop its worker, which used to compute on, orphaned, for minutes;
    a watcher thread ends it within a second of the run's end, on any system.
    """
    global _finished_rows
    _finished_rows = finished_rows

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _baselines_worker(cfg: RunConfig, device: str, autocast: torch.dtype | None) -> list[dict]:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    splits = {d.dataset: {s: load_split(d.dataset, s, d.root, d.image_size).to(device) for s in SPLITS}
              for d in cfg.data.each()}
    teachers = [t.to(device) for t in Zoo(zoo_path(cfg)).load_teachers()]
    return baseline_rows(cfg, splits, teachers, progress=False, autocast=autocast, log=_finished_rows.put)


class Baselines:
    """The baseline rows, computed beside meta-training when that can use an idle core.

    In a single-process run whose baselines are not cached, a spawned worker
    process computes them while this process meta-trains (each on ``threads``
    threads), which roughly halves a first run's wall time on a 2-core machine.
    Otherwise they are computed (or read from the cache) when :meth:`rows` is called.
    """

    def __init__(self, cfg: RunConfig, splits: dict[str, dict[str, ImageSet]], teachers: Sequence[Teacher],
                 dist: Dist, progress: bool):
        self.cfg, self.splits, self.teachers, self.progress = cfg, splits, teachers, progress
        self.autocast = autocast_dtype(dist.acc)
        self.pool = self.pending = None
        if dist.world == 1 and cfg.eval.baselines and not _cached(cfg, splits, teachers):
            import multiprocessing

            print("baselines: computing them in a background process while meta-training runs")
            context = multiprocessing.get_context("spawn")
            self.finished = context.SimpleQueue()
            self.pool = context.Pool(1, initializer=_start_worker, initargs=(os.getpid(), self.finished))
            self.pending = self.pool.apply_async(_baselines_worker, (cfg, str(dist.device), self.autocast))

    def rows(self) -> list[dict]:
        if self.pending is None:
            return baseline_rows(self.cfg, self.splits, self.teachers, self.progress, self.autocast)
        try:
            self._wait()
            rows = self.pending.get()
        except BaseException:
            self.close()
            raise
        self.close(finished=True)
        return rows

    def _wait(self) -> None:
        """Wait for the worker, showing its rows as they finish (it may still be busy after meta-test)."""
        total = len(self.cfg.eval.baselines) * len(self.cfg.eval.shots) * len(self.cfg.data.each())
        done, start = 0, time.perf_counter()
        if not self.pending.ready():
            print("baselines: waiting for the background process")
        while True:
            while not self.finished.empty():
                row, done = self.finished.get(), done + 1
                if self.progress:
                    print(f"baselines: {done}/{total} rows, {row['method']} {row['shot']}-shot "
                          f"{row['accuracy']:.2f} ({time.perf_counter() - start:.0f} s waited)")
            if self.pending.ready():
                return
            self.pending.wait(1.0)

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
