"""Trials on Spark (local[2], the shared session): samplers, pruners, failures, threads, bad input."""

from __future__ import annotations

import _thread
import csv
import json
import logging
import os
import signal
import time
from pathlib import Path

import pytest

from deepspark.errors import ConfigError
from deepspark.tuning import TrialState, tune

X = {"x": {"type": "uniform", "low": 0.0, "high": 1.0}}


def _quadratic(config, reporter):
    return {"accuracy": 1.0 - (config["x"] - 0.3) ** 2}


def test_user_objective_runs_every_trial(spark, tmp_path) -> None:
    result = tune(_quadratic, space=X, trials=8, sampler="random", pruner="none", run_dir=tmp_path / "r")
    assert result.counts() == {"complete": 8, "pruned": 0, "fail": 0}
    assert all(0.0 <= r.params["x"] <= 1.0 for r in result.records)
    assert result.best.value == max(r.value for r in result.records)
    rows = list(csv.DictReader((tmp_path / "r" / "trials.csv").open()))
    assert len(rows) == 8 and {row["state"] for row in rows} == {"complete"}
    best = json.loads((tmp_path / "r" / "best.json").read_text())
    assert best["best"]["trial"] == result.best.number


def test_the_callers_optuna_verbosity_is_put_back_after_a_study(spark, tmp_path) -> None:
    import optuna

    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.DEBUG)  # a notebook's own setting
    try:
        tune(_quadratic, space=X, trials=1, sampler="random", pruner="none", run_dir=tmp_path / "r")
        assert optuna.logging.get_verbosity() == optuna.logging.DEBUG
    finally:
        optuna.logging.set_verbosity(before)


def test_grid_sampler_visits_each_point_once(spark, tmp_path) -> None:
    space = {"a": {"type": "grid", "values": [1, 2, 3]}, "b": {"type": "choice", "values": ["u", "v"]}}
    result = tune(
        lambda c, r: float(c["a"]),
        space=space,
        trials=50,
        sampler="grid",
        pruner="none",
        run_dir=tmp_path / "g",
    )
    seen = sorted((r.params["a"], r.params["b"]) for r in result.records)
    assert seen == [(a, b) for a in (1, 2, 3) for b in ("u", "v")]


GRID_2X2 = {"a": {"type": "grid", "values": [1, 2]}, "b": {"type": "choice", "values": ["u", "v"]}}


def _numbered(config, reporter):
    """Later trials score higher, so the grid's last trial is the best; each keeps a model naming itself."""
    reporter.keep_model(lambda: {"model.json": json.dumps({"trial": reporter.number, **config}).encode()})
    return {"accuracy": reporter.number / 100, "ran": f"{config['a']}{config['b']}"}


def _check_best_model(run: Path, best_trial: int) -> None:
    best = json.loads((run / "best.json").read_text())
    assert best["best"]["trial"] == best_trial
    assert json.loads((run / "best" / "trial.json").read_text())["trial"] == best_trial
    assert json.loads((run / "best" / "model.json").read_text())["trial"] == best_trial


def test_grid_runs_every_point_once_plus_the_default_and_best_model_matches(spark, tmp_path) -> None:
    run = tmp_path / "grid"
    default = {"a": 2, "b": "v"}  # a grid point too: it must not stand in for that point
    kwargs = {"space": GRID_2X2, "sampler": "grid", "pruner": "none", "parallelism": 1, "run_dir": run}
    # Half the grid first, then the rest on --resume.
    first = tune(_numbered, trials=2, default_config=default, **kwargs)
    assert first.counts() == {"complete": 3, "pruned": 0, "fail": 0}
    assert first.stop_reason is None
    _check_best_model(run, max(r.number for r in first.records))
    result = tune(_numbered, run_dir=run, resume=True, trials=4)
    assert result.counts() == {"complete": 5, "pruned": 0, "fail": 0}
    defaults = [r for r in result.records if r.is_default]
    assert [(r.number, r.metrics["ran"]) for r in defaults] == [(0, "2v")]
    ran = sorted(r.metrics["ran"] for r in result.records if not r.is_default)
    assert ran == ["1u", "1v", "2u", "2v"]  # every point exactly once
    # The last trial is the best: its model is the one in best/, as best.json says.
    assert result.best is not None and result.best.number == 4
    _check_best_model(run, 4)
    rows = list(csv.DictReader((run / "trials.csv").open()))
    assert sorted(int(r["number"]) for r in rows) == [0, 1, 2, 3, 4]


