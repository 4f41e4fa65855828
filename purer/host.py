"""The device/host boundary in one place: what is read back to the host, and how host data reaches the device.

On a GPU, reading a value back (``.item()``, ``float()``, ``bool()``, ``.tolist()``,
``.cpu()``) waits for every queued kernel, and a copy from pageable host memory
stalls the stream.  purer reads device values only through :func:`read` (and
:func:`value`), each read naming *why* (:data:`REASONS`: the Gradient Switch's one
number per meta-iteration, logging every ``log_every`` steps, selection on meta-val,
results, checkpoints, pictures, cache keys), and moves host-drawn data (task indices, augmentation
matrices, initial bank tensors: everything is drawn on the CPU from the seed, so every
device computes the same thing) through :func:`to_device`, pinned and non-blocking on CUDA.

:class:`HostTraffic` makes both checkable without a GPU: under it, tensors on the
``meta`` device (shapes and dtypes, no data; any CPU tensor mixed into their
operations raises) run the real code, every device-to-host read is counted (and
answered with zeros), named reads apart from stray ones, and every blocking
host-to-device copy is counted too.  The suite's dry run and sync budget use it.

Example:
    >>> acc = torch.tensor(0.75)
    >>> value(acc, "switch")
    0.75
"""
from __future__ import annotations

import contextlib
import threading
import traceback
from collections import Counter
from typing import Iterator

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: Why purer reads a device value on the host; each is a named, expected synchronisation.
REASONS = ("switch", "log", "select", "result", "checkpoint", "picture", "cache")
_reading = threading.local()


def read(x: torch.Tensor, why: str) -> torch.Tensor:
    """``x`` on the host (a CPU tensor, detached): one synchronisation on a GPU, named by ``why``."""
    if why not in REASONS:
        raise ValueError(f"a host read must name one of {REASONS}, got {why!r}")
    _reading.why = why
    checking = x.device.type == "cuda" and torch.cuda.get_sync_debug_mode() != 0
    if checking:  # a named read is the one synchronisation allowed under torch.cuda.set_sync_debug_mode
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(0)
    try:
        return x.detach().to("cpu")
    finally:
        _reading.why = None
        if checking:
            torch.cuda.set_sync_debug_mode(mode)


def value(x: torch.Tensor, why: str) -> float:
    """A 0-dim (or one-element) device tensor as a Python float (see :func:`read`)."""
    return float(read(x, why).reshape(()))


def values(x: torch.Tensor, why: str) -> np.ndarray:
    """A device tensor as a NumPy array (see :func:`read`)."""
    return read(x, why).numpy()


def to_device(x: torch.Tensor | np.ndarray, device: torch.device | str) -> torch.Tensor:
    """Host data (a CPU tensor or NumPy array) on ``device``: pinned and non-blocking on CUDA, so the copy
    does not wait for the device's queued work; unchanged on the CPU."""
    x = torch.as_tensor(x)
    device = torch.device(device)
    if device.type == "cpu":
        return x
    if device.type == "cuda":
        x = x.pin_memory()
    return x.to(device, non_blocking=True)


class HostTraffic(TorchDispatchMode):
    """Counts device-to-host reads and blocking host-to-device copies; answers reads of ``meta`` tensors.

    Attributes:
        named: reads made through :func:`read`, by reason.
        stray: reads made anywhere else (``.item()``, ``bool()``, ``.cpu()``, ...), by the operation and the
            line that made it.
        blocking_copies: host-to-device copies not made through :func:`to_device` (pageable, blocking),
            e.g. ``torch.as_tensor(array, device=...)``, by the line that made them.

    Reads of ``meta`` tensors return zeros (or ``fill``), so code that reads a value
    (the switch, logging, selection) goes on.  Only a *device* is watched: reads and
    copies between CPU tensors are not counted.
    """

    def __init__(self, fill: float = 0.0):
        super().__init__()
        self.fill = fill
        self.named: Counter = Counter()
        self.stray: Counter = Counter()
        self.blocking_copies: Counter = Counter()

    def reset(self) -> None:
        self.named.clear()
        self.stray.clear()
        self.blocking_copies.clear()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        devices = {a.device.type for a in args if isinstance(a, torch.Tensor)}
        on_device = bool(devices - {"cpu"})
        if func is torch.ops.aten._local_scalar_dense.default and on_device:
            self._count(func)
            dtype = args[0].dtype
            return bool(self.fill) if dtype == torch.bool else self.fill if dtype.is_floating_point else int(self.fill)
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            src = args[1] if func is torch.ops.aten.copy_.default else args[0]
            if not isinstance(src, torch.Tensor):  # a Python number (vmap wraps the scalar of ``batched_0dim * 1e-4``)
                return func(*args, **kwargs)
            dst = args[0].device if func is torch.ops.aten.copy_.default else kwargs.get("device")
            src_type, dst_type = src.device.type, torch.device(dst).type if dst is not None else src.device.type
            if src_type != "cpu" and dst_type == "cpu":
                self._count(func)
                if src_type == "meta":
                    out = torch.full(src.shape, self.fill, dtype=kwargs.get("dtype") or src.dtype)
                    return args[0].copy_(out) if func is torch.ops.aten.copy_.default else out
            elif src_type == "cpu" and dst_type != "cpu" and not kwargs.get("non_blocking", False):
                self.blocking_copies[_caller()] += 1
        return func(*args, **kwargs)

    def _count(self, func) -> None:
        why = getattr(_reading, "why", None)
        if why is not None:
            self.named[why] += 1
            return
        self.stray[f"{func} at {_caller()}"] += 1


def _caller() -> str:
    """The innermost line of purer (or else of the caller) on the stack: where a read or copy was made."""
    frames = [f for f in traceback.extract_stack()[:-2] if "torch" not in f.filename.split("site-packages")[-1]
              and not f.filename.endswith("host.py")]
    where = next((f for f in reversed(frames) if "purer" in f.filename), frames[-1] if frames else None)
    return f"{where.filename}:{where.lineno}" if where else "?"


@contextlib.contextmanager
def host_traffic(fill: float = 0.0) -> Iterator[HostTraffic]:
    """``with host_traffic() as traffic:`` counts the block's host reads and copies (see :class:`HostTraffic`)."""
    with HostTraffic(fill) as mode:
        yield mode
