"""deepspark.slots: one Spark job per slot, resubmitted on failure, cancelled as one group (local[2])."""

from __future__ import annotations

import _thread
import threading
import time

import pytest

from deepspark.slots import SlotOutcome, root_cause, run_slots, short_error


def _square(partition):
    for x in partition:
        yield x * x


def _fail_on_the_executor(partition):
    for x in partition:
        raise RuntimeError(f"slot {x} broke")
    yield 0


def _sleep_on_the_executor(partition):
    for x in partition:
        time.sleep(120)
        yield x


def test_each_slot_runs_its_own_job_until_told_to_stop(spark) -> None:
    sc = spark.sparkContext
    results: dict[int, list[int]] = {0: [], 1: []}
    lock = threading.Lock()

    def submit(slot: int) -> None:
        out = sc.parallelize([slot + 2], 1).mapPartitions(_square).collect()
        with lock:
            results[slot].extend(out)

    def keep_going() -> bool:
        with lock:
            return min(len(v) for v in results.values()) < 2 or False

    lost: list[int] = []
    stops: list[str] = []
    outcome = run_slots(
        sc,
        width=2,
        submit=submit,
        keep_going=keep_going,
        on_lost=lambda slot, exc: lost.append(slot),
        stop=stops.append,
        max_attempts=2,
        group_prefix="test-slots",
    )
    assert isinstance(outcome, SlotOutcome)
    assert outcome.group.startswith("test-slots-") and not outcome.interrupted and not outcome.gave_up
    assert set(results[0]) == {4} and set(results[1]) == {9} and len(results[0]) >= 2
    assert lost == [] and stops == []
    jobs = sc.statusTracker().getJobIdsForGroup(outcome.group)
    assert len(jobs) == len(results[0]) + len(results[1])


def test_a_failing_slot_is_resubmitted_then_gives_up_and_stops_the_run(spark) -> None:
    sc = spark.sparkContext
    lost: list[tuple[int, str]] = []
    stops: list[str] = []

    outcome = run_slots(
        sc,
        width=1,
        submit=lambda slot: sc.parallelize([slot], 1).mapPartitions(_fail_on_the_executor).collect(),
        keep_going=lambda: not stops,
        on_lost=lambda slot, exc: lost.append((slot, short_error(exc))),
        stop=stops.append,
        max_attempts=2,
        group_prefix="test-slots",
        description="trial worker",
    )
    assert [slot for slot, _ in lost] == [0, 0, 0]  # the first try and two more attempts
    # the exception's own line, not the traceback's source line `raise RuntimeError(f"slot {x} broke")`
    assert [line for _, line in lost] == ["RuntimeError: slot 0 broke"] * 3
    assert stops == ["trial worker 0 failed 3 times: RuntimeError: slot 0 broke"]
    assert list(outcome.gave_up) == [0] and "slot 0 broke" in str(outcome.gave_up[0])


def test_progress_restarts_the_failure_count_and_on_lost_can_end_the_run(spark) -> None:
    sc = spark.sparkContext
    calls = 0
    stops: list[str] = []
    done = threading.Event()

    def submit(slot: int) -> None:
        nonlocal calls
        calls += 1
        raise ConnectionError(f"lost executor ({calls})")

    def on_lost(slot: int, exc: BaseException) -> None:
        if calls >= 5:
            done.set()

    # Every failure is followed by progress (calls grows), so max_attempts=1 never gives up.
    outcome = run_slots(
        sc,
        width=1,
        submit=submit,
        keep_going=lambda: not done.is_set(),
        on_lost=on_lost,
        stop=stops.append,
        max_attempts=1,
        group_prefix="test-slots",
        progress=lambda slot: calls,
    )
    assert calls == 5 and stops == [] and not outcome.gave_up


def _interrupt_when_running(sc, group: str, timeout: float = 60.0) -> None:
    """Ctrl-C the main thread once a task of job group ``group`` runs (polled, bounded by ``timeout``)."""
    tracker = sc.statusTracker()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for job in tracker.getJobIdsForGroup(group):
            info = tracker.getJobInfo(job)
            for stage in info.stageIds if info is not None else ():
                stage_info = tracker.getStageInfo(stage)
                if stage_info is not None and stage_info.numActiveTasks > 0:
                    _thread.interrupt_main()
                    return
        time.sleep(0.05)
    _thread.interrupt_main()  # never seen running: interrupt anyway, and the assertions below tell


