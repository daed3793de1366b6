"""The command line's exit codes and one-line errors (no Spark where a fake API call will do)."""

from __future__ import annotations

from pathlib import Path

import pytest

from deepspark import cli
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
