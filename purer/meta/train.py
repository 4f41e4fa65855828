"""The meta-training loop: outer Adam steps on meta-batches of episodes from any source.

An episode source is a callable returning one :class:`~purer.data.Episode` per call
or an iterator of them: real tasks (:func:`real_episodes`, the baselines' upper
bound) or pseudo tasks of synthesised images. :func:`meta_step`, one outer step,
is what ECI meta-training calls; it reports the meta-batch's query accuracy, the
feedback of the adversarial curriculum.

Example:
    >>> history = meta_train(learner, real_episodes(train_set, way=5, shot=1), MetaTrainConfig(iterations=100))
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from einops import rearrange
from tqdm.auto import tqdm

from .. import host
from ..data.episodes import Episode, EpisodeSampler, ImageSet, TaskBatch, TaskSpec
from ..evaluate import evaluate
from .base import MetaLearner

EpisodeFn = Callable[[], Episode] | Iterator[Episode]
SCHEDULES = ("constant", "cosine")


@dataclass
class MetaTrainConfig:
    """Outer-loop settings; defaults follow the release (Adam 1e-3, 4 tasks per meta-batch).

    Attributes:
        iterations: outer steps.
        meta_batch: tasks per outer step.
        outer_lr: Adam learning rate.
        val_every: evaluate on the meta-val task list every this many steps and keep
            the best state (0: never; then the final state is kept).
        average: the decay of an exponential moving average of the learner's weights
            (:class:`WeightAverage`); meta-val scores the average, and the average is what is kept.
            0: off (the learner's own weights).
        schedule: the outer lr over the iterations: ``constant``, or ``cosine``, annealed from
            ``outer_lr`` toward 0 at the last iteration (MAML++'s annealing; :func:`set_outer_lr`).
        patience: early stopping: training ends once this many meta-val scores in a row have set no new best
            (:meth:`converged`; a pre-trained start's score does not count), so ``iterations`` is a ceiling.
            0 (or no meta-val, ``val_every`` 0): train every iteration.
    """

    iterations: int = 1000
    meta_batch: int = 4
    outer_lr: float = 1e-3
    val_every: int = 0
    average: float = 0.0
    schedule: str = "constant"
    patience: int = 0

    def __post_init__(self):
        if self.iterations < 0 or self.meta_batch < 1 or self.val_every < 0:
            raise ValueError(f"need iterations >= 0, meta_batch >= 1 and val_every >= 0, got {self.iterations}, "
                             f"{self.meta_batch} and {self.val_every}")
        if self.outer_lr <= 0:
            raise ValueError(f"outer_lr must be positive, got {self.outer_lr}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0 <= self.average < 1:
            raise ValueError(f"average (the weight average's decay) must lie in [0, 1), got {self.average}; "
                             f"0 turns it off")
        if self.patience < 0:
            raise ValueError(f"patience counts meta-val scores without a new best (0: off), got {self.patience}")

    @property
    def early_stopping(self) -> bool:
        """Whether ``patience`` can end training before ``iterations`` (it needs meta-val: ``val_every`` > 0)."""
        return bool(self.patience and self.val_every)

    def converged(self, val: Sequence[Sequence[float]]) -> bool:
        """Whether training should end: the last ``patience`` meta-val scores (``val``: ``(step, score)`` pairs)
        all came after the best one (never without :attr:`early_stopping`).

        A score at step 0 (ECI scores every ``meta.init`` but ``random`` before training) is not counted:
        meta-training first pulls a pre-trained start below its own score, so counting it could end a run before
        it has trained (it still competes to be the state kept)."""
        trained = [score for step, score in val if step > 0]
        if not self.early_stopping or not trained:
            return False
        return len(trained) - 1 - trained.index(max(trained)) >= self.patience


def set_outer_lr(optimizer: torch.optim.Optimizer, config: MetaTrainConfig, step: int) -> None:
    """Set the lr of outer step ``step`` (0-based) by ``config.schedule``: with ``cosine``, every parameter group's
    lr is its initial lr times ``(1 + cos(pi * step / iterations)) / 2`` (the initial lr kept in the group as
    ``initial_lr``, as torch's schedulers keep it, so it is checkpointed with the optimizer); ``constant``
    leaves the groups alone.

    References:
        Loshchilov, Hutter, "SGDR: Stochastic Gradient Descent with Warm Restarts", ICLR 2017.
        Antoniou, Edwards, Storkey, "How to train your MAML" (MAML++), ICLR 2019.
    """
    if config.schedule == "constant":
        return
    factor = (1 + math.cos(math.pi * step / max(config.iterations, 1))) / 2
    for group in optimizer.param_groups:
        group["lr"] = group.setdefault("initial_lr", group["lr"]) * factor


def weights(learner: MetaLearner) -> dict[str, torch.Tensor]:
    """A copy of ``learner``'s ``state_dict`` (detached, on the weights' device)."""
    return {k: v.detach().clone() for k, v in learner.state_dict().items()}


class BestLearner:
    """The meta-learner weights best on meta-val so far (a copy; checkpointed with an ECI run)."""

    def __init__(self, learner: MetaLearner):
        self.keep(learner)

    def keep(self, learner: MetaLearner) -> None:
        """Remember ``learner``'s current weights."""
        self.state = weights(learner)

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        self.state = {k: v.clone() for k, v in state.items()}


class WeightAverage:
    """An exponential moving average of a meta-learner's weights over its outer steps (Polyak averaging).

    After outer step ``n`` (1-based) the average moves toward the weights by ``1 - d_n``, with
    ``d_n = min(decay, (1 + n) / (10 + n))``: early steps, far from where training goes, fade fast.
    Every floating-point entry of the learner's ``state_dict`` is averaged, on the weights' device (no host
    read); other entries are copied.  ``decay`` 0 is off: the average is the weights themselves and
    :meth:`swapped_in` changes nothing.

    References:
        Polyak, Juditsky, "Acceleration of Stochastic Approximation by Averaging", SIAM J. Control Optim. 1992.
    """

    def __init__(self, learner: MetaLearner, decay: float):
        self.decay = decay
        self.state = weights(learner) if decay else {}

    def update(self, learner: MetaLearner, step: int) -> None:
        """Fold in the weights after outer step ``step`` (1-based)."""
        if not self.decay:
            return
        d = min(self.decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in learner.state_dict().items():
                if v.is_floating_point():
                    self.state[k].lerp_(v, 1 - d)
                else:
                    self.state[k].copy_(v)

    @contextlib.contextmanager
    def swapped_in(self, learner: MetaLearner):
        """``learner`` holds the average inside the block and its own weights again after it."""
        if not self.decay:
            yield
            return
        own = weights(learner)
        learner.load_state_dict(self.state)
        try:
            yield
        finally:
            learner.load_state_dict(own)

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        if set(state) != set(self.state):
            raise KeyError(f"the weight average holds {len(state)} entries, this run's {len(self.state)} "
                           f"(meta.train.average differs)")
        for k, v in state.items():
            self.state[k].copy_(v)


@dataclass
class TrainHistory:
    """Per-step mean outer loss and query accuracy of the meta-batch (floats once training ends), and the
    validation record."""

    loss: list = field(default_factory=list)
    acc: list = field(default_factory=list)
    val: list[tuple[int, float]] = field(default_factory=list)
    best_step: int | None = None
    best_val: float = -math.inf


def real_episodes(source: ImageSet, way: int, shot: int, query: int | None = 15, seed: int = 0) -> Iterator[Episode]:
    """An endless stream of seeded N-way K-shot episodes from a real image set."""
    for spec in EpisodeSampler(source.class_sizes(), way, shot, query, seed=seed):
        yield source.episode(spec)


def meta_step(learner: MetaLearner, optimizer: torch.optim.Optimizer, episodes: Sequence[Episode], *,
              total: int | None = None, sync: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None,
              extra: Sequence[torch.Tensor] = (), observe: Callable[[torch.Tensor], None] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """One outer step on a meta-batch; returns its mean query loss and accuracy (0-dim tensors, detached).

    The outer loss is the *mean* over the meta-batch (the release sums; under Adam
    the two differ only through Adam's epsilon), so splitting the meta-batch across
    processes gives the same step.  Tasks go through the learner together when it
    adapts them together on this device (:meth:`MetaLearner.tasks_together`, e.g.
    MAML on a GPU); otherwise each task is backpropagated on its own, so only one
    task's graph is alive at a time.

    Args:
        total: tasks in the whole meta-batch when ``episodes`` is one process's share
            (default ``len(episodes)``).
        extra: further 0-dim terms of the outer objective (e.g. one teacher's zoo
            distillation each, :class:`purer.distill.ZooDistillation`), added after the
            tasks in order, each its own row for ``sync``; their parameters (heads, maps)
            must be in ``optimizer``.
        observe: called with the detached query logits of the tasks as they are computed, ``[T', N*Q, N]``
            for the next ``T'`` tasks of ``episodes`` in order (e.g. the hard-task sampler's failure classes,
            :class:`purer.meta.hard_tasks.HardTasks`); nothing is read back to the host for it.
        sync: gathers one flat row per task of this process's share (its gradient,
            then its loss and accuracy) into the rows of the whole meta-batch, in task
            order; ``None`` in one process.  The rows are summed in task order, as one
            process accumulates them, so the step is bit-for-bit the one-process step:
            a sum in another order differs in the last bits, and Adam turns the rounding
            noise of gradients that are zero in exact arithmetic (a convolution's bias
            before BatchNorm) into full-size steps.
    """
    total = len(episodes) if total is None else total
    if total < 1 or total < len(episodes):
        raise ValueError(f"meta_step needs at least one episode (total={total}, here {len(episodes)})")
    learner.train()
    optimizer.zero_grad(set_to_none=True)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    device = params[0].device
    sums, rows = torch.zeros(2, device=device), []

    def contribute(loss: torch.Tensor, loss_sum: torch.Tensor, acc_sum: torch.Tensor) -> None:
        if sync is None:
            loss.backward()
            sums.add_(torch.stack([loss_sum, acc_sum]))
            return
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)]
                              + [loss_sum.reshape(1), acc_sum.reshape(1)]))

    if episodes and learner.tasks_together(device):
        # One row for this process's tasks: with tasks vmapped together there is no per-task gradient, so a
        # multi-process sum is exact only up to float rounding (one process per GPU, or one GPU: no sum).
        batch = TaskBatch.stack(episodes)
        logits = learner.batch_query_logits(batch)
        ce = learner.query_loss(rearrange(logits, "t q n -> (t q) n"), batch.query_y.repeat(len(batch)),
                                reduction="none").view(len(batch), -1).mean(1)
        correct = (logits.argmax(-1) == batch.query_y).float().mean(1)
        if observe is not None:
            observe(logits.detach())
        contribute(ce.sum() / total, ce.detach().sum(), correct.sum())
    else:
        for ep in episodes:
            # learner.outer_loss(ep), with the logits at hand for ``observe``
            logits = learner.query_logits(ep)
            loss = learner.query_loss(logits, ep.query_y)
            acc = (logits.argmax(-1) == ep.query_y).float().mean().detach()
            if observe is not None:
                observe(logits.detach().unsqueeze(0))
            contribute(loss / total, loss.detach(), acc)
    for term in extra:
        contribute(term, sums.new_zeros(()), sums.new_zeros(()))
    if sync is not None:
        rows = sync(rows)
        flat = rows[0]
        for row in rows[1:]:
            flat = flat + row
        for p, g in zip(params, flat[:-2].split([p.numel() for p in params])):
            p.grad = g.view_as(p).clone()
        sums = flat[-2:]
    optimizer.step()
    return sums[0] / total, sums[1] / total


def meta_train(learner: MetaLearner, episode_fn: EpisodeFn, config: MetaTrainConfig | None = None, *,
               optimizer: torch.optim.Optimizer | None = None,
               val: tuple[ImageSet, Sequence[TaskSpec]] | None = None, val_kwargs: dict | None = None,
               callback: Callable[[int, float, float], None] | None = None, progress: bool = True) -> TrainHistory:
    """Meta-train ``learner`` in place on episodes from ``episode_fn``.

    Args:
        learner: the meta-learner; its parameters are optimised.
        episode_fn: a callable returning an :class:`Episode`, or an iterator of them.
        config: iterations, meta-batch, outer lr, validation interval.
        optimizer: defaults to Adam over the learner's parameters at ``config.outer_lr``.
        val: ``(meta-val image set, fixed task list)``; with ``config.val_every > 0``
            the state with the best meta-val accuracy is restored at the end (with
            ``config.average``, the weight average's, which is what is scored).
        val_kwargs: test-time overrides passed to ``adapt`` during validation.
        callback: ``callback(step, loss, acc)`` after every outer step (1-based step).
        progress: show a tqdm bar.

    Returns:
        The :class:`TrainHistory` (per-step loss and accuracy, validation record).
    """
    config = config or MetaTrainConfig()
    if config.val_every and val is None:
        raise ValueError("config.val_every > 0 needs val=(meta-val image set, task list)")
    next_episode = episode_fn if callable(episode_fn) else (lambda it=iter(episode_fn): next(it))
    optimizer = optimizer or torch.optim.Adam(learner.parameters(), lr=config.outer_lr)
    history, best = TrainHistory(), None
    average = WeightAverage(learner, config.average)
    bar = tqdm(range(1, config.iterations + 1), desc="meta-train", disable=not progress, leave=False)
    for step in bar:
        set_outer_lr(optimizer, config, step - 1)
        loss, acc = meta_step(learner, optimizer, [next_episode() for _ in range(config.meta_batch)])
        average.update(learner, step)
        history.loss.append(loss)
        history.acc.append(acc)
        if callback is not None:
            callback(step, host.value(loss, "log"), host.value(acc, "log"))
        if config.val_every and (step % config.val_every == 0 or step == config.iterations):
            with average.swapped_in(learner):
                score = evaluate(learner, val[0], val[1], adapt_kwargs=val_kwargs, progress=False).accuracy
                history.val.append((step, score))
                if score > history.best_val:
                    history.best_val, history.best_step = score, step
                    best = BestLearner(learner)
            if config.converged(history.val):
                break
        if progress and (step % 25 == 0 or step == config.iterations):  # one synchronisation per 25 steps
            bar.set_postfix(loss=f"{host.value(loss, 'log'):.3f}", acc=f"{host.value(acc, 'log'):.3f}")
    if best is not None:
        learner.load_state_dict(best.state)
    elif config.average:  # no selection: the final average
        learner.load_state_dict(average.state)
    learner.train()
    if history.loss:
        curves = host.values(torch.stack([torch.stack(history.loss), torch.stack(history.acc)]), "log")
        history.loss, history.acc = curves[0].tolist(), curves[1].tolist()
    return history