def test_a_best_model_swap_cut_short_is_put_back_on_resume(spark, tmp_path) -> None:
    # A driver killed between the two renames that swap best/ in (the old best moved aside, the new one
    # not yet in) left no best/ and the last complete model at .best.old; the resume, finding best.json
    # up to date, left it there: the study had no best model although one was on disk.
    run = tmp_path / "cut"
    kwargs = {"space": GRID_2X2, "sampler": "grid", "pruner": "none", "parallelism": 1, "run_dir": run}
    tune(_numbered, trials=4, default_config=False, **kwargs)
    _check_best_model(run, 3)
    (run / "best").rename(run / ".best.old")  # killed between the two renames
    result = tune(_numbered, run_dir=run, resume=True)
    assert result.counts() == {"complete": 4, "pruned": 0, "fail": 0}
    _check_best_model(run, 3)
    assert not (run / ".best.old").exists()


def test_a_grid_resume_with_fewer_trials_than_queued_is_refused_and_changes_nothing(spark, tmp_path) -> None:
    # The first run queued all 4 points and was stopped in its first; a resume asking for 2 points ran
    # the 3 still waiting (Optuna cannot take a waiting trial back), 4 points where 2 were asked for.
    run = tmp_path / "grid"
    kwargs = {"space": GRID_2X2, "sampler": "grid", "pruner": "none", "parallelism": 1, "run_dir": run}
    first = tune(_always_hangs, trials=4, timeout=2, **kwargs)
    assert first.stop_reason == "timeout" and first.records == ()
    journal = (run / "study.journal").read_bytes()
    with pytest.raises(ConfigError, match=r"^trials: expected at least 4 for this grid study.*got 2$"):
        tune(_always_hangs, run_dir=run, resume=True, trials=2, timeout=2)
    assert json.loads((run / "config.json").read_text())["trials"] == 4
    assert (run / "study.journal").read_bytes()[: len(journal)] == journal
    again = tune(_always_hangs, run_dir=run, resume=True, timeout=2)  # as saved: accepted
    assert again.stop_reason == "timeout"


def _constant(config, reporter):
    reporter.keep_model(lambda: {"model.json": json.dumps({"trial": reporter.number}).encode()})
    return 0.5


def test_tied_best_values_keep_the_model_of_the_trial_best_json_names(spark, tmp_path) -> None:
    run = tmp_path / "tie"
    result = tune(
        _constant, space=GRID_2X2, trials=4, sampler="grid", pruner="none", parallelism=2, run_dir=run
    )
    assert result.counts()["complete"] == 4
    _check_best_model(run, min(r.number for r in result.records))


def test_tpe_with_constant_liar_proposes_distinct_configs(spark, tmp_path) -> None:
    result = tune(
        _quadratic, space=X, trials=16, sampler="tpe", pruner="none", parallelism=2, run_dir=tmp_path / "t"
    )
    xs = [r.params["x"] for r in result.records]
    assert len(set(xs)) == 16
    # TPE concentrates on the optimum at 0.3 once it has seen a few trials.
    late = sorted(result.records, key=lambda r: r.number)[10:]
    assert min(abs(r.params["x"] - 0.3) for r in late) < 0.15


@pytest.mark.parametrize("pruner", ["median", "asha"])
def test_pruners_stop_bad_trials_from_intermediate_reports(spark, tmp_path, pruner) -> None:
    def objective(config, reporter):
        for step in range(1, 6):
            reporter.report(step, config["x"])
        return config["x"]

    result = tune(
        objective,
        space=X,
        trials=16,
        sampler="random",
        pruner=pruner,
        parallelism=2,
        run_dir=tmp_path / pruner,
        seed=3,
    )
    pruned = [r for r in result.records if r.state is TrialState.PRUNED]
    complete = [r for r in result.records if r.state is TrialState.COMPLETE]
    assert pruned, "the pruner never stopped a trial"
    assert len(pruned) + len(complete) == 16
    # A pruned trial stopped early: it reported fewer steps than a complete one.
    assert all(len(r.intermediate) < 5 for r in pruned)
    assert max(r.params["x"] for r in pruned) < max(r.params["x"] for r in complete)


