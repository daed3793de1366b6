"""CIFAR-10 in its binary format (``cifar-10-batches-bin``).

Each record is one label byte followed by 3072 image bytes (red, green, blue planes of 32×32),
so a whole batch file reads as one ``[N, 3073]`` array: no per-image Python work.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from deepspark.data.record import ImageDataset
from deepspark.errors import DatasetError

__all__ = ["CIFAR10_CLASSES", "find_cifar10", "load_cifar10", "read_cifar10"]

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
_RECORD = 1 + 3 * 32 * 32
_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
_TEST = "test_batch.bin"
_META = "batches.meta.txt"


def read_cifar10(paths: Sequence[str | os.PathLike[str]]) -> tuple[np.ndarray, np.ndarray]:
    """Read CIFAR-10 binary batch files; return images uint8 [N,3,32,32] and labels int64 [N]."""
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    images, labels = [], []
    for raw in paths:
        path = Path(raw)
        if not path.is_file():
            raise DatasetError(f"{path}: no such file")
        size = path.stat().st_size
        if size == 0 or size % _RECORD:
            raise DatasetError(
                f"{path}: size {size} bytes is not a positive multiple of the {_RECORD}-byte CIFAR-10 "
                f"record (1 label byte + 3×32×32 image bytes); truncated or not a CIFAR-10 batch?"
            )
        records = np.fromfile(path, dtype=np.uint8).reshape(-1, _RECORD)
        batch_labels = records[:, 0].astype(np.int64)
        if batch_labels.max() >= len(CIFAR10_CLASSES):
            raise DatasetError(
                f"{path}: label {int(batch_labels.max())} is out of range for CIFAR-10's 10 classes"
            )
        images.append(records[:, 1:].reshape(-1, 3, 32, 32))
        labels.append(batch_labels)
    if not images:
        return np.zeros((0, 3, 32, 32), dtype=np.uint8), np.zeros((0,), dtype=np.int64)
    return np.concatenate(images), np.concatenate(labels)


def _base(directory: Path) -> Path:
    nested = directory / "cifar-10-batches-bin"
    return nested if nested.is_dir() else directory


def find_cifar10(directory: str | os.PathLike[str]) -> list[Path] | None:
    """The batch files of a CIFAR-10 binary directory (train batches, then the test batch), or None.

    The directory may be the extracted ``cifar-10-batches-bin`` itself or its parent.
    """
    base = _base(Path(directory))
    files = [base / name for name in (*_TRAIN, _TEST)]
    return files if all(f.is_file() for f in files) else None


def load_cifar10(directory: str | os.PathLike[str]) -> ImageDataset:
    """Load ``data_batch_1..5.bin`` and ``test_batch.bin`` from ``directory`` as an ImageDataset.

    Class names come from ``batches.meta.txt`` when present (so relabelled variants keep their
    names), else the standard ten.
    """
    base = _base(Path(directory))
    files = find_cifar10(base)
    if files is None:
        missing = [n for n in (*_TRAIN, _TEST) if not (base / n).is_file()]
        raise DatasetError(f"{base}: not a CIFAR-10 binary directory: missing {', '.join(missing)}")
    train_images, train_labels = read_cifar10(files[:-1])
    test_images, test_labels = read_cifar10(files[-1:])
    class_names: tuple[str, ...] = CIFAR10_CLASSES
    meta = base / _META
    if meta.is_file():
        try:
            text = meta.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DatasetError(
                f"{meta}: cannot read the class names ({exc}); it must be UTF-8 text with one name per "
                "line, or be removed (the standard ten names are used then)"
            ) from exc
        names = tuple(line.strip() for line in text.splitlines() if line.strip())
        if len(names) != len(CIFAR10_CLASSES):
            raise DatasetError(f"{meta}: expected {len(CIFAR10_CLASSES)} class names, found {len(names)}")
        class_names = names
    return ImageDataset.from_splits(
        "cifar10", (train_images, train_labels), (test_images, test_labels), class_names
    )
