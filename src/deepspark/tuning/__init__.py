"""Distributed hyperparameter tuning: Optuna samples and prunes, Spark runs the trials."""

from deepspark.tuning.config import PRUNERS, SAMPLERS, RunOptions, StudyConfig
from deepspark.tuning.coordinator import TrialEvent, TrialEventKind
from deepspark.tuning.objectives import BuiltinOptions
from deepspark.tuning.report import StudySummary, TrialSummary
from deepspark.tuning.runner import StudyResult, tune
from deepspark.tuning.space import SearchSpace, load_space
from deepspark.tuning.trial import Reporter, TrialPruned, TrialRecord, TrialState

__all__ = [
    "PRUNERS",
    "SAMPLERS",
    "BuiltinOptions",
    "Reporter",
    "RunOptions",
    "SearchSpace",
    "StudyConfig",
    "StudyResult",
    "StudySummary",
    "TrialEvent",
    "TrialEventKind",
    "TrialPruned",
    "TrialRecord",
    "TrialState",
    "TrialSummary",
    "load_space",
    "tune",
]
