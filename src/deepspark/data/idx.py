"""Reading and writing IDX files, the format MNIST ships in.

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of dimensions), one
big-endian ``uint32`` per dimension, then the data in C order, big-endian. Files are often gzip
compressed; we detect that by the gzip magic bytes (:func:`deepspark.data.files.is_gzip`) rather than
trusting the file name, because mirrors and browsers rename files freely.

A corrupt file is the most common way a training run goes wrong before it starts, so every check
here raises :class:`~deepspark.errors.DatasetError` naming the file and what is wrong with it.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from deepspark.data.files import is_gzip
from deepspark.errors import ConfigError, DatasetError

__all__ = ["read_idx", "read_idx_shape", "write_idx"]

# IDX type code -> big-endian numpy dtype.
_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODES: dict[tuple[str, int], int] = {(dt.kind, dt.itemsize): code for code, dt in _TYPES.items()}
_MAX_NDIM = 4
_EXTRA_COUNTED = 64 << 20  # bytes after a gzip file's data counted for the error message, no more


def _parse_header(path: Path, head: bytes) -> tuple[np.dtype, tuple[int, ...], int]:
    """Validate the magic number and dimensions; return (dtype, shape, header length)."""
    if len(head) < 4:
        raise DatasetError(f"{path}: {len(head)} bytes is too short for an IDX header (need at least 4)")
    zero0, zero1, code, ndim = head[0], head[1], head[2], head[3]
    if zero0 != 0 or zero1 != 0:
        raise DatasetError(
            f"{path}: not an IDX file: the magic number must start with two zero bytes, "
            f"got 0x{zero0:02x} 0x{zero1:02x}"
        )
    if code not in _TYPES:
        known = ", ".join(f"0x{c:02x}" for c in _TYPES)
        raise DatasetError(f"{path}: unknown IDX type code 0x{code:02x} (expected one of {known})")
    if not 1 <= ndim <= _MAX_NDIM:
        raise DatasetError(f"{path}: IDX header says {ndim} dimensions; expected 1 to {_MAX_NDIM}")
    header_len = 4 + 4 * ndim
    if len(head) < header_len:
        raise DatasetError(
            f"{path}: header says {ndim} dimensions ({header_len} header bytes) "
            f"but the file holds only {len(head)} bytes (truncated?)"
        )
    shape = struct.unpack(f">{ndim}I", head[4:header_len])
    return _TYPES[code], tuple(int(d) for d in shape), header_len


def _check_length(
    path: Path, dtype: np.dtype, shape: tuple[int, ...], data_bytes: int, *, at_least: bool = False
) -> None:
    """A DatasetError unless the data is as long as the header says; ``at_least``: ``data_bytes`` is
    where counting stopped (a gzip stream is not decompressed past a bound beyond the data)."""
    expected = _data_bytes(dtype, shape)
    if data_bytes == expected and not at_least:
        return
    dims = "×".join(str(d) for d in shape)
    unit = "" if dtype.itemsize == 1 else f"×{dtype.itemsize}"
    hint = "truncated?" if data_bytes < expected else "extra bytes after the data"
    raise DatasetError(
        f"{path}: header says {dims}{unit} = {expected} bytes of data "
        f"but the file holds {'more than ' if at_least else ''}{data_bytes} bytes ({hint})"
    )


def _data_bytes(dtype: np.dtype, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * dtype.itemsize  # Python ints: a product past 2**63 must not wrap


def _read_gzip(p: Path) -> tuple[np.dtype, tuple[int, ...], bytes]:
    """The header's dtype and shape and the data of a gzip IDX file, decompressing no more than the
    header says plus a bounded count of what follows: a small file that inflates to gigabytes (a gzip
    bomb in a user's directory) is refused as extra bytes, not read into memory."""
    with gzip.open(p, "rb") as f:
        head = f.read(4 + 4 * _MAX_NDIM)
        dtype, shape, header_len = _parse_header(p, head)
        expected = _data_bytes(dtype, shape)
        parts, have = [head[header_len:]], len(head) - header_len
        while have < expected and (
            chunk := f.read(min(1 << 24, expected - have))
        ):  # a header may claim 2**64
            parts.append(chunk)
            have += len(chunk)
        data = b"".join(parts)
        extra = max(0, len(data) - expected)
        while extra <= _EXTRA_COUNTED and (chunk := f.read(1 << 20)):  # counted, not kept
            extra += len(chunk)
    if extra:
        _check_length(p, dtype, shape, expected + extra, at_least=extra > _EXTRA_COUNTED)
    return dtype, shape, data[:expected]


def _native(array: np.ndarray) -> np.ndarray:
    """Return the array in native byte order (a no-op for bytes)."""
    if array.dtype.itemsize == 1 or array.dtype.isnative:
        return array
    return array.astype(array.dtype.newbyteorder("="))


def _gzipped(p: Path) -> bool:
    """Whether the IDX file ``p`` is gzip-compressed (by its magic bytes); a DatasetError when it is
    missing or unreadable."""
    if not p.is_file():
        raise DatasetError(f"{p}: no such file")
    try:
        with open(p, "rb") as f:
            return is_gzip(f.read(2))
    except OSError as exc:
        raise DatasetError(f"{p}: cannot read ({exc})") from exc


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file, raw or gzip-compressed, into a native-endian array.

    Raw files are read with one ``np.fromfile`` call; gzip files are decompressed once into
    memory. Either way the data length must match the header exactly: a truncated download and a
    file with trailing bytes are both errors, since both mean the file is not what we think it is.
    """
    p = Path(path)
    compressed = _gzipped(p)
    try:
        if compressed:
            try:
                dtype, shape, blob = _read_gzip(p)
            except (OSError, EOFError, zlib.error) as exc:
                raise DatasetError(f"{p}: corrupt gzip stream ({exc})") from exc
            _check_length(p, dtype, shape, len(blob))
            array = np.frombuffer(blob, dtype=dtype).reshape(shape)
            # frombuffer views immutable bytes: copy, so callers own a writable array as with raw files.
            return _native(array) if dtype.itemsize > 1 else array.copy()
        with open(p, "rb") as f:
            head = f.read(4 + 4 * _MAX_NDIM)
            dtype, shape, header_len = _parse_header(p, head)
            size = os.fstat(f.fileno()).st_size
            _check_length(p, dtype, shape, size - header_len)
            f.seek(header_len)
            array = np.fromfile(f, dtype=dtype, count=math.prod(shape))
    except OSError as exc:
        raise DatasetError(f"{p}: cannot read ({exc})") from exc
    return _native(array.reshape(shape))


def read_idx_shape(path: str | os.PathLike[str]) -> tuple[int, ...]:
    """The shape an IDX file's header declares (raw or gzip-compressed), reading the header only.

    For checks that must come before reading the data (an images file and its labels file holding
    as many examples as each other); :func:`read_idx` still checks the data against it.
    """
    p = Path(path)
    compressed = _gzipped(p)
    try:
        with gzip.open(p, "rb") if compressed else open(p, "rb") as f:
            head = f.read(4 + 4 * _MAX_NDIM)
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"{p}: {'corrupt gzip stream' if compressed else 'cannot read'} ({exc})") from exc
    return _parse_header(p, head)[1]


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> Path:
    """Write ``array`` as an IDX file (gzip-compressed when ``path`` ends in ``.gz``).

    Supported dtypes are the IDX ones: uint8, int8, int16, int32, float32, float64, with 1 to 4
    dimensions. Labels held as int64 must be cast first (``labels.astype(np.uint8)``): silently
    narrowing them could wrap values. Returns the path written.
    """
    arr = np.asarray(array)
    code = _CODES.get((arr.dtype.kind, arr.dtype.itemsize))
    if code is None:
        names = "uint8, int8, int16, int32, float32, float64"
        raise ConfigError(f"write_idx: array dtype must be one of {names}; got {arr.dtype}")
    if not 1 <= arr.ndim <= _MAX_NDIM:
        raise ConfigError(f"write_idx: array must have 1 to {_MAX_NDIM} dimensions; got shape {arr.shape}")
    if any(d >= 2**32 for d in arr.shape):
        raise ConfigError(f"write_idx: every dimension must be below 2**32; got shape {arr.shape}")
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = np.ascontiguousarray(arr, dtype=_TYPES[code]).tobytes()
    p = Path(path)
    if p.name.endswith(".gz"):
        with open(p, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
            f.write(header)
            f.write(data)
    else:
        with open(p, "wb") as f:
            f.write(header)
            f.write(data)
    return p
