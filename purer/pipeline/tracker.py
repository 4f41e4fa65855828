"""The numbers of ECI meta-training: summed on the device every step, read on the host every ``log_every``.

Per-step numbers (losses, accuracies, the inversion's parts, the distillation's terms)
stay on the device and are added up; every ``log_every`` iterations (and at the last)
their means are read in one host read (``purer.host.read(..., "log")``), written to
TensorBoard through ``accelerator.log`` and shown on the progress bar.  Meta-val
scores join the next record written.
"""
from __future__ import annotations

import torch

from .. import host


class Tracker:
    """Sums per-step device numbers and logs their means every ``every`` iterations.

    Args:
        accelerator: the run's Accelerator (``None``: nothing is written, e.g. the dry run).
        every: iterations between records.
        bar: the run's tqdm bar (its postfix shows the latest record), or ``None``.
    """

    def __init__(self, accelerator, every: int, bar=None):
        self.acc, self.every, self.bar = accelerator, every, bar
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.pending: dict[str, float] = {}

    def add(self, numbers: dict[str, torch.Tensor]) -> None:
        """One iteration's numbers (0-dim device tensors)."""
        for k, v in numbers.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.steps += 1

    def note(self, numbers: dict[str, float]) -> None:
        """Host numbers (e.g. meta-val scores) for the next record."""
        self.pending.update(numbers)

    def flush(self, iteration: int, last: bool, fired: int) -> dict[str, float]:
        """Write a record if one is due after ``iteration`` (or there are pending numbers); returns it."""
        record = dict(self.pending)
        if self.sums and (iteration % self.every == 0 or last):
            keys = list(self.sums)
            means = host.values(torch.stack([self.sums[k].float() for k in keys]) / self.steps, "log")
            record.update({k: float(v) for k, v in zip(keys, means)})
            record["switch/fired"] = fired
            self.sums, self.steps = {}, 0
            if self.bar is not None:
                self.bar.set_postfix(acc=f"{record.get('meta/pseudo_query_acc', float('nan')):.2f}",
                                     ce=f"{record.get('inversion/ce', float('nan')):.2f}", fired=fired)
        if record and self.acc is not None:
            self.acc.log(record, step=iteration)
        self.pending = {}
        return record
