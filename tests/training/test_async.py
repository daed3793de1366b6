"""The ``async`` strategy: the parameter server's logic on its own, then ``fit`` on local[2] Spark."""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from deepspark import wire
from deepspark.errors import ConfigError, DeepsparkError
from deepspark.models.checkpoint import state_from_bytes, state_to_bytes
from deepspark.training._fit import fit
from deepspark.training.paramserver import AsyncRecord, ParameterServer

BATCH = 8


def _client(port: int, token: str, worker: int, leave_after: int | None, out: dict[int, Any]) -> None:
    """A fake worker: pushes a delta of ones per pull; closes its connection after ``leave_after`` pushes."""
    pushes = 0
    with wire.connect("127.0.0.1", port, token=token, hello={"worker": worker}) as conn:
        conn.send({"op": "loaded", "rows": 40, "digest": "xxhash64-sums:0:0"})
        while True:
            header, payload = conn.recv()
            if header["op"] == "stop":
                out[worker] = ("stop", pushes)
                return
            assert set(state_from_bytes(payload)) == {"w"}
            conn.send(
                {
                    "op": "push",
                    "version": header["version"],
                    "samples": BATCH * int(header["steps"]),
                    "loss_sum": 1.0,
                    "cursor": {"n": 40, "pushes": pushes + 1},
                    "compute_s": 0.0,
                    "comm_s": 0.0,
                },
                state_to_bytes({"w": torch.ones(4)}),
            )
            pushes += 1
            if leave_after is not None and pushes == leave_after:
                out[worker] = ("left", pushes)
                return


def _server(**changes: Any) -> ParameterServer:
    """A parameter server of two workers over one parameter ``w`` (``changes`` replace settings)."""
    settings: dict[str, Any] = {
        "weights": {"w": torch.zeros(4)},
        "parameters": ["w"],
        "workers": 2,
        "staleness": 100,
        "tau": 1,
        "batch_size": BATCH,
        "total_samples": 100 * BATCH,
        "total_steps": 50,  # 10 epochs of 5 batches: each worker's even share of 80 rows
        "rows": 10 * BATCH,
        "new_cursor": lambda worker, rows: {"n": rows, "pushes": 0},
        "on_round": lambda record, weights: None,
    }
    return ParameterServer(**{**settings, **changes})


def test_a_dead_worker_never_stalls_the_others() -> None:
    records: list[AsyncRecord] = []
    server = _server(
        staleness=1, total_samples=30 * BATCH, on_round=lambda record, weights: records.append(record)
    )
    out: dict[int, Any] = {}
    token = "t" * 32
    endpoint = wire.Server(token=token, handler=server.handle, name="test-paramserver")
    endpoint.start()
    try:
        port = endpoint.address[1]
        clients = [
            threading.Thread(target=_client, args=(port, token, 0, None, out), daemon=True),
            threading.Thread(target=_client, args=(port, token, 1, 2, out), daemon=True),
        ]
        for c in clients:
            c.start()
        for c in clients:
            c.join(timeout=30)
        assert not any(c.is_alive() for c in clients), f"a client is still waiting: {out}"
    finally:
        endpoint.close()
    assert out == {0: ("stop", 28), 1: ("left", 2)}
    assert server.finished and server.error is None
    assert server.version == 30 and server.samples_done == 30 * BATCH
    # every delta of ones counts 1/workers
    assert torch.equal(server.weights["w"], torch.full((4,), 15.0))
    assert server.max_clock_gap <= 1
    assert all(r.clock_gap <= 1 for r in records)
    assert sum(r.samples for r in records) == 30 * BATCH
    assert server.cursors()[0] == {"n": 40, "pushes": 28}
    assert server.checkpoint_state()["clocks"] == {"0": 28, "1": 2}


def _push(conn: wire.Connection, pull: dict[str, Any], cursor: dict[str, Any]) -> None:
    conn.send(
        {
            "op": "push",
            "version": pull["version"],
            "samples": BATCH * int(pull["steps"]),
            "loss_sum": 1.0,
            "cursor": cursor,
            "compute_s": 0.0,
            "comm_s": 0.0,
        },
        state_to_bytes({"w": torch.ones(4)}),
    )


