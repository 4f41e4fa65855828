"""Test-time calibration: ``none``, ICFIL (meta-test only), its control ``support-ce``, and ``simpleshot``
(nearest centroid on the meta-learned features, no inner loop).

See :mod:`purer.calibrate.base` for the interface every member offers.
"""
import json
import os
from pathlib import Path

from ..meta.base import nearest_shot
from .base import (CalibratedLearner, CalibratedTask, Calibrator, NoCalibration, adapted_model, calibration_accuracies,
                   select_calibration, with_settings)
from .icfil import ICFIL, ICFILConfig, SupervisedContrastiveLoss, frozen_teacher, supervised_contrastive_loss
from .simpleshot import SimpleShot
from .support_ce import SupportCE, SupportCEConfig

#: The calibrations a run can score, by row name (``purer+<name>``).
CALIBRATIONS = tuple(name for name in Calibrator.members if name != "none")


def calibrator(name: str, icfil: ICFILConfig | None = None) -> Calibrator:
    """The calibrator ``name`` (``none``, ``icfil``, ``support-ce`` or ``simpleshot``) of a run whose ICFIL settings
    are ``icfil``: ICFIL with them, its control with their calibration steps and lr."""
    if name not in Calibrator.members:
        raise ValueError(f"unknown calibration {name!r}; choose from none, {', '.join(CALIBRATIONS)}")
    icfil = icfil or ICFILConfig()
    if name == "icfil":
        return ICFIL(icfil)
    if name == "support-ce":
        return SupportCE.matching(icfil)
    return Calibrator.members[name]()  # a member without settings from the run's ICFIL section


def chosen_calibration(folder: str | os.PathLike, shot: int) -> Calibrator:
    """The calibration (``none`` included) a run chose on meta-val for ``shot``-shot tasks, with its settings, from
    the run's model folder (``<output_dir>/meta_learner``; the choice of the nearest shot chosen for, the smaller on
    a tie, as :meth:`MetaLearner.test_time_settings`); the plain learner where the folder records none.

    Example:
        >>> cal = chosen_calibration("runs/purer-glyphs/meta_learner", shot=1)                        # doctest: +SKIP
        >>> predict = cal.adapt(learner, sx, sy, 5, **learner.test_time_settings(shot=1))             # doctest: +SKIP
    """
    config = Path(folder) / "config.json"
    try:
        chosen = json.loads(config.read_text()).get("calibration", {})
    except (OSError, ValueError) as err:
        raise ValueError(f"{config}: cannot read the run's choice of calibration ({err}); pass the meta_learner "
                         "folder a run wrote") from None
    per_shot = {int(k): v for k, v in chosen.items() if k.isdigit()}
    if not per_shot:
        return NoCalibration()
    entry = per_shot[nearest_shot(per_shot, shot)]
    return calibrator(entry["name"]).with_settings(entry.get("settings", {}))


__all__ = ["CALIBRATIONS", "CalibratedLearner", "CalibratedTask", "Calibrator", "ICFIL", "ICFILConfig",
           "NoCalibration", "SimpleShot", "SupervisedContrastiveLoss", "SupportCE", "SupportCEConfig", "adapted_model",
           "calibration_accuracies", "calibrator", "chosen_calibration", "frozen_teacher", "select_calibration",
           "supervised_contrastive_loss", "with_settings"]
