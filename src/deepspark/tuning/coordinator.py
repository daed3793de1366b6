"""The driver side of a study: hands trials to workers, feeds the pruner, records results.

Optuna owns sampling, pruning and storage; this class owns *execution*: which trial goes to which
worker, what happens when a worker disappears (the trial runs again: infrastructure failure) and when
an objective raises (the trial FAILs with its traceback: not retried). All Optuna calls happen under
one lock, so samplers see a consistent study; except, with ``parallel_asks`` > 0, the ask of a
sampler that runs in other processes (:class:`deepspark.tuning.sampling.ProcessSampler`): its wait
holds neither the GIL nor the lock, so workers' results are taken meanwhile (the trial is counted
before the ask), and up to ``parallel_asks`` sampler threads ask at once.

Sampling ahead (``sample_ahead=k``): a sampler thread keeps up to ``k`` asked trials ready, so a worker
that finishes a trial gets its next one without waiting for the sampler (when none is ready, the
worker's own thread asks, as without sampling ahead). TPE's ask grows with the study
(about 50 ms per ask at 10,000 trials), which at 16 one-second trials at once would otherwise sit
between every two trials of a slot. The trials sampled ahead are RUNNING in the study like the running
ones (TPE's constant liar counts them as pending); a study that stops first marks them interrupted
and queues their configurations for ``--resume``, as it does the running trials.

A speculative copy of a slot's task (Spark's ``spark.speculation``: ``copies(stage)`` says Spark runs the
task twice) stands by: it takes no trial while the original's connection lives, and takes the slot over
when that ends. Taken for a restart, it had the original's trials re-run and, past ``max_attempts``,
FAIL, although no attempt had failed.

A worker is lost when its socket closes, or when it has been silent (no frame, heartbeats included)
for ``heartbeat_timeout`` seconds while it holds a trial: a frozen host never closes its socket (its
slot's Spark job is cancelled then, or the frozen task would hold the slot for good). A
watchdog thread also enforces ``trial_timeout`` (the trial FAILs, its slot's Spark job is cancelled)
and the study's ``timeout`` (running trials are interrupted, as on Ctrl-C).
"""

from __future__ import annotations

import datetime
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import optuna

from deepspark import wire
from deepspark._compat import StrEnum
from deepspark.tuning.trial import RESULT_ATTR, TrialRecord, TrialState, result_attr
from deepspark.wire import DEFAULT_HEARTBEAT_TIMEOUT

__all__ = [
    "Coordinator",
    "Endpoint",
    "TrialEvent",
    "TrialEventKind",
    "interrupted_attrs",
]

_log = logging.getLogger(__name__)

DEFAULT_ATTR = "deepspark:default"
INTERRUPTED_ATTR = "deepspark:interrupted"
ATTEMPTS_ATTR = "deepspark:attempts"
OVERRIDES_ATTR = "deepspark:overrides"
CONFIG_ATTR = "deepspark:config"
GRID_ATTR = "deepspark:grid_point"
#: When a trial sampled ahead reached its worker (ISO time); Optuna's ``datetime_start`` is its ask.
STARTED_ATTR = "deepspark:started"
RERUN_ATTR = "deepspark:rerun_of"
#: Plain markers for Optuna's own tools (optuna-dashboard shows user attributes): an interrupted attempt
#: is a FAIL in Optuna's states, with ``interrupted: true``; every FAIL has a ``fail_reason``.
INTERRUPTED_MARK = "interrupted"
FAIL_REASON = "fail_reason"
#: What a re-run of an interrupted trial inherits from it.
CARRIED_ATTRS = (DEFAULT_ATTR, OVERRIDES_ATTR, GRID_ATTR)


def interrupted_attrs(why: str) -> dict[str, Any]:
    """The user attributes of an interrupted attempt: Optuna records it as FAIL (a trial cannot go back
    to waiting), but it is no failure of the configuration, which runs again as a new trial."""
    return {
        INTERRUPTED_ATTR: True,
        INTERRUPTED_MARK: True,
        FAIL_REASON: f"interrupted ({why}): not a failure; its configuration runs again as a new trial",
    }


class TrialEventKind(StrEnum):
    """What happened to a trial: it started, started again after its worker was lost, or finished."""

    START = "start"
    RETRY = "retry"
    FINISH = "finish"


@dataclass(frozen=True)
class TrialEvent:
    kind: TrialEventKind
    number: int
    record: TrialRecord | None = None
    worker: str = ""


