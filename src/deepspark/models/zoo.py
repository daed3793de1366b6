"""Ready-made specs with hyperparameters: ``mlp``, ``lenet`` (SparkNet) and ``cnn`` (TF deep MNIST)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from deepspark.errors import ConfigError
from deepspark.models.spec import ModelSpec
from deepspark.validation import check_choice, check_int, fail

__all__ = ["ZOO", "model_spec"]


def _mlp(*, hidden: int = 256, depth: int = 2, dropout: float = 0.0) -> list[dict[str, Any]]:
    # depth 0 is a linear model; a negative one made one too, as if it were 0, without a word.
    check_int("model 'mlp': depth", depth, minimum=0)
    layers: list[dict[str, Any]] = [{"type": "flatten"}]
    for _ in range(depth):
        layers += [{"type": "linear", "out_features": hidden}, {"type": "relu"}]
        if dropout:
            layers.append({"type": "dropout", "p": dropout})
    return layers


def _lenet() -> list[dict[str, Any]]:
    # SparkNet's LeNet (Caffe's lenet_train_test.prototxt): conv20-pool-conv50-pool-ip500-relu-ip10.
    return [
        {"type": "conv", "out_channels": 20, "kernel_size": 5},
        {"type": "maxpool", "kernel_size": 2},
        {"type": "conv", "out_channels": 50, "kernel_size": 5},
        {"type": "maxpool", "kernel_size": 2},
        {"type": "flatten"},
        {"type": "linear", "out_features": 500},
        {"type": "relu"},
    ]


def _cnn(
    *, conv1: int = 32, conv2: int = 64, fc: int = 1024, dropout: float = 0.5, batchnorm: bool = False
) -> list[dict[str, Any]]:
    # TensorFlow's "deep MNIST for experts" network, the 2016 blog's default configuration; batchnorm
    # puts a batch normalisation between each convolution and its ReLU.
    norm: list[dict[str, Any]] = [{"type": "batchnorm"}] if batchnorm else []
    return [
        {"type": "conv", "out_channels": conv1, "kernel_size": 5, "padding": 2},
        *norm,
        {"type": "relu"},
        {"type": "maxpool", "kernel_size": 2},
        {"type": "conv", "out_channels": conv2, "kernel_size": 5, "padding": 2},
        *norm,
        {"type": "relu"},
        {"type": "maxpool", "kernel_size": 2},
        {"type": "flatten"},
        {"type": "linear", "out_features": fc},
        {"type": "relu"},
        {"type": "dropout", "p": dropout},
    ]


ZOO: dict[str, tuple[Callable[..., list[dict[str, Any]]], dict[str, type]]] = {
    "mlp": (_mlp, {"hidden": int, "depth": int, "dropout": float}),
    "lenet": (_lenet, {}),
    "cnn": (_cnn, {"conv1": int, "conv2": int, "fc": int, "dropout": float, "batchnorm": bool}),
}


def model_spec(
    name: str,
    *,
    input_shape: Sequence[int] = (1, 28, 28),
    num_classes: int = 10,
    **hyperparameters: Any,
) -> ModelSpec:
    """The zoo network ``name`` for inputs of ``input_shape`` with a ``num_classes``-way output layer.

    Hyperparameters are checked against the network's list, so a typo is an error, not a silent default.
    """
    check_choice("model", name, sorted(ZOO))
    make, allowed = ZOO[name]
    unknown = set(hyperparameters) - set(allowed)
    if unknown:
        raise ConfigError(
            f"model {name!r}: unknown hyperparameter(s) {sorted(unknown)}; it takes {sorted(allowed) or 'none'}"
        )
    values: dict[str, Any] = {}
    for key, value in hyperparameters.items():
        kind = allowed[key]
        if kind is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is bool:
            if not isinstance(value, bool):
                raise fail(f"model {name!r}: {key}", "true or false", value)
        elif not isinstance(value, kind) or isinstance(value, bool):
            raise fail(f"model {name!r}: {key}", "an integer" if kind is int else "a number", value)
        values[key] = value
    check_int("num_classes", num_classes, minimum=2)
    layers = [*make(**values), {"type": "linear", "out_features": num_classes}]
    spec = ModelSpec(
        input_shape=tuple(int(d) for d in input_shape),
        layers=tuple(layers),
        name=name,
        hyperparameters=values,
    )
    spec.output_shape()  # fail now, naming the layer, if the input shape does not fit
    return spec
