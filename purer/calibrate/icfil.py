"""ICFIL: inversion calibration following the inner loop (METHOD.md part 4), meta-test only.

Description:
    The meta-learner was meta-trained on pseudo images but is tested on real ones.
    ICFIL closes that gap per task: (1) adapt the meta-learner on the real support
    set S; (2) invert the adapted model into a pseudo support set S^ for the same
    N labels, with the BatchNorm targets set to S's own feature statistics;
    (3) calibrate a per-task copy of the adapted model for a few steps with a
    supervised contrastive loss over the features of S and S^ together (same
    label = positive, real or pseudo) plus cross-entropy on S and, with a smaller
    weight, on S^; (4) predict the query set with the calibrated copy. The
    meta-learner's own weights are never touched, so tasks do not leak.

References:
    Hu et al., "Architecture, Dataset and Model-Scale Agnostic Data-free
    Meta-Learning", CVPR 2023 (ICFIL). Khosla et al., "Supervised Contrastive
    Learning", NeurIPS 2020 (the contrastive loss).
"""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field, fields, replace
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..data.episodes import ImageSet, TaskSpec, episode_labels
from ..inversion.bank import PseudoBank
from ..inversion.hooks import BNStatsHook
from ..inversion.synthesizer import EpisodeInversion, InversionConfig
from ..meta.base import InputSpec, MetaLearner
from ..meta.maml import ANIL, MAML
from ..meta.protonet import ProtoNet, neg_sq_distances, prototypes
from ..zoo.architectures import Classifier
from ..zoo.teacher import ModelConfig, Teacher


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
    has_pos = n_pos > 0
    if not has_pos.any():
        raise ValueError("no two samples share a label, so there is no positive pair; "
                         "give at least two images of some label (e.g. add pseudo images)")
    per_anchor = -log_prob.masked_fill(~positive, 0.0).sum(1)[has_pos] / n_pos[has_pos]
    return per_anchor.mean()


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
    inversion: InversionConfig = field(default_factory=InversionConfig)
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

    @property
    def uses_pseudo(self) -> bool:
        """Whether any loss term reads the pseudo support (no: nothing is synthesised, as in ``support-ce``)."""
        return self.contrastive_weight > 0 or self.pseudo_ce_weight > 0


# Test-time calibrations after the inner loop, by name: ICFIL, and its control, which spends the same
# calibration steps and lr on cross-entropy over the real support alone (no inversion, no contrastive term),
# so that what ICFIL adds can be told apart from merely fine-tuning longer.
CALIBRATIONS: dict[str, dict[str, Any]] = {
    "icfil": {},
    "support-ce": {"inversion_steps": 0, "contrastive_weight": 0.0, "pseudo_ce_weight": 0.0},
}


def calibration(name: str, base: ICFILConfig | None = None) -> ICFILConfig:
    """The :class:`ICFILConfig` of the calibration ``name`` (one of :data:`CALIBRATIONS`) on top of ``base``."""
    if name not in CALIBRATIONS:
        raise ValueError(f"unknown calibration {name!r}; choose from {sorted(CALIBRATIONS)}")
    return with_settings(base or ICFILConfig(), CALIBRATIONS[name])


