"""The one interface every meta-learner (MAML, ANIL, ProtoNet) offers.

The curriculum (GradientSwitch) and ICFIL only rely on this interface.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from ..data.episodes import Episode


class MetaLearner(nn.Module, ABC):
    """Adapt to an episode's support set, predict its query set, give the outer loss.

    ``adapt`` returns an opaque *adapted state* (fast weights for MAML/ANIL,
    prototypes for ProtoNet); the meta-learner's own weights are never changed by
    ``adapt``, so tasks never leak into each other.
    """

    @abstractmethod
    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, way: int, *,
              create_graph: bool = False) -> Any:
        """Support ``[N*K, C, H, W]`` in ``[0, 1]``, labels ``[N*K]`` -> adapted state."""

    @abstractmethod
    def predict(self, adapted: Any, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, H, W]`` -> logits ``[B, N]`` under the adapted state."""

    def outer_loss(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        """Query cross-entropy after adaptation, and query accuracy (a 0-dim tensor).

        Differentiable in the meta-parameters and in the episode's images (support
        through the inner loop), which the adversarial curriculum needs.
        """
        adapted = self.adapt(episode.support_x, episode.support_y, episode.way, create_graph=self.training)
        logits = self.predict(adapted, episode.query_x)
        loss = nn.functional.cross_entropy(logits, episode.query_y)
        acc = (logits.argmax(-1) == episode.query_y).float().mean()
        return loss, acc.detach()
