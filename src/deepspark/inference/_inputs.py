"""What ``predict`` reads: a DataFrame, or a path resolved into one (image files, Parquet, IDX files,
URL lists), with the input column, its kind and the identity columns to carry through. Driver side."""

from __future__ import annotations

import glob as _glob
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deepspark.errors import ConfigError
from deepspark.inference.decode import InputKind
from deepspark.validation import data_kind

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

__all__ = [
    "GLOB_CHARS",
    "Input",
    "for_spark",
    "is_local",
    "local_path",
    "parquet_table_file",
    "resolve_input",
]

GLOB_CHARS = "*?[{"  # a path holding one of these is a glob (Hadoop's syntax, `**` ours)
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_PARQUET_MAGIC = b"PAR1"
# What a folder of images reads: the suffixes in any case (`x.Png` as `x.png`, as a single file's suffix is
# read), `*.{[pP][nN][gG],...}` in the syntax both Hadoop's glob filter and fnmatch read.
_IMAGE_GLOB = "*.{" + ",".join("".join(f"[{c}{c.upper()}]" for c in s[1:]) for s in _IMAGE_SUFFIXES) + "}"


@dataclass(frozen=True)
class Input:
    """A resolved input: the DataFrame, its input column and kind, and the columns to carry through; or,
    for local image files, their list (``files``, in ``file:`` form, sorted; ``dataframe`` is None):
    predict hands each task a slice of it (:func:`deepspark.inference._task.listed_files`)."""

    dataframe: DataFrame | None
    kind: InputKind
    column: str
    passthrough: tuple[str, ...]
    ours: bool  # we built the DataFrame (so we may choose its partitioning)
    rows_hint: int | None = None
    files: tuple[str, ...] | None = None


def is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def local_path(path: str) -> str:
    return path[len("file://") :] if path.startswith("file://") else path


def _binary_files(
    spark: SparkSession, path: str | list[str], *, pattern: str | None, recursive: bool
) -> Input:
    if all(is_local(p) for p in ([path] if isinstance(path, str) else path)):
        # Listed here and read by the tasks themselves (InputKind.FILE): Spark's binaryFile listed them
        # in 2.5 s of the JVM for 70,000 files (Python: 0.1 s), then its scan stat'ed each one again, read
        # it in the JVM and handed its bytes over through Arrow: a fifth of the cores' time on a folder
        # of small images. Zero-byte files and broken links are listed: error rows.
        paths = _local_listing(path, pattern=pattern, recursive=recursive)
        return Input(
            None, InputKind.FILE, "path", ("path",), ours=True, rows_hint=len(paths), files=tuple(paths)
        )
    reader = spark.read.format("binaryFile")
    if pattern:
        reader = reader.option("pathGlobFilter", pattern)
    if recursive:
        reader = reader.option("recursiveFileLookup", "true")
    # Spark's listing leaves out names starting with '_' (it takes them for metadata, like _SUCCESS):
    # such folders are read as inputs of their own (Spark lists what it is given), such files here.
    hidden_dirs, hidden_files = _hidden_from_spark(path, pattern=pattern, recursive=recursive)
    roots = [path] if isinstance(path, str) else path
    if not recursive:
        roots = _without_partitions(roots, pattern)
    df = reader.load([for_spark(root) for root in roots]).select("path", "content")
    files = _input_files(df)
    if hidden_dirs:
        extra = reader.load([for_spark(d) for d in hidden_dirs]).select("path", "content")
        files += _input_files(extra)
        df = df.unionByName(extra)
    empty = _empty_files(spark, files)
    if empty:
        # Spark's file scan skips zero-byte files, so binaryFile has no row for them: add one each
        # (empty content, which becomes an error row) so that every input file appears once.
        df = df.unionByName(spark.createDataFrame([(p, bytearray()) for p in empty], df.schema))
    if hidden_files:  # of the local ones among remote paths
        rows = [(f"file:{p}", _read_or_none(p)) for p in hidden_files]
        df = df.unionByName(spark.createDataFrame(rows, df.schema))
    return Input(
        df, InputKind.IMAGE, "content", ("path",), ours=True, rows_hint=len(files) + len(hidden_files)
    )


