"""The ``allreduce`` strategy: one step on the union batch, identical replicas, learning, restarts."""

from __future__ import annotations

import csv
import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from deepspark import wire
from deepspark.errors import DeepsparkError, DivergenceError, RunError
from deepspark.training._fit import CHECKPOINT, FAIL_HOOK_ENV, HISTORY, fit
from deepspark.training.allreduce import GangServer, optimizer_from_tensors, optimizer_to_tensors
from deepspark.training.loop import DataCursor

SHAPE = (1, 4, 4)
CLASSES = 3
TINY = {
    "input_shape": list(SHAPE),
    "layers": [
        {"type": "flatten"},
        {"type": "linear", "out_features": 8},
        {"type": "relu"},
        {"type": "linear", "out_features": CLASSES},
    ],
}


def _arrays(rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, int(np.prod(SHAPE)))).astype(np.float32)
    y = (np.arange(rows) % CLASSES).astype(np.int64)
    return x, y


def _frame(spark: Any, x: np.ndarray, y: np.ndarray) -> Any:
    from pyspark.sql import types as T

    schema = T.StructType(
        [
            T.StructField("image", T.ArrayType(T.FloatType()), False),
            T.StructField("label", T.IntegerType(), False),
        ]
    )
    return spark.createDataFrame(
        [(row.tolist(), int(label)) for row, label in zip(x, y, strict=True)], schema
    )


def _fit_tiny(
    spark: Any,
    run_dir: Path,
    x: np.ndarray,
    y: np.ndarray,
    config: dict[str, Any],
    model: Any = TINY,
    **extra: Any,
) -> Any:
    return fit(
        _frame(spark, x, y),
        model,
        strategy="allreduce",
        workers=2,
        config=config,
        run_dir=run_dir,
        input_shape=SHAPE,
        num_classes=CLASSES,
        checkpoint_seconds=0,
        **extra,
    )


def _checkpoint_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = load_file(str(run_dir / CHECKPOINT / "state.safetensors"))
    return {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}


