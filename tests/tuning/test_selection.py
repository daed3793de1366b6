"""Selecting on validation, reporting on test: the built-in objective on a generated MNIST-layout set."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from deepspark.cli import main
from deepspark.data import load_dataset, write_idx
from deepspark.data.files import MNIST_FILES
from deepspark.errors import ConfigError
from deepspark.models import load_checkpoint
from deepspark.training import evaluate
from deepspark.tuning import tune

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
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