def test_objective_exception_is_a_fail_and_not_retried(spark, tmp_path) -> None:
    def objective(config, reporter):
        if config["x"] > 0.5:
            raise ValueError(f"bad x {config['x']:.3f}")
        return config["x"]

    result = tune(objective, space=X, trials=10, sampler="random", pruner="none", run_dir=tmp_path / "f")
    failed = [r for r in result.records if r.state is TrialState.FAIL]
    assert failed and len(failed) < 10
    for r in failed:
        assert r.params["x"] > 0.5
        assert r.attempts == 1
        assert r.error.startswith("ValueError: bad x")
        assert "Traceback" in r.traceback and "objective" in r.traceback
    assert result.counts()["complete"] == 10 - len(failed)


def _reports_a_negative_step(config, reporter):
    reporter.report(-1, config["x"])
    return config["x"]


def test_a_report_optuna_refuses_fails_the_trial_once_instead_of_losing_its_worker(spark, tmp_path) -> None:
    """Optuna refuses a negative step; on the driver that cut the worker's connection, so the trial ran
    again as an infrastructure failure and its second attempt completed without the report."""
    result = tune(
        _reports_a_negative_step, space=X, trials=2, sampler="random", pruner="median", run_dir=tmp_path / "s"
    )
    assert result.counts() == {"complete": 0, "pruned": 0, "fail": 2}
    for r in result.records:
        assert r.attempts == 1 and not r.intermediate
        assert r.error.startswith("ConfigError: step: expected an integer >= 0"), r.error


def test_a_report_step_must_be_a_whole_number_of_any_integer_type() -> None:
    import numpy as np

    from deepspark.errors import ConfigError
    from deepspark.tuning.trial import Reporter

    reporter = Reporter(conn=None, number=0, attempt=1, data=None, threads=1)
    for step in (0, 3, np.int64(2)):
        reporter.report(step, 0.5)  # no driver connected: validated, then nothing to send
    for step in (1.5, 2.0, -1, True, "1"):
        with pytest.raises(ConfigError, match="step: expected an integer >= 0"):
            reporter.report(step, 0.5)


def test_max_failures_stops_the_study(spark, tmp_path) -> None:
    def objective(config, reporter):
        raise RuntimeError("always")

    result = tune(
        objective,
        space=X,
        trials=20,
        sampler="random",
        pruner="none",
        parallelism=1,
        max_failures=3,
        run_dir=tmp_path / "m",
    )
    assert result.counts()["fail"] == 3
    assert "max-failures" in (result.stop_reason or "")


def test_ctrl_c_while_a_max_failures_stop_winds_down_is_an_interruption(spark, tmp_path) -> None:
    # The first stop reason won: Ctrl-C while the study waited for its running trial after
    # --max-failures exited 1 with "stopped early", not 130 with "deepspark: interrupted".
    started = tmp_path / "trial-1-started"

    def objective(config, reporter):
        if reporter.number == 1:
            started.touch()
            time.sleep(120)  # cancelled by the Ctrl-C; bounded if not
        deadline = time.monotonic() + 60
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.05)  # fail only once trial 1 runs: the stop then has a trial to wait for
        raise RuntimeError("fails")

    def ctrl_c_after_the_failure(event) -> None:
        if event.kind.value == "finish" and event.record.state is TrialState.FAIL:
            _thread.interrupt_main()  # the study has stopped (max_failures=1); trial 1 still runs

    try:
        result = tune(
            objective,
            space=X,
            trials=4,
            sampler="random",
            pruner="none",
            parallelism=2,
            max_failures=1,
            on_event=ctrl_c_after_the_failure,
            run_dir=tmp_path / "c",
        )
    except KeyboardInterrupt:
        pytest.fail("the Ctrl-C escaped tune: it came after the study wound down")
    assert result.stop_reason == "interrupted"  # what the CLI turns into 130 and "deepspark: interrupted"
    [failed] = result.records  # the finished trial is kept; the running one is queued for --resume
    assert (failed.number, failed.state, failed.error) == (0, TrialState.FAIL, "RuntimeError: fails")


