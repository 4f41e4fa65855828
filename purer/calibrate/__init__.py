"""Test-time calibration: ``none``, ICFIL (meta-test only), its control ``support-ce``, and ``simpleshot``
(nearest centroid on the meta-learned features, no inner loop).

See :mod:`purer.calibrate.base` for the interface every member offers.
"""
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
    icfil = icfil or ICFILConfig()
    if name == "icfil":
        return ICFIL(icfil)
    if name == "support-ce":
        return SupportCE.matching(icfil)
    if name == "simpleshot":
        return SimpleShot()
    if name == "none":
        return NoCalibration()
    raise ValueError(f"unknown calibration {name!r}; choose from none, {', '.join(CALIBRATIONS)}")


__all__ = ["CALIBRATIONS", "CalibratedLearner", "CalibratedTask", "Calibrator", "ICFIL", "ICFILConfig",
           "NoCalibration", "SimpleShot", "SupervisedContrastiveLoss", "SupportCE", "SupportCEConfig", "adapted_model", "calibration_accuracies",
           "calibrator",
           "frozen_teacher", "select_calibration", "supervised_contrastive_loss", "with_settings"]
