"""Where dataset files live (the user's directory, our cache) and their verified checksums.

Every file of a registered dataset is checked against the SHA-256 of its raw (uncompressed) bytes
before we use it. Hashing 55 MB on every load would dominate short runs, so a successful check is
remembered in a small marker file keyed by the file's size, ``mtime_ns``, ``ctime_ns`` and inode; any
write, touch, replacement or re-pointed symlink invalidates it (a copy that kept the old size and
modification time, such as Fashion-MNIST's files over MNIST's with ``cp -p``, still gets a new change
time, which no one can set).

A file's times advance in ticks of the file system's clock (a few milliseconds on ext4, two seconds on
FAT), so a write in the same tick as our ``stat`` leaves every key as it was. A result is therefore not
remembered for a file changed within ``RACY_NS`` of that ``stat`` (git's "racily clean" entries): it is
hashed again on its next use, once it has been still for longer than that. A freshly fetched file is
hashed once more on its first load for this reason.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import time
import zlib
from pathlib import Path
from typing import Any

from deepspark.data.files import open_raw
from deepspark.rundir import write_file_atomic

__all__ = ["CHUNK", "RACY_NS", "cache_root", "check", "raw_sha256", "user_dir"]

_log = logging.getLogger(__name__)

#: Bytes read at a time when hashing or copying dataset files.
CHUNK = 1 << 20
_MARKER = ".verified.json"
#: A file changed this close to the ``stat`` its digest is keyed by is hashed again next time (module
#: docstring): two seconds covers the coarsest clocks local file systems keep (FAT's).
RACY_NS = 2_000_000_000


def cache_root() -> Path:
    """``$DEEPSPARK_CACHE``, else ``~/.cache/deepspark``: one subdirectory per registered dataset."""
    env = os.environ.get("DEEPSPARK_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "deepspark"


def user_dir(data_dir: str | os.PathLike[str] | None) -> Path | None:
    """The directory the user named: ``data_dir``, else ``$DEEPSPARK_DATA``, else None."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get("DEEPSPARK_DATA")
    return Path(env).expanduser() if env else None


def _marker_path(directory: Path) -> Path:
    """Where verification results for files in ``directory`` are remembered.

    Our cache directories hold their marker themselves; for a user's directory (which may be
    read-only, and which we should not litter) the marker lives under the cache root, keyed by
    the directory's resolved path.
    """
    resolved = directory.resolve()
    root = cache_root().resolve()
    if resolved == root or root in resolved.parents:
        return resolved / _MARKER
    key = hashlib.sha256(str(resolved).encode()).hexdigest()[:20]
    return root / "verified" / f"{key}.json"


def _read_marker(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _identity(st: os.stat_result) -> dict[str, int]:
    """What the remembered digest of a file is keyed by (the module docstring says why these)."""
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "inode": st.st_ino}


def _remember(path: Path, digest: str, st: os.stat_result, stat_ns: int) -> None:
    """Record ``digest`` for the identity ``st`` that ``path`` had at ``stat_ns``; best effort, atomic.

    ``st`` is the identity the file had before it was hashed, so a file written while it was hashed
    no longer has it and is hashed again next time. A file changed within ``RACY_NS`` of ``stat_ns``
    is not recorded at all: a write in the same clock tick would not have changed its identity.
    """
    if max(st.st_mtime_ns, st.st_ctime_ns) >= stat_ns - RACY_NS:
        _log.debug("not recording the checksum of %s: it changed moments before it was read", path)
        return
    marker = _marker_path(path.parent)
    try:
        data = _read_marker(marker)
        data[path.name] = {**_identity(st), "sha256": digest}
        marker.parent.mkdir(parents=True, exist_ok=True)
        # Readable as the umask allows (a team's shared cache), not 0600 as a temporary file is made.
        write_file_atomic(marker, json.dumps(data, indent=1, sort_keys=True).encode("utf-8"))
    except OSError as exc:
        _log.debug("could not record the checksum of %s: %s", path, exc)


def raw_sha256(path: Path) -> str:
    """SHA-256 of the file's raw bytes (decompressed when gzip), from the marker when still valid."""
    stat_ns = time.time_ns()
    st = path.stat()
    entry = _read_marker(_marker_path(path.parent)).get(path.name)
    if (
        isinstance(entry, dict)
        and all(entry.get(key) == value for key, value in _identity(st).items())
        and isinstance(entry.get("sha256"), str)
    ):
        return str(entry["sha256"])
    _log.info("computing the SHA-256 of %s", path)
    h = hashlib.sha256()
    try:
        with open_raw(path) as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise OSError(f"corrupt gzip stream ({exc})") from exc
    digest = h.hexdigest()
    _remember(path, digest, st, stat_ns)
    return digest


def check(path: Path, expected: str, *, log: bool = True) -> str:
    """ "ok", or what is wrong with the file (logged as a warning: the file will not be used).

    ``log=False`` where a mismatch is an answer, not a file left out: a directory named alone that holds
    another dataset in a registered one's layout (``data verify --data-dir DIR``) is then read as itself.
    """
    try:
        got = raw_sha256(path)
    except OSError as exc:
        problem = f"unreadable: {exc}"
    else:
        if got == expected:
            return "ok"
        problem = f"sha256 mismatch: expected {expected}, got {got}"
    if log:
        _log.warning("%s: %s; not using it", path, problem)
    return problem
