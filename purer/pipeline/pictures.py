"""The pictures of ECI meta-training: pseudo episodes as they are trained on, the final bank, the curves.

:class:`Pictures` is the loop's collaborator: it decides when a picture is due and
draws it from the bank (:mod:`purer.inversion.grid` lays the images out); the
training plot shows pseudo-query and meta-val accuracy and where the Gradient
Switch fired.  Only the main process draws.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..data import EpisodeSampler
from ..inversion import PseudoBank
from ..inversion.grid import class_labels, save_bank_grid, save_episode_grid


class Pictures:
    """PNGs under ``folder``: a pseudo episode at the first and every ``every`` iterations, the final bank and
    the training plot.

    Args:
        folder: ``<output_dir>/pictures``.
        bank: the run's bank.
        teacher_ids: the zoo's model ids (row labels name each class's teachers).
        every: iterations between episode pictures.
        enabled: draw (the main process) or not.
    """

    def __init__(self, folder: Path, bank: PseudoBank, teacher_ids: Sequence[str], every: int, enabled: bool):
        self.folder, self.bank, self.teacher_ids, self.every, self.enabled = folder, bank, list(teacher_ids), every, \
            enabled
        self.labels = class_labels(bank, self.teacher_ids)  # a row per class: its name (its teachers)

    def episode(self, iteration: int, tasks: EpisodeSampler, task: int) -> None:
        """After meta-iteration ``iteration`` (1-based), picture task ``task`` of ``tasks`` if one is due."""
        if not self.enabled or (iteration % self.every and iteration != 1):
            return
        spec = tasks.task(task)
        with torch.no_grad():
            save_episode_grid(self.bank.episode(spec), self.folder / f"pseudo_episode_{iteration:06d}.png",
                              row_labels=[self.labels[int(c)] for c in spec.classes])

    def final(self, pseudo_query: Sequence[tuple[int, float]], val: Sequence[tuple[int, float]],
              fired: Sequence[int]) -> None:
        """The bank at the end (its first 20 classes) and the training plot."""
        if not self.enabled:
            return
        save_bank_grid(self.bank, self.folder / "bank_final.png", classes=list(range(min(20, self.bank.num_classes))),
                       teacher_ids=self.teacher_ids)
        save_training_plot(self.folder / "training.png", pseudo_query, val, fired)


def save_training_plot(path: str | Path, pseudo_query: Sequence[tuple[int, float]],
                       val: Sequence[tuple[int, float]], fired: Sequence[int]) -> Path:
    """PNG of ECI meta-training: pseudo-query accuracy per iteration, meta-val accuracy, and the iterations
    at which the Gradient Switch fired (the next bank update was adversarial).

    Args:
        pseudo_query: ``(iteration, accuracy in [0, 1])`` per meta-iteration.
        val: ``(iteration, accuracy in %)`` per meta-val evaluation.
        fired: iterations at which the switch fired.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if pseudo_query:
        ax.plot(*zip(*[(i, 100 * a) for i, a in pseudo_query]), lw=0.8, color="tab:blue",
                label="pseudo-query accuracy")
    if val:
        ax.plot(*zip(*val), "o-", color="tab:green", label="meta-val accuracy")
    for n, it in enumerate(fired):
        ax.axvline(it, color="tab:red", lw=0.6, alpha=0.6, label="switch fired" if n == 0 else None)
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    if pseudo_query or val or fired:  # a run of 0 iterations (a baselines-only run) has nothing to label
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
