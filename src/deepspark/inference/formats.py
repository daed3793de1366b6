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

This module tells the formats apart and audits ``.pt2`` archives; which files are pickles is
:mod:`deepspark.models.pickles`' one rule, and checkpoints are read by :mod:`deepspark.models.checkpoint`.
Checkpoints carry their preprocessing and class names. For the other formats they come from, in order:
the ``preprocess=``/``class_names=`` arguments, else a ``metadata.json`` next to the model file (the same
schema as a checkpoint's, which :func:`export_model` writes).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepspark._compat import StrEnum
from deepspark._optional import require
from deepspark.errors import CheckpointError, ConfigError
from deepspark.models.checkpoint import METADATA, SPEC, read_checkpoint, read_metadata
from deepspark.models.export import ONNX_FILE
from deepspark.models.pickles import archive_names, refusal, refuse_pickle
from deepspark.models.preprocess import Preprocess

__all__ = ["ModelArtifact", "ModelFormat", "detect_format", "read_model"]


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
def detect_format(path: str | os.PathLike[str]) -> ModelFormat:
    """Tell the model format from the file's content (suffixes only decide for ONNX and pickles).

    A directory is a checkpoint (:func:`read_model` first takes a folder's ``model.onnx`` when it holds
    no ``spec.json``); :func:`~deepspark.models.checkpoint.read_checkpoint` says what
    one lacks."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"model: expected an existing file or checkpoint directory, got {str(p)!r}")
    if p.is_dir():
        return ModelFormat.CHECKPOINT
    refuse_pickle(p)
    if p.suffix.lower() == ".safetensors" or p.name in (SPEC, METADATA):
        return ModelFormat.CHECKPOINT
    if p.suffix.lower() == ".onnx":
        return ModelFormat.ONNX
    with p.open("rb") as fh:
        head = fh.read(2)
    if head == b"PK":
        try:
            with zipfile.ZipFile(p) as zf:
                names = archive_names(zf)
                if "archive_format" in names:
                    if zf.read(_full_name(zf, "archive_format")).strip() != b"pt2":
                        raise CheckpointError(f"{p}: unknown archive_format in a torch archive")
                    return ModelFormat.EXPORT
                if any(n.startswith("code/") for n in names) and "data.pkl" in names:
                    return ModelFormat.TORCHSCRIPT
        except (zipfile.BadZipFile, zlib.error) as exc:  # zlib: an entry's compressed bytes are damaged
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
    try:
        _audit_pt2(path, payload)
    except (KeyError, UnicodeDecodeError, zipfile.BadZipFile, zlib.error) as exc:  # a crafted or damaged zip
        raise CheckpointError(
            f"{path}: not a readable torch.export archive ({type(exc).__name__}: {exc})"
        ) from None


def _pt2_config(path: Path, name: str, data: bytes) -> dict[str, dict[str, Any]]:
    """A weights or constants ``*_config.json`` of a ``.pt2`` archive: ``{fqn: entry}``."""
    try:
        config = json.loads(data)
    except (ValueError, RecursionError):  # not UTF-8, not JSON, nested too deeply
        config = None
    entries = config.get("config", {}) if isinstance(config, dict) else None
    if not isinstance(entries, dict) or not all(isinstance(e, dict) for e in entries.values()):
        raise CheckpointError(f"{path}: {name} in the torch.export archive is not a JSON config of entries")
    return entries


def _audit_pt2(path: Path, payload: bytes) -> None:
    import torch
    from torch.export.pt2_archive import constants as c

    with zipfile.ZipFile(io.BytesIO(payload)) as zf:
        names = archive_names(zf)
        if zf.read(_full_name(zf, c.ARCHIVE_VERSION_PATH)).decode().strip() != c.ARCHIVE_VERSION_VALUE:
            raise CheckpointError(f"{path}: unsupported torch.export archive version")
        for name in names:
            if name.startswith((c.AOTINDUCTOR_DIR, c.EXECUTORCH_DIR, c.MTIA_DIR)):
                raise CheckpointError(f"refusing to load {path}: it holds compiled code ({name})")
            if name.startswith((c.WEIGHTS_DIR, c.CONSTANTS_DIR)) and name.endswith(".pt"):
                raise refusal(path, f"it holds pickled weights ({name}, the legacy layout)")
            if name.endswith("_config.json") and name.startswith((c.WEIGHTS_DIR, c.CONSTANTS_DIR)):
                for fqn, entry in _pt2_config(path, name, zf.read(_full_name(zf, name))).items():
                    if entry.get("use_pickle"):
                        raise refusal(path, f"entry {fqn!r} is pickled (a tensor subclass)")
                    file = str(entry.get("path_name", ""))
                    if name.startswith(c.CONSTANTS_DIR) and not file.startswith(
                        c.TENSOR_CONSTANT_FILENAME_PREFIX
                    ):
                        raise refusal(path, f"constant {fqn!r} is a pickled object ({file})")
            if name.startswith(c.SAMPLE_INPUTS_DIR):
                try:
                    torch.load(io.BytesIO(zf.read(_full_name(zf, name))), weights_only=True)
                except Exception as exc:
                    raise refusal(
                        path, f"its sample inputs ({name}) need the unrestricted unpickler"
                    ) from exc
        if not any(n.startswith(c.MODELS_DIR) for n in names):
            raise CheckpointError(f"{path}: a torch.export archive without a program under {c.MODELS_DIR}")


def _onnx_tensors(nodes: Any, graphs: Any = ()) -> Iterator[Any]:
    """Every tensor an ONNX graph holds: initializers and node attributes, subgraphs included."""
    for graph in graphs:
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield from (sparse.values, sparse.indices)
        yield from _onnx_tensors(graph.node)
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            yield from _onnx_tensors((), [*([attr.g] if attr.HasField("g") else []), *attr.graphs])


def _check_onnx(path: Path, payload: bytes) -> None:
    """Refuse an ONNX model whose tensors live in external files: the model is broadcast as the bytes of
    its one file, and onnxruntime resolves such a file against the working directory of each process that
    loads it (the driver's, an executor's), not the model's folder."""
    from google.protobuf.message import DecodeError

    onnx = require("onnx", feature="ONNX models")
    try:
        model = onnx.load_model_from_string(payload)
    except (DecodeError, ValueError) as exc:
        raise CheckpointError(f"{path} is not an ONNX model: {exc}") from exc
    functions = [node for function in model.functions for node in function.node]
    for tensor in _onnx_tensors(functions, [model.graph]):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            where = next((e.value for e in tensor.external_data if e.key == "location"), "?")
            raise CheckpointError(
                f"{path}: tensor {tensor.name!r} is stored outside the model file ({where!r}); deepspark "
                "sends the model file alone to Spark: save it with its weights inside "
                "(onnx.save(model, path, save_as_external_data=False), below 2 GiB)"
            )


# ------------------------------------------------------------------------------------------ reading
def read_model(
    path: str | os.PathLike[str],
    *,
    preprocess: Preprocess | None = None,
    class_names: Sequence[str] | None = None,
) -> ModelArtifact:
    """Read a model file once (on the driver) into a :class:`ModelArtifact`, refusing pickles."""
    p = Path(path)
    if p.is_dir() and not (p / SPEC).exists() and (p / ONNX_FILE).is_file():
        p = p / ONNX_FILE  # a folder holding an ONNX model (fit() with a model factory saves one)
    fmt = detect_format(p)
    spec_json: str | None = None
    if fmt is ModelFormat.CHECKPOINT:
        files = read_checkpoint(p)
        payload, spec_json, metadata = files.weights, files.spec.to_json(), dict(files.metadata)
        source = files.path
    else:
        payload = p.read_bytes()
        metadata = read_metadata(p.parent / METADATA)
        source = p
        if fmt is ModelFormat.EXPORT:
            _check_pt2(p, payload)
        elif fmt is ModelFormat.ONNX:
            _check_onnx(p, payload)
    stored = Preprocess.from_dict(metadata["preprocess"]) if "preprocess" in metadata else None
    if preprocess is None:
        if stored is None:
            raise ConfigError(
                f"model {source} has no preprocessing metadata: pass preprocess=Preprocess("
                "input_shape=..., mean=..., std=...) (CLI: --input-shape/--mean/--std) or put a "
                f"{METADATA} with a 'preprocess' entry next to the model file"
            )
        preprocess = stored
    elif stored is not None and stored != preprocess:
        # A checkpoint (or a file with a metadata.json) says how it was trained; other values would
        # normalise its inputs differently and give wrong probabilities without a word.
        raise ConfigError(
            f"preprocess: model {source} carries its own preprocessing (input shape "
            f"{list(stored.input_shape)}, mean {list(stored.mean)}, std {list(stored.std)}), which "
            f"the one given (input shape {list(preprocess.input_shape)}, mean {list(preprocess.mean)}, "
            f"std {list(preprocess.std)}) contradicts; leave it out (CLI: --input-shape/--mean/--std)"
        )
    # Names given are kept even when there are none (an empty list is then refused against the model's
    # class count), never read as "no names given": that dropped the checkpoint's own without a word.
    names = class_names if class_names is not None else (metadata.get("class_names") or None)
    return ModelArtifact(
        format=fmt,
        payload=payload,
        preprocess=preprocess,
        class_names=tuple(str(n) for n in names) if names is not None else None,
        source=str(source),
        spec_json=spec_json,
    )