def test_killed_task_is_infrastructure_failure_and_runs_again(spark, tmp_path) -> None:
    def objective(config, reporter):
        if reporter.number == 1 and reporter.attempt == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # the Python worker dies mid-trial
        return {"accuracy": config["x"], "attempt": reporter.attempt}

    result = tune(
        objective, space=X, trials=4, sampler="random", pruner="none", parallelism=2, run_dir=tmp_path / "k"
    )
    assert result.counts() == {"complete": 4, "pruned": 0, "fail": 0}
    killed = next(r for r in result.records if r.number == 1)
    assert killed.attempts == 2 and killed.metrics["attempt"] == 2
    assert all(r.attempts == 1 for r in result.records if r.number != 1)


def test_threads_per_trial_honoured_inside_the_task(spark, tmp_path, caplog) -> None:
    def objective(config, reporter):
        import torch

        return {
            "accuracy": 1.0,
            "torch_threads": torch.get_num_threads(),
            "omp": float(os.environ["OMP_NUM_THREADS"]),
            "reporter_threads": reporter.threads,
        }

    result = tune(
        objective, space=X, trials=2, sampler="random", pruner="none", parallelism=2, run_dir=tmp_path / "one"
    )
    assert {r.metrics["torch_threads"] for r in result.records} == {1.0}
    assert result.parallelism == 2
    with caplog.at_level(logging.WARNING, logger="deepspark"):
        result = tune(
            objective,
            space=X,
            trials=2,
            sampler="random",
            pruner="none",
            threads_per_trial=2,
            parallelism=2,
            run_dir=tmp_path / "two",
        )
    assert {r.metrics["torch_threads"] for r in result.records} == {2.0}
    assert {r.metrics["omp"] for r in result.records} == {2.0}
    # local[2] has 2 cores: two 2-thread trials at once would oversubscribe, so they ran one at a time.
    assert result.parallelism == 1
    assert "running at most 1 trials at once" in caplog.text


def test_parallelism_beyond_slots_warns_with_the_number(spark, tmp_path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="deepspark"):
        result = tune(
            _quadratic,
            space=X,
            trials=3,
            sampler="random",
            pruner="none",
            parallelism=7,
            run_dir=tmp_path / "p",
        )
    assert "parallelism 7 is more than the cluster's 2 task slots" in caplog.text
    assert result.parallelism == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"space": {"x": {"type": "gauss", "low": 0, "high": 1}}}, "unknown distribution"),
        ({"space": {"x": {"type": "uniform", "low": 1, "high": 0}}}, "low must be less than high"),
        ({"space": {"x": {"type": "loguniform", "low": 0, "high": 1}}}, "bounds must be > 0"),
        ({"space": X, "sampler": "cmaes-ish"}, "sampler: expected one of"),
        ({"space": X, "pruner": "hyperband-ish"}, "pruner: expected one of"),
        ({"space": X, "trials": 0}, "trials: expected an integer >= 1"),
        ({"space": X, "threads_per_trial": 0}, "threads_per_trial"),
        ({"space": {}}, "no parameter to search"),
        ({"space": X, "callbacks": _quadratic}, "callbacks: expected a list of Optuna study callbacks"),
        ({"space": X, "default_config": "yes"}, "default_config: expected True, False or a mapping"),
        (
            {"space": X, "default_config": {"x": 0.5, "f": object()}},
            r"default_config\['f'\]: expected a number",
        ),
    ],
)
def test_bad_input_fails_before_any_spark_job(tmp_path, monkeypatch, kwargs, message) -> None:
    import deepspark.spark as ds_spark

    def no_spark(*args, **kw):
        raise AssertionError("a Spark session was requested before validation finished")

    monkeypatch.setattr(ds_spark, "session", no_spark)
    with pytest.raises(ConfigError, match=message):
        tune(_quadratic, run_dir=tmp_path / "bad", **kwargs)


