"""The command line's exit codes and one-line errors (no Spark where a fake API call will do)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deepspark import cli
from deepspark.cli import build_parser, main
from deepspark.errors import ConfigError, RunError
from deepspark.tuning import StudyResult


@pytest.mark.parametrize(
    ("stop_reason", "completed", "failure"),
    [
        (None, 3, None),
        ("timeout", 1, None),
        ("timeout", 0, "no trial completed before the --timeout"),
        (None, 0, "no trial completed"),
        ("3 failed trial(s) reached --max-failures 3", 2, "the study stopped early: 3 failed trial(s)"),
        ("trial worker 0 failed 4 times: boom", 0, "the study stopped early: trial worker 0 failed"),
        ("every trial worker stopped", 5, "the study stopped early: every trial worker stopped"),
    ],
)
def test_which_finished_studies_are_failures(stop_reason, completed, failure) -> None:
    got = cli._study_failure(stop_reason, completed)
    assert got == failure if failure is None else got.startswith(failure)


def _fake_tune(result: StudyResult | BaseException):
    def tune(**kwargs):
        if isinstance(result, BaseException):
            raise result
        return result

    return tune


@pytest.mark.parametrize(
    ("outcome", "code"),
    [
        (StudyResult(run_dir=Path("r"), records=(), best=None, default=None, stop_reason="interrupted"), 130),
        (StudyResult(run_dir=Path("r"), records=(), best=None, default=None, stop_reason="x failed"), 1),
        (RunError("every trial worker failed the same way"), 1),
        (ConfigError("trials: expected an integer >= 1, got 0"), 2),
    ],
)
def test_tune_exit_codes(monkeypatch, capsys, tmp_path, outcome, code) -> None:
    import deepspark.tuning

    monkeypatch.setattr(deepspark.tuning, "tune", _fake_tune(outcome))
    assert cli.main(["tune", "--run-dir", str(tmp_path / "r")]) == code
    err = capsys.readouterr().err
    if code in (1, 2):
        assert sum(line.startswith("deepspark: error:") for line in err.splitlines()) == 1
        assert "Traceback" not in err
    if code == 130:  # a study stopped by Ctrl-C says so, as a Ctrl-C anywhere else does
        assert err.splitlines().count("deepspark: interrupted") == 1
        assert "deepspark: error:" not in err and "Traceback" not in err


class _Killed(Exception):
    """What SIGTERM raises in this test when the command left Python's default (the process would end)."""


@pytest.mark.parametrize("command", ["train", "tune"])
def test_sigterm_stops_a_command_as_ctrl_c_does(monkeypatch, capsys, tmp_path, command) -> None:
    """SIGTERM (kill, docker stop, a scheduler) ended the process where it stood: no finished round
    checkpointed on the way out, no job cancelled, a run directory half-made, no line said why. It now
    raises KeyboardInterrupt where the work is (the stop path Ctrl-C takes), exits 130 with one line, and
    the handler is put back."""
    import signal
    import time

    import deepspark.training
    import deepspark.tuning

    stopped: list[str] = []

    def work(**kwargs):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)  # the signal interrupts this at once
        except KeyboardInterrupt:
            stopped.append("as on Ctrl-C")
            if command == "tune":  # tune keeps its finished trials and reports the stop itself
                return StudyResult(
                    run_dir=tmp_path / "r", records=(), best=None, default=None, stop_reason="interrupted"
                )
            raise
        raise AssertionError("SIGTERM did not interrupt the command")

    def killed(signum, frame):
        raise _Killed

    monkeypatch.setattr(deepspark.training, "fit", work)
    monkeypatch.setattr(deepspark.tuning, "tune", work)
    previous = signal.signal(signal.SIGTERM, killed)
    try:
        code = main([command, "--run-dir", str(tmp_path / "r")])
        assert signal.getsignal(signal.SIGTERM) is killed
    finally:
        signal.signal(signal.SIGTERM, previous)
    err = capsys.readouterr().err.splitlines()
    assert (code, stopped, err[-1:]) == (130, ["as on Ctrl-C"], ["deepspark: interrupted"])
    assert not [line for line in err if "Traceback" in line or "error" in line]


