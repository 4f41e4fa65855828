"""The whole run: data and zoo -> ECI meta-training -> meta-test with the baselines -> the report."""
from __future__ import annotations

import dataclasses
import os
import time
import warnings
from pathlib import Path

import torch

from .. import PurerWarning
from ..yaml_config import save_config
from ..data import SPLITS, EpisodeSampler, ImageSet, load_split
from ..evaluate import task_list
from .baselines import Baselines
from .build import check_zoo, load_zoo
from .checkpoints import latest_checkpoint
from .run_config import FP16_REFUSED, RunConfig, RunError
from .distributed import Dist
from .eci import meta_train_eci
from .metatest import evaluate_purer
from .report import code_identity, flat_hparams, results_table, write_json
from .rundir import Replacement, RunLock, check_writable, claim, run_identity
from .signals import StopSignals


def run(cfg: RunConfig, accelerator=None, resume: bool = False, progress: bool = True,
        overwrite: bool = False) -> dict:
    """Run the whole pipeline; write and return ``results.json``'s content.

    ``output_dir`` is locked for the run; a fresh run refuses a folder holding another run's
    outputs unless ``overwrite`` (which replaces them once the new run is under way), and ``resume``
    continues the run whose checkpoints are there, with the settings that trained it (see
    :mod:`purer.pipeline.rundir`).  Ctrl-C, SIGTERM and SIGUSR1 stop it at the next safe point
    with its work saved (:class:`~purer.pipeline.signals.Stopped`; continue with ``resume``).

    Raises:
        RunError: unwritable folders, a folder in use or holding another run, missing dataset
            or zoo, or task sizes the data cannot supply; raised before any training.
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    if resume and overwrite:
        raise RunError("--resume continues the run in output_dir and --overwrite replaces it; give one of them")
    out = Path(cfg.output_dir)
    check_writable(out, "output_dir")
    check_writable(Path(cfg.cache_dir), "cache_dir")
    precision = {"mixed_precision": cfg.mixed_precision} if cfg.mixed_precision else {}
    # The CPU when asked (cfg.cpu) or when there is no GPU; forcing it then also lets `accelerate launch
    # --multi_gpu --num_processes N` start N CPU processes.
    acc = accelerator or Accelerator(cpu=cfg.cpu or not torch.cuda.is_available(), log_with="tensorboard",
                                     **precision,
                                     project_config=ProjectConfiguration(project_dir=str(out),
                                                                         logging_dir=str(out / "logs")))
    dist = Dist(acc)
    if str(acc.mixed_precision) == "fp16":  # accelerate launch --mixed_precision fp16
        raise RunError(FP16_REFUSED)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what deterministic cuBLAS needs
        # purer's own path has no nondeterministic operation; one in a user's network warns (and names itself).
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    torch.manual_seed(cfg.seed)
    lock = _on_main(dist, lambda: RunLock(out))
    replacement = None
    try:
        replacement = Replacement(out, _on_main(dist, lambda: claim(out, resume, overwrite)) or [])
        with StopSignals() as stop:
            results = _run(cfg, acc, dist, out, resume, progress, replacement, stop)
        return results
    except BaseException:
        if replacement is not None and dist.main:
            replacement.restore()  # failed before its first checkpoint: the replaced run's outputs come back
        raise
    finally:
        if lock is not None:
            lock.release()


def _on_main(dist: Dist, fn):
    """``fn()`` in the main process (its result there, ``None`` elsewhere); a RunError it raises stops every
    process (the others would otherwise wait at the next collective operation for ever)."""
    result, error = None, None
    if dist.main:
        try:
            result = fn()
        except RunError as e:
            error = e
    if dist.any(error is not None):
        raise error or RunError("the main process stopped the run (see its error)")
    return result


def _run(cfg: RunConfig, acc, dist: Dist, out: Path, resume: bool, progress: bool, replacement: Replacement,
         stop: StopSignals) -> dict:
    start = time.perf_counter()
    e = cfg.eval

    def stage(n: int, text: str) -> None:
        """One line per stage of the run, with the time so far (each stage shows its own bar and ETA)."""
        if progress and dist.main:
            print(f"[{n}/4, {time.perf_counter() - start:.0f} s] {text}", flush=True)

    stage(1, "data and model zoo")
    check_zoo(cfg)  # a zoo the run cannot use stops it before the data is read
    datasets = {d.dataset: dataclasses.replace(cfg, data=d) for d in cfg.data.each()}  # one run config each
    try:
        splits = {name: {s: load_split(c.data.dataset, s, c.data.root, c.data.image_size) for s in SPLITS}
                  for name, c in datasets.items()}
    except (OSError, ValueError) as err:  # missing or malformed data, or an unwritable glyph cache
        raise RunError(str(err)) from None
    queries = {name: _check_sizes(c, splits[name]) for name, c in datasets.items()}
    teachers, used_zoo = load_zoo(cfg, dist, progress)
    cfg = dataclasses.replace(cfg, zoo=used_zoo)  # config.yaml and the checkpoints record the zoo as used
    datasets = {name: dataclasses.replace(c, zoo=used_zoo) for name, c in datasets.items()}
    checkpoint = latest_checkpoint(out) if resume else None
    if resume and checkpoint is None:
        raise RunError(f"--resume: no complete checkpoint under {out / 'checkpoints'}")
    identity = run_identity(cfg, checkpoint, (t.config for t in teachers))
    if dist.main:  # every input is checked: another run's outputs may go aside now
        replacement.move_aside()
        save_config(cfg, out / "config.yaml")
    acc.init_trackers("purer", config=flat_hparams(cfg))
    # Everything lives on the accelerator's device from here on: each split is moved once.
    splits = {name: {k: v.to(acc.device) for k, v in parts.items()} for name, parts in splits.items()}
    teachers = [t.to(acc.device) for t in teachers]

    baselines = Baselines(cfg, splits, teachers, dist, progress)
    try:
        stage(2, f"ECI meta-training, {'up to ' if cfg.meta.train.early_stopping else ''}"
                 f"{cfg.meta.train.iterations} iterations")
        learner, summary = meta_train_eci(cfg, acc, dist, teachers, {n: p["val"] for n, p in splits.items()}, out,
                                          resume, progress, identity, stop,
                                          on_checkpoint=replacement.discard if dist.main else None)
        stage(3, f"meta-test: {e.tasks} tasks per shot ({', '.join(map(str, e.shots))}-shot), "
                 f"{' and '.join('plain' if n == 'none' else f'+ {n}' for n in cfg.test_rows())}")
        rows, calibrations = [], {}
        for name, c in datasets.items():  # each dataset on its own tasks, settings chosen on its own meta-val
            mine, chosen = evaluate_purer(c, learner, splits[name], dist, progress, out, stop, name)
            rows += [{**r, "dataset": name} for r in mine]
            calibrations.update({str(k) if len(datasets) == 1 else f"{name}/{k}": v for k, v in chosen.items()})
        stage(4, f"baselines: {', '.join(e.baselines) or 'none'}")
        if dist.main:
            # The test-time settings a user gets (test_time_settings) are those of the first dataset.
            first = next(iter(datasets))
            learner.test_time = {r["shot"]: r.get("settings", {}) for r in rows
                                 if r["method"] == "purer" and r["dataset"] == first}
            by_dataset: dict[str, dict] = {}
            for r in rows:
                if r["method"] == "purer":
                    by_dataset.setdefault(r["dataset"], {})[str(r["shot"])] = r.get("settings", {})
            learner.save_pretrained(out / "meta_learner", dataset=cfg.data.dataset, selected={
                "iteration": summary["best_iteration"], "val_accuracy": summary["val_accuracy"]},
                calibration=calibrations, **({"test_time_by_dataset": by_dataset} if len(datasets) > 1 else {}))
            rows += baselines.rows()
    finally:
        baselines.close()
    results = {"dataset": cfg.data.dataset, "way": cfg.eval.way, "query": cfg.eval.query,
               "queries_per_class": queries[cfg.data.dataset]["queries"] if len(datasets) == 1 else
               {name: q["queries"] for name, q in queries.items()},
               "task_classes": queries[cfg.data.dataset]["task_classes"] if len(datasets) == 1 else
               {name: q["task_classes"] for name, q in queries.items()},
               "tasks": cfg.eval.tasks, "seed": cfg.eval.seed, "train_seed": cfg.seed,
               "selected_on": "val", "rows": rows, "calibration": {k: v["name"] for k, v in calibrations.items()},
               "run_id": identity["run_id"],
               "zoo": {"path": cfg.zoo.path, "models": len(teachers),
                       "classes": sorted({t.config.num_classes for t in teachers}),
                       "archs": sorted({t.config.arch for t in teachers}),
                       "datasets": sorted({t.config.dataset for t in teachers})},
               "meta_train": summary, "processes": dist.world, "seconds": round(time.perf_counter() - start, 1),
               "code": code_identity()}
    if dist.main:
        write_json(out / "results.json", results)
        table = "\n".join(results_table([r for r in rows if r["dataset"] == name],
                                        f"{name}: {cfg.eval.way}-way, {cfg.eval.tasks} meta-test tasks, "
                                        "mean ± 95% CI (%)", _class_note(queries[name]["task_classes"]))
                          for name in datasets)
        (out / "results.md").write_text(table)
        print("\n" + table)
    acc.end_training()
    return results


def _class_note(task_classes: dict) -> str:
    """What the table must say about the classes the meta-test tasks were drawn from, if anything."""
    notes = []
    for shot, entry in task_classes.get("test", {}).items():
        if entry["every_task_same_classes"]:
            notes.append(f"{shot}-shot: the meta-test split has exactly {entry['classes']} classes that can fill a "
                         "task, so every task holds the same classes (with different images)")
        if entry["dropped"]:
            notes.append(f"{shot}-shot: {len(entry['dropped'])} meta-test class(es) too small for a task were left "
                         f"out ({', '.join(entry['dropped'])}); tasks are drawn from {entry['classes']}")
    return "\n".join(f"Note: {n}." for n in notes)


# The fewest queries per class a meta-val or meta-test task may silently be capped to.  Capping keeps data
# with small classes usable (the icon benchmark's classes have 10 or more images, so 5-shot tasks keep 5 or
# more queries), but a task with fewer than 5 queries per class rests on fewer than 5 x way predictions,
# and eval.shots=[19] on classes of 20 images used to report 1 query per class as "query": 15.  Fewer must
# be asked for (eval.query), so that results.json says so.
QUERY_FLOOR = 5


def _check_sizes(cfg: RunConfig, splits: dict[str, ImageSet]) -> dict:
    """Check that the data can supply every task list; return, for results.json, the meta-test queries per class
    of each shot (``{shot: [fewest, most]}`` over its tasks; classes smaller than shot + eval.query cap them) and
    the classes the tasks of each split and shot are drawn from.

    A class too small for a task (fewer than shot + 1 images) is left out of that shot's tasks, and said so
    (a warning naming it; results.json's ``task_classes``); fewer than ``way`` classes left is an error naming
    the way out, and exactly ``way`` (every task then holds the same classes) is said in the table."""
    e, m = cfg.eval, cfg.meta
    task_classes: dict = {}
    for split, way, shots, query in (("val", e.way, e.shots, e.query), ("test", e.way, e.shots, e.query),
                                     ("val", m.way, [m.shot], m.query)):
        source = splits[split]
        for shot in shots:
            sizes = source.class_sizes()
            dropped = {name: n for name, n in zip(source.class_names, sizes) if n < shot + 1}
            drawn = len(sizes) - len(dropped)
            if drawn < way:
                small = ", ".join(f"{name} ({n})" for name, n in list(dropped.items())[:5])
                raise RunError(f"{cfg.data.dataset}/{split}: cannot sample {way}-way {shot}-shot tasks: they need {way} "
                               f"classes of at least {shot + 1} images, but only {drawn} of {len(sizes)} have that"
                               f"{f' (too small: {small})' if small else ''}; lower eval.way / eval.shots (meta.way / "
                               f"meta.shot for meta-val during training), or add images to those classes")
            if split == "test" or (split == "val" and shot in e.shots and way == e.way):
                entry = {"classes": drawn, "dropped": dropped, "every_task_same_classes": drawn == way}
                if task_classes.setdefault(split, {}).get(str(shot)) is None:
                    task_classes[split][str(shot)] = entry
                    if dropped:
                        names = ", ".join(f"{name} ({n} image{'s' * (n != 1)})" for name, n in dropped.items())
                        warnings.warn(f"{cfg.data.dataset}/{split}: {len(dropped)} class(es) too small for a {shot}-shot "
                                      f"task with a query are left out of its tasks: {names}; they are drawn from the "
                                      f"other {drawn} (results.json: task_classes)", PurerWarning, stacklevel=2)
            try:
                EpisodeSampler(sizes, way, shot, query)
            except ValueError as err:
                raise RunError(f"{cfg.data.dataset}/{split}: {err}") from None
    floor = min(e.query, QUERY_FLOOR)
    for split in ("val", "test"):
        for shot in e.shots:
            sizes = [n for n in splits[split].class_sizes() if n > shot]  # the classes tasks are drawn from
            if min(sizes) - shot < floor:
                raise RunError(f"{cfg.data.dataset}/{split}: its smallest class has {min(sizes)} images, so "
                               f"{shot}-shot tasks on it keep {min(sizes) - shot} queries per class, fewer than "
                               f"{floor}; lower eval.shots, or set eval.query={min(sizes) - shot} to accept that")
    queries = {}
    for shot in e.shots:
        q = [t.query.shape[1] for t in task_list(splits["test"], e.way, shot, e.query, e.tasks, e.seed)]
        queries[str(shot)] = [min(q), max(q)]
        if min(q) < e.query:
            print(f"eval: {shot}-shot meta-test tasks keep {min(q)}-{max(q)} queries per class (eval.query="
                  f"{e.query}, capped by class sizes; results.json's queries_per_class says so)")
    return {"queries": queries, "task_classes": task_classes}
