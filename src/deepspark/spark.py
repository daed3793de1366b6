"""Finding or starting a SparkSession, and matching threads to Spark task slots.

deepspark never manages a cluster. It uses the active SparkSession when there is one, otherwise it
builds one from ordinary Spark configuration (``--master``/``spark.master``), defaulting to the
embedded ``local[*]``.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from deepspark.errors import ConfigError

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

__all__ = [
    "check_master",
    "check_task_cpus",
    "executor_cores",
    "limit_threads",
    "master_cores",
    "session",
    "task_cpus",
    "total_slots",
]

_log = logging.getLogger(__name__)

_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
_PROBE_S = 5.0  # a standalone master that does not accept a TCP connection in this time is taken as down


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
    planned = master if master is not None else (conf or {}).get("spark.master") or os.environ.get("MASTER")
    check_master(planned)
    if "spark.task.cpus" in (conf or {}):
        _check_cores("spark.task.cpus", int((conf or {})["spark.task.cpus"]), planned or "local[*]")
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
    try:
        spark = builder.getOrCreate()
    except Exception as exc:
        _raise_gateway_error(exc, master)
        raise
    spark.sparkContext.setLogLevel(os.environ.get("DEEPSPARK_SPARK_LOG_LEVEL", "WARN"))
    return spark


def check_master(master: str | None) -> None:
    """Fail fast, with the URL, when a standalone master (``spark://host:port[,host:port]``) does not answer.

    Spark itself retries a dead master for about a minute and then fails with "Cannot call methods on a
    stopped SparkContext" in a long trace; one TCP connect per address takes ``_PROBE_S`` at most and
    needs no JVM. Other masters (local, yarn, k8s) are left to Spark.
    """
    if not master or not master.startswith("spark://"):
        return
    errors = []
    for address in master[len("spark://") :].split(","):
        host, _, port = address.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"master: expected spark://HOST:PORT, got {master!r}")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=_PROBE_S):
                return  # one live master (of a high-availability list) is enough
        except OSError as exc:
            errors.append(f"{address}: {exc.strerror or exc}")
    raise ConfigError(
        f"master {master}: no Spark master answers ({'; '.join(errors)}); start it "
        "(Spark's sbin/start-master.sh) or fix --master"
    )


def master_cores(master: str) -> int | None:
    """The cores of one executor of a local master, known before any JVM starts: ``local`` 1,
    ``local[N]`` (and ``local[N,F]``) N, ``local[*]`` every core, ``local-cluster[E,C,M]`` C; None for a
    cluster manager (its executors' cores are the cluster's to say)."""
    text = master.strip()
    if text == "local":
        return 1
    m = re.fullmatch(r"local\[(\*|\d+)(?:,\s*(?:\*|\d+))?\]", text)
    if m is not None:
        return (os.cpu_count() or 1) if m.group(1) == "*" else int(m.group(1))
    m = re.fullmatch(r"local-cluster\[\s*\d+\s*,\s*(\d+)\s*,\s*\d+\s*\]", text)
    return int(m.group(1)) if m is not None else None


def executor_cores(spark: SparkSession) -> int | None:
    """The cores of one executor of a live session: its local master's, else ``spark.executor.cores`` when
    set, else None (a standalone executor takes what its worker offers)."""
    sc = spark.sparkContext
    cores = master_cores(str(sc.master))
    if cores is not None:
        return cores
    value = sc.getConf().get("spark.executor.cores", None)
    return int(value) if value else None


def check_task_cpus(name: str, threads: int, *, master: str | None = None) -> None:
    """Raise :class:`ConfigError` (naming ``name``) when a task's ``threads`` exceed one executor's cores.

    Checked against the session :func:`session` would use (the active one, else the one ``master``
    starts), before any JVM starts or job runs: otherwise Spark fails in the SparkContext's constructor
    with a Java trace, or never schedules the task. Where the cores are unknown (a cluster manager
    without ``spark.executor.cores``) nothing is checked.
    """
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        cores, where = executor_cores(active), str(active.sparkContext.master)
    else:
        where = master or os.environ.get("MASTER") or "local[*]"
        cores = master_cores(where)
    if cores is not None and threads > cores:
        raise _too_many(name, threads, cores, where)


def _check_cores(name: str, threads: int, master: str) -> None:
    cores = master_cores(master)
    if cores is not None and threads > cores:
        raise _too_many(name, threads, cores, master)


def _too_many(name: str, threads: int, cores: int, master: str) -> ConfigError:
    return ConfigError(
        f"{name}: expected at most {cores} (the cores of one executor of {master}), got {threads}; "
        "use fewer threads, or executors with more cores"
    )


_CPUS_PER_TASK = re.compile(r"cores per executor \(=(\d+)\) has to be >= the number of cpus per task = (\d+)")


def _raise_gateway_error(exc: Exception, master: str | None) -> None:
    """Turn a JVM that could not start (no Java, a Java that exits) into a one-line ConfigError."""
    text = f"{type(exc).__name__}: {exc}"
    found = _CPUS_PER_TASK.search(text)
    if found is not None:  # spark.executor.cores below spark.task.cpus, from the user's Spark configuration
        raise _too_many(
            "spark.task.cpus", int(found.group(2)), int(found.group(1)), master or "the configured master"
        ) from exc
    if "JAVA_GATEWAY_EXITED" in text or "Java gateway process exited" in text:
        raise ConfigError(
            "Spark could not start its JVM (Java gateway exited"
            + (f", master {master}" if master else "")
            + "): install Java 17 or 21 (e.g. apt-get install openjdk-17-jre-headless) and set JAVA_HOME, "
            "or see the lines above for Spark's own error"
        ) from exc
    if isinstance(exc, FileNotFoundError) and "java" in text:
        raise ConfigError(
            f"Spark could not start its JVM: no java found ({exc}); install Java 17 or 21 and set JAVA_HOME"
        ) from exc


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
