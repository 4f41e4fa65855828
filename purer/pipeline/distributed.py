"""The few collective operations a run needs, over an ``accelerate.Accelerator`` (no-ops in one process).

A meta-batch's tasks and an inversion step's teachers are split round robin over
processes and their gradients summed; evaluation tasks are split and gathered in
task order.  Every random draw depends on ``(seed, iteration, task or teacher)``
only, so the split changes which process computes what, never what is computed.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from ..inversion import PseudoBank


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

    def sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        """In-place sum of ``tensors`` over processes (one flat all-reduce)."""
        if self.world == 1 or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        flat = self.acc.reduce(flat, reduction="sum")
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    def union(self, keys: Sequence[int]) -> list[int]:
        if self.world == 1:
            return sorted(keys)
        from accelerate.utils import gather_object

        return sorted({k for part in gather_object([list(keys)]) for k in part})

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
        t = torch.tensor([float(flag)])
        self.sum_([t])
        return bool(t.item() > 0)


def bank_grad_sync(dist: Dist, bank: PseudoBank) -> Callable[[dict[int, torch.Tensor]], dict[int, torch.Tensor]] | None:
    """The inversion step's hook that sums the per-class bank gradients over processes."""
    if dist.world == 1:
        return None

    def sync(grads: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        full = {k: grads[k] if k in grads else torch.zeros_like(bank.logits[k]) for k in dist.union(list(grads))}
        dist.sum_(list(full.values()))
        return full

    return sync


def autocast_dtype(accelerator) -> torch.dtype | None:
    """The lower precision of the accelerator's mixed precision (``--mixed_precision``), ``None`` for ``no``."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(accelerator.mixed_precision))
