"""Declarative network specs, in the spirit of SparkNet's layer lists.

A spec is plain data (a dict, JSON or YAML): an ``input_shape`` and a list of layers. It is the
"model description" that tuning broadcasts and checkpoints store, so it must stay JSON-serialisable
and never contain code. Shapes are checked when the spec is built, layer by layer, so a mismatch names
the layer and both shapes instead of surfacing as a matmul error in the first forward pass.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepspark import textfile
from deepspark.errors import ConfigError, SpecError

__all__ = ["LAYER_TYPES", "ModelSpec", "SpecModel", "build_model", "load_spec"]

Shape = tuple[int, ...]


@dataclass(frozen=True)
class ModelSpec:
    """An immutable network description: ``input_shape`` (C, H, W) or (features,), and ``layers``."""

    input_shape: Shape
    layers: tuple[Mapping[str, Any], ...]
    name: str = "custom"
    hyperparameters: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        if not isinstance(data, Mapping):
            raise SpecError(
                f"a model spec must be a mapping with 'input_shape' and 'layers', got {type(data).__name__}"
            )
        unknown = set(data) - {"input_shape", "layers", "name", "hyperparameters"}
        if unknown:
            raise SpecError(
                f"unknown spec keys {sorted(unknown)}; expected 'input_shape', 'layers', 'name', 'hyperparameters'"
            )
        if "input_shape" not in data or "layers" not in data:
            raise SpecError("a model spec needs both 'input_shape' (e.g. [1, 28, 28]) and 'layers' (a list)")
        shape = data["input_shape"]
        if (
            not isinstance(shape, Sequence)
            or isinstance(shape, str)
            or not shape
            # true is an int to Python: [true, 28, 28] was read as one channel
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
        ):
            raise SpecError(
                f"input_shape must be a list of positive integers such as [1, 28, 28], got {shape!r}"
            )
        layers = data["layers"]
        if not isinstance(layers, Sequence) or isinstance(layers, str) or not layers:
            raise SpecError(f"layers must be a non-empty list of layer mappings, got {layers!r}")
        for i, layer in enumerate(layers):
            if not isinstance(layer, Mapping) or "type" not in layer:
                raise SpecError(f"layer {i} must be a mapping with a 'type' key, got {layer!r}")
        hyperparameters = data.get("hyperparameters", {})
        if not isinstance(hyperparameters, Mapping):
            raise SpecError(f"hyperparameters must be a mapping of names to values, got {hyperparameters!r}")
        return cls(
            input_shape=tuple(int(d) for d in shape),
            layers=tuple(dict(layer) for layer in layers),
            name=str(data.get("name", "custom")),
            hyperparameters=dict(hyperparameters),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "input_shape": list(self.input_shape),
            "layers": [dict(layer) for layer in self.layers],
            "hyperparameters": dict(self.hyperparameters),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> ModelSpec:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise SpecError(f"cannot read model spec {p}: {exc}") from exc
        except UnicodeDecodeError:
            raise SpecError(
                f"{p} is not a model spec: not UTF-8 text (expected a JSON or YAML file)"
            ) from None
        try:
            data = textfile.load(text, yaml_syntax=p.suffix.lower() in (".yaml", ".yml"))
        except textfile.SettingsError as exc:
            raise SpecError(f"{p} {exc}") from None
        return cls.from_dict(data)

    def output_shape(self) -> Shape:
        """The shape of one sample's output (checks every layer on the way)."""
        shape = self.input_shape
        with torch.device("meta"):  # shapes only: a layer's weights are never allocated for this
            for i, layer in enumerate(self.layers):
                _, shape = _make_layer(i, layer, shape)
        return shape

    def check_fits(self, *, input_shape: Sequence[int], num_classes: int) -> None:
        """Raise :class:`ConfigError` unless this network takes the data's inputs and scores all its classes.

        The one check train and tune make before Spark starts: a last layer with fewer outputs than the
        data has classes would otherwise fail in the first step, inside a task ("Target 9 is out of
        bounds"). More outputs than classes are allowed (the extra logits are never a target).
        """
        if tuple(self.input_shape) != tuple(input_shape):
            raise ConfigError(
                f"model: its input shape {list(self.input_shape)} does not match the data's {list(input_shape)}"
            )
        outputs = self.output_shape()
        if len(outputs) != 1 or outputs[0] < num_classes:
            raise ConfigError(
                f"model: its output {list(outputs)} cannot score the data's {num_classes} classes; "
                f"its last layer needs {num_classes} outputs"
            )


