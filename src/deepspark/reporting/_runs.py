"""Reading run directories without touching them.

A study's journal is copied (its complete lines only: a running driver may be halfway through
appending one) into a temporary directory and opened there, so nothing the report does can write to
the run directory: not a lock file, not a repaired journal, not ``best.json``. A study kept in an
Optuna storage URL (``tune(storage=...)``: its run directory has no journal) is loaded from the URL
that ``config.json`` names, under the study name it names; the report only reads it.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import io
import json
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from deepspark.errors import ConfigError
from deepspark.tuning.coordinator import INTERRUPTED_ATTR, STARTED_ATTR
from deepspark.tuning.report import records_from_study
from deepspark.tuning.runner import CLUSTER_ATTR, JOURNAL, STUDY_NAME, quiet_optuna, sqlite_database
from deepspark.tuning.trial import TrialRecord

__all__ = ["StudyRun", "TrainingRun", "open_runs", "read_json_object"]

HISTORY = "history.csv"
MODEL_DIR = "model"  # a training run's final model (a checkpoint directory)


@dataclass(frozen=True)
class StudyRun:
    """A tuning run directory as the report sees it: the study (a private copy) and its records."""

    path: Path
    config: Mapping[str, Any]
    study: optuna.Study
    records: tuple[TrialRecord, ...]
    # The journal's last write: the end of the timeline for trials still running.
    last_write: _dt.datetime

    @property
    def maximize(self) -> bool:
        # The study's own direction, whatever config.json says (or when it is missing or torn).
        return self.study.direction == optuna.study.StudyDirection.MAXIMIZE

    @property
    def metric(self) -> str:
        return str(self.config.get("metric", "accuracy"))

    @property
    def split(self) -> str | None:
        """The split the trials' values were measured on: the built-in objective's (studies from before
        the validation split selected on test); None for a Python objective."""
        if self.config.get("objective", "builtin") != "builtin":
            return None
        return str(self.config.get("select_on") or "test")

    @property
    def cluster(self) -> Mapping[str, Any]:
        value = self.study.user_attrs.get(CLUSTER_ATTR)
        return value if isinstance(value, Mapping) else {}

    def saved_summary(self, best: TrialRecord | None, default: TrialRecord | None) -> dict[str, Any]:
        """``best.json`` as far as it still describes the journal's ``best`` and ``default`` trials.

        best.json holds what the study measured at its end (test accuracies, refit, error reductions);
        a study resumed or still running may rank another trial best since. So an entry is kept only
        where it names the same trial, and the study-level figures only where both entries are kept:
        otherwise they describe another pair of trials than the journal's.
        """
        saved = read_json_object(self.path / "best.json")
        out: dict[str, Any] = {}
        for key, record in (("best", best), ("default", default)):
            entry = saved.get(key)
            if record is not None and isinstance(entry, Mapping) and entry.get("trial") == record.number:
                out[key] = entry
        if "best" in out and "default" in out:
            out.update({k: v for k, v in saved.items() if k not in out})
        return out

    def trials(self) -> list[optuna.trial.FrozenTrial]:
        """Every trial but the attempts a crash interrupted (each was run again as a new trial)."""
        return [t for t in self.study.get_trials(deepcopy=False) if not t.user_attrs.get(INTERRUPTED_ATTR)]

    def running(self) -> list[optuna.trial.FrozenTrial]:
        return [t for t in self.trials() if t.state == optuna.trial.TrialState.RUNNING]

    @staticmethod
    def started(trial: optuna.trial.FrozenTrial) -> _dt.datetime | None:
        """When the trial reached its worker: Optuna's ``datetime_start`` is when it was asked, which for
        a trial the coordinator sampled ahead is earlier (it records the hand-over apart)."""
        value = trial.user_attrs.get(STARTED_ATTR)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return _dt.datetime.fromisoformat(value)
        return trial.datetime_start

    def span(self) -> tuple[_dt.datetime, _dt.datetime] | None:
        """From the first trial's start to the last finish (or the last write, while trials run)."""
        starts = [s for s in map(self.started, self.trials()) if s is not None]
        if not starts:
            return None
        ends = [t.datetime_complete for t in self.trials() if t.datetime_complete is not None]
        if self.running():
            ends.append(self.last_write)
        return min(starts), max([*ends, min(starts)])

    def busy_seconds(self) -> float:
        """Seconds during which at least one trial ran: the union of the trials' spans (a running one's
        ends at the last write). A resumed study's downtime, when no trial ran, is not in it; from the
        first start to the last end counted it as the study's time."""
        intervals = sorted(
            (begun, t.datetime_complete or self.last_write)
            for t in self.trials()
            if (begun := self.started(t)) is not None
            and (t.datetime_complete is not None or t.state == optuna.trial.TrialState.RUNNING)
        )
        total = 0.0
        current: tuple[_dt.datetime, _dt.datetime] | None = None
        for begun, ended in intervals:
            if current is not None and begun <= current[1]:
                current = (current[0], max(current[1], ended))
                continue
            if current is not None:
                total += (current[1] - current[0]).total_seconds()
            current = (begun, ended)
        if current is not None:
            total += (current[1] - current[0]).total_seconds()
        return total


@dataclass(frozen=True)
class TrainingRun:
    """A training run directory: its config.json, history.csv rows and the final model's metrics."""

    path: Path
    config: Mapping[str, Any]
    history: tuple[Mapping[str, str], ...]
    model_metrics: Mapping[str, Any] = field(default_factory=dict)


Run = StudyRun | TrainingRun


