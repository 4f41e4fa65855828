"""E3BM: an ensemble over the inner loop's epochs, weighted by task-specific hyperprior learners.

Description:
    Each epoch ``m = 1..M`` of a gradient-based base learner's inner loop gives a base-learner ``θ_m``; E3BM
    predicts with all of them, ``ŷ = sum_m v_m f(x; θ_m)`` (the ensemble of epoch-wise empirical Bayes
    models), where the combination weight ``v_m`` and the epoch's learning rate ``α_m``
    (``θ_m = θ_{m-1} - α_m ∇L_S(θ_{m-1})``) are generated for the task by two hyperprior learners from its
    state ``τ_m = [mean support embedding under θ_{m-1} ; mean over classes of the head's gradient]``:
    ``v_m = v^0_m + λ FC_v(τ_m)_m`` and ``α_m = α^0_m + λ FC_α(τ_m)_m`` (the epoch-independent "FC"
    hyperprior of the paper and its release), with meta-learned initial values ``v^0_m = 1/M``,
    ``α^0_m`` = the base learner's inner lr, and ``λ = 1e-4`` (the release's soft weights).  The weights are
    a softmax over the epochs here, so they always sum to one (the release adds ``v_m`` unnormalised, which
    sum to one only at initialisation); an ensemble of one epoch is then its base learner itself (tested).

    The base learner is MAML (every weight adapted; the embedding is the encoder's) or MTL (the head adapted
    on the frozen, scaled and shifted encoder's features, as in the release); ``M`` is its inner steps, and
    its inner loop is taken to second order unless it is configured first order.  The hyperprior learners
    fix ``M`` and generate the lrs, so nothing is tuned at test time.  Not here: the LSTM ("epoch-dependent")
    hyperprior, the release's own outer learning rates for the hyperpriors, and the SIB base learner.
    ICFIL and support CE cannot follow an ensemble of networks; a run refuses them at config time.

References:
    Liu, Schiele, Sun, "An Ensemble of Epoch-wise Empirical Bayes for Few-shot Learning", ECCV 2020.

Example:
    >>> from purer.meta.init import random_model
    >>> from purer.meta.maml import MAML, MAMLConfig
    >>> learner = E3BM(MAML(random_model("conv4", 5, 1, 16, seed=0), 5, config=MAMLConfig(inner_steps=3)))
    >>> state = learner.adapt(torch.rand(5, 1, 16, 16), torch.arange(5), 5)
    >>> len(state["fast"]), float(state["weights"].sum())
    (3, 1.0)
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from ..batchnorm import explicit_batch_norm
from ..data.episodes import TaskBatch
from ..zoo.architectures import Classifier
from .base import InputSpec, MetaLearner
from .maml import MAML, MAMLConfig
from .mtl import MTL, MTLConfig
from .task_adaptive import Params, inner_grads

BASES = ("maml", "mtl")


@dataclass
class E3BMConfig:
    """Settings of :class:`E3BM` (the release's soft weight).

    Attributes:
        base: the base learner, ``maml`` or ``mtl`` (its own settings: ``MAMLConfig`` / ``MTLConfig``).
        softweight: λ, how much the hyperprior learners' mappings add to the initial values (1e-4).
    """

    base: str = "maml"
    softweight: float = 1e-4

    def __post_init__(self):
        if self.base not in BASES:
            raise ValueError(f"E3BM's base must be one of {BASES}, got {self.base!r}")
        if self.softweight < 0:
            raise ValueError(f"softweight must be >= 0, got {self.softweight}")


class Hyperprior(nn.Module):
    """One epoch-independent hyperprior learner: ``out_m = init_m + λ (W τ + b)_m`` for epoch ``m``."""

    def __init__(self, epochs: int, state_dim: int, init: float, softweight: float):
        super().__init__()
        self.init = nn.Parameter(torch.full((epochs,), float(init)))
        self.weight = nn.Parameter(torch.empty(epochs, state_dim))
        nn.init.kaiming_normal_(self.weight)  # as the release
        self.bias = nn.Parameter(torch.zeros(epochs))
        self.softweight = softweight

    def forward(self, state: torch.Tensor, epoch: int) -> torch.Tensor:
        """``[2D]`` task state -> this epoch's value (0-dim)."""
        return self.init[epoch] + self.softweight * (self.weight[epoch] @ state + self.bias[epoch])


class E3BM(MetaLearner, kind="e3bm"):
    """E3BM on top of a MAML or MTL base learner.

    Args:
        base: the base learner (kept as a submodule; its network and inner loop settings are used), of the
            kind ``config.base``.
        config: the base's kind and the hyperpriors' soft weight (default: the base's kind, λ = 1e-4).

    The adapted state is ``{"fast": [M fast weights], "weights": [M] combination weights}``; :meth:`predict`
    gives ``sum_m weights[m] * logits under fast[m]``.
    """

    def __init__(self, base: MAML | MTL, config: E3BMConfig | None = None):
        if type(base) not in (MAML, MTL):
            raise ValueError(f"E3BM runs on a MAML or MTL base learner, got {type(base).__name__}")
        config = config or E3BMConfig(base=base.kind)
        if config.base != base.kind:
            raise ValueError(f"E3BM's config names a {config.base} base, got a {base.kind} learner")
        super().__init__(base.input_spec)
        self.base, self.config = base, config
        self.way = base.way
        self.epochs = base.config.inner_steps
        dim = base.model.feature_dim if isinstance(base, MAML) else base._feature_dim
        self.combination = Hyperprior(self.epochs, 2 * dim, 1 / self.epochs, self.config.softweight)
        self.basestep = Hyperprior(self.epochs, 2 * dim, base.config.inner_lr, self.config.softweight)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.base.embed(x)

    def _problem(self) -> tuple[Params, Callable[[Params, torch.Tensor], torch.Tensor], str]:
        """The base's inner problem: the initial adapted weights, ``features(weights, prepared x) -> [B, D]``
        and the name prefix of the head's weight and bias among the adapted weights."""
        base = self.base
        if isinstance(base, MTL):
            ss = base.ss_weights()
            return dict(base.head.named_parameters()), lambda p, x: functional_call(base.encoder, ss, (x,)), ""
        encoder = base.model.encoder
        return (dict(base.model.named_parameters()),
                lambda p, x: functional_call(encoder, {n[8:]: v for n, v in p.items() if n.startswith("encoder.")},
                                             (x,)), "head.")

    def _epochs(self, sx: torch.Tensor, sy: torch.Tensor, functional: bool, second_order: bool
                ) -> tuple[list[Params], torch.Tensor, Callable]:
        """The inner loop on prepared support inputs: every epoch's weights, the combination weights ``[M]``
        (a softmax over epochs) and the features function."""
        params, features, head = self._problem()
        fixed = features(params, sx) if head == "" else None  # MTL: the support features do not change

        def loss_fn(p: Params):
            f = fixed if fixed is not None else features(p, sx)
            return F.cross_entropy(F.linear(f, p[head + "weight"], p[head + "bias"]), sy), f

        fast, scores = [], []
        for m in range(self.epochs):
            grads, f = inner_grads(loss_fn, params, functional=functional, second_order=second_order)
            state = torch.cat([f.mean(0), grads[head + "weight"].mean(0)])
            scores.append(self.combination(state, m))
            lr = self.basestep(state, m)
            params = {n: p - lr * grads[n] for n, p in params.items()}
            fast.append(params)
        return fast, torch.softmax(torch.stack(scores), 0), features

    @staticmethod
    def _ensemble(fast: list[Params], weights: torch.Tensor, features: Callable, head: str, qx: torch.Tensor
                  ) -> torch.Tensor:
        """``sum_m weights[m] * logits of qx under fast[m]`` (MTL's features, which no epoch changes, once)."""
        fixed = features(fast[0], qx) if head == "" else None
        return sum(weights[m] * F.linear(fixed if fixed is not None else features(p, qx), p[head + "weight"],
                                         p[head + "bias"]) for m, p in enumerate(fast))

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, way: int, *, create_graph: bool = False
              ) -> dict:
        self.base._check(way)
        with torch.enable_grad():  # the inner loop needs gradients even under torch.no_grad() at test time
            fast, weights, _ = self._epochs(self.prepare(support_x), support_y, functional=False,
                                            second_order=create_graph and not self.base.config.first_order)
        if not create_graph:
            fast, weights = [{n: p.detach() for n, p in f.items()} for f in fast], weights.detach()
        return {"fast": fast, "weights": weights}

    def predict(self, adapted: dict, x: torch.Tensor) -> torch.Tensor:
        _, features, head = self._problem()
        return self._ensemble(adapted["fast"], adapted["weights"], features, head, self.prepare(x))

    def _query_logits_together(self, batch: TaskBatch) -> torch.Tensor:
        """All tasks at once: the epochs, the hyperpriors and the ensemble vmapped over tasks."""
        self.base._check(batch.way)
        second_order = torch.is_grad_enabled() and not self.base.config.first_order
        _, _, head = self._problem()

        def task(sx: torch.Tensor, qx: torch.Tensor) -> torch.Tensor:
            fast, weights, features = self._epochs(sx, batch.support_y, functional=True,
                                                   second_order=not self.base.config.first_order)
            return self._ensemble(fast, weights, features, head, qx)

        network = self.base.model if isinstance(self.base, MAML) else self.base.encoder
        with explicit_batch_norm(network) if second_order else contextlib.nullcontext():
            return vmap(task, randomness="different")(self.prepare_tasks(batch.support_x),
                                                       self.prepare_tasks(batch.query_x))

    def test_cost(self) -> dict:
        return {**self.base.test_cost(), "params": self.base.test_cost()["params"] + sum(
            p.numel() for p in [*self.combination.parameters(), *self.basestep.parameters()]),
                "ensemble": self.epochs}

    def _network(self) -> tuple[dict | None, int]:
        return self.base._network()

    def _folder_config(self) -> dict:
        return {"e3bm": asdict(self.config), **self.base._folder_config()}

    @classmethod
    def _from_folder_config(cls, network: Classifier, input_spec: InputSpec | None, config: dict) -> "E3BM":
        e3bm = E3BMConfig(**config["e3bm"])
        base = (MTL if e3bm.base == "mtl" else MAML)._from_folder_config(network, input_spec, config)
        return cls(base, e3bm)

    @classmethod
    def over(cls, model: Classifier, way: int, input_spec: InputSpec | None, config: E3BMConfig,
             maml: MAMLConfig | None = None, mtl: MTLConfig | None = None) -> "E3BM":
        """E3BM over a fresh base learner of ``config.base`` around ``model`` (with ``maml`` or ``mtl`` settings)."""
        base = MAML(model, way, input_spec, maml) if config.base == "maml" else MTL(model, way, input_spec, mtl)
        return cls(base, config)
