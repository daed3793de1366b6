"""Long-lived Spark jobs, one per slot, resubmitted on failure and cancelled as one job group.

Tuning runs one trial worker per slot and training one replica per slot: each is a Spark job of one task
that lives as long as there is work, talking to the driver over :mod:`deepspark.wire`. Spark already
schedules, places and (on a cluster) retries each task; this module adds what Spark does not do for a
job that fails as a whole (``local[N]`` never retries a task): submit it again, a bounded number of times.
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from deepspark.spark import cancel_group

__all__ = ["SameFailure", "SlotOutcome", "root_cause", "run_slots", "short_error"]

_log = logging.getLogger(__name__)

# The last line of a traceback: "ModuleNotFoundError: No module named 'x'", "pkg.mod.SomeError", ...
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)(?::.*)?$")
# A Java chain's next cause (unindented: a suppressed exception's own causes are indented).
_CAUSED_BY = re.compile(r"^Caused by: (\S.*)$")


@dataclass(frozen=True)
class SlotOutcome:
    """How :func:`run_slots` ended.

    ``gave_up`` maps each slot that failed more than ``max_attempts`` times in a row to its last error;
    ``interrupted`` is true after a Ctrl-C (KeyboardInterrupt) cancelled the jobs; ``group`` is the Spark
    job group every slot's jobs ran in.
    """

    group: str
    interrupted: bool = False
    gave_up: Mapping[int, BaseException] = field(default_factory=dict)


def run_slots(
    sc: Any,
    *,
    width: int,
    submit: Callable[[int], None],
    keep_going: Callable[[], bool],
    on_lost: Callable[[int, BaseException], None],
    stop: Callable[[str], None],
    max_attempts: int,
    group_prefix: str,
    progress: Callable[[int], int] = lambda slot: 0,
    description: str = "slot",
    join_timeout: float = 30.0,
    group: str | None = None,
) -> SlotOutcome:
    """Run ``submit(slot)`` for slots ``0 .. width-1``, each in its own driver thread, until ``keep_going()``
    turns false; return once every slot thread has ended.

    - ``submit(slot)`` runs one Spark job for that slot and returns when it ends (tuning:
      ``sc.parallelize([slot], 1).mapPartitions(body).collect()``; training:
      ``sc.runJob(rdd, fn, partitions=[slot])``). It runs in the slot's thread, inside the job group, so
      its closure must capture only what the task needs (copy fields into locals first), never ``sc``.
    - ``keep_going()`` is asked before each submission and after each failure; it may be called from
      every slot thread at once. ``stop(reason)`` must make it return false (it is called when a slot
      gives up and on Ctrl-C, before the jobs are cancelled).
    - ``on_lost(slot, error)`` is called after each failed job (e.g. to re-queue the slot's work); then
      the job is submitted again, unless ``keep_going()`` is now false. More than ``max_attempts``
      consecutive failures of one slot call ``stop("<description> <slot> failed <n> times: <error>")``
      and end that slot. ``progress(slot)`` is a count of finished work (the slot's own, or everyone's):
      the slot's consecutive-failure count starts again whenever it has changed.
    - An error raised in a slot's thread outside ``submit`` (by a callback, or ``setJobGroup`` on a
      stopped context) calls ``stop("<description> <slot> failed: <error>")`` and ends that slot.
    - KeyboardInterrupt (Ctrl-C on the driver) calls ``stop("interrupted")``, cancels the job group
      (``interruptOnCancel``: running tasks are killed) again and again until the slot threads have
      ended (a job submitted just after a cancel is cancelled too), up to ``join_timeout`` seconds; the
      outcome is then ``interrupted``.
    - ``group`` names the job group (default: ``group_prefix`` and a random suffix), so a caller that runs
      this in a thread of its own can cancel the jobs itself.
    """
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width: expected an integer >= 1, got {width!r}")
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
        raise ValueError(f"max_attempts: expected an integer >= 1, got {max_attempts!r}")
    group = group or f"{group_prefix}-{secrets.token_hex(4)}"
    gave_up: dict[int, BaseException] = {}
    lock = threading.Lock()
    running = [width]
    all_ended = threading.Event()

    def slot_thread(slot: int) -> None:
        try:
            slot_loop(slot)
        except Exception as exc:  # a callback's error (or a stopped context): the run stops, with it
            _log.debug("%s %d: its thread failed", description, slot, exc_info=True)
            stop(f"{description} {slot} failed: {type(exc).__name__}: {exc}")
        finally:
            with lock:
                running[0] -= 1
                if running[0] == 0:
                    all_ended.set()

    def slot_loop(slot: int) -> None:
        sc.setJobGroup(group, f"deepspark {description} {slot}", interruptOnCancel=True)
        failures, seen = 0, progress(slot)
        while keep_going():
            if progress(slot) != seen:  # work got done since the last failure
                failures, seen = 0, progress(slot)
            try:
                submit(slot)
            except Exception as exc:
                on_lost(slot, exc)
                if not keep_going():
                    return
                failures += 1
                _log.warning(
                    "%s %d: its Spark job failed (%s); resubmitting (%d)",
                    description,
                    slot,
                    short_error(exc),
                    failures,
                )
                if failures > max_attempts:
                    gave_up[slot] = exc
                    stop(f"{description} {slot} failed {failures} times: {short_error(exc)}")
                    return

    threads = [
        threading.Thread(target=slot_thread, args=(i,), name=f"{group_prefix}-slot-{i}", daemon=True)
        for i in range(width)
    ]
    interrupted = False
    try:
        for t in threads:
            t.start()
        # Not Thread.join: in Python 3.11 a join cut short by Ctrl-C can leave the thread looking finished.
        while not all_ended.wait(0.5):
            pass
    except KeyboardInterrupt:
        interrupted = True
        stop("interrupted")
        deadline = time.monotonic() + join_timeout
        cancel_group(sc, group)
        started = sum(t.ident is not None for t in threads)
        with lock:
            running[0] -= width - started  # threads Ctrl-C kept from starting will never end
            if running[0] == 0:
                all_ended.set()
        # Spark cancels the group's active jobs only: a slot still planning its job (past keep_going())
        # submits it after the first cancel, and it would run on after this returns.
        while not all_ended.wait(0.1) and time.monotonic() < deadline:
            cancel_group(sc, group, timeout=max(0.0, deadline - time.monotonic()))
    return SlotOutcome(group=group, interrupted=interrupted, gave_up=dict(gave_up))


def short_error(exc: BaseException) -> str:
    """One line of a (often very long, Java-wrapped) Spark job error: the line naming the error.

    Indented lines are a traceback's frames and source lines (``    raise RuntimeError(...)``), which
    name an error without being one: they are skipped. So is the Java line that opens a Python worker's
    traceback (pyspark 3.5's RDD jobs: ``...: org.apache.spark.api.python.PythonException: Traceback (most
    recent call last):``): the error is named at that traceback's end."""
    text = str(exc).strip().splitlines()
    for line in text:
        if line[:1].isspace() or line.rstrip().endswith("Traceback (most recent call last):"):
            continue
        if "Error" in line or "Exception" in line or "exited" in line:
            return line.strip()[:300]
    return (text[0].strip() if text else type(exc).__name__)[:300]


