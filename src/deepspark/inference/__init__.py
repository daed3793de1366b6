"""Batch inference on Spark: ``predict`` applies a trained model to images, URLs or tensors at scale.

See ``docs/predict.md``. Heavy parts (torch, onnxruntime, pyspark) are imported only when used.
"""

from deepspark.inference.decode import InputKind, UrlPolicy
from deepspark.inference.formats import InferenceModel, ModelFormat, export_model, load_model, read_labels
from deepspark.inference.predict import OUTPUT_COLUMNS, PredictResult, PredictSummary, predict

__all__ = [
    "OUTPUT_COLUMNS",
    "InferenceModel",
    "InputKind",
    "ModelFormat",
    "PredictResult",
    "PredictSummary",
    "UrlPolicy",
    "export_model",
    "load_model",
    "predict",
    "read_labels",
]
