"""Experiment tracking: run directories logged to MLflow (a file store here, a real server in the slow
test), the logged models loading back, logging twice updating instead of duplicating, and the
optuna-dashboard reading a study's journal."""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest

from _datasets import bar_dataset
from deepspark.cli import main

SPACE = {
    "learning_rate": {"type": "loguniform", "low": 0.05, "high": 0.3},
    "hidden": {"type": "choice", "values": [8, 16]},
    "epochs": 3,
    "batch_size": 16,
}


@pytest.fixture(autouse=True)
def _file_store_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow 3 refuses its file store unless told; the issue asks for tests against one."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return bar_dataset(tmp_path_factory.mktemp("tracking") / "data", train=90, test=30)


@pytest.fixture(scope="module")
def study_dir(spark, data_dir, tmp_path_factory) -> Path:
    """A finished study of the built-in objective: per-epoch values, best/ and default/ checkpoints."""
    from deepspark.tuning import tune

    run = tmp_path_factory.mktemp("tracking-study") / "run"
    tune(
        data_dir=data_dir,
        model="mlp",
        space=SPACE,
        trials=4,
        parallelism=2,
        sampler="random",
        pruner="none",
        default_config={"learning_rate": 0.1, "hidden": 16, "epochs": 3, "batch_size": 16},
        run_dir=run,
        seed=1,
    )
    return run


def _store(tmp_path: Path) -> str:
    return (tmp_path / "mlruns").as_uri()  # file:///...


def _runs(uri: str) -> list:
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("deepspark")
    return [] if experiment is None else client.search_runs([experiment.experiment_id], max_results=1000)


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _trials(run_dir: Path):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(run_dir / "study.journal")))
    (study,) = storage.get_all_studies()  # named after the run directory
    return optuna.load_study(study_name=study.study_name, storage=storage).get_trials()


def _load_model(uri: str, model_uri: str):
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        return mlflow.pyfunc.load_model(model_uri)
    finally:
        mlflow.set_tracking_uri(previous)


