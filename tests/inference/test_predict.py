"""predict on local[2]: every row once, exact predictions, error rows, one model load per worker."""

from __future__ import annotations

import argparse
import itertools
import math
import os
import re
import shutil
import struct
import warnings
from glob import escape as glob_escape
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from _inference_support import CLASS_NAMES, Model, Server, png_bytes, reference_probabilities

from deepspark.errors import ConfigError, DatasetError, RunError
from deepspark.inference import PredictProgress, UrlPolicy, export_model, predict
from deepspark.inference._cli import add_predict_parser

FAST_URLS = UrlPolicy(timeout=5, retries=1, backoff=0.01)


def _by(rows: list[Any], key: str) -> dict[Any, Any]:
    return {row[key]: row for row in rows}


def _png_folder(root: Path, images: np.ndarray) -> Path:
    """``root`` made, holding ``images`` as ``0.png``, ``1.png``, ..."""
    root.mkdir(parents=True)
    for i, image in enumerate(images):
        (root / f"{i}.png").write_bytes(png_bytes(image))
    return root


def _assert_matches(row: Any, probabilities: np.ndarray, k: int) -> None:
    """The row's prediction and top-k equal the model's own probabilities for that input."""
    order = np.argsort(-probabilities, kind="stable")[:k]
    assert row["error"] is None
    assert row["label_index"] == order[0]
    assert row["label"] == CLASS_NAMES[order[0]]
    assert row["probability"] == pytest.approx(probabilities[order[0]], abs=1e-5)
    assert [e["label"] for e in row["top_k"]] == [CLASS_NAMES[i] for i in order]
    np.testing.assert_allclose([e["probability"] for e in row["top_k"]], probabilities[order], atol=1e-5)


def _assert_error_row(row: Any, match: str) -> None:
    assert match in row["error"]
    assert row["label"] is None and row["label_index"] is None and row["probability"] is None
    assert row["top_k"] is None


@pytest.fixture(scope="module")
def image_dir(small_model: Model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    (root / "sub").mkdir()
    for i, image in enumerate(small_model.images):
        (root / ("sub" if i % 2 else "") / f"{i:03d}.png").write_bytes(png_bytes(image))
    good = png_bytes(small_model.images[0])
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return root


def _predict_argv(model: Model, image_dir: Path, out: Path) -> list[str]:
    """``deepspark predict`` of the image folder's ``0*.png`` files with ``model``, written to ``out``."""
    return ["predict", "--model", str(model.path), "--input", f"{image_dir}/0*.png", "--output", str(out)]


def test_images_every_row_once_predictions_exact_and_bad_files_are_error_rows(
    spark: Any, small_model: Model, image_dir: Path, tmp_path: Path
) -> None:
    expected = reference_probabilities(small_model, small_model.images)
    # batch_size 7 does not divide the row count: the last batch of a partition is short.
    result = predict(
        f"{image_dir}/**/*.png", small_model.path, output=tmp_path / "out", batch_size=7, top_k=3, spark=spark
    )
    rows = result.dataframe.collect()
    n_files = len(small_model.images) + 2
    assert len(rows) == n_files
    by_name = {Path(r["path"]).name: r for r in rows}
    assert len(by_name) == n_files
    for i in range(len(small_model.images)):
        _assert_matches(by_name[f"{i:03d}.png"], expected[i], 3)
    _assert_error_row(by_name["truncated.png"], "cannot decode image")
    _assert_error_row(by_name["corrupt.png"], "cannot decode image")

    summary = result.summary
    assert summary is not None
    assert (summary.rows, summary.errors) == (n_files, 2)
    assert summary.rows_per_second > 0
    assert summary.model_loads <= summary.workers <= 2  # 0 when an earlier test's job left it cached
    assert set(summary.phase_seconds) == {"load", "read", "decode", "forward", "write"}
    assert summary.phase_seconds["forward"] > 0
    assert summary.threads_per_task == 1
    assert summary.devices == ("cpu",)  # local[2] assigns no GPUs


@pytest.mark.parametrize("form", ["dir", "glob"])
def test_a_zero_byte_file_is_an_error_row_not_a_dropped_row(
    spark: Any, small_model: Model, tmp_path: Path, form: str
) -> None:
    root = tmp_path / "in put"  # a space: the path is written the way binaryFile writes it
    root.mkdir()
    for i in range(2):
        (root / f"good{i}.png").write_bytes(png_bytes(small_model.images[i]))
    (root / "empty.png").write_bytes(b"")
    data = root if form == "dir" else f"{root}/*.png"
    result = predict(data, small_model.path, output=tmp_path / "out", spark=spark)
    rows = result.dataframe.collect()
    assert len(rows) == 3
    by_name = {Path(r["path"]).name: r for r in rows}
    assert sorted(by_name) == ["empty.png", "good0.png", "good1.png"]
    assert all(r["path"].startswith(f"file:{root}/") for r in rows)
    _assert_error_row(by_name["empty.png"], "empty input (0 bytes)")
    expected = reference_probabilities(small_model, small_model.images[:2])
    for i in range(2):
        _assert_matches(by_name[f"good{i}.png"], expected[i], 5)
    assert result.summary is not None and (result.summary.rows, result.summary.errors) == (3, 1)


def test_the_glob_filter_matches_as_fnmatch_does_each_alternative() -> None:
    """One compiled expression for a pattern's {a,b} alternatives: the whole name, as fnmatch does."""
    import fnmatch

    from deepspark.inference._inputs import _IMAGE_GLOB, _matcher, braces

    names = ["a.png", "a.PNG", "a.pngx", "xa.png", "a.jpeg", "a.jpg", "a.JpG", "a.tif", "a", ".png", "a.png.gz",
             "a\nb.png", "b{1}.png", "a.webp", "a.gif.bak"]  # fmt: skip
    for pattern in (_IMAGE_GLOB, "*.{png,jp{e,}g}", "a.png", "[ab].*", "*{1}*"):
        matches = _matcher(pattern)
        expected = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in braces(pattern))]
        assert [n for n in names if matches(n)] == expected, pattern
    assert all(_matcher(None)(n) for n in names)


def test_local_files_are_listed_as_spark_lists_them_with_what_it_hides(spark: Any, tmp_path: Path) -> None:
    """deepspark lists local inputs itself (Spark's listing took 2.5 s of the JVM for 70,000 files): the
    same files as Spark's binaryFile listing, plus those it hides and predict always read (names starting
    with '_', in folders so named too; broken links), '.' names and unfinished copies left out."""
    from deepspark.inference._inputs import _IMAGE_GLOB, _local_listing

    root = tmp_path / "t"
    for name in ["a.png", "b.PNG", "_u.png", ".dot.png", "x.jpg", "c.png._COPYING_", "empty.png", "colon:t.png",
                 "sub/d.png", "sub/_e.png", "sub/.f.png", "_hid/g.png", ".dotdir/i.png", "sub/deeper/j.png",
                 "k=1/l.png", "sp ace/n.png", "br[1]/o.png", "p%20q.png"]:  # fmt: skip
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"" if name == "empty.png" else b"x")
    (root / "link.png").symlink_to(root / "a.png")
    (root / "broken.png").symlink_to(root / "gone.png")
    (root / "linkdir").symlink_to(root / "sub" / "deeper")
    top = ["a.png", "b.PNG", "broken.png", "colon:t.png", "empty.png", "link.png", "p%20q.png", "x.jpg"]
    below = ["br[1]/o.png", "k=1/l.png", "linkdir/j.png", "sp ace/n.png", "sub/d.png", "sub/deeper/j.png"]
    # Without recursion, a folder's own files (Spark read a subfolder named NAME=VALUE as a partition
    # of a table: predict never did, and listed such a folder's files one by one).
    ours = _local_listing(str(root), pattern=_IMAGE_GLOB, recursive=False)
    assert ours == [f"file:{root}/{name}" for name in sorted([*top, "_u.png"])]
    reader = spark.read.format("binaryFile").option("pathGlobFilter", _IMAGE_GLOB)
    reader = reader.option("recursiveFileLookup", "true")
    listed = {r["path"][len(f"file:{root}/") :] for r in reader.load(str(root)).select("path").collect()}
    hidden = ["_u.png", "_hid/g.png", "sub/_e.png", "broken.png", "empty.png"]
    assert listed == set(top + below) - set(hidden)  # Spark's scan leaves out broken links and empty files
    ours = _local_listing(str(root), pattern=_IMAGE_GLOB, recursive=True)
    assert ours == [f"file:{root}/{name}" for name in sorted(set(top + below) | set(hidden))]
    assert (
        _local_listing([str(root), str(root / "sub")], pattern="*.png", recursive=True).count(
            f"file:{root}/sub/d.png"
        )
        == 1
    )  # overlapping roots: each file once


