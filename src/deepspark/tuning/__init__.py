"""Distributed hyperparameter tuning: Optuna samples and prunes, Spark runs the trials."""

from deepspark.tuning.coordinator import TrialEvent
from deepspark.tuning.runner import PRUNERS, SAMPLERS, StudyResult, tune
from deepspark.tuning.space import SearchSpace, load_space
from deepspark.tuning.trial import Reporter, TrialPruned, TrialRecord, TrialState

__all__ = [
    "PRUNERS",
    "SAMPLERS",
    "Reporter",
    "SearchSpace",
    "StudyResult",
    "TrialEvent",
    "TrialPruned",
    "TrialRecord",
    "TrialState",
    "load_space",
    "tune",
]
