"""TPE in a process of its own: the same configurations as in the driver, and a study that outlives it."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from _cluster import children
from deepspark.tuning.sampling import ProcessSampler, tpe_sampler

SAMPLER = b"deepspark.tuning.sampling"

#: The tests that look for the sampler's process read this process's children from /proc.
needs_proc = pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads child processes from /proc (Linux)")


def _study(tmp_path: Path, name: str, sampler: optuna.samplers.BaseSampler) -> optuna.Study:
    storage = JournalStorage(JournalFileBackend(str(tmp_path / f"{name}.log")))
    return optuna.create_study(study_name=name, storage=storage, sampler=sampler)


def _process_sampler(tmp_path: Path, name: str, seed: int = 3, processes: int = 1) -> ProcessSampler:
    return ProcessSampler(
        journal=str(tmp_path / f"{name}.log"),
        study_name=name,
        seed=seed,
        n_startup_trials=4,
        processes=processes,
    )


def _run(study: optuna.Study, n: int, *, on_trial=None) -> list[dict]:
    """Ask ``n`` trials with two pending at a time (TPE's constant liar sees them), some pruned, one
    conditional parameter (sampled independently), and return every trial's parameters in order."""
    asked: list[dict] = []
    pending: list[tuple[optuna.Trial, float]] = []
    for i in range(n):
        if on_trial is not None:
            on_trial(i)
        trial = study.ask()
        x = trial.suggest_float("x", -2.0, 2.0)
        width = trial.suggest_int("width", 1, 8)
        kind = trial.suggest_categorical("kind", ["a", "b", None])
        if kind == "a":
            trial.suggest_float("lr", 1e-4, 1.0, log=True)  # conditional: outside the relative space
        asked.append(dict(trial.params))
        pending.append((trial, (x - 0.3) ** 2 + width / 10))
        if len(pending) > 2:
            done, value = pending.pop(0)
            if done.number % 7 == 3:
                done.report(value, 1)
                study.tell(done, state=optuna.trial.TrialState.PRUNED)
            else:
                study.tell(done, value)
    return asked


def test_the_sampler_process_asks_what_the_driver_would_ask_trial_for_trial(tmp_path) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    here = _run(_study(tmp_path, "here", tpe_sampler(seed=3, n_startup_trials=4)), 40)
    sampler = _process_sampler(tmp_path, "there")
    try:
        there = _run(_study(tmp_path, "there", sampler), 40)
        assert sampler.running
    finally:
        sampler.close()
    assert not sampler.running
    assert there == here  # identical values, float for float, past the 4 random start-up trials
    assert len({p["x"] for p in there}) == 40
    # A different seed is a different sequence: the identity above is not the trivial one.
    other = _process_sampler(tmp_path, "other", seed=4)
    try:
        assert _run(_study(tmp_path, "other", other), 8) != here[:8]
    finally:
        other.close()


@needs_proc
def test_a_study_goes_on_in_the_driver_when_the_sampler_process_dies(tmp_path, caplog) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = _process_sampler(tmp_path, "dies")
    study = _study(tmp_path, "dies", sampler)
    pids: list[int] = []

    def kill_at_20(i: int) -> None:
        if i == 20:
            pids.extend(children(SAMPLER))
            for pid in pids:
                os.kill(pid, signal.SIGKILL)

    try:
        with caplog.at_level(logging.WARNING, logger="deepspark.tuning.sampling"):
            asked = _run(study, 30, on_trial=kill_at_20)
        assert len(pids) == 1
        assert not sampler.running
        assert "sampling in the driver from now on" in caplog.text
    finally:
        sampler.close()
    assert len(asked) == 30
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states.count(optuna.trial.TrialState.RUNNING) == 2  # the two still pending, nothing lost
    assert all(-2.0 <= p["x"] <= 2.0 for p in asked)


@needs_proc
def test_a_sampler_process_that_hangs_is_given_up_after_the_reply_timeout(tmp_path, caplog) -> None:
    # A hung child (here frozen with SIGSTOP; a journal on a stuck network disk does the same) never
    # replies and never closes its pipe: the study's ask waited on it for good.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = ProcessSampler(
        journal=str(tmp_path / "hung.log"), study_name="hung", seed=3, n_startup_trials=4, reply_timeout=1.0
    )
    study = _study(tmp_path, "hung", sampler)
    frozen: list[int] = []
    asked: list[dict] = []

    def freeze_at_5(i: int) -> None:
        if i == 5:
            frozen.extend(children(SAMPLER))
            for pid in frozen:
                os.kill(pid, signal.SIGSTOP)

    def run() -> None:
        asked.extend(_run(study, 10, on_trial=freeze_at_5))

    asker = threading.Thread(target=run, daemon=True)
    try:
        with caplog.at_level(logging.WARNING, logger="deepspark.tuning.sampling"):
            began = time.monotonic()
            asker.start()
            asker.join(30.0)
            assert not asker.is_alive(), "the ask still waits on the hung sampler process"
        assert len(frozen) == 1 and frozen[0] not in children(SAMPLER)  # killed, not left stopped
        assert time.monotonic() - began < 20.0
        assert "gave no reply within 1 s); sampling in the driver from now on" in caplog.text
    finally:
        for pid in frozen:
            if pid in children(SAMPLER):
                os.kill(pid, signal.SIGCONT)  # without the bound: let it answer, so the thread ends
        asker.join(30.0)
        sampler.close()
    assert len(asked) == 10 and all(-2.0 <= p["x"] <= 2.0 for p in asked)


