"""Training under faults, for real: an executor killed mid-training (then mid-predict) on a standalone
cluster on 127.0.0.1, and a driver SIGKILLed mid-run then resumed. Drivers run in subprocesses (a process holds one
SparkContext), bounded in time; everything started is torn down in ``finally``."""

from __future__ import annotations

import csv
import functools
import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_fit import SGD, _layout_dir
from torch import nn

from _cluster import executor_pids, kill_group, proc_table, standalone_cluster, start_driver, wait_driving
from deepspark.training import fit


def _rows(run: Path) -> list[dict[str, str]]:
    try:
        with open(run / "history.csv", newline="") as fh:
            return list(csv.DictReader(fh))
    except (OSError, csv.Error):
        return []


def _wait_rows(run: Path, proc: subprocess.Popen, n: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(_rows(run)) >= n and (run / "checkpoint" / "state.json").exists():
            return
        if proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            pytest.fail(f"the driver exited early ({proc.returncode}): {out[-3000:]}")
        time.sleep(0.2)
    pytest.fail(f"the run never reached {n} rounds: {len(_rows(run))}")


@pytest.mark.slow
@pytest.mark.cluster
def test_average_then_predict_survive_an_executor_killed_mid_job(tmp_path: Path) -> None:
    """One standalone master + 2 one-core workers and one driver (a cluster and a driver's JVM start
    once) for two faults, one after the other:

    fit (``average``): once 3 rounds are recorded, the second worker's executor is SIGKILLed; the run
    completes without it in the rounds it missed.

    predict (with the model that fit saved): 16 partitions of 50 rows, each slowed to about a second,
    over the two workers; once tasks run, the second worker's (new) executor is SIGKILLed. Its tasks run
    again elsewhere, and the output holds every input row exactly once."""
    run, out = tmp_path / "run", tmp_path / "result.json"
    marks, predicted, preds = tmp_path / "marks", tmp_path / "predicted.json", tmp_path / "preds"
    marks.mkdir()
    rows = 800
    with standalone_cluster(tmp_path, workers=2, cores=1, memory="1536m") as (url, procs):
        script = tmp_path / "driver.py"
        script.write_text(
            textwrap.dedent(f"""
            import json, os, time
            import numpy as np
            from deepspark.inference import predict
            from deepspark.spark import session
            from deepspark.training import fit
            spark = session({url!r}, conf={{"spark.driver.host": "127.0.0.1",
                            "spark.driver.bindAddress": "127.0.0.1", "spark.executor.memory": "1g",
                            "spark.cores.max": "2"}})
            result = fit("mnist", "lenet", workers=2, config={{"epochs": 3}}, average={{"tau": 10}},
                         limit_train=6000, limit_test=2000, run_dir={str(run)!r}, checkpoint_seconds=0,
                         on_round=lambda row: time.sleep(0.5))  # slow rounds: room for the kill
            json.dump({{"accuracy": result.test_accuracy}}, open({str(out)!r}, "w"))

            def pixels(batches):
                from pyspark import TaskContext
                ctx = TaskContext.get()
                open(os.path.join({str(marks)!r}, f"{{ctx.partitionId()}}-{{ctx.attemptNumber()}}"), "w").close()
                time.sleep(1.0)  # slow partitions: the kill lands while tasks run
                for batch in batches:
                    rng = np.random.default_rng(0)
                    batch["pixels"] = [rng.integers(0, 255, 784).astype(float) for _ in batch["id"]]
                    yield batch

            data = spark.range(0, {rows}, numPartitions=16).mapInPandas(pixels, "id long, pixels array<double>")
            result = predict(data, {str(run / "model")!r}, output={str(preds)!r}, batch_size=25)
            json.dump({{"rows": result.summary.rows, "errors": result.summary.errors}},
                      open({str(predicted)!r}, "w"))
            """)
        )
        driver, tail = start_driver(script, tmp_path, procs)
        wait_driving(
            driver,
            tail,
            lambda: len(_rows(run)) >= 3 and (run / "checkpoint" / "state.json").exists(),
            timeout=240,
            what="the run did not reach 3 checkpointed rounds",
        )
        victims = executor_pids(procs[2])  # the second Worker's executor JVM
        assert victims, "the second worker runs no executor"
        os.kill(victims[0], signal.SIGKILL)
        wait_driving(
            driver, tail, out.exists, timeout=300, what="training did not finish after the executor loss"
        )
        wait_driving(
            driver,
            tail,
            lambda: any(marks.iterdir()) and bool(set(executor_pids(procs[2])) - set(victims)),
            timeout=180,
            what="the predict job did not start on the second worker",
        )
        new = sorted(set(executor_pids(procs[2])) - set(victims))
        os.kill(new[0], signal.SIGKILL)  # the second worker's new executor JVM
        try:
            driver.wait(timeout=240)
        except subprocess.TimeoutExpired:
            pytest.fail("predict did not finish within 240 s of the executor loss")
        assert driver.returncode == 0 and predicted.exists(), tail()
    history = _rows(run)
    assert [int(r["round"]) for r in history] == list(range(len(history)))  # no round lost or repeated
    assert any(int(r["workers"]) == 1 for r in history)  # the loss was seen: rounds went on without it
    # Every worker takes 3 * ceil(3000 / 64) = 141 steps; rounds without the lost worker count once.
    assert sum(int(r["workers"]) for r in history) < 2 * len(history)
    assert json.loads(out.read_text())["accuracy"] > 0.85  # an undisturbed run reaches about 0.95

    import pyarrow.parquet as pq

    ids = sorted(pq.read_table(preds, columns=["id", "error"]).column("id").to_pylist())
    assert ids == list(range(rows))  # every input row exactly once
    assert pq.read_table(preds).column("error").null_count == rows
    attempts = [tuple(int(v) for v in mark.name.split("-")) for mark in marks.iterdir()]
    assert any(attempt > 0 for _, attempt in attempts), attempts  # the kill did cost a running task


@pytest.mark.slow
def test_average_driver_killed_resumes_the_same_curve(spark: Any, tmp_path: Path) -> None:
    data = _layout_dir(tmp_path / "data", train=40, test=30)
    config = {**SGD, "batch_size": 8, "epochs": 4, "seed": 4}
    whole = fit(str(data), "mlp", workers=2, config=config, average={"tau": 1}, run_dir=tmp_path / "whole")
    expected = [float(r["train_loss"]) for r in _rows(whole.run_dir)]
    run = tmp_path / "killed"
    script = tmp_path / "driver.py"
    script.write_text(
        textwrap.dedent(f"""
        import time
        from deepspark.training import fit
        fit({str(data)!r}, "mlp", workers=2, config={config!r}, average={{"tau": 1}}, run_dir={str(run)!r},
            master="local[2]", checkpoint_seconds=0, on_round=lambda row: time.sleep(0.3))
        """)
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_rows(run, proc, 4)
    finally:
        kill_group(proc)  # the driver "crashes": SIGKILL to it, its JVM and its Python workers
    done_before = len(_rows(run))
    assert 4 <= done_before < len(expected)
    resumed = fit(str(data), run_dir=run, resume=True)
    rows = _rows(resumed.run_dir)
    assert [int(r["round"]) for r in rows] == list(range(len(expected)))
    np.testing.assert_allclose([float(r["train_loss"]) for r in rows], expected, rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["average", "allreduce"])
def test_ctrl_c_exits_130_with_one_line_and_keeps_every_finished_round(tmp_path: Path, strategy: str) -> None:
    data = _layout_dir(tmp_path / "data", train=40, test=30)
    run = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "deepspark",
        "train",
        str(data),
        "--model",
        "mlp",
        "--strategy",
        strategy,
    ]
    # Thousands of tiny rounds: the run is still going when it is interrupted.
    command += ["--workers", "2", "--epochs", "2000", "--batch-size", "8", "--run-dir", str(run)]
    proc = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while len(_rows(run)) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None and len(_rows(run)) >= 3
        proc.send_signal(signal.SIGINT)  # Ctrl-C, to the driver only
        _, err = proc.communicate(timeout=90)
    finally:
        kill_group(proc)
    lines = [line for line in err.decode(errors="replace").splitlines() if line.strip()]
    assert proc.returncode == 130 and lines[-1] == "deepspark: interrupted"
    noise = [line for line in lines if "Traceback" in line or " WARN " in line or "ERROR" in line]
    assert not noise, lines
    # Well inside the 10 s checkpoint interval, the stop itself checkpointed the last finished round.
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    rows = _rows(run)
    assert state["round"] == int(rows[-1]["round"])
    assert state["samples_done"] == sum(int(r["samples"]) for r in rows)


def _jvms_with(marker: bytes) -> list[int]:
    """The Spark driver JVMs whose command line holds ``marker`` (not the Python driver's, which does too)."""
    return [
        pid
        for pid, (_, command, _) in proc_table().items()
        if marker in command and b"org.apache.spark.deploy.SparkSubmit" in command
    ]


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["the JVM starts", "the first round"])
def test_ctrl_c_at_any_moment_leaves_no_jvm_and_no_trace(tmp_path: Path, moment: str) -> None:
    """SIGINT when the driver's JVM has just been started (pyspark waits for it to answer: a Ctrl-C there
    used to orphan it, kept alive by py4j's server thread) or mid-run: exit 130, the one line, no py4j
    traceback, and no JVM of this run left."""
    data = _layout_dir(tmp_path / "data", train=40, test=30)
    marker = f"deepspark-test-{os.getpid()}-{time.monotonic_ns()}"
    command = [sys.executable, "-m", "deepspark", "train", str(data), "--model", "mlp", "--workers", "2"]
    command += ["--epochs", "2000", "--batch-size", "8", "--run-dir", str(tmp_path / "run")]
    command += ["--conf", f"spark.app.name={marker}"]
    proc = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            if moment == "the JVM starts" and _jvms_with(marker.encode()):
                break
            if moment == "the first round" and _rows(tmp_path / "run"):
                break
            time.sleep(0.01)
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)  # Ctrl-C, to the driver only
        _, err = proc.communicate(timeout=90)
        deadline = time.monotonic() + 15  # a JVM told to end takes a moment
        while _jvms_with(marker.encode()) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = _jvms_with(marker.encode())
    finally:
        kill_group(proc)
        for pid in _jvms_with(marker.encode()):  # ours, by the run's own marker
            os.kill(pid, signal.SIGKILL)
    lines = [line for line in err.decode(errors="replace").splitlines() if line.strip()]
    assert proc.returncode == 130 and lines[-1] == "deepspark: interrupted", lines[-30:]
    assert not [line for line in lines if "Traceback" in line or "ERROR" in line], lines[-30:]
    assert not left, f"JVMs of the interrupted run still alive: {left}"


