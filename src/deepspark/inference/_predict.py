"""Batch inference as one Spark job: ``mapInArrow`` over the input, one model load per Python worker.

How a task runs (``_run_task``): it takes Arrow batches as Spark hands them over, cuts them into full
``batch_size`` batches (only a partition's last batch is short), decodes upcoming batches in a small
thread pool while the current one runs through the model, and yields one output batch per input batch.
The model arrives as bytes in a broadcast variable and is loaded at most once per Python worker process
(a module-level cache keyed by the model's SHA-256), so with ``spark.python.worker.reuse`` (deepspark's
default) a job loads it once per worker, not once per task or batch. torch / onnxruntime use
``spark.task.cpus`` threads. Counters and per-phase timings come back through an accumulator.
"""

from __future__ import annotations

import glob as _glob
import logging
import math
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deepspark.errors import ConfigError
from deepspark.inference.decode import Decoded, InputKind, UrlPolicy, decode_column
from deepspark.inference.formats import (
    BACKENDS,
    InferenceModel,
    ModelArtifact,
    ModelFormat,
    Runner,
    build_runner,
    read_labels,
    read_model,
    resolve_backend,
    to_onnx,
)
from deepspark.inference.topk import softmax, top_k
from deepspark.models.preprocess import Preprocess
from deepspark.rundir import check_writable

if TYPE_CHECKING:
    from pyspark import Broadcast
    from pyspark.accumulators import Accumulator
    from pyspark.sql import DataFrame, SparkSession

__all__ = ["OUTPUT_COLUMNS", "PHASES", "PredictResult", "PredictSummary", "predict"]

_log = logging.getLogger(__name__)

OUTPUT_COLUMNS = ("label", "label_index", "probability", "top_k", "error")
PHASES = ("load", "read", "decode", "forward", "write")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_IMAGE_GLOB = "*.{png,PNG,jpg,JPG,jpeg,JPEG,bmp,BMP,gif,GIF,tif,TIF,tiff,TIFF,webp,WEBP}"
_ROWS_PER_TASK_BATCHES = 8  # file inputs are packed into partitions of about 8 full batches
_FETCH_THREADS = 8
_CACHE_SIZE = 2


# --------------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class PredictSummary:
    """What a finished prediction job did.

    ``seconds`` is the driver's wall time for the whole job (listing, reading, inference and writing);
    ``rows_per_second`` is ``rows / seconds``. ``phase_seconds`` are measured inside the tasks and summed
    over all of them: ``load`` (model loads), ``read`` (waiting for Spark to hand over input batches),
    ``decode`` (thread time spent decoding/fetching; it overlaps ``forward``), ``forward`` (model, softmax,
    top-k), ``write`` (handing output batches back to Spark, including the Parquet writer's back-pressure).
    ``model_loads`` counts loads in Python workers; ``workers`` how many distinct worker processes ran tasks.
    """

    rows: int
    errors: int
    seconds: float
    rows_per_second: float
    model_loads: int
    workers: int
    partitions: int
    backend: str
    model_format: str
    batch_size: int
    threads_per_task: int
    phase_seconds: Mapping[str, float] = field(default_factory=dict)
    output: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "errors": self.errors,
            "seconds": self.seconds,
            "rows_per_second": self.rows_per_second,
            "model_loads": self.model_loads,
            "workers": self.workers,
            "partitions": self.partitions,
            "backend": self.backend,
            "model_format": self.model_format,
            "batch_size": self.batch_size,
            "threads_per_task": self.threads_per_task,
            "phase_seconds": dict(self.phase_seconds),
            "output": self.output,
        }


@dataclass(frozen=True)
class PredictResult:
    """The predictions and, when the job ran (``output=`` was given), its summary.

    Without ``output`` the DataFrame is lazy (nothing has run) and ``summary`` is ``None``; with it, the
    DataFrame reads the written Parquet back.
    """

    dataframe: DataFrame
    summary: PredictSummary | None = None


# ----------------------------------------------------------------------------------- task-side state
@dataclass(frozen=True)
class _Plan:
    """Everything a task needs, copied out of the driver's objects so the closure stays small."""

    model_id: str
    backend: str
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


_cache: OrderedDict[str, Runner] = OrderedDict()
_cache_lock = threading.Lock()