def test_a_sampler_process_that_cannot_open_its_study_falls_back_at_once(tmp_path, caplog) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = ProcessSampler(
        journal=str(tmp_path / "nowhere.log"), study_name="missing", seed=0, n_startup_trials=2
    )
    study = _study(tmp_path, "present", sampler)
    try:
        with caplog.at_level(logging.WARNING, logger="deepspark.tuning.sampling"):
            asked = _run(study, 6)
    finally:
        sampler.close()
    assert len(asked) == 6
    assert caplog.text.count("sampling in the driver from now on") == 1  # said once, not per ask


@needs_proc
def test_closing_ends_the_process_and_is_safe_to_repeat(tmp_path) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    never = _process_sampler(tmp_path, "never")
    never.close()  # never started: nothing to end
    sampler = _process_sampler(tmp_path, "closed")
    study = _study(tmp_path, "closed", sampler)
    _run(study, 3)
    (pid,) = children(SAMPLER)
    sampler.close()
    sampler.close()
    assert pid not in children(SAMPLER)
    assert len(_run(study, 3)) == 3  # asks after close are answered in the driver


@needs_proc
def test_two_processes_take_alternate_trials_and_propose_no_duplicates(tmp_path) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = _process_sampler(tmp_path, "two", processes=2)
    study = _study(tmp_path, "two", sampler)
    try:
        asked = _run(study, 30)
        assert sampler.running == 2 and len(children(SAMPLER)) == 2
    finally:
        sampler.close()
    assert not children(SAMPLER)
    # Seeded seed and seed + 1: the two processes' random start-up trials differ, as all trials do.
    assert len({p["x"] for p in asked}) == 30
    one = _run(_study(tmp_path, "one", tpe_sampler(seed=3, n_startup_trials=4)), 30)
    assert asked[0] == one[0] and asked[1] != one[1]  # trial 0 from the first process, 1 from the second


@needs_proc
def test_started_ahead_the_processes_are_up_before_the_first_ask_and_not_restarted(tmp_path) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = _process_sampler(tmp_path, "early", processes=2)
    study = _study(tmp_path, "early", sampler)
    try:
        sampler.start()
        pids = children(SAMPLER)
        assert sampler.running == 2 and len(pids) == 2  # before any ask
        sampler.start()  # already up: nothing new
        asked = _run(study, 6)
        assert sorted(children(SAMPLER)) == sorted(pids)
    finally:
        sampler.close()
    sampler.start()  # closed: stays closed
    assert not children(SAMPLER) and sampler.running == 0
    assert len(asked) == 6
