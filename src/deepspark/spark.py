"""Finding or starting a SparkSession, and matching threads to Spark task slots.

deepspark never manages a cluster. It uses the active SparkSession when there is one, otherwise it
builds one from ordinary Spark configuration (``--master``/``spark.master``), defaulting to the
embedded ``local[*]``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from deepspark.errors import ConfigError

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

__all__ = ["limit_threads", "session", "task_cpus", "total_slots"]

_log = logging.getLogger(__name__)

_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def session(
    master: str | None = None,
    *,
    app_name: str = "deepspark",
    conf: Mapping[str, Any] | None = None,
) -> SparkSession:
    """Return the active SparkSession, or start one.

    An active session always wins: deepspark runs inside the user's application as it is (a
    ``master`` or ``conf`` that disagrees with it is logged, not applied, since Spark cannot change
    them on a live context). Without one, ``master`` (default: ``spark.master`` from the
    environment's Spark configuration, else ``local[*]``) and ``conf`` configure a new session.
    """
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        if master is not None and active.sparkContext.master != master:
            _log.warning(
                "using the active SparkSession (master %s); master=%s was not applied",
                active.sparkContext.master,
                master,
            )
        return active
    builder = SparkSession.builder.appName(app_name)
    if master is not None:
        builder = builder.master(master)
    elif "spark.master" not in (conf or {}) and not os.environ.get("MASTER"):
        builder = builder.master("local[*]")
    settings = {
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.python.worker.reuse": "true",
    }
    if not os.environ.get("PYSPARK_PYTHON") and "spark.pyspark.python" not in (conf or {}):
        # Python workers must run this interpreter (our virtualenv), not whatever python3 is on PATH.
        os.environ["PYSPARK_PYTHON"] = sys.executable
    settings.update({k: str(v) for k, v in (conf or {}).items()})
    for key, value in settings.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(os.environ.get("DEEPSPARK_SPARK_LOG_LEVEL", "WARN"))
    return spark


def task_cpus(spark: SparkSession) -> int:
    """Cores Spark reserves for one task (``spark.task.cpus``, default 1)."""
    value = spark.sparkContext.getConf().get("spark.task.cpus", "1") or "1"
    return int(value)


def total_slots(spark: SparkSession) -> int:
    """How many tasks the cluster can run at once: total executor cores // ``spark.task.cpus``.

    ``defaultParallelism`` is the total number of cores on every cluster manager Spark ships
    (``local[N]`` gives N) unless the user overrode ``spark.default.parallelism``; we read the
    executors' cores from the status tracker where it knows them.
    """
    sc = spark.sparkContext
    cores = sc.defaultParallelism
    return max(1, cores // task_cpus(spark))


def limit_threads(threads: int) -> None:
    """Make this process's torch and BLAS use ``threads`` threads (call inside a Spark task).

    A task owns ``spark.task.cpus`` cores; using more oversubscribes the executor (hyperopt#921).
    """
    if threads < 1:
        raise ConfigError(f"threads must be a positive integer, got {threads!r}")
    for name in _THREAD_ENV:
        os.environ[name] = str(threads)
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    try:
        if torch.get_num_interop_threads() != 1:
            torch.set_num_interop_threads(1)
    except RuntimeError:
        # set_num_interop_threads may only be called once, before any inter-op work started.
        pass
