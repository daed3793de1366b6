"""The study record: validated, saved as config.json, compared on resume; Optuna-native studies."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from deepspark.cli import main
from deepspark.errors import ConfigError
from deepspark.reporting import report
from deepspark.tuning import (
    BuiltinOptions,
    RunOptions,
    StudyConfig,
    StudySummary,
    TrialEventKind,
    TrialRecord,
    TrialState,
    TrialSummary,
    load_space,
    tune,
)
from deepspark.tuning.report import summarise, width_param, write_reports

X = {"x": {"type": "uniform", "low": 0.0, "high": 1.0}}
SPACE = {"hidden": {"type": "choice", "values": [8, 16]}, "epochs": 1}


def _quadratic(config, reporter):
    return {"accuracy": 1.0 - (config["x"] - 0.3) ** 2}


def _journal_study(run: Path) -> optuna.Study:
    storage = JournalStorage(JournalFileBackend(str(run / "study.journal")))
    return optuna.load_study(study_name=None, storage=storage)


def test_a_heartbeat_timeout_under_a_second_is_refused_before_spark(tmp_path, capsys, monkeypatch) -> None:
    # 0.01 s made every trial look frozen: each was re-queued until it gave up, 130 s for nothing.
    import deepspark.spark as ds_spark

    def no_spark(*args, **kw):
        raise AssertionError("a Spark session was requested before validation finished")

    monkeypatch.setattr(ds_spark, "session", no_spark)
    with pytest.raises(ConfigError, match=r"^heartbeat_timeout: expected at least 1 second .*got 0.5$"):
        RunOptions(heartbeat_timeout=0.5)
    assert RunOptions(heartbeat_timeout=1).heartbeat_timeout == 1.0
    assert RunOptions(heartbeat_timeout=None).heartbeat_timeout is None
    run = tmp_path / "run"
    assert (
        main(["tune", "mnist", "--preset", "quick", "--heartbeat-timeout", "0.01", "--run-dir", str(run)])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("deepspark: error: heartbeat_timeout: expected at least 1 second") and "\n" not in err
    )
    assert not run.exists()


# ----------------------------------------------------------------------------------- the record alone
@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"trials": 0}, "trials: expected an integer >= 1, got 0"),
        ({"trials": True}, "trials: expected an integer >= 1, got True"),
        ({"sampler": "bayes"}, "sampler: expected one of ['tpe', 'random', 'grid'], got 'bayes'"),
        ({"pruner": "hyperband"}, "pruner: expected one of ['none', 'median', 'asha'], got 'hyperband'"),
        ({"direction": "up"}, "direction: expected one of ['maximize', 'minimize'], got 'up'"),
        ({"seed": 1.5}, "seed: expected an integer in 0..4294967295, got 1.5"),
        ({"seed": -1}, "seed: expected an integer in 0..4294967295, got -1"),
        ({"seed": 2**32}, "seed: expected an integer in 0..4294967295, got 4294967296"),
        ({"threads_per_trial": 0}, "threads_per_trial: expected an integer >= 1, got 0"),
        ({"storage": "not a url"}, "storage: expected an Optuna storage URL"),
        ({"study_name": " "}, "study_name: expected a non-empty string, got ' '"),
    ],
)
def test_study_config_is_validated_with_one_message_shape(fields, message) -> None:
    with pytest.raises(ConfigError) as caught:
        StudyConfig(**{"space": X, "study_name": "s", "objective": "f", **fields})
    assert str(caught.value).startswith(message)


def test_builtin_options_are_validated_where_they_are_made(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"^limit_train: expected an integer >= 1, got 0$"):
        BuiltinOptions(dataset="mnist", limit_train=0)
    with pytest.raises(
        ConfigError, match=r"^select_on: expected one of \['validation', 'test'\], got 'train'$"
    ):
        BuiltinOptions(dataset="mnist", select_on="train")
    with pytest.raises(ConfigError, match=r"^validation: expected a fraction .* got 1.5$"):
        BuiltinOptions(dataset="mnist", validation=1.5)
    with pytest.raises(ConfigError, match="model: expected a zoo model"):
        BuiltinOptions(dataset="mnist", model="no-such-net")
    # Relative data directories are kept absolute; selecting on test has no validation split.
    options = BuiltinOptions(data_dir="data", select_on="test")
    assert options.data_dir == str(Path("data").absolute()) and options.validation is None


def test_study_config_round_trips_through_json() -> None:
    config = StudyConfig(
        space=load_space({**SPACE, "lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}).to_dict(),
        study_name="runs-a",
        trials=7,
        sampler="random",
        seed=3,
        builtin=BuiltinOptions(dataset="mnist", model="mlp", limit_train=100, validation=0.2),
    )
    text = json.dumps(config.to_dict())
    again = StudyConfig.from_dict(json.loads(text), where="x")
    assert again == config
    assert json.loads(text)["format"] == 2 and json.loads(text)["model"] == "mlp"


def test_old_config_json_reads_as_the_study_named_deepspark() -> None:
    """config.json as written before the record: no format, study_name or storage; no select_on."""
    old = {
        "space": X,
        "trials": 3,
        "sampler": "tpe",
        "pruner": "median",
        "metric": "accuracy",
        "direction": "maximize",
        "seed": 0,
        "threads_per_trial": 1,
        "objective": "builtin",
        "dataset": "mnist",
        "data_dir": None,
        "model": "cnn",
        "limit_train": None,
        "limit_test": None,
    }
    config = StudyConfig.from_dict(old, where="old/config.json")
    assert config.study_name == "deepspark" and config.storage is None
    assert config.builtin is not None and config.builtin.select_on == "test"  # chosen on test then
    with pytest.raises(ConfigError, match=r"old/config.json does not hold a valid tune study configuration"):
        StudyConfig.from_dict({**old, "trials": 0}, where="old/config.json")


def test_conflicts_name_every_setting_with_saved_and_given_values() -> None:
    saved = StudyConfig(space=X, study_name="s", objective="f", sampler="tpe", seed=0, trials=10)
    assert saved.conflicts({"sampler": "tpe", "seed": 0, "space": X, "trials": 99}) == []
    assert saved.conflicts({"sampler": "random", "seed": 2, "metric": None}) == [
        "sampler (saved 'tpe', given 'random')",
        "seed (saved 0, given 2)",
    ]
    assert saved.resumed(12).trials == 12 and saved.resumed(4).trials == 10 and saved.resumed(None) == saved
    # A space names the parameters that differ, each with both values: cut at 80 characters, two spaces
    # with the same first keys read the same on both sides.
    wide = {f"a_long_parameter_name_{i}": {"type": "uniform", "low": 0.0, "high": 1.0} for i in range(3)}
    saved = StudyConfig(space=wide, study_name="s", objective="f", trials=10)
    given = {**wide, "a_long_parameter_name_2": {"type": "uniform", "low": 0.0, "high": 2.0}, "y": 1}
    assert saved.conflicts({"space": given}) == [
        'space (a_long_parameter_name_2: saved {"high": 1.0, "low": 0.0, "type": "uniform"}, '
        'given {"high": 2.0, "low": 0.0, "type": "uniform"}; y: saved none, given 1)'
    ]


def test_summary_record_reads_like_best_json() -> None:
    summary = StudySummary(
        metric="accuracy",
        counts={"complete": 2, "pruned": 0, "fail": 0},
        best=TrialSummary(trial=1, config={"x": 0.3}, value=0.9, validation_accuracy=0.9, test_accuracy=0.8),
        selected_on="validation",
        error_reduction=0.5,
    )
    data = summary.to_dict()
    assert summary["best"]["config"] == {"x": 0.3} and dict(summary) == data
    assert data["best"]["test_accuracy"] == 0.8 and "protocol" not in data and data["default"] is None
    assert StudySummary.from_dict(json.loads(json.dumps(data))) == summary


def test_a_default_without_error_names_no_split_its_reduction_is_on() -> None:
    # best.json said error_reduction null and error_reduction_on "test": a figure on no split.
    records = [
        TrialRecord(
            number=i, state=TrialState.COMPLETE, params={"x": i}, value=0.9 + i / 10, is_default=i == 0
        )
        for i in range(2)
    ]
    options = {"metric": "accuracy", "maximize": True, "fixed": {}, "wall_s": 1.0, "best_checkpoint": None}
    perfect = summarise(records, **options, selected_on="validation", tests={0: (1.0, 1.0), 1: (1.0, 1.0)})
    assert perfect.error_reduction is None and perfect.error_reduction_on is None
    assert "error_reduction_on" not in perfect.to_dict()  # best.json leaves out what is None
    # A default that errs does name it.
    erring = summarise(records, **options, selected_on="validation", tests={0: (0.9, 0.9), 1: (1.0, 1.0)})
    assert erring.error_reduction == pytest.approx(1.0) and erring.error_reduction_on == "test"


def test_a_trials_csv_write_stopped_midway_leaves_the_previous_file_whole(tmp_path: Path) -> None:
    # trials.csv was rewritten in place: a driver killed (or an error raised) after some rows left a file
    # cut short beside the previous end's best.json, and a report read meanwhile saw it. It is replaced now.
    class Unwritable:
        def __str__(self) -> str:
            raise RuntimeError("stopped midway")

    def records(n: int, last: object = 0.5) -> list[TrialRecord]:
        return [
            TrialRecord(
                number=i, state=TrialState.COMPLETE, params={"x": last if i == n - 1 else 0.1}, value=0.9
            )
            for i in range(n)
        ]

    options = {"metric": "accuracy", "maximize": True, "fixed": {}, "wall_s": 1.0, "best_checkpoint": None}
    write_reports(tmp_path, records(3), **options)
    before = (tmp_path / "trials.csv").read_bytes()
    with pytest.raises(RuntimeError, match="stopped midway"):
        write_reports(tmp_path, records(400, last=Unwritable()), **options)
    assert (tmp_path / "trials.csv").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_the_plot_width_parameter_comes_from_the_space_whatever_its_name() -> None:
    space = load_space(
        {
            "learning_rate": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
            "units": {"type": "int", "low": 8, "high": 64, "step": 8},
            "dropout": {"type": "uniform", "low": 0.0, "high": 0.5},
        }
    )
    records = [
        TrialRecord(
            number=i,
            state=TrialState.COMPLETE,
            params={"learning_rate": 10 ** -(i + 2), "units": 8 * (i % 3 + 1), "dropout": 0.0, "seed": i},
            value=0.5,
        )
        for i in range(6)
    ]
    # "seed" varies too and is an integer, but it is no searched parameter: the space rules it out.
    assert width_param(records, space=space) == "units"
    assert width_param(records) == "seed"  # read from the trials alone, the most-varied integer wins


# ----------------------------------------------------------------------------------- resume (no Spark)
def _builtin_run(tmp_path: Path, **fields) -> Path:
    run = tmp_path / "saved"
    run.mkdir()
    config = StudyConfig(
        space=SPACE,
        study_name="saved",
        trials=4,
        builtin=BuiltinOptions(dataset="mnist", model="mlp"),
        **fields,
    )
    (run / "config.json").write_text(json.dumps(config.to_dict()))
    return run


def test_cli_resume_refuses_conflicting_settings_in_one_line(tmp_path, capsys, monkeypatch) -> None:
    import deepspark.spark as ds_spark

    def no_spark(*args, **kw):
        raise AssertionError("a Spark session was requested before validation finished")

    monkeypatch.setattr(ds_spark, "session", no_spark)
    run = _builtin_run(tmp_path)
    argv = ["tune", "--resume", str(run), "--sampler", "random", "--seed", "3", "--model", "cnn"]
    assert main([*argv, "--pruner", "median", "--trials", "9", "--parallelism", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("deepspark: error:") == 1 and "\n" not in err
    assert err.startswith(f"deepspark: error: resume: the study in {run} was saved with other settings")
    for part in (
        "sampler (saved 'tpe', given 'random')",
        "seed (saved 0, given 3)",
        "model (saved 'mlp', given 'cnn')",
    ):
        assert part in err
    assert "pruner" not in err and "trials" not in err  # equal to the saved one; trials extends
    assert json.loads((run / "config.json").read_text())["trials"] == 4  # nothing was changed


def test_resume_refuses_a_python_objective_for_a_builtin_study(tmp_path) -> None:
    run = _builtin_run(tmp_path)
    with pytest.raises(
        ConfigError, match=r"objective \(saved 'builtin', given the Python objective '_quadratic'\)"
    ):
        tune(_quadratic, run_dir=run, resume=True)


# ----------------------------------------------------------------------------------- on Spark
def test_resume_keeps_the_saved_study_and_best_json_when_nothing_runs(spark, tmp_path) -> None:
    run = tmp_path / "keep"
    first = tune(_quadratic, space=X, trials=3, sampler="random", pruner="none", seed=5, run_dir=run)
    config = json.loads((run / "config.json").read_text())
    assert (config["study_name"], config["seed"], config["sampler"]) == ("keep", 5, "random")
    best = (run / "best.json").read_bytes()
    csv_before = (run / "trials.csv").read_bytes()
    # Nothing given: the saved settings; nothing to run: best.json and trials.csv are left as they were.
    again = tune(_quadratic, run_dir=run, resume=True)
    assert [r.number for r in again.records] == [r.number for r in first.records]
    assert (run / "best.json").read_bytes() == best and (run / "trials.csv").read_bytes() == csv_before
    assert again.summary == first.summary and again.summary.wall_s == first.summary.wall_s > 1e-3
    # A smaller --trials bounds this run only; a conflicting seed is refused, naming it.
    tune(_quadratic, run_dir=run, resume=True, trials=2)
    assert json.loads((run / "config.json").read_text())["trials"] == 3
    with pytest.raises(
        ConfigError,
        match=r"than those given: sampler \(saved 'random', given 'tpe'\); seed \(saved 5, given 6\)\. Drop",
    ):
        tune(_quadratic, run_dir=run, resume=True, seed=6, sampler="tpe")
    # A larger one extends the study, and is saved.
    extended = tune(_quadratic, run_dir=run, resume=True, trials=5)
    assert extended.counts()["complete"] == 5
    assert json.loads((run / "config.json").read_text())["trials"] == 5
    assert (run / "best.json").read_bytes() != best


def test_a_run_directory_in_the_old_format_resumes(spark, tmp_path) -> None:
    run = tmp_path / "old"
    tune(_quadratic, space=X, trials=2, sampler="random", pruner="none", study_name="deepspark", run_dir=run)
    config = json.loads((run / "config.json").read_text())
    for key in ("format", "study_name", "storage", "select_on", "validation"):
        config.pop(key)
    (run / "config.json").write_text(json.dumps(config))  # as deepspark wrote it before the record
    result = tune(_quadratic, run_dir=run, resume=True, trials=3)
    assert result.counts()["complete"] == 3 and result.study_name == "deepspark"
    journal = JournalStorage(JournalFileBackend(str(run / "study.journal")))
    assert optuna.get_all_study_names(journal) == ["deepspark"]
    assert json.loads((run / "config.json").read_text())["format"] == 2  # migrated when written again


def test_study_is_named_after_its_run_directory_and_holds_its_settings(spark, tmp_path) -> None:
    events = []
    seen = []

    def callback(study, trial):  # an Optuna study callback, called on the driver
        seen.append((study.study_name, trial.number, trial.state, trial.value))

    run = tmp_path / "mnist-small"
    result = tune(
        _quadratic,
        space={**X, "epochs": 2},
        trials=4,
        sampler="random",
        pruner="none",
        parallelism=2,
        run_dir=run,
        on_event=events.append,
        callbacks=[callback],
    )
    study = _journal_study(run)
    assert study.study_name == "mnist-small" == result.study_name
    attrs = study.user_attrs
    assert (attrs["sampler"], attrs["pruner"], attrs["trials"], attrs["seed"]) == ("random", "none", 4, 0)
    assert attrs["fixed"] == {"epochs": 2} and attrs["space"]["x"]["type"] == "uniform"
    assert sorted(n for _, n, _, _ in seen) == [0, 1, 2, 3]
    assert {(name, state) for name, _, state, _ in seen} == {
        ("mnist-small", optuna.trial.TrialState.COMPLETE)
    }
    assert {n: v for _, n, _, v in seen} == {r.number: r.value for r in result.records}
    assert {e.kind for e in events} == {TrialEventKind.START, TrialEventKind.FINISH}
    assert all(isinstance(e.kind, TrialEventKind) for e in events)
    # Another name on request.
    named = tune(_quadratic, space=X, trials=1, pruner="none", study_name="team-x", run_dir=tmp_path / "n")
    assert _journal_study(tmp_path / "n").study_name == "team-x" == named.study_name


def _always_hangs(config, reporter):
    import time

    time.sleep(120)  # a hang, bounded: a regression fails in minutes, not CI's hour


def _fails_on_odd(config, reporter):
    if reporter.number % 2:
        raise ValueError("odd trial")
    return config["x"]


def test_interrupted_attempts_are_marked_apart_from_failures(spark, tmp_path) -> None:
    run = tmp_path / "int"
    result = tune(_always_hangs, space=X, trials=2, sampler="random", pruner="none", timeout=3, run_dir=run)
    assert result.stop_reason == "timeout"
    interrupted = [t for t in _journal_study(run).trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(interrupted) == 2
    for t in interrupted:
        assert t.user_attrs["interrupted"] is True and t.user_attrs["deepspark:interrupted"] is True
        assert t.user_attrs["fail_reason"].startswith("interrupted (timeout): not a failure")
    run = tmp_path / "fail"
    failed = tune(
        _fails_on_odd, space=X, trials=2, sampler="random", pruner="none", parallelism=1, run_dir=run
    )
    assert failed.counts() == {"complete": 1, "pruned": 0, "fail": 1}
    [t] = [t for t in _journal_study(run).trials if t.state == optuna.trial.TrialState.FAIL]
    assert t.user_attrs["fail_reason"] == "ValueError: odd trial" and "interrupted" not in t.user_attrs


def test_a_resume_from_another_directory_never_remakes_a_relative_sqlite_study(
    spark, tmp_path, monkeypatch
) -> None:
    """`tune --resume RUN` from another working directory than the study's, with --storage
    sqlite:///team.db, made a new team.db there, a new study in it, ran every trial again and wrote
    that study's results over the run directory's."""
    start, other = tmp_path / "start", tmp_path / "other"
    start.mkdir()
    other.mkdir()
    monkeypatch.chdir(start)
    run = tmp_path / "run"
    tune(
        _quadratic,
        space=X,
        trials=2,
        sampler="random",
        pruner="none",
        storage="sqlite:///team.db",
        run_dir=run,
    )
    before = (run / "trials.csv").read_bytes()
    monkeypatch.chdir(other)
    with pytest.raises(ConfigError, match=r"resume: the storage sqlite:///team.db .* does not exist"):
        tune(_quadratic, run_dir=run, resume=True, trials=3)
    assert not (other / "team.db").exists() and (run / "trials.csv").read_bytes() == before
    monkeypatch.chdir(start)
    assert tune(_quadratic, run_dir=run, resume=True, trials=3).counts()["complete"] == 3


def test_own_sampler_and_pruner_objects_and_a_sqlite_storage(spark, tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'team.db'}"
    run = tmp_path / "shared"
    sampler = optuna.samplers.RandomSampler(seed=1)
    result = tune(
        _quadratic,
        space=X,
        trials=2,
        sampler=sampler,
        pruner=optuna.pruners.NopPruner(),
        storage=url,
        run_dir=run,
    )
    assert result.counts()["complete"] == 2 and not (run / "study.journal").exists()
    config = json.loads((run / "config.json").read_text())
    assert (config["sampler"], config["pruner"], config["storage"]) == (
        "object:RandomSampler",
        "object:NopPruner",
        url,
    )
    study = optuna.load_study(study_name="shared", storage=url)
    assert len(study.trials) == 2 and study.user_attrs["sampler"] == "object:RandomSampler"
    # A new study of the same name in the same storage is refused before anything runs.
    elsewhere = tmp_path / "elsewhere" / "shared"
    with pytest.raises(ConfigError, match="study_name: the storage already holds a study named 'shared'"):
        tune(_quadratic, space=X, trials=1, storage=url, run_dir=elsewhere)
    assert not elsewhere.exists()
    # The objects cannot be saved: a resume must pass them again, and the same kind.
    with pytest.raises(ConfigError, match=r"the study's sampler is your own RandomSampler object"):
        tune(_quadratic, run_dir=run, resume=True, trials=3, pruner=optuna.pruners.NopPruner())
    with pytest.raises(
        ConfigError, match=r"sampler \(saved 'object:RandomSampler', given 'object:TPESampler'\)"
    ):
        tune(
            _quadratic,
            run_dir=run,
            resume=True,
            sampler=optuna.samplers.TPESampler(),
            pruner=optuna.pruners.NopPruner(),
        )
    resumed = tune(
        _quadratic, run_dir=run, resume=True, trials=3, sampler=sampler, pruner=optuna.pruners.NopPruner()
    )
    assert (
        resumed.counts()["complete"] == 3
        and len(optuna.load_study(study_name="shared", storage=url).trials) == 3
    )
    # The report reads the study from the storage config.json names (the run directory has no journal),
    # without writing to the run directory.
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    written = report(run, output=tmp_path / "team.html")
    assert "history" in written.figures and "complete 3" in written.html.read_text()
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before
