"""ONNX export of a module: graph names, dynamic batch axis, agreement with torch, and its one error type."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepspark.errors import CheckpointError
from deepspark.models import build_model, model_spec
from deepspark.models.export import ONNX_OPSET, export_onnx


def test_export_has_named_io_a_dynamic_batch_and_matches_torch() -> None:
    import onnx  # the [onnx] extra, which make installs: a missing one must fail here, not skip
    import onnxruntime as ort

    module = build_model(model_spec("cnn", conv1=4, conv2=8, fc=16), seed=0).eval()
    payload = export_onnx(module, torch.zeros((2, 1, 28, 28)))

    graph = onnx.load_from_string(payload)
    assert [i.name for i in graph.graph.input] == ["input"]
    assert [o.name for o in graph.graph.output] == ["logits"]
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert max(op.version for op in graph.opset_import if op.domain in ("", "ai.onnx")) == ONNX_OPSET

    session = ort.InferenceSession(payload, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((5, 1, 28, 28)).astype(np.float32)  # not the traced 2
    (got,) = session.run(["logits"], {"input": x})
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_a_failed_export_is_a_checkpoint_error() -> None:
    module = build_model(model_spec("cnn", conv1=4, conv2=8, fc=16), seed=0).eval()
    with pytest.raises(CheckpointError, match=r"^ONNX export failed \("):
        export_onnx(module, torch.zeros((2, 3, 5, 5)))  # the wrong input shape for a 1x28x28 model
