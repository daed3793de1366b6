"""deepspark.rundir: the run-directory checks and atomic writes."""

from __future__ import annotations

import errno
import os
import tempfile

import pytest

from deepspark import rundir
from deepspark.errors import ConfigError, DeepsparkError


def test_prepare_accepts_a_new_or_empty_directory_and_creates_nothing(tmp_path) -> None:
    assert rundir.prepare(tmp_path / "new", resume=False) == tmp_path / "new"
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    rundir.prepare(tmp_path / "empty", resume=False)


def test_prepare_refuses_an_existing_run_unless_resuming(tmp_path) -> None:
    run = tmp_path / "run"
    rundir.write_config(run, {"trials": 3})
    with pytest.raises(ConfigError, match="already exists; pass resume=True"):
        rundir.prepare(run, resume=False)
    rundir.prepare(run, resume=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("x")
    with pytest.raises(ConfigError, match="not a deepspark run directory"):
        rundir.prepare(tmp_path / "other", resume=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="already exists"):
        rundir.prepare(tmp_path / "file", resume=False)


def test_a_name_too_long_is_a_config_error_naming_the_parameter(tmp_path) -> None:
    # A 256-byte component: Path.exists raised OSError (ENAMETOOLONG), a traceback before any work.
    long = tmp_path / ("a" * 256)
    with pytest.raises(ConfigError, match=r"^run_dir: cannot use .*File name too long"):
        rundir.prepare(long, resume=False)
    with pytest.raises(ConfigError, match=r"^resume: cannot use .*File name too long"):
        rundir.prepare(long, resume=True)
    with pytest.raises(ConfigError, match=r"^output: cannot write .*File name too long"):
        rundir.check_writable(long, name="output")
    assert rundir.first_missing(long / "x") == long
    assert os.listdir(tmp_path) == []


def test_a_full_disk_is_refused_before_any_work(tmp_path) -> None:
    # The probe was an empty file, which a full disk still takes: a run went on to fail at its first
    # checkpoint, and predict at the end of its Spark job. RLIMIT_FSIZE 0 refuses any byte, as a full disk.
    import resource
    import signal

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, hard))
    try:
        with pytest.raises(ConfigError, match=r"^run_dir: cannot write .*/new/run \(File too large\)"):
            rundir.prepare(tmp_path / "new" / "run", resume=False)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert os.listdir(tmp_path) == []


def test_config_round_trip_and_bad_config(tmp_path) -> None:
    run = tmp_path / "run"
    rundir.write_config(run, {"space": {"x": [1, 2]}, "seed": 0})
    assert rundir.read_config(run) == {"space": {"x": [1, 2]}, "seed": 0}
    (run / rundir.CONFIG_FILE).write_text("[1]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        rundir.read_config(run)
    with pytest.raises(ConfigError, match="not a deepspark run directory"):
        rundir.read_config(tmp_path / "missing")


def test_write_file_atomic_replaces_and_leaves_no_temp_file(tmp_path) -> None:
    path = tmp_path / "f.json"
    rundir.write_file_atomic(path, b"one")
    rundir.write_file_atomic(path, b"two")
    assert path.read_bytes() == b"two"
    assert os.listdir(tmp_path) == ["f.json"]


def test_a_write_the_disk_refuses_names_the_file_and_leaves_the_old_one(tmp_path, monkeypatch) -> None:
    path = tmp_path / "best.json"
    rundir.write_file_atomic(path, b"old")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left on device") as raised:
        rundir.write_file_atomic(path, b"new")
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(path)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["best.json"]


@pytest.mark.parametrize("write", ["file", "dir"])
def test_a_directory_that_refuses_the_temp_file_is_named_not_the_temp_file(
    tmp_path, monkeypatch, write
) -> None:
    # A resumed run in a read-only directory: the error named ".history.csv.nxloxtv7", a name the user
    # never heard of, as the file that could not be written.
    def refused(*, prefix: str, dir: object) -> object:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.path.join(str(dir), f"{prefix}nxloxtv7"))

    monkeypatch.setattr(tempfile, "mkstemp" if write == "file" else "mkdtemp", refused)
    with pytest.raises(OSError, match="Read-only file system") as raised:
        if write == "file":
            rundir.write_file_atomic(tmp_path / "history.csv", b"round\n")
        else:
            rundir.write_dir_atomic(tmp_path / "checkpoint", {"state.json": b"{}"})
    assert raised.value.filename == str(tmp_path / ("history.csv" if write == "file" else "checkpoint"))


