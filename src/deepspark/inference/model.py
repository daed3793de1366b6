"""Models for local inference: :func:`load_model` (the loader every Spark worker uses too), the
:class:`InferenceModel` it returns, backend choice, label files, and :func:`export_model`."""

from __future__ import annotations

import io
import json
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from deepspark._optional import available, install_hint
from deepspark.errors import CheckpointError, ConfigError
from deepspark.inference.formats import ModelArtifact, ModelFormat, read_model
from deepspark.inference.runners import build_runner
from deepspark.models.checkpoint import METADATA, read_metadata
from deepspark.models.preprocess import Preprocess
from deepspark.rundir import write_file_atomic
from deepspark.validation import check_choice, fail

__all__ = ["BACKENDS", "InferenceModel", "export_model", "load_model", "read_labels", "resolve_backend"]

_log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnx")
_TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript", ".jit")


def export_model(
    model: str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    format: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Export a deepspark checkpoint to TorchScript (``.pt``/``.ts``), ``torch.export`` (``.pt2``) or ONNX.

    ``format`` (``torchscript``, ``torch.export``, ``onnx``) defaults to the one ``path``'s suffix names.
    The checkpoint's metadata (preprocessing, class names) is written as ``metadata.json`` next to the
    file, where :func:`read_model` looks for it; an existing one must agree with it.
    """
    import torch

    from deepspark.models.checkpoint import load_checkpoint
    from deepspark.models.export import export_onnx

    target = Path(path)
    by_suffix = {".onnx": "onnx", ".pt2": "torch.export"} | {s: "torchscript" for s in _TORCHSCRIPT_SUFFIXES}
    kind = format or by_suffix.get(target.suffix.lower())
    if kind not in ("torchscript", "torch.export", "onnx"):
        raise fail("format", "'torchscript', 'torch.export' or 'onnx' (or a .pt/.pt2/.onnx path)", format)
    if target.exists() and not overwrite:
        raise ConfigError(f"path: {target} already exists; pass overwrite=True or choose another path")
    ckpt = load_checkpoint(model)
    meta = {"preprocess": ckpt.preprocess.to_dict(), "class_names": list(ckpt.class_names)}
    sidecar = target.parent / METADATA
    # One that agrees is kept as it is: the checkpoint's own, when exporting into its folder, holds its
    # metrics, config and versions too.
    agrees = sidecar.is_file() and {k: v for k, v in read_metadata(sidecar).items() if k in meta} == meta
    if sidecar.is_file() and not agrees:
        # The sidecar describes every model file in its folder: rewriting it for this export would pair
        # the others with this model's class names and preprocessing.
        others = sorted(p.name for p in target.parent.iterdir() if p != target and _is_model_file(p))
        if not overwrite or others:
            held = f" (it also describes {', '.join(others)})" if others else ""
            raise ConfigError(f"path: {sidecar} describes another model{held}; export into another directory")
    # Weights in the default layout: a torch.export archive of channels-last weights (how spec models
    # train) loads with a warning about incomplete tensors; the exported values are the same.
    module = ckpt.model.eval().to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    example = torch.zeros((2, *ckpt.spec.input_shape), dtype=torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Made in memory, then written whole (rundir.write_file_atomic): a write that failed midway (a full
    # disk) left a cut file at ``path``, in place of the one overwrite=True was to replace.
    if kind == "torchscript":
        buffer = io.BytesIO()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated upstream
            torch.jit.save(torch.jit.trace(module, example), buffer)
        data = buffer.getvalue()
    elif kind == "torch.export":
        batch = torch.export.Dim("batch", min=1)
        program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
        buffer = io.BytesIO()
        torch.export.save(program, buffer)
        data = buffer.getvalue()
    else:
        data = export_onnx(module, example)
    if not agrees:
        # Gone before the model is replaced, so a failure or kill between the two writes leaves a model
        # without metadata (refused when loaded), never one paired with another model's metadata.
        sidecar.unlink(missing_ok=True)
    write_file_atomic(target, data)
    if not agrees:
        write_file_atomic(sidecar, json.dumps(meta, indent=2).encode("utf-8"))
    return target


def _is_model_file(path: Path) -> bool:
    """A file :func:`read_model` would pair with its folder's ``metadata.json`` (a checkpoint's weights
    included: the file is the checkpoint's own metadata)."""
    suffix = path.suffix.lower()
    return path.is_file() and (suffix in (".onnx", ".pt2", ".safetensors") or suffix in _TORCHSCRIPT_SUFFIXES)


class InferenceModel:
    """A loaded model with its preprocessing and class names; ``predict`` for a local batch."""

    def __init__(self, artifact: ModelArtifact, *, backend: str, threads: int | None = None) -> None:
        self.artifact = artifact
        self.backend = backend
        self._run = build_runner(artifact, backend=backend, threads=threads or os.cpu_count() or 1)
        shape = artifact.preprocess.input_shape
        try:
            probe = self._run(np.zeros((1, *shape), dtype=np.float32))
        except Exception as exc:  # torch / onnxruntime: wrong input shape for this network, mostly
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            causes = [line for line in lines if "Error: " in line]  # TorchScript's cause is its last line
            why = causes[-1] if causes else " ".join(lines)
            raise ConfigError(
                f"model {artifact.source} cannot run on inputs of shape [N, {', '.join(map(str, shape))}] "
                f"(the preprocessing's input shape; CLI: --input-shape): {why[:400]}"
            ) from None
        if probe.ndim != 2:
            raise CheckpointError(
                f"model {artifact.source} returns outputs of shape {probe.shape[1:]}; "
                "expected one score per class"
            )
        self.num_classes = int(probe.shape[1])
        if artifact.class_names is not None and len(artifact.class_names) != self.num_classes:
            raise ConfigError(
                f"labels: the model has {self.num_classes} classes but "
                f"{len(artifact.class_names)} class names were given"
            )

    @property
    def format(self) -> ModelFormat:
        return self.artifact.format

    @property
    def preprocess(self) -> Preprocess:
        return self.artifact.preprocess

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.artifact.class_names or tuple(str(i) for i in range(self.num_classes))

    def logits(self, inputs: np.ndarray) -> np.ndarray:
        """Raw scores for preprocessed ``float32 [N, C, H, W]`` inputs."""
        return self._run(inputs)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities ``[N, classes]`` for uint8 images ``[N, H, W]`` or ``[N, C, H, W]``."""
        from deepspark.inference.topk import softmax

        return softmax(self._run(self.preprocess.apply(images).numpy()))


def read_labels(path: str | os.PathLike[str]) -> tuple[str, ...]:
    """Class names from a text file, one per line (trailing blank lines ignored)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"labels: expected a text file with one class name per line, got {str(p)!r}")
    try:
        # utf-8-sig: the byte-order mark Windows editors write would start the first class name.
        lines = p.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise ConfigError(f"labels: {p} is not UTF-8 text; expected one class name per line") from None
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ConfigError(f"labels: {p} is empty")
    blank = next((i for i, line in enumerate(lines, 1) if not line.strip()), None)
    if blank is not None:  # a class named "", or a line left out above it: every later name one off
        raise ConfigError(f"labels: line {blank} of {p} is blank; give one class name per line")
    return tuple(line.strip() for line in lines)