def test_a_push_from_a_lost_workers_connection_is_not_applied_twice() -> None:
    # Worker 0's Spark job fails while its task, not yet killed by Spark, still holds a pull; its
    # replacement pulls the same data position. Only the replacement's push of those batches counts.
    server = _server()
    token = "t" * 32
    endpoint = wire.Server(token=token, handler=server.handle, name="test-paramserver")
    endpoint.start()
    try:
        port = endpoint.address[1]
        hello = {"worker": 0}
        with wire.connect("127.0.0.1", port, token=token, hello=hello, timeout=10) as old:
            old.settimeout(10)
            old.send({"op": "loaded", "rows": 40, "digest": "xxhash64-sums:0:0"})
            first, _ = old.recv()
            server.worker_lost(0)
            with wire.connect("127.0.0.1", port, token=token, hello=hello, timeout=10) as new:
                new.settimeout(10)
                new.send({"op": "loaded", "rows": 40, "digest": "xxhash64-sums:0:0"})
                again, _ = new.recv()
                assert first["cursor"] == again["cursor"] == {"n": 40, "pushes": 0}
                _push(old, first, {"n": 40, "pushes": 1})
                assert old.recv()[0] == {"op": "stop"}  # the late push was not applied
                _push(new, again, {"n": 40, "pushes": 1})
                following, _ = new.recv()
        assert following["op"] == "pull" and following["version"] == 1
        assert server.version == 1 and server.samples_done == BATCH
        assert torch.equal(server.weights["w"], torch.full((4,), 0.5))
        assert server.cursors()[0] == {"n": 40, "pushes": 1} and server.clocks()[0] == 1
    finally:
        endpoint.close()


@contextlib.contextmanager
def _serving(server: ParameterServer) -> Iterator[Callable[..., wire.Connection]]:
    """Serve ``server`` on loopback; yield ``connect(worker, rows=40)``, a fake worker's connection (its
    partition of ``rows`` rows loaded)."""
    token = "t" * 32
    endpoint = wire.Server(token=token, handler=server.handle, name="test-paramserver")
    endpoint.start()

    def connect(worker: int, rows: int = 40) -> wire.Connection:
        conn = wire.connect(
            "127.0.0.1", endpoint.address[1], token=token, hello={"worker": worker}, timeout=10
        )
        conn.settimeout(10)
        conn.send({"op": "loaded", "rows": rows, "digest": "xxhash64-sums:0:0"})
        return conn

    try:
        yield connect
    finally:
        endpoint.close()


def _send_push(
    conn: wire.Connection, pull: dict[str, Any], payload: bytes, samples: int = BATCH, rows: int = 40
) -> None:
    header = {"op": "push", "version": pull["version"], "samples": samples, "loss_sum": float(samples)}
    cursor = {"n": rows, "pushes": 1}  # a real cursor covers its worker's rows
    conn.send({**header, "cursor": cursor, "compute_s": 0.0, "comm_s": 0.0}, payload)


def test_a_pull_starts_where_the_run_stands_in_the_learning_rate_schedule() -> None:
    # Workers take different shares of the budget. By its own step count, worker 0 (alone for ten pushes)
    # would be at step 10 of the 50-step schedule after a tenth of the run's examples, and worker 1 would
    # start at step 0: under cosine a fast worker ran past the schedule's end at rate 0 while a slow one
    # still trained at half the rate. A pull carries the step the examples pushed so far reach.
    server = _server()
    payload = state_to_bytes({"w": torch.ones(4)})
    starts = []
    with _serving(server) as connect, connect(0) as fast:
        for _ in range(10):
            pull, _ = fast.recv()
            starts.append(pull["first_step"])
            _send_push(fast, pull, payload)
        with connect(1) as late:
            joined, _ = late.recv()
    assert starts == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]  # 8 examples of 800 a push: half a step of 50
    assert joined["first_step"] == 5


def test_stale_pushes_blend_batchnorm_statistics_and_never_drive_a_variance_negative() -> None:
    # Both workers pull version 0 (running variance 1.0); worker 0 pushes twice, then worker 1 pushes
    # its stale result. Each ends its steps at a variance of 0.01. As deltas scaled by 1/2 the variance
    # would go 1 -> 0.505 -> 0.2575 -> -0.2375; pushed as values and blended it stays positive.
    start = {"w": torch.zeros(4), "bn.running_var": torch.ones(1), "bn.num_batches_tracked": torch.tensor(0)}
    end = {
        "w": torch.ones(4),
        "bn.running_var": torch.full((1,), 0.01),
        "bn.num_batches_tracked": torch.tensor(1),
    }
    server = _server(weights=start)
    pushed = state_to_bytes(end)
    with _serving(server) as connect, connect(0) as zero, connect(1) as one:
        first0, _ = zero.recv()
        first1, _ = one.recv()
        _send_push(zero, first0, pushed)
        second0, _ = zero.recv()
        _send_push(zero, second0, pushed)
        assert zero.recv()[0]["op"] == "pull"  # its push is applied before worker 1's
        _send_push(one, first1, pushed)
        assert one.recv()[0]["op"] == "pull"
    weights = server.weights
    assert server.version == 3
    torch.testing.assert_close(weights["bn.running_var"], torch.tensor([0.13375]))  # 1, .505, .2575, .13375
    assert torch.equal(weights["w"], torch.full((4,), 1.5))  # parameters: deltas x 1/2
    assert int(weights["bn.num_batches_tracked"]) == 3  # counters: deltas, unscaled