def test_ctrl_c_stops_first_then_cancels_the_job_group(spark) -> None:
    sc = spark.sparkContext
    events: list[str] = []
    stopped = threading.Event()

    def submit(slot: int) -> None:
        # Ctrl-C on the driver once this slot's job is running (the main thread is in run_slots): seen
        # running, not assumed after a fixed delay (a job submitted after the cancel would run its 120 s).
        group = sc.getLocalProperty("spark.jobGroup.id")
        threading.Thread(target=_interrupt_when_running, args=(sc, group), daemon=True).start()
        try:
            sc.parallelize([slot], 1).mapPartitions(_sleep_on_the_executor).collect()
        except Exception:
            events.append("cancelled")
            raise

    def stop(reason: str) -> None:
        events.append(f"stop:{reason}")
        stopped.set()

    started = time.monotonic()
    outcome = run_slots(
        sc,
        width=1,
        submit=submit,
        keep_going=lambda: not stopped.is_set(),
        on_lost=lambda slot, exc: events.append("lost"),
        stop=stop,
        max_attempts=3,
        group_prefix="test-slots",
    )
    assert outcome.interrupted and not outcome.gave_up
    assert events == ["stop:interrupted", "cancelled", "lost"]
    assert time.monotonic() - started < 60  # the 120 s task was killed, not waited for
    # The session is still usable after the cancellation.
    assert sc.parallelize([3], 1).mapPartitions(_square).collect() == [9]


