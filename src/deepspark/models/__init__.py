"""Model descriptions (declarative specs), the zoo, preprocessing and safetensors checkpoints."""

from deepspark.models.checkpoint import (
    Checkpoint,
    checkpoint_files,
    load_checkpoint,
    refuse_pickle,
    save_checkpoint,
    state_from_bytes,
    state_to_bytes,
)
from deepspark.models.export import export_onnx
from deepspark.models.preprocess import Preprocess
from deepspark.models.spec import ModelSpec, SpecModel, build_model, load_spec
from deepspark.models.zoo import ZOO, model_spec

__all__ = [
    "ZOO",
    "Checkpoint",
    "ModelSpec",
    "Preprocess",
    "SpecModel",
    "build_model",
    "checkpoint_files",
    "export_onnx",
    "load_checkpoint",
    "load_spec",
    "model_spec",
    "refuse_pickle",
    "save_checkpoint",
    "state_from_bytes",
    "state_to_bytes",
]
