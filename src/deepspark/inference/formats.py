"""Model files for inference: which formats we load, how we tell them apart, and which we refuse.

Accepted (nothing here runs Python's ``pickle`` on the file):

* a deepspark checkpoint directory (``model.safetensors`` + ``spec.json`` + ``metadata.json``);
* a TorchScript archive (``torch.jit.save``; a zip with a ``code/`` folder). ``torch.jit.load`` reads its
  ``data.pkl``/``constants.pkl`` with TorchScript's own unpickler, which builds tensors and TorchScript
  types only and imports no Python. The ``code/`` folder is a TorchScript program, so load archives whose
  origin you trust, as with any program;
* a ``torch.export`` archive (``torch.export.save``, ``.pt2``). **Caution:** ``torch.export.load`` in
  torch 2.13 does call ``torch.load(weights_only=False)`` and ``pickle.loads`` for some entries (tensor
  subclasses, opaque/custom objects, legacy weight files, and as a fallback for sample inputs). We inspect
  the archive first and refuse any archive that holds such an entry, compiled AOTInductor code, or sample
  inputs that the restricted ``weights_only=True`` loader cannot read; what remains is JSON and raw tensor
  bytes;
* an ONNX model (``.onnx``), run with onnxruntime.

Refused: ``torch.save`` files (a pickle, or a zip whose only program is ``data.pkl``), ``.pkl``/
``.pickle``/``.joblib`` and anything else that looks like a pickle, since unpickling runs arbitrary code.

Checkpoints carry their preprocessing and class names. For the other formats they come from, in order:
the ``preprocess=``/``class_names=`` arguments, else a ``metadata.json`` next to the model file (the same
schema as a checkpoint's, which :func:`export_model` writes).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deepspark._compat import StrEnum
from deepspark._optional import available, install_hint, require
from deepspark.errors import CheckpointError, ConfigError
from deepspark.models.checkpoint import METADATA, SPEC, WEIGHTS
from deepspark.models.export import export_onnx
from deepspark.models.preprocess import Preprocess

__all__ = [
    "BACKENDS",
    "InferenceModel",
    "ModelArtifact",
    "ModelFormat",
    "detect_format",
    "export_model",
    "load_model",
    "read_model",
]

_log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnx")
_ALWAYS_PICKLE = {".pkl", ".pickle", ".joblib"}
_TORCHSCRIPT_SUFFIXES = {".pt", ".pth", ".ts", ".torchscript", ".jit"}


class ModelFormat(StrEnum):
    """The on-disk formats :func:`read_model` accepts."""

    CHECKPOINT = "checkpoint"
    TORCHSCRIPT = "torchscript"
    EXPORT = "torch.export"
    ONNX = "onnx"


@dataclass(frozen=True)
class ModelArtifact:
    """A model as bytes plus what inference needs to know about it; cheap to broadcast.

    ``payload`` is the file's content (for a checkpoint, ``model.safetensors``; ``spec_json`` holds its
    spec). ``model_id`` (a SHA-256 of payload and spec) keys the per-worker model cache.
    """

    format: ModelFormat
    payload: bytes
    preprocess: Preprocess
    class_names: tuple[str, ...] | None
    source: str
    spec_json: str | None = None

    @property
    def model_id(self) -> str:
        digest = hashlib.sha256(self.payload)
        digest.update((self.spec_json or "").encode())
        return f"{self.format.value}:{digest.hexdigest()}"

    @property
    def size_bytes(self) -> int:
        return len(self.payload) + len(self.spec_json or "")

    def default_backend(self) -> str:
        """ONNX for our own checkpoints too: onnxruntime ran the MNIST cnn 1.8x faster than torch on the
        same cores (docs/benchmarks.md). TorchScript and torch.export files keep torch, as they may hold
        operators an ONNX export would not cover."""
        return "onnx" if self.format in (ModelFormat.ONNX, ModelFormat.CHECKPOINT) else "torch"


# ----------------------------------------------------------------------------------------- detection
def _refuse(path: Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"refusing to load {path}: {why}. Unpickling runs arbitrary code from whoever wrote the file. "
        "Save the model as a deepspark checkpoint (deepspark.models.save_checkpoint, safetensors), or "
        "export it with torch.jit.save (TorchScript), torch.export.save (.pt2) or to ONNX "
        "(deepspark.inference.export_model does all three)."
    )


def _archive_names(zf: zipfile.ZipFile) -> list[str]:
    """Entry names relative to the archive root (torch writes every entry under one top folder)."""
    names = zf.namelist()
    roots = {n.split("/", 1)[0] for n in names}
    if len(roots) == 1 and all("/" in n for n in names):
        return [n.split("/", 1)[1] for n in names]
    return names


def detect_format(path: str | os.PathLike[str]) -> ModelFormat:
    """Tell the model format from the file's content (suffixes only decide for ONNX and pickles)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"model: expected an existing file or checkpoint directory, got {str(p)!r}")
    if p.is_dir():
        if (p / WEIGHTS).is_file() and (p / SPEC).is_file():
            return ModelFormat.CHECKPOINT
        pickles = sorted(
            q.name for q in p.iterdir() if q.suffix.lower() in _ALWAYS_PICKLE | _TORCHSCRIPT_SUFFIXES
        )
        raise CheckpointError(
            f"{p} is not a deepspark checkpoint (no {WEIGHTS} + {SPEC})"
            + (f"; it holds {pickles}: pass the model file itself" if pickles else "")
        )
    suffix = p.suffix.lower()
    if suffix == ".safetensors" or p.name in (SPEC, METADATA):
        return ModelFormat.CHECKPOINT
    if suffix in _ALWAYS_PICKLE:
        raise _refuse(p, f"'{suffix}' files are pickles")
    with p.open("rb") as fh:
        head = fh.read(4)
    if head[:1] == b"\x80":
        raise _refuse(p, "it is a pickle (torch.save with the legacy format, or pickle.dump)")
    if suffix == ".onnx":
        return ModelFormat.ONNX
    if head[:2] == b"PK":
        try:
            with zipfile.ZipFile(p) as zf:
                names = _archive_names(zf)
                if "archive_format" in names:
                    if zf.read(_full_name(zf, "archive_format")).strip() != b"pt2":
                        raise CheckpointError(f"{p}: unknown archive_format in a torch archive")
                    return ModelFormat.EXPORT
                if any(n.startswith("code/") for n in names) and "data.pkl" in names:
                    return ModelFormat.TORCHSCRIPT
                if "data.pkl" in names:
                    raise _refuse(p, "it is a torch.save archive (a pickled object in data.pkl)")
                if "version" in names and "serialized_exported_program.json" in names:
                    raise _refuse(
                        p, "it is a torch.export archive in the pre-2.7 format, whose state is pickled"
                    )
        except zipfile.BadZipFile as exc:
            raise CheckpointError(f"{p} starts like a zip archive but cannot be read: {exc}") from exc
    raise CheckpointError(
        f"cannot tell the format of {p}: expected a checkpoint directory, a TorchScript archive, "
        "a torch.export .pt2 archive or an .onnx file"
    )


