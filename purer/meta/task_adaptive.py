"""Task-adaptive MAML: one gradient-based learner whose inner loop has three pluggable parts.

Description:
    A gradient-based meta-learner's inner loop is an *initialisation*, an *update rule* and an *inner loss*.
    MAML takes them plain (the meta-learned weights, SGD at a fixed lr, support cross-entropy); Baik et al.'s
    task-adaptive learners each make one of them depend on the task:

    * initialisation, **L2F** (learning to forget): a task-conditioned attenuation of the initialisation,
      ``θ_0 ← γ ⊙ θ_0`` with one ``γ_l`` per layer (parameter tensor) from
      ``γ = g_ψ(mean_l ∇_θ L_S(θ_0))``, ``g_ψ`` an MLP (L -> L -> L, ReLU, sigmoid): :class:`L2FAttenuation`;
    * update rule, **ALFA** (adaptive learning of hyperparameters): per step ``j`` and layer ``l`` a learning
      rate and weight decay generated from the task's state ``τ_j = [mean_l θ_j ; mean_l ∇L]`` by
      ``g_φ`` (2L -> 2L -> 2L, ReLU):
      ``θ_{j+1} = (1 - β_j β^0_j) ⊙ θ_j - α_j α^0_j ⊙ ∇L`` with meta-learned per-step per-layer terms
      ``α^0`` (initialised to the inner lr) and ``β^0`` (to the inner lr times the weight decay 5e-4), the
      authors' release: :class:`ALFAUpdate`;
    * inner loss, **MeTAL** (meta-learning with task-adaptive loss): the inner loss is
      ``L_S(θ) + l^s_φ(τ^s) + l^q_φ(τ^q)``, per-step two-layer loss networks over the support examples'
      state ``τ^s`` (their loss, the weights' layer means, their logits, their one-hot labels) and the
      unlabelled query examples' state ``τ^q`` (the weights' layer means, their logits, their negative
      entropy; never their labels), each loss network's weights affinely transformed per task
      (``(1 + m γ) W + o β``, ``γ, β`` generated from the task's state, ``m, o`` meta-learned from 0):
      :class:`MeTALLoss`.  It makes the learner transductive: ``adapt`` needs the task's query images.

    :class:`TaskAdaptiveMAML` takes any combination (``TaskAdaptiveConfig``): all plain is MAML itself (the
    same numbers, tested), one part each is L2F, ALFA or MeTAL, all three is their combination TAO.  The
    inner loop's length, lr and order come from :class:`~purer.meta.MAMLConfig`, as MAML's.  One inner loop
    serves adapting one task (autograd) and a batch of tasks vmapped together (``torch.func.grad``):
    :func:`inner_grads`.

    Not here: MAML++'s extras that the authors' code builds on (per-step BatchNorm statistics, the
    multi-step loss, cosine-annealed outer lr); MeTAL's single forward pass of support and query together
    (here each set is its own BatchNorm batch, as everywhere in purer); ANIL with these parts (ANIL stays
    the head-only member of the family, without them).  ALFA's and MeTAL's per-step networks fix the number
    of inner steps, so test-time selection tunes no steps for them (nor an lr for ALFA, which generates it).

References:
    Baik, Hong, Lee, "Learning to Forget for Meta-Learning", CVPR 2020 (L2F).
    Baik, Choi, Choi, Kim, Lee, "Meta-Learning with Adaptive Hyperparameters", NeurIPS 2020 (ALFA).
    Baik, Choi, Kim, Cho, Min, Lee, "Meta-Learning with Task-Adaptive Loss Function for Few-Shot
    Learning", ICCV 2021 (MeTAL; TAO is its combination with ALFA and L2F).
    Finn, Abbeel, Levine, "Model-Agnostic Meta-Learning", ICML 2017.

Example:
    >>> from purer.meta.init import random_model
    >>> learner = TaskAdaptiveMAML(random_model("conv4", 5, 1, 16, seed=0), 5,
    ...                            parts=TaskAdaptiveConfig(init="l2f", update="alfa"))
    >>> fast = learner.adapt(torch.rand(5, 1, 16, 16), torch.arange(5), 5)
    >>> learner.predict(fast, torch.rand(10, 1, 16, 16)).shape
    torch.Size([10, 5])
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from ..batchnorm import explicit_batch_norm
from ..data.episodes import TaskBatch
from ..zoo.architectures import Classifier
from .base import InputSpec
from .maml import MAML, MAMLConfig

Params = dict[str, torch.Tensor]
INITS, UPDATES, LOSSES = ("plain", "l2f"), ("sgd", "alfa"), ("ce", "metal")
#: The family's named members, ``meta.learner`` names: which part each changes.
MEMBERS = {"l2f": {"init": "l2f"}, "alfa": {"update": "alfa"}, "metal": {"loss": "metal"},
           "tao": {"init": "l2f", "update": "alfa", "loss": "metal"}}


def inner_grads(loss_fn: Callable[[Params], tuple[torch.Tensor, Any]], params: Params, *, functional: bool,
                second_order: bool) -> tuple[Params, Any]:
    """``∇_params loss_fn(params)`` and ``loss_fn``'s auxiliary output (``loss_fn -> (loss, aux)``, ``aux`` tensors
    or ``()``).

    ``functional``: with ``torch.func.grad``, so it runs under ``vmap`` (differentiable by the caller's
    autograd unless not ``second_order``); else with ``torch.autograd.grad`` (a graph through the gradient
    only if ``second_order``).  Either way, without ``second_order`` the gradient is a constant.
    """
    if functional:
        grads, aux = grad(loss_fn, has_aux=True)(params)
        return (grads if second_order else {n: g.detach() for n, g in grads.items()}), aux
    loss, aux = loss_fn(params)
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=second_order)
    return dict(zip(params, grads)), aux


def layer_means(tensors: Params) -> torch.Tensor:
    """``[L]``: the mean of every tensor (per layer, as the papers' task states)."""
    return torch.stack([t.mean() for t in tensors.values()])


def standardise(x: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / (std + 1e-12)`` over all of ``x`` (MeTAL's normalisation of a task state)."""
    return (x - x.mean()) / (x.std() + 1e-12)


@dataclass
class TaskAdaptiveConfig:
    """Which parts of the inner loop adapt to the task, and the parts' own settings.

    Attributes:
        init: ``plain`` (MAML's) or ``l2f`` (the task-conditioned attenuation).
        update: ``sgd`` (MAML's) or ``alfa`` (generated per-step per-layer lr and weight decay).
        loss: ``ce`` (MAML's) or ``metal`` (the meta-learned task-adaptive loss, also over the query images).
        alfa_weight_decay: the weight decay ALFA's ``β^0`` starts from (times the inner lr; the release's 5e-4).
    """

    init: str = "plain"
    update: str = "sgd"
    loss: str = "ce"
    alfa_weight_decay: float = 5e-4

    def __post_init__(self):
        for name, value, allowed in (("init", self.init, INITS), ("update", self.update, UPDATES),
                                     ("loss", self.loss, LOSSES)):
            if value not in allowed:
                raise ValueError(f"task-adaptive {name} must be one of {allowed}, got {value!r}")
        if self.alfa_weight_decay < 0:
            raise ValueError(f"alfa_weight_decay must be >= 0, got {self.alfa_weight_decay}")

    @classmethod
    def member(cls, name: str) -> "TaskAdaptiveConfig":
        """The parts of the named member (``l2f``, ``alfa``, ``metal``, ``tao``)."""
        return cls(**MEMBERS[name])


class L2FAttenuation(nn.Module):
    """L2F: ``θ_0 -> γ ⊙ θ_0``, ``γ = sigmoid-MLP(layer means of ∇_θ L_S(θ_0)) ∈ (0, 1)^L``."""

    def __init__(self, layers: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(layers, layers), nn.ReLU(), nn.Linear(layers, layers), nn.Sigmoid())

    def gamma(self, grads: Params) -> torch.Tensor:
        """``[L]`` attenuations from the initialisation's support gradients."""
        return self.net(layer_means(grads))

    def forward(self, params: Params, grads: Params) -> Params:
        gamma = self.gamma(grads)
        return {n: gamma[i] * p for i, (n, p) in enumerate(params.items())}


class ALFAUpdate(nn.Module):
    """ALFA's update rule: ``θ ← (1 - β β^0_j) θ - α α^0_j ∇``, ``(α, β) = g_φ([means θ ; means ∇])``.

    Args:
        layers: L, the adapted parameter tensors.
        steps: inner steps (one ``α^0``, ``β^0`` per step and layer).
        lr, weight_decay: ``α^0`` starts at ``lr``, ``β^0`` at ``lr * weight_decay``.
    """

    def __init__(self, layers: int, steps: int, lr: float, weight_decay: float):
        super().__init__()
        self.generator = nn.Sequential(nn.Linear(2 * layers, 2 * layers), nn.ReLU(), nn.Linear(2 * layers, 2 * layers))
        self.alpha0 = nn.Parameter(torch.full((steps, layers), float(lr)))
        self.beta0 = nn.Parameter(torch.full((steps, layers), float(lr * weight_decay)))

    def generate(self, params: Params, grads: Params) -> tuple[torch.Tensor, torch.Tensor]:
        """The generated ``(α, β)``, each ``[L]``, for this task's state."""
        return self.generator(torch.cat([layer_means(params), layer_means(grads)])).chunk(2)

    def forward(self, params: Params, grads: Params, step: int) -> Params:
        alpha, beta = self.generate(params, grads)
        lr, decay = alpha * self.alpha0[step], beta * self.beta0[step]
        return {n: (1 - decay[i]) * p - lr[i] * grads[n] for i, (n, p) in enumerate(params.items())}


class LossNetwork(nn.Module):
    """One step's loss network: per example ``[d] -> [d] -> [1]`` (ReLU), its weights given per task."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, dim), nn.Linear(dim, 1)

    def forward(self, state: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
        """``[M, d]`` task state rows -> the mean loss (0-dim) under ``weights = [W1, b1, W2, b2]``."""
        w1, b1, w2, b2 = weights
        return F.linear(F.relu(F.linear(state, w1, b1)), w2, b2).mean()


class LossAdapter(nn.Module):
    """MeTAL's task-adaptive affine transformation of one loss network's four weight tensors:
    ``W_k -> (1 + m_k γ_k) W_k + o_k β_k``, ``(γ, β) = MLP(task state)``, ``m, o`` meta-learned from 0."""

    def __init__(self, dim: int, tensors: int = 4):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, 2 * tensors))
        self.multiplier = nn.Parameter(torch.zeros(tensors))
        self.offset = nn.Parameter(torch.zeros(tensors))

    def forward(self, task_state: torch.Tensor, weights: list[torch.Tensor]) -> list[torch.Tensor]:
        gamma, beta = self.net(task_state).chunk(2)
        return [(1 + self.multiplier[k] * gamma[k]) * w + self.offset[k] * beta[k] for k, w in enumerate(weights)]


class MeTALLoss(nn.Module):
    """MeTAL's inner loss for step ``j``: ``CE_S + l^s_j(τ^s) + l^q_j(τ^q)`` (see the module docstring).

    Args:
        layers: L, the adapted parameter tensors (their layer means enter the task states).
        way: N (logits and one-hot labels enter the support state).
        steps: inner steps (one pair of loss networks and adapters per step).
    """

    def __init__(self, layers: int, way: int, steps: int):
        super().__init__()
        support_dim, query_dim = 1 + layers + 2 * way, layers + way + 1
        self.support_loss = nn.ModuleList([LossNetwork(support_dim) for _ in range(steps)])
        self.query_loss = nn.ModuleList([LossNetwork(query_dim) for _ in range(steps)])
        self.support_adapter = nn.ModuleList([LossAdapter(1 + layers) for _ in range(steps)])
        self.query_adapter = nn.ModuleList([LossAdapter(query_dim) for _ in range(steps)])

    @staticmethod
    def _weights(net: LossNetwork) -> list[torch.Tensor]:
        return [net.fc1.weight, net.fc1.bias, net.fc2.weight, net.fc2.bias]

    def forward(self, params: Params, support_logits: torch.Tensor, support_y: torch.Tensor,
                query_logits: torch.Tensor, step: int) -> torch.Tensor:
        """Logits ``[M, N]`` of the support (labels ``[M]``) and ``[B, N]`` of the queries (no labels) -> the
        inner loss (0-dim)."""
        ce = F.cross_entropy(support_logits, support_y)
        means = layer_means(params)
        task = standardise(torch.cat([ce.reshape(1), means]))
        onehot = F.one_hot(support_y, support_logits.shape[1]).to(support_logits.dtype)
        support_state = standardise(torch.cat([torch.cat([ce.reshape(1), means]).expand(len(support_logits), -1),
                                               support_logits, onehot], dim=1))
        net = self.support_loss[step]
        support_term = net(support_state, self.support_adapter[step](task, self._weights(net)))
        log_p = query_logits.log_softmax(-1)
        neg_entropy = (log_p.exp() * log_p).sum(-1, keepdim=True)
        query_state = standardise(torch.cat([means.expand(len(query_logits), -1), query_logits, neg_entropy], dim=1))
        net = self.query_loss[step]
        query_term = net(query_state, self.query_adapter[step](query_state.mean(0), self._weights(net)))
        return ce + support_term + query_term


class TaskAdaptiveMAML(MAML, kind="ta-maml"):
    """MAML with a task-adaptive initialisation (L2F), update rule (ALFA) and/or inner loss (MeTAL).

    Args:
        model: the initial network (copied); its head has ``way`` outputs.
        way: classes per task.
        input_spec: normalisation and input size (``None``: images fed unchanged).
        config: the inner loop's lr, steps and order (as MAML's).
        parts: which parts adapt to the task (default: none, i.e. MAML).

    The adapted state is the fast weights ``{name: tensor}``, as MAML's.  With ``parts.loss == "metal"``
    :meth:`adapt` needs ``query_x`` (the task's query images, never their labels).
    """

    def __init__(self, model: Classifier, way: int, input_spec: InputSpec | None = None,
                 config: MAMLConfig | None = None, parts: TaskAdaptiveConfig | None = None):
        super().__init__(model, way, input_spec, config)
        self.parts = parts or TaskAdaptiveConfig()
        layers, steps = len(list(self.model.parameters())), self.config.inner_steps
        self.attenuation = L2FAttenuation(layers) if self.parts.init == "l2f" else None
        self.update_rule = ALFAUpdate(layers, steps, self.config.inner_lr, self.parts.alfa_weight_decay) \
            if self.parts.update == "alfa" else None
        self.inner_loss = MeTALLoss(layers, way, steps) if self.parts.loss == "metal" else None
        self.transductive = self.inner_loss is not None
        # per-step networks fix the number of steps; ALFA generates the lr
        self.tunable = tuple(n for n in ("lr", "steps") if not (
            (n == "lr" and self.update_rule is not None) or
            (n == "steps" and (self.update_rule is not None or self.inner_loss is not None))))

    def _settings(self, lr: float | None, steps: int | None) -> tuple[float, int]:
        lr, steps = super()._settings(lr, steps)
        if steps != self.config.inner_steps and "steps" not in self.tunable:
            raise ValueError(f"this learner's per-step networks (ALFA / MeTAL) were meta-learned for "
                             f"{self.config.inner_steps} inner steps; got steps={steps}")
        return lr, steps

    def _inner(self, params: Params, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor | None, lr: float,
               steps: int, functional: bool, second_order: bool) -> Params:
        """The inner loop on prepared support (and query) inputs from ``params``: the three parts in order."""
        model = self.model

        def ce(p: Params):
            return F.cross_entropy(functional_call(model, p, (sx,)), sy), ()

        if self.attenuation is not None:
            grads, _ = inner_grads(ce, params, functional=functional, second_order=second_order)
            params = self.attenuation(params, grads)
        for step in range(steps):
            if self.inner_loss is None:
                loss_fn = ce
            else:
                def loss_fn(p: Params, step: int = step):
                    return self.inner_loss(p, functional_call(model, p, (sx,)), sy, functional_call(model, p, (qx,)),
                                           step), ()
            grads, _ = inner_grads(loss_fn, params, functional=functional, second_order=second_order)
            params = self.update_rule(params, grads, step) if self.update_rule is not None else \
                {n: p - lr * grads[n] for n, p in params.items()}
        return params

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, way: int, *, create_graph: bool = False,
              lr: float | None = None, steps: int | None = None, query_x: torch.Tensor | None = None) -> Params:
        """Fast weights after the task-adaptive inner loop on the support set (and, for MeTAL, the unlabelled
        ``query_x [B, C, H, W]``)."""
        self._check(way)
        if self.transductive and query_x is None:
            raise ValueError("MeTAL's inner loss reads the task's unlabelled query images: pass query_x=[B, C, H, W]")
        lr, steps = self._settings(lr, steps)
        qx = self.prepare(query_x) if self.transductive else None
        with torch.enable_grad():  # the inner loop needs gradients even under torch.no_grad() at test time
            fast = self._inner(dict(self.model.named_parameters()), self.prepare(support_x), support_y, qx, lr, steps,
                               functional=False, second_order=create_graph and not self.config.first_order)
        return fast if create_graph else {n: p.detach() for n, p in fast.items()}

    def _query_logits_together(self, batch: TaskBatch, *, lr: float | None = None, steps: int | None = None
                               ) -> torch.Tensor:
        """All tasks at once: the task-adaptive inner loop and the query pass vmapped over tasks."""
        self._check(batch.way)
        lr, steps = self._settings(lr, steps)
        params, sy = dict(self.model.named_parameters()), batch.support_y
        second_order = torch.is_grad_enabled() and not self.config.first_order

        def task(sx: torch.Tensor, qx: torch.Tensor) -> torch.Tensor:
            fast = self._inner(params, sx, sy, qx, lr, steps, functional=True, second_order=not self.config.first_order)
            return functional_call(self.model, fast, (qx,))

        with explicit_batch_norm(self.model) if second_order else contextlib.nullcontext():
            return vmap(task, randomness="different")(self.prepare_tasks(batch.support_x),
                                                       self.prepare_tasks(batch.query_x))

    def _folder_config(self) -> dict:
        return {**super()._folder_config(), "task_adaptive": asdict(self.parts)}

    @classmethod
    def _from_folder_config(cls, network: Classifier, input_spec: InputSpec | None, config: dict
                            ) -> "TaskAdaptiveMAML":
        return cls(network, config["way"], input_spec, MAMLConfig(**config["maml"]),
                   TaskAdaptiveConfig(**config["task_adaptive"]))