def test_existing_run_dir_needs_resume(tmp_path) -> None:
    run = tmp_path / "exists"
    run.mkdir()
    (run / "something").write_text("x")
    with pytest.raises(ConfigError, match="already exists; pass resume=True"):
        tune(_quadratic, space=X, trials=2, run_dir=run)
    with pytest.raises(ConfigError, match="not a deepspark run directory"):
        tune(_quadratic, space=X, trials=2, run_dir=run, resume=True)


def test_resume_runs_only_what_is_missing(spark, tmp_path) -> None:
    run = tmp_path / "res"
    first = tune(_quadratic, space=X, trials=3, sampler="random", pruner="none", run_dir=run)
    assert len(first.records) == 3
    seen: list[int] = []

    def counting(config, reporter):
        seen.append(reporter.number)  # runs in a worker: record through the result instead
        return {"accuracy": 1.0 - (config["x"] - 0.3) ** 2, "resumed": 1}

    second = tune(counting, run_dir=run, resume=True, trials=5)
    assert len(second.records) == 5
    resumed = [r for r in second.records if r.metrics.get("resumed")]
    assert sorted(r.number for r in resumed) == [3, 4]
    assert Path(run / "study.journal").is_file()


def test_a_resume_while_the_study_runs_is_refused_and_no_trial_runs_twice(spark, tmp_path) -> None:
    # Two commands in one run directory (two `tune --resume` of it, or one while the study runs) both
    # ran the study: trials beyond those asked for, each process's reports over the other's. The run
    # directory is now held by the running study.
    run = tmp_path / "held"
    refused: list[BaseException] = []

    def resume_meanwhile(to_run: int, width: int) -> None:
        try:
            tune(_quadratic, run_dir=run, resume=True)
        except ConfigError as exc:
            refused.append(exc)

    result = tune(
        _quadratic, space=X, trials=3, sampler="random", pruner="none", run_dir=run, on_start=resume_meanwhile
    )
    assert len(refused) == 1 and "in use by another deepspark command" in str(refused[0])
    assert len(result.records) == 3
    assert len(list(csv.DictReader((run / "trials.csv").open()))) == 3
    assert len(tune(_quadratic, run_dir=run, resume=True).records) == 3  # once it ended, as before


def _later_is_better(config, reporter):
    return {"accuracy": float(reporter.number)}


def test_a_resume_rewrites_reports_that_a_dead_driver_left_behind_its_journal(spark, tmp_path) -> None:
    """A driver that dies after its last trial's tell and before its reports (killed, or Ctrl-C while
    the reports are written) leaves the journal ahead of best.json; a resume with nothing left to run
    must write the reports from the journal, not keep the stale ones."""
    run = tmp_path / "dead-driver"
    kwargs = {"sampler": "random", "pruner": "none", "parallelism": 1}
    tune(_later_is_better, space=X, trials=3, run_dir=run, **kwargs)
    stale = (run / "best.json").read_bytes()
    tune(_later_is_better, run_dir=run, resume=True, trials=5)
    (run / "best.json").write_bytes(stale)  # what the dead driver left: best.json of 3 trials
    result = tune(_later_is_better, run_dir=run, resume=True)
    assert result.counts() == {"complete": 5, "pruned": 0, "fail": 0}
    best = json.loads((run / "best.json").read_text())
    assert best["counts"] == {"complete": 5, "pruned": 0, "fail": 0}
    assert best["best"]["trial"] == result.best.number == result.summary["best"]["trial"] == 4
    assert len(list(csv.DictReader((run / "trials.csv").open()))) == 5


def _hangs_in_trial_0(config, reporter):
    if reporter.number == 0:
        time.sleep(120)  # a hang, bounded: a regression fails in minutes, not CI's hour
    return {"accuracy": config["x"]}


def test_a_hung_trial_fails_after_trial_timeout_and_the_study_goes_on(spark, tmp_path) -> None:
    result = tune(
        _hangs_in_trial_0,
        space=X,
        trials=4,
        sampler="random",
        pruner="none",
        parallelism=2,
        trial_timeout=2,
        run_dir=tmp_path / "t",
    )
    assert result.counts() == {"complete": 3, "pruned": 0, "fail": 1}
    [hung] = [r for r in result.records if r.state is TrialState.FAIL]
    assert (hung.number, hung.error, hung.attempts) == (0, "trial timed out after 2 s", 1)
    assert result.stop_reason is None


