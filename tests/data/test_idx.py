"""IDX reading and writing: round trips and every way a file can be corrupt."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from deepspark.data import read_idx, write_idx
from deepspark.data.idx import read_idx_shape
from deepspark.errors import ConfigError, DatasetError


def _images(n: int = 5, h: int = 4, w: int = 3) -> np.ndarray:
    return np.arange(n * h * w, dtype=np.uint8).reshape(n, h, w)


@pytest.mark.parametrize("name", ["images-idx3-ubyte", "images-idx3-ubyte.gz"])
def test_round_trip_raw_and_gzip(tmp_path: Path, name: str) -> None:
    images = _images()
    path = write_idx(tmp_path / name, images)
    raw = path.read_bytes()
    assert (raw[:2] == b"\x1f\x8b") == name.endswith(".gz")
    back = read_idx(path)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, images)
    back[0, 0, 0] = 7  # the caller owns a writable array
    assert back[0, 0, 0] == 7


def test_gzip_detected_by_magic_bytes_not_name(tmp_path: Path) -> None:
    images = _images()
    gz = write_idx(tmp_path / "x.gz", images)
    renamed = tmp_path / "train-images-idx3-ubyte"
    gz.rename(renamed)
    np.testing.assert_array_equal(read_idx(renamed), images)


def test_header_layout_matches_the_mnist_spec(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "labels", np.array([3, 1, 4], dtype=np.uint8))
    assert path.read_bytes() == bytes([0, 0, 8, 1, 0, 0, 0, 3, 3, 1, 4])


@pytest.mark.parametrize(
    "dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64], ids=lambda d: np.dtype(d).name
)
def test_other_idx_dtypes_round_trip_big_endian(tmp_path: Path, dtype: type) -> None:
    values = np.array([[0, 1, -1 if np.dtype(dtype).kind != "u" else 2], [100, 7, 3]], dtype=dtype)
    path = write_idx(tmp_path / "v.idx", values)
    if np.dtype(dtype).itemsize > 1:
        assert path.read_bytes()[12:] == values.astype(np.dtype(dtype).newbyteorder(">")).tobytes()
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.dtype.isnative
    np.testing.assert_array_equal(back, values)


def test_write_refuses_int64_and_too_many_dims(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="dtype"):
        write_idx(tmp_path / "a", np.zeros(3, dtype=np.int64))
    with pytest.raises(ConfigError, match="dimensions"):
        write_idx(tmp_path / "b", np.zeros((1,) * 5, dtype=np.uint8))


def _header(code: int, dims: tuple[int, ...]) -> bytes:
    return bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)


CORRUPT = {
    "bad magic": (b"\x01\x00\x08\x01" + struct.pack(">I", 2) + b"ab", "two zero bytes"),
    "bad type code": (_header(0x07, (2,)) + b"ab", "type code 0x07"),
    "zero dims": (bytes([0, 0, 8, 0]), "0 dimensions"),
    "too many dims": (bytes([0, 0, 8, 5]) + b"\x00" * 20, "5 dimensions"),
    "short header": (bytes([0, 0, 8]), "too short"),
    "header cut in dims": (bytes([0, 0, 8, 3]) + struct.pack(">I", 2), "truncated"),
    "truncated data": (_header(0x08, (10, 28, 28)) + b"\x00" * 1000, "10×28×28 = 7840 bytes.*1000 bytes"),
    "extra bytes": (_header(0x08, (2, 2)) + b"\x00" * 5, "extra bytes"),
    # 2**22 × 2**21 × 2**21 = 2**64 items, which an int64 product wraps to 0: "matching" an empty body.
    "size past int64": (_header(0x08, (2**22, 2**21, 2**21)), "= 18446744073709551616 bytes.*truncated"),
    # ndim says 3 but only two dimensions follow, so the data's first bytes become a dimension.
    "ndim mismatch": (bytes([0, 0, 8, 3]) + struct.pack(">II", 2, 2) + b"\x01\x02\x03\x04", "header says"),
}


@pytest.mark.parametrize("compressed", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_file_raises_naming_the_file(tmp_path: Path, case: str, compressed: bool) -> None:
    blob, pattern = CORRUPT[case]
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(gzip.compress(blob) if compressed else blob)
    with pytest.raises(DatasetError, match=pattern) as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_a_gzip_file_inflating_past_its_header_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    """A small .gz in a user's directory whose stream inflates to far more than its header says (a gzip
    bomb) was decompressed whole into memory before the length check."""
    import tracemalloc

    path = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(_header(0x08, (2, 2, 2)) + bytes(8))
        for _ in range(160):
            f.write(bytes(1 << 20))  # 160 MiB of zeros after the 8 bytes of data: ~160 KiB on disk
    tracemalloc.start()
    try:
        with pytest.raises(
            DatasetError, match=r"= 8 bytes of data but the file holds more than \d+ bytes \(extra"
        ):
            read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak
    small = tmp_path / "small.gz"  # extra bytes under the bound are counted exactly
    small.write_bytes(gzip.compress(_header(0x08, (2, 2)) + bytes(4 + 1000)))
    with pytest.raises(DatasetError, match=r"= 4 bytes of data but the file holds 1004 bytes \(extra"):
        read_idx(small)


def test_corrupt_gzip_stream_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(_header(8, (100,)) + bytes(100))[:-12])
    with pytest.raises(DatasetError, match="gzip") as err:
        read_idx(path)
    assert str(path) in str(err.value)
    with pytest.raises(DatasetError, match="no such file"):
        read_idx(tmp_path / "absent")


@pytest.mark.parametrize("name", ["images-idx3-ubyte", "images-idx3-ubyte.gz"])
def test_read_idx_shape_reads_the_header_only(tmp_path: Path, name: str) -> None:
    path = write_idx(tmp_path / name, _images(n=7))
    assert read_idx_shape(path) == (7, 4, 3)
    # The header alone: a file cut short after it still gives its shape (read_idx refuses it).
    raw = gzip.decompress(path.read_bytes()) if name.endswith(".gz") else path.read_bytes()
    cut = tmp_path / "cut-idx3-ubyte"
    cut.write_bytes(raw[: 4 + 4 * 3 + 5])
    assert read_idx_shape(cut) == (7, 4, 3)
    with pytest.raises(DatasetError, match="truncated"):
        read_idx(cut)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x03")
    with pytest.raises(DatasetError, match="bad: not an IDX file"):
        read_idx_shape(tmp_path / "bad")