def _cached_runner(plan: _Plan, artifact: Broadcast[ModelArtifact]) -> tuple[Runner, bool]:
    """This worker's model, loading it on first use; ``True`` when this call loaded it."""
    key = f"{plan.model_id}|{plan.backend}|{plan.threads}"
    with _cache_lock:
        runner = _cache.get(key)
        if runner is not None:
            _cache.move_to_end(key)
            return runner, False
        runner = build_runner(artifact.value, backend=plan.backend, threads=plan.threads)
        _cache[key] = runner
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
        return runner, True


class _Stats:
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


def _rebatch(batches: Iterator[Any], size: int, times: dict[str, float]) -> Iterator[Any]:
    """Full ``size``-row tables out of Arrow batches of any size (only the last one is short)."""
    import pyarrow as pa

    pending: list[Any] = []
    count = 0
    while True:
        start = time.perf_counter()
        batch = next(batches, None)
        times["read"] += time.perf_counter() - start
        if batch is None:
            break
        if batch.num_rows == 0:
            continue
        pending.append(batch)
        count += batch.num_rows
        while count >= size:
            table = pa.Table.from_batches(pending)
            yield table.slice(0, size)
            rest = table.slice(size)
            pending, count = rest.to_batches(), rest.num_rows
    if count:
        yield pa.Table.from_batches(pending)


def _output_batch(plan: _Plan, chunk: Any, decoded: Decoded, logits: np.ndarray, schema: Any) -> Any:
    import pyarrow as pa

    n = chunk.num_rows
    failed = np.ones(n, dtype=bool)
    failed[decoded.ok] = False
    k = min(plan.top_k, len(plan.class_names))
    index = np.zeros((n, k), dtype=np.int64)
    prob = np.zeros((n, k), dtype=np.float32)
    if len(decoded.ok):
        idx, values = top_k(softmax(logits), k)
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


def _run_task(
    batches: Iterator[Any],
    plan: _Plan,
    artifact: Broadcast[ModelArtifact],
    stats: Accumulator[dict[str, Any]],
    schema: Any,
) -> Iterator[Any]:
    from deepspark.spark import limit_threads

    limit_threads(plan.threads)
    times = dict.fromkeys(PHASES, 0.0)
    start = time.perf_counter()
    runner, loaded = _cached_runner(plan, artifact)
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
                ),
            )
        )

    try:
        chunks = _rebatch(batches, plan.batch_size, times)
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
            out = _output_batch(plan, chunk, decoded, logits, schema)
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
        {"rows": rows, "errors": errors, "loads": int(loaded), "tasks": 1, "pids": frozenset([os.getpid()])}
        | {f"seconds_{name}": value for name, value in times.items()}
    )


# ------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class _Input:
    dataframe: DataFrame
    kind: InputKind
    column: str
    passthrough: tuple[str, ...]
    ours: bool  # we built the DataFrame (so we may choose its partitioning)
    rows_hint: int | None = None


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def _local(path: str) -> str:
    return path[len("file://") :] if path.startswith("file://") else path


def _binary_files(
    spark: SparkSession, path: str | list[str], *, pattern: str | None, recursive: bool
) -> _Input:
    reader = spark.read.format("binaryFile")
    if pattern:
        reader = reader.option("pathGlobFilter", pattern)
    if recursive:
        reader = reader.option("recursiveFileLookup", "true")
    df = reader.load(path).select("path", "content")
    files = df.inputFiles()
    empty = _empty_files(spark, files)
    if empty:
        # Spark's file scan skips zero-byte files, so binaryFile has no row for them: add one each
        # (empty content, which becomes an error row) so that every input file appears once.
        df = df.unionByName(spark.createDataFrame([(p, bytearray()) for p in empty], df.schema))
    return _Input(df, InputKind.IMAGE, "content", ("path",), ours=True, rows_hint=len(files))


def _empty_files(spark: SparkSession, uris: Sequence[str]) -> list[str]:
    """The zero-byte files among ``uris`` (as ``inputFiles()`` lists them), written as binaryFile's
    ``path`` column writes them. Local files are checked with ``stat``; others through Hadoop's
    FileSystem, one metadata call per file."""
    from urllib.parse import unquote, urlsplit

    empty = []
    jvm = spark.sparkContext._jvm
    conf = spark.sparkContext._jsc.hadoopConfiguration()
    for uri in uris:
        parts = urlsplit(uri)
        if parts.scheme in ("", "file"):
            local = unquote(parts.path)
            if os.path.getsize(local) == 0:
                empty.append(f"file:{local}")
            continue
        hpath = jvm.org.apache.hadoop.fs.Path(jvm.java.net.URI(uri))  # type: ignore[union-attr]
        if hpath.getFileSystem(conf).getFileStatus(hpath).getLen() == 0:
            empty.append(str(hpath.toString()))
    return empty


