"""The driver side of ``predict``: check every parameter, read the model once, resolve the input, run one
Spark job (``mapInArrow`` over the input, see :mod:`deepspark.inference._task`) and summarise it.

While the job runs, an optional ``progress`` callback receives :class:`PredictProgress` snapshots taken
from Spark's status tracker (tasks done) and the task counters (rows done); the CLI draws them.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deepspark._compat import to_arrow_schema
from deepspark.errors import ConfigError, DeepsparkError, RunError
from deepspark.inference._inputs import (
    GLOB_CHARS,
    for_spark,
    is_local,
    local_path,
    parquet_table_file,
    resolve_input,
)
from deepspark.inference._task import PHASES, TaskPlan, TaskStats, listed_files, run_task
from deepspark.inference.decode import InputKind, UrlPolicy
from deepspark.inference.formats import ModelFormat, read_model
from deepspark.inference.model import BACKENDS, InferenceModel, read_labels, resolve_backend
from deepspark.inference.runners import to_onnx
from deepspark.models.preprocess import Preprocess
from deepspark.rundir import check_writable, replace_dir
from deepspark.validation import check_choice, check_positive_int, fail

if TYPE_CHECKING:
    from pyspark import SparkContext
    from pyspark.accumulators import Accumulator
    from pyspark.sql import DataFrame, SparkSession

__all__ = ["OUTPUT_COLUMNS", "PHASES", "PredictProgress", "PredictResult", "PredictSummary", "predict"]

_log = logging.getLogger(__name__)

OUTPUT_COLUMNS = ("label", "label_index", "probability", "top_k", "error")
# Inputs deepspark reads itself run in tasks of about this many rows (at least 4 batches), as many as a
# multiple of the task slots: each task costs ~70 ms of a core (a Parquet file, its commit, the Python
# runner), and in equal tasks no core waits for the last one alone.
_ROWS_PER_TASK = 8192
_PROGRESS_SECONDS = 0.5
_MAX_FILE_BYTES = "spark.sql.sources.binaryFile.maxLength"


# --------------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class PredictSummary:
    """What a finished prediction job did.

    ``seconds`` is the driver's wall time for the whole job (listing, reading, inference and writing);
    ``rows_per_second`` is ``rows / seconds``. ``phase_seconds`` are measured inside the tasks and summed
    over all of them: ``load`` (model loads), ``read`` (waiting for Spark to hand over input batches),
    ``decode`` (thread time spent decoding/fetching; it overlaps ``forward``), ``forward`` (model, softmax,
    top-k), ``write`` (handing output batches back to Spark, including the Parquet writer's back-pressure).
    ``model_loads`` counts loads in Python workers; ``workers`` how many distinct worker processes ran tasks;
    ``partitions`` how many tasks (input partitions) the job ran, counted by the tasks themselves.
    ``devices`` lists where tasks ran the model (``cpu``, ``cuda:0``; with the GPU Spark assigned, if any).
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
    devices: tuple[str, ...] = ()

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
            "devices": list(self.devices),
        }


@dataclass(frozen=True)
class PredictResult:
    """The predictions and, when the job ran (``output=`` was given), its summary.

    Without ``output`` the DataFrame is lazy (nothing has run) and ``summary`` is ``None``; with it, the
    DataFrame reads the written Parquet back.
    """

    dataframe: DataFrame
    summary: PredictSummary | None = None


@dataclass(frozen=True)
class PredictProgress:
    """A running predict job, as Spark's status tracker and the finished tasks' counters see it.

    ``rows_done`` counts the rows of finished tasks; ``rows_total`` is known when predict listed the input
    itself (image files, IDX files), else ``None``. ``tasks_total`` is 0 until Spark has planned the job.
    """

    rows_done: int
    rows_total: int | None
    tasks_done: int
    tasks_total: int
    seconds: float
    finished: bool = False


ProgressCallback = Callable[[PredictProgress], None]


def _task_counts(sc: SparkContext, group: str) -> tuple[int, int]:
    """(tasks done, tasks in all) over the jobs of ``group``, from Spark's status tracker."""
    tracker = sc.statusTracker()
    done = total = 0
    for job_id in tracker.getJobIdsForGroup(group):
        job = tracker.getJobInfo(job_id)
        for stage_id in job.stageIds if job is not None else ():
            stage = tracker.getStageInfo(stage_id)
            if stage is not None:
                done += stage.numCompletedTasks
                total += stage.numTasks
    return done, total


