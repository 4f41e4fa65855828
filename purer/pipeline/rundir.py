"""The run folder: checked before any work, locked while a run writes it, never taken over silently.

- ``output_dir`` and ``cache_dir`` must be writable directories before anything is loaded or
  trained (a cache that cannot be written used to fail after meta-test, losing the results);
- one run at a time writes an ``output_dir``: an ``flock`` on ``<output_dir>/.lock``, which the
  kernel releases when the run ends in any way (even SIGKILL), so a lock is never stale;
- a fresh run refuses a folder that holds another run's outputs unless told ``overwrite``;
  then those outputs are moved aside only once every input (data, zoo, config) is checked,
  and deleted only when the new run has written its first checkpoint (they come back if
  it fails before), so checkpoints, results and config.yaml always describe one run and
  a mistyped ``--overwrite`` run loses nothing;
- every checkpoint records its run (:func:`run_identity`): ``--resume`` continues it only
  with the settings that trained it (a setting added to purer since counts as its default, or as off where it
  is a rule that did not apply before it existed, and ``distill.images`` as ``own``, what purer did before it;
  the per-zoo rules are compared by what they chose for the zoo: the synthesizer, and what the teachers are
  distilled on), except
  ``meta.train.iterations``, which may grow (or shrink down to the checkpoint) under the constant outer lr,
  and ``meta.train.patience``: a finished run resumed with a larger budget (or an early-stopped one with more
  patience) goes on training from its last checkpoint.  Settings the run does not use are not compared: the
  generator's (``inversion.generator.*``) where the zoo is synthesized as a pixel bank, so a change of their
  defaults does not strand a pixel-bank run.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Iterable

from ..zoo.teacher import zoo_rule
from .run_config import RunConfig, RunError
from .report import flat_hparams

# What a run writes into its output_dir (anything else there, e.g. a cache_dir inside it, is left alone).
RUN_OUTPUTS = ("results.json", "results.md", "config.yaml", "meta_learner", "pictures", "logs", "checkpoints",
               "metatest_rows.json")
REPLACED = ".replaced"
LOCK = ".lock"
# Settings that never change what meta-training computes (up to where it stops): a resumed run may change them;
# with more patience a stopped run trains on.
_NOT_TRAINING = ("output_dir", "cache_dir", "threads", "checkpoint_every", "picture_every", "icfil.",
                 "zoo.build_if_missing", "meta.train.patience")


def check_writable(path: Path, what: str) -> None:
    """Make ``path`` (a directory) if needed and check that files can be created in it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise RunError(f"{what} {path} is not a writable directory ({e.strerror or e}); set {what} to one") from None


class RunLock:
    """An exclusive ``flock`` on ``<output_dir>/.lock`` for the run's lifetime (Linux and macOS)."""

    def __init__(self, out: Path):
        import fcntl

        self.path = out / LOCK
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self._fd)
            raise RunError(f"output_dir {out} is in use by another run (pid {holder}); wait for it to end or "
                           "use another output_dir") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None


def claim(out: Path, resume: bool, overwrite: bool) -> list[str]:
    """Check that ``out`` may become this run's: another run's outputs there are refused unless ``overwrite``.

    Returns the outputs a run with ``overwrite`` will replace (nothing is touched here; see :class:`Replacement`).
    """
    if (out / REPLACED).exists():
        Replacement(out, []).restore()  # a run killed while replacing another: bring the older outputs back
    found = [name for name in RUN_OUTPUTS if (out / name).exists()]
    if resume or not found:
        return []
    if not overwrite:
        state = "a finished run" if "results.json" in found else "another run's outputs"
        raise RunError(f"output_dir {out} already holds {state} ({', '.join(found[:3])}); continue an interrupted "
                       "run with --resume, replace it with --overwrite, or use another output_dir")
    return found


class Replacement:
    """Another run's outputs in ``out``, replaced by this one without losing them on the way.

    :meth:`move_aside` (once every input is checked) moves them into ``out/.replaced``;
    :meth:`discard` (once the new run has written its first checkpoint) deletes them;
    :meth:`restore` (the new run failed before that) deletes what the new run wrote
    and moves them back.
    """

    def __init__(self, out: Path, names: list[str]):
        self.out, self.names, self.aside = out, list(names), out / REPLACED

    def move_aside(self) -> None:
        if not self.names:
            return
        self.aside.mkdir(exist_ok=True)
        for name in self.names:
            os.replace(self.out / name, self.aside / name)

    def discard(self) -> None:
        if self.aside.exists():
            shutil.rmtree(self.aside, ignore_errors=True)
        self.names = []

    def restore(self) -> None:
        if not self.aside.exists():
            return
        for name in RUN_OUTPUTS:  # what the failed new run wrote
            new = self.out / name
            if new.exists():
                shutil.rmtree(new) if new.is_dir() else new.unlink()
        for old in sorted(self.aside.iterdir()):
            os.replace(old, self.out / old.name)
        self.aside.rmdir()
        self.names = []


def training_settings(cfg: RunConfig, models: Iterable | None = None) -> dict:
    """The flat settings that decide what meta-training computes (what a checkpoint must be resumed with).

    ``models``: the zoo's teachers' configs (:class:`~purer.zoo.ModelConfig`), which decide the synthesizer
    (:meth:`~purer.inversion.InversionConfig.synthesizer_for`); with them, a pixel bank's run leaves out the
    generator's settings, which it does not use.  A run without distillation leaves out what it would distil on."""
    models = None if models is None else list(models)
    trains = _trains(cfg, models)
    # None kept: a null setting recorded as null, not taken for a setting the checkpoint's purer did not have
    return {k: v for k, v in _resolved(flat_hparams(cfg, keep_none=True), models).items() if trains(k)}


