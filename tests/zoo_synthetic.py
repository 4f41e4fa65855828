"""Tiny synthetic data and models shared by the zoo tests (store, pretrain, CLI)."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import purer
from purer.data import ImageSet
from purer.zoo import build_model

SIZE = 16


def separable_images(num_classes: int = 10, per_class: int = 20, size: int = SIZE, channels: int = 1,
                     seed: int = 0) -> ImageSet:
    """Each class is a blocky random template; instances add noise and a +-1 px shift."""
    g = torch.Generator().manual_seed(seed)
    templates = F.interpolate(torch.rand(num_classes, channels, 4, 4, generator=g).round(), size=(size, size))
    x = templates.repeat_interleave(per_class, 0)
    shifts = torch.randint(-1, 2, (len(x), 2), generator=g)
    x = torch.stack([img.roll(tuple(s.tolist()), dims=(1, 2)) for img, s in zip(x, shifts)])
    x = (0.8 * x + 0.1 + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return ImageSet(x, labels, [f"c{i}" for i in range(num_classes)], name="synthetic/train")


def tiny_model(num_classes: int = 5, seed: int = 0):
    """A width-8 Conv4 for 1x16x16 images with non-trivial BN running statistics."""
    torch.manual_seed(seed)
    model = build_model("conv4", num_classes, in_channels=1, image_size=SIZE, arch_args={"width": 8})
    model.train()
    with torch.no_grad():
        model(torch.rand(8, 1, SIZE, SIZE))
    return model.eval()


def interrupt_second_teacher(monkeypatch) -> None:
    """Make pre-training raise KeyboardInterrupt (as Ctrl-C would) when the second teacher starts."""
    from purer.zoo import pretrain

    real, calls = pretrain.train_teacher, []

    def dies_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pretrain, "train_teacher", dies_on_second)


_HOLDER = """
import sys
from purer.zoo import Zoo
zoo = Zoo(sys.argv[1], create=True)
with zoo.writing():
    print("holding", flush=True)
    sys.stdin.readline()
    exec(sys.argv[2])
"""


def while_another_process_writes(zoo_path: Path, then: str, action: Callable[[Callable[[str], None]], object]):
    """Run ``action(on_wait)`` in a thread while another process holds the zoo's writer lock.

    The other process takes the lock, waits until ``action`` has reported that it waits (through
    ``on_wait``), then runs the Python code ``then`` (with ``zoo`` bound) and exits, releasing it.
    Returns the lines ``on_wait`` received and ``action``'s result. The order is forced, not timed.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(purer.__file__).resolve().parents[1]),
                                                        str(Path(__file__).parent)])}
    other = subprocess.Popen([sys.executable, "-c", _HOLDER, str(zoo_path), then], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert other.stdout.readline().strip() == "holding"
        waited, result = [], {}
        worker = threading.Thread(target=lambda: result.setdefault("value", action(waited.append)), daemon=True)
        worker.start()
        deadline = time.monotonic() + 60
        while not waited and worker.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert waited, "the action did not wait for the other process's lock"
        other.stdin.write("\n")
        other.stdin.close()
        assert other.wait(timeout=300) == 0
        worker.join(timeout=300)
        assert "value" in result, "the action failed; see its traceback above"
        return waited, result["value"]
    finally:
        if other.poll() is None:
            other.kill()
