"""Shared fixtures. One SparkSession (local[2]) serves the whole test run: a JVM start costs seconds."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

os.environ.setdefault("DEEPSPARK_SPARK_LOG_LEVEL", "ERROR")


@pytest.fixture(scope="session")
def spark() -> Iterator[Any]:
    from deepspark.spark import session

    spark = session("local[2]", app_name="deepspark-tests")
    try:
        yield spark
    finally:
        spark.stop()


@pytest.fixture(scope="session")
def mnist() -> Any:
    """The real MNIST (fetched by `make test` before pytest runs)."""
    from deepspark.data import load_dataset

    return load_dataset("mnist")
