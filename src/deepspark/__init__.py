"""deepspark: deep learning on Apache Spark — tune, train and deploy PyTorch models on a Spark cluster.

The public API is short and imported lazily, so ``import deepspark`` stays cheap (no torch, no JVM).
"""

from __future__ import annotations

from deepspark._lazy import lazy_attributes

__version__ = "0.1.0"

_API = {
    "tune": "deepspark.tuning",
    "StudyResult": "deepspark.tuning",
    "Reporter": "deepspark.tuning",
    "TrialPruned": "deepspark.tuning",
    "fit": "deepspark.training",
    "FitResult": "deepspark.training",
    "train_one_process": "deepspark.training",
    "TrainConfig": "deepspark.training",
    "evaluate": "deepspark.training",
    "load_dataset": "deepspark.data",
    "fetch": "deepspark.data",
    "model_spec": "deepspark.models",
    "build_model": "deepspark.models",
    "save_checkpoint": "deepspark.models",
    "load_checkpoint": "deepspark.models",
    "predict": "deepspark.inference",
    "report": "deepspark.reporting",
    "load_model": "deepspark.inference",
    "session": "deepspark.spark",
    "DeepsparkError": "deepspark.errors",
    "ConfigError": "deepspark.errors",
}

__all__ = sorted(_API)


__getattr__, __dir__ = lazy_attributes("deepspark", _API, extra=("__version__",))
