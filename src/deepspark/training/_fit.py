"""``fit()``: train a model on Spark, data-parallel over a DataFrame's partitions.

Strategies: ``local`` (one process, the default for one worker), ``average`` (SparkNet's model
averaging every ``tau`` steps), ``allreduce`` (synchronous data-parallel SGD: gradients all-reduced
every step by a torch.distributed gang in one Spark barrier job, :mod:`deepspark.training.allreduce`) and
``async`` (asynchronous SGD against a parameter server on the driver, stale-synchronous with bound
``staleness``: :mod:`deepspark.training.paramserver`). The run directory holds ``config.json``,
``history.csv`` (a row per round; ``attempt`` counts the gang restarts of ``allreduce``), ``curve.png``,
``checkpoint/`` (everything a resume needs, rewritten atomically) and ``model/``, the final model as a
deepspark checkpoint that ``deepspark predict`` takes as is.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import logging
import math
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

import numpy as np
import torch

from deepspark import rundir
from deepspark._compat import dataframe_to_arrow
from deepspark._optional import skip_unless
from deepspark.errors import ConfigError, DeepsparkError, RunError
from deepspark.slots import SameFailure, root_cause, run_slots, short_error
from deepspark.spark import DEVICES, cancel_group, job_group, run_job, speculative_copy
from deepspark.training._model import FACTORY_KEY, TrainModel, factory_of
from deepspark.training.average import AverageSettings, RoundRecord, RoundServer, TaskSpec, average_task
from deepspark.training.frame import (
    KEY,
    FrameLayout,
    describe_frame,
    in_own_group,
    keyed_rows,
)
from deepspark.training.loop import DataCursor, TrainConfig, evaluate
from deepspark.training.shares import HeldRows, broadcast_shares
from deepspark.validation import (
    check_choice,
    check_heartbeat_timeout,
    check_int,
    check_number,
    check_positive_int,
    check_size,
    data_kind,
)
from deepspark.wire import DEFAULT_HEARTBEAT_TIMEOUT, heartbeat_interval

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

    from deepspark.models import ModelSpec, Preprocess

__all__ = ["STRATEGIES", "FitResult", "fit"]

_log = logging.getLogger(__name__)
_TASK_SCHEMA = "worker long, rounds long"

STRATEGIES = ("local", "average", "allreduce", "async")
# Errors a worker raises on purpose (a divergence, an unusable GPU, bad data): a resubmitted task would
# raise them again, so they stop the run at once instead of being retried.
_DETERMINISTIC = ("DivergenceError", "ConfigError", "DatasetError", "SpecError", "CheckpointError")
# Python exceptions that may pass (a connection, a timeout, memory the other tasks held): a worker's job
# that raised one is retried even when every worker raised it.
_TRANSIENT = (
    "OSError",
    "ConnectionError",
    "ConnectionResetError",
    "ConnectionAbortedError",
    "ConnectionRefusedError",
    "BrokenPipeError",
    "TimeoutError",
    "ProtocolError",
    "PeerClosed",
    "EOFError",
    "MemoryError",
)
CONFIG_FILE, HISTORY, CURVE, CHECKPOINT, MODEL = (
    "config.json",
    "history.csv",
    "curve.png",
    "checkpoint",
    "model",
)
HISTORY_COLUMNS = (
    "round",
    "epoch",
    "samples",
    "workers",
    "train_loss",
    "test_accuracy",
    "test_loss",
    "seconds",
    "compute_s",
    "comm_s",
    "wait_s",
    "bytes",
    "elapsed_s",
    "staleness",
    "clock_gap",
    "attempt",
)
# Asynchronous SGD pushes after every step by default (deepspark.training.paramserver).
ASYNC_SETTINGS = AverageSettings(tau=1)
# Distributed strategies reset their inner optimizer every round, so momentum SGD is their default.
DISTRIBUTED_CONFIG = TrainConfig(
    optimizer="momentum", learning_rate=0.02, batch_size=64, epochs=4, lr_schedule="cosine", seed=0
)


@dataclass(frozen=True)
class FitResult:
    """The outcome of :func:`fit`."""

    run_dir: Path
    model_dir: Path  # the final model's folder
    history: tuple[dict[str, Any], ...]
    test_accuracy: float | None
    wall_s: float
    time_split: Mapping[str, float] = field(default_factory=dict)
    bytes_per_epoch: float = 0.0
    devices: Mapping[int, str] = field(default_factory=dict)  # worker -> device it trained on
    model_path: Path | None = None  # what `deepspark predict --model` takes: model_dir, or its model.onnx


@dataclass(frozen=True)
class _Data:
    """Training rows (a keyed DataFrame, or arrays the driver holds), test arrays on the driver, and how
    to read both."""

    frame: DataFrame | None  # a user's DataFrame as keyed_rows selects it; None when ``held``
    layout: FrameLayout
    preprocess: Preprocess
    class_names: tuple[str, ...]
    test_inputs: torch.Tensor | None
    test_labels: torch.Tensor | None
    digest: str  # of the training rows (config.json's "digest"): a resume on other rows is refused
    held: HeldRows | None = None  # a dataset's rows, in the driver's memory: broadcast to the workers


@dataclass(frozen=True)
class _Run:
    """One run's fixed context, handed whole to each strategy's driver function: a new setting is a new
    field here, not a keyword threaded through every strategy."""

    spark: Any  # the SparkSession; None for the local strategy
    data: _Data
    model: TrainModel
    config: TrainConfig
    settings: AverageSettings
    workers: int
    run_path: Path
    resume: bool
    threads: int
    checkpoint_seconds: float
    started: float  # perf_counter() when fit() was called
    device: str = "auto"
    staleness: int = 2
    heartbeat_timeout: float | None = DEFAULT_HEARTBEAT_TIMEOUT
    slow_worker: tuple[int, float] | None = None
    on_round: Callable[[dict[str, Any]], None] | None = None
    worker_memory: int | None = None  # bytes of rows a worker keeps in memory (None: task_memory's default)


def fit(
    data: Any,
    model: Any = "lenet",
    *,
    strategy: str | None = None,
    workers: int = 1,
    config: TrainConfig | Mapping[str, Any] | None = None,
    average: AverageSettings | Mapping[str, Any] | None = None,
    staleness: int | None = None,
    heartbeat_timeout: float | None = DEFAULT_HEARTBEAT_TIMEOUT,
    run_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    test_data: Any = None,
    feature_column: str = "image",
    label_column: str = "label",
    input_shape: tuple[int, ...] | None = None,
    num_classes: int | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    limit_train: int | None = None,
    limit_test: int | None = None,
    threads_per_worker: int = 1,
    checkpoint_seconds: float = 10.0,
    master: str | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    slow_worker: tuple[int, float] | None = None,
    device: str = "auto",
    worker_memory: int | str | None = None,
) -> FitResult:
    """Train ``model`` on ``data`` with ``workers`` Spark tasks.

    ``data`` is a dataset name or MNIST-layout directory (its test split is evaluated after every
    epoch), or a Spark DataFrame with ``feature_column`` (raw image bytes, encoded image files such as
    PNG or JPEG, or arrays) and an integral ``label_column`` (``test_data``, another such DataFrame, is
    optional). ``model`` is a zoo name, a spec, or a zero-argument factory returning a
    ``torch.nn.Module``: called without arguments (it is not told the input shape or class count), its
    module is checked against the data before any job, and the final model is ONNX (``model_path``).
    ``strategy`` defaults to ``local`` for one worker and ``average`` otherwise. Every argument is
    checked, and the run directory created, before any training job starts; ``resume=True`` continues
    the run in ``run_dir`` from its last checkpoint with the settings saved there (a factory's run must
    be given the factory again).

    ``average`` holds the distributed strategies' knobs (:class:`AverageSettings`); ``async`` uses its
    ``tau`` (steps between pushes, 1 unless given) and takes ``staleness`` (>= 1, default 2; refused
    with another strategy), the most pushes a worker may be ahead of the slowest live one. A resumed run
    takes its settings from its ``config.json``: giving another strategy, workers, config, average
    settings, staleness, device, threads or model with ``resume=True`` is refused, not ignored.
    ``slow_worker=(index, factor)`` is a benchmark and test knob of ``average`` and ``async``: worker
    ``index`` sleeps ``factor - 1`` times its compute time after each batch of steps, to show how the
    strategy copes with a straggler. ``device``: ``auto`` trains each worker on the GPU Spark assigned
    its task (``spark.task.resource.gpu.amount``) when CUDA can use it, else on the CPU; ``cuda`` makes
    an unusable or missing GPU an error; ``cpu`` ignores GPUs.

    ``heartbeat_timeout`` (seconds, at least 1; None: no clock) bounds how long a worker that owes the
    driver a frame (its rows once it has read its partition, which it connects before; an ``average`` or
    ``async`` push, an ``allreduce`` rank's round or end) may stay
    silent: its task sends heartbeats meanwhile, so a silent one is frozen (a deadlock, a hung GPU
    kernel) while its executor lives on. An ``average`` or ``async`` worker is then lost as if its task
    had failed, and its Spark job is cancelled and resubmitted; an ``allreduce`` gang's job is cancelled
    and the gang restarted from its last round. Not saved with the run: a resumed run takes the one
    given. ``local`` has no such clock and refuses another value than the default.

    ``worker_memory`` (bytes, or a size such as ``"4g"``) bounds the rows a worker of ``average``,
    ``async`` or ``allreduce`` keeps in memory: a partition larger than that is kept in a file in
    Spark's local directory and read back a batch at a time (the same steps, from disk or the page
    cache). By default, half of ``spark.executor.pyspark.memory`` where it is set, else a quarter of the
    memory the worker's host has available when it reads. Not saved with the run.
    """
    started = time.perf_counter()
    _check_data_arguments(
        data,
        test_data=test_data,
        num_classes=num_classes,
        input_shape=input_shape,
        data_dir=data_dir,
        limit_train=limit_train,
        limit_test=limit_test,
    )
    if isinstance(data, os.PathLike):
        # A path names a directory, never a registered dataset, though Path("./mnist") prints as "mnist".
        data = str(Path(data).expanduser().absolute())
    factory = factory_of(model)
    saved: dict[str, Any] = {}
    if resume:
        if run_dir is None:
            raise ConfigError("resume: give the run_dir to continue")
        saved = _read_config(Path(run_dir))
        _refuse_resume_changes(
            run_dir,
            saved,
            strategy=strategy,
            workers=workers,
            config=config,
            average=average,
            staleness=staleness,
            device=device,
            threads_per_worker=threads_per_worker,
            model=model if isinstance(model, str) and model != "lenet" else None,
        )
        strategy, workers = saved["strategy"], saved["workers"]
        config, average = saved["config"], saved["average"]
        staleness = saved.get("staleness") if strategy == "async" else None  # others saved an unused 2
        device = saved.get("device", device)
        model = _resumed_model(saved["model"], factory, run_dir)
        threads_per_worker = saved["threads_per_worker"]
        if _data_entry(saved.get("data")) != _data_entry(data):  # a DataFrame too: it has another preprocess
            raise ConfigError(
                f"resume: the run in {run_dir} trained on {saved.get('data')!r}, not {_data_entry(data)!r}"
            )
        limit_train, limit_test = saved.get("limit_train"), saved.get("limit_test")
    check_positive_int("workers", workers)
    check_positive_int("threads_per_worker", threads_per_worker)
    strategy = strategy or ("local" if workers == 1 else "average")
    check_choice("strategy", strategy, STRATEGIES)
    if strategy == "local" and workers != 1:
        raise ConfigError(f"workers: strategy 'local' runs in one process; expected 1, got {workers}")
    if strategy == "local" and master is not None:
        raise ConfigError(
            f"master: strategy 'local' trains in this process, not on Spark, so master {master!r} would be "
            "ignored; train on the cluster with --workers N (strategy average), or drop --master"
        )
    cores = os.cpu_count() or 1
    if strategy == "local" and not resume and threads_per_worker > cores:
        # No Spark slot bounds it here: torch would start them all in this process (100000 crash it).
        raise ConfigError(
            f"threads_per_worker: strategy 'local' trains in this process, on this machine's {cores} cores; "
            f"expected at most {cores}, got {threads_per_worker}"
        )
    if staleness is not None and strategy != "async":
        raise ConfigError(
            f"staleness: bounds the async strategy's parameter server; strategy {strategy!r} has no "
            "staleness, drop it"
        )
    staleness = 2 if staleness is None else staleness
    check_int("staleness", staleness, minimum=1)
    heartbeat_timeout = check_heartbeat_timeout(heartbeat_timeout)
    if heartbeat_timeout != DEFAULT_HEARTBEAT_TIMEOUT and strategy == "local":
        raise ConfigError(
            "heartbeat_timeout: watches the workers of the average, allreduce and async strategies; "
            "strategy 'local' trains in this process, drop it"
        )
    check_choice("device", device, DEVICES)
    if worker_memory is not None:
        worker_memory = check_size("worker_memory", worker_memory)
        if strategy == "local":
            raise ConfigError(
                "worker_memory: bounds the rows each worker of the average, allreduce and async strategies "
                "keeps in memory; strategy 'local' trains in this process, drop it"
            )
    _check_slow_worker(slow_worker, strategy, workers)
    train_config = _train_config(config, strategy)
    settings = _settings(average, strategy, resume=resume)
    if factory is not None and strategy == "local":
        raise ConfigError(
            "strategy: 'local' trains a zoo model or spec; a model factory trains with 'average' "
            "(one worker at tau 1 takes the one-process steps)"
        )
    made = TrainModel.from_factory(factory) if factory is not None else None  # before any Spark job
    created = run_dir is None or not os.path.exists(run_dir)  # a name too long: rundir.prepare says so
    top = rundir.first_missing(run_dir) if run_dir is not None else None  # with the parents it makes
    # Checked (absent or empty, writable) and left unmade: rundir.exclusive makes and holds it.
    run_path = (
        Path(tempfile.mkdtemp(prefix="deepspark-train-"))
        if run_dir is None
        else rundir.prepare(run_dir, resume=resume)
    )
    # Held to the end: a second command in this directory is refused, not interleaved with this one.
    with rundir.exclusive(run_path, new=not resume):
        if resume:
            rundir.restore_dir(run_path / CHECKPOINT)
        if resume and not (run_path / CHECKPOINT).is_dir():
            # Stopped before its first checkpoint (the driver killed, SIGTERM, Ctrl-C in local's first epoch):
            # no finished round to continue from, and a new run there is refused. Start again with the saved
            # settings; history rows without a checkpoint are redone, as after any resume.
            _log.warning("resume: %s has no %s/ yet; training it from the start", run_path, CHECKPOINT)
            (run_path / HISTORY).unlink(missing_ok=True)
            resume = False
        try:
            from deepspark.spark import (
                check_gpu_request,
                check_task_cpus,
                session,
                task_cpus,
                total_cores,
                total_slots,
            )

            if strategy == "local":
                return _fit_local(
                    data,
                    model,
                    train_config,
                    run_path,
                    resume,
                    data_dir,
                    limit_train,
                    limit_test,
                    threads_per_worker,
                    started,
                    on_round,
                    device,
                )
            # Before the JVM too, as tune checks threads_per_trial: a new session's spark.task.cpus above its
            # executors' cores fails in Spark's constructor, whose message names spark.task.cpus, not threads.
            check_task_cpus("threads_per_worker", threads_per_worker, master=master)
            spark = session(master, app_name="deepspark-train", conf={"spark.task.cpus": threads_per_worker})
            # The session's (an active one keeps its own): a worker of more threads than an executor's cores
            # made 0 slots, counted as 1, and trained oversubscribed on every core of it.
            check_task_cpus("threads_per_worker", threads_per_worker)
            check_gpu_request(spark, device)
            slots = total_slots(spark, threads_per_worker)
            if workers > slots:
                cpus = task_cpus(spark)  # an active session keeps its own: a worker runs the larger count
                why = (
                    f"; threads_per_worker {threads_per_worker} is above the session's spark.task.cpus {cpus}"
                    if threads_per_worker > cpus
                    else ""
                )
                raise ConfigError(
                    f"workers: the cluster has {slots} task slot(s) ({total_cores(spark)} cores / "
                    f"{max(threads_per_worker, cpus)} thread(s) per worker{why}), and every worker of a round runs "
                    f"at once; expected at most {slots}, got {workers}"
                )
            prepared = _prepare_data(
                data,
                test_data=test_data,
                feature_column=feature_column,
                label_column=label_column,
                input_shape=input_shape,
                num_classes=num_classes,
                data_dir=data_dir,
                limit_train=limit_train,
                limit_test=limit_test,
                check_shape=made.check_input if made is not None else None,
            )
            train_model = _train_model(model, made, prepared.layout)
            if resume and saved.get("rows") is not None and int(saved["rows"]) != prepared.layout.rows:
                # The checkpoint's data positions (every worker's rows) and the step budget are the saved
                # data's: other data would be trained on silently, in part, or crash a worker.
                raise ConfigError(
                    f"resume: the run in {run_path} trained on {saved['rows']} rows, but the data given now has "
                    f"{prepared.layout.rows}; resume it with the data it was started on"
                )
            if resume and saved.get("digest") is not None and saved["digest"] != prepared.digest:
                raise ConfigError(
                    f"resume: the run in {run_path} trained on other rows than the data given now holds (as many, "
                    f"{prepared.layout.rows}, but other labels or features); resume it with the data it was "
                    "started on (a DataFrame that draws random numbers must be pinned first: df.localCheckpoint())"
                )
            inputs = _inputs_entry(prepared)
            if resume and saved.get("inputs") is not None and saved["inputs"] != inputs:
                # The same rows read in another shape, column or scale would train a scrambled continuation.
                changed = sorted(k for k in inputs if saved["inputs"].get(k) != inputs[k])
                raise ConfigError(
                    f"resume: the run in {run_path} read its data as "
                    + ", ".join(f"{k}={saved['inputs'].get(k)!r}" for k in changed)
                    + ", but now as "
                    + ", ".join(f"{k}={inputs[k]!r}" for k in changed)
                    + "; resume it with the data and settings it was started on"
                )
            if not resume:
                _write_config(
                    run_path,
                    {
                        "strategy": strategy,
                        "workers": workers,
                        "config": train_config.to_dict(),
                        "average": asdict(settings),
                        "staleness": staleness,
                        "device": device,
                        "model": train_model.config_entry(model),
                        "threads_per_worker": threads_per_worker,
                        "data": _data_entry(data),
                        "limit_train": limit_train,
                        "limit_test": limit_test,
                        "rows": prepared.layout.rows,
                        "inputs": inputs,
                        "digest": prepared.digest,
                    },
                )
            run = _Run(
                spark=spark,
                data=prepared,
                model=train_model,
                config=train_config,
                settings=settings,
                workers=workers,
                run_path=run_path,
                resume=resume,
                threads=threads_per_worker,
                checkpoint_seconds=checkpoint_seconds,
                started=started,
                device=device,
                staleness=staleness,
                heartbeat_timeout=heartbeat_timeout,
                slow_worker=(int(slow_worker[0]), float(slow_worker[1])) if slow_worker is not None else None,
                on_round=on_round,
                worker_memory=worker_memory,
            )
            if strategy == "async":
                return _fit_async(run)
            if strategy == "allreduce":
                return _fit_allreduce(run)
            return _fit_average(run)
        except BaseException:
            if created and not (run_path / HISTORY).exists():
                # Nothing trained: leave nothing half-written.
                shutil.rmtree(top or run_path, ignore_errors=True)
            raise


# ------------------------------------------------------------------------------------------- inputs
def _train_config(config: TrainConfig | Mapping[str, Any] | None, strategy: str) -> TrainConfig:
    if isinstance(config, TrainConfig):
        return config
    base = DISTRIBUTED_CONFIG if strategy != "local" else None
    if base is None:
        from deepspark.training.loop import DEFAULT_TRAIN_CONFIG

        base = DEFAULT_TRAIN_CONFIG
    return TrainConfig.from_dict({**base.to_dict(), **dict(config or {})})


def _settings(
    average: AverageSettings | Mapping[str, Any] | None, strategy: str, *, resume: bool = False
) -> AverageSettings:
    if isinstance(average, AverageSettings):  # the settings that differ from the defaults count as given
        defaults = asdict(AverageSettings())
        given = {k: v for k, v in asdict(average).items() if v != defaults[k]}
    else:
        given = dict(average or {})
    if strategy == "local" and given:
        raise ConfigError(
            f"average: {sorted(given)} set how distributed workers combine their steps; strategy 'local' "
            "trains one process: drop them, or choose strategy 'average' (--workers 1 takes the local steps)"
        )
    if strategy == "allreduce" and given and not resume:  # a resume passes the saved settings back
        raise ConfigError(
            f"average: {sorted(given)} set how the average strategy combines its workers' steps; strategy "
            "'allreduce' all-reduces the gradients every step and takes none of them: drop them, or choose "
            "strategy 'average'"
        )
    if "tau" in given and given.get("round_seconds") is not None:
        raise ConfigError(
            "average: tau and round_seconds both set the length of a round; give one (round_seconds "
            "replaces tau)"
        )
    # async's own defaults under what was given: AverageSettings() under async pushed every 50 steps.
    base = asdict(ASYNC_SETTINGS) if strategy == "async" else {}
    settings = AverageSettings(**{**base, **given})
    if strategy == "async":
        if settings.round_seconds is not None:
            raise ConfigError(
                f"round_seconds: strategy 'async' pushes every tau steps; expected None, got {settings.round_seconds!r}"
            )
        if settings.outer != "plain":
            raise ConfigError(
                f"outer: strategy 'async' applies each push as it comes; expected 'plain', got {settings.outer!r}"
            )
    nesterov = sorted({"outer_learning_rate", "outer_momentum"} & set(given))
    if nesterov and settings.outer != "nesterov" and not resume:  # a resume passes the saved settings back
        where = (
            "strategy 'async' takes no outer step" if strategy == "async" else "outer is 'plain' (averaging)"
        )
        raise ConfigError(
            f"average: {nesterov} set the Nesterov outer step, but {where}, which would ignore them: drop "
            "them" + ("" if strategy == "async" else ", or give outer 'nesterov' (--outer nesterov)")
        )
    return settings


def _check_data_arguments(data: Any, **given: Any) -> None:
    """Refuse the arguments that ``data``'s kind would ignore: a dataset name or directory brings its own
    test split, classes and input shape; the limits and ``data_dir`` select from a dataset, not a DataFrame.
    Anything else (a pandas DataFrame, say) is refused here, for every strategy."""
    from pyspark.sql import DataFrame

    if not isinstance(data, str | os.PathLike | DataFrame):
        raise ConfigError(
            "data: expected a dataset name, an MNIST-layout directory or a Spark DataFrame, "
            f"got {data_kind(data)}"
        )
    named = isinstance(data, str | os.PathLike)
    ignored = (
        ("test_data", "num_classes", "input_shape") if named else ("data_dir", "limit_train", "limit_test")
    )
    for name in ignored:
        if given[name] is not None:
            hint = (
                "a dataset name or directory brings its own test split, classes and input shape"
                if named
                else "it selects from a dataset name or directory; for a DataFrame, select the rows first "
                "(df.limit(n), test_data.limit(n))"
            )
            raise ConfigError(f"{name}: {hint}; expected None, got {given[name]!r}")
    for name in ("limit_train", "limit_test") if named else ():
        if given[name] is not None:  # named here, not as the subset's own train / test
            check_int(name, given[name], minimum=0)


def _check_slow_worker(slow_worker: Any, strategy: str, workers: int) -> None:
    if slow_worker is None:
        return
    if strategy not in ("average", "async"):
        raise ConfigError(
            f"slow_worker: only strategies 'average' and 'async' take it; expected None, got {slow_worker!r}"
        )
    if not isinstance(slow_worker, tuple | list) or len(slow_worker) != 2:
        raise ConfigError(f"slow_worker: expected (worker index, factor >= 1), got {slow_worker!r}")
    check_int("slow_worker index", slow_worker[0], minimum=0, maximum=workers - 1)
    check_number("slow_worker factor", slow_worker[1], low=1)


def _write_config(path: Path, config: Mapping[str, Any]) -> None:
    rundir.write_file_atomic(path / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True).encode("utf-8"))


# What every training run's config.json holds and a resume reads (a tune study's has other keys).
_RUN_KEYS = ("strategy", "workers", "config", "average", "model", "threads_per_worker")


def _read_config(path: Path) -> dict[str, Any]:
    try:
        saved = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"resume: {path} is not a deepspark training run ({CONFIG_FILE}: {exc})") from exc
    missing = [key for key in _RUN_KEYS if key not in saved] if isinstance(saved, dict) else list(_RUN_KEYS)
    if missing:
        raise ConfigError(
            f"resume: {path} is not a deepspark training run ({CONFIG_FILE} has no {', '.join(missing)})"
        )
    return dict(saved)


_KIND_WORDS = {"bytes": "raw pixel bytes", "image": "encoded image files", "array": "arrays of numbers"}


def _prepare_data(
    data: Any,
    *,
    test_data: Any,
    feature_column: str,
    label_column: str,
    input_shape: tuple[int, ...] | None,
    num_classes: int | None,
    data_dir: str | os.PathLike[str] | None,
    limit_train: int | None,
    limit_test: int | None,
    check_shape: Callable[[tuple[int, int, int]], None] | None = None,
) -> _Data:
    """The training rows, test arrays and preprocess; ``check_shape(input shape)`` runs before any job."""
    from pyspark.sql import DataFrame

    from deepspark.models import Preprocess

    if isinstance(data, DataFrame):
        layout = describe_frame(
            data,
            feature_column=feature_column,
            label_column=label_column,
            input_shape=input_shape,
            num_classes=num_classes,
            check_shape=check_shape,
        )
        preprocess = Preprocess(input_shape=layout.shape, mean=(0.0,), std=(1.0,))
        if not layout.pixels:
            # Arrays train as they are: the model's record must say so (scale 1), or predict, which puts
            # every input through it, would feed the model the arrays divided by 255.
            preprocess = replace(preprocess, scale=1.0)
        frame = keyed_rows(data, layout)
        test_x = test_y = None
        if test_data is not None:
            test_layout = describe_frame(
                test_data,
                feature_column=feature_column,
                label_column=label_column,
                input_shape=layout.shape,
                num_classes=layout.num_classes,
                argument="test_data",
            )
            if test_layout.pixels != layout.pixels:
                # Pixels (bytes, image files) are scaled to 0..1 by the preprocess; arrays are taken as they
                # are: a test set of the other kind would be evaluated on another scale without a word.
                raise ConfigError(
                    f"test_data: its feature column holds {_KIND_WORDS[test_layout.kind]} but the training "
                    f"data's holds {_KIND_WORDS[layout.kind]}; give both in the same form"
                )
            test_x, test_y = _collect(test_data, test_layout, preprocess)
        return _Data(
            frame=frame,
            layout=layout,
            preprocess=preprocess,
            class_names=tuple(str(i) for i in range(layout.num_classes)),
            test_inputs=test_x,
            test_labels=test_y,
            digest=layout.digest,
        )
    from deepspark.data.record import arrays_sha256

    dataset = _load(data, data_dir, limit_train, limit_test)
    if len(dataset.train_labels) == 0:
        raise ConfigError("limit_train: the training split would be empty; give at least 1")
    if check_shape is not None:
        check_shape(tuple(dataset.input_shape))
    preprocess = Preprocess(input_shape=dataset.input_shape, mean=tuple(dataset.mean), std=tuple(dataset.std))
    images = np.asarray(dataset.train_images)
    layout = FrameLayout(
        feature_column=feature_column,
        label_column="label",
        kind="bytes",
        shape=dataset.input_shape,
        rows=len(dataset.train_labels),
        num_classes=dataset.num_classes,
    )
    return _Data(
        frame=None,
        held=HeldRows(images.reshape(len(images), *dataset.input_shape), np.asarray(dataset.train_labels)),
        layout=layout,
        preprocess=preprocess,
        class_names=tuple(dataset.class_names),
        test_inputs=preprocess.apply(dataset.test_images) if len(dataset.test_labels) else None,
        test_labels=torch.as_tensor(dataset.test_labels) if len(dataset.test_labels) else None,
        digest=f"sha256:{arrays_sha256(dataset.train_images, dataset.train_labels)}",
    )


def _data_entry(data: Any) -> str:
    """How config.json names the data: a registered dataset by its name, a directory by its absolute path
    (`train --resume` from another working directory would read another dataset of that relative name)."""
    from deepspark.data import DATASETS

    if not isinstance(data, str | os.PathLike):
        return "DataFrame"
    name = os.fspath(data)
    if name in DATASETS or name == "DataFrame":
        return name
    return str(Path(name).expanduser().absolute())


def _load(data: Any, data_dir: Any, limit_train: int | None, limit_test: int | None) -> Any:
    """A registered dataset by name (its files from ``data_dir`` when given), else the directory ``data``."""
    from deepspark.data import DATASETS, load_dataset

    if str(data) in DATASETS:
        dataset = load_dataset(str(data), data_dir=data_dir)
    elif Path(data).is_dir():
        dataset = load_dataset(str(data), data_dir=data_dir)  # a different data_dir is refused there
    else:
        raise ConfigError(
            f"data: expected a registered dataset ({', '.join(sorted(DATASETS))}), a dataset directory or a "
            f"Spark DataFrame, got {str(data)!r} (no such directory)"
        )
    if limit_train is not None or limit_test is not None:
        dataset = dataset.subset(train=limit_train, test=limit_test)
    return dataset


def _collect(df: Any, layout: FrameLayout, preprocess: Preprocess) -> tuple[torch.Tensor, torch.Tensor]:
    from deepspark.training.frame import RowFile, read_partition

    rows = keyed_rows(df, layout)
    part = read_partition(in_own_group(df, lambda: dataframe_to_arrow(rows)).to_batches(), layout)
    features = part.features
    assert not isinstance(features, RowFile)  # read without a memory bound: never a file
    inputs = preprocess.apply(features) if layout.pixels else torch.from_numpy(features)
    return inputs, torch.from_numpy(part.labels)


def _model_spec(model: Any, layout: FrameLayout) -> ModelSpec:
    from deepspark.models import ZOO, load_spec, model_spec

    if isinstance(model, str) and model in ZOO:
        return model_spec(model, input_shape=layout.shape, num_classes=layout.num_classes)
    spec = load_spec(model)
    spec.check_fits(input_shape=layout.shape, num_classes=layout.num_classes)
    return spec


def _train_model(model: Any, made: TrainModel | None, layout: FrameLayout) -> TrainModel:
    """The run's model, checked against the data: the factory's module, or the zoo model or spec."""
    if made is None:
        return TrainModel(spec=_model_spec(model, layout))
    made.check_fits(layout.shape, layout.num_classes)
    return made


def _refuse_resume_changes(run_dir: Any, saved: Mapping[str, Any], **given: Any) -> None:
    """A resume continues with the settings in config.json: one given otherwise (not its default) is
    refused rather than silently replaced by the saved one."""
    defaults = {"workers": 1, "threads_per_worker": 1, "device": "auto"}
    changed = [
        name
        for name, value in given.items()
        if value is not None and value != defaults.get(name) and value != saved.get(name)
    ]
    if changed:
        raise ConfigError(
            f"resume: the run in {run_dir} continues with the settings in its config.json; "
            f"drop {', '.join(changed)} (a resumed run cannot change them; start a new run instead)"
        )


def _resumed_model(saved: Any, factory: Callable[[], Any] | None, run_dir: Any) -> Any:
    """The model a resumed run trains: the saved zoo name or spec, or the factory given again."""
    if isinstance(saved, Mapping) and FACTORY_KEY in saved:
        if factory is None:
            raise ConfigError(
                f"resume: the run in {run_dir} trained the module of the factory {saved[FACTORY_KEY]}, which "
                "config.json cannot hold; resume it from Python with the same factory: "
                "deepspark.fit(data, model=factory, run_dir=..., resume=True)"
            )
        return factory
    if factory is not None:
        raise ConfigError(
            f"resume: the run in {run_dir} trained a zoo model or spec, not a factory's module; "
            "resume it without model="
        )
    return saved


# ------------------------------------------------------------------------------------ workers
class _Server(Protocol):
    """What the driver loop needs of a strategy's server (:class:`RoundServer`, :class:`ParameterServer`)."""

    finished: bool
    error: BaseException | None

    def handle(self, conn: Any) -> None: ...
    def wait(self, timeout: float) -> bool: ...
    def fail(self, error: BaseException) -> None: ...
    def worker_lost(self, worker: int) -> None: ...
    def taken(self, worker: int) -> int: ...