@dataclass
class CalibratedTask:
    """One task's calibrated model (a private copy; the meta-learner is untouched).

    Attributes:
        model: the adapted-then-calibrated network; its BatchNorm uses batch
            statistics like the meta-learner's. For ProtoNet its head is unused.
        prototypes: ``[N, D]`` for ProtoNet (recomputed from the real support with
            the calibrated encoder), else ``None``.
        pseudo_x: ``[N*M, C, H, W]`` the pseudo support in ``[0, 1]``, class-major.
        pseudo_y: ``[N*M]`` its labels.
        stats: numbers from the run: ``inversion_acc`` (the adapted model's accuracy on
            the final pseudo support), ``inversion_ce``, ``r_bn``, ``calibration_loss``.
    """

    model: Classifier
    prototypes: torch.Tensor | None
    pseudo_x: torch.Tensor
    pseudo_y: torch.Tensor
    stats: dict[str, float]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Network inputs ``[B, C', H', W']`` (already prepared) -> logits ``[B, N]``."""
        if self.prototypes is None:
            return self.model(x)
        return neg_sq_distances(self.model.encoder(x), self.prototypes)


def adapted_model(learner: MetaLearner, adapted: Any) -> tuple[Classifier, bool]:
    """A private :class:`Classifier` copy of ``learner`` under its ``adapted`` state.

    MAML: the network with the fast weights; ANIL: the network with the adapted
    head; ProtoNet: the encoder with a linear head equivalent to the prototypes
    (``-||f - c||^2 = 2 c.f - ||c||^2 - ||f||^2`` and the last term is the same for
    every class, so ``W = 2 c``, ``b = -||c||^2`` give the same softmax).

    Returns:
        ``(model, is_prototypical)``; every parameter of ``model`` is a fresh leaf
        with ``requires_grad=True``.

    Raises:
        TypeError: for a learner other than MAML, ANIL or ProtoNet.
    """
    if isinstance(learner, MAML):
        model = copy.deepcopy(learner.model)
        target = model.head if isinstance(learner, ANIL) else model
        with torch.no_grad():
            for name, p in target.named_parameters():
                p.copy_(adapted[name])
        is_proto = False
    elif isinstance(learner, ProtoNet):
        protos = adapted.detach()
        model = Classifier(copy.deepcopy(learner.encoder), protos.shape[1], protos.shape[0])
        with torch.no_grad():
            model.head.weight.copy_(2 * protos)
            model.head.bias.copy_(-protos.pow(2).sum(1))
        is_proto = True
    else:
        raise TypeError(f"ICFIL calibrates MAML, ANIL and ProtoNet learners, got {type(learner).__name__}; "
                        "add a case to purer.calibrate.icfil.adapted_model for it")
    model.train(learner.training)
    for p in model.parameters():
        p.requires_grad_(True)
    return model, is_proto


def support_statistics_teacher(model: Classifier, learner: MetaLearner, support_x: torch.Tensor) -> Teacher:
    """A frozen copy of ``model`` whose BatchNorm running statistics are the real support's.

    The meta-learner's BatchNorm keeps no running statistics, so the inversion's
    BN targets (and the normalisation the copy applies in eval mode) are the
    batch mean and (biased) variance of each BN layer's input on the real
    support. The copy is wrapped as a :class:`Teacher` with the learner's input
    contract, so episode inversion runs on it unchanged.

    Args:
        model: the adapted network (see :func:`adapted_model`).
        learner: gives the input contract (:attr:`MetaLearner.input_spec`).
        support_x: ``[N*K, C, H, W]`` real support in ``[0, 1]``.
    """
    net = copy.deepcopy(model)
    seen: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0]
        seen[module] = torch.var_mean(x, dim=[0, *range(2, x.ndim)], unbiased=False)

    handles = [m.register_forward_pre_hook(record) for m in net.modules() if isinstance(m, _BatchNorm)]
    try:
        with torch.no_grad():
            net(learner.prepare(support_x))
    finally:
        for h in handles:
            h.remove()
    for m, (var, mean) in seen.items():
        m.track_running_stats = True
        m.running_mean, m.running_var = mean.clone(), var.clone()
        m.num_batches_tracked = torch.tensor(1, dtype=torch.long, device=mean.device)
    spec = learner.input_spec
    if spec is None:
        spec = InputSpec(support_x.shape[1], support_x.shape[-1])
    way = model.head.out_features
    # The task model is never rebuilt from this config, so `arch` only names it.
    config = ModelConfig(arch="icfil:adapted", num_classes=way, class_ids=[str(i) for i in range(way)],
                         in_channels=spec.in_channels, image_size=spec.image_size, mean=list(spec.mean),
                         std=list(spec.std))
    return Teacher(net, config, model_id="adapted")