@contextlib.contextmanager
def open_runs(paths: Sequence[str | Path]) -> Iterator[list[Run]]:
    """Open each run directory read-only; the studies live in a temporary copy until the block ends."""
    if not paths:
        raise ConfigError("run_dirs: expected at least one run directory, got none")
    with tempfile.TemporaryDirectory(prefix="deepspark-report-") as tmp, quiet_optuna():
        runs: list[Run] = []
        for i, given in enumerate(paths):
            path = Path(given)
            if not path.is_dir():
                raise ConfigError(f"run_dirs: {path} is not a directory")
            if (path / JOURNAL).is_file():
                runs.append(_open_study(path, Path(tmp) / str(i)))
            elif isinstance((config := _config(path)).get("storage"), str):
                runs.append(_open_stored_study(path, config))
            elif (path / HISTORY).is_file() or "strategy" in _config(path):
                runs.append(_open_training(path))
            else:
                raise ConfigError(
                    f"run_dirs: {path} is neither a study (no {JOURNAL}) nor a training run (no {HISTORY})"
                )
        yield runs


def read_json_object(path: Path) -> dict[str, Any]:
    """A run directory's JSON file (config.json, best.json, a model's trial.json) as a dict; {} when it
    is missing, torn or not an object: a report shows what is there."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # RecursionError: nested too deeply for the parser
        return {}
    return value if isinstance(value, dict) else {}


def _config(path: Path) -> dict[str, Any]:
    return read_json_object(path / "config.json")


def _open_study(path: Path, tmp: Path) -> StudyRun:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    source = path / JOURNAL
    last_write = _dt.datetime.fromtimestamp(source.stat().st_mtime)
    data = source.read_bytes()
    tmp.mkdir(parents=True)
    copy = tmp / JOURNAL
    copy.write_bytes(data[: data.rfind(b"\n") + 1])  # a line still being appended is left out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            storage = JournalStorage(JournalFileBackend(str(copy)))
        except ValueError as exc:  # a line that is not JSON (or not text): not a journal Optuna wrote
            raise ConfigError(f"run_dirs: {source} is not an Optuna journal: {exc}") from None
        names = [s.study_name for s in storage.get_all_studies()]
        if not names:
            raise ConfigError(f"run_dirs: {source} holds no study yet")
        config = _config(path)
        # config.json names the study (studies are named after their run directory); older ones used STUDY_NAME
        name = next((n for n in (config.get("study_name"), STUDY_NAME) if n in names), names[0])
        study = optuna.load_study(study_name=name, storage=storage)
    return _study_run(path, config, study, last_write)


def _open_stored_study(path: Path, config: Mapping[str, Any]) -> StudyRun:
    """A study that ``tune(storage=URL)`` kept in that storage: its run directory holds no journal."""
    url, name = str(config["storage"]), config.get("study_name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"run_dirs: {path / 'config.json'} names the storage {url} but no study_name")
    database = sqlite_database(url)
    if database and not Path(database).is_file():
        # Opening it would create an empty database there (in the run directory, often): read-only.
        raise ConfigError(f"run_dirs: the storage {url} named by {path} does not exist (no file {database})")
    if database and Path(database).stat().st_size == 0:
        # An empty file holds no study, and opening it would write Optuna's tables into it.
        raise ConfigError(f"run_dirs: the storage {url} named by {path} is an empty file: it holds no study")
    try:
        study = optuna.load_study(study_name=name, storage=url)
    except KeyError:
        raise ConfigError(
            f"run_dirs: the storage {url} holds no study named {name!r} (from {path})"
        ) from None
    except Exception as exc:  # no driver for the URL, a bad URL, a bad file: SQLAlchemy's or Optuna's
        raise ConfigError(f"run_dirs: cannot open the storage {url} named by {path}: {exc}") from None
    stamps = [
        stamp
        for t in study.get_trials(deepcopy=False)
        if (stamp := t.datetime_complete or t.datetime_start) is not None
    ]
    last_write = max(stamps, default=_dt.datetime.fromtimestamp((path / "config.json").stat().st_mtime))
    return _study_run(path, config, study, last_write)


def _study_run(
    path: Path, config: Mapping[str, Any], study: optuna.Study, last_write: _dt.datetime
) -> StudyRun:
    if not config:
        # config.json missing or torn (a journal copied alone): the study's user attributes hold the
        # same settings (StudyConfig.user_attrs), so its metric and split are not guessed.
        config = {k: v for k, v in study.user_attrs.items() if not k.startswith("deepspark:")}
    return StudyRun(
        path=path, config=config, study=study, records=tuple(records_from_study(study)), last_write=last_write
    )


def _history(path: Path) -> list[dict[str, str]]:
    """history.csv's complete rows. A row still being appended (no line end yet; a run killed while
    writing it) is left out, as a journal's is: its cut cells would read as other numbers (0.9 of 0.97).
    Bytes that are not UTF-8 become U+FFFD, so such cells are not numbers, never a traceback."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    text = data[: data.rfind(b"\n") + 1].decode("utf-8", errors="replace")
    return [dict(row) for row in csv.DictReader(io.StringIO(text, newline=""))]


def _open_training(path: Path) -> TrainingRun:
    history = _history(path / HISTORY)
    metrics = read_json_object(path / MODEL_DIR / "metadata.json").get("metrics")
    if not isinstance(metrics, dict):  # missing, or not what a checkpoint writes: shown as none
        metrics = {}
    return TrainingRun(path=path, config=_config(path), history=tuple(history), model_metrics=metrics)
