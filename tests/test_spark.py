"""deepspark.spark: a master that does not answer fails fast, with its URL, and before the JVM starts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from deepspark.errors import ConfigError
from deepspark.spark import _names_master, check_master, environment_conf, quiet_log_options, speculative_copy


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
    from deepspark.tuning import tune

    space = {"x": {"type": "uniform", "low": 0.0, "high": 1.0}}
    run = tmp_path / "run"
    with monkeypatch.context() as patch:  # as in a fresh driver: no session to reuse
        patch.setattr("deepspark.spark.running_session", lambda: None)
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

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
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
    # Spark names GPUs as nvidia-smi does; CUDA counts only those CUDA_VISIBLE_DEVICES lists.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert task_device("auto", _Context(["3"])) == torch.device("cuda:1")
    assert task_device("auto", _Context(["2"])) == torch.device("cuda:0")
    with pytest.raises(ConfigError, match="cannot use GPU 1: CUDA_VISIBLE_DEVICES=2,3 hides it"):
        task_device("cuda", _Context(["1"]))
    assert task_device("auto", _Context(["1"])) == torch.device("cpu")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aa,GPU-bb")
    assert task_device("auto", _Context(["GPU-bb"])) == torch.device("cuda:1")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    with pytest.raises(ConfigError, match="not a CUDA device index"):
        task_device("cuda", _Context(["GPU-bb"]))


def _defaults(directory: Path, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "spark-defaults.conf").write_text(text, encoding="utf-8")
    return directory


def test_spark_defaults_conf_is_read_from_spark_conf_dir_else_spark_home(tmp_path: Path) -> None:
    text = (
        "# a comment\n! another\nspark.master   spark://h:7077\nspark.a=1\nspark.b: two words\nspark.c = 3\n"
    )
    conf_dir = _defaults(tmp_path / "conf", text)
    expected = {"spark.master": "spark://h:7077", "spark.a": "1", "spark.b": "two words", "spark.c": "3"}
    assert environment_conf({"SPARK_CONF_DIR": str(conf_dir)}) == expected
    assert environment_conf({"SPARK_HOME": str(tmp_path)}) == expected
    assert environment_conf({"SPARK_HOME": str(tmp_path / "none")}) == {}
    assert environment_conf({}) == {}


def test_local_is_the_default_only_when_nothing_names_a_master(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("MASTER", "PYSPARK_SUBMIT_ARGS", "SPARK_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SPARK_CONF_DIR", str(tmp_path / "empty"))
    assert not _names_master({})
    assert _names_master({"spark.master": "yarn"})
    monkeypatch.setenv("PYSPARK_SUBMIT_ARGS", "--master spark://h:7077 pyspark-shell")
    assert _names_master({})
    monkeypatch.delenv("PYSPARK_SUBMIT_ARGS")
    monkeypatch.setenv("SPARK_CONF_DIR", str(_defaults(tmp_path / "conf", "spark.master yarn\n")))
    assert _names_master({})


def test_the_planned_master_takes_spark_defaults_conf_before_master_as_spark_submit_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """spark-submit picks spark.master from its properties before the MASTER variable; deepspark checked
    MASTER first, so it probed and counted the cores of another master than the session started on."""
    from deepspark.spark import _planned_master

    monkeypatch.setenv("MASTER", "local[1]")
    monkeypatch.setenv("SPARK_CONF_DIR", str(_defaults(tmp_path / "conf", "spark.master local[2]\n")))
    assert _planned_master(None, {}) == "local[2]"
    assert _planned_master(None, {"spark.master": "local[3]"}) == "local[3]"
    assert _planned_master("local[4]", {"spark.master": "local[3]"}) == "local[4]"
    monkeypatch.setenv("SPARK_CONF_DIR", str(tmp_path / "empty"))
    assert _planned_master(None, {}) == "local[1]"


def test_quiet_start_passes_our_log4j2_file_to_the_driver_jvm(tmp_path: Path) -> None:
    shipped = resources.files("deepspark") / "log4j2.properties"
    text = shipped.read_text(encoding="utf-8")
    assert "rootLogger.level = warn" in text
    for logger in ("org.apache.spark.util.Utils", "org.apache.hadoop.util.NativeCodeLoader"):
        assert f"name = {logger}\n" in text
    options = quiet_log_options({}, {})
    assert options is not None and options.startswith("-Dlog4j2.configurationFile=file:///")
    assert options.endswith("/deepspark/log4j2.properties")
    # The user's own options are kept, whether given as conf or in spark-defaults.conf.
    assert quiet_log_options({"spark.driver.extraJavaOptions": "-Xss4m"}, {}).endswith(" -Xss4m")  # type: ignore[union-attr]
    conf_dir = _defaults(tmp_path / "conf", "spark.driver.extraJavaOptions -Dx=1 -Dy=2\n")
    assert quiet_log_options({}, {"SPARK_CONF_DIR": str(conf_dir)}).endswith(" -Dx=1 -Dy=2")  # type: ignore[union-attr]


def test_quiet_start_reports_a_failed_task_in_one_line_each_without_its_traces() -> None:
    """A task that raised used to print its Python traceback and Java stack twice (executor and
    scheduler), ~120 lines per failed attempt; the job's error itself still carries the whole cause.
    A large task is no news either."""
    code = (
        "from deepspark.spark import session\n"
        "spark = session('local[1]')\n"
        "def boom(rows):\n"
        "    for _ in rows:\n"
        "        raise RuntimeError('boom on the executor')\n"
        "    yield 0\n"
        "try:\n"
        "    spark.sparkContext.parallelize([1], 1).mapPartitions(boom).collect()\n"
        "except Exception as exc:\n"
        "    print('CAUGHT', 'RuntimeError: boom on the executor' in str(exc))\n"
        # A task of 2 MB of local data, as `train DATASET --workers N` ships its dataset: Spark's hint
        # that the task is large came with every such run.
        "import pyarrow as pa\n"
        "from deepspark._compat import arrow_to_dataframe\n"
        "df = arrow_to_dataframe(spark, pa.table({'b': [bytes(1000)] * 2000}))\n"
        "print('BYTES', df.repartition(2).selectExpr('sum(length(b))').first()[0])\n"
        "spark.stop()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "DEEPSPARK_SPARK_LOG_LEVEL"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env, check=True
    )
    assert done.stdout.strip().splitlines()[-2:] == ["CAUGHT True", "BYTES 2000000"]
    lines = done.stderr.splitlines()
    assert not [line for line in lines if "very large size" in line or "ERROR Logger" in line], lines
    lost = [line for line in lines if "WARN TaskSetManager: Lost task 0.0 in stage" in line]
    assert len(lost) == 1 and "org.apache.spark.api.python.PythonException" in lost[0], lines
    assert sum("ERROR Executor: Exception in task 0.0 in stage" in line for line in lines) == 1, lines
    assert not [line for line in lines if "Traceback" in line or "boom" in line or line.startswith("\tat ")]


def test_quiet_start_gives_way_to_the_users_logging(tmp_path: Path) -> None:
    assert quiet_log_options({}, {"DEEPSPARK_SPARK_LOG_LEVEL": "info"}) is None
    assert quiet_log_options({}, {"DEEPSPARK_SPARK_LOG_LEVEL": "ERROR"}) is not None
    own = {"spark.driver.extraJavaOptions": "-Dlog4j2.configurationFile=/etc/mine.properties"}
    assert quiet_log_options(own, {}) is None
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    (conf_dir / "log4j2.properties").write_text("rootLogger.level = info\n", encoding="utf-8")
    assert quiet_log_options({}, {"SPARK_CONF_DIR": str(conf_dir)}) is None


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


def test_threads_are_checked_against_the_master_the_session_would_start_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cluster named by --conf spark.master or spark-defaults.conf was taken for local[*]: 64 threads
    per trial were refused against this machine's cores."""
    from deepspark.spark import check_task_cpus, configured

    monkeypatch.setattr("deepspark.spark.running_session", lambda: None)
    for name in ("MASTER", "SPARK_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SPARK_CONF_DIR", str(tmp_path / "none"))
    too_many = (os.cpu_count() or 1) + 1
    with pytest.raises(ConfigError, match=r"the cores of one executor of local\[\*\]"):
        check_task_cpus("threads_per_trial", too_many)
    with configured({"spark.master": "spark://127.0.0.1:7077"}):
        check_task_cpus("threads_per_trial", too_many)  # a standalone cluster's executors: not this machine
    with configured({"spark.master": "local[1]"}), pytest.raises(ConfigError, match=r"of local\[1\]"):
        check_task_cpus("threads_per_trial", 2)
    monkeypatch.setenv("SPARK_CONF_DIR", str(_defaults(tmp_path / "conf", "spark.master yarn\n")))
    check_task_cpus("threads_per_trial", too_many)


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