def test_study_logs_a_parent_and_a_nested_run_per_trial(study_dir, data_dir, tmp_path) -> None:
    from deepspark.data import load_dataset
    from deepspark.inference import load_model
    from deepspark.reporting import log_to_mlflow

    uri = _store(tmp_path)
    before = _snapshot(study_dir)
    tracked = log_to_mlflow(study_dir, tracking_uri=uri)
    assert _snapshot(study_dir) == before  # read-only towards the run directory
    assert tracked.created and tracked.new_trials == (0, 1, 2, 3)

    client = mlflow.MlflowClient(uri)
    runs = _runs(uri)
    parents = [r for r in runs if r.data.tags["deepspark.kind"] == "study"]
    children = {
        int(r.data.tags["deepspark.trial"]): r for r in runs if r.data.tags["deepspark.kind"] == "trial"
    }
    assert len(runs) == 5 and len(parents) == 1 and sorted(children) == [0, 1, 2, 3]
    parent = parents[0]
    assert parent.info.run_id == tracked.run_id and parent.info.status == "FINISHED"
    assert parent.data.tags["deepspark.run_dir"] == str(study_dir.resolve())
    assert parent.data.params["trials"] == "4" and parent.data.params["sampler"] == "random"
    assert json.loads(parent.data.params["space.learning_rate"]) == SPACE["learning_rate"]
    best = json.loads((study_dir / "best.json").read_text())
    assert parent.data.metrics["best_value"] == pytest.approx(best["best"]["value"])
    assert parent.data.metrics["best_test_accuracy"] == pytest.approx(best["best"]["test_accuracy"])
    assert parent.data.tags["deepspark.best_trial"] == str(best["best"]["trial"])
    # By its artifact URI: MLflow 3.0's list_artifacts(run_id, path) reads the global tracking URI's store.
    listed = mlflow.artifacts.list_artifacts(artifact_uri=f"{parent.info.artifact_uri}/deepspark")
    names = {a.path for a in listed}
    assert {"deepspark/config.json", "deepspark/best.json", "deepspark/trials.csv"} <= names

    for trial in _trials(study_dir):
        child = children[trial.number]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["deepspark.run_id"] == parent.data.tags["deepspark.run_id"]
        assert child.data.tags["deepspark.state"] == "complete" and child.info.status == "FINISHED"
        config = trial.user_attrs["deepspark:config"]
        assert {k: child.data.params[k] for k in config} == {k: str(v) for k, v in config.items()}
        history = client.get_metric_history(child.info.run_id, "accuracy")
        assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == sorted(
            trial.intermediate_values.items()
        )
        assert [m.step for m in history] == [1, 2, 3]  # one point per epoch, step = epoch
        assert child.data.metrics["value"] == pytest.approx(trial.value)
        assert child.info.start_time == int(trial.datetime_start.timestamp() * 1000)
        assert child.info.end_time == int(trial.datetime_complete.timestamp() * 1000)

    # The best and the default models, on their trials' runs, load back and predict as the checkpoint
    # (one model when the default configuration is the best).
    held = {
        name: json.loads((study_dir / name / "trial.json").read_text())["trial"]
        for name in ("best", "default")
    }
    assert set(tracked.models) == ({"best"} if held["best"] == held["default"] else {"best", "default"})
    images = load_dataset(None, data_dir=data_dir).test_images[:, None, :, :]
    for name, model_uri in tracked.models.items():
        assert children[held[name]].data.tags["deepspark.model"] == model_uri
        logged = _load_model(uri, model_uri)
        expected = load_model(study_dir / name).predict(images)
        predicted = logged.predict(images)
        assert predicted.shape == (30, 3) and predicted.dtype == np.float32
        # The same weights and preprocessing; float32 kernels may sum in another order across calls.
        np.testing.assert_allclose(predicted, expected, rtol=1e-4, atol=1e-7)
        np.testing.assert_array_equal(predicted.argmax(axis=1), expected.argmax(axis=1))
    # Loading read safetensors and JSON: no pickle anywhere in the logged model.
    model_id = tracked.models["best"].removeprefix("models:/")
    files = [f for f in (tmp_path / "mlruns").rglob("*") if model_id in str(f) and f.is_file()]
    assert any(f.name == "model.safetensors" for f in files)
    assert not [f for f in files if f.suffix in (".pkl", ".pickle", ".pt", ".pth")]


