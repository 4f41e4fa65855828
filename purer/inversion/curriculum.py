"""The curriculum of episode inversion (ECI): the Gradient Switch.

The meta-learner's accuracy on pseudo query sets tells whether the current pseudo
tasks are learnt.  When it stops setting new maxima for ``patience``
meta-iterations, the switch fires: the next bank update adds
``-lambda_adv * L_outer`` (the meta-learner's query loss on a fresh pseudo episode,
through its inner loop) to the inversion loss, so the bank moves towards tasks the
meta-learner gets wrong.  Without it the meta-learner soon solves nearly every
pseudo task and learns poor features (METHOD.md part 2).

Example (one meta-iteration):
    >>> loss, acc = learner.outer_loss(bank.episode(sampler.task(it)))        # doctest: +SKIP
    >>> ...  # meta-update of the learner
    >>> extra = switch.adversarial_loss(learner, sampler.task(fresh)) if switch.update(acc.item()) else None  # doctest: +SKIP
    >>> inversion.step(extra_loss=extra)                                       # doctest: +SKIP
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..data.episodes import TaskSpec
from ..meta.base import MetaLearner
from .bank import PseudoBank
from .synthesizer import ExtraLoss


@dataclass
class SwitchConfig:
    """Settings of :class:`GradientSwitch`; defaults are the release's scripts.

    Attributes:
        patience: meta-iterations without a new maximum of the pseudo-query accuracy
            after which the switch fires.
        warmup: meta-iterations (the first ``warmup`` calls of ``update``) during
            which the switch never fires and the tracker is idle.
        lambda_adv: weight of the adversarial term ``-lambda_adv * L_outer``; 0 turns the
            curriculum off (plain episode inversion, METHOD.md's EI ablation).
        adversarial_queries: which query images the adversarial term pushes: ``all`` (the
            release) or ``correct``, only those the adapted learner still classifies
            correctly.  ``correct`` is the label-preserving mask of adversarial data-free
            distillation (stop pushing a sample once it is misclassified), so the
            adversary makes tasks hard without driving images ever further from their
            class.  Not in the release: an option to measure.
    """

    patience: int = 6
    warmup: int = 4000
    lambda_adv: float = 10.0
    adversarial_queries: str = "all"

    def __post_init__(self):
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.lambda_adv < 0:
            raise ValueError(f"lambda_adv must be >= 0, got {self.lambda_adv}")
        if self.adversarial_queries not in ("all", "correct"):
            raise ValueError(f"adversarial_queries must be 'all' or 'correct', got {self.adversarial_queries!r}")


class GradientSwitch:
    """Tracks pseudo-query accuracy and decides when the next bank update is adversarial.

    Rule: call :meth:`update` once per meta-iteration.  Calls ``1..warmup`` only
    count.  After warm-up, an accuracy above the best so far becomes the new best
    (the first one always does); any other increases a stale count, and when that
    count reaches ``patience`` the call returns ``True`` and the tracker resets (no
    best, stale count 0).  So, after warm-up or a reset, the switch fires at the
    earliest ``patience + 1`` calls later.

    Args:
        config: see :class:`SwitchConfig`.
    """

    def __init__(self, config: SwitchConfig | None = None):
        self.config = config or SwitchConfig()
        self.iteration = 0
        self.best = -math.inf
        self.stale = 0
        self.fired = 0

    def update(self, query_acc: float) -> bool:
        """Feed one meta-iteration's pseudo-query accuracy; ``True`` if the next update is adversarial."""
        query_acc = float(query_acc)
        if math.isnan(query_acc):
            raise ValueError("query_acc is NaN; the meta-learner's outer loss has diverged")
        self.iteration += 1
        if self.iteration <= self.config.warmup:
            return False
        if query_acc > self.best:
            self.best, self.stale = query_acc, 0
            return False
        self.stale += 1
        if self.stale < self.config.patience:
            return False
        self.best, self.stale = -math.inf, 0
        self.fired += 1
        return True

    def adversarial_loss(self, learner: MetaLearner, spec: TaskSpec) -> ExtraLoss:
        """``f(bank) = -lambda_adv * L_outer`` of ``learner`` on the pseudo episode ``spec``.

        Pass it as ``extra_loss`` to :meth:`EpisodeInversion.step`.  ``spec`` should be
        a fresh task (not one the learner just trained on).  Train or eval mode alike:
        :meth:`MetaLearner.outer_loss` keeps the inner loop's graph whenever grad mode is
        on, so support images get a gradient too.
        """
        if not isinstance(learner, MetaLearner):
            raise TypeError(f"learner must be a purer.meta.MetaLearner, got {type(learner).__name__}")
        weight, correct_only = self.config.lambda_adv, self.config.adversarial_queries == "correct"

        def loss(bank: PseudoBank) -> torch.Tensor:
            episode = bank.episode(spec)
            logits = learner.query_logits(episode)
            per_query = learner.query_loss(logits, episode.query_y, reduction="none")  # CE, or the learner's own
            if correct_only:
                per_query = per_query * (logits.argmax(-1) == episode.query_y)
            return -weight * per_query.mean()

        return loss

    def state_dict(self) -> dict:
        # ``best`` is None before any maximum, so the state stays plain JSON.
        best = None if self.best == -math.inf else self.best
        return {"iteration": self.iteration, "best": best, "stale": self.stale, "fired": self.fired}

    def load_state_dict(self, state: dict) -> None:
        missing = {"iteration", "best", "stale", "fired"} - set(state)
        if missing:
            raise ValueError(f"GradientSwitch state lacks {sorted(missing)}")
        self.iteration = int(state["iteration"])
        self.best = -math.inf if state["best"] is None else float(state["best"])
        self.stale, self.fired = int(state["stale"]), int(state["fired"])
