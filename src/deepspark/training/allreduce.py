"""Synchronous data-parallel training: every step, the gradients of all workers are all-reduced.

One Spark **barrier** job runs ``workers`` tasks at once over the keyed frame repartitioned to the
worker count (or, for a dataset the driver holds, over ``spark.range(workers)``). Each task reads its
rows into tensors (its partition's Arrow batches, or its broadcast share: ``TaskSpec.read``),
joins a ``torch.distributed`` gang (rank 0 chooses a port and shares ``host:port`` with
``BarrierTaskContext.allGather``; gloo on CPU, NCCL where the task holds a GPU), and loads the start
state (weights, optimizer state, its own :class:`DataCursor`) from the driver's
:class:`deepspark.wire.Server`. The driver side is :class:`GangServer`; the executor side is
:func:`allreduce_task`.

Choices:

- **Weighted by examples.** Each rank packs ``n_k * grad`` (of its mean loss on ``n_k`` examples) into
  one flat float buffer per step, together with ``n_k`` and its summed loss; one ``all_reduce(SUM)``
  and a division by ``sum n_k`` give every rank the gradient of the mean loss over the union of the
  batches. Two workers thus take exactly one step on the union batch, and an empty (or exhausted-early)
  partition contributes zero examples instead of skewing the mean. Floating buffers (BatchNorm running
  statistics) ride in the same buffer, averaged by examples; integral buffers (``num_batches_tracked``)
  take the value the non-empty ranks share. BatchNorm still normalises by each rank's own batch
  (like DistributedDataParallel without SyncBatchNorm), so "one step on the union" is exact only for
  models without it.
- **Same steps everywhere.** ``total_steps = epochs * ceil(ceil(rows / workers) / batch_size)``; rank
  ``k`` walks ``DataCursor(n_k, batch_size, seed + k * 1_000_003)``, so a smaller partition simply
  starts its next epoch sooner, and the history's ``epoch`` is examples seen over rows (as for the
  other strategies), not steps over an even share's steps. The optimizer (``make_optimizer``) lives
  for the whole run: its state is part of every checkpoint.
- **Identical replicas, checked.** Every rank hashes its parameters and buffers after every step into a
  running SHA-256 chain (on a GPU: once per round, to spare a device-to-host copy per step); the chains
  are gathered at each round's end and the driver stops the run if any two differ.
- **Rounds.** Every ``max(1, steps_per_epoch // 4)`` steps (the last round is trimmed) rank 0 sends
  the driver one frame: step count, examples, summed loss, compute and communication seconds, every
  rank's cursor (gathered as JSON strings with two torch collectives: nothing is pickled) and the weights plus
  optimizer state as safetensors bytes. The driver writes the history row and the checkpoint.
- **Bytes.** A round's ``bytes`` is the all-reduce traffic under the ring model,
  ``2 * (W - 1) / W * buffer_bytes`` sent per worker per step (``buffer_bytes`` = 4 bytes times
  parameters + floating buffers + integral buffers + 3 counters), summed over the ``W`` workers, plus
  the progress frame rank 0 sent to the driver. It is what the ring algorithm sends, computed, not
  measured on the wire (gloo picks other algorithms for small buffers).
- **Failure.** A barrier stage cannot lose one task: when any task fails, Spark fails them all. The
  driver then restarts the gang from the last reported round (written to the checkpoint first), up to
  ``max_restarts`` times; a NaN/inf loss (every rank sees the same reduced loss) or diverged replicas
  stop the run without a restart. A rank that freezes while its executor lives (a deadlock, a hung
  GPU kernel) fails no task: the others wait in their collectives for torch.distributed's 30 minutes.
  So every rank connects to the driver first and sends heartbeats until it ends, its load and the
  rendezvous included (a rank frozen there holds the others in ``allGather`` or
  ``init_process_group``); one silent past ``heartbeat_timeout`` has the driver cancel the gang's job
  (Spark kills its tasks, the frozen Python worker included) and restart the gang as after any other
  failure.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from deepspark import wire
from deepspark.errors import DeepsparkError, DivergenceError, RunError
from deepspark.models.checkpoint import state_from_bytes, state_to_bytes
from deepspark.spark import device_label
from deepspark.training.average import LOADED, RoundRecord, TaskSpec, log_spilled
from deepspark.training.frame import count_disagrees, rows_changed

if TYPE_CHECKING:
    from deepspark.training.loop import Examples

__all__ = [
    "GangReport",
    "GangServer",
    "GangSpec",
    "allreduce_task",
    "optimizer_from_tensors",
    "optimizer_to_tensors",
]

_log = logging.getLogger(__name__)

_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
MODEL_PREFIX, OPTIM_PREFIX = "model.", "optim."


# ------------------------------------------------------------------------------- shared helpers
def optimizer_to_tensors(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer ``state_dict`` as ``optim.<index>.<name>`` tensors plus a JSON-ready rest.

    The rest holds the param groups and any non-tensor per-parameter values, so the whole state travels
    as safetensors + JSON (never pickle).
    """
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{OPTIM_PREFIX}{index}.{name}"] = value.detach().contiguous().cpu()
            elif value is not None:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_tensors(tensors: Mapping[str, torch.Tensor], rest: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`optimizer_to_tensors`: a ``state_dict`` for ``Optimizer.load_state_dict``."""
    per: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith(OPTIM_PREFIX):
            index, name = key[len(OPTIM_PREFIX) :].split(".", 1)
            per.setdefault(int(index), {})[name] = value
    for index, values in dict(rest.get("scalars") or {}).items():
        per.setdefault(int(index), {}).update(values)
    return {"state": per, "param_groups": list(rest["param_groups"])}


# ------------------------------------------------------------------------------------ driver side
@dataclass(frozen=True)
class GangReport(RoundRecord):
    """One finished round as rank 0 reported it: a history row (with the gang ``attempt`` that ran it)
    and the steps done so far."""

    attempt: int = 0
    steps_done: int = 0


class GangServer:
    """The driver's side: hands each rank the start state, receives rank 0's round reports.

    It always holds the state of the last reported round (``payload``: weights and optimizer tensors as
    safetensors bytes; ``optimizer``: the JSON rest; ``cursors``; ``steps_done``), which is what a
    checkpoint saves and what a restarted gang starts from. ``on_round(report, server)`` runs in the
    handler thread of rank 0's connection, under the server's lock, after the state was updated.
    """

    def __init__(
        self,
        *,
        payload: bytes,
        optimizer: Mapping[str, Any] | None,
        cursors: Mapping[int, Mapping[str, Any] | None],
        steps_done: int,
        samples_done: int,
        total_steps: int,
        rows: int,
        workers: int,
        on_round: Callable[[GangReport, GangServer], None],
        digest: str = "",  # of the rows counted (FrameLayout.digest); "" when not taken
        row_digests: Mapping[int, str] | None = None,  # each rank's, from a resumed checkpoint
        heartbeat_timeout: float | None = None,
    ) -> None:
        self._lock = threading.Condition()
        self.payload = payload
        self.optimizer = dict(optimizer) if optimizer else None
        self.cursors: dict[int, dict[str, Any] | None] = {
            k: (dict(v) if v else None) for k, v in cursors.items()
        }
        self.steps_done = steps_done
        self.samples_done = samples_done
        self.round_done = -1  # the last round reported in this process (-1: none yet)
        self._total_steps = total_steps
        self._rows = rows
        self._workers = workers
        self._on_round = on_round
        self.attempt = 0
        self.fatal: BaseException | None = None
        self.finished = steps_done >= total_steps
        self._reporting = 0  # live rank 0 connections
        self._heartbeat_timeout = heartbeat_timeout
        self.lost: str | None = None  # a rank of this attempt silent past the heartbeat timeout
        self._rows_read: dict[int, int] = {}  # rank -> the rows its task of this attempt read
        self._digest = digest
        # rank -> the digest of the rows its first task read: in this session or, on a resume, the run's
        # first (row_digests, from the checkpoint), which the rank's data position was made for.
        self.row_digests: dict[int, str] = dict(row_digests or {})
        self.devices: dict[int, str] = {}  # rank -> the device it trains on (from its hello)

    def hold(self) -> threading.Condition:
        """The server's (reentrant) lock: hold it to read or checkpoint a consistent state."""
        return self._lock

    def begin_attempt(self, attempt: int) -> None:
        """Serve gang ``attempt`` from now on; tasks and reports of earlier attempts are ignored."""
        with self._lock:
            self.attempt = attempt
            self.lost = None
            self._rows_read = {}

    def settle(self, timeout: float) -> None:
        """Wait (up to ``timeout`` seconds) until no rank 0 connection is being served."""
        with self._lock:
            self._lock.wait_for(lambda: self._reporting == 0, timeout=timeout)

    def fail(self, error: BaseException) -> None:
        with self._lock:
            if self.fatal is None:
                self.fatal = error
            self._lock.notify_all()

    def handle(self, conn: Any) -> None:
        rank, attempt = int(conn.hello.get("rank", -1)), int(conn.hello.get("attempt", -1))
        with self._lock:
            if not 0 <= rank < self._workers or attempt != self.attempt:
                _log.warning("ignoring a gang task (rank %r, attempt %r): not of this attempt", rank, attempt)
                return
            device, gpus = str(conn.hello.get("device", "cpu")), list(conn.hello.get("gpus") or [])
            self.devices[rank] = device_label(device, gpus)
        _log.info(
            "gang rank %d of attempt %d connected from %s (pid %s)",
            rank,
            attempt,
            conn.peer,
            conn.hello.get("pid", "?"),
        )
        reporting = False
        try:
            # The rank connected before it read its partition and joined the gang (the rendezvous); it
            # beats meanwhile, so a silent one froze there and one that beats is waited for.
            loaded, _, _ = wire.receive(conn, self._heartbeat_timeout)
            if loaded.get("op") != LOADED:
                raise DeepsparkError(
                    f"gang rank {rank}: expected its {LOADED!r} frame, got {loaded.get('op')!r}"
                )
            log_spilled(f"gang rank {rank}", loaded)
            with self._lock:
                if attempt != self.attempt:
                    return  # its gang failed meanwhile (its job is being cancelled)
                header = {
                    "op": "start",
                    "step": self.steps_done,
                    "cursor": self.cursors.get(rank),
                    "optimizer": self.optimizer,
                }
                payload = self.payload
                self._rows_read[rank] = int(loaded["rows"])
                digest = str(loaded["digest"])
                first = self.row_digests.setdefault(rank, digest)
                error: str | None = None
                if digest != first:
                    error = f"gang rank {rank}'s task read other rows than its first task did ({loaded['rows']} rows)"
                elif len(self._rows_read) == self._workers:
                    error = count_disagrees(
                        self._rows_read,
                        self.row_digests,
                        rows=self._rows,
                        digest=self._digest,
                        who="the gang's ranks",
                    )
                if error is not None:
                    self.fail(rows_changed(error))
                    return
                if rank == 0:
                    self._reporting += 1
                    reporting = True
            wire.deliver(conn, header, payload, self._heartbeat_timeout)  # a frozen rank reads nothing
            if rank == 0:
                self._serve_reports(conn, attempt)
                with self._lock:
                    self._reporting -= 1
                    reporting = False
                    self._lock.notify_all()
            else:
                self._watch(conn, rank)
            self._until_closed(conn, rank)
        except TimeoutError:
            self._silent(conn, rank, attempt)
        finally:
            if reporting:
                with self._lock:
                    self._reporting -= 1
                    self._lock.notify_all()

    def _watch(self, conn: Any, rank: int) -> None:
        """A rank other than 0 sends only heartbeats while it trains, then ``done``."""
        reply, _, _ = wire.receive(conn, self._heartbeat_timeout)
        if reply.get("op") != "done":
            raise DeepsparkError(f"gang rank {rank}: expected heartbeats and done, got {reply.get('op')!r}")

    def _until_closed(self, conn: Any, rank: int) -> None:
        """After its done, a rank beats on until its task leaves the gang (the process group destroyed,
        the connection closed): one frozen there (in ``destroy_process_group``, say) would hold the
        barrier job, and ``fit`` waiting on it, for good. Its silence raises TimeoutError."""
        try:
            reply, _, _ = wire.receive(conn, self._heartbeat_timeout)
        except wire.PeerClosed:
            return
        raise DeepsparkError(f"gang rank {rank}: expected heartbeats after done, got {reply.get('op')!r}")

    def _silent(self, conn: Any, rank: int, attempt: int) -> None:
        """A rank of ``attempt`` was silent past the heartbeat timeout: frozen (a deadlock, a hung GPU
        kernel) while its executor lives, the gang waits in its collectives for good. Mark the attempt
        lost, so that the driver cancels its job and restarts the gang from the last round. Also once
        the gang has finished (a rank frozen before its done): its job would never end, and the driver
        takes the finished run without a restart."""
        with self._lock:
            if attempt != self.attempt or self.fatal is not None or self.lost is not None:
                return
            self.lost = (
                f"gang rank {rank} (pid {conn.hello.get('pid', '?')} on {conn.peer}) silent for "
                f"{self._heartbeat_timeout:g} s (heartbeat_timeout): frozen"
            )
            _log.warning("%s; cancelling the gang's Spark job", self.lost)
            self._lock.notify_all()

    def _serve_reports(self, conn: Any, attempt: int) -> None:
        while True:
            reply, data, frame_bytes = wire.receive(conn, self._heartbeat_timeout)
            op = reply.get("op")
            if op == "done":
                conn.send({"op": "ok"})
                return
            if op == "error":
                kind = DivergenceError if reply.get("kind") == "DivergenceError" else DeepsparkError
                error = (
                    DivergenceError(str(reply["message"]), epoch=int(reply["epoch"]), step=int(reply["step"]))
                    if kind is DivergenceError
                    else DeepsparkError(str(reply["message"]))
                )
                self.fail(error)
                return
            if op != "round":
                raise DeepsparkError(f"gang rank 0: expected a round report, got {op!r}")
            self._take_round(reply, data, frame_bytes, attempt)

    def _take_round(self, reply: Mapping[str, Any], data: bytes, frame_bytes: int, attempt: int) -> None:
        digests = list(reply["digests"])
        with self._lock:
            if attempt != self.attempt:
                return  # a report of a gang that failed meanwhile: its restart starts before this round
            if self.fatal is not None:
                return  # the run is stopping (its job is being cancelled): record no round after the error
            if len(set(digests)) != 1:
                self.fatal = RunError(
                    f"all-reduce replicas diverged by step {reply['step']}: weight digests {digests}; "
                    "this is a bug (or a non-deterministic layer), please report it"
                )
                self._lock.notify_all()
                return
            samples = int(reply["samples"])
            self.payload = bytes(data)
            self.optimizer = reply.get("optimizer")
            self.cursors = {k: c for k, c in enumerate(reply["cursors"])}
            self.steps_done = int(reply["step"])
            self.samples_done += samples
            self.round_done = int(reply["round"])
            self.finished = self.steps_done >= self._total_steps
            report = GangReport(
                round=int(reply["round"]),
                epoch=self.samples_done / self._rows,
                samples=samples,
                workers=self._workers,
                train_loss=float(reply["loss_sum"]) / max(samples, 1),
                seconds=float(reply["seconds"]),
                compute_s=float(reply["compute_s"]),
                comm_s=float(reply["comm_s"]),
                wait_s=float(reply["wait_s"]),
                bytes=int(reply["allreduce_bytes"]) + frame_bytes,
                attempt=self.attempt,
                steps_done=self.steps_done,
            )
            try:
                self._on_round(report, self)
            except BaseException as exc:  # a failing checkpoint write stops the run, loudly
                self.fatal = exc
            self._lock.notify_all()


# ---------------------------------------------------------------------------------- executor side
@dataclass(frozen=True)
class GangSpec(TaskSpec):
    """An averaging task's spec (driver address, model, data layout, training config) plus the gang's
    shape; copied out of driver objects before the closure is made."""

    workers: int = 1
    steps_per_round: int = 1
    attempt: int = 0
    timeout_s: float = 1800.0
    fail_at_step: int | None = None  # test-only: the last rank raises after this step (fit.py explains)


def allreduce_task(task: GangSpec, batches: Iterator[Any]) -> Iterator[Any]:
    """Body of one gang member's barrier task (``mapInArrow(..., barrier=True)``)."""
    import datetime

    import pyarrow as pa
    import torch.distributed as dist
    from pyspark import BarrierTaskContext

    from deepspark.spark import assigned_gpus, limit_task_threads, task_device

    ctx = BarrierTaskContext.get()
    rank, world = ctx.partitionId(), task.workers
    limit_task_threads(task.threads, ctx)
    device = task_device(task.device, ctx)
    hello = {
        "rank": rank,
        "attempt": task.attempt,
        "pid": os.getpid(),
        "device": str(device),  # the driver's final `devices:` line, as for average and async
        "gpus": assigned_gpus(ctx),
    }
    # Connected and beating before the load and the rendezvous: a rank frozen in either fails no task
    # either, and the others would wait for it in allGather (Spark's barrier timeout: a year) or in
    # init_process_group (timeout_s). The rows follow in the loaded frame, once the gang is formed.
    with (
        wire.connect(task.host, task.port, token=task.token, hello=hello) as conn,
        wire.Heartbeat(conn, task.heartbeat_s),  # every rank: a frozen one stalls the whole gang
    ):
        inputs, targets, digest, spilled = task.read(batches, device, rank)
        # Rendezvous: rank 0 picks a free port on its host; everyone learns it.
        if rank == 0:
            with socket.socket() as probe:
                probe.bind(("", 0))
                port = probe.getsockname()[1]
            host = ctx.getTaskInfos()[0].address.split(":")[0]
            mine = json.dumps({"rank": 0, "master": f"{host}:{port}"})
        else:
            mine = json.dumps({"rank": rank})
        master = next(json.loads(m)["master"] for m in ctx.allGather(mine) if json.loads(m)["rank"] == 0)
        saved = {name: os.environ.get(name) for name in _ENV}
        addr, port_text = master.rsplit(":", 1)
        os.environ.update(
            MASTER_ADDR=addr, MASTER_PORT=port_text, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0"
        )
        if device.type == "cuda":
            torch.cuda.set_device(device)
        try:
            dist.init_process_group(
                "nccl" if device.type == "cuda" else "gloo",
                init_method=f"tcp://{master}",
                rank=rank,
                world_size=world,
                timeout=datetime.timedelta(seconds=task.timeout_s),
            )
            steps = _train(task, rank, device, inputs, targets, digest, spilled, conn)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
    yield pa.RecordBatch.from_pydict(
        {"rank": pa.array([rank], pa.int64()), "steps": pa.array([steps], pa.int64())}
    )


def _train(
    task: GangSpec,
    rank: int,
    device: torch.device,
    inputs: Examples,
    targets: torch.Tensor,
    digest: str,
    spilled: int,
    conn: Any,
) -> int:
    """The gang member's loop on its connection to the driver: the loaded frame (its rows), the start
    state, all-reduced steps, round reports."""
    import torch.distributed as dist
    from torch import nn

    from deepspark.training.loop import (
        DataCursor,
        TrainConfig,
        augment_batch,
        cosine_rate,
        make_optimizer,
        train_forward,
    )

    config = TrainConfig.from_dict(task.config)
    world = task.workers
    n = int(targets.shape[0])
    model = task.build_model().to(device)
    optimizer = make_optimizer(model, config)
    rate = cosine_rate(config.learning_rate, task.total_steps) if config.lr_schedule == "cosine" else None
    # Just before reading the start state, which the driver sends then.
    conn.send({"op": LOADED, "rows": n, "digest": digest, "spilled": spilled})
    start, payload = conn.recv()
    tensors = state_from_bytes(payload)
    model.load_state_dict(
        {k[len(MODEL_PREFIX) :]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}
    )
    if start.get("optimizer"):
        optimizer.load_state_dict(optimizer_from_tensors(tensors, start["optimizer"]))
    cursor = (
        DataCursor.from_state(start["cursor"])
        if start.get("cursor")
        else DataCursor(n, config.batch_size, config.seed + rank * 1_000_003)
    )
    if cursor.n != n:
        raise rows_changed(f"gang rank {rank} read {n} rows where its data position covers {cursor.n}")
    params = [p for p in model.parameters() if p.requires_grad]
    floats = [b for b in model.buffers() if b.is_floating_point()]
    ints = [b for b in model.buffers() if not b.is_floating_point()]
    sizes = [t.numel() for t in (*params, *floats, *ints)]
    # + a flag per parameter (a gradient on some rank: one no rank's forward used keeps grad None, and
    # the optimizer leaves it as one process does), examples, summed loss, non-empty ranks
    tail = len(params) + 3
    width = sum(sizes) + tail
    dtype = params[0].dtype if params else torch.float32
    ring_bytes = 2 * (world - 1) * width * torch.finfo(dtype).bits // 8 if world > 1 else 0
    chain = hashlib.sha256()
    first = int(start["step"])
    round_start, clock = first, time.perf_counter()
    compute = comm = 0.0
    samples = 0
    loss_sum = 0.0
    for step in range(first, task.total_steps):
        if (step - first) == 0 or step % task.steps_per_round == 0:
            # Dropout masks depend on the round, not on how the run got there: a restarted gang
            # (which always starts on a round boundary) draws what an uninterrupted one would.
            torch.manual_seed(config.seed * 1_000_003 + rank * 1009 + step)
        if rate is not None:
            for group in optimizer.param_groups:
                group["lr"] = rate(step)
        t0 = time.perf_counter()
        model.train()
        optimizer.zero_grad(set_to_none=True)
        count = 0
        loss_value = torch.zeros((), device=device, dtype=dtype)
        if n:
            idx = cursor.next_indices()
            batch = inputs[idx.to(device)]
            if config.augment:
                batch = augment_batch(batch.cpu(), config.augment, cursor.batch_generator()).to(device)
            loss = nn.functional.cross_entropy(train_forward(model, batch, cursor), targets[idx.to(device)])
            loss.backward()
            count = int(idx.shape[0])
            loss_value = loss.detach().to(dtype) * count
        flat = torch.cat(
            [
                *(
                    (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) * count
                    for p in params
                ),
                *(b.reshape(-1) * count for b in floats),
                *(b.reshape(-1).to(dtype) * (1 if count else 0) for b in ints),
                torch.tensor(
                    [*(p.grad is not None for p in params), count, 0.0, 1.0 if count else 0.0],
                    device=device,
                    dtype=dtype,
                ),
            ]
        )
        flat[-2] = loss_value
        t1 = time.perf_counter()
        if world > 1:
            dist.all_reduce(flat)
        *used, total, summed, nonempty = flat[-tail:].tolist()  # one device sync per step
        t2 = time.perf_counter()
        if not math.isfinite(summed):
            epoch = step // max(1, math.ceil(math.ceil(task.layout.rows / world) / config.batch_size))
            message = (
                f"training diverged: loss is {summed} at step {step + 1} (learning rate "
                f"{optimizer.param_groups[0]['lr']:g}); lower the learning rate"
            )
            if rank == 0:
                conn.send(
                    {
                        "op": "error",
                        "kind": "DivergenceError",
                        "message": message,
                        "epoch": epoch,
                        "step": step,
                    }
                )
            raise DivergenceError(message, epoch=epoch, step=step)
        parts = list(torch.split(flat[:-tail], sizes))
        with torch.no_grad():
            for p, g, u in zip(params, parts, used, strict=False):
                p.grad = (g / total).view_as(p) if u else None
            if total:
                for b, v in zip(floats, parts[len(params) :], strict=False):
                    b.copy_((v / total).view_as(b))
                for b, v in zip(ints, parts[len(params) + len(floats) :], strict=False):
                    b.copy_((v / nonempty).round().view_as(b).to(b.dtype))
        optimizer.step()
        if device.type == "cpu":
            _digest(chain, model)
        compute += (t1 - t0) + (time.perf_counter() - t2)
        comm += t2 - t1
        samples += int(total)
        loss_sum += summed
        if task.fail_at_step is not None and step + 1 == task.fail_at_step and rank == world - 1:
            raise RuntimeError(f"deepspark test hook: gang rank {rank} fails after step {step + 1}")
        done = step + 1
        if done % task.steps_per_round and done != task.total_steps:
            continue
        waited = time.perf_counter()
        if device.type != "cpu":
            _digest(chain, model)
        mine = json.dumps(
            {"rank": rank, "cursor": cursor.state() if n else None, "digest": chain.hexdigest()}
        )
        gathered = [json.loads(m) for m in _gather_strings(mine, world, device)]
        if rank == 0:
            state = {f"{MODEL_PREFIX}{k}": v for k, v in model.state_dict().items()}
            optim_tensors, optim_rest = optimizer_to_tensors(optimizer.state_dict())
            data = state_to_bytes({**state, **optim_tensors})
            conn.send(
                {
                    "op": "round",
                    "round": step // task.steps_per_round,
                    "step": done,
                    "samples": samples,
                    "loss_sum": loss_sum,
                    "seconds": time.perf_counter() - clock,
                    "compute_s": compute,
                    "comm_s": comm,
                    "wait_s": time.perf_counter() - waited,
                    "allreduce_bytes": ring_bytes * (done - round_start),
                    "cursors": [m["cursor"] for m in gathered],
                    "digests": [m["digest"] for m in gathered],
                    "optimizer": optim_rest,
                },
                data,
            )
        round_start, clock = done, time.perf_counter()
        compute = comm = 0.0
        samples, loss_sum = 0, 0.0
    conn.send({"op": "done"})
    if rank == 0:
        reply, _ = conn.recv()  # the driver has taken every report once it answers
        if reply.get("op") != "ok":
            raise DeepsparkError(f"gang rank 0: the driver answered {reply!r} to done")
    return task.total_steps - first


def _gather_strings(text: str, world: int, device: torch.device) -> list[str]:
    """Every rank's ``text``, in rank order, with two torch collectives (lengths, then padded UTF-8).

    Not ``BarrierTaskContext.allGather``: Spark answers a barrier call on a one-second tick, which would
    cost every round a second. Not ``all_gather_object`` either: that pickles.
    """
    import torch.distributed as dist

    if world == 1:
        return [text]
    data = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).to(device)
    length = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    dist.all_gather(lengths, length)
    longest = int(max(int(n) for n in lengths))
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: data.numel()] = data
    chunks = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(chunks, padded)
    return [c[: int(n)].cpu().numpy().tobytes().decode("utf-8") for c, n in zip(chunks, lengths, strict=True)]


def _digest(chain: Any, model: torch.nn.Module) -> None:
    with torch.no_grad():
        for t in (*model.parameters(), *model.buffers()):
            chain.update(t.detach().cpu().contiguous().numpy().tobytes())
