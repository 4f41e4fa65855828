"""The few collective operations a run needs, over an ``accelerate.Accelerator`` (no-ops in one process).

Work is split round robin over processes by *work item*: a meta-batch's tasks and the
zoo-distillation teachers of a meta-update are one list of items, an inversion step's
teachers and its adversarial term another, evaluation tasks a third; so with more
processes than tasks, the distillation and inversion teachers still find a process.
Every random draw depends on ``(seed, iteration, task or teacher)`` only, so the split
changes which process computes what, never what is computed.

Results are exchanged as tensors in one flat buffer per process (no pickling per step):
every process knows from the split which items every other process computed and their
sizes, so one ``all_gather`` of the buffers (each padded to the largest) brings every
item's tensor, bit for bit, to every process, which adds them up in the one-process
order.  Float addition is not associative, and Adam turns the rounding noise of
gradients that are zero in exact arithmetic into full-size steps, so a run must not
depend on how it is split.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from .. import host


class Dist:
    """The collective operations the pipeline needs, over an ``accelerate.Accelerator`` (or one process).

    Args:
        accelerator: the run's Accelerator; ``None`` for one process on ``device``.
        device: the device of a process without an Accelerator (e.g. the dry run's ``meta``).
    """

    def __init__(self, accelerator=None, device: torch.device | str | None = None):
        self.acc = accelerator
        self.rank = accelerator.process_index if accelerator is not None else 0
        self.world = accelerator.num_processes if accelerator is not None else 1
        self.device = accelerator.device if accelerator is not None else torch.device(device or "cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def owner(self, item: int) -> int:
        """The process that computes work item ``item`` (round robin)."""
        return item % self.world

    def share(self, items: Sequence) -> list:
        """This process's share of ``items`` (round robin)."""
        return list(items[self.rank::self.world])

    def gather_items(self, local: Sequence[torch.Tensor], owners: Sequence[int], sizes: Sequence[int]
                     ) -> list[torch.Tensor]:
        """Every work item's flat tensor, in item order, on every process.

        Args:
            local: this process's items' tensors, in item order.
            owners: the process of every item (every process knows them).
            sizes: every item's number of elements (every process knows them too).

        One ``all_gather`` of one buffer per process (padded to the largest); each tensor
        arrives bit for bit.
        """
        if self.world == 1:
            return [t.reshape(-1) for t in local]
        mine = [k for k, r in enumerate(owners) if r == self.rank]
        if [t.numel() for t in local] != [sizes[k] for k in mine]:
            raise RuntimeError(f"process {self.rank} computed items of sizes {[t.numel() for t in local]}, "
                               f"expected {[sizes[k] for k in mine]}")
        totals = [sum(n for n, r in zip(sizes, owners) if r == rank) for rank in range(self.world)]
        width = max(max(totals), 1)
        dtype = local[0].dtype if local else torch.float32
        buffer = torch.zeros(width, dtype=dtype, device=self.device)
        if local:
            flat = torch.cat([t.reshape(-1) for t in local])
            buffer[:flat.numel()] = flat
        gathered = self.acc.gather(buffer).view(self.world, width)
        out, offsets = [], [0] * self.world
        for n, r in zip(sizes, owners):
            out.append(gathered[r, offsets[r]:offsets[r] + n])
            offsets[r] += n
        return out

    def gather_tasks(self, local: torch.Tensor, n: int) -> torch.Tensor:
        """Per-task values ``[len(share), ...]`` computed round robin -> ``[n, ...]`` in task order (on the
        device)."""
        if self.world == 1:
            return local
        rest = tuple(local.shape[1:])
        width = math.prod(rest)
        items = self.gather_items(list(local.reshape(len(local), width)), [self.owner(k) for k in range(n)],
                                  [width] * n)
        return torch.stack(items).reshape(n, *rest) if items else local.new_zeros(0, *rest)

    def barrier(self) -> None:
        if self.acc is not None:
            self.acc.wait_for_everyone()

    def any(self, flag: bool) -> bool:
        """``True`` if ``flag`` is set in any process (one collective and one host read with several)."""
        if self.world == 1:
            return flag
        total = self.acc.reduce(torch.tensor([float(flag)], device=self.device), reduction="sum")
        return host.value(total, "switch") > 0


def task_sync(dist: Dist, owners: Sequence[int], row_size: int
              ) -> Callable[[list[torch.Tensor]], list[torch.Tensor]] | None:
    """:func:`purer.meta.train.meta_step`'s ``sync``: this process's rows (one per meta-batch row it owns, of
    ``row_size`` elements each) -> every row in row order.  ``owners[k]``: the process of row ``k``."""
    if dist.world == 1:
        return None
    return lambda rows: dist.gather_items(rows, owners, [row_size] * len(owners))


def term_sync(dist: Dist, layout: dict[int, tuple[int, int]]
              ) -> Callable[[dict[int, torch.Tensor]], dict[int, torch.Tensor]] | None:
    """Flat terms of a step to every process: :meth:`purer.inversion.GeneratorInversion.step`'s ``sync``, and what
    :func:`bank_grad_sync` sends its terms through.  ``layout`` is every term of the step,
    ``{term: (its process, its number of elements)}``; ``sync(terms) -> terms`` brings every process's flat
    terms to every process, bit for bit."""
    if dist.world == 1:
        return None
    keys = sorted(layout)

    def sync(terms: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        local = [terms[t] for t in keys if layout[t][0] == dist.rank]
        return dict(zip(keys, dist.gather_items(local, [layout[t][0] for t in keys], [layout[t][1] for t in keys])))

    return sync


def bank_grad_sync(dist: Dist, layout: dict[int, tuple[int, list[int]]], shapes: Sequence[torch.Size]
                   ) -> Callable[[dict], dict] | None:
    """:meth:`purer.inversion.EpisodeInversion.step`'s ``sync`` for one step.

    Args:
        layout: every gradient term of the step, ``{term: (its process, the bank classes it covers)}``.
        shapes: the shape of every bank class's tensor.

    Returns:
        ``sync(terms) -> terms``: this process's ``{term: {class: grad}}`` -> every process's,
        each term's gradients bit for bit (a class a term did not reach arrives as zeros); each term travels
        flat through :func:`term_sync`.
    """
    if dist.world == 1:
        return None
    sizes = {t: [math.prod(shapes[k]) for k in classes] for t, (_, classes) in layout.items()}
    flat = term_sync(dist, {t: (rank, sum(sizes[t])) for t, (rank, _) in layout.items()})

    def sync(terms: dict[int, dict[int, torch.Tensor]]) -> dict[int, dict[int, torch.Tensor]]:
        local = {}
        for t, (rank, classes) in layout.items():
            if rank == dist.rank:
                grads = terms.get(t, {})
                local[t] = torch.cat([grads[k].reshape(-1) if k in grads else torch.zeros(n, device=dist.device)
                                      for k, n in zip(classes, sizes[t])])
        return {t: {k: g.view(shapes[k]) for k, g in zip(layout[t][1], row.split(sizes[t]))}
                for t, row in flat(local).items()}

    return sync


def autocast_dtype(accelerator) -> torch.dtype | None:
    """The lower precision of the accelerator's mixed precision (``--mixed_precision``), ``None`` for ``no``."""
    if accelerator is None:
        return None
    return {"bf16": torch.bfloat16}.get(str(accelerator.mixed_precision))  # fp16 is refused (see RunConfig)