class _Recorder:
    """After each round: a history row, test scores at epoch boundaries, a checkpoint now and then."""

    def __init__(
        self, run: _Run, model: torch.nn.Module, history: list[dict[str, Any]], samples_done: int
    ) -> None:
        self._run_path, self._data, self._model = run.run_path, run.data, model
        self.history = history
        self._epoch_seen = math.floor(samples_done / run.data.layout.rows)
        self._checkpoint_seconds = run.checkpoint_seconds
        self._last_checkpoint = time.perf_counter()
        self._elapsed_before = float(history[-1]["elapsed_s"]) if history else 0.0
        self._clock = time.perf_counter()
        self._on_round = run.on_round
        self._unsaved: Callable[[], None] | None = None  # the last round's checkpoint, when skipped

    def record(
        self,
        record: RoundRecord,
        weights: Mapping[str, torch.Tensor],
        *,
        done: bool,
        checkpoint: Callable[[], None],
    ) -> None:
        row: dict[str, Any] = dict(asdict(record))
        row.update(
            test_accuracy="", test_loss="", elapsed_s=self._elapsed_before + time.perf_counter() - self._clock
        )
        epoch_now = math.floor(record.epoch + 1e-9)
        inputs, labels = self._data.test_inputs, self._data.test_labels
        if (epoch_now > self._epoch_seen or done) and inputs is not None and labels is not None:
            self._epoch_seen = epoch_now
            self._model.load_state_dict(dict(weights))
            scores = evaluate(self._model, inputs, labels)
            row.update(test_accuracy=scores["accuracy"], test_loss=scores["loss"])
        _append_history(self._run_path, row)
        self.history.append(row)
        now = time.perf_counter()
        if done or self._checkpoint_seconds <= 0 or now - self._last_checkpoint >= self._checkpoint_seconds:
            self._unsaved = None
            checkpoint()
            self._last_checkpoint = now
        else:
            self._unsaved = checkpoint
        if self._on_round is not None:
            self._on_round(row)

    def keep(self) -> None:
        """Checkpoint the last recorded round if the interval skipped it, so a run that stops early
        (Ctrl-C, a failure) keeps every round it finished. Call it under the server's lock, whose state
        must be that of the last round; a failure here is logged, not raised over the one stopping the run."""
        unsaved, self._unsaved = self._unsaved, None
        if unsaved is None:
            return
        try:
            unsaved()
        except Exception as exc:
            _log.warning("could not checkpoint the last finished round: %s", exc)


