"""Checkpoints: safetensors weights + a JSON spec + JSON metadata, in one directory.

Loading never unpickles: a pickle (by :mod:`deepspark.models.pickles`' one rule) is refused, because
unpickling runs arbitrary code from whoever wrote the file.

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

from deepspark.errors import CheckpointError, ConfigError, SpecError
from deepspark.models.pickles import PICKLE_SUFFIXES, refuse_pickle
from deepspark.models.preprocess import Preprocess
from deepspark.models.spec import ModelSpec, SpecModel, build_model
from deepspark.rundir import write_dir_atomic

__all__ = [
    "FORMAT",
    "Checkpoint",
    "CheckpointFiles",
    "build_checkpoint_model",
    "checkpoint_files",
    "load_checkpoint",
    "read_checkpoint",
    "read_metadata",
    "refuse_pickle",
    "save_checkpoint",
    "state_from_bytes",
    "state_to_bytes",
]

FORMAT = "deepspark-checkpoint"
WEIGHTS, SPEC, METADATA = "model.safetensors", "spec.json", "metadata.json"


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


def output_names(class_names: Sequence[str], outputs: int) -> list[str]:
    """One name per model output: the data's class names, then each extra output's index. A model may
    have more outputs than its data has classes (training allows it); inference labels every output."""
    return [*class_names, *(str(i) for i in range(len(class_names), outputs))]


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
    """A checkpoint as ``{file name: bytes}``, without touching the disk (to send it to the driver).

    Preprocessing for another input shape than ``spec``'s, or more class names than the network has
    outputs, is a :class:`ConfigError`: :func:`read_checkpoint` refuses such a checkpoint."""
    if tuple(preprocess.input_shape) != tuple(spec.input_shape):
        raise ConfigError(
            f"preprocess: its input shape {list(preprocess.input_shape)} is not the network's "
            f"{list(spec.input_shape)}"
        )
    if class_names is not None and len(class_names) > _outputs(spec, class_names):
        raise ConfigError(
            f"class_names: {len(class_names)} names for a network with {_outputs(spec, class_names)} outputs"
        )
    metadata: dict[str, Any] = {
        "format": FORMAT,
        "format_version": 1,
        "preprocess": preprocess.to_dict(),
        "class_names": None
        if class_names is None
        else output_names(class_names, _outputs(spec, class_names)),
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


def _outputs(spec: ModelSpec, class_names: Sequence[str]) -> int:
    shape = spec.output_shape()
    return int(shape[0]) if len(shape) == 1 else len(class_names)


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


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A ``metadata.json`` (a checkpoint's, or the one :func:`export_model` writes next to a model file);
    ``{}`` when there is none."""
    p = Path(path)
    if not p.is_file():
        return {}
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{p} is not valid JSON: {exc}") from exc
    except UnicodeDecodeError:
        raise CheckpointError(f"{p} is not valid JSON: not UTF-8 text") from None
    except RecursionError:  # json recurses per nesting level
        raise CheckpointError(f"{p} is not a metadata file: nested too deeply") from None
    except ValueError as exc:  # an integer past Python's 4300-digit conversion limit
        raise CheckpointError(f"{p} is not a metadata file: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{p}: expected a JSON object, got {type(data).__name__}")
    names = data.get("class_names")
    if names is not None and (
        not isinstance(names, list)
        or not all(isinstance(n, str | int) and not isinstance(n, bool) for n in names)
    ):
        # Read as a sequence, a string "cat" named three classes 'c', 'a', 't' and a mapping its keys.
        raise CheckpointError(
            f"{p}: 'class_names' must be a list of class names (strings), got {str(names)[:100]!r}"
        )
    return data


@dataclass(frozen=True)
class CheckpointFiles:
    """A checkpoint as read from disk, before any model is built: cheap to send to executors as bytes."""

    path: Path
    weights: bytes
    spec: ModelSpec
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def build(self) -> SpecModel:
        """The model (eval mode) with these weights; the one place checkpoint weights are read."""
        return build_checkpoint_model(self.spec, self.weights, source=self.path)

    def load(self) -> Checkpoint:
        return Checkpoint(model=self.build(), spec=self.spec, metadata=self.metadata, path=self.path)


