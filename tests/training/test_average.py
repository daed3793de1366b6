"""The ``average`` strategy's round server on its own, with fake workers over loopback (no Spark)."""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from deepspark import wire
from deepspark.errors import DatasetError
from deepspark.models.checkpoint import state_to_bytes
from deepspark.training.average import AverageSettings, RoundRecord, RoundServer

TOKEN = "t" * 32


def _push(
    conn: wire.Connection, header: dict[str, Any], value: float, samples: int = 8, size: int = 2
) -> None:
    reply = {"op": "push", "round": header["round"], "samples": samples, "loss_sum": float(samples)}
    reply["cursor"] = {"n": 8, "at": 1}  # a data position of the 8 rows a fake worker reads
    conn.send(
        {**reply, "compute_s": 0.0, "comm_s": 0.0, "wait_s": 0.0},
        state_to_bytes({"w": torch.full((size,), value)}),
    )


def _server(
    records: list[RoundRecord],
    total_steps: int = 2,
    size: int = 2,
    round_seconds: float | None = None,
    **watch: Any,
) -> RoundServer:
    """Two workers over one parameter ``w`` of ``size`` floats, rounds of one step (or ``round_seconds``);
    ``watch``: the heartbeat clock (``heartbeat_timeout``, ``cancel``), none by default."""
    return RoundServer(
        weights={"w": torch.zeros(size)},
        parameters=["w"],
        cursors={},
        workers=2,
        new_cursor=lambda worker, rows: {"n": rows, "at": 0},
        settings=AverageSettings(tau=1)
        if round_seconds is None
        else AverageSettings(round_seconds=round_seconds),
        batch_size=8,
        total_steps=total_steps,
        total_samples=32,
        steps_done=0,
        samples_done=0,
        rows=16,
        first_round=0,
        outer_state=None,
        on_round=lambda record, weights: records.append(record),
        **watch,
    )


@contextlib.contextmanager
def _serving(server: RoundServer) -> Iterator[wire.Server]:
    """``server`` on a loopback endpoint for fake workers, closed (every connection with it) at the end."""
    endpoint = wire.Server(token=TOKEN, handler=server.handle, name="test-rounds")
    endpoint.start()
    try:
        yield endpoint
    finally:
        endpoint.close()


def _connect(
    endpoint: wire.Server,
    worker: int,
    *,
    loaded: bool = True,
    digest: str = "xxhash64-sums:0:0",
    **hello: Any,
) -> wire.Connection:
    """A fake worker's connection; ``loaded``: it has read its partition of 8 rows (of ``digest``) and
    said so; ``hello``: more of its hello (``stage``)."""
    hello = {"worker": worker, **hello}
    conn = wire.connect("127.0.0.1", endpoint.address[1], token=TOKEN, hello=hello, timeout=10)
    conn.settimeout(10)
    if loaded:
        conn.send({"op": "loaded", "rows": 8, "digest": digest})
    return conn


def test_a_retried_task_that_reads_other_rows_of_the_same_count_stops_the_run() -> None:
    # A DataFrame that draws random numbers hands a resubmitted task other rows of the same count. The
    # count matched, so the replacement trained on, at a data position made for the first task's rows.
    records: list[RoundRecord] = []
    server = _server(records, total_steps=2)
    with _serving(server) as endpoint, _connect(endpoint, 1) as other, _connect(endpoint, 0) as lost:
        lost.recv()
        other.recv()
        lost.close()
        server.worker_lost(0)
        with _connect(endpoint, 0, digest="xxhash64-sums:0:1"):
            assert server.wait(10)
    assert isinstance(server.error, DatasetError)
    assert "worker 0's task read other rows than its first task did (8 rows)" in str(server.error)
    assert not records


@pytest.mark.parametrize(("digests", "error"), [(("1:2", "3:4"), False), (("1:2", "3:5"), True)])
def test_the_workers_rows_must_add_up_to_the_counted_digest(digests: tuple[str, str], error: bool) -> None:
    records: list[RoundRecord] = []
    server = _server(records, total_steps=1, digest="xxhash64-sums:4:6")
    with (
        _serving(server) as endpoint,
        _connect(endpoint, 0, digest=f"xxhash64-sums:{digests[0]}") as first,
        _connect(endpoint, 1, digest=f"xxhash64-sums:{digests[1]}") as second,
    ):
        if error:
            assert server.wait(10)
        else:
            for conn in (first, second):
                _push(conn, conn.recv()[0], 1.0)
            assert server.wait(10)
    if error:
        assert isinstance(server.error, DatasetError)
        assert "the workers read other rows than the DataFrame counted (16 rows)" in str(server.error)
        assert not records
    else:
        assert server.error is None and [r.round for r in records] == [0]


