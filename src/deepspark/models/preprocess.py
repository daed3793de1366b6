"""How raw pixels become the model's input tensor; stored with every checkpoint so that inference
normalises exactly as training did."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from deepspark.errors import ConfigError
from deepspark.validation import check_int, check_number, fail

__all__ = ["Normaliser", "Preprocess"]


@dataclass(frozen=True)
class Preprocess:
    """uint8 images ``[N, C, H, W]`` (or ``[N, H, W]`` for one channel) → ``(x * scale - mean) / std``."""

    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: float = 1.0 / 255.0

    def __post_init__(self) -> None:
        # One check for every way in (Python, metadata.json): a bool is an int to Python, and True
        # channels would read as one.
        shape = self.input_shape
        if not isinstance(shape, Sequence) or isinstance(shape, str) or len(shape) != 3:
            raise fail("preprocess.input_shape", "three integers (channels, height, width)", shape)
        for size in shape:
            check_int("preprocess.input_shape", size, minimum=1)
        object.__setattr__(self, "input_shape", tuple(shape))  # a list compared unequal to every shape
        channels = shape[0]
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, channels):
                raise fail(name, f"1 or {channels} values (one per channel)", values)
        # NaN or infinite values normalise every input to NaN (or to one constant): the model would
        # then predict class 0 with a NaN probability for every row, without an error anywhere.
        if not all(math.isfinite(m) for m in self.mean):
            raise fail("mean", "finite values", self.mean)
        if not all(math.isfinite(s) and s > 0 for s in self.std):
            raise fail("std", "positive finite values", self.std)

    def apply(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``images`` (uint8 or float, ``[N, C, H, W]`` or ``[N, H, W]`` for one channel) as a new float32
        tensor of model inputs, on the device a tensor is on."""
        if isinstance(images, torch.Tensor):
            return self.normaliser(images.device)(images)
        # A float copy of ours (a read-only array, e.g. a memory map, is never viewed as a tensor).
        array = np.asarray(images)
        x = torch.empty(array.shape, dtype=torch.float32)
        x.numpy()[...] = array
        return self.normaliser()(x, in_place=True)

    def normaliser(self, device: torch.device | str = "cpu") -> Normaliser:
        """:meth:`apply` for tensors on ``device``, its per-channel factors made once: what a training
        worker calls per batch on the uint8 pixels it keeps (a quarter of float32's memory)."""
        mean = torch.tensor(self.mean, dtype=torch.float64).reshape(-1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float64).reshape(-1, 1, 1)
        factor = (self.scale / std).to(device=device, dtype=torch.float32)
        shift = (mean / std).to(device=device, dtype=torch.float32)
        return Normaliser(self.input_shape, factor, shift)

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_shape": list(self.input_shape),
            "mean": list(self.mean),
            "std": list(self.std),
            "scale": self.scale,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocess:
        """Read back :meth:`to_dict` (a ``metadata.json`` entry, written by anyone): a missing entry or
        a value of the wrong type is a :class:`ConfigError` naming it, never a KeyError or a number
        quietly rounded (an input shape of four values cut to three)."""
        if not isinstance(data, Mapping):
            raise fail("preprocess", "a mapping with 'input_shape', 'mean' and 'std'", data)
        shape = _sequence(data, "input_shape")
        return cls(
            input_shape=shape,  # type: ignore[arg-type]  # checked by __post_init__
            mean=tuple(check_number("preprocess.mean", m) for m in _sequence(data, "mean")),
            std=tuple(check_number("preprocess.std", s) for s in _sequence(data, "std")),
            scale=check_number("preprocess.scale", data.get("scale", 1.0 / 255.0), low=0.0, low_open=True),
        )


@dataclass(frozen=True)
class Normaliser:
    """``x * factor - shift`` per channel (factor = scale / std, shift = mean / std), in float32."""

    input_shape: tuple[int, int, int]
    factor: torch.Tensor
    shift: torch.Tensor

    def __call__(self, images: torch.Tensor, *, in_place: bool = False) -> torch.Tensor:
        """``images`` as model inputs: a new float32 tensor (or ``images`` itself, normalised, when it
        is float32 and ``in_place``)."""
        x = images if in_place and images.dtype == torch.float32 else images.to(torch.float32, copy=True)
        if x.dim() == len(self.input_shape):  # [N, H, W] for a one-channel input
            x = x.unsqueeze(1)
        if tuple(x.shape[1:]) != self.input_shape:
            raise ConfigError(
                f"images of shape {tuple(x.shape[1:])} do not match the model input {self.input_shape}"
            )
        # In place on the float copy, x * (scale / std) - mean / std, rather than three temporaries:
        # 3x faster on 30,000 MNIST images.
        return x.mul_(self.factor).sub_(self.shift)


def _sequence(data: Mapping[str, Any], key: str) -> Sequence[Any]:
    value = data.get(key)
    if not isinstance(value, Sequence) or isinstance(value, str) or not value:
        raise fail(f"preprocess.{key}", "a non-empty list", value)
    return value