def build_checkpoint_model(spec: ModelSpec, weights: bytes, *, source: str | os.PathLike[str]) -> SpecModel:
    """``spec``'s model with the safetensors ``weights`` of the checkpoint at ``source``, in eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        state = load(bytes(weights))
    except (SafetensorError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {source}: cannot read {WEIGHTS}: {exc}") from exc
    _check_weights(spec, state, source)
    try:
        # Seeded: its initial weights are replaced at once, and a seed draws them from a generator of
        # their own, so loading a model (predict, export, a report) leaves the caller's torch RNG as it was.
        model = build_model(spec, seed=0)
    except SpecError as exc:  # a layer's parameters, checked as the layer is built
        raise CheckpointError(f"checkpoint {source}: bad {SPEC}: {exc}") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {source}: weights do not match {SPEC}: {exc}") from exc
    return model.eval()


def _check_weights(
    spec: ModelSpec, state: Mapping[str, torch.Tensor], source: str | os.PathLike[str]
) -> None:
    """The weights must be the tensors ``spec`` builds, checked against the model built on the meta device
    (shapes, no memory) before the real one is allocated: a ``spec.json`` naming a layer of 10**12 units
    beside a small weights file made the driver allocate terabytes (a traceback) or gigabytes (before the
    mismatch was found); integer or boolean weights were cast to floats without a word."""
    try:
        with torch.device("meta"):
            expected = build_model(spec).state_dict()
    except SpecError as exc:
        raise CheckpointError(f"checkpoint {source}: bad {SPEC}: {exc}") from exc
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"checkpoint {source}: weights do not match {SPEC}: "
            f"{'missing ' + str(missing[:5]) if missing else ''}{'; ' if missing and extra else ''}"
            f"{'unexpected ' + str(extra[:5]) if extra else ''}"
        )
    for name, want in expected.items():
        got = state[name]
        if got.shape != want.shape or got.is_floating_point() != want.is_floating_point():
            raise CheckpointError(
                f"checkpoint {source}: weights do not match {SPEC}: {name} is {got.dtype} "
                f"{list(got.shape)} in {WEIGHTS}, the network needs {want.dtype} {list(want.shape)}"
            )


def read_checkpoint(path: str | os.PathLike[str]) -> CheckpointFiles:
    """Read a checkpoint directory (or a file inside one) without building the model. Never unpickles."""
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
            found = sorted(
                q.name for q in p.iterdir() if q.suffix.lower() in PICKLE_SUFFIXES | {".pt", ".pth"}
            )
            hint = (
                f" (found {found}: pickled files are refused; pass a TorchScript file itself to inference)"
                if found
                else ""
            )
            raise CheckpointError(f"checkpoint {p} has no {name}{hint}")
    refuse_pickle(p / WEIGHTS)
    try:
        spec = ModelSpec.from_file(p / SPEC)
        spec.output_shape()  # every layer's parameters, checked here once for the checks below
    except SpecError as exc:
        raise CheckpointError(f"checkpoint {p}: bad {SPEC}: {exc}") from exc
    try:
        weights = (p / WEIGHTS).read_bytes()
    except OSError as exc:
        raise CheckpointError(f"checkpoint {p}: cannot read {WEIGHTS}: {exc}") from exc
    metadata = read_metadata(p / METADATA)
    _check_preprocess(p, spec, metadata)
    _check_class_names(p, spec, metadata)
    return CheckpointFiles(path=p, weights=weights, spec=spec, metadata=metadata)


def _check_preprocess(path: Path, spec: ModelSpec, metadata: Mapping[str, Any]) -> None:
    """The stored preprocessing must be readable and feed the network the shape ``spec.json`` builds it
    for: inference reshapes images to the preprocessing's shape, and a network that happens to accept
    another one (a transposed H x W, a metadata.json copied from another run) would answer without a word."""
    if "preprocess" not in metadata:
        return
    try:
        preprocess = Preprocess.from_dict(metadata["preprocess"])
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint {path}: bad 'preprocess' entry in {METADATA}: {exc}") from exc
    if preprocess.input_shape != tuple(spec.input_shape):
        raise CheckpointError(
            f"checkpoint {path}: {METADATA} preprocesses images to {list(preprocess.input_shape)} but "
            f"{SPEC} builds the network for {list(spec.input_shape)}; the two files come from different "
            "models: save the checkpoint again with save_checkpoint"
        )


def _check_class_names(path: Path, spec: ModelSpec, metadata: Mapping[str, Any]) -> None:
    """``metadata.json`` must name every output of the network (:func:`checkpoint_files` writes one name
    per output): more names were taken as they were by ``load_checkpoint`` (an export then wrote them
    next to the model), and inference blamed them on ``labels`` that nobody gave."""
    names = metadata.get("class_names")
    if not names:
        return
    outputs = spec.output_shape()
    if len(outputs) == 1 and len(names) != outputs[0]:
        raise CheckpointError(
            f"checkpoint {path}: {METADATA} names {len(names)} classes but {SPEC} builds a network with "
            f"{outputs[0]} outputs; the two files come from different models: save the checkpoint again "
            "with save_checkpoint"
        )


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Load a checkpoint directory (or the ``model.safetensors`` inside one). Never unpickles."""
    return read_checkpoint(path).load()
