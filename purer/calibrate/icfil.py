"""ICFIL: inversion calibration following the inner loop (METHOD.md part 4), meta-test only.

Description:
    The meta-learner was meta-trained on pseudo images but is tested on real ones.
    ICFIL closes that gap per task: (1) adapt the meta-learner on the real support
    set S; (2) invert the adapted model into a pseudo support set S^ for the same
    N labels, with the BatchNorm targets set to S's own feature statistics (the
    adapted network frozen at S, :func:`purer.batchnorm.freeze_at`, inverted by the
    same episode inversion that meta-training uses); (3) calibrate a per-task copy of
    the adapted model for a few steps with a supervised contrastive loss over the
    features of S and S^ together (same label = positive, real or pseudo) plus
    cross-entropy on S and, with a smaller weight, on S^; (4) predict the query set
    with the calibrated copy.  The meta-learner's own weights are never touched, so
    tasks do not leak.  Its control, the same calibration steps as cross-entropy on S
    alone, is :class:`purer.calibrate.support_ce.SupportCE`.

References:
    Hu et al., "Architecture, Dataset and Model-Scale Agnostic Data-free
    Meta-Learning", CVPR 2023 (ICFIL). Khosla et al., "Supervised Contrastive
    Learning", NeurIPS 2020 (the contrastive loss).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..batchnorm import freeze_at
from ..data.episodes import episode_labels
from ..inversion.bank import PseudoBank
from ..inversion.hooks import BNStatsHook
from ..inversion.synthesizer import EpisodeInversion, InversionConfig
from ..meta.base import InputSpec, MetaLearner
from ..zoo.teacher import ModelConfig, Teacher
from ..meta.protonet import prototypes
from .base import CalibratedTask, Calibrator, adapted_model, fine_tune, finish, real_logits


def supervised_contrastive_loss(features: torch.Tensor, labels: torch.Tensor,
                                temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss over L2-normalised features.

    For every anchor ``i`` that has at least one other sample with its label, the
    loss is the mean over those positives ``p`` of
    ``-log(exp(z_i.z_p / t) / sum_{a != i} exp(z_i.z_a / t))``; the result is the
    mean over such anchors. Anchors whose label occurs once contribute nothing.

    Args:
        features: ``[B, D]`` features (normalised here).
        labels: ``[B]`` integer labels.
        temperature: ``t > 0``; smaller values sharpen the similarity distribution.

    Returns:
        A scalar tensor.

    Raises:
        ValueError: on bad shapes, a non-positive temperature, or when no label
            occurs twice (then there is no positive pair; in ICFIL this means a
            1-shot task without pseudo images).

    Example:
        >>> f = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]])
        >>> supervised_contrastive_loss(f, torch.tensor([0, 0, 1, 1])) < 0.01
        tensor(True)
    """
    if features.ndim != 2:
        raise ValueError(f"features must be [B, D], got shape {tuple(features.shape)}")
    if labels.shape != features.shape[:1]:
        raise ValueError(f"labels must be [B] with B={features.shape[0]}, got shape {tuple(labels.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    z = F.normalize(features, dim=1)
    self_pair = torch.eye(len(z), dtype=torch.bool, device=z.device)
    logits = (z @ z.T / temperature).masked_fill(self_pair, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positive = (labels[:, None] == labels[None, :]) & ~self_pair
    n_pos = positive.sum(1)
    has_pos = (n_pos > 0).to(z.dtype)
    anchors = has_pos.sum()
    # Checked where that costs no read from a device (the CPU); elsewhere the device asserts it.
    if labels.device.type == "cpu":
        if not anchors:
            raise ValueError("no two samples share a label, so there is no positive pair; "
                             "give at least two images of some label (e.g. add pseudo images)")
    else:
        torch._assert_async(anchors > 0, "supervised contrastive loss: no two samples share a label")
    per_anchor = -log_prob.masked_fill(~positive, 0.0).sum(1) / n_pos.clamp(min=1)
    return (per_anchor * has_pos).sum() / anchors


class SupervisedContrastiveLoss(nn.Module):
    """Module form of :func:`supervised_contrastive_loss`: ``loss(features [B, D], labels [B]) -> scalar``."""

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return supervised_contrastive_loss(features, labels, self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


@dataclass
class ICFILConfig:
    """Settings of :class:`ICFIL`.

    Attributes:
        pseudo_per_class: M, pseudo support images synthesised per label.
        inversion_steps: bank updates of the inversion (each one forward/backward
            of the adapted model on the ``N * M`` pseudo images).
        inversion: the episode-inversion settings (lr, a_bn, a_tv, a_l2,
            augmentation), the same dataclass the meta-training inversion uses;
            ``teachers_per_step`` is moot here (one model per task).
        calibration_steps: Adam steps on the per-task copy of the adapted model.
        calibration_lr: their learning rate.
        temperature: of the supervised contrastive loss.
        contrastive_weight: weight of the contrastive loss over real + pseudo features.
        real_ce_weight: weight of cross-entropy on the real support.
        pseudo_ce_weight: weight of cross-entropy on the pseudo support (smaller:
            pseudo images are a proxy, the real support is the ground truth).
        seed: seeds each task's pseudo-image initialisation and augmentations, so a
            task's result does not depend on which tasks ran before it.

    Defaults: ``calibration_lr`` and ``contrastive_weight`` are the best mean of 1- and
    5-shot over 40 glyph meta-val tasks each (a sweep of an earlier release; each run now
    chooses among ``eval.calibration_grid`` on its own meta-val); a pilot on
    meta-val found temperature 0.5, stronger priors (a_bn 1, a_tv 1e-2) and 20
    calibration steps no better; M = 3 and 30 inversion steps keep the cost near
    one second per task for a 32 px Conv4 on one CPU thread (the adapted model
    then classifies about 95% of the pseudo support as its targets).
    """

    pseudo_per_class: int = 3
    inversion_steps: int = 30
    # One R_tv weight for colour and grey alike (a_tv_colour off): ICFIL's settings were chosen on meta-val so.
    inversion: InversionConfig = field(default_factory=lambda: InversionConfig(a_tv_colour=None))
    calibration_steps: int = 10
    calibration_lr: float = 1e-4
    temperature: float = 0.1
    contrastive_weight: float = 0.1
    real_ce_weight: float = 1.0
    pseudo_ce_weight: float = 0.1
    seed: int = 0

    def __post_init__(self):
        if self.pseudo_per_class < 1:
            raise ValueError(f"pseudo_per_class must be >= 1, got {self.pseudo_per_class}")
        if self.inversion_steps < 0 or self.calibration_steps < 0:
            raise ValueError(f"inversion_steps and calibration_steps must be >= 0, got "
                             f"{self.inversion_steps} and {self.calibration_steps}")
        if self.calibration_lr <= 0 or self.temperature <= 0:
            raise ValueError(f"calibration_lr and temperature must be positive, got "
                             f"{self.calibration_lr} and {self.temperature}")
        if min(self.contrastive_weight, self.real_ce_weight, self.pseudo_ce_weight) < 0:
            raise ValueError("contrastive_weight, real_ce_weight and pseudo_ce_weight must be >= 0")


def frozen_teacher(model: nn.Module, learner: MetaLearner, support_x: torch.Tensor) -> Teacher:
    """The adapted ``model`` frozen at the real support's BatchNorm statistics, as a :class:`Teacher` with the
    learner's input contract, so that episode inversion runs on it unchanged (its R_bn targets are then the
    support's statistics).

    Args:
        model: the adapted network (see :func:`~purer.calibrate.base.adapted_model`).
        learner: gives the input contract (:attr:`MetaLearner.input_spec`).
        support_x: ``[N*K, C, H, W]`` real support in ``[0, 1]``.
    """
    spec = learner.input_spec or InputSpec(support_x.shape[1], support_x.shape[-1])
    way = model.head.out_features
    # The task model is never rebuilt from this config, so `arch` only names it.
    config = ModelConfig(arch="icfil:adapted", num_classes=way, class_ids=[str(i) for i in range(way)],
                         in_channels=spec.in_channels, image_size=spec.image_size, mean=list(spec.mean),
                         std=list(spec.std))
    return Teacher(freeze_at(model, learner.prepare(support_x)), config, model_id="adapted")


class ICFIL(Calibrator, name="icfil"):
    """Inversion calibration following the inner loop, per meta-test task.

    Args:
        config: see :class:`ICFILConfig` (defaults chosen on meta-val).

    Example:
        >>> icfil = ICFIL(ICFILConfig(inversion_steps=20, calibration_steps=5))    # doctest: +SKIP
        >>> logits = icfil.predict(learner, ep.support_x, ep.support_y, ep.way, ep.query_x)  # doctest: +SKIP
        >>> evaluate(icfil.wrap(learner), test_set, tasks, method="maml+icfil")     # doctest: +SKIP
    """

    config_type = ICFILConfig

    def invert(self, teacher: Teacher, support_x: torch.Tensor, way: int
               ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Pseudo support ``[N*M, C, H, W]`` in ``[0, 1]`` and labels ``[N*M]`` by inverting ``teacher``.

        Images live at the real support's channels and size and on its device; the run is
        episode inversion (:class:`~purer.inversion.EpisodeInversion`, its one teacher run
        plainly, never stacked) over a one-teacher :class:`~purer.inversion.PseudoBank`.
        """
        c = self.config
        bank = PseudoBank([teacher], c.pseudo_per_class, image_size=support_x.shape[-1],
                          channels=support_x.shape[1], seed=c.seed, device=support_x.device)
        inversion = EpisodeInversion([teacher], bank, dataclasses.replace(c.inversion, teacher_batching="loop"))
        for _ in range(c.inversion_steps):
            inversion.step(teachers=[0])
        pseudo_x = rearrange(bank.snapshot(), "n m c h w -> (n m) c h w")
        pseudo_y = episode_labels(way, c.pseudo_per_class, device=support_x.device)
        with torch.no_grad(), BNStatsHook(teacher.model) as bn:
            logits = teacher(pseudo_x)
        stats = {"inversion_acc": (logits.argmax(-1) == pseudo_y).float().mean(),
                 "inversion_ce": F.cross_entropy(logits, pseudo_y), "r_bn": bn.loss()}
        return pseudo_x, pseudo_y, stats

    def calibrate(self, learner: MetaLearner, adapted: Any, support_x: torch.Tensor, support_y: torch.Tensor,
                  way: int) -> CalibratedTask:
        """Invert the adapted learner, calibrate a copy of it; the calibrated predictor.

        Args:
            adapted: ``learner.adapt`` on this support (see :meth:`Calibrator.adapt`).
            support_x: ``[N*K, C, H, W]`` real support in ``[0, 1]``.
            support_y: ``[N*K]`` labels in ``0..N-1``.

        Works under ``torch.no_grad()`` too (it enables gradients where it needs them).
        """
        c = self.config
        with torch.enable_grad():
            model, is_proto = adapted_model(learner, adapted)
            pseudo_x, pseudo_y, stats = self.invert(frozen_teacher(model, learner, support_x), support_x, way)
            xr, xp = learner.prepare(support_x), learner.prepare(pseudo_x)
            labels = torch.cat([support_y, pseudo_y])

            def loss() -> torch.Tensor:
                # Real and pseudo images go through the network as separate batches, so each is normalised by
                # its own BatchNorm statistics, as a support set is at adaptation.  ProtoNet: the logits come
                # from prototypes of the real support, recomputed at every step.
                fr = model.encoder(xr)
                protos = prototypes(fr, support_y, way) if is_proto else None
                real_ce = c.real_ce_weight * F.cross_entropy(real_logits(model, fr, protos), support_y)
                fp = model.encoder(xp)
                return (c.contrastive_weight * supervised_contrastive_loss(torch.cat([fr, fp]), labels,
                                                                           c.temperature)
                        + real_ce + c.pseudo_ce_weight * F.cross_entropy(real_logits(model, fp, protos), pseudo_y))

            stats["calibration_loss"] = fine_tune(model, is_proto, loss, c.calibration_steps, c.calibration_lr)
        return finish(learner, model, is_proto, support_x, support_y, way, pseudo_x, pseudo_y, stats)

    def test_cost(self, learner: MetaLearner) -> dict:
        c = self.config
        return {"icfil_steps": c.inversion_steps + c.calibration_steps, "pseudo_per_class": c.pseudo_per_class}
