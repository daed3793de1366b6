"""Selecting on validation, reporting on test: the built-in objective on a generated MNIST-layout set."""

from __future__ import annotations

import _thread
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from deepspark.cli import main
from deepspark.data import load_dataset, write_idx
from deepspark.data.files import MNIST_FILES
from deepspark.errors import ConfigError, DatasetError
from deepspark.models import load_checkpoint
from deepspark.models.zoo import model_spec
from deepspark.training import evaluate, train_one_process
from deepspark.tuning import tune
from deepspark.tuning.objectives import ImageClassifierObjective

SPACE = {"hidden": {"type": "choice", "values": [4, 256]}, "epochs": 2, "batch_size": 16}


def _layout(directory: Path) -> Path:
    """3 classes of 7x7 images, each class a bright row at its own place plus noise: learnable, not
    trivially (the noise makes accuracies differ between splits)."""
    rng = np.random.default_rng(0)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, 3, n).astype(np.uint8)
        images = rng.integers(0, 160, (n, 7, 7)).astype(np.uint8)
        images[np.arange(n), 2 * labels.astype(np.int64)] += 30
        return images, labels

    directory.mkdir()
    for name, array in zip(MNIST_FILES, [*split(300), *split(90)], strict=True):
        write_idx(directory / name, array)
    return directory


def _accuracy(model_dir: Path, images: np.ndarray, labels: np.ndarray) -> float:
    ckpt = load_checkpoint(model_dir)
    return evaluate(ckpt.model, ckpt.preprocess.apply(images), torch.as_tensor(labels))["accuracy"]


def test_trials_report_validation_accuracy_and_best_json_has_test_beside_it(spark, tmp_path) -> None:
    data_dir = _layout(tmp_path / "data")
    run = tmp_path / "run"
    result = tune(
        data_dir=str(data_dir),
        model="mlp",
        space=SPACE,
        trials=3,
        parallelism=2,
        pruner="none",
        sampler="random",
        run_dir=run,
        validation=0.2,
        seed=5,
    )
    assert result.selected_on == "validation" and result.counts()["complete"] == 3
    # An independent split, made here the documented way: the values trials reported are accuracies on it.
    split = load_dataset(data_dir=data_dir).split_validation(0.2, seed=5)
    assert split.validation_images is not None and split.validation_labels is not None
    assert (len(split.train_labels), len(split.validation_labels)) == (240, 60)
    best, default = result.best, result.default
    assert best is not None and default is not None
    for record, name in ((best, "best"), (default, "default")):
        assert json.loads((run / name / "trial.json").read_text())["trial"] == record.number
        on_validation = _accuracy(run / name, split.validation_images, split.validation_labels)
        assert record.value == pytest.approx(on_validation, abs=1e-9)
        assert record.intermediate[2] == pytest.approx(on_validation, abs=1e-9)  # the last epoch's report
    summary = json.loads((run / "best.json").read_text())
    assert summary["selected_on"] == "validation" and "protocol" not in summary
    for name in ("best", "default"):
        entry = summary[name]
        assert entry["validation_accuracy"] == entry["value"]
        on_test = _accuracy(run / name, split.test_images, split.test_labels)
        assert entry["test_accuracy"] == pytest.approx(on_test, abs=1e-9)
    expected = (summary["best"]["test_accuracy"] - summary["default"]["test_accuracy"]) / (
        1 - summary["default"]["test_accuracy"]
    )
    assert summary["error_reduction_on"] == "test"
    assert summary["error_reduction"] == pytest.approx(expected)
    rows = {int(r["number"]): r for r in csv.DictReader((run / "trials.csv").open())}
    assert float(rows[best.number]["validation_accuracy"]) == best.value
    assert float(rows[best.number]["test_accuracy"]) == summary["best"]["test_accuracy"]
    others = [r for n, r in rows.items() if n not in (best.number, default.number)]
    assert others and all(r["test_accuracy"] == "" for r in others)  # measured for two trials only
    config = json.loads((run / "config.json").read_text())
    assert (config["select_on"], config["validation"]) == ("validation", 0.2)
    # The checkpoint names the split its accuracy is on.
    assert "validation_accuracy" in load_checkpoint(run / "best").metadata["metrics"]

    # Resume keeps the protocol, and measures the test accuracy again from the kept models.
    again = tune(run_dir=run, resume=True, trials=3)
    assert again.selected_on == "validation"
    assert (
        json.loads((run / "best.json").read_text())["best"]["test_accuracy"]
        == summary["best"]["test_accuracy"]
    )