def test_a_folder_that_cannot_be_listed_is_an_error_not_left_out(
    spark: Any, small_model: Model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The walk skipped a folder it could not list (permissions, a vanished mount): its files were
    # missing from the predictions without a word.
    root = _png_folder(tmp_path / "in", small_model.images[:2])
    _png_folder(root / "locked", small_model.images[2:3])
    real = os.scandir

    def scandir(path: Any) -> Any:
        if os.fspath(path).endswith("/locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(ConfigError, match=r"cannot list the folder '.*/in/locked' \(Permission denied\)"):
        predict(root, small_model.path, spark=spark)


@pytest.mark.parametrize("form", ["dir", "glob", "dir-glob", "file"])
def test_names_starting_with_an_underscore_are_read_not_dropped(
    spark: Any, small_model: Model, tmp_path: Path, form: str
) -> None:
    root = tmp_path / "in"
    for i, rel in enumerate(["a.png", "_b.png", "_batch/c.png", "sub/_d.png", "sub/e.png", ".hidden.png"]):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(png_bytes(small_model.images[i]))
    data, names = {
        "dir": (root, ["_b.png", "_batch/c.png", "a.png", "sub/_d.png", "sub/e.png"]),
        "glob": (f"{root}/**/*.png", ["_b.png", "_batch/c.png", "a.png", "sub/_d.png", "sub/e.png"]),
        "dir-glob": (f"{root}/*/*.png", ["_batch/c.png", "sub/_d.png", "sub/e.png"]),
        "file": (root / "_b.png", ["_b.png"]),
    }[form]
    result = predict(data, small_model.path, output=tmp_path / "out", spark=spark)
    rows = {r["path"].split("/in/", 1)[1]: r for r in result.dataframe.collect()}
    assert sorted(rows) == names
    assert all(r["path"].startswith(f"file:{root}/") for r in rows.values())
    expected = reference_probabilities(small_model, small_model.images[:5])
    order = ["a.png", "_b.png", "_batch/c.png", "sub/_d.png", "sub/e.png"]
    for name in names:
        _assert_matches(rows[name], expected[order.index(name)], 5)
    assert result.summary is not None and result.summary.rows == len(names)


def test_a_broken_symbolic_link_is_an_error_row_not_left_out(
    spark: Any, small_model: Model, tmp_path: Path
) -> None:
    # Spark's listing skips a link whose target is gone: 3 of the 4 listed images came back, no error.
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    for i, name in enumerate(["a.png", "sub/b.png"]):
        (root / name).write_bytes(png_bytes(small_model.images[i]))
    (root / "link.png").symlink_to(root / "a.png")
    (root / "sub" / "broken.png").symlink_to(tmp_path / "gone.png")
    result = predict(root, small_model.path, output=tmp_path / "out", spark=spark)
    rows = {r["path"].split("/in/", 1)[1]: r for r in result.dataframe.collect()}
    assert sorted(rows) == ["a.png", "link.png", "sub/b.png", "sub/broken.png"]
    _assert_error_row(rows["sub/broken.png"], "sub/broken.png: No such file or directory")
    assert result.summary is not None and (result.summary.rows, result.summary.errors) == (4, 1)


def test_local_files_are_read_by_the_tasks_and_one_gone_since_the_listing_is_an_error_row(
    spark: Any, small_model: Model, tmp_path: Path
) -> None:
    # Spark's binaryFile scan read every file in the JVM and sent its bytes through Arrow (a fifth of the
    # cores' time on small images); a file removed between the listing and the job failed the whole job.
    root = _png_folder(tmp_path / "in", small_model.images[:4])
    lazy = predict(root, small_model.path, spark=spark)  # listed now, read when collected
    assert lazy.dataframe.columns[0] == "path"
    (root / "2.png").unlink()
    rows = {r["path"].rsplit("/", 1)[1]: r for r in lazy.dataframe.collect()}
    assert sorted(rows) == ["0.png", "1.png", "2.png", "3.png"]
    _assert_error_row(rows["2.png"], f"cannot read {root}/2.png: No such file or directory")
    expected = reference_probabilities(small_model, small_model.images[:4])
    for i in (0, 1, 3):
        _assert_matches(rows[f"{i}.png"], expected[i], 5)


@pytest.mark.parametrize("form", ["dir", "glob"])
def test_a_linked_folder_is_read_once_and_a_link_back_up_is_refused(
    spark: Any, small_model: Model, tmp_path: Path, form: str
) -> None:
    # Spark enters links to folders: one leading back up was listed again and again (41 rows for 2
    # images); and a linked folder's '_...' files, which deepspark adds, were left out.
    root, other = tmp_path / "in", tmp_path / "other"
    root.mkdir()
    other.mkdir()
    for i, name in enumerate(["in/a.png", "other/b.png", "other/_c.png"]):
        (tmp_path / name).write_bytes(png_bytes(small_model.images[i]))
    (root / "linked").symlink_to(other)
    data = root if form == "dir" else f"{root}/**/*.png"
    rows = {
        r["path"].split("/in/", 1)[1]: r
        for r in predict(data, small_model.path, spark=spark).dataframe.collect()
    }
    assert sorted(rows) == ["a.png", "linked/_c.png", "linked/b.png"]
    expected = reference_probabilities(small_model, small_model.images[:3])
    for i, name in enumerate(["a.png", "linked/b.png", "linked/_c.png"]):
        _assert_matches(rows[name], expected[i], 5)
    (other / "up").symlink_to(root)
    with pytest.raises(
        ConfigError,
        match=re.escape(
            f"data: {str(root / 'linked' / 'up')!r} links to {str(root.resolve())!r}, a folder it lies in"
        ),
    ):
        predict(data, small_model.path, spark=spark)
    (other / "up").unlink()
    (other / "top").symlink_to(tmp_path)  # above the input folder: refused before walking through it
    with pytest.raises(ConfigError, match=re.escape(f"data: {str(root / 'linked' / 'top')!r} links to")):
        predict(data, small_model.path, spark=spark)
    # Two loops: Python's `**` glob (deepspark's listing of a local glob) followed both, branching at
    # every level until the paths grew too long (2**40 folders); the loop is refused before it walks.
    (other / "up").symlink_to(root)
    (root / "also").symlink_to(root)
    with pytest.raises(ConfigError, match=r"links to .*, a folder it lies in"):
        predict(data, small_model.path, spark=spark)


def test_a_folder_reads_image_suffixes_in_any_case(spark: Any, small_model: Model, tmp_path: Path) -> None:
    # Only all-lower and all-upper suffixes were listed: `b.Png` and `c.JPeg` were left out without a
    # word (a single file of either name is read, its suffix compared in lower case).
    names = ["a.png", "b.Png", "c.JPeg", "sub/d.Webp", "_e.Jpg", "f.txt"]
    (tmp_path / "in" / "sub").mkdir(parents=True)
    for i, name in enumerate(names):
        (tmp_path / "in" / name).write_bytes(png_bytes(small_model.images[i]))
    rows = predict(tmp_path / "in", small_model.path, spark=spark).dataframe.collect()
    assert sorted(row["path"].split("/in/")[1] for row in rows) == sorted(names[:-1])
    assert all(row["error"] is None for row in rows)


def test_an_image_folder_holding_earlier_predictions_is_still_an_image_folder(
    spark: Any, small_model: Model, tmp_path: Path
) -> None:
    root = _png_folder(tmp_path / "images", small_model.images[:3])
    first = predict(root, small_model.path, output=root / "preds.parquet", spark=spark).summary
    assert first is not None and first.rows == 3
    again = predict(root, small_model.path, output=tmp_path / "again", spark=spark)
    assert again.summary is not None and (again.summary.rows, again.summary.errors) == (3, 0)
    assert sorted(Path(r["path"]).name for r in again.dataframe.collect()) == ["0.png", "1.png", "2.png"]


@pytest.mark.parametrize("form", ["dir", "glob"])
def test_a_colon_in_a_file_name_does_not_fail_the_job(
    spark: Any, small_model: Model, tmp_path: Path, form: str
) -> None:
    root = tmp_path / "in"
    root.mkdir()
    names = ["plain.png", "2024-01-02T10:11:12.png"]  # a camera's time stamp
    for i, name in enumerate(names):
        (root / name).write_bytes(png_bytes(small_model.images[i]))
    (root / "empty:0.png").write_bytes(b"")
    result = predict(root if form == "dir" else f"{root}/*.png", small_model.path, spark=spark)
    rows = {Path(r["path"]).name: r for r in result.dataframe.collect()}
    assert sorted(rows) == sorted([*names, "empty:0.png"])
    expected = reference_probabilities(small_model, small_model.images[:2])
    for i, name in enumerate(names):
        _assert_matches(rows[name], expected[i], 5)
    _assert_error_row(rows["empty:0.png"], "empty input (0 bytes)")


@pytest.mark.parametrize("form", ["dir", "glob"])
def test_a_relative_input_path_with_a_colon_is_read(
    spark: Any, small_model: Model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, form: str
) -> None:
    # Hadoop took the relative 'in g:1' for a URI of scheme 'in g' and failed with a Java trace.
    root = tmp_path / "in g:1"
    root.mkdir()
    (root / "a.png").write_bytes(png_bytes(small_model.images[0]))
    monkeypatch.chdir(tmp_path)
    result = predict("in g:1" if form == "dir" else "in g:1/*.png", small_model.path, spark=spark)
    [row] = result.dataframe.collect()
    assert Path(row["path"].removeprefix("file:")).name == "a.png"
    _assert_matches(row, reference_probabilities(small_model, small_model.images[:1])[0], 5)


@pytest.mark.parametrize("name", ["out[1]", "out{a,b}", "out:1", "out"])
def test_an_output_named_with_glob_characters_or_a_colon_is_read_back_as_named(
    spark: Any, small_model: Model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    # The predictions were written, then read back by the name as given: Spark globbed `out[1]` (no such
    # path: a trace), took a relative `out:1` for a URI, and resolved a relative name against the JVM's
    # working folder, not the program's (an embedding program that changed folder read another output).
    (tmp_path / "a.png").write_bytes(png_bytes(small_model.images[0]))
    (tmp_path / "out1").mkdir()  # what Spark's glob would read for out[1]
    monkeypatch.chdir(tmp_path)  # the JVM's working folder stays where the tests started
    result = predict(tmp_path / "a.png", small_model.path, output=name, spark=spark)
    [row] = result.dataframe.collect()
    assert Path(row["path"]).name == "a.png"
    _assert_matches(row, reference_probabilities(small_model, small_model.images[:1])[0], 5)
    assert result.dataframe.inputFiles()[0].startswith(f"file://{tmp_path}/")


def test_input_files_are_listed_in_one_jvm_call_exactly_as_spark_lists_them(
    spark: Any, tmp_path: Path
) -> None:
    from deepspark.inference._inputs import _input_files

    root = tmp_path / "odd names"
    root.mkdir()
    for name in ["a, b.png", "ü ñ.png", "x%20y.png", "plain.png", "empty.png"]:
        (root / name).write_bytes(b"" if name == "empty.png" else b"x")
    df = spark.read.format("binaryFile").load(str(root))
    expected = list(df.inputFiles())  # pyspark's: one Py4J round trip per file
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(df), "inputFiles", lambda self: pytest.fail("listed file by file"))
        listed = _input_files(df)
    assert listed == expected and len(listed) == 5
    nothing = spark.read.format("binaryFile").option("pathGlobFilter", "*.jpg").load(str(root))
    assert _input_files(nothing) == []


def test_model_is_loaded_once_per_worker_not_per_partition(
    spark: Any, small_model: Model, tmp_path: Path
) -> None:
    from deepspark.models import Preprocess, build_model, model_spec, save_checkpoint

    spec = model_spec("mlp", hidden=16, depth=1)
    module = build_model(spec, seed=123).eval()  # a model no worker has seen yet
    preprocess = Preprocess(input_shape=(1, 28, 28), mean=(0.0,), std=(1.0,), scale=1.0)
    save_checkpoint(tmp_path / "fresh", module, spec, preprocess=preprocess)
    images = np.repeat(small_model.images, 5, axis=0)  # 200 rows in 10 partitions, batches of 8
    df = spark.createDataFrame(
        [(i, img.reshape(-1).astype(float).tolist()) for i, img in enumerate(images)],
        "id long, pixels array<double>",
    ).repartition(10)
    result = predict(df, tmp_path / "fresh", output=tmp_path / "out", batch_size=8, spark=spark)
    summary = result.summary
    assert summary is not None
    assert summary.rows == 200 and summary.errors == 0 and summary.partitions == 10
    # Worker reuse: each Python worker loads the model once, however many tasks it runs.
    assert 1 <= summary.model_loads == summary.workers <= 2
    got = {r["id"]: r["label_index"] for r in result.dataframe.collect()}
    import torch

    with torch.no_grad():
        expected = module(torch.as_tensor(images, dtype=torch.float32).unsqueeze(1)).argmax(dim=1)
    assert [got[i] for i in range(200)] == expected.tolist()
    # A second job finds the model already loaded in the workers.
    again = predict(df.limit(20), tmp_path / "fresh", output=tmp_path / "again", spark=spark).summary
    assert again is not None and again.model_loads == 0


def test_an_input_that_went_through_a_shuffle_is_read_once_and_its_failure_is_one_line(
    spark: Any, small_model: Model, tmp_path: Path
) -> None:
    # Under adaptive execution (Spark's default) the summary's partition count, df.rdd.getNumPartitions(),
    # ran the input's shuffle as a job of its own before predict's: the input was read twice, outside
    # predict's job group, and an input that fails there escaped as pyspark's own exception and trace.
    from pyspark.sql import functions as F

    read = spark.sparkContext.accumulator(0)

    def counted(rows: Any) -> Any:
        for row in rows:
            read.add(1)
            yield row

    base = spark.createDataFrame(
        [(i, png_bytes(img)) for i, img in enumerate(small_model.images)], "id long, image binary"
    )
    df = spark.createDataFrame(base.rdd.mapPartitions(counted), base.schema).repartition(5)
    summary = predict(df, small_model.path, output=tmp_path / "out", spark=spark).summary
    assert summary is not None and (summary.rows, summary.errors, summary.partitions) == (40, 0, 5)
    assert read.value == 40
    failing = base.withColumn("checked", F.assert_true(F.col("id") < 0)).repartition(3)
    with pytest.raises(RunError, match=r"^predict: the Spark job failed: .*is not true"):
        predict(failing, small_model.path, output=tmp_path / "failing", spark=spark)
    assert not (tmp_path / "failing").exists()


def test_rows_the_model_scores_nan_or_infinite_are_error_rows_not_class_zero(
    spark: Any, tmp_path: Path
) -> None:
    # The softmax of such scores is NaN, which top-k read as class 0 with a NaN probability and no error.
    import torch

    from deepspark.models import Preprocess

    class LogScores(torch.nn.Module):  # scores: log of the first 10 values, exp above 500
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            v = x.flatten(1)[:, :10]
            return torch.where(v > 500, torch.exp(v), torch.log(v))

    path = tmp_path / "log.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated upstream
        torch.jit.script(LogScores()).save(str(path))
    preprocess = Preprocess(input_shape=(1, 1, 10), mean=(0.0,), std=(1.0,), scale=1.0)
    values = {
        0: [float(i + 1) for i in range(10)],  # fine: class 9
        1: [-1.0] + [1.0] * 9,  # log(-1): NaN
        2: [1000.0] + [1.0] * 9,  # exp(1000): +inf
        3: [0.0] * 10,  # log(0) for every class: -inf everywhere
        4: [0.0] * 9 + [5.0],  # -inf for nine classes, one finite: that one, surely
    }
    df = spark.createDataFrame(list(values.items()), "id long, x array<double>")
    rows = _by(predict(df, path, preprocess=preprocess, spark=spark).dataframe.collect(), "id")
    assert sorted(rows) == list(range(5))
    assert rows[0]["label_index"] == 9 and rows[0]["error"] is None
    for i in (1, 2, 3):
        _assert_error_row(rows[i], "the model's scores for this input are NaN or infinite")
    assert rows[4]["label_index"] == 9 and rows[4]["probability"] == 1.0 and rows[4]["error"] is None


def test_a_column_named_like_an_output_keeps_a_name_of_its_own(spark: Any, small_model: Model) -> None:
    df = spark.createDataFrame(
        [(3, "three", [0.0] * 784)], "label int, input_label string, pixels array<double>"
    )
    row = predict(df, small_model.path, spark=spark).dataframe.collect()[0]
    assert (row["input_input_label"], row["input_label"]) == (3, "three")
    assert row["error"] is None and row["label"] in CLASS_NAMES


def test_a_column_named_like_an_output_in_another_case_is_renamed_too(
    spark: Any, small_model: Model, tmp_path: Path
) -> None:
    # Spark compares names ignoring case: `Label` next to `label` was an ambiguous reference, and the
    # Parquet write failed the job.
    df = spark.createDataFrame(
        [(3, "three", [0.0] * 784)], "Label int, INPUT_label string, pixels array<double>"
    )
    result = predict(df, small_model.path, output=tmp_path / "out", spark=spark)
    assert result.dataframe.columns[:2] == ["input_input_Label", "INPUT_label"]
    row = result.dataframe.select("input_input_label", "input_label", "label", "error").collect()[0]
    assert row[:2] == (3, "three") and row["error"] is None and row["label"] in CLASS_NAMES


def test_a_dataframe_with_two_columns_of_one_name_is_a_config_error(spark: Any, small_model: Model) -> None:
    """A join's two `id` columns failed with Spark's AMBIGUOUS_REFERENCE trace."""
    left = spark.createDataFrame([(1, "x")], "id long, s string")
    right = spark.createDataFrame([(1, [0.0] * 784)], "ID long, pixels array<double>")
    expected = r"data: expected a DataFrame with distinct column names; it has 'id' and 'ID'"
    with pytest.raises(ConfigError, match=expected):
        predict(left.join(right, left.id == right.ID), small_model.path, spark=spark)


def test_an_empty_list_of_labels_is_refused_not_read_as_none(spark: Any, small_model: Model) -> None:
    """labels=[] was taken for no labels at all: the checkpoint's class names were dropped, and the
    labels came out as indices ("3" for "digit-3") without a word."""
    from deepspark.inference import load_model

    with pytest.raises(ConfigError, match="labels: the model has 10 classes but 0 class names were given"):
        load_model(small_model.path, labels=[])
    df = spark.createDataFrame([([0.0] * 784,)], "pixels array<double>")
    with pytest.raises(ConfigError, match="labels: the model has 10 classes but 0 class names were given"):
        predict(df, small_model.path, labels=[], spark=spark)


def test_a_pandas_dataframe_is_named_as_pandas_with_the_way_to_a_spark_one(small_model: Model) -> None:
    # "expected a DataFrame or a path/glob, got DataFrame" named a pandas one by its bare class name.
    import pandas as pd

    with pytest.raises(
        ConfigError,
        match=r"^data: expected a Spark DataFrame or a path/glob, got pandas\.core\.frame\.DataFrame "
        r"\(a pandas DataFrame: make it a Spark one with spark\.createDataFrame\(df\)\)$",
    ):
        predict(pd.DataFrame({"pixels": [[0.0] * 784]}), small_model.path)


def test_column_names_with_dots_spaces_and_backticks_are_kept_as_they_are(
    spark: Any, small_model: Model
) -> None:
    images = small_model.images[:3]
    df = spark.createDataFrame(
        [(i, f"n{i}", i * 10, img.reshape(-1).astype(float).tolist()) for i, img in enumerate(images)],
        "id long, `a.b` string, `c``d e` int, `pix els` array<double>",
    )
    frame = predict(df, small_model.path, spark=spark).dataframe
    assert frame.columns[:3] == ["id", "a.b", "c`d e"]
    rows = _by(frame.collect(), "id")
    expected = reference_probabilities(small_model, images)
    for i in range(3):
        assert (rows[i]["a.b"], rows[i]["c`d e"]) == (f"n{i}", i * 10)
        _assert_matches(rows[i], expected[i], 5)


def test_timestamp_and_other_column_types_are_carried_through(spark: Any, small_model: Model) -> None:
    import datetime
    import decimal

    # A timestamp column failed with a bare AssertionError: the output's Arrow schema had no time zone.
    when = datetime.datetime(2020, 1, 2, 3, 4, 5)
    df = spark.createDataFrame(
        [(when, when, datetime.date(2020, 1, 2), decimal.Decimal("1.25"), {"k": 1}, (1, "s"), [0.0] * 784)],
        "ts timestamp, ntz timestamp_ntz, d date, dec decimal(10,2), m map<string,int>, "
        "st struct<a:int,b:string>, pixels array<double>",
    )
    row = predict(df, small_model.path, input_column="pixels", spark=spark).dataframe.collect()[0]
    assert row[:6] == df.drop("pixels").collect()[0][:]
    assert row["error"] is None and row["label"] in CLASS_NAMES


def test_a_column_arrow_cannot_carry_fails_before_the_model_is_broadcast(
    spark: Any, small_model: Model, tmp_path: Path
) -> None:
    # pyspark keeps each broadcast's value in a file of the context's temporary folder until it is
    # destroyed: a predict that failed there left its model behind, once per call, in a notebook's session.
    broadcasts = Path(spark.sparkContext._temp_dir)
    before = sorted(broadcasts.iterdir())
    df = spark.createDataFrame([([0.0] * 784,)], "pixels array<double>").selectExpr(
        "INTERVAL '1' YEAR AS span", "pixels"
    )
    with pytest.raises(Exception, match="YearMonthIntervalType"):
        predict(df, small_model.path, output=str(tmp_path / "out"), spark=spark)
    assert sorted(broadcasts.iterdir()) == before


def test_timestamps_are_carried_through_in_a_session_time_zone_other_than_utc(
    spark: Any, small_model: Model
) -> None:
    import datetime

    # Spark hands timestamps over in the session's time zone, and pyspark 4 checks they come back in it;
    # pyspark 3.5's to_arrow_schema takes no time zone (every timestamp labelled UTC).
    key = "spark.sql.session.timeZone"
    zone = spark.conf.get(key)
    spark.conf.set(key, "Asia/Tokyo")
    try:
        df = spark.createDataFrame(
            [(datetime.datetime(2020, 1, 2, 3, 4, 5), [0.0] * 784)], "ts timestamp, pixels array<double>"
        )
        row = predict(df, small_model.path, input_column="pixels", spark=spark).dataframe.collect()[0]
        assert row["error"] is None and row["ts"] == df.collect()[0]["ts"]
    finally:
        spark.conf.set(key, zone)


def test_parquet_tensor_column_wrong_shape_is_an_error_row(
    spark: Any, small_model: Model, tmp_path: Path
) -> None:
    images = small_model.images[:6]
    tensors: list[Any] = [img.reshape(-1).astype(float).tolist() for img in images]
    tensors[2] = tensors[2][:700]  # wrong size
    tensors[4] = None
    df = spark.createDataFrame(
        [(i, int(i % 10), t) for i, t in enumerate(tensors)], "id long, label long, pixels array<double>"
    )
    table = tmp_path / "table.parquet"
    df.write.parquet(str(table))
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"class {i}" for i in range(10)) + "\n")
    result = predict(table, small_model.path, labels=labels, top_k=20, spark=spark)
    assert result.summary is None  # lazy: nothing ran yet
    frame = result.dataframe
    assert frame.columns == ["id", "input_label", "label", "label_index", "probability", "top_k", "error"]
    rows = _by(frame.collect(), "id")
    assert len(rows) == 6
    expected = reference_probabilities(small_model, images)
    for i in (0, 1, 3, 5):
        assert rows[i]["error"] is None and rows[i]["input_label"] == i
        assert rows[i]["label"] == f"class {expected[i].argmax()}"
        assert len(rows[i]["top_k"]) == 10  # top_k is capped at the number of classes
    _assert_error_row(rows[2], "wrong tensor size: 700 values, expected 784")
    _assert_error_row(rows[4], "input is null")