class _WorkerJobs:
    """A run's names for its workers' Spark jobs: one job tag per worker, so that one frozen worker's job
    can be cancelled (:meth:`cancel`, which the server calls) and is resubmitted, the others running on."""

    def __init__(self, spark: Any, name: str) -> None:
        self.name = name
        self._spark = spark
        self._tag = f"{name}-{secrets.token_hex(4)}"

    def tag(self, worker: int) -> str:
        return f"{self._tag}-worker-{worker}"

    def cancel(self, worker: int) -> None:
        self._spark.sparkContext.cancelJobsWithTag(self.tag(worker))

    def speculative(self, stage: int) -> bool:
        """Whether Spark runs a speculative copy of a worker's task of ``stage`` beside the original."""
        return speculative_copy(self._spark.sparkContext, stage)


def _inputs_entry(prepared: _Data) -> dict[str, Any]:
    """How a run reads its data (config.json's ``inputs``), which a resume must read the same way."""
    layout = prepared.layout
    return {
        "feature_column": layout.feature_column,
        "label_column": layout.label_column,
        "kind": layout.kind,
        "num_classes": layout.num_classes,
        "preprocess": prepared.preprocess.to_dict(),
    }


def _raised_in_python(exc: BaseException, cause: str) -> bool:
    """Whether a worker's job failed with an exception its Python code raised (the error carries the
    task's Python traceback) that is not one of the :data:`_TRANSIENT` ones; not a lost executor, a
    crashed or killed Python worker, or a cancelled job."""
    name = cause.split(":", 1)[0].rsplit(".", 1)[-1]
    return "Traceback (most recent call last)" in str(exc) and name not in _TRANSIENT