def test_a_round_whose_workers_with_data_were_lost_waits_for_their_replacement() -> None:
    # Worker 1's partition is empty; worker 0, the one with data, is lost mid-round (its task diverged,
    # say). The round used to end there with "every worker of a round had no examples", which hid the
    # worker's own error; now the replacement joins that round and it completes with its examples.
    records: list[RoundRecord] = []
    server = _server(records, total_steps=1)
    with _serving(server) as endpoint, _connect(endpoint, 1) as empty, _connect(endpoint, 0) as lost:
        first_empty, _ = empty.recv()
        lost.recv()
        _push(empty, first_empty, 0.0, samples=0)
        lost.close()
        server.worker_lost(0)
        with _connect(endpoint, 0) as replacement:
            first, _ = replacement.recv()
            assert first["round"] == first_empty["round"] == 0
            assert server.error is None and not records
            _push(replacement, first, 2.0)
            assert replacement.recv()[0] == {"op": "stop"} and empty.recv()[0] == {"op": "stop"}
    assert server.error is None
    assert [(r.round, r.workers, r.samples) for r in records] == [(0, 2, 8)]
    assert torch.equal(server.weights["w"], torch.full((2,), 2.0))  # the empty push weighs nothing


def test_rounds_of_seconds_start_where_the_run_stands_in_the_learning_rate_schedule() -> None:
    # In rounds of seconds a slow worker takes fewer steps than a fast one: by their own step counts
    # the fast one ran past the schedule's end (rate 0 under cosine) while the slow one trained at a
    # high rate to the end. A round starts at the step the examples seen so far reach.
    records: list[RoundRecord] = []
    server = _server(records, total_steps=8, round_seconds=60.0)
    with _serving(server) as endpoint, _connect(endpoint, 0) as fast, _connect(endpoint, 1) as slow:
        first_fast, _ = fast.recv()
        first_slow, _ = slow.recv()
        assert first_fast["first_step"] == first_slow["first_step"] == 0
        _push(fast, first_fast, 1.0, samples=16)  # two steps of 8
        _push(slow, first_slow, 1.0, samples=4)  # half a step's examples
        second_fast, _ = fast.recv()
        second_slow, _ = slow.recv()
    assert second_fast["first_step"] == second_slow["first_step"] == 20 * 8 // 32


def test_a_superseded_connection_neither_pushes_nor_drops_its_worker_from_a_round() -> None:
    # Worker 0's Spark task failed while its Python side still held a round; its replacement joins the
    # same round. The old connection's late push is not taken, and its closing later does not leave the
    # worker out of the round its replacement is in.
    records: list[RoundRecord] = []
    server = _server(records)
    with _serving(server) as endpoint:
        connect = functools.partial(_connect, endpoint)

        with connect(1) as one, connect(0) as old:
            first_one, _ = one.recv()
            first_old, _ = old.recv()
            server.worker_lost(0)  # Spark reports the task lost; its process has not been killed yet
            with connect(0) as new:
                first_new, _ = new.recv()
                assert first_old["round"] == first_new["round"] == first_one["round"] == 0
                _push(old, first_old, 100.0)
                assert old.recv()[0] == {"op": "stop"}  # the late push was not taken
                _push(new, first_new, 2.0)
                _push(one, first_one, 4.0)
                second_new, _ = new.recv()
                second_one, _ = one.recv()
                old.close()  # the old task ends only now, inside round 1
                _push(new, second_new, 2.0)
                _push(one, second_one, 4.0)
                assert new.recv()[0] == {"op": "stop"} and one.recv()[0] == {"op": "stop"}
    assert [(r.round, r.workers, r.samples) for r in records] == [(0, 2, 16), (1, 2, 16)]
    assert torch.equal(server.weights["w"], torch.full((2,), 3.0))  # (2 + 4) / 2, never the 100


