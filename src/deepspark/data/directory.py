"""A directory as its own dataset: CIFAR-10 binaries or an MNIST layout, whichever it holds."""

from __future__ import annotations

from pathlib import Path

from deepspark.data.cifar import find_cifar10, load_cifar10
from deepspark.data.mnist import find_mnist_layout, load_mnist_layout
from deepspark.data.record import ImageDataset
from deepspark.errors import DatasetError

__all__ = ["load_directory"]


def load_directory(directory: Path) -> tuple[ImageDataset, list[Path]]:
    """The dataset in ``directory`` and the files it was read from; a DatasetError when it holds none.

    A CIFAR-10 binary directory (or its parent) is read as CIFAR-10; anything else must be an MNIST
    layout, named after the directory, with classes ``0..max training label``.
    """
    if not directory.is_dir():
        raise DatasetError(f"{directory}: data directory does not exist")
    cifar_files = find_cifar10(directory)
    if cifar_files is not None:
        return load_cifar10(directory), cifar_files
    files = find_mnist_layout(directory)
    return load_mnist_layout(directory.resolve().name, files, None), files