@contextlib.contextmanager
def _worker_rows(spark: Any, data: _Data, workers: int) -> Iterator[tuple[DataFrame, tuple[Any, ...] | None]]:
    """What the workers' job maps over, one partition per worker: the DataFrame repartitioned by row key,
    or ``spark.range(workers)`` with the broadcast shares of rows the driver holds (destroyed on leaving),
    which its tasks read instead (:mod:`deepspark.training.shares`)."""
    if data.held is None:
        assert data.frame is not None
        yield data.frame.repartition(workers, KEY), None
        return
    with broadcast_shares(spark, data.held, workers) as (frame, shares):
        yield frame, shares


def _run_workers(
    spark: Any,
    data: _Data,
    workers: int,
    server: _Server,
    task_fn: Callable[[str, int, str, tuple[Any, ...] | None], Callable[[Any], Any]],
    jobs: _WorkerJobs,
) -> None:
    """Serve ``server`` on a fresh endpoint while one Spark job per worker runs
    ``task_fn(host, port, token, shares)`` over its rows (:func:`_worker_rows`), tagged with
    ``jobs.tag(worker)``.

    The endpoint is closed (every connection with it) before this returns, whatever happens; the slots run
    in :func:`deepspark.slots.run_slots`. Raises the server's error, if any.
    """
    from deepspark import wire

    name = jobs.name
    token = secrets.token_hex(16)
    endpoint = wire.Server(token=token, handler=server.handle, bind=_bind_address(spark), name=name)
    endpoint.start()
    rows = contextlib.ExitStack()  # the broadcast shares, if any: destroyed once the jobs ended
    try:
        host, port = endpoint.address
        _log.info("%s: serving %d worker(s) on %s:%d", name, workers, host, port)
        frame, shares = rows.enter_context(_worker_rows(spark, data, workers))
        planned = frame.mapInArrow(task_fn(host, port, token, shares), _TASK_SCHEMA)
        rdd = in_own_group(frame, lambda: planned.rdd)  # adaptive execution runs a DataFrame's shuffle here
        sc = spark.sparkContext
        group = f"{name}-{secrets.token_hex(4)}"

        same = SameFailure(workers)

        def lost(worker: int, exc: BaseException) -> None:
            cause = root_cause(exc)
            if any(name in cause for name in _DETERMINISTIC):  # running it again fails again
                server.fail(RunError(f"training worker {worker} failed: {cause}"))
            elif (
                _raised_in_python(exc, cause)
                and not any(server.taken(w) for w in range(workers))
                and same.failed(worker, exc)
            ):  # every worker's code raised the same exception before any round took its steps
                server.fail(
                    RunError(f"every training worker failed the same way before any round finished: {cause}")
                )
            else:
                server.worker_lost(worker)

        def give_up(reason: str) -> None:
            server.fail(RunError(f"training stopped: {reason}"))

        def submit(worker: int) -> None:
            sc.addJobTag(jobs.tag(worker))  # thread-local, like the job group: this slot's jobs only
            sc.runJob(rdd, _drain, partitions=[worker])

        def drive() -> None:
            try:
                run_slots(
                    sc,
                    width=workers,
                    submit=submit,
                    keep_going=lambda: not server.finished and server.error is None,
                    on_lost=lost,
                    stop=give_up,
                    max_attempts=3,
                    progress=server.taken,  # a worker that trained since its last loss starts counting again
                    group_prefix="deepspark-train",
                    description="training worker",
                    group=group,
                )
            except Exception as exc:
                _log.debug("%s: the workers' driver thread failed", name, exc_info=True)
                server.fail(RunError(f"training stopped: its workers' jobs could not be run: {exc}"))
            finally:
                # The slots end only once the server finished or failed; if they ended otherwise (a slot's
                # thread died), nothing would wake the wait below.
                if not server.finished and server.error is None:
                    server.fail(RunError("training stopped: its workers' jobs ended before training did"))

        slots = threading.Thread(target=drive, name=f"deepspark-{name}-slots", daemon=True)
        try:
            if not server.finished:
                slots.start()
                while not server.wait(0.5):
                    pass
        except KeyboardInterrupt:
            server.fail(KeyboardInterrupt())
            raise
        finally:
            if slots.ident is not None:  # never started when a resumed run had finished already
                slots.join(timeout=10.0)  # workers told to stop end their jobs by themselves
                if slots.is_alive():
                    cancel_group(sc, group)
                    slots.join(timeout=30.0)
    finally:
        try:
            rows.close()
        finally:
            endpoint.close()
    if server.error is not None:
        _raise_training_error(server.error)


