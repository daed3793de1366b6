"""Rows the driver holds, split into broadcast shares for the workers (deepspark.training.shares)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from deepspark.data import load_dataset, write_idx
from deepspark.data.record import arrays_sha256
from deepspark.training import fit
from deepspark.training.shares import HeldRows, broadcast_shares, read_share, share_keys, share_of


def _held(rows: int, classes: int) -> HeldRows:
    """Rows whose image encodes its own position (so a share says which rows it holds), labels cycling
    through the classes with period ``classes``."""
    images = np.zeros((rows, 1, 2, 2), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(rows) % 256
    images[:, 0, 0, 1] = np.arange(rows) // 256
    return HeldRows(images, (np.arange(rows) % classes).astype(np.uint8))


def _positions(images: np.ndarray) -> np.ndarray:
    return images[:, 0, 0, 0].astype(np.int64) + 256 * images[:, 0, 0, 1].astype(np.int64)


@pytest.mark.parametrize(("rows", "workers"), [(0, 2), (1, 3), (5, 2), (7, 3), (1000, 4), (999, 1)])
def test_the_shares_hold_every_row_once_in_key_order(rows: int, workers: int) -> None:
    held = _held(rows, classes=3)
    seen: list[np.ndarray] = []
    for keys in share_keys(rows, workers):
        images, labels = share_of(held, keys)
        positions = _positions(images)
        assert np.array_equal(positions, keys)
        assert np.all(np.diff(positions) > 0)  # key order
        assert np.array_equal(labels, held.labels[positions]) and labels.dtype == np.int64
        seen.append(positions)
    sizes = [len(p) for p in seen]
    assert max(sizes) - min(sizes) <= 1
    assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(rows))


def test_labels_repeating_with_the_worker_count_still_reach_every_worker() -> None:
    """A split by position would give each of 3 workers one class of labels 0, 1, 2, 0, 1, 2, ..."""
    held = _held(300, classes=3)
    for keys in share_keys(300, 3):
        counts = np.bincount(share_of(held, keys)[1], minlength=3)
        assert counts.min() >= 20, counts  # 100 rows each: every class well represented


def test_the_split_is_the_same_in_every_call() -> None:
    first, again = share_keys(60_000, 2), share_keys(60_000, 2)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))


def _read_in_tasks(frame: Any, shares: tuple[Any, ...]) -> dict[int, tuple[int, str]]:
    def task(batches: Any) -> Any:
        from pyspark import TaskContext

        worker = TaskContext.get().partitionId()
        part = read_share(shares, batches, worker)
        yield pa.record_batch(
            [pa.array([worker]), pa.array([len(part.labels)]), pa.array([part.digest])],
            names=["worker", "rows", "digest"],
        )

    out = frame.mapInArrow(task, "worker long, rows long, digest string").collect()
    return {r.worker: (r.rows, r.digest) for r in out}


def test_each_task_reads_its_own_share_and_the_broadcasts_end_with_the_context(spark: Any) -> None:
    held = _held(11, classes=2)
    with broadcast_shares(spark, held, 3) as (frame, shares):
        assert frame.rdd.getNumPartitions() == 3
        read = _read_in_tasks(frame, shares)
        assert read == _read_in_tasks(frame, shares)  # a task run again reads the same
    for worker, keys in enumerate(share_keys(11, 3)):
        images, labels = share_of(held, keys)
        assert read[worker] == (len(labels), f"sha256:{arrays_sha256(images, labels)}")
    with pytest.raises(Exception, match="destroyed"):  # no job can use them any more
        _read_in_tasks(spark.range(0, 3, 1, 3), shares)


def _layout_dir(path: Path, *, train: int, classes: int) -> Path:
    """An MNIST-layout directory (not MNIST) with labels 0, 1, ..., classes - 1, 0, 1, ..."""
    rng = np.random.default_rng(4)
    path.mkdir(parents=True)
    for prefix, n in (("train", train), ("t10k", 12)):
        labels = np.arange(n) % classes
        images = rng.integers(0, 60, size=(n, 6, 6), dtype=np.uint8)
        for i, label in enumerate(labels):
            images[i, label, :] = 250
        write_idx(path / f"{prefix}-images-idx3-ubyte", images)
        write_idx(path / f"{prefix}-labels-idx1-ubyte", labels.astype(np.uint8))
    return path


@pytest.mark.parametrize("strategy", ["average", "allreduce"])
def test_a_dataset_s_workers_train_on_their_shares(spark: Any, tmp_path: Path, strategy: str) -> None:
    """The digests the run's checkpoint keeps are of exactly the rows share_of gives each worker."""
    data = _layout_dir(tmp_path / "data", train=29, classes=2)
    fit(
        str(data),
        "mlp",
        strategy=strategy,
        workers=2,
        config={"optimizer": "sgd", "batch_size": 4, "epochs": 1, "threads": 1},
        run_dir=tmp_path / "run",
    )
    dataset = load_dataset(str(data))
    held = HeldRows(dataset.train_images.reshape(29, 1, 6, 6), dataset.train_labels)
    shares = [share_of(held, keys) for keys in share_keys(29, 2)]
    expected = {str(worker): f"sha256:{arrays_sha256(*share)}" for worker, share in enumerate(shares)}
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["row_digests"] == expected


def test_a_run_whose_workers_read_the_dataset_as_partitions_is_not_resumed(
    spark: Any, tmp_path: Path, driver_crash: Any
) -> None:
    """Such a checkpoint (deepspark before the shares) keeps xxhash sums per worker: its data positions
    are over other rows than the shares give each worker now."""
    from deepspark.errors import ConfigError, DeepsparkError

    data = _layout_dir(tmp_path / "data", train=29, classes=2)
    run_dir = tmp_path / "run"
    settings: dict[str, Any] = {
        "workers": 2,
        "config": {"optimizer": "sgd", "batch_size": 4, "epochs": 2, "threads": 1},
        "average": {"tau": 2},
        "checkpoint_seconds": 0,  # round 1 is checkpointed before the crash
    }
    with pytest.raises(DeepsparkError, match="driver crash"):
        fit(str(data), "mlp", run_dir=run_dir, on_round=driver_crash(1), **settings)
    state_file = run_dir / "checkpoint" / "state.json"
    state = json.loads(state_file.read_text())
    assert set(state["row_digests"]) == {"0", "1"}
    resumable = state_file.read_text()
    state["row_digests"] = {"0": "xxhash64-sums:12:34", "1": "xxhash64-sums:56:78"}
    state_file.write_text(json.dumps(state))
    with pytest.raises(ConfigError, match="cannot continue from its data positions; train it again"):
        fit(str(data), run_dir=run_dir, resume=True)
    state_file.write_text(resumable)  # as this version wrote it: resumes
    assert fit(str(data), run_dir=run_dir, resume=True).history[-1]["epoch"] >= 2
