"""Training data as a Spark DataFrame: checked on the driver, read as tensors inside each task.

The driver checks the columns (a feature column of raw image bytes, encoded image files or numeric
arrays, an integral label column), counts rows and classes in one small job, and repartitions the rows
to the worker count by a hash of a stable row key, so every partition gets a fair sample of classes and
a retried task reads the same rows. Inside the task, :func:`read_partition` streams the partition's
Arrow batches into one array, sorted by the key so the order (and hence training) does not depend on
shuffle timing.

Encoded images (PNG, JPEG, …, e.g. the ``content`` of ``spark.read.format("binaryFile")``) are told from
raw pixels by the file signature of the column's first rows, read on the driver, and decoded inside the
task. They must have the model's input size (no silent resizing while training); a row that does not
decode stops the run with a :class:`DatasetError` naming its row key, rather than being skipped, since
skipping would silently change the data and every worker's step budget.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from deepspark.data.record import channels_last_hint
from deepspark.errors import ConfigError, DatasetError
from deepspark.spark import column
from deepspark.validation import check_int

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

_T = TypeVar("_T")

__all__ = [
    "FEATURE",
    "KEY",
    "LABEL",
    "FrameLayout",
    "Partition",
    "RowFile",
    "count_disagrees",
    "describe_frame",
    "in_own_group",
    "keyed_rows",
    "read_partition",
    "row_hash",
    "rows_changed",
    "sum_digests",
]

KEY = "_deepspark_key"
FEATURE = "_deepspark_feature"  # the feature and label columns as the tasks read them (see keyed_rows)
LABEL = "_deepspark_label"
HASH = "_deepspark_hash"  # each row's row_hash, read with it: a partition's digest (read_partition)
FEATURE_KINDS = ("bytes", "image", "array")
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_MAX_INFERRED_CLASSES = 100_000  # more, and the class count must be given (num_classes)
_SAMPLE_ROWS = 16  # first rows read on the driver to tell encoded images from raw pixels


@dataclass(frozen=True)
class FrameLayout:
    """Which columns hold what, and how a feature value becomes an image of ``shape`` (C, H, W).

    ``kind`` is ``bytes`` (raw uint8 pixels, C order: scaled and normalised by the preprocess),
    ``image`` (encoded image files, decoded to uint8 pixels in the task, then like ``bytes``) or
    ``array`` (numbers already in model scale). Small and picklable: it travels in task closures.
    """

    feature_column: str
    label_column: str
    kind: str
    shape: tuple[int, int, int]
    rows: int
    num_classes: int
    digest: str = ""  # of every row's label and features, order aside (describe_frame): "" when not taken

    @property
    def pixels(self) -> bool:
        """Whether features come out as uint8 pixels, which the preprocess scales and normalises."""
        return self.kind != "array"


def _integral(dtype: Any) -> bool:
    from pyspark.sql import types as T

    return isinstance(dtype, T.ByteType | T.ShortType | T.IntegerType | T.LongType)


def describe_frame(
    df: DataFrame,
    *,
    feature_column: str,
    label_column: str,
    input_shape: Sequence[int] | None,
    num_classes: int | None,
    check_shape: Callable[[tuple[int, int, int]], None] | None = None,
    argument: str = "data",
) -> FrameLayout:
    """Check ``df``'s columns against the model's input and count its rows and classes (one small job;
    a binary column's first rows are read first, to tell encoded images from raw pixels).

    ``check_shape(shape)`` runs as soon as the input shape is known, before the counting job. Raises
    :class:`ConfigError` naming the column, what was expected and what was found, after ``argument`` (the
    parameter that gave ``df``) unless that is ``data``: the columns of ``test_data`` have the same names.
    """
    try:
        return _describe(
            df,
            feature_column=feature_column,
            label_column=label_column,
            input_shape=input_shape,
            num_classes=num_classes,
            check_shape=check_shape,
            argument=argument,
        )
    except ConfigError as exc:
        if argument == "data" or str(exc).startswith(f"{argument}: "):
            raise
        raise ConfigError(f"{argument}: {exc}") from None


def _describe(
    df: DataFrame,
    *,
    feature_column: str,
    label_column: str,
    input_shape: Sequence[int] | None,
    num_classes: int | None,
    check_shape: Callable[[tuple[int, int, int]], None] | None,
    argument: str,
) -> FrameLayout:
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    if num_classes is not None:
        check_int("num_classes", num_classes, minimum=2)
    if input_shape is not None:
        input_shape = _chw(input_shape)
    fields = {f.name: f for f in df.schema.fields}
    for role, name in (("feature_column", feature_column), ("label_column", label_column)):
        if name not in fields:
            raise ConfigError(f"{role}: expected a column of the DataFrame {sorted(fields)}, got {name!r}")
        same = sum(f.name == name for f in df.schema.fields)
        if same > 1:  # Spark's AnalysisException ("ambiguous reference") came out of the counting job
            raise ConfigError(
                f"{role} {name!r}: the DataFrame has {same} columns of that name (a join keeps both sides'); "
                "drop or rename all but one first"
            )
    label_type = fields[label_column].dataType
    if not _integral(label_type):
        raise ConfigError(
            f"label_column {label_column!r}: expected an integral type (int, long), got "
            f"{label_type.simpleString()}; cast it, e.g. df.withColumn({label_column!r}, "
            f"F.col({label_column!r}).cast('int'))"
        )
    feature = fields[feature_column]
    images: set[tuple[int, int, int]] = set()
    if isinstance(feature.dataType, T.BinaryType):
        # to_dataframe records the shape of the raw pixels it writes: those are never sniffed, since raw
        # pixels can start like an image file (two pixels of 66 and 77 read "BM", a BMP's signature).
        stored = feature.metadata.get("shape")
        if stored is not None and input_shape is not None and _chw(stored) != input_shape:
            # As many bytes, read in another shape: every image would train scrambled.
            raise ConfigError(
                f"feature_column {feature_column!r}: its pixels were written as images of shape {list(stored)} "
                f"(deepspark.data.to_dataframe records it), but the model's input is {list(input_shape)}; "
                "drop input_shape, or give that shape"
            )
        images = _sample_images(df, feature_column) if stored is None else set()
        kind = "image" if images else "bytes"
        shape_src = input_shape if input_shape is not None else (stored or _only(images, feature_column))
    elif isinstance(feature.dataType, T.ArrayType) and isinstance(
        feature.dataType.elementType, T.NumericType
    ):
        kind = "array"
        shape_src = input_shape
    else:
        raise ConfigError(
            f"feature_column {feature_column!r}: expected raw image bytes (binary) or an array of numbers, "
            f"got {feature.dataType.simpleString()}"
        )
    if shape_src is None:
        raise ConfigError(
            f"feature_column {feature_column!r} carries no image shape; pass input_shape=(C, H, W) "
            "(or build the DataFrame with deepspark.data.to_dataframe, which records it)"
        )
    shape = _chw(shape_src)
    if kind == "image":
        _check_image_sizes(images, shape, feature_column)
    if check_shape is not None:
        check_shape(shape)
    label, values = column(label_column), column(feature_column)
    hashed = row_hash(label, values)
    query = df.agg(
        F.count(F.lit(1)).alias("rows"),
        F.min(label).alias("low"),
        F.max(label).alias("high"),
        F.count(label).alias("labelled"),
        F.count(values).alias("featured"),
        F.sum(
            # Beyond float32's range is infinite too: the tasks read every array as float32. Compared
            # both ways, not through abs(): under ANSI mode (Spark 4's default) the abs of a tinyint's
            # -128, or of the smallest int or long, overflows and failed the job on data that trains.
            F.when(
                F.exists(
                    values, lambda v: v.isNull() | F.isnan(v) | (v > _FLOAT32_MAX) | (v < -_FLOAT32_MAX)
                ),
                1,
            )
            if kind == "array"
            else F.lit(0)
        ).alias("unfinite"),
        F.min(F.length(values) if kind != "array" else F.size(values)).alias("short"),
        F.max(F.length(values) if kind != "array" else F.size(values)).alias("long"),
        # What the rows hold, whatever their order or partitioning: a resume on other rows of the same
        # count is refused with it. Two sums of 32-bit halves, so no sum overflows a long.
        F.sum(hashed.bitwiseAND(F.lit(0xFFFFFFFF))).alias("digest_low"),
        F.sum(F.shiftrightunsigned(hashed, 32)).alias("digest_high"),
    )
    stats = in_own_group(df, query.first)
    assert stats is not None  # an aggregate always yields one row
    rows = int(stats["rows"])
    if rows == 0:
        raise ConfigError(f"{argument}: the DataFrame has no rows; give at least one example")
    if int(stats["labelled"]) != rows:
        raise ConfigError(f"label_column {label_column!r}: {rows - int(stats['labelled'])} null label(s)")
    if int(stats["featured"]) != rows:
        raise ConfigError(
            f"feature_column {feature_column!r}: {rows - int(stats['featured'])} null value(s); drop or "
            f"fill those rows first, e.g. df.dropna(subset=[{feature_column!r}])"
        )
    if int(stats["unfinite"] or 0):  # they would train as a diverging learning rate does, later
        raise ConfigError(
            f"feature_column {feature_column!r}: {int(stats['unfinite'])} row(s) hold NaN, infinite or null "
            f"numbers (or numbers beyond float32's +-{_FLOAT32_MAX:.4g}, which train as infinite); clean or "
            "drop them first"
        )
    want = math.prod(shape)
    for bound in ("short", "long") if kind != "image" else ():
        size = stats[bound]
        if size is None or int(size) != want:
            unit = "bytes" if kind == "bytes" else "values"
            raise ConfigError(
                f"feature_column {feature_column!r}: a value holds {size} {unit} but the model's input "
                f"{list(shape)} needs {want}; check input_shape or the column"
            )
    low, high = int(stats["low"]), int(stats["high"])
    if num_classes is None and high >= _MAX_INFERRED_CLASSES:
        # Labels are class indices: 10**6 next to 0 silently built a million-way output layer, and 2**40
        # failed allocating it. A label set that is not 0..C-1 has to be mapped, or C given.
        raise ConfigError(
            f"label_column {label_column!r}: labels are class indices 0..C-1 and the largest is {high}, "
            f"which would make {high + 1} classes; map the labels to indices first, or give num_classes "
            "if the model is to have that many outputs"
        )
    classes = num_classes if num_classes is not None else high + 1
    if low < 0 or high >= classes:
        raise ConfigError(
            f"label_column {label_column!r}: labels must lie in 0..{classes - 1}, found {low}..{high}"
        )
    if classes < 2:
        raise ConfigError(f"label_column {label_column!r}: found a single class ({high}); need at least 2")
    return FrameLayout(
        feature_column=feature_column,
        label_column=label_column,
        kind=kind,
        shape=shape,
        rows=rows,
        num_classes=classes,
        digest=_digest(int(stats["digest_high"]), int(stats["digest_low"])),
    )


def row_hash(label: Any, features: Any) -> Any:
    """A row's 64-bit hash (a Spark column): the counting job sums them into the frame's digest, and each
    task reads them with its rows (:data:`HASH`) to sum its partition's."""
    from pyspark.sql import functions as F

    return F.xxhash64(label, features)


def _digest(high: int, low: int) -> str:
    return f"xxhash64-sums:{high}:{low}"


def sum_digests(digests: Iterable[str]) -> str:
    """The digest of the union of disjoint row sets, from each set's (the frame's from its partitions')."""
    high = low = 0
    for digest in digests:
        _, h, lo = digest.split(":")
        high, low = high + int(h), low + int(lo)
    return _digest(high, low)


def in_own_group(df: DataFrame, action: Callable[[], _T]) -> _T:
    """``action``'s result: its jobs on ``df`` (an action, or the shuffles adaptive execution runs when a
    plan becomes an RDD) run in a job group of their own (:func:`deepspark.spark.job_result`), so that
    Ctrl-C cancels them, and the caller's thread keeps its job group and local properties (in the caller's
    thread, pyspark's Ctrl-C handler broke its connection to the JVM, which lost them, and the job ran on)."""
    from deepspark.spark import job_group, job_result

    return job_result(df.sparkSession.sparkContext, action, group=job_group("deepspark-train-data"))


def _sample_images(df: DataFrame, name: str) -> set[tuple[int, int, int]]:
    """The ``(C, H, W)`` of the encoded images among the column's first rows; empty for raw pixels."""
    from deepspark.data.images import RowError, image_shapes, is_encoded_image

    first = df.select(column(name)).where(column(name).isNotNull()).limit(_SAMPLE_ROWS)
    values = [bytes(r[0]) for r in in_own_group(df, first.collect)]
    encoded = [is_encoded_image(v) for v in values]
    if not any(encoded):
        return set()
    if not all(encoded):
        raise ConfigError(
            f"feature_column {name!r}: its first rows mix encoded image files with other bytes "
            f"({sum(encoded)} of {len(values)} start like an image file); expected one or the other"
        )
    try:
        return image_shapes(values)
    except RowError as exc:
        raise ConfigError(f"feature_column {name!r}: one of its first rows is not an image: {exc}") from None


def _only(images: set[tuple[int, int, int]], column: str) -> tuple[int, int, int] | None:
    """The one shape the sampled images share (the model's input when no input_shape is given)."""
    if not images:
        return None
    if len(images) > 1:
        sizes = sorted({f"{w}x{h}" for _, h, w in images})
        if len(sizes) == 1:  # one size: grey and colour images, which only the channel count tells apart
            _, height, width = next(iter(images))
            raise ConfigError(
                f"feature_column {column!r}: its first images mix grey and colour ones (all {sizes[0]} "
                f"pixels); pass input_shape=(3, {height}, {width}) to train on colour (grey images are "
                f"converted, as predict converts them) or (1, {height}, {width}) to train on grey"
            )
        raise ConfigError(
            f"feature_column {column!r}: its first images have different sizes ({', '.join(sizes)} pixels); "
            "training takes every image at the model's input size: resize them, or pass input_shape and "
            "give images of that size"
        )
    return next(iter(images))


def _check_image_sizes(images: set[tuple[int, int, int]], shape: tuple[int, int, int], column: str) -> None:
    wrong = sorted(f"{w}x{h}" for _, h, w in images if (h, w) != shape[1:])
    if wrong:
        raise ConfigError(
            f"feature_column {column!r}: images of {', '.join(wrong)} pixels among its first rows, but the "
            f"model's input is {shape[2]}x{shape[1]} (width x height); resize them first"
        )


def _chw(shape: Any) -> tuple[int, int, int]:
    """``(C, H, W)`` from ``(C, H, W)`` or ``(H, W)`` of positive ints; anything else is refused, not
    converted (``int(4.7)`` would train on another shape than the one given)."""
    try:
        dims = () if isinstance(shape, str | bytes) else tuple(shape)
    except TypeError:
        dims = ()
    if len(dims) == 2:
        dims = (1, *dims)
    if len(dims) != 3 or any(
        isinstance(d, bool) or not isinstance(d, int | np.integer) or d < 1 for d in dims
    ):
        raise ConfigError(f"input_shape: expected (C, H, W) or (H, W) of positive ints, got {shape!r}")
    hint = channels_last_hint(dims)
    if hint is not None:
        raise ConfigError(f"input_shape: {hint}")
    return (int(dims[0]), int(dims[1]), int(dims[2]))


def keyed_rows(df: DataFrame, layout: FrameLayout) -> DataFrame:
    """``df``'s feature and label columns as :data:`FEATURE` and :data:`LABEL`, with a stable row key
    (:data:`KEY`): the rows :func:`read_partition` reads.

    A user's column names may hold dots or backticks, which pyspark's ``mapInArrow`` reads as column
    paths (and fails on), or be :data:`KEY` itself: under deepspark's own names they are only data.
    """
    from pyspark.sql import functions as F

    feature, label = column(layout.feature_column), column(layout.label_column)
    return df.select(
        feature.alias(FEATURE),
        label.alias(LABEL),
        F.monotonically_increasing_id().alias(KEY),
        row_hash(label, feature).alias(HASH),
    )


class RowFile:
    """A partition's rows in an anonymous file (unlinked: the system frees it when the task's worker
    closes it or dies), read back a batch at a time: what a worker keeps when its rows exceed its memory
    budget. Row ``i`` in key order is row ``order[i]`` of the file, which holds them as they arrived.

    Indexed by a 1-D array of row numbers (a batch's, from :class:`~deepspark.training.loop.DataCursor`),
    it gives those rows as a new CPU tensor; the operating system's page cache keeps what memory allows.
    """

    def __init__(self, file: Any, shape: tuple[int, ...], dtype: np.dtype, order: np.ndarray) -> None:
        self._file = file
        self.shape = shape
        self.dtype = np.dtype(dtype)
        self.order = order
        self.row_bytes = math.prod(shape) * self.dtype.itemsize

    def __len__(self) -> int:
        return len(self.order)

    @property
    def nbytes(self) -> int:
        return len(self.order) * self.row_bytes

    def __getitem__(self, index: Any) -> Any:
        import torch

        rows = self.order[
            np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index, dtype=np.int64)
        ]
        out = np.empty((len(rows), *self.shape), dtype=self.dtype)
        flat = out.reshape(len(rows), -1).view(np.uint8)
        fd = self._file.fileno()
        for i in np.argsort(rows, kind="stable"):  # in file order
            got = os.preadv(fd, [flat[i]], int(rows[i]) * self.row_bytes)
            if got != self.row_bytes:
                raise DatasetError(f"the worker's file of rows ended early (row {int(rows[i])}: {got} bytes)")
        return torch.from_numpy(out)


