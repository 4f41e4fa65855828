"""Support CE: ICFIL's control, the same calibration steps as plain cross-entropy on the real support.

Description:
    After the learner's inner loop, a per-task copy of the adapted network is trained
    for ``steps`` Adam steps at ``lr`` on cross-entropy over the real support set alone:
    no pseudo support is synthesised and there is no contrastive term.  A run builds it
    with ICFIL's calibration steps and lr (:meth:`SupportCE.matching`), so that what
    ICFIL adds can be told apart from merely fine-tuning longer.  For a ProtoNet only
    the encoder is trained and the logits come from the real support's prototypes,
    recomputed at every step.

Example:
    >>> control = SupportCE.matching(ICFILConfig())                                    # doctest: +SKIP
    >>> logits = control.predict(learner, ep.support_x, ep.support_y, 5, ep.query_x)   # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..meta.base import MetaLearner
from ..meta.protonet import prototypes
from .base import CalibratedTask, Calibrator, adapted_model, fine_tune, finish, real_logits
from .icfil import ICFILConfig


@dataclass
class SupportCEConfig:
    """Settings of :class:`SupportCE`: Adam ``steps`` at ``lr`` (ICFIL's calibration defaults)."""

    steps: int = ICFILConfig.calibration_steps
    lr: float = ICFILConfig.calibration_lr

    def __post_init__(self):
        if self.steps < 0 or self.lr <= 0:
            raise ValueError(f"support-ce needs steps >= 0 and lr > 0, got {self.steps} and {self.lr}")


class SupportCE(Calibrator, name="support-ce"):
    """Cross-entropy on the real support for a few steps after the inner loop (ICFIL's control)."""

    config_type = SupportCEConfig

    @classmethod
    def matching(cls, icfil: ICFILConfig) -> "SupportCE":
        """The control of an ICFIL with settings ``icfil``: its calibration steps and lr."""
        return cls(SupportCEConfig(steps=icfil.calibration_steps, lr=icfil.calibration_lr))

    def calibrate(self, learner: MetaLearner, adapted: Any, support_x: torch.Tensor, support_y: torch.Tensor,
                  way: int) -> CalibratedTask:
        with torch.enable_grad():
            model, is_proto = adapted_model(learner, adapted)
            x = learner.prepare(support_x)

            def loss() -> torch.Tensor:
                features = model.encoder(x)
                protos = prototypes(features, support_y, way) if is_proto else None
                return F.cross_entropy(real_logits(model, features, protos), support_y)

            stats = {"calibration_loss": fine_tune(model, is_proto, loss, self.config.steps, self.config.lr)}
        return finish(learner, model, is_proto, support_x, support_y, way, support_x[:0], support_y[:0], stats)

    def test_cost(self, learner: MetaLearner) -> dict:
        return {"calibration_steps": self.config.steps}
