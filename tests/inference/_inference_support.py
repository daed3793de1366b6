"""Helpers shared by the inference tests (imported by name; pytest puts this folder on sys.path)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

CLASS_NAMES = [f"digit-{i}" for i in range(10)]


@dataclass(frozen=True)
class Model:
    path: Path
    module: Any
    images: np.ndarray  # uint8 [N, 28, 28] test images


def reference_probabilities(model: Model, images: np.ndarray) -> np.ndarray:
    """The model's own output on a local batch: preprocess, forward, softmax (no deepspark inference code)."""
    import torch

    x = (torch.as_tensor(images, dtype=torch.float32).unsqueeze(1) / 255.0 - 0.1307) / 0.3081
    with torch.no_grad():
        return torch.softmax(model.module(x), dim=1).numpy()


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class Server:
    url: str
    root: Path
    hits: dict[str, int]