def test_a_speculative_copy_of_a_workers_task_stands_by_until_the_original_ends() -> None:
    # spark.speculation with a task duration threshold runs a copy of a long-lived worker task beside it.
    # Taken for a retry, the copy stopped the original, whose task then ended, and Spark killed the copy:
    # with a copy that came while the worker loaded (Python workers not reused), no worker ever trained.
    records: list[RoundRecord] = []
    server = _server(records, copies=lambda stage: stage == 3)
    with _serving(server) as endpoint:
        connect = functools.partial(_connect, endpoint, stage=3)
        with connect(1) as one, connect(0) as original:
            first_one, _ = one.recv()
            first, _ = original.recv()
            with connect(0) as copy:
                time.sleep(0.3)  # the copy waits: nothing for it while the original lives
                _push(original, first, 2.0)  # taken: the original still holds its worker
                _push(one, first_one, 4.0)
                second_one, _ = one.recv()
                original.close()  # its executor is lost: the copy takes the worker over
                second, _ = copy.recv()
                _push(copy, second, 2.0)
                _push(one, second_one, 4.0)
                assert copy.recv()[0] == {"op": "stop"} and one.recv()[0] == {"op": "stop"}
    assert (first["round"], second["round"]) == (0, 1)
    assert [(r.round, r.workers, r.samples) for r in records] == [(0, 2, 16), (1, 2, 16)]
    assert torch.equal(server.weights["w"], torch.full((2,), 3.0))


@pytest.mark.timeout(30)
def test_no_round_is_averaged_or_recorded_once_the_run_has_failed() -> None:
    # Worker 0 had pushed its round when the run failed (a worker that failed for good, Ctrl-C); worker
    # 1's push came after. It used to complete the round: a history row, a checkpoint and the user's
    # on_round callback came after the run had stopped, from a handler thread racing the driver's exit.
    records: list[RoundRecord] = []
    server = _server(records)
    with _serving(server) as endpoint, _connect(endpoint, 0) as zero, _connect(endpoint, 1) as one:
        first_zero, _ = zero.recv()
        first_one, _ = one.recv()
        _push(zero, first_zero, 2.0)
        server.fail(RuntimeError("training worker 2 failed for good"))
        assert zero.recv()[0] == {"op": "stop"}
        _push(one, first_one, 4.0)
        assert one.recv()[0] == {"op": "stop"}
    assert records == [] and not server.finished
    assert str(server.error) == "training worker 2 failed for good"
    assert torch.equal(server.weights["w"], torch.zeros(2))


def _watched_server(records: list[RoundRecord], cancelled: list[int], total_steps: int) -> RoundServer:
    """Two workers watched with a 1 s heartbeat timeout; ``cancelled`` collects the cancelled workers."""
    return _server(records, total_steps, heartbeat_timeout=1.0, cancel=cancelled.append)


@pytest.mark.timeout(30)
def test_a_frozen_worker_is_lost_after_the_heartbeat_timeout_and_its_job_cancelled() -> None:
    # Worker 0's Python process froze mid-round (a deadlock, a hung GPU kernel) while its executor lived
    # on: Spark never failed its task, and the round waited for its push for good.
    records: list[RoundRecord] = []
    cancelled: list[int] = []
    server = _watched_server(records, cancelled, total_steps=1)
    with _serving(server) as endpoint, _connect(endpoint, 0) as frozen, _connect(endpoint, 1) as one:
        assert frozen.recv()[0]["round"] == 0  # and it never answers
        first_one, _ = one.recv()
        _push(one, first_one, 4.0)
        assert one.recv()[0] == {"op": "stop"}  # within its 10 s receive timeout
    assert server.error is None and cancelled == [0]
    assert [(r.round, r.workers, r.samples) for r in records] == [(0, 1, 8)]


@pytest.mark.timeout(30)
def test_a_worker_that_sends_heartbeats_while_it_computes_longer_than_the_timeout_is_not_lost() -> None:
    # Worker 0 computes for 2.5 heartbeat timeouts, beating meanwhile; worker 1, done at once, beats
    # while it waits for the next round, and its beats queue up unread: neither is lost.
    records: list[RoundRecord] = []
    cancelled: list[int] = []
    server = _watched_server(records, cancelled, total_steps=2)
    with _serving(server) as endpoint:
        every = wire.heartbeat_interval(1.0)
        computing = threading.Event()
        with (
            _connect(endpoint, 0) as slow,
            _connect(endpoint, 1) as fast,
            wire.Heartbeat(slow, every),
            wire.Heartbeat(fast, every),
        ):
            first_slow, _ = slow.recv()
            first_fast, _ = fast.recv()
            _push(fast, first_fast, 4.0)
            computing.wait(2.5)  # worker 0's steps: longer than the heartbeat timeout
            _push(slow, first_slow, 2.0)
            for conn in (slow, fast):
                second, _ = conn.recv()
                assert second["round"] == 1
                _push(conn, second, 3.0)
            assert slow.recv()[0] == {"op": "stop"} and fast.recv()[0] == {"op": "stop"}
    assert server.error is None and cancelled == []
    assert [(r.round, r.workers, r.samples) for r in records] == [(0, 2, 16), (1, 2, 16)]