def resolve_backend(backend: str, artifact: ModelArtifact) -> str:
    check_choice("backend", backend, BACKENDS)
    if backend == "auto":
        chosen = artifact.default_backend()
        if chosen == "onnx" and artifact.format is not ModelFormat.ONNX and not _onnx_installed():
            # ONNX is only faster here; without the [onnx] extra our checkpoints run with torch.
            _log.info("backend auto: onnx/onnxruntime not installed (%s); using torch", install_hint("onnx"))
            return "torch"
        return chosen
    if backend == "torch" and artifact.format is ModelFormat.ONNX:
        raise ConfigError("backend: an ONNX model runs only with backend='onnx' (or 'auto')")
    return backend


def _onnx_installed() -> bool:
    return available("onnx") and available("onnxruntime")


def load_model(
    path: str | os.PathLike[str],
    *,
    backend: str = "auto",
    preprocess: Preprocess | None = None,
    labels: str | os.PathLike[str] | Sequence[str] | None = None,
    threads: int | None = None,
) -> InferenceModel:
    """Load a model file for local inference (the same loader every Spark worker uses).

    ``labels`` is a label file (one class name per line) or a list of names; it overrides the model's.
    """
    names = read_labels(labels) if isinstance(labels, str | os.PathLike) else labels
    artifact = read_model(path, preprocess=preprocess, class_names=names)
    return InferenceModel(artifact, backend=resolve_backend(backend, artifact), threads=threads)
