"""Running a model: torch (checkpoints, TorchScript, torch.export) or onnxruntime, on a CPU or a GPU.

A runner is a function ``float32 [N, C, H, W] -> logits [N, classes]`` (numpy in, numpy out). Models
exported with a fixed batch size are run in padded chunks. Loading is slow, so executors build a runner
once per Python worker (:mod:`deepspark.inference._task` caches it).
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from deepspark._optional import require
from deepspark.errors import CheckpointError, ConfigError
from deepspark.inference.formats import ModelArtifact, ModelFormat

__all__ = ["Runner", "build_runner", "runner_device", "to_onnx"]

_log = logging.getLogger(__name__)

Runner = Callable[[np.ndarray], np.ndarray]
_CUDA_PROVIDER = "CUDAExecutionProvider"


def _torch_module(artifact: ModelArtifact, device: str = "cpu") -> Any:
    import torch

    if artifact.format is ModelFormat.CHECKPOINT:
        from deepspark.models.checkpoint import build_checkpoint_model
        from deepspark.models.spec import ModelSpec

        spec = ModelSpec.from_dict(json.loads(artifact.spec_json or "{}"))
        return build_checkpoint_model(spec, artifact.payload, source=artifact.source).to(device)
    if artifact.format in (ModelFormat.TORCHSCRIPT, ModelFormat.EXPORT):
        try:
            if artifact.format is ModelFormat.EXPORT:
                return torch.export.load(io.BytesIO(artifact.payload)).module().to(device)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated upstream
                return torch.jit.load(io.BytesIO(artifact.payload), map_location=device).eval()
        except Exception as exc:  # torch's RuntimeError (a record missing, a damaged archive), KeyError, ...
            why = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise CheckpointError(
                f"torch cannot load {artifact.source} as {artifact.format.value}: {why}"
            ) from exc
    raise ConfigError(f"backend: 'torch' cannot run an {artifact.format.value} model; use backend='onnx'")


def _fixed_batch(dim: Any) -> int | None:
    return dim if isinstance(dim, int) and dim > 0 else None


def _chunked(run: Runner, batch: int | None) -> Runner:
    """Run a model exported with a fixed batch size on any number of rows (pads the last chunk)."""
    if batch is None:
        return run

    def call(x: np.ndarray) -> np.ndarray:
        outputs = []
        for start in range(0, len(x), batch):
            part = x[start : start + batch]
            n = len(part)
            if n < batch:
                part = np.concatenate([part, np.zeros((batch - n, *part.shape[1:]), dtype=part.dtype)])
            outputs.append(run(part)[:n])
        return np.concatenate(outputs)

    return call


def _export_batch(module: Any) -> int | None:
    for node in getattr(getattr(module, "graph", None), "nodes", []):
        if node.op == "placeholder" and "val" in node.meta and hasattr(node.meta["val"], "shape"):
            shape = node.meta["val"].shape
            if len(shape) == 4:
                return _fixed_batch(shape[0])
    return None


def runner_device(requested: str, backend: str, context: Any = None) -> str:
    """The device a Spark task runs the model on (``cpu`` or ``cuda:<addr>``), from the GPU Spark assigned
    it (:func:`deepspark.spark.task_device`) and what ``backend`` can use there.

    onnxruntime needs its ``CUDAExecutionProvider`` (the ``onnxruntime-gpu`` build) for a GPU: without it
    ``cuda`` is an error naming the address, and ``auto`` runs on the CPU, saying so in the log.
    """
    from deepspark.spark import task_device

    device = task_device(requested, context)
    if device.type != "cuda" or backend != "onnx":
        return str(device)
    ort = require("onnxruntime", feature="the ONNX backend (backend='onnx')")
    providers = list(ort.get_available_providers())
    if _CUDA_PROVIDER in providers:
        return str(device)
    why = f"onnxruntime offers no {_CUDA_PROVIDER} (only {providers}); install onnxruntime-gpu"
    if requested == "cuda":
        raise ConfigError(
            f"device 'cuda': cannot use GPU {device.index} with backend 'onnx': {why}; "
            "use --backend torch, or --device auto or cpu"
        )
    _log.warning(
        "device auto: Spark assigned GPU %s but %s; running onnxruntime on the CPU", device.index, why
    )
    return "cpu"


def build_runner(artifact: ModelArtifact, *, backend: str, threads: int, device: str = "cpu") -> Runner:
    """A function ``float32 [N, C, H, W] -> logits [N, classes]`` for ``artifact`` (slow: loads).

    ``device`` is ``cpu`` or ``cuda:<index>`` (see :func:`runner_device`)."""
    if backend == "onnx":
        ort = require("onnxruntime", feature="the ONNX backend (backend='onnx')")

        payload = artifact.payload if artifact.format is ModelFormat.ONNX else to_onnx(artifact)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        providers: list[Any] = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            providers.insert(0, (_CUDA_PROVIDER, {"device_id": int(device.partition(":")[2] or 0)}))
        try:
            session = ort.InferenceSession(payload, sess_options=options, providers=providers)
        except Exception as exc:
            raise CheckpointError(f"onnxruntime cannot load {artifact.source}: {exc}") from exc
        if device.startswith("cuda") and _CUDA_PROVIDER not in session.get_providers():
            raise ConfigError(f"device {device!r}: onnxruntime could not start its {_CUDA_PROVIDER} there")
        (first,) = session.get_inputs()[:1]
        name = first.name

        def run_onnx(x: np.ndarray) -> np.ndarray:
            return np.asarray(session.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0])

        return _chunked(run_onnx, _fixed_batch(first.shape[0] if first.shape else None))

    import torch

    module = _torch_module(artifact, device)
    target = torch.device(device)

    def run_torch(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(target))
        return np.asarray(out.detach().cpu().numpy() if hasattr(out, "detach") else out)

    return _chunked(run_torch, _export_batch(module) if artifact.format is ModelFormat.EXPORT else None)


def to_onnx(artifact: ModelArtifact) -> bytes:
    """Convert a torch-format artifact to ONNX bytes (in memory, on the driver)."""
    import torch

    from deepspark.models.export import export_onnx

    if artifact.format is ModelFormat.ONNX:
        return artifact.payload
    module = _torch_module(artifact)
    shape = artifact.preprocess.input_shape
    try:
        example = torch.zeros((2, *shape), dtype=torch.float32)
    except (RuntimeError, TypeError, OverflowError) as exc:  # torch's: too large to allocate, or to describe
        raise ConfigError(
            f"model {artifact.source}: cannot export it to ONNX: an example batch of its input shape "
            f"[2, {', '.join(map(str, shape))}] does not fit in memory ({str(exc).splitlines()[0]})"
        ) from None
    return export_onnx(module, example)
