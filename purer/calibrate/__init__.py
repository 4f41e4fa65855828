"""ICFIL: inversion calibration following the inner loop (meta-test only)."""
from .icfil import (CALIBRATIONS, ICFIL, CalibratedTask, ICFILConfig, ICFILLearner, SupervisedContrastiveLoss, adapted_model,
                    calibration, select_config, supervised_contrastive_loss, support_statistics_teacher, with_settings)

__all__ = ["CALIBRATIONS", "ICFIL", "calibration", "CalibratedTask", "ICFILConfig", "ICFILLearner", "SupervisedContrastiveLoss", "adapted_model",
           "select_config", "supervised_contrastive_loss", "support_statistics_teacher", "with_settings"]
