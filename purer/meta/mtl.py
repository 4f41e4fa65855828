"""Meta-transfer learning (MTL): a frozen pre-trained encoder, meta-learned scaling and shifting of its weights.

Description:
    MTL keeps a pre-trained deep network's weights ``Θ`` frozen and meta-learns, for every convolution, a
    *scaling* ``Φ_S1`` (one scalar per kernel, ``[C_out, C_in, 1, 1]``, initialised to 1) and a *shifting*
    ``Φ_S2`` (one per output channel, initialised to 0) of them:
    ``SS(X; W, b; Φ_S{1,2}) = (W ⊙ Φ_S1) X + (b + Φ_S2)`` (eq. 6 of the paper).  The base-learner is the
    classifier head ``θ``, adapted on the support features by gradient descent (eq. 3,
    ``θ' = θ - β ∇_θ L_T(θ)``); the outer loss on the query set updates ``Φ_S`` and the head's initialisation
    ``θ`` (eq. 4 and 5).  Every other weight of ``Θ`` (BatchNorm's affine included) stays as it was: the frozen
    weights are buffers of this learner, never parameters, so no optimiser can move them.  A convolution
    without a bias gets no shifting (as the authors' release); before a batch-statistics BatchNorm a shifting
    would be cancelled anyway.

    In the data-free setting the pre-trained encoder is the zoo distilled into one network
    (``meta.init: zoo-student``, :mod:`purer.student`) or the teachers' average (``meta.init: avg-teachers``);
    a run refuses a random one.  MTL's hard-task (HT) meta-batch is a sampler of its own, usable with any
    learner: :mod:`purer.meta.hard_tasks`.  Defaults: the release's inner loop (SGD at lr 0.01, 50 steps of
    its PyTorch code); the inner steps are differentiated through (eq. 4-5; the release itself takes them
    first order: ``first_order=True``).  Not here: the release's separate outer learning rates (1e-4 for
    ``Φ_S``, 1e-3 for the head) and their step decay; the run's one outer Adam trains both.

References:
    Sun, Liu, Chua, Schiele, "Meta-Transfer Learning for Few-Shot Learning", CVPR 2019.

Example:
    >>> from purer.meta.init import random_model
    >>> learner = MTL(random_model("conv4", 5, 1, 16, seed=0), way=5)
    >>> sorted({name.split(".")[0] for name, _ in learner.named_parameters()})
    ['head', 'scale', 'shift']
    >>> head = learner.adapt(torch.rand(5, 1, 16, 16), torch.arange(5), 5)
    >>> learner.predict(head, torch.rand(10, 1, 16, 16)).shape
    torch.Size([10, 5])
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from ..batchnorm import batch_stats_only
from ..data.episodes import TaskBatch
from ..zoo.architectures import Classifier
from .base import InputSpec, MetaLearner, check_head_way
from .maml import MAMLConfig, functional_sgd_steps, sgd_steps


@dataclass
class MTLConfig(MAMLConfig):
    """The base-learner's inner loop: :class:`~purer.meta.MAMLConfig`'s fields at the release's values (SGD at
    lr 0.01 for 50 steps); ``first_order`` treats the inner gradients as constants (the release does; the
    paper's eq. 4-5 do not)."""

    inner_lr: float = 0.01
    inner_steps: int = 50


def freeze_as_buffers(module: nn.Module) -> nn.Module:
    """Turn every parameter of ``module`` (in place) into a buffer of the same name: kept in the state dict,
    moved with the module, never returned by ``parameters()``."""
    for m in module.modules():
        for name, p in list(m.named_parameters(recurse=False)):
            delattr(m, name)
            m.register_buffer(name, p.detach().clone())
    return module


def _key(name: str) -> str:
    return name.replace(".", "__")  # ParameterDict keys cannot hold dots


class MTL(MetaLearner, kind="mtl"):
    """Meta-transfer learning over a pre-trained :class:`~purer.zoo.Classifier`.

    Args:
        model: the pre-trained network (copied): its encoder is frozen, its head (``way`` outputs) is the
            base-learner's meta-learned initialisation.
        way: classes per task.
        input_spec: normalisation and input size (``None``: images fed unchanged).
        config: the inner loop.

    Attributes:
        encoder: the frozen encoder ``Θ`` (buffers only).
        scale, shift: ``Φ_S1`` and ``Φ_S2`` per convolution (keys: the convolution's name, dots as ``__``).
        head: the base-learner's initialisation ``θ``.

    The adapted state is the head's fast weights ``{"weight": [N, D], "bias": [N]}``.
    """

    tunable = ("lr", "steps")

    def __init__(self, model: Classifier, way: int, input_spec: InputSpec | None = None,
                 config: MTLConfig | None = None):
        super().__init__(input_spec)
        if model.head.out_features != way:
            raise ValueError(f"the model's head has {model.head.out_features} outputs but way={way}; "
                             f"build it with purer.meta.init.from_model(model, way)")
        self.way, self.config = way, config or MTLConfig()
        self.encoder = freeze_as_buffers(batch_stats_only(copy.deepcopy(model.encoder)))
        self.head = copy.deepcopy(model.head)
        for p in self.head.parameters():
            p.requires_grad_(True)
        self.scale, self.shift = nn.ParameterDict(), nn.ParameterDict()
        self._convs: list[str] = []
        for name, m in self.encoder.named_modules():
            if isinstance(m, nn.Conv2d):
                self._convs.append(name)
                with torch.device(m.weight.device):
                    self.scale[_key(name)] = nn.Parameter(torch.ones(*m.weight.shape[:2], 1, 1))
                    if m.bias is not None:
                        self.shift[_key(name)] = nn.Parameter(torch.zeros(m.weight.shape[0]))
        if not self._convs:
            raise ValueError("MTL scales and shifts convolutions, and this encoder has none")
        self._build_args = model.build_args
        self._feature_dim = model.feature_dim

    def _check(self, way: int) -> None:
        check_head_way(self.way, way)

    def ss_weights(self) -> dict[str, torch.Tensor]:
        """The scaled and shifted convolution weights ``{"<conv>.weight": W ⊙ Φ_S1, "<conv>.bias": b + Φ_S2}``."""
        out = {}
        for name in self._convs:
            conv = self.encoder.get_submodule(name)
            out[f"{name}.weight"] = conv.weight * self.scale[_key(name)]
            if conv.bias is not None:
                out[f"{name}.bias"] = conv.bias + self.shift[_key(name)]
        return out

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Network inputs (already prepared) ``[B, C, H, W]`` -> the SS encoder's features ``[B, D]``."""
        return functional_call(self.encoder, self.ss_weights(), (x,))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.prepare(x))

    def _settings(self, lr: float | None, steps: int | None) -> tuple[float, int]:
        return self.config.inner_lr if lr is None else lr, self.config.inner_steps if steps is None else steps

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, way: int, *, create_graph: bool = False,
              lr: float | None = None, steps: int | None = None) -> dict[str, torch.Tensor]:
        """The head's fast weights after ``steps`` SGD steps at ``lr`` (default: the config's) on the support
        features."""
        self._check(way)
        lr, steps = self._settings(lr, steps)
        feats = self.features(self.prepare(support_x))
        if not create_graph:
            feats = feats.detach()
        return sgd_steps(dict(self.head.named_parameters()),
                         lambda p: F.cross_entropy(F.linear(feats, p["weight"], p["bias"]), support_y), lr, steps,
                         create_graph=create_graph, first_order=self.config.first_order)

    def predict(self, adapted: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.features(self.prepare(x)), adapted["weight"], adapted["bias"])

    def _query_logits_together(self, batch: TaskBatch, *, lr: float | None = None, steps: int | None = None
                               ) -> torch.Tensor:
        """All tasks at once: the SS encoder and the head's inner loop vmapped over tasks."""
        self._check(batch.way)
        lr, steps = self._settings(lr, steps)
        head, sy, create_graph = dict(self.head.named_parameters()), batch.support_y, torch.is_grad_enabled()
        weights = self.ss_weights()

        def task(sx: torch.Tensor, qx: torch.Tensor) -> torch.Tensor:
            feats = functional_call(self.encoder, weights, (sx,))
            if not create_graph:
                feats = feats.detach()
            loss = lambda p: F.cross_entropy(F.linear(feats, p["weight"], p["bias"]), sy)
            fast = functional_sgd_steps(head, loss, lr, steps, self.config.first_order)
            return F.linear(functional_call(self.encoder, weights, (qx,)), fast["weight"], fast["bias"])

        return vmap(task, randomness="different")(self.prepare_tasks(batch.support_x),
                                                   self.prepare_tasks(batch.query_x))

    def adapted_classifier(self, adapted: dict[str, torch.Tensor]) -> Classifier:
        """A private :class:`~purer.zoo.Classifier` computing what ``adapted`` predicts: the encoder with its
        scaled and shifted weights written in, and the adapted head (what a calibration trains)."""
        encoder = copy.deepcopy(self.encoder)
        ss = {k: v.detach() for k, v in self.ss_weights().items()}
        for m_name, m in encoder.named_modules():
            for name, b in list(m.named_buffers(recurse=False)):
                if b is None or name in ("running_mean", "running_var", "num_batches_tracked"):
                    continue
                full = f"{m_name}.{name}" if m_name else name
                delattr(m, name)
                m.register_parameter(name, nn.Parameter(ss.get(full, b).clone()))
        with adapted["weight"].device:  # the head is made on the device, not copied there
            model = Classifier(encoder, self._feature_dim, self.way, self._build_args)
        with torch.no_grad():
            model.head.weight.copy_(adapted["weight"])
            model.head.bias.copy_(adapted["bias"])
        return model

    def test_cost(self) -> dict:
        frozen = sum(b.numel() for b in self.encoder.buffers())
        return {"params": frozen + sum(p.numel() for p in self.parameters()), "models": 1}

    def _network(self) -> tuple[dict | None, int]:
        return self._build_args, self.way

    def _folder_config(self) -> dict:
        return {"mtl": asdict(self.config)}

    @classmethod
    def _from_folder_config(cls, network: Classifier, input_spec: InputSpec | None, config: dict) -> "MTL":
        return cls(network, config["way"], input_spec, MTLConfig(**config["mtl"]))