def test_a_row_of_pushes_without_examples_records_no_loss() -> None:
    # Workers whose partitions are empty push no examples: their row has no loss, not a loss of 0.
    records: list[AsyncRecord] = []
    server = _server(on_round=lambda record, weights: records.append(record))
    pushed = state_to_bytes({"w": torch.zeros(4)})
    with _serving(server) as connect, connect(0) as zero, connect(1) as one:
        for conn in (zero, one):
            pull, _ = conn.recv()
            _send_push(conn, pull, pushed, samples=0)
            assert conn.recv()[0]["op"] == "pull"
    [record] = records
    assert record.samples == 0 and math.isnan(record.train_loss)


@pytest.mark.timeout(30)
def test_a_workers_pushes_taken_count_on_across_its_replacements() -> None:
    # fit's slots count a worker's failures in a row until one of its pushes is taken (run_slots'
    # progress): the count is the worker's own, and a replacement's pushes add to it.
    server = _server()
    payload = state_to_bytes({"w": torch.ones(4)})
    with _serving(server) as connect:
        with connect(0) as first, connect(1) as other:
            pull, _ = first.recv()
            other.recv()
            _send_push(first, pull, payload)
            assert first.recv()[0]["op"] == "pull"
            assert (server.taken(0), server.taken(1)) == (1, 0)
        server.worker_lost(0)
        with connect(0) as replacement:
            pull, _ = replacement.recv()
            _send_push(replacement, pull, payload)
            assert replacement.recv()[0]["op"] == "pull"
    assert (server.taken(0), server.taken(1)) == (2, 0)


@pytest.mark.timeout(30)
def test_a_worker_with_an_empty_partition_waits_while_no_worker_with_data_is_live() -> None:
    # Worker 0, the only one with data, is lost. Worker 1's partition is empty: it used to be granted
    # pull after pull (no live worker held its clock back), each an empty push, a new version and
    # every second one a history row with no examples, as fast as the loop went, until the
    # replacement had loaded its data.
    records: list[AsyncRecord] = []
    server = _server(on_round=lambda record, weights: records.append(record))
    nothing = state_to_bytes({"w": torch.zeros(4)})
    with _serving(server) as connect, connect(0, rows=80) as data, connect(1, rows=0) as empty:
        pull_data, _ = data.recv()
        pull_empty, _ = empty.recv()
        _send_push(data, pull_data, state_to_bytes({"w": torch.ones(4)}), rows=80)
        assert data.recv()[0]["op"] == "pull"
        data.close()
        server.worker_lost(0)  # Spark reports its job failed
        _send_push(empty, pull_empty, nothing, samples=0, rows=0)
        empty.settimeout(1.0)
        with pytest.raises(TimeoutError):
            empty.recv()  # no pull while no worker with data is live
        empty.settimeout(10)
        with connect(0, rows=80) as replacement:
            again, _ = replacement.recv()
            assert again["cursor"] == {"n": 80, "pushes": 1} and again["version"] == 2
            assert empty.recv()[0]["op"] == "pull"  # a worker with data is back: it may pull again
    assert server.version == 2 and len(records) == 1


def test_a_worker_with_an_empty_partition_neither_halves_the_others_steps_nor_drags_their_buffers() -> None:
    # Worker 1's partition is empty. Counted among the workers, it halved every push of worker 0 (async
    # trained at half the rate average and allreduce train the same data at), and its empty pushes
    # blended its stale copy of the buffers back in.
    server = _server(weights={"w": torch.zeros(4), "bn.running_var": torch.ones(1)})
    trained = state_to_bytes({"w": torch.ones(4), "bn.running_var": torch.full((1,), 0.5)})
    stale = state_to_bytes({"w": torch.zeros(4), "bn.running_var": torch.ones(1)})
    with _serving(server) as connect, connect(0, rows=80) as data, connect(1, rows=0) as empty:
        pull_data, _ = data.recv()
        pull_empty, _ = empty.recv()  # both have loaded
        _send_push(data, pull_data, trained, rows=80)
        assert data.recv()[0]["op"] == "pull"
        _send_push(empty, pull_empty, stale, samples=0, rows=0)
        assert empty.recv()[0]["op"] == "pull"
    assert server.version == 2
    assert torch.equal(server.weights["w"], torch.ones(4))  # worker 0's whole step, as in average
    assert torch.equal(server.weights["bn.running_var"], torch.full((1,), 0.5))


