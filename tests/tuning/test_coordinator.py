"""The coordinator's protocol, driven by plain wire connections (no Spark): lost workers and retries."""

from __future__ import annotations

import datetime
import errno
import socket
import threading
import time

import optuna
import pytest

from deepspark import wire
from deepspark.tuning.coordinator import Coordinator


def _started(study: optuna.Study, n_trials: int, **clocks) -> Coordinator:
    coord = Coordinator(
        study,
        distributions={"x": optuna.distributions.FloatDistribution(0.0, 1.0)},
        fixed={},
        n_trials=n_trials,
        token="secret",
        **clocks,
    )
    coord.start()
    return coord


@pytest.fixture
def coordinator():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    coord = _started(optuna.create_study(direction="maximize"), n_trials=1)
    try:
        yield coord
    finally:
        coord.close()


def _connect(coord: Coordinator, slot: int, **hello: object) -> wire.Connection:
    host, port = coord.address
    hello = {"slot": slot, "worker": f"w{slot}", **hello}
    conn = wire.connect(host, port, token="secret", hello=hello, timeout=10)
    conn.settimeout(10)
    return conn


def _ask(conn: wire.Connection, message: dict) -> dict:
    conn.send(message)
    answer, payload = conn.recv()
    assert payload == b""
    return answer


def _until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_a_worker_that_hung_up_while_waiting_is_not_handed_the_lost_trial(coordinator) -> None:
    # Two workers of one executor: w0 runs the only trial, w1 waits for work in "next".
    w0 = _connect(coordinator, 0)
    first = _ask(w0, {"op": "next"})
    assert first["attempt"] == 1
    w1 = _connect(coordinator, 1)
    w1.send({"op": "next"})
    time.sleep(0.3)  # w1's server thread is now waiting for a trial to come free
    # The executor dies: both workers hang up, the waiting one first.
    w1.close()
    time.sleep(0.1)
    w0.close()
    _until(lambda: coordinator.counts()["running"] == 0)
    # Spark restarts the task on a new executor: it gets the trial as its second attempt, not a third.
    w2 = _connect(coordinator, 0)
    try:
        again = _ask(w2, {"op": "next"})
        assert again["trial"] == first["trial"]
        assert again["attempt"] == 2
        done = {"op": "done", "trial": again["trial"], "state": "complete", "value": 0.5}
        assert _ask(w2, done) == {"send_model": True}
    finally:
        w2.close()
    _until(lambda: coordinator.finished)
    [record] = coordinator.records
    assert record.attempts == 2


def test_a_speculative_copy_of_a_slots_task_stands_by_until_the_original_ends() -> None:
    # spark.speculation with spark.speculation.task.duration.threshold runs a copy of a long-lived slot
    # task beside it. Taken for a restart, it had the running trial re-queued (the original's result was
    # ignored), the copy then killed when the original's task ended: trials ran two or three times and
    # some FAILed after max_attempts although no attempt had failed.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    coord = _started(optuna.create_study(direction="maximize"), n_trials=2, copies=lambda stage: stage == 7)
    original = _connect(coord, 0, stage=7)
    try:
        first = _ask(original, {"op": "next"})
        with _connect(coord, 0, stage=7) as copy:
            copy.send({"op": "next"})
            time.sleep(0.3)  # the copy's request waits: no trial for it while the original lives
            assert coord.counts()["running"] == 1
            done = {"op": "done", "trial": first["trial"], "state": "complete", "value": 0.5}
            assert _ask(original, done) == {"send_model": True}  # its result counts
            second = _ask(original, {"op": "next"})
            original.close()  # its executor is lost mid-trial: the copy takes the slot and the trial over
            answer, _ = copy.recv()
            _ask(copy, {"op": "done", "trial": answer["trial"], "state": "complete", "value": 0.4})
            _until(lambda: coord.finished)
    finally:
        original.close()
        coord.close()
    assert (second["attempt"], answer["trial"], answer["attempt"]) == (1, second["trial"], 2)
    assert sorted((r.number, r.attempts, r.value) for r in coord.records) == [
        (first["trial"], 1, 0.5),
        (second["trial"], 2, 0.4),
    ]


def test_a_connection_without_the_token_gets_nothing(coordinator) -> None:
    sock = socket.create_connection(coordinator.address, timeout=10)
    try:
        wire.send(sock, {"op": "hello", "token": "guess", "slot": 0, "worker": "intruder"})
        wire.send(sock, {"op": "next"})
        with pytest.raises(ConnectionError):
            wire.recv(sock)
    finally:
        sock.close()
    assert coordinator.counts()["running"] == 0