def test_logging_twice_updates_and_never_duplicates(study_dir, tmp_path) -> None:
    """A copy of the study, logged mid-way (one trial running), then after that trial finished."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from deepspark.reporting import log_to_mlflow

    run = tmp_path / "copy"
    shutil.copytree(study_dir, run)
    storage = JournalStorage(JournalFileBackend(str(run / "study.journal")))
    (summary,) = storage.get_all_studies()
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    trial = study.ask({"learning_rate": optuna.distributions.FloatDistribution(0.05, 0.3, log=True)})
    trial.report(0.5, 1)
    uri = _store(tmp_path)

    first = log_to_mlflow(run, tracking_uri=uri)
    assert first.created and first.new_trials == (0, 1, 2, 3)
    parent = mlflow.MlflowClient(uri).get_run(first.run_id)
    assert parent.info.status == "RUNNING" and parent.data.tags["deepspark.trials_running"] == "1"
    ids = {r.info.run_id for r in _runs(uri)}

    again = log_to_mlflow(run, tracking_uri=uri)  # nothing new: no new run, no new metric point
    assert not again.created and again.run_id == first.run_id and again.new_trials == () and not again.models
    assert {r.info.run_id for r in _runs(uri)} == ids
    history = mlflow.MlflowClient(uri).get_metric_history(first.run_id, "best_value")
    assert [m.step for m in history] == [4]

    study.tell(trial, 0.99)
    third = log_to_mlflow(run, tracking_uri=uri)
    assert third.run_id == first.run_id and third.new_trials == (4,)
    runs = _runs(uri)
    assert {r.info.run_id for r in runs} > ids and len(runs) == len(ids) + 1
    assert sorted(int(r.data.tags["deepspark.trial"]) for r in runs if "deepspark.trial" in r.data.tags) == [
        0,
        1,
        2,
        3,
        4,
    ]
    client = mlflow.MlflowClient(uri)
    assert client.get_run(first.run_id).info.status == "FINISHED"
    steps = [(m.step, m.value) for m in client.get_metric_history(first.run_id, "best_value")]
    assert sorted(steps) == [(4, pytest.approx(study.best_value)), (5, pytest.approx(study.best_value))]
    trial_run = next(r for r in runs if r.data.tags.get("deepspark.trial") == "4")
    assert trial_run.data.metrics["value"] == 0.99 and trial_run.data.params == {
        "learning_rate": str(trial.params["learning_rate"])
    }
    # The copy is another run directory: it never touched the original's runs.
    assert all(r.data.tags["deepspark.run_dir"] == str(run.resolve()) for r in runs)


def test_a_resumed_study_extends_its_parent_run(spark, study_dir, tmp_path) -> None:
    """`tune --resume --trials N` rewrites config.json (the larger trials): still the same MLflow runs."""
    from deepspark.reporting import log_to_mlflow
    from deepspark.tuning import tune

    run = tmp_path / "copy"
    shutil.copytree(study_dir, run)
    uri = _store(tmp_path)
    first = log_to_mlflow(run, tracking_uri=uri)
    tune(run_dir=run, resume=True, trials=5, parallelism=1, default_config=False)
    assert json.loads((run / "config.json").read_text())["trials"] == 5

    again = log_to_mlflow(run, tracking_uri=uri)
    assert not again.created and again.run_id == first.run_id and again.new_trials == (4,)
    runs = _runs(uri)
    assert sorted(r.data.tags["deepspark.kind"] for r in runs) == ["study"] + ["trial"] * 5
    assert len({r.data.tags["deepspark.run_id"] for r in runs}) == 1
    # MLflow never changes a param: the first value stays, the one the resume saved is a tag beside it.
    parent = mlflow.MlflowClient(uri).get_run(first.run_id).data
    assert parent.params["trials"] == "4" and parent.tags.get("deepspark.current.trials") == "5"
    assert [k for k in parent.tags if k.startswith("deepspark.current.")] == ["deepspark.current.trials"]
    # Back to the logged value (a --data-dir moved back, say): the tag goes, the param says it again.
    (run / "config.json").write_text(
        json.dumps({**json.loads((run / "config.json").read_text()), "trials": 4})
    )
    log_to_mlflow(run, tracking_uri=uri)
    assert "deepspark.current.trials" not in mlflow.MlflowClient(uri).get_run(first.run_id).data.tags


_USER_STATE = """
import json, sys, mlflow
from deepspark.reporting import log_to_mlflow
run, uri = sys.argv[1:]
mlflow.set_tracking_uri(uri)
mlflow.set_experiment("other")
with mlflow.start_run() as mine:
    tracked = log_to_mlflow(run, tracking_uri=uri)
    still = mlflow.active_run()
    active = None if still is None else still.info.run_id
with mlflow.start_run() as after:  # a new fluent run goes where the user's active experiment points
    pass