def _task_spec(
    run: _Run, total_steps: int, endpoint: tuple[str, int, str], shares: tuple[Any, ...] | None
) -> TaskSpec:
    """What every worker task needs, copied out of driver objects (``endpoint``: host, port, token;
    ``shares``: the workers' broadcast rows, when the driver holds them)."""
    host, port, token = endpoint
    return TaskSpec(
        host=host,
        port=port,
        token=token,
        **run.model.task_fields(),
        preprocess=run.data.preprocess.to_dict(),
        layout=run.data.layout,
        config=run.config.to_dict(),
        total_steps=total_steps,
        threads=run.threads,
        seed=run.config.seed,
        slow_worker=run.slow_worker[0] if run.slow_worker is not None else None,
        slow_factor=run.slow_worker[1] if run.slow_worker is not None else 1.0,
        device=run.device,
        heartbeat_s=heartbeat_interval(run.heartbeat_timeout),
        memory=run.worker_memory,
        shares=shares,
    )


def _step_budget(rows: int, workers: int, config: TrainConfig) -> tuple[int, int]:
    """Steps per epoch and in all for every worker: an even share of the rows, in batches."""
    steps_per_epoch = math.ceil(math.ceil(rows / workers) / config.batch_size)
    return steps_per_epoch, steps_per_epoch * config.epochs


def _new_cursor(config: TrainConfig) -> Callable[[int, int], dict[str, Any]]:
    def new_cursor(worker: int, rows: int) -> dict[str, Any]:
        # Worker 0 shuffles exactly as the one-process loop does with the same seed.
        return DataCursor(rows, config.batch_size, config.seed + worker * 1_000_003).state()

    return new_cursor


