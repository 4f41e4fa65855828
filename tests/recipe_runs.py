"""Running recipes/purer.py in a subprocess on a tiny fabricated class-per-folder dataset."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "purer.py"


def write_tiny_dataset(root: Path, colour: bool = False, prefix: str = "") -> Path:
    """A class-per-folder dataset: 16x16 grey (or colour: a blob per channel) blobs, 10 train / 6 val / 6 test
    classes of 8 images, named ``<prefix><split><k>``."""
    rng = np.random.default_rng(1 if colour else 0)
    for split, n in (("train", 10), ("val", 6), ("test", 6)):
        for c in range(n):
            channels = 3 if colour else 1
            template = (rng.random((channels, 4, 4)) > 0.5).astype(np.float32)
            template = np.kron(template, np.ones((1, 4, 4), np.float32))
            d = root / split / f"{prefix}{split}{c:02d}"
            d.mkdir(parents=True)
            for i in range(8):
                img = np.clip(0.8 * np.roll(template, rng.integers(-1, 2), axis=2) + 0.1
                              + 0.1 * rng.standard_normal((channels, 16, 16)), 0, 1)
                pixels = (img * 255).astype(np.uint8)
                Image.fromarray(pixels.transpose(1, 2, 0) if colour else pixels[0], "RGB" if colour else "L"
                                ).save(d / f"{i}.png")
    return root


# Ten meta-iterations of a tiny run (switch warm-up 1, patience 1): enough that the Gradient Switch fires
# before the end on any machine (it fires at the first iteration that sets no new maximum of the
# pseudo-query accuracy: only seven strict rises in a row, iterations 2 to 9, would miss it), so adversarial
# bank updates happen.
ITERATIONS = 10


def overrides(root: Path, out: Path, iterations: int = ITERATIONS, **extra) -> list[str]:
    base = {
        "data.dataset": "folder", "data.root": str(root), "data.image_size": 16,
        "zoo.path": str(root.parent / "tiny_zoo"), "zoo.num_models": 2, "zoo.epochs": 2,
        "meta.train.iterations": iterations, "meta.train.val_every": 3, "meta.train.patience": 0, "meta.val_tasks": 4,
        "meta.query": 3,
        "switch.warmup": 1, "switch.patience": 1,
        "eval.shots": "[1]", "eval.tasks": 6, "eval.val_tasks": 3, "eval.query": 3,
        "eval.grid.lr": "[0.1]", "eval.grid.steps": "[1]",
        "eval.baselines": "[nc-pixels, nc-best-teacher, maml-random]",
        "icfil.inversion_steps": 2, "icfil.calibration_steps": 1, "icfil.pseudo_per_class": 2,
        "output_dir": str(out), "cache_dir": str(out / "cache"), "checkpoint_every": 2, "picture_every": 3,
        "threads": 1,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def recipe(args: list[str], launcher: list[str] | None = None, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = (launcher or [sys.executable]) + [str(RECIPE), "--no-progress", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, **kw)


def accuracies(out: Path) -> list[tuple[str, float]]:
    rows = json.loads((out / "results.json").read_text())["rows"]
    return [(r["method"], r["accuracy"]) for r in rows]
