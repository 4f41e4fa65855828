"""Episode inversion (EI): one bank update per meta-iteration from a few sampled teachers.

For each sampled teacher ``T`` with bank images ``X`` of its classes and local labels ``y``:

    L_EI(T) = CE(T(aug(X)), y) + a_bn * R_bn + a_tv * R_tv + a_l2 * R_l2

and the step minimises ``mean_T L_EI(T) + extra(bank)`` (teachers weighted equally;
the release's cumulative sum gave teacher ``i`` weight ``n - i`` by mistake).
``extra`` is the curriculum's hook: :meth:`purer.inversion.GradientSwitch.adversarial_loss`
adds ``-lambda_adv * L_outer`` there.

Cost per step: only the sampled teachers run, and only the bank classes the loss
reads get a gradient, an Adam update and Adam moments.  Each bank class is its own
parameter with its own Adam step count, so the optimizer is a row-wise *lazy* Adam:
a class nobody touched stays exactly where it is (a dense Adam would keep moving
it with stale momentum and pay for the whole bank every step), and the bias
correction of a class first touched late starts from its own first step.

Learning rate: the release uses Adam lr 0.25 on normalised pixels (std about 0.25
of the pixel range), i.e. about 0.06 of the range per step at most.  In the bank's
default ``pixel`` space the same lr acts on sigmoid logits; the sigmoid's slope is
at most 1/4, so a step moves a pixel by at most about 0.06 of the range as well,
and 0.25 is kept.  In ``normalized`` space it acts on normalised pixels as in the
release (a step moves a pixel by at most ``0.25 * std`` of the range).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import kornia.augmentation as KA
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import PurerWarning
from ..zoo.teacher import Teacher
from .bank import SPACES, PseudoBank
from .hooks import BNStatsHook
from .priors import l2_prior, total_variation

ExtraLoss = Callable[[PseudoBank], torch.Tensor]
# {term: {class: grad}} of this process -> those of every process (see EpisodeInversion.step).
GradSync = Callable[[dict[int, dict[int, torch.Tensor]]], dict[int, dict[int, torch.Tensor]]]


@dataclass
class InversionConfig:
    """Settings of :class:`EpisodeInversion`; defaults are the release's (METHOD.md part 1) but the crop.

    Attributes:
        teachers_per_step: teachers sampled (uniformly, without replacement) per step.
            4 matches the meta-batch of 4 tasks: about as many teachers as one
            meta-batch's classes come from, it keeps a step's cost fixed whatever the
            zoo size (the release runs all teachers every step), and a 13-teacher zoo
            still has each teacher visited every 3-4 steps.
        lr: Adam learning rate on the bank's raw tensors (see the module docstring).
        betas: Adam betas (PyTorch's defaults).
        a_bn, a_tv, a_l2: weights of R_bn, R_tv and R_l2.
        augment: differentiable augmentation of the images a teacher classifies.
        jitter: random shift, in bank pixels (the release rolls by +-2 px).
        crop_scale: area range of a random square crop, resized back to the bank size
            (0.8-1.0: at most a 12% zoom, within the +-10% scale of pre-training);
            ``(1.0, 1.0)`` turns it off.  Not in the release: an improvement to measure.
        flip: random horizontal flips.  Off by default: the release does not flip, and
            a flip asks a teacher for a mirror invariance it was never trained for
            (purer's pre-training shifts, rotates and scales, never flips); on glyph
            teachers flips turned every class's pseudo images left-right symmetric
            (a 'J' or 'L' no longer recognisable), while without them they read as letters.
        seed: seed of the teacher sampling and of the augmentations (drawn per
            ``(seed, step, teacher)``, so a step is reproducible and independent of
            which process runs which teacher).
        space: how the bank parameterises its images (``PseudoBank(space=...)``):
            ``pixel`` (sigmoid logits, images stay in ``[0, 1]``; ours) or
            ``normalized`` (unbounded values in the teachers' normalised space, the
            release's).  :class:`EpisodeInversion` checks that its bank matches.
    """

    teachers_per_step: int = 4
    lr: float = 0.25
    betas: tuple[float, float] = (0.9, 0.999)
    a_bn: float = 0.01
    a_tv: float = 1e-4
    a_l2: float = 1e-5
    augment: bool = True
    jitter: int = 2
    crop_scale: tuple[float, float] = (0.8, 1.0)
    flip: bool = False
    seed: int = 0
    space: str = "pixel"

    def __post_init__(self):
        if self.teachers_per_step < 1:
            raise ValueError(f"teachers_per_step must be >= 1, got {self.teachers_per_step}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if min(self.a_bn, self.a_tv, self.a_l2) < 0:
            raise ValueError("a_bn, a_tv and a_l2 must be >= 0")
        if self.jitter < 0:
            raise ValueError(f"jitter must be >= 0 pixels, got {self.jitter}")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        if self.space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {self.space!r}")


def build_augmentation(config: InversionConfig, image_size: int) -> nn.Module:
    """The differentiable augmentation ``[B, C, S, S] -> [B, C, S, S]`` of ``config`` (identity if off)."""
    if not config.augment:
        return nn.Identity()
    ops: list[nn.Module] = []
    if config.jitter:
        shift = config.jitter / image_size
        ops.append(KA.RandomAffine(degrees=0.0, translate=(shift, shift), padding_mode="border", p=1.0))
    if config.crop_scale != (1.0, 1.0):
        ops.append(KA.RandomResizedCrop((image_size, image_size), scale=config.crop_scale, ratio=(1.0, 1.0),
                                        cropping_mode="resample", p=1.0))
    if config.flip:
        ops.append(KA.RandomHorizontalFlip(p=0.5))
    return nn.Sequential(*ops)


class EpisodeInversion:
    """Updates a :class:`PseudoBank` so that the zoo's teachers recognise its images.

    Args:
        teachers: the zoo, kept in memory, in the order the bank was built from.
        bank: the pseudo-image bank built from the same teachers.
        config: see :class:`InversionConfig`.

    Example:
        >>> bank = PseudoBank(teachers, images_per_class=16)               # doctest: +SKIP
        >>> inversion = EpisodeInversion(teachers, bank, InversionConfig())  # doctest: +SKIP
        >>> stats = inversion.step()   # {"loss": ..., "ce": ..., "r_bn": ..., "acc": ...}  # doctest: +SKIP
    """

    def __init__(self, teachers: Sequence[Teacher], bank: PseudoBank, config: InversionConfig | None = None):
        self.teachers = list(teachers)
        if len(self.teachers) != len(bank.teacher_classes):
            raise ValueError(f"the bank was built from {len(bank.teacher_classes)} teachers, got "
                             f"{len(self.teachers)}; pass the same teachers, in the same order")
        for i, (t, mine) in enumerate(zip(self.teachers, bank.teacher_classes)):
            if t.config.num_classes != len(mine):
                raise ValueError(f"teacher {i} has {t.config.num_classes} classes but the bank has {len(mine)} "
                                 "for it; build the bank from these teachers")
        self.bank = bank
        self.config = config or InversionConfig()
        if bank.space != self.config.space:
            raise ValueError(f"the bank is in {bank.space!r} space but the config says {self.config.space!r}; "
                             f"build the bank with PseudoBank(..., space={self.config.space!r})")
        no_bn = [t.model_id or f"teacher {i}" for i, t in enumerate(self.teachers)
                 if not any(isinstance(m, _BatchNorm) for m in t.model.modules())]
        if no_bn and self.config.a_bn > 0:
            warnings.warn(f"{len(no_bn)} of {len(self.teachers)} teachers have no BatchNorm layer "
                          f"({', '.join(no_bn[:3])}{', ...' if len(no_bn) > 3 else ''}), so R_bn cannot shape "
                          "their pseudo images: only the cross-entropy and the priors do", PurerWarning, stacklevel=2)
        self.augment = build_augmentation(self.config, bank.image_size)
        self.optimizer = torch.optim.Adam(bank.parameters(), lr=self.config.lr, betas=self.config.betas)
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.steps = 0

    def sample_teachers(self) -> list[int]:
        """Indices of this step's teachers: ``min(teachers_per_step, zoo size)``, sorted."""
        n = len(self.teachers)
        k = min(self.config.teachers_per_step, n)
        return sorted(torch.randperm(n, generator=self.generator)[:k].tolist())

    def teacher_loss(self, i: int) -> tuple[torch.Tensor, dict[str, float]]:
        """L_EI of teacher ``i`` on its classes' bank images, and its parts (floats)."""
        c = self.config
        teacher = self.teachers[i]
        x, y = self.bank.teacher_batch(i)
        # Augmentation draws depend on (seed, step, teacher) only, so a step gives the same
        # result whichever process computes which teacher, and a resumed run repeats it.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(np.random.SeedSequence([self.config.seed, self.steps, i]).generate_state(1)[0]))
            seen_aug = self.augment(x)
        with BNStatsHook(teacher.model) as bn:
            logits = teacher(seen_aug)
        ce = F.cross_entropy(logits, y)
        r_bn = bn.loss()
        # Priors act on what the teacher takes in (its size and normalisation), the
        # space the release's coefficients were set in.
        seen = teacher.prepare(x)
        r_tv, r_l2 = total_variation(seen), l2_prior(seen)
        loss = ce + c.a_bn * r_bn + c.a_tv * r_tv + c.a_l2 * r_l2
        acc = (logits.argmax(-1) == y).float().mean()
        return loss, {"ce": ce.item(), "r_bn": r_bn.item(), "r_tv": r_tv.item(), "r_l2": r_l2.item(),
                      "acc": acc.item()}

    def step(self, extra_loss: ExtraLoss | None = None, teachers: Sequence[int] | None = None,
             total: int | None = None, sync: GradSync | None = None) -> dict[str, float]:
        """One optimizer step on the bank.

        Args:
            extra_loss: optional ``f(bank) -> 0-dim tensor`` added to the loss (the
                curriculum's ``-lambda_adv * L_outer``).  Only bank classes it reads
                are updated for it; other parameters it involves (e.g. a meta-learner's)
                receive no gradient.
            teachers: the teachers to use (default: :meth:`sample_teachers`).
            total: how many teachers the whole step has when ``teachers`` is one
                process's share of them (default ``len(teachers)``); the loss is
                ``sum(L_EI) / total``, so the shares' gradients add up to the mean.
            sync: gathers the gradient *terms* ``{term: {class: grad}}`` of every process
                (term ``i`` is teacher ``i``'s, term ``len(teachers)`` the extra loss's);
                ``None`` in one process.  Each class sums its terms in term order
                whichever process computed them, so a step split over processes is
                bit-for-bit the one-process step (float addition is not associative).

        Returns:
            The step's numbers (this process's teachers): ``loss`` (total), mean over
            teachers of ``ce``, ``r_bn``, ``r_tv``, ``r_l2`` and teacher accuracy ``acc``
            on the augmented images, and ``extra`` when ``extra_loss`` was given.
        """
        idx = list(teachers) if teachers is not None else self.sample_teachers()
        total = len(idx) if total is None else total
        if total < 1 or total < len(idx):
            raise ValueError(f"an inversion step needs at least one teacher (total={total}, here {len(idx)})")
        self.bank.pop_touched()  # reads since the last step (e.g. meta-training episodes) are not this loss's
        loss, parts, terms = torch.zeros(()), [], {}
        for i in idx:
            loss_i, parts_i = self.teacher_loss(i)
            terms[i] = self._class_grads(loss_i / total)
            loss = loss + loss_i.detach() / total
            parts.append(parts_i)
        # A process whose share holds no teacher still reports every key (NaN), so logs keep one schema.
        stats = {k: sum(p[k] for p in parts) / len(parts) if parts else math.nan
                 for k in ("ce", "r_bn", "r_tv", "r_l2", "acc")}
        if extra_loss is not None:
            extra = extra_loss(self.bank)
            if not (isinstance(extra, torch.Tensor) and extra.ndim == 0):
                raise ValueError(f"extra_loss must return a 0-dim tensor, got {type(extra).__name__} "
                                 f"{tuple(getattr(extra, 'shape', ()))}")
            terms[len(self.teachers)] = self._class_grads(extra)
            loss = loss + extra.detach()
            stats["extra"] = extra.item()
        stats["loss"] = loss.item()
        if sync is not None:
            terms = sync(terms)
        by_class: dict[int, torch.Tensor] = {}
        for t in sorted(terms):
            for k, g in terms[t].items():
                by_class[k] = g if k not in by_class else by_class[k] + g
        # A backward pass through bank episodes elsewhere (e.g. a meta-update on undetached
        # pseudo episodes) leaves .grad on bank classes; Adam would step them with it.
        self.optimizer.zero_grad(set_to_none=True)
        for k, g in by_class.items():
            self.bank.logits[k].grad = g
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return stats

    def _class_grads(self, loss: torch.Tensor) -> dict[int, torch.Tensor]:
        """``{class: d loss / d logits[class]}`` over the bank classes read since the last call."""
        touched = self.bank.pop_touched()
        grads = torch.autograd.grad(loss, [self.bank.logits[k] for k in touched], allow_unused=True) \
            if touched and loss.requires_grad else ()
        return {k: g for k, g in zip(touched, grads) if g is not None}

    def state_dict(self) -> dict:
        """Optimizer moments, teacher-sampling RNG and step count (the bank saves its own images)."""
        return {"optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
                "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.steps = int(state["steps"])
