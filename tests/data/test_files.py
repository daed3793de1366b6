"""Dataset file names and compression (deepspark.data.files): spellings, labels next to images, gzip."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import pytest

from deepspark.data.files import (
    GZIP_MAGIC,
    find_file,
    is_gzip,
    labels_file_for,
    preferred_copy,
    raw_stream,
    spellings,
)


def test_is_gzip_reads_the_magic_bytes_not_the_name() -> None:
    packed = gzip.compress(b"\x00\x00\x08\x01payload")
    assert packed[:2] == GZIP_MAGIC and is_gzip(packed) and is_gzip(packed[:2])
    assert not is_gzip(b"\x00\x00\x08\x01") and not is_gzip(b"\x1f") and not is_gzip(b"")
    for body in (packed, b"\x00\x00\x08\x01payload"):
        with raw_stream(io.BytesIO(body)) as stream:
            assert stream.read() == b"\x00\x00\x08\x01payload"


def test_spellings_prefer_the_raw_dashed_name() -> None:
    assert spellings("train-labels-idx1-ubyte") == [
        "train-labels-idx1-ubyte",
        "train-labels-idx1-ubyte.gz",
        "train-labels.idx1-ubyte",
        "train-labels.idx1-ubyte.gz",
    ]
    assert spellings("data_batch_1.bin") == ["data_batch_1.bin", "data_batch_1.bin.gz"]


@pytest.mark.parametrize(
    ("images", "labels"),
    [
        ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte"),
        ("t10k-images.idx3-ubyte", "t10k-labels.idx1-ubyte.gz"),
        ("emnist-letters-test-images-idx3-ubyte.gz", "emnist-letters-test-labels.idx1-ubyte"),
    ],
)
def test_labels_file_for_an_images_file_in_any_spelling(tmp_path: Path, images: str, labels: str) -> None:
    (tmp_path / images).write_bytes(b"")
    assert labels_file_for(tmp_path / images) is None  # no labels file yet
    (tmp_path / labels).write_bytes(b"")
    assert labels_file_for(tmp_path / images) == tmp_path / labels
    assert labels_file_for(str(tmp_path / images)) == tmp_path / labels


def test_labels_file_for_prefers_raw_and_ignores_names_that_are_not_images(tmp_path: Path) -> None:
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "train-labels-idx1-ubyte.gz"):
        (tmp_path / name).write_bytes(b"")
    assert labels_file_for(tmp_path / "train-images-idx3-ubyte") == tmp_path / "train-labels-idx1-ubyte"
    assert find_file(tmp_path, "train-labels-idx1-ubyte") == tmp_path / "train-labels-idx1-ubyte"
    assert labels_file_for(tmp_path / "train-labels-idx1-ubyte") is None
    assert labels_file_for(tmp_path / "pictures.bin") is None


def test_preferred_copy_is_the_spelling_find_file_reads(tmp_path: Path) -> None:
    names = ["t10k-images-idx3-ubyte.gz", "t10k-images.idx3-ubyte", "t10k-images.idx3-ubyte.gz"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    # No raw copy: the .gz comes first, as find_file (training's loader) has it.
    chosen = find_file(tmp_path, "t10k-images-idx3-ubyte")
    assert chosen == tmp_path / "t10k-images-idx3-ubyte.gz"
    assert {preferred_copy(tmp_path / name) for name in names} == {chosen}
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"")
    names.append("t10k-images-idx3-ubyte")
    assert {preferred_copy(str(tmp_path / name)) for name in names} == {tmp_path / "t10k-images-idx3-ubyte"}
    # Names that are no other file's spelling stand for themselves.
    (tmp_path / "other.bin.gz").write_bytes(b"")
    assert preferred_copy(tmp_path / "other.bin.gz") == tmp_path / "other.bin.gz"
    assert preferred_copy(tmp_path / "emnist-images-idx3-ubyte") == tmp_path / "emnist-images-idx3-ubyte"