def test_limit_threads_also_limits_blas_pools_loaded_before_it() -> None:
    """numpy's OpenBLAS is loaded with the worker, before the task sets the variables: it must follow too."""
    code = (
        "import json, numpy, torch\n"
        "from threadpoolctl import threadpool_info\n"
        "from deepspark.spark import limit_threads\n"
        "before = [p['num_threads'] for p in threadpool_info()]\n"
        "limit_threads(1)\n"
        "after = [p['num_threads'] for p in threadpool_info()]\n"
        "print(json.dumps({'before': before, 'after': after, 'torch': torch.get_num_threads()}))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, check=True
    ).stdout
    seen = json.loads(out.strip().splitlines()[-1])
    assert seen["after"] and all(n == 1 for n in seen["after"]), seen
    assert seen["torch"] == 1


def _slow_job(sc) -> None:
    time.sleep(1.0)  # still planning when the group is cancelled: its job is submitted after that
    sc.parallelize(range(2), 2).foreach(lambda _: time.sleep(30))


def test_a_cancelled_run_job_also_stops_the_job_its_action_submits_later(spark) -> None:
    """Spark cancels a group's active jobs only. An action that submitted its job after the first cancel
    ran it to the end (here 30 s), after the caller had moved on and destroyed its broadcasts."""
    from deepspark.spark import job_group, run_job

    sc = spark.sparkContext
    started = time.monotonic()
    error = run_job(sc, lambda: _slow_job(sc), group=job_group("test-late-job"), cancel_when=lambda: True)
    took = time.monotonic() - started
    assert error is not None and "cancel" in str(error).lower(), error
    assert took < 15, took


