"""Model averaging (SparkNet): every round each worker starts from the same weights, takes ``tau`` local
steps on its own partition, and the driver averages what comes back.

Workers are long-lived Spark tasks (one per partition, each its own one-task job, resubmitted when it
fails), so a round costs two transfers of the weights rather than a Spark job, and each worker keeps its
partition in memory as tensors for the whole run. The driver side (:class:`RoundServer`) is a
:class:`deepspark.wire.Server` handler; the executor side is :func:`average_task`.

Choices (docs/training.md):

- The inner optimizer starts fresh every round (SparkNet): a worker carries nothing from one round to
  the next but its data position, which the driver keeps (:class:`DataCursor` state), so a worker that
  replaces a lost one, or a resumed run, takes exactly the batches the lost one would have.
- The average is weighted by the examples each worker saw in the round (an empty partition counts 0).
- Outer step: ``plain`` replaces the weights by the average; ``nesterov`` treats the difference as a
  gradient for an SGD step with Nesterov momentum (DiLoCo / SlowMo), whose buffer is checkpointed. The
  outer step moves the model's parameters only: buffers (BatchNorm's running mean and variance) take the
  average, since an extrapolated variance can turn negative.
- A worker lost mid-round is left out of that round; the round completes with the others and the
  replacement task joins the next one. When the others saw no example (their partitions are empty),
  the round waits for the replacement instead, which joins it: an average of nothing is no round.
  Only a worker's newest connection counts (a lost task whose
  process still runs is told to stop; its push is not taken, its closing leaves no round).
- Once the run has failed or been interrupted, no round is averaged or recorded: a push that arrives
  after the stop (the others' pushes of that round came before it) is not taken, as in ``allreduce``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from deepspark import wire
from deepspark.errors import ConfigError, DeepsparkError
from deepspark.models.checkpoint import state_from_bytes, state_to_bytes
from deepspark.spark import device_label
from deepspark.training.frame import count_disagrees, rows_changed

if TYPE_CHECKING:
    from deepspark.training.loop import Examples

__all__ = [
    "LOADED",
    "OUTER",
    "AverageSettings",
    "LoadedWorker",
    "RoundRecord",
    "RoundServer",
    "ServerState",
    "TaskSpec",
    "average_task",
    "load_worker",
    "round_steps",
    "schedule_step",
]

_log = logging.getLogger(__name__)

OUTER = ("plain", "nesterov")
#: The ``op`` of the frame a worker sends once it has read its partition (it connects before).
LOADED = "loaded"


@dataclass(frozen=True)
class AverageSettings:
    """The strategy's own knobs: steps per round (or seconds), outer optimizer."""

    tau: int = 50
    round_seconds: float | None = None
    outer: str = "plain"
    outer_learning_rate: float = 0.7
    outer_momentum: float = 0.5  # DiLoCo's 0.9 diverged under momentum-SGD workers: docs/training.md

    def __post_init__(self) -> None:
        from deepspark.validation import check_choice, check_number, check_positive_int

        check_positive_int("tau", self.tau)
        if self.round_seconds is not None:
            check_number("round_seconds", self.round_seconds, low=0, low_open=True)
        check_choice("outer", self.outer, OUTER)
        check_number("outer_learning_rate", self.outer_learning_rate, low=0, low_open=True)
        check_number("outer_momentum", self.outer_momentum, low=0, high=1, high_open=True)


@dataclass(frozen=True)
class RoundRecord:
    """One finished round, as the driver saw it (a row of ``history.csv``)."""

    round: int
    epoch: float
    samples: int
    workers: int
    train_loss: float
    seconds: float
    compute_s: float
    comm_s: float
    wait_s: float
    bytes: int


@dataclass
class _Push:
    state: dict[str, torch.Tensor]
    samples: int
    loss_sum: float
    cursor: dict[str, Any]
    compute_s: float
    comm_s: float
    wait_s: float


@dataclass
class _Worker:
    cursor: dict[str, Any]
    connection: int = 0  # the number of its newest connection; an older one is superseded
    first_seen: float | None = None
    taken: int = 0  # its pushes averaged into a round, in this process


@dataclass
class _Round:
    number: int
    steps: int
    first_step: int  # where the round starts in the learning-rate schedule (the run's progress)
    expected: set[int] = field(default_factory=set)
    pushes: dict[int, _Push] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    dispatched: bool = False
    bytes: int = 0


