"""Datasets for deepspark: verified fetching, IDX and CIFAR-10 readers, DataFrame conversion.

The lowest layer of the package: it imports nothing from models, training or tuning.
"""

from __future__ import annotations

from deepspark.data.cifar import load_cifar10, read_cifar10
from deepspark.data.datasets import (
    DATASETS,
    DEFAULT_VALIDATION,
    DatasetInfo,
    ImageDataset,
    fetch,
    info,
    load_dataset,
    locations,
    validation_indices,
    verify,
)
from deepspark.data.frames import image_shape, iter_batches, to_dataframe, to_numpy
from deepspark.data.idx import read_idx, write_idx

__all__ = [
    "DATASETS",
    "DEFAULT_VALIDATION",
    "DatasetInfo",
    "ImageDataset",
    "fetch",
    "image_shape",
    "info",
    "iter_batches",
    "load_cifar10",
    "load_dataset",
    "locations",
    "read_cifar10",
    "read_idx",
    "to_dataframe",
    "to_numpy",
    "validation_indices",
    "verify",
    "write_idx",
]
