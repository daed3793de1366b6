"""The MLflow model of a deepspark checkpoint, as MLflow "models from code": nothing in it is pickled.

:func:`deepspark.reporting.log_to_mlflow` hands this file to ``mlflow.pyfunc.log_model`` with a checkpoint
directory (safetensors weights, JSON spec and metadata) as the artifact ``checkpoint``. MLflow copies the
file into the logged model and runs it when the model is loaded; ``load_context`` then reads the
checkpoint with :func:`deepspark.load_model`, which refuses pickles. The model therefore loads only
where deepspark is installed (its requirements name it), and runs the code of this file as it was when
the model was logged: trust a logged model as you would trust a Python file from the same source.

Not imported by deepspark itself: only MLflow executes it (``set_model`` at the bottom is the hook).
"""

from typing import Any

import mlflow.models
import numpy as np
from mlflow.pyfunc.model import PythonModel

CHECKPOINT = "checkpoint"


class CheckpointModel(PythonModel):
    """uint8 images ``[N, C, H, W]`` -> class probabilities ``[N, classes]`` (float32), exactly as
    ``deepspark.load_model(checkpoint).predict(images)``; the class names are in the checkpoint's
    ``metadata.json`` (logged with it)."""

    def load_context(self, context: Any) -> None:
        from deepspark.inference import load_model

        self.model = load_model(context.artifacts[CHECKPOINT], backend="torch")

    def predict(self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None) -> Any:
        return self.model.predict(np.asarray(model_input))


mlflow.models.set_model(CheckpointModel())
