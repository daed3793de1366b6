"""fit() inputs beyond zoo names and specs: encoded-image DataFrame columns and nn.Module factories."""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from deepspark._compat import dataframe_to_arrow
from deepspark.errors import ConfigError, DeepsparkError, RunError
from deepspark.training import fit

SGD = {"optimizer": "sgd", "learning_rate": 0.1, "lr_schedule": "constant", "threads": 1}
CLASSES, SIZE = 3, 8


def _images(n: int, *, seed: int = 0, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """``n`` grey ``size``x``size`` images with a bright bar per class (learnable), and their labels."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % CLASSES
    images = rng.integers(0, 60, size=(n, size, size), dtype=np.uint8)
    for i, label in enumerate(labels):
        images[i, label * 2 : label * 2 + 2, :] = 250
    return images, labels


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def _history(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "history.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _png_frame(spark: Any, images: np.ndarray, labels: np.ndarray, blobs: list[bytes] | None = None) -> Any:
    blobs = blobs if blobs is not None else [_png(i) for i in images]
    return spark.createDataFrame(
        [(b, int(y)) for b, y in zip(blobs, labels, strict=True)], "image binary, label int"
    )


def _fit_one_worker(df: Any, run_dir: Path, **kwargs: Any) -> Any:
    return fit(
        df,
        "mlp",
        strategy="average",
        workers=1,
        config={**SGD, "batch_size": 8, "epochs": 2, "seed": 3},
        average={"tau": 1},
        run_dir=run_dir,
        **kwargs,
    )


# ------------------------------------------------------------------------------------ image columns
def test_png_column_trains_exactly_like_the_same_pixels(spark: Any, tmp_path: Path) -> None:
    images, labels = _images(40)
    png = _fit_one_worker(_png_frame(spark, images, labels), tmp_path / "png")
    raw = _fit_one_worker(
        spark.createDataFrame(
            [(i.tobytes(), int(y)) for i, y in zip(images, labels, strict=True)], "image binary, label int"
        ),
        tmp_path / "raw",
        input_shape=(1, SIZE, SIZE),
    )
    scaled = images.astype(np.float32) * np.float32(1 / 255)  # what the preprocess makes of the pixels
    arrays = _fit_one_worker(
        spark.createDataFrame(
            [(i.reshape(-1).tolist(), int(y)) for i, y in zip(scaled, labels, strict=True)],
            "image array<float>, label int",
        ),
        tmp_path / "arrays",
        input_shape=(1, SIZE, SIZE),
    )
    losses = {
        name: [float(r["train_loss"]) for r in _history(result.run_dir)]
        for name, result in (("png", png), ("raw", raw), ("arrays", arrays))
    }
    assert len(losses["png"]) == 2 * 5  # ceil(40 / 8) steps per epoch, one step per round
    assert losses["png"] == losses["raw"]  # the same pixels, bit for bit
    np.testing.assert_allclose(losses["png"], losses["arrays"], rtol=0, atol=1e-6)
    assert losses["png"][-1] < losses["png"][0]


def test_a_model_trained_on_arrays_predicts_those_arrays_as_it_was_tested_on_them(
    spark: Any, tmp_path: Path
) -> None:
    import deepspark

    images, labels = _images(48)
    scaled = images.astype(np.float32) * np.float32(1 / 255)  # arrays in the model's scale, taken as they are
    df = spark.createDataFrame(
        [(i.reshape(-1).tolist(), int(y)) for i, y in zip(scaled, labels, strict=True)],
        "x array<float>, y int",
    )
    result = fit(
        df,
        "mlp",
        workers=2,
        config={**SGD, "batch_size": 8, "epochs": 3},
        feature_column="x",
        label_column="y",
        input_shape=(1, SIZE, SIZE),
        test_data=df,
        run_dir=tmp_path / "run",
    )
    assert result.test_accuracy is not None and result.test_accuracy > 0.6  # chance is 1/3
    # The record says what training applied to the arrays: nothing (predict puts every input through it).
    preprocess = json.loads((result.model_dir / "metadata.json").read_text())["preprocess"]
    assert (preprocess["scale"], preprocess["mean"], preprocess["std"]) == (1.0, [0.0], [1.0])
    predicted = deepspark.predict(df, result.model_path, input_column="x").dataframe.collect()
    accuracy = np.mean([r["label_index"] == r["y"] for r in predicted])
    assert accuracy == pytest.approx(result.test_accuracy)  # the same model on the same rows


def _blobs_with(bad: bytes, at: int, n: int = 20) -> tuple[list[bytes], np.ndarray]:
    images, labels = _images(n)
    blobs = [_png(i) for i in images]
    blobs[at] = bad
    return blobs, labels


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (_png(_images(1)[0][0])[:60], "cannot decode image"),  # a truncated file: its header still reads
        (_png(_images(1, size=10)[0][0]), r"the image is 10x10 pixels but the model's input is 8x8"),
    ],
    ids=["truncated", "other-size"],
)
def test_a_bad_image_row_stops_the_run_naming_its_row(
    spark: Any, tmp_path: Path, bad: bytes, message: str
) -> None:
    # Row 17 lies beyond the 16 first rows the driver reads, so the task finds it. One input partition:
    # its row key is its position.
    blobs, labels = _blobs_with(bad, at=17)
    df = _png_frame(spark, labels, labels, blobs).coalesce(1)
    with pytest.raises(RunError, match=rf"row key 17 \(row 17 of the DataFrame's partition 0\).*{message}"):
        fit(df, "mlp", workers=2, config={**SGD, "epochs": 1}, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing trained, nothing left behind


def test_image_sizes_that_disagree_are_refused_before_training(spark: Any, tmp_path: Path) -> None:
    blobs, labels = _blobs_with(_png(_images(1, size=10)[0][0]), at=3)
    with pytest.raises(ConfigError, match=r"first images have different sizes \(10x10, 8x8 pixels\)"):
        fit(_png_frame(spark, labels, labels, blobs), "mlp", workers=2, run_dir=tmp_path / "a")
    images, labels = _images(20)
    with pytest.raises(ConfigError, match=r"images of 8x8 pixels .* but the model's input is 10x10"):
        fit(
            _png_frame(spark, images, labels),
            "mlp",
            workers=2,
            input_shape=(1, 10, 10),
            run_dir=tmp_path / "b",
        )
    # Grey and colour images of one size: the error named their sizes only ("different sizes (8x8, 8x8
    # pixels)"), which left nothing to fix.
    from PIL import Image

    colour = io.BytesIO()
    Image.fromarray(np.repeat(_images(1)[0][0][..., None], 3, axis=2), mode="RGB").save(colour, format="PNG")
    blobs, labels = _blobs_with(colour.getvalue(), at=3)
    with pytest.raises(
        ConfigError,
        match=r"first images mix grey and colour ones \(all 8x8 pixels\); pass input_shape=\(3, 8, 8\)",
    ):
        fit(_png_frame(spark, labels, labels, blobs), "mlp", workers=2, run_dir=tmp_path / "d")
    blobs, labels = _blobs_with(b"\x00" * 64, at=2)
    with pytest.raises(ConfigError, match=r"mix encoded image files with other bytes \(15 of 16"):
        fit(_png_frame(spark, labels, labels, blobs), "mlp", workers=2, run_dir=tmp_path / "c")


def test_raw_pixels_from_to_dataframe_that_start_like_an_image_file_are_pixels(
    spark: Any, tmp_path: Path
) -> None:
    from deepspark.data import to_dataframe

    images, labels = _images(12)
    images[::2, 0, :2] = (66, 77)  # "BM", the signature of a BMP file
    df = to_dataframe(spark, images, labels)
    result = _fit_one_worker(df, tmp_path / "run")
    assert sum(int(r["samples"]) for r in _history(result.run_dir)) == 2 * 12


def test_an_input_shape_other_than_the_one_to_dataframe_recorded_is_refused(
    spark: Any, tmp_path: Path
) -> None:
    from deepspark.data import to_dataframe

    images, labels = _images(12)
    df = to_dataframe(spark, images, labels)  # records [8, 8]: 8x8 images read as 4x16 trained scrambled
    with pytest.raises(
        ConfigError, match=r"written as images of shape \[8, 8\] .* model's input is \[1, 4, 16\]"
    ):
        _fit_one_worker(df, tmp_path / "run", input_shape=(1, 4, 16))
    assert not (tmp_path / "run").exists()
    assert _fit_one_worker(df, tmp_path / "same", input_shape=(8, 8)).test_accuracy is None  # the same shape


# ---------------------------------------------------------------------------------------- factories
def small_net() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(SIZE * SIZE, 16), nn.ReLU(), nn.Linear(16, CLASSES))


def test_factory_model_trains_and_predicts_the_driver_modules_logits(spark: Any, tmp_path: Path) -> None:
    import deepspark
    from deepspark.models import Preprocess
    from deepspark.models.checkpoint import state_from_bytes

    images, labels = _images(48)
    df = _png_frame(spark, images, labels)
    result = fit(
        df,
        small_net,
        workers=2,
        config={**SGD, "batch_size": 8, "epochs": 2},
        average={"tau": 2},
        test_data=df,
        run_dir=tmp_path / "run",
    )
    assert result.model_path == result.model_dir / "model.onnx"
    assert json.loads((result.run_dir / "config.json").read_text())["model"] == {
        "factory": f"{__name__}.small_net"
    }
    assert result.test_accuracy is not None and result.test_accuracy > 0.6  # chance is 1/3
    # The driver's module: the factory's, with the saved weights.
    module = small_net().eval()
    module.load_state_dict(state_from_bytes((result.model_dir / "weights.safetensors").read_bytes()))
    metadata = json.loads((result.model_dir / "metadata.json").read_text())
    inputs = Preprocess.from_dict(metadata["preprocess"]).apply(images)
    with torch.no_grad():
        expected = torch.softmax(module(inputs), dim=1).numpy()
    predicted = deepspark.predict(  # the folder, as `deepspark predict --model RUN/model` takes it
        df.select("image"), result.model_dir, top_k=CLASSES, input_column="image"
    ).dataframe.collect()
    assert len(predicted) == len(images) and all(r["error"] is None for r in predicted)
    got = np.zeros_like(expected)
    for i, row in enumerate(predicted):  # predict keeps the input's order within one partition job
        for entry in row["top_k"]:
            got[i, int(entry["label"])] = entry["probability"]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    assert metadata["class_names"] == ["0", "1", "2"]


class _RaisesWhileTraining(nn.Module):
    """Passes the driver's check (an eval-mode forward) and raises in every worker's first step."""

    def __init__(self) -> None:
        super().__init__()
        self.net = small_net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            raise RuntimeError("this model raises while training")
        return self.net(x)


def raising_net() -> nn.Module:
    return _RaisesWhileTraining()


@pytest.mark.parametrize(
    ("strategy", "message"),
    [
        ("average", "every training worker failed the same way before any round finished"),
        ("async", "every training worker failed the same way before any round finished"),
        ("allreduce", "the all-reduce gang failed the same way twice, with no step between"),
    ],
)
def test_a_model_that_raises_on_every_worker_stops_the_run_with_its_exception(
    spark: Any, tmp_path: Path, strategy: str, message: str
) -> None:
    """Not after 4 resubmissions of every worker (or 3 restarts of the gang) failing the same way, and
    with the exception's line, not the source line that raised it."""
    images, labels = _images(16)
    with pytest.raises(RunError) as caught:
        fit(
            _png_frame(spark, images, labels),
            raising_net,
            strategy=strategy,
            workers=2,
            config={**SGD, "batch_size": 4, "epochs": 1},
            run_dir=tmp_path / "run",
        )
    assert str(caught.value) == f"{message}: RuntimeError: this model raises while training"


def _no_job_ran(spark: Any, call: Any) -> None:
    sc = spark.sparkContext
    group = "deepspark-test-no-job"
    sc.setJobGroup(group, "must stay empty")
    try:
        call()
    finally:
        sc.setLocalProperty("spark.jobGroup.id", None)
    assert list(sc.statusTracker().getJobIdsForGroup(group)) == []


def test_factory_that_does_not_return_a_module_fails_before_any_job(spark: Any, tmp_path: Path) -> None:
    images, labels = _images(8)
    df = _png_frame(spark, images, labels)

    def wrong() -> None:
        with pytest.raises(
            ConfigError, match=r"model: expected the factory .*<lambda> to return a torch.nn.Module, got str"
        ):
            fit(df, lambda: "not a module", workers=2, run_dir=tmp_path / "a")

    _no_job_ran(spark, wrong)
    with pytest.raises(ConfigError, match=r"got a Sequential instance; pass a factory instead"):
        fit(df, small_net(), workers=2, run_dir=tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_factory_input_shape_mismatch_fails_before_any_job(spark: Any, tmp_path: Path) -> None:
    df = spark.createDataFrame([([0.0] * 4, 0), ([1.0] * 4, 1)], "x array<float>, y int")

    def wrong() -> None:
        with pytest.raises(ConfigError, match=r"cannot take the data's input \[1, 2, 2\] .*mat1 and mat2"):
            fit(
                df,
                small_net,
                workers=2,
                feature_column="x",
                label_column="y",
                input_shape=(1, 2, 2),
                run_dir=tmp_path / "run",
            )

    _no_job_ran(spark, wrong)


def test_resume_reads_the_data_as_the_run_did_or_is_refused(
    spark: Any, tmp_path: Path, driver_crash: Any
) -> None:
    """The same rows read in another shape (an mlp flattens both) trained a scrambled continuation."""
    images, labels = _images(40)
    df = spark.createDataFrame(
        [(i.reshape(-1).astype(float).tolist(), int(y)) for i, y in zip(images, labels, strict=True)],
        "x array<double>, y int",
    )
    train = functools.partial(
        fit, df, "mlp", workers=2, config={**SGD, "batch_size": 8, "epochs": 2}, average={"tau": 1}
    )
    run_dir = tmp_path / "run"
    with pytest.raises(DeepsparkError, match="driver crash"):
        train(
            run_dir=run_dir,
            checkpoint_seconds=0,
            on_round=driver_crash(3),
            feature_column="x",
            label_column="y",
            input_shape=(1, SIZE, SIZE),
        )
    saved = json.loads((run_dir / "config.json").read_text())["inputs"]
    assert saved["preprocess"]["input_shape"] == [1, SIZE, SIZE] and saved["kind"] == "array"
    with pytest.raises(
        ConfigError, match=r"read its data as preprocess=.*\[1, 8, 8\].*but now as .*\[1, 4, 16\]"
    ):
        fit(df, run_dir=run_dir, resume=True, feature_column="x", label_column="y", input_shape=(1, 4, 16))
    resumed = fit(
        df, run_dir=run_dir, resume=True, feature_column="x", label_column="y", input_shape=(1, 8, 8)
    )
    assert len(resumed.history) > 3 and resumed.model_path is not None


def test_resume_needs_the_factory_again(spark: Any, tmp_path: Path, driver_crash: Any) -> None:
    images, labels = _images(40)
    df = _png_frame(spark, images, labels)
    train = functools.partial(
        fit, df, small_net, workers=2, config={**SGD, "batch_size": 8, "epochs": 2}, average={"tau": 1}
    )
    expected = [float(r["train_loss"]) for r in _history(train(run_dir=tmp_path / "whole").run_dir)]
    run_dir = tmp_path / "crashed"
    with pytest.raises(DeepsparkError, match="driver crash"):
        train(run_dir=run_dir, checkpoint_seconds=0, on_round=driver_crash(3))
    with pytest.raises(ConfigError, match=r"factory .*small_net, which config.json cannot hold"):
        fit(df, run_dir=run_dir, resume=True)
    resumed = fit(df, small_net, run_dir=run_dir, resume=True)
    np.testing.assert_allclose(
        [float(r["train_loss"]) for r in _history(resumed.run_dir)], expected, rtol=0, atol=1e-6
    )


def test_a_column_name_that_a_join_doubled_is_refused_before_any_job(spark: Any, tmp_path: Path) -> None:
    # Both sides of a join kept their "label": Spark's AnalysisException (an ambiguous reference, with
    # its plan) came out of the counting job instead of one line saying what to do.
    from pyspark.sql import functions as F

    images, labels = _images(6)
    left = _png_frame(spark, images, labels).withColumn("id", F.monotonically_increasing_id())
    joined = left.join(left.select("id", "label"), "id")

    def refused() -> None:
        with pytest.raises(
            ConfigError, match=r"^label_column 'label': the DataFrame has 2 columns of that name"
        ):
            fit(joined, "mlp", strategy="average", run_dir=tmp_path / "run")

    _no_job_ran(spark, refused)
    assert not (tmp_path / "run").exists()


def test_a_pandas_dataframe_is_named_as_pandas_with_the_way_to_a_spark_one(
    spark: Any, tmp_path: Path
) -> None:
    # The default strategy said "use 'average' for a DataFrame" of a pandas one, and the others
    # "expected ... a Spark DataFrame, got DataFrame".
    import pandas as pd

    frame = pd.DataFrame({"features": [[0.0] * 4], "label": [0]})
    hint = r"got pandas\.core\.frame\.DataFrame \(a pandas DataFrame: .*spark\.createDataFrame\(df\)\)$"
    with pytest.raises(ConfigError, match=r"^data: expected a dataset name, .*" + hint):
        fit(frame, "mlp", run_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match=r"^data: expected a dataset name, .*" + hint):
        fit(frame, "mlp", strategy="average", workers=2, run_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match=r"got int$"):
        fit(3, "mlp", run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_bad_image_row_stops_an_allreduce_gang_without_a_restart(
    spark: Any, tmp_path: Path, caplog: Any
) -> None:
    # The gang's tasks fail on a row they cannot decode: the same rows fail the same way after a
    # restart, so the run stops at once (it restarted three times before saying so).
    blobs, labels = _blobs_with(_png(_images(1)[0][0])[:60], at=17)
    df = _png_frame(spark, labels, labels, blobs).coalesce(1)
    with (
        caplog.at_level(logging.WARNING, logger="deepspark.training"),
        pytest.raises(RunError, match=r"^the all-reduce gang failed: .*row key 17 .*cannot decode image"),
    ):
        fit(df, "mlp", strategy="allreduce", workers=2, config={**SGD, "epochs": 1}, run_dir=tmp_path / "run")
    assert not [r for r in caplog.records if "restarting" in r.getMessage()]


@pytest.mark.parametrize("strategy", ["average", "async", "allreduce"])
def test_rows_that_change_between_the_count_and_training_stop_the_run(
    spark: Any, tmp_path: Path, monkeypatch: Any, strategy: str
) -> None:
    # A DataFrame whose rows change between reads (a UDF drawing random numbers, a growing source): the
    # count before training saw 32 rows, the workers read 30, their epochs and step budget made for 32.
    import dataclasses

    from deepspark.training import _fit

    counted = _fit.describe_frame

    def miscounted(df: Any, **kwargs: Any) -> Any:
        layout = counted(df, **kwargs)
        return (
            dataclasses.replace(layout, rows=layout.rows + 2)
            if kwargs.get("argument", "data") == "data"
            else layout
        )

    monkeypatch.setattr(_fit, "describe_frame", miscounted)
    images, labels = _images(30)
    with pytest.raises(
        DeepsparkError, match=r"read 30 rows where the DataFrame counted 32: .*localCheckpoint"
    ):
        fit(
            _png_frame(spark, images, labels),
            "mlp",
            strategy=strategy,
            workers=2,
            config={**SGD, "epochs": 1},
            run_dir=tmp_path / "run",
        )


@pytest.mark.parametrize("strategy", ["average", "allreduce"])
def test_rows_that_change_at_the_same_count_stop_the_run_before_any_step(
    spark: Any, tmp_path: Path, strategy: str
) -> None:
    # A label drawn at random on every read: the count before training and the workers' reads agree on
    # 30 rows, but not on what the rows hold. The workers trained on labels nobody counted; now the
    # partitions' digests, summed, must be the count's.
    import random

    from pyspark.sql import functions as F

    images, labels = _images(30)
    drawn = F.udf(lambda _: random.randrange(CLASSES), "int").asNondeterministic()
    df = _png_frame(spark, images, labels).withColumn("label", drawn("label"))
    with pytest.raises(
        DeepsparkError, match=r"read other rows than the DataFrame counted \(30 rows\): .*localCheckpoint"
    ):
        fit(
            df,
            "mlp",
            strategy=strategy,
            workers=2,
            num_classes=CLASSES,
            config={**SGD, "epochs": 1},
            run_dir=tmp_path / "run",
        )
    assert not (tmp_path / "run" / "history.csv").exists()


def test_partition_digests_add_up_to_the_frames(spark: Any) -> None:
    from deepspark.training.frame import describe_frame, keyed_rows, read_partition, sum_digests

    images, labels = _images(30)
    df = _png_frame(spark, images, labels).repartition(3)
    layout = describe_frame(
        df, feature_column="image", label_column="label", input_shape=None, num_classes=None
    )
    table = dataframe_to_arrow(keyed_rows(df, layout))
    parts = [read_partition(table.slice(at, 10).to_batches(), layout) for at in (0, 10, 20)]
    assert [len(p.labels) for p in parts] == [10, 10, 10]
    assert len({p.digest for p in parts}) == 3
    assert sum_digests(p.digest for p in parts) == layout.digest
    other = read_partition(table.slice(0, 10).to_batches(), layout)
    assert other.digest == parts[0].digest  # the same rows, the same digest
    relabelled = describe_frame(
        _png_frame(spark, images, (labels + 1) % CLASSES),
        feature_column="image",
        label_column="label",
        input_shape=None,
        num_classes=None,
    )
    assert relabelled.rows == layout.rows and relabelled.digest != layout.digest


def _two_workers(strategy: str) -> dict[str, Any]:
    """fit's options for two workers of ``strategy``, batches of 4, 3 epochs (``average``: rounds of a step)."""
    options: dict[str, Any] = {
        "strategy": strategy,
        "workers": 2,
        "config": {**SGD, "batch_size": 4, "epochs": 3},
    }
    if strategy == "average":
        options["average"] = {"tau": 1}
    return options


@pytest.mark.parametrize("strategy", ["average", "async"])
def test_a_resume_on_rows_split_otherwise_stops_instead_of_training_past_them(
    spark: Any, tmp_path: Path, driver_crash: Any, strategy: str
) -> None:
    # The same 30 rows, read from one input partition instead of two: their row keys, so the rows each
    # worker gets, differ. Each worker's data position covers the rows it had: it would have walked a
    # permutation of that many rows over a partition of another size.
    images, labels = _images(30)
    df = _png_frame(spark, images, labels).repartition(2)
    options = _two_workers(strategy)
    with pytest.raises(DeepsparkError, match="driver crash"):
        fit(df, "mlp", **options, run_dir=tmp_path / "run", checkpoint_seconds=0, on_round=driver_crash(1))
    with pytest.raises(DeepsparkError, match=r"worker \d read \d+ rows where its data position covers \d+: "):
        fit(df.coalesce(1), run_dir=tmp_path / "run", resume=True)
    assert fit(df, run_dir=tmp_path / "run", resume=True).history  # the same split resumes


def _worker_ids(df: Any, workers: int) -> list[set[int]]:
    """The ``id`` of the rows each worker reads of ``df`` (made by ``to_dataframe``): fit keys the rows with
    ``monotonically_increasing_id`` and hash-partitions them by that key."""
    from pyspark.sql import functions as F

    keyed = df.select("id", F.monotonically_increasing_id().alias("key")).repartition(workers, "key")
    ids: list[set[int]] = [set() for _ in range(workers)]
    for row in keyed.select(F.spark_partition_id().alias("worker"), "id").collect():
        ids[row.worker].add(int(row.id))
    return ids


@pytest.mark.parametrize("strategy", ["average", "async", "allreduce"])
def test_a_resume_on_as_many_rows_per_worker_split_otherwise_stops(
    spark: Any, tmp_path: Path, driver_crash: Any, strategy: str
) -> None:
    # The same 40 rows in 4 input partitions, then in 8: other row keys, so each worker gets other rows,
    # but as many as before (18 and 22). Only the counts were compared with the checkpoint's data positions:
    # the resumed workers walked positions made for other rows, training some rows of the epoch in
    # progress twice and others never, without a word.
    from deepspark.data import to_dataframe

    images, labels = _images(40)
    before, after = (to_dataframe(spark, images, labels, num_partitions=p) for p in (4, 8))
    split_before, split_after = _worker_ids(before, 2), _worker_ids(after, 2)
    assert [len(ids) for ids in split_before] == [len(ids) for ids in split_after]
    assert split_before != split_after
    options = _two_workers(strategy)
    with pytest.raises(DeepsparkError, match="driver crash"):
        fit(
            before, "mlp", **options, run_dir=tmp_path / "run", checkpoint_seconds=0, on_round=driver_crash(1)
        )
    with pytest.raises(
        DeepsparkError,
        match=r"(worker|gang rank) \d's task read other rows than its first task did \((18|22) rows\)",
    ):
        fit(after, run_dir=tmp_path / "run", resume=True)
    assert fit(before, run_dir=tmp_path / "run", resume=True).history  # the same split resumes


# ------------------------------------------------------------------------------- rows over memory
@pytest.mark.parametrize("kind", ["bytes", "array"])
def test_rows_over_the_memory_budget_are_read_back_from_a_file_as_they_were_held(
    spark: Any, tmp_path: Path, kind: str
) -> None:
    from deepspark.training.frame import RowFile, describe_frame, keyed_rows, read_partition
    from deepspark.training.loop import Examples

    images, labels = _images(37)
    rows = (
        [(i.tobytes(), int(y)) for i, y in zip(images, labels, strict=True)]
        if kind == "bytes"
        else [(i.reshape(-1).astype(float).tolist(), int(y)) for i, y in zip(images, labels, strict=True)]
    )
    schema = "image binary, label int" if kind == "bytes" else "image array<float>, label int"
    # Three input partitions read in reverse: rows arrive out of key order, as after a shuffle.
    df = spark.createDataFrame(rows, schema).repartition(3)
    layout = describe_frame(
        df, feature_column="image", label_column="label", input_shape=(1, SIZE, SIZE), num_classes=None
    )
    table = dataframe_to_arrow(keyed_rows(df, layout))
    batches = table.to_batches(max_chunksize=5)[::-1]
    held = read_partition(batches, layout)
    assert isinstance(held.features, np.ndarray)
    row = held.features[0].nbytes
    index = torch.tensor([36, 0, 5, 5, 17, 30])
    # memory 0: every row in the file; 12 rows' worth: the rows held so far go to the file with the rest.
    for memory in (0, 12 * row):
        spill_dir = tmp_path / f"spill-{memory}"
        spill_dir.mkdir()
        part = read_partition(batches, layout, memory=memory, spill_dir=str(spill_dir))
        assert isinstance(part.features, RowFile) and len(part.features) == 37
        assert part.features.nbytes == 37 * row
        assert list(spill_dir.iterdir()) == []  # unlinked: freed when the worker closes it or dies
        assert np.array_equal(part.labels, held.labels) and part.digest == held.digest
        assert np.array_equal(part.features[index].numpy(), held.features[index.numpy()])
        assert np.array_equal(part.features[torch.arange(37)].numpy(), held.features)
        preprocess = None if kind == "array" else _preprocess()
        assert torch.equal(
            Examples.of(part.features, preprocess)[index], Examples.of(held.features, preprocess)[index]
        )
    # Under the budget, nothing goes to a file.
    assert isinstance(read_partition(batches, layout, memory=37 * row).features, np.ndarray)


def _preprocess() -> Any:
    from deepspark.models import Preprocess

    return Preprocess(input_shape=(1, SIZE, SIZE), mean=(0.3,), std=(0.2,))


@pytest.mark.parametrize("strategy", ["average", "allreduce"])
def test_workers_over_their_memory_budget_train_exactly_as_in_memory(
    spark: Any, tmp_path: Path, strategy: str, caplog: pytest.LogCaptureFixture
) -> None:
    images, labels = _images(60)
    df = spark.createDataFrame(
        [(i.tobytes(), int(y)) for i, y in zip(images, labels, strict=True)], "image binary, label int"
    )

    def run(name: str, **kwargs: Any) -> list[str]:
        result = fit(
            df,
            "mlp",
            strategy=strategy,
            workers=2,
            input_shape=(1, SIZE, SIZE),
            config={**SGD, "batch_size": 8, "epochs": 2, "seed": 3},
            average={"tau": 2} if strategy == "average" else None,
            run_dir=tmp_path / name,
            **kwargs,
        )
        return [r["train_loss"] for r in _history(result.run_dir)]

    held = run("held")
    with caplog.at_level(logging.INFO, logger="deepspark"):
        spilled = run("spilled", worker_memory=0)
    assert spilled == held  # the same steps on the same values, read from the file
    assert len(held) >= 4
    who = "worker" if strategy == "average" else "gang rank"
    assert sum(f"{who} " in m and "keeps its" in m for m in caplog.messages) == 2


def test_worker_memory_is_a_size_and_only_for_spark_workers(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"worker_memory: expected a size in bytes, e\.g\. 512m or 4g, got '4x'"
    ):
        fit("mnist", strategy="average", workers=2, worker_memory="4x", run_dir=tmp_path / "a")
    with pytest.raises(ConfigError, match="worker_memory: bounds the rows each worker"):
        fit("mnist", worker_memory="1g", run_dir=tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_tasks_memory_budget() -> None:
    from deepspark.spark import task_memory

    assert task_memory(5, {"SPARK_LOCAL_DIRS": "/a,/b"}) == (5, "/a")
    assert task_memory(None, {"PYSPARK_EXECUTOR_MEMORY_MB": "512"}) == (256 << 20, None)
    budget, folder = task_memory(None, {})
    assert folder is None and (budget is None or budget > 0)