def _write_pixel_table(path: Path, images: np.ndarray, ids: range) -> None:
    """A Parquet file at ``path`` (any name: pyarrow's writer) of ``id`` and flat ``pixels`` rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pixels = pa.array([images[i].reshape(-1).tolist() for i in ids], pa.list_(pa.int32()))
    pq.write_table(pa.table({"id": pa.array(ids, pa.int64()), "pixels": pixels}), path)


@pytest.mark.parametrize("layout", ["flat", "partitioned", "file"])
def test_a_hive_table_of_parquet_files_without_a_suffix_is_read_every_row_once(
    spark: Any, small_model: Model, tmp_path: Path, layout: str
) -> None:
    # Hive and MapReduce name their data files `000000_0`, `part-00000`, with no `_SUCCESS`: such a folder
    # was no Parquet table ("holds no image files"), nor was a file of that name ("cannot tell").
    table = tmp_path / "table"
    table.mkdir()
    if layout == "partitioned":
        for label, ids in ((3, range(0, 3)), (4, range(3, 6))):
            (table / f"label={label}").mkdir()
            _write_pixel_table(table / f"label={label}" / "000000_0", small_model.images, ids)
        (table / "label=4" / "000001_0").write_bytes(b"")  # an empty bucket: Hive writes zero-byte files
        expected_ids = {0: 3, 1: 3, 2: 3, 3: 4, 4: 4, 5: 4}
    else:
        _write_pixel_table(table / "000000_0", small_model.images, range(0, 4))
        _write_pixel_table(table / "part-00000", small_model.images, range(4, 6))
        (table / "000001_0").write_bytes(b"")
        expected_ids = dict.fromkeys(range(6) if layout == "flat" else range(4))
    data = table / "000000_0" if layout == "file" else table
    result = predict(data, small_model.path, output=tmp_path / "out", spark=spark)
    rows = result.dataframe.collect()
    assert sorted(row["id"] for row in rows) == sorted(expected_ids)  # each row once
    expected = reference_probabilities(small_model, small_model.images)
    for row in rows:
        _assert_matches(row, expected[row["id"]], 5)
        if layout == "partitioned":  # the partition column comes through, renamed as an output's name
            assert row["input_label"] == expected_ids[row["id"]]


@pytest.mark.parametrize("stray", ["x.png", "notes.txt", "truncated.parquet"])
def test_a_parquet_table_holding_a_file_that_is_not_parquet_is_refused_before_any_job(
    spark: Any, small_model: Model, tmp_path: Path, capsys: pytest.CaptureFixture[str], stray: str
) -> None:
    # Spark reads every file of the folder as Parquet: the job failed on the stray file (a Java trace
    # for a lazy result, exit 1 after a job for the CLI).
    data = tmp_path / "table"
    (data / "label=1").mkdir(parents=True)
    _write_pixel_table(data / "label=1" / "part-0.parquet", small_model.images, range(3))
    (data / "_SUCCESS").write_bytes(b"")
    (data / "label=1" / ".part-0.parquet.crc").write_bytes(b"not read")
    (data / "label=1" / stray).write_bytes(
        png_bytes(small_model.images[0]) if stray == "x.png" else b"PAR1 cut"
    )
    line = _refused_by_the_cli(spark, small_model, data, capsys)
    assert line.startswith(
        f"deepspark: error: data: {str(data)!r} is a Parquet table (_SUCCESS, ...), but "
        f"label=1/{stray} in it is not a Parquet file"
    )
    assert ("name them with a glob" in line) == (stray == "x.png")


@pytest.mark.parametrize("layout", ["two-layouts", "no-footer"])
def test_a_table_spark_refuses_to_read_on_the_driver_is_one_line_not_a_trace(
    spark: Any, small_model: Model, tmp_path: Path, capsys: pytest.CaptureFixture[str], layout: str
) -> None:
    # Spark's AnalysisException-like errors while it planned the read came out as a Python and Java trace.
    from deepspark.cli import main

    data = tmp_path / "table"
    if layout == "two-layouts":  # a partition folder beside a plain one: Spark's conflicting structures
        for folder in ("label=1", "other"):
            (data / folder).mkdir(parents=True)
            _write_pixel_table(data / folder / "part-0.parquet", small_model.images, range(2))
        (data / "_SUCCESS").write_bytes(b"")
        cause = "Conflicting directory structures"  # pyspark 3.5 gives no error class for it
    else:  # both magics, nothing readable between them: Spark reads the footer for the schema
        data.mkdir()
        (data / "part-0.parquet").write_bytes(b"PAR1" + bytes(16) + b"PAR1")
        cause = "CANNOT_READ_FILE_FOOTER] "  # [FAILED_READ_FILE.CANNOT_...] (4.0), [CANNOT_...] (3.5)
    out = tmp_path / "preds"
    assert (
        main(["predict", "--model", str(small_model.path), "--input", str(data), "--output", str(out)]) == 2
    )
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("deepspark:")]
    assert len(err) == 1 and err[0].startswith(f"deepspark: error: data: Spark cannot read {str(data)!r}: ")
    assert cause in err[0]
    assert not out.exists()


def test_urls_served_missing_and_refused(
    spark: Any, small_model: Model, http_server: Server, closed_port: int, tmp_path: Path
) -> None:
    for i in range(4):
        (http_server.root / f"u{i}.png").write_bytes(png_bytes(small_model.images[i]))
    urls = [f"{http_server.url}/u{i}.png" for i in range(4)] + [
        f"{http_server.url}/no-such.png",
        f"http://127.0.0.1:{closed_port}/x.png",
        "ftp://127.0.0.1/x.png",
    ]
    url_file = tmp_path / "urls.txt"
    # Windows line ends, and blank lines of spaces or tabs: those were rows "unsupported URL scheme (none)".
    url_file.write_bytes(("\r\n".join(urls) + "\r\n\t\r\n \t \n\n").encode())
    result = predict(url_file, small_model.path, output=tmp_path / "out", url_policy=FAST_URLS, spark=spark)
    rows = _by(result.dataframe.collect(), "url")
    assert len(rows) == len(urls)
    expected = reference_probabilities(small_model, small_model.images[:4])
    for i in range(4):
        _assert_matches(rows[urls[i]], expected[i], 5)
    _assert_error_row(rows[urls[4]], "HTTP 404")
    _assert_error_row(rows[urls[5]], "cannot fetch")
    _assert_error_row(rows[urls[6]], "unsupported URL scheme")
    assert result.summary is not None and result.summary.errors == 3


def test_a_glob_in_a_directory_matches_one_level_like_a_shell(
    spark: Any, small_model: Model, tmp_path: Path
) -> None:
    root = tmp_path / "tree"
    for rel in ("a/1.png", "b/2.png", "b/deep/3.png", "top.png", "b/notes.txt"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(png_bytes(small_model.images[0]))
    rows = predict(f"{root}/*/*.png", small_model.path, spark=spark).dataframe.collect()
    assert sorted(r["path"].split("/tree/", 1)[1] for r in rows) == ["a/1.png", "b/2.png"]
    assert all(r["error"] is None for r in rows)
    # Hadoop's {x,y} alternatives, in the directories and in the file name, read as Spark reads them.
    rows = predict(f"{root}/{{a,b,none}}/{{1,2}}.png", small_model.path, spark=spark).dataframe.collect()
    assert sorted(r["path"].split("/tree/", 1)[1] for r in rows) == ["a/1.png", "b/2.png"]
    rows = predict(f"{root}/{{b,b/deep}}/*.png", small_model.path, spark=spark).dataframe.collect()
    assert sorted(r["path"].split("/tree/", 1)[1] for r in rows) == ["b/2.png", "b/deep/3.png"]
    with pytest.raises(ConfigError, match="no files match"):
        predict(f"{root}/{{x,y}}/*.png", small_model.path, spark=spark)
    notes = root.parent / "notes"  # a folder with no image in it: an error, as an empty glob is
    (notes / "sub").mkdir(parents=True)
    (notes / "sub" / "read.txt").write_text("not an image")
    with pytest.raises(ConfigError, match="holds no image files"):
        predict(str(notes), small_model.path, spark=spark)


@pytest.mark.parametrize("form", ["glob", "dir-glob", "dir"])
def test_a_subfolder_named_like_a_partition_neither_hides_nor_joins_a_globs_files(
    spark: Any, small_model: Model, tmp_path: Path, form: str
) -> None:
    # Spark took `in/label=3` for a partition of a table: `in/*.png` gave in/label=3/b.png, which it
    # does not match, and left out every file it matches.
    root = tmp_path / "tree" / "in"
    top = ["a.png", "x[1] {a,b}?.png", "t:1.png", "_u.png", "empty.png", "broken.png"]
    for i, rel in enumerate([*top[:4], "label=3/b.png", "notes.txt"]):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(png_bytes(small_model.images[i]))
    (root / "empty.png").write_bytes(b"")
    (root / "broken.png").symlink_to(tmp_path / "gone.png")
    data, names = {
        "glob": (f"{root}/*.png", top),
        "dir-glob": (f"{root.parent}/*/*.png", top),
        "dir": (root, [*top, "label=3/b.png"]),
    }[form]
    rows = {
        r["path"].split("/in/", 1)[1]: r
        for r in predict(data, small_model.path, spark=spark).dataframe.collect()
    }
    assert sorted(rows) == sorted(names)
    assert all(r["path"].startswith(f"file:{root}/") for r in rows.values())
    expected = reference_probabilities(small_model, small_model.images[:5])
    for i, name in enumerate([*top[:4], "label=3/b.png"]):
        if name in names:
            _assert_matches(rows[name], expected[i], 5)
    _assert_error_row(rows["empty.png"], "empty input (0 bytes)")
    _assert_error_row(rows["broken.png"], "broken.png: No such file or directory")


@pytest.mark.parametrize("form", ["dir", "table", "dir-glob"])
def test_folders_named_with_glob_characters_are_read_as_named(
    spark: Any, small_model: Model, tmp_path: Path, form: str
) -> None:
    # A folder `imgs [a]` matched nothing as a glob ("no files match"), and Spark globbed the folders
    # deepspark had listed: `*/*.png` read b1/q.png twice (as b1 and as b[1]) and b[1]/p.png not at all.
    root = tmp_path / "imgs [a]"
    for i, rel in enumerate(["a.png", "x{1}/b[2].png", "_h[1]/c.png", "b1/q.png"]):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(png_bytes(small_model.images[i]))
    expected = reference_probabilities(small_model, small_model.images[:4])
    if form == "table":
        table = tmp_path / "table {1}"
        table.mkdir()
        _write_pixel_table(table / "part-0.parquet", small_model.images, range(4))
        rows = _by(predict(table, small_model.path, spark=spark).dataframe.collect(), "id")
        assert sorted(rows) == [0, 1, 2, 3]
        for i in range(4):
            _assert_matches(rows[i], expected[i], 5)
        return
    data = root if form == "dir" else f"{glob_escape(str(root))}/*/*.png"
    rows = {
        r["path"].split("/imgs [a]/", 1)[1]: r
        for r in predict(data, small_model.path, spark=spark).dataframe.collect()
    }
    names = ["x{1}/b[2].png", "_h[1]/c.png", "b1/q.png"]
    assert sorted(rows) == sorted(["a.png", *names] if form == "dir" else names)
    for name, row in rows.items():
        _assert_matches(row, expected[["a.png", *names].index(name)], 5)


def test_a_double_star_before_a_directory_matches_only_under_that_directory(
    spark: Any, small_model: Model, tmp_path: Path
) -> None:
    root = tmp_path / "tree"
    for rel in ("top.png", "a/1.png", "a/deep/2.png", "b/deep/3.png", "b/4.png", "sa/x/5.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(png_bytes(small_model.images[0]))

    def names(pattern: str) -> list[str]:
        rows = predict(f"{root}/{pattern}", small_model.path, spark=spark).dataframe.collect()
        return sorted(r["path"].split("/tree/", 1)[1] for r in rows)

    # As Python's glob (and a shell with globstar) reads them: '**' is any number of directories.
    assert names("**/deep/*.png") == ["a/deep/2.png", "b/deep/3.png"]
    assert names("a*/**/*.png") == ["a/1.png", "a/deep/2.png"]
    everything = ["a/1.png", "a/deep/2.png", "b/4.png", "b/deep/3.png", "sa/x/5.png", "top.png"]
    assert names("**/*.png") == everything


def test_alternatives_naming_one_directory_twice_give_each_file_once(
    spark: Any, small_model: Model, tmp_path: Path
) -> None:
    root = tmp_path / "tree"
    for rel in ("a/1.png", "a/2.png", "b/3.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(png_bytes(small_model.images[0]))
    for pattern in ("{a,a/}/*.png", "{a,./a}/*.png", "{a,b/../a}/*.png"):
        rows = predict(f"{root}/{pattern}", small_model.path, spark=spark).dataframe.collect()
        assert sorted(Path(r["path"]).name for r in rows) == ["1.png", "2.png"], pattern


def test_a_failed_run_leaves_the_previous_output_and_no_new_folder(
    spark: Any, small_model: Model, tmp_path: Path
) -> None:
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    def pixels(i):  # type: ignore[no-untyped-def]  # no hints: pyspark would read them as a pandas UDF
        if i == 7:
            raise ValueError("this row's source fails")
        return [0.0] * 784

    good = spark.range(5).select("id", F.lit([0.0] * 784).cast("array<double>").alias("pixels"))
    failing = spark.range(10).select("id", F.udf(pixels, T.ArrayType(T.DoubleType()))("id").alias("pixels"))
    out = tmp_path / "out"
    predict(good, small_model.path, output=out, spark=spark)
    with pytest.raises(Exception, match="this row's source fails"):
        predict(failing, small_model.path, output=out, overwrite=True, spark=spark)
    assert spark.read.parquet(str(out)).count() == 5  # the earlier predictions are still there
    with pytest.raises(Exception, match="this row's source fails"):
        predict(failing, small_model.path, output=tmp_path / "new", spark=spark)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing half-written
    # An input overwritten by its own predictions is read in full first.
    table = tmp_path / "table"
    good.write.parquet(str(table))
    assert predict(table, small_model.path, output=table, overwrite=True, spark=spark).dataframe.count() == 5


def test_an_output_another_command_wrote_meanwhile_is_not_replaced_without_overwrite(
    spark: Any, small_model: Model, tmp_path: Path
) -> None:
    # Two predicts into one new output: both found it free, and the second to finish moved the first's
    # predictions aside and deleted them, without --overwrite; the first's returned DataFrame then read
    # the second's rows. The one that finds the output taken now refuses and leaves it as it is.
    from pyspark.sql import functions as F

    data = spark.range(5).select("id", F.lit([0.0] * 784).cast("array<double>").alias("pixels"))
    out = tmp_path / "out"

    def the_other_command_writes(progress: PredictProgress) -> None:
        if not out.exists():
            out.mkdir()
            (out / "part-other.parquet").write_bytes(b"the other command's predictions")

    with pytest.raises(ConfigError, match="was written by another command while these predictions were made"):
        predict(data, small_model.path, output=out, progress=the_other_command_writes, spark=spark)
    assert [p.name for p in out.iterdir()] == ["part-other.parquet"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left
    shutil.rmtree(out)
    assert predict(data, small_model.path, output=out, spark=spark).dataframe.count() == 5


def test_a_broadcast_that_cannot_be_destroyed_loses_no_predictions(
    spark: Any, small_model: Model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model's broadcast was destroyed in a ``finally`` before the finished predictions were moved
    from their hidden staging folder into place: a destroy that failed (a JVM ending under a SIGTERM sent
    to the process group) lost the finished output and left the staging folder behind, with a traceback."""
    from pyspark import Broadcast  # pyspark.core.broadcast's from 4.0; 3.5 has no pyspark.core
    from pyspark.sql import functions as F

    def ending(self: Any, blocking: bool = False) -> None:
        raise RuntimeError("Answer from Java side is empty")

    monkeypatch.setattr(Broadcast, "destroy", ending)
    rows = spark.range(5).select("id", F.lit([0.0] * 784).cast("array<double>").alias("pixels"))
    out = tmp_path / "out"
    predict(rows, small_model.path, output=out, spark=spark)
    assert spark.read.parquet(str(out)).count() == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left


