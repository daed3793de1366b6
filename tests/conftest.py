"""Shared fixtures. One SparkSession (local[2]) serves the whole test run: a JVM start costs seconds."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

os.environ.setdefault("DEEPSPARK_SPARK_LOG_LEVEL", "ERROR")


@pytest.fixture(autouse=True)
def _ship_test_functions_by_value(request: pytest.FixtureRequest) -> None:
    """Objectives defined in a test module must reach Spark's Python workers, which cannot import the
    test module by name: pickle its functions by value, as cloudpickle does for ``__main__``."""
    from pyspark import cloudpickle

    module = request.module
    if module.__name__ not in cloudpickle.list_registry_pickle_by_value():
        cloudpickle.register_pickle_by_value(module)


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