def _history(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / HISTORY, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_two_workers_take_one_step_on_the_union_batch(spark: Any, tmp_path: Path) -> None:
    from deepspark.models import build_model

    # batch_size >= rows: each rank's single step covers its whole partition, whichever rows the hash
    # repartition gave it, so the union of the two batches is the whole data set.
    x, y = _arrays(16)
    config = {"optimizer": "sgd", "learning_rate": 0.5, "batch_size": 16, "epochs": 1, "seed": 3}
    result = _fit_tiny(spark, tmp_path / "run", x, y, config)

    model = build_model(TINY, seed=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = torch.nn.functional.cross_entropy(
        model(torch.from_numpy(x).reshape(-1, *SHAPE)), torch.from_numpy(y)
    )
    loss.backward()
    optimizer.step()
    got = _checkpoint_weights(result.run_dir)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6)
    (row,) = result.history
    assert int(row["samples"]) == 16 and int(row["workers"]) == 2
    assert float(row["train_loss"]) == pytest.approx(float(loss.detach()), abs=1e-5)
    state = json.loads((result.run_dir / CHECKPOINT / "state.json").read_text())
    assert state["steps_done"] == 1
    # Each rank says where it trained, as average and async workers do (the CLI's `devices:` line).
    assert result.devices == {0: "cpu", 1: "cpu"}


class _WithSpare(torch.nn.Module):
    """TINY's shape of model with a parameter its forward never uses."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(int(np.prod(SHAPE)), CLASSES))
        self.spare = torch.nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def with_spare() -> torch.nn.Module:
    return _WithSpare()


def test_a_parameter_no_forward_uses_is_left_as_one_process_leaves_it(spark: Any, tmp_path: Path) -> None:
    # Its gradient was all-reduced as zeros, so weight decay and momentum moved what one process (a None
    # gradient) never touches.
    x, y = _arrays(16)
    config = {
        "optimizer": "momentum",
        "learning_rate": 0.5,
        "weight_decay": 0.1,
        "batch_size": 4,
        "epochs": 1,
    }
    _fit_tiny(spark, tmp_path / "run", x, y, config, with_spare)
    got = _checkpoint_weights(tmp_path / "run")
    assert torch.equal(got["spare"], torch.ones(3))
    assert not torch.equal(got["body.1.bias"], _WithSpare().body[1].bias.detach())  # the rest trained


def test_replicas_stay_identical_on_uneven_partitions(spark: Any, tmp_path: Path) -> None:
    # 21 rows over 2 workers: partitions of different sizes, a last short batch, momentum state. The
    # driver compares every rank's running digest of its weights after every step at each round's end
    # and fails the run on any difference, so finishing is the check; the steps are counted here.
    x, y = _arrays(21, seed=1)
    config = {"optimizer": "momentum", "learning_rate": 0.1, "batch_size": 4, "epochs": 2, "seed": 0}
    result = _fit_tiny(spark, tmp_path / "run", x, y, config)
    steps_per_epoch = 3  # ceil(ceil(21 / 2) / 4)
    state = json.loads((result.run_dir / CHECKPOINT / "state.json").read_text())
    assert state["steps_done"] == 2 * steps_per_epoch
    assert [int(r["round"]) for r in result.history] == list(range(2 * steps_per_epoch))  # 1 step a round
    # Each rank walks its own partition for the same number of steps, so the examples seen are what a
    # cursor over each partition draws in those steps (not 2 x 21 unless the halves were even), and the
    # history's epoch column is those examples over the rows, as for the other strategies.
    sizes = [int(state["cursors"][str(rank)]["n"]) for rank in range(2)]
    assert sum(sizes) == 21
    drawn = 0
    for rank, n in enumerate(sizes):
        cursor = DataCursor(n, 4, 0 + rank * 1_000_003)
        drawn += sum(int(cursor.next_indices().shape[0]) for _ in range(2 * steps_per_epoch))
    assert sum(int(r["samples"]) for r in result.history) == drawn
    assert float(result.history[-1]["epoch"]) == pytest.approx(drawn / 21)


def _gang(**changes: Any) -> GangServer:
    """A gang server of two ranks and four steps, nothing done yet (``changes`` replace settings)."""
    settings: dict[str, Any] = {
        "payload": b"",
        "optimizer": None,
        "cursors": {},
        "steps_done": 0,
        "samples_done": 0,
        "total_steps": 4,
        "rows": 16,
        "workers": 2,
        "on_round": lambda report, _: None,
    }
    return GangServer(**{**settings, **changes})


def test_diverged_replicas_stop_the_run() -> None:
    reports: list[Any] = []
    server = _gang(on_round=lambda report, _: reports.append(report))
    header = {
        "round": 0,
        "step": 1,
        "samples": 8,
        "loss_sum": 4.0,
        "seconds": 0.1,
        "compute_s": 0.05,
        "comm_s": 0.01,
        "wait_s": 0.0,
        "allreduce_bytes": 100,
        "cursors": [None, None],
        "optimizer": None,
    }
    server._take_round({**header, "digests": ["a", "a"]}, b"w1", 50, 0)
    assert server.fatal is None and server.steps_done == 1 and reports[0].bytes == 150
    server._take_round({**header, "round": 1, "step": 2, "digests": ["a", "b"]}, b"w2", 50, 0)
    assert isinstance(server.fatal, RunError) and "diverged" in str(server.fatal)  # exit 1, not 2
    assert server.steps_done == 1 and server.payload == b"w1" and len(reports) == 1
    server._take_round({**header, "round": 1, "step": 2, "digests": ["c", "c"]}, b"w3", 50, 7)
    assert server.steps_done == 1  # a report of another attempt is ignored


def test_optimizer_state_round_trips_through_tensors() -> None:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.ones(4, 3)).sum().backward()
    optimizer.step()
    tensors, rest = optimizer_to_tensors(optimizer.state_dict())
    json.dumps(rest)  # the rest is JSON
    again = torch.optim.Adam(torch.nn.Linear(3, 2).parameters(), lr=0.5)
    again.load_state_dict(optimizer_from_tensors(tensors, json.loads(json.dumps(rest))))
    assert again.param_groups[0]["lr"] == 0.01
    for index, values in optimizer.state_dict()["state"].items():
        for name, value in values.items():
            torch.testing.assert_close(again.state_dict()["state"][index][name], value)


def test_a_failed_gang_restarts_from_the_checkpoint(spark: Any, tmp_path: Path, monkeypatch: Any) -> None:
    # 64 rows, 2 workers, batch 4: 8 steps an epoch, 2 steps a round, 16 steps. The last rank raises
    # after step 5 of the first attempt (mid round 2); the gang restarts from step 4 and must end with
    # the weights of an uninterrupted run, every round reported once.
    x, y = _arrays(64, seed=2)
    config = {"optimizer": "momentum", "learning_rate": 0.05, "batch_size": 4, "epochs": 2, "seed": 1}
    clean = _fit_tiny(spark, tmp_path / "clean", x, y, config)
    monkeypatch.setenv(FAIL_HOOK_ENV, "5")
    restarted = _fit_tiny(spark, tmp_path / "restarted", x, y, config)

    rows = _history(restarted.run_dir)
    assert [int(r["round"]) for r in rows] == list(range(8))
    assert [int(r["attempt"]) for r in rows] == [0, 0, 1, 1, 1, 1, 1, 1]
    assert sum(int(r["samples"]) for r in rows) == sum(int(r["samples"]) for r in clean.history)
    state = json.loads((restarted.run_dir / CHECKPOINT / "state.json").read_text())
    assert state["steps_done"] == 16
    want, got = _checkpoint_weights(clean.run_dir), _checkpoint_weights(restarted.run_dir)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6)
    for a, b in zip(clean.history, rows, strict=True):
        assert float(b["train_loss"]) == pytest.approx(float(a["train_loss"]), abs=1e-6)

    # resume=True on the finished run continues from its checkpoint: nothing left to do, nothing redone.
    monkeypatch.delenv(FAIL_HOOK_ENV)
    again = fit(
        _frame(spark, x, y), resume=True, run_dir=restarted.run_dir, input_shape=SHAPE, num_classes=CLASSES
    )
    assert len(again.history) == 8
    assert _checkpoint_weights(again.run_dir).keys() == want.keys()


def test_no_round_is_recorded_after_an_on_round_error(spark: Any, tmp_path: Path, driver_crash: Any) -> None:
    # 64 rows, 2 workers, batch 4: 8 rounds of 2 steps; the callback raises after round 1, and the
    # gang's later reports (it runs on until its job is cancelled) are not recorded.
    x, y = _arrays(64, seed=2)
    config = {"optimizer": "momentum", "learning_rate": 0.05, "batch_size": 4, "epochs": 2, "seed": 1}
    with pytest.raises(DeepsparkError, match="driver crash"):
        _fit_tiny(spark, tmp_path / "run", x, y, config, on_round=driver_crash(1))
    assert [int(r["round"]) for r in _history(tmp_path / "run")] == [0, 1]
    state = json.loads((tmp_path / "run" / CHECKPOINT / "state.json").read_text())
    assert state["round"] == 1


def test_divergence_stops_the_gang_without_a_restart(spark: Any, tmp_path: Path) -> None:
    # Every rank sees the same all-reduced loss, so all stop at the same step; rank 0 tells the driver,
    # which raises DivergenceError instead of restarting the gang.
    # (Non-finite inputs are refused before training, so the divergence comes from the learning rate.)
    x, y = _arrays(16)
    config = {"optimizer": "sgd", "learning_rate": 1e36, "batch_size": 16, "epochs": 4, "seed": 0}
    with pytest.raises(DivergenceError, match="loss is nan at step 2") as caught:
        _fit_tiny(spark, tmp_path / "run", x, y, config)
    assert caught.value.step == 1  # 0-based; the message counts from 1
    rows = _history(tmp_path / "run")  # the rounds before it, all of the first attempt: no restart
    assert rows and all(int(r["attempt"]) == 0 for r in rows)
    assert all(np.isfinite(float(r["train_loss"])) for r in rows)


@pytest.mark.slow
def test_allreduce_learns_mnist(spark: Any, tmp_path: Path) -> None:
    result = fit(
        "mnist",
        "lenet",
        strategy="allreduce",
        workers=2,
        config={"epochs": 2, "batch_size": 64, "learning_rate": 0.05},
        run_dir=tmp_path / "run",
        limit_train=3000,
        limit_test=1000,
    )
    assert result.test_accuracy is not None and result.test_accuracy > 0.8, result.history
    assert any(result.model_dir.iterdir())
    assert sum(float(r["bytes"]) for r in result.history) > 0


@pytest.mark.timeout(30)
def test_a_rank_frozen_before_it_reads_its_start_state_marks_the_attempt_lost() -> None:
    # Rank 1 connected, then froze before it read its start state. The payload (64 MB) outgrows the
    # sockets' buffers, and the driver's send of it used to block for good, outside the heartbeat
    # clock: the attempt was never marked lost and the gang waited in its collectives.
    server = _gang(payload=b"w" * (64 << 20), heartbeat_timeout=1.0)
    token = "t" * 32
    with wire.Server(token=token, handler=server.handle, name="test-gang") as endpoint:
        hello = {"rank": 1, "attempt": 0, "pid": 7}
        with wire.connect("127.0.0.1", endpoint.address[1], token=token, hello=hello, timeout=10) as rank:
            rank.send({"op": "loaded", "rows": 8, "digest": "xxhash64-sums:0:0"})
            lock = server.hold()
            with lock:
                assert lock.wait_for(lambda: server.lost is not None, timeout=10)
    assert server.lost is not None and server.lost.startswith("gang rank 1 (pid 7 on ")


@pytest.mark.timeout(30)
def test_a_rank_frozen_after_the_last_round_marks_the_attempt_lost() -> None:
    # Rank 0 reported the last round, then rank 1 froze before its done. Its silence used to be ignored
    # once the gang had finished: nothing cancelled the barrier job that the frozen task still held,
    # and fit waited on it for good. The driver cancels it; the finished rounds stay taken.
    server = _gang(steps_done=4, heartbeat_timeout=1.0)
    assert server.finished
    token = "t" * 32
    with wire.Server(token=token, handler=server.handle, name="test-gang") as endpoint:
        hello = {"rank": 1, "attempt": 0, "pid": 7}
        with wire.connect("127.0.0.1", endpoint.address[1], token=token, hello=hello, timeout=10) as rank:
            rank.send({"op": "loaded", "rows": 8, "digest": "xxhash64-sums:0:0"})
            assert rank.recv()[0]["op"] == "start"  # and it never says done
            lock = server.hold()
            with lock:
                assert lock.wait_for(lambda: server.lost is not None, timeout=10)
    assert server.finished and server.steps_done == 4 and server.fatal is None


@pytest.mark.timeout(30)
@pytest.mark.parametrize("leaves", [True, False])
@pytest.mark.parametrize("rank_id", [0, 1])
def test_a_rank_frozen_after_its_done_marks_the_attempt_lost_one_that_leaves_not(
    rank_id: int, leaves: bool
) -> None:
    # A rank said done, then froze before its task ended (in destroy_process_group, say): nothing
    # watched it after its done, and the barrier job it held, and fit with it, waited for good.
    token = "t" * 32
    server = _gang(steps_done=4, heartbeat_timeout=1.0)
    with wire.Server(token=token, handler=server.handle, name="test-gang") as endpoint:
        hello = {"rank": rank_id, "attempt": 0, "pid": 7}
        with wire.connect("127.0.0.1", endpoint.address[1], token=token, hello=hello, timeout=10) as rank:
            rank.send({"op": "loaded", "rows": 8, "digest": "xxhash64-sums:0:0"})
            assert rank.recv()[0]["op"] == "start"
            rank.send({"op": "done"})
            if rank_id == 0:
                assert rank.recv()[0]["op"] == "ok"
            if leaves:
                rank.close()
                time.sleep(2.0)  # past the heartbeat timeout: a rank gone is not a rank frozen
            else:
                lock = server.hold()
                with lock:
                    assert lock.wait_for(lambda: server.lost is not None, timeout=10)
    assert server.finished and server.fatal is None
    assert (server.lost is None) == leaves


@pytest.mark.timeout(30)
@pytest.mark.parametrize("beats", [False, True])
def test_a_rank_silent_while_it_loads_and_joins_the_gang_marks_the_attempt_lost_one_that_beats_not(
    beats: bool,
) -> None:
    # Rank 1 connected before it read its partition and joined the gang (the rendezvous), and says
    # loaded after. Frozen meanwhile, it is silent: the attempt is lost (the others would wait in
    # allGather or init_process_group). Beating, it is waited for longer than the heartbeat timeout.
    server = _gang(heartbeat_timeout=1.0)
    token = "t" * 32
    loading = threading.Event()
    with wire.Server(token=token, handler=server.handle, name="test-gang") as endpoint:
        hello = {"rank": 1, "attempt": 0, "pid": 7}
        with (
            wire.connect("127.0.0.1", endpoint.address[1], token=token, hello=hello, timeout=10) as rank,
            wire.Heartbeat(rank, wire.heartbeat_interval(1.0) if beats else None),
        ):
            rank.settimeout(10)
            loading.wait(2.5)  # longer than the heartbeat timeout
            if beats:
                rank.send({"op": "loaded", "rows": 8, "digest": "xxhash64-sums:0:0"})
                assert rank.recv()[0]["op"] == "start" and server.lost is None
            else:
                lock = server.hold()
                with lock:
                    assert lock.wait_for(lambda: server.lost is not None, timeout=10)
                assert server.lost is not None and server.lost.startswith("gang rank 1 (pid 7 on ")
