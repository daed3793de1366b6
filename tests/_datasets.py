"""Tiny image datasets for tests that train for real: learnable in a few epochs on one core."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def bar_dataset(directory: Path, *, train: int, test: int, size: int = 8) -> Path:
    """Three classes in MNIST's IDX layout, each a bright bar at its own rows over dim noise."""
    from deepspark.data import write_idx

    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", train), ("t10k", test)):
        labels = (np.arange(n) % 3).astype(np.uint8)
        images = rng.integers(0, 60, size=(n, size, size), dtype=np.uint8)
        for i, label in enumerate(labels):
            images[i, label * 2 : label * 2 + 2, :] = 250
        write_idx(directory / f"{prefix}-images-idx3-ubyte", images)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte", labels)
    return directory