def _without_partitions(paths: list[str], pattern: str | None) -> list[str]:
    """``paths`` as Spark is to list them without recursion. Spark takes a subfolder named ``NAME=VALUE`` for a
    partition of a table and then reads its files, leaving out the folder's own: ``DIR/*.png`` gave
    ``DIR/label=3/b.png``, which it does not match, and not ``DIR/a.png``. A local folder holding one is
    given as its files that Spark's listing would read (those named '_...' and broken links are
    :func:`_hidden_from_spark`'s)."""
    out: list[str] = []
    matches = _matcher(pattern)
    for root in paths:
        local = os.path.abspath(local_path(root))
        if not is_local(root) or not os.path.isdir(local):
            out.append(root)
            continue
        with os.scandir(local) as listing:
            entries = sorted(listing, key=lambda e: e.name)
        if not any("=" in e.name and not e.name.startswith(".") and e.is_dir() for e in entries):
            out.append(root)
            continue
        prefix = "file://" if root.startswith("file://") else ""
        out += [
            prefix + e.path
            for e in entries
            if not e.name.startswith((".", "_")) and e.is_file() and matches(e.name)
        ]
    return out


def hadoop_literal(path: str) -> str:
    """``path`` with the characters of Hadoop's glob syntax escaped: Spark globs every path it reads, and
    read ``out[1]`` as ``out1`` and ``{a,b}`` as ``a`` or ``b``."""
    return re.sub(r"([\\{}\[\]*?])", r"\\\1", path)


def for_spark(path: str) -> str:
    """A path deepspark resolved, as Spark is to read it: a local path is a name, never a glob (deepspark
    lists local globs itself); others are given to Spark as they are."""
    return hadoop_literal(path) if is_local(path) else path


def _matcher(pattern: str | None) -> Callable[[str], bool]:
    """Whether Spark's ``pathGlobFilter`` ``pattern`` (None: any) lets a file of a name through: one
    compiled expression for all of the pattern's ``{a,b}`` alternatives (matching each alternative with
    ``fnmatch`` took 2 µs a file, a fifth of the time to list 70,000 files)."""
    import fnmatch

    if pattern is None:
        return lambda name: True
    compiled = re.compile("|".join(fnmatch.translate(p) for p in braces(pattern)))
    return lambda name: compiled.match(name) is not None


def _spark_hides(name: str) -> bool:
    """Whether Spark's file listing leaves out a file or folder of this name for starting with '_'
    (``HadoopFSUtils.shouldFilterOutPathName``; '.' names stay out, as a shell's globs leave them)."""
    return name.startswith("_") and "=" not in name and not name.startswith(("_metadata", "_common_metadata"))


def _walk(local: str, *, recursive: bool) -> Iterator[list[os.DirEntry[str]]]:
    """Each local folder's entries from ``local`` down (``recursive``), in ``os.walk``'s order. Links to
    folders are entered, as Spark's listing enters them (and Python's ``glob`` for ``**``); one leading
    back to a folder it lies in (above ``local`` too, found before the walk goes through that folder) is
    a ConfigError: Spark listed the files below it again and again, under ever longer paths, until they
    grew too long (41 rows for 2 images), and two such links made Python's ``**`` walk exponentially."""
    folders: list[tuple[str, tuple[str, ...]]] = [(local, (os.path.realpath(local),))]
    while folders:  # each folder with the real paths of those it lies in
        folder, above = folders.pop()
        try:
            with os.scandir(folder) as listing:
                entries = list(listing)
        except OSError as exc:  # skipped, its files would be missing from the predictions without a word
            raise ConfigError(
                f"data: cannot list the folder {folder!r} ({exc.strerror or exc}); make it readable, or "
                "leave it out of the input"
            ) from None
        yield entries
        below = sorted(
            (e for e in entries if recursive and not e.name.startswith(".") and e.is_dir()),
            key=lambda e: e.name,
        )
        for e in reversed(below):
            real = os.path.realpath(e.path) if e.is_symlink() else os.path.join(above[-1], e.name)
            if e.is_symlink() and any(os.path.commonpath([real, a]) == real for a in above):
                raise ConfigError(
                    f"data: {e.path!r} links to {real!r}, a folder it lies in: Spark would list the "
                    "files below it again and again; remove the link, or name the folders to read with a "
                    "glob that does not recurse ('DIR/*/*.png')"
                )
            folders.append((e.path, (*above, real)))


