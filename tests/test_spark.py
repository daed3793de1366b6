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


class _Resource:
    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses


class _Context:
    def __init__(self, gpus: list[str] | None) -> None:
        self._resources = {"gpu": _Resource(gpus)} if gpus is not None else {}

    def resources(self) -> dict[str, _Resource]:
        return self._resources


def test_task_device_follows_spark_gpu_assignment_and_never_falls_back_silently(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    from deepspark.errors import ConfigError
    from deepspark.spark import task_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert task_device("auto", _Context(["1"])) == torch.device("cpu")
    assert task_device("cpu", _Context(["1"])) == torch.device("cpu")
    assert task_device("auto", _Context(None)) == torch.device("cpu")
    with pytest.raises(ConfigError, match="cannot use GPU 1: CUDA is not available"):
        task_device("cuda", _Context(["1"]))
    with pytest.raises(ConfigError, match="assigned this task no GPU"):
        task_device("cuda", _Context(None))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert task_device("auto", _Context(["1"])) == torch.device("cuda:1")
    with pytest.raises(ConfigError, match="CUDA sees 2 device"):
        task_device("cuda", _Context(["5"]))
    with pytest.raises(ConfigError, match="device: expected one of"):
        task_device("gpu", _Context(None))