def test_refit_trains_the_chosen_configurations_again_on_training_plus_validation(
    spark, tmp_path, capsys
) -> None:
    data_dir = _layout(tmp_path / "data")
    run = tmp_path / "run"
    space = tmp_path / "space.yaml"
    space.write_text(
        "hidden: {type: choice, values: [4, 256]}\nlearning_rate: {type: choice, values: [0.001, 0.02]}\n"
        "epochs: 2\nbatch_size: 16\nseed: 3\n"
    )
    args = ["tune", "--data-dir", str(data_dir), "--model", "mlp", "--space", str(space), "--trials", "3"]
    args += ["--sampler", "random", "--pruner", "none", "--validation", "0.2", "--seed", "5", "--refit"]
    assert main([*args, "--run-dir", str(run)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    summary = json.loads((run / "best.json").read_text())
    assert json.loads((run / "config.json").read_text())["refit"] is True
    data = load_dataset(data_dir=data_dir)
    merged = data.split_validation(0.2, seed=5).validation_in_training()
    assert len(merged.train_labels) == 300  # every training example, the validation ones included
    refitted = {}
    for name in ("best", "default"):
        entry = summary[name]
        held = json.loads((run / "refit" / name / "trial.json").read_text())
        assert held["trial"] == entry["trial"] and held["test_accuracy"] == entry["refit_test_accuracy"]
        # The record matches the model: its accuracy on the real test split.
        on_test = _accuracy(run / "refit" / name, data.test_images, data.test_labels)
        assert entry["refit_test_accuracy"] == pytest.approx(on_test, abs=1e-9)
        # The model is the trial's configuration trained on training + validation, seed for seed.
        config, hyper = ImageClassifierObjective(model="mlp").split(entry["config"])
        spec = model_spec("mlp", input_shape=merged.input_shape, num_classes=merged.num_classes, **hyper)
        expected = train_one_process(spec, merged, config).model.state_dict()
        got = load_checkpoint(run / "refit" / name).model.state_dict()
        assert got.keys() == expected.keys()
        for key in got:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)
        trial_model = load_checkpoint(run / name).model.state_dict()
        assert any(not torch.equal(got[k], trial_model[k]) for k in got)  # more data: another model
        refitted[name] = entry["refit_test_accuracy"]
    expected_reduction = (refitted["best"] - refitted["default"]) / (1 - refitted["default"])
    assert summary["refit_error_reduction"] == pytest.approx(expected_reduction)
    assert f"refitted on training + validation, test accuracy: best {refitted['best']:.4f}" in out
    # The HTML report shows each split's figure beside the others, from the study and its best.json.
    from deepspark.reporting import report

    page = report(run, output=tmp_path / "report.html").html.read_text(encoding="utf-8")
    best = summary["best"]
    assert f"validation accuracy {best['value']:.6g} (trial {best['trial']}); test accuracy" in page
    assert f"refitted on training + validation: test accuracy {best['refit_test_accuracy']:.6g}" in page
    assert "relative drop in test error" in page

    # A refit that never finished (its reports were written first, then Ctrl-C): --resume does it, the
    # same models again (same configurations, data and seed).
    shutil.rmtree(run / "refit")
    cut = {**summary, "best": {k: v for k, v in best.items() if k != "refit_test_accuracy"}}
    (run / "best.json").write_text(json.dumps(cut))
    assert main(["tune", "--resume", str(run)]) == 0
    again = json.loads((run / "best.json").read_text())
    assert again["best"]["refit_test_accuracy"] == best["refit_test_accuracy"]
    assert (
        json.loads((run / "refit" / "default" / "trial.json").read_text())["trial"]
        == summary["default"]["trial"]
    )


def test_ctrl_c_stops_a_refit_study_without_refitting_and_its_resume_refits(spark, tmp_path) -> None:
    # After Ctrl-C the study went on to train the best and the default configuration again (minutes
    # on MNIST) before it stopped, only for the --resume that runs the interrupted trials to refit again.
    data_dir = _layout(tmp_path / "data")
    run = tmp_path / "run"

    def ctrl_c_after_the_first_trial(event) -> None:
        if event.kind.value == "finish":
            _thread.interrupt_main()

    options = {"data_dir": str(data_dir), "model": "mlp", "space": SPACE, "trials": 3, "parallelism": 1}
    result = tune(**options, pruner="none", refit=True, on_event=ctrl_c_after_the_first_trial, run_dir=run)
    assert result.stop_reason == "interrupted"
    assert not (run / "refit").exists()
    assert "refit_test_accuracy" not in json.loads((run / "best.json").read_text())["best"]
    resumed = tune(run_dir=run, resume=True)
    assert resumed.stop_reason is None and len(resumed.records) == 3
    assert resumed.summary.best is not None and resumed.summary.best.refit_test_accuracy is not None
    assert (run / "refit" / "best" / "trial.json").is_file()


def test_cli_select_on_test_keeps_the_blogs_protocol_and_says_so(spark, tmp_path, capsys) -> None:
    data_dir = _layout(tmp_path / "data")
    space = tmp_path / "space.yaml"
    space.write_text("hidden: {type: choice, values: [4, 256]}\nepochs: 1\nbatch_size: 16\n")
    run = tmp_path / "run"
    args = ["tune", "--data-dir", str(data_dir), "--model", "mlp", "--space", str(space), "--trials", "2"]
    assert main([*args, "--select-on", "test", "--pruner", "none", "--run-dir", str(run)]) == 0
    out = " ".join(capsys.readouterr().out.split())  # the table wraps its title
    assert "test accuracy: selected on TEST, the 2016 blog's protocol: optimistic" in out
    assert "selected on the test split (--select-on test" in out
    summary = json.loads((run / "best.json").read_text())
    assert summary["selected_on"] == "test" and "2016 blog" in summary["protocol"]
    assert summary["best"]["test_accuracy"] == summary["best"]["value"]
    assert summary["best"]["validation_accuracy"] is None
    # Trained on the whole training split and scored on test: the blog's protocol.
    data = load_dataset(data_dir=data_dir)
    assert summary["best"]["value"] == pytest.approx(
        _accuracy(run / "best", data.test_images, data.test_labels), abs=1e-9
    )
    assert json.loads((run / "config.json").read_text())["select_on"] == "test"
    assert not (run / "default").exists()


def test_select_on_is_checked_before_spark(tmp_path) -> None:
    with pytest.raises(ConfigError, match="select_on: expected one of"):
        tune(dataset="mnist", model="mlp", space=SPACE, select_on="train", run_dir=tmp_path / "a")
    with pytest.raises(ConfigError, match="validation: expected a fraction"):
        tune(dataset="mnist", model="mlp", space=SPACE, validation=1.5, run_dir=tmp_path / "b")
    with pytest.raises(ConfigError, match="built-in objective only"):
        tune(lambda c, r: 1.0, space={"x": {"type": "uniform", "low": 0, "high": 1}}, select_on="test")
    with pytest.raises(ConfigError, match="refit: applies when trials are selected on validation"):
        tune(dataset="mnist", model="mlp", space=SPACE, select_on="test", refit=True, run_dir=tmp_path / "c")
    with pytest.raises(ConfigError, match="refit: applies to the built-in objective only"):
        tune(lambda c, r: 1.0, space={"x": {"type": "uniform", "low": 0, "high": 1}}, refit=True)
    with pytest.raises(ConfigError, match="validation: applies when trials are selected on validation"):
        tune(
            dataset="mnist",
            model="mlp",
            space=SPACE,
            select_on="test",
            validation=0.2,
            run_dir=tmp_path / "d",
        )
    assert not any((tmp_path / name).exists() for name in "abcd")


@pytest.mark.parametrize("select_on", ["validation", "test"])
def test_a_dataset_with_an_empty_test_split_is_refused_before_spark(tmp_path, select_on) -> None:
    # Its test accuracy was the 0.0 of no image: best.json said 0.0 and an error reduction of 0%.
    data_dir = _layout(tmp_path / "data")
    write_idx(data_dir / MNIST_FILES[2], np.zeros((0, 7, 7), np.uint8))
    write_idx(data_dir / MNIST_FILES[3], np.zeros(0, np.uint8))
    with pytest.raises(DatasetError, match="the test split holds no example"):
        tune(data_dir=str(data_dir), model="mlp", space=SPACE, select_on=select_on, run_dir=tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_data_given_to_the_built_in_objective_is_refused_not_ignored(tmp_path) -> None:
    mine = load_dataset(data_dir=_layout(tmp_path / "mine"))
    with pytest.raises(ConfigError, match="data: reaches your own objective"):
        tune(
            data=mine, data_dir=str(tmp_path / "elsewhere"), model="mlp", space=SPACE, run_dir=tmp_path / "r"
        )
    assert not (tmp_path / "r").exists()


def test_a_resume_that_fails_on_its_data_leaves_the_saved_settings(spark, tmp_path) -> None:
    data_dir = _layout(tmp_path / "data")
    run = tmp_path / "run"
    space = {"hidden": {"type": "choice", "values": [4, 256]}, "epochs": 1, "batch_size": 16}
    tune(data_dir=str(data_dir), model="mlp", space=space, trials=1, pruner="none", run_dir=run)
    saved = (run / "config.json").read_text()
    broken = tmp_path / "broken"
    shutil.copytree(data_dir, broken)
    (broken / MNIST_FILES[1]).write_bytes(b"")
    with pytest.raises(DatasetError, match="too short for an IDX header"):
        tune(run_dir=run, resume=True, trials=3, data_dir=str(broken))
    assert (run / "config.json").read_text() == saved
    # So the plain resume runs on the study's own data, as before the failed attempt.
    assert tune(run_dir=run, resume=True, trials=2).counts()["complete"] == 2


def test_a_study_made_without_the_default_resumes_although_the_space_leaves_the_default_out(
    spark, tmp_path
) -> None:
    # mlp's default width (256) lies outside this space: only --no-default can make the study, and a
    # resume (the CLI passes default_config=True unless --no-default is repeated) adds no default trial
    # to a study that has trials, so it must not refuse the default configuration either.
    data_dir = _layout(tmp_path / "data")
    run = tmp_path / "run"
    space = {"hidden": {"type": "choice", "values": [4, 8]}, "epochs": 1, "batch_size": 16}
    tune(
        data_dir=str(data_dir),
        model="mlp",
        space=space,
        trials=1,
        pruner="none",
        default_config=False,
        run_dir=run,
    )
    with pytest.raises(ConfigError, match="lies outside the space"):  # a new study still says so
        tune(data_dir=str(data_dir), model="mlp", space=space, trials=1, run_dir=tmp_path / "new")
    result = tune(run_dir=run, resume=True, trials=2)
    assert result.counts()["complete"] == 2
    assert result.default is None


def test_the_built_in_objective_refuses_another_metric_or_direction_before_spark(tmp_path) -> None:
    # Its trials report accuracy per epoch to the pruner and best.json calls the value an accuracy: a
    # study minimising the loss would prune the most accurate trials and label a loss as an accuracy.
    for name, options in {
        "loss": {"metric": "loss", "direction": "minimize"},
        "min": {"direction": "minimize"},
    }.items():
        with pytest.raises(ConfigError, match="built-in objective selects on accuracy, maximised"):
            tune(dataset="mnist", model="mlp", space=SPACE, run_dir=tmp_path / name, **options)
        assert not (tmp_path / name).exists()
    # Saying what it does anyway is fine.
    with pytest.raises(ConfigError, match="validation: expected"):
        tune(
            dataset="mnist",
            model="mlp",
            space=SPACE,
            metric="accuracy",
            direction="maximize",
            validation=2.0,
            run_dir=tmp_path / "ok",
        )


def test_a_dataset_directory_named_relatively_is_the_same_directory_on_resume(
    spark, tmp_path, monkeypatch
) -> None:
    _layout(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    space = {"hidden": {"type": "choice", "values": [4, 256]}, "epochs": 1, "batch_size": 16}
    run = tmp_path / "run"
    tune(dataset="data", model="mlp", space=space, trials=1, pruner="none", run_dir=run)
    assert json.loads((run / "config.json").read_text())["dataset"] == str(tmp_path / "data")
    # Elsewhere, "data" is another directory (here: not a dataset at all).
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "data").mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    result = tune(run_dir=run, resume=True, trials=2)
    assert result.counts()["complete"] == 2
    # Naming it again, relatively from where it was made, is no conflict.
    monkeypatch.chdir(tmp_path)
    assert len(tune(dataset="data", run_dir=run, resume=True, trials=2).records) == 2


def test_resume_on_other_data_is_refused_and_on_the_same_data_elsewhere_runs(spark, tmp_path) -> None:
    data_dir = _layout(tmp_path / "data")
    run = tmp_path / "run"
    space = {"hidden": {"type": "choice", "values": [4, 256]}, "epochs": 1, "batch_size": 16}
    tune(
        data_dir=str(data_dir),
        model="mlp",
        space=space,
        trials=2,
        pruner="none",
        sampler="random",
        run_dir=run,
        parallelism=2,
    )
    saved = (run / "config.json").read_text()
    # Another dataset of the same shape and classes, where a resume is told the data now lives.
    other = tmp_path / "other"
    shutil.copytree(data_dir, other)
    images = load_dataset(data_dir=data_dir).train_images.copy()
    images[0, 0, 0] ^= 0xFF
    write_idx(other / MNIST_FILES[0], images)
    with pytest.raises(ConfigError, match="is not the data the study"):
        tune(run_dir=run, resume=True, trials=3, data_dir=str(other))
    assert (run / "config.json").read_text() == saved  # the study is left as it was saved
    assert len(tune(run_dir=run, resume=True, trials=2).records) == 2
    # The same data in another place: the resume runs.
    moved = tmp_path / "moved"
    shutil.copytree(data_dir, moved)
    result = tune(run_dir=run, resume=True, trials=3, data_dir=str(moved), parallelism=2)
    assert result.counts()["complete"] == 3


class _Accurate:
    def __call__(self, config, reporter):
        return {"accuracy": 0.5}


def test_the_refit_job_runs_in_a_group_of_its_own_and_leaves_the_callers_group_alone(spark, tmp_path) -> None:
    # A Spark action run in the caller's thread is uncancellable by Ctrl-C (pyspark's handler breaks the
    # thread's connection, which loses its job group and local properties); run_job's own group is not.
    from deepspark.tuning.refit import refit_models
    from deepspark.tuning.trial import TrialRecord, TrialState

    sc = spark.sparkContext
    sc.setJobGroup("the-callers-group", "the caller's jobs")
    try:
        accuracies = refit_models(
            spark,
            objective=_Accurate(),
            data=None,
            chosen={"best": TrialRecord(number=0, state=TrialState.COMPLETE, params={})},
            threads=1,
            run_dir=tmp_path,
        )
        assert accuracies == {0: 0.5}
        assert sc.statusTracker().getJobIdsForGroup("the-callers-group") == []
        assert sc.getLocalProperty("spark.jobGroup.id") == "the-callers-group"
    finally:
        sc.setLocalProperty("spark.jobGroup.id", None)
        sc.setLocalProperty("spark.job.description", None)
        sc.setLocalProperty("spark.job.interruptOnCancel", None)
