"""The coordinator's protocol, driven by plain wire connections (no Spark): lost workers and retries."""

from __future__ import annotations

import socket
import time

import optuna
import pytest

from deepspark import wire
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


def _connect(coord: Coordinator, slot: int) -> wire.Connection:
    host, port = coord.address
    conn = wire.connect(host, port, token="secret", hello={"slot": slot, "worker": f"w{slot}"}, timeout=10)
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