def _local_listing(path: str | list[str], *, pattern: str | None, recursive: bool) -> list[str]:
    """The files :func:`_binary_files` reads below local ``path`` (a file, a folder, or a list of them),
    as binaryFile's ``path`` column names them (``file:/...``), sorted, each once.

    What Spark's listing gives together with what it hides and deepspark adds (:func:`_hidden_from_spark`):
    a folder's files (at any depth with ``recursive``, entering links to folders; otherwise its own),
    whose names ``pattern`` matches, names starting with '_' included, '.' names and unfinished copies
    (``NAME._COPYING_``) left out, broken links kept (an error row each). Listed here, in one walk: Spark's
    listing of the 70,000 MNIST PNGs took 2.5 s of the JVM, Python's 0.1 s."""
    found: set[str] = set()
    matches = _matcher(pattern)
    for root in [path] if isinstance(path, str) else path:
        local = os.path.abspath(local_path(root))
        if not os.path.isdir(local):
            if not os.path.basename(local).startswith("."):
                found.add(local)
            continue
        for entries in _walk(local, recursive=recursive):
            found.update(
                e.path
                for e in entries
                if not e.name.startswith(".")
                and not e.name.endswith("._COPYING_")
                and not e.is_dir()
                and matches(e.name)
            )
    return [f"file:{p}" for p in sorted(found)]


def _hidden_from_spark(
    path: str | list[str], *, pattern: str | None, recursive: bool
) -> tuple[list[str], list[str]]:
    """The local folders and files under ``path`` (as :func:`_binary_files` reads it) that Spark's
    listing skips: folders named '_...' within a recursive listing, files named '_...', and broken
    symbolic links (their rows say "input is null": the file is listed, and cannot be read). A link loop
    below is a ConfigError (:func:`_walk`)."""

    allowed = _matcher(pattern)

    def matches(name: str) -> bool:
        return not name.startswith(".") and allowed(name)

    dirs: list[str] = []
    files: list[str] = []
    for root in [path] if isinstance(path, str) else path:
        if not is_local(root):
            continue
        local = os.path.abspath(local_path(root))
        if os.path.isfile(local):
            name = os.path.basename(local)
            if _spark_hides(name) and matches(name):
                files.append(local)
            continue
        for entries in _walk(local, recursive=recursive):
            dirs += sorted(e.path for e in entries if recursive and _spark_hides(e.name) and e.is_dir())
            files += sorted(
                e.path
                for e in entries
                # A link is the one kind of entry whose type needs a stat of its own: most are not.
                if (_spark_hides(e.name) or (e.is_symlink() and not os.path.exists(e.path)))
                and not e.is_dir()
                and matches(e.name)
            )
    return dirs, files


def _image_below(directory: Path) -> Path | None:
    """The first image file that reading ``directory`` as a folder of images would predict (a name
    :data:`_IMAGE_GLOB` matches, in any folder below, '.' names left out), or None."""
    matches = _matcher(_IMAGE_GLOB)
    for folder, subdirs, names in os.walk(directory):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in sorted(names):
            if not name.startswith(".") and matches(name):
                return Path(folder, name)
    return None


def _read_or_none(path: str) -> bytearray | None:
    try:
        return bytearray(Path(path).read_bytes())
    except OSError:
        return None  # gone or unreadable since it was listed: its row says "input is null"