print(json.dumps({
    "experiment_id": tracked.experiment_id, "models": tracked.models, "mine": mine.info.run_id,
    "active": active, "after": after.info.experiment_id, "other": mine.info.experiment_id,
    "uri": mlflow.get_tracking_uri(),
}))
"""


def test_the_users_active_experiment_and_run_neither_block_logging_nor_change(study_dir, tmp_path) -> None:
    """`mlflow.set_experiment("other")` and an active run of the user's: the study is logged whole, its
    models go to deepspark's experiment, and the user's fluent state is as the user left it."""
    uri = _store(tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", _USER_STATE, str(study_dir), uri], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["active"] == seen["mine"] and seen["after"] == seen["other"] and seen["uri"] == uri
    client = mlflow.MlflowClient(uri)
    assert seen["experiment_id"] != seen["other"] and seen["models"]
    for model_uri in seen["models"].values():
        model = client.get_logged_model(model_uri.removeprefix("models:/"))
        assert model.experiment_id == seen["experiment_id"] and model.status == "READY"
    assert not client.get_run(seen["mine"]).outputs.model_outputs  # nothing attached to the user's run
    runs = _runs(uri)
    assert sorted(r.data.tags["deepspark.kind"] for r in runs) == ["study"] + ["trial"] * 4
    assert all(
        r.data.tags.get("deepspark.logged") == "true" for r in runs if "deepspark.trial" in r.data.tags
    )


def test_logging_again_after_a_failed_call_completes_the_half_logged_trials(study_dir, tmp_path) -> None:
    from deepspark.errors import RunError
    from deepspark.reporting import log_to_mlflow

    uri = _store(tmp_path)
    experiment = mlflow.MlflowClient(uri).create_experiment("deepspark")
    # MLflow's file store keeps an experiment's logged models in <experiment>/models/: a file of that name
    # makes it refuse the first model, after that trial's run was created (a store failing half-way).
    blocker = tmp_path / "mlruns" / experiment / "models"
    blocker.write_text("")
    with pytest.raises(RunError, match="log it again"):
        log_to_mlflow(study_dir, tracking_uri=uri)
    half = [r for r in _runs(uri) if "deepspark.trial" in r.data.tags]
    assert any(r.data.tags.get("deepspark.logged") != "true" for r in half)
    blocker.unlink()
    assert not log_to_mlflow(study_dir, tracking_uri=uri).created
    runs = _runs(uri)
    trials = sorted(int(r.data.tags["deepspark.trial"]) for r in runs if "deepspark.trial" in r.data.tags)
    assert trials == [0, 1, 2, 3] and len(runs) == 5  # no duplicate, the half-logged run put aside
    for run in runs:
        if "deepspark.trial" in run.data.tags:
            assert run.info.status == "FINISHED" and {"value", "duration_s"} <= set(run.data.metrics)
            assert run.data.params["learning_rate"] and run.info.end_time is not None


def _resumed_study(root: Path) -> Path:
    """A study whose best.json (written when it first ended: trials 0 and 1) names trial 1 as best, while
    its journal has since completed trial 2, better still (a resumed study, logged while running)."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    run = root / "resumed"
    run.mkdir()
    config = {
        "study_name": "resumed",
        "metric": "accuracy",
        "direction": "maximize",
        "select_on": "validation",
    }
    (run / "config.json").write_text(json.dumps(config))
    storage = JournalStorage(JournalFileBackend(str(run / "study.journal")))
    study = optuna.create_study(study_name="resumed", storage=storage, direction="maximize")
    lr = {"learning_rate": optuna.distributions.FloatDistribution(1e-3, 1e-1, log=True)}
    for value in (0.90, 0.95, 0.97):
        trial = study.ask(lr)
        trial.set_user_attr("deepspark:default", value == 0.90)
        study.tell(trial, value)
    best = {"trial": 1, "value": 0.95, "validation_accuracy": 0.95, "test_accuracy": 0.94}
    default = {"trial": 0, "value": 0.90, "validation_accuracy": 0.90, "test_accuracy": 0.89}
    summary = {"best": best, "default": default, "error_reduction": 0.05 / 0.11, "error_reduction_on": "test"}
    (run / "best.json").write_text(json.dumps({"metric": "accuracy", "direction": "maximize", **summary}))
    return run