def test_a_figure_interrupted_while_it_renders_leaves_the_old_png_and_no_temp_file(tmp_path) -> None:
    # The training curve was rendered into a temp file beside it: Ctrl-C mid-render left
    # ".curve.png.tmp.png" in the run directory, and the tuning report's PNG was rendered in place.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = tmp_path / "curve.png"
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    data = rundir.write_figure_atomic(fig, path)
    assert data.startswith(b"\x89PNG") and path.read_bytes() == data
    assert not plt.fignum_exists(fig.number)  # closed

    class Interrupted(plt.Figure):
        def savefig(self, fname, **kwargs) -> None:  # type: ignore[override]
            super().savefig(fname, **kwargs)
            raise KeyboardInterrupt

    other = plt.figure(FigureClass=Interrupted)
    with pytest.raises(KeyboardInterrupt):
        rundir.write_figure_atomic(other, path)
    assert path.read_bytes() == data
    assert [p.name for p in tmp_path.iterdir()] == ["curve.png"]
    assert not plt.fignum_exists(other.number)


def test_write_dir_atomic_swaps_the_whole_directory(tmp_path) -> None:
    best = tmp_path / rundir.BEST_DIR
    rundir.write_dir_atomic(best, {"a.bin": b"1", "b.json": b"{}"})
    rundir.write_dir_atomic(best, {"c.bin": b"3"})
    assert sorted(p.name for p in best.iterdir()) == ["c.bin"]  # nothing of the old one is left
    assert (best / "c.bin").read_bytes() == b"3"
    assert os.listdir(tmp_path) == [rundir.BEST_DIR]


def test_atomic_writes_are_readable_by_others_as_plain_writes_are(tmp_path) -> None:
    """mkstemp/mkdtemp make 0600/0700, which the rename kept: a report.html, best.json or a best/ model
    directory was readable by its owner only."""
    umask = os.umask(0o022)
    try:
        rundir.write_file_atomic(tmp_path / "report.html", b"<html>")
        rundir.write_dir_atomic(tmp_path / rundir.BEST_DIR, {"model.safetensors": b"1"})
        os.umask(0o077)  # a stricter umask is still honoured
        rundir.write_file_atomic(tmp_path / "private.json", b"{}")
    finally:
        os.umask(umask)
    assert (tmp_path / "report.html").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / rundir.BEST_DIR).stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "private.json").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "..", "a\\b"])
def test_write_dir_atomic_refuses_names_that_are_not_plain(tmp_path, name) -> None:
    rundir.write_dir_atomic(tmp_path / "best", {"keep.bin": b"k"})
    with pytest.raises(DeepsparkError, match="refusing file name"):
        rundir.write_dir_atomic(tmp_path / "best", {"ok.bin": b"1", name: b"2"})
    assert os.listdir(tmp_path / "best") == ["keep.bin"]
    assert os.listdir(tmp_path) == ["best"]


def test_replace_dir_puts_the_old_directory_back_when_the_new_one_cannot_move_in(tmp_path) -> None:
    target = rundir.write_dir_atomic(tmp_path / "out", {"a": b"old"})
    with pytest.raises(FileNotFoundError):
        rundir.replace_dir(tmp_path / "never-written", target)
    assert (target / "a").read_bytes() == b"old"
    staged = tmp_path / ".staged"
    staged.mkdir()
    (staged / "b").write_bytes(b"new")
    rundir.replace_dir(staged, target)
    assert sorted(os.listdir(target)) == ["b"] and sorted(os.listdir(tmp_path)) == ["out"]


def test_interrupts_held_delivers_a_ctrl_c_once_the_block_is_done() -> None:
    import signal

    done = []
    callers = signal.getsignal(signal.SIGINT)  # Python's, or pyspark's once a SparkContext has started
    with pytest.raises(KeyboardInterrupt), rundir.interrupts_held():
        os.kill(os.getpid(), signal.SIGINT)
        done.append("the writes after the Ctrl-C")
    assert done == ["the writes after the Ctrl-C"]
    assert signal.getsignal(signal.SIGINT) is callers