def braces(pattern: str) -> list[str]:
    """``pattern`` with its ``{a,b}`` alternatives expanded, as Hadoop's glob reads them (nested groups
    too; a ``{`` without its ``}`` is literal), for Python's :mod:`glob`, which has none:
    ``braces("d/{a,b{1,2}}/*.png")`` is ``["d/a/*.png", "d/b1/*.png", "d/b2/*.png"]``."""
    start = pattern.find("{")
    while start != -1:
        depth, cut, options = 0, start + 1, []
        for i in range(start, len(pattern)):
            ch = pattern[i]
            depth += (ch == "{") - (ch == "}")
            if ch == "," and depth == 1:
                options.append(pattern[cut:i])
                cut = i + 1
            elif depth == 0:
                options.append(pattern[cut:i])
                head, tail = pattern[:start], pattern[i + 1 :]
                return [x for option in options for x in braces(head + option + tail)]
        start = pattern.find("{", start + 1)  # unclosed: literal
    return [pattern]


def _input_files(df: DataFrame) -> list[str]:
    """``df.inputFiles()`` in one call to the JVM. pyspark's own converts the Java array one element
    per Py4J round trip: 10 s for 70,000 files, longer than predicting them. Joined in the JVM (wrapped by
    ``scala.Predef.genericWrapArray``, which Scala 2.12, pyspark 3.5's, and 2.13 both have; NUL cannot occur
    in a path) and checked against the array's length; anything else falls back to pyspark's."""
    from py4j.protocol import Py4JError

    try:
        files = df._jdf.inputFiles()
        count = len(files)
        if count == 0:
            return []
        predef = df.sparkSession.sparkContext._jvm.scala.Predef  # type: ignore[union-attr]
        names = str(predef.genericWrapArray(files).mkString("\u0000")).split("\u0000")
        if len(names) == count:
            return names
    except (Py4JError, AttributeError, TypeError):
        pass
    return list(df.inputFiles())


def _empty_files(spark: SparkSession, uris: Sequence[str]) -> list[str]:
    """The zero-byte files among ``uris`` (as ``inputFiles()`` lists them), written as binaryFile's
    ``path`` column writes them. Local files are checked with ``stat``; others through Hadoop's
    FileSystem, one metadata call per file."""
    from urllib.parse import unquote, urlsplit

    empty = []
    jvm = spark.sparkContext._jvm
    conf = spark.sparkContext._jsc.hadoopConfiguration()
    for uri in uris:
        parts = urlsplit(uri)
        if parts.scheme in ("", "file"):
            local = unquote(parts.path)
            if os.path.getsize(local) == 0:
                empty.append(f"file:{local}")
            continue
        hpath = jvm.org.apache.hadoop.fs.Path(jvm.java.net.URI(uri))  # type: ignore[union-attr]
        if hpath.getFileSystem(conf).getFileStatus(hpath).getLen() == 0:
            empty.append(str(hpath.toString()))
    return empty


def is_parquet_file(path: Path) -> bool:
    """Whether ``path`` holds Parquet, by its content: a Parquet file starts and ends with the magic
    ``PAR1`` (a Hive or MapReduce table's data files have no suffix: ``000000_0``, ``part-00000``)."""
    try:
        with path.open("rb") as fh:
            # The smallest holds the magic, a footer's 4-byte length and the magic again (and a footer).
            if os.fstat(fh.fileno()).st_size < 12 or fh.read(4) != _PARQUET_MAGIC:
                return False
            fh.seek(-4, os.SEEK_END)
            return fh.read(4) == _PARQUET_MAGIC
    except OSError:  # a folder, a broken link, unreadable
        return False


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(_IMAGE_SUFFIXES)


def parquet_table_file(entries: Sequence[Path]) -> Path | None:
    """The first of a folder's ``entries`` that makes it a Parquet table as Spark writes one (predict's
    output too): a file named ``*.parquet`` or ``_SUCCESS``, not a folder named ``*.parquet`` (earlier
    predictions, say); None when there is none. The names are looked at first, so that only candidates are
    stat'ed. (``overwrite`` replaces only such a folder; an input is told by :func:`_table_file`.)"""
    return next(
        (q for q in entries if (q.suffix == ".parquet" or q.name == "_SUCCESS") and q.is_file()), None
    )