def test_the_last_step_is_recorded_but_never_prunes() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # A pruner that prunes at every step it sees: only the final flag can keep a trial alive.
    study = optuna.create_study(
        direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=0.9, n_warmup_steps=0)
    )
    coord = _started(study, n_trials=2)
    try:
        worker = _connect(coord, 0)
        try:
            first = _ask(worker, {"op": "next"})
            report = {"op": "report", "trial": first["trial"], "step": 1, "value": 0.5}
            assert _ask(worker, report) == {"prune": True}
            _ask(worker, {"op": "done", "trial": first["trial"], "state": "pruned"})
            second = _ask(worker, {"op": "next"})
            report = {"op": "report", "trial": second["trial"], "step": 1, "value": 0.5, "final": True}
            assert _ask(worker, report) == {"prune": False}
            _ask(worker, {"op": "done", "trial": second["trial"], "state": "complete", "value": 0.5})
        finally:
            worker.close()
        _until(lambda: coord.finished)
        trials = study.get_trials(deepcopy=False)
        assert [t.state for t in trials] == [optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.COMPLETE]
        assert trials[1].intermediate_values == {1: 0.5}
    finally:
        coord.close()


def test_the_default_configuration_is_never_pruned() -> None:
    # Trial 0 is the error reduction's baseline: ASHA pruned it whenever a parallel trial reported a
    # better first epoch, and best.json then had no default (and no error reduction) at all.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=0.9, n_warmup_steps=0)
    )
    study.enqueue_trial({"x": 0.5}, user_attrs={"deepspark:default": True})
    coord = _started(study, n_trials=2)
    try:
        worker = _connect(coord, 0)
        try:
            for prune in (False, True):  # the default (trial 0), then a trial the pruner stops
                trial = _ask(worker, {"op": "next"})
                report = {"op": "report", "trial": trial["trial"], "step": 1, "value": 0.5}
                assert _ask(worker, report) == {"prune": prune}
                done = {"op": "done", "trial": trial["trial"], "state": "pruned" if prune else "complete"}
                _ask(worker, {**done, "value": None if prune else 0.5})
        finally:
            worker.close()
        _until(lambda: coord.finished)
        trials = study.get_trials(deepcopy=False)
        assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED]
        assert trials[0].intermediate_values == {1: 0.5}  # it still fed the pruner
    finally:
        coord.close()


def test_the_best_model_arrives_as_payload_bytes_and_workers_get_the_endpoint() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    saved: list[tuple[int, dict]] = []
    coord = Coordinator(
        optuna.create_study(direction="maximize"),
        distributions={"x": optuna.distributions.FloatDistribution(0.0, 1.0)},
        fixed={},
        n_trials=1,
        on_model=lambda record, files: saved.append((record.number, dict(files))),
    )
    coord.start()
    try:
        endpoint = coord.endpoint
        assert (endpoint.host, endpoint.port) == coord.address and len(endpoint.token) >= 32
        hello = {"slot": 0, "worker": "w0"}
        with wire.connect(endpoint.host, endpoint.port, token=endpoint.token, hello=hello) as worker:
            worker.settimeout(10)
            trial = _ask(worker, {"op": "next"})
            done = {"op": "done", "trial": trial["trial"], "state": "complete", "value": 0.9}
            assert _ask(worker, done) == {"send_model": True}
            weights = bytes(range(256)) * 4
            files = [["model.safetensors", len(weights)], ["spec.json", 2]]
            worker.send({"op": "model", "trial": trial["trial"], "files": files}, weights + b"{}")
            assert worker.recv() == ({"ok": True}, b"")
        _until(lambda: coord.finished)
    finally:
        coord.close()
    assert saved == [(0, {"model.safetensors": weights, "spec.json": b"{}"})]


def test_a_model_the_driver_cannot_write_stops_the_study_not_the_worker() -> None:
    # best/ on a full disk: the write raised in the worker's connection thread, was taken for the worker
    # disconnecting (its Spark job failed and ran again) and the study ended with exit 0 and no best/.
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def on_model(record, files) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/study/best")

    coord = Coordinator(
        optuna.create_study(direction="maximize"),
        distributions={"x": optuna.distributions.FloatDistribution(0.0, 1.0)},
        fixed={},
        n_trials=2,
        on_model=on_model,
    )
    coord.start()
    try:
        endpoint = coord.endpoint
        hello = {"slot": 0, "worker": "w0"}
        with wire.connect(endpoint.host, endpoint.port, token=endpoint.token, hello=hello) as worker:
            worker.settimeout(10)
            trial = _ask(worker, {"op": "next"})
            done = {"op": "done", "trial": trial["trial"], "state": "complete", "value": 0.9}
            assert _ask(worker, done) == {"send_model": True}
            worker.send({"op": "model", "trial": trial["trial"], "files": [["spec.json", 2]]}, b"{}")
            assert worker.recv() == ({"ok": True}, b"")  # answered: the worker is not cut off
            assert _ask(worker, {"op": "next"}).get("stop")  # and no further trial is started
        _until(lambda: coord.finished)
    finally:
        coord.close()
    assert coord.stop_reason is not None
    assert "could not save trial 0's model" in coord.stop_reason
    assert "No space left on device" in coord.stop_reason and "/runs/study/best" in coord.stop_reason
    assert coord.counts()["complete"] == 1


