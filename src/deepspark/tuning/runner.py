"""``tune()``: a study whose trials run as Spark tasks.

The driver holds the Optuna study (in the run directory, so it survives the driver) and a small TCP
coordinator. It submits one long-lived Spark task per slot; each task pulls trial after trial from the
coordinator, so a trial costs one round trip rather than one Spark job, and the broadcast data is read
once per task. A task that dies (executor lost, worker killed) is resubmitted and its trial runs again;
an objective that raises is a FAIL and the study goes on.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import secrets
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage, JournalStorage
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

from deepspark import rundir
from deepspark.errors import ConfigError, RunError
from deepspark.slots import SameFailure, run_slots, short_error
from deepspark.spark import check_task_cpus, release_broadcast, speculative_copy
from deepspark.tuning.config import (
    BUILTIN,
    LEGACY_STUDY_NAME,
    OBJECT_PREFIX,
    PRUNERS,
    SAMPLERS,
    RunOptions,
    StudyConfig,
    object_name,
)
from deepspark.tuning.coordinator import (
    CARRIED_ATTRS,
    DEFAULT_ATTR,
    DEFAULT_HEARTBEAT_TIMEOUT,
    GRID_ATTR,
    INTERRUPTED_ATTR,
    OVERRIDES_ATTR,
    RERUN_ATTR,
    Coordinator,
    TrialEvent,
    TrialEventKind,
    interrupted_attrs,
)
from deepspark.tuning.objectives import SELECT_ON, BuiltinOptions, ImageClassifierObjective, dataset_name
from deepspark.tuning.refit import refit_models
from deepspark.tuning.report import StudySummary, best_and_default, records_from_study, write_reports
from deepspark.tuning.sampling import PROCESS_FROM_TRIALS, ProcessSampler, sampler_processes, tpe_sampler
from deepspark.tuning.space import SearchSpace, is_fixed_value, load_space
from deepspark.tuning.trial import Reporter, TrialRecord, TrialState
from deepspark.tuning.worker import WorkerSpec, run_worker
from deepspark.validation import fail

__all__ = [
    "CLUSTER_ATTR",
    "JOURNAL",
    "PRUNERS",
    "SAMPLERS",
    "SELECT_ON",
    "STUDY_NAME",
    "JournalFile",
    "StudyResult",
    "tune",
]

_log = logging.getLogger(__name__)

JOURNAL = "study.journal"


class JournalFile(JournalFileBackend):
    """A study's journal file (Optuna's), whose append a full disk cannot leave torn.

    A failed append (no space left, a quota, an I/O error) could write part of its line. Optuna reads a
    cut last line as one still being written, but once an append after it succeeded (space freed: the
    failed model's temp folder removed) the whole journal was unreadable, ``Invalid log format``: the
    study and every finished trial in it lost. The cut line is now removed again, under the journal's lock.
    """

    def __init__(self, path: str | os.PathLike[str], *, held: bool = False) -> None:
        """``held``: this process holds the journal's run directory (:func:`rundir.exclusive`), so a lock
        older than a few seconds was left by a killed process. It is let go after 3 s, not after the 30 s
        Optuna waits by default before forcing it (the first write of a resume waited those 30 s)."""
        self._path_of_journal = Path(path)
        self._lock_of_journal = JournalFileSymlinkLock(str(path))
        if held and self._path_of_journal.exists():
            left = JournalFileSymlinkLock(str(path), grace_period=3)
            if left.acquire():
                left.release()
        super().__init__(str(path), lock_obj=self._lock_of_journal)

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        try:
            super().append_logs(logs)
        except OSError:
            with contextlib.suppress(OSError):  # the lock itself may be what the disk refused
                self._cut_torn_line()
            raise

    def _cut_torn_line(self) -> None:
        """Truncate the journal after its last complete line (every append ends with a newline)."""
        if not self._lock_of_journal.acquire():
            return
        try:
            with open(self._path_of_journal, "r+b") as fh:
                end = fh.seek(0, os.SEEK_END)
                cut = end
                while cut > 0:
                    start = max(cut - 65536, 0)
                    fh.seek(start)
                    chunk = fh.read(cut - start)
                    newline = chunk.rfind(b"\n")
                    if newline >= 0:
                        cut = start + newline + 1
                        break
                    cut = start
                if cut < end:
                    fh.truncate(cut)
                    fh.flush()
                    os.fsync(fh.fileno())
        finally:
            self._lock_of_journal.release()


#: The study name of run directories written before studies were named after their run directory
#: (a new study's name is config.json's ``study_name``; a journal holds one study).
STUDY_NAME = LEGACY_STUDY_NAME
CLUSTER_ATTR = "deepspark:cluster"
#: The built-in objective's data, as a fingerprint of the arrays the study trains, selects and tests
#: on: a resume must run on the same data (a directory given again may hold another dataset).
DATA_ATTR = "deepspark:data"

Objective = Callable[[dict[str, Any], Reporter], Any]
# What every study's config.json holds (see tune()); a resume reads them back.
_SAVED_KEYS = ("space", "trials", "sampler", "pruner", "metric", "direction", "objective")


@dataclass(frozen=True)
class StudyResult:
    """The outcome of :func:`tune`: every finished trial of the study (this run and earlier ones).

    ``summary`` is what ``best.json`` holds, as a :class:`~deepspark.tuning.report.StudySummary`
    record (read like a mapping too: ``summary["best"]["config"]``).
    """

    run_dir: Path
    records: tuple[TrialRecord, ...]
    best: TrialRecord | None
    default: TrialRecord | None
    summary: StudySummary = field(default_factory=StudySummary)
    wall_s: float = 0.0
    stop_reason: str | None = None
    parallelism: int = 1
    #: The built-in objective's selection split ("validation" or "test"); None for a user objective.
    selected_on: str | None = None
    #: The Optuna study's name in its storage.
    study_name: str | None = None

    @property
    def error_reduction(self) -> float | None:
        """The best trial's drop in error rate from the default's (on test accuracy when measured)."""
        return self.summary.error_reduction

    def counts(self) -> dict[str, int]:
        return {s.value: sum(r.state is s for r in self.records) for s in TrialState}


def _sampler(
    config: StudyConfig,
    search: SearchSpace,
    given: object,
    *,
    journal: Path | None,
    trials: int,
    parallelism: int | None,
    existing: int = 0,
) -> optuna.samplers.BaseSampler:
    if isinstance(given, optuna.samplers.BaseSampler):
        return given
    seed = _sampler_seed(config.seed, existing)
    if config.sampler == "tpe":
        n_startup = min(10, max(2, len(search.params) * 2))
        if journal is not None and trials >= PROCESS_FROM_TRIALS:
            # A large study: TPE's ask grows with it, so it runs beside the driver, not in it (in one
            # process for a study that runs one trial at a time: its asks come one at a time).
            return ProcessSampler(
                journal=str(journal.resolve()),
                study_name=config.study_name,
                seed=seed,
                n_startup_trials=n_startup,
                processes=1 if parallelism == 1 else sampler_processes(),
            )
        return tpe_sampler(seed=seed, n_startup_trials=n_startup)
    # "grid": every point is enqueued up front (see _plan_grid), so the sampler is never asked for a value.
    # Optuna's GridSampler is not used: it calls study.stop() from tell() once the grid is exhausted
    # (an error outside study.optimize) and gives a grid point to the enqueued default trial's number.
    return optuna.samplers.RandomSampler(seed=seed)


def _sampler_seed(seed: int, existing: int) -> int:
    """The sampler's seed for a study that already holds ``existing`` trials: the study's seed for a
    new study; for a resumed one, a seed derived from both (still reproducible).

    A sampler seeded again with the study's seed replays its random draws from the start: a resume
    (or an extension with a larger ``trials``) would propose the configurations of the first trials
    again (every one with ``random``, the start-up trials with ``tpe``), and run them again.
    """
    if existing == 0:
        return seed
    digest = hashlib.sha256(f"deepspark-sampler:{seed}:{existing}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def _pruner(config: StudyConfig, given: object) -> optuna.pruners.BasePruner:
    if isinstance(given, optuna.pruners.BasePruner):
        return given
    if config.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=1)
    if config.pruner == "asha":
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
    threads_per_trial: int | None = None,
    sampler: str | optuna.samplers.BaseSampler | None = None,
    pruner: str | optuna.pruners.BasePruner | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    max_failures: int | None = None,
    max_attempts: int = 3,
    metric: str | None = None,
    direction: str | None = None,
    default_config: Mapping[str, Any] | bool = True,
    data: Any = None,
    dataset: str | None = None,
    data_dir: str | None = None,
    model: str | Mapping[str, Any] | None = None,
    limit_train: int | None = None,
    limit_test: int | None = None,
    select_on: str | None = None,
    validation: float | int | None = None,
    refit: bool | None = None,
    master: str | None = None,
    seed: int | None = None,
    timeout: float | None = None,
    trial_timeout: float | None = None,
    heartbeat_timeout: float | None = DEFAULT_HEARTBEAT_TIMEOUT,
    on_event: Callable[[TrialEvent], None] | None = None,
    on_start: Callable[[int, int], None] | None = None,
    study_name: str | None = None,
    storage: str | None = None,
    callbacks: Sequence[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]] | None = None,
    device: str = "auto",
) -> StudyResult:
    """Run a hyperparameter study whose trials are Spark tasks.

    Either give ``objective(config, reporter) -> float | dict`` (any framework; ``data`` is broadcast once
    and reaches it as ``reporter.data``), or leave it out and name a ``dataset`` and ``model`` (a zoo
    name, default ``"cnn"``, or a model spec: a JSON/YAML file or mapping whose output count covers the
    dataset's classes): the built-in objective trains it with each trial's config on ``device``
    (``"auto"``: the GPU Spark assigned the task when CUDA can use it, else the CPU; ``"cuda"``; ``"cpu"``)
    and reports per-epoch accuracy on the split ``select_on`` names: ``"validation"`` (the default; a
    seeded, stratified hold-out of ``validation`` of the training split, 10% by default, seeded with
    ``seed``) or ``"test"`` (the 2016 blog's protocol, whose chosen accuracy is optimistic). Selecting
    on validation, the best trial's and the default configuration's test accuracy are measured once, at
    the end, and written beside their validation accuracy in ``best.json`` and ``trials.csv``; with
    ``refit=True`` those two configurations are then trained again on training + validation (as Spark
    tasks) and measured once on test (``refit_test_accuracy`` in ``best.json``, the models in
    ``run_dir/refit/``; see :mod:`deepspark.tuning.refit`).

    The study's settings (``space``, ``trials`` (default 24), ``sampler`` (``"tpe"``, ``"random"``,
    ``"grid"`` or an Optuna sampler object), ``pruner`` (``"median"``, ``"asha"``, ``"none"`` or an
    Optuna pruner object), ``metric`` (``"accuracy"``), ``direction`` (``"maximize"``), ``seed`` (0),
    ``threads_per_trial`` (1), ``study_name`` (the run directory's name), ``storage`` (an Optuna storage
    URL; default: the journal file in the run directory) and the built-in objective's options) become
    one validated :class:`~deepspark.tuning.config.StudyConfig`, saved as ``run_dir/config.json`` and as
    the Optuna study's user attributes. ``resume=True`` continues that study after a crash or Ctrl-C:
    finished trials are kept, interrupted ones run again, settings not given are the saved ones, and a
    setting given that differs from the saved one is a :class:`ConfigError` naming every such setting.
    ``trials`` larger than saved extends the study; smaller bounds this run only. Sampler and pruner
    objects cannot be saved: a resume of a study that used one must pass it again.

    ``callbacks`` are Optuna study callbacks, called on the driver with ``(study, frozen_trial)`` after
    each finished trial (a callback that raises is logged; the study goes on).

    Clocks, in seconds: ``timeout`` bounds the whole study (at the deadline running trials are
    interrupted and queued for ``resume``, as on Ctrl-C; ``stop_reason`` is ``"timeout"``);
    ``trial_timeout`` bounds each trial (it FAILs with ``"trial timed out after N s"``, is not retried,
    and its Spark task is cancelled); a worker silent for ``heartbeat_timeout`` while it holds a trial
    (a frozen host) is taken for dead and the trial runs again elsewhere (None turns this off).
    Every argument is checked before a Spark job starts.
    """
    options = RunOptions(
        parallelism=parallelism,
        max_failures=max_failures,
        max_attempts=max_attempts,
        timeout=timeout,
        trial_timeout=trial_timeout,
        heartbeat_timeout=heartbeat_timeout,
        master=master,
        device=device,
        callbacks=callbacks or (),
        on_event=on_event,
        on_start=on_start,
    )
    if objective is not None and not callable(objective):
        raise fail("objective", "a callable objective(config, reporter)", objective)
    if objective is not None and select_on is not None:
        raise ConfigError(
            f"select_on: applies to the built-in objective only (got {select_on!r} with a Python "
            "objective, which chooses its own metric and data: hold out a validation split in it, e.g. "
            "with ImageDataset.split_validation)"
        )
    if objective is None and (metric not in (None, "accuracy") or direction not in (None, "maximize")):
        # Its trials report accuracy to the pruner every epoch, and best.json, trials.csv and the
        # leaderboard read each trial's value as its validation (or test) accuracy.
        raise ConfigError(
            f"metric/direction: the built-in objective selects on accuracy, maximised (got metric="
            f"{metric!r}, direction={direction!r}); its loss is in each trial's metrics. To select on "
            "another metric, pass your own objective"
        )
    if select_on == "test" and validation is not None:
        raise ConfigError(
            f"validation: applies when trials are selected on validation; with select_on='test' no "
            f"validation split is held out (got validation={validation!r}); drop one of the two"
        )
    if objective is None and data is not None:
        raise ConfigError(
            "data: reaches your own objective (as reporter.data); the built-in objective loads its data "
            "from dataset/data_dir and would ignore it. Pass an objective, or name the data with dataset= "
            "or data_dir= (an ImageDataset: write it as an MNIST-layout directory with write_idx)"
        )
    if objective is not None and refit:
        raise ConfigError(
            "refit: applies to the built-in objective only (a Python objective holds its own data: "
            "train the best configuration again yourself from best.json's config)"
        )
    given: dict[str, Any] = {
        "trials": trials,
        "sampler": _named("sampler", sampler, SAMPLERS, optuna.samplers.BaseSampler),
        "pruner": _named("pruner", pruner, PRUNERS, optuna.pruners.BasePruner),
        "metric": metric,
        "direction": direction,
        "seed": seed,
        "threads_per_trial": threads_per_trial,
        "study_name": study_name,
        "storage": storage,
    }
    builtin_given: dict[str, Any] = {
        "dataset": dataset,
        "model": model,
        "limit_train": limit_train,
        "limit_test": limit_test,
        "select_on": select_on,
        "validation": validation,
        "refit": refit,
    }
    run_path = Path(run_dir) if run_dir is not None else Path(tempfile.mkdtemp(prefix="deepspark-tune-"))
    rundir.prepare(run_path, resume=resume)
    saved: dict[str, Any] = {}
    if resume:
        saved = rundir.read_config(run_path, required=_SAVED_KEYS, kind="tune study")
        config = _resumed_config(
            run_path, saved, objective, given, builtin_given, space=space, data_dir=data_dir
        )
        _check_objects(config, sampler=sampler, pruner=pruner)
    else:
        search = load_space(space)
        if not search.params:
            raise ConfigError(
                "space: no parameter to search; give at least one distribution (see docs/tune.md)"
            )
        builtin = None
        if objective is None:
            builtin = BuiltinOptions(
                **{k: v for k, v in builtin_given.items() if v is not None}, data_dir=data_dir
            )
        defaults = {
            "trials": 24,
            "seed": 0,
            "threads_per_trial": 1,
            "study_name": run_path.absolute().name or LEGACY_STUDY_NAME,
        }
        config = StudyConfig(
            space=search.to_dict(),
            objective=BUILTIN if objective is None else getattr(objective, "__qualname__", "user"),
            builtin=builtin,
            **{**defaults, **{k: v for k, v in given.items() if v is not None}},
        )
    search = load_space(config.space)
    target = trials if resume and trials is not None else config.trials
    if config.sampler == "grid":
        size = search.grid_size()
        if size < target:
            _log.warning("the grid has %d points; running each once, not %d trials", size, target)
        config, target = replace(config, trials=min(size, config.trials)), min(size, target)
    check_task_cpus("threads_per_trial", config.threads_per_trial, master=master)
    builtin_objective: ImageClassifierObjective | None = None
    if config.builtin is not None:
        builtin_objective = config.builtin.objective(device=options.device)
        search.check(builtin_objective.check)  # names, and every value the space can give, before Spark
    default = _default_trial(search, builtin_objective, default_config, resume=resume)
    assert objective is not None or builtin_objective is not None
    return _run(
        config,
        options,
        search=search,
        objective=builtin_objective or objective,  # type: ignore[arg-type]
        builtin=builtin_objective is not None,
        data=data,
        default=default,
        target=target,
        run_path=run_path,
        resume=resume,
        saved=saved,
        objects=(sampler, pruner),
    )


def _named(name: str, value: Any, names: Sequence[str], base: type) -> str | None:
    """A sampler or pruner as :class:`StudyConfig` holds it: its name, or ``object:ClassName``."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, base):
        return object_name(value)
    raise fail(name, f"one of {list(names)} or an {base.__module__}.{base.__name__}", value)


def _resumed_config(
    run_path: Path,
    saved: Mapping[str, Any],
    objective: Objective | None,
    given: Mapping[str, Any],
    builtin_given: Mapping[str, Any],
    *,
    space: Any,
    data_dir: str | None,
) -> StudyConfig:
    """The saved study, checked against what the caller gave again (one error naming every conflict)."""
    config = StudyConfig.from_dict(saved, where=str(run_path / rundir.CONFIG_FILE))
    if objective is None and config.objective != BUILTIN:
        kind = config.objective
        raise ConfigError(
            f"resume: {run_path} is a study of the Python objective {kind!r}, which the run directory "
            f"cannot hold; resume it from Python: deepspark.tune({kind}, run_dir={str(run_path)!r}, "
            "resume=True) (`deepspark tune --resume` resumes studies of the built-in objective only)"
        )
    compared = {**given, "space": load_space(space).to_dict() if space is not None else None}
    conflicts = []
    if objective is not None and config.objective == BUILTIN:
        name = getattr(objective, "__qualname__", "user")
        conflicts.append(f"objective (saved 'builtin', given the Python objective {name!r})")
    if config.builtin is not None:
        model = builtin_given.get("model")
        compared.update(builtin_given)
        compared["model"] = ImageClassifierObjective(model=model).saved_model if model is not None else None
        compared["dataset"] = dataset_name(builtin_given.get("dataset"))
    conflicts += config.conflicts(compared)
    if conflicts:
        raise ConfigError(
            f"resume: the study in {run_path} was saved with other settings than those given: "
            f"{'; '.join(conflicts)}. Drop them to continue the saved study, or start a new run directory"
        )
    if data_dir is not None and config.builtin is not None:
        # Where the data lives may change between runs (checksums say whether it is the same dataset).
        config = replace(config, builtin=replace(config.builtin, data_dir=data_dir))
    return config.resumed(given.get("trials"))


def _check_objects(config: StudyConfig, *, sampler: object, pruner: object) -> None:
    """A study run with the caller's own sampler or pruner object needs it again on resume."""
    for name, saved, value in (("sampler", config.sampler, sampler), ("pruner", config.pruner, pruner)):
        if saved.startswith(OBJECT_PREFIX) and value is None:
            cls = saved[len(OBJECT_PREFIX) :]
            raise ConfigError(
                f"resume: the study's {name} is your own {cls} object, which config.json cannot hold; "
                f"pass {name}=<a {cls}> again (deepspark.tune(..., resume=True, {name}=...))"
            )


def _default_trial(
    search: SearchSpace,
    builtin: ImageClassifierObjective | None,
    default_config: Mapping[str, Any] | bool,
    *,
    resume: bool = False,
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The default configuration's trial as (searched params, overrides of ``fixed``), or None.

    On ``resume`` the built-in default lying outside the space is no error but None: the default trial
    is only ever added to a study with no trials, and a study made with ``--no-default`` (the one way
    to search such a space) was refused on every ``--resume`` that did not repeat the flag.
    """
    if not isinstance(default_config, bool | Mapping):  # None or "yes" would silently run no default
        raise fail("default_config", "True, False or a mapping of parameter -> value", default_config)
    params: dict[str, Any] | None = None
    overrides: dict[str, Any] = {}
    if default_config is True and builtin is not None:
        params = builtin.default_params(sorted(search.params))
    elif isinstance(default_config, Mapping):
        # A full configuration: searched keys become the trial's params, the rest override ``fixed``.
        params = {k: default_config[k] for k in search.params if k in default_config}
        overrides = {k: v for k, v in default_config.items() if k not in search.params}
        missing = sorted(set(search.params) - set(params))
        if missing:
            raise ConfigError(f"default_config: lacks a value for searched parameter(s) {missing}")
        for name, value in overrides.items():
            if not is_fixed_value(value):  # it travels as JSON, as the space's fixed values do
                raise fail(f"default_config[{name!r}]", "a number, string, boolean or None", value)
        if builtin is not None:
            builtin.check({**default_config})
    if params is None:
        return None
    for name, value in params.items():
        if not search.contains(name, value):
            if resume and default_config is True:
                return None
            raise ConfigError(
                f"the default configuration's {name}={value!r} lies outside the space for {name}; "
                "widen the space to include it, or pass default_config=False (--no-default)"
            )
    # As sampled trials get them (an int parameter's 4.0 as 4, a choice as the space's own value).
    return {name: search.value(name, value) for name, value in params.items()}, overrides


@dataclass(frozen=True)
class _Work:
    """What one run executes: the study's settings and what was made from them (never saved)."""

    config: StudyConfig
    search: SearchSpace
    objective: Objective
    data: Any
    to_run: int
    run_path: Path
    keep_default: bool


def _run(
    config: StudyConfig,
    options: RunOptions,
    *,
    search: SearchSpace,
    objective: Objective,
    builtin: bool,
    data: Any,
    default: tuple[dict[str, Any], dict[str, Any]] | None,
    target: int,
    run_path: Path,
    resume: bool,
    saved: Mapping[str, Any],
    objects: tuple[object, object],
) -> StudyResult:
    """Open (or make) the study, run what is missing, write the reports."""
    created = not run_path.exists() or not any(run_path.iterdir())
    top = rundir.first_missing(run_path) or run_path  # what a failed start removes: with any parent it made
    # Held to the end: a second command in this directory is refused, not interleaved with this one.
    with rundir.exclusive(run_path, new=not resume), quiet_optuna():
        study: optuna.Study | None = None
        finished: int | None = None
        made = False
        selected_on = config.builtin.select_on if config.builtin is not None else None
        for kept in (rundir.BEST_DIR, rundir.DEFAULT_DIR):
            rundir.restore_dir(run_path / kept)
        try:
            run_path.mkdir(parents=True, exist_ok=True)
            if config.to_dict() != dict(saved):
                rundir.write_config(run_path, config.to_dict())
            study, storage, made = _open_study(
                config,
                run_path,
                resume=resume,
                search=search,
                objects=objects,
                trials=target,
                parallelism=options.parallelism,
            )
            _requeue_running(study, storage, config.study_name)
            finished = len(records_from_study(study))
            if default is not None and not study.trials:
                params, overrides = default
                study.enqueue_trial(params, user_attrs={DEFAULT_ATTR: True, OVERRIDES_ATTR: overrides})
            if config.sampler == "grid":
                # `trials` grid points, each once; the default configuration (and re-runs of interrupted
                # trials) come on top: everything still to run is a waiting trial.
                # Refused before planning, so that a refusal adds nothing to the journal.
                _check_grid_plan(study, search, points=target, seed=config.seed)
                _plan_grid(study, search, points=target, seed=config.seed)
                to_run = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)))
            else:
                to_run = max(0, target - finished)
            test_data = None
            if builtin:
                assert config.builtin is not None and isinstance(objective, ImageClassifierObjective)
                data, test_data = config.builtin.data(seed=config.seed)
                objective.check_data(input_shape=data.input_shape, num_classes=data.num_classes)
                _check_same_data(study, _data_fingerprint(data, test_data), config, run_path)
            started = time.perf_counter()
            stop_reason: str | None = None
            used_parallelism = 0
            if to_run:
                work = _Work(
                    config=config,
                    search=search,
                    objective=objective,
                    data=data,
                    to_run=to_run,
                    run_path=run_path,
                    keep_default=selected_on == "validation",
                )
                try:
                    if isinstance(study.sampler, ProcessSampler):
                        study.sampler.start()
                    stop_reason, used_parallelism = _execute(study, work, options)
                finally:
                    if isinstance(study.sampler, ProcessSampler):
                        study.sampler.close()  # its process never outlives the trials it samples for
        except BaseException:
            # A start that failed (no Spark, a bad master or dataset, executors that cannot run the study,
            # Ctrl-C while the JVM starts) leaves nothing behind, so the corrected command runs as is.
            if created and not resume and (study is None or not records_from_study(study)):
                if made and config.storage is not None:
                    optuna.delete_study(study_name=config.study_name, storage=config.storage)
                shutil.rmtree(top, ignore_errors=True)
            if resume and saved and config.to_dict() != dict(saved) and not _finished_since(study, finished):
                # A resume that failed before finishing a trial (a bad --data-dir, say) leaves the study's
                # settings as they were saved: the next plain --resume must not inherit what failed.
                rundir.write_config(run_path, dict(saved))
            raise
        wall = time.perf_counter() - started
        records = records_from_study(study)
        best, default_record = best_and_default(records, maximize=config.maximize)
        summary = _previous_summary(run_path, records, best) if resume and len(records) == finished else None
        # Not after Ctrl-C: the user asked to stop, and the --resume that runs the interrupted trials refits.
        refitting = (
            test_data is not None
            and config.builtin is not None
            and config.builtin.refit
            and stop_reason != "interrupted"
        )
        if (
            summary is not None
            and refitting
            and summary.best is not None
            and summary.best.refit_test_accuracy is None
        ):
            summary = None  # the refit never finished (Ctrl-C, a failure): this resume does it
        if summary is None:
            # Nothing is rewritten by a resume that finished no trial: best.json keeps the study's figures.
            best_dir = run_path / rundir.BEST_DIR
            _drop_stale_model(best_dir, best)
            tests: dict[int, float] = {}
            chosen = {rundir.BEST_DIR: best, rundir.DEFAULT_DIR: default_record}
            if test_data is not None and selected_on == "validation":
                tests = _test_accuracies(run_path, test_data, chosen)
            report = functools.partial(
                write_reports,
                run_path,
                records,
                metric=config.metric,
                maximize=config.maximize,
                fixed=dict(search.fixed),
                wall_s=wall,
                best_checkpoint=best_dir if best_dir.is_dir() else None,
                selected_on=selected_on,
                test_accuracy=tests,
                space=search,
            )
            summary = report()
            if refitting:
                # After the reports: a refit that fails (or Ctrl-C) leaves the study's own figures written.
                summary = report(refit_test_accuracy=_refit(config, options, test_data, chosen, run_path))
        return StudyResult(
            run_dir=run_path,
            records=tuple(records),
            best=best,
            default=default_record,
            summary=summary,
            wall_s=wall,
            stop_reason=stop_reason,
            parallelism=used_parallelism,
            selected_on=selected_on,
            study_name=config.study_name,
        )


