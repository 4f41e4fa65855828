"""Checkpoints of ECI meta-training: one file per object, named for what it holds.

``<output_dir>/checkpoints/checkpoint_<iteration>/`` holds ``<name>.pt`` for every
checkpointed object (the bank, the inversion's optimizer and sampler, the switch, the
learner, its optimizer, the meta-val best, the training state, the distillation heads, the
learner's weight average:
:data:`CHECKPOINTED`), ``rng.pt`` (torch's global generators, for learners that draw
at random, e.g. Dropout), ``run.json`` (the run's identity: its id and training
settings) and, written last, ``COMPLETE``.  A folder without ``COMPLETE`` (a run killed
while saving) is ignored; only the two newest complete checkpoints are kept.  Every
file is written to a temporary name and renamed, and read with ``weights_only=True``
(nothing is unpickled beyond tensors and plain containers) onto the CPU, so a GPU
run's checkpoint reads on a CPU machine.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from .run_config import RunError

#: What a checkpoint of ECI meta-training holds, one ``<name>.pt`` each.
CHECKPOINTED = ("bank", "inversion", "switch", "learner", "optimizer", "best", "state", "distill", "average")
COMPLETE = "COMPLETE"


def complete_checkpoints(root: Path) -> list[Path]:
    """The complete checkpoint folders under ``root``, oldest first."""
    done = [p.parent for p in Path(root).glob(f"checkpoint_*/{COMPLETE}")]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint of the run in ``out``, if any."""
    found = complete_checkpoints(Path(out) / "checkpoints")
    return found[-1] if found else None


def checkpointed_state(checkpoint: str | os.PathLike, name: str, map_location: str | torch.device = "cpu") -> Any:
    """The state of one of :data:`CHECKPOINTED` in a checkpoint folder, on ``map_location`` (default the CPU)."""
    if name not in CHECKPOINTED:
        raise ValueError(f"a checkpoint holds {', '.join(CHECKPOINTED)}; got {name!r}")
    return torch.load(Path(checkpoint) / f"{name}.pt", map_location=map_location, weights_only=True)


def _save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class Checkpoints:
    """Saves and restores the checkpointed objects of a run (see the module docstring).

    Args:
        out: the run's output folder (checkpoints go to ``out/checkpoints``).
        objects: ``{name: object with state_dict / load_state_dict}`` for every name of :data:`CHECKPOINTED`.
        dist: the run's processes; the main process writes the shared state, every process its own RNG.
        identity: written as ``run.json`` (see :func:`purer.pipeline.rundir.run_identity`).
    """

    def __init__(self, out: Path, objects: dict[str, Any], dist, identity: dict):
        missing = set(CHECKPOINTED) - set(objects)
        if missing:
            raise ValueError(f"checkpointed objects missing: {sorted(missing)}")
        self.root, self.objects, self.dist, self.identity = Path(out) / "checkpoints", objects, dist, identity

    def save(self, iteration: int) -> Path:
        """Write ``checkpoint_<iteration>``; returns its folder."""
        target = self.root / f"checkpoint_{iteration}"
        if self.dist.main:
            target.mkdir(parents=True, exist_ok=True)
            (target / COMPLETE).unlink(missing_ok=True)
            for name in CHECKPOINTED:
                _save(self.objects[name].state_dict(), target / f"{name}.pt")
        self.dist.barrier()
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        _save(rng, target / f"rng_{self.dist.rank}.pt")
        self.dist.barrier()
        if self.dist.main:
            (target / "run.json").write_text(json.dumps(self.identity, indent=1))
            (target / COMPLETE).write_text(str(iteration))
            for old in complete_checkpoints(self.root)[:-2]:
                shutil.rmtree(old, ignore_errors=True)
        self.dist.barrier()
        return target

    def restore(self, folder: Path) -> None:
        """Load every object (and this process's RNG) from ``folder``; each object puts the tensors where its
        own live (modules and optimizers copy them onto their parameters' device)."""
        try:
            for name in CHECKPOINTED:
                obj = self.objects[name]
                if not (folder / f"{name}.pt").exists() and not obj.state_dict():
                    continue  # an object with no state (e.g. the weight average, off) in a checkpoint older than it
                obj.load_state_dict(checkpointed_state(folder, name))
        except (OSError, RuntimeError, ValueError, KeyError) as e:  # shapes or keys of another config
            raise RunError(f"--resume: {folder} does not fit this config (resume with the settings the run "
                           f"started with, or use a new output_dir): {' '.join(str(e).split())[:400]}") from None
        rng_file = folder / f"rng_{self.dist.rank}.pt"
        if rng_file.is_file():
            rng = torch.load(rng_file, weights_only=True)
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