class _PlanningContext:
    """A SparkContext stand-in whose jobs run until their group is cancelled; as in Spark, a cancel
    reaches only the jobs already submitted."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active: list[threading.Event] = []
        self.cancelled_once = threading.Event()
        self.ran_on = False

    def setJobGroup(self, group: str, description: str, interruptOnCancel: bool = False) -> None:
        pass

    def cancelJobGroup(self, group: str) -> None:
        with self._lock:
            for job in self._active:
                job.set()
            self._active.clear()
        self.cancelled_once.set()

    def statusTracker(self) -> _PlanningContext:
        return self

    def getJobIdsForGroup(self, group: str) -> list[int]:
        return []

    def run_job(self, seconds: float) -> None:
        job = threading.Event()
        with self._lock:
            self._active.append(job)
        if job.wait(seconds):
            raise RuntimeError("Job cancelled because its job group was cancelled")
        self.ran_on = True


def test_ctrl_c_also_cancels_a_job_that_reached_spark_after_the_first_cancel() -> None:
    # A slot was still planning its job (closure pickled, RDD made) when Ctrl-C came: Spark's cancel took
    # only the active jobs, the slot's job started just after, and ran on after run_slots had returned
    # and its caller had closed its endpoint and destroyed its broadcast.
    sc = _PlanningContext()
    stopped = threading.Event()

    def submit(slot: int) -> None:
        _thread.interrupt_main()  # Ctrl-C while this slot is between keep_going() and its job
        assert sc.cancelled_once.wait(10.0)
        sc.run_job(seconds=5.0)

    outcome = run_slots(
        sc,
        width=1,
        submit=submit,
        keep_going=lambda: not stopped.is_set(),
        on_lost=lambda slot, exc: None,
        stop=lambda reason: stopped.set(),
        max_attempts=3,
        group_prefix="test-slots",
        join_timeout=10.0,
    )
    assert outcome.interrupted
    assert not sc.ran_on  # cancelled too (uncancelled, it runs its 5 s and sets ran_on)


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"width": 0}, "width"), ({"max_attempts": 0}, "max_attempts")]
)
def test_run_slots_checks_its_arguments(kwargs, match) -> None:
    args = {
        "width": 1,
        "submit": lambda slot: None,
        "keep_going": lambda: False,
        "on_lost": lambda slot, exc: None,
        "stop": lambda reason: None,
        "max_attempts": 1,
        "group_prefix": "x",
        **kwargs,
    }
    with pytest.raises(ValueError, match=match):
        run_slots(None, **args)


class _NoSpark:
    def setJobGroup(self, group: str, description: str, interruptOnCancel: bool = False) -> None:
        pass


def test_a_slot_whose_callback_raises_stops_the_run_with_the_error(monkeypatch) -> None:
    # A slot's thread died of its on_lost callback's error: it printed a thread traceback and stopped
    # nobody, so a caller waiting for the run to end or fail (training's round server) waited forever.
    uncaught: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: uncaught.append(args.exc_value))
    stops: list[str] = []

    def submit(slot: int) -> None:
        raise RuntimeError("the job failed")

    def on_lost(slot: int, exc: BaseException) -> None:
        raise ValueError("on_lost broke")

    outcome = run_slots(
        _NoSpark(),
        width=1,
        submit=submit,
        keep_going=lambda: not stops,
        on_lost=on_lost,
        stop=stops.append,
        max_attempts=3,
        group_prefix="test-slots",
    )
    assert stops == ["slot 0 failed: ValueError: on_lost broke"]
    assert uncaught == [] and not outcome.interrupted


def test_short_error_keeps_the_line_naming_the_error() -> None:
    exc = RuntimeError(
        "An error occurred while calling o1.collect.\n  py4j stuff\nValueError: bad thing\n more"
    )
    assert short_error(exc) == "ValueError: bad thing"
    assert short_error(RuntimeError("job aborted\n  at x")) == "job aborted"
    assert short_error(KeyError()) == "KeyError"
    traceback = (
        "\n  An exception was thrown from the Python worker.\nTraceback (most recent call last):\n"
        '  File "model.py", line 12, in forward\n    raise RuntimeError("boom")\n'
        "    ^^^^^^^^^^^^^^^^^^^^^^^^^^\nRuntimeError: boom\n"
    )
    assert short_error(RuntimeError(traceback)) == "RuntimeError: boom"
    # pyspark 3.5: an RDD job's error is Py4J's, the worker's traceback inside Spark's Java message.
    wrapped = (
        "An error occurred while calling z:org.apache.spark.api.python.PythonRDD.collectAndServe.\n"
        ": org.apache.spark.SparkException: Job aborted due to stage failure: Task 0 in stage 21.0 failed 1 "
        "times, most recent failure: Lost task 0.0 in stage 21.0 (TID 23) (192.0.2.2 executor driver): "
        "org.apache.spark.api.python.PythonException: Traceback (most recent call last):\n"
        '  File "model.py", line 12, in forward\n    raise RuntimeError("boom")\nRuntimeError: boom\n\n'
        "\tat org.apache.spark.api.python.BasePythonRunner$ReaderIterator.handlePythonException\n"
    )
    assert short_error(RuntimeError(wrapped)) == "RuntimeError: boom"


# A full disk under a Parquet write (pyspark 4.3, trimmed: the frames between are "\tat ..." lines).
_FULL_DISK = """An error occurred while calling o41.parquet.
: org.apache.spark.SparkException: [TASK_WRITE_FAILED] Task failed while writing rows to file:/tmp/x. SQLSTATE: 58030
\tat org.apache.spark.sql.errors.QueryExecutionErrors$.taskFailedWhileWritingRowsError(QueryExecutionErrors.scala:823)
\tat java.base/java.lang.Thread.run(Thread.java:840)
Caused by: org.apache.parquet.util.AutoCloseables$ParquetCloseResourceException: Unable to close resource
\tat org.apache.parquet.util.AutoCloseables.uncheckedClose(AutoCloseables.java:85)
Caused by: org.apache.hadoop.fs.FSError: java.io.IOException: No space left on device
\tat org.apache.hadoop.fs.RawLocalFileSystem$LocalFSFileOutputStream.write(RawLocalFileSystem.java:428)
\tSuppressed: org.apache.hadoop.fs.FSError: java.io.IOException: Bad file descriptor
\t\tat org.apache.hadoop.fs.RawLocalFileSystem$LocalFSFileOutputStream.write(RawLocalFileSystem.java:428)
\tCaused by: java.io.IOException: Bad file descriptor
Caused by: java.io.IOException: No space left on device
\tat java.base/java.io.FileOutputStream.writeBytes(Native Method)
\t... 21 more
"""


def test_root_cause_is_a_java_chain_s_innermost_cause_when_no_python_error_is_named() -> None:
    """The first line only says the write failed; the last unindented ``Caused by:`` says why (a
    suppressed exception's causes, indented, are not the chain's)."""
    assert root_cause(RuntimeError(_FULL_DISK)) == "java.io.IOException: No space left on device"
    # A Python error line still wins over the Java chain around it, which ends in the traceback's wrapper.
    python = (
        _FULL_DISK.replace("Caused by: java.io.IOException: No space left on device\n", "")
        + "Caused by: org.apache.spark.api.python.PythonException: Traceback (most recent call last):\n"
        + '  File "model.py", line 12, in forward\nValueError: bad shape\n\tat org.apache.spark.X\n'
    )
    assert root_cause(RuntimeError(python)) == "ValueError: bad shape"
    # A chain whose last cause opens a Python traceback with no error line: the cause before it.
    opened = (
        "job failed\nCaused by: java.io.EOFException\n"
        "Caused by: x.PythonException: Traceback (most recent call last):\n"
    )
    assert root_cause(RuntimeError(opened)) == "java.io.EOFException"
    assert root_cause(RuntimeError("job aborted\n  at x")) == "job aborted"  # no chain: short_error's line