@dataclass(frozen=True)
class Endpoint:
    """What a trial worker needs to reach the coordinator: copy it into the worker's closure."""

    host: str
    port: int
    token: str


@dataclass
class _Running:
    trial: optuna.Trial
    params: dict[str, Any]
    attempt: int
    worker: str
    slot: int
    conn_id: int = 0
    started: float = field(default_factory=time.perf_counter)
    began: float = field(default_factory=time.monotonic)  # this attempt's start, for the clocks
    intermediate: dict[int, float] = field(default_factory=dict)


class Coordinator:
    """Runs ``n_trials`` new trials of ``study`` on whichever workers connect.

    ``on_model`` is called with a trial record and its model files when a trial becomes the best so far;
    ``on_default_model`` with the default configuration's trial and its files when that trial completes
    (so its test accuracy can be measured at the end without training it again).
    Workers connect with :func:`deepspark.wire.connect` to :attr:`endpoint` (known after :meth:`start`);
    ``token`` defaults to a fresh random one.

    Clocks (seconds; None turns one off): ``timeout`` bounds the study (then every running trial is
    interrupted and queued for ``--resume``, as on Ctrl-C); ``trial_timeout`` bounds one attempt of a
    trial (it FAILs with ``"trial timed out after N s"`` and is not retried: a trial that hangs once
    would hang again, and retrying would triple the time lost); ``heartbeat_timeout`` bounds a worker's
    silence while it holds a trial (the trial is re-queued, as when its socket closes, and its slot's
    job is cancelled). ``cancel(slot)``
    cancels that slot's Spark job (``cancel(None)``: every slot's), so a hung objective stops using
    its cores; without it only the connection is closed.
    """

    def __init__(
        self,
        study: optuna.Study,
        *,
        distributions: Mapping[str, Any],
        fixed: Mapping[str, Any],
        n_trials: int,
        token: str | None = None,
        bind: str = "127.0.0.1",
        max_failures: int | None = None,
        max_attempts: int = 3,
        on_event: Callable[[TrialEvent], None] | None = None,
        on_model: Callable[[TrialRecord, Mapping[str, bytes]], None] | None = None,
        on_default_model: Callable[[TrialRecord, Mapping[str, bytes]], None] | None = None,
        timeout: float | None = None,
        trial_timeout: float | None = None,
        heartbeat_timeout: float | None = DEFAULT_HEARTBEAT_TIMEOUT,
        cancel: Callable[[int | None], None] | None = None,
        sample_ahead: int = 0,
        parallel_asks: int = 0,
        copies: Callable[[int], bool] | None = None,
    ) -> None:
        self._deadline = time.monotonic() + timeout if timeout is not None else None
        # Whether the watchdog has applied the deadline (interrupted the running trials); set once it has,
        # so a tick that failed half-way is retried. Not the stop reason: a worker asking for a trial just
        # after the deadline sets that first, and the trials then running must still be interrupted (CI
        # waited an hour on one that slept).
        self._deadline_applied = False
        self._trial_timeout = trial_timeout
        self._heartbeat_timeout = heartbeat_timeout
        self._cancel = cancel
        clocks = [c / 4 for c in (timeout, trial_timeout, heartbeat_timeout) if c is not None]
        self._tick = max(0.05, min([1.0, *clocks]))
        self._heard: dict[int, float] = {}  # conn_id -> when its last frame arrived (monotonic)
        self._conns: dict[int, wire.Connection] = {}
        # Connections the watchdog is cutting (a trial timed out, a worker fell silent): decided under the
        # lock, closed after it, so until then they must be handed no trial (the cut would lose it).
        self._cut: set[int] = set()
        self._closing = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="deepspark-watchdog", daemon=True)
        self.study = study
        self._distributions = dict(distributions)
        self._fixed = dict(fixed)
        self._to_start = n_trials  # trials not asked yet
        self._sample_ahead = max(0, sample_ahead)
        self._ahead: deque[tuple[optuna.Trial, dict[str, Any]]] = deque()  # asked, not started
        self._ask_unlocked = parallel_asks > 0
        self._asking = 0  # asks in flight outside the lock (counted out of _to_start already)
        self._asking_ahead = 0  # of which the sampler threads' (the trials they will put in _ahead)
        self._samplers = [
            threading.Thread(target=self._sample, name=f"deepspark-sampler-{i}", daemon=True)
            for i in range(max(1, parallel_asks))
        ]
        self._token = token if token is not None else secrets.token_hex(16)
        self._max_failures = max_failures
        self._max_attempts = max_attempts
        self._on_event = on_event
        self._on_model = on_model
        self._on_default_model = on_default_model
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        # Model files are written one at a time, each after checking it is still the best's: two
        # handlers writing at once, the older best's write could end last and leave best/ stale.
        self._model_lock = threading.Lock()
        self._retry: deque[_Running] = deque()
        self._running: dict[int, _Running] = {}
        self._by_slot: dict[int, set[int]] = {}
        self.records: list[TrialRecord] = []
        self._failures = 0
        self._connections = 0
        self._slot_conn: dict[int, int] = {}
        self._copies = copies  # stage id -> whether Spark runs a speculative copy of its task
        self._standby: set[int] = set()  # connections of speculative copies, waiting for their slot
        self.stop_reason: str | None = None
        # The best trial so far as (value, number); best/ holds its model. Ties go to the lower trial
        # number, the trial best.json names (report.best_and_default), whatever order they finish in.
        self._maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
        self._best: tuple[float, int] | None = self._study_best()
        self._server = wire.Server(
            token=self._token, handler=self._serve, bind=bind, name="deepspark-coordinator"
        )

    # ------------------------------------------------------------------------------- lifecycle
    @property
    def address(self) -> tuple[str, int]:
        return self._server.address

    @property
    def endpoint(self) -> Endpoint:
        """Where and how workers connect (after :meth:`start`)."""
        host, port = self._server.address
        return Endpoint(host=host, port=port, token=self._token)

    def start(self) -> None:
        self._server.start()
        self._watchdog.start()
        if self._sample_ahead:
            for thread in self._samplers:
                thread.start()

    def close(self) -> None:
        self._closing.set()
        with self._lock:
            self._changed.notify_all()
        self._server.close()
        for thread in (self._watchdog, *self._samplers):
            if thread.ident is not None and thread is not threading.current_thread():
                thread.join(30.0)  # the sampler finishes the ask it is in (tens of ms)
        with self._lock:
            self._drop_ahead()

    def stop(self, reason: str) -> None:
        """Hand out no more trials; running ones may finish."""
        with self._lock:
            self._halt(reason)

    def _halt(self, reason: str) -> None:
        """Set the stop reason (the first one stays) and interrupt the trials sampled ahead; under the lock."""
        if self.stop_reason is None:
            self.stop_reason = reason
        self._drop_ahead()
        self._changed.notify_all()

    def _drop_ahead(self) -> None:
        while self._ahead:
            self._interrupt(self._ahead.popleft()[0])

    @property
    def finished(self) -> bool:
        with self._lock:
            idle = not self._running and not self._retry and not self._ahead and not self._asking
            return idle and (self._to_start <= 0 or self.stop_reason is not None)

    def counts(self) -> dict[str, int]:
        with self._lock:
            out = {s.value: 0 for s in TrialState}
            for r in self.records:
                out[r.state.value] += 1
            out["running"] = len(self._running)
            return out

    @property
    def connections(self) -> int:
        """How many workers have reached the coordinator so far (verified connections)."""
        with self._lock:
            return self._connections

    def interrupt_running(self) -> None:
        """Mark every running or to-be-retried trial interrupted and queue its params for ``--resume``."""
        with self._lock:
            pending = list(self._running.values()) + list(self._retry)
            self._running.clear()
            self._retry.clear()
            for run in pending:
                self._interrupt(run.trial)
            self._drop_ahead()
            self._changed.notify_all()

    def _interrupt(self, trial: optuna.Trial) -> None:
        for key, value in interrupted_attrs(self.stop_reason or "stopped").items():
            trial.set_user_attr(key, value)
        self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        carried = {k: trial.user_attrs[k] for k in CARRIED_ATTRS if k in trial.user_attrs}
        self.study.enqueue_trial(dict(trial.params), user_attrs={RERUN_ATTR: trial.number, **carried})

    # ------------------------------------------------------------------------------- protocol
    def _serve(self, conn: wire.Connection) -> None:
        """One worker's connection (its hello already checked by the server), until it hangs up."""
        slot = -1
        worker = "?"
        with self._lock:
            self._connections += 1
            conn_id = self._connections
            self._conns[conn_id] = conn
        try:
            slot, worker = int(conn.hello.get("slot", -1)), str(conn.hello.get("worker", "?"))
            self._supersede(slot, conn_id, conn.hello.get("stage"))
            while True:
                msg, payload = conn.recv()
                self._heard[conn_id] = time.monotonic()
                op = msg.get("op")
                if op == wire.HEARTBEAT:
                    continue  # never answered: the worker's other frames expect their own replies
                if op == "next":
                    conn.send(self._recorded({"stop": True}, self._next, slot, worker, conn_id, conn))
                elif op == "report":
                    prune = self._recorded(
                        True,
                        self._report,
                        int(msg["trial"]),
                        int(msg["step"]),
                        float(msg["value"]),
                        conn_id,
                        final=bool(msg.get("final", False)),
                    )
                    conn.send({"prune": prune})
                elif op == "done":
                    conn.send({"send_model": self._recorded(False, self._done, msg, worker, conn_id)})
                elif op == "model":
                    self._model(int(msg["trial"]), _split_files(msg.get("files"), payload))
                    conn.send({"ok": True})
                else:
                    raise wire.ProtocolError(f"unknown op {op!r}")
        except (OSError, ValueError, KeyError) as exc:
            _log.debug("worker %s disconnected: %s", worker, exc)
        finally:
            with self._lock:
                self._conns.pop(conn_id, None)
                self._heard.pop(conn_id, None)
                self._cut.discard(conn_id)
                self._standby.discard(conn_id)
            self.worker_lost(slot, reason=f"worker {worker} disconnected", conn_id=conn_id)

    def _recorded(self, failed: Any, handle: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``handle(*args, **kwargs)``, or ``failed`` (the answer that stops the worker's attempt) once the
        study's storage refused the write (the journal on a full or read-only disk): the study stops with
        the cause. That OSError was taken for the worker disconnecting: its Spark job failed and ran again,
        and a finished trial's result was dropped without a word."""
        try:
            return handle(*args, **kwargs)
        except OSError as exc:
            _log.error("could not record the study: %s", exc)
            with self._lock:
                self._halt(f"could not record the study: {exc}")
            return failed

    def _supersede(self, slot: int, conn_id: int, stage: Any) -> None:
        """A new attempt of slot's Spark task has started, so any older attempt is dead (Spark runs one
        attempt of a task at a time, but for a speculative copy), even if its process has not noticed
        yet: re-run its trials. A speculative copy stands by instead (:meth:`_holder_live`)."""
        copy = stage is not None and self._copies is not None and self._copies(int(stage))
        with self._lock:
            if copy and self._holder_live(slot, conn_id):
                _log.info("slot %d: a speculative copy of its Spark task stands by", slot)
                self._standby.add(conn_id)
                return
            stale = {
                run.conn_id for run in self._running.values() if run.slot == slot and run.conn_id != conn_id
            }
            self._slot_conn[slot] = conn_id
        for old in stale:
            self.worker_lost(slot, reason="its Spark task was restarted", conn_id=old)

    def _next(self, slot: int, worker: str, conn_id: int, conn: wire.Connection) -> dict[str, Any]:
        run: _Running | None = None
        with self._lock:
            while True:
                if conn_id in self._standby:
                    if (
                        self.stop_reason is None
                        and not conn.peer_closed()
                        and self._holder_live(slot, conn_id)
                    ):
                        self._changed.wait(timeout=1.0)
                        continue
                    self._standby.discard(conn_id)  # the original's connection ended: the copy goes on
                    self._slot_conn[slot] = conn_id
                if self._slot_conn.get(slot, conn_id) != conn_id:
                    return {"stop": True}  # a stale attempt: a newer one holds this slot
                # A lost executor takes all its workers at once. The thread of one that was waiting here
                # must not take the trial its neighbour just lost: that worker is gone too.
                if conn.peer_closed() or conn_id in self._cut:
                    return {"stop": True}
                # Not once every trial is done: a worker asks again after its last one (the driver took
                # its result and model first), and the study that ran them all said it stopped early.
                if self._deadline is not None and time.monotonic() > self._deadline and not self.finished:
                    self._halt("timeout")
                if self.stop_reason is not None:
                    return {"stop": True}
                if self._retry:
                    run = self._retry.popleft()
                    run.attempt += 1
                    run.worker, run.slot, run.conn_id = worker, slot, conn_id
                    run.started, run.began = time.perf_counter(), time.monotonic()
                    run.trial.set_user_attr(ATTEMPTS_ATTR, run.attempt)
                    kind = TrialEventKind.RETRY
                    break
                # A trial sampled ahead if one is ready, else asked now: a worker never waits for the
                # sampler thread (16 of them woken at every ask cost the 10,000-trial study 6 points).
                if self._ahead or self._to_start > 0:
                    kind = TrialEventKind.START
                    if self._ahead:
                        trial, params = self._ahead.popleft()
                        trial.set_user_attr(STARTED_ATTR, datetime.datetime.now().isoformat())
                    elif self._ask_unlocked:
                        self._to_start -= 1
                        self._asking += 1
                        break  # asked below, outside the lock
                    else:
                        self._to_start -= 1
                        try:
                            trial, params = self._ask_trial()
                        except Exception as exc:
                            self._sampler_failed(exc)
                            return {"stop": True}
                    if self._sample_ahead and self._to_start > 0:
                        self._changed.notify_all()  # the sampler thread refills
                    run = _Running(
                        trial=trial, params=params, attempt=1, worker=worker, slot=slot, conn_id=conn_id
                    )
                    break
                # With nothing left to start, wait for a running trial elsewhere that may still be lost
                # and need a new home, and for the asks in flight (a sampler thread's lands in _ahead).
                if not self._running and not self._asking:
                    return {"stop": True}
                self._changed.wait(timeout=1.0)
            if run is not None:
                self._register(run)
        if run is None:
            try:
                trial, params = self._ask_outside_lock()
            except Exception as exc:
                with self._lock:
                    self._sampler_failed(exc, counted=True)
                return {"stop": True}
            with self._lock:
                if self.stop_reason is not None:
                    self._interrupt(trial)
                    return {"stop": True}
                if (
                    self._slot_conn.get(slot, conn_id) != conn_id
                    or conn.peer_closed()
                    or conn_id in self._cut
                ):
                    self._ahead.appendleft((trial, params))  # for the next worker that asks
                    self._changed.notify_all()
                    return {"stop": True}
                run = _Running(
                    trial=trial, params=params, attempt=1, worker=worker, slot=slot, conn_id=conn_id
                )
                self._register(run)
        self._emit(TrialEvent(kind, run.trial.number, worker=worker))
        task: dict[str, Any] = {"trial": run.trial.number, "params": run.params, "attempt": run.attempt}
        if self._heartbeat_timeout is not None:
            task["heartbeat_s"] = wire.heartbeat_interval(self._heartbeat_timeout)
        return task

    def _holder_live(self, slot: int, conn_id: int) -> bool:
        """Under the lock: whether another connection, open and not being cut, holds ``slot``."""
        holder = self._slot_conn.get(slot)
        conn = self._conns.get(holder) if holder is not None and holder != conn_id else None
        return conn is not None and holder not in self._cut and not conn.peer_closed()

    def _register(self, run: _Running) -> None:
        """``run`` holds its slot now; under the lock."""
        self._running[run.trial.number] = run
        self._by_slot.setdefault(run.slot, set()).add(run.trial.number)

    def _ask_outside_lock(self) -> tuple[optuna.Trial, dict[str, Any]]:
        """Ask for a trial already counted (``_to_start``, ``_asking``) without holding the lock: the
        sampler runs in another process, so the wait holds neither the lock nor the GIL."""
        try:
            return self._ask_trial()
        except BaseException:
            with self._lock:
                self._to_start += 1
                raise
        finally:
            with self._lock:
                self._asking -= 1
                self._changed.notify_all()

    def _ask_trial(self) -> tuple[optuna.Trial, dict[str, Any]]:
        """Ask the sampler for a new trial and record its whole configuration where Optuna's parameters
        are not all of it (the caller counts it). Readers take ``CONFIG_ATTR``, else the parameters: a
        search space without fixed values saves a journal write per trial (of five)."""
        trial = self.study.ask(self._distributions)
        # The default configuration may pin values that other trials take from ``fixed``.
        params = {**self._fixed, **trial.params, **trial.user_attrs.get(OVERRIDES_ATTR, {})}
        if params != trial.params:
            trial.set_user_attr(CONFIG_ATTR, params)
        return trial, params

    def _sample(self) -> None:
        """The sampler thread: keep ``sample_ahead`` trials asked and ready while trials remain to start.

        With a sampler in the driver's process, the ask runs under the coordinator's lock, like every
        Optuna call. Outside it (tried: Optuna allows it) the 10,000-trial TPE study got slower, 0.856
        against 0.929 without sampling ahead: the sampler thread, busy for 50 ms an ask, held the GIL
        against the 16 connection threads. With a sampler in other processes (``parallel_asks``), the
        ask waits on a pipe, holding neither, and runs outside the lock, on ``parallel_asks`` threads at
        once. Workers never wait for these threads either (tried: 0.872, with every waiting worker's
        thread woken at each ask); they ask themselves when nothing is ready.
        """
        while True:
            with self._lock:  # one ask per hold: workers waiting for the lock get it between asks
                while not self._closing.is_set() and (
                    self.stop_reason is not None
                    or self._to_start <= 0
                    or len(self._ahead) + self._asking_ahead >= self._sample_ahead
                ):
                    self._changed.wait(timeout=1.0)
                if self._closing.is_set():
                    return
                self._to_start -= 1
                if not self._ask_unlocked:
                    try:
                        self._ahead.append(self._ask_trial())
                    except Exception as exc:
                        self._sampler_failed(exc)
                    self._changed.notify_all()
                else:
                    self._asking += 1
                    self._asking_ahead += 1
            if self._ask_unlocked:
                try:
                    asked = self._ask_outside_lock()
                except Exception as exc:
                    with self._lock:
                        self._asking_ahead -= 1
                        self._sampler_failed(exc, counted=True)
                else:
                    with self._lock:
                        self._asking_ahead -= 1
                        if self.stop_reason is not None or self._closing.is_set():
                            self._interrupt(asked[0])
                        else:
                            self._ahead.append(asked)
                        self._changed.notify_all()
            time.sleep(0)  # let a worker's thread take the lock (and the GIL) before the next ask

    def _sampler_failed(self, exc: Exception, *, counted: bool = False) -> None:
        """The ask raised: stop the study with its error (under the lock); ``counted``: already given back."""
        _log.error("the sampler failed", exc_info=exc)
        if not counted:
            self._to_start += 1
        self._halt(f"the sampler failed: {exc}")

    def _report(self, number: int, step: int, value: float, conn_id: int, *, final: bool) -> bool:
        with self._lock:
            run = self._running.get(number)
            if run is None or run.conn_id != conn_id:
                return True  # interrupted, or given to another worker since: stop this attempt
            if step in run.intermediate:
                return False  # a re-run reporting a step its first attempt already reported
            run.trial.report(value, step)
            run.intermediate[step] = value  # after Optuna took it: a refused report is not one reported
            # The default configuration is the baseline of the error reduction: its value feeds the
            # pruner, but it runs to the end (pruned, best.json would have no default to compare with).
            default = bool(run.trial.user_attrs.get(DEFAULT_ATTR))
            return not final and not default and bool(run.trial.should_prune())

    def _done(self, msg: Mapping[str, Any], worker: str, conn_id: int) -> bool:
        number = int(msg["trial"])
        with self._lock:
            run = self._running.get(number)
            if run is None or run.conn_id != conn_id:
                # A stale attempt (its worker was declared lost and the trial handed on) finished late.
                _log.info("ignoring a late result for trial %d from %s", number, worker)
                return False
            del self._running[number]
            self._by_slot.get(run.slot, set()).discard(number)
            state = TrialState(msg["state"])
            value = msg.get("value")
            record = TrialRecord(
                number=number,
                state=state,
                params=run.params,
                value=float(value) if value is not None else None,
                metrics=dict(msg.get("metrics") or {}),
                duration_s=float(msg.get("duration_s", 0.0)),
                attempts=run.attempt,
                worker=worker,
                error=msg.get("error"),
                traceback=msg.get("traceback"),
                is_default=bool(run.trial.user_attrs.get(DEFAULT_ATTR)),
                intermediate=dict(run.intermediate),
            )
            run.trial.set_user_attr(RESULT_ATTR, result_attr(record))
            if state is TrialState.FAIL:
                run.trial.set_user_attr("error", record.error)
                run.trial.set_user_attr(FAIL_REASON, record.error)
                run.trial.set_user_attr("traceback", record.traceback)
                self.study.tell(run.trial, state=optuna.trial.TrialState.FAIL)
                self._failures += 1
                if self._max_failures is not None and self._failures >= self._max_failures:
                    self._halt(
                        f"{self._failures} failed trial(s) reached --max-failures {self._max_failures}"
                    )
            elif state is TrialState.PRUNED:
                self.study.tell(run.trial, state=optuna.trial.TrialState.PRUNED)
            else:
                self.study.tell(run.trial, record.value)
            self.records.append(record)
            new_best = state is TrialState.COMPLETE and self._better(record.value, number)
            if new_best and record.value is not None:
                self._best = (record.value, number)
            keep_default = (
                state is TrialState.COMPLETE and record.is_default and self._on_default_model is not None
            )
            send_model = new_best or keep_default
            self._changed.notify_all()
        self._emit(TrialEvent(TrialEventKind.FINISH, number, record=record, worker=worker))
        return send_model

    def _model(self, number: int, files: Mapping[str, bytes] | None) -> None:
        record = next((r for r in self.records if r.number == number), None)
        if not files or record is None:
            return
        with self._model_lock:
            try:
                if record.is_default and self._on_default_model is not None:
                    self._on_default_model(record, files)
                if self._on_model is not None and self._best is not None and self._best[1] == number:
                    self._on_model(record, files)  # unless a better trial finished meanwhile
            except OSError as exc:
                # The driver's disk (full, read-only, gone), not the worker: taken for a disconnect, the
                # worker's job failed and was resubmitted, and the study ended "successfully" without
                # the model. Stop the study instead, saying where and why.
                _log.error("could not save trial %d's model: %s", number, exc)
                with self._lock:
                    self._halt(f"could not save trial {number}'s model: {exc}")

    def worker_lost(self, slot: int, *, reason: str, conn_id: int | None = None) -> None:
        """The worker on ``slot`` died: its running trials go back in the queue (or FAIL after retries).

        ``conn_id`` limits this to the trials of one connection (a newer worker may already hold the slot).
        """
        lost: list[_Running] = []
        with self._lock:
            for number in list(self._by_slot.get(slot, ())):
                run = self._running.get(number)
                if run is not None and (conn_id is None or run.conn_id == conn_id):
                    del self._running[number]
                    self._by_slot[slot].discard(number)
                    lost.append(run)
            for run in lost:
                if self.stop_reason is not None:
                    self._interrupt(run.trial)
                elif run.attempt < self._max_attempts:
                    _log.warning(
                        "trial %d: %s (infrastructure failure, attempt %d); it will run again",
                        run.trial.number,
                        reason,
                        run.attempt,
                    )
                    self._retry.append(run)
                else:
                    self._fail(run, f"infrastructure: {reason}; gave up after {run.attempt} attempts")
            self._changed.notify_all()

    def _fail(self, run: _Running, error: str) -> TrialRecord:
        """Record ``run`` (already out of ``_running``) as FAIL with ``error``; call under the lock."""
        record = TrialRecord(
            number=run.trial.number,
            state=TrialState.FAIL,
            params=run.params,
            attempts=run.attempt,
            worker=run.worker,
            error=error,
            is_default=bool(run.trial.user_attrs.get(DEFAULT_ATTR)),
            intermediate=dict(run.intermediate),
        )
        run.trial.set_user_attr("error", record.error)
        run.trial.set_user_attr(FAIL_REASON, record.error)
        self.study.tell(run.trial, state=optuna.trial.TrialState.FAIL)
        self.records.append(record)
        self._emit(TrialEvent(TrialEventKind.FINISH, run.trial.number, record=record))
        return record

    # ------------------------------------------------------------------------------- clocks
    def _watch(self) -> None:
        """The watchdog: every tick, apply the study deadline, the trial timeout and the heartbeat timeout."""
        while not self._closing.wait(self._tick):
            try:
                self.check_clocks()
            except Exception:  # never let the watchdog die: it is what un-hangs a study
                _log.exception("the coordinator's watchdog failed")

    def check_clocks(self, now: float | None = None) -> None:
        """Apply the three clocks once (the watchdog calls this every tick)."""
        now = time.monotonic() if now is None else now
        timed_out: list[_Running] = []
        silent: list[tuple[_Running, float, bool]] = []
        interrupted: list[int] = []
        with self._lock:
            deadline_hit = (
                self._deadline is not None
                and now > self._deadline
                and not self._deadline_applied
                and not self.finished
            )
            if deadline_hit:
                interrupted = sorted({run.conn_id for run in self._running.values()})
                self._halt("timeout")
            for run in list(self._running.values()):
                quiet = now - max(run.began, self._heard.get(run.conn_id, run.began))
                if self._trial_timeout is not None and now - run.began > self._trial_timeout:
                    del self._running[run.trial.number]
                    self._by_slot.get(run.slot, set()).discard(run.trial.number)
                    timed_out.append(run)
                    self._cut.add(run.conn_id)
                    self._failures += 1
                    self._fail(run, f"trial timed out after {self._trial_timeout:g} s")
                elif self._heartbeat_timeout is not None and quiet > self._heartbeat_timeout:
                    # Its task still holds the slot (a frozen Python worker under a live executor never
                    # fails on its own): cancelled, as for a trial timeout, unless a newer task holds it.
                    current = self._slot_conn.get(run.slot) == run.conn_id
                    silent.append((run, quiet, current))
                    self._cut.add(run.conn_id)
            if self._max_failures is not None and self._failures >= self._max_failures and timed_out:
                self._halt(f"{self._failures} failed trial(s) reached --max-failures {self._max_failures}")
            self._changed.notify_all()
        for run in timed_out:
            _log.warning(
                "trial %d: timed out after %g s; cancelling its task", run.trial.number, now - run.began
            )
            self._hang_up(run.conn_id, cancel_slot=run.slot)
        for run, quiet, current in silent:
            reason = f"worker {run.worker} silent for {quiet:.0f} s (heartbeat_timeout {self._heartbeat_timeout:g} s)"
            self.worker_lost(run.slot, reason=reason, conn_id=run.conn_id)
            self._hang_up(run.conn_id, cancel_slot=run.slot if current else None)
        if deadline_hit:
            _log.warning("the study's timeout has passed: interrupting %d running trial(s)", len(interrupted))
            if self._cancel is not None:
                try:
                    self._cancel(None)
                except Exception:
                    _log.exception("could not cancel the study's Spark jobs")
            for conn_id in interrupted:
                self._hang_up(conn_id)
            # Only now: an error on the way (the journal refused a write) leaves it for the next tick.
            self._deadline_applied = True

    def _hang_up(self, conn_id: int, *, cancel_slot: int | None = None) -> None:
        """Close a worker's connection (its handler then ends) and, for a hung trial, cancel its slot's job."""
        if cancel_slot is not None and self._cancel is not None:
            try:
                self._cancel(cancel_slot)
            except Exception:
                _log.exception("could not cancel the Spark job of slot %d", cancel_slot)
        with self._lock:
            conn = self._conns.get(conn_id)
        if conn is not None:
            conn.close()

    # ------------------------------------------------------------------------------- helpers
    def _better(self, value: float | None, number: int) -> bool:
        if value is None:
            return False
        return self._best is None or _ranks_above((value, number), self._best, maximize=self._maximize)

    def _study_best(self) -> tuple[float, int] | None:
        """The best finished trial of a resumed study, by the same rule as :meth:`_better`."""
        best: tuple[float, int] | None = None
        for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            if t.value is None or t.user_attrs.get(INTERRUPTED_ATTR):
                continue
            candidate = (float(t.value), t.number)
            if best is None or _ranks_above(candidate, best, maximize=self._maximize):
                best = candidate
        return best

    def _emit(self, event: TrialEvent) -> None:
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:
                _log.exception("progress callback failed")


def _ranks_above(a: tuple[float, int], b: tuple[float, int], *, maximize: bool) -> bool:
    """Whether trial ``a`` (value, number) ranks above ``b``: a better value, or the same and a lower number."""
    if a[0] == b[0]:
        return a[1] < b[1]
    return a[0] > b[0] if maximize else a[0] < b[0]


def _split_files(sizes: Any, payload: bytes) -> dict[str, bytes] | None:
    """The model files of a ``model`` frame: ``sizes`` is ``[[name, size], ...]`` in payload order."""
    if sizes is None:
        return None
    files: dict[str, bytes] = {}
    offset = 0
    for name, size in sizes:
        if not isinstance(name, str) or isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise wire.ProtocolError(f"bad model file entry {[name, size]!r}")
        files[name] = payload[offset : offset + size]
        offset += size
    if offset != len(payload):
        raise wire.ProtocolError(f"model files announce {offset} bytes, the payload holds {len(payload)}")
    return files
