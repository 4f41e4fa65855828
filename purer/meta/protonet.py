"""Prototypical networks: classify by the nearest class mean of an encoder's features.

Description:
    The adapted state of a task is its prototypes, the mean feature of each
    class's support images; a query's logits are minus its squared Euclidean
    distances to them. There is no inner loop, so nothing is tuned at test time.
    BatchNorm normalises with batch statistics (running statistics are dropped),
    like the other meta-learners, so the support and the query set are each
    normalised by their own batch.

References:
    Snell, Swersky, Zemel, "Prototypical Networks for Few-shot Learning", NeurIPS 2017.

Example:
    >>> from purer.meta.init import random_model
    >>> learner = ProtoNet(random_model("conv4", 5, 1, 16, seed=0))
    >>> protos = learner.adapt(torch.rand(10, 1, 16, 16), torch.arange(5).repeat_interleave(2), 5)
    >>> protos.shape, learner.predict(protos, torch.rand(3, 1, 16, 16)).shape
    (torch.Size([5, 32]), torch.Size([3, 5]))
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import vmap

from ..data.episodes import TaskBatch
from ..zoo.architectures import Classifier
from ..batchnorm import batch_stats_only
from .base import InputSpec, MetaLearner


def prototypes(features: torch.Tensor, labels: torch.Tensor, way: int) -> torch.Tensor:
    """Class means: features ``[M, D]``, labels ``[M]`` in ``0..way-1`` -> ``[way, D]``.

    A one-hot matrix product, so nothing is read back from the device (and it runs
    under ``vmap``); labels are checked on the CPU at once, elsewhere by an assertion
    the device raises when it gets there.

    Raises:
        ValueError: (CPU) if some label in ``0..way-1`` has no support example, or a label lies outside.
    """
    onehot = (labels[:, None] == torch.arange(way, device=labels.device)).to(features.dtype)  # [M, way]
    counts = onehot.sum(0)
    valid = (counts > 0).all() & (labels >= 0).all() & (labels < way).all()
    if labels.device.type == "cpu" and not torch._C._functorch.is_batchedtensor(labels):
        if not valid:
            raise ValueError(f"every label 0..{way - 1} needs at least one support example (and no other label "
                             f"may occur), got counts {counts.long().tolist()} of {labels.numel()} labels")
    else:
        torch._assert_async(valid, f"every label 0..{way - 1} needs at least one support example")
    return onehot.T @ features / counts.unsqueeze(1)


def neg_sq_distances(x: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, N]`` = minus the squared Euclidean distance of ``x [B, D]`` to ``protos [N, D]``."""
    return -(x.unsqueeze(1) - protos.unsqueeze(0)).pow(2).sum(-1)


class PrototypeClassifier(MetaLearner):
    """Nearest class mean (squared Euclidean) over ``self.features``; no inner loop.

    The adapted state is the prototypes ``[N, D]`` of the support features.
    Subclasses define :meth:`features` (``[B, C, H, W]`` -> ``[B, D]``).
    """

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, way: int, *,
              create_graph: bool = False) -> torch.Tensor:
        protos = prototypes(self.features(support_x), support_y, way)
        return protos if create_graph else protos.detach()

    def predict(self, adapted: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return neg_sq_distances(self.features(x), adapted)


class ProtoNet(PrototypeClassifier, kind="protonet"):
    """Prototypical network over an encoder.

    Args:
        model: a :class:`~purer.zoo.Classifier` (its ``encoder`` is used, the head
            ignored) or any module mapping ``[B, C, H, W]`` to ``[B, D]``; copied.
        input_spec: normalisation and input size (``None``: images fed unchanged).

    The adapted state is the prototypes ``[N, D]``.
    """

    def __init__(self, model: Classifier | nn.Module, input_spec: InputSpec | None = None):
        super().__init__(input_spec)
        encoder = model.encoder if isinstance(model, Classifier) else model
        self.encoder = batch_stats_only(copy.deepcopy(encoder))
        for p in self.encoder.parameters():
            p.requires_grad_(True)
        self._build_args = model.build_args if isinstance(model, Classifier) else None  # for save_pretrained

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.prepare(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def _query_logits_together(self, batch: TaskBatch) -> torch.Tensor:
        """All tasks at once: the encoder vmapped over tasks (each task's BatchNorm on its own batch)."""
        encoder = vmap(self.encoder, randomness="different")  # a random layer (Dropout) draws per task
        support = encoder(self.prepare_tasks(batch.support_x))  # [T, N*K, D]
        query = encoder(self.prepare_tasks(batch.query_x))
        protos = vmap(prototypes, in_dims=(0, None, None))(support, batch.support_y, batch.way)
        return -(query.unsqueeze(2) - protos.unsqueeze(1)).pow(2).sum(-1)

    def _network(self) -> tuple[dict | None, None]:
        return self._build_args, None  # any way: prototypes, no head

    @classmethod
    def _from_folder_config(cls, network: Classifier, input_spec: InputSpec | None, config: dict) -> "ProtoNet":
        return cls(network, input_spec)