@pytest.mark.timeout(30)
def test_a_worker_frozen_while_it_waits_for_its_next_round_is_lost_after_the_heartbeat_timeout() -> None:
    # Worker 0 pushed round 0, then froze while it waited for round 1: it reads nothing more. The
    # weights (64 MB) outgrow the sockets' buffers (Linux grows a receive buffer to 32 MB at most), and
    # the driver's send of round 1 used to block for good, outside the heartbeat clock: round 1 waited
    # for worker 0 forever.
    records: list[RoundRecord] = []
    cancelled: list[int] = []
    size = 16 << 20
    server = _server(records, total_steps=2, size=size, heartbeat_timeout=1.0, cancel=cancelled.append)
    with _serving(server) as endpoint, _connect(endpoint, 0) as frozen, _connect(endpoint, 1) as one:
        for conn in (frozen, one):
            first, _ = conn.recv()
            _push(conn, first, 2.0, size=size)
        second, _ = one.recv()
        assert second["round"] == 1
        _push(one, second, 4.0, size=size)
        assert one.recv()[0] == {"op": "stop"}  # within its 10 s receive timeout
    assert server.error is None and cancelled == [0]
    assert [(r.round, r.workers, r.samples) for r in records] == [(0, 2, 16), (1, 1, 8)]


@pytest.mark.timeout(30)
def test_a_worker_frozen_while_it_loads_its_partition_is_lost_and_its_replacement_awaited() -> None:
    # Worker 0 connected (its task does so before it reads its partition), then froze while loading: it
    # never says it has loaded, nor beats. It is lost and its job cancelled; no round begins before every
    # worker has loaded once, so round 0 waits for the replacement and then has both.
    records: list[RoundRecord] = []
    cancelled: list[int] = []
    server = _watched_server(records, cancelled, total_steps=1)
    with _serving(server) as endpoint, _connect(endpoint, 0, loaded=False), _connect(endpoint, 1) as one:
        deadline = time.monotonic() + 10
        while not cancelled and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cancelled == [0]
        with _connect(endpoint, 0) as replacement:
            first_one, _ = one.recv()
            first_new, _ = replacement.recv()
            assert first_one["round"] == first_new["round"] == 0
            _push(one, first_one, 4.0)
            _push(replacement, first_new, 2.0)
            assert one.recv()[0] == replacement.recv()[0] == {"op": "stop"}
    assert server.error is None
    assert [(r.round, r.workers, r.samples) for r in records] == [(0, 2, 16)]


@pytest.mark.timeout(30)
def test_a_worker_that_beats_while_it_loads_longer_than_the_timeout_is_waited_for() -> None:
    records: list[RoundRecord] = []
    cancelled: list[int] = []
    server = _watched_server(records, cancelled, total_steps=1)
    with _serving(server) as endpoint:
        loading = threading.Event()
        with _connect(endpoint, 0, loaded=False) as slow, _connect(endpoint, 1) as one:
            with wire.Heartbeat(slow, wire.heartbeat_interval(1.0)):
                loading.wait(2.5)  # its partition takes longer than the heartbeat timeout to read
                slow.send({"op": "loaded", "rows": 8, "digest": "xxhash64-sums:0:0"})
                first_slow, _ = slow.recv()
                first_one, _ = one.recv()
                assert first_slow["round"] == first_one["round"] == 0  # the round waited for it
                _push(one, first_one, 4.0)
                _push(slow, first_slow, 2.0)
            assert slow.recv()[0] == {"op": "stop"} and one.recv()[0] == {"op": "stop"}
    assert server.error is None and cancelled == []
    assert [(r.round, r.workers, r.samples) for r in records] == [(0, 2, 16)]
