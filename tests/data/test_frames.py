"""Images to Spark DataFrames and back, through Arrow, on the shared local[2] session."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from deepspark.data import image_shape, iter_batches, to_dataframe, to_numpy
from deepspark.errors import ConfigError, DatasetError


def _images(n: int, shape: tuple[int, ...] = (4, 5)) -> np.ndarray:
    return np.random.default_rng(n).integers(0, 256, (n, *shape), dtype=np.uint8)


@pytest.mark.parametrize("shape", [(4, 5), (3, 4, 5)], ids=["grey", "chw"])
def test_round_trip_keeps_images_labels_and_shape(spark: Any, shape: tuple[int, ...]) -> None:
    images = _images(37, shape)
    labels = np.arange(37) % 7
    df = to_dataframe(spark, images, labels, num_partitions=3)
    assert df.rdd.getNumPartitions() == 3
    assert dict(df.dtypes) == {"id": "bigint", "image": "binary", "label": "int"}
    assert image_shape(df) == shape
    np.testing.assert_array_equal(to_numpy(df), images)
    rows = df.orderBy("id").select("label").toPandas()["label"].to_numpy()
    np.testing.assert_array_equal(rows, labels)
    # Row 5's bytes are exactly image 5 in C order.
    row = df.where("id = 5").select("image").first()
    assert bytes(row["image"]) == images[5].tobytes()


def test_iter_batches_rebatches_across_uneven_arrow_batches(spark: Any) -> None:
    images = _images(23)
    df = to_dataframe(spark, images, image_column="pixels", label_column="y")
    chunks = [df.toPandas().iloc[a:b] for a, b in ((0, 3), (3, 3), (3, 10), (10, 11), (11, 23))]
    batches = list(iter_batches(iter(chunks), shape=(4, 5), batch_size=4, image_column="pixels"))
    assert [len(b) for b in batches] == [4, 4, 4, 4, 4, 3]
    np.testing.assert_array_equal(np.concatenate(batches), images)
    assert all(b.flags.writeable and b.flags.c_contiguous for b in batches)

    def in_tasks(it: Any) -> Any:
        for batch in iter_batches(it, shape=(4, 5), batch_size=5, image_column="pixels"):
            yield pd.DataFrame({"n": [len(batch)], "total": [int(batch.sum(dtype=np.int64))]})

    # Inside mapInPandas with tiny Arrow batches: each partition yields full batches then a remainder.
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "3")
    try:
        out = df.repartition(1).mapInPandas(in_tasks, "n long, total long").toPandas()
    finally:
        spark.conf.unset("spark.sql.execution.arrow.maxRecordsPerBatch")
    assert out["n"].tolist() == [5, 5, 5, 5, 3]
    assert out["total"].sum() == int(images.sum(dtype=np.int64))


def test_iter_batches_accepts_arrow_and_single_frames() -> None:
    images = _images(10, (2, 3))
    table = pa.table({"image": [img.tobytes() for img in images]})
    sliced = [table.slice(0, 4).to_batches()[0], table.slice(4, 6).to_batches()[0]]
    out = list(iter_batches(sliced, shape=(2, 3), batch_size=3))
    assert [len(b) for b in out] == [3, 3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(out), images)
    single = list(iter_batches(table.to_pandas(), shape=[2, 3], batch_size=100))
    assert len(single) == 1
    np.testing.assert_array_equal(single[0], images)


def test_wrong_sizes_and_parameters_are_reported() -> None:
    frame = pd.DataFrame({"image": [bytes(6), bytes(5)]})
    with pytest.raises(DatasetError, match="holds 5 bytes but shape \\[2, 3\\] needs 6"):
        list(iter_batches(frame, shape=(2, 3), batch_size=2))
    with pytest.raises(DatasetError, match="holds 5 bytes"):
        list(iter_batches(pa.Table.from_pandas(frame), shape=(2, 3), batch_size=2))
    with pytest.raises(ConfigError, match="batch_size: expected an integer >= 1, got 0"):
        list(iter_batches(frame, shape=(2, 3), batch_size=0))
    with pytest.raises(
        ConfigError, match="shape: expected a non-empty sequence of positive ints, got \\(\\)"
    ):
        list(iter_batches(frame, shape=(), batch_size=1))


def test_to_dataframe_validates(spark: Any) -> None:
    with pytest.raises(ConfigError, match="uint8"):
        to_dataframe(spark, np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(ConfigError, match=r"of at least one pixel each; got uint8 \(2, 0, 3\)"):
        to_dataframe(spark, np.zeros((2, 0, 3), dtype=np.uint8))  # was a pyarrow error: no rows for 2 ids
    with pytest.raises(ConfigError, match="one label per image"):
        to_dataframe(spark, _images(3), np.zeros(2, dtype=np.int64))
    with pytest.raises(ConfigError, match="num_partitions"):
        to_dataframe(spark, _images(3), num_partitions=0)
    # [N, H, W, C] is refused: its recorded shape made fit read H channels of W x C pixels.
    with pytest.raises(ConfigError, match=r"to_dataframe: images of shape \[6, 5, 3\] look channels-last"):
        to_dataframe(spark, _images(3, (6, 5, 3)))


def test_rebatch_keeps_every_column_and_the_row_order() -> None:
    from deepspark.data.frames import rebatch

    table = pa.table({"id": np.arange(11), "name": [f"r{i}" for i in range(11)]})
    parts = [table.slice(0, 3).to_batches()[0], table.slice(3, 0), table.slice(3, 5), table.slice(8, 3)]
    out = list(rebatch(iter(parts), 4))
    assert [t.num_rows for t in out] == [4, 4, 3]
    joined = pa.concat_tables(out)
    assert joined.column("id").to_pylist() == list(range(11))
    assert joined.column("name").to_pylist() == [f"r{i}" for i in range(11)]
    assert [t.num_rows for t in rebatch(iter(parts), 11)] == [11]
    assert list(rebatch(iter([]), 4)) == []
    with pytest.raises(ConfigError, match="batch_size: expected an integer >= 1, got 0"):
        list(rebatch(iter(parts), 0))
