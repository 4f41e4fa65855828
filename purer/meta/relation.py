"""Relation Networks: a learned relation module scores each (query, class) pair of feature maps.

Description:
    The embedding module ``f`` maps an image to a feature map; a class's map is the element-wise sum of its
    support images' maps (the paper's K-shot rule).  The relation module ``g`` takes the concatenation
    ``C(f(x_j), f(x_i))`` along the channels and gives the relation score ``r_{i,j} = g(C(f(x_i), f(x_j)))``
    in ``[0, 1]`` (eq. 1 and 3 of the paper).  Training regresses the scores on the match:
    ``sum_{i,j} (r_{i,j} - 1(y_i == y_j))^2`` (eq. 2), the squared error to the one-hot label, here summed over
    classes and averaged over queries (:meth:`RelationNetwork.query_loss`), so the outer step, the
    curriculum's adversarial term and ``outer_loss`` all use it.  :meth:`predict` returns the scores, whose
    argmax is the predicted class.  No inner loop: nothing to tune at test time.

    ``f`` is the learner's network's encoder up to its feature map (purer's own architectures: Conv4 before
    flattening, the ResNets before global pooling).  ``g`` follows the paper: two blocks of
    [conv3x3 (as many channels as the map), BatchNorm, ReLU, max-pool 2], then a ReLU layer of 8 units and a
    sigmoid unit.  The paper's 4-block embedding keeps 19x19 maps at 84 px (its last two blocks do not pool);
    purer's Conv4 pools every block (2x2 maps at 32 px), so each relation block pools only while its map is
    larger than one pixel (and its convolutions are padded, as in the paper's Omniglot module).  BatchNorm
    uses batch statistics throughout (a relation block's batch: the task's query-class pairs).  ICFIL and
    support CE cannot follow a Relation Network (no linear head on one network's features); a run refuses
    them at config time.

References:
    Sung, Yang, Zhang, Xiang, Torr, Hospedales, "Learning to Compare: Relation Network for Few-Shot
    Learning", CVPR 2018.

Example:
    >>> from purer.meta.init import random_model
    >>> learner = RelationNetwork(random_model("conv4", 5, 1, 16, seed=0))
    >>> state = learner.adapt(torch.rand(10, 1, 16, 16), torch.arange(5).repeat_interleave(2), 5)
    >>> scores = learner.predict(state, torch.rand(3, 1, 16, 16))
    >>> scores.shape, bool(((scores >= 0) & (scores <= 1)).all())
    (torch.Size([3, 5]), True)
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

from ..batchnorm import batch_stats_only
from ..data.episodes import TaskBatch
from ..zoo.architectures import Classifier
from .base import InputSpec, MetaLearner


@dataclass
class RelationConfig:
    """Settings of :class:`RelationNetwork` (the paper's).

    Attributes:
        hidden: units of the relation module's hidden fully connected layer (8 in the paper).
    """

    hidden: int = 8

    def __post_init__(self):
        if self.hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {self.hidden}")


def map_depth(encoder: nn.Module, arch: str = "") -> int:
    """How many leading layers of ``encoder`` (a ``nn.Sequential`` of purer's architectures) give its feature
    map: all but a trailing flatten / global pooling.

    Raises:
        ValueError: an encoder without that form (``tv:``/``timm:`` networks, a user's class).
    """
    if isinstance(encoder, nn.Sequential):
        depth = len(encoder)
        while depth and isinstance(encoder[depth - 1], (nn.Flatten, nn.AdaptiveAvgPool2d)):
            depth -= 1
        if 0 < depth < len(encoder):
            return depth
    raise ValueError(f"a Relation Network compares feature maps, which the {arch or 'given'} encoder does not "
                     "expose; use one of purer's own architectures (meta.arch=conv4, resnet10, resnet12, resnet18)")


class RelationModule(nn.Module):
    """``g``: pairs ``[P, 2C, h, w]`` -> relation scores ``[P]`` in ``[0, 1]`` (see the module docstring)."""

    def __init__(self, channels: int, size: tuple[int, int], hidden: int):
        super().__init__()
        blocks, (h, w) = [], size
        for i in range(2):
            pool = min(h, w) > 1
            blocks.append(nn.Sequential(nn.Conv2d(2 * channels if i == 0 else channels, channels, 3, padding=1),
                                        nn.BatchNorm2d(channels), nn.ReLU(),
                                        nn.MaxPool2d(2) if pool else nn.Identity()))
            h, w = (h // 2, w // 2) if pool else (h, w)
        self.blocks = batch_stats_only(nn.Sequential(*blocks))
        self.fc1, self.fc2 = nn.Linear(channels * h * w, hidden), nn.Linear(hidden, 1)

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        x = self.blocks(pairs).flatten(1)
        return torch.sigmoid(self.fc2(F.relu(self.fc1(x)))).squeeze(-1)


def relation_scores(module: RelationModule, query_maps: torch.Tensor, class_maps: torch.Tensor) -> torch.Tensor:
    """Scores ``[B, N]`` of query maps ``[B, C, h, w]`` against class maps ``[N, C, h, w]``."""
    b, n = len(query_maps), len(class_maps)
    pairs = torch.cat([class_maps.unsqueeze(0).expand(b, *class_maps.shape),
                       query_maps.unsqueeze(1).expand(b, n, *query_maps.shape[1:])], dim=2)  # [B, N, 2C, h, w]
    return module(pairs.flatten(0, 1)).view(b, n)


def class_maps(maps: torch.Tensor, labels: torch.Tensor, way: int) -> torch.Tensor:
    """The paper's K-shot class maps: the sum of each class's support maps, ``[M, C, h, w]`` -> ``[way, C, h, w]``."""
    onehot = (labels[None, :] == torch.arange(way, device=labels.device)[:, None]).to(maps.dtype)  # [way, M]
    return (onehot @ maps.flatten(1)).view(way, *maps.shape[1:])


class RelationNetwork(MetaLearner, kind="relation"):
    """Relation Networks over a :class:`~purer.zoo.Classifier`'s encoder (its head is not used).

    Args:
        model: the network whose encoder, up to its feature map, is the embedding module (copied).
        input_spec: normalisation and input size (``None``: images fed unchanged).
        config: the relation module's hidden size.

    The adapted state is the class maps ``[N, C, h, w]``; :meth:`predict` gives relation scores ``[B, N]`` in
    ``[0, 1]``.
    """

    def __init__(self, model: Classifier, input_spec: InputSpec | None = None, config: RelationConfig | None = None):
        super().__init__(input_spec)
        arch = (model.build_args or {}).get("arch", "")
        self._depth = map_depth(model.encoder, arch)
        self.encoder = batch_stats_only(copy.deepcopy(model.encoder))
        for p in self.encoder.parameters():
            p.requires_grad_(True)
        self.config = config or RelationConfig()
        self._build_args = model.build_args
        args = model.build_args or {}
        channels, size = args.get("in_channels"), args.get("image_size")
        if channels is None:
            raise ValueError("a Relation Network needs its network's input shape: build it with purer.zoo.build_model")
        with torch.no_grad():
            was = self.encoder.training
            # on the encoder's device (a teacher's, for a start from the zoo)
            device = next(self.encoder.parameters()).device
            probe = self.encoder.eval()[:self._depth](torch.zeros(2, channels, size, size, device=device))
            self.encoder.train(was)
        self.relation = RelationModule(probe.shape[1], tuple(probe.shape[2:]), self.config.hidden)

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Network inputs (already prepared) ``[B, C, H, W]`` -> feature maps ``[B, C', h, w]``."""
        return self.encoder[:self._depth](x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.prepare(x))

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, way: int, *,
              create_graph: bool = False) -> torch.Tensor:
        maps = class_maps(self.feature_maps(self.prepare(support_x)), support_y, way)
        return maps if create_graph else maps.detach()

    def predict(self, adapted: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return relation_scores(self.relation, self.feature_maps(self.prepare(x)), adapted)

    def query_loss(self, logits: torch.Tensor, query_y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """The paper's squared error of the scores ``[B, N]`` to the one-hot labels ``[B]``, summed over classes:
        per query ``[B]``, or their mean."""
        onehot = F.one_hot(query_y, logits.shape[-1]).to(logits.dtype)
        per_query = (logits - onehot).square().sum(-1)
        return per_query if reduction == "none" else per_query.mean()

    def _query_logits_together(self, batch: TaskBatch) -> torch.Tensor:
        """All tasks at once: embedding and relation module vmapped over tasks (each its own BatchNorm batches)."""
        def task(sx: torch.Tensor, qx: torch.Tensor) -> torch.Tensor:
            return relation_scores(self.relation, self.feature_maps(qx),
                                   class_maps(self.feature_maps(sx), batch.support_y, batch.way))

        return vmap(task, randomness="different")(self.prepare_tasks(batch.support_x),
                                                   self.prepare_tasks(batch.query_x))

    def _network(self) -> tuple[dict | None, None]:
        return self._build_args, None  # any way: one score per class

    def _folder_config(self) -> dict:
        return {"relation": asdict(self.config)}

    @classmethod
    def _from_folder_config(cls, network: Classifier, input_spec: InputSpec | None, config: dict) -> "RelationNetwork":
        return cls(network, input_spec, RelationConfig(**config["relation"]))