# ------------------------------------------------------------------------------------------ average
def _fit_average(run: _Run) -> FitResult:
    data, config, run_path, workers = run.data, run.config, run.run_path, run.workers
    layout = data.layout
    _, total_steps = _step_budget(layout.rows, workers, config)
    driver_model = run.model.build(seed=config.seed)
    if run.resume:
        weights, outer_state, state = _load_checkpoint(run_path)
        _check_resumed(driver_model, weights, run_path)
        # In the model's own order, as the run started: the Nesterov outer optimizer's state is by
        # parameter index, and safetensors hands tensors back in another order.
        weights = {name: weights[name] for name in driver_model.state_dict()}
        cursors = {int(k): v for k, v in state["cursors"].items()}
        row_digests = _row_digests(state, run.data)
        first_round, samples_done = int(state["round"]) + 1, int(state["samples_done"])
        steps_done = int(state["steps_done"])
        history = _read_history(run_path, upto=int(state["round"]))
    else:
        weights = dict(driver_model.state_dict())
        outer_state = None
        cursors, row_digests = {}, {}
        first_round, samples_done, steps_done, history = 0, 0, 0, []
    earlier = len(history)  # rows of the sessions before this one
    recorder = _Recorder(run, driver_model, history, samples_done)
    jobs = _WorkerJobs(run.spark, "deepspark-average")

    def after_round(record: RoundRecord, new_weights: Mapping[str, torch.Tensor]) -> None:
        def checkpoint() -> None:
            outer = server.outer_state()
            state = {
                "round": record.round,
                "samples_done": server.samples_done,
                "steps_done": server.steps_done,
                "cursors": {str(k): v for k, v in server.cursors().items()},
                "row_digests": {str(k): v for k, v in server.row_digests().items()},
            }
            _save_checkpoint(run_path, new_weights, outer, state)

        recorder.record(record, new_weights, done=server.finished, checkpoint=checkpoint)

    server = RoundServer(
        weights=weights,
        parameters=[name for name, _ in driver_model.named_parameters()],
        cursors=cursors,
        workers=workers,
        new_cursor=_new_cursor(config),
        settings=run.settings,
        batch_size=config.batch_size,
        total_steps=total_steps,
        total_samples=config.epochs * layout.rows,
        steps_done=steps_done,
        samples_done=samples_done,
        rows=layout.rows,
        digest=layout.digest,
        row_digests=row_digests,
        first_round=first_round,
        outer_state=outer_state,
        on_round=after_round,
        heartbeat_timeout=run.heartbeat_timeout,
        cancel=jobs.cancel,
        copies=jobs.speculative,
    )

    def task_fn(host: str, port: int, token: str, shares: tuple[Any, ...] | None) -> Callable[[Any], Any]:
        return functools.partial(average_task, _task_spec(run, total_steps, (host, port, token), shares))

    try:
        try:
            _run_workers(run.spark, data, workers, server, task_fn, jobs)
        finally:
            with rundir.interrupts_held(), server.hold():  # a second Ctrl-C skipped the last round's save
                recorder.keep()
    except RunError as exc:
        settings = run.settings
        if settings.outer != "nesterov" or "DivergenceError" not in str(exc):
            raise
        # The workers' loss blew up, but the steps they take are the outer step's as much as their own.
        raise RunError(
            f"{exc}, or the Nesterov outer step (outer learning rate {settings.outer_learning_rate:g}, "
            f"momentum {settings.outer_momentum:g}, tau {settings.tau}: a step of about "
            f"{settings.outer_learning_rate / (1 - settings.outer_momentum):.3g} times the averaged change once the "
            f"momentum builds up), or use the plain outer step"
        ) from exc
    driver_model.load_state_dict(dict(server.weights))
    return _finish(run, driver_model, history, devices=server.devices, earlier=earlier)


# -------------------------------------------------------------------------------------------- async
def _fit_async(run: _Run) -> FitResult:
    from deepspark.training.paramserver import AsyncRecord, ParameterServer, async_task

    data, config, run_path, workers = run.data, run.config, run.run_path, run.workers
    layout = data.layout
    _, total_steps = _step_budget(layout.rows, workers, config)
    driver_model = run.model.build(seed=config.seed)
    progress: dict[str, Any] = {}
    if run.resume:
        weights, _, state = _load_checkpoint(run_path)
        _check_resumed(driver_model, weights, run_path)
        progress = {
            "cursors": {int(k): v for k, v in state["cursors"].items()},
            "clocks": {int(k): int(v) for k, v in state["clocks"].items()},
            "version": int(state["version"]),
            "samples_done": int(state["samples_done"]),
            "first_round": int(state["round"]) + 1,
            "row_digests": _row_digests(state, run.data),
        }
        history = _read_history(run_path, upto=int(state["round"]))
    else:
        weights, history = dict(driver_model.state_dict()), []
    earlier = len(history)  # rows of the sessions before this one
    recorder = _Recorder(run, driver_model, history, progress.get("samples_done", 0))
    jobs = _WorkerJobs(run.spark, "deepspark-async")

    def after_round(record: AsyncRecord, new_weights: Mapping[str, torch.Tensor]) -> None:
        def checkpoint() -> None:
            _save_checkpoint(run_path, new_weights, None, server.checkpoint_state())

        recorder.record(record, new_weights, done=server.finished, checkpoint=checkpoint)

    server = ParameterServer(
        weights=weights,
        parameters=[name for name, _ in driver_model.named_parameters()],
        workers=workers,
        staleness=run.staleness,
        tau=run.settings.tau,
        batch_size=config.batch_size,
        total_samples=config.epochs * layout.rows,
        total_steps=total_steps,
        rows=layout.rows,
        digest=layout.digest,
        new_cursor=_new_cursor(config),
        on_round=after_round,
        heartbeat_timeout=run.heartbeat_timeout,
        cancel=jobs.cancel,
        copies=jobs.speculative,
        **progress,
    )

    def task_fn(host: str, port: int, token: str, shares: tuple[Any, ...] | None) -> Callable[[Any], Any]:
        return functools.partial(async_task, _task_spec(run, total_steps, (host, port, token), shares))

    try:
        _run_workers(run.spark, data, workers, server, task_fn, jobs)
    finally:
        with rundir.interrupts_held(), server.hold():
            server.close_row()
            recorder.keep()
    _log.info(
        "async: %d pushes, largest staleness %d, largest clock gap %d (bound %d)",
        server.version,
        server.max_staleness,
        server.max_clock_gap,
        run.staleness,
    )
    driver_model.load_state_dict(server.weights)
    return _finish(run, driver_model, history, devices=server.devices, earlier=earlier)


def _drain(rows: Any) -> list[Any]:
    return list(rows)


def _bind_address(spark: Any) -> str:
    master = spark.sparkContext.master
    if master.startswith("local"):
        return "127.0.0.1"
    return str(spark.sparkContext.getConf().get("spark.driver.host", "127.0.0.1"))


# ---------------------------------------------------------------------------------------- allreduce
FAIL_HOOK_ENV = "DEEPSPARK_TEST_GANG_FAIL_AT_STEP"
"""Test-only: when set to N, the first gang attempt's last rank raises right after step N, so tests can
check the restart from the checkpoint. Read on the driver and shipped in the task's spec (an executor's
environment is fixed when Spark starts it); later attempts never carry it."""


