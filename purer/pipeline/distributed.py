"""The few collective operations a run needs, over an ``accelerate.Accelerator`` (no-ops in one process).

A meta-batch's tasks and an inversion step's teachers are split round robin over
processes; evaluation tasks are split and gathered in task order.  Every random
draw depends on ``(seed, iteration, task or teacher)`` only, so the split changes
which process computes what, never what is computed.  Gradients are not summed by
an all-reduce: each task's (or teacher's) gradient is gathered as it is and every
process adds them up in the one-process order (:meth:`Dist.collect`), because float
addition is not associative and a run must not depend on how it is split.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch


class Dist:
    """The few collective operations the pipeline needs, over an ``accelerate.Accelerator``."""

    def __init__(self, accelerator):
        self.acc = accelerator
        self.rank = accelerator.process_index
        self.world = accelerator.num_processes

    @property
    def main(self) -> bool:
        return self.acc.is_main_process

    def share(self, items: Sequence) -> list:
        """This process's share of ``items`` (round robin)."""
        return list(items[self.rank::self.world])

    def collect(self, local: dict) -> dict:
        """Every process's ``{key: tensor}`` merged, sorted by key; each key is computed by one process.

        One all-reduce of a buffer in which every element has a single non-zero contribution,
        so each tensor arrives bit-for-bit (``x + 0 == x``; a ``-0.0`` may arrive as ``0.0``).
        """
        if self.world == 1:
            return dict(sorted(local.items()))
        from accelerate.utils import gather_object

        shapes: dict = {}
        for part in gather_object([[(k, tuple(v.shape)) for k, v in local.items()]]):
            for k, shape in part:
                if k in shapes:
                    raise RuntimeError(f"two processes computed {k!r}")
                shapes[k] = shape
        keys = sorted(shapes)
        sizes = [math.prod(shapes[k]) for k in keys]
        dtype = next(iter(local.values())).dtype if local else torch.get_default_dtype()
        flat = torch.zeros(sum(sizes), dtype=dtype, device=self.acc.device)
        for k, part in zip(keys, flat.split(sizes)):
            if k in local:
                part.copy_(local[k].reshape(-1))
        flat = self.acc.reduce(flat, reduction="sum")
        return {k: part.view(shapes[k]) for k, part in zip(keys, flat.split(sizes))}

    def gather_tasks(self, local: np.ndarray, n: int) -> np.ndarray:
        """Per-task values computed round robin -> the full array in task order."""
        if self.world == 1:
            return local
        from accelerate.utils import gather_object

        out = np.empty(n)
        for rank, part in enumerate(gather_object([local.tolist()])):
            out[rank::self.world] = part
        return out

    def barrier(self) -> None:
        self.acc.wait_for_everyone()

    def any(self, flag: bool) -> bool:
        """``True`` if ``flag`` is set in any process."""
        if self.world == 1:
            return flag
        return bool(self.acc.reduce(torch.tensor([float(flag)], device=self.acc.device), reduction="sum").item() > 0)


def task_sync(dist: Dist, tasks: Sequence[int]) -> Callable[[list[torch.Tensor]], list[torch.Tensor]] | None:
    """:func:`purer.meta.train.meta_step`'s ``sync`` for this process's ``tasks`` of the meta-batch."""
    if dist.world == 1:
        return None
    return lambda rows: list(dist.collect(dict(zip(tasks, rows))).values())


def bank_grad_sync(dist: Dist) -> Callable[[dict], dict] | None:
    """:meth:`purer.inversion.EpisodeInversion.step`'s ``sync``: every process's gradient terms."""
    if dist.world == 1:
        return None

    def sync(terms: dict[int, dict[int, torch.Tensor]]) -> dict[int, dict[int, torch.Tensor]]:
        full: dict[int, dict[int, torch.Tensor]] = {}
        for (term, k), g in dist.collect({(t, k): g for t, grads in terms.items() for k, g in grads.items()}).items():
            full.setdefault(term, {})[k] = g
        return full

    return sync


def autocast_dtype(accelerator) -> torch.dtype | None:
    """The lower precision of the accelerator's mixed precision (``--mixed_precision``), ``None`` for ``no``."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(accelerator.mixed_precision))