def test_a_result_the_storage_cannot_record_stops_the_study_not_the_worker(monkeypatch) -> None:
    # The journal on a full disk: study.tell raised in the worker's connection thread, was taken for the
    # worker disconnecting (its Spark job failed and ran again) and the finished trial's result was dropped.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/study/study.journal")

    monkeypatch.setattr(study, "tell", full)
    coord = _started(study, n_trials=2)
    try:
        worker = _connect(coord, 0)
        trial = _ask(worker, {"op": "next"})
        done = {"op": "done", "trial": trial["trial"], "state": "complete", "value": 0.9}
        assert _ask(worker, done) == {"send_model": False}  # answered: the worker is not cut off
        assert _ask(worker, {"op": "next"}).get("stop")  # and no further trial is started
        worker.close()
        _until(lambda: coord.finished)
    finally:
        coord.close()
    assert coord.stop_reason is not None and "could not record the study" in coord.stop_reason
    assert "No space left on device" in coord.stop_reason and "study.journal" in coord.stop_reason


def test_the_default_trials_model_is_kept_even_when_it_is_not_the_best() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({"x": 0.5}, user_attrs={"deepspark:default": True})
    best: list[int] = []
    defaults: list[int] = []
    coord = Coordinator(
        study,
        distributions={"x": optuna.distributions.FloatDistribution(0.0, 1.0)},
        fixed={},
        n_trials=2,
        on_model=lambda record, files: best.append(record.number),
        on_default_model=lambda record, files: defaults.append(record.number),
    )
    coord.start()
    try:
        endpoint = coord.endpoint
        hello = {"slot": 0, "worker": "w0"}
        with wire.connect(endpoint.host, endpoint.port, token=endpoint.token, hello=hello) as worker:
            worker.settimeout(10)
            for value in (0.1, 0.9):  # the default (trial 0), then a better trial
                trial = _ask(worker, {"op": "next"})
                done = {"op": "done", "trial": trial["trial"], "state": "complete", "value": value}
                assert _ask(worker, done) == {"send_model": True}
                files = [["spec.json", 2]]
                worker.send({"op": "model", "trial": trial["trial"], "files": files}, b"{}")
                assert worker.recv() == ({"ok": True}, b"")
        _until(lambda: coord.finished)
    finally:
        coord.close()
    assert best == [0, 1] and defaults == [0]  # trial 0 was the best until trial 1 came


def _clocked(n_trials: int = 1, **clocks) -> Coordinator:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return _started(optuna.create_study(direction="maximize"), n_trials, **clocks)


def test_a_silent_worker_loses_its_trial_after_the_heartbeat_timeout() -> None:
    # A frozen host: the worker says hello, takes a trial, then sends nothing and never closes its socket.
    coord = _clocked(heartbeat_timeout=1.0)
    try:
        frozen = _connect(coord, 0)
        # Taken before the ask: the coordinator hears "next" (and starts the silence) after this, so the
        # trial cannot be lost sooner than the heartbeat timeout, however late the answer arrives here.
        began = time.monotonic()
        first = _ask(frozen, {"op": "next"})
        assert 0 < first["heartbeat_s"] <= 0.25
        _until(lambda: coord.counts()["running"] == 0)
        assert 1.0 < time.monotonic() - began < 5.0
        # Re-queued exactly as for a closed socket: the next worker runs it as its second attempt.
        with _connect(coord, 1) as spare:
            again = _ask(spare, {"op": "next"})
            assert (again["trial"], again["attempt"]) == (first["trial"], 2)
            _ask(spare, {"op": "done", "trial": again["trial"], "state": "complete", "value": 0.5})
        _until(lambda: coord.finished)
        frozen.close()
    finally:
        coord.close()
    [record] = coord.records
    assert record.attempts == 2 and record.value == 0.5