def _full_name(zf: zipfile.ZipFile, relative: str) -> str:
    for name in zf.namelist():
        if name == relative or (name.endswith("/" + relative) and name.count("/") == relative.count("/") + 1):
            return name
    raise KeyError(relative)


def _check_pt2(path: Path, payload: bytes) -> None:
    """Refuse a ``.pt2`` archive with any entry that ``torch.export.load`` would unpickle."""
    import torch
    from torch.export.pt2_archive import constants as c

    with zipfile.ZipFile(io.BytesIO(payload)) as zf:
        names = _archive_names(zf)
        if zf.read(_full_name(zf, c.ARCHIVE_VERSION_PATH)).decode().strip() != c.ARCHIVE_VERSION_VALUE:
            raise CheckpointError(f"{path}: unsupported torch.export archive version")
        for name in names:
            if name.startswith((c.AOTINDUCTOR_DIR, c.EXECUTORCH_DIR, c.MTIA_DIR)):
                raise CheckpointError(f"refusing to load {path}: it holds compiled code ({name})")
            if name.startswith((c.WEIGHTS_DIR, c.CONSTANTS_DIR)) and name.endswith(".pt"):
                raise _refuse(path, f"it holds pickled weights ({name}, the legacy layout)")
            if name.endswith("_config.json") and name.startswith((c.WEIGHTS_DIR, c.CONSTANTS_DIR)):
                config = json.loads(zf.read(_full_name(zf, name)))
                for fqn, entry in config.get("config", {}).items():
                    if entry.get("use_pickle"):
                        raise _refuse(path, f"entry {fqn!r} is pickled (a tensor subclass)")
                    file = str(entry.get("path_name", ""))
                    if name.startswith(c.CONSTANTS_DIR) and not file.startswith(
                        c.TENSOR_CONSTANT_FILENAME_PREFIX
                    ):
                        raise _refuse(path, f"constant {fqn!r} is a pickled object ({file})")
            if name.startswith(c.SAMPLE_INPUTS_DIR):
                try:
                    torch.load(io.BytesIO(zf.read(_full_name(zf, name))), weights_only=True)
                except Exception as exc:
                    raise _refuse(
                        path, f"its sample inputs ({name}) need the unrestricted unpickler"
                    ) from exc
        if not any(n.startswith(c.MODELS_DIR) for n in names):
            raise CheckpointError(f"{path}: a torch.export archive without a program under {c.MODELS_DIR}")


