"""Zoo distillation during ECI meta-training: the meta-learner's embedding learns the teachers' outputs on the
pseudo bank (above both the inversion and the meta-learners).  The ``meta.init: zoo-student`` pre-phase, which
distils the zoo into a fresh network *before* meta-training, is :mod:`purer.student`.

* :class:`ZooDistillation`: during ECI meta-training, beside the episodic loss on
  pseudo episodes, the meta-learner's features learn what the teachers know, on the
  bank's images and their augmented views: per-teacher linear heads on the
  learner's embedding fit each teacher's temperature-softened outputs (logit
  distillation) and per-teacher linear maps take the embedding onto each teacher's
  penultimate features (feature distillation), and its cosine similarities between
  images follow the mean of the teachers' (relational distillation), so one network
  of the learner's size carries what the concatenated zoo carries.  The heads and maps are
  training-only: the saved meta-learner stays one network.  This is what the
  successors of PURER (BiDf-MKD, FREE, TGR) add, done here as true divergences.
* :func:`distillation_loss` is a true KL divergence on log-probabilities (the
  successors' public code passes probabilities as ``F.kl_div``'s first argument,
  which is not one); :func:`teacher_agreement` measures how much of the zoo a
  student carries.

Example:
    >>> distill = ZooDistillation(teachers, feature_dim=128, config=DistillConfig(logit=1.0, feature=1.0))  # doctest: +SKIP
    >>> losses, stats = distill.losses(learner, bank, distill.sample_teachers(), step=0)          # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .inversion import PseudoBank
from .inversion.augment import RandomAffineAugment
from .inversion.draws import TeacherSampler, augmentation_draws
from .meta.base import MetaLearner
from .zoo.architectures import Classifier
from .zoo.teacher import Teacher, convert_input, zoo_rule


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float = 4.0, standardize: bool = False) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, mean over the batch.

    Both logits are ``[B, n]`` over the same ``n`` classes (a teacher's); the ``T^2``
    keeps the gradient's size independent of ``T`` (Hinton et al., 2015).  With
    ``standardize``, each row of both is first z-scored over its classes (logit
    standardisation, Sun et al., CVPR 2024), so a teacher's logit scale (a deep
    network's are larger and sharper than a Conv4's) does not set how peaked the
    student must be: only the ranking and relative gaps are distilled.
    """
    if standardize:
        student_logits, teacher_logits = _zscore(student_logits), _zscore(teacher_logits)
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, -1), F.log_softmax(teacher_logits / t, -1),
                    log_target=True, reduction="batchmean") * t * t


