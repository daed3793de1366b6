"""Asynchronous SGD with a parameter server on the driver, bounded by stale-synchronous parallel (SSP).

Each worker loops: pull the global weights (and their version), take ``tau`` local steps on its own
partition, push the *delta* (new − pulled weights) tagged with the version it pulled. The driver
(:class:`ParameterServer`, a :class:`deepspark.wire.Server` handler) applies every push at once, without
waiting for the others, and bumps the version. The executor side is :func:`async_task`.

Choices (docs/training.md):

- Scaling: the server applies ``w += delta / workers``, counting the workers with data: one whose
  partition is empty (its loaded frame says 0 rows) trains on nothing, so its pushes change nothing
  and it is not counted (as its weight in ``average`` is 0; counted, it halved every step of the one
  worker with data beside it); one that has not loaded yet is. When every worker pulls the same weights,
  one push from each is then exactly one round of model averaging, so the learning rates that suit
  ``average`` suit ``async`` too, and a stale delta moves the weights by a ``1/workers`` share only. The
  scale stays while a worker is lost, so the step size does not jump. Integer buffers (BatchNorm's
  counters) are added unscaled. Floating buffers (BatchNorm's running mean and variance) are pushed as
  values, not deltas, and blended: ``b = (1 - 1/workers) b + pushed / workers``. A blend stays between
  values that were seen, where a stale delta (a variance falling fast from the one pulled) can drive a
  running variance below zero.
- ``tau`` (steps between pushes) is :attr:`AverageSettings.tau`; ``fit`` defaults it to 1 for ``async``
  (classic asynchronous SGD: push after every step). The worker keeps its inner optimizer (momentum
  buffers) from one pull to the next, since with ``tau = 1`` a fresh optimizer would be plain SGD; a
  replacement or resumed task starts it afresh.
- Stale-synchronous bound: a worker's *clock* is the number of pushes it has made. It may pull only while
  ``its clock − min(clocks of live workers) <= staleness``; otherwise its pull waits on the server's
  condition until the slow one pushes or is declared dead. Every worker counts as live from the start
  (SSP: a task still loading its data holds the others back), until its connection closes, its Spark
  job fails (:meth:`ParameterServer.worker_lost`) or it is silent past the heartbeat timeout (tasks
  connect before they load, so one frozen while loading is found too); a dead worker leaves the minimum
  at once, and its replacement rejoins at the current minimum clock once loaded. A worker whose
  partition is empty (its loaded frame says 0 rows) pulls only while a worker with data is live (or
  not loaded yet): alone, nothing held its clock back, and its empty pushes ran as fast as the loop
  went until the replacement arrived.
- One connection per worker counts: the newest. A connection that a newer one of the same worker has
  replaced, or whose Spark job failed meanwhile (a task that Spark has not killed yet), is told to stop and
  its push in flight is not applied: the replacement takes those batches again from the driver's cursor,
  so no batch is applied twice.
- Learning-rate schedule: a pull carries the schedule's step that the examples pushed so far reach
  (:func:`deepspark.training.average.schedule_step`), not the worker's own step count: a faster worker
  takes more of the budget, and by its own count it would step past the schedule's end (rate 0 under
  ``cosine``) while a slower one still trained at a high rate.
- Budget: training stops when the examples pushed reach ``epochs × rows``. A pull is granted only while
  the examples already pushed plus those claimed by pulls in flight fall short of it (the last pulls get
  fewer steps), so the run takes the requested epochs and no push is thrown away; a lost worker's claim
  is released.
- History: a *round* is ``workers`` consecutive pushes (one per worker when all keep pace), which makes
  the row count comparable with ``average`` at the same ``tau``. Each row records the largest staleness
  of its pushes (versions applied between a push's pull and the push) and the largest clock gap at which
  a pull was granted (never above ``staleness``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from deepspark.errors import DeepsparkError
from deepspark.models.checkpoint import state_from_bytes, state_to_bytes
from deepspark.training.average import RoundRecord, ServerState, TaskSpec, load_worker, schedule_step

__all__ = ["AsyncRecord", "ParameterServer", "async_task"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AsyncRecord(RoundRecord):
    """One history row of the asynchronous strategy: ``workers`` pushes, and how stale they were."""

    staleness: int = 0  # the largest (version at push − version pulled) among the row's pushes
    clock_gap: int = 0  # the largest (own clock − min live clock) at which a pull was granted


@dataclass
class _Worker:
    cursor: dict[str, Any]
    clock: int = 0
    live: bool = True  # counts in the minimum clock (every worker does until it is lost)
    connection: int = 0  # the number of its current connection; any other is superseded
    claimed: int = 0  # examples its pull in flight may push (0 when none is)
    rows: int | None = None  # its partition's rows, from its loaded frame (None until it has loaded)
    taken: int = 0  # its pushes applied, in this process


@dataclass
class _Row:
    pushes: int = 0
    samples: int = 0
    loss_sum: float = 0.0
    bytes: int = 0
    staleness: int = 0
    clock_gap: int = 0
    workers: set[int] = field(default_factory=set)
    compute_s: dict[int, float] = field(default_factory=dict)
    comm_s: dict[int, float] = field(default_factory=dict)
    wait_s: dict[int, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    def add(self, table: dict[int, float], worker: int, seconds: float) -> None:
        table[worker] = table.get(worker, 0.0) + seconds


class ParameterServer(ServerState):
    """The driver's side of asynchronous SGD: serves pulls, applies pushed deltas, enforces the SSP bound.

    ``on_round(record, weights)`` runs every ``workers`` pushes, and after the last one, under the
    server's lock (evaluation, history and checkpoints live there; pushes wait meanwhile). All state
    changes happen under one condition; one handler thread serves each connected worker.
    """

    def __init__(
        self,
        *,
        weights: Mapping[str, torch.Tensor],
        parameters: Collection[str],
        workers: int,
        staleness: int,
        tau: int,
        batch_size: int,
        total_samples: int,
        total_steps: int,
        rows: int,
        digest: str = "",  # of the rows counted (FrameLayout.digest)
        row_digests: Mapping[int, str] | None = None,  # each worker's, from a resumed checkpoint
        new_cursor: Callable[[int, int], dict[str, Any]],
        on_round: Callable[[AsyncRecord, Mapping[str, torch.Tensor]], None],
        cursors: Mapping[int, Mapping[str, Any]] | None = None,
        clocks: Mapping[int, int] | None = None,
        version: int = 0,
        samples_done: int = 0,
        first_round: int = 0,
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
        self._parameters = frozenset(parameters)  # pushed as deltas; floating buffers as values
        self._payload, self._payload_version = b"", -1
        self._staleness = staleness
        self._tau = tau
        self._batch_size = batch_size
        self._total = total_samples
        self._total_steps = total_steps  # the learning-rate schedule's length
        self._on_round = on_round
        self._workers = {
            k: _Worker(cursor=dict((cursors or {}).get(k, {})), clock=int((clocks or {}).get(k, 0)))
            for k in range(workers)
        }
        self._version = version
        self._done_samples = samples_done
        self._round_number = first_round
        self._row = _Row()
        self.max_staleness = 0
        self.max_clock_gap = 0
        self.finished = samples_done >= total_samples

    # ----------------------------------------------------------------------------------- state
    @property
    def weights(self) -> dict[str, torch.Tensor]:
        """A copy of the current global weights."""
        with self._lock:
            return {k: v.clone() for k, v in self._weights.items()}

    @property
    def version(self) -> int:
        return self._version

    @property
    def samples_done(self) -> int:
        return self._done_samples

    def cursors(self) -> dict[int, dict[str, Any]]:
        return {k: dict(w.cursor) for k, w in self._workers.items()}

    def clocks(self) -> dict[int, int]:
        return {k: w.clock for k, w in self._workers.items()}

    def taken(self, worker: int) -> int:
        """How many of ``worker``'s pushes were applied (a lost worker's replacements count on)."""
        return self._workers[worker].taken

    def checkpoint_state(self) -> dict[str, Any]:
        """What a resume needs besides the weights (call under ``on_round``, i.e. under the lock)."""
        return {
            "round": self._round_number - 1,
            "samples_done": self._done_samples,
            "steps_done": sum(self.clocks().values()),
            "version": self._version,
            "cursors": {str(k): v for k, v in self.cursors().items()},
            "clocks": {str(k): v for k, v in self.clocks().items()},
            "row_digests": {str(k): v for k, v in self.row_digests().items()},
        }

    def worker_lost(self, worker: int) -> None:
        """A worker's Spark task failed: take it out of the minimum clock and release its claim now; a
        connection of that task still open is superseded (its late push is not applied)."""
        with self._lock:
            self._workers[worker].connection += 1
            self._drop(worker)

    def _drop(self, worker: int) -> None:
        state = self._workers[worker]
        state.live, state.claimed = False, 0
        self._lock.notify_all()

    def _min_clock(self) -> int | None:
        clocks = [w.clock for w in self._workers.values() if w.live]
        return min(clocks) if clocks else None

    def _gap(self, worker: int) -> int:
        low = self._min_clock()
        return 0 if low is None else self._workers[worker].clock - low

    def _claimed(self) -> int:
        return sum(w.claimed for w in self._workers.values())

    # --------------------------------------------------------------------------------- handler
    def handle(self, conn: Any) -> None:
        """Serve one worker connection: loaded → pull → push → … → stop."""
        worker = self.admit(conn, len(self._workers))
        if worker is None:
            return
        state = self._workers[worker]
        mine = self.connect(conn, worker, state)
        if mine is None:
            return
        with self._lock:
            state.claimed = 0  # an earlier connection's pull in flight no longer counts
        try:
            rows, digest = self.loaded(conn, worker)  # a worker frozen while it loads is lost like any other
            with self._lock:
                if state.connection == mine:  # else superseded while it loaded: _serve tells it to stop
                    if not state.live:  # a replacement: rejoin at the slowest live worker's clock
                        low = self._min_clock()
                        state.clock = state.clock if low is None else low
                        state.live = True
                    state.rows = rows
                    if not self.place(worker, rows, digest, state, workers=len(self._workers)):
                        return
                    self._lock.notify_all()
            self._serve(conn, worker, mine)
        except TimeoutError:  # frozen: lost like a closed connection (the bound stops waiting for it)
            self.silent(worker, conn, current=state.connection == mine)
        except (ConnectionError, OSError) as exc:  # its task died: the bound no longer waits for it
            _log.warning("async worker %d: connection lost (%s)", worker, exc)
        finally:
            with self._lock:
                self.disconnect(worker, mine)
                if state.connection == mine:  # its current connection ended (not a superseded one)
                    self._drop(worker)

    def _may_pull(self, worker: int) -> bool:
        return (
            self._gap(worker) <= self._staleness
            and self._done_samples + self._claimed() < self._total
            and (self._workers[worker].rows != 0 or self._data_live())
        )

    def _data_live(self) -> bool:
        # A worker that has not loaded yet may have data; a lost one is not live.
        return any(w.live and w.rows != 0 for w in self._workers.values())

    def _serve(self, conn: Any, worker: int, mine: int) -> None:
        state = self._workers[worker]
        first = True
        while True:
            waited = time.perf_counter()
            with self._lock:
                if not self.turn(conn, state, mine, lambda: self._may_pull(worker)):
                    return
                wait_s = time.perf_counter() - waited
                gap = self._gap(worker)
                left = self._total - self._done_samples - self._claimed()
                steps = max(1, min(self._tau, -(-left // self._batch_size)))
                state.claimed = steps * self._batch_size
                self._row.clock_gap = max(self._row.clock_gap, gap)
                self.max_clock_gap = max(self.max_clock_gap, gap)
                pulled = self._version
                header: dict[str, Any] = {
                    "op": "pull",
                    "version": pulled,
                    "steps": steps,
                    "first_step": schedule_step(self._done_samples, self._total, self._total_steps),
                    "clock": state.clock,
                }
                if first:
                    header["cursor"] = state.cursor
                payload = self._snapshot()
            first = False
            sent = self.deliver(conn, header, payload)
            reply, data, received = self.receive(conn)
            if reply.get("op") != "push" or int(reply.get("version", -1)) != pulled:
                raise DeepsparkError(f"worker {worker}: expected its push of version {pulled}")
            delta = state_from_bytes(data)
            with self._lock:
                if state.connection != mine:
                    continue  # superseded meanwhile: not applied (the loop answers stop)
                state.claimed = 0
                if self.finished or self.error is not None:
                    continue  # the budget was met meanwhile: the loop answers stop
                self._apply(delta, int(reply["samples"]))
                row = self._row
                row.pushes += 1
                row.samples += int(reply["samples"])
                row.loss_sum += float(reply["loss_sum"])
                row.bytes += sent + received  # heartbeats are not the push's
                row.staleness = max(row.staleness, self._version - 1 - pulled)
                self.max_staleness = max(self.max_staleness, self._version - 1 - pulled)
                row.workers.add(worker)
                row.add(row.compute_s, worker, float(reply["compute_s"]))
                row.add(row.comm_s, worker, max(0.0, float(reply["comm_s"]) - wait_s))
                row.add(row.wait_s, worker, wait_s)
                state.cursor = dict(reply["cursor"])
                state.clock += 1
                state.taken += 1
                self._done_samples += int(reply["samples"])
                self.finished = self._done_samples >= self._total
                if row.pushes >= len(self._workers) or self.finished:
                    self._close_row()
                self._lock.notify_all()

    # ----------------------------------------------------------------------------------- updates
    def _snapshot(self) -> bytes:
        if self._payload_version != self._version:
            self._payload, self._payload_version = state_to_bytes(self._weights), self._version
        return self._payload

    def _apply(self, pushed: Mapping[str, torch.Tensor], samples: int) -> None:
        """Apply a push of ``samples`` examples; one of none (an empty partition's) holds the weights it
        pulled and changes nothing (blended in, its stale buffers would drag the others' back)."""
        if samples:
            scale = 1.0 / max(1, sum(1 for w in self._workers.values() if w.rows != 0))  # workers with data
            with torch.no_grad():
                for name, current in self._weights.items():
                    value = pushed[name].to(current.dtype)
                    if not current.is_floating_point():
                        current.add_(value)  # a counter's delta
                    elif name in self._parameters:
                        current.add_(value * scale)
                    else:
                        current.mul_(1 - scale).add_(value * scale)  # a buffer's value, blended
        self._version += 1

    def close_row(self) -> None:
        """Record the pushes since the last row as a (short) row of their own, so that the server's
        state is that of its last row: a run stopping early calls it before its last checkpoint."""
        with self._lock:
            if self._row.pushes and not self.finished:
                self._close_row()

    def _close_row(self) -> None:
        row = self._row
        record = AsyncRecord(
            round=self._round_number,
            epoch=self._done_samples / self._rows,
            samples=row.samples,
            workers=len(row.workers),
            train_loss=row.loss_sum / row.samples if row.samples else math.nan,  # no examples: no loss
            seconds=time.perf_counter() - row.started,
            compute_s=max(row.compute_s.values()),
            comm_s=max(row.comm_s.values()),
            wait_s=max(row.wait_s.values()),
            bytes=row.bytes,
            staleness=row.staleness,
            clock_gap=row.clock_gap,
        )
        self._round_number += 1
        self._row = _Row()
        try:
            self._on_round(record, self._weights)
        except BaseException as exc:  # a failing checkpoint write stops the run, loudly
            self.error = exc


# ----------------------------------------------------------------------------------- executor side
def async_task(task: TaskSpec, batches: Iterator[Any]) -> Iterator[Any]:
    """Body of one worker's Spark task (``mapInArrow``): connect, load the partition, pull, step, push."""
    import pyarrow as pa

    from deepspark.training.loop import DataCursor, make_optimizer

    cursor: DataCursor | None = None
    pushes = 0
    with load_worker(task, batches) as (conn, loaded):
        worker, model, config = loaded.worker, loaded.model, loaded.config
        optimizer = make_optimizer(model, config)  # kept across pulls: see the module docstring
        parameters = {name for name, _ in model.named_parameters()}
        while True:
            asked = time.perf_counter()
            header, payload = conn.recv()
            if header.get("op") == "stop":
                break
            pulled = state_from_bytes(payload)
            model.load_state_dict(pulled)  # in place: the optimizer's parameters stay the same tensors
            if "cursor" in header:
                cursor = DataCursor.from_state(header["cursor"])
            if cursor is None:
                raise DeepsparkError("the parameter server sent no data cursor with the first pull")
            torch.manual_seed(task.seed * 1_000_003 + int(header["clock"]) * 1009 + worker)
            ready = time.perf_counter()
            stats = loaded.take_steps(
                optimizer, cursor, int(header["steps"]), first_step=int(header["first_step"])
            )
            computed = time.perf_counter()
            # Parameters and counters as deltas, floating buffers as values (the module docstring says why).
            pushed = {
                k: v.detach().cpu() - pulled[k]
                if k in parameters or not v.is_floating_point()
                else v.detach().cpu()
                for k, v in model.state_dict().items()
            }
            data = state_to_bytes(pushed)
            conn.send(
                {
                    "op": "push",
                    "version": header["version"],
                    "samples": stats.samples if stats else 0,
                    "loss_sum": stats.loss_sum if stats else 0.0,
                    "cursor": cursor.state(),
                    "compute_s": computed - ready,
                    # pull (including any wait for the bound, which the server subtracts) and push
                    "comm_s": (computed - asked) - (computed - ready) + (time.perf_counter() - computed),
                },
                data,
            )
            pushes += 1
    yield pa.RecordBatch.from_pydict(
        {"worker": pa.array([worker], pa.int64()), "rounds": pa.array([pushes], pa.int64())}
    )