def test_a_silent_workers_slot_is_cancelled_so_its_trial_can_run_again() -> None:
    # One slot, its Python worker frozen (SIGSTOP, a deadlock holding the GIL) while Spark's executor
    # answers: the trial was re-queued after the heartbeat timeout, but the frozen task kept the only
    # slot, so nobody ever ran it, and --trial-timeout no longer saw it running: the study hung.
    cancelled: list[int | None] = []
    coord = _clocked(heartbeat_timeout=1.0, trial_timeout=600, cancel=cancelled.append)
    try:
        frozen = _connect(coord, 0)
        first = _ask(frozen, {"op": "next"})
        _until(lambda: cancelled, timeout=5.0)
        assert cancelled == [0]  # the frozen task's job: the slot starts again
        with _connect(coord, 0) as restarted:
            again = _ask(restarted, {"op": "next"})
            assert (again["trial"], again["attempt"]) == (first["trial"], 2)
            _ask(restarted, {"op": "done", "trial": again["trial"], "state": "complete", "value": 0.5})
        _until(lambda: coord.finished)
        frozen.close()
    finally:
        coord.close()
    assert cancelled == [0]


def test_heartbeats_keep_a_long_trial_alive() -> None:
    coord = _clocked(heartbeat_timeout=1.0)
    try:
        with _connect(coord, 0) as worker:
            trial = _ask(worker, {"op": "next"})
            # 3 s of work, three heartbeat timeouts, with a beat every 0.1 s: a beat may come 0.9 s late
            # (a busy machine) before the trial is taken for lost.
            for _ in range(30):
                worker.send({"op": "heartbeat", "trial": trial["trial"]})
                time.sleep(0.1)
            assert _ask(worker, {"op": "done", "trial": trial["trial"], "state": "complete", "value": 0.7})
        _until(lambda: coord.finished)
    finally:
        coord.close()
    [record] = coord.records
    assert record.attempts == 1 and record.value == 0.7


def test_a_trial_over_its_timeout_fails_is_not_retried_and_its_slot_is_cancelled() -> None:
    cancelled: list[int | None] = []
    coord = _clocked(n_trials=2, trial_timeout=0.5, heartbeat_timeout=None, cancel=cancelled.append)
    try:
        hung = _connect(coord, 0)
        first = _ask(hung, {"op": "next"})
        _until(lambda: coord.records)
        [record] = coord.records
        assert record.state.value == "fail" and record.error == "trial timed out after 0.5 s"
        _until(lambda: cancelled)  # the watchdog cancels the slot just after it records the failure
        assert cancelled == [0]
        with pytest.raises(ConnectionError):  # the hung worker's connection is closed
            _ask(hung, {"op": "done", "trial": first["trial"], "state": "complete", "value": 1.0})
        with _connect(coord, 1) as worker:
            second = _ask(worker, {"op": "next"})
            assert second["trial"] != first["trial"] and second["attempt"] == 1
            _ask(worker, {"op": "done", "trial": second["trial"], "state": "complete", "value": 0.4})
        _until(lambda: coord.finished)
    finally:
        coord.close()
    assert [r.state.value for r in coord.records] == ["fail", "complete"]


def test_a_worker_whose_trial_timed_out_gets_no_new_trial_on_the_connection_being_cut() -> None:
    # The worker finished just as its trial timed out: between the watchdog's decision and its cancel of
    # the slot's job, the worker's next ask was answered with a new trial, which the cancel then killed
    # (an attempt lost, an "infrastructure failure" for a trial that never failed).
    in_cancel, release = threading.Event(), threading.Event()
    cancelled: list[int | None] = []

    def cancel(slot: int | None) -> None:
        cancelled.append(slot)
        in_cancel.set()
        assert release.wait(10.0), "the test never released the cancel"

    coord = _clocked(n_trials=2, trial_timeout=0.5, heartbeat_timeout=None, cancel=cancel)
    try:
        late = _connect(coord, 0)
        first = _ask(late, {"op": "next"})
        assert in_cancel.wait(10.0)  # the watchdog has failed the trial and is cancelling its slot
        done = {"op": "done", "trial": first["trial"], "state": "complete", "value": 1.0}
        assert _ask(late, done) == {"send_model": False}  # too late: the trial has failed
        assert _ask(late, {"op": "next"}) == {"stop": True}
        release.set()
        with pytest.raises(ConnectionError):  # then the watchdog closes it
            late.recv()
        with _connect(coord, 0) as restarted:
            second = _ask(restarted, {"op": "next"})
            assert second["trial"] != first["trial"] and second["attempt"] == 1
            _ask(restarted, {"op": "done", "trial": second["trial"], "state": "complete", "value": 0.4})
        _until(lambda: coord.finished)
    finally:
        release.set()
        coord.close()
    assert [(r.state.value, r.attempts) for r in coord.records] == [("fail", 1), ("complete", 1)]
    assert cancelled == [0]