def test_summary_metrics_never_mix_best_json_of_another_best_trial(tmp_path) -> None:
    from deepspark.reporting import log_to_mlflow

    uri = _store(tmp_path)
    tracked = log_to_mlflow(_resumed_study(tmp_path), tracking_uri=uri)
    parent = mlflow.MlflowClient(uri).get_run(tracked.run_id).data
    assert parent.tags["deepspark.best_trial"] == "2" and parent.metrics["best_value"] == 0.97
    # best.json's test accuracy is trial 1's, not the best's; its error reduction compares trial 1 too.
    assert "best_test_accuracy" not in parent.metrics
    assert parent.metrics["default_test_accuracy"] == 0.89  # the default is the same trial
    assert parent.metrics["error_reduction"] == pytest.approx((0.10 - 0.03) / 0.10)  # the journal's values


def _training_dir(spark, data_dir: Path, root: Path) -> Path:
    run = root / "train"
    args = ["train", str(data_dir), "--model", "mlp", "--strategy", "average", "--workers", "2"]
    args += ["--epochs", "2", "--tau", "2", "--run-dir", str(run)]
    assert main(args) == 0
    return run


def test_training_run_is_one_run_with_its_history_and_model(spark, data_dir, tmp_path) -> None:
    from deepspark.data import load_dataset
    from deepspark.inference import load_model
    from deepspark.reporting import log_to_mlflow

    run = _training_dir(spark, data_dir, tmp_path)
    uri = _store(tmp_path)
    tracked = log_to_mlflow(run, tracking_uri=uri)
    runs = _runs(uri)
    assert len(runs) == 1 and runs[0].info.run_id == tracked.run_id  # one run, not one per worker
    logged = runs[0]
    assert logged.data.tags["deepspark.kind"] == "training" and logged.info.status == "FINISHED"
    assert logged.data.params["strategy"] == "average" and logged.data.params["workers"] == "2"
    assert logged.data.params["config.epochs"] == "2"
    rows = list(csv.DictReader((run / "history.csv").open(encoding="utf-8")))
    client = mlflow.MlflowClient(uri)
    loss = sorted(client.get_metric_history(tracked.run_id, "train_loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in loss] == [(int(r["round"]), float(r["train_loss"])) for r in rows]
    accuracy = client.get_metric_history(tracked.run_id, "test_accuracy")
    assert len(accuracy) == sum(r["test_accuracy"] != "" for r in rows) > 0
    speed = {m.step: m.value for m in client.get_metric_history(tracked.run_id, "images_per_s")}
    assert speed == {int(r["round"]): pytest.approx(float(r["samples"]) / float(r["seconds"])) for r in rows}

    images = load_dataset(None, data_dir=data_dir).test_images[:, None, :, :]
    model = _load_model(uri, tracked.models["model"])
    predicted, expected = model.predict(images), load_model(run / "model").predict(images)
    np.testing.assert_allclose(predicted, expected, rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(predicted.argmax(axis=1), expected.argmax(axis=1))

    again = log_to_mlflow(run, tracking_uri=uri)
    assert not again.created and again.run_id == tracked.run_id and not again.models
    assert len(_runs(uri)) == 1
    assert len(client.get_metric_history(tracked.run_id, "train_loss")) == len(rows)


def test_cli_report_logs_and_tune_logs_at_the_end(spark, data_dir, study_dir, tmp_path, capsys) -> None:
    uri = _store(tmp_path)
    assert main(["report", str(study_dir), "--output", str(tmp_path / "r.html"), "--mlflow", uri]) == 0
    out = capsys.readouterr().out
    assert "mlflow: logged MLflow run" in out and len(_runs(uri)) == 5

    run = tmp_path / "tuned"
    space = tmp_path / "space.json"
    space.write_text(
        json.dumps({"learning_rate": {"type": "choice", "values": [0.1]}, "hidden": 8, "epochs": 1})
    )
    args = ["tune", "--data-dir", str(data_dir), "--model", "mlp", "--space", str(space), "--trials", "1"]
    args += ["--parallelism", "1", "--no-default", "--run-dir", str(run), "--mlflow", uri]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "mlflow: logged MLflow run" in out
    tuned = [r for r in _runs(uri) if r.data.tags["deepspark.run_dir"] == str(run.resolve())]
    assert sorted(r.data.tags["deepspark.kind"] for r in tuned) == ["study", "trial"]


def test_bad_tracking_uri_is_one_line_before_any_work(tmp_path, capsys) -> None:
    run = tmp_path / "never"
    code = main(["tune", "mnist", "--run-dir", str(run), "--mlflow", "nosuchscheme://x"])
    assert code == 2 and not run.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deepspark: error: mlflow: cannot use the tracking URI")


@pytest.mark.parametrize("uri", ["sqlite:///", "sqlite://", "sqlite:///:memory:"])
def test_an_in_memory_sqlite_uri_is_refused_before_any_work(uri, tmp_path, capsys) -> None:
    """SQLAlchemy opens these in memory: the runs would vanish while the command said 'logged'."""
    run = tmp_path / "never"
    assert main(["tune", "mnist", "--run-dir", str(run), "--mlflow", uri]) == 2 and not run.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deepspark: error: mlflow: expected a database file"), err


def test_a_new_sqlite_store_is_made_without_mlflows_info_lines(tmp_path, capfd) -> None:
    """A usage error with a new SQLite store showed MLflow's two INFO lines ('Creating initial MLflow
    database tables...') above its one error line."""
    from deepspark.cli import main as run

    space = tmp_path / "space.yaml"
    space.write_text("epochs: 1\n")  # no parameter to search: a usage error after the URI check
    uri = f"sqlite:///{tmp_path / 'new.db'}"
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    assert (
        run(["tune", "mnist", "--space", str(space), "--run-dir", str(tmp_path / "r"), "--mlflow", uri]) == 2
    )
    # MLflow before 3.7 also replaced the root logger's handlers and level (alembic's fileConfig).
    assert root.handlers == handlers and root.level == level
    err = capfd.readouterr().err.strip().splitlines()
    assert err == [
        "deepspark: error: space: no parameter to search; give at least one distribution (see docs/tune.md)"
    ]
    assert (tmp_path / "new.db").is_file()


def test_logging_models_draws_no_artifact_progress_bars(study_dir, tmp_path, capfd, monkeypatch) -> None:
    """MLflow's 'Downloading artifacts: 100%|...' bars, two per model, landed on stderr between the
    command's progress and its result line."""
    from deepspark.reporting import log_to_mlflow

    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", raising=False)
    monkeypatch.chdir(tmp_path)  # a sqlite store's artifacts go to ./mlruns
    tracked = log_to_mlflow(study_dir, tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    assert tracked.models
    assert "Downloading artifacts" not in capfd.readouterr().err
    assert "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR" not in os.environ


_HIDE_MLFLOW = "import sys\nsys.modules['mlflow'] = None\n"


@pytest.mark.parametrize(
    "command",
    [
        ["tune", "mnist", "--run-dir", "RUN", "--mlflow", "file:///tmp/x"],
        ["train", "mnist", "--run-dir", "RUN", "--mlflow", "file:///tmp/x"],
        ["report", "RUN_DIR", "--mlflow", "file:///tmp/x"],
    ],
    ids=["tune", "train", "report"],
)
def test_without_mlflow_the_error_gives_the_install_command(command, study_dir, tmp_path) -> None:
    hidden = tmp_path / "hide"
    hidden.mkdir()
    (hidden / "sitecustomize.py").write_text(_HIDE_MLFLOW)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(hidden), os.environ.get("PYTHONPATH")])),
    }
    argv = [str(tmp_path / "run") if a == "RUN" else str(study_dir) if a == "RUN_DIR" else a for a in command]
    done = subprocess.run(
        [sys.executable, "-m", "deepspark", *argv, "--output", str(tmp_path / "r.html")]
        if command[0] == "report"
        else [sys.executable, "-m", "deepspark", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deepspark: error:"), done.stderr
    assert "pip install 'deepspark[mlflow]'" in lines[0]
    assert not (tmp_path / "run").exists() and not (tmp_path / "r.html").exists()


# -------------------------------------------------------------------------------------- servers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _server(argv: list[str], url: str, *, ready: str, timeout: float) -> Iterator[subprocess.Popen]:
    """Start a server process, wait (bounded) until ``url + ready`` answers, and always stop it."""
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"{argv[0]} exited {proc.returncode}: {proc.stdout.read()[-2000:]}")
            try:
                with urllib.request.urlopen(url + ready, timeout=2) as answer:
                    if answer.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{argv[0]} did not answer {url + ready} within {timeout:.0f} s")
            time.sleep(0.2)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)  # the server and its workers (gunicorn/uvicorn): its own group
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait(timeout=20)
        if proc.stdout is not None:
            proc.stdout.close()


