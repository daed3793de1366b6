"""Training: one process (:func:`train_one_process`), or data-parallel on Spark (:func:`fit`)."""

from deepspark.training._fit import STRATEGIES, FitResult, fit
from deepspark.training.loop import (
    DEFAULT_TRAIN_CONFIG,
    DataCursor,
    EpochMetrics,
    TrainConfig,
    TrainResult,
    evaluate,
    run_steps,
    train_one_process,
)

__all__ = [
    "DEFAULT_TRAIN_CONFIG",
    "STRATEGIES",
    "DataCursor",
    "EpochMetrics",
    "FitResult",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "fit",
    "run_steps",
    "train_one_process",
]