def load_spec(obj: ModelSpec | Mapping[str, Any] | str | os.PathLike[str]) -> ModelSpec:
    """Accept a ModelSpec, a dict, or a path to a JSON/YAML file."""
    if isinstance(obj, ModelSpec):
        return obj
    if isinstance(obj, Mapping):
        return ModelSpec.from_dict(obj)
    if isinstance(obj, str | os.PathLike):
        return ModelSpec.from_file(obj)
    raise SpecError(f"a model spec must be a ModelSpec, a dict or a file path, got {type(obj).__name__}")


class SpecModel(nn.Module):
    """The ``nn.Module`` built from a :class:`ModelSpec`: a sequence of layers, returning logits."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        modules: list[nn.Module] = []
        shape = spec.input_shape
        for i, layer in enumerate(spec.layers):
            module, shape = _make_layer(i, layer, shape)
            modules.append(module)
        self.output_shape = shape
        self.layers = nn.Sequential(*modules)
        if any(isinstance(m, nn.Conv2d) for m in modules):
            # Channels-last weights make convolutions and pooling take oneDNN's and PyTorch's vectorised
            # NHWC kernels (the NCHW max-pool is a scalar loop): LeNet's training step 1.5x and its
            # forward pass 2-3x faster on CPU (docs/benchmarks.md). The values are the same: only the
            # weights' memory layout changes; state dicts are made contiguous wherever they are written.
            self.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # not in the stubs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def build_model(
    spec: ModelSpec | Mapping[str, Any] | str | os.PathLike[str], *, seed: int | None = None
) -> SpecModel:
    """Build the module a spec describes; ``seed`` makes the initial weights reproducible."""
    spec = load_spec(spec)
    if seed is None:
        return SpecModel(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SpecModel(spec)


# ----------------------------------------------------------------------------------------- layers
def _params(
    i: int, layer: Mapping[str, Any], allowed: dict[str, Any], required: Sequence[str] = ()
) -> dict[str, Any]:
    kind = layer["type"]
    extra = set(layer) - set(allowed) - set(required) - {"type"}
    if extra:
        raise SpecError(
            f"layer {i} ({kind}): unknown parameter(s) {sorted(extra)}; allowed: {sorted([*required, *allowed])}"
        )
    missing = [k for k in required if k not in layer]
    if missing:
        raise SpecError(f"layer {i} ({kind}): missing required parameter(s) {missing}")
    out = dict(allowed)
    out.update({k: v for k, v in layer.items() if k != "type"})
    for key, value in out.items():
        if key in ("p", "momentum", "eps"):
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise SpecError(f"layer {i} ({kind}): {key} must be a number, got {value!r}")
        elif key == "bias":
            if not isinstance(value, bool):
                raise SpecError(f"layer {i} ({kind}): bias must be true or false, got {value!r}")
        elif key == "stride" and value is None and kind in ("maxpool", "avgpool"):
            continue  # a pool's stride defaults to its kernel size
        elif not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "padding" else 1):
            raise SpecError(f"layer {i} ({kind}): {key} must be a positive integer, got {value!r}")
    return out


def _need_image(i: int, kind: str, shape: Shape) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise SpecError(
            f"layer {i} ({kind}) expects an image input of shape (channels, height, width), got {shape}"
        )
    return shape[0], shape[1], shape[2]


def _conv(i: int, layer: Mapping[str, Any], shape: Shape) -> tuple[nn.Module, Shape]:
    p = _params(i, layer, {"kernel_size": 3, "stride": 1, "padding": 0, "bias": True}, ["out_channels"])
    c, h, w = _need_image(i, "conv", shape)
    k, s, pad = p["kernel_size"], p["stride"], p["padding"]
    oh, ow = (h + 2 * pad - k) // s + 1, (w + 2 * pad - k) // s + 1
    if oh < 1 or ow < 1:
        raise SpecError(f"layer {i} (conv): kernel {k} with padding {pad} does not fit input {shape}")
    return nn.Conv2d(c, p["out_channels"], k, stride=s, padding=pad, bias=p["bias"]), (
        p["out_channels"],
        oh,
        ow,
    )


def _pool(i: int, layer: Mapping[str, Any], shape: Shape) -> tuple[nn.Module, Shape]:
    kind = layer["type"]
    p = _params(i, layer, {"kernel_size": 2, "stride": None, "padding": 0})
    c, h, w = _need_image(i, kind, shape)
    k, pad = p["kernel_size"], p["padding"]
    s = p["stride"] or k
    if 2 * pad > k:  # torch's rule, otherwise met only in the first forward pass, inside a task
        raise SpecError(f"layer {i} ({kind}): padding {pad} is more than half the kernel size {k}")
    oh, ow = (h + 2 * pad - k) // s + 1, (w + 2 * pad - k) // s + 1
    if oh < 1 or ow < 1:
        raise SpecError(f"layer {i} ({kind}): kernel {k} does not fit input {shape}")
    cls = nn.AvgPool2d if kind == "avgpool" else nn.MaxPool2d
    return cls(k, stride=s, padding=pad), (c, oh, ow)


def _linear(i: int, layer: Mapping[str, Any], shape: Shape) -> tuple[nn.Module, Shape]:
    p = _params(i, layer, {"bias": True}, ["out_features"])
    if len(shape) != 1:
        raise SpecError(
            f"layer {i} (linear) expects a flat input of shape (features,), got {shape}: add a flatten layer before it"
        )
    return nn.Linear(shape[0], p["out_features"], bias=p["bias"]), (p["out_features"],)


def _flatten(i: int, layer: Mapping[str, Any], shape: Shape) -> tuple[nn.Module, Shape]:
    _params(i, layer, {})
    return nn.Flatten(), (math.prod(shape),)


def _dropout(i: int, layer: Mapping[str, Any], shape: Shape) -> tuple[nn.Module, Shape]:
    p = _params(i, layer, {"p": 0.5})
    if not 0.0 <= float(p["p"]) < 1.0:
        raise SpecError(f"layer {i} (dropout): p must be in [0, 1), got {p['p']!r}")
    return nn.Dropout(float(p["p"])), shape


def _batchnorm(i: int, layer: Mapping[str, Any], shape: Shape) -> tuple[nn.Module, Shape]:
    p = _params(i, layer, {"momentum": 0.1, "eps": 1e-5})
    if not 0.0 <= p["momentum"] <= 1.0 or not p["eps"] > 0:
        raise SpecError(
            f"layer {i} (batchnorm): momentum must be in [0, 1] and eps positive, got {p['momentum']!r}, {p['eps']!r}"
        )
    if len(shape) == 3:
        return nn.BatchNorm2d(shape[0], eps=p["eps"], momentum=p["momentum"]), shape
    if len(shape) == 1:
        return nn.BatchNorm1d(shape[0], eps=p["eps"], momentum=p["momentum"]), shape
    raise SpecError(f"layer {i} (batchnorm) expects (features,) or (channels, height, width), got {shape}")


def _activation(
    module: type[nn.Module],
) -> Callable[[int, Mapping[str, Any], Shape], tuple[nn.Module, Shape]]:
    def make(i: int, layer: Mapping[str, Any], shape: Shape) -> tuple[nn.Module, Shape]:
        _params(i, layer, {})
        return module(), shape

    return make


LAYER_TYPES: dict[str, Callable[[int, Mapping[str, Any], Shape], tuple[nn.Module, Shape]]] = {
    "conv": _conv,
    "maxpool": _pool,
    "avgpool": _pool,
    "linear": _linear,
    "flatten": _flatten,
    "dropout": _dropout,
    "batchnorm": _batchnorm,
    "relu": _activation(nn.ReLU),
    "tanh": _activation(nn.Tanh),
    "sigmoid": _activation(nn.Sigmoid),
}
_ALIASES = {"pool": "maxpool", "fc": "linear", "ip": "linear", "conv2d": "conv", "bn": "batchnorm"}


def _make_layer(i: int, layer: Mapping[str, Any], shape: Shape) -> tuple[nn.Module, Shape]:
    kind = str(layer.get("type"))
    kind = _ALIASES.get(kind, kind)
    maker = LAYER_TYPES.get(kind)
    if maker is None:
        raise SpecError(f"layer {i}: unknown type {layer.get('type')!r}; known types: {sorted(LAYER_TYPES)}")
    try:
        return maker(i, {**layer, "type": kind}, shape)
    except (RuntimeError, TypeError, OverflowError) as exc:  # torch's: sizes it cannot allocate or describe
        raise SpecError(f"layer {i} ({kind}): torch cannot build it ({str(exc).splitlines()[0]})") from None