def root_cause(exc: BaseException) -> str:
    """The innermost exception line of a Spark job error (the last line of the task's Python traceback,
    say ``ModuleNotFoundError: No module named 'deepspark'``): the same on every slot that failed for
    the same reason, whatever its stage and task numbers.

    An error raised in the JVM alone has no such line: its innermost cause is the last ``Caused by:`` of
    the Java chain (a full disk: ``java.io.IOException: No space left on device``, where the first line
    only says ``[TASK_WRITE_FAILED] Task failed while writing rows``)."""
    text = str(exc).splitlines()
    causes = [line.strip() for line in text if _EXCEPTION_LINE.match(line.strip())]
    if not causes:
        chain = (_CAUSED_BY.match(line) for line in text)
        causes = [
            m.group(1).strip()
            for m in chain
            if m and not m.group(1).rstrip().endswith("(most recent call last):")
        ]
    return (causes[-1] if causes else short_error(exc))[:300]


class SameFailure:
    """Whether every slot failed the same way: each slot's first failure is kept by its
    :func:`root_cause`, and :meth:`failed` turns true once all ``width`` slots have one and they agree.

    Resubmitting cannot help then (the executors cannot import deepspark, the model raises on every
    worker): the caller stops after that first round instead of after ``max_attempts`` rounds of the same
    traceback. The caller decides which failures count (tuning: before any worker reached the driver;
    training: a Python exception before any round took a worker's steps).
    """

    def __init__(self, width: int) -> None:
        self._width = width
        self._lock = threading.Lock()
        self._causes: dict[int, str] = {}
        self.cause: str | None = None

    def failed(self, slot: int, exc: BaseException) -> bool:
        with self._lock:
            self._causes.setdefault(slot, root_cause(exc))
            causes = set(self._causes.values())
            if len(self._causes) == self._width and len(causes) == 1:
                self.cause = causes.pop()
            return self.cause is not None
