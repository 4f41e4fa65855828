"""SimpleShot on the meta-learned features: no inner loop, nearest L2-normalised class centroid.

Description:
    SimpleShot (Wang et al., 2019, "SimpleShot: Revisiting Nearest-Neighbor
    Classification for Few-Shot Learning", its L2N variant) classifies a query by the
    nearest centroid of the support's L2-normalised features.  Here the features are
    the meta-learner's before any adaptation (:meth:`MetaLearner.embed`): the
    meta-learned initialisation used as a fixed feature extractor, as in NIL, the
    "no inner loop" test of Raghu et al. (ICLR 2020, "Rapid learning or feature
    reuse?").  SimpleShot's centring (CL2N) subtracts the mean feature of the base
    classes' real images, which a data-free learner does not have, so it is left out.

    Like every member it is scored on meta-val beside the plain learner, and a run
    reports it only where meta-val chooses it.  It never runs the inner loop, so a
    task costs two forward passes (support, queries).  Each set's BatchNorm uses that
    set's statistics, as the learner's own prediction does.

Example:
    >>> logits = SimpleShot().predict(learner, ep.support_x, ep.support_y, 5, ep.query_x)  # doctest: +SKIP
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..meta.base import MetaLearner
from ..meta.protonet import neg_sq_distances, prototypes
from .base import Calibrator


class SimpleShot(Calibrator, name="simpleshot"):
    """Nearest centroid of L2-normalised meta-learned features (SimpleShot L2N), without the inner loop."""

    config_type = dict
    adapts = False

    def calibrate(self, learner: MetaLearner, adapted: Any, support_x: torch.Tensor, support_y: torch.Tensor,
                  way: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """``adapted`` is not used (``None``: :attr:`adapts` is false, so no inner loop runs for it)."""
        with torch.no_grad():
            centroids = prototypes(F.normalize(learner.embed(support_x), dim=-1), support_y, way)

        @torch.no_grad()
        def predict(x: torch.Tensor) -> torch.Tensor:
            return neg_sq_distances(F.normalize(learner.embed(x), dim=-1), centroids)
        return predict

    def test_cost(self, learner: MetaLearner) -> dict:
        return {"inner_steps": 0}
