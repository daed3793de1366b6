"""Run directories: where a ``tune`` (and later ``train``) run keeps what must outlive the driver.

Layout shared by every command that writes one::

    RUN_DIR/
      config.json    the run's arguments, written once when the run starts, read back on resume
      best/          the best model so far (a checkpoint directory), replaced atomically
      default/       tune: the default configuration's model (its test accuracy is measured at the end)
      refit/         tune --refit: best/ and default/ trained again on training + validation
      ...            the command's own files (tune: study.journal, trials.csv, best.json, ...)

Every write here is atomic: a reader (or a driver that dies halfway) sees the old content or the new,
never a torn file. Files go to a temp file in the same directory, are fsynced, then ``os.replace``d;
directories are written the same way and swapped in with two renames.

One command at a time: a run or study holds its directory while it runs (:func:`exclusive`), and a
second command on it is refused rather than interleaved with the first.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

from deepspark.errors import ConfigError, DeepsparkError

__all__ = [
    "BEST_DIR",
    "CONFIG_FILE",
    "DEFAULT_DIR",
    "REFIT_DIR",
    "check_writable",
    "exclusive",
    "interrupts_held",
    "prepare",
    "read_config",
    "replace_dir",
    "restore_dir",
    "write_config",
    "write_dir_atomic",
    "write_figure_atomic",
    "write_file_atomic",
]

_log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
BEST_DIR = "best"
DEFAULT_DIR = "default"
REFIT_DIR = "refit"


def prepare(run_dir: str | os.PathLike[str], *, resume: bool) -> Path:
    """Check ``run_dir`` for a new run (absent or empty) or a resumed one (holds ``config.json``).

    Raises :class:`ConfigError` before anything is written, so a typo never mixes two runs in one
    directory, and a directory that cannot be written (under a file, ``/proc``) fails now, not after the
    work. Leaves nothing: the caller makes the directory once every argument has been checked.
    """
    path = Path(run_dir)
    try:  # a name too long, a folder that cannot be listed: the path's fault, said before any work
        if resume:
            if not (path / CONFIG_FILE).is_file():
                raise ConfigError(f"resume: {path} is not a deepspark run directory (no {CONFIG_FILE})")
            return path
        taken = path.exists() and (not path.is_dir() or any(path.iterdir()))
    except OSError as exc:
        raise ConfigError(
            f"{'resume' if resume else 'run_dir'}: cannot use {path} ({exc.strerror or exc}); choose another directory"
        ) from None
    if taken:
        raise _exists(path)
    check_writable(path, name="run_dir")
    return path


@contextlib.contextmanager
def exclusive(run_dir: str | os.PathLike[str], *, new: bool) -> Iterator[Path]:
    """Hold ``run_dir`` (made if missing) for this command: another process's (or thread's) train or tune
    in it, or ``--resume`` of it, is refused with a :class:`ConfigError` while the block runs.

    Two commands in one run directory interleaved their history rows, checkpoints, journal trials and
    reports without a word. The lock is an ``flock`` on the directory itself (nothing is written into
    it); the system drops it when the process dies, so a killed run is resumed at once. ``new``: the
    directory must still be empty once held (another command may have filled it since it was checked).
    Where there is no ``flock`` (Windows, some network mounts) the run goes on unguarded.
    """
    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as held:
        try:
            import fcntl

            fd = os.open(path, os.O_RDONLY)
            held.callback(os.close, fd)  # which releases the lock
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"run_dir: {path} is in use by another deepspark command (a train or tune running in it); "
                "wait for it to end, or choose another directory"
            ) from None
        except (ImportError, OSError):
            pass  # no flock here (Windows, some network mounts): unguarded, as before
        if new and any(path.iterdir()):
            raise _exists(path)
        yield path


def _exists(path: Path) -> ConfigError:
    return ConfigError(
        f"run_dir: {path} already exists; pass resume=True (--resume {path}) to continue that run, "
        "or choose a new directory"
    )


def first_missing(path: str | os.PathLike[str]) -> Path | None:
    """The topmost of ``path`` and its parents that does not exist, i.e. what making ``path`` creates
    (None when ``path`` exists): a failed start removes that, not only ``path``, so no empty parent stays."""
    missing = None
    for candidate in (Path(path), *Path(path).parents):
        if os.path.exists(candidate):  # not Path.exists, which raises for a name too long
            break
        missing = candidate
    return missing


def read_config(
    run_dir: str | os.PathLike[str], *, required: Collection[str] = (), kind: str = "deepspark run"
) -> dict[str, Any]:
    """The ``config.json`` of a run directory (a :class:`ConfigError` if it is missing or not JSON).

    ``required`` names the keys the caller reads back; a file without them is another command's run or
    an incompatible version's, and is refused with that said rather than read with defaults.
    """
    path = Path(run_dir) / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(
            f"resume: {path.parent} is not a deepspark run directory (no {CONFIG_FILE})"
        ) from exc
    except (ValueError, OSError) as exc:
        raise ConfigError(f"{path}: expected a JSON object, could not read it: {exc}") from exc
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(config).__name__}")
    missing = sorted(set(required) - set(config))
    if missing:
        raise ConfigError(
            f"resume: {path} is not a {kind}'s configuration (no {', '.join(missing)}): another command's "
            "run directory, or one from an incompatible deepspark version; start a new run instead"
        )
    return config


def write_config(run_dir: str | os.PathLike[str], config: Mapping[str, Any]) -> Path:
    """Write ``config.json`` atomically (creating ``run_dir`` if needed)."""
    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    return write_file_atomic(path / CONFIG_FILE, json.dumps(dict(config), indent=2).encode("utf-8"))


def write_file_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Replace ``path`` with ``data``: temp file in the same directory, fsync, ``os.replace``."""
    target = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    except OSError as exc:
        raise _naming(exc, target) from None
    try:
        # mkstemp makes 0600, and the rename keeps it: a report, best.json, config.json would be readable
        # by their owner only (a team's shared run directory, a web server), whatever the umask says.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise _naming(exc, target) from None
        raise
    _fsync_dir(target.parent)
    return target