def _idx_input(spark: SparkSession, files: Sequence[Path]) -> _Input:
    import pandas as pd

    from deepspark.data import read_idx

    frames = []
    for file in files:
        images = np.asarray(read_idx(file), dtype=np.uint8)
        labels_file = Path(
            str(file).replace("images-idx3", "labels-idx1").replace("images.idx3", "labels.idx1")
        )
        labels = np.asarray(read_idx(labels_file), dtype=np.int64) if labels_file.is_file() else None
        frames.append(
            pd.DataFrame(
                {
                    "file": file.name,
                    "index": np.arange(len(images), dtype=np.int64),
                    "target": labels if labels is not None and len(labels) == len(images) else None,
                    "pixels": [row.tobytes() for row in images.reshape(len(images), -1)],
                }
            )
        )
    pdf = pd.concat(frames, ignore_index=True)
    pdf["target"] = pdf["target"].astype("Int64")
    df = spark.createDataFrame(pdf, schema="file string, index long, target long, pixels binary")
    return _Input(df, InputKind.RAW, "pixels", ("file", "index", "target"), ours=True, rows_hint=len(pdf))


def _dataframe_input(df: DataFrame, column: str | None, *, ours: bool = False) -> _Input:
    from pyspark.sql import types as T

    fields = {f.name: f.dataType for f in df.schema.fields}
    if column is None:
        candidates = [n for n, t in fields.items() if isinstance(t, T.BinaryType | T.ArrayType)]
        if len(candidates) == 1:
            column = candidates[0]
        elif not candidates and isinstance(fields.get("url"), T.StringType):
            column = "url"
        else:
            raise ConfigError(
                "input_column: expected the name of the image/tensor/URL column; the DataFrame has "
                f"{sorted(fields)} and no single binary or array column to choose"
            )
    if column not in fields:
        raise ConfigError(f"input_column: expected one of {sorted(fields)}, got {column!r}")
    typ = fields[column]
    if isinstance(typ, T.BinaryType):
        kind = InputKind.IMAGE
    elif isinstance(typ, T.ArrayType):
        kind = InputKind.TENSOR
    elif isinstance(typ, T.StringType):
        kind = InputKind.URL
    else:
        raise ConfigError(
            f"input_column: {column!r} is {typ.simpleString()}; expected binary (image files), an array "
            "(pixel tensors) or a string (http(s) URLs)"
        )
    keep = tuple(n for n in fields if n != column or kind is InputKind.URL)
    return _Input(df, kind, column, keep, ours=ours)


def _resolve_input(spark: SparkSession, data: Any, input_column: str | None) -> _Input:
    from pyspark.sql import DataFrame

    if isinstance(data, DataFrame):
        return _dataframe_input(data, input_column)
    if not isinstance(data, str | os.PathLike):
        raise ConfigError(f"data: expected a DataFrame or a path/glob, got {type(data).__name__}")
    path = os.fspath(data)
    has_glob = any(ch in path for ch in "*?[{")
    if _is_local(path):
        local = _local(path)
        if has_glob:
            # Python's glob has no {a,b} alternatives (Hadoop's has): leave those to Spark.
            if "{" not in local and not _glob.glob(local, recursive=True):
                raise ConfigError(f"data: no files match {path!r}")
        elif not os.path.exists(local):
            raise ConfigError(f"data: expected an existing path, DataFrame or glob, got {path!r}")
        p = Path(local)
        if not has_glob and p.is_dir():
            idx = sorted(q for q in p.iterdir() if "idx3-ubyte" in q.name or "idx3.ubyte" in q.name)
            if idx:
                return _idx_input(spark, idx)
            if any(q.suffix == ".parquet" or q.name == "_SUCCESS" for q in p.iterdir()):
                return _dataframe_input(spark.read.parquet(path), input_column, ours=False)
            return _binary_files(spark, path, pattern=_IMAGE_GLOB, recursive=True)
        if not has_glob and ("idx3-ubyte" in p.name or "idx3.ubyte" in p.name):
            return _idx_input(spark, [p])
    suffix = Path(path).suffix.lower()
    if has_glob:
        parts = path.split("/")
        first = next(i for i, part in enumerate(parts) if any(ch in part for ch in "*?[{"))
        if "**" in path or first == len(parts) - 1:
            # Hadoop globs have no '**': list the fixed prefix (recursively for '**') and filter on the
            # file name; a glob in the file name alone is read the same way.
            base = "/".join(parts[:first]) or "."
            return _binary_files(spark, base, pattern=parts[-1], recursive="**" in path)
        if _is_local(path) and "{" not in path:
            # A glob in a directory: list the directories here and let Spark filter the file names. Given
            # the glob itself, Spark logs a long, harmless FileNotFoundException while it looks for a
            # streaming-sink metadata folder named like the pattern.
            prefix = "file://" if path.startswith("file://") else ""
            dirs = sorted(d for d in _glob.glob(_local("/".join(parts[:-1]))) if Path(d).is_dir())
            return _binary_files(spark, [prefix + d for d in dirs], pattern=parts[-1], recursive=False)
        return _binary_files(spark, path, pattern=None, recursive=False)
    if suffix == ".parquet":
        return _dataframe_input(spark.read.parquet(path), input_column)
    if suffix == ".txt":
        df = spark.read.text(path).withColumnRenamed("value", "url").filter("trim(url) != ''")
        return _dataframe_input(df, "url", ours=True)
    if suffix == ".csv":
        return _dataframe_input(spark.read.csv(path, header=True), input_column or "url", ours=True)
    if suffix in _IMAGE_SUFFIXES:
        return _binary_files(spark, path, pattern=None, recursive=False)
    raise ConfigError(
        f"data: cannot tell what {path!r} holds; expected image files (a glob or directory), a Parquet "
        "table, a directory of IDX files, a .txt/.csv list of URLs, or a DataFrame"
    )


