"""Training: the one-process loop today; data-parallel modes (averaging, all-reduce) build on it."""

from deepspark.training.job import DEFAULT_TRAIN_CONFIG, train_local_job
from deepspark.training.loop import EpochMetrics, TrainConfig, TrainResult, evaluate, train

__all__ = [
    "DEFAULT_TRAIN_CONFIG",
    "EpochMetrics",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "train",
    "train_local_job",
]