def _refit(
    config: StudyConfig,
    options: RunOptions,
    split: Any,
    chosen: Mapping[str, TrialRecord | None],
    run_path: Path,
) -> dict[int, float]:
    """The chosen configurations trained again on training + validation and scored on test, by trial."""
    from deepspark.spark import session, task_cpus

    assert config.builtin is not None
    threads = config.threads_per_trial
    spark = session(options.master, app_name="deepspark-tune", conf={"spark.task.cpus": threads})
    _log.info("refitting %s on training + validation", ", ".join(k for k, r in chosen.items() if r))
    return refit_models(
        spark,
        objective=config.builtin.objective(device=options.device, evaluated_on="test"),
        data=split.validation_in_training(),
        chosen=chosen,
        threads=max(threads, task_cpus(spark)),
        run_dir=run_path,
    )


def _data_fingerprint(trials: Any, test: Any) -> dict[str, Any]:
    """What identifies the built-in objective's data: a SHA-256 of the trials' training and selection
    arrays and of the test split, with their sizes (for the error message)."""
    from deepspark.data.record import arrays_sha256

    sha256 = arrays_sha256(
        trials.train_images,
        trials.train_labels,
        trials.test_images,
        trials.test_labels,
        test.test_images,
        test.test_labels,
    )
    return {
        "sha256": sha256,
        "train": len(trials.train_labels),
        "selection": len(trials.test_labels),
        "test": len(test.test_labels),
    }