@contextmanager
def _watch(
    sc: SparkContext,
    stats: Accumulator[dict[str, Any]],
    rows_total: int | None,
    callback: ProgressCallback | None,
    group: str,
) -> Iterator[None]:
    """With a ``callback``, report the progress of job group ``group``'s Spark jobs (run by the body)
    every half second from a watcher thread, then once more when they end."""
    if callback is None:
        yield
        return
    start = time.perf_counter()
    stop = threading.Event()

    def snapshot(finished: bool = False) -> PredictProgress:
        done, total = _task_counts(sc, group)
        rows = int(stats.value.get("rows", 0))
        return PredictProgress(rows, rows_total, done, total, time.perf_counter() - start, finished)

    def watch() -> None:
        while not stop.wait(_PROGRESS_SECONDS):
            try:
                callback(snapshot())
            except Exception:  # progress is for people: never let it end the job
                _log.debug("predict progress failed", exc_info=True)

    watcher = threading.Thread(target=watch, name="deepspark-predict-progress", daemon=True)
    watcher.start()
    try:
        yield
        stop.set()
        watcher.join()
        callback(snapshot(finished=True))
    finally:
        stop.set()
        watcher.join()


# -------------------------------------------------------------------------------------------- predict
def _staging_path(target: str) -> str:
    """A hidden sibling of ``target`` to write the predictions to before they take its place."""
    target = os.path.normpath(os.path.abspath(target))
    parent, name = os.path.split(target)
    return os.path.join(parent, f".{name}.deepspark-{secrets.token_hex(4)}")