# ------------------------------------------------------------------------------------------ reading
def _sidecar_metadata(path: Path) -> dict[str, Any]:
    meta = path.parent / METADATA
    if not meta.is_file():
        return {}
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{meta} is not valid JSON: {exc}") from exc
    return data if isinstance(data, dict) else {}


def read_model(
    path: str | os.PathLike[str],
    *,
    preprocess: Preprocess | None = None,
    class_names: Sequence[str] | None = None,
) -> ModelArtifact:
    """Read a model file once (on the driver) into a :class:`ModelArtifact`, refusing pickles."""
    p = Path(path)
    fmt = detect_format(p)
    spec_json: str | None = None
    if fmt is ModelFormat.CHECKPOINT:
        root = p if p.is_dir() else p.parent
        spec_json = (root / SPEC).read_text(encoding="utf-8")
        payload = (root / WEIGHTS).read_bytes()
        metadata = _sidecar_metadata(root / SPEC)
        source = root
    else:
        payload = p.read_bytes()
        metadata = _sidecar_metadata(p)
        source = p
        if fmt is ModelFormat.EXPORT:
            _check_pt2(p, payload)
    if preprocess is None:
        if "preprocess" not in metadata:
            raise ConfigError(
                f"model {source} has no preprocessing metadata: pass preprocess=Preprocess("
                "input_shape=..., mean=..., std=...) (CLI: --input-shape/--mean/--std) or put a "
                f"{METADATA} with a 'preprocess' entry next to the model file"
            )
        preprocess = Preprocess.from_dict(metadata["preprocess"])
    names = class_names if class_names is not None else metadata.get("class_names")
    return ModelArtifact(
        format=fmt,
        payload=payload,
        preprocess=preprocess,
        class_names=tuple(str(n) for n in names) if names else None,
        source=str(source),
        spec_json=spec_json,
    )


# ------------------------------------------------------------------------------------------ running
Runner = Callable[[np.ndarray], np.ndarray]


def _torch_module(artifact: ModelArtifact) -> Any:
    import torch

    if artifact.format is ModelFormat.CHECKPOINT:
        from safetensors.torch import load as load_safetensors

        from deepspark.models.spec import ModelSpec, build_model

        model = build_model(ModelSpec.from_dict(json.loads(artifact.spec_json or "{}")))
        try:
            model.load_state_dict(load_safetensors(artifact.payload), strict=True)
        except RuntimeError as exc:
            raise CheckpointError(
                f"checkpoint {artifact.source}: weights do not match {SPEC}: {exc}"
            ) from exc
        return model.eval()
    if artifact.format is ModelFormat.TORCHSCRIPT:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated upstream
            module = torch.jit.load(io.BytesIO(artifact.payload), map_location="cpu")
        return module.eval()
    if artifact.format is ModelFormat.EXPORT:
        program = torch.export.load(io.BytesIO(artifact.payload))
        return program.module()
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