# -------------------------------------------------------------------------------------------- predict
def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}: expected a positive integer, got {value!r}")
    return value


def _output_schema(df: DataFrame, passthrough: Sequence[tuple[str, str]]) -> Any:
    from pyspark.sql import types as T

    fields = {f.name: f for f in df.schema.fields}
    entry = T.StructType(
        [T.StructField("label", T.StringType()), T.StructField("probability", T.FloatType())]
    )
    return T.StructType(
        [T.StructField(out, fields[src].dataType, fields[src].nullable) for src, out in passthrough]
        + [
            T.StructField("label", T.StringType()),
            T.StructField("label_index", T.IntegerType()),
            T.StructField("probability", T.FloatType()),
            T.StructField("top_k", T.ArrayType(entry)),
            T.StructField("error", T.StringType()),
        ]
    )


def predict(
    data: DataFrame | str | os.PathLike[str],
    model: str | os.PathLike[str],
    *,
    top_k: int = 5,
    labels: str | os.PathLike[str] | Sequence[str] | None = None,
    batch_size: int = 256,
    backend: str = "auto",
    input_column: str | None = None,
    output: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    preprocess: Preprocess | None = None,
    url_policy: UrlPolicy | None = None,
    decode_threads: int = 2,
    spark: SparkSession | None = None,
    master: str | None = None,
) -> PredictResult:
    """Apply ``model`` to every row of ``data``; every input row appears exactly once in the output.

    ``data`` is a DataFrame (a binary column of image files, an array column of pixel tensors or a string
    column of http(s) URLs, chosen by ``input_column`` or found by type) or a path: a glob or directory of
    image files, a Parquet table, a directory of MNIST-layout IDX files, or a ``.txt`` (one URL per line)
    or ``.csv`` (with a ``url`` column) list of URLs. ``model`` is a checkpoint directory, TorchScript
    file, ``.pt2`` or ``.onnx`` file (pickles are refused); ``labels`` a label file or a list of names.
    ``backend`` ``auto`` runs ONNX with onnxruntime and the rest with torch; ``onnx`` converts a torch
    model to ONNX once on the driver.

    Output columns: the input's identity columns (e.g. ``path``, ``url``, or every non-input column of a
    DataFrame; a name that clashes with an output column gets an ``input_`` prefix), ``label``,
    ``label_index``, ``probability``, ``top_k`` (``array<struct<label, probability>>``, most likely first;
    ``top_k`` is capped at the number of classes) and ``error`` (null when the row went through; otherwise
    why it did not, and the prediction columns are null). A bad row never fails the job.

    With ``output``, the predictions are written as Parquet, and the result has a :class:`PredictSummary`;
    without it, the returned DataFrame is lazy and ``summary`` is ``None``. Every parameter is checked,
    and the model loaded once on the driver to check it, before any Spark job starts.
    """
    from deepspark.spark import session, task_cpus

    top_k = _positive_int("top_k", top_k)
    batch_size = _positive_int("batch_size", batch_size)
    decode_threads = _positive_int("decode_threads", decode_threads)
    if backend not in BACKENDS:
        raise ConfigError(f"backend: expected one of {list(BACKENDS)}, got {backend!r}")
    if not os.path.exists(os.fspath(model)):
        raise ConfigError(
            f"model: expected an existing checkpoint directory or model file, got {os.fspath(model)!r}"
        )
    output_path = os.fspath(output) if output is not None else None
    if (
        output_path is not None
        and _is_local(output_path)
        and os.path.exists(_local(output_path))
        and not overwrite
    ):
        raise ConfigError(f"output: {output_path} already exists; pass overwrite=True or choose another path")
    if output_path is not None and _is_local(output_path):
        check_writable(_local(output_path), name="output")  # not after the job: Spark's write fails late
    names = read_labels(labels) if isinstance(labels, str | os.PathLike) else labels
    artifact = read_model(model, preprocess=preprocess, class_names=names)
    chosen = resolve_backend(backend, artifact)
    model_format = artifact.format.value
    if chosen == "onnx" and artifact.format is not ModelFormat.ONNX:
        try:
            artifact = replace(artifact, format=ModelFormat.ONNX, payload=to_onnx(artifact), spec_json=None)
        except Exception as exc:
            if backend != "auto":
                raise
            _log.warning("ONNX export of %s failed (%s); running it with torch", model, exc)
            chosen = "torch"
    checked = InferenceModel(artifact, backend=chosen, threads=1)  # validates outputs and label count
    class_names = checked.class_names
    if top_k > len(class_names):
        _log.info("top_k=%d capped at the model's %d classes", top_k, len(class_names))
        top_k = len(class_names)

    spark = spark or session(master)
    source = _resolve_input(spark, data, input_column)
    df = source.dataframe
    if source.ours and source.rows_hint:
        from deepspark.spark import total_slots

        target = max(total_slots(spark), math.ceil(source.rows_hint / (batch_size * _ROWS_PER_TASK_BATCHES)))
        if df.rdd.getNumPartitions() > target:
            df = df.coalesce(target)
    passthrough = tuple((n, f"input_{n}" if n in OUTPUT_COLUMNS else n) for n in source.passthrough)
    threads = task_cpus(spark)
    plan = _Plan(
        model_id=artifact.model_id,
        backend=chosen,
        threads=threads,
        batch_size=batch_size,
        top_k=top_k,
        kind=source.kind,
        input_column=source.column,
        passthrough=passthrough,
        class_names=class_names,
        preprocess=artifact.preprocess,
        url_policy=url_policy or UrlPolicy(),
        decode_threads=decode_threads,
    )
    schema = _output_schema(df, passthrough)
    columns = list(dict.fromkeys([src for src, _ in passthrough] + [source.column]))
    sc = spark.sparkContext
    model_bc = sc.broadcast(artifact)
    stats: Accumulator[dict[str, Any]] = sc.accumulator({}, _Stats())  # type: ignore[arg-type]
    from pyspark.sql.pandas.types import to_arrow_schema

    arrow_schema = to_arrow_schema(schema)

    def task(batches: Iterator[Any]) -> Iterator[Any]:
        return _run_task(batches, plan, model_bc, stats, arrow_schema)

    result = df.select(*columns).mapInArrow(task, schema)
    if output_path is None:
        return PredictResult(result)

    partitions = df.rdd.getNumPartitions()
    start = time.perf_counter()
    try:
        result.write.mode("overwrite" if overwrite else "errorifexists").parquet(output_path)
    finally:
        model_bc.destroy()
    seconds = time.perf_counter() - start
    totals = dict(stats.value)
    summary = PredictSummary(
        rows=int(totals.get("rows", 0)),
        errors=int(totals.get("errors", 0)),
        seconds=seconds,
        rows_per_second=totals.get("rows", 0) / seconds if seconds > 0 else 0.0,
        model_loads=int(totals.get("loads", 0)),
        workers=len(totals.get("pids", ())),
        partitions=partitions,
        backend=chosen,
        model_format=model_format,
        batch_size=batch_size,
        threads_per_task=threads,
        phase_seconds={name: float(totals.get(f"seconds_{name}", 0.0)) for name in PHASES},
        output=output_path,
    )
    if summary.model_loads > summary.workers:
        _log.warning(
            "the model was loaded %d times by %d Python workers: is spark.python.worker.reuse off?",
            summary.model_loads,
            summary.workers,
        )
    _log.info("predict: %s", summary.to_dict())
    return PredictResult(spark.read.parquet(output_path), summary)
