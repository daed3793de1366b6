"""Moving image arrays into Spark DataFrames and back, through Arrow.

An image travels as one ``BinaryType`` value holding its raw uint8 bytes in C order; the shape
is stored once, in the image column's metadata (``{"shape": [...]}``), not per row. Both
directions work on whole buffers: the DataFrame is built from one Arrow table whose binary
column views the image array without copying, and the way back joins the binary values and
reads them with a single ``np.frombuffer``. Per-row Python objects would make 70 000 MNIST
images take tens of seconds instead of about one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from deepspark._compat import arrow_to_dataframe, dataframe_to_arrow
from deepspark.data.record import channels_last_hint
from deepspark.errors import ConfigError, DatasetError
from deepspark.validation import check_choice, check_positive_int, fail

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa
    from pyspark.sql import DataFrame, SparkSession

__all__ = ["decode_binary", "image_shape", "iter_batches", "rebatch", "to_dataframe", "to_numpy"]

# Arrow's binary type addresses its data with int32 offsets: keep each chunk well below 2 GiB.
_MAX_CHUNK_BYTES = 1 << 30


def _binary_column(flat: np.ndarray, row_bytes: int) -> pa.ChunkedArray:
    """A binary Arrow column whose values are consecutive ``row_bytes`` slices of ``flat`` (no copy)."""
    import pyarrow as pa

    n = len(flat) // row_bytes if row_bytes else 0
    rows_per_chunk = max(1, _MAX_CHUNK_BYTES // max(row_bytes, 1))
    chunks = []
    for start in range(0, n, rows_per_chunk):
        stop = min(n, start + rows_per_chunk)
        offsets = np.arange(stop - start + 1, dtype=np.int32) * np.int32(row_bytes)
        data = flat[start * row_bytes : stop * row_bytes]
        chunks.append(
            pa.Array.from_buffers(
                pa.binary(), stop - start, [None, pa.py_buffer(offsets), pa.py_buffer(data)]
            )
        )
    return pa.chunked_array(chunks, type=pa.binary())


def to_dataframe(
    spark: SparkSession,
    images: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    num_partitions: int | None = None,
    image_column: str = "image",
    label_column: str = "label",
) -> DataFrame:
    """A DataFrame with ``id`` (long, the row index), the image bytes and, given labels, ``label`` (int).

    ``images`` is uint8 ``[N, ...]`` (e.g. ``[N,H,W]`` or ``[N,C,H,W]``); the per-image shape is
    stored in the image column's metadata (see :func:`image_shape`). With ``num_partitions`` the
    rows are range-partitioned by ``id``, so each partition holds a contiguous run of images.
    """
    import pyarrow as pa

    arr = np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim < 2 or 0 in arr.shape[1:]:
        raise ConfigError(
            f"to_dataframe: images must be a uint8 array [N, ...] of at least one pixel each; got {arr.dtype} "
            f"{arr.shape}"
        )
    hint = channels_last_hint(arr.shape[1:])
    if hint is not None:
        raise ConfigError(f"to_dataframe: {hint}")
    if num_partitions is not None:
        check_positive_int("num_partitions", num_partitions)
    if not image_column or not label_column or image_column in ("id", label_column) or label_column == "id":
        raise ConfigError(
            f"to_dataframe: image_column and label_column must be distinct non-empty names other than 'id'; "
            f"got {image_column!r} and {label_column!r}"
        )
    n = len(arr)
    shape = [int(d) for d in arr.shape[1:]]
    row_bytes = math.prod(shape)
    columns: dict[str, Any] = {
        "id": pa.array(np.arange(n, dtype=np.int64)),
        image_column: _binary_column(np.ascontiguousarray(arr).reshape(-1), row_bytes),
    }
    if labels is not None:
        lab = np.asarray(labels)
        if lab.ndim != 1 or len(lab) != n or lab.dtype.kind not in "iu":
            raise ConfigError(
                f"to_dataframe: labels must be a 1-D integer array with one label per image ({n}); "
                f"got {lab.dtype} {lab.shape}"
            )
        if len(lab) and (lab.min() < np.iinfo(np.int32).min or lab.max() > np.iinfo(np.int32).max):
            raise ConfigError("to_dataframe: labels must fit in a 32-bit int")
        columns[label_column] = pa.array(lab.astype(np.int32))
    table = pa.table(columns)
    df = arrow_to_dataframe(spark, table)
    df = df.withMetadata(image_column, {"shape": shape})
    if num_partitions is not None:
        df = df.repartitionByRange(num_partitions, "id")
    return df


def image_shape(df: DataFrame, image_column: str = "image") -> tuple[int, ...]:
    """The per-image shape recorded by :func:`to_dataframe` in the image column's metadata."""
    check_choice("image_column", image_column, df.columns)
    shape = df.schema[image_column].metadata.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d > 0 for d in shape):
        raise ConfigError(
            f"column {image_column!r} carries no image shape in its metadata (it was not made by "
            f"to_dataframe); pass shape=(H, W) or (C, H, W)"
        )
    return tuple(shape)


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        dims = ()
    if not dims or any(d < 1 for d in dims) or any(isinstance(d, bool) for d in shape):
        raise fail("shape", "a non-empty sequence of positive ints", shape)
    return dims