def _fit_allreduce(run: _Run, *, max_restarts: int = 3) -> FitResult:
    """Run the all-reduce gang (``training/allreduce.py``), restarting it from the last round on failure.

    The strategy has no knobs of its own beyond the training config (``run.settings`` is unused)."""
    from deepspark import wire
    from deepspark.models.checkpoint import state_from_bytes, state_to_bytes
    from deepspark.training.allreduce import MODEL_PREFIX, GangReport, GangServer, GangSpec, allreduce_task

    data, config, run_path, workers, spark = run.data, run.config, run.run_path, run.workers, run.spark
    layout = data.layout
    steps_per_epoch, total_steps = _step_budget(layout.rows, workers, config)
    steps_per_round = max(1, steps_per_epoch // 4)
    driver_model = run.model.build(seed=config.seed)
    if run.resume:
        payload, state = _load_gang_checkpoint(run_path)
        history = _read_history(run_path, upto=int(state["round"]))
        first_attempt = int(state.get("attempt", 0)) + 1
    else:
        payload = state_to_bytes({f"{MODEL_PREFIX}{k}": v for k, v in driver_model.state_dict().items()})
        state = {"round": -1, "steps_done": 0, "samples_done": 0, "cursors": {}, "optimizer": None}
        history, first_attempt = [], 0
    earlier = len(history)  # rows of the sessions before this one
    saved_step = [int(state["steps_done"])]

    def weights_of(gang: GangServer) -> dict[str, torch.Tensor]:
        tensors = state_from_bytes(gang.payload)
        return {k[len(MODEL_PREFIX) :]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}

    def checkpoint(gang: GangServer) -> None:
        _save_gang_checkpoint(run_path, gang)
        saved_step[0] = gang.steps_done

    recorder = _Recorder(run, driver_model, history, int(state["samples_done"]))

    def after_round(report: GangReport, gang: GangServer) -> None:
        recorder.record(report, weights_of(gang), done=gang.finished, checkpoint=lambda: checkpoint(gang))

    gang = GangServer(
        payload=payload,
        optimizer=state.get("optimizer"),
        cursors={int(k): v for k, v in dict(state["cursors"]).items()},
        steps_done=int(state["steps_done"]),
        samples_done=int(state["samples_done"]),
        total_steps=total_steps,
        rows=layout.rows,
        digest=layout.digest,
        row_digests=_row_digests(state, run.data),
        workers=workers,
        on_round=after_round,
        heartbeat_timeout=run.heartbeat_timeout,
    )
    gang.round_done = int(state["round"])
    token = secrets.token_hex(16)
    endpoint = wire.Server(
        token=token, handler=gang.handle, bind=_bind_address(spark), name="deepspark-allreduce"
    )
    endpoint.start()
    rows = contextlib.ExitStack()  # the broadcast shares, if any: kept for every attempt of the gang
    try:  # from here on the endpoint is closed whatever happens
        host, port = endpoint.address
        fail_hook = os.environ.get(FAIL_HOOK_ENV)
        frame, shares = rows.enter_context(_worker_rows(spark, data, workers))
        sc = spark.sparkContext
        attempt, restarts = first_attempt, 0
        repeated: tuple[str, int] | None = None  # the last failed attempt's Python exception and step
        gang.begin_attempt(attempt)
        while not gang.finished:
            task = GangSpec(
                **_fields(_task_spec(run, total_steps, (host, port, token), shares)),
                workers=workers,
                steps_per_round=steps_per_round,
                attempt=attempt,
                fail_at_step=int(fail_hook) if fail_hook and attempt == first_attempt else None,
            )
            job = frame.mapInArrow(
                functools.partial(allreduce_task, task), "rank long, steps long", barrier=True
            )
            failure = run_job(
                sc,
                job.collect,
                group=job_group("deepspark-allreduce"),
                cancel_when=lambda: gang.fatal is not None or gang.lost is not None,
            )
            gang.settle(timeout=30.0)  # rank 0's last words (a divergence, say) are taken before deciding
            # Every round taken: a job cancelled after it (a rank frozen before its done) is no failure.
            if gang.finished:
                break
            if gang.fatal is not None:
                break
            cause = root_cause(failure) if failure is not None and gang.lost is None else ""
            if any(name in cause for name in _DETERMINISTIC):  # a restarted gang would fail the same way
                raise RunError(f"the all-reduce gang failed: {cause}") from failure
            if failure is not None and cause and _raised_in_python(failure, cause):
                if repeated == (cause, gang.steps_done):  # a rank's code raised it again, at the same step
                    raise RunError(
                        f"the all-reduce gang failed the same way twice, with no step between: {cause}"
                    ) from failure
                repeated = (cause, gang.steps_done)
            else:
                repeated = None
            restarts += 1
            reason = (
                gang.lost
                or (short_error(failure) if failure is not None else None)
                or "the gang ended before the last step"
            )
            if restarts > max_restarts:
                raise RunError(
                    f"the all-reduce gang failed {restarts} times; last error: {reason}"
                ) from failure
            attempt += 1
            with gang.hold():
                gang.begin_attempt(attempt)  # from now on, a late report of the failed gang is ignored
                if gang.steps_done > saved_step[0]:
                    checkpoint(gang)  # the restart starts from the checkpoint: make it the last round
            _log.warning(
                "all-reduce gang attempt %d failed (%s); restarting from step %d of %d",
                attempt - 1,
                reason,
                gang.steps_done,
                total_steps,
            )
    finally:
        try:
            rows.close()
        finally:
            endpoint.close()
            with rundir.interrupts_held(), gang.hold():
                recorder.keep()
    if gang.fatal is not None:
        _raise_training_error(gang.fatal)
    with gang.hold():
        if gang.steps_done > saved_step[0] or not (run_path / CHECKPOINT).is_dir():
            checkpoint(gang)
    driver_model.load_state_dict(weights_of(gang))
    return _finish(run, driver_model, history, devices=gang.devices, earlier=earlier)


def _fields(record: Any) -> dict[str, Any]:
    """A dataclass's fields by name, values as they are (``asdict`` would turn nested records into dicts)."""
    return {f.name: getattr(record, f.name) for f in fields(record)}


# ------------------------------------------------------------------------------------ checkpoints
def _save_checkpoint(
    run_path: Path,
    weights: Mapping[str, torch.Tensor],
    outer_state: Mapping[str, Any] | None,
    progress: Mapping[str, Any],
) -> None:
    """Write ``checkpoint/`` atomically: the weights (and outer optimizer) as safetensors, ``progress``
    (round, samples_done, cursors, and whatever else the strategy resumes from) as JSON."""
    from safetensors.torch import save

    tensors = {f"model.{k}": v.detach().contiguous() for k, v in weights.items()}
    groups: list[Any] = []
    if outer_state is not None:
        for index, values in outer_state["state"].items():
            for name, value in values.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"outer.{index}.{name}"] = value.detach().contiguous()
        groups = outer_state["param_groups"]
    state = {**progress, "outer_param_groups": groups}
    _write_checkpoint(
        run_path, {"state.safetensors": save(tensors), "state.json": json.dumps(state).encode()}
    )


def _write_checkpoint(run_path: Path, files: Mapping[str, bytes]) -> None:
    """Replace ``run_path/checkpoint/`` by a folder holding ``files`` (written and swapped atomically)."""
    rundir.write_dir_atomic(run_path / CHECKPOINT, files)


_RNG = "rng.cpu"  # the CPU generator's state in a local run's checkpoint (it drives dropout)


def _save_local_checkpoint(run_path: Path, state: Any) -> None:
    """A one-process run after an epoch (a :class:`~deepspark.training.loop.EpochState`): weights,
    optimizer tensors and the RNG as safetensors; epoch, optimizer groups, schedule and data position as JSON."""
    from safetensors.torch import save

    from deepspark.training.allreduce import MODEL_PREFIX, optimizer_to_tensors

    optim_tensors, optim_rest = optimizer_to_tensors(state.optimizer)
    tensors = {
        **{f"{MODEL_PREFIX}{k}": v.detach().contiguous().cpu() for k, v in state.weights.items()},
        **optim_tensors,
        _RNG: state.rng,
    }
    progress = {
        "strategy": "local",
        "round": state.epochs_done - 1,
        "epochs_done": state.epochs_done,
        "optimizer": optim_rest,
        "scheduler": state.scheduler,
        "cursor": state.cursor,
    }
    _write_checkpoint(
        run_path, {"state.safetensors": save(tensors), "state.json": json.dumps(progress).encode()}
    )


def _load_local_checkpoint(run_path: Path) -> Any:
    """The :class:`~deepspark.training.loop.EpochState` :func:`_save_local_checkpoint` wrote."""
    from deepspark.models.checkpoint import state_from_bytes
    from deepspark.training.allreduce import MODEL_PREFIX, optimizer_from_tensors
    from deepspark.training.loop import EpochState

    folder = run_path / CHECKPOINT
    progress = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    if progress.get("strategy") != "local":
        raise ConfigError(f"resume: {folder} was not written by the local strategy")
    tensors = state_from_bytes((folder / "state.safetensors").read_bytes())
    return EpochState(
        epochs_done=int(progress["epochs_done"]),
        weights={k[len(MODEL_PREFIX) :]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)},
        optimizer=optimizer_from_tensors(tensors, progress["optimizer"]),
        scheduler=progress.get("scheduler"),
        rng=tensors[_RNG],
        cursor=progress["cursor"],
    )


def _save_gang_checkpoint(run_path: Path, gang: Any) -> None:
    """The all-reduce gang's last round: its safetensors payload (``model.*`` weights, ``optim.*``
    optimizer tensors) as is, and the step, cursors and optimizer groups as JSON."""
    state = {
        "strategy": "allreduce",
        "round": gang.round_done,
        "steps_done": gang.steps_done,
        "samples_done": gang.samples_done,
        "cursors": {str(k): v for k, v in gang.cursors.items()},
        "row_digests": {str(k): v for k, v in gang.row_digests.items()},
        "optimizer": gang.optimizer,
        "attempt": gang.attempt,
    }
    _write_checkpoint(run_path, {"state.safetensors": gang.payload, "state.json": json.dumps(state).encode()})


def _load_gang_checkpoint(run_path: Path) -> tuple[bytes, dict[str, Any]]:
    folder = run_path / CHECKPOINT
    state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    if state.get("strategy") != "allreduce":
        raise ConfigError(f"resume: {folder} was not written by the allreduce strategy")
    return (folder / "state.safetensors").read_bytes(), dict(state)


def _row_digests(state: Mapping[str, Any], data: _Data) -> dict[int, str]:
    """Each worker's rows' digest from a checkpoint's state: a resumed worker must read the rows its data
    position covers (as many rows split otherwise would walk that position over other rows). A
    checkpoint written before they were kept has none: only the counts are compared then.

    A dataset's workers read broadcast shares (:mod:`deepspark.training.shares`), whose digests are
    SHA-256s: a checkpoint whose workers read a dataset as a DataFrame's partitions (deepspark until 2026-11-26)
    holds other rows per worker, so it is refused here, before any job, not once its workers had loaded."""
    digests = {int(k): str(v) for k, v in dict(state.get("row_digests") or {}).items()}
    if data.held is not None and any(not d.startswith("sha256:") for d in digests.values()):
        raise ConfigError(
            "resume: this run's workers read the dataset as a DataFrame's partitions, which deepspark "
            "until 2026-11-26 did; this version gives each worker other rows of it (a broadcast share), so "
            "the run cannot continue from its data positions; train it again"
        )
    return digests


def _check_resumed(model: torch.nn.Module, weights: Mapping[str, torch.Tensor], run_path: Path) -> None:
    """The checkpoint's weights must fit the model being resumed (a factory given again may differ)."""
    try:
        model.load_state_dict(dict(weights))
    except RuntimeError as exc:
        raise ConfigError(
            f"resume: the weights in {run_path / CHECKPOINT} do not fit the model given: {exc}"
        ) from exc


def _load_checkpoint(run_path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, dict[str, Any]]:
    from safetensors.torch import load_file

    folder = run_path / CHECKPOINT
    tensors = load_file(str(folder / "state.safetensors"))
    state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    weights = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    outer: dict[str, Any] | None = None
    if state.get("outer_param_groups"):
        per: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("outer."):
                _, index, name = key.split(".", 2)
                per.setdefault(int(index), {})[name] = value
        outer = {"state": per, "param_groups": state["outer_param_groups"]}
    return weights, outer, state


