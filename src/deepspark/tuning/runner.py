"""``tune()``: a study whose trials run as Spark tasks.

The driver holds the Optuna study (in the run directory, so it survives the driver) and a small TCP
coordinator. It submits one long-lived Spark task per slot; each task pulls trial after trial from the
coordinator, so a trial costs one round trip rather than one Spark job, and the broadcast data is read
once per task. A task that dies (executor lost, worker killed) is resubmitted and its trial runs again;
an objective that raises is a FAIL and the study goes on.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import secrets
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from deepspark import rundir
from deepspark.data.record import DEFAULT_VALIDATION
from deepspark.errors import ConfigError, RunError
from deepspark.slots import root_cause, run_slots, short_error
from deepspark.spark import check_task_cpus
from deepspark.tuning.coordinator import (
    CARRIED_ATTRS,
    DEFAULT_ATTR,
    DEFAULT_HEARTBEAT_TIMEOUT,
    GRID_ATTR,
    INTERRUPTED_ATTR,
    OVERRIDES_ATTR,
    Coordinator,
    TrialEvent,
)
from deepspark.tuning.report import best_and_default, records_from_study, write_reports
from deepspark.tuning.space import SearchSpace, load_space
from deepspark.tuning.trial import Reporter, TrialRecord, TrialState
from deepspark.tuning.worker import WorkerSpec, run_worker

__all__ = [
    "CLUSTER_ATTR",
    "JOURNAL",
    "PRUNERS",
    "SAMPLERS",
    "SELECT_ON",
    "STUDY_NAME",
    "StudyResult",
    "tune",
]

_log = logging.getLogger(__name__)

SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("none", "median", "asha")
#: The split the built-in objective's trials are chosen on: "validation" (the default), or "test" (the
#: 2016 blog's protocol, kept for comparison; the chosen trial's test accuracy is then optimistic).
SELECT_ON = ("validation", "test")
JOURNAL = "study.journal"
STUDY_NAME = "deepspark"
CLUSTER_ATTR = "deepspark:cluster"

Objective = Callable[[dict[str, Any], Reporter], Any]
# What every study's config.json holds (see tune()); a resume reads them back.
_SAVED_KEYS = ("space", "trials", "sampler", "pruner", "metric", "direction", "objective")


@dataclass(frozen=True)
class StudyResult:
    """The outcome of :func:`tune`: every finished trial of the study (this run and earlier ones)."""

    run_dir: Path
    records: tuple[TrialRecord, ...]
    best: TrialRecord | None
    default: TrialRecord | None
    summary: Mapping[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0
    stop_reason: str | None = None
    parallelism: int = 1
    #: The built-in objective's selection split ("validation" or "test"); None for a user objective.
    selected_on: str | None = None

    @property
    def error_reduction(self) -> float | None:
        """The best trial's drop in error rate from the default's (on test accuracy when measured)."""
        value = self.summary.get("error_reduction")
        return float(value) if value is not None else None

    def counts(self) -> dict[str, int]:
        return {s.value: sum(r.state is s for r in self.records) for s in TrialState}


def _check_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return value


def _check_seconds(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"{name}: expected a positive number of seconds (or None), got {value!r}")
    return float(value)


def _sampler(name: str, space: SearchSpace, seed: int) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        return optuna.samplers.TPESampler(
            seed=seed,
            constant_liar=True,
            multivariate=True,
            n_startup_trials=min(10, max(2, len(space.params) * 2)),
        )
    # "grid": every point is enqueued up front (see _plan_grid), so the sampler is never asked for a value.
    # Optuna's GridSampler is not used: it calls study.stop() from tell() once the grid is exhausted
    # (an error outside study.optimize) and gives a grid point to the enqueued default trial's number.
    return optuna.samplers.RandomSampler(seed=seed)


def _pruner(name: str) -> optuna.pruners.BasePruner:
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=1)
    if name == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    return optuna.pruners.NopPruner()


def _save_model(
    run_dir: Path, record: TrialRecord, files: Mapping[str, bytes], *, name: str = rundir.BEST_DIR
) -> None:
    trial = json.dumps({"trial": record.number, "value": record.value}).encode("utf-8")
    rundir.write_dir_atomic(run_dir / name, {**files, "trial.json": trial})


def _held_trial(model_dir: Path) -> int | None:
    """The trial whose model ``model_dir`` holds (its ``trial.json``), or None."""
    try:
        held = json.loads((model_dir / "trial.json").read_text(encoding="utf-8")).get("trial")
    except (OSError, ValueError, AttributeError):
        return None
    return held if isinstance(held, int) else None


def _test_accuracies(run_dir: Path, test: Any, trials: Mapping[str, TrialRecord | None]) -> dict[int, float]:
    """Test accuracy of the models kept in ``run_dir/<name>/`` for ``trials`` ({name: record}), by trial.

    Measured once per study end on the driver: the test split never reaches a trial, so the choice
    cannot have seen it. A model that never arrived (its worker died first) has no test accuracy.
    """
    import torch

    from deepspark.models import load_checkpoint
    from deepspark.training import evaluate

    out: dict[int, float] = {}
    for name, record in trials.items():
        model_dir = run_dir / name
        if record is None or record.number in out or _held_trial(model_dir) != record.number:
            continue
        checkpoint = load_checkpoint(model_dir)
        inputs = checkpoint.preprocess.apply(test.test_images)
        scores = evaluate(checkpoint.model, inputs, torch.as_tensor(test.test_labels))
        out[record.number] = scores["accuracy"]
    return out


def _study_data(
    dataset: str | None,
    data_dir: str | None,
    *,
    limit_train: int | None,
    limit_test: int | None,
    select_on: str,
    validation: float | int,
    seed: int,
) -> tuple[Any, Any]:
    """The built-in objective's data: (what trials get, the dataset holding the test split).

    Selecting on validation, trials get the training part with the validation split in the test
    split's place (:meth:`ImageDataset.validation_as_test`), so the test split stays on the driver.
    ``limit_train`` applies first: the hold-out comes out of the examples kept.
    """
    from deepspark.data import load_dataset

    data = load_dataset(dataset, data_dir=data_dir)
    if limit_train is not None or limit_test is not None:
        data = data.subset(train=limit_train, test=limit_test)
    if select_on == "test":
        return data, data
    split = data.split_validation(validation, seed=seed)
    trials = split.validation_as_test()
    if len(trials.test_labels) == 0:
        raise ConfigError(
            f"validation={validation!r} holds out no example of the {len(data.train_labels)} training "
            "examples; give a larger validation (a fraction or a count), or select_on='test'"
        )
    _log.info(
        "selecting on a validation split of %d examples; training on %d",
        len(trials.test_labels),
        len(trials.train_labels),
    )
    return trials, split


def _drop_stale_model(best_dir: Path, best: TrialRecord | None) -> None:
    """Remove ``best_dir`` unless it holds the model of ``best``, the trial best.json names.

    The best trial's model can fail to arrive (its worker died between reporting the result and
    sending the files); a model labelled as the best that is another trial's would be worse than none.
    """
    if not best_dir.is_dir():
        return
    try:
        held = json.loads((best_dir / "trial.json").read_text(encoding="utf-8")).get("trial")
    except (OSError, ValueError, AttributeError):
        held = None
    if best is not None and held == best.number:
        return
    _log.warning(
        "%s holds trial %s's model but the best trial is %s, whose model never arrived; removing %s",
        best_dir,
        held,
        None if best is None else best.number,
        best_dir,
    )
    shutil.rmtree(best_dir, ignore_errors=True)


def _bind_address(spark: Any) -> str:
    master = spark.sparkContext.master
    if master.startswith("local[") or master == "local":
        return "127.0.0.1"
    return str(spark.sparkContext.getConf().get("spark.driver.host", "127.0.0.1"))


def tune(
    objective: Objective | None = None,
    *,
    space: SearchSpace | Mapping[str, Any] | str | None = None,
    trials: int | None = None,
    parallelism: int | None = None,
    threads_per_trial: int = 1,
    sampler: str = "tpe",
    pruner: str = "median",
    run_dir: str | Path | None = None,
    resume: bool = False,
    max_failures: int | None = None,
    max_attempts: int = 3,
    metric: str = "accuracy",
    direction: str = "maximize",
    default_config: Mapping[str, Any] | bool = True,
    data: Any = None,
    dataset: str | None = None,
    data_dir: str | None = None,
    model: str | Mapping[str, Any] = "cnn",
    limit_train: int | None = None,
    limit_test: int | None = None,
    select_on: str | None = None,
    validation: float | int = DEFAULT_VALIDATION,
    master: str | None = None,
    seed: int = 0,
    timeout: float | None = None,
    trial_timeout: float | None = None,
    heartbeat_timeout: float | None = DEFAULT_HEARTBEAT_TIMEOUT,
    on_event: Callable[[TrialEvent], None] | None = None,
    on_start: Callable[[int, int], None] | None = None,
) -> StudyResult:
    """Run a hyperparameter study whose trials are Spark tasks.

    Either give ``objective(config, reporter) -> float | dict`` (any framework; ``data`` is broadcast once
    and reaches it as ``reporter.data``), or leave it out and name a ``dataset`` and ``model`` (a zoo
    name, or a model spec: a JSON/YAML file or mapping whose output count covers the dataset's classes):
    the built-in objective trains it with each trial's config and reports per-epoch accuracy on the split
    ``select_on`` names: ``"validation"`` (the default; a seeded, stratified hold-out of ``validation``
    of the training split, 10% by default, seeded with ``seed``) or ``"test"`` (the 2016 blog's
    protocol, whose chosen accuracy is optimistic). Selecting on validation, the best trial's and the
    default configuration's test accuracy are measured once, at the end, and written beside their
    validation accuracy in ``best.json`` and ``trials.csv`` (docs/tune.md).

    ``run_dir`` holds the Optuna journal (open it with optuna-dashboard), ``trials.csv``, ``best.json`` and
    the best model. ``resume=True`` continues a study after a crash or Ctrl-C: finished trials are kept,
    interrupted ones run again. Every argument is checked before a Spark job starts.

    Clocks, in seconds: ``timeout`` bounds the whole study (at the deadline running trials are
    interrupted and queued for ``resume``, as on Ctrl-C; ``stop_reason`` is ``"timeout"``);
    ``trial_timeout`` bounds each trial (it FAILs with ``"trial timed out after N s"``, is not retried,
    and its Spark task is cancelled); a worker silent for ``heartbeat_timeout`` while it holds a trial
    (a frozen host) is taken for dead and the trial runs again elsewhere (None turns this off).
    """
    from deepspark.tuning.objectives import TorchObjective

    run_path = Path(run_dir) if run_dir is not None else Path(tempfile.mkdtemp(prefix="deepspark-tune-"))
    rundir.prepare(run_path, resume=resume)
    saved: dict[str, Any] = {}
    if resume:
        saved = rundir.read_config(run_path, required=_SAVED_KEYS, kind="tune study")
        space = space if space is not None else saved.get("space")
        trials = trials if trials is not None else saved.get("trials")
        sampler, pruner = saved.get("sampler", sampler), saved.get("pruner", pruner)
        metric, direction = saved.get("metric", metric), saved.get("direction", direction)
        kind = saved.get("objective", "builtin")
        if objective is None and kind != "builtin":
            raise ConfigError(
                f"resume: {run_path} is a study of the Python objective {kind!r}, which the run directory "
                f"cannot hold; resume it from Python: deepspark.tune({kind}, run_dir={str(run_path)!r}, "
                "resume=True) (`deepspark tune --resume` resumes studies of the built-in objective only)"
            )
        if objective is None:
            dataset = saved.get("dataset", dataset)
            data_dir = data_dir if data_dir is not None else saved.get("data_dir")
            model = saved.get("model", model)
            limit_train = saved.get("limit_train", limit_train)
            limit_test = saved.get("limit_test", limit_test)
            # A study from before the validation split was chosen on the test split: it stays so.
            select_on = saved.get("select_on", "test")
            validation = saved.get("validation", validation)
        seed = saved.get("seed", seed)
        threads_per_trial = saved.get("threads_per_trial", threads_per_trial)
    trials = _check_int("trials", 24 if trials is None else trials)
    threads_per_trial = _check_int("threads_per_trial", threads_per_trial)
    check_task_cpus("threads_per_trial", threads_per_trial, master=master)
    _check_int("max_attempts", max_attempts)
    timeout = _check_seconds("timeout", timeout)
    trial_timeout = _check_seconds("trial_timeout", trial_timeout)
    heartbeat_timeout = _check_seconds("heartbeat_timeout", heartbeat_timeout)
    if parallelism is not None:
        _check_int("parallelism", parallelism)
    if max_failures is not None:
        _check_int("max_failures", max_failures)
    for name, limit in (("limit_train", limit_train), ("limit_test", limit_test)):
        if limit is not None:
            _check_int(name, limit)  # an empty split fails every trial, and an empty test split scores none
    if sampler not in SAMPLERS:
        raise ConfigError(f"sampler: expected one of {list(SAMPLERS)}, got {sampler!r}")
    if pruner not in PRUNERS:
        raise ConfigError(f"pruner: expected one of {list(PRUNERS)}, got {pruner!r}")
    if direction not in ("maximize", "minimize"):
        raise ConfigError(f"direction: expected 'maximize' or 'minimize', got {direction!r}")
    search = load_space(space)
    if not search.params:
        raise ConfigError("space: no parameter to search; give at least one distribution (see docs/tune.md)")
    if sampler == "grid":
        size = search.grid_size()
        if size < trials:
            _log.warning("the grid has %d points; running each once, not %d trials", size, trials)
            trials = size
    builtin: TorchObjective | None = None
    if objective is None:
        if dataset is None and data_dir is None:
            raise ConfigError(
                "give an objective function, or a dataset or data_dir (and model) for the built-in objective"
            )
        select_on = "validation" if select_on is None else select_on
        if select_on not in SELECT_ON:
            raise ConfigError(f"select_on: expected one of {list(SELECT_ON)}, got {select_on!r}")
        if select_on == "validation":
            _check_validation(validation)
        builtin = TorchObjective(model=model, evaluated_on=select_on)
        search.check(builtin.check)  # names, and every value the space can give, before Spark starts
        objective = builtin
    elif not callable(objective):
        raise ConfigError(f"objective: expected a callable objective(config, reporter), got {objective!r}")
    elif select_on is not None:
        raise ConfigError(
            f"select_on: applies to the built-in objective only (got {select_on!r} with a Python "
            "objective, which chooses its own metric and data: hold out a validation split in it, e.g. "
            "with ImageDataset.split_validation)"
        )
    default_params: dict[str, Any] | None = None
    default_overrides: dict[str, Any] = {}
    if default_config is True and builtin is not None:
        default_params = builtin.default_params(sorted(search.params))
    elif isinstance(default_config, Mapping):
        # A full configuration: searched keys become the trial's params, the rest override ``fixed``.
        default_params = {k: default_config[k] for k in search.params if k in default_config}
        default_overrides = {k: v for k, v in default_config.items() if k not in search.params}
        missing = sorted(set(search.params) - set(default_params))
        if missing:
            raise ConfigError(f"default_config: lacks a value for searched parameter(s) {missing}")
        if builtin is not None:
            builtin.check({**default_config})
    distributions = search.distributions()
    if default_params is not None:
        for name, value in default_params.items():
            if not search.contains(name, value):
                raise ConfigError(
                    f"the default configuration's {name}={value!r} lies outside the space for {name}; "
                    "widen the space to include it, or pass default_config=False (--no-default)"
                )

    created = not run_path.exists() or not any(run_path.iterdir())
    study: optuna.Study | None = None
    try:
        # ------------------------------------------------------------------ the study, in the run directory
        run_path.mkdir(parents=True, exist_ok=True)
        if not resume:
            config = {
                "space": search.to_dict(),
                "trials": trials,
                "sampler": sampler,
                "pruner": pruner,
                "metric": metric,
                "direction": direction,
                "seed": seed,
                "threads_per_trial": threads_per_trial,
                "objective": "builtin" if builtin is not None else getattr(objective, "__qualname__", "user"),
                "dataset": dataset,
                "data_dir": str(Path(data_dir).expanduser().absolute()) if data_dir is not None else None,
                "model": builtin.saved_model if builtin is not None else None,
                "limit_train": limit_train,
                "limit_test": limit_test,
                "select_on": select_on if builtin is not None else None,
                "validation": validation if builtin is not None and select_on == "validation" else None,
            }
            rundir.write_config(run_path, config)
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = JournalStorage(JournalFileBackend(str(run_path / JOURNAL)))
            study = optuna.create_study(
                study_name=STUDY_NAME,
                storage=storage,
                load_if_exists=True,
                direction=optuna.study.StudyDirection.MAXIMIZE
                if direction == "maximize"
                else optuna.study.StudyDirection.MINIMIZE,
                sampler=_sampler(sampler, search, seed),
                pruner=_pruner(pruner),
            )
        study_id = storage.get_study_id_from_name(STUDY_NAME)
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            # Running when the driver died: keep nothing of it, run its configuration again. The storage we
            # opened is how a trial nobody holds a live ``optuna.Trial`` for gets its attribute.
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
            storage.set_trial_user_attr(trial_id, INTERRUPTED_ATTR, True)
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            study.enqueue_trial(
                t.params, user_attrs={"deepspark:rerun_of": t.number, **_carried(t.user_attrs)}
            )
        finished = len(records_from_study(study))
        if default_params is not None and not study.trials:
            study.enqueue_trial(
                default_params, user_attrs={DEFAULT_ATTR: True, OVERRIDES_ATTR: default_overrides}
            )
        if sampler == "grid":
            # `trials` grid points, each once; the default configuration (and re-runs of interrupted
            # trials) come on top: everything still to run is a waiting trial.
            _plan_grid(study, search, points=trials, seed=seed)
            to_run = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)))
        else:
            to_run = max(0, trials - finished)

        test_data = None
        if builtin is not None:
            assert select_on is not None
            data, test_data = _study_data(
                dataset,
                data_dir,
                limit_train=limit_train,
                limit_test=limit_test,
                select_on=select_on,
                validation=validation,
                seed=seed,
            )
            builtin.check_data(input_shape=data.input_shape, num_classes=data.num_classes)
        started = time.perf_counter()
        stop_reason: str | None = None
        used_parallelism = 0
        if to_run:
            stop_reason, used_parallelism = _execute(
                study,
                objective,
                search=search,
                distributions=distributions,
                to_run=to_run,
                run_path=run_path,
                parallelism=parallelism,
                threads=threads_per_trial,
                max_failures=max_failures,
                max_attempts=max_attempts,
                metric=metric,
                data=data,
                keep_default=select_on == "validation",
                master=master,
                on_event=on_event,
                on_start=on_start,
                timeout=timeout,
                trial_timeout=trial_timeout,
                heartbeat_timeout=heartbeat_timeout,
            )
    except BaseException:
        # A start that failed (no Spark, a bad master or dataset, executors that cannot run the study,
        # Ctrl-C while the JVM starts) leaves nothing behind, so the corrected command runs as is.
        if created and not resume and (study is None or not records_from_study(study)):
            shutil.rmtree(run_path, ignore_errors=True)
        raise
    wall = time.perf_counter() - started
    records = records_from_study(study)
    maximize = direction == "maximize"
    best, default = best_and_default(records, maximize=maximize)
    best_dir = run_path / rundir.BEST_DIR
    _drop_stale_model(best_dir, best)
    tests: dict[int, float] = {}
    if test_data is not None and select_on == "validation":
        tests = _test_accuracies(run_path, test_data, {rundir.BEST_DIR: best, rundir.DEFAULT_DIR: default})
    summary = write_reports(
        run_path,
        records,
        metric=metric,
        maximize=maximize,
        fixed=dict(search.fixed),
        wall_s=wall,
        best_checkpoint=best_dir if best_dir.is_dir() else None,
        selected_on=select_on if builtin is not None else None,
        test_accuracy=tests,
    )
    return StudyResult(
        run_dir=run_path,
        records=tuple(records),
        best=best,
        default=default,
        summary=summary,
        wall_s=wall,
        stop_reason=stop_reason,
        parallelism=used_parallelism,
        selected_on=select_on if builtin is not None else None,
    )


def _check_validation(value: Any) -> None:
    """The validation size's type and range, before any data is read (its count is checked later)."""
    fraction = isinstance(value, float) and 0.0 < value < 1.0
    count = isinstance(value, int) and not isinstance(value, bool) and value >= 1
    if not (fraction or count):
        raise ConfigError(
            f"validation: expected a fraction of the training split in (0, 1) or a count >= 1, got {value!r}"
        )


def _plan_grid(study: optuna.Study, search: SearchSpace, *, points: int, seed: int) -> None:
    """Enqueue the first ``points`` grid points (in ``seed``'s order) that no trial has taken yet.

    A point is taken by any trial of the study that holds it (waiting, running or finished), except
    the default configuration's trial, which runs in addition to the grid, and interrupted attempts,
    whose re-run is itself a waiting trial. So a resumed study runs only the points still missing.
    """

    def key(params: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
        return tuple(sorted((name, repr(value)) for name, value in params.items()))

    taken = {
        key(t.user_attrs[GRID_ATTR])
        for t in study.get_trials(deepcopy=False)
        if GRID_ATTR in t.user_attrs and not t.user_attrs.get(INTERRUPTED_ATTR)
    }
    for point in search.grid_points(seed)[:points]:
        if key(point) not in taken:
            study.enqueue_trial(point, user_attrs={GRID_ATTR: point})


def _carried(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """What a re-run of an interrupted trial inherits: its default-ness, pinned values, grid point."""
    return {k: attrs[k] for k in CARRIED_ATTRS if k in attrs}


def _execute(
    study: optuna.Study,
    objective: Objective,
    *,
    search: SearchSpace,
    distributions: Mapping[str, Any],
    to_run: int,
    run_path: Path,
    parallelism: int | None,
    threads: int,
    max_failures: int | None,
    max_attempts: int,
    metric: str,
    data: Any,
    keep_default: bool,
    master: str | None,
    on_event: Callable[[TrialEvent], None] | None,
    on_start: Callable[[int, int], None] | None,
    timeout: float | None,
    trial_timeout: float | None,
    heartbeat_timeout: float | None,
) -> tuple[str | None, int]:
    from deepspark.spark import session, task_cpus

    spark = session(master, app_name="deepspark-tune", conf={"spark.task.cpus": threads})
    sc = spark.sparkContext
    cpus = task_cpus(spark)
    cores = sc.defaultParallelism
    # A trial uses max(threads_per_trial, spark.task.cpus) threads. When the session was made elsewhere
    # with fewer cpus per task than that, fewer trials run at once so that cores are never shared.
    effective_threads = max(threads, cpus)
    slots = max(1, cores // effective_threads)
    if cpus < threads:
        _log.warning(
            "spark.task.cpus is %d but threads_per_trial is %d: running at most %d trials at once",
            cpus,
            threads,
            slots,
        )
    wanted = parallelism or slots
    if wanted > slots:
        _log.warning(
            "parallelism %d is more than the cluster's %d task slots (%d cores / %d threads per "
            "trial); using %d",
            wanted,
            slots,
            cores,
            effective_threads,
            slots,
        )
    width = min(wanted, slots, to_run)
    # For the report's summary and scaling figure: where this (part of the) study ran.
    study.set_user_attr(
        CLUSTER_ATTR,
        {
            "master": sc.master,
            "cores": cores,
            "task_cpus": cpus,
            "slots": slots,
            "parallelism": width,
            "threads_per_trial": effective_threads,
        },
    )
    if on_start is not None:
        on_start(to_run, width)

    broadcast = sc.broadcast(data) if data is not None else None
    # Job tags (thread-local, like job groups) name the study's jobs and each slot's, so one slot's job
    # (a hung trial) or all of them (the study's deadline) can be cancelled.
    study_tag = f"deepspark-tune-{secrets.token_hex(4)}"

    def cancel(slot: int | None) -> None:
        sc.cancelJobsWithTag(study_tag if slot is None else f"{study_tag}-slot-{slot}")

    coordinator = Coordinator(
        study,
        distributions=distributions,
        fixed=search.fixed,
        n_trials=to_run,
        bind=_bind_address(spark),
        max_failures=max_failures,
        max_attempts=max_attempts,
        on_event=on_event,
        on_model=functools.partial(_save_model, run_path),
        on_default_model=functools.partial(_save_model, run_path, name=rundir.DEFAULT_DIR)
        if keep_default
        else None,
        timeout=timeout,
        trial_timeout=trial_timeout,
        heartbeat_timeout=heartbeat_timeout,
        cancel=cancel,
    )
    try:
        coordinator.start()
        endpoint = coordinator.endpoint
        spec = WorkerSpec(
            host=endpoint.host,
            port=endpoint.port,
            token=endpoint.token,
            objective=objective,
            metric=metric,
            broadcast=broadcast,
            threads=effective_threads,
        )
        body = functools.partial(run_worker, spec)
        systematic = _SystematicFailure(width)

        def on_lost(slot: int, exc: BaseException) -> None:
            coordinator.worker_lost(slot, reason=short_error(exc))
            # A worker that reached the driver shows the executors can run the study: later failures
            # are the cluster's (lost executors), for the retries to absorb.
            if coordinator.connections == 0 and systematic.failed(slot, exc):
                coordinator.stop(f"every trial worker failed: {systematic.cause}")

        def submit(slot: int) -> None:
            sc.addJobTag(study_tag)
            sc.addJobTag(f"{study_tag}-slot-{slot}")
            sc.parallelize([slot], 1).mapPartitions(functools.partial(body, slot)).collect()

        run_slots(
            sc,
            width=width,
            submit=submit,
            keep_going=lambda: not coordinator.finished and coordinator.stop_reason is None,
            on_lost=on_lost,
            stop=coordinator.stop,
            max_attempts=max_attempts,
            group_prefix="deepspark-tune",
            progress=lambda: len(coordinator.records),
            description="trial worker",
        )
        if not coordinator.finished:
            coordinator.stop("every trial worker stopped")
    finally:
        coordinator.stop(coordinator.stop_reason or "done")
        coordinator.interrupt_running()
        coordinator.close()
        if broadcast is not None:
            broadcast.destroy()
    if systematic.cause is not None:
        raise RunError(systematic.message())
    reason = coordinator.stop_reason
    return (None if reason == "done" else reason), width


class _SystematicFailure:
    """Every slot's first job failed with the same error before any worker reached the driver.

    Resubmitting cannot help then (the executors cannot import deepspark, say): the study stops after
    that first round instead of after ``max_attempts`` rounds of the same traceback.
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

    def message(self) -> str:
        fix = "see the executors' logs for the cause"
        if self.cause is not None and ("ModuleNotFoundError" in self.cause or "ImportError" in self.cause):
            fix = (
                "install deepspark on the executors (with its dependencies), or set spark.pyspark.python "
                "to a Python that has it"
            )
        return (
            f"every trial worker failed the same way before reaching the driver ({self.cause}); "
            f"no trial ran. Fix: {fix}"
        )