def _table_file(entries: Sequence[Path]) -> Path | None:
    """The first of a folder's ``entries`` that makes it a Parquet table to read: one
    :func:`parquet_table_file` finds, a file that is Parquet by content under any other name but an
    image's (Hive's ``000000_0``), or such a file in a partition folder (``NAME=VALUE``) below. Only
    the names :func:`parquet_table_file` does not decide on are opened."""
    named = parquet_table_file(entries)
    if named is not None:
        return named
    for q in entries:
        if q.name.startswith((".", "_")) and "=" not in q.name:
            continue  # Spark reads no such file as the table's data
        if "=" in q.name and q.is_dir():
            below = _table_file(sorted(q.iterdir()))
            if below is not None:
                return below
        elif not _is_image_name(q.name) and is_parquet_file(q):
            return q
    return None


def _check_table_files(directory: Path, table: Path) -> None:
    """A ConfigError unless every file Spark reads as the data of the Parquet table in ``directory``
    (found by ``table``) is Parquet: the files in it and in its partition folders (``NAME=VALUE``), but
    names starting with '_' or '.' and empty files. Spark failed the job on an image or text file
    there (its Java trace at the first row, or exit 1 after a job)."""
    for folder, subdirs, names in os.walk(directory):
        subdirs[:] = sorted(d for d in subdirs if "=" in d and not d.startswith("."))
        for name in sorted(names):
            file = Path(folder, name)
            if name.startswith((".", "_")) or not file.is_file() or file.stat().st_size == 0:
                continue
            if not is_parquet_file(file):
                glob = os.path.join(directory, "**", "*" + file.suffix)
                hint = (
                    f"; to predict the images, name them with a glob ({glob!r})"
                    if _is_image_name(name)
                    else ""
                )
                raise ConfigError(
                    f"data: {str(directory)!r} is a Parquet table ({table.relative_to(directory)}, ...), but "
                    f"{file.relative_to(directory)} in it is not a Parquet file (one starts and ends with PAR1), "
                    f"and Spark would read it as one: move it out of the table's folder{hint}"
                )


def _check_pixel_shape(what: str, shape: Sequence[int], input_shape: tuple[int, int, int]) -> None:
    """Raw pixel records are taken as they are, not resized (as training reads them): a ConfigError unless
    their recorded shape (``[H, W]``, ``[C, H, W]``, or flat ``[C*H*W]``) is the model's input. Reshaped by
    size alone, 14x56 records ran as 28x28 images and 32x32 ones failed every row at run time."""
    dims = tuple(int(d) for d in shape)
    chw = (1, *dims) if len(dims) == 2 else dims
    if chw == input_shape or (len(dims) == 1 and dims[0] == math.prod(input_shape)):
        return
    raise ConfigError(
        f"data: {what} holds images of shape {list(dims)}, but the model's input is {list(input_shape)} "
        "(C, H, W) and raw pixels are not resized; give images of that shape, or a model trained on these"
    )


def _idx_input(spark: SparkSession, files: Sequence[Path], input_shape: tuple[int, int, int]) -> Input:
    import pandas as pd

    from deepspark.data import read_idx
    from deepspark.data.files import labels_file_for
    from deepspark.data.idx import read_idx_shape
    from deepspark.data.mnist import check_idx_images, check_idx_labels, check_label_count

    pairs = [(file, labels_file_for(file)) for file in files]
    for file, labels_file in pairs:  # from the headers, before reading (maybe gigabytes of) any data
        shape = read_idx_shape(file)
        if labels_file is not None:
            check_label_count(file, shape[0], labels_file, read_idx_shape(labels_file)[0])
        if len(shape) in (3, 4):  # other ranks: check_idx_images says what images must be
            _check_pixel_shape(str(file), shape[1:], input_shape)
    frames = []
    for file, labels_file in pairs:
        images = read_idx(file)
        check_idx_images(file, images)  # training's check: no silent cast of other pixel types
        labels = None
        if labels_file is not None:
            labels = read_idx(labels_file)
            check_idx_labels(labels_file, labels)
            labels = labels.astype(np.int64)
        frames.append(
            pd.DataFrame(
                {
                    "file": file.name,
                    "index": np.arange(len(images), dtype=np.int64),
                    "target": labels,
                    "pixels": [
                        row.tobytes() for row in images.reshape(len(images), math.prod(images.shape[1:]))
                    ],
                }
            )
        )
    pdf = pd.concat(frames, ignore_index=True)
    pdf["target"] = pdf["target"].astype("Int64")
    df = spark.createDataFrame(pdf, schema="file string, index long, target long, pixels binary")
    return Input(df, InputKind.RAW, "pixels", ("file", "index", "target"), ours=True, rows_hint=len(pdf))


