"""Experiment tracking: log a run directory to MLflow after the fact, reading it without touching it.

:func:`log_to_mlflow` reads what ``tune`` / ``train`` left (through :func:`open_runs`: a study's journal is
read from a private copy) and writes MLflow runs:

* a study: one parent run (``config.json`` as params; the best value, the default's and the error
  reduction after each logging; ``config.json``, ``best.json``, ``trials.csv`` and ``report.html`` as
  artifacts) and one nested run per finished trial (its configuration as params, its intermediate values
  as the metric history with step = epoch, its returned metrics, state, start and end time). The best
  and the default configurations' models become MLflow models on their trials' runs;
* a training run: one run, whatever the number of workers (``config.json`` as params, ``history.csv``'s
  columns with step = round, the final model).

Logging is after the run, not live: ``tune --mlflow`` / ``train --mlflow`` call this when they finish.

Logging a run directory again updates its runs, never duplicates them. Every run carries the tags
``deepspark.run_dir`` (the absolute path) and ``deepspark.run_id`` (a hash of that path and what only
the run's creation writes: a study's first journal line, a training run's ``config.json``; a resume
rewrites a study's ``config.json``, and stays the same run); a second call finds the runs by that id and
adds only what is new: trials finished since (a finished trial is immutable, so its run is never written
twice), history rows after the last logged round, a model whose weights changed, and for a ``config.json``
value changed since its param was logged (MLflow never changes a param) the tag ``deepspark.current.KEY``.
A moved or copied run directory is a new run.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import math
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepspark import rundir
from deepspark._optional import require
from deepspark.errors import ConfigError, RunError
from deepspark.reporting._runs import (
    HISTORY,
    MODEL_DIR,
    StudyRun,
    TrainingRun,
    open_runs,
    read_json_object,
)
from deepspark.tuning.report import best_and_default, error_reduction, measures_error
from deepspark.tuning.runner import JOURNAL, sqlite_database
from deepspark.tuning.trial import TrialRecord, TrialState

__all__ = ["DEFAULT_EXPERIMENT", "TrackedRun", "check_tracking_uri", "log_to_mlflow"]

_log = logging.getLogger(__name__)

#: the MLflow experiment runs go to, unless ``experiment=`` or ``$MLFLOW_EXPERIMENT_NAME`` names another
DEFAULT_EXPERIMENT = "deepspark"
RUN_ID_TAG, RUN_DIR_TAG, KIND_TAG = "deepspark.run_id", "deepspark.run_dir", "deepspark.kind"
TRIAL_TAG, STATE_TAG, MODEL_SHA_TAG = "deepspark.trial", "deepspark.state", "deepspark.model_sha256"
MODEL_TAG, LAST_ROUND_TAG, PARENT_TAG = "deepspark.model", "deepspark.last_round", "mlflow.parentRunId"
#: set on a trial's run once everything of the trial is logged; a run without it is logged anew
LOGGED_TAG = "deepspark.logged"
#: prefixes a config.json key whose value changed since its param was logged (MLflow never changes a param)
CURRENT_TAG = "deepspark.current."
#: the name of every logged model (one per run that has one)
MODEL_NAME = "model"
_STATUS = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED", TrialState.FAIL: "FAILED"}
_STUDY_FILES = ("config.json", "best.json", "trials.csv", "report.html")
_TRAINING_FILES = ("config.json", HISTORY, "report.html")
_MAX_PARAM = 6000  # MLflow's longest parameter value
_BATCH = 1000  # MLflow's most metrics (and entities) in one log_batch
_FEATURE = "experiment tracking with MLflow (--mlflow)"
_NO_URLS = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"


@dataclass(frozen=True)
class TrackedRun:
    """What one :func:`log_to_mlflow` call did: the MLflow run of the run directory and what it added."""

    tracking_uri: str
    experiment_id: str
    run_id: str  # the study's parent run, or the training run
    created: bool  # False: the run directory was logged before, and this call updated its runs
    new_trials: tuple[int, ...] = ()  # trial numbers that got a nested run in this call
    models: Mapping[str, str] = field(
        default_factory=dict
    )  # model dir (best, default, model) -> models:/ URI

    def __str__(self) -> str:
        verb = "logged" if self.created else "updated"
        trials = f", {len(self.new_trials)} new trial run(s)" if self.new_trials else ""
        models = "".join(f", {name} model {uri}" for name, uri in self.models.items())
        where = f"MLflow run {self.run_id} (experiment {self.experiment_id}) at {self.tracking_uri}"
        return f"{verb} {where}{trials}{models}"


def check_tracking_uri(tracking_uri: str) -> None:
    """Raise now, before any work, when MLflow is not installed or cannot use ``tracking_uri``.

    MLflow opens the store (a ``file:`` directory, a database) but does not contact a server here, so a
    server that is down is found only when logging; the run is kept either way.
    """
    if not isinstance(tracking_uri, str) or not tracking_uri.strip():
        raise ConfigError(
            f"mlflow: expected a tracking URI (http://host:5000, sqlite:///mlflow.db), got {tracking_uri!r}"
        )
    mlflow = require("mlflow", feature=_FEATURE)
    if sqlite_database(tracking_uri) == "":  # SQLAlchemy's in-memory database: lost on exit
        raise ConfigError(
            f"mlflow: expected a database file in the sqlite tracking URI (sqlite:///mlflow.db), "
            f"got {tracking_uri!r}, an in-memory database that would lose what is logged"
        )
    try:
        with _store_logging():
            mlflow.MlflowClient(tracking_uri)
    except Exception as exc:  # MLflow raises its own exception types, and ValueError for odd URIs
        raise ConfigError(
            f"mlflow: cannot use the tracking URI {tracking_uri!r}: {_first_line(exc)}"
        ) from exc


@contextlib.contextmanager
def _store_logging() -> Iterator[None]:
    """Opening a new SQLite store creates its tables, which MLflow announces in INFO lines on stderr
    (before a usage error's one line, or the progress): only warnings are let through meanwhile.

    MLflow before 3.7 also ran ``logging.config.fileConfig`` with its alembic.ini on the way (mlflow issue
    19038): the root logger's handlers and level were replaced for the rest of the process, and alembic's
    INFO lines (37 for a new store) printed. ``logging.disable`` is not reset by ``fileConfig``; the root
    logger is put back afterwards. Called before any work starts, so no other thread's logging is lost."""
    root = logging.getLogger()
    handlers, level, disabled = list(root.handlers), root.level, logging.root.manager.disable
    logging.disable(logging.INFO)
    try:
        yield
    finally:
        logging.disable(disabled)
        if root.handlers != handlers or root.level != level:
            for handler in root.handlers:
                if handler not in handlers:
                    root.removeHandler(handler)
            for handler in handlers:
                if handler not in root.handlers:
                    root.addHandler(handler)
            root.setLevel(level)


def deepspark_run_id(run: StudyRun | TrainingRun) -> str:
    """The id a run directory's MLflow runs carry: the same directory holding the same run gets the same id.

    A study is known by what only its creation writes, never by ``config.json``, which a resume rewrites
    (a larger ``trials``, another ``data_dir``) and which must not make the resumed study another run: its
    journal's first line (Optuna's record of the study's creation, with a writer id of its own), or for a
    study kept in a storage URL the URL and study name. A training run by its ``config.json``, which a
    resume never rewrites.
    """
    path = run.path
    if isinstance(run, StudyRun) and (path / JOURNAL).is_file():
        with (path / JOURNAL).open("rb") as journal:
            data = b"journal\0" + journal.readline()
    elif isinstance(run, StudyRun):
        data = b"storage\0" + json.dumps([run.config.get("storage"), run.config.get("study_name")]).encode()
    else:
        config = path / rundir.CONFIG_FILE
        data = config.read_bytes() if config.is_file() else b""
    return hashlib.sha256(str(path.resolve()).encode("utf-8") + b"\0" + data).hexdigest()[:16]


def log_to_mlflow(
    run_dir: str | os.PathLike[str], *, tracking_uri: str, experiment: str | None = None
) -> TrackedRun:
    """Log the run directory of a study or a training run to MLflow at ``tracking_uri`` (see the module).

    ``experiment`` defaults to ``$MLFLOW_EXPERIMENT_NAME``, then ``"deepspark"`` (created when missing).
    Logging again updates the runs (new trials, new rounds, a changed model) and never duplicates them.
    Raises :class:`ConfigError` for a bad run directory or URI (before MLflow is written to), and
    :class:`RunError` when MLflow fails; the run directory is never changed.
    """
    check_tracking_uri(tracking_uri)
    import mlflow
    from mlflow.exceptions import MlflowException

    name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    path = Path(run_dir)
    with open_runs([path]) as (run,), _tracking(mlflow, tracking_uri):
        try:
            client = mlflow.MlflowClient(tracking_uri)
            found = client.get_experiment_by_name(name)
            experiment_id = found.experiment_id if found is not None else client.create_experiment(name)
            logger = _Logger(client, experiment_id, deepspark_run_id(run), path.resolve())
            if isinstance(run, StudyRun):
                parent, created, new, models = logger.study(run)
            else:
                parent, created, new, models = logger.training(run)
        except (MlflowException, OSError) as exc:
            raise RunError(
                f"logging {path} to MLflow at {tracking_uri} failed: {_first_line(exc)}; the run directory is "
                f"unchanged: log it again with `deepspark report {path} --mlflow {tracking_uri}`"
            ) from exc
    return TrackedRun(tracking_uri, experiment_id, parent, created, tuple(new), models)


@contextlib.contextmanager
def _tracking(mlflow: Any, tracking_uri: str) -> Iterator[None]:
    """MLflow 3.0 resolves a logged model's ``mlflow-artifacts:`` location against the global tracking
    URI, not the client's: set it for the call and put the previous one back (None: unset, as it was).
    MLflow also prints two lines to stdout each time a run ends on a server (``--json`` keeps stdout for
    its object): not during the call."""
    previous = mlflow.get_tracking_uri() if mlflow.tracking.is_tracking_uri_set() else None
    quiet = os.environ.get(_NO_URLS)
    mlflow.set_tracking_uri(tracking_uri)
    os.environ[_NO_URLS] = "true"
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if quiet is None:
            os.environ.pop(_NO_URLS, None)
        else:
            os.environ[_NO_URLS] = quiet


@contextlib.contextmanager
def _no_artifact_progress_bars() -> Iterator[None]:
    """MLflow draws a tqdm bar on stderr each time it copies a checkpoint into a model ("Downloading
    artifacts: 100%|...", twice a model, in a log as carriage-return lines), between the progress and the
    result line. Its own switch turns them off, unless the user has set it."""
    name = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    if name in os.environ:
        yield
        return
    os.environ[name] = "false"
    try:
        yield
    finally:
        os.environ.pop(name, None)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:500]