def _check_same_data(
    study: optuna.Study, fingerprint: Mapping[str, Any], config: StudyConfig, run_path: Path
) -> None:
    """Record the data a study runs on; refuse a resume whose data is other than the study's.

    ``data_dir`` may change between runs (where the data lives now), and a directory's files may
    change under it: a directory that holds another dataset would mix two datasets in one study,
    its trials ranked together and the best model tested on data it never saw. A study saved before
    the fingerprint existed is fingerprinted now.
    """
    held = study.user_attrs.get(DATA_ATTR)
    if not isinstance(held, Mapping) or "sha256" not in held:
        study.set_user_attr(DATA_ATTR, dict(fingerprint))
        return
    if held["sha256"] == fingerprint["sha256"]:
        return  # (on a mismatch, _run's handler puts the saved config.json back: no trial finished)
    assert config.builtin is not None
    where = config.builtin.data_dir or config.builtin.dataset

    def sizes(f: Mapping[str, Any]) -> str:
        return f"train {f.get('train')}, selection {f.get('selection')}, test {f.get('test')}"

    raise ConfigError(
        f"resume: the data in {where} is not the data the study in {run_path} ran on "
        f"(saved: {sizes(held)}; now: {sizes(fingerprint)}; the arrays' SHA-256 differ). Point "
        "--data-dir (data_dir=) at the study's own data, or start a new run directory for this one"
    )