def test_async_arguments_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"staleness: expected an integer >= 1, got 0"):
        fit("mnist", strategy="async", workers=2, staleness=0, run_dir=tmp_path / "a")
    with pytest.raises(ConfigError, match=r"round_seconds: strategy 'async'"):
        fit("mnist", strategy="async", workers=2, average={"round_seconds": 1.0}, run_dir=tmp_path / "b")
    with pytest.raises(ConfigError, match=r"slow_worker: only strategies 'average' and 'async'"):
        fit("mnist", strategy="allreduce", workers=2, slow_worker=(0, 2.0), run_dir=tmp_path / "c")
    with pytest.raises(ConfigError, match=r"slow_worker index: expected an integer in 0..1, got 2"):
        fit("mnist", strategy="async", workers=2, slow_worker=(2, 2.0), run_dir=tmp_path / "d")
    with pytest.raises(ConfigError, match=r"^heartbeat_timeout: expected at least 1 second .*got 0.5$"):
        fit("mnist", strategy="async", workers=2, heartbeat_timeout=0.5, run_dir=tmp_path / "e")
    with pytest.raises(
        ConfigError, match=r"^heartbeat_timeout: watches the workers of the average, allreduce and async"
    ):
        fit("mnist", heartbeat_timeout=5, run_dir=tmp_path / "g")


# ------------------------------------------------------------------------------------------ Spark
def _served_port(caplog: pytest.LogCaptureFixture) -> int:
    ports = [
        int(m.group(1))
        for r in caplog.records
        if (m := re.search(r"deepspark-async: serving \d+ worker\(s\) on [\d.]+:(\d+)", r.getMessage()))
    ]
    assert ports, "fit logged no parameter server address"
    return ports[-1]


def _assert_closed(port: int) -> None:
    with pytest.raises(OSError):
        wire.connect("127.0.0.1", port, token="x", hello={}, timeout=5).close()


def _history(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "history.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_async_learns_mnist_and_its_server_is_gone_after_fit(
    spark: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="deepspark.training._fit")
    result = fit(
        "mnist",
        "lenet",
        strategy="async",
        workers=2,
        config={"epochs": 3, "learning_rate": 0.02},
        limit_train=3000,
        limit_test=1000,
        run_dir=tmp_path / "run",
    )
    assert result.test_accuracy is not None and result.test_accuracy > 0.8
    rows = _history(tmp_path / "run")
    assert [int(r["round"]) for r in rows] == list(range(len(rows)))
    # the epochs asked for: the run stops at the push that reaches them
    assert 3 * 3000 <= sum(int(r["samples"]) for r in rows) < 3 * 3000 + 64
    assert all(int(r["clock_gap"]) <= 2 for r in rows)
    assert rows[-1]["test_accuracy"] != ""
    assert (tmp_path / "run" / "checkpoint" / "state.json").is_file()
    _assert_closed(_served_port(caplog))


@pytest.mark.slow
def test_a_slow_worker_stays_within_the_staleness_bound(spark: Any, tmp_path: Path) -> None:
    result = fit(
        "mnist",
        "lenet",
        strategy="async",
        workers=2,
        staleness=1,
        slow_worker=(1, 4.0),
        config={"epochs": 1},
        limit_train=1200,
        limit_test=200,
        run_dir=tmp_path / "run",
    )
    gaps = [int(r["clock_gap"]) for r in result.history]
    stale = [int(r["staleness"]) for r in result.history]
    assert max(gaps) <= 1
    # Between one worker's pull and its push the other pushes at most 2 * staleness + 1 times.
    assert max(stale) <= 3
    assert max(gaps) == 1  # the fast worker did run ahead, as far as the bound allows