def test_overwrite_replaces_only_an_earlier_output_never_the_images_or_the_model(
    spark: Any, small_model: Model, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--output` naming the image folder, a folder above it or the model's, with `--overwrite`, replaced
    them with the predictions after the job: the user's images or model, gone."""
    from deepspark.cli import main

    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    for i in range(3):
        (images / f"{i}.png").write_bytes(png_bytes(small_model.images[i]))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    hive = tmp_path / "warehouse" / "t"  # a Hive table (read as an input) is no earlier predict output
    (hive / "label=1").mkdir(parents=True)
    _write_pixel_table(hive / "label=1" / "000000_0", small_model.images, range(2))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    cases = [
        (images, images, f"output: {images} holds the input ({images})"),
        (images, tmp_path / "data", f"output: {tmp_path / 'data'} holds the input ({images})"),
        (f"{images}/*.png", tmp_path / "data", f"output: {tmp_path / 'data'} holds the input ({images})"),
        (images, small_model.path.parent, "holds the model"),
        (
            images,
            tmp_path / "notes",
            f"output: {tmp_path / 'notes'} exists and is not an earlier predict output",
        ),
        (images, hive, f"output: {hive} exists and is not an earlier predict output"),
    ]
    for data, output, message in cases:
        jobs = len(spark.sparkContext.statusTracker().getJobIdsForGroup())
        with pytest.raises(ConfigError, match=re.escape(message)):
            predict(str(data), small_model.path, output=output, overwrite=True, spark=spark)
        assert len(spark.sparkContext.statusTracker().getJobIdsForGroup()) == jobs  # before any job
    argv = ["predict", "--model", str(small_model.path), "--input", str(images), "--output", str(images)]
    assert main([*argv, "--overwrite"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"deepspark: error: output: {images} holds the input"), err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing replaced
    # An earlier output, and an empty folder, are still replaced.
    out = tmp_path / "out"
    out.mkdir()
    for _ in range(2):
        result = predict(str(images), small_model.path, output=out, overwrite=True, spark=spark)
        assert result.dataframe.count() == 3


def test_only_an_array_of_numbers_is_a_tensor_column(spark: Any, small_model: Model) -> None:
    # A predictions table has one array column, top_k (of structs): it was taken for the input, and every
    # row was an error row ('wrong tensor shape'), exit 0.
    df = spark.createDataFrame(
        [("a", [("7", 0.9)], [[0.0] * 28] * 28)],
        "path string, top_k array<struct<label:string,probability:float>>, pixels array<array<double>>",
    )
    row = predict(df, small_model.path, spark=spark).dataframe.collect()[0]
    assert row["error"] is None and row["input_top_k"] == df.collect()[0]["top_k"]
    jobs = len(spark.sparkContext.statusTracker().getJobIdsForGroup())
    with pytest.raises(ConfigError, match=r"no single binary or numeric array column"):
        predict(df.drop("pixels"), small_model.path, spark=spark)
    with pytest.raises(ConfigError, match=r"'top_k' is array<struct<.*expected .* an array of numbers"):
        predict(df, small_model.path, input_column="top_k", spark=spark)
    assert len(spark.sparkContext.statusTracker().getJobIdsForGroup()) == jobs


def test_an_input_column_for_an_input_without_columns_is_refused_not_ignored(
    spark: Any, small_model: Model, tmp_path: Path
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "0.png").write_bytes(png_bytes(small_model.images[0]))
    idx = tmp_path / "idx"
    idx.mkdir()
    _write_idx(idx / "t10k-images-idx3-ubyte", small_model.images[:2])
    urls = tmp_path / "urls.txt"
    urls.write_text("http://127.0.0.1:9/a.png\n")
    for data in (images, f"{images}/*.png", idx, urls):
        jobs = len(spark.sparkContext.statusTracker().getJobIdsForGroup())
        with pytest.raises(ConfigError, match=re.escape("input_column: 'x' names a column of a table, but")):
            predict(str(data), small_model.path, input_column="x", spark=spark)
        assert len(spark.sparkContext.statusTracker().getJobIdsForGroup()) == jobs
    # A table's column, and a .txt list's own `url`, are still taken.
    assert predict(str(urls), small_model.path, input_column="url", spark=spark).dataframe.columns[0] == "url"


def test_images_for_a_model_of_other_than_1_or_3_channels_are_refused_before_any_job(
    spark: Any, small_model: Model, tmp_path: Path
) -> None:
    """Every row was an error row, found at run time: images decode to grey or RGB only."""
    import torch

    from deepspark.models import Preprocess

    path = tmp_path / "two.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated upstream
        torch.jit.script(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32, 3))).save(str(path))
    preprocess = Preprocess(input_shape=(2, 4, 4), mean=(0.0,), std=(1.0,))
    images = tmp_path / "images"
    images.mkdir()
    (images / "0.png").write_bytes(png_bytes(small_model.images[0]))
    jobs = len(spark.sparkContext.statusTracker().getJobIdsForGroup())
    with pytest.raises(ConfigError, match=r"model: its input has 2 channels, but image files decode to 1"):
        predict(str(images), path, preprocess=preprocess, spark=spark)
    assert len(spark.sparkContext.statusTracker().getJobIdsForGroup()) == jobs
    df = spark.createDataFrame([(0, [0.5] * 32)], "id long, x array<double>")  # tensors of 2 channels
    [row] = predict(df, path, preprocess=preprocess, spark=spark).dataframe.collect()
    assert row["error"] is None


def test_brace_alternatives_expand_as_hadoop_globs_read_them() -> None:
    from deepspark.inference._inputs import braces

    assert braces("d/{a,b{1,2}}/*.png") == ["d/a/*.png", "d/b1/*.png", "d/b2/*.png"]
    assert braces("{00,01}/{*.png,*.jpg}") == ["00/*.png", "00/*.jpg", "01/*.png", "01/*.jpg"]
    assert braces("{,x}y") == ["y", "xy"]
    assert braces("no{close") == ["no{close"] and braces("plain/*.png") == ["plain/*.png"]


def test_onnx_backend_and_exported_formats_agree_with_torch(
    spark: Any, small_model: Model, image_dir: Path, tmp_path: Path
) -> None:
    onnx_file = export_model(small_model.path, tmp_path / "model.onnx")
    pt2_file = export_model(small_model.path, tmp_path / "model.pt2")
    pattern = f"{image_dir}/0*.png"
    runs = {
        "torch": predict(pattern, small_model.path, spark=spark),
        "onnx-from-checkpoint": predict(pattern, small_model.path, backend="onnx", spark=spark),
        "onnx-file": predict(pattern, onnx_file, spark=spark),
        "torch.export": predict(pattern, pt2_file, spark=spark),
    }
    reference = _by(runs.pop("torch").dataframe.collect(), "path")
    assert len(reference) == len(small_model.images) // 2
    for name, result in runs.items():
        rows = _by(result.dataframe.collect(), "path")
        assert rows.keys() == reference.keys(), name
        for path, row in rows.items():
            assert row["label"] == reference[path]["label"], name
            assert row["probability"] == pytest.approx(reference[path]["probability"], abs=1e-5), name


def _write_idx(path: Path, array: np.ndarray) -> None:
    dtype_code = 0x08  # unsigned byte
    header = struct.pack(">HBB", 0, dtype_code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_mnist_idx_directory(spark: Any, small_model: Model, tmp_path: Path) -> None:
    images = small_model.images[:12]
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(12) % 10)
    result = predict(tmp_path, small_model.path, output=tmp_path / "out", spark=spark)
    rows = _by(result.dataframe.collect(), "index")
    assert sorted(rows) == list(range(12))
    expected = reference_probabilities(small_model, images)
    for i in range(12):
        assert rows[i]["file"] == "t10k-images-idx3-ubyte" and rows[i]["target"] == i % 10
        _assert_matches(rows[i], expected[i], 5)


def test_an_idx_file_of_no_images_gives_no_rows_not_a_traceback(
    spark: Any, small_model: Model, tmp_path: Path
) -> None:
    # numpy cannot reshape 0 records to (0, -1): a ValueError's traceback instead of an empty output.
    data = tmp_path / "data"
    data.mkdir()
    _write_idx(data / "t10k-images-idx3-ubyte", small_model.images[:0])
    _write_idx(data / "t10k-labels-idx1-ubyte", np.arange(0))
    result = predict(data, small_model.path, output=tmp_path / "out", spark=spark)
    assert result.summary is not None and (result.summary.rows, result.summary.errors) == (0, 0)
    assert result.dataframe.count() == 0
    assert result.dataframe.columns[:3] == ["file", "index", "target"]


def _refused_by_the_cli(spark: Any, model: Model, data: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """``deepspark predict --input data`` exits 2 before any Spark job, with one line on stderr and no
    output written: that line."""
    from deepspark.cli import main

    out = data.parent / "preds"
    jobs_before = len(spark.sparkContext.statusTracker().getJobIdsForGroup())
    assert main(["predict", "--model", str(model.path), "--input", str(data), "--output", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert len(spark.sparkContext.statusTracker().getJobIdsForGroup()) == jobs_before
    assert not out.exists()
    return err[0]


@pytest.mark.parametrize("labels", [11, 13])
def test_an_idx_labels_file_holding_another_count_is_refused_before_any_job(
    spark: Any, small_model: Model, tmp_path: Path, capsys: pytest.CaptureFixture[str], labels: int
) -> None:
    # Every row's target was null, without a word: refused as training refuses it, naming both files and
    # both counts (the headers'), before any job and with nothing written.
    data = tmp_path / "data"
    data.mkdir()
    _write_idx(data / "t10k-images-idx3-ubyte", small_model.images[:12])
    _write_idx(data / "t10k-labels-idx1-ubyte", np.arange(labels) % 10)
    message = f"{data}/t10k-images-idx3-ubyte holds 12 images but {data}/t10k-labels-idx1-ubyte holds {labels} labels"
    with pytest.raises(DatasetError, match=re.escape(message)):
        predict(data, small_model.path, spark=spark)
    assert _refused_by_the_cli(spark, small_model, data, capsys) == (
        f"deepspark: error: {message}; expected one label per image: fix or replace whichever file is wrong"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # nothing written


@pytest.mark.parametrize("shape", [(12, 14, 56), (12, 32, 32), (12, 3, 28, 28)])
def test_idx_images_of_another_shape_than_the_models_input_are_refused_before_any_job(
    spark: Any, small_model: Model, tmp_path: Path, capsys: pytest.CaptureFixture[str], shape: tuple[int, ...]
) -> None:
    # Raw records were reshaped by their size alone: 14x56 images (784 bytes) were predicted as 28x28 ones
    # without a word, and 32x32 ones made every row an error, at run time. The header tells on the driver.
    data = tmp_path / "data"
    data.mkdir()
    _write_idx(data / "t10k-images-idx3-ubyte", np.zeros(shape, dtype=np.uint8))
    message = (
        f"data: {data}/t10k-images-idx3-ubyte holds images of shape {list(shape[1:])}, but the model's "
        "input is [1, 28, 28] (C, H, W) and raw pixels are not resized"
    )
    with pytest.raises(ConfigError, match=re.escape(message)):
        predict(data, small_model.path, spark=spark)
    assert _refused_by_the_cli(spark, small_model, data, capsys).startswith(f"deepspark: error: {message}")


def test_raw_pixels_of_the_models_input_shape_pass_in_any_layout_to_dataframe_records(
    spark: Any, small_model: Model, tmp_path: Path
) -> None:
    from deepspark.data import to_dataframe

    images = small_model.images[:4]
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", images[:, None])  # [N, 1, 28, 28]
    expected = reference_probabilities(small_model, images)
    rows = _by(predict(tmp_path, small_model.path, spark=spark).dataframe.collect(), "index")
    for flat in (False, True):
        df = to_dataframe(spark, images.reshape(4, -1) if flat else images)
        by_id = _by(predict(df, small_model.path, spark=spark).dataframe.collect(), "id")
        for i in range(4):
            _assert_matches(rows[i], expected[i], 5)
            _assert_matches(by_id[i], expected[i], 5)
    with pytest.raises(ConfigError, match=re.escape("data: column 'image' holds images of shape [14, 56]")):
        predict(to_dataframe(spark, images.reshape(4, 14, 56)), small_model.path, spark=spark)


def test_an_idx_file_beside_its_gz_copy_is_predicted_once_from_the_copy_training_reads(
    spark: Any, small_model: Model, tmp_path: Path
) -> None:
    # Both copies were read: every image came twice (rows told apart only by `file`). Training's loader
    # reads the raw one (deepspark.data.files.find_file), and so does predict now.
    from deepspark.data import write_idx

    images = small_model.images[:12]
    for name in ("t10k-images-idx3-ubyte", "t10k-images-idx3-ubyte.gz", "t10k-images.idx3-ubyte.gz"):
        write_idx(tmp_path / name, images)
    for name in ("t10k-labels-idx1-ubyte", "t10k-labels-idx1-ubyte.gz"):
        write_idx(tmp_path / name, (np.arange(12) % 10).astype(np.uint8))
    rows = predict(tmp_path, small_model.path, spark=spark).dataframe.collect()
    assert len(rows) == 12
    assert {(r["file"], r["index"], r["target"]) for r in rows} == {
        ("t10k-images-idx3-ubyte", i, i % 10) for i in range(12)
    }


def test_a_directory_holding_idx_files_and_image_files_is_refused_naming_how_to_pick_one(
    spark: Any, small_model: Model, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The IDX files were read and the images left out, without a word.
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    _write_idx(data / "t10k-images-idx3-ubyte", small_model.images[:12])
    _write_idx(data / "t10k-labels-idx1-ubyte", np.arange(12) % 10)
    (data / "sub" / "seven.png").write_bytes(png_bytes(small_model.images[0]))
    with pytest.raises(
        ConfigError, match=r"holds both MNIST-layout IDX files \(t10k-images-idx3-ubyte\) and image"
    ):
        predict(data, small_model.path, spark=spark)
    assert _refused_by_the_cli(spark, small_model, data, capsys) == (
        f"deepspark: error: data: {str(data)!r} holds both MNIST-layout IDX files (t10k-images-idx3-ubyte) and "
        f"image files (sub/seven.png, ...); name the kind to predict: an IDX images file "
        f"({str(data / 't10k-images-idx3-ubyte')!r}) or a glob of the images ({str(data / '**' / '*.png')!r})"
    )
    # Either way the message names reads that kind alone.
    assert predict(data / "t10k-images-idx3-ubyte", small_model.path, spark=spark).dataframe.count() == 12
    images = predict(f"{data}/**/*.png", small_model.path, spark=spark).dataframe.collect()
    assert [Path(r["path"]).name for r in images] == ["seven.png"]


def test_an_idx_images_file_that_is_not_uint8_is_refused_as_training_refuses_it(
    spark: Any, small_model: Model, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Predict cast it to uint8: float pixels in [0, 1] became black images, predicted without a word.
    from deepspark.data import write_idx

    data = tmp_path / "data"
    data.mkdir()
    write_idx(data / "t10k-images-idx3-ubyte", small_model.images[:12].astype(np.float32) / 255)
    write_idx(data / "t10k-labels-idx1-ubyte", (np.arange(12) % 10).astype(np.uint8))
    message = "t10k-images-idx3-ubyte: images must be uint8 with 3 ([N,H,W]) or 4 ([N,C,H,W]) dimensions; got float32"
    with pytest.raises(DatasetError, match=re.escape(message)):
        predict(data, small_model.path, spark=spark)
    assert _refused_by_the_cli(spark, small_model, data, capsys).startswith(
        f"deepspark: error: {data}/{message}"
    )
    # Labels that are not integers: refused too (they were cast to int64).
    write_idx(data / "t10k-images-idx3-ubyte", small_model.images[:12])
    write_idx(data / "t10k-labels-idx1-ubyte", (np.arange(12) % 10).astype(np.float32) + 0.5)
    with pytest.raises(DatasetError, match="labels must be a 1-D integer array; got float32"):
        predict(data / "t10k-images-idx3-ubyte", small_model.path, spark=spark)


def test_a_directory_holding_idx_files_and_a_parquet_table_is_refused(
    spark: Any, small_model: Model, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The IDX files were read and the table left out, without a word.
    data = tmp_path / "data"
    data.mkdir()
    _write_idx(data / "t10k-images-idx3-ubyte", small_model.images[:12])
    _write_idx(data / "t10k-labels-idx1-ubyte", np.arange(12) % 10)
    (data / "part-00000.parquet").write_bytes(b"PAR1")
    assert _refused_by_the_cli(spark, small_model, data, capsys) == (
        f"deepspark: error: data: {str(data)!r} holds both MNIST-layout IDX files (t10k-images-idx3-ubyte) and "
        f"a Parquet table (part-00000.parquet, ...); to predict the IDX images, name the file "
        f"({str(data / 't10k-images-idx3-ubyte')!r}); to predict the table, move it to a directory of its own"
    )
    assert predict(data / "t10k-images-idx3-ubyte", small_model.path, spark=spark).dataframe.count() == 12


def test_a_dataframe_of_raw_pixels_from_to_dataframe_is_predicted(spark: Any, small_model: Model) -> None:
    # Training reads to_dataframe's image column as the raw pixels its metadata says; predict read it as
    # image files, and every row was an error ("cannot decode image").
    from deepspark.data import to_dataframe

    images = small_model.images[:6]
    df = to_dataframe(spark, images, np.arange(6) % 10)
    rows = _by(predict(df, small_model.path, spark=spark).dataframe.collect(), "id")
    expected = reference_probabilities(small_model, images)
    assert sorted(rows) == list(range(6))
    for i in range(6):
        assert rows[i]["input_label"] == i % 10
        _assert_matches(rows[i], expected[i], 5)


def test_parameters_are_checked_before_any_job(
    spark: Any, small_model: Model, image_dir: Path, tmp_path: Path
) -> None:
    data = f"{image_dir}/*.png"
    bad: list[tuple[dict[str, Any], str]] = [
        ({"top_k": 0}, "top_k"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"backend": "tensorflow"}, "backend"),
        ({"device": "gpu"}, r"device: expected one of \['auto', 'cpu', 'cuda'\], got 'gpu'"),
        ({"progress": "bar"}, "progress: expected a callable"),
        ({"labels": ["a", "b"]}, "10 classes but 2"),
        ({"output": image_dir}, "already exists"),
        ({"input_column": "nope"}, "input_column"),
    ]
    jobs_before = len(spark.sparkContext.statusTracker().getJobIdsForGroup())
    for kwargs, match in bad:
        with pytest.raises(ConfigError, match=match):
            predict(
                data if "input_column" not in kwargs else spark.range(3),
                small_model.path,
                spark=spark,
                **kwargs,
            )
    with pytest.raises(ConfigError, match="model"):
        predict(data, tmp_path / "missing", spark=spark)
    with pytest.raises(ConfigError, match="no files match"):
        predict(f"{tmp_path}/*.png", small_model.path, spark=spark)
    assert len(spark.sparkContext.statusTracker().getJobIdsForGroup()) == jobs_before


def test_cli_runs_predict_and_prints_the_summary(
    spark: Any, small_model: Model, image_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser(prog="deepspark")
    add_predict_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "preds.parquet"
    args = parser.parse_args(
        [
            *("predict", "--model", str(small_model.path), "--input", f"{image_dir}/0*.png"),
            *("--output", str(out), "--top-k", "2", "--batch-size", "16", "--master", "local[2]"),
        ]
    )
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "rows/s" in printed and "model loads" in printed
    assert spark.read.parquet(str(out)).count() == len(small_model.images) // 2


def test_cli_predict_json_prints_one_object_on_stdout(
    spark: Any, small_model: Model, image_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from deepspark.cli import main

    out = tmp_path / "preds.parquet"
    argv = _predict_argv(small_model, image_dir, out)
    assert main([*argv, "--top-k", "2", "--json", "--conf", "spark.ignored.here=1"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["rows"] == len(small_model.images) // 2 and summary["errors"] == 0
    assert summary["output"] == str(out) and "forward" in summary["phase_seconds"]
    assert "rows/s" in captured.err  # the table went to stderr


def test_cli_device_cuda_where_spark_assigns_no_gpu_is_refused_before_the_job(
    spark: Any, small_model: Model, image_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--device cuda with no spark.task.resource.gpu.amount: every task would fail alike, so it is a usage
    error on one line before any job (exit 2), and no output is left. (A job that does fail is exit 1 with
    its cause on one line: tests/test_gpu_plumbing.py, where Spark assigns GPUs CUDA cannot use.)"""
    from deepspark.cli import main

    out = tmp_path / "preds"
    argv = _predict_argv(small_model, image_dir, out)
    assert main([*argv, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert errors == [line for line in err.splitlines() if line.strip()], err
    assert re.match(
        r"deepspark: error: device 'cuda': Spark assigns tasks no GPU \(spark.task.resource", errors[0]
    )
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".preds")]


@pytest.mark.slow
def test_ctrl_c_exits_130_with_one_line_and_leaves_no_output(small_model: Model, tmp_path: Path) -> None:
    """SIGINT to the driver mid-job: the job is cancelled and waited for, the staging folder removed,
    and stderr ends with the one line; no Python or Java trace, no Spark WARN/ERROR line."""
    import signal
    import subprocess
    import sys
    import time

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3000):  # batch size 1: the job takes seconds, so the signal lands inside it
        (images / f"{i:04d}.png").write_bytes(png_bytes(rng.integers(0, 256, (28, 28), dtype=np.uint8)))
    out = tmp_path / "preds"
    command = [sys.executable, "-m", "deepspark", "predict", "--model", str(small_model.path)]
    command += ["--input", str(images), "--output", str(out), "--batch-size", "1", "--backend", "torch"]
    proc = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while not list(tmp_path.glob(".preds.*")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)
        assert proc.poll() is None, "predict ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)  # Ctrl-C, to the driver only
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    lines = [line for line in err.decode(errors="replace").splitlines() if line.strip()]
    assert proc.returncode == 130 and lines[-1] == "deepspark: interrupted", lines[-20:]
    noise = [
        line
        for line in lines
        if "Traceback" in line or " WARN " in line or "ERROR" in line or "\tat " in line
    ]
    assert not noise, noise[:20]
    assert not out.exists() and not list(tmp_path.glob(".preds*"))


@pytest.mark.parametrize(("files", "slices"), [(0, 1), (1, 1), (7, 3), (42, 6), (9000, 2), (9001, 7)])
def test_each_task_over_listed_files_makes_its_own_slice_the_same_each_time(files: int, slices: int) -> None:
    """A task over local files deepspark listed turns its slice number into its share of them: the slices
    together are every file once, in order, within one file of each other in size, and a slice made again
    (a retried or speculative task) is the same rows."""
    from types import SimpleNamespace

    from deepspark.inference._task import listed_files

    listed = SimpleNamespace(value=tuple(f"file:/in/{i:05d}.png" for i in range(files)))
    numbers = [pa.record_batch([pa.array(list(range(slices)), pa.int64())], names=["n"])]

    def rows(batches: list[Any]) -> list[list[str]]:
        out = [b.column(0).to_pylist() for b in listed_files(iter(batches), listed, slices, "_0")]  # type: ignore[arg-type]
        return out

    whole = [p for part in rows(numbers) for p in part]
    assert whole == list(listed.value)
    sizes = [
        sum(len(part) for part in rows([pa.record_batch([pa.array([i], pa.int64())], names=["n"])]))
        for i in range(slices)
    ]
    assert sum(sizes) == files and max(sizes) - min(sizes) <= 1
    again = rows([pa.record_batch([pa.array([slices - 1], pa.int64())], names=["n"])])
    assert [p for part in again for p in part] == list(listed.value)[files - sizes[-1] :]


def test_local_files_are_predicted_in_equal_tasks_a_multiple_of_the_slots(
    spark: Any, small_model: Model, image_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not one task per core (a DataFrame of the paths made on the driver was read so): the progress
    moves as tasks end, and a failed task does its slice again, not half the job. Here tasks of 8 rows."""
    from deepspark.inference import _predict
    from deepspark.spark import total_slots

    monkeypatch.setattr(_predict, "_ROWS_PER_TASK", 8)
    seen: list[PredictProgress] = []
    result = predict(
        f"{image_dir}/**/*.png", small_model.path, output=tmp_path / "o", batch_size=1, progress=seen.append,
        spark=spark,
    )  # fmt: skip
    rows, slots = len(small_model.images) + 2, total_slots(spark)
    tasks = slots * math.ceil(rows / (slots * 8))
    assert tasks > slots and result.summary is not None and result.summary.partitions == tasks
    assert seen[-1].tasks_total == tasks and result.summary.rows == rows
    paths = [r["path"] for r in result.dataframe.collect()]
    assert sorted(paths) == sorted(set(paths)) and len(paths) == rows


def test_a_local_file_over_binary_files_max_length_is_an_error_row_not_read(
    spark: Any, small_model: Model, tmp_path: Path
) -> None:
    """A task holds a file's bytes whole while it decodes them: Spark's binaryFile source, which read
    these files before deepspark did, caps a file at spark.sql.sources.binaryFile.maxLength. The cap
    stays, as an error row (binaryFile failed the job)."""
    rng = np.random.default_rng(1)
    small = png_bytes(small_model.images[0])
    large = png_bytes(rng.integers(0, 256, (64, 64), dtype=np.uint8))
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "small.png").write_bytes(small)
    (tmp_path / "in" / "large.png").write_bytes(large)
    key = "spark.sql.sources.binaryFile.maxLength"
    spark.conf.set(key, str(len(small)))
    try:
        result = predict(tmp_path / "in", small_model.path, output=tmp_path / "o", spark=spark)
    finally:
        spark.conf.unset(key)
    rows = {Path(r["path"]).name: r for r in result.dataframe.collect()}
    assert rows["small.png"]["error"] is None
    _assert_matches(rows["small.png"], reference_probabilities(small_model, small_model.images[:1])[0], 5)
    assert rows["large.png"]["label"] is None and rows["large.png"]["error"] == (
        f"{tmp_path}/in/large.png holds {len(large)} bytes, more than the {len(small)} that {key} allows; "
        "raise it to read the file"
    )


def test_progress_reports_rows_and_tasks_and_leaves_the_results_alone(
    spark: Any, small_model: Model, image_dir: Path, tmp_path: Path
) -> None:
    seen: list[PredictProgress] = []
    data = f"{image_dir}/**/*.png"
    watched = predict(
        data, small_model.path, output=tmp_path / "a", batch_size=4, progress=seen.append, spark=spark
    )
    plain = predict(data, small_model.path, output=tmp_path / "b", batch_size=4, spark=spark)
    assert watched.summary is not None and plain.summary is not None

    rows = len(small_model.images) + 2
    last = seen[-1]
    assert last.finished and [p.finished for p in seen].count(True) == 1
    assert (last.rows_done, last.rows_total) == (rows, rows)
    assert last.tasks_done == last.tasks_total == watched.summary.partitions
    assert all(
        a.rows_done <= b.rows_done and a.tasks_done <= b.tasks_done for a, b in itertools.pairwise(seen)
    )
    assert spark.sparkContext.getLocalProperty("spark.jobGroup.id") is None  # the job group was restored

    def table(result: Any) -> list[tuple[Any, ...]]:
        return sorted(
            (r["path"], r["label"], r["probability"], r["error"]) for r in result.dataframe.collect()
        )

    assert table(watched) == table(plain)


def test_cli_progress_logs_lines_without_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    import io
    import logging

    from rich.console import Console

    from deepspark.inference._cli import _Progress

    draw = _Progress(Console(file=io.StringIO()))  # not a terminal: log lines, no bar
    with caplog.at_level(logging.INFO, logger="deepspark.predict"):
        draw(PredictProgress(0, 100, 0, 4, 0.5))  # nothing finished yet: no line
        draw(PredictProgress(25, 100, 1, 4, 6.0))
        draw(PredictProgress(50, 100, 2, 4, 7.0))  # within 5 s of the last line: skipped
        draw(PredictProgress(100, 100, 4, 4, 8.0, finished=True))
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "predict: 25/100 rows, 1/4 tasks (6.0 s)",
        "predict: 100/100 rows, 4/4 tasks (8.0 s) done",
    ]