class ICFIL:
    """Inversion calibration following the inner loop, per meta-test task.

    Args:
        config: see :class:`ICFILConfig` (defaults chosen on meta-val).

    Example:
        >>> icfil = ICFIL(ICFILConfig(inversion_steps=20, calibration_steps=5))    # doctest: +SKIP
        >>> logits = icfil.predict(learner, ep.support_x, ep.support_y, ep.way, ep.query_x)  # doctest: +SKIP
        >>> evaluate(icfil.wrap(learner), test_set, tasks, method="maml+icfil")     # doctest: +SKIP
    """

    def __init__(self, config: ICFILConfig | None = None):
        self.config = config or ICFILConfig()

    def invert(self, teacher: Teacher, support_x: torch.Tensor, way: int
               ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """Pseudo support ``[N*M, C, H, W]`` in ``[0, 1]`` and labels ``[N*M]`` by inverting ``teacher``.

        Images live at the real support's channels and size; the run is episode
        inversion (:class:`~purer.inversion.EpisodeInversion`) over a one-teacher
        :class:`~purer.inversion.PseudoBank`.
        """
        c = self.config
        bank = PseudoBank([teacher], c.pseudo_per_class, image_size=support_x.shape[-1],
                          channels=support_x.shape[1], seed=c.seed).to(support_x.device)
        inversion = EpisodeInversion([teacher], bank, c.inversion)
        for _ in range(c.inversion_steps):
            inversion.step(teachers=[0])
        pseudo_x = rearrange(bank.snapshot(), "n m c h w -> (n m) c h w")
        pseudo_y = episode_labels(way, c.pseudo_per_class, device=support_x.device)
        with torch.no_grad(), BNStatsHook(teacher.model) as bn:
            logits = teacher(pseudo_x)
        stats = {"inversion_acc": (logits.argmax(-1) == pseudo_y).float().mean().item(),
                 "inversion_ce": F.cross_entropy(logits, pseudo_y).item(), "r_bn": bn.loss().item()}
        return pseudo_x, pseudo_y, stats

    def calibrate(self, learner: MetaLearner, model: Classifier, is_proto: bool, real_x: torch.Tensor,
                  real_y: torch.Tensor, pseudo_x: torch.Tensor, pseudo_y: torch.Tensor, way: int) -> float:
        """Calibrate ``model`` in place on real + pseudo support; returns the last step's loss.

        Loss: ``contrastive_weight * SupCon(features of real and pseudo) +
        real_ce_weight * CE(real) + pseudo_ce_weight * CE(pseudo)``. Real and
        pseudo images go through the network as separate batches, so each is
        normalised by its own BatchNorm statistics, as a support set is at
        adaptation. ProtoNet: only the encoder is calibrated; the logits come
        from prototypes of the real support, recomputed at every step.

        Args:
            learner: gives the input contract (``learner.prepare``).
            model: the per-task copy (see :func:`adapted_model`), changed in place.
            is_proto: ``model`` stands for a ProtoNet (its head is ignored).
            real_x, real_y: ``[N*K, C, H, W]`` real support in ``[0, 1]`` and ``[N*K]`` labels.
            pseudo_x, pseudo_y: ``[N*M, C, H, W]`` pseudo support in ``[0, 1]`` and ``[N*M]`` labels.
            way: N.
        """
        c = self.config
        xr, xp = learner.prepare(real_x), learner.prepare(pseudo_x)
        labels = torch.cat([real_y, pseudo_y])
        params = list((model.encoder if is_proto else model).parameters())
        optimizer = torch.optim.Adam(params, lr=c.calibration_lr)
        loss = torch.zeros(())
        for _ in range(c.calibration_steps):
            fr = model.encoder(xr)
            protos = prototypes(fr, real_y, way) if is_proto else None
            logits_r = neg_sq_distances(fr, protos) if is_proto else model.head(fr)
            loss = c.real_ce_weight * F.cross_entropy(logits_r, real_y)
            if c.uses_pseudo:
                fp = model.encoder(xp)
                logits_p = neg_sq_distances(fp, protos) if is_proto else model.head(fp)
                loss = (c.contrastive_weight * supervised_contrastive_loss(torch.cat([fr, fp]), labels,
                                                                           c.temperature)
                        + loss + c.pseudo_ce_weight * F.cross_entropy(logits_p, pseudo_y))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return loss.item()

    def adapt(self, learner: MetaLearner, support_x: torch.Tensor, support_y: torch.Tensor, way: int,
              **test_time: Any) -> CalibratedTask:
        """Steps 1-3 on one task: adapt (``test_time`` goes to ``learner.adapt``), invert, calibrate.

        Args:
            support_x: ``[N*K, C, H, W]`` real support in ``[0, 1]``.
            support_y: ``[N*K]`` labels in ``0..N-1``.

        Works under ``torch.no_grad()`` too (it enables gradients where it needs them).
        """
        if support_x.ndim != 4 or support_y.shape != support_x.shape[:1]:
            raise ValueError(f"support_x must be [N*K, C, H, W] and support_y [N*K], got "
                             f"{tuple(support_x.shape)} and {tuple(support_y.shape)}")
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            torch.manual_seed(self.config.seed)
            adapted = learner.adapt(support_x, support_y, way, **test_time)
            model, is_proto = adapted_model(learner, adapted)
            if self.config.uses_pseudo:
                teacher = support_statistics_teacher(model, learner, support_x)
                pseudo_x, pseudo_y, stats = self.invert(teacher, support_x, way)
            else:  # nothing reads a pseudo support: synthesise none
                pseudo_x, pseudo_y, stats = support_x[:0], support_y[:0], {}
            stats["calibration_loss"] = self.calibrate(learner, model, is_proto, support_x, support_y, pseudo_x,
                                                       pseudo_y, way)
        for p in model.parameters():
            p.requires_grad_(False)
        protos = None
        if is_proto:
            with torch.no_grad():
                protos = prototypes(model.encoder(learner.prepare(support_x)), support_y, way)
        return CalibratedTask(model, protos, pseudo_x, pseudo_y, stats)

    def predict(self, learner: MetaLearner, support_x: torch.Tensor, support_y: torch.Tensor, way: int,
                query_x: torch.Tensor, **test_time: Any) -> torch.Tensor:
        """Query logits ``[B, N]`` for ``query_x [B, C, H, W]`` after adapt + invert + calibrate."""
        task = self.adapt(learner, support_x, support_y, way, **test_time)
        with torch.no_grad():
            return task.logits(learner.prepare(query_x))

    def wrap(self, learner: MetaLearner) -> "ICFILLearner":
        """``learner`` with ICFIL after its inner loop, as a :class:`MetaLearner` for :func:`purer.evaluate.evaluate`."""
        return ICFILLearner(learner, self)


class ICFILLearner(MetaLearner):
    """A meta-learner followed by ICFIL at test time; ``adapt`` returns a :class:`CalibratedTask`.

    Test-time settings of the wrapped learner (its ``tunable``, e.g. inner lr and
    steps) pass through ``adapt``. Meta-test only: it cannot be meta-trained.
    """

    def __init__(self, learner: MetaLearner, icfil: ICFIL):
        super().__init__(None)
        self.learner = learner
        self.icfil = icfil
        self.tunable = learner.tunable

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, way: int, *, create_graph: bool = False,
              **test_time: Any) -> CalibratedTask:
        if create_graph:
            raise ValueError("ICFIL is a meta-test stage and is not differentiable; meta-train the wrapped "
                             "learner itself")
        return self.icfil.adapt(self.learner, support_x, support_y, way, **test_time)

    def predict(self, adapted: CalibratedTask, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return adapted.logits(self.learner.prepare(x))

    def test_cost(self) -> dict:
        c = self.icfil.config
        if not c.uses_pseudo:
            return {**self.learner.test_cost(), "calibration_steps": c.calibration_steps}
        return {**self.learner.test_cost(), "icfil_steps": c.inversion_steps + c.calibration_steps,
                "pseudo_per_class": c.pseudo_per_class}


def with_settings(config: ICFILConfig, settings: dict[str, Any]) -> ICFILConfig:
    """A copy of ``config`` with ``settings`` applied; keys are field names, ``inversion.<field>`` for the
    nested inversion settings (e.g. ``{"calibration_lr": 1e-3, "inversion.lr": 0.1}``).

    Raises:
        ValueError: for a key that names no setting.
    """
    top: dict[str, Any] = {}
    nested: dict[str, Any] = {}
    for key, value in settings.items():
        head, _, rest = key.partition(".")
        valid = {f.name for f in fields(InversionConfig if rest else ICFILConfig)}
        if (rest and head != "inversion") or (rest or head) not in valid:
            raise ValueError(f"unknown ICFIL setting {key!r}; valid: "
                             f"{', '.join(f.name for f in fields(ICFILConfig))} and inversion.<InversionConfig field>")
        (nested if rest else top)[rest or head] = value
    if nested:
        top["inversion"] = replace(top.get("inversion", config.inversion), **nested)
    return replace(config, **top)


def select_config(learner: MetaLearner, val_source: ImageSet, val_tasks: Sequence[TaskSpec],
                  grid: dict[str, Sequence[Any]], base: ICFILConfig | None = None, adapt_kwargs: dict | None = None,
                  progress: bool = False) -> tuple[ICFILConfig, float, list[dict]]:
    """Grid search of ICFIL settings on meta-val tasks (never on meta-test).

    Args:
        learner: the meta-learner ICFIL follows.
        val_source, val_tasks: meta-val images and a fixed task list over them.
        grid: ``{setting: candidate values}`` (keys as in :func:`with_settings`); every
            combination is evaluated on the same tasks.
        base: the settings not searched (default :class:`ICFILConfig`).
        adapt_kwargs: the learner's own test-time settings (e.g. inner lr and steps).

    Returns:
        ``(best config, its meta-val accuracy in percent, one row per combination
        {"settings", "accuracy", "ci95"})``; ties go to the earlier combination.
    """
    from ..evaluate import evaluate

    base = base or ICFILConfig()
    keys = list(grid)
    best, best_acc, table = base, -1.0, []
    for values in itertools.product(*(grid[k] for k in keys)):
        settings = dict(zip(keys, values))
        config = with_settings(base, settings)
        result = evaluate(ICFIL(config).wrap(learner), val_source, val_tasks, adapt_kwargs=adapt_kwargs,
                          progress=progress)
        table.append({"settings": settings, "accuracy": result.accuracy, "ci95": result.ci95})
        if result.accuracy > best_acc:
            best, best_acc = config, result.accuracy
    return best, best_acc, table
