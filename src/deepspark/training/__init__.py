"""Training: one process (:func:`train_one_process`), or data-parallel on Spark (:func:`fit`)."""

from deepspark.training.job import DEFAULT_TRAIN_CONFIG, train_local_job
from deepspark.training.loop import (
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
    "DataCursor",
    "EpochMetrics",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "run_steps",
    "train_local_job",
    "train_one_process",
]
