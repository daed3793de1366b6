"""ONNX export of an ``nn.Module``: one function, shared by inference (``export_model``, the ONNX backend
for checkpoints) and training (which exports the model it trained).

The ONNX graph has one input named ``input`` and one output named ``logits``, both with a dynamic batch
axis, at opset 17 (what onnxruntime 1.16+ runs). torch writes the model with the ``onnx`` package, an
optional dependency (the ``[onnx]`` extra).
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import torch

from deepspark._optional import require
from deepspark.errors import CheckpointError

__all__ = ["ONNX_FILE", "ONNX_OPSET", "export_onnx"]

#: The file name of an ONNX model saved in a folder (what fit() saves for a model factory; predict finds it).
ONNX_FILE = "model.onnx"

ONNX_OPSET = 17


def export_onnx(module: torch.nn.Module, example: torch.Tensor) -> bytes:
    """The ONNX bytes of ``module`` (already in eval mode), traced on ``example``, a batch of shape
    ``(2, *input_shape)``; raises :class:`CheckpointError` if the export fails."""
    require("onnx", feature="ONNX export")  # torch.onnx writes the model with the onnx package
    buffer: Any = io.BytesIO()  # torch.onnx.export writes to file objects too; its stubs say paths
    with warnings.catch_warnings():
        # torch 2.9+ warns that the TorchScript-based exporter is legacy; the dynamo one needs onnxscript.
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                module,
                (example,),
                buffer,
                dynamo=False,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=ONNX_OPSET,
                # A torch.export module refuses .train(); our modules are already in eval mode.
                training=torch.onnx.TrainingMode.PRESERVE,
            )
        except Exception as exc:
            raise CheckpointError(
                f"ONNX export failed ({exc}); with a newer torch, `pip install onnxscript` may be needed"
            ) from exc
    return buffer.getvalue()
