"""Episode inversion (EI): one bank update per meta-iteration from a few sampled teachers.

For each sampled teacher ``T`` with bank images ``X`` of its classes and local labels ``y``:

    L_EI(T) = CE(T(aug(X)), y) + a_bn * R_bn + a_tv * R_tv + a_l2 * R_l2

and the step minimises ``mean_T L_EI(T) + extra(bank)`` (teachers weighted equally;
the release's cumulative sum gave teacher ``i`` weight ``n - i`` by mistake).
``extra`` is the curriculum's hook: :meth:`purer.inversion.GradientSwitch.adversarial_loss`
adds ``-lambda_adv * L_outer`` there.

How a step runs (the same numbers whichever way, up to float rounding):

* every sampled teacher's images are augmented by **one** warp
  (:class:`~purer.inversion.augment.RandomAffineAugment`), with draws seeded per
  ``(seed, step, teacher)``;
* teachers that share an architecture and input contract (a *group*) are prepared
  together and run either one after another (``loop``) or as **one batched network**
  (``vmap``: their weights stacked with ``torch.func.stack_module_state`` and the
  forward pass vmapped over ``functional_call``, each teacher with its own BatchNorm
  statistics in R_bn).  ``auto`` takes ``vmap`` on a GPU, where it saves a kernel
  launch per layer and teacher, and ``loop`` on a CPU, where batched (grouped)
  convolutions measured 1.4-2.7x slower than one convolution per teacher
  (``benchmarks/results/speed.md``);
* on a CPU the teachers run in the channels-last layout, which oneDNN's
  convolutions take about 1.7x faster here.

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

import contextlib
import copy
import json
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch.func import functional_call, stack_module_state, vmap
from torch.nn.modules.batchnorm import _BatchNorm

from .. import PurerWarning
from ..host import to_device
from ..zoo.teacher import Teacher, zoo_rule
from .augment import RandomAffineAugment
from .draws import TeacherSampler, augmentation_draws
from .bank import SPACES, PseudoBank
from .hooks import BNStatsHook, bn_distance, weighted_sum
from .priors import l2_prior, total_variation

ExtraLoss = Callable[[PseudoBank], torch.Tensor]
# {term: {class: grad}} of this process -> those of every process (see EpisodeInversion.step).
GradSync = Callable[[dict[int, dict[int, torch.Tensor]]], dict[int, dict[int, torch.Tensor]]]
TEACHER_BATCHING = ("auto", "loop", "vmap")
SYNTHESIZERS = ("pixels", "generator")
STATS = ("ce", "r_bn", "r_tv", "r_l2", "acc")


@dataclass
class TeacherGroup:
    """One group of same-contract teachers' inputs in an inversion step (see :meth:`EpisodeInversion.teacher_inputs`).

    Attributes:
        key: the group's contract (:func:`contract`).
        members: the group's teachers in this step, in zoo order.
        images: ``[T, B, C, S, S]`` their bank images in pixel units (differentiable in the bank).
        labels: ``[T, B]`` the images' local labels.
        augmented_inputs: ``[T, B, C', H', W']`` the augmented images as each teacher takes them in.
        inputs: ``[T, B, C', H', W']`` the images themselves as each teacher takes them in (the priors' space).
    """

    key: tuple
    members: list[int]
    images: torch.Tensor
    labels: torch.Tensor
    augmented_inputs: torch.Tensor
    inputs: torch.Tensor


@dataclass
class GeneratorConfig:
    """Settings of the generator synthesizer (``inversion.synthesizer: generator``).

    Attributes:
        steps: adaptation steps of the generator to a teacher per inversion step (FREE: 5).  1 here: FREE's 5
            cost about 9 times a pixel-bank iteration on one CPU thread (at width 32), and one step is what the
            colour rule (``InversionConfig.synthesizer_colour``) was chosen with on meta-val.
        lr: Adam learning rate of the adaptation and of the meta-update (FREE: 1e-3).
        width: channels of the generator's last hidden layer (the first has twice as many).  64, chosen on
            meta-val across zoos (``benchmarks/results/selection_cross_zoo.md``): on the icon zoo width 64 was
            above width 32 (paired, 300 tasks, at 1 / 5 shots: +1.08 +- 0.78 / +1.43 +- 0.81 on seed 0,
            +0.40 / +0.33 on seed 1, +0.13 / -0.93 on seed 2), and width 8 below it; it costs about 2.5 times
            width 32's inversion time on one CPU thread (1.1 against 0.44 s per iteration).
        noise_dim: size of the noise vector ``z``.
        embed_dim: size of a bank class's learnt embedding (the generator's condition).
    """

    steps: int = 1
    lr: float = 1e-3
    width: int = 64
    noise_dim: int = 64
    embed_dim: int = 64

    def __post_init__(self):
        if self.steps < 1 or self.lr <= 0:
            raise ValueError(f"generator needs steps >= 1 and lr > 0, got {self.steps} and {self.lr}")
        if min(self.width, self.noise_dim, self.embed_dim) < 1:
            raise ValueError("generator width, noise_dim and embed_dim must be >= 1")


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
        a_tv_colour: R_tv's weight for a teacher of colour (3-channel) input; ``None``: ``a_tv`` for
            every teacher, as the release.  Not in the release: 1e-3, chosen on meta-val across zoos
            (``benchmarks/results/selection_cross_zoo.md``).  On the colour icon zoo the release's
            1e-4 leaves the bank saturated colour noise; 1e-3 gives smooth shapes, and meta-val rose
            by 1.26 +- 0.70 points at 1-shot and 1.11 +- 0.83 at 5-shot (paired, 300 tasks).  Other
            (grey) teachers keep ``a_tv``: on the glyph zoo 1e-3 did not help meta-val and erased thin
            strokes (3.5 points lower on the one seed meta-tested).
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
        teacher_batching: how a group of same-architecture teachers runs: ``loop``,
            ``vmap`` (one batched network) or ``auto`` (``vmap`` on a GPU, ``loop`` on
            a CPU; see the module docstring).
        first_bn_weight: multiplier of R_bn's first BatchNorm layer (DeepInversion's
            first-BN multiplier, 10 there: the first layer's statistics are the image's own);
            1 is the release's plain sum.
        bn_layers: ``sum`` R_bn's per-layer terms (the release) or take their ``mean``, so
            that in a mixed zoo a ResNet-18's ~20 BN layers do not outweigh a Conv4's 4.
        a_div: weight of the within-class diversity term
            (:func:`within_class_similarity`); 0 in the release.
        steps_per_iteration: bank updates per meta-iteration (the ECI loop runs them;
            an adversarial term joins the last); 1 in the release.
        synthesizer: what makes the bank's images: ``pixels`` (each image optimised on its own, the
            release's; :class:`EpisodeInversion`) or ``generator`` (a meta-learnt conditional generator
            adapted to each teacher in a few steps, FREE's idea; :class:`~purer.inversion.generator.GeneratorInversion`).
        synthesizer_colour: the synthesizer of a zoo whose teachers all take colour (3-channel) input; ``None``:
            ``synthesizer`` for every zoo, as the release.  Not in the release: ``generator``, chosen on meta-val
            across zoos (``benchmarks/results/selection_cross_zoo.md``).  On the colour icon zoo the pixel bank
            is saturated colour noise even at the colour R_tv weight; the generator's images are smooth colour
            shapes, and meta-val rose on every training seed (300 tasks per shot; README "Results").  Grey
            zoos of one architecture, and zoos mixing grey and colour teachers of one architecture (one
            synthesizer serves the whole zoo), keep ``synthesizer``: on the glyph zoo the generator was behind
            the pixels on meta-val.
        synthesizer_heterogeneous: the synthesizer of a zoo whose teachers are of several architectures (more
            than one ``arch``; the colour rule first); ``None``: ``synthesizer``, as the release.  Not in the
            release: ``generator``, chosen on the SH zoo's meta-val (Conv4, ResNet-10 and ResNet-18 teachers;
            ``benchmarks/results/selection_glyphs_zoo-sh.md``): over 3 training seeds +1.06 at 1-shot and -0.15
            at 5-shot against the pixel bank (ahead on two seeds, behind on one; README "Results"), at
            two to three times its training time on a CPU.
        generator: the generator's settings (:class:`GeneratorConfig`; used wherever the generator synthesizes).
    """

    teachers_per_step: int = 4
    lr: float = 0.25
    betas: tuple[float, float] = (0.9, 0.999)
    a_bn: float = 0.01
    a_tv: float = 1e-4
    a_tv_colour: float | None = 1e-3
    a_l2: float = 1e-5
    augment: bool = True
    jitter: int = 2
    crop_scale: tuple[float, float] = (0.8, 1.0)
    flip: bool = False
    seed: int = 0
    space: str = "pixel"
    teacher_batching: str = "auto"
    first_bn_weight: float = 1.0
    bn_layers: str = "sum"
    a_div: float = 0.0
    steps_per_iteration: int = 1
    synthesizer: str = "pixels"
    synthesizer_colour: str | None = "generator"
    synthesizer_heterogeneous: str | None = "generator"
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)

    def __post_init__(self):
        if self.teachers_per_step < 1:
            raise ValueError(f"teachers_per_step must be >= 1, got {self.teachers_per_step}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if min(self.a_bn, self.a_tv, self.a_l2, self.tv_weight(3)) < 0:
            raise ValueError("a_bn, a_tv, a_tv_colour and a_l2 must be >= 0")
        if self.jitter < 0:
            raise ValueError(f"jitter must be >= 0 pixels, got {self.jitter}")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        if self.space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {self.space!r}")
        if self.first_bn_weight < 0 or self.a_div < 0 or self.steps_per_iteration < 1:
            raise ValueError(f"need first_bn_weight >= 0, a_div >= 0 and steps_per_iteration >= 1, got "
                             f"{self.first_bn_weight}, {self.a_div} and {self.steps_per_iteration}")
        if self.bn_layers not in ("sum", "mean"):
            raise ValueError(f"bn_layers must be 'sum' or 'mean', got {self.bn_layers!r}")
        if self.synthesizer not in SYNTHESIZERS:
            raise ValueError(f"synthesizer must be one of {SYNTHESIZERS}, got {self.synthesizer!r}")
        if self.synthesizer_colour not in (None, *SYNTHESIZERS):
            raise ValueError(f"synthesizer_colour must be one of {SYNTHESIZERS} or null, got {self.synthesizer_colour!r}")
        if self.synthesizer_heterogeneous not in (None, *SYNTHESIZERS):
            raise ValueError(f"synthesizer_heterogeneous must be one of {SYNTHESIZERS} or null, got "
                             f"{self.synthesizer_heterogeneous!r}")
        if self.teacher_batching not in TEACHER_BATCHING:
            raise ValueError(f"teacher_batching must be one of {TEACHER_BATCHING}, got {self.teacher_batching!r}")

    def synthesizer_key(self, models: Iterable) -> str:
        """The setting that decides the synthesizer of a zoo of teachers ``models`` (their configs,
        :class:`~purer.zoo.ModelConfig`: ``in_channels`` and ``arch``): ``synthesizer_colour`` if every one
        takes colour input (and it is set), else ``synthesizer_heterogeneous`` if they are of more than one
        architecture (and it is set), else ``synthesizer`` (:func:`~purer.zoo.teacher.zoo_rule`)."""
        return zoo_rule(self, "synthesizer", models)

    def synthesizer_for(self, models: Iterable) -> str:
        """The synthesizer of a zoo of teachers ``models`` (:meth:`synthesizer_key`)."""
        return getattr(self, self.synthesizer_key(models))

    def tv_weight(self, in_channels: int) -> float:
        """R_tv's weight for a teacher taking ``in_channels`` channels: ``a_tv_colour`` for colour (if set), else ``a_tv``."""
        return self.a_tv_colour if in_channels == 3 and self.a_tv_colour is not None else self.a_tv


def build_augmentation(config: InversionConfig, image_size: int) -> RandomAffineAugment:
    """The augmentation of ``config`` for ``image_size`` bank images (the identity warp if ``augment`` is off)."""
    if not config.augment:
        return RandomAffineAugment(0, (1.0, 1.0), False, image_size)
    return RandomAffineAugment(config.jitter, config.crop_scale, config.flip, image_size)


def within_class_similarity(features: torch.Tensor, per_class: int) -> torch.Tensor:
    """Mean cosine similarity between the teacher features of different images of one class: ``[T, n*P, D]``
    (class-major, ``P = per_class``) -> ``[T]`` (0 with one image per class).

    Minimised (``a_div``), it pushes a class's pseudo images apart in the teacher's
    feature space, so the bank does not collapse to near-copies (the diversity that
    CMI's contrastive term buys, without its memory bank or second view).
    """
    if per_class < 2:
        return features.new_zeros(features.shape[0])
    z = F.normalize(rearrange(features, "t (n p) d -> t n p d", p=per_class), dim=-1)
    sim = torch.einsum("tnpd,tnqd->tnpq", z, z)
    off_diagonal = sim.sum((-1, -2)) - sim.diagonal(dim1=-2, dim2=-1).sum(-1)
    return (off_diagonal / (per_class * (per_class - 1))).mean(-1)


def contract(teacher: Teacher) -> tuple:
    """What teachers must share to run as one batched network: architecture, input shape and classes.

    (Their normalisations may differ: each is applied to its own teacher's slice.)
    """
    c = teacher.config
    return c.arch, json.dumps(c.arch_args, sort_keys=True), c.in_channels, c.image_size, c.num_classes


class StackedTeachers:
    """Same-contract teachers as one batched network: ``[T, B, C, H, W]`` -> logits ``[T, B, n]``, R_bn ``[T]``
    and penultimate features ``[T, B, D]``.

    The weights of all ``teachers`` are stacked once; a forward pass takes any
    subset (``members``) and vmaps ``functional_call`` over them, each teacher with
    its own BatchNorm running statistics as R_bn's targets.
    """

    def __init__(self, teachers: Sequence[Teacher]):
        params, buffers = stack_module_state([t.model for t in teachers])
        self.params = {k: v.detach() for k, v in params.items()}
        self.buffers = buffers
        self.template = copy.deepcopy(teachers[0].model).eval()
        self.bn = [m for m in self.template.modules() if isinstance(m, _BatchNorm)]

    def __call__(self, members: Sequence[int], x: torch.Tensor, first_bn_weight: float = 1.0, bn_mean: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sel = to_device(torch.as_tensor(list(members)), x.device)
        params = {k: v.index_select(0, sel) for k, v in self.params.items()}
        buffers = {k: v.index_select(0, sel) for k, v in self.buffers.items()}
        return vmap(lambda p, b, z: self._one(p, b, z, first_bn_weight, bn_mean))(params, buffers, x)

    def bare(self, members: Sequence[int], x: torch.Tensor) -> torch.Tensor:
        """The networks alone (no R_bn hooks): ``[T, B, C, H, W]`` -> logits ``[T, B, n]``."""
        sel = to_device(torch.as_tensor(list(members)), x.device)
        params = {k: v.index_select(0, sel) for k, v in self.params.items()}
        buffers = {k: v.index_select(0, sel) for k, v in self.buffers.items()}
        return vmap(lambda p, b, z: functional_call(self.template, (p, b), (z,)))(params, buffers, x)

    def _one(self, params: dict, buffers: dict, x: torch.Tensor, first_bn_weight: float, bn_mean: bool
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        terms: list[torch.Tensor] = []
        features: list[torch.Tensor] = []
        record = lambda m, inputs: terms.append(bn_distance(inputs[0], m.running_mean, m.running_var))
        handles = [m.register_forward_pre_hook(record) for m in self.bn]
        handles.append(self.template.head.register_forward_pre_hook(lambda m, inputs: features.append(inputs[0])))
        try:
            logits = functional_call(self.template, (params, buffers), (x,))
        finally:
            for h in handles:
                h.remove()
        return logits, weighted_sum(terms, first_bn_weight, bn_mean) if terms else x.new_zeros(()), features[0]


class EpisodeInversion:
    """Updates a :class:`PseudoBank` so that the zoo's teachers recognise its images.

    Args:
        teachers: the zoo, kept in memory on the bank's device, in the order the bank
            was built from.
        bank: the pseudo-image bank built from the same teachers (on its device).
        config: see :class:`InversionConfig`.
        autocast: a lower precision (``torch.bfloat16``) for the
            teachers' forward passes (mixed precision); R_bn's statistics, the bank and
            its optimizer stay in float32.

    Example:
        >>> bank = PseudoBank(teachers, images_per_class=16)               # doctest: +SKIP
        >>> inversion = EpisodeInversion(teachers, bank, InversionConfig())  # doctest: +SKIP
        >>> stats = inversion.step()   # {"loss": ..., "ce": ..., "r_bn": ..., "acc": ...}  # doctest: +SKIP
    """

    def __init__(self, teachers: Sequence[Teacher], bank: PseudoBank, config: InversionConfig | None = None,
                 autocast: torch.dtype | None = None):
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
        self.device = bank.logits[0].device
        self.autocast = autocast
        self.augment = build_augmentation(self.config, bank.image_size)
        self.optimizer = torch.optim.Adam(bank.parameters(), lr=self.config.lr, betas=self.config.betas)
        self.sampler = TeacherSampler(len(self.teachers), self.config.teachers_per_step, self.config.seed)
        self.steps = 0
        batching = self.config.teacher_batching
        self.batched = batching == "vmap" or (batching == "auto" and self.device.type == "cuda")
        self.channels_last = self.device.type == "cpu" and not self.batched
        self.groups: dict[tuple, list[int]] = {}
        for i, t in enumerate(self.teachers):
            self.groups.setdefault(contract(t), []).append(i)
        self._stacked: dict[tuple, StackedTeachers] = {}
        if self.channels_last:
            for t in self.teachers:
                t.model.to(memory_format=torch.channels_last)

    def sample_teachers(self) -> list[int]:
        """Indices of this step's teachers: ``min(teachers_per_step, zoo size)``, sorted."""
        return self.sampler.sample()

    def augmentation(self, idx: Sequence[int]) -> torch.Tensor:
        """This step's affine matrices for teachers ``idx`` ``[sum of their images, 2, 3]`` on the bank's device.

        They depend on (seed, step, teacher) only (:func:`~purer.inversion.draws.augmentation_draws`), so a
        step gives the same result whichever process (or device) computes which teacher, and a resumed run
        repeats it."""
        counts = [len(self.bank.teacher_classes[i]) * self.bank.images_per_class for i in idx]
        return augmentation_draws(self.augment, (self.config.seed,), self.steps, idx, counts, self.device)

    def _precision(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def stacked(self, key: tuple) -> StackedTeachers:
        """The batched network of the group ``key`` (all its teachers' weights stacked; built once)."""
        if key not in self._stacked:
            self._stacked[key] = StackedTeachers([self.teachers[i] for i in self.groups[key]])
        return self._stacked[key]

    def _forward(self, key: tuple, members: list[int], z: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teachers ``members`` (of group ``key``) on their inputs ``z [T, B, C, H, W]`` -> logits ``[T, B, n]``,
        R_bn ``[T]`` and penultimate features ``[T, B, D]``."""
        first, mean = self.config.first_bn_weight, self.config.bn_layers == "mean"
        with self._precision():
            if self.batched:
                local = [self.groups[key].index(i) for i in members]
                logits, r_bn, features = self.stacked(key)(local, z, first, mean)
            else:
                outs, bns, feats = [], [], []
                for i, x in zip(members, z):
                    if self.channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    model = self.teachers[i].model
                    with BNStatsHook(model) as bn:
                        feats.append(model.features(x))
                        outs.append(model.head(feats[-1]))
                    bns.append(bn.loss(first, mean))
                logits, r_bn, features = torch.stack(outs), torch.stack(bns), torch.stack(feats)
        return logits.float(), r_bn.float(), features.float()

    def bare_forward(self, key: tuple, members: list[int], z: torch.Tensor) -> torch.Tensor:
        """The networks of teachers ``members`` (of group ``key``) alone on ``z [T, B, C, H, W]`` -> logits
        ``[T, B, n]``, in the form a step runs them (batched, or one by one channels-last on a CPU) but
        without R_bn's hooks, the priors or the loss: the floor a step's cost is compared with
        (``benchmarks/speed.py``)."""
        with self._precision():
            if self.batched:
                return self.stacked(key).bare([self.groups[key].index(i) for i in members], z)
            return torch.stack([self.teachers[i].model(x.contiguous(memory_format=torch.channels_last)
                                                       if self.channels_last else x) for i, x in zip(members, z)])

    def teacher_inputs(self, idx: Sequence[int], thetas: torch.Tensor | None = None,
                       batches: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None) -> list[TeacherGroup]:
        """The inputs of teachers ``idx`` as a step feeds them, per group of same-contract teachers.

        Args:
            idx: the step's teachers.
            thetas: their affine matrices (default :meth:`augmentation` of ``idx``), in ``idx`` order.
            batches: each teacher's images and local labels, as :meth:`PseudoBank.teacher_batch` gives them
                (default: the bank's; a generator passes what it renders).

        Per group: one augmentation call over the group's bank images (a group shares one
        input shape) and one prepare (each teacher's channels, size and normalisation).
        """
        bank = self.bank
        thetas = self.augmentation(idx) if thetas is None else thetas
        blocks = dict(zip(idx, thetas.split([len(bank.teacher_classes[i]) * bank.images_per_class for i in idx])))
        batches = {i: bank.teacher_batch(i) for i in idx} if batches is None else batches
        groups = []
        for key, group in self.groups.items():
            members = [i for i in group if i in batches]
            if not members:
                continue
            x = torch.stack([batches[i][0] for i in members])
            theta = torch.cat([blocks[i] for i in members])
            augmented = self.augment(rearrange(x, "t b c h w -> (t b) c h w"), theta).view_as(x)
            groups.append(TeacherGroup(key, members, x, torch.stack([batches[i][1] for i in members]),
                                       self._prepare(members, augmented), self._prepare(members, x)))
        return groups

    def teacher_losses(self, idx: Sequence[int], thetas: torch.Tensor | None = None,
                       batches: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L_EI of each teacher in ``idx`` on its classes' bank images: ``[len(idx)]``, and the parts ``[len(idx)]``.

        Per group of same-contract teachers (:meth:`teacher_inputs`): one augmentation call, one
        prepare and one (batched or looped) forward pass.  ``thetas``, ``batches``: see :meth:`teacher_inputs`.
        """
        c, bank = self.config, self.bank
        if not idx:
            empty = torch.zeros(0, device=self.device)
            return empty, {k: empty for k in STATS}
        position = {i: p for p, i in enumerate(idx)}
        loss, parts = [None] * len(idx), {k: [None] * len(idx) for k in STATS}
        for g in self.teacher_inputs(idx, thetas, batches):
            logits, r_bn, features = self._forward(g.key, g.members, g.augmented_inputs)
            y = g.labels
            ce = F.cross_entropy(rearrange(logits, "t b n -> (t b) n"), y.flatten(), reduction="none")
            ce = ce.view(len(g.members), -1).mean(1)
            # Priors act on what the teacher takes in (its size and normalisation), the
            # space the release's coefficients were set in.
            r_tv, r_l2 = total_variation(g.inputs), l2_prior(g.inputs)
            acc = (logits.argmax(-1) == y).float().mean(1)
            total = ce + c.a_bn * r_bn + c.tv_weight(g.inputs.shape[2]) * r_tv + c.a_l2 * r_l2
            if c.a_div > 0:
                total = total + c.a_div * within_class_similarity(features, bank.images_per_class)
            for j, i in enumerate(g.members):
                p = position[i]
                loss[p] = total[j]
                for k, v in zip(STATS, (ce, r_bn, r_tv, r_l2, acc)):
                    parts[k][p] = v[j].detach()
        return torch.stack(loss), {k: torch.stack(v) for k, v in parts.items()}

    def _prepare(self, members: list[int], x: torch.Tensor) -> torch.Tensor:
        """Images ``[T, B, C, S, S]`` in ``[0, 1]`` -> each teacher's input (its channels, size, normalisation)."""
        t = self.teachers[members[0]]
        flat = t.prepare_shape(rearrange(x, "t b c h w -> (t b) c h w"))
        z = rearrange(flat, "(t b) c h w -> t b c h w", t=len(members))
        mean = torch.stack([self.teachers[i].mean.expand(z.shape[2]) for i in members])
        std = torch.stack([self.teachers[i].std.expand(z.shape[2]) for i in members])
        return (z - mean[:, None, :, None, None]) / std[:, None, :, None, None]

    def term_classes(self, idx: Sequence[int]) -> dict[int, list[int]]:
        """The gradient terms a :meth:`step` over teachers ``idx`` makes (see there), each with the bank classes
        its gradient covers: what a multi-process step exchanges."""
        if not idx:
            return {}
        if self.batched:
            return {idx[0]: sorted({k for i in idx for k in self.bank.teacher_classes[i]})}
        return {i: sorted(set(self.bank.teacher_classes[i])) for i in idx}

    def teacher_loss(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L_EI of teacher ``i`` on its classes' bank images, and its parts (0-dim tensors)."""
        loss, parts = self.teacher_losses([i])
        return loss[0], {k: v[0] for k, v in parts.items()}

    def step(self, extra_loss: ExtraLoss | None = None, teachers: Sequence[int] | None = None,
             total: int | None = None, sync: GradSync | None = None) -> dict[str, torch.Tensor]:
        """One optimizer step on the bank.

        The bank gradient is built from *terms*: each teacher's ``L_EI / total`` (in the
        ``loop`` mode; with teachers vmapped together, this process's teachers make one
        term, keyed by the first of them) and the extra loss (term ``len(teachers)``).
        Each class sums its terms in term order whichever process computed them, so a
        step split over processes is bit-for-bit the one-process step in the ``loop``
        mode (float addition is not associative, and Adam turns rounding noise into
        steps); vmapped teachers agree up to float rounding.

        Args:
            extra_loss: optional ``f(bank) -> 0-dim tensor`` added to the loss (the
                curriculum's ``-lambda_adv * L_outer``).  Only bank classes it reads
                are updated for it; other parameters it involves (e.g. a meta-learner's)
                receive no gradient.
            teachers: the teachers to use (default: :meth:`sample_teachers`).
            total: how many teachers the whole step has when ``teachers`` is one
                process's share of them (default ``len(teachers)``); the loss is
                ``sum(L_EI) / total``, so the shares' gradients add up to the mean.
            sync: gathers the gradient terms ``{term: {class: grad}}`` of every process;
                ``None`` in one process.

        Returns:
            The step's numbers as detached 0-dim tensors on the bank's device (read them
            with ``float()`` when logging, so a GPU is not synchronised every step):
            ``loss`` (total), mean over this process's teachers of ``ce``, ``r_bn``,
            ``r_tv``, ``r_l2`` and teacher accuracy ``acc`` on the augmented images, and
            ``extra`` when ``extra_loss`` was given.
        """
        idx = list(teachers) if teachers is not None else self.sample_teachers()
        total = len(idx) if total is None else total
        if total < 1 or total < len(idx):
            raise ValueError(f"an inversion step needs at least one teacher (total={total}, here {len(idx)})")
        self.bank.pop_touched()  # reads since the last step (e.g. meta-training episodes) are not this loss's
        terms: dict[int, dict[int, torch.Tensor]] = {}
        thetas = self.augmentation(idx)  # drawn on the CPU, one copy to the device
        if self.batched:
            losses, parts = self.teacher_losses(idx, thetas)
            if idx:
                terms[idx[0]] = self._class_grads(losses.sum() / total)
        else:
            per_teacher = []
            blocks = thetas.split([len(self.bank.teacher_classes[i]) * self.bank.images_per_class for i in idx])
            for i, theta in zip(idx, blocks):  # separate graphs: each teacher's gradient is its own term
                loss_i, parts_i = self.teacher_losses([i], theta)
                terms[i] = self._class_grads(loss_i[0] / total)
                per_teacher.append((loss_i.detach(), parts_i))
            losses = torch.cat([lo for lo, _ in per_teacher]) if idx else torch.zeros(0, device=self.device)
            parts = {k: torch.cat([pa[k] for _, pa in per_teacher]) if idx else losses for k in STATS}
        loss = losses.detach().sum() / total
        # A process whose share holds no teacher still reports every key (NaN), so logs keep one schema.
        stats = {k: v.mean() if len(idx) else torch.full((), float("nan"), device=self.device)
                 for k, v in parts.items()}
        if extra_loss is not None:
            extra = extra_loss(self.bank)
            if not (isinstance(extra, torch.Tensor) and extra.ndim == 0):
                raise ValueError(f"extra_loss must return a 0-dim tensor, got {type(extra).__name__} "
                                 f"{tuple(getattr(extra, 'shape', ()))}")
            terms[len(self.teachers)] = self._class_grads(extra)
            loss = loss + extra.detach()
            stats["extra"] = extra.detach()
        stats["loss"] = loss
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
        return {"optimizer": self.optimizer.state_dict(), "sampler": self.sampler.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.load_state_dict(state["sampler"])
        self.steps = int(state["steps"])
