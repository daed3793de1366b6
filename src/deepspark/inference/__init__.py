"""Batch inference on Spark: ``predict`` applies a trained model to images, URLs or tensors at scale.

See ``docs/predict.md``. Names are imported on first use, so the CLI can register ``deepspark predict``
without importing torch, onnxruntime or pyspark.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deepspark.inference._predict import (
        OUTPUT_COLUMNS,
        PredictProgress,
        PredictResult,
        PredictSummary,
        predict,
    )
    from deepspark.inference.decode import InputKind, UrlPolicy
    from deepspark.inference.formats import ModelFormat
    from deepspark.inference.model import InferenceModel, export_model, load_model, read_labels

_WHERE = {
    "InputKind": "decode",
    "UrlPolicy": "decode",
    "InferenceModel": "model",
    "ModelFormat": "formats",
    "export_model": "model",
    "load_model": "model",
    "read_labels": "model",
    "OUTPUT_COLUMNS": "_predict",
    "PredictProgress": "_predict",
    "PredictResult": "_predict",
    "PredictSummary": "_predict",
    "predict": "_predict",
}

__all__ = [
    "OUTPUT_COLUMNS",
    "InferenceModel",
    "InputKind",
    "ModelFormat",
    "PredictProgress",
    "PredictResult",
    "PredictSummary",
    "UrlPolicy",
    "export_model",
    "load_model",
    "predict",
    "read_labels",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'deepspark.inference' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"deepspark.inference.{module}"), name)
    globals()[name] = value
    return value