def test_the_study_deadline_interrupts_running_trials() -> None:
    cancelled: list[int | None] = []
    coord = _clocked(n_trials=3, timeout=0.5, cancel=cancelled.append)
    try:
        hung = _connect(coord, 0)
        first = _ask(hung, {"op": "next"})
        _until(lambda: coord.finished)
        assert coord.stop_reason == "timeout" and cancelled == [None]
        trial = coord.study.trials[first["trial"]]
        assert trial.state == optuna.trial.TrialState.FAIL and trial.user_attrs["deepspark:interrupted"]
        hung.close()
    finally:
        coord.close()
    assert coord.records == []


class _ShiftedClock:
    """``time`` for the coordinator module with a monotonic clock that can jump ahead (the real one
    still paces the watchdog's ticks)."""

    def __init__(self) -> None:
        self.ahead = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.ahead

    def __getattr__(self, name: str):
        return getattr(time, name)


def test_a_worker_that_sees_the_deadline_first_still_gets_the_running_trials_interrupted(monkeypatch) -> None:
    # CI hung for an hour: the other worker asked for a trial just after the deadline, before the
    # watchdog's tick, and set the stop reason; the watchdog then took the deadline as handled and never
    # cancelled the trial that slept on.
    clock = _ShiftedClock()
    monkeypatch.setattr("deepspark.tuning.coordinator.time", clock)
    cancelled: list[int | None] = []
    coord = _clocked(n_trials=3, timeout=600, heartbeat_timeout=None, cancel=cancelled.append)
    try:
        hung = _connect(coord, 0)
        first = _ask(hung, {"op": "next"})
        with _connect(coord, 1) as late:
            clock.ahead = 601.0
            assert _ask(late, {"op": "next"}) == {"stop": True}
        _until(lambda: coord.finished, timeout=5.0)
        assert coord.stop_reason == "timeout" and cancelled == [None]
        trial = coord.study.trials[first["trial"]]
        assert trial.state == optuna.trial.TrialState.FAIL and trial.user_attrs["deepspark:interrupted"]
        hung.close()
    finally:
        coord.close()
    assert coord.records == []


def test_a_worker_asking_after_the_deadline_once_every_trial_is_done_stops_nothing(monkeypatch) -> None:
    # `tune --timeout 25`: all 4 trials completed, and the study still said "stopped early: timeout",
    # since a worker's ask for its next trial came just after the deadline.
    clock = _ShiftedClock()
    monkeypatch.setattr("deepspark.tuning.coordinator.time", clock)
    coord = _clocked(n_trials=1, timeout=600, heartbeat_timeout=None)
    try:
        with _connect(coord, 0) as worker:
            first = _ask(worker, {"op": "next"})
            _ask(worker, {"op": "done", "trial": first["trial"], "state": "complete", "value": 0.5})
            clock.ahead = 601.0
            assert _ask(worker, {"op": "next"}) == {"stop": True}
        _until(lambda: coord.finished, timeout=5.0)
        assert coord.stop_reason is None
    finally:
        coord.close()
    assert [r.state.value for r in coord.records] == ["complete"]


class _RefusesOneFail(optuna.storages.InMemoryStorage):
    """A storage whose first write of a FAIL state raises (a journal on a full disk), then recovers."""

    def __init__(self) -> None:
        super().__init__()
        self.refused = 0

    def set_trial_state_values(self, trial_id, state, values=None):
        if state == optuna.trial.TrialState.FAIL and not self.refused:
            self.refused += 1
            raise OSError("no space left on device")
        return super().set_trial_state_values(trial_id, state, values)


def test_a_deadline_whose_first_application_failed_is_applied_at_the_next_tick(monkeypatch) -> None:
    # The watchdog marked the deadline applied before applying it: when interrupting the trial sampled
    # ahead raised (a storage write), the running trial was never interrupted, and the study hung on it.
    clock = _ShiftedClock()
    monkeypatch.setattr("deepspark.tuning.coordinator.time", clock)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = _RefusesOneFail()
    sampler = optuna.samplers.RandomSampler(seed=0)
    study = optuna.create_study(direction="maximize", storage=storage, sampler=sampler)
    cancelled: list[int | None] = []
    coord = _started(study, 3, timeout=600, heartbeat_timeout=None, cancel=cancelled.append, sample_ahead=1)
    try:
        hung = _connect(coord, 0)
        first = _ask(hung, {"op": "next"})
        _until(lambda: _states(study) == ["RUNNING", "RUNNING"])  # the one running + one sampled ahead
        clock.ahead = 601.0
        _until(lambda: coord.finished, timeout=10.0)
        assert storage.refused == 1 and coord.stop_reason == "timeout" and cancelled == [None]
        trial = study.trials[first["trial"]]
        assert trial.state == optuna.trial.TrialState.FAIL and trial.user_attrs["deepspark:interrupted"]
        with pytest.raises(ConnectionError):  # its worker was hung up on
            hung.recv()
        hung.close()
    finally:
        coord.close()
    assert coord.records == []