def _dataframe_input(
    df: DataFrame, column: str | None, input_shape: tuple[int, int, int], *, ours: bool = False
) -> Input:
    from pyspark.sql import types as T

    seen: dict[str, str] = {}
    for name in df.columns:
        if name.lower() in seen:  # a join's two `id`s: Spark cannot tell them apart by name (nor can we)
            raise ConfigError(
                f"data: expected a DataFrame with distinct column names; it has {seen[name.lower()]!r} and "
                f"{name!r} (Spark compares names ignoring case): rename or drop one"
            )
        seen[name.lower()] = name
    fields = {f.name: f.dataType for f in df.schema.fields}

    def numbers(typ: Any) -> bool:  # an array of numbers, nested or flat: a pixel tensor
        while isinstance(typ, T.ArrayType):
            typ = typ.elementType
        return isinstance(typ, T.NumericType)

    if column is None:
        # Only arrays of numbers are tensors: a predictions table's top_k (an array of structs) was
        # taken for its one array column, and every row became an error row.
        candidates = [
            n
            for n, t in fields.items()
            if isinstance(t, T.BinaryType) or (isinstance(t, T.ArrayType) and numbers(t))
        ]
        if len(candidates) == 1:
            column = candidates[0]
        elif not candidates and isinstance(fields.get("url"), T.StringType):
            column = "url"
        else:
            raise ConfigError(
                "input_column: expected the name of the image/tensor/URL column; the DataFrame has "
                f"{sorted(fields)} and no single binary or numeric array column to choose"
            )
    if column not in fields:
        raise ConfigError(f"input_column: expected one of {sorted(fields)}, got {column!r}")
    typ = fields[column]
    if isinstance(typ, T.BinaryType):
        # deepspark.data.to_dataframe records the shape of the raw pixels it writes (as training reads them)
        recorded = df.schema[column].metadata.get("shape")
        kind = InputKind.RAW if recorded is not None else InputKind.IMAGE
        if isinstance(recorded, list) and all(isinstance(d, int) for d in recorded):
            _check_pixel_shape(f"column {column!r}", recorded, input_shape)
    elif isinstance(typ, T.ArrayType) and numbers(typ):
        kind = InputKind.TENSOR
    elif isinstance(typ, T.StringType):
        kind = InputKind.URL
    else:
        raise ConfigError(
            f"input_column: {column!r} is {typ.simpleString()}; expected binary (image files), an array "
            "of numbers (pixel tensors) or a string (http(s) URLs)"
        )
    keep = tuple(n for n in fields if n != column or kind is InputKind.URL)
    return Input(df, kind, column, keep, ours=ours)


def resolve_input(
    spark: SparkSession, data: Any, input_column: str | None, input_shape: tuple[int, int, int]
) -> Input:
    """``data`` as an :class:`Input`; ``input_shape`` is the model's (C, H, W), which raw pixel records
    (IDX files, a column ``to_dataframe`` wrote) must have. An ``input_column`` is a table's column: one
    that the input is not read by (image files, IDX files, a URL list) is refused, not ignored."""
    from py4j.protocol import Py4JJavaError
    from pyspark.errors.exceptions.captured import CapturedException

    try:
        source = _resolve(spark, data, input_column, input_shape)
    except (CapturedException, Py4JJavaError) as exc:
        # Spark refused the input while planning its read on the driver (a table's folders in two
        # layouts, a footer it cannot parse): one line, not its Java trace.
        raise ConfigError(f"data: Spark cannot read {os.fspath(data)!r}: {_refusal(exc)}") from None
    if input_column is not None and source.column != input_column:
        raise ConfigError(
            f"input_column: {input_column!r} names a column of a table, but {os.fspath(data)!r} is not a "
            "table (image files, IDX files and .txt URL lists have no column to choose); drop input_column "
            "(CLI: --input-column)"
        )
    return source