def _always_hangs(config, reporter):
    time.sleep(120)  # a hang, bounded: a regression fails in minutes, not CI's hour


def test_the_study_timeout_interrupts_hung_trials(spark, tmp_path) -> None:
    started = time.monotonic()
    result = tune(
        _always_hangs, space=X, trials=4, sampler="random", pruner="none", timeout=5, run_dir=tmp_path / "d"
    )
    # Interrupted, not waited for: the trials sleep 120 s; 60 s leaves a slow or busy machine room for
    # the Spark job's start and cancellation.
    assert time.monotonic() - started < 60
    assert result.stop_reason == "timeout"
    assert result.records == ()  # the interrupted trials are queued for resume, not counted


def _slow_reporting(config, reporter):
    for step in range(4):  # 2 s per trial: twice the heartbeat timeout, with reports between beats
        time.sleep(0.5)
        reporter.report(step, config["x"])
    return {"accuracy": config["x"]}


def test_heartbeats_keep_trials_longer_than_the_heartbeat_timeout_alive(spark, tmp_path) -> None:
    result = tune(
        _slow_reporting,
        space=X,
        trials=2,
        sampler="random",
        pruner="none",
        heartbeat_timeout=1.0,
        run_dir=tmp_path / "h",
    )
    assert result.counts()["complete"] == 2
    assert all(r.attempts == 1 for r in result.records)


def _cannot_import(spec, slot, partition):
    raise ModuleNotFoundError("No module named 'deepspark'")


def test_every_slot_failing_the_same_way_stops_after_one_round_with_the_fix(
    spark, tmp_path, monkeypatch, caplog
) -> None:
    from deepspark.errors import RunError
    from deepspark.tuning import runner

    monkeypatch.setattr(runner, "run_worker", _cannot_import)
    with pytest.raises(RunError) as caught:
        tune(_quadratic, space=X, trials=4, sampler="random", pruner="none", run_dir=tmp_path / "s")
    message = str(caught.value)
    assert "ModuleNotFoundError: No module named 'deepspark'" in message
    assert "install deepspark on the executors" in message and "spark.pyspark.python" in message
    assert len(message.splitlines()) == 1
    assert "resubmitting (2)" not in caplog.text  # one round, not max_attempts per slot
    assert not (tmp_path / "s").exists()  # a failed start leaves no run directory