def _states(study: optuna.Study) -> list[str]:
    return [t.state.name for t in study.get_trials(deepcopy=False)]


def test_sampling_ahead_keeps_k_trials_asked_and_never_asks_more_than_the_study_runs() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    coord = _started(study, n_trials=5, sample_ahead=2)
    try:
        # Before any worker asks, the sampler thread has two trials ready: RUNNING in the study.
        _until(lambda: _states(study) == ["RUNNING", "RUNNING"])
        time.sleep(0.2)
        assert _states(study) == ["RUNNING", "RUNNING"]  # and no more than two
        worker = _connect(coord, 0)
        try:
            handed = []
            for i in range(5):
                # The sampler thread refills as trials leave (min(2, trials not yet handed out) ahead);
                # waited for, as a one-second trial would, so the hand-over below never races it.
                _until(lambda i=i: _states(study).count("RUNNING") == min(2, 5 - i))
                task = _ask(worker, {"op": "next"})
                handed.append(task["trial"])
                # Each trial the worker gets was sampled before it asked: the next ones are ready.
                done = {
                    "op": "done",
                    "trial": task["trial"],
                    "state": "complete",
                    "value": task["params"]["x"],
                }
                _ask(worker, done)
            assert _ask(worker, {"op": "next"}) == {"stop": True}
        finally:
            worker.close()
        _until(lambda: coord.finished)
        assert handed == [0, 1, 2, 3, 4]
        assert _states(study) == ["COMPLETE"] * 5  # exactly n_trials asked, none left over
        assert [r.number for r in coord.records] == handed
        for t, record in zip(study.get_trials(deepcopy=False), coord.records, strict=True):
            # The configuration the worker ran is Optuna's parameters: not written twice.
            assert "deepspark:config" not in t.user_attrs and record.params == t.params
            # Optuna's start is the ask; the hand-over to the worker is recorded apart, later.
            handed_over = datetime.datetime.fromisoformat(t.user_attrs["deepspark:started"])
            assert t.datetime_start <= handed_over <= t.datetime_complete
    finally:
        coord.close()


def test_trials_sampled_ahead_of_a_stop_are_interrupted_and_queued_for_resume() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    coord = _started(study, n_trials=10, sample_ahead=2)
    try:
        worker = _connect(coord, 0)
        try:
            task = _ask(worker, {"op": "next"})
            _until(lambda: _states(study).count("RUNNING") == 3)  # the one running + two ahead
            ahead = [t.params for t in study.get_trials(deepcopy=False) if t.number != task["trial"]]
            coord.stop("interrupted by the user")
            # The running trial may finish; nothing more is handed out.
            _ask(worker, {"op": "done", "trial": task["trial"], "state": "complete", "value": 0.5})
            assert _ask(worker, {"op": "next"}) == {"stop": True}
        finally:
            worker.close()
        _until(lambda: coord.finished)
    finally:
        coord.close()
    trials = study.get_trials(deepcopy=False)
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "FAIL", "WAITING", "WAITING"]
    for t in trials[1:3]:
        assert t.user_attrs["deepspark:interrupted"] is True
        assert "interrupted by the user" in t.user_attrs["fail_reason"]
    # Their configurations run first on --resume, as re-runs of the interrupted trials.
    assert [t.user_attrs["deepspark:rerun_of"] for t in trials[3:]] == [1, 2]
    distributions = {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}
    assert [study.ask(distributions).params for _ in range(2)] == ahead
    assert len(coord.records) == 1


def test_a_sampler_that_raises_stops_the_study_with_its_error() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    class Broken(optuna.samplers.RandomSampler):
        def sample_independent(self, study, trial, param_name, param_distribution):
            raise RuntimeError("the sampler broke")

    study = optuna.create_study(direction="maximize", sampler=Broken())
    coord = _started(study, n_trials=3, sample_ahead=1)
    try:
        worker = _connect(coord, 0)
        try:
            assert _ask(worker, {"op": "next"}) == {"stop": True}
        finally:
            worker.close()
        assert coord.stop_reason == "the sampler failed: the sampler broke"
    finally:
        coord.close()