class _Connections(logging.Handler):
    """The pid each training worker's newest connection named in its hello, from the driver's log."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.pids: dict[int, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        found = re.fullmatch(
            r"worker (\d+) connected from \S+ \(task attempt \S+, pid (\d+)\)", record.getMessage()
        )
        if found:
            self.pids[int(found[1])] = int(found[2])


def _our_python_worker(pid: int) -> bool:
    """Whether ``pid`` is a PySpark Python process started under this test process (its Spark's)."""
    table = proc_table()
    if pid not in table or b"pyspark" not in table[pid][1]:
        return False
    seen = pid
    while seen in table and seen > 1:
        seen = table[seen][0]
        if seen == os.getpid():
            return True
    return False


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie is dead, only not reaped yet


@pytest.mark.timeout(180)
def test_a_frozen_worker_is_cancelled_and_replaced_and_the_run_completes(spark: Any, tmp_path: Path) -> None:
    # A worker's Python process froze (a deadlock, a hung GPU kernel) while its executor lived on: Spark
    # never failed its task, and every round after waited for its push for good.
    data = _layout_dir(tmp_path / "data", train=40, test=10)
    log = logging.getLogger("deepspark.training.average")
    connections, level = _Connections(), log.level
    log.addHandler(connections)
    log.setLevel(logging.INFO)
    frozen: list[int] = []

    def freeze_worker_1(row: dict[str, Any]) -> None:
        if row["round"] == 0:  # both workers have connected and pushed
            pid = connections.pids[1]
            assert _our_python_worker(pid), f"pid {pid} is not this test's training worker"
            os.kill(pid, signal.SIGSTOP)
            frozen.append(pid)

    try:
        result = fit(
            str(data),
            "mlp",
            strategy="average",
            workers=2,
            config={**SGD, "batch_size": 4, "epochs": 3},  # 5 steps per epoch: 15 rounds of tau 1
            average={"tau": 1},
            heartbeat_timeout=2.0,
            run_dir=tmp_path / "run",
            on_round=freeze_worker_1,
        )
        assert frozen, "worker 1 was never frozen"
        rows = [(int(r["round"]), int(r["workers"])) for r in result.history]
        assert [r for r, _ in rows] == list(range(15))
        assert rows[1] == (1, 1)  # the round it froze in went on without it
        deadline = time.monotonic() + 60  # Spark kills a cancelled task's Python worker (killTimeout)
        while _alive(frozen[0]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(frozen[0]), "the frozen worker's process outlived its cancelled job"
    finally:
        log.removeHandler(connections)
        log.setLevel(level)
        for pid in frozen:
            if _alive(pid) and _our_python_worker(pid):
                os.kill(pid, signal.SIGCONT)


class _FreezeRank(logging.Handler):
    """SIGSTOPs ``rank`` of the first gang attempt as soon as the driver logs its connection."""

    def __init__(self, rank: int) -> None:
        super().__init__(logging.INFO)
        self.rank = rank
        self.frozen: list[int] = []

    def emit(self, record: logging.LogRecord) -> None:
        found = re.fullmatch(
            r"gang rank (\d+) of attempt 0 connected from \S+ \(pid (\d+)\)", record.getMessage()
        )
        if found and int(found[1]) == self.rank and not self.frozen:
            pid = int(found[2])
            assert _our_python_worker(pid), f"pid {pid} is not this test's gang rank"
            os.kill(pid, signal.SIGSTOP)
            self.frozen.append(pid)


@pytest.mark.timeout(180)
def test_a_frozen_allreduce_rank_restarts_the_gang_and_the_run_completes(spark: Any, tmp_path: Path) -> None:
    # A frozen rank fails no task: the other ranks waited in their all-reduce for torch.distributed's
    # 30-minute timeout. Rank 1 freezes right after it connects; the driver must find it silent, cancel
    # the gang (Spark kills the frozen Python worker) and restart it, ending with the weights of an
    # uninterrupted run.
    data = _layout_dir(tmp_path / "data", train=40, test=10)
    config = {**SGD, "batch_size": 4, "epochs": 2}
    clean = fit(str(data), "mlp", strategy="allreduce", workers=2, config=config, run_dir=tmp_path / "clean")
    log = logging.getLogger("deepspark.training.allreduce")
    freezer, level = _FreezeRank(1), log.level
    log.addHandler(freezer)
    log.setLevel(logging.INFO)
    try:
        result = fit(
            str(data),
            "mlp",
            strategy="allreduce",
            workers=2,
            config=config,
            heartbeat_timeout=2.0,
            run_dir=tmp_path / "run",
        )
        assert freezer.frozen, "rank 1 was never frozen"
        assert [int(r["attempt"]) for r in result.history] == [1] * len(clean.history)
        assert [r["train_loss"] for r in result.history] == [r["train_loss"] for r in clean.history]
        want, got = (load_file(str(r.run_dir / "checkpoint" / "state.safetensors")) for r in (clean, result))
        assert want.keys() == got.keys()
        for name, value in want.items():
            assert torch.equal(got[name], value), name
        deadline = time.monotonic() + 60  # Spark kills a cancelled task's Python worker (killTimeout)
        while _alive(freezer.frozen[0]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(freezer.frozen[0]), "the frozen rank's process outlived its cancelled gang"
    finally:
        log.removeHandler(freezer)
        log.setLevel(level)
        for pid in freezer.frozen:
            if _alive(pid) and _our_python_worker(pid):
                os.kill(pid, signal.SIGCONT)


# ------------------------------------------------------------------------- a worker's load, watched
def _net_loading_slowly(markers: str, seconds: float) -> nn.Module:
    """The load tests' model. Worker (rank) 1's task takes ``seconds`` to build it, as to read a big
    partition: ``loading-<pid>`` in ``markers`` when it starts, ``loaded-<pid>`` when it is done."""
    from pyspark import TaskContext

    ctx = TaskContext.get()
    if ctx is not None and ctx.partitionId() == 1:
        (Path(markers) / f"loading-{os.getpid()}").touch()
        time.sleep(seconds)
        (Path(markers) / f"loaded-{os.getpid()}").touch()
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 3))


class _LoadWatch(logging.Handler):
    """The driver's log about worker (rank) 1: whether it had loaded when each of its connections was
    logged, and the pids it found silent."""

    def __init__(self, markers: Path) -> None:
        super().__init__(logging.INFO)
        self.markers = markers
        self.loaded_at_connect: list[bool] = []
        self.silent: list[int] = []
        self.found = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        connected = re.fullmatch(
            r"(?:worker 1|gang rank 1 of attempt \d+) connected from \S+ \((?:task attempt \S+, )?pid (\d+)\)",
            message,
        )
        if connected:
            self.loaded_at_connect.append((self.markers / f"loaded-{connected[1]}").exists())
        silent = re.match(r"(?:worker|gang rank) 1 \(pid (\d+) on ", message)
        if silent:
            self.silent.append(int(silent[1]))
            self.found.set()


@pytest.fixture
def load_watch(tmp_path: Path) -> Any:
    """A :class:`_LoadWatch` on the training loggers (at INFO) for the test, over ``tmp_path / "markers"``."""
    markers = tmp_path / "markers"
    markers.mkdir()
    watch, log = _LoadWatch(markers), logging.getLogger("deepspark.training")
    level = log.level
    log.addHandler(watch)
    log.setLevel(logging.INFO)
    try:
        yield watch
    finally:
        log.removeHandler(watch)
        log.setLevel(level)


def _fit_loading_slowly(tmp_path: Path, markers: Path, strategy: str, seconds: float) -> Any:
    """``fit`` of 2 workers watched with a 2 s heartbeat timeout, worker 1's load taking ``seconds``:
    40 rows, batches of 4, 2 epochs (10 steps; 10 rounds of ``average``)."""
    return fit(
        str(_layout_dir(tmp_path / "data", train=40, test=10)),
        functools.partial(_net_loading_slowly, str(markers), seconds),
        strategy=strategy,
        workers=2,
        config={**SGD, "batch_size": 4, "epochs": 2},
        average={"tau": 1} if strategy == "average" else None,
        heartbeat_timeout=2.0,
        run_dir=tmp_path / "run",
    )


@pytest.mark.timeout(240)
@pytest.mark.parametrize("strategy", ["average", "async", "allreduce"])
def test_a_worker_frozen_while_it_loads_is_found_silent_and_the_run_completes(
    spark: Any, tmp_path: Path, load_watch: _LoadWatch, strategy: str
) -> None:
    # A worker reads its partition (long, for a big one) before it trains, and used to connect to the
    # driver, heartbeats and all, only after: one frozen while it loaded was never found, and the others
    # waited for it for good (average at round 0, async at the staleness bound, allreduce in the gang's
    # rendezvous). Worker 1 is frozen in its load; the driver must find it silent and replace it.
    frozen: list[int] = []
    done = threading.Event()

    def freeze_the_first_loader() -> None:
        while not done.wait(0.02):
            loading = sorted(load_watch.markers.glob("loading-*"))
            if not loading:
                continue
            pid = int(loading[0].name.split("-")[1])
            if _our_python_worker(pid):
                os.kill(pid, signal.SIGSTOP)
                frozen.append(pid)
                # Not found silent in 30 s (as before the fix): resume it, so that the run ends and says so.
                if not load_watch.found.wait(30) and _alive(pid) and _our_python_worker(pid):
                    os.kill(pid, signal.SIGCONT)
            return

    freezer = threading.Thread(target=freeze_the_first_loader, daemon=True)
    freezer.start()
    try:
        result = _fit_loading_slowly(tmp_path, load_watch.markers, strategy, 4.0)
        assert frozen, "worker 1 was never frozen while it loaded"
        assert frozen[0] in load_watch.silent, "worker 1, frozen while it loaded, was never found silent"
        assert result.history
        deadline = time.monotonic() + 60  # Spark kills a cancelled task's Python worker (killTimeout)
        while _alive(frozen[0]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(frozen[0]), "the frozen loader's process outlived its cancelled job"
    finally:
        done.set()
        freezer.join(timeout=60)
        for pid in frozen:
            if _alive(pid) and _our_python_worker(pid):
                os.kill(pid, signal.SIGCONT)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("strategy", ["average", "allreduce"])
def test_a_worker_that_beats_while_it_loads_longer_than_the_heartbeat_timeout_is_not_lost(
    spark: Any, tmp_path: Path, load_watch: _LoadWatch, strategy: str
) -> None:
    # Worker 1's load takes 2.25 heartbeat timeouts. It is connected meanwhile (the driver watches the
    # load) and beats, so it is waited for: never lost, never replaced.
    result = _fit_loading_slowly(tmp_path, load_watch.markers, strategy, 4.5)
    assert load_watch.loaded_at_connect == [False], "worker 1 did not connect before it loaded, or again"
    assert load_watch.silent == []
    if strategy == "average":
        assert [int(r["workers"]) for r in result.history] == [2] * 10
    else:
        assert [int(r["attempt"]) for r in result.history] == [0] * len(result.history)