def _trains(cfg: RunConfig, models: list | None):
    """``key -> bool``: whether a flat setting decides what this run's meta-training computes (the synthesizer
    decided once, not per key; without distillation, only its weights, which say it is off)."""
    pixels = models is not None and cfg.inversion.synthesizer_for(models) != "generator"
    ignored = _NOT_TRAINING + (("inversion.generator.",) if pixels else ()) + (
        () if cfg.distill.active else ("distill.images",))
    return lambda key: not key.startswith(ignored) and (not key.startswith("eval.") or key == "eval.seed")


# The per-zoo rules (purer.zoo.zoo_rule): with the zoo's teachers known, a run's settings hold what the rules
# chose for them under the setting's own name (inversion.synthesizer, distill.images), and the rules as null.
_RULES = ("inversion.synthesizer", "distill.images")
# What a checkpoint lacking these settings did: a purer older than them did without them (null; distill.images
# before it was a setting: each teacher on its own classes' images), and one older than null settings being
# recorded (flat_hparams' keep_none) left a null one out.
_BEFORE = {"inversion.synthesizer_colour": None, "inversion.synthesizer_heterogeneous": None,
           "inversion.a_tv_colour": None, "distill.images": "own", "distill.images_colour": None,
           "distill.images_heterogeneous": None}


def _deciding(flat: dict, models: list) -> dict[str, str]:
    """Each per-zoo rule's setting name -> the flat setting of ``flat`` that decides it for the teachers ``models``
    (e.g. ``distill.images`` -> ``distill.images_colour``; a setting ``flat`` lacks counts as :data:`_BEFORE`'s)."""
    out = {}
    for name in _RULES:
        section, key = name.split(".")
        rules = SimpleNamespace(**{k: flat.get(f"{section}.{k}", _BEFORE.get(f"{section}.{k}"))
                                   for k in (key, f"{key}_colour", f"{key}_heterogeneous")})
        out[name] = f"{section}.{zoo_rule(rules, key, models)}"
    return out


def _resolved(flat: dict, models: list | None) -> dict:
    """``flat`` settings with what their per-zoo rules choose for the teachers ``models`` (unchanged without them)."""
    if models is None:
        return flat
    out = dict(flat)
    for name, rule in _deciding(flat, models).items():
        out.update(dict.fromkeys((f"{name}_colour", f"{name}_heterogeneous")))
        out[name] = flat.get(rule, _BEFORE.get(rule))
    return out


def run_identity(cfg: RunConfig, checkpoint: Path | None, models: Iterable | None = None) -> dict:
    """``{"run_id", "settings"}`` of this run: a new id, or on ``--resume`` the id recorded in ``checkpoint``
    once its settings are checked against ``cfg``'s (only those :func:`training_settings` keeps for this zoo's
    teachers ``models``, on both sides: a checkpoint may record a setting this purer no longer counts)."""
    models = None if models is None else list(models)
    settings = training_settings(cfg, models)
    if checkpoint is None:
        return {"run_id": uuid.uuid4().hex[:12], "settings": settings}
    try:
        recorded = json.loads((checkpoint / "run.json").read_text())
        theirs, run_id = recorded["settings"], recorded["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        raise RunError(f"--resume: {checkpoint} records no run (written by an older purer?); start the run "
                       "again with --overwrite") from None
    # A setting added to purer after the checkpoint was written counts as its default there (the older code did
    # what the default does), save those of _BEFORE.
    older = {**training_settings(RunConfig()), **_BEFORE}
    theirs = {**{k: v for k, v in older.items() if k not in theirs}, **theirs}
    trains = _trains(cfg, models)
    theirs = {k: v for k, v in _resolved(theirs, models).items() if trains(k)}
    differ = sorted(k for k in {*settings, *theirs} if settings.get(k) != theirs.get(k))
    done, budget = int(checkpoint.name.rsplit("_", 1)[1]), "meta.train.iterations"
    if budget in differ and settings.get("meta.train.schedule") == "constant":
        if settings[budget] < done:
            raise RunError(f"--resume: {checkpoint} is at iteration {done}, past {budget}={settings[budget]}; "
                           f"give {budget} >= {done}")
        differ.remove(budget)  # nothing else depends on the budget: the run goes on to the new one
    if differ:
        decided = {} if models is None else {k: rule for k, rule in
                                             _deciding(flat_hparams(cfg, keep_none=True), models).items() if rule != k}
        shown = "; ".join(f"{k}: {theirs.get(k)!r} there, {settings.get(k)!r} here"
                          + (f" (by {decided[k]} for this zoo)" if k in decided else "") for k in differ[:3])
        why = (f" ({budget} can change only under meta.train.schedule=constant: the cosine schedule is laid over "
               "the whole budget)" if budget in differ else "")
        raise RunError(f"--resume: the checkpoints in {checkpoint.parent} belong to a run with other settings "
                       f"({shown}{'; ...' if len(differ) > 3 else ''}){why}; resume with the settings it started "
                       "with, or start a new run with --overwrite or another output_dir")
    return {"run_id": run_id, "settings": settings}
