"""The one interface every meta-learner (MAML, ANIL, ProtoNet) offers.

The curriculum (GradientSwitch), ICFIL, the evaluation and the baselines only rely
on this interface.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..data.episodes import Episode
from ..zoo.teacher import ModelConfig, prepare_input


@dataclass(frozen=True)
class InputSpec:
    """What a meta-learner's network expects; images arrive in ``[0, 1]``.

    Attributes:
        in_channels, image_size: the network's input (other images are converted
            and resized by :func:`purer.zoo.prepare_input`).
        mean, std: per-channel normalisation (one value or one per channel).
    """

    in_channels: int
    image_size: int
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    @classmethod
    def of(cls, config: ModelConfig) -> "InputSpec":
        """The input contract of a zoo model (e.g. ``InputSpec.of(teacher.config)``)."""
        return cls(config.in_channels, config.image_size, tuple(config.mean), tuple(config.std))


class MetaLearner(nn.Module, ABC):
    """Adapt to an episode's support set, predict its query set, give the outer loss.

    ``adapt`` returns an opaque *adapted state* (fast weights for MAML/ANIL,
    prototypes for ProtoNet); the meta-learner's own weights are never changed by
    ``adapt``, so tasks never leak into each other.

    Args:
        input_spec: how ``[0, 1]`` images are turned into the network's input;
            ``None`` feeds them unchanged.

    Class attributes:
        tunable: names of ``adapt`` keyword arguments that test-time model
            selection may set (e.g. ``("lr", "steps")`` for an inner loop).
    """

    tunable: tuple[str, ...] = ()

    def __init__(self, input_spec: InputSpec | None = None):
        super().__init__()
        self.input_spec = input_spec
        if input_spec is not None:
            self.register_buffer("input_mean", torch.tensor(input_spec.mean), persistent=False)
            self.register_buffer("input_std", torch.tensor(input_spec.std), persistent=False)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` images in ``[0, 1]`` -> the network's input, differentiably."""
        if self.input_spec is None:
            return x
        return prepare_input(x, self.input_spec.in_channels, self.input_spec.image_size, self.input_mean,
                             self.input_std)

    @abstractmethod
    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, way: int, *,
              create_graph: bool = False, **test_time: Any) -> Any:
        """Support ``[N*K, C, H, W]`` in ``[0, 1]``, labels ``[N*K]`` -> adapted state.

        ``create_graph=True`` keeps the graph of the adaptation, so a loss on the
        adapted state differentiates through it (to the meta-parameters and to
        ``support_x``). ``test_time`` holds overrides of the :attr:`tunable` settings.
        """

    @abstractmethod
    def predict(self, adapted: Any, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, H, W]`` -> logits ``[B, N]`` under the adapted state."""

    def query_logits(self, episode: Episode) -> torch.Tensor:
        """Logits ``[N*Q, N]`` of the episode's queries after adapting on its support (the graph through
        the inner loop is kept whenever grad mode is on)."""
        adapted = self.adapt(episode.support_x, episode.support_y, episode.way,
                             create_graph=torch.is_grad_enabled())
        return self.predict(adapted, episode.query_x)

    def outer_loss(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        """Query cross-entropy after adaptation, and query accuracy (a 0-dim tensor).

        Differentiable in the meta-parameters and in the episode's images (support
        through the inner loop) whenever grad mode is on, which the adversarial
        curriculum needs even while the learner is in eval mode.
        """
        logits = self.query_logits(episode)
        loss = nn.functional.cross_entropy(logits, episode.query_y)
        acc = (logits.argmax(-1) == episode.query_y).float().mean()
        return loss, acc.detach()

    def test_cost(self) -> dict:
        """What a test task needs: ``{"params": <weights used>, "models": <networks run>}``."""
        return {"params": sum(p.numel() for p in self.parameters()), "models": 1}


def batch_stats_only(model: nn.Module) -> nn.Module:
    """Make every BatchNorm layer of ``model`` (in place) normalise with batch statistics.

    Standard MAML practice: the running statistics are dropped, so they are never
    used (train or eval mode) nor updated, and a functional call has no buffer
    side effects.
    """
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
    return model