def test_a_finished_trial_keeps_its_result_in_one_user_attribute_that_records_read(coordinator) -> None:
    from deepspark.tuning.report import records_from_study
    from deepspark.tuning.trial import RESULT_ATTR, read_result

    w0 = _connect(coordinator, 0)
    try:
        task = _ask(w0, {"op": "next"})
        metrics = {"accuracy": 0.5, "loss": 1.25, "device": "cpu", "shape": [1, 2]}
        done = {"op": "done", "trial": task["trial"], "state": "complete", "value": 0.5}
        _ask(w0, {**done, "metrics": metrics, "duration_s": 2.5})
    finally:
        w0.close()
    _until(lambda: coordinator.counts()["running"] == 0)
    trial = coordinator.study.trials[0]
    # One journal write for the result (each user attribute is one); the list is kept (JSON-able).
    assert trial.user_attrs[RESULT_ATTR] == {
        "metrics": {"accuracy": 0.5, "loss": 1.25, "device": "cpu", "shape": [1, 2]},
        "duration_s": 2.5,
        "worker": "w0",
    }
    assert not {"worker", "duration_s"} & set(trial.user_attrs)
    (record,) = records_from_study(coordinator.study)
    assert (record.metrics["loss"], record.duration_s, record.worker) == (1.25, 2.5, "w0")
    # Studies written before RESULT_ATTR kept one attribute each; they read the same.
    legacy = {"metric:accuracy": 0.5, "metric:loss": 1.25, "duration_s": 2.5, "worker": "w0"}
    assert read_result(legacy) == ({"accuracy": 0.5, "loss": 1.25}, 2.5, "w0")


class _Gated(optuna.samplers.RandomSampler):
    """A sampler whose asks wait at a gate, as a sampler in another process waits on its pipe (no GIL)."""

    def __init__(self) -> None:
        super().__init__(seed=0)
        self.gate = threading.Event()
        self.gate.set()
        self.waiting = threading.Event()

    def sample_independent(self, study, trial, param_name, param_distribution):
        if not self.gate.is_set():
            self.waiting.set()
            assert self.gate.wait(10.0), "the test never opened the gate"
        return super().sample_independent(study, trial, param_name, param_distribution)


def _gated_study() -> tuple[optuna.Study, _Gated]:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = _Gated()
    return optuna.create_study(direction="maximize", sampler=sampler), sampler


def test_with_a_sampler_elsewhere_a_slow_ask_holds_up_no_other_worker() -> None:
    study, sampler = _gated_study()
    coord = _started(study, n_trials=3, parallel_asks=1)
    a, b = _connect(coord, 0), _connect(coord, 1)
    try:
        first = _ask(a, {"op": "next"})
        sampler.gate.clear()
        second: dict = {}
        asking = threading.Thread(target=lambda: second.update(_ask(b, {"op": "next"})))
        asking.start()
        assert sampler.waiting.wait(10.0)  # b's ask is in the sampler now
        # a's result is taken while b's ask waits: the ask does not hold the coordinator's lock.
        _ask(a, {"op": "done", "trial": first["trial"], "state": "complete", "value": 0.1})
        assert not sampler.gate.is_set() and asking.is_alive()
        assert [r.number for r in coord.records] == [first["trial"]]
        sampler.gate.set()
        asking.join(10.0)
        assert second["trial"] == 1
        _ask(b, {"op": "done", "trial": 1, "state": "complete", "value": 0.2})
        third = _ask(a, {"op": "next"})
        _ask(a, {"op": "done", "trial": third["trial"], "state": "complete", "value": 0.3})
        assert _ask(a, {"op": "next"}) == {"stop": True}
        assert _ask(b, {"op": "next"}) == {"stop": True}
    finally:
        sampler.gate.set()
        a.close()
        b.close()
        coord.close()
    assert _states(study) == ["COMPLETE"] * 3  # every trial asked once, run once
    assert sorted(r.number for r in coord.records) == [0, 1, 2]
    assert coord.finished


def test_a_trial_asked_outside_the_lock_as_the_study_stops_is_interrupted_and_queued() -> None:
    study, sampler = _gated_study()
    coord = _started(study, n_trials=5, sample_ahead=1, parallel_asks=1)
    try:
        _until(lambda: _states(study) == ["RUNNING"])  # one sampled ahead
        sampler.gate.clear()
        worker = _connect(coord, 0)
        try:
            task = _ask(worker, {"op": "next"})  # takes the one ahead; the sampler thread asks again
            assert sampler.waiting.wait(10.0)
            assert not coord.finished  # an ask in flight is work in progress
            coord.stop("interrupted by the user")
            sampler.gate.set()
            _ask(worker, {"op": "done", "trial": task["trial"], "state": "complete", "value": 0.5})
            assert _ask(worker, {"op": "next"}) == {"stop": True}
        finally:
            worker.close()
        _until(lambda: coord.finished)
    finally:
        sampler.gate.set()
        coord.close()
    trials = study.get_trials(deepcopy=False)
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "WAITING"]
    assert trials[1].user_attrs["deepspark:interrupted"] is True
    assert trials[2].user_attrs["deepspark:rerun_of"] == 1


