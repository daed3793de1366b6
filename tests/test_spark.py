"""deepspark.spark: a master that does not answer fails fast, with its URL, and before the JVM starts."""

from __future__ import annotations

import socket
import time

import pytest

from deepspark.errors import ConfigError
from deepspark.spark import check_master


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed again when the block ends: nothing listens


def test_a_standalone_master_nobody_listens_on_fails_fast_with_its_url() -> None:
    url = f"spark://127.0.0.1:{_closed_port()}"
    started = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        check_master(url)
    assert time.monotonic() - started < 15
    message = str(caught.value)
    assert message.startswith(f"master {url}: no Spark master answers") and "\n" not in message


def test_a_live_master_and_non_standalone_masters_pass() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        check_master(f"spark://127.0.0.1:{server.getsockname()[1]}")
        check_master(f"spark://127.0.0.1:{_closed_port()},127.0.0.1:{server.getsockname()[1]}")
    for master in (None, "local[2]", "yarn", "k8s://https://example.invalid:443"):
        check_master(master)
    with pytest.raises(ConfigError, match="expected spark://HOST:PORT"):
        check_master("spark://nohost")


def test_a_bad_master_leaves_no_run_directory_and_the_corrected_command_runs(
    spark, tmp_path, monkeypatch
) -> None:
    from pyspark.sql import SparkSession

    from deepspark.tuning import tune

    space = {"x": {"type": "uniform", "low": 0.0, "high": 1.0}}
    run = tmp_path / "run"
    with monkeypatch.context() as patch:  # as in a fresh driver: no session to reuse
        patch.setattr(SparkSession, "getActiveSession", staticmethod(lambda: None))
        with pytest.raises(ConfigError, match="no Spark master answers"):
            tune(
                lambda c, r: c["x"],
                space=space,
                trials=1,
                run_dir=run,
                master=f"spark://127.0.0.1:{_closed_port()}",
            )
    assert not run.exists()
    result = tune(lambda c, r: c["x"], space=space, trials=1, sampler="random", run_dir=run)
    assert result.counts()["complete"] == 1


def test_the_cores_of_an_executor_are_known_from_a_local_master_before_the_jvm() -> None:
    import os

    from deepspark.spark import master_cores

    assert master_cores("local") == 1
    assert master_cores("local[3]") == 3
    assert master_cores("local[2, 4]") == 2
    assert master_cores("local[*]") == (os.cpu_count() or 1)
    assert master_cores("local-cluster[2, 3, 1024]") == 3
    for master in ("spark://127.0.0.1:7077", "yarn", "k8s://https://example.invalid:443"):
        assert master_cores(master) is None


def test_sparks_cpus_per_task_error_becomes_one_line_naming_both_numbers() -> None:
    from deepspark.spark import _raise_gateway_error

    java = (
        "An error occurred while calling None.org.apache.spark.api.java.JavaSparkContext.\n"
        ": org.apache.spark.SparkException: The number of cores per executor (=2) has to be >= the number "
        "of cpus per task = 3.\n\tat org.apache.spark.SparkContext..."
    )
    with pytest.raises(ConfigError) as caught:
        _raise_gateway_error(RuntimeError(java), "spark://h:7077")
    assert str(caught.value).startswith("spark.task.cpus: expected at most 2 (the cores of one executor of")
    assert "got 3" in str(caught.value) and "\n" not in str(caught.value)