def _finished_since(study: optuna.Study | None, finished: int | None) -> bool:
    """Whether trials finished since the study was opened with ``finished`` finished trials."""
    if study is None or finished is None:
        return False
    return len(records_from_study(study)) > finished


def _previous_summary(
    run_path: Path, records: Sequence[TrialRecord], best: TrialRecord | None
) -> StudySummary | None:
    """``best.json`` as the study's last end wrote it, if it still describes ``records`` (the journal's
    finished trials: their counts and best trial); else None.

    A driver that died after a trial was told to the journal and before the reports were written (killed,
    or Ctrl-C while they were written) left a ``best.json`` behind the journal: it must be written again.
    """
    try:
        summary = StudySummary.from_dict(json.loads((run_path / "best.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    counts = {s.value: sum(r.state is s for r in records) for s in TrialState}
    held = summary.best.trial if summary.best is not None else None
    if dict(summary.counts) != counts or held != (best.number if best is not None else None):
        return None
    return summary


@contextlib.contextmanager
def quiet_optuna() -> Iterator[None]:
    """Within the block, Optuna logs warnings and errors only (not a line per trial: deepspark reports
    trials itself); its verbosity is then put back as the caller had it (a notebook's own setting)."""
    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(before)


def _open_study(
    config: StudyConfig,
    run_path: Path,
    *,
    resume: bool,
    search: SearchSpace,
    objects: tuple[object, object],
    trials: int,
    parallelism: int | None,
) -> tuple[optuna.Study, BaseStorage, bool]:
    """The study in its storage (made when missing), its settings set as user attributes; and whether
    this call made it. A new run never joins a study of the same name that a shared storage holds."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        journal = run_path / JOURNAL if config.storage is None else None
        if journal is not None:
            storage: BaseStorage = JournalStorage(JournalFile(journal, held=True))
        else:
            database = sqlite_database(config.storage or "")
            if resume and database and not Path(database).is_file():
                # Opening it would create an empty database and a new study in it, whose trials would all
                # run again: a relative sqlite:///NAME.db is read from the working directory.
                raise ConfigError(
                    f"resume: the storage {config.storage} named by {run_path / 'config.json'} does not exist "
                    f"(no file {Path(database).absolute()}); a relative sqlite path is read from the working "
                    "directory: resume from the directory the study started in"
                )
            try:
                storage = optuna.storages.get_storage(config.storage)
            except Exception as exc:  # a bad URL, a missing database driver, an unreachable server
                raise ConfigError(f"storage: cannot open {config.storage!r}: {short_error(exc)}") from None
        exists = config.study_name in optuna.get_all_study_names(storage)
        if exists and not resume:
            raise ConfigError(
                f"study_name: the storage already holds a study named {config.study_name!r}; choose another "
                "study_name (or run directory), or resume that study from its run directory"
            )
        existing = 0
        if exists:
            study_id = storage.get_study_id_from_name(config.study_name)
            existing = len(storage.get_all_trials(study_id, deepcopy=False))
        study = optuna.create_study(
            study_name=config.study_name,
            storage=storage,
            load_if_exists=True,
            direction=optuna.study.StudyDirection.MAXIMIZE
            if config.maximize
            else optuna.study.StudyDirection.MINIMIZE,
            sampler=_sampler(
                config,
                search,
                objects[0],
                journal=journal,
                trials=trials,
                parallelism=parallelism,
                existing=existing,
            ),
            pruner=_pruner(config, objects[1]),
        )
    for key, value in config.user_attrs().items():
        study.set_user_attr(key, value)
    return study, storage, not exists


def sqlite_database(url: str) -> str | None:
    """The file a ``sqlite:`` URL names; ``""`` for SQLAlchemy's in-memory database (``sqlite://``,
    ``sqlite:///``, ``:memory:``); None for another scheme or a URL SQLAlchemy cannot parse (opening the
    storage then says what is wrong)."""
    if not url.strip().lower().startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    try:
        database = make_url(url.strip()).database
    except Exception:  # SQLAlchemy's ArgumentError
        return None
    return "" if database in (None, "", ":memory:") else database


def _requeue_running(study: optuna.Study, storage: BaseStorage, study_name: str) -> None:
    """Trials still RUNNING in the storage were running when the driver died: keep nothing of them, mark
    them interrupted (not failed) and run their configuration again. The storage we opened is how a
    trial nobody holds a live ``optuna.Trial`` for gets its attributes."""
    study_id = storage.get_study_id_from_name(study_name)
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        for key, value in interrupted_attrs("the driver stopped while it ran").items():
            storage.set_trial_user_attr(trial_id, key, value)
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={RERUN_ATTR: t.number, **_carried(t.user_attrs)})


def _plan_grid(study: optuna.Study, search: SearchSpace, *, points: int, seed: int) -> None:
    """Enqueue the first ``points`` grid points (in ``seed``'s order) that no trial has taken yet.

    A point is taken by any trial of the study that holds it (waiting, running or finished), except
    the default configuration's trial, which runs in addition to the grid, and interrupted attempts,
    whose re-run is itself a waiting trial. So a resumed study runs only the points still missing.
    """

    taken = {
        _grid_key(t.user_attrs[GRID_ATTR])
        for t in study.get_trials(deepcopy=False)
        if GRID_ATTR in t.user_attrs and not t.user_attrs.get(INTERRUPTED_ATTR)
    }
    for point in search.grid_points(seed)[:points]:
        if _grid_key(point) not in taken:
            study.enqueue_trial(point, user_attrs={GRID_ATTR: point})


def _check_grid_plan(study: optuna.Study, search: SearchSpace, *, points: int, seed: int) -> None:
    """Refuse a resume whose ``points`` leave out grid points an earlier run queued and never ran.

    Optuna cannot take a waiting trial back (nor tell it), and the coordinator runs every waiting
    trial, so a smaller ``trials`` would silently run more points than asked for."""
    order = {_grid_key(p): i for i, p in enumerate(search.grid_points(seed))}
    waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
    beyond = [order.get(_grid_key(t.user_attrs[GRID_ATTR]), -1) for t in waiting if GRID_ATTR in t.user_attrs]
    need = max(beyond, default=-1) + 1
    if need > points:
        raise fail(
            "trials",
            f"at least {need} for this grid study: an earlier run queued grid points up to the {need}th, "
            f"which never ran and cannot be taken back (resume with --trials {need} or without --trials)",
            points,
        )


def _grid_key(params: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((name, repr(value)) for name, value in params.items()))


def _carried(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """What a re-run of an interrupted trial inherits: its default-ness, pinned values, grid point."""
    return {k: attrs[k] for k in CARRIED_ATTRS if k in attrs}


def _execute(study: optuna.Study, work: _Work, options: RunOptions) -> tuple[str | None, int]:
    """Run ``work.to_run`` trials of ``study`` on Spark; return (why it stopped early or None, width)."""
    threads, to_run, parallelism = work.config.threads_per_trial, work.to_run, options.parallelism
    master, data, run_path = options.master, work.data, work.run_path
    from deepspark.spark import check_gpu_request, session, task_cpus, total_cores

    spark = session(master, app_name="deepspark-tune", conf={"spark.task.cpus": threads})
    check_gpu_request(spark, options.device)
    sc = spark.sparkContext
    cpus = task_cpus(spark)
    cores = total_cores(spark)
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
    if options.on_start is not None:
        options.on_start(to_run, width)

    broadcast = sc.broadcast(data) if data is not None else None
    # Job tags (thread-local, like job groups) name the study's jobs and each slot's, so one slot's job
    # (a hung trial) or all of them (the study's deadline) can be cancelled.
    study_tag = f"deepspark-tune-{secrets.token_hex(4)}"

    def cancel(slot: int | None) -> None:
        sc.cancelJobsWithTag(study_tag if slot is None else f"{study_tag}-slot-{slot}")

    coordinator = Coordinator(
        study,
        distributions=work.search.distributions(),
        fixed=work.search.fixed,
        n_trials=to_run,
        bind=_bind_address(spark),
        max_failures=options.max_failures,
        max_attempts=options.max_attempts,
        on_event=_notify(study, options),
        on_model=functools.partial(_save_model, run_path),
        on_default_model=functools.partial(_save_model, run_path, name=rundir.DEFAULT_DIR)
        if work.keep_default
        else None,
        timeout=options.timeout,
        trial_timeout=options.trial_timeout,
        heartbeat_timeout=options.heartbeat_timeout,
        cancel=cancel,
        sample_ahead=_sample_ahead(width, sampled_elsewhere=isinstance(study.sampler, ProcessSampler)),
        parallel_asks=study.sampler.processes if isinstance(study.sampler, ProcessSampler) else 0,
        copies=functools.partial(speculative_copy, sc),
    )
    try:
        coordinator.start()
        endpoint = coordinator.endpoint
        spec = WorkerSpec(
            host=endpoint.host,
            port=endpoint.port,
            token=endpoint.token,
            objective=work.objective,
            metric=work.config.metric,
            broadcast=broadcast,
            threads=effective_threads,
        )
        body = functools.partial(run_worker, spec)
        systematic = SameFailure(width)

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

        outcome = run_slots(
            sc,
            width=width,
            submit=submit,
            keep_going=lambda: not coordinator.finished and coordinator.stop_reason is None,
            on_lost=on_lost,
            stop=coordinator.stop,
            max_attempts=options.max_attempts,
            group_prefix="deepspark-tune",
            progress=lambda slot: len(coordinator.records),
            description="trial worker",
        )
        if not coordinator.finished:
            coordinator.stop("every trial worker stopped")
    finally:
        coordinator.stop(coordinator.stop_reason or "done")
        coordinator.interrupt_running()
        coordinator.close()
        if broadcast is not None:
            release_broadcast(broadcast)
    if systematic.cause is not None:
        raise RunError(_no_trial_ran(systematic.cause))
    # A Ctrl-C is reported as such even when the study had already stopped for another reason (the
    # coordinator keeps the first one): the user's interruption decides the outcome (exit 130).
    reason = "interrupted" if outcome.interrupted else coordinator.stop_reason
    return (None if reason == "done" else reason), width


def _sample_ahead(width: int, *, sampled_elsewhere: bool = False) -> int:
    """How many trials the coordinator samples ahead with ``width`` trials at once: one per 8 slots, or
    one per 4 when the sampler runs in its own processes (its asks take longer, so more are in flight).

    With 16 one-second trials at once, a slot asks for a trial every 62 ms on average, about what
    TPE's ask costs at 10,000 trials; sampled ahead, the ask leaves the gap between trials. Below 8 slots
    (4 when sampled elsewhere) nothing is sampled ahead: every configuration is sampled knowing all
    results so far, as before (sampling ahead adds that many pending trials to the ``width`` the
    sampler already sees).
    """
    return width // 4 if sampled_elsewhere else width // 8


def _notify(study: optuna.Study, options: RunOptions) -> Callable[[TrialEvent], None] | None:
    """The coordinator's event hook: the caller's ``on_event``, then, for each finished trial, the
    Optuna ``callbacks`` with ``(study, frozen_trial)`` (as ``study.optimize`` calls them)."""
    if options.on_event is None and not options.callbacks:
        return None

    def on_event(event: TrialEvent) -> None:
        if options.on_event is not None:
            try:
                options.on_event(event)
            except Exception:
                _log.exception("the on_event callback failed")
        if event.kind is not TrialEventKind.FINISH or not options.callbacks:
            return
        trials = study.get_trials(deepcopy=False)
        frozen = trials[event.number] if event.number < len(trials) else None
        if frozen is None or frozen.number != event.number:
            frozen = next(t for t in trials if t.number == event.number)
        for callback in options.callbacks:
            try:
                callback(study, frozen)
            except Exception:
                _log.exception("the Optuna callback %r failed on trial %d", callback, event.number)

    return on_event


def _no_trial_ran(cause: str | None) -> str:
    """The message for trial workers that all failed the same way before reaching the driver."""
    fix = "see the executors' logs for the cause"
    if cause is not None and ("ModuleNotFoundError" in cause or "ImportError" in cause):
        fix = (
            "install deepspark on the executors (with its dependencies), or set spark.pyspark.python "
            "to a Python that has it"
        )
    return (
        f"every trial worker failed the same way before reaching the driver ({cause}); "
        f"no trial ran. Fix: {fix}"
    )
