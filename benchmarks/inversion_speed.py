"""Seconds per episode-inversion step against the zoo size (does a step's cost stay flat?).

Zoos of 10, 50 and 100 Conv4 teachers (random weights: timing does not depend on
them), 32x32 grey inputs, 5 classes each, a bank of 16 images per class, 4
teachers sampled per step, the default InversionConfig (augmentation on).
Runs on one thread (torch.set_num_threads(1)), since the machine is shared and
threads would only add noise.  Zoo sizes are timed in interleaved rounds and the
median per size is kept (the minimum is reported too), so a burst of load
elsewhere hits every size alike.

For comparison it also times one dense Adam update over a tensor the size of the
whole bank: the per-step cost the lazy per-class Adam avoids.

Usage:
    python benchmarks/inversion_speed.py   # writes benchmarks/results/inversion_speed.json
"""
from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch

from purer.inversion import EpisodeInversion, InversionConfig, PseudoBank
from purer.zoo import ModelConfig, Teacher

OUT = Path(__file__).parent / "results" / "inversion_speed.json"


def random_zoo(n: int, image_size: int, classes: int) -> list[Teacher]:
    zoo = []
    for i in range(n):
        config = ModelConfig("conv4", classes, [f"m{i}c{k}" for k in range(classes)], in_channels=1,
                             image_size=image_size)
        zoo.append(Teacher(config.build(), config, f"m{i:03d}"))
    return zoo


def time_steps(inversion: EpisodeInversion, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        inversion.step()
    return (time.perf_counter() - start) / steps


def dense_adam_seconds(bank: PseudoBank, repeats: int = 5) -> float:
    """One Adam step over a single tensor holding the whole bank (the release-style dense update)."""
    p = torch.nn.Parameter(torch.randn(bank.num_classes, *bank.logits[0].shape))
    opt = torch.optim.Adam([p], lr=0.25)
    p.grad = torch.randn_like(p)
    opt.step()
    start = time.perf_counter()
    for _ in range(repeats):
        opt.step()
    return (time.perf_counter() - start) / repeats


def main(zoo_sizes=(10, 50, 100), teachers_per_step: int = 4, image_size: int = 32, classes: int = 5,
         images_per_class: int = 16, warmup_steps: int = 3, steps: int = 8, rounds: int = 5,
         out: Path = OUT) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    runs = {}
    for n in zoo_sizes:
        zoo = random_zoo(n, image_size, classes)
        bank = PseudoBank(zoo, images_per_class=images_per_class)
        inversion = EpisodeInversion(zoo, bank, InversionConfig(teachers_per_step=teachers_per_step))
        time_steps(inversion, warmup_steps)
        runs[n] = (bank, inversion)
    timings: dict[int, list[float]] = {n: [] for n in zoo_sizes}
    for r in range(rounds):
        for n in zoo_sizes:
            timings[n].append(time_steps(runs[n][1], steps))
            print(f"round {r + 1}/{rounds}  zoo {n:4d}: {timings[n][-1]:.3f} s/step", flush=True)
    seconds = [statistics.median(timings[n]) for n in zoo_sizes]
    images = teachers_per_step * classes * images_per_class
    result = {
        "zoo_sizes": list(zoo_sizes),
        "seconds_per_step": [round(s, 4) for s in seconds],
        "images_per_second": [round(images / s, 1) for s in seconds],
        "ratio_largest_to_smallest": round(seconds[-1] / seconds[0], 3),
        "min_seconds_per_step": [round(min(timings[n]), 4) for n in zoo_sizes],
        "all_rounds_seconds_per_step": {str(n): [round(t, 4) for t in timings[n]] for n in zoo_sizes},
        "dense_adam_update_seconds": [round(dense_adam_seconds(runs[n][0]), 4) for n in zoo_sizes],
        "setup": {"arch": "conv4 (width 32, depth 4), random weights", "image_size": image_size,
                  "channels": 1, "classes_per_teacher": classes, "images_per_class": images_per_class,
                  "teachers_per_step": teachers_per_step, "images_per_step": images,
                  "augment": True, "steps_per_round": steps, "rounds": rounds, "warmup_steps": warmup_steps,
                  "statistic": "median over rounds", "threads": torch.get_num_threads(),
                  "torch": torch.__version__, "machine": platform.machine(),
                  "note": "CPU shared with other jobs; torch.set_num_threads(1)"},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("zoo_sizes", "seconds_per_step", "ratio_largest_to_smallest",
                                             "dense_adam_update_seconds")}))
    return result


if __name__ == "__main__":
    main()