def build_runner(artifact: ModelArtifact, *, backend: str, threads: int) -> Runner:
    """A function ``float32 [N, C, H, W] -> logits [N, classes]`` for ``artifact`` (slow: loads)."""
    if backend == "onnx":
        ort = require("onnxruntime", feature="the ONNX backend (backend='onnx')")

        payload = artifact.payload if artifact.format is ModelFormat.ONNX else to_onnx(artifact)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        try:
            session = ort.InferenceSession(payload, sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise CheckpointError(f"onnxruntime cannot load {artifact.source}: {exc}") from exc
        (first,) = session.get_inputs()[:1]
        name = first.name

        def run_onnx(x: np.ndarray) -> np.ndarray:
            return np.asarray(session.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0])

        return _chunked(run_onnx, _fixed_batch(first.shape[0] if first.shape else None))

    import torch

    module = _torch_module(artifact)

    def run_torch(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        return np.asarray(out.detach().numpy() if hasattr(out, "detach") else out)

    return _chunked(run_torch, _export_batch(module) if artifact.format is ModelFormat.EXPORT else None)


# ----------------------------------------------------------------------------------------- exporting
def to_onnx(artifact: ModelArtifact) -> bytes:
    """Convert a torch-format artifact to ONNX bytes (in memory, on the driver)."""
    import torch

    if artifact.format is ModelFormat.ONNX:
        return artifact.payload
    module = _torch_module(artifact)
    example = torch.zeros((2, *artifact.preprocess.input_shape), dtype=torch.float32)
    return export_onnx(module, example)


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

    target = Path(path)
    by_suffix = {".onnx": "onnx", ".pt2": "torch.export"} | {s: "torchscript" for s in _TORCHSCRIPT_SUFFIXES}
    kind = format or by_suffix.get(target.suffix.lower())
    if kind not in ("torchscript", "torch.export", "onnx"):
        raise ConfigError(
            "format: expected 'torchscript', 'torch.export' or 'onnx' (or a .pt/.pt2/.onnx path), "
            f"got {format!r}"
        )
    if target.exists() and not overwrite:
        raise ConfigError(f"path: {target} already exists; pass overwrite=True or choose another path")
    ckpt = load_checkpoint(model)
    meta = {"preprocess": ckpt.preprocess.to_dict(), "class_names": list(ckpt.class_names)}
    sidecar = target.parent / METADATA
    if sidecar.is_file() and not overwrite:
        existing = _sidecar_metadata(target)
        if {k: existing.get(k) for k in meta} != meta:
            raise ConfigError(f"path: {sidecar} describes another model; export into another directory")
    module = ckpt.model.eval()
    example = torch.zeros((2, *ckpt.spec.input_shape), dtype=torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    if kind == "torchscript":
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated upstream
            torch.jit.trace(module, example).save(str(target))
    elif kind == "torch.export":
        batch = torch.export.Dim("batch", min=1)
        program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
        torch.export.save(program, str(target))
    else:
        target.write_bytes(export_onnx(module, example))
    sidecar.write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return target


# -------------------------------------------------------------------------------------- public model
class InferenceModel:
    """A loaded model with its preprocessing and class names; ``predict`` for a local batch."""

    def __init__(self, artifact: ModelArtifact, *, backend: str, threads: int | None = None) -> None:
        self.artifact = artifact
        self.backend = backend
        self._run = build_runner(artifact, backend=backend, threads=threads or os.cpu_count() or 1)
        probe = self._run(np.zeros((1, *artifact.preprocess.input_shape), dtype=np.float32))
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
    lines = p.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ConfigError(f"labels: {p} is empty")
    return tuple(line.strip() for line in lines)


def resolve_backend(backend: str, artifact: ModelArtifact) -> str:
    if backend not in BACKENDS:
        raise ConfigError(f"backend: expected one of {list(BACKENDS)}, got {backend!r}")
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