class ServerState:
    """A strategy server's run state under its one condition: ``finished``, ``error``, and waiting on them.

    Subclasses change their state only under ``self._lock`` and notify it on every change.

    A worker owes the server a frame only while it loads its partition (it connects first) or computes;
    it sends heartbeats meanwhile (every :func:`deepspark.wire.heartbeat_interval` of
    ``heartbeat_timeout``). Past ``heartbeat_timeout`` seconds of silence, or of taking no byte of the
    frame it is sent (:meth:`deliver`), it is lost, as if its connection had closed (a frozen process
    whose executor lives on never closes it), and ``cancel(worker)`` cancels its Spark job so that the
    job is resubmitted. ``heartbeat_timeout`` None: no clock (a silent worker is waited for).

    A worker's newest connection supersedes an earlier one (a retried task), except that a speculative copy
    of its task (``copies(stage)``: Spark runs the task twice, under ``spark.speculation``) stands by while
    the original's connection is open (:meth:`connect`).
    """

    def __init__(
        self,
        *,
        rows: int,
        new_cursor: Callable[[int, int], dict[str, Any]],
        digest: str = "",
        row_digests: Mapping[int, str] | None = None,
        heartbeat_timeout: float | None = None,
        cancel: Callable[[int], None] | None = None,
        copies: Callable[[int], bool] | None = None,
    ) -> None:
        self._lock = threading.Condition()
        self._copies = copies  # stage id -> whether Spark runs a speculative copy of its task
        self._current: dict[int, int] = {}  # worker -> the number of its current connection, while open
        self.finished = False
        self.error: BaseException | None = None
        self.devices: dict[int, str] = {}  # worker -> the device it trains on (from its hello)
        self._rows = rows  # what the DataFrame was counted with
        self._new_cursor = new_cursor  # (worker, rows) -> a first data position
        self._heartbeat_timeout = heartbeat_timeout
        self._cancel = cancel
        self._rows_read: dict[int, int] = {}  # worker -> the rows its newest task read
        self._digest = digest  # of the rows counted (FrameLayout.digest); "" when not taken
        # worker -> the digest of the rows its first task read: in this session or, on a resume, the run's
        # first (row_digests, from the checkpoint), which the worker's data position was made for.
        self._digests_read: dict[int, str] = dict(row_digests or {})

    def row_digests(self) -> dict[int, str]:
        """Each worker's rows' digest as its first task read them (under the lock): a checkpoint keeps them,
        so that a resumed run's tasks must read the rows the data positions cover, not only as many."""
        return dict(self._digests_read)

    def admit(self, conn: Any, workers: int) -> int | None:
        """The worker index a connection's hello names (its device noted), or None if it is not one of ours."""
        worker = int(conn.hello.get("worker", -1))
        if not 0 <= worker < workers:
            _log.warning("a worker announced itself as %r; expected 0..%d", worker, workers - 1)
            return None
        device, gpus = str(conn.hello.get("device", "cpu")), list(conn.hello.get("gpus") or [])
        _log.info(
            "worker %d connected from %s (task attempt %s, pid %s)",
            worker,
            conn.peer,
            conn.hello.get("attempt", "?"),
            conn.hello.get("pid", "?"),
        )
        with self._lock:
            self.devices[worker] = device_label(device, gpus)
        return worker

    def connect(self, conn: Any, worker: int, state: Any) -> int | None:
        """Make ``conn`` ``worker``'s current connection and return its number (``state.connection``):
        an earlier connection is superseded, since Spark runs a new attempt of a task once the old one
        failed. A speculative copy of the task runs beside a live original: taken for a retry, it stopped
        the original, and Spark then killed the copy as the original's task had ended, round after round
        (a copy that came before the worker had loaded kept it from ever training: the run never ended).
        It stands by while the original's connection is open, and takes over when that ends; None when
        its own connection closed first (Spark killed it: the original's task ended)."""
        stage = conn.hello.get("stage")
        copy = stage is not None and self._copies is not None and self._copies(int(stage))
        with self._lock:
            if copy and worker in self._current:
                _log.info("worker %d: a speculative copy of its Spark task stands by", worker)
            while copy and worker in self._current and not self.finished and self.error is None:
                if conn.peer_closed():
                    return None
                self._lock.wait(timeout=1.0)
            state.connection += 1
            self._current[worker] = state.connection
            self._lock.notify_all()
            return int(state.connection)

    def disconnect(self, worker: int, mine: int) -> None:
        """Under the lock, as ``worker``'s connection number ``mine`` ends: a copy standing by goes on."""
        if self._current.get(worker) == mine:
            del self._current[worker]
            self._lock.notify_all()

    def receive(self, conn: Any) -> tuple[dict[str, Any], bytes, int]:
        """A worker's next frame other than a heartbeat, and its size (:func:`deepspark.wire.receive`
        under the heartbeat timeout)."""
        return wire.receive(conn, self._heartbeat_timeout)

    def loaded(self, conn: Any, worker: int) -> tuple[int, str]:
        """The rows ``worker``'s task read and their digest, from the frame it sends once loaded. A task
        connects before it reads its partition and beats meanwhile: a silent one is frozen (TimeoutError,
        under the heartbeat timeout), one that beats is waited for however long its load takes."""
        header, _, _ = self.receive(conn)
        if header.get("op") != LOADED:
            raise DeepsparkError(f"worker {worker}: expected its {LOADED!r} frame, got {header.get('op')!r}")
        log_spilled(f"worker {worker}", header)
        return int(header["rows"]), str(header["digest"])

    def deliver(self, conn: Any, header: Mapping[str, Any], payload: bytes) -> int:
        """Send a worker a frame that it must read (its round, its pull) under the heartbeat timeout
        (:func:`deepspark.wire.deliver`): a worker frozen while it waited for it takes no byte."""
        return wire.deliver(conn, header, payload, self._heartbeat_timeout)

    def silent(self, worker: int, conn: Any, *, current: bool) -> None:
        """``worker`` was silent on ``conn`` past the heartbeat timeout: cancel its Spark job (it is
        resubmitted), unless ``conn`` was ``current`` no more (the job running now is its replacement's)."""
        if not current:
            return
        _log.warning(
            "worker %d (pid %s on %s) silent for %g s (heartbeat_timeout): frozen; cancelling its Spark job",
            worker,
            conn.hello.get("pid", "?"),
            conn.peer,
            self._heartbeat_timeout,
        )
        if self._cancel is not None:
            try:
                self._cancel(worker)
            except Exception as exc:  # a stopped context: the run is ending anyway
                _log.warning("worker %d: could not cancel its Spark job: %s", worker, exc)

    def hold(self) -> threading.Condition:
        """The server's (reentrant) lock: hold it to read or checkpoint a consistent state."""
        return self._lock

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the run to finish or fail; return whether it has."""
        with self._lock:
            self._lock.wait_for(lambda: self.finished or self.error is not None, timeout=timeout)
            return self.finished or self.error is not None

    def fail(self, error: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = error
            self._lock.notify_all()

    def turn(self, conn: Any, state: Any, mine: int, ready: Callable[[], bool]) -> bool:
        """Under the lock: wait until ``ready()``, the run's end, or ``state``'s connection is no longer
        ``mine`` (a newer one took over); True when it is the worker's turn, else False once it has been
        told to stop."""
        self._lock.wait_for(
            lambda: self.finished or self.error is not None or state.connection != mine or ready()
        )
        if self.finished or self.error is not None or state.connection != mine:
            conn.send({"op": "stop"})
            return False
        return True

    def loaded_once(self, workers: int) -> bool:
        """Under the lock: whether each of the ``workers`` has loaded its partition at least once."""
        return len(self._rows_read) == workers

    def place(self, worker: int, rows: int, digest: str, state: Any, *, workers: int) -> bool:
        """Under the lock, as ``worker``'s task says it has read ``rows`` rows of ``digest``: give its
        ``state`` (the server's record of it, with a ``cursor``) a first data position if it has none, and
        say whether the rows are the ones that position covers, the ones its first task read and, once
        every one of the ``workers`` has loaded, the ones counted. If not, the run fails (a resubmitted
        task would read the same changed rows): nothing trains on rows that are not the ones counted and
        positioned."""
        if not state.cursor:
            state.cursor = self._new_cursor(worker, rows)
        self._rows_read[worker] = rows
        first = self._digests_read.setdefault(worker, digest)
        problem: str | None = None
        if int(state.cursor["n"]) != rows:
            problem = f"worker {worker} read {rows} rows where its data position covers {state.cursor['n']}"
        elif digest != first:
            problem = f"worker {worker}'s task read other rows than its first task did ({rows} rows)"
        elif len(self._rows_read) == workers:
            problem = count_disagrees(
                self._rows_read, self._digests_read, rows=self._rows, digest=self._digest, who="the workers"
            )
        if problem is None:
            return True
        self.fail(rows_changed(problem))
        return False


class RoundServer(ServerState):
    """The driver's side of model averaging: hands out rounds, averages pushes, applies the outer step.

    ``parameters`` names the model's parameters among ``weights`` (the Nesterov outer step moves those;
    buffers take the average).

    ``on_round(record, weights, outer_state, cursors)`` runs after every round under the server's lock
    (checkpointing and progress live there); when it returns, the next round opens. All state changes
    happen under one lock; one handler thread serves each connected worker.
    """

    def __init__(
        self,
        *,
        weights: Mapping[str, torch.Tensor],
        parameters: Collection[str],
        cursors: Mapping[int, Mapping[str, Any]],
        workers: int,
        new_cursor: Callable[[int, int], dict[str, Any]],
        settings: AverageSettings,
        batch_size: int,
        total_steps: int,
        total_samples: int,
        steps_done: int,
        samples_done: int,
        rows: int,
        digest: str = "",  # of the rows counted (FrameLayout.digest)
        row_digests: Mapping[int, str] | None = None,  # each worker's, from a resumed checkpoint
        first_round: int,
        outer_state: Mapping[str, Any] | None,
        on_round: Callable[[RoundRecord, Mapping[str, torch.Tensor]], None],
        heartbeat_timeout: float | None = None,
        cancel: Callable[[int], None] | None = None,
        copies: Callable[[int], bool] | None = None,
    ) -> None:
        super().__init__(
            rows=rows,
            new_cursor=new_cursor,
            digest=digest,
            row_digests=row_digests,
            heartbeat_timeout=heartbeat_timeout,
            cancel=cancel,
            copies=copies,
        )
        self._weights = {k: v.detach().clone() for k, v in weights.items()}
        self._payload = state_to_bytes(self._weights)
        self._workers = {k: _Worker(cursor=dict(cursors.get(k, {}))) for k in range(workers)}
        self._settings = settings
        self._batch_size = batch_size
        self._total_steps = total_steps
        self._total = total_samples
        self._done_steps = steps_done
        self._done_samples = samples_done
        self._on_round = on_round
        self._outer: torch.optim.Optimizer | None = None
        self._params: dict[str, torch.nn.Parameter] = {}
        if settings.outer == "nesterov":
            self._params = {  # the outer step's; buffers (BatchNorm statistics) take the plain average
                k: torch.nn.Parameter(v.clone())
                for k, v in self._weights.items()
                if k in parameters and v.is_floating_point()
            }
            self._outer = torch.optim.SGD(
                list(self._params.values()),
                lr=settings.outer_learning_rate,
                momentum=settings.outer_momentum,
                nesterov=True,
            )
            if outer_state:
                try:
                    self._outer.load_state_dict(dict(outer_state))
                except ValueError as exc:  # momentum for another set of tensors than the model's parameters
                    raise ConfigError(
                        f"resume: the checkpoint's Nesterov momentum does not fit the model's {len(self._params)} "
                        f"parameter tensors ({exc}); it was written by an earlier deepspark that also stepped "
                        "BatchNorm statistics: start the run again"
                    ) from exc
        self.finished = self._complete()
        self._round = self._open(first_round)

    # --------------------------------------------------------------------------------- state
    def outer_state(self) -> dict[str, Any] | None:
        """The outer optimizer's state (momentum buffers) for a checkpoint; None for ``plain``."""
        return self._outer.state_dict() if self._outer is not None else None

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        """The current global weights (after the last finished round)."""
        with self._lock:
            return dict(self._weights)

    def cursors(self) -> dict[int, dict[str, Any]]:
        return {k: dict(w.cursor) for k, w in self._workers.items()}

    def taken(self, worker: int) -> int:
        """How many of ``worker``'s pushes rounds have taken (a lost worker's replacements count on)."""
        return self._workers[worker].taken

    @property
    def samples_done(self) -> int:
        return self._done_samples

    @property
    def steps_done(self) -> int:
        return self._done_steps

    def _complete(self) -> bool:
        # With tau, every worker takes the same steps: the budget is counted in steps (exactly the
        # one-process loop's for one worker). With round_seconds, in examples seen.
        if self._settings.round_seconds is None:
            return self._done_steps >= self._total_steps
        return self._done_samples >= self._total

    def _open(self, number: int) -> _Round:
        if self._settings.round_seconds is None:
            steps = max(1, round_steps(self._settings.tau, self._total_steps - self._done_steps))
            first_step = self._done_steps
        else:  # at most each worker's share of the examples left: a round's seconds must not overrun the run
            left = self._total - self._done_samples
            steps = max(1, -(-left // (self._batch_size * len(self._workers))))
            # Workers take different steps in a round of seconds: the schedule follows the examples seen.
            first_step = schedule_step(self._done_samples, self._total, self._total_steps)
        return _Round(number=number, steps=steps, first_step=first_step, expected=set(self._workers))

    def worker_lost(self, worker: int) -> None:
        """A worker's Spark task failed or ended: leave it out of the round in progress; a connection of
        that task still open is superseded (its late push is not taken)."""
        with self._lock:
            self._workers[worker].connection += 1
            self._leave(worker)
            self._lock.notify_all()

    def _leave(self, worker: int) -> None:
        current = self._round
        if worker in current.expected and worker not in current.pushes:
            current.expected.discard(worker)
            self._maybe_finish()
        self._lock.notify_all()

    # ------------------------------------------------------------------------------ handler
    def handle(self, conn: Any) -> None:
        """Serve one worker connection: loaded → round message → push → … → stop."""
        worker = self.admit(conn, len(self._workers))
        if worker is None:
            return
        state = self._workers[worker]
        mine = self.connect(conn, worker, state)
        if mine is None:
            return
        with self._lock:
            if state.first_seen is None:
                state.first_seen = time.perf_counter()
        try:
            rows, digest = self.loaded(conn, worker)  # a worker frozen while it loads is lost like any other
            with self._lock:
                if state.connection == mine:  # else superseded while it loaded: _serve tells it to stop
                    if not self.place(worker, rows, digest, state, workers=len(self._workers)):
                        return
                    if worker not in self._round.expected and not any(
                        p.samples for p in self._round.pushes.values()
                    ):
                        self._round.expected.add(worker)  # nobody has finished this round with data: join it
                    self._lock.notify_all()  # the last first load lets the first round begin
            self._serve(conn, worker, mine)
        except TimeoutError:  # frozen: lost like a closed connection (the round goes on without it)
            self.silent(worker, conn, current=state.connection == mine)
        finally:
            with self._lock:
                self.disconnect(worker, mine)
                if not self.finished and state.connection == mine:  # not when a newer one took over
                    self._leave(worker)

    def _serve(self, conn: Any, worker: int, mine: int) -> None:
        synced = False  # whether this connection's worker already holds the cursor the driver has for it
        state = self._workers[worker]
        while True:
            waited = time.perf_counter()
            with self._lock:
                if not self.turn(
                    conn,
                    state,
                    mine,
                    lambda: (
                        worker in self._round.expected
                        and worker not in self._round.pushes
                        # No round before every worker has loaded once: a partition that fails to load
                        # (a row that does not decode) stops the run before any training.
                        and self.loaded_once(len(self._workers))
                    ),
                ):
                    return
                current = self._round
                if not current.dispatched:
                    current.dispatched, current.started = True, time.perf_counter()
                header = {
                    "op": "round",
                    "round": current.number,
                    "steps": current.steps,
                    "first_step": current.first_step,
                    "seconds": self._settings.round_seconds,
                    "waited_s": time.perf_counter() - waited,
                }
                if not synced:  # a new or re-joined worker: where its data stands (it keeps it from now on)
                    header["cursor"] = self._workers[worker].cursor
                payload = self._payload
            sent = self.deliver(conn, header, payload)
            reply, data, received = self.receive(conn)
            moved = sent + received  # both frames, headers included (heartbeats are not the round's)
            if reply.get("op") != "push" or int(reply.get("round", -1)) != current.number:
                raise DeepsparkError(f"worker {worker}: expected its push for round {current.number}")
            push = _Push(
                state=state_from_bytes(data),
                samples=int(reply["samples"]),
                loss_sum=float(reply["loss_sum"]),
                cursor=dict(reply["cursor"]),
                compute_s=float(reply["compute_s"]),
                comm_s=float(reply["comm_s"]),
                wait_s=float(reply["wait_s"]),
            )
            with self._lock:
                if state.connection != mine:
                    continue  # superseded meanwhile: its push is not taken (the loop answers stop)
                if current is not self._round or worker not in current.expected:
                    synced = False  # its push was not taken: it must step from the driver's cursor again
                    continue  # left out of this round meanwhile (it was too slow): take the next one
                current.pushes[worker] = push
                current.bytes += moved
                synced = True
                self._maybe_finish()

    # ------------------------------------------------------------------------------ rounds
    def _maybe_finish(self) -> None:
        current = self._round
        if self.finished or self.error is not None:
            return  # the run stopped (Ctrl-C, a worker that failed for good): a push after it makes no round
        if not current.expected or not current.expected <= set(current.pushes):
            return
        pushes = [current.pushes[k] for k in sorted(current.pushes)]
        samples = sum(p.samples for p in pushes)
        if samples == 0:
            # Only workers with empty partitions are left in it: those with data were lost (a failed or
            # retried task). Their replacements join this round; a worker that fails for good stops the
            # run with its own error (a divergence, say), not with this round's emptiness.
            return
        try:
            averaged = self._average(pushes, samples)
            self._step(averaged)
        except Exception as exc:  # the round can never finish: stop the run rather than wait forever
            self.error = exc
            self._lock.notify_all()
            return
        for k, push in current.pushes.items():
            self._workers[k].cursor = push.cursor
            self._workers[k].taken += 1
        self._done_samples += samples
        self._done_steps += current.steps
        record = RoundRecord(
            round=current.number,
            epoch=self._done_samples / self._rows,
            samples=samples,
            workers=len(pushes),
            train_loss=sum(p.loss_sum for p in pushes) / samples,
            seconds=time.perf_counter() - current.started,
            compute_s=max(p.compute_s for p in pushes),
            comm_s=max(p.comm_s for p in pushes),
            wait_s=min(p.wait_s for p in pushes),
            bytes=current.bytes,
        )
        self.finished = self._complete()
        try:
            self._on_round(record, self._weights)
        except BaseException as exc:  # a failing checkpoint write stops the run, loudly
            self.error = exc
        if not self.finished:
            self._round = self._open(current.number + 1)
        self._lock.notify_all()

    def _average(self, pushes: list[_Push], samples: int) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, current in self._weights.items():
            if not current.is_floating_point():  # counters (BatchNorm's num_batches_tracked): the largest
                out[name] = torch.stack([p.state[name] for p in pushes]).max(dim=0).values
                continue
            total = torch.zeros_like(current, dtype=torch.float64)
            for p in pushes:
                if p.samples:
                    total += p.state[name].to(torch.float64) * p.samples
            out[name] = (total / samples).to(current.dtype)
        return out

    def _step(self, averaged: dict[str, torch.Tensor]) -> None:
        if self._outer is None:
            self._weights = averaged
        else:
            with torch.no_grad():
                for name, param in self._params.items():
                    param.grad = (
                        param.detach() - averaged[name]
                    )  # the outer "gradient": where the average went
            self._outer.step()
            self._outer.zero_grad(set_to_none=True)
            self._weights = {
                k: (self._params[k].detach().clone() if k in self._params else v) for k, v in averaged.items()
            }
        self._payload = state_to_bytes(self._weights)


def schedule_step(samples_done: int, total_samples: int, total_steps: int) -> int:
    """The step of the learning-rate schedule (``total_steps`` long) that ``samples_done`` examples of
    ``total_samples`` reach: where the run stands when workers take different numbers of steps (``async``,
    rounds of seconds). A worker's own step count would run a faster worker past the schedule's end
    (rate 0 under ``cosine``) while a slower one still trained at a high rate."""
    return samples_done * total_steps // max(total_samples, 1)


def round_steps(tau: int, left: int) -> int:
    """The steps of the next round when ``left`` steps remain: ``tau``, except that the last round also
    takes a remainder shorter than ``tau`` (so no round is shorter than ``tau`` unless the whole run is).

    A short round would move the whole weights twice for a few steps: communicating every ``tau`` steps
    at most is what ``tau`` promises, so a run costs at most ``2 / tau`` of all-reduce's bytes at W = 2.
    """
    return left if left < 2 * tau else tau


def log_spilled(who: str, loaded: Mapping[str, Any]) -> None:
    """Say when a worker's rows exceeded its memory budget (its ``loaded`` frame's ``spilled`` bytes)."""
    spilled = int(loaded.get("spilled") or 0)
    if spilled:
        _log.info(
            "%s keeps its %.1f MiB of rows in a file in Spark's local directory, over its memory budget "
            "(worker_memory), and reads them back a batch at a time",
            who,
            spilled / (1 << 20),
        )


# ----------------------------------------------------------------------------------- executor side
@dataclass(frozen=True)
class TaskSpec:
    """What an averaging task needs, copied out of driver objects before the closure is made."""

    host: str
    port: int
    token: str
    spec: dict[str, Any] | None  # the model's spec, or None when ``factory`` builds it
    preprocess: dict[str, Any]
    layout: Any  # FrameLayout
    config: dict[str, Any]  # TrainConfig.to_dict()
    total_steps: int
    threads: int
    seed: int
    device: str = "auto"  # auto | cpu | cuda: see deepspark.spark.task_device
    slow_worker: int | None = None  # benchmark knob: this worker sleeps (slow_factor - 1) x its compute
    slow_factor: float = 1.0
    factory: Callable[[], torch.nn.Module] | None = None  # the user's model factory (pickled by Spark)
    heartbeat_s: float | None = None  # seconds between heartbeats while connected (None: none)
    memory: int | None = None  # bytes of rows a worker keeps in memory (None: spark.task_memory's default)
    # Each worker's rows as a broadcast, when the driver holds them (deepspark.training.shares); else None.
    shares: tuple[Any, ...] | None = None

    def build_model(self) -> torch.nn.Module:
        """The task's own module: from the factory, else from the spec (weights come from the driver)."""
        from deepspark.models import build_model

        if self.factory is not None:
            return self.factory()
        assert self.spec is not None
        return build_model(self.spec)

    def slowdown(self, worker: int, compute_s: float) -> None:
        """Make ``worker`` ``slow_factor`` times slower than its peers (benchmarks and tests only)."""
        if self.slow_worker == worker and self.slow_factor > 1:
            time.sleep((self.slow_factor - 1) * compute_s)

    def read(
        self, batches: Iterator[Any], device: torch.device, worker: int
    ) -> tuple[Examples, torch.Tensor, str, int]:
        """Worker ``worker``'s rows as examples and int64 labels on ``device``, their digest, and the bytes
        of rows it keeps in a file (0: all in memory; see :func:`deepspark.spark.task_memory`): its
        partition of the DataFrame (``batches``), or its broadcast share of rows the driver holds."""
        from deepspark.models import Preprocess
        from deepspark.spark import task_memory
        from deepspark.training.frame import RowFile, read_partition
        from deepspark.training.loop import Examples
        from deepspark.training.shares import read_share

        if self.shares is not None:
            part = read_share(self.shares, batches, worker)
        else:
            memory, spill_dir = task_memory(self.memory)
            part = read_partition(batches, self.layout, memory=memory, spill_dir=spill_dir)
        preprocess = Preprocess.from_dict(self.preprocess) if self.layout.pixels else None
        examples = Examples.of(part.features, preprocess, device)
        spilled = part.features.nbytes if isinstance(part.features, RowFile) else 0
        return examples, torch.from_numpy(part.labels).to(device), part.digest, spilled


@dataclass(frozen=True)
class LoadedWorker:
    """A worker task's partition as tensors, its model and training settings (shared by strategies)."""

    worker: int
    inputs: Examples
    targets: torch.Tensor
    config: Any  # TrainConfig
    model: torch.nn.Module
    rate: Callable[[int], float] | None
    slowdown: Callable[[int, float], None]

    def take_steps(
        self,
        optimizer: torch.optim.Optimizer,
        cursor: Any,
        steps: int,
        *,
        first_step: int,
        deadline: float | None = None,
    ) -> Any:
        """Up to ``steps`` steps from ``cursor`` (a ``StepStats``; None for an empty partition), the first
        at step ``first_step`` of the learning-rate schedule (the driver's), then the benchmark's
        straggler delay if this worker is the slowed one."""
        from deepspark.training.loop import run_steps

        started = time.perf_counter()
        stats = (
            run_steps(
                self.model,
                optimizer,
                self.inputs,
                self.targets,
                cursor,
                steps,
                augment=self.config.augment,
                learning_rate=self.rate,
                first_step=first_step,
                deadline=deadline,
            )
            if len(self.targets)
            else None
        )
        self.slowdown(self.worker, time.perf_counter() - started)
        return stats


@contextlib.contextmanager
def load_worker(task: TaskSpec, batches: Iterator[Any]) -> Iterator[tuple[wire.Connection, LoadedWorker]]:
    """Inside a Spark task: connect to the driver and start the heartbeat, then read the partition,
    preprocess it and build the model, and tell the driver the rows read (a ``loaded`` frame).

    Connected first, so that the driver watches the load too: a partition can take long to read, and a
    worker that froze while reading it (its executor alive) would otherwise hold the others for good
    (``average`` at its first round, ``async`` at the staleness bound). The hello carries what the task
    knows before reading (the driver's log names its pid at once); the rows come with ``loaded``."""
    from pyspark import TaskContext

    from deepspark.spark import assigned_gpus, limit_task_threads, task_device
    from deepspark.training.loop import TrainConfig, cosine_rate

    ctx = TaskContext.get()
    worker = ctx.partitionId() if ctx is not None else 0
    limit_task_threads(task.threads, ctx)
    device = task_device(task.device, ctx)
    hello = {
        "worker": worker,
        "attempt": ctx.attemptNumber() if ctx else 0,
        "stage": ctx.stageId() if ctx else None,  # a speculative copy of this task stands by (connect)
        "pid": os.getpid(),  # named in the driver's log, to find a frozen worker (py-spy dump --pid)
        "device": str(device),
        "gpus": assigned_gpus(ctx),
    }
    with (
        wire.connect(task.host, task.port, token=task.token, hello=hello) as conn,
        wire.Heartbeat(conn, task.heartbeat_s),
    ):
        inputs, targets, digest, spilled = task.read(batches, device, worker)
        config = TrainConfig.from_dict(task.config)
        unit = LoadedWorker(
            worker=worker,
            inputs=inputs,
            targets=targets,
            config=config,
            model=task.build_model().to(device),
            rate=cosine_rate(config.learning_rate, task.total_steps)
            if config.lr_schedule == "cosine"
            else None,
            slowdown=task.slowdown,
        )
        conn.send({"op": LOADED, "rows": len(targets), "digest": digest, "spilled": spilled})
        yield conn, unit


def average_task(task: TaskSpec, batches: Iterator[Any]) -> Iterator[Any]:
    """Body of one worker's Spark task (``mapInArrow``): connect, load the partition, serve rounds."""
    import pyarrow as pa

    from deepspark.training.loop import DataCursor, make_optimizer

    rounds = 0
    cursor: DataCursor | None = None
    with load_worker(task, batches) as (conn, unit):
        worker, config, model = unit.worker, unit.config, unit.model
        while True:
            waited = time.perf_counter()
            header, payload = conn.recv()
            if header.get("op") == "stop":
                break
            received = time.perf_counter()
            model.load_state_dict(state_from_bytes(payload))
            if "cursor" in header:  # the driver's record; otherwise this worker's own, as it pushed it
                cursor = DataCursor.from_state(header["cursor"])
            if cursor is None:
                raise DeepsparkError("the driver sent no data cursor with a worker's first round")
            torch.manual_seed(task.seed * 1_000_003 + int(header["round"]) * 1009 + worker)
            optimizer = make_optimizer(model, config)  # fresh every round: see the module docstring
            loaded = time.perf_counter()
            seconds = header.get("seconds")
            stats = unit.take_steps(
                optimizer,
                cursor,
                int(header["steps"]),
                first_step=int(header["first_step"]),
                deadline=None if seconds is None else loaded + float(seconds),
            )
            computed = time.perf_counter()
            data = state_to_bytes(model.state_dict())
            conn.send(
                {
                    "op": "push",
                    "round": header["round"],
                    "samples": stats.samples if stats else 0,
                    "loss_sum": stats.loss_sum if stats else 0.0,
                    "cursor": cursor.state(),
                    "compute_s": computed - loaded,
                    "comm_s": (received - waited - float(header.get("waited_s", 0.0)))
                    + (loaded - received)
                    + (time.perf_counter() - computed),
                    "wait_s": float(header.get("waited_s", 0.0)),
                },
                data,
            )
            rounds += 1
    yield pa.RecordBatch.from_pydict(
        {"worker": pa.array([worker], pa.int64()), "rounds": pa.array([rounds], pa.int64())}
    )


def check_settings(settings: AverageSettings, workers: int) -> None:
    if settings.outer == "nesterov" and workers < 1:
        raise ConfigError("outer 'nesterov' needs at least one worker")
