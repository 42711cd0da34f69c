"""Training losses, one per module: KD, CLUB (MICL), energy regulariser, outlier exposure."""

from oal_trainer.losses._validation import LossInputError
from oal_trainer.losses.club import CLUB, CLUB_MODES, ClubMode, club_step_losses
from oal_trainer.losses.energy import DEFAULT_M_IN, DEFAULT_M_OUT, energy_regularizer, energy_score
from oal_trainer.losses.kd import FeatureAdapter, feature_kd_loss, logit_kd_loss
from oal_trainer.losses.oe import outlier_exposure_loss

__all__ = [
    "CLUB",
    "CLUB_MODES",
    "ClubMode",
    "DEFAULT_M_IN",
    "DEFAULT_M_OUT",
    "FeatureAdapter",
    "LossInputError",
    "club_step_losses",
    "energy_regularizer",
    "energy_score",
    "feature_kd_loss",
    "logit_kd_loss",
    "outlier_exposure_loss",
]
