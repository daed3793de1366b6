"""Checkpoints: safetensors weights + a JSON spec + JSON metadata, in one directory.

Loading never unpickles. A ``.pt``/``.pkl`` file (or anything that starts like a pickle or a
``torch.save`` zip) is refused, because unpickling runs arbitrary code from whoever wrote the file.

Layout of ``DIR/``::

    model.safetensors   the state dict
    spec.json           the ModelSpec (layers + input shape)
    metadata.json       preprocess, class_names, metrics, config, versions, created
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepspark.errors import CheckpointError, SpecError
from deepspark.models.preprocess import Preprocess
from deepspark.models.spec import ModelSpec, SpecModel, build_model
from deepspark.rundir import write_dir_atomic

__all__ = [
    "FORMAT",
    "Checkpoint",
    "checkpoint_files",
    "load_checkpoint",
    "refuse_pickle",
    "save_checkpoint",
    "state_from_bytes",
    "state_to_bytes",
]

FORMAT = "deepspark-checkpoint"
WEIGHTS, SPEC, METADATA = "model.safetensors", "spec.json", "metadata.json"
_PICKLE_SUFFIXES = {".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt", ".joblib"}


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: the model (in eval mode), its spec and its metadata."""

    model: SpecModel
    spec: ModelSpec
    metadata: Mapping[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def preprocess(self) -> Preprocess:
        if "preprocess" not in self.metadata:
            raise CheckpointError(f"checkpoint {self.path} has no 'preprocess' entry in {METADATA}")
        return Preprocess.from_dict(self.metadata["preprocess"])

    @property
    def class_names(self) -> tuple[str, ...]:
        names = self.metadata.get("class_names")
        if names:
            return tuple(str(n) for n in names)
        return tuple(str(i) for i in range(self.spec.output_shape()[0]))


def _versions() -> dict[str, str]:
    import torch

    from deepspark import __version__

    return {"deepspark": __version__, "torch": torch.__version__, "python": platform.python_version()}


def state_to_bytes(state_dict: Mapping[str, torch.Tensor]) -> bytes:
    """Serialise a state dict as safetensors bytes (never pickle): for a frame payload or a file."""
    from safetensors.torch import save

    return save({k: v.detach().contiguous().cpu() for k, v in state_dict.items()})


def state_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    """The state dict in safetensors ``data``; raises :class:`CheckpointError` if it is not safetensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(bytes(data))
    except (SafetensorError, ValueError) as exc:
        raise CheckpointError(f"not a safetensors state dict ({len(data)} bytes): {exc}") from exc


def checkpoint_files(
    model: nn.Module,
    spec: ModelSpec,
    *,
    preprocess: Preprocess,
    class_names: Sequence[str] | None = None,
    metrics: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, bytes]:
    """A checkpoint as ``{file name: bytes}``, without touching the disk (to send it to the driver)."""
    metadata: dict[str, Any] = {
        "format": FORMAT,
        "format_version": 1,
        "preprocess": preprocess.to_dict(),
        "class_names": list(class_names) if class_names is not None else None,
        "metrics": dict(metrics or {}),
        "config": dict(config or {}),
        "versions": _versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    metadata.update(extra or {})
    return {
        WEIGHTS: state_to_bytes(model.state_dict()),
        SPEC: spec.to_json().encode("utf-8"),
        METADATA: json.dumps(metadata, indent=2, sort_keys=True, default=str).encode("utf-8"),
    }


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    spec: ModelSpec,
    *,
    preprocess: Preprocess,
    class_names: Sequence[str] | None = None,
    metrics: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` as a checkpoint directory, atomically (a temp dir renamed into place)."""
    target = Path(path)
    if target.exists() and not overwrite:
        raise CheckpointError(f"{target} already exists; pass overwrite=True or choose another path")
    files = checkpoint_files(
        model,
        spec,
        preprocess=preprocess,
        class_names=class_names,
        metrics=metrics,
        config=config,
        extra=extra,
    )
    return write_dir_atomic(target, files)


def refuse_pickle(path: str | os.PathLike[str]) -> None:
    """Raise CheckpointError if ``path`` looks like a pickle or a ``torch.save`` archive."""
    p = Path(path)
    head = b""
    if p.is_file():
        with p.open("rb") as fh:
            head = fh.read(4)
    looks_pickled = head[:1] == b"\x80" or (head[:2] == b"PK" and p.suffix.lower() != ".onnx")
    if p.suffix.lower() in _PICKLE_SUFFIXES or looks_pickled:
        raise CheckpointError(
            f"refusing to load {p}: it is (or looks like) a pickle / torch.save file, and unpickling runs "
            "arbitrary code. Save the weights with safetensors (deepspark.save_checkpoint) or export the "
            "model to TorchScript, torch.export or ONNX instead."
        )


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Load a checkpoint directory (or the ``model.safetensors`` inside one). Never unpickles."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if p.is_file():
        refuse_pickle(p)
        if p.name == WEIGHTS or p.suffix == ".safetensors" or p.name in (SPEC, METADATA):
            p = p.parent
        else:
            raise CheckpointError(
                f"{p} is not a deepspark checkpoint: expected a directory holding {WEIGHTS}"
            )
    if not p.is_dir():
        raise CheckpointError(f"checkpoint {p} does not exist")
    for name in (WEIGHTS, SPEC):
        if not (p / name).is_file():
            pickles = sorted(q.name for q in p.iterdir() if q.suffix.lower() in _PICKLE_SUFFIXES)
            hint = f" (found {pickles}: pickled files are refused)" if pickles else ""
            raise CheckpointError(f"checkpoint {p} has no {name}{hint}")
    try:
        spec = ModelSpec.from_file(p / SPEC)
    except SpecError as exc:
        raise CheckpointError(f"checkpoint {p}: bad {SPEC}: {exc}") from exc
    metadata: dict[str, Any] = {}
    if (p / METADATA).is_file():
        try:
            metadata = json.loads((p / METADATA).read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"checkpoint {p}: {METADATA} is not valid JSON: {exc}") from exc
    model = build_model(spec)
    try:
        state = load_file(str(p / WEIGHTS))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"checkpoint {p}: cannot read {WEIGHTS}: {exc}") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {p}: weights do not match {SPEC}: {exc}") from exc
    model.eval()
    return Checkpoint(model=model, spec=spec, metadata=metadata, path=p)