@pytest.mark.slow
def test_the_server_shuts_down_when_a_worker_dies_and_the_run_resumes(
    spark: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture, driver_crash: Any
) -> None:
    caplog.set_level(logging.INFO, logger="deepspark.training._fit")
    run_dir = tmp_path / "run"
    killed: list[int] = []

    def kill_workers_once(row: dict[str, Any]) -> None:
        if row["round"] == 2 and not killed:
            killed.append(row["round"])
            spark.sparkContext.cancelAllJobs()  # both worker tasks die; their jobs are resubmitted

    common: dict[str, Any] = {"limit_train": 1200, "limit_test": 200, "run_dir": run_dir}
    first = fit(
        "mnist",
        "lenet",
        strategy="async",
        workers=2,
        config={"epochs": 1},
        checkpoint_seconds=0,
        on_round=kill_workers_once,
        **common,
    )
    assert killed == [2]
    assert 1200 <= sum(int(r["samples"]) for r in first.history) < 1200 + 64
    _assert_closed(_served_port(caplog))

    second = tmp_path / "second"
    with pytest.raises(DeepsparkError, match="driver crash"):
        fit(
            "mnist",
            "lenet",
            strategy="async",
            workers=2,
            config={"epochs": 1},
            checkpoint_seconds=0,
            on_round=driver_crash(3),
            limit_train=1200,
            limit_test=200,
            run_dir=second,
        )
    _assert_closed(_served_port(caplog))
    resumed = fit("mnist", resume=True, run_dir=second)
    rounds = [int(r["round"]) for r in resumed.history]
    assert rounds == list(range(len(rounds))) and rounds[3] == 3
    assert 1200 <= sum(int(r["samples"]) for r in _history(second)) < 1200 + 64


@pytest.mark.timeout(30)
def test_a_frozen_worker_stops_holding_the_others_at_the_bound_after_the_heartbeat_timeout() -> None:
    # Worker 0's Python process froze after its pull while its executor lived on: Spark never failed its
    # task, and worker 1 waited at the staleness bound for good.
    cancelled: list[int] = []
    server = _server(staleness=1, heartbeat_timeout=1.0, cancel=cancelled.append)
    payload = state_to_bytes({"w": torch.ones(4)})
    with _serving(server) as connect, connect(0) as frozen, connect(1) as other:
        assert frozen.recv()[0]["op"] == "pull"  # and it never pushes
        for _ in range(2):
            pull, _ = other.recv()
            _send_push(other, pull, payload)
        assert other.recv()[0]["op"] == "pull"  # two ahead: granted once worker 0 is lost (10 s timeout)
    assert cancelled == [0] and server.error is None


@pytest.mark.timeout(30)
def test_a_worker_that_sends_heartbeats_while_it_computes_is_not_lost() -> None:
    # Worker 0 computes for 2.5 heartbeat timeouts, beating meanwhile; worker 1 beats while it waits at
    # the bound, its beats queuing up unread. Neither is lost, and every push is applied.
    cancelled: list[int] = []
    server = _server(staleness=1, heartbeat_timeout=1.0, cancel=cancelled.append)
    payload = state_to_bytes({"w": torch.ones(4)})
    every = wire.heartbeat_interval(1.0)
    computing = threading.Event()
    with (
        _serving(server) as connect,
        connect(0) as slow,
        connect(1) as fast,
        wire.Heartbeat(slow, every),
        wire.Heartbeat(fast, every),
    ):
        slow_pull, _ = slow.recv()
        for _ in range(2):
            pull, _ = fast.recv()
            _send_push(fast, pull, payload)
        computing.wait(2.5)  # worker 0's steps: longer than the heartbeat timeout
        _send_push(slow, slow_pull, payload)
        assert slow.recv()[0]["op"] == "pull" and fast.recv()[0]["op"] == "pull"
        assert server.version == 3
    assert cancelled == [] and server.error is None


@pytest.mark.timeout(30)
def test_a_worker_frozen_while_it_waits_for_its_next_pull_stops_holding_the_others_at_the_bound() -> None:
    # Worker 0 pushed once, then froze while it waited for its next pull: it reads nothing more. The
    # weights (64 MB) outgrow the sockets' buffers (Linux grows a receive buffer to 32 MB at most), and
    # the server's send of that pull used to block for good, outside the heartbeat clock: worker 1
    # waited at the staleness bound forever.
    cancelled: list[int] = []
    weights = torch.zeros(16 << 20)
    server = _server(weights={"w": weights}, staleness=1, heartbeat_timeout=1.0, cancel=cancelled.append)
    payload = state_to_bytes({"w": torch.ones_like(weights)})
    with _serving(server) as connect, connect(0) as frozen, connect(1) as other:
        _send_push(frozen, frozen.recv()[0], payload)  # and it never reads its next pull
        for _ in range(3):
            pull, _ = other.recv()
            _send_push(other, pull, payload)
        assert other.recv()[0]["op"] == "pull"  # two ahead: granted once worker 0 is lost (10 s timeout)
    assert cancelled == [0] and server.error is None