def test_a_worker_waits_for_the_trial_the_sampler_thread_is_still_asking() -> None:
    # The last trial was being sampled ahead when the only worker asked for work: nothing running, nothing
    # ready, nothing left to ask, so it was told to stop, and its Spark job ended with a trial on the way
    # (the slot was then resubmitted, a new job per ask until the trial landed).
    study, sampler = _gated_study()
    coord = _started(study, n_trials=2, sample_ahead=1, parallel_asks=1)
    try:
        _until(lambda: _states(study) == ["RUNNING"])  # one sampled ahead
        sampler.gate.clear()
        worker = _connect(coord, 0)
        try:
            first = _ask(worker, {"op": "next"})  # the one ahead; the sampler thread asks the last one
            assert sampler.waiting.wait(10.0)
            _ask(worker, {"op": "done", "trial": first["trial"], "state": "complete", "value": 0.5})
            worker.send({"op": "next"})
            worker.settimeout(0.5)
            with pytest.raises(TimeoutError):  # no answer while the ask is in flight (no bytes read)
                worker.recv()
            worker.settimeout(10)
            sampler.gate.set()
            second, _ = worker.recv()
            assert second["trial"] == 1
            _ask(worker, {"op": "done", "trial": 1, "state": "complete", "value": 0.6})
            assert _ask(worker, {"op": "next"}) == {"stop": True}
        finally:
            worker.close()
        _until(lambda: coord.finished)
    finally:
        sampler.gate.set()
        coord.close()
    assert _states(study) == ["COMPLETE", "COMPLETE"]


def test_a_configuration_beyond_optunas_parameters_is_recorded_and_read_back() -> None:
    from deepspark.tuning.report import records_from_study

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    coord = Coordinator(
        study,
        distributions={"x": optuna.distributions.FloatDistribution(0.0, 1.0)},
        fixed={"epochs": 3},
        n_trials=2,
        token="secret",
    )
    coord.start()
    try:
        worker = _connect(coord, 0)
        try:
            for _ in range(2):
                task = _ask(worker, {"op": "next"})
                assert task["params"] == {"x": task["params"]["x"], "epochs": 3}
                _ask(worker, {"op": "done", "trial": task["trial"], "state": "complete", "value": 0.5})
        finally:
            worker.close()
        _until(lambda: coord.finished)
    finally:
        coord.close()
    for t, record in zip(study.get_trials(deepcopy=False), records_from_study(study), strict=True):
        assert t.user_attrs["deepspark:config"] == {**t.params, "epochs": 3}
        assert record.params == {**t.params, "epochs": 3}


def test_a_better_trials_model_is_never_overwritten_by_an_older_bests_slower_write() -> None:
    # Trial 0's model is being written (slowly: a loaded machine) when trial 1 finishes better and
    # sends its own: the last write to end must be trial 1's, or best/ holds a model best.json does not
    # name (and the study's end then removes it as stale: the best model lost).
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    entered, gate = threading.Event(), threading.Event()
    written: list[int] = []

    def on_model(record, files) -> None:
        if record.number == 0:
            entered.set()
            gate.wait(10)
        written.append(record.number)

    coord = _started(optuna.create_study(direction="maximize"), n_trials=2, on_model=on_model)
    try:
        workers = [_connect(coord, slot) for slot in (0, 1)]
        trials = [_ask(w, {"op": "next"})["trial"] for w in workers]
        assert trials == [0, 1]
        for worker, trial, value in ((workers[0], 0, 0.1), (workers[1], 1, 0.9)):
            assert _ask(worker, {"op": "done", "trial": trial, "state": "complete", "value": value}) == {
                "send_model": True
            }
            worker.send({"op": "model", "trial": trial, "files": [["spec.json", 2]]}, b"{}")
            if trial == 0:
                assert entered.wait(10)  # trial 0's write has begun
        time.sleep(0.3)  # trial 1's model is in: its handler may write now
        gate.set()
        for worker in workers:
            assert worker.recv() == ({"ok": True}, b"")
            worker.close()
        _until(lambda: coord.finished)
    finally:
        gate.set()
        coord.close()
    assert written[-1] == 1
