"""What ships to executors for ``predict``: the task function, its small frozen plan, the per-worker
model cache, the output batch and the counters that come back.

How a task runs (:func:`run_task`): it takes Arrow batches as Spark hands them over, cuts them into full
``batch_size`` batches (:func:`deepspark.data.frames.rebatch`; only a partition's last batch is short),
decodes upcoming batches in a small thread pool while the current one runs through the model, and yields
one output batch per input batch. The model arrives as bytes in a broadcast variable and is loaded at most
once per Python worker process (a module-level cache keyed by the model's SHA-256 and the device), so with
``spark.python.worker.reuse`` (deepspark's default) a job loads it once per worker, not once per task or
batch. The device is the GPU Spark assigned the task, if any (``device``, see
:func:`deepspark.inference.runners.runner_device`); torch / onnxruntime use ``spark.task.cpus`` threads.
Counters and per-phase timings come back through an accumulator.

The closure the driver ships captures only a :class:`TaskPlan`, the broadcast model, the accumulator and
the output schema. This module imports numpy and the light decode/top-k helpers; torch, onnxruntime and
pyarrow are imported inside the task.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from deepspark.inference.decode import Decoded, InputKind, UrlPolicy, decode_column
from deepspark.inference.topk import softmax, top_k
from deepspark.models.preprocess import Preprocess

if TYPE_CHECKING:
    from pyspark import Broadcast
    from pyspark.accumulators import Accumulator

    from deepspark.inference.formats import ModelArtifact
    from deepspark.inference.runners import Runner

__all__ = ["PHASES", "TaskPlan", "TaskStats", "listed_files", "run_task"]

PHASES = ("load", "read", "decode", "forward", "write")
_FETCH_THREADS = 8
_CACHE_SIZE = 2


@dataclass(frozen=True)
class TaskPlan:
    """Everything a task needs, copied out of the driver's objects so the closure stays small."""

    model_id: str
    backend: str
    device: str  # auto | cpu | cuda, as requested: the task resolves it against the GPU Spark assigned
    threads: int
    batch_size: int
    top_k: int
    kind: InputKind
    input_column: str
    passthrough: tuple[tuple[str, str], ...]  # (input name, output name)
    class_names: tuple[str, ...]
    preprocess: Preprocess
    url_policy: UrlPolicy
    decode_threads: int
    max_file_bytes: int | None = None  # local files (InputKind.FILE): spark.sql.sources.binaryFile.maxLength


_cache: OrderedDict[str, Runner] = OrderedDict()
_cache_lock = threading.Lock()


def _cached_runner(plan: TaskPlan, artifact: Broadcast[ModelArtifact], device: str) -> tuple[Runner, bool]:
    """This worker's model on ``device``, loading it on first use; ``True`` when this call loaded it."""
    from deepspark.inference.runners import build_runner
    from deepspark.spark import thaw_worker_objects

    key = f"{plan.model_id}|{plan.backend}|{plan.threads}|{device}"
    with _cache_lock:
        runner = _cache.get(key)
        if runner is not None:
            _cache.move_to_end(key)
            return runner, False
        runner = build_runner(artifact.value, backend=plan.backend, threads=plan.threads, device=device)
        _cache[key] = runner
        if len(_cache) > _CACHE_SIZE:
            while len(_cache) > _CACHE_SIZE:
                _cache.popitem(last=False)
            thaw_worker_objects()  # the model let go was frozen by the tasks that used it
        return runner, True