def _ms(when: _dt.datetime | None) -> int:
    return int((when or _dt.datetime.now()).timestamp() * 1000)


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= _MAX_PARAM else text[: _MAX_PARAM - 1] + "…"


def _params(config: Mapping[str, Any]) -> dict[str, str]:
    """``config.json`` as MLflow params: one level of nesting flattened (``space.learning_rate``)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, Mapping) and value and key != "model":
            out.update({_key(f"{key}.{k}"): _param_value(v) for k, v in value.items()})
        else:
            out[_key(str(key))] = _param_value(value)
    return out


def _key(name: str) -> str:
    """MLflow keys allow letters, digits, ``_ - . / :`` and spaces."""
    return re.sub(r"[^\w\-. /:]", "_", name)[:250]


def _number(value: Any) -> float | None:
    """A finite float for a metric, or None (text, booleans, empty CSV cells, NaN)."""
    if isinstance(value, bool) or value in ("", None):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _sha256(model_dir: Path) -> str | None:
    weights = model_dir / "model.safetensors"
    return hashlib.sha256(weights.read_bytes()).hexdigest() if weights.is_file() else None


class _Logger:
    """One call's writes to one experiment, all through MlflowClient: the caller's fluent state (active
    experiment, active run) is neither used nor changed."""

    def __init__(self, client: Any, experiment_id: str, run_id: str, path: Path) -> None:
        self.client = client
        self.experiment_id = experiment_id
        self.run_id = run_id
        self.tags = {RUN_ID_TAG: run_id, RUN_DIR_TAG: str(path)}

    # ---------------------------------------------------------------------------------------- runs
    def _search(self, filter_string: str) -> list[Any]:
        runs: list[Any] = []
        token = None
        while True:
            page = self.client.search_runs(
                [self.experiment_id], filter_string=filter_string, max_results=1000, page_token=token
            )
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def _parent(
        self, kind: str, name: str, start: _dt.datetime | None, params: Mapping[str, str]
    ) -> tuple[str, bool]:
        found = self._search(f"tags.`{RUN_ID_TAG}` = '{self.run_id}' and tags.`{KIND_TAG}` = '{kind}'")
        if found:
            found.sort(key=lambda r: r.info.start_time)
            if len(found) > 1:
                _log.warning(
                    "%d MLflow runs carry %s=%s; updating the first", len(found), RUN_ID_TAG, self.run_id
                )
            run_id, logged = str(found[0].info.run_id), found[0].data.params
            # Params a failed first call did not write (MLflow never changes one that is written).
            self._batch(run_id, params={k: v for k, v in params.items() if k not in logged})
            # What a resume changed in config.json since (a larger trials, another data_dir): a tag, which
            # MLflow lets change, beside the param's first value; gone when the value is the param's again.
            for key, value in params.items():
                tag = _key(CURRENT_TAG + key)
                if key in logged and logged[key] != value:
                    self.client.set_tag(run_id, tag, value)
                elif tag in found[0].data.tags:
                    self.client.delete_tag(run_id, tag)
            return run_id, False
        run = self.client.create_run(
            self.experiment_id, start_time=_ms(start), run_name=name, tags={**self.tags, KIND_TAG: kind}
        )
        self._batch(run.info.run_id, params=params)
        return str(run.info.run_id), True

    def _batch(
        self, run_id: str, *, params: Mapping[str, str] | None = None, metrics: Sequence[Any] = ()
    ) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in (params or {}).items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start : start + 100])
        for start in range(0, len(metrics), _BATCH):
            self.client.log_batch(run_id, metrics=list(metrics[start : start + _BATCH]))

    def _artifacts(self, run_id: str, path: Path, names: Sequence[str]) -> None:
        for name in names:
            if (path / name).is_file():
                self.client.log_artifact(run_id, str(path / name), artifact_path="deepspark")

    def _model(self, run_id: str, model_dir: Path, digest: str, *, step: int) -> str:
        """Log ``model_dir`` (a checkpoint) as an MLflow pyfunc model of ``run_id``; its models:/ URI.

        Through MlflowClient only, as ``Model.log`` does it: MLflow's fluent API (``start_run``,
        ``log_model``) reads the caller's active experiment and run, refuses a run of another experiment
        and would put the model in the active one; and nothing restores an unset active experiment. The
        run's status and metrics are left as they are.
        """
        import tempfile

        import mlflow.pyfunc
        from mlflow.entities import LoggedModelOutput
        from mlflow.models import Model, ModelSignature
        from mlflow.types import Schema, TensorSpec

        from deepspark import __version__
        from deepspark.models import load_checkpoint

        checkpoint = load_checkpoint(model_dir)
        signature = ModelSignature(
            inputs=Schema([TensorSpec(_np_dtype("uint8"), (-1, *checkpoint.spec.input_shape))]),
            outputs=Schema([TensorSpec(_np_dtype("float32"), (-1, len(checkpoint.class_names)))]),
        )
        model = self.client.create_logged_model(
            self.experiment_id,
            name=MODEL_NAME,
            source_run_id=run_id,
            tags={MODEL_SHA_TAG: digest, RUN_DIR_TAG: str(model_dir.resolve())},
            params=self.client.get_run(run_id).data.params,
        )
        try:
            with (
                tempfile.TemporaryDirectory(prefix="deepspark-mlflow-") as tmp,
                warnings.catch_warnings(),
                _no_artifact_progress_bars(),
            ):
                warnings.simplefilter("ignore", UserWarning)  # MLflow's hints about input examples
                mlflow.pyfunc.save_model(
                    Path(tmp, MODEL_NAME),
                    python_model=str(Path(__file__).with_name("_mlflow_model.py")),
                    artifacts={"checkpoint": str(model_dir)},
                    signature=signature,
                    pip_requirements=[f"deepspark=={__version__}"],
                    mlflow_model=Model(
                        artifact_path=model.artifact_location,
                        run_id=run_id,
                        model_uuid=model.model_id,
                        model_id=model.model_id,
                    ),
                )
                self.client.log_model_artifacts(model.model_id, str(Path(tmp, MODEL_NAME)))
            self.client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=step)])
        except Exception:
            with contextlib.suppress(Exception):  # best effort: the first error is the one to report
                self.client.finalize_logged_model(model.model_id, "FAILED")
            raise
        self.client.finalize_logged_model(model.model_id, "READY")
        self.client.set_tag(run_id, MODEL_SHA_TAG, digest)
        self.client.set_tag(run_id, MODEL_TAG, model.model_uri)
        return str(model.model_uri)

    # --------------------------------------------------------------------------------------- study
    def study(self, run: StudyRun) -> tuple[str, bool, list[int], dict[str, str]]:
        span = run.span()
        parent, created = self._parent("study", run.path.name, span[0] if span else None, _params(run.config))
        existing: dict[int, Any] = {}
        for found in self._search(f"tags.`{PARENT_TAG}` = '{parent}' and tags.`{KIND_TAG}` = 'trial'"):
            if not found.data.tags.get(TRIAL_TAG, "").isdigit():
                continue
            if found.data.tags.get(LOGGED_TAG) != "true":
                # A call that failed half-way (a server gone, MLflow refusing a write) left this run
                # without its trial's data: it is put aside and the trial logged anew below.
                self.client.delete_run(found.info.run_id)
                continue
            existing[int(found.data.tags[TRIAL_TAG])] = found
        frozen = {t.number: t for t in run.trials()}
        # best/ and default/ name their trial; one trial's model (the default is the best) is logged once.
        held: dict[int, tuple[str, Path, str]] = {}
        for name in (rundir.BEST_DIR, rundir.DEFAULT_DIR):
            number, digest = _model_trial(run.path / name), _sha256(run.path / name)
            if number is not None and digest is not None and number not in held:
                held[number] = (name, run.path / name, digest)
        trial_runs = {n: str(r.info.run_id) for n, r in existing.items()}
        new: list[int] = []
        models: dict[str, str] = {}
        for record in sorted(run.records, key=lambda r: r.number):
            trial = frozen.get(record.number)
            end = _ms(trial.datetime_complete if trial is not None else None)
            model = held.get(record.number)
            if record.number in existing:  # a finished trial never changes; only a late model is added
                if model is not None and existing[record.number].data.tags.get(MODEL_SHA_TAG) != model[2]:
                    models[model[0]] = self._model(trial_runs[record.number], model[1], model[2], step=0)
                continue
            run_id = self._create_trial(parent, record, run.started(trial) if trial is not None else None)
            if model is not None:
                models[model[0]] = self._model(run_id, model[1], model[2], step=0)
            self._trial_data(run, run_id, record, end)
            trial_runs[record.number] = run_id
            new.append(record.number)
        self._summary(run, parent, new, trial_runs)
        if run.running():
            self.client.update_run(parent, status="RUNNING")
        else:
            self.client.set_terminated(parent, "FINISHED", end_time=_ms(span[1] if span else None))
        return parent, created, new, models

    def _create_trial(self, parent: str, record: TrialRecord, start: _dt.datetime | None) -> str:
        tags = {
            **self.tags,
            PARENT_TAG: parent,
            KIND_TAG: "trial",
            TRIAL_TAG: str(record.number),
            STATE_TAG: record.state.value,
            "deepspark.default": str(record.is_default).lower(),
            "deepspark.attempts": str(record.attempts),
        }
        if record.worker:
            tags["deepspark.worker"] = record.worker
        if record.error:
            tags["deepspark.error"] = record.error[:5000]
        name = f"trial {record.number}" + (" (default)" if record.is_default else "")
        created = self.client.create_run(self.experiment_id, start_time=_ms(start), run_name=name, tags=tags)
        return str(created.info.run_id)

    def _trial_data(self, run: StudyRun, run_id: str, record: TrialRecord, end: int) -> None:
        """Params, the intermediate values (step = epoch), the returned metrics; then the run's end."""
        from mlflow.entities import Metric

        metric = _key(run.metric)
        metrics = [
            Metric(metric, float(v), end, int(step)) for step, v in sorted(record.intermediate.items())
        ]
        last = int(max(record.intermediate, default=0))
        if record.value is not None:
            metrics.append(Metric("value", float(record.value), end, last))
        for key, value in sorted(record.metrics.items()):
            number = _number(value)
            if number is None or (key == run.metric and record.intermediate):
                continue  # the metric's own history is the intermediate values
            metrics.append(Metric(_key(key), number, end, last))
        metrics.append(Metric("duration_s", float(record.duration_s), end, last))
        self._batch(run_id, params=_params(record.params), metrics=metrics)
        if record.traceback:
            self.client.log_text(run_id, record.traceback, "traceback.txt")
        self.client.set_terminated(run_id, _STATUS[record.state], end_time=end)
        self.client.set_tag(run_id, LOGGED_TAG, "true")  # last: the run holds the whole trial

    def _summary(self, run: StudyRun, parent: str, new: Sequence[int], trial_runs: Mapping[int, str]) -> None:
        """The study's standing after this call's trials (step = finished trials), tags and files."""
        from mlflow.entities import Metric

        best, default = best_and_default(run.records, maximize=run.maximize)
        if new:
            values: dict[str, Any] = {
                "best_value": best.value if best is not None else None,
                "default_value": default.value if default is not None else None,
                "trials_complete": sum(r.state is TrialState.COMPLETE for r in run.records),
                "trials_pruned": sum(r.state is TrialState.PRUNED for r in run.records),
                "trials_failed": sum(r.state is TrialState.FAIL for r in run.records),
            }
            summary = run.saved_summary(best, default)
            for key in ("best", "default"):
                entry = summary.get(key)
                if isinstance(entry, Mapping):
                    values[f"{key}_test_accuracy"] = entry.get("test_accuracy")
            if measures_error(run.metric, maximize=run.maximize):  # a minimised metric is no accuracy
                if summary.get("error_reduction") is not None:
                    values["error_reduction"] = summary["error_reduction"]
                elif best is not None and default is not None:
                    values["error_reduction"] = error_reduction(
                        float(default.value or 0), float(best.value or 0)
                    )
            step, stamp = len(run.records), _ms(None)
            metrics = [Metric(k, n, stamp, step) for k, v in values.items() if (n := _number(v)) is not None]
            self._batch(parent, metrics=metrics)
        tags = {
            "deepspark.trials_logged": str(len(trial_runs)),
            "deepspark.trials_running": str(len(run.running())),
        }
        if best is not None:
            tags["deepspark.best_trial"] = str(best.number)
            if best.number in trial_runs:
                tags["deepspark.best_run"] = trial_runs[best.number]
        for key, value in tags.items():
            self.client.set_tag(parent, key, value)
        self._artifacts(parent, run.path, _STUDY_FILES)

    # ------------------------------------------------------------------------------------ training
    def training(self, run: TrainingRun) -> tuple[str, bool, list[int], dict[str, str]]:
        from mlflow.entities import Metric

        run_id, created = self._parent("training", run.path.name, None, _params(run.config))
        logged = self.client.get_run(run_id).data.tags
        last = int(logged[LAST_ROUND_TAG]) if logged.get(LAST_ROUND_TAG, "").lstrip("-").isdigit() else -1
        stamp = _ms(None)
        metrics = []
        newest = last
        for row in run.history:
            step = _number(row.get("round"))
            if step is None or int(step) <= last:
                continue  # logged by an earlier call
            newest = max(newest, int(step))
            for key, value in row.items():
                number = _number(value)
                if key != "round" and number is not None:
                    metrics.append(Metric(_key(key), number, stamp, int(step)))
            samples, seconds = _number(row.get("samples")), _number(row.get("seconds"))
            if samples is not None and seconds:
                metrics.append(Metric("images_per_s", samples / seconds, stamp, int(step)))
        models: dict[str, str] = {}
        model_dir = run.path / MODEL_DIR
        digest = _sha256(model_dir)
        if digest is not None and logged.get(MODEL_SHA_TAG) != digest:
            models[MODEL_DIR] = self._model(run_id, model_dir, digest, step=max(newest, 0))
        self._batch(run_id, metrics=metrics)
        if newest != last:
            self.client.set_tag(run_id, LAST_ROUND_TAG, str(newest))
        self._artifacts(run_id, run.path, _TRAINING_FILES)
        if digest is not None:  # the final model is written when training ends
            self.client.set_terminated(run_id, "FINISHED")
        else:
            self.client.update_run(run_id, status="RUNNING")
        return run_id, created, [], models


def _np_dtype(name: str) -> Any:
    import numpy as np

    return np.dtype(name)


def _model_trial(model_dir: Path) -> int | None:
    """The trial whose model ``model_dir`` (best/, default/) holds, from its ``trial.json``."""
    held = read_json_object(model_dir / "trial.json").get("trial")
    return held if isinstance(held, int) else None
