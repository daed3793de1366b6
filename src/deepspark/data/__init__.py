"""Datasets for deepspark: verified fetching, IDX and CIFAR-10 readers, DataFrame conversion.

The lowest layer of the package: it imports nothing from models, training or tuning. Inside, each module
has one job, and imports point one way (docs/architecture.md has the map):

- ``files``: file names and spellings (MNIST layout), gzip detection; ``idx``: the IDX format
- ``record``: :class:`ImageDataset`, the validation hold-out, channel statistics
- ``registry``: the registered datasets and their raw-byte SHA-256 digests
- ``cache``: the user's directory and our cache, remembered checksums
- ``mnist`` and ``cifar``: twin loaders building the record; ``directory``: a directory as its own dataset
- ``fetch``: sources (directory, cache, mirrors, npm), verified atomic install; ``loading``: load by name
- ``frames``: DataFrame <-> arrays
"""

from __future__ import annotations

from deepspark.data.cifar import load_cifar10, read_cifar10
from deepspark.data.fetch import fetch, locations, verify
from deepspark.data.frames import image_shape, iter_batches, to_dataframe, to_numpy
from deepspark.data.idx import read_idx, write_idx
from deepspark.data.loading import info, load_dataset
from deepspark.data.record import DEFAULT_VALIDATION, ImageDataset, validation_indices
from deepspark.data.registry import DATASETS, DatasetInfo

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
