"""The coordinator's wire protocol, driven by plain sockets (no Spark): lost workers and retries."""

from __future__ import annotations

import socket
import time

import optuna
import pytest

from deepspark.tuning import protocol
from deepspark.tuning.coordinator import Coordinator


def _started(study: optuna.Study, n_trials: int) -> Coordinator:
    coord = Coordinator(
        study,
        distributions={"x": optuna.distributions.FloatDistribution(0.0, 1.0)},
        fixed={},
        n_trials=n_trials,
        token="secret",
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


def _connect(coord: Coordinator, slot: int) -> socket.socket:
    sock = socket.create_connection(coord.address, timeout=10)
    protocol.send(sock, {"op": "hello", "token": "secret", "slot": slot, "worker": f"w{slot}"})
    return sock


def _until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_a_worker_that_hung_up_while_waiting_is_not_handed_the_lost_trial(coordinator) -> None:
    # Two workers of one executor: w0 runs the only trial, w1 waits for work in "next".
    w0 = _connect(coordinator, 0)
    protocol.send(w0, {"op": "next"})
    first = protocol.recv(w0)
    assert first["attempt"] == 1
    w1 = _connect(coordinator, 1)
    protocol.send(w1, {"op": "next"})
    time.sleep(0.3)  # w1's server thread is now waiting for a trial to come free
    # The executor dies: both workers hang up, the waiting one first.
    w1.close()
    time.sleep(0.1)
    w0.close()
    _until(lambda: coordinator.counts()["running"] == 0)
    # Spark restarts the task on a new executor: it gets the trial as its second attempt, not a third.
    w2 = _connect(coordinator, 0)
    try:
        protocol.send(w2, {"op": "next"})
        again = protocol.recv(w2)
        assert again["trial"] == first["trial"]
        assert again["attempt"] == 2
        protocol.send(w2, {"op": "done", "trial": again["trial"], "state": "complete", "value": 0.5})
        assert protocol.recv(w2) == {"send_model": True}
    finally:
        w2.close()
    _until(lambda: coordinator.finished)
    [record] = coordinator.records
    assert record.attempts == 2


def test_a_connection_without_the_token_gets_nothing(coordinator) -> None:
    sock = socket.create_connection(coordinator.address, timeout=10)
    try:
        protocol.send(sock, {"op": "hello", "token": "guess", "slot": 0, "worker": "intruder"})
        protocol.send(sock, {"op": "next"})
        with pytest.raises(ConnectionError):
            protocol.recv(sock)
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
            protocol.send(worker, {"op": "next"})
            first = protocol.recv(worker)
            protocol.send(worker, {"op": "report", "trial": first["trial"], "step": 1, "value": 0.5})
            assert protocol.recv(worker) == {"prune": True}
            protocol.send(worker, {"op": "done", "trial": first["trial"], "state": "pruned"})
            protocol.recv(worker)
            protocol.send(worker, {"op": "next"})
            second = protocol.recv(worker)
            protocol.send(
                worker,
                {"op": "report", "trial": second["trial"], "step": 1, "value": 0.5, "final": True},
            )
            assert protocol.recv(worker) == {"prune": False}
            protocol.send(worker, {"op": "done", "trial": second["trial"], "state": "complete", "value": 0.5})
            protocol.recv(worker)
        finally:
            worker.close()
        _until(lambda: coord.finished)
        trials = study.get_trials(deepcopy=False)
        assert [t.state for t in trials] == [optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.COMPLETE]
        assert trials[1].intermediate_values == {1: 0.5}
    finally:
        coord.close()