def _zscore(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    return (logits - logits.mean(-1, keepdim=True)) / (logits.std(-1, keepdim=True) + eps)


def feature_distance(mapped: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 - cos(mapped, target)`` per row, mean over the batch (0 when every row points the teacher's way)."""
    return (1 - F.cosine_similarity(mapped, target, dim=-1)).mean()


def cosine_kernel(features: torch.Tensor) -> torch.Tensor:
    """``[B, B]`` cosine similarities between the rows of ``features [B, D]``, centred on the batch's mean.

    Centring first takes out the direction every image shares (post-ReLU features all point into one orthant,
    so their plain cosines are all near 1): what is left is how the images differ, which is what a nearest-
    centroid classifier reads."""
    f = F.normalize(features - features.mean(0, keepdim=True), dim=-1)
    return f @ f.T


def relation_distance(embedding: torch.Tensor, target_kernel: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between the cosine similarities of the rows of ``embedding [B, D]`` and
    ``target_kernel [B, B]`` (similarity-preserving distillation, Tung & Mori, ICCV 2019, on cosines): 0 when the
    learner's embedding sees every pair of images as alike as the target does."""
    return (cosine_kernel(embedding) - target_kernel).pow(2).mean()


HEADS = ("union", "teacher")
IMAGES = ("own", "step")


@dataclass
class DistillConfig:
    """Zoo distillation during ECI meta-training (:class:`ZooDistillation`); all weights 0 is PURER as published.

    Attributes:
        logit: weight of logit distillation (a head on the learner's embedding fits each
            teacher's softened outputs); 0: off. The default 1 won on meta-val among PURER as
            published, logit, feature and both, with and without the curriculum, MAML and
            ProtoNet and the bank levers (``benchmarks/results/selection_glyphs_select.md``).
        heads: where the distilled logits live: ``union``, one head over the union of the
            zoo's classes (the bank's classes: teachers that name a class alike share its
            row), each teacher supervising the logits of its own classes (knowledge
            amalgamation from teachers with overlapping label sets), so a class's row learns
            whenever any teacher that knows it is sampled; or ``teacher``, a head per
            teacher.  On a zoo whose teachers share no class the two are the same model
            (the union head's rows split into the teachers' heads).
        standardize: z-score the teacher's and the learner's logits of each image before the
            temperature (logit standardisation), so teachers of different architectures (logit
            scales) ask the learner for the same sharpness; see :func:`distillation_loss`.
        feature: weight of feature distillation (per-teacher linear maps from the
            learner's embedding onto each teacher's penultimate features, cosine); 0: off.
        relation: weight of relational distillation: on each distilled teacher's images, the
            learner's cosine similarities between every pair of images are pulled towards the
            mean of the step's teachers' (:func:`relation_distance`), the kernel that nearest
            centroid on all teachers' features classifies with, so the learner's embedding takes
            the geometry of the zoo's concatenated features; 0: off.
        temperature: T of the logit distillation (the loss is scaled by T^2).
        teachers_per_step: teachers distilled per meta-iteration (sampled uniformly
            without replacement, apart from the inversion's); its cost does not grow with
            the zoo.
        augment: distil on augmented views of the bank images (the inversion's
            shift and crop, drawn per step and teacher), not only on the images themselves.
        images: what each distilled teacher is distilled on: ``own``, the bank images of its own
            classes; or ``step``, the images of every teacher of the step (its own and the others', in the
            bank's common shape),
            so the learner also learns how the teacher answers images of classes it was not trained
            on, which is what its features do for the novel classes of a meta-test task.  Not in the
            successors: ``step`` for every zoo but one of colour teachers, chosen on meta-val across zoos
            (``benchmarks/results/selection_cross_zoo_among.md``; README "Results"): on the 12- and 100-teacher grey
            glyph zoos meta-val rose at 1-shot on all 6 training seeds (over both shots on 5), and on the SH zoo
            (Conv4, ResNet-10 and ResNet-18 teachers) over its 3 training seeds (ahead on 2); on the MH zoo (grey
            glyph and colour icon Conv4s) level on its one seed.
        images_colour: ``images`` for a zoo whose teachers all take colour (3-channel) input; ``None``: ``images``.
            ``own``: on the colour icon zoo ``step`` lowered meta-val over both shots on both training seeds.
        images_heterogeneous: ``images`` for a zoo of teachers of several architectures (the colour rule first,
            as :meth:`~purer.inversion.InversionConfig.synthesizer_key`'s); ``None`` (the default): ``images``.
    """

    logit: float = 1.0
    heads: str = "teacher"
    standardize: bool = False
    feature: float = 0.0
    relation: float = 0.0
    temperature: float = 4.0
    teachers_per_step: int = 4
    augment: bool = True
    images: str = "step"
    images_colour: str | None = "own"
    images_heterogeneous: str | None = None

    def __post_init__(self):
        if min(self.logit, self.feature, self.relation) < 0:
            raise ValueError(f"distillation weights must be >= 0, got logit={self.logit} feature={self.feature} "
                             f"relation={self.relation}")
        if self.heads not in HEADS:
            raise ValueError(f"distill.heads must be one of {HEADS}, got {self.heads!r}")
        if self.images not in IMAGES:
            raise ValueError(f"distill.images must be one of {IMAGES}, got {self.images!r}")
        for key in ("images_colour", "images_heterogeneous"):
            if getattr(self, key) not in (*IMAGES, None):
                raise ValueError(f"distill.{key} must be one of {IMAGES} or null, got {getattr(self, key)!r}")
        if self.temperature <= 0 or self.teachers_per_step < 1:
            raise ValueError(f"need temperature > 0 and teachers_per_step >= 1, got {self.temperature} and "
                             f"{self.teachers_per_step}")

    @property
    def active(self) -> bool:
        return self.logit > 0 or self.feature > 0 or self.relation > 0

    def images_key(self, models: Iterable) -> str:
        """The setting that decides what a zoo of teachers ``models`` (their configs) is distilled on:
        ``images_colour``, ``images_heterogeneous`` or ``images`` (:func:`~purer.zoo.teacher.zoo_rule`)."""
        return zoo_rule(self, "images", models)

    def images_for(self, models: Iterable) -> str:
        """What each teacher of a zoo of teachers ``models`` is distilled on (:meth:`images_key`)."""
        return getattr(self, self.images_key(models))


class ZooDistillation(nn.Module):
    """The training-only heads and maps through which a meta-learner's embedding learns the zoo.

    Args:
        teachers: the zoo, in the bank's order (teacher ``i`` is ``teachers[i]``).
        feature_dim: D, the learner's embedding size (:meth:`MetaLearner.embed`).
        classes: for ``heads: union``, each teacher's class of the union for each of its local labels
            (:attr:`PseudoBank.teacher_classes`); default: every teacher's classes its own.
        config: weights, temperature and teachers per step.
        augment: the augmentation of the distilled views (the inversion's, so the views
            are those the teachers are inverted on); ``None``: the images themselves.
        seed: seeds the teacher sampling and the views (per step and teacher).
        autocast: a lower precision (``torch.bfloat16``) for the teachers' forward passes, as in the inversion.

    Attributes:
        images: what each teacher is distilled on here, ``own`` or ``step`` (:meth:`DistillConfig.images_for` the
            zoo's teachers).
        heads: ``[nn.Linear(D, union size)]`` (``union``), per teacher ``nn.Linear(D, n_i)`` (``teacher``), or
            empty without logit distillation.
        maps: per teacher ``nn.Linear(D, D_i)`` onto its penultimate features, or empty.
    """

    def __init__(self, teachers: Sequence[Teacher], feature_dim: int, config: DistillConfig,
                 augment: RandomAffineAugment | None = None, seed: int = 0, autocast: torch.dtype | None = None,
                 classes: Sequence[Sequence[int]] | None = None):
        super().__init__()
        self.teachers, self.config, self.seed = list(teachers), config, seed
        self.images = config.images_for(t.config for t in self.teachers)  # own or step, by the zoo's rule
        self.augment = augment if config.augment else None
        if classes is None:
            offsets = torch.tensor([0] + [t.config.num_classes for t in self.teachers]).cumsum(0).tolist()
            classes = [list(range(offsets[i], offsets[i + 1])) for i in range(len(self.teachers))]
        self.classes = [list(c) for c in classes]
        if [len(c) for c in self.classes] != [t.config.num_classes for t in self.teachers]:
            raise ValueError("classes must give every teacher a union class for each of its outputs")
        # Each teacher's union classes as a row of one index (padded), so selecting them copies nothing to the
        # device per step.
        width = max(len(c) for c in self.classes)
        self.register_buffer("class_index", torch.tensor([c + [0] * (width - len(c)) for c in self.classes]),
                             persistent=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if config.logit <= 0:
                heads = []
            elif config.heads == "union":
                heads = [nn.Linear(feature_dim, 1 + max(k for c in self.classes for k in c))]
            else:
                heads = [nn.Linear(feature_dim, t.config.num_classes) for t in self.teachers]
            self.heads = nn.ModuleList(heads)
            self.maps = nn.ModuleList([nn.Linear(feature_dim, t.model.feature_dim) for t in self.teachers]
                                      if config.feature > 0 else [])
        self.sampler = TeacherSampler(len(self.teachers), config.teachers_per_step, seed + 20_000)
        self.autocast = autocast

    def sample_teachers(self) -> list[int]:
        """This step's teachers to distil: ``min(teachers_per_step, zoo size)``, sorted."""
        return self.sampler.sample()

    def work_items(self, teachers: Sequence[int]) -> list[list[int]]:
        """The step's distilled ``teachers`` as work items, each one row of the outer gradient that one process
        computes (:meth:`losses`): a teacher each, or with ``images: step`` the whole step, whose teachers are all
        distilled on the same images (the learner embeds them once for all)."""
        if self.images == "step":
            return [list(teachers)] if teachers else []
        return [[i] for i in teachers]

    def losses(self, learner: MetaLearner, bank: PseudoBank, idx: Sequence[int], step: int,
               ensemble: Sequence[int] | None = None) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """The weighted distillation losses of the teachers ``idx`` (0-dim, differentiable in the learner and in
        the heads and maps; the bank is read detached): one per teacher, or with ``images: step`` their sum (one
        work item, :meth:`work_items`); and their mean parts ``logit_kd``, ``feature_cos``, ``relation``.
        ``ensemble``: the step's teachers whose similarities the relational term follows, and whose images
        ``images: step`` distils on (default ``idx``; a process that distils only its share of the step's
        teachers passes them all)."""
        c = self.config
        ensemble = list(idx) if ensemble is None else list(ensemble)
        out, kd, cos, rel = [], [], [], []
        viewed = ensemble if self.images == "step" else list(idx)  # whose bank images are distilled on
        images = [bank.teacher_images(i) for i in viewed]
        if self.augment is not None:  # the step's views, drawn on the CPU and copied to the device once
            thetas = augmentation_draws(self.augment, (self.seed, 1), step, viewed, [len(x) for x in images],
                                        bank.logits[0].device).split([len(x) for x in images])
            images = [self.augment(x, theta) for x, theta in zip(images, thetas)]
        shared, kernel = None, None
        if self.images == "step":  # every teacher on the whole step's views, embedded once
            # in the bank's shape (teachers of several input contracts keep their classes in theirs; else a no-op)
            images = [convert_input(x, bank.channels, bank.image_size) for x in images]
            images = [torch.cat(images)] * len(idx)
            shared = learner.embed(images[0])
        for i, x in zip(idx, images):
            teacher = self.teachers[i]
            with torch.no_grad(), _precision(x.device, self.autocast):
                target_features = teacher.features(x)
                target_logits = teacher.model.head(target_features)
            target_features, target_logits = target_features.float(), target_logits.float()
            embedding = learner.embed(x) if shared is None else shared
            loss = embedding.new_zeros(())
            if c.logit > 0:
                kd.append(distillation_loss(self.student_logits(i, embedding), target_logits, c.temperature,
                                            c.standardize))
                loss = loss + c.logit * kd[-1]
            if c.feature > 0:
                cos.append(feature_distance(self.maps[i](embedding), target_features))
                loss = loss + c.feature * cos[-1]
            if c.relation > 0:
                if kernel is None or shared is None:  # on the step's shared views, the ensemble's kernel is one
                    with torch.no_grad(), _precision(x.device, self.autocast):
                        kernel = torch.stack([cosine_kernel(target_features if j == i else self.teachers[j].features(x)
                                                            .float()) for j in ensemble]).mean(0)
                rel.append(relation_distance(embedding, kernel))
                loss = loss + c.relation * rel[-1]
            out.append(loss)
        if shared is not None and out:  # one work item: the terms share the learner's pass
            out = [torch.stack(out).sum()]
        nan = torch.full((), float("nan"), device=bank.logits[0].device)
        stats = {"logit_kd": torch.stack(kd).detach().mean() if kd else nan,
                 "feature_cos": torch.stack(cos).detach().mean() if cos else nan,
                 "relation": torch.stack(rel).detach().mean() if rel else nan}
        return out, stats

    def student_logits(self, i: int, embedding: torch.Tensor) -> torch.Tensor:
        """The learner's logits ``[B, n_i]`` for teacher ``i``'s classes, in its label order, from its embedding
        ``[B, D]``: its own head's, or the union head's rows of its classes."""
        if self.config.heads == "union":
            return self.heads[0](embedding).index_select(1, self.class_index[i, :len(self.classes[i])])
        return self.heads[i](embedding)

    def state_dict(self, *args, **kwargs) -> dict:
        state = super().state_dict(*args, **kwargs)
        state["sampler"] = self.sampler.state_dict()
        return state

    def load_state_dict(self, state: dict, strict: bool = True):
        state = dict(state)
        self.sampler.load_state_dict(state.pop("sampler"))
        return super().load_state_dict(state, strict=strict)


def _precision(device: torch.device, dtype: torch.dtype | None):
    """The teachers' mixed precision (``autocast``), or nothing."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@torch.no_grad()
def teacher_agreement(model: Classifier, teachers: Sequence[Teacher], bank: PseudoBank) -> float:
    """How often ``model`` (over all bank classes) picks a teacher's own answer on the bank.

    For every teacher, on the bank images of its classes: the share of images where
    the argmax of ``model``'s logits restricted to the teacher's bank classes equals
    the teacher's argmax; averaged over all those images.  Chance is
    ``1 / classes per teacher``.
    """
    agree, total = 0, 0
    for i, teacher in enumerate(teachers):
        x = bank.teacher_images(i)
        picked = model(x)[:, bank.teacher_classes[i]].argmax(-1)
        agree += int((picked == teacher(x).argmax(-1)).sum())
        total += len(x)
    return agree / total
