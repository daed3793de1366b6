"""How dataset files look on disk: the MNIST-layout names and their spellings, and gzip compression.

Mirrors, browsers and archives rename and compress files freely, so a file is found under any of its
spellings (``-idx`` or ``.idx``, with or without ``.gz``) and gzip is recognised by its magic bytes,
never by the file name. Everything that finds, hashes or reads a dataset file goes through here.
"""

from __future__ import annotations

import contextlib
import gzip
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Protocol

__all__ = [
    "GZIP_MAGIC",
    "MNIST_FILES",
    "Reader",
    "find_file",
    "is_gzip",
    "labels_file_for",
    "open_raw",
    "preferred_copy",
    "raw_stream",
    "spellings",
]

#: The first two bytes of every gzip stream.
GZIP_MAGIC = b"\x1f\x8b"

#: The four files of an MNIST-layout directory, in the order train images, train labels, test
#: images, test labels.
MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

# An images file's name part and its labels file's, in the two spellings.
_IMAGES_TO_LABELS = (("images-idx3", "labels-idx1"), ("images.idx3", "labels-idx1"))


class Reader(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


def is_gzip(head: bytes) -> bool:
    """Whether ``head`` (the first bytes of a file or stream) starts a gzip stream."""
    return head[:2] == GZIP_MAGIC


def spellings(raw_name: str) -> list[str]:
    """The names a file called ``raw_name`` may have, preferred first: raw, ``.gz``, then ``.idx`` forms."""
    dotted = raw_name.replace("-idx", ".idx", 1)
    names = [raw_name, raw_name + ".gz"]
    if dotted != raw_name:
        names += [dotted, dotted + ".gz"]
    return names


def find_file(directory: Path, raw_name: str) -> Path | None:
    """The file standing for ``raw_name`` in ``directory`` (raw preferred over ``.gz``), or None."""
    for candidate in spellings(raw_name):
        path = directory / candidate
        if path.is_file():
            return path
    return None


def preferred_copy(path: str | os.PathLike[str]) -> Path:
    """The file :func:`find_file` reads for the name ``path`` is a spelling of, in ``path``'s directory.

    A directory holding ``X`` and ``X.gz`` (or ``X`` and its ``.idx`` spelling) holds one file twice;
    whoever lists it reads the copy training reads (raw first, :func:`spellings` order), once.
    ``path`` itself when no other spelling of its name comes first.
    """
    path = Path(path)
    name = path.name.removesuffix(".gz")
    for raw_name in dict.fromkeys([name.replace(".idx", "-idx", 1), name]):
        if path.name in spellings(raw_name):
            return find_file(path.parent, raw_name) or path
    return path


def labels_file_for(images: str | os.PathLike[str]) -> Path | None:
    """The labels file next to an IDX images file, by the MNIST naming rules; None when there is none.

    ``train-images-idx3-ubyte`` goes with ``train-labels-idx1-ubyte`` (any prefix: ``emnist-…``), in
    any of its spellings (:func:`spellings`) in the same directory, whether or not the images file is
    itself dotted or gzip-compressed. A name without ``images-idx3``/``images.idx3`` has no labels file.
    """
    path = Path(images)
    name = path.name.removesuffix(".gz")
    for images_part, labels_part in _IMAGES_TO_LABELS:
        if images_part in name:
            return find_file(path.parent, name.replace(images_part, labels_part, 1))
    return None


@contextlib.contextmanager
def raw_stream(stream: IO[bytes]) -> Iterator[Reader]:
    """The uncompressed bytes of a seekable ``stream``: decompressed when it starts a gzip stream."""
    start = stream.tell()
    head = stream.read(2)
    stream.seek(start)
    if is_gzip(head):
        with gzip.GzipFile(fileobj=stream, mode="rb") as unzipped:
            yield unzipped
    else:
        yield stream


@contextlib.contextmanager
def open_raw(path: Path) -> Iterator[Reader]:
    """Open a file for reading its uncompressed bytes (gzip detected by its magic bytes)."""
    with open(path, "rb") as f, raw_stream(f) as raw:
        yield raw