def _renamed(names: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """(input name, output name) for the identity columns: one named like an output column gets an
    ``input_`` prefix, repeated while that name is taken too (``label`` next to an ``input_label``).
    Names are compared as Spark compares them by default, ignoring case: ``Label`` next to ``label``
    is an ambiguous reference, and a Parquet write refuses it."""
    taken = {name.lower() for name in (*names, *OUTPUT_COLUMNS)}
    pairs = []
    for name in names:
        out = name
        if name.lower() in OUTPUT_COLUMNS:
            out = f"input_{name}"
            while out.lower() in taken:
                out = f"input_{out}"
            taken.add(out.lower())
        pairs.append((name, out))
    return tuple(pairs)


def _output_schema(fields: Mapping[str, Any], passthrough: Sequence[tuple[str, str]]) -> Any:
    """The predictions' schema: ``passthrough``'s columns (of the input's ``fields``, by name), then the
    prediction columns."""
    from pyspark.sql import types as T

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


def _check_replaceable(output: str, model: Any, data: Any) -> None:
    """``overwrite`` replaces ``output`` with the predictions: only an earlier Parquet output (a folder of
    Parquet files, as predict writes), never a folder of images, the model, or a folder holding the input
    (an input table read back is fine: it is read in full before the rename)."""
    target = os.path.realpath(output)
    entries = sorted(Path(target).iterdir()) if os.path.isdir(target) else []
    table = parquet_table_file(entries) is not None

    def inside(path: str) -> bool:
        return os.path.commonpath([target, path]) == target

    sources = [("the model", os.path.realpath(os.fspath(model)))]
    if isinstance(data, str | os.PathLike) and is_local(os.fspath(data)):
        text = local_path(os.fspath(data))
        glob_at = min((i for i, c in enumerate(text) if c in GLOB_CHARS), default=None)
        root = text if glob_at is None else os.path.dirname(text[:glob_at]) or "."
        sources.append(("the input", os.path.realpath(root)))
    for what, path in sources:
        if inside(path) and not (what == "the input" and path == target and table):
            raise ConfigError(
                f"output: {output} holds {what} ({path}); overwrite would replace it with the predictions: "
                "choose another output"
            )
    if not table and not (os.path.isdir(target) and not entries):  # an empty folder loses nothing
        raise ConfigError(
            f"output: {output} exists and is not an earlier predict output (a folder of Parquet files); "
            "overwrite replaces only those: choose another output, or remove it yourself"
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
    device: str = "auto",
    progress: ProgressCallback | None = None,
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

    ``device`` (``auto``, ``cpu``, ``cuda``): each task runs the model on the GPU Spark assigned it
    (``spark.task.resource.gpu.amount``) when ``auto`` finds it usable, else on the CPU with
    ``spark.task.cpus`` threads; ``cuda`` insists, and a GPU it cannot use fails the job with the address
    and why; ``cpu`` ignores GPUs.

    Output columns: the input's identity columns (e.g. ``path``, ``url``, or every non-input column of a
    DataFrame; a name that clashes with an output column gets an ``input_`` prefix), ``label``,
    ``label_index``, ``probability``, ``top_k`` (``array<struct<label, probability>>``, most likely first;
    ``top_k`` is capped at the number of classes) and ``error`` (null when the row went through; otherwise
    why it did not, and the prediction columns are null). A bad row never fails the job.

    With ``output``, the predictions are written as Parquet, and the result has a :class:`PredictSummary`;
    without it, the returned DataFrame is lazy and ``summary`` is ``None``. ``progress``, called from a
    watcher thread while the job runs (and once when it ends), receives :class:`PredictProgress`. Every
    parameter is checked, and the model loaded once on the driver to check it, before any Spark job starts.
    """
    from deepspark.spark import (
        DEVICES,
        check_gpu_request,
        column,
        job_group,
        release_broadcast,
        run_job,
        session,
        task_cpus,
    )

    top_k = check_positive_int("top_k", top_k)
    batch_size = check_positive_int("batch_size", batch_size)
    decode_threads = check_positive_int("decode_threads", decode_threads)
    check_choice("backend", backend, BACKENDS)
    check_choice("device", device, DEVICES)
    if progress is not None and not callable(progress):
        raise fail("progress", "a callable taking a PredictProgress", progress)
    if not os.path.exists(os.fspath(model)):
        raise fail("model", "an existing checkpoint directory or model file", os.fspath(model))
    output_path = os.fspath(output) if output is not None else None
    if (
        output_path is not None
        and is_local(output_path)
        and os.path.exists(local_path(output_path))
        and not overwrite
    ):
        raise ConfigError(
            f"output: {output_path} already exists; pass overwrite=True (CLI: --overwrite) or choose another path"
        )
    if output_path is not None and is_local(output_path):
        check_writable(local_path(output_path), name="output")  # not after the job: Spark's write fails late
        if overwrite and os.path.exists(local_path(output_path)):
            _check_replaceable(local_path(output_path), model, data)
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
    check_gpu_request(spark, device)
    source = resolve_input(spark, data, input_column, artifact.preprocess.input_shape)
    channels = artifact.preprocess.input_shape[0]
    if source.kind in (InputKind.IMAGE, InputKind.FILE, InputKind.URL) and channels not in (1, 3):
        raise ConfigError(  # every row would be an error row, at run time
            f"model: its input has {channels} channels, but image files decode to 1 (grey) or 3 (RGB); "
            f"give its inputs as tensors or raw pixels of {channels} channels"
        )
    df = source.dataframe
    slices = 0  # local files: the tasks, each predicting a slice of them
    if source.ours and source.rows_hint:
        from deepspark.spark import total_slots

        slots = total_slots(spark)
        per_task = max(_ROWS_PER_TASK, 4 * batch_size)
        target = min(source.rows_hint, slots * math.ceil(source.rows_hint / (slots * per_task)))
        if source.files is not None:
            slices = target
        elif df is not None and df.rdd.getNumPartitions() > target:
            df = df.coalesce(target)
    if source.files is not None:
        df = spark.range(0, slices, 1, max(slices, 1)).withColumnRenamed("id", "path")
    assert df is not None
    passthrough = _renamed(source.passthrough)
    threads = task_cpus(spark)
    columns = list(dict.fromkeys([src for src, _ in passthrough] + [source.column]))
    # pyspark's mapInArrow looks its input's columns up by their unquoted names, which reads a column
    # "a.b" as field b of a column a: the task sees them under plain names of its own.
    plain = {name: f"_{i}" for i, name in enumerate(columns)}
    max_file_bytes = None
    if source.kind is InputKind.FILE:
        # The cap Spark's binaryFile source puts on a file; it read these files before deepspark did.
        max_file_bytes = int(spark.conf.get(_MAX_FILE_BYTES) or 2**31 - 1)
    plan = TaskPlan(
        model_id=artifact.model_id,
        backend=chosen,
        device=device,
        threads=threads,
        batch_size=batch_size,
        top_k=top_k,
        kind=source.kind,
        input_column=plain[source.column],
        passthrough=tuple((plain[src], out) for src, out in passthrough),
        class_names=class_names,
        preprocess=artifact.preprocess,
        url_policy=url_policy or UrlPolicy(),
        decode_threads=decode_threads,
        max_file_bytes=max_file_bytes,
    )
    from pyspark.sql.types import StringType, StructField

    # Local files deepspark listed: the range's slice numbers become binaryFile's ``path`` in the task.
    fields = (
        {"path": StructField("path", StringType(), False)}
        if source.files is not None
        else {f.name: f for f in df.schema.fields}
    )
    schema = _output_schema(fields, passthrough)
    # Spark hands a timestamp column over in the session's time zone. Before the model is broadcast: a
    # column Arrow cannot carry (an interval of years) fails here, and left that broadcast behind.
    arrow_schema = to_arrow_schema(schema, timezone=spark.conf.get("spark.sql.session.timeZone"))
    sc = spark.sparkContext
    model_bc = sc.broadcast(artifact)
    files_bc = sc.broadcast(source.files) if source.files is not None else None
    stats: Accumulator[dict[str, Any]] = sc.accumulator({}, TaskStats())  # type: ignore[arg-type]
    column_name = plan.input_column

    def task(batches: Iterator[Any]) -> Iterator[Any]:
        if files_bc is not None:
            batches = listed_files(batches, files_bc, slices, column_name)
        return run_task(batches, plan, model_bc, stats, arrow_schema)

    selected = df.select(*[column(name).alias(plain[name]) for name in columns])
    result = selected.mapInArrow(task, schema)
    if output_path is None:
        return PredictResult(result)

    # A local output is written next to its place and renamed into it once the job has succeeded: Spark's
    # own "overwrite" deletes the old output before the job runs (and an input read from it), and a
    # failed job leaves an empty folder behind that the next run's existence check then refuses.
    staging = _staging_path(local_path(output_path)) if is_local(output_path) else None
    start = time.perf_counter()
    if staging is None:
        write = functools.partial(
            result.write.mode("overwrite" if overwrite else "errorifexists").parquet, output_path
        )
    else:
        write = functools.partial(
            result.write.mode("errorifexists").parquet, f"file://{staging}"
        )  # renamed later
    try:
        group = job_group("deepspark-predict")
        with _watch(sc, stats, source.rows_hint, progress, group):
            failure = run_job(sc, write, group=group)  # Ctrl-C: cancelled, tasks gone
        if failure is not None:
            raise failure
    except BaseException as exc:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, Exception) and not isinstance(exc, DeepsparkError):
            from deepspark.slots import root_cause

            # A failed job is a failure at run time: its cause in one line, not Spark's Java trace.
            if "[TASK_WRITE_FAILED]" in str(exc):  # the cause (a full disk, say) in the output's words
                raise RunError(f"predict: writing {output_path} failed: {root_cause(exc)}") from None
            raise RunError(f"predict: the Spark job failed: {root_cause(exc)}") from None
        raise
    finally:
        release_broadcast(model_bc)
        if files_bc is not None:
            release_broadcast(files_bc)
    if staging is not None:
        try:
            replace_dir(staging, local_path(output_path), replace=overwrite)
        except FileExistsError:
            # Another command (a second predict into it) wrote the output while this job ran: it stays.
            shutil.rmtree(staging, ignore_errors=True)
            raise ConfigError(
                f"output: {output_path} was written by another command while these predictions were made; "
                "it was left as it is: pass overwrite=True (CLI: --overwrite) or choose another path"
            ) from None
    seconds = time.perf_counter() - start
    totals = dict(stats.value)
    summary = PredictSummary(
        rows=int(totals.get("rows", 0)),
        errors=int(totals.get("errors", 0)),
        seconds=seconds,
        rows_per_second=totals.get("rows", 0) / seconds if seconds > 0 else 0.0,
        model_loads=int(totals.get("loads", 0)),
        workers=len(totals.get("pids", ())),
        # Counted by the tasks, not df.rdd.getNumPartitions(): under adaptive execution (Spark's default)
        # that runs an input's shuffle as a job of its own, outside the group (Ctrl-C, one-line errors),
        # and the write then reads the input again.
        partitions=int(totals.get("tasks", 0)),
        backend=chosen,
        model_format=model_format,
        batch_size=batch_size,
        threads_per_task=threads,
        phase_seconds={name: float(totals.get(f"seconds_{name}", 0.0)) for name in PHASES},
        output=output_path,
        devices=tuple(sorted(totals.get("devices", ()))),
    )
    if summary.model_loads > summary.workers:
        _log.warning(
            "the model was loaded %d times by %d Python workers: is spark.python.worker.reuse off?",
            summary.model_loads,
            summary.workers,
        )
    _log.info("predict: %s", summary.to_dict())
    # Read back by its absolute, escaped URI: Spark globs what it reads (`out[1]` as `out1`), and took a
    # relative `out:1` for a URI of scheme `out`: a trace after the predictions were written.
    # With the schema it was written with: inferring it ran a Spark job to read a file's footer.
    written = (
        output_path if staging is None else for_spark("file://" + os.path.abspath(local_path(output_path)))
    )
    return PredictResult(spark.read.schema(result.schema).parquet(written), summary)
