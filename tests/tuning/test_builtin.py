"""The built-in objective and the `deepspark tune` command on a slice of real MNIST."""

from __future__ import annotations

import csv
import json

import pytest

from deepspark.cli import main
from deepspark.models import load_checkpoint
from deepspark.training import evaluate


@pytest.mark.slow
def test_cli_tune_on_mnist_slice_writes_reports_and_best_model(spark, mnist, tmp_path, capsys) -> None:
    space = tmp_path / "space.yaml"
    space.write_text(
        "learning_rate: {type: loguniform, low: 3.0e-4, high: 3.0e-3}\n"
        "hidden: {type: choice, values: [64, 256]}\n"
        "epochs: 2\n"
        "batch_size: 64\n"
    )
    run = tmp_path / "run"
    code = main(
        [
            "tune",
            "mnist",
            "--model",
            "mlp",
            "--space",
            str(space),
            "--trials",
            "3",
            "--parallelism",
            "2",
            "--limit-train",
            "3000",
            "--limit-test",
            "1000",
            "--pruner",
            "none",
            "--run-dir",
            str(run),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "leaderboard" in out and "error reduction" in out
    rows = list(csv.DictReader((run / "trials.csv").open()))
    assert len(rows) == 3 and all(r["state"] == "complete" for r in rows)
    default = next(r for r in rows if r["default"] == "True")
    assert float(default["param_learning_rate"]) == pytest.approx(1e-3) and default["param_hidden"] == "256"
    best = json.loads((run / "best.json").read_text())
    accuracies = [float(r["value"]) for r in rows]
    assert best["best"]["value"] == max(accuracies)
    assert best["best"]["config"]["epochs"] == 2
    # Selected on validation (the default); the error reduction is on the test accuracy measured at the end.
    assert best["selected_on"] == "validation"
    tests = best["best"]["test_accuracy"], best["default"]["test_accuracy"]
    assert best["error_reduction"] == pytest.approx((tests[0] - tests[1]) / (1 - tests[1]))
    # The best model is a checkpoint whose accuracy on the same test slice is the one reported.
    ckpt = load_checkpoint(run / "best")
    data = mnist.subset(test=1000)
    import torch

    scores = evaluate(ckpt.model, ckpt.preprocess.apply(data.test_images), torch.as_tensor(data.test_labels))
    assert scores["accuracy"] == pytest.approx(best["best"]["test_accuracy"], abs=1e-9)
    assert ckpt.class_names == tuple(str(i) for i in range(10))
    assert (run / "accuracy_vs_lr.png").stat().st_size > 1000


def test_unknown_model_parameter_is_rejected_before_spark(tmp_path) -> None:
    from deepspark.errors import ConfigError
    from deepspark.tuning import tune

    with pytest.raises(ConfigError, match=r"\['width'\] are neither training options"):
        tune(
            dataset="mnist",
            model="cnn",
            space={"width": {"type": "choice", "values": [1, 2]}},
            run_dir=tmp_path / "r",
        )
    with pytest.raises(ConfigError, match="fc=1024 lies outside the space"):
        tune(
            dataset="mnist",
            model="cnn",
            space={"fc": {"type": "choice", "values": [64, 128]}},
            run_dir=tmp_path / "r2",
        )


def test_cli_tune_with_a_data_dir_trains_on_that_directory_not_mnist(spark, tmp_path) -> None:
    import numpy as np

    from deepspark.data import write_idx
    from deepspark.data.files import MNIST_FILES

    # An MNIST-layout directory that is not MNIST: 3 classes, 7x7 images, 50 train / 20 test.
    other = tmp_path / "other"
    other.mkdir()
    rng = np.random.default_rng(0)
    arrays = [
        rng.integers(0, 256, (50, 7, 7), dtype=np.uint8),
        (np.arange(50) % 3).astype(np.uint8),
        rng.integers(0, 256, (20, 7, 7), dtype=np.uint8),
        (np.arange(20) % 3).astype(np.uint8),
    ]
    for name, array in zip(MNIST_FILES, arrays, strict=True):
        write_idx(other / name, array)
    space = tmp_path / "space.yaml"
    space.write_text("hidden: {type: choice, values: [8, 16]}\nepochs: 1\n")
    run = tmp_path / "run"
    args = ["tune", "--data-dir", str(other), "--model", "mlp", "--space", str(space), "--trials", "1"]
    code = main([*args, "--limit-train", "40", "--limit-test", "20", "--no-default", "--run-dir", str(run)])
    assert code == 0
    config = json.loads((run / "config.json").read_text())
    assert config["dataset"] is None and config["data_dir"] == str(other)
    ckpt = load_checkpoint(run / "best")
    assert tuple(ckpt.spec.input_shape) == (1, 7, 7)
    assert ckpt.class_names == ("0", "1", "2")
    assert (run / "report.html").is_file() and (run / "report-timeline.png").is_file()


@pytest.mark.parametrize(
    ("space", "message"),
    [
        (
            {"dropout": {"type": "uniform", "low": 0.5, "high": 1.5}},
            r"parameter 'dropout' is uniform from 0.5 to 1.5, .* dropout=1.5: .*p must be in \[0, 1\)",
        ),
        (
            {"learning_rate": {"type": "uniform", "low": 0.0, "high": 0.1}},
            r"parameter 'learning_rate' is uniform from 0 to 0.1, .* learning_rate=0.0: .*expected a number > 0",
        ),
        (
            {"batch_size": {"type": "choice", "values": [64, 0]}},
            r"parameter 'batch_size' is choice \[64, 0\], .* batch_size=0: .*expected an integer >= 1",
        ),
        (
            {"batch_size": {"type": "uniform", "low": 32, "high": 64}},
            r"parameter 'batch_size' is uniform from 32 to 64, .*expected an integer >= 1",
        ),
        (
            {"fc": {"type": "int", "low": 0, "high": 1024}},
            r"parameter 'fc' is int from 0 to 1024, .* fc=0: .*out_features must be a positive integer",
        ),
    ],
)
def test_a_space_value_the_model_cannot_take_fails_before_spark(
    tmp_path, monkeypatch, space, message
) -> None:
    import pyspark

    import deepspark.spark as ds_spark
    from deepspark.errors import ConfigError
    from deepspark.tuning import tune

    def no_spark(*args, **kwargs):
        raise AssertionError("a Spark session was requested before the space was checked")

    monkeypatch.setattr(ds_spark, "session", no_spark)
    active = pyspark.SparkContext._active_spark_context
    with pytest.raises(ConfigError, match=message):
        tune(dataset="mnist", model="cnn", space=space, run_dir=tmp_path / "r", default_config=False)
    assert pyspark.SparkContext._active_spark_context is active
    assert not (tmp_path / "r").exists()
    # The same space within the model's limits is accepted (fails later only for want of Spark).
    with pytest.raises(AssertionError, match="Spark session was requested"):
        tune(
            dataset="mnist",
            model="cnn",
            space={"dropout": {"type": "uniform", "low": 0.0, "high": 0.9}, "epochs": 1},
            trials=1,
            run_dir=tmp_path / "ok",
            default_config=False,
            limit_train=10,
            limit_test=10,
        )