class TaskStats:
    """Accumulator parameter for a task's counters: numbers add up, the worker-pid sets unite."""

    def zero(self, value: dict[str, Any]) -> dict[str, Any]:
        return {}

    def addInPlace(self, a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:  # Spark's method name
        for key, value in b.items():
            if isinstance(value, frozenset):
                a[key] = a.get(key, frozenset()) | value
            else:
                a[key] = a.get(key, 0) + value
        return a


def _probabilities(decoded: Decoded, logits: np.ndarray) -> tuple[np.ndarray, Decoded]:
    """The softmax of the good rows' scores. A row whose scores have none (NaN, +inf, or -inf for every
    class: a model that diverged, or an input it overflows on) becomes an error row: its softmax is NaN,
    which read as class 0 with a NaN probability and no error."""
    with np.errstate(invalid="ignore"):
        probabilities = softmax(logits)
    defined = np.isfinite(probabilities).all(axis=1)
    if defined.all():
        return probabilities, decoded
    errors = list(decoded.errors)
    for i in decoded.ok[~defined]:
        errors[int(i)] = "the model's scores for this input are NaN or infinite: no class probabilities"
    return probabilities[defined], replace(decoded, ok=decoded.ok[defined], errors=errors)


def _output_batch(
    plan: TaskPlan, chunk: Any, decoded: Decoded, probabilities: np.ndarray, schema: Any
) -> Any:
    import pyarrow as pa

    n = chunk.num_rows
    failed = np.ones(n, dtype=bool)
    failed[decoded.ok] = False
    k = min(plan.top_k, len(plan.class_names))
    index = np.zeros((n, k), dtype=np.int64)
    prob = np.zeros((n, k), dtype=np.float32)
    if len(decoded.ok):
        idx, values = top_k(probabilities, k)
        index[decoded.ok], prob[decoded.ok] = idx, values
    names = np.asarray(plan.class_names, dtype=object)
    mask = pa.array(failed)
    good = ~failed
    offsets = np.zeros(n + 1, dtype=np.int32)
    offsets[1:] = np.cumsum(np.where(good, k, 0))
    entries = pa.StructArray.from_arrays(
        [pa.array(names[index[good]].ravel(), pa.string()), pa.array(prob[good].ravel(), pa.float32())],
        fields=list(schema.field("top_k").type.value_type),
    )
    arrays = [chunk.column(src).combine_chunks() for src, _ in plan.passthrough]
    arrays += [
        pa.array(names[index[:, 0]], pa.string(), mask=failed),
        pa.array(index[:, 0].astype(np.int32), pa.int32(), mask=failed),
        pa.array(prob[:, 0], pa.float32(), mask=failed),
        pa.ListArray.from_arrays(pa.array(offsets), entries, type=schema.field("top_k").type, mask=mask),
        pa.array(decoded.errors, pa.string()),
    ]
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _timed(batches: Iterator[Any], times: dict[str, float]) -> Iterator[Any]:
    """``batches``, adding the time spent waiting for Spark to hand each one over to ``times['read']``."""
    while True:
        start = time.perf_counter()
        batch = next(batches, None)
        times["read"] += time.perf_counter() - start
        if batch is None:
            return
        yield batch


def listed_files(
    batches: Iterator[Any], files: Broadcast[tuple[str, ...]], slices: int, column: str
) -> Iterator[Any]:
    """The rows of a task over local files deepspark listed: Spark hands it slice numbers (a range of
    ``slices`` rows, one partition each), and each becomes its share of ``files`` (in order, sizes within
    one of each other) as Arrow batches of one ``column``. A task run again (a retry, a speculative copy)
    makes the same rows, so every file is predicted once.

    A DataFrame of the paths made on the driver was read in one partition per core (Spark keeps so small
    a table as a local relation), so a task held half the job: the progress moved when one ended, and a
    failed task did its half again."""
    import pyarrow as pa

    listed = files.value
    for batch in batches:
        for number in batch.column(0).to_pylist():
            lo, hi = len(listed) * number // slices, len(listed) * (number + 1) // slices
            for start in range(lo, hi, 4096):
                part = listed[start : min(hi, start + 4096)]
                yield pa.record_batch([pa.array(part, pa.string())], names=[column])


def run_task(
    batches: Iterator[Any],
    plan: TaskPlan,
    artifact: Broadcast[ModelArtifact],
    stats: Accumulator[dict[str, Any]],
    schema: Any,
) -> Iterator[Any]:
    from deepspark.data.frames import rebatch
    from deepspark.inference.runners import runner_device
    from deepspark.spark import assigned_gpus, device_label, freeze_worker_objects, limit_threads

    limit_threads(plan.threads)
    times = dict.fromkeys(PHASES, 0.0)
    start = time.perf_counter()
    device = runner_device(plan.device, plan.backend)
    gpus = assigned_gpus()
    runner, loaded = _cached_runner(plan, artifact, device)
    freeze_worker_objects()  # the model and the imports: pyspark's collection after the task skips them
    times["load"] = time.perf_counter() - start
    rows = errors = 0
    pool = ThreadPoolExecutor(plan.decode_threads, thread_name_prefix="deepspark-decode")
    fetch = (
        ThreadPoolExecutor(_FETCH_THREADS, thread_name_prefix="deepspark-fetch")
        if plan.kind is InputKind.URL
        else None
    )
    pending: deque[tuple[Any, Future[Decoded]]] = deque()

    def submit(chunk: Any) -> None:
        column = chunk.column(plan.input_column).combine_chunks()
        pending.append(
            (
                chunk,
                pool.submit(
                    decode_column,
                    plan.kind,
                    column,
                    plan.preprocess,
                    policy=plan.url_policy,
                    fetch_pool=fetch,
                    max_file_bytes=plan.max_file_bytes,
                ),
            )
        )

    try:
        chunks = rebatch(_timed(batches, times), plan.batch_size)
        while True:
            # Keep `decode_threads` batches decoding ahead of the one going through the model.
            while len(pending) <= plan.decode_threads:
                chunk = next(chunks, None)
                if chunk is None:
                    break
                submit(chunk)
            if not pending:
                break
            chunk, future = pending.popleft()
            decoded = future.result()
            times["decode"] += decoded.seconds
            tick = time.perf_counter()
            logits = runner(decoded.inputs) if len(decoded.ok) else np.zeros((0, len(plan.class_names)))
            probabilities, decoded = _probabilities(decoded, logits)
            out = _output_batch(plan, chunk, decoded, probabilities, schema)
            times["forward"] += time.perf_counter() - tick
            rows += chunk.num_rows
            errors += chunk.num_rows - len(decoded.ok)
            tick = time.perf_counter()
            yield out
            times["write"] += time.perf_counter() - tick
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if fetch is not None:
            fetch.shutdown(wait=True, cancel_futures=True)
    stats.add(
        {
            "rows": rows,
            "errors": errors,
            "loads": int(loaded),
            "tasks": 1,
            "pids": frozenset([os.getpid()]),
            "devices": frozenset([device_label(device, gpus)]),
        }
        | {f"seconds_{name}": value for name, value in times.items()}
    )