def decode_binary(values: Any, dims: tuple[int, ...], column: str) -> np.ndarray:
    """One chunk of a binary column (Arrow array, chunked array or pandas Series) → uint8 [n, *dims]."""
    import pyarrow as pa

    row_bytes = math.prod(dims)
    if isinstance(values, pa.ChunkedArray):
        parts = [decode_binary(chunk, dims, column) for chunk in values.chunks]
        return np.concatenate(parts) if parts else np.zeros((0, *dims), dtype=np.uint8)
    if isinstance(values, pa.Array):
        if values.null_count:
            raise DatasetError(f"column {column!r}: {values.null_count} null image(s)")
        if pa.types.is_binary(values.type) or pa.types.is_large_binary(values.type):
            offset_type = np.int64 if pa.types.is_large_binary(values.type) else np.int32
            _, offsets_buf, data_buf = values.buffers()
            offsets = np.frombuffer(offsets_buf, dtype=offset_type)[
                values.offset : values.offset + len(values) + 1
            ]
            lengths = np.diff(offsets)
            if len(lengths) and (lengths != row_bytes).any():
                bad = int(lengths[lengths != row_bytes][0])
                raise DatasetError(
                    f"column {column!r}: an image holds {bad} bytes but shape {list(dims)} needs {row_bytes}"
                )
            if len(values) == 0:
                return np.zeros((0, *dims), dtype=np.uint8)
            data = np.frombuffer(data_buf, dtype=np.uint8)[int(offsets[0]) : int(offsets[-1])]
            return data.reshape(-1, *dims)
        values = values.to_pylist()
    items = list(values)
    if any(v is None for v in items):
        raise DatasetError(f"column {column!r}: null image(s)")
    lengths = np.fromiter(map(len, items), dtype=np.int64, count=len(items))
    if len(lengths) and (lengths != row_bytes).any():
        bad = int(lengths[lengths != row_bytes][0])
        raise DatasetError(
            f"column {column!r}: an image holds {bad} bytes but shape {list(dims)} needs {row_bytes}"
        )
    return np.frombuffer(b"".join(items), dtype=np.uint8).reshape(-1, *dims)


def _column(chunk: Any, column: str) -> Any:
    try:
        return chunk[column] if not hasattr(chunk, "column") else chunk.column(column)
    except KeyError as exc:
        raise ConfigError(f"image_column {column!r} is not among the incoming columns") from exc


def iter_batches(
    chunks: pd.DataFrame | pa.RecordBatch | pa.Table | Iterable[Any],
    *,
    shape: Sequence[int],
    batch_size: int,
    image_column: str = "image",
) -> Iterator[np.ndarray]:
    """Turn incoming chunks of rows into uint8 image batches of exactly ``batch_size`` rows.

    ``chunks`` is what ``mapInPandas``/``mapInArrow`` hand a function (an iterator of pandas
    DataFrames or Arrow record batches), or a single one. Arrow batch boundaries have nothing to
    do with the batch size a model wants, so rows are re-batched: every batch but the last has
    exactly ``batch_size`` rows. Yielded arrays are ``[n, *shape]`` and own their memory.
    """
    import pandas as pd
    import pyarrow as pa

    dims = _check_shape(shape)
    check_positive_int("batch_size", batch_size)
    source: Iterable[Any] = (
        [chunks] if isinstance(chunks, pd.DataFrame | pa.RecordBatch | pa.Table) else chunks
    )
    for table in rebatch((_image_table(chunk, image_column) for chunk in source), batch_size):
        images = decode_binary(table.column(image_column), dims, image_column)
        yield images if images.flags.owndata else np.array(images)


def _image_table(chunk: Any, column: str) -> pa.Table:
    """The image column of a pandas or Arrow chunk, alone, as an Arrow table (so every chunk has the
    same schema, whatever else the rows carry)."""
    import pyarrow as pa

    values = _column(chunk, column)
    if not isinstance(values, pa.Array | pa.ChunkedArray):
        try:
            values = pa.array(values, type=pa.binary(), from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise DatasetError(f"column {column!r}: expected binary image values: {exc}") from exc
    return pa.table({column: values})


def rebatch(batches: Iterable[pa.RecordBatch | pa.Table], batch_size: int) -> Iterator[pa.Table]:
    """Tables of exactly ``batch_size`` rows out of Arrow batches of any size; only the last is short.

    Spark's Arrow batch boundaries have nothing to do with the batch size a model wants. Rows keep their
    order and every column; slicing and joining do not copy the data. The one re-batcher: training reads
    images through :func:`iter_batches` and ``deepspark predict`` whole rows through this.
    """
    import pyarrow as pa

    check_positive_int("batch_size", batch_size)
    pending: list[pa.Table] = []
    count = 0
    for batch in batches:
        if batch.num_rows == 0:
            continue
        pending.append(pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch)
        count += batch.num_rows
        while count >= batch_size:
            table = pa.concat_tables(pending) if len(pending) > 1 else pending[0]
            yield table.slice(0, batch_size)
            rest = table.slice(batch_size)
            pending, count = ([rest] if rest.num_rows else []), rest.num_rows
    if count:
        yield pa.concat_tables(pending) if len(pending) > 1 else pending[0]


def to_numpy(df: DataFrame, shape: Sequence[int] | None = None, *, image_column: str = "image") -> np.ndarray:
    """Collect a DataFrame's images to the driver as uint8 ``[N, *shape]``, in ``id`` order when there is one.

    ``shape`` defaults to the one :func:`to_dataframe` stored in the column metadata. Collects
    through Arrow (:func:`deepspark._compat.dataframe_to_arrow`); only for data that fits in the driver's memory.
    """
    dims = image_shape(df, image_column) if shape is None else _check_shape(shape)
    has_id = "id" in df.columns and image_column != "id"
    table = dataframe_to_arrow(df.select(*(["id"] if has_id else []), image_column))
    images = decode_binary(table.column(image_column), dims, image_column)
    if has_id:
        ids = table.column("id").to_numpy()
        if len(ids) > 1 and (np.diff(ids) < 0).any():
            images = images[np.argsort(ids, kind="stable")]
    return np.array(images) if not images.flags.owndata else images