def test_optuna_dashboard_reads_the_journal_and_finds_every_trial(study_dir, tmp_path) -> None:
    """`optuna-dashboard RUN_DIR/study.journal`, as a user runs it, on a copy (the dashboard may write)."""
    journal = tmp_path / "study.journal"
    shutil.copyfile(study_dir / "study.journal", journal)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    dashboard = shutil.which("optuna-dashboard", path=str(Path(sys.executable).parent))
    assert dashboard is not None
    with _server(
        [dashboard, str(journal), "--host", "127.0.0.1", "--port", str(port)],
        url,
        ready="/api/studies",
        timeout=60,
    ):
        with urllib.request.urlopen(f"{url}/api/studies", timeout=10) as answer:
            studies = json.load(answer)["study_summaries"]
        assert [s["study_name"] for s in studies] == [study_dir.name]  # named after the run directory
        study_id = studies[0]["study_id"]
        with urllib.request.urlopen(f"{url}/api/studies/{study_id}", timeout=30) as answer:
            detail = json.load(answer)
    expected = _trials(study_dir)
    assert sorted(t["number"] for t in detail["trials"]) == [t.number for t in expected]
    by_number = {t["number"]: t for t in detail["trials"]}
    for trial in expected:
        shown = by_number[trial.number]
        assert shown["state"] == "Complete"
        assert shown["values"] == [pytest.approx(trial.value)]
        assert {p["name"] for p in shown["params"]} == set(trial.params)
        assert [v["value"] for v in sorted(shown["intermediate_values"], key=lambda v: v["step"])] == [
            pytest.approx(trial.intermediate_values[s]) for s in sorted(trial.intermediate_values)
        ]