# A Spark error class opening a message: [CANNOT_READ_FILE_FOOTER], [FAILED_READ_FILE.CANNOT_READ_FILE_FOOTER].
_ERROR_CLASS = re.compile(r"\[[A-Z][A-Z0-9_]*(\.[A-Z][A-Z0-9_]*)*\] ")


def _refusal(exc: BaseException) -> str:
    """The line of Spark's refusal that names its error class, from the class on; else the line
    :func:`~deepspark.slots.short_error` picks. pyspark 4 names the class in the first line; 3.5 wraps a
    footer it cannot read in a job failure ("Exception thrown in awaitResult") and names it only in a
    ``Caused by:`` line further down."""
    from deepspark.slots import short_error

    for line in str(exc).splitlines():
        found = _ERROR_CLASS.search(line)
        if found is not None and not line[:1].isspace():
            return line[found.start() :].strip()[:300]
    return short_error(exc)


def _resolve(
    spark: SparkSession, data: Any, input_column: str | None, input_shape: tuple[int, int, int]
) -> Input:
    from pyspark.sql import DataFrame

    from deepspark.data.files import preferred_copy

    if isinstance(data, DataFrame):
        return _dataframe_input(data, input_column, input_shape)
    if not isinstance(data, str | os.PathLike):
        raise ConfigError(f"data: expected a Spark DataFrame or a path/glob, got {data_kind(data)}")
    path = os.fspath(data)
    has_glob = any(ch in path for ch in GLOB_CHARS)
    if is_local(path):
        if not path.startswith("file://") and not os.path.isabs(path):
            # Hadoop reads a relative 'a:b' as a URI whose scheme is 'a' (a Java trace): go absolute,
            # without normalising (a glob's '{a,b/../a}' must stay as it is).
            path = os.path.join(os.getcwd(), path)
        local = local_path(path)
        if has_glob:
            if "**" in local:  # Python's '**' enters links to folders: refuse a loop before it walks one
                for alternative in braces(local):
                    parts = alternative.split("/")
                    fixed = next(
                        (i for i, part in enumerate(parts) if any(c in part for c in GLOB_CHARS)), len(parts)
                    )
                    base = "/".join(parts[:fixed]) or "/"
                    for _ in _walk(base, recursive=True) if os.path.isdir(base) else ():
                        pass
            # One match is enough to know the glob matches: stop there (the listing below walks it all).
            if not any(next(_glob.iglob(alt, recursive=True), None) for alt in braces(local)):
                if not os.path.exists(local):
                    raise ConfigError(f"data: no files match {path!r}")
                has_glob = False  # `imgs [a]`, `run{1}`: no match as a glob, and a path so named (as a shell reads it)
        elif not os.path.exists(local):
            raise ConfigError(f"data: expected an existing path, DataFrame or glob, got {path!r}")
        p = Path(local)
        if not has_glob and p.is_dir():
            entries = sorted(p.iterdir())  # listed once (a folder of images may hold many thousands)
            # One file in two spellings (X and X.gz) is read once: the copy training's loader reads.
            idx = sorted(
                {preferred_copy(q) for q in entries if "idx3-ubyte" in q.name or "idx3.ubyte" in q.name}
            )
            table = _table_file(entries)
            if idx and table is not None:  # either kind alone would leave the other out without a word
                raise ConfigError(
                    f"data: {path!r} holds both MNIST-layout IDX files ({', '.join(q.name for q in idx)}) and "
                    f"a Parquet table ({table.name}, ...); to predict the IDX images, name the file "
                    f"({str(idx[0])!r}); to predict the table, move it to a directory of its own"
                )
            if idx:
                image = _image_below(p)
                if image is not None:
                    raise ConfigError(
                        f"data: {path!r} holds both MNIST-layout IDX files ({', '.join(q.name for q in idx)}) "
                        f"and image files ({image.relative_to(p)}, ...); name the kind to predict: an IDX "
                        f"images file ({str(idx[0])!r}) or a glob of the images "
                        f"({os.path.join(path, '**', '*' + image.suffix)!r})"
                    )
                return _idx_input(spark, idx, input_shape)
            if table is not None:
                _check_table_files(p, table)
                return _dataframe_input(
                    spark.read.parquet(for_spark(path)), input_column, input_shape, ours=False
                )
            images = _binary_files(spark, path, pattern=_IMAGE_GLOB, recursive=True)
            if images.rows_hint == 0:  # as an empty glob: nothing to predict is a mistake, not 0 rows
                raise ConfigError(
                    f"data: {path!r} holds no image files (.png, .jpg, .jpeg, .bmp, .gif, .tif, .tiff, .webp, "
                    "in any folder below it), MNIST-layout IDX files or Parquet table; give a glob for other names"
                )
            return images
        if not has_glob and ("idx3-ubyte" in p.name or "idx3.ubyte" in p.name):
            return _idx_input(spark, [p], input_shape)
    suffix = Path(path).suffix.lower()
    if has_glob:
        parts = path.split("/")
        first = next(i for i, part in enumerate(parts) if any(ch in part for ch in GLOB_CHARS))
        if first == len(parts) - 1 or (first == len(parts) - 2 and parts[first] == "**"):
            # Hadoop globs have no '**': list the fixed prefix (recursively for 'DIR/**/NAME') and filter
            # on the file name; a glob in the file name alone is read the same way.
            base = "/".join(parts[:first]) or "."
            return _binary_files(spark, base, pattern=parts[-1], recursive="**" in path)
        if "**" in path and not is_local(path):
            raise ConfigError(
                f"data: {path!r}: '**' is read only as DIR/**/NAME-PATTERN for non-local paths "
                "(Hadoop globs have no '**')"
            )
        if is_local(path):
            # A glob in a directory: list the directories here and let Spark filter the file names. Given
            # the glob itself, Spark globs every file as a path of its own (20 s for 20,000 files with
            # `{a,b}` alternatives), and logs a long, harmless FileNotFoundException while it looks for
            # a streaming-sink metadata folder named like the pattern.
            prefix = "file://" if path.startswith("file://") else ""
            found = {  # normalised: `{a,a/}` or `{a,./a}` name one directory, whose files come once
                os.path.normpath(d)
                for alternative in braces(local_path("/".join(parts[:-1])))
                for d in _glob.glob(alternative, recursive=True)  # '**': any depth, as in the check above
                if Path(d).is_dir()
            }
            dirs = sorted(found)
            return _binary_files(spark, [prefix + d for d in dirs], pattern=parts[-1], recursive=False)
        return _binary_files(spark, path, pattern=None, recursive=False)
    if suffix == ".parquet" or (is_local(path) and is_parquet_file(Path(local_path(path)))):
        return _dataframe_input(spark.read.parquet(for_spark(path)), input_column, input_shape)
    if suffix == ".txt":
        # Blank lines are no rows: Spark's trim() strips spaces only, and a line of tabs was a row.
        df = spark.read.text(for_spark(path)).withColumnRenamed("value", "url").filter(r"url rlike '\\S'")
        return _dataframe_input(df, "url", input_shape, ours=True)
    if suffix == ".csv":
        return _dataframe_input(
            spark.read.csv(for_spark(path), header=True), input_column or "url", input_shape, ours=True
        )
    if suffix in _IMAGE_SUFFIXES:
        return _binary_files(spark, path, pattern=None, recursive=False)
    raise ConfigError(
        f"data: cannot tell what {path!r} holds; expected image files (a glob or directory), a Parquet "
        "table, a directory of IDX files, a .txt/.csv list of URLs, or a DataFrame"
    )