def test_a_write_the_disk_refuses_is_one_error_line_naming_the_path(monkeypatch, capsys, tmp_path) -> None:
    # A full disk under the run directory: the checkpoint's write raised OSError, a traceback ending in
    # "No space left on device" that did not say where.
    import deepspark.training
    from deepspark import rundir

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def fit(**kwargs):
        monkeypatch.setattr(os, "fsync", full)
        rundir.write_dir_atomic(tmp_path / "r" / "checkpoint", {"state.json": b"{}"})

    monkeypatch.setattr(deepspark.training, "fit", fit)
    code = main(["train", "--run-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err.splitlines()
    assert (code, err) == (1, [f"deepspark: error: No space left on device: {tmp_path / 'r' / 'checkpoint'}"])
    assert os.listdir(tmp_path / "r") == []  # no temp folder left


def test_train_output_on_a_full_disk_is_refused_before_any_work(monkeypatch, capsys, tmp_path) -> None:
    # The probe was an empty file, which a full disk still takes: the model was trained, then not copied.
    import resource
    import signal

    import deepspark.training

    monkeypatch.setattr(deepspark.training, "fit", lambda **kwargs: pytest.fail("trained"))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, hard))  # no byte more, as on a full disk
    try:
        code = main(["train", "--output", str(tmp_path / "model")])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("deepspark: error: output: cannot create")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "cleanup_error", [RuntimeError("Answer from Java side is empty"), RunError("job lost")]
)
def test_an_error_a_stop_path_meets_while_interrupted_is_the_interruption(
    monkeypatch, capsys, tmp_path, cleanup_error
) -> None:
    """A SIGTERM sent to the whole process group (systemd, Slurm) ends Spark's JVM too: predict's cleanup
    then raised py4j's network error over the interruption, and the command ended with a traceback and
    exit 1. An error raised while a Ctrl-C or SIGTERM is handled is now that interruption's."""
    import deepspark.inference

    def predict(*args, **kwargs):
        try:
            raise KeyboardInterrupt
        finally:
            raise cleanup_error  # the broadcast's destroy(), say, on a JVM that is gone

    monkeypatch.setattr(deepspark.inference, "predict", predict)
    code = main(["predict", "--model", "m", "--input", "i", "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err.splitlines()
    assert (code, err) == (130, ["deepspark: interrupted"])


def test_a_second_ctrl_c_while_the_command_stops_changes_nothing(monkeypatch, capsys, tmp_path) -> None:
    """A user pressing Ctrl-C again while the command stopped: one landing in end_lost_jvms' py4j call
    escaped main as a KeyboardInterrupt traceback (measured: six Ctrl-C in 0.3 s, during train)."""
    import signal

    import deepspark.spark
    import deepspark.training

    def fit(**kwargs):
        raise KeyboardInterrupt

    def again() -> None:
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(deepspark.training, "fit", fit)
    monkeypatch.setattr(deepspark.spark, "end_lost_jvms", again)
    callers = signal.getsignal(signal.SIGINT)  # Python's, or pyspark's once a SparkContext has started
    try:
        code = main(["train", "--run-dir", str(tmp_path / "r")])
    except KeyboardInterrupt:
        pytest.fail("the second Ctrl-C escaped main")
    assert code == 130 and capsys.readouterr().err.splitlines() == ["deepspark: interrupted"]
    assert signal.getsignal(signal.SIGINT) is callers  # the caller's Ctrl-C, back


@pytest.mark.parametrize(("stop_reason", "code"), [("interrupted", 130), ("x failed", 1), (None, 1)])
def test_a_failed_mlflow_log_never_hides_how_the_study_ended(
    monkeypatch, capsys, tmp_path, stop_reason, code
) -> None:
    """Logging after an interrupted study that then failed (a server down) ended with exit 1 and the
    logging error: the Ctrl-C's 130 and its line were lost."""
    import deepspark.reporting
    import deepspark.tuning

    result = StudyResult(run_dir=tmp_path / "r", records=(), best=None, default=None, stop_reason=stop_reason)
    monkeypatch.setattr(deepspark.tuning, "tune", _fake_tune(result))
    monkeypatch.setattr(deepspark.reporting, "check_tracking_uri", lambda uri: None)

    def down(*args, **kwargs):
        raise RunError("mlflow: the tracking server is down; log the kept run later")

    monkeypatch.setattr(deepspark.reporting, "log_to_mlflow", down)
    assert cli.main(["tune", "--run-dir", str(tmp_path / "r"), "--mlflow", "http://127.0.0.1:1"]) == code
    err = capsys.readouterr().err.splitlines()
    if stop_reason is None:  # the study itself ended well: the logging error is the command's
        assert err == ["deepspark: error: mlflow: the tracking server is down; log the kept run later"]
    else:
        assert "deepspark: warning: mlflow: the tracking server is down; log the kept run later" in err
        assert err[-1] == "deepspark: interrupted" if code == 130 else err[-1].startswith("deepspark: error:")


def test_a_study_refused_before_it_starts_prints_only_its_error_line(monkeypatch, capsys, tmp_path) -> None:
    """The progress display, never started, printed an empty line on stderr before the error."""
    import deepspark.tuning

    monkeypatch.setattr(deepspark.tuning, "tune", _fake_tune(ConfigError("master: expected x, got 'foo'")))
    assert cli.main(["tune", "--run-dir", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.splitlines() == ["deepspark: error: master: expected x, got 'foo'"]


def test_ctrl_c_while_the_parser_imports_torch_is_an_interruption(monkeypatch, capsys) -> None:
    """build_parser imports torch and pyspark (seconds at start-up): a Ctrl-C then was a traceback."""

    def interrupted_import() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted_import)
    assert cli.main(["data", "verify", "mnist"]) == 130
    err = capsys.readouterr().err
    assert err.splitlines() == ["deepspark: interrupted"]


CHATTER = (
    "Using Spark's default log4j profile",
    "NativeCodeLoader",
    "resolves to a loopback address",
    "Set SPARK_LOCAL_IP",
    "could not bind on port",
    "Setting default log level",
)


def _deepspark(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deepspark", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_python_m_deepspark_and_version(tmp_path: Path) -> None:
    from deepspark import __version__

    done = _deepspark("--version", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"deepspark {__version__} (pyspark ")
    assert "torch " in done.stdout and "Python 3." in done.stdout


def test_deepspark_main_runs_as_a_file_as_spark_submit_runs_it(tmp_path: Path) -> None:
    # docs/clusters.md: `spark-submit .../deepspark/__main__.py ARGS`. Python puts the file's folder first
    # on sys.path, where deepspark's http.py hid the standard library's http, which torch imports.
    import deepspark.__main__ as entry

    root = str(Path(entry.__file__).resolve().parents[1])
    done = subprocess.run(
        [sys.executable, entry.__file__, "train", "--help"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "usage: deepspark train" in done.stdout


def test_verbosity_conf_and_json_are_accepted_after_the_sub_command() -> None:
    parser = build_parser()
    args = parser.parse_args(
        ["-v", "tune", "mnist", "-v", "--conf", "spark.a=1", "--conf", "b=x=y", "--json"]
    )
    assert (args.verbose, args.sub_verbose, args.quiet, args.sub_quiet) == (1, 1, 0, 0)
    assert args.conf == [("spark.a", "1"), ("b", "x=y")] and args.json
    for command in (["train", "mnist"], ["predict", "--model", "m", "--input", "i", "--output", "o"]):
        args = parser.parse_args([*command, "-q", "--conf", "spark.master=local[1]", "--json"])
        assert args.sub_quiet == 1 and args.conf == [("spark.master", "local[1]")] and args.json
    args = parser.parse_args(["data", "verify", "--data-dir", "d", "-vv"])
    assert args.sub_verbose == 2 and args.name is None


@pytest.mark.parametrize("bad", ["novalue", "=x"])
def test_conf_must_be_key_equals_value(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["tune", "mnist", "--conf", bad])
    assert exit_.value.code == 2
    assert "expected key=value" in capsys.readouterr().err


def _tiny_study(root: Path) -> list[str]:
    from deepspark.data import write_idx
    from deepspark.data.files import MNIST_FILES

    rng = np.random.default_rng(0)
    data = root / "data"
    data.mkdir()
    for i, name in enumerate(MNIST_FILES):  # train images, labels, test images, labels: 3 classes, 8x8
        count = 40 if i < 2 else 20
        labels = (np.arange(count) % 3).astype(np.uint8)
        write_idx(data / name, labels if i % 2 else rng.integers(0, 256, (count, 8, 8), dtype=np.uint8))
    (root / "space.yaml").write_text("learning_rate: {type: loguniform, low: 0.01, high: 0.1}\nepochs: 1\n")
    return [
        "tune",
        "--data-dir",
        "data",
        "--model",
        "mlp",
        "--space",
        "space.yaml",
        "--trials",
        "1",
        "--no-default",
    ]


@pytest.mark.slow
def test_tune_starts_quietly_takes_conf_and_prints_one_json_object(tmp_path: Path) -> None:
    study = _tiny_study(tmp_path)
    done = _deepspark(
        *study, "--run-dir", "run", "--conf", "spark.master=local[1]", "--json", cwd=tmp_path,
        env={"DEEPSPARK_SPARK_LOG_LEVEL": "WARN", "SPARK_CONF_DIR": str(tmp_path / "no-conf")},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)  # stdout is the JSON object and nothing else
    assert summary["counts"] == {"complete": 1, "pruned": 0, "fail": 0}
    assert summary["parallelism"] == 1  # --conf spark.master=local[1] reached the session
    assert summary["run_dir"] == "run" and summary["best"]["trial"] == 0
    assert "leaderboard" in done.stderr  # the table for people went to stderr
    assert not [line for line in done.stderr.splitlines() if any(c in line for c in CHATTER)], done.stderr


@pytest.mark.slow
def test_verbose_after_the_sub_command_restores_spark_logging_and_spark_defaults_set_the_master(
    tmp_path: Path,
) -> None:
    study = _tiny_study(tmp_path)
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    (conf_dir / "spark-defaults.conf").write_text("spark.master   local[1]\n", encoding="utf-8")
    done = _deepspark(*study, "--run-dir", "run", "-v", cwd=tmp_path, env={"SPARK_CONF_DIR": str(conf_dir)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "To adjust logging level use sc.setLogLevel(newLevel)" in done.stderr, done.stderr[:3000]
    ui = [line for line in done.stderr.splitlines() if "Spark UI: " in line]
    assert len(ui) == 1 and "(master local[1])" in ui[0], done.stderr  # not local[*]
    assert "leaderboard" in done.stdout


def test_train_json_prints_one_object_on_stdout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _tiny_study(tmp_path)
    argv = [
        "train",
        "--data-dir",
        str(tmp_path / "data"),
        "--model",
        "mlp",
        "--epochs",
        "1",
        "--threads",
        "1",
    ]
    assert main([*argv, "--run-dir", str(tmp_path / "run"), "--json", "-q"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["run_dir"] == str(tmp_path / "run") and summary["epochs"] == pytest.approx(1.0)
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and Path(summary["model_dir"]).is_dir()
    assert "test accuracy:" in captured.err


def test_a_diverging_training_run_is_a_failure_at_run_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Exit 1, as when an average or async worker diverges, not 2 (a usage error, before any work).
    _tiny_study(tmp_path)
    argv = ["train", "--data-dir", str(tmp_path / "data"), "--model", "mlp", "--optimizer", "sgd"]
    argv += ["--lr", "1e30", "--epochs", "2", "--threads", "1", "--run-dir", str(tmp_path / "run"), "-q"]
    assert main(argv) == 1
    assert capsys.readouterr().err.splitlines()[-1].startswith("deepspark: error: training diverged: loss is")


def test_train_refuses_a_heartbeat_timeout_under_a_second_before_spark(monkeypatch, capsys, tmp_path) -> None:
    # A frozen training worker is lost after --heartbeat-timeout; under a second, a busy one would be too.
    import deepspark.spark as ds_spark

    def no_spark(*args, **kw):
        raise AssertionError("a Spark session was requested before validation finished")

    monkeypatch.setattr(ds_spark, "session", no_spark)
    run = tmp_path / "run"
    argv = ["train", "mnist", "--workers", "2", "--heartbeat-timeout", "0.1", "--run-dir", str(run)]
    assert main(argv) == 2
    assert capsys.readouterr().err.splitlines() == [
        "deepspark: error: heartbeat_timeout: expected at least 1 second (or None for no heartbeat clock), got 0.1"
    ]
    assert not run.exists()


def test_a_reader_that_stops_reading_ends_the_command_quietly() -> None:
    """`deepspark data info mnist | head` ended in a BrokenPipeError traceback."""
    import subprocess

    proc = subprocess.Popen(
        [sys.executable, "-m", "deepspark", "data", "info", "mnist"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    proc.stdout.close()  # before the command writes: the reader is gone
    _, err = proc.communicate(timeout=120)
    assert (proc.returncode, err.decode()) == (1, "")


def test_train_without_a_run_dir_takes_a_free_name_in_the_same_second(monkeypatch, tmp_path) -> None:
    # The default was named to the second: a second run started in that second was refused (taken).
    import datetime
    import types

    from deepspark.training import _cli

    class Frozen(datetime.datetime):
        @classmethod
        def now(cls, tz=None):  # type: ignore[override]
            return datetime.datetime(2026, 11, 26, 16, 5, 9)

    monkeypatch.setattr(_cli, "_dt", types.SimpleNamespace(datetime=Frozen))
    monkeypatch.chdir(tmp_path)
    names = []
    for _ in range(3):
        names.append(_cli._default_run_dir("runs/mnist-lenet"))
        os.makedirs(names[-1])
    assert names == [
        "runs/mnist-lenet-20261126-160509",
        "runs/mnist-lenet-20261126-160509-2",
        "runs/mnist-lenet-20261126-160509-3",
    ]
