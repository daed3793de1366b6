"""MNIST-layout directories: four IDX files (train/test images and labels) loaded as an ImageDataset.

The twin of :mod:`deepspark.data.cifar`: both build the record, neither knows the other.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from deepspark.data.files import MNIST_FILES, find_file
from deepspark.data.idx import read_idx
from deepspark.data.record import ImageDataset, channels_last_hint
from deepspark.data.registry import DatasetInfo
from deepspark.errors import DatasetError

__all__ = [
    "check_idx_images",
    "check_idx_labels",
    "check_label_count",
    "find_mnist_layout",
    "load_mnist_layout",
]


def find_mnist_layout(directory: Path) -> list[Path]:
    """The four files of an MNIST-layout directory (in :data:`MNIST_FILES` order), or a DatasetError."""
    found = [find_file(directory, raw_name) for raw_name in MNIST_FILES]
    missing = [n for n, p in zip(MNIST_FILES, found, strict=True) if p is None]
    if missing:
        raise DatasetError(
            f"{directory}: not an MNIST-layout directory: missing {', '.join(missing)} "
            f"(each may also be .gz, or spelled with '.idx' instead of '-idx')"
        )
    return [p for p in found if p is not None]


def check_label_count(images_path: Path, images: int, labels_path: Path, labels: int) -> None:
    """A DatasetError unless an images file and its labels file hold as many examples as each other.

    The one check of the pairing, for training (the arrays' lengths) and for predict (the IDX headers',
    before any data is read): a count that differs would leave images without labels, or pair them
    with the wrong ones.
    """
    if images != labels:
        raise DatasetError(
            f"{images_path} holds {images} images but {labels_path} holds {labels} labels; "
            "expected one label per image: fix or replace whichever file is wrong"
        )


def check_idx_images(path: Path, images: np.ndarray) -> None:
    """A DatasetError unless ``images`` (read from the IDX file ``path``) are uint8 pixels with 3
    ([N,H,W]) or 4 ([N,C,H,W]) dimensions: the one check, for training's loader and for predict (a cast
    to uint8 would turn float pixels in [0, 1] into black images and predict them without a word)."""
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise DatasetError(
            f"{path}: images must be uint8 with 3 ([N,H,W]) or 4 ([N,C,H,W]) dimensions; "
            f"got {images.dtype} {images.shape}"
        )
    hint = channels_last_hint(images.shape[1:])
    if hint is not None:
        raise DatasetError(f"{path}: {hint}")
    if 0 in images.shape[1:]:  # a model for them would learn from nothing but its biases
        raise DatasetError(
            f"{path}: images of shape {images.shape[1:]} hold no pixels; each image dimension must be at least 1"
        )


def check_idx_labels(path: Path, labels: np.ndarray) -> None:
    """A DatasetError unless ``labels`` (read from the IDX file ``path``) are a 1-D integer array."""
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DatasetError(f"{path}: labels must be a 1-D integer array; got {labels.dtype} {labels.shape}")


def _read_split(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    check_idx_images(images_path, images)
    check_idx_labels(labels_path, labels)
    check_label_count(images_path, len(images), labels_path, len(labels))
    labels = labels.astype(np.int64)
    if len(labels) and labels.min() < 0:
        raise DatasetError(f"{labels_path}: labels must be non-negative; found {int(labels.min())}")
    return images, labels


def load_mnist_layout(name: str, files: list[Path], ds: DatasetInfo | None) -> ImageDataset:
    """The dataset in ``files`` (from :func:`find_mnist_layout`).

    With a registry entry ``ds``, its class names and statistics apply and labels must fit its classes;
    without one, the training labels define the classes and a test label never seen in training is an
    error (one stray 255 must not make a 10-class set 256 classes), as is a class count above the number
    of training examples.
    """
    train_images, train_labels = _read_split(files[0], files[1])
    test_images, test_labels = _read_split(files[2], files[3])
    if train_images.shape[1:] != test_images.shape[1:]:
        raise DatasetError(
            f"{files[0]} holds images of shape {train_images.shape[1:]} but {files[2]} holds "
            f"{test_images.shape[1:]}"
        )
    if ds is not None:
        class_names = ds.class_names
        for labels, path in ((train_labels, files[1]), (test_labels, files[3])):
            if len(labels) and labels.max() >= len(class_names):
                raise DatasetError(
                    f"{path}: label {int(labels.max())} is out of range for {len(class_names)} classes "
                    f"({ds.name}: expected labels 0..{len(class_names) - 1})"
                )
    else:
        # The training labels define the classes; one stray test label must not add classes that
        # no model output was ever trained for (a 255 would make a 10-class set 256 classes).
        top = int(train_labels.max()) if len(train_labels) else -1
        if top >= len(train_labels):
            # A class count past the examples means most classes have none: a stray or corrupt label
            # (an int32 2**31 - 1 would otherwise build two billion class names before any check).
            raise DatasetError(
                f"{files[1]}: label {top} would make {top + 1} classes, more than the {len(train_labels)} "
                "training examples (the classes are 0..the largest training label); fix the labels so "
                "they are class indices 0..classes-1"
            )
        class_names = tuple(str(i) for i in range(top + 1))
        unseen = np.setdiff1d(test_labels, train_labels)
        if len(unseen):
            raise DatasetError(
                f"{files[3]}: label {int(unseen[0])} never occurs in the training labels of {files[1]} "
                f"({len(class_names)} classes, labels 0..{top}); "
                f"{len(unseen)} test label value(s) unseen in training: {unseen[:10].tolist()}"
            )
    stats = (ds.mean, ds.std) if ds is not None and ds.mean is not None and ds.std is not None else None
    return ImageDataset.from_splits(
        name, (train_images, train_labels), (test_images, test_labels), class_names, stats=stats
    )
