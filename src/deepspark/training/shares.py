"""Training rows the driver already holds (a registered dataset, a dataset directory), given to the
workers' tasks as Spark broadcasts, one share per worker.

Such rows are arrays in the driver's memory, so making them a DataFrame only for the workers to read it
back cost the start of every run a conversion into the JVM and a shuffle to the worker count (on two
cores, 60,000 MNIST images: 0.3 s to create the DataFrame, 0.5 s to plan and run the shuffle, and the
JVM compiling the code that moved the rows, about 1 CPU-second, while the workers began to train).
Instead, the workers' job maps over ``spark.range(workers)``, one row per worker, and each task takes
its own share from its broadcast (:func:`read_share`). A retried or speculative task takes the same
share; a DataFrame given by the user is still repartitioned and read through Arrow
(:mod:`deepspark.training.frame`).

The rows are split by a fixed pseudo-random permutation (the same in every run, task and resume; not
the training seed, which a resume keeps anyway): a split by position would hand one worker one class
of a directory whose labels repeat with the worker count's period. Each share is in row-key order, and
shares differ by at most one row (rows < workers leaves some empty, which the strategies handle as an
empty partition). A share is held in the task's memory whole (it is a part of what the driver holds
whole), so the worker memory budget that makes a large DataFrame partition spill to a file does not
apply here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from deepspark.training.frame import Partition

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

__all__ = ["HeldRows", "broadcast_shares", "read_share", "share_keys", "share_of"]

_SPLIT_SEED = 0x5EED5  # the split's permutation: fixed, so every run and task splits alike


@dataclass(frozen=True)
class HeldRows:
    """Training rows in the driver's memory: uint8 ``images`` ``[N, C, H, W]`` and integer ``labels``."""

    images: np.ndarray
    labels: np.ndarray


def share_keys(rows: int, workers: int) -> list[np.ndarray]:
    """The row keys (positions) of each worker's share of ``rows`` rows split ``workers`` ways."""
    order = np.random.default_rng(_SPLIT_SEED).permutation(rows)
    return [np.sort(order[worker::workers]) for worker in range(workers)]


def share_of(rows: HeldRows, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The share of ``rows`` at ``keys`` (one of :func:`share_keys`): images and int64 labels (new arrays)."""
    return rows.images[keys], rows.labels[keys].astype(np.int64)


@contextlib.contextmanager
def broadcast_shares(
    spark: SparkSession, rows: HeldRows, workers: int
) -> Iterator[tuple[DataFrame, tuple[Any, ...]]]:
    """The DataFrame the workers' job maps over (``workers`` partitions of one row each) and the
    broadcasts its tasks read their shares from, which are destroyed on leaving, whatever happens
    (:func:`deepspark.spark.release_broadcast`: a JVM that is ending cannot, and that error never replaces
    how the run ended)."""
    from deepspark.spark import release_broadcast

    sc = spark.sparkContext
    shares: list[Any] = []
    try:
        for keys in share_keys(len(rows.labels), workers):  # one share at a time on the driver
            shares.append(sc.broadcast(share_of(rows, keys)))
        yield spark.range(0, workers, 1, workers), tuple(shares)
    finally:
        for share in shares:
            release_broadcast(share)


def read_share(shares: tuple[Any, ...], batches: Iterator[Any], worker: int) -> Partition:
    """Inside worker ``worker``'s task: its share (:func:`broadcast_shares`), with the SHA-256 of its
    labels and images as the digest a retried task must read again. ``batches`` (the task's one row of
    ``spark.range``) is read to its end."""
    from deepspark.data.record import arrays_sha256

    for _ in batches:
        pass
    images, labels = shares[worker].value
    return Partition(images, labels, f"sha256:{arrays_sha256(images, labels)}")