# -------------------------------------------------------------------------------------- history
def _append_history(run_path: Path, row: Mapping[str, Any]) -> None:
    path = run_path / HISTORY
    new = not path.exists()
    with open(path, "a", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=HISTORY_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow({k: row.get(k, "") for k in HISTORY_COLUMNS})


def _read_history(run_path: Path, *, upto: int) -> list[dict[str, Any]]:
    """History rows up to round ``upto``; later rows (written after the last checkpoint) are dropped."""
    path = run_path / HISTORY
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if int(r["round"]) <= upto]
    # Replaced, not rewritten in place: a resume stopped midway (Ctrl-C, SIGTERM) truncated the file and
    # lost the finished rounds' rows, which the checkpoint does not hold.
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=HISTORY_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    rundir.write_file_atomic(path, text.getvalue().encode("utf-8"))
    return rows


def _finish(
    run: _Run,
    model: torch.nn.Module,
    history: list[dict[str, Any]],
    *,
    devices: Mapping[int, str] | None = None,
    earlier: int = 0,
) -> FitResult:
    """The run's model, curve and result; ``earlier`` history rows came from the sessions before a resume."""
    run_path, data, config = run.run_path, run.data, run.config

    accuracy = None
    last = history[-1].get("test_accuracy", "") if history else ""
    if last not in ("", None):
        accuracy = float(last)  # every strategy scores its last round with the final weights: not again
    elif data.test_inputs is not None and data.test_labels is not None:
        accuracy = evaluate(model, data.test_inputs, data.test_labels)["accuracy"]
    run.model.save(
        run_path / MODEL,
        model,
        preprocess=data.preprocess,
        class_names=data.class_names,
        metrics={"test_accuracy": accuracy} if accuracy is not None else {},
        config=config.to_dict(),
    )
    _plot(run_path, history)
    wall = time.perf_counter() - run.started
    split = _time_split(history[earlier:], wall)  # this session's rounds in this session's wall time
    epochs = float(history[-1]["epoch"]) if history else 0.0
    total_bytes = sum(float(r["bytes"] or 0) for r in history)
    return FitResult(
        run_dir=run_path,
        model_dir=run_path / MODEL,
        history=tuple(history),
        test_accuracy=accuracy,
        wall_s=wall,
        time_split=split,
        bytes_per_epoch=total_bytes / epochs if epochs else 0.0,
        devices=dict(devices or {}),
        model_path=run.model.predictable(run_path / MODEL),
    )


def _time_split(history: list[dict[str, Any]], wall: float) -> dict[str, float]:
    compute = sum(float(r["compute_s"] or 0) for r in history)
    comm = sum(float(r["comm_s"] or 0) for r in history)
    rounds = sum(float(r["seconds"] or 0) for r in history)
    waiting = max(0.0, rounds - compute - comm)
    return {
        "compute_s": compute,
        "communication_s": comm,
        "waiting_s": waiting,
        "scheduling_s": max(0.0, wall - rounds),
        "wall_s": wall,
    }


def _plot(run_path: Path, history: list[dict[str, Any]]) -> None:
    if not history or not skip_unless("matplotlib", feature="the training curve (curve.png)"):
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [float(r["epoch"]) for r in history]
    loss = [float(r["train_loss"]) for r in history]
    tested = [
        (float(r["epoch"]), float(r["test_accuracy"]))
        for r in history
        if r.get("test_accuracy") not in ("", None)
    ]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(epochs, loss, color="tab:blue", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss", color="tab:blue")
    ax.set_yscale("log")
    if tested:
        other = ax.twinx()
        other.plot(
            [e for e, _ in tested], [a * 100 for _, a in tested], "o-", color="tab:red", label="test accuracy"
        )
        other.set_ylabel("test accuracy (%)", color="tab:red")
    ax.set_title(f"{run_path.name}: loss and accuracy per round")
    fig.tight_layout()
    rundir.write_figure_atomic(fig, run_path / CURVE)


# ---------------------------------------------------------------------------------------- local
def _fit_local(
    data: Any,
    model: Any,
    config: TrainConfig,
    run_path: Path,
    resume: bool,
    data_dir: Any,
    limit_train: int | None,
    limit_test: int | None,
    threads: int,
    started: float,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    device: str = "auto",
) -> FitResult:
    """One process, checkpointed after every epoch (weights, optimizer and schedule state, RNG, data
    position: the same safetensors + JSON as ``allreduce``'s), so ``resume`` continues the same curve."""
    from deepspark.models import Preprocess
    from deepspark.training.loop import EpochMetrics, EpochState, train_one_process

    if not isinstance(data, str | os.PathLike):  # a Spark DataFrame (fit checked the kind)
        raise ConfigError(
            "strategy 'local' trains on a dataset name or directory; use 'average' for a DataFrame"
        )
    # This process is no Spark task, so no GPU is assigned to it: ``auto`` is the CPU, ``cuda`` its first GPU.
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "device 'cuda': CUDA is not available to torch in this process (strategy 'local' trains here, "
            "not in a Spark task); use --device auto or cpu"
        )
    from deepspark.data.record import arrays_sha256

    dataset = _load(data, data_dir, limit_train, limit_test)
    layout = FrameLayout(
        "image", "label", "bytes", dataset.input_shape, len(dataset.train_labels), dataset.num_classes
    )
    digest = f"sha256:{arrays_sha256(dataset.train_images, dataset.train_labels)}"
    spec = _model_spec(model, layout)
    start: EpochState | None = None
    history: list[dict[str, Any]] = []
    if resume:
        saved = _read_config(run_path).get("digest")
        if saved is not None and saved != digest:
            raise ConfigError(
                f"resume: the run in {run_path} trained on other examples than {_data_entry(data)!r} holds now "
                "(other labels or images); resume it with the data it was started on"
            )
        start = _load_local_checkpoint(run_path)
        history = _read_history(run_path, upto=start.epochs_done - 1)
    else:
        _write_config(
            run_path,
            {
                "strategy": "local",
                "device": device,
                "workers": 1,
                "config": config.to_dict(),
                "average": {},
                "model": TrainModel(spec=spec).config_entry(model),
                "threads_per_worker": threads,
                "data": _data_entry(data),
                "limit_train": limit_train,
                "limit_test": limit_test,
                "rows": layout.rows,
                "digest": digest,
            },
        )
    earlier = len(history)  # rows of the sessions before this one
    elapsed_before = float(history[-1]["elapsed_s"]) if history else 0.0
    clock = time.perf_counter()
    tested = len(dataset.test_labels) > 0  # with no test examples there is no score (not 0.0)

    finished: list[dict[str, Any]] = []  # the epoch's row, written with its checkpoint

    def on_epoch(m: EpochMetrics) -> None:
        finished[:] = [
            {
                "round": m.epoch - 1,
                "epoch": m.epoch,
                "samples": layout.rows,
                "workers": 1,
                "train_loss": m.train_loss,
                "test_accuracy": m.test_accuracy if tested else "",
                "test_loss": m.test_loss if tested else "",
                "seconds": m.seconds,
                "compute_s": m.seconds,
                "comm_s": 0.0,
                "wait_s": 0.0,
                "bytes": 0,
                "elapsed_s": elapsed_before + time.perf_counter() - clock,
            }
        ]

    def save(state: EpochState) -> None:
        # Together: a Ctrl-C between the epoch's row and its checkpoint lost the finished epoch. Shown
        # (on_round) only once both are written, so that a Ctrl-C on seeing it keeps the epoch.
        row = finished.pop()
        with rundir.interrupts_held():
            _append_history(run_path, row)
            _save_local_checkpoint(run_path, state)
        history.append(row)
        if on_round is not None:
            on_round(row)

    result = train_one_process(
        spec,
        dataset,
        replace(config, threads=threads),
        callback=on_epoch,
        device="cuda" if device == "cuda" else "cpu",
        start=start,
        checkpoint=save,
    )
    prepared = _Data(
        frame=None,
        layout=layout,
        preprocess=Preprocess(
            input_shape=dataset.input_shape, mean=tuple(dataset.mean), std=tuple(dataset.std)
        ),
        class_names=tuple(dataset.class_names),
        test_inputs=result.preprocess.apply(dataset.test_images) if len(dataset.test_labels) else None,
        test_labels=torch.as_tensor(dataset.test_labels) if len(dataset.test_labels) else None,
        digest=digest,
    )
    run = _Run(
        spark=None,
        data=prepared,
        model=TrainModel(spec=spec),
        config=config,
        settings=AverageSettings(),
        workers=1,
        run_path=run_path,
        resume=False,
        threads=threads,
        checkpoint_seconds=0.0,
        started=started,
        on_round=on_round,
    )
    return _finish(run, result.model, history, earlier=earlier)


def _raise_training_error(error: BaseException) -> NoReturn:
    """A driver server's recorded failure: ours as it is (a clear user error), anything else as a RunError."""
    if isinstance(error, DeepsparkError):
        raise error
    raise RunError(f"training failed: {error}") from error