class _Conf(dict):  # SparkConf.get's signature over a dict
    def get(self, key, default=None):
        return super().get(key, default)


def _session(master: str, default_parallelism: int, executors: int = 0, **conf: str):
    from types import SimpleNamespace

    memory_status = SimpleNamespace(size=lambda: executors + 1)  # the driver is listed too
    context = SimpleNamespace(
        master=master,
        defaultParallelism=default_parallelism,
        getConf=lambda: _Conf({k.replace("_", "."): v for k, v in conf.items()}),
        _jsc=SimpleNamespace(sc=lambda: SimpleNamespace(getExecutorMemoryStatus=lambda: memory_status)),
    )
    return SimpleNamespace(sparkContext=context)


@pytest.mark.parametrize(
    ("session", "cores", "slots"),
    [
        (_session("local[2]", 2), 2, 2),
        # spark.default.parallelism set (a shuffle setting): fit counted 8 slots on local[2], started 4
        # workers, and the rounds waited for the 2 that never ran (measured: still waiting after 150 s).
        (_session("local[2]", 8, spark_default_parallelism="8"), 2, 2),
        (_session("local[4]", 16, spark_default_parallelism="16", spark_task_cpus="2"), 4, 2),
        (_session("local-cluster[2,1,1024]", 8, spark_default_parallelism="8"), 2, 2),
        (_session("spark://h:7077", 200, 3, spark_default_parallelism="200", spark_executor_cores="2"), 6, 6),
        (_session("yarn", 200, 3, spark_default_parallelism="200"), 200, 200),  # nothing better is known
    ],
)
def test_slots_count_cores_not_spark_default_parallelism(session, cores: int, slots: int) -> None:
    from deepspark.spark import total_cores, total_slots

    assert (total_cores(session), total_slots(session)) == (cores, slots)


@pytest.mark.parametrize(
    ("tasks", "running", "completed", "copy"),
    [(1, 1, 0, False), (1, 2, 0, True), (4, 3, 1, False), (4, 4, 1, True)],
)
def test_a_speculative_copy_is_more_attempts_running_than_tasks_left(
    tasks: int, running: int, completed: int, copy: bool
) -> None:
    from types import SimpleNamespace

    from pyspark.status import SparkStageInfo

    info = SparkStageInfo(7, 0, "collect", tasks, running, completed, 0)
    sc = SimpleNamespace(statusTracker=lambda: SimpleNamespace(getStageInfo={7: info}.get))
    assert speculative_copy(sc, 7) is copy
    assert speculative_copy(sc, 8) is False  # a stage the tracker no longer knows


def test_a_session_built_in_another_thread_is_used_as_it_is(spark: Any) -> None:
    # pyspark's active session is per thread: from a thread other than the one that built the user's
    # session, session() found none and ran the builder, whose getOrCreate returned the user's session
    # with deepspark's settings applied to it (Arrow turned on behind the user's back).
    import threading

    from deepspark.spark import check_task_cpus, session

    key = "spark.sql.execution.arrow.pyspark.enabled"
    found: list[Any] = []
    spark.conf.set(key, "false")
    try:

        def in_a_thread() -> None:
            found.append(session())
            try:
                check_task_cpus("threads", 3)  # the session's local[2], not this machine's cores
            except ConfigError as exc:
                found.append(str(exc))

        thread = threading.Thread(target=in_a_thread)
        thread.start()
        thread.join(60)
        assert found[0] is spark and spark.conf.get(key) == "false"
        assert found[1:] == [
            "threads: expected at most 2 (the cores of one executor of local[2]), got 3; "
            "use fewer threads, or executors with more cores"
        ]
    finally:
        spark.conf.set(key, "true")