@pytest.mark.slow
def test_against_an_mlflow_server_on_localhost(study_dir, tmp_path, capfd) -> None:
    """`mlflow server` on 127.0.0.1 (a free port, started and stopped here), logged to over HTTP."""
    from deepspark.reporting import log_to_mlflow

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = shutil.which("mlflow", path=str(Path(sys.executable).parent))
    assert server is not None
    argv = [
        server,
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--artifacts-destination",
        str(tmp_path / "artifacts"),
    ]
    with _server(argv, url, ready="/health", timeout=180) as proc:
        capfd.readouterr()
        tracked = log_to_mlflow(study_dir, tracking_uri=url)
        again = log_to_mlflow(study_dir, tracking_uri=url)
        assert capfd.readouterr().out == ""  # MLflow's "View run" lines would spoil --json's stdout
        assert "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT" not in os.environ
        runs = _runs(url)
        assert len(runs) == 5 and not again.created and again.run_id == tracked.run_id
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == tracked.run_id]
        assert sorted(int(r.data.tags["deepspark.trial"]) for r in children) == [0, 1, 2, 3]
        model = _load_model(url, tracked.models["best"])
        images = np.zeros((2, 1, 8, 8), dtype=np.uint8)
        assert model.predict(images).shape == (2, 3)
        assert proc.poll() is None
    assert proc.returncode is not None  # stopped by the test