def test_cli_resume_of_a_python_objective_study_says_how_to_resume_it(spark, tmp_path, capsys) -> None:
    from deepspark.cli import main

    run = tmp_path / "py"
    tune(_quadratic, space=X, trials=1, sampler="random", pruner="none", run_dir=run)
    assert main(["tune", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("deepspark: error: resume:") and "\n" not in err
    assert f"deepspark.tune(_quadratic, run_dir='{run}', resume=True)" in err


@pytest.mark.slow
def test_a_large_tpe_study_samples_in_processes_that_end_with_it(spark, tmp_path, monkeypatch) -> None:
    import deepspark.tuning.runner as runner
    from _cluster import children
    from deepspark.tuning.sampling import sampler_processes

    large = 400  # "large" lowered from 5,000 trials for the test's sake
    monkeypatch.setattr(runner, "PROCESS_FROM_TRIALS", large)
    seen: dict[int, list[int]] = {}

    def look(event) -> None:
        if event.kind.value == "start" and event.number == 5:  # the samplers start before the trials
            seen[len(seen)] = children(b"deepspark.tuning.sampling")

    result = tune(
        _quadratic,
        space=X,
        trials=large,
        sampler="tpe",
        pruner="none",
        parallelism=2,
        run_dir=tmp_path / "big",
        on_event=look,
    )
    assert result.counts() == {"complete": large, "pruned": 0, "fail": 0}
    assert sorted(r.number for r in result.records) == list(range(large))
    # One sampler process per driver core (at most 4) sampled for the whole study, and they ended with it.
    assert len(seen[0]) == sampler_processes()
    assert not children(b"deepspark.tuning.sampling")
    # It sampled as TPE does: concentrated on the optimum at 0.3 once it had seen trials.
    late = [r.params["x"] for r in result.records if r.number >= large - 100]
    assert sum(abs(x - 0.3) < 0.1 for x in late) > 50
    # A study below the threshold samples in the driver: no process.
    small = tune(
        _quadratic,
        space=X,
        trials=20,
        sampler="tpe",
        pruner="none",
        parallelism=2,
        run_dir=tmp_path / "small",
        on_event=look,
    )
    assert small.counts()["complete"] == 20 and seen[1] == []


def _numpy_result(config, reporter):
    import numpy as np
    import torch

    x = np.float32(config["x"])
    return {"accuracy": x, "f1": np.float64(0.5), "n": np.int64(3), "loss": torch.tensor(0.25)}


def _unsendable_result(config, reporter):
    return {"accuracy": 0.5, "model": object()}


def test_numpy_and_torch_scalars_in_a_result_are_numbers_and_an_unsendable_value_fails_the_trial(
    spark, tmp_path
) -> None:
    result = tune(_numpy_result, space=X, trials=2, sampler="random", pruner="none", run_dir=tmp_path / "np")
    assert result.counts()["complete"] == 2
    for record in result.records:
        assert record.attempts == 1
        assert record.value == pytest.approx(record.params["x"], abs=1e-6)
        assert record.metrics["n"] == 3.0 and record.metrics["loss"] == 0.25
    # A value the driver cannot receive fails the trial, once, saying which: not a lost worker, retried.
    bad = tune(_unsendable_result, space=X, trials=1, pruner="none", run_dir=tmp_path / "bad")
    (record,) = bad.records
    assert record.state is TrialState.FAIL and record.attempts == 1
    assert "'model': object" in (record.error or "")


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_a_resumed_study_samples_new_configurations_not_the_first_ones_again(
    spark, tmp_path, sampler
) -> None:
    # Two trials (fewer than TPE's start-up trials), then the study extended to six: a sampler seeded
    # again as at the start would propose the first two configurations again.
    space = {**X, "y": {"type": "choice", "values": [1, 2, 3]}}
    run = tmp_path / sampler
    tune(_quadratic, space=space, trials=2, sampler=sampler, pruner="none", run_dir=run, parallelism=1)
    result = tune(_quadratic, run_dir=run, resume=True, trials=6, parallelism=1)
    configs = [tuple(sorted(r.params.items())) for r in result.records]
    assert len(configs) == 6 and len(set(configs)) == 6


def _config_as_seen(config, reporter):
    return {"accuracy": 0.5, "seen": repr(sorted(config.items()))}


def test_the_default_configuration_reaches_the_objective_with_the_types_sampled_trials_get(
    spark, tmp_path
) -> None:
    import numpy as np

    space = {
        "n": {"type": "int", "low": 1, "high": 8},
        "m": {"type": "int", "low": 1, "high": 8},
        "c": {"type": "choice", "values": [1, 2, "a"]},
        "u": {"type": "uniform", "low": 0, "high": 2},
    }
    default = {"n": 4.0, "m": np.int64(3), "c": 1.0, "u": 1}
    result = tune(
        _config_as_seen, space=space, trials=1, pruner="none", run_dir=tmp_path / "d", default_config=default
    )
    (record,) = result.records
    # 4.0 for an int parameter reached the objective as a float (the journal said 4), np.int64 was refused.
    assert record.is_default and record.metrics["seen"] == repr([("c", 1), ("m", 3), ("n", 4), ("u", 1.0)])


def _distance(config, reporter):
    return abs(config["x"] - 0.3)  # a loss, returned bare: it is named after the default metric


def test_a_minimised_study_ranks_the_lowest_first_and_reports_no_error_reduction(spark, tmp_path) -> None:
    from deepspark.tuning.report import leaderboard

    result = tune(
        _distance,
        space=X,
        trials=4,
        sampler="random",
        pruner="none",
        direction="minimize",
        default_config={"x": 0.9},
        run_dir=tmp_path / "min",
    )
    values = sorted(r.value for r in result.records)
    assert result.best.value == values[0] and result.default.value == pytest.approx(0.6)
    assert [r.value for r in leaderboard(result.records, maximize=False)] == values
    best = json.loads((tmp_path / "min" / "best.json").read_text())
    assert best["direction"] == "minimize" and best["best"]["value"] == values[0]
    # 1 - loss is no error rate: the lower (better) best read as a negative reduction, "worse than default".
    assert best["error_reduction"] is None and result.error_reduction is None


_NOT_NUMBERS = [True, "0.5", None]


def _metric_not_a_number(config, reporter):
    return {"accuracy": _NOT_NUMBERS[config["i"]]}


def test_a_returned_metric_that_is_not_a_number_fails_the_trial_as_a_bare_one_does(spark, tmp_path) -> None:
    space = {"i": {"type": "grid", "values": list(range(len(_NOT_NUMBERS)))}}
    result = tune(
        _metric_not_a_number,
        space=space,
        sampler="grid",
        pruner="none",
        run_dir=tmp_path / "nan",
        default_config=False,
    )
    # float() made True a 1.0 and "0.5" a 0.5 (the metric kept as the string), and None failed with its message.
    for record in sorted(result.records, key=lambda r: r.params["i"]):
        assert record.state is TrialState.FAIL and record.attempts == 1
        given = _NOT_NUMBERS[record.params["i"]]
        assert record.error == f"TypeError: the objective's 'accuracy' must be a number, got {given!r}"


def _nested_result(config, reporter):
    return {"accuracy": 0.5, "per_class": {"a": 1, "b": [0.25, 0.75]}, "curve": [1, 2], "note": "x"}


def test_a_results_lists_and_dicts_are_kept_in_the_records_and_left_out_of_trials_csv(
    spark, tmp_path
) -> None:
    # The docs let a result hold lists and dicts; the stored record dropped them without a word.
    run = tmp_path / "nested"
    result = tune(_nested_result, space=X, trials=1, sampler="random", pruner="none", run_dir=run)
    expected = {"accuracy": 0.5, "per_class": {"a": 1, "b": [0.25, 0.75]}, "curve": [1, 2], "note": "x"}
    assert result.records[0].metrics == expected
    again = tune(_nested_result, run_dir=run, resume=True)  # read back from the journal alone
    assert again.records[0].metrics == expected
    header = next(csv.reader((run / "trials.csv").open()))
    assert "metric_note" in header and "metric_curve" not in header and "metric_per_class" not in header


def test_a_journal_lock_a_killed_driver_left_is_let_go_at_once(tmp_path) -> None:
    # A driver killed inside an append leaves Optuna's lock file; the resume's first write then waited
    # Optuna's 30 s grace. The resume holds the run directory, so the lock is known to be left over.
    import optuna
    from optuna.storages import JournalStorage

    from deepspark.tuning.runner import JournalFile

    path = tmp_path / "study.journal"
    optuna.create_study(study_name="s", storage=JournalStorage(JournalFile(path)))
    lock = tmp_path / "study.journal.lock"  # Optuna's JournalFileSymlinkLock
    os.symlink(path, lock)
    JournalFile(path)  # not held: Optuna's own wait, at the first write
    assert os.path.lexists(lock)
    storage = JournalStorage(JournalFile(path, held=True))
    assert not os.path.lexists(lock)
    optuna.load_study(study_name="s", storage=storage).ask()
    assert len(optuna.load_study(study_name="s", storage=storage).trials) == 1


def test_an_append_the_disk_cut_short_never_makes_the_journal_unreadable(tmp_path) -> None:
    # A full disk let an append write part of its line; the next append that succeeded (space freed)
    # made the whole journal unreadable ("Invalid log format"): the study and its finished trials lost.
    import resource

    import optuna
    from optuna.storages import JournalStorage

    from deepspark.tuning.runner import JournalFile

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    path = tmp_path / "study.journal"
    study = optuna.create_study(study_name="s", storage=JournalStorage(JournalFile(path)))
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=1)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size + 20, hard))  # room for 20 bytes
    try:
        with pytest.raises(OSError):
            study.ask()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert path.read_bytes().endswith(b"\n")  # the cut line is gone
    again = optuna.load_study(study_name="s", storage=JournalStorage(JournalFile(path)))
    again.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=1)
    reread = optuna.load_study(study_name="s", storage=JournalStorage(JournalFile(path)))
    assert [t.state for t in reread.trials] == [optuna.trial.TrialState.COMPLETE] * 2