@dataclass(frozen=True)
class Partition:
    """The rows one task read: features ``[n, C, H, W]`` (an array, or a :class:`RowFile` when they
    exceeded the task's memory budget) and int64 labels in key order, and their digest (what
    :func:`sum_digests` adds up to the frame's: a retried task must read the same)."""

    features: np.ndarray | RowFile
    labels: np.ndarray
    digest: str


def read_partition(
    batches: Iterable[Any], layout: FrameLayout, *, memory: int | None = None, spill_dir: str | None = None
) -> Partition:
    """A task's Arrow record batches (:data:`FEATURE`, :data:`LABEL`, :data:`KEY` and :data:`HASH`
    columns, as :func:`keyed_rows` selects them) → its :class:`Partition`.

    Features are uint8 for ``bytes`` and ``image`` columns and float32 for ``array`` columns. When they
    come to more than ``memory`` bytes (None: no bound), all of them go to a :class:`RowFile` in
    ``spill_dir`` instead, a batch at a time as they arrive. Raises :class:`DatasetError` naming the row
    key of an image that does not decode to the input's shape.
    """
    from deepspark.data.frames import decode_binary

    features: list[np.ndarray] = []
    held = 0
    spill: Any = None
    labels: list[np.ndarray] = []
    keys: list[np.ndarray] = []
    high = low = 0
    width = math.prod(layout.shape)
    try:
        for batch in batches:
            if batch.num_rows == 0:
                continue
            column = batch.column(FEATURE)
            if column.null_count:
                raise DatasetError(
                    f"feature_column {layout.feature_column!r}: {column.null_count} null value(s)"
                )
            if layout.kind == "bytes":
                decoded = decode_binary(column, layout.shape, layout.feature_column)
            elif layout.kind == "image":
                decoded = _decode_images(column, batch.column(KEY), layout)
            else:
                values = np.asarray(column.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
                if values.size != width * batch.num_rows:
                    raise DatasetError(
                        f"feature_column {layout.feature_column!r}: arrays must hold {width} values each"
                    )
                decoded = values.reshape(-1, *layout.shape)
            if spill is None and memory is not None and held + decoded.nbytes > memory:
                # Kept open by the RowFile past this function (it is unlinked: closing it frees it).
                spill = tempfile.TemporaryFile(dir=spill_dir, prefix="deepspark-rows-")  # noqa: SIM115
                for earlier in features:
                    spill.write(np.ascontiguousarray(earlier).data)
                features = []
            if spill is not None:
                spill.write(np.ascontiguousarray(decoded).data)
            else:
                features.append(decoded)
                held += decoded.nbytes
            labels.append(np.asarray(batch.column(LABEL).to_numpy(), dtype=np.int64))
            keys.append(np.asarray(batch.column(KEY).to_numpy(), dtype=np.int64))
            hashes = np.asarray(batch.column(HASH).to_numpy(), dtype=np.int64).view(np.uint64)
            high += int((hashes >> np.uint64(32)).sum(dtype=np.uint64))  # < 2**32 rows of < 2**32 each
            low += int((hashes & np.uint64(0xFFFFFFFF)).sum(dtype=np.uint64))
    except BaseException:
        if spill is not None:
            spill.close()
        raise
    dtype = np.uint8 if layout.pixels else np.float32
    if not labels:
        return Partition(
            np.zeros((0, *layout.shape), dtype=dtype), np.zeros(0, dtype=np.int64), _digest(0, 0)
        )
    y = np.concatenate(labels)
    order = np.argsort(np.concatenate(keys), kind="stable")
    if spill is not None:
        spill.flush()
        return Partition(RowFile(spill, layout.shape, np.dtype(dtype), order), y[order], _digest(high, low))
    # Each batch's rows straight to their places in key order, each batch let go once placed: the
    # partition is held about once while it is assembled (a concatenation, then its reordered copy,
    # held it three times).
    x = np.empty((len(y), *layout.shape), dtype=dtype)
    place = np.empty(len(order), dtype=np.int64)
    place[order] = np.arange(len(order))
    at = 0
    features.reverse()
    while features:
        chunk = features.pop()
        x[place[at : at + len(chunk)]] = chunk
        at += len(chunk)
    return Partition(x, y[order], _digest(high, low))


def _decode_images(column: Any, keys: Any, layout: FrameLayout) -> np.ndarray:
    from deepspark.data.images import RowError, decode_image

    out = np.empty((len(column), *layout.shape), dtype=np.uint8)
    for i, (value, key) in enumerate(zip(column.to_pylist(), keys.to_pylist(), strict=True)):
        try:
            out[i] = decode_image(value, layout.shape, resize=False)
        except RowError as exc:
            raise DatasetError(
                f"feature_column {layout.feature_column!r}: the image in {describe_key(key)} cannot be "
                f"used: {exc}"
            ) from None
    return out


def describe_key(key: int) -> str:
    """A row key of a DataFrame (``monotonically_increasing_id``: input partition << 33 | row) in words."""
    return f"row key {key} (row {key & ((1 << 33) - 1)} of the DataFrame's partition {key >> 33})"


def count_disagrees(
    rows_read: Mapping[int, int], digests_read: Mapping[int, str], *, rows: int, digest: str, who: str
) -> str | None:
    """Once every worker has read its partition (``rows_read``, ``rows`` of ``digest`` counted: "" when
    the count took none), what ``who`` read that the count disagrees with: the number of rows, or what
    they hold (``digests_read``: of the rows each worker's first task read); else None."""
    read = sum(rows_read.values())
    if read != rows:
        return f"{who} read {read} rows where the DataFrame counted {rows}"
    if digest and sum_digests(digests_read.values()) != digest:
        return f"{who} read other rows than the DataFrame counted ({read} rows)"
    return None


def rows_changed(what: str) -> DatasetError:
    """The error for training rows that differ between two reads of the DataFrame: ``what`` says which
    reads disagreed. Training needs the same rows in every read (the count, each worker's task, a
    resubmitted one, a resume): a worker's data position covers the rows it read first."""
    return DatasetError(
        f"{what}: the training DataFrame's rows change between reads (a UDF that draws random numbers, "
        "a source being appended to) or, on a resume, are split into other input partitions; pin it "
        "first, e.g. df = df.localCheckpoint()"
    )
