"""A directory as its own dataset: CIFAR-10 binaries or an MNIST layout, whichever it holds."""

from __future__ import annotations

from pathlib import Path

from deepspark.data.cifar import find_cifar10, load_cifar10
from deepspark.data.files import MNIST_FILES, find_file
from deepspark.data.mnist import find_mnist_layout, load_mnist_layout
from deepspark.data.record import ImageDataset
from deepspark.errors import DatasetError

__all__ = ["check_one_dataset", "load_directory"]


def check_one_dataset(directory: Path) -> list[Path] | None:
    """The CIFAR-10 batch files in ``directory`` (None when there are none); a DatasetError when it also
    holds a whole MNIST layout, since reading either one would train on data the user may not have meant.
    """
    cifar_files = find_cifar10(directory)
    if cifar_files is not None and all(find_file(directory, raw_name) for raw_name in MNIST_FILES):
        raise DatasetError(
            f"{directory}: holds two datasets, CIFAR-10 batches in {cifar_files[0].parent} and the MNIST-layout "
            f"files {', '.join(MNIST_FILES)}; move one of them out, or give a directory holding only "
            "the one to use"
        )
    return cifar_files


def load_directory(directory: Path) -> tuple[ImageDataset, list[Path]]:
    """The dataset in ``directory`` and the files it was read from; a DatasetError when it holds none.

    A CIFAR-10 binary directory (or its parent) is read as CIFAR-10; anything else must be an MNIST
    layout, named after the directory, with classes ``0..max training label``. A directory holding both
    is refused (:func:`check_one_dataset`).
    """
    if not directory.is_dir():
        raise DatasetError(f"{directory}: data directory does not exist")
    cifar_files = check_one_dataset(directory)
    if cifar_files is not None:
        return load_cifar10(directory), cifar_files
    files = find_mnist_layout(directory)
    return load_mnist_layout(directory.resolve().name, files, None), files
