"""MAML (second- or first-order) and ANIL, on any zoo architecture via ``torch.func.functional_call``.

Description:
    MAML learns an initialisation that a few SGD steps on a task's support set
    turn into a good classifier for that task; the outer loss is the query
    cross-entropy after those steps. Second-order MAML differentiates through the
    inner steps; first-order MAML treats the inner gradients as constants. ANIL
    adapts only the linear head in the inner loop (the encoder is shared).
    BatchNorm always normalises with batch statistics (running statistics are
    dropped), as is standard for MAML, so support and query are normalised by
    their own batches.

References:
    Finn, Abbeel, Levine, "Model-Agnostic Meta-Learning", ICML 2017.
    Raghu et al., "Rapid Learning or Feature Reuse?" (ANIL), ICLR 2020.

Example:
    >>> from purer.meta.init import random_model
    >>> learner = MAML(random_model("conv4", 5, 1, 16, seed=0), way=5)
    >>> fast = learner.adapt(torch.rand(5, 1, 16, 16), torch.arange(5), 5)
    >>> learner.predict(fast, torch.rand(10, 1, 16, 16)).shape
    torch.Size([10, 5])
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from ..data.episodes import TaskBatch
from ..zoo.architectures import Classifier
from ..batchnorm import batch_stats_only, explicit_batch_norm
from .base import InputSpec, MetaLearner, check_head_way


@dataclass
class MAMLConfig:
    """Inner-loop settings; defaults are the release's scripts (1 step of SGD at lr 0.01).

    Attributes:
        inner_lr: SGD learning rate of the inner loop.
        inner_steps: SGD steps on the support set.
        first_order: ignore second derivatives (needed for large models; then no
            gradient reaches the support images through the inner loop).
    """

    inner_lr: float = 0.01
    inner_steps: int = 1
    first_order: bool = False

    def __post_init__(self):
        if self.inner_lr <= 0 or self.inner_steps < 1:
            raise ValueError(f"the inner loop needs inner_lr > 0 and inner_steps >= 1, got inner_lr={self.inner_lr} "
                             f"and inner_steps={self.inner_steps}")


def sgd_steps(params: dict[str, torch.Tensor], loss_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor],
              lr: float, steps: int, *, create_graph: bool = False, first_order: bool = False
              ) -> dict[str, torch.Tensor]:
    """``steps`` plain SGD steps on ``loss_fn(params)``, functionally: returns new tensors.

    With ``create_graph`` the result stays differentiable: through second
    derivatives in the initial ``params`` and in whatever ``loss_fn`` reads (e.g.
    support images), or, with ``first_order``, in the initial ``params`` only, each
    step's gradient treated as a constant. Without it the result is detached.
    """
    second_order = create_graph and not first_order
    # The inner loop needs gradients even when called under torch.no_grad() at test time.
    with torch.enable_grad():
        for _ in range(steps):
            grads = torch.autograd.grad(loss_fn(params), list(params.values()), create_graph=second_order)
            params = {n: p - lr * g for (n, p), g in zip(params.items(), grads)}
    return params if create_graph else {n: p.detach() for n, p in params.items()}


def functional_sgd_steps(params: dict[str, torch.Tensor], loss_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor],
                         lr: float, steps: int, first_order: bool) -> dict[str, torch.Tensor]:
    """:func:`sgd_steps` with ``torch.func.grad``, so it runs under ``vmap`` (one task per vmapped slice).

    Differentiable by the caller's autograd (second order through the inner steps)
    unless ``first_order``, which treats each step's gradient as a constant; under
    ``torch.no_grad()`` nothing outside the inner loop is recorded.
    """
    for _ in range(steps):
        grads = grad(loss_fn)(params)
        if first_order:
            grads = {n: g.detach() for n, g in grads.items()}
        params = {n: p - lr * grads[n] for n, p in params.items()}
    return params


class MAML(MetaLearner, kind="maml"):
    """Model-agnostic meta-learning over a :class:`~purer.zoo.Classifier`.

    Args:
        model: the initial network (copied; see :mod:`purer.meta.init`); its head
            must have ``way`` outputs.
        way: classes per task (N); episode labels are ``0..N-1``.
        input_spec: normalisation and input size (``None``: images fed unchanged).
        config: inner-loop settings.

    The adapted state is a dict of fast weights ``{name: tensor}``.
    """

    tunable = ("lr", "steps")

    def __init__(self, model: Classifier, way: int, input_spec: InputSpec | None = None,
                 config: MAMLConfig | None = None):
        super().__init__(input_spec)
        if model.head.out_features != way:
            raise ValueError(f"the model's head has {model.head.out_features} outputs but way={way}; "
                             f"build it with purer.meta.init.from_model(model, way)")
        self.model = batch_stats_only(copy.deepcopy(model))
        for p in self.model.parameters():
            p.requires_grad_(True)
        self.way = way
        self.config = config or MAMLConfig()

    def _check(self, way: int) -> None:
        check_head_way(self.way, way)

    def _inner_loop(self, params: dict[str, torch.Tensor], loss_fn, create_graph: bool, lr: float | None,
                    steps: int | None) -> dict[str, torch.Tensor]:
        return sgd_steps(params, loss_fn, self.config.inner_lr if lr is None else lr,
                         self.config.inner_steps if steps is None else steps, create_graph=create_graph,
                         first_order=self.config.first_order)

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, way: int, *, create_graph: bool = False,
              lr: float | None = None, steps: int | None = None) -> dict[str, torch.Tensor]:
        """Fast weights after ``steps`` SGD steps at ``lr`` (default: the config's) on the support set."""
        self._check(way)
        x = self.prepare(support_x)
        return self._inner_loop(dict(self.model.named_parameters()),
                                lambda p: F.cross_entropy(functional_call(self.model, p, (x,)), support_y),
                                create_graph, lr, steps)

    def predict(self, adapted: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, adapted, (self.prepare(x),))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(self.prepare(x))

    def _settings(self, lr: float | None, steps: int | None) -> tuple[float, int]:
        return self.config.inner_lr if lr is None else lr, self.config.inner_steps if steps is None else steps

    def _query_logits_together(self, batch: TaskBatch, *, lr: float | None = None, steps: int | None = None
                               ) -> torch.Tensor:
        """All tasks at once: the inner loop and the query pass vmapped over tasks (each task's BatchNorm on
        its own batch); equal to adapting one task after another."""
        self._check(batch.way)
        lr, steps = self._settings(lr, steps)
        params, sy = dict(self.model.named_parameters()), batch.support_y
        first_order = self.config.first_order
        second_order = torch.is_grad_enabled() and not first_order

        def task(sx: torch.Tensor, qx: torch.Tensor) -> torch.Tensor:
            loss = lambda p: F.cross_entropy(functional_call(self.model, p, (sx,)), sy)
            return functional_call(self.model, functional_sgd_steps(params, loss, lr, steps, first_order), (qx,))

        with explicit_batch_norm(self.model) if second_order else contextlib.nullcontext():
            return vmap(task, randomness="different")(self.prepare_tasks(batch.support_x),
                                                       self.prepare_tasks(batch.query_x))

    def _network(self) -> tuple[dict | None, int]:
        return self.model.build_args, self.model.head.out_features

    def _folder_config(self) -> dict:
        return {"maml": asdict(self.config)}

    @classmethod
    def _from_folder_config(cls, network: Classifier, input_spec: InputSpec | None, config: dict) -> "MAML":
        return cls(network, config["way"], input_spec, MAMLConfig(**config["maml"]))


class ANIL(MAML, kind="anil"):
    """Almost No Inner Loop: MAML whose inner loop adapts only the linear head.

    Support features are computed once per task, so each inner step costs a
    linear layer only. The adapted state is ``{"weight": [N, D], "bias": [N]}``.
    """

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, way: int, *, create_graph: bool = False,
              lr: float | None = None, steps: int | None = None) -> dict[str, torch.Tensor]:
        self._check(way)
        feats = self.model.encoder(self.prepare(support_x))
        if not create_graph:
            feats = feats.detach()
        head = dict(self.model.head.named_parameters())
        return self._inner_loop(head, lambda p: F.cross_entropy(F.linear(feats, p["weight"], p["bias"]), support_y),
                                create_graph, lr, steps)

    def predict(self, adapted: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.model.encoder(self.prepare(x)), adapted["weight"], adapted["bias"])

    def _query_logits_together(self, batch: TaskBatch, *, lr: float | None = None, steps: int | None = None
                               ) -> torch.Tensor:
        self._check(batch.way)
        lr, steps = self._settings(lr, steps)
        head, sy, create_graph = dict(self.model.head.named_parameters()), batch.support_y, torch.is_grad_enabled()

        def task(sx: torch.Tensor, qx: torch.Tensor) -> torch.Tensor:
            feats = self.model.encoder(sx)
            if not create_graph:
                feats = feats.detach()
            loss = lambda p: F.cross_entropy(F.linear(feats, p["weight"], p["bias"]), sy)
            fast = functional_sgd_steps(head, loss, lr, steps, self.config.first_order)
            return F.linear(self.model.encoder(qx), fast["weight"], fast["bias"])

        return vmap(task, randomness="different")(self.prepare_tasks(batch.support_x),
                                                   self.prepare_tasks(batch.query_x))