def write_figure_atomic(fig: Any, path: str | os.PathLike[str]) -> bytes:
    """Render the matplotlib figure ``fig`` as a PNG, replace ``path`` with it (:func:`write_file_atomic`:
    an interrupted run leaves the old file or the new, never half of one nor a temp file) and close
    ``fig``; the PNG's bytes."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=100)
    finally:
        plt.close(fig)
    data = buffer.getvalue()
    write_file_atomic(path, data)
    return data


def write_dir_atomic(path: str | os.PathLike[str], files: Mapping[str, bytes]) -> Path:
    """Replace the directory ``path`` with one holding ``files`` (plain names → contents).

    The files are written and fsynced in a temp directory beside ``path``, which then takes its place;
    an older ``path`` is moved aside first and removed after. A name that is not a plain file name
    (a separator, ``..``, a leading dot) raises :class:`DeepsparkError` before anything is written:
    names may come from another process.
    """
    target = Path(path)
    for name in files:
        if not name or name != Path(name).name or name.startswith(".") or "\\" in name:
            raise DeepsparkError(f"refusing file name {name!r} for {target}: expected a plain file name")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as exc:
        raise _naming(exc, target) from None
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700: a model directory others may read, as above
        for name, data in files.items():
            with (tmp / name).open("wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        replace_dir(tmp, target)
    except OSError as exc:
        raise _naming(exc, target) from None
    finally:
        _remove(tmp)
    return target


def replace_dir(
    source: str | os.PathLike[str], path: str | os.PathLike[str], *, replace: bool = True
) -> Path:
    """Put the finished directory ``source`` at ``path`` (on the same file system), replacing what is
    there only now: an older ``path`` is moved aside first, put back if the move in fails, and removed
    once the new one is in place.

    ``replace=False``: ``path`` must still be free (or an empty directory), else :class:`FileExistsError`
    and nothing moves: what another process wrote there since it was checked is never replaced.
    """
    source, target = Path(source), Path(path)
    if not replace:
        try:
            os.rename(source, target)  # refuses a file or a directory with entries where ``target`` is
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise FileExistsError(errno.EEXIST, "exists already", str(target)) from None
            raise
        _fsync_dir(target.parent)
        return target
    old = restore_dir(target)
    _remove(old)
    aside = target.exists() or target.is_symlink()
    if aside:
        target.replace(old)
    try:
        source.replace(target)
    except BaseException:
        if aside:
            old.replace(target)
        raise
    _fsync_dir(target.parent)
    _remove(old)
    return target


def restore_dir(path: str | os.PathLike[str]) -> Path:
    """Put back what a :func:`replace_dir` cut short between its two renames (the process killed, the
    machine lost) left aside: ``path`` missing, its last complete version at ``.NAME.old``. Returns that
    aside path (absent now).

    Called before ``path`` is read or replaced: a resume took the missing ``checkpoint/`` for none at all
    and trained the run again from the start, and the next write deleted the aside copy, the only one.
    """
    target = Path(path)
    old = target.parent / f".{target.name}.old"
    if old.is_dir() and not old.is_symlink() and not (target.exists() or target.is_symlink()):
        _log.warning("%s: putting back the copy an interrupted replacement left aside (%s)", target, old.name)
        with contextlib.suppress(FileNotFoundError):
            old.replace(target)
    return old


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block is done, then deliver them.

    For writes that belong together in a process that trains in its main thread (``local``'s history
    row and the checkpoint of the same epoch): a Ctrl-C between the two lost the finished epoch. Outside
    the main thread (where Python runs no signal handler) the block runs as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous: dict[int, Any] = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is not None:  # None: set outside Python, which could not be put back
            previous[signum] = signal.signal(signum, lambda received, frame: held.append(received))
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for number in dict.fromkeys(held):  # as they would have been: KeyboardInterrupt, for Ctrl-C
            if callable(previous[number]):
                previous[number](number, None)
            elif previous[number] == signal.SIG_DFL:
                os.kill(os.getpid(), number)


def check_writable(path: str | os.PathLike[str], *, name: str) -> None:
    """Raise :class:`ConfigError` (naming parameter ``name``) unless a file can be written at ``path``.

    Checked by doing it, before any work: the missing directories up to ``path``'s parent are made, a
    probe file is written (one byte: a full disk still takes an empty file) and everything made is removed
    again. Permission bits alone do not tell (root, ``/proc``, read-only mounts, a regular file where a
    directory should be).
    """
    target = Path(path)
    made: list[Path] = []
    try:
        folder = target if target.is_dir() else target.parent
        missing = [d for d in (folder, *folder.parents) if not d.exists()]
        for directory in reversed(missing):
            directory.mkdir()
            made.append(directory)
        fd, probe = tempfile.mkstemp(prefix=".deepspark-probe-", dir=folder)
        try:
            os.write(fd, b"\0")  # a byte: an empty file fits on a full disk too
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise ConfigError(
            f"{name}: cannot write {target} ({exc.strerror or exc}); choose a path in a writable directory"
        ) from None
    finally:
        for directory in reversed(made):
            with contextlib.suppress(OSError):
                directory.rmdir()


def _naming(exc: OSError, path: Path) -> OSError:
    """``exc`` with ``path`` as its file name where it names none, or only the temp file's random name: a
    failed ``write`` or ``fsync`` (a full disk, a quota, an I/O error) said "No space left on device" and
    not where, and a read-only directory named a ``.NAME.x8k2p1`` the user never heard of."""
    temp = exc.filename is not None and os.path.basename(os.fsdecode(exc.filename)).startswith(
        f".{path.name}."
    )
    if (exc.filename is not None and not temp) or exc.errno is None:
        return exc
    return OSError(exc.errno, exc.strerror, str(path))  # the subclass for the errno, as the system's


def _umask() -> int:
    """The process umask, read without setting it (``os.umask`` sets it, racing other threads' writes)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
