"""fit(): the average strategy's exact identities, learning, resume and bad input (local[2] session)."""

from __future__ import annotations

import csv
import functools
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from deepspark.data import load_dataset, to_dataframe, write_idx
from deepspark.errors import ConfigError, DeepsparkError, RunError
from deepspark.models import build_model, load_checkpoint, model_spec
from deepspark.training import TrainConfig, fit, train_one_process
from deepspark.training.average import AverageSettings, round_steps


def _layout_dir(path: Path, *, train: int, test: int, classes: int = 3, size: int = 8, seed: int = 0) -> Path:
    """An MNIST-layout directory of ``classes`` classes of ``size``x``size`` images (not MNIST)."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    for prefix, n in (("train", train), ("t10k", test)):
        labels = np.arange(n) % classes
        images = rng.integers(0, 60, size=(n, size, size), dtype=np.uint8)
        for i, label in enumerate(labels):  # a bright bar per class, so a model can learn it
            images[i, label * 2 : label * 2 + 2, :] = 250
        write_idx(path / f"{prefix}-images-idx3-ubyte", images)
        write_idx(path / f"{prefix}-labels-idx1-ubyte", labels.astype(np.uint8))
    return path


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _layout_dir(tmp_path_factory.mktemp("toy") / "data", train=40, test=30)


def _history(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "history.csv", newline="") as fh:
        return list(csv.DictReader(fh))


SGD = {"optimizer": "sgd", "learning_rate": 0.1, "lr_schedule": "constant", "threads": 1}


def test_one_worker_tau_1_takes_the_one_process_steps(spark: Any, toy: Path, tmp_path: Path) -> None:
    config = {**SGD, "batch_size": 8, "epochs": 2, "seed": 3}
    result = fit(
        str(toy),
        "mlp",
        strategy="average",
        workers=1,
        config=config,
        average={"tau": 1},
        run_dir=tmp_path / "run",
    )
    data = load_dataset(None, data_dir=toy)
    reference = train_one_process(
        model_spec("mlp", input_shape=(1, 8, 8), num_classes=3), data, TrainConfig(**config)
    )
    trained = load_checkpoint(result.model_dir).model.state_dict()
    for name, value in reference.model.state_dict().items():
        torch.testing.assert_close(trained[name], value, rtol=0, atol=1e-6)
    rows = _history(result.run_dir)
    assert len(rows) == 2 * 5  # ceil(40 / 8) steps per epoch, one step per round
    assert [int(r["round"]) for r in rows] == list(range(10))
    assert sum(int(r["samples"]) for r in rows) == 2 * 40


def test_two_workers_tau_1_sgd_is_one_step_on_the_union_batch(spark: Any, toy: Path, tmp_path: Path) -> None:
    # batch_size = all rows: each worker's one batch is its whole partition, so the weighted average of
    # the two workers' SGD steps must equal one SGD step on the union batch (all 40 rows).
    config = {**SGD, "batch_size": 40, "epochs": 1, "seed": 5}
    result = fit(
        str(toy),
        "mlp",
        strategy="average",
        workers=2,
        config=config,
        average={"tau": 1},
        run_dir=tmp_path / "run",
    )
    rows = _history(result.run_dir)
    assert len(rows) == 1 and int(rows[0]["samples"]) == 40 and int(rows[0]["workers"]) == 2
    data = load_dataset(None, data_dir=toy)
    spec = model_spec("mlp", input_shape=(1, 8, 8), num_classes=3)
    model = build_model(spec, seed=5)
    from deepspark.models import Preprocess

    x = Preprocess(input_shape=(1, 8, 8), mean=data.mean, std=data.std).apply(data.train_images)
    loss = torch.nn.functional.cross_entropy(model(x), torch.as_tensor(data.train_labels))
    loss.backward()
    expected_loss = float(loss.detach())
    with torch.no_grad():
        expected = {n: p - 0.1 * p.grad for n, p in model.named_parameters()}
    trained = load_checkpoint(result.model_dir).model.state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(trained[name], value, rtol=0, atol=1e-6)
    assert float(rows[0]["train_loss"]) == pytest.approx(expected_loss, abs=1e-6)


@pytest.mark.parametrize(
    ("tau", "total", "rounds"),
    [
        (2, 9, [2, 2, 2, 3]),
        (2, 8, [2, 2, 2, 2]),
        (50, 30, [30]),
        (50, 99, [99]),
        (50, 100, [50, 50]),
        (50, 1876, [50] * 36 + [76]),
        (1, 5, [1] * 5),
    ],
)
def test_rounds_take_tau_steps_and_the_last_one_the_remainder(
    tau: int, total: int, rounds: list[int]
) -> None:
    planned, left = [], total
    while left:
        planned.append(round_steps(tau, left))
        left -= planned[-1]
    assert planned == rounds


def test_no_round_is_shorter_than_tau(spark: Any, toy: Path, tmp_path: Path) -> None:
    # 2 workers, batch 8: ceil(20 / 8) = 3 steps an epoch, 9 in 3 epochs; at tau 2 that is rounds of 2, 2,
    # 2 and 3 (not a fifth round of 1 step that would move the whole weights twice for one step).
    config = {**SGD, "batch_size": 8, "epochs": 3, "seed": 6}
    result = fit(str(toy), "mlp", workers=2, config=config, average={"tau": 2}, run_dir=tmp_path / "run")
    rows = _history(result.run_dir)
    assert [int(r["round"]) for r in rows] == [0, 1, 2, 3]
    # Each worker's share of the 40 rows is 20 (a dataset's split is even): 3 epochs of batches 8, 8, 4.
    assert sum(int(r["samples"]) for r in rows) == 2 * 3 * 20
    model = build_model(model_spec("mlp", input_shape=(1, 8, 8), num_classes=3))
    weights = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    for row in rows:  # every round moves the weights once each way per worker, plus small headers
        assert 0 < int(row["bytes"]) - 2 * 2 * weights < 4096


def test_average_learns_mnist_and_saves_a_predictable_model(spark: Any, tmp_path: Path) -> None:
    result = fit(
        "mnist",
        "lenet",
        workers=2,
        config={"epochs": 1},
        average={"tau": 20},
        limit_train=4000,
        limit_test=1000,
        run_dir=tmp_path / "run",
    )
    assert result.test_accuracy is not None and result.test_accuracy > 0.7  # chance is 0.1
    checkpoint = load_checkpoint(result.model_dir)
    assert checkpoint.metadata["metrics"]["test_accuracy"] == result.test_accuracy
    rows = _history(result.run_dir)
    # Every worker takes the same ceil(2000 / 64) = 32 steps; the hash split is uneven, so the larger
    # partition's shorter last batch may fall elsewhere: at most one batch per worker either way.
    assert abs(sum(int(r["samples"]) for r in rows) - 4000) <= 2 * 64
    assert sum(int(r["workers"]) for r in rows) == 2 * len(rows)
    assert all(int(r["bytes"]) > 0 for r in rows)
    assert (result.run_dir / "curve.png").stat().st_size > 0


def test_nesterov_outer_step_moves_past_the_average_and_is_checkpointed(
    spark: Any, toy: Path, tmp_path: Path
) -> None:
    config = {**SGD, "batch_size": 8, "epochs": 2, "seed": 1}  # 6 steps: 3 rounds of 2
    plain = fit(str(toy), "mlp", workers=2, config=config, average={"tau": 2}, run_dir=tmp_path / "plain")
    nesterov = fit(
        str(toy),
        "mlp",
        workers=2,
        config=config,
        average={"tau": 2, "outer": "nesterov"},
        run_dir=tmp_path / "nesterov",
        checkpoint_seconds=0,
    )
    a = load_checkpoint(plain.model_dir).model.state_dict()
    b = load_checkpoint(nesterov.model_dir).model.state_dict()
    assert any(not torch.allclose(a[k], b[k]) for k in a)
    from safetensors.torch import load_file

    saved = load_file(str(nesterov.run_dir / "checkpoint" / "state.safetensors"))
    assert any(k.startswith("outer.") for k in saved)


def test_a_diverging_nesterov_run_names_the_outer_step(spark: Any, toy: Path, tmp_path: Path) -> None:
    config = {**SGD, "batch_size": 8, "epochs": 2, "seed": 1}
    with pytest.raises(RunError, match=r"diverged.*Nesterov outer step \(outer learning rate 1e\+30"):
        fit(
            str(toy),
            "mlp",
            workers=2,
            config=config,
            average={"tau": 2, "outer": "nesterov", "outer_learning_rate": 1e30},
            run_dir=tmp_path / "run",
        )


def test_a_diverging_worker_beside_an_empty_one_stops_the_run_with_its_divergence(
    spark: Any, tmp_path: Path
) -> None:
    # One row, two workers: worker with the row diverges (inputs of 3e38), the other has none. The run
    # ended "every worker of a round had no examples", the divergence only in the executor's log.
    frame = spark.createDataFrame([([3e38] * 4, 1)], "x array<double>, y int")
    with pytest.raises(RunError, match=r"^training worker \d failed: .*DivergenceError: training diverged"):
        fit(
            frame,
            "mlp",
            strategy="average",
            workers=2,
            num_classes=2,
            feature_column="x",
            label_column="y",
            input_shape=(1, 2, 2),
            run_dir=tmp_path / "run",
        )


@dataclass(frozen=True)
class _Resumed:
    whole: list[dict[str, Any]]  # the uninterrupted run's history
    crashed: list[dict[str, str]]  # the crashed run's history before its resume
    checkpoint_round: int  # the round its checkpoint held
    resumed: list[dict[str, str]]  # its history after the resume
    time_split: dict[str, float]  # the resumed session's


def _crash_and_resume(
    toy: Path, tmp_path: Path, crash: Any, *, checkpoint_seconds: float = 0, **options: Any
) -> _Resumed:
    """Train ``mlp`` on ``toy`` whole; again with ``on_round=crash`` (a driver dying after a round);
    then resume that run from its checkpoint."""
    whole = fit(str(toy), "mlp", **options, run_dir=tmp_path / "whole")
    run_dir = tmp_path / "crashed"
    with pytest.raises(DeepsparkError, match="driver crash"):
        fit(
            str(toy), "mlp", **options, run_dir=run_dir, checkpoint_seconds=checkpoint_seconds, on_round=crash
        )
    crashed = _history(run_dir)
    state = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    resumed = fit(str(toy), run_dir=run_dir, resume=True)
    return _Resumed(
        list(whole.history), crashed, int(state["round"]), _history(resumed.run_dir), dict(resumed.time_split)
    )


def _losses(rows: list[Any]) -> list[float]:
    return [float(r["train_loss"]) for r in rows]


def test_rounds_of_seconds_take_the_run_s_examples_not_a_round_s_worth(
    spark: Any, toy: Path, tmp_path: Path
) -> None:
    # A round of 30 s on 40 rows used to train for all of it: thousands of epochs for --epochs 2.
    config = {**SGD, "batch_size": 8, "epochs": 2, "seed": 0}
    average = {"round_seconds": 30.0}
    result = fit(str(toy), "mlp", workers=2, config=config, average=average, run_dir=tmp_path / "run")
    samples = sum(int(r["samples"]) for r in result.history)
    assert 2 * 40 <= samples < 2 * 40 + 2 * 8  # at most a batch a worker beyond the budget
    assert float(result.history[-1]["epoch"]) == pytest.approx(samples / 40)


def test_resume_continues_the_same_loss_curve(
    spark: Any, toy: Path, tmp_path: Path, driver_crash: Any
) -> None:
    config = {**SGD, "batch_size": 8, "epochs": 4, "seed": 2}  # 12 steps: 6 rounds of 2
    run = _crash_and_resume(toy, tmp_path, driver_crash(3), workers=2, config=config, average={"tau": 2})
    assert [int(r["round"]) for r in run.crashed] == [0, 1, 2, 3]
    assert [int(r["round"]) for r in run.resumed] == list(range(len(run.whole)))
    np.testing.assert_allclose(_losses(run.resumed), _losses(run.whole), rtol=0, atol=1e-6)


@pytest.mark.parametrize("strategy", ["average", "allreduce", "async"])
def test_a_run_stopping_early_keeps_every_round_it_finished(
    spark: Any, toy: Path, tmp_path: Path, driver_crash: Any, strategy: str
) -> None:
    # With a checkpoint interval longer than the run, only the stop itself can have written round 3
    # (Ctrl-C and a failed worker take the same path as this error out of on_round).
    config = {**SGD, "batch_size": 8, "epochs": 4, "seed": 2}
    options: dict[str, Any] = {"strategy": strategy, "workers": 2, "config": config}
    if strategy != "allreduce":  # all-reduce takes no tau: its rounds are a quarter epoch each
        options["average"] = {"tau": 2}
    run = _crash_and_resume(toy, tmp_path, driver_crash(3), checkpoint_seconds=3600, **options)
    assert run.checkpoint_round == 3 and [int(r["round"]) for r in run.crashed] == [0, 1, 2, 3]
    assert [int(r["round"]) for r in run.resumed] == list(range(len(run.resumed)))
    assert sum(int(r["samples"]) for r in run.resumed) == sum(int(r["samples"]) for r in run.whole)
    # The resumed session's time is its own rounds': the crashed session's compute was added to it and
    # divided by this session's wall ("compute 21.9 s (117%)").
    this_session = [r for r in run.resumed if int(r["round"]) > run.checkpoint_round]
    computed = sum(float(r["compute_s"] or 0) for r in this_session)
    assert run.time_split["compute_s"] == pytest.approx(computed, rel=1e-3, abs=1e-3)
    if strategy != "async":  # async's pushes interleave by timing; the others are deterministic
        np.testing.assert_allclose(_losses(run.resumed), _losses(run.whole), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("strategy", "save"), [("average", "_save_checkpoint"), ("allreduce", "_save_gang_checkpoint")]
)
def test_a_second_ctrl_c_while_the_stop_saves_the_last_round_waits_for_the_save(
    spark: Any, toy: Path, tmp_path: Path, driver_crash: Any, monkeypatch: Any, strategy: str, save: str
) -> None:
    # The run stops (the driver's error after round 3) with round 3 not yet checkpointed (an interval
    # longer than the run); the stop saves it, and a Ctrl-C pressed meanwhile cut that save short: the
    # run resumed from round 2 or earlier. Now the Ctrl-C waits for the save, then stops the run.
    import os
    import signal
    import threading

    from deepspark.training import _fit

    saved = getattr(_fit, save)

    def pressed_again(*args: Any, **kwargs: Any) -> None:
        if threading.current_thread() is threading.main_thread():  # the stop's save, not a round's
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)  # where the signal lands, before the save
        saved(*args, **kwargs)

    monkeypatch.setattr(_fit, save, pressed_again)
    config = {**SGD, "batch_size": 8, "epochs": 4, "seed": 2}
    options: dict[str, Any] = {"strategy": strategy, "workers": 2, "config": config}
    if strategy == "average":
        options["average"] = {"tau": 2}
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        fit(str(toy), "mlp", **options, run_dir=run_dir, checkpoint_seconds=3600, on_round=driver_crash(3))
    assert json.loads((run_dir / "checkpoint" / "state.json").read_text())["round"] == 3
    assert [int(r["round"]) for r in _history(run_dir)] == [0, 1, 2, 3]


def test_local_run_checkpoints_every_epoch_and_resumes_the_same_curve(
    toy: Path, tmp_path: Path, driver_crash: Any
) -> None:
    # Dropout (the RNG), momentum (optimizer state), a cosine schedule and shifts: all must resume exactly.
    spec = {
        "input_shape": [1, 8, 8],
        "layers": [
            {"type": "flatten"},
            {"type": "linear", "out_features": 16},
            {"type": "relu"},
            {"type": "dropout", "p": 0.5},
            {"type": "linear", "out_features": 3},
        ],
    }
    config = {"optimizer": "momentum", "learning_rate": 0.05, "lr_schedule": "cosine", "augment": True}
    config = {**config, "batch_size": 8, "epochs": 4, "seed": 5, "threads": 1}
    whole = fit(str(toy), spec, strategy="local", config=config, run_dir=tmp_path / "whole")
    run_dir = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="driver crash"):  # epoch 2 is shown once it is checkpointed
        fit(str(toy), spec, strategy="local", config=config, run_dir=run_dir, on_round=driver_crash(1))
    assert json.loads((run_dir / "checkpoint" / "state.json").read_text())["epochs_done"] == 2
    resumed = fit(str(toy), run_dir=run_dir, resume=True)
    rows = _history(resumed.run_dir)
    assert [int(r["round"]) for r in rows] == [0, 1, 2, 3]
    for key in ("train_loss", "test_accuracy"):
        np.testing.assert_allclose(
            [float(r[key]) for r in rows], [float(r[key]) for r in whole.history], rtol=0, atol=1e-6
        )
    a = load_checkpoint(whole.model_dir).model.state_dict()
    b = load_checkpoint(resumed.model_dir).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_stopped_before_its_first_checkpoint_resumes_from_the_start(
    toy: Path, tmp_path: Path, driver_crash: Any
) -> None:
    # Epoch 1's row written, its checkpoint not (as a driver killed before any checkpoint leaves it):
    # --resume said "holds no checkpoint/" and a new run there "already exists", so the directory could
    # be neither resumed nor reused. It now trains from the start with its saved settings.
    config = {"batch_size": 8, "epochs": 2, "seed": 3, "threads": 1}
    whole = fit(str(toy), "mlp", strategy="local", config=config, run_dir=tmp_path / "whole")
    run_dir = tmp_path / "stopped"
    with pytest.raises(RuntimeError, match="driver crash"):
        fit(str(toy), "mlp", strategy="local", config=config, run_dir=run_dir, on_round=driver_crash(0))
    shutil.rmtree(run_dir / "checkpoint")  # killed before it was written
    assert (run_dir / "history.csv").exists()
    resumed = fit(str(toy), run_dir=run_dir, resume=True)
    rows = _history(resumed.run_dir)
    assert [int(r["round"]) for r in rows] == [0, 1]  # the row without a checkpoint redone, not kept twice
    np.testing.assert_allclose(_losses(rows), _losses(whole.history), rtol=0, atol=1e-6)
    assert json.loads((run_dir / "checkpoint" / "state.json").read_text())["epochs_done"] == 2


def test_a_checkpoint_swap_cut_short_is_put_back_and_the_resume_continues_from_it(
    toy: Path, tmp_path: Path, driver_crash: Any
) -> None:
    # A driver killed between the two renames that swap checkpoint/ (the old one moved aside, the new one
    # not yet in) left no checkpoint/ and the last complete one at .checkpoint.old: --resume took that for
    # a run never checkpointed, deleted history.csv and trained every epoch again. It is put back now.
    config = {"batch_size": 8, "epochs": 4, "seed": 3, "threads": 1}
    whole = fit(str(toy), "mlp", strategy="local", config=config, run_dir=tmp_path / "whole")
    run_dir = tmp_path / "cut"
    with pytest.raises(RuntimeError, match="driver crash"):
        fit(str(toy), "mlp", strategy="local", config=config, run_dir=run_dir, on_round=driver_crash(1))
    (run_dir / "checkpoint").rename(run_dir / ".checkpoint.old")  # killed between the two renames
    trained: list[int] = []
    resumed = fit(str(toy), run_dir=run_dir, resume=True, on_round=lambda row: trained.append(row["round"]))
    assert trained == [2, 3]  # the two epochs the checkpoint lacked, not all four again
    rows = _history(resumed.run_dir)
    assert [int(r["round"]) for r in rows] == [0, 1, 2, 3]
    np.testing.assert_allclose(_losses(rows), _losses(whole.history), rtol=0, atol=1e-6)
    assert not (run_dir / ".checkpoint.old").exists()


def test_a_local_epoch_is_shown_only_once_its_row_and_checkpoint_are_written(
    toy: Path, tmp_path: Path
) -> None:
    # A Ctrl-C on seeing an epoch's progress line landed between its history row and its checkpoint
    # (measured: SIGINT 50 ms after the row appeared left no checkpoint): the finished epoch was lost.
    seen: list[tuple[int, int, int]] = []

    def on_round(row: dict[str, Any]) -> None:
        state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
        seen.append((row["epoch"], state["epochs_done"], len(_history(tmp_path / "run"))))

    config = {"batch_size": 8, "epochs": 2, "seed": 3, "threads": 1}
    fit(str(toy), "mlp", strategy="local", config=config, run_dir=tmp_path / "run", on_round=on_round)
    assert seen == [(1, 1, 1), (2, 2, 2)]


def test_a_resume_while_the_run_trains_is_refused_and_the_run_keeps_one_row_per_epoch(
    toy: Path, tmp_path: Path
) -> None:
    # Two commands in one run directory (a --resume while the run trains, two trains with one --run-dir)
    # both trained: history.csv got each epoch twice, the checkpoints replaced each other's, and one
    # process crashed in the other's checkpoint swap. The run directory is now held by the running one.
    config = {"batch_size": 8, "epochs": 3, "seed": 3, "threads": 1}
    run_dir = tmp_path / "run"
    refused: list[BaseException] = []

    def resume_meanwhile(row: dict[str, Any]) -> None:
        if row["round"] == 0:
            try:
                fit(str(toy), run_dir=run_dir, resume=True)
            except ConfigError as exc:
                refused.append(exc)

    fit(str(toy), "mlp", strategy="local", config=config, run_dir=run_dir, on_round=resume_meanwhile)
    assert len(refused) == 1 and "in use by another deepspark command" in str(refused[0])
    assert [int(r["round"]) for r in _history(run_dir)] == [0, 1, 2]
    assert json.loads((run_dir / "checkpoint" / "state.json").read_text())["epochs_done"] == 3
    with pytest.raises(ConfigError, match="already exists"):  # once it ended: a new run there, as before
        fit(str(toy), "mlp", strategy="local", config=config, run_dir=run_dir)
    fit(str(toy), run_dir=run_dir, resume=True)  # and its resume runs (nothing left to train)
    assert [int(r["round"]) for r in _history(run_dir)] == [0, 1, 2]


def test_a_resume_replaces_the_history_it_trims_instead_of_rewriting_it_in_place(
    toy: Path, tmp_path: Path, driver_crash: Any
) -> None:
    # The resume rewrote history.csv in place (truncate, then write): stopped midway (Ctrl-C, SIGTERM,
    # a full disk) it left the finished rounds' rows lost. The trimmed history now replaces the file.
    config = {"batch_size": 8, "epochs": 2, "seed": 3, "threads": 1}
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="driver crash"):
        fit(str(toy), "mlp", strategy="local", config=config, run_dir=run_dir, on_round=driver_crash(0))
    written = (run_dir / "history.csv").stat().st_ino
    fit(str(toy), run_dir=run_dir, resume=True)
    assert (run_dir / "history.csv").stat().st_ino != written
    assert [int(r["round"]) for r in _history(run_dir)] == [0, 1]


def test_resume_refuses_data_whose_rows_changed(spark: Any, tmp_path: Path, driver_crash: Any) -> None:
    data = _layout_dir(tmp_path / "data", train=40, test=30)
    config = {**SGD, "batch_size": 8, "epochs": 4, "seed": 2}
    with pytest.raises(DeepsparkError, match="driver crash"):
        fit(
            str(data),
            "mlp",
            workers=2,
            config=config,
            average={"tau": 2},
            run_dir=tmp_path / "run",
            checkpoint_seconds=0,
            on_round=driver_crash(1),
        )
    # Settings other than the saved ones are refused, not silently replaced by them.
    for changed in ({"workers": 4}, {"config": {"epochs": 8}}, {"strategy": "allreduce"}, {"staleness": 3}):
        with pytest.raises(
            ConfigError, match=f"continues with the settings in its config.json; drop {next(iter(changed))}"
        ):
            fit(str(data), run_dir=tmp_path / "run", resume=True, **changed)
    # Its images as a DataFrame: as many rows, but scaled without the directory's mean and std.
    same = load_dataset(str(data))
    with pytest.raises(ConfigError, match=r"trained on '.*data', not 'DataFrame'"):
        fit(to_dataframe(spark, same.train_images, same.train_labels), run_dir=tmp_path / "run", resume=True)
    import shutil

    shutil.rmtree(data)
    _layout_dir(data, train=80, test=30)  # the same directory, now with twice the rows
    with pytest.raises(ConfigError, match="trained on 40 rows, but the data given now has 80"):
        fit(str(data), run_dir=tmp_path / "run", resume=True)
    shutil.rmtree(data)
    _layout_dir(data, train=40, test=30, seed=7)  # as many rows, other images: trained on without a word
    with pytest.raises(
        ConfigError, match=r"trained on other rows than the data given now holds \(as many, 40"
    ):
        fit(str(data), run_dir=tmp_path / "run", resume=True)
    assert [int(r["round"]) for r in _history(tmp_path / "run")] == [0, 1]


def test_resume_refuses_other_rows_of_the_same_count_and_kind(
    spark: Any, tmp_path: Path, driver_crash: Any
) -> None:
    """A DataFrame's rows are fingerprinted in the counting job: other labels of the same count are refused."""
    images = load_dataset(str(_layout_dir(tmp_path / "data", train=40, test=0))).train_images
    labels = np.arange(40) % 3
    train = functools.partial(
        fit, model="mlp", workers=2, config={**SGD, "batch_size": 8, "epochs": 3}, average={"tau": 2}
    )
    with pytest.raises(DeepsparkError, match="driver crash"):
        train(
            to_dataframe(spark, images, labels),
            run_dir=tmp_path / "run",
            checkpoint_seconds=0,
            on_round=driver_crash(1),
        )
    with pytest.raises(
        ConfigError, match=r"trained on other rows than the data given now holds \(as many, 40"
    ):
        fit(to_dataframe(spark, images, (labels + 1) % 3), run_dir=tmp_path / "run", resume=True)
    # The same rows resume (made again: the fingerprint is of the rows, not of the DataFrame object).
    assert len(fit(to_dataframe(spark, images, labels), run_dir=tmp_path / "run", resume=True).history) > 2


def test_local_resume_refuses_other_examples_of_the_same_count(tmp_path: Path, driver_crash: Any) -> None:
    data = _layout_dir(tmp_path / "data", train=40, test=10)
    config = {**SGD, "batch_size": 8, "epochs": 3}
    with pytest.raises(RuntimeError, match="driver crash"):
        fit(
            str(data),
            "mlp",
            strategy="local",
            config=config,
            run_dir=tmp_path / "run",
            on_round=driver_crash(1),
        )
    import shutil

    shutil.rmtree(data)
    _layout_dir(data, train=40, test=10, seed=3)  # as many examples, other images
    with pytest.raises(ConfigError, match=r"trained on other examples than '.*data' holds now"):
        fit(str(data), run_dir=tmp_path / "run", resume=True)
    assert [int(r["round"]) for r in _history(tmp_path / "run")] == [0, 1]  # as the crash left it


def test_resume_from_another_working_directory_trains_on_the_run_s_data(
    toy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, driver_crash: Any
) -> None:
    from deepspark.cli import main

    config = {**SGD, "batch_size": 8, "epochs": 3, "seed": 1}
    monkeypatch.chdir(toy.parent)  # the run names its data "data", relative to here
    whole = fit("data", "mlp", strategy="local", config=config, run_dir=tmp_path / "whole")
    with pytest.raises(RuntimeError, match="driver crash"):
        fit(
            "data", "mlp", strategy="local", config=config, run_dir=tmp_path / "run", on_round=driver_crash(1)
        )
    # Elsewhere "data" is another dataset of as many rows: the resume must still read the run's own.
    _layout_dir(tmp_path / "elsewhere" / "data", train=40, test=30, seed=9)
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["train", "--resume", str(tmp_path / "run"), "-q"]) == 0
    np.testing.assert_allclose(
        _losses(_history(tmp_path / "run")), _losses(list(whole.history)), rtol=0, atol=1e-6
    )
    with pytest.raises(ConfigError, match="trained on"):  # and fit refuses the other "data"
        fit("data", run_dir=tmp_path / "run", resume=True)


def test_resume_builds_the_spec_the_run_trained_not_what_its_file_holds_now(
    toy: Path, tmp_path: Path, driver_crash: Any
) -> None:
    from deepspark.cli import main

    spec = {"input_shape": [1, 8, 8], "layers": [{"type": "flatten"}, {"type": "linear", "out_features": 16}]}
    spec["layers"] += [{"type": "relu"}, {"type": "linear", "out_features": 3}]
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    config = {**SGD, "batch_size": 8, "epochs": 3, "seed": 1}
    whole = fit(str(toy), str(spec_file), strategy="local", config=config, run_dir=tmp_path / "whole")
    with pytest.raises(RuntimeError, match="driver crash"):
        fit(
            str(toy),
            str(spec_file),
            strategy="local",
            config=config,
            run_dir=tmp_path / "run",
            on_round=driver_crash(1),
        )
    spec["layers"][2] = {"type": "tanh"}  # the file edited meanwhile: the weights' shapes still fit
    spec_file.write_text(json.dumps(spec))
    assert main(["train", "--resume", str(tmp_path / "run"), "-q"]) == 0
    assert load_checkpoint(tmp_path / "run" / "model").spec.to_dict()["layers"][2] == {"type": "relu"}
    np.testing.assert_allclose(
        _losses(_history(tmp_path / "run")), _losses(list(whole.history)), rtol=0, atol=1e-6
    )


@pytest.mark.parametrize("strategy", ["average", "async"])
def test_resume_after_a_crash_in_the_last_round_saves_the_model(
    spark: Any, toy: Path, tmp_path: Path, driver_crash: Any, strategy: str
) -> None:
    config = {**SGD, "batch_size": 8, "epochs": 1, "seed": 2}  # 3 steps a worker: rounds 0, 1, 2
    run_dir = tmp_path / "run"
    with pytest.raises(DeepsparkError, match="driver crash"):
        fit(
            str(toy),
            "mlp",
            strategy=strategy,
            workers=2,
            config=config,
            average={"tau": 1},
            run_dir=run_dir,
            checkpoint_seconds=0,
            on_round=driver_crash(2),  # the last round: checkpointed, but no model/ yet
        )
    before = _history(run_dir)
    assert not (run_dir / "model").exists()
    resumed = fit(str(toy), run_dir=run_dir, resume=True)
    assert _history(run_dir) == before  # nothing left to train
    assert load_checkpoint(resumed.model_dir).spec.output_shape() == (3,)


@pytest.mark.timeout(300)
def test_nesterov_resume_continues_the_same_loss_curve(
    spark: Any, toy: Path, tmp_path: Path, driver_crash: Any
) -> None:
    config = {**SGD, "batch_size": 8, "epochs": 4, "seed": 2}  # 12 steps: 6 rounds of 2
    average = {"tau": 2, "outer": "nesterov"}
    # The crash comes after the outer momentum has built up.
    run = _crash_and_resume(toy, tmp_path, driver_crash(2), workers=2, config=config, average=average)
    np.testing.assert_allclose(_losses(run.resumed), _losses(run.whole), rtol=0, atol=1e-6)


def test_nesterov_moves_parameters_and_averages_batchnorm_statistics(spark: Any, tmp_path: Path) -> None:
    # BatchNorm right on the inputs: its running statistics depend on the data only, never on the
    # weights, so every outer step must end with the plain average's. Extrapolating them as Nesterov
    # does parameters drove the running variance of these small inputs negative (NaN scores).
    rng = np.random.default_rng(0)
    labels = np.arange(60) % 3
    x = rng.normal(size=(60, 4)) * 0.05
    x[np.arange(60), labels] += 0.1
    df = spark.createDataFrame(
        [(row.tolist(), int(label)) for row, label in zip(x, labels, strict=True)], "x array<float>, y int"
    )
    spec = {
        "input_shape": [1, 1, 4],
        "layers": [{"type": "flatten"}, {"type": "batchnorm"}, {"type": "linear", "out_features": 3}],
    }
    stats = {}
    for outer in ("plain", "nesterov"):
        result = fit(
            df,
            spec,
            workers=2,
            feature_column="x",
            label_column="y",
            input_shape=(1, 1, 4),
            num_classes=3,
            config={**SGD, "batch_size": 2, "epochs": 10, "seed": 0},
            average={"tau": 50, "outer": outer},
            run_dir=tmp_path / outer,
        )
        assert len(result.history) == 3  # 150 steps: rounds of 50
        weights = load_checkpoint(result.model_dir).model.state_dict()
        stats[outer] = {k: v for k, v in weights.items() if "running" in k}
    assert set(stats["plain"]) == {"layers.1.running_mean", "layers.1.running_var"}
    assert bool((stats["nesterov"]["layers.1.running_var"] > 0).all())
    for name, value in stats["plain"].items():
        torch.testing.assert_close(stats["nesterov"][name], value, rtol=0, atol=1e-7)


@pytest.mark.timeout(120)
def test_a_round_that_cannot_be_averaged_stops_the_run(
    spark: Any, toy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from deepspark.training.average import RoundServer

    def broken(self: Any, pushes: Any, samples: int) -> Any:
        raise RuntimeError("pushes that do not average")  # e.g. a push whose tensors have other shapes

    monkeypatch.setattr(RoundServer, "_average", broken)
    with pytest.raises(RunError, match="pushes that do not average"):
        fit(str(toy), "mlp", workers=2, config={**SGD, "epochs": 1}, run_dir=tmp_path / "run")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("strategy", ["average", "async"])
def test_a_driver_loop_that_dies_fails_the_run_instead_of_hanging_it(
    spark: Any, toy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, strategy: str
) -> None:
    # The thread that submits the workers' Spark jobs ended by an error (a callback raising, a stopped
    # SparkContext): nothing told the round server, and the driver waited for rounds forever.
    def dies(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the SparkContext was stopped")

    monkeypatch.setattr("deepspark.training._fit.run_slots", dies)
    run = tmp_path / "run"
    with pytest.raises(RunError, match="the SparkContext was stopped"):
        fit(str(toy), "mlp", strategy=strategy, workers=2, config={**SGD, "epochs": 1}, run_dir=run)


@pytest.mark.timeout(300)
def test_workers_lost_now_and_then_over_a_long_run_do_not_stop_it(
    spark: Any, toy: Path, tmp_path: Path
) -> None:
    # Every worker's task is lost four times, each time after its replacement had trained: the count
    # of a worker's failures in a row never started again, and its fourth loss of the run stopped it
    # ("training worker 0 failed 4 times"), however long the replacements had trained. `average`'s
    # rounds, each pushed by both workers, pace the kills; `async`'s rows do not (its server's count of
    # a worker's pushes taken, the same progress, is tested in test_async.py).
    tracker = spark.sparkContext.statusTracker()
    killed: list[set[int]] = []
    running: list[set[int]] = [set()]  # the workers' jobs, as the last round saw them

    def kill(row: dict[str, Any]) -> None:
        jobs, before = set(tracker.getActiveJobsIds()), running[0]
        running[0] = jobs
        # Both workers run new jobs since before the previous round, and both pushed into this one: each
        # replacement has trained (a lost task's connection is superseded before its job is resubmitted).
        fresh = len(jobs) == 2 and jobs == before and not jobs & set().union(*killed)
        if len(killed) < 4 and fresh and row["workers"] == 2:
            killed.append(jobs)
            spark.sparkContext.cancelAllJobs()  # both tasks die; their jobs are resubmitted

    result = fit(
        str(toy),
        "mlp",
        strategy="average",
        workers=2,
        config={**SGD, "batch_size": 4, "epochs": 8},
        average={"tau": 1},
        run_dir=tmp_path / "run",
        on_round=kill,
    )
    assert len(killed) == 4
    assert [int(r["round"]) for r in result.history] == list(range(len(result.history)))
    assert result.history[-1]["epoch"] >= 7  # to the end (a lost worker's share of its round is lost)


def test_dataframe_with_an_empty_partition(spark: Any, tmp_path: Path) -> None:
    from pyspark.sql import functions as F

    df = spark.createDataFrame(
        [([0.0, 1.0, 0.0, 1.0], 0), ([1.0, 0.0, 1.0, 0.0], 1)], "x array<float>, y int"
    )
    df = df.coalesce(1).withColumn("y", F.col("y"))
    result = fit(
        df,
        {"input_shape": [1, 2, 2], "layers": [{"type": "flatten"}, {"type": "linear", "out_features": 2}]},
        workers=2,
        feature_column="x",
        label_column="y",
        input_shape=(1, 2, 2),
        config={**SGD, "batch_size": 4, "epochs": 3},
        average={"tau": 1},
        run_dir=tmp_path / "run",
    )
    rows = _history(result.run_dir)
    assert sum(int(r["samples"]) for r in rows) == 3 * 2
    assert result.test_accuracy is None


@pytest.mark.parametrize(
    ("feature", "label"), [("pixels.v1", "the `digit`"), ("_deepspark_key", "y"), ("x", "_deepspark_key")]
)
def test_column_names_are_taken_literally(spark: Any, tmp_path: Path, feature: str, label: str) -> None:
    # Spark reads "pixels.v1" as the field v1 of a struct pixels (here a decoy of 5 values), a backtick as
    # quoting, and _deepspark_key is the name of deepspark's own row key.
    from pyspark.sql import functions as F

    rows = [([float(i % 2)] * 4, i % 2) for i in range(8)]
    df = spark.createDataFrame(rows, "x array<float>, y int").select(
        F.col("x").alias(feature),
        F.col("y").alias(label),
        F.struct(F.array(*[F.lit(9.0)] * 5).alias("v1")).alias("pixels"),
    )
    result = fit(
        df,
        "mlp",
        workers=2,
        feature_column=feature,
        label_column=label,
        input_shape=(1, 2, 2),
        test_data=df,
        config={**SGD, "batch_size": 8, "epochs": 1},  # one step on each whole partition: every row once
        run_dir=tmp_path / "run",
    )
    assert sum(int(r["samples"]) for r in _history(result.run_dir)) == 8
    assert result.test_accuracy is not None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"strategy": "gossip"}, "strategy: expected one of"),
        ({"workers": 0}, "workers: expected an integer >= 1, got 0"),
        ({"average": {"tau": 0}}, "tau: expected an integer >= 1, got 0"),
        ({"average": {"outer": "adam"}}, "outer: expected one of"),
        ({"strategy": "local", "workers": 2}, "strategy 'local' runs in one process"),
        # all-reduce has no rounds and no outer step: these were saved in config.json and ignored
        ({"strategy": "allreduce", "average": {"tau": 5}}, r"average: \['tau'\] .*strategy 'allreduce'"),
        ({"strategy": "allreduce", "average": {"outer": "nesterov"}}, r"average: \['outer'\] .*'allreduce'"),
        # the Nesterov step's knobs without it: saved in config.json and ignored
        (
            {"average": {"outer_momentum": 0.9}},
            r"average: \['outer_momentum'\] set the Nesterov outer step, but outer is 'plain'",
        ),
        (
            {"strategy": "async", "average": {"outer_learning_rate": 0.5}},
            r"average: \['outer_learning_rate'\] .*strategy 'async' takes no outer step",
        ),
        ({"config": {"optimizer": "lbfgs"}}, "optimizer: expected one of"),
    ],
)
def test_bad_arguments_fail_before_any_job(
    kwargs: dict[str, Any], message: str, toy: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=message):
        fit(str(toy), "mlp", **{"workers": 2, **kwargs}, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_more_workers_than_slots_names_the_numbers(spark: Any, toy: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"2 task slot\(s\).*expected at most 2, got 3"):
        fit(str(toy), "mlp", workers=3, run_dir=tmp_path / "run")


def test_threads_per_worker_above_the_sessions_task_cpus_count_against_the_slots(
    spark: Any, toy: Path, tmp_path: Path
) -> None:
    # The live session keeps its spark.task.cpus (1) on its 2 cores; each worker runs 2 threads, so two
    # workers would share the cores, twice over.
    with pytest.raises(
        ConfigError,
        match=r"1 task slot\(s\) \(2 cores / 2 thread\(s\) per worker; threads_per_worker 2 is above the "
        r"session's spark.task.cpus 1\).*expected at most 1, got 2",
    ):
        fit(str(toy), "mlp", workers=2, threads_per_worker=2, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_threads_per_worker_above_an_executor_s_cores_are_refused(
    spark: Any, toy: Path, tmp_path: Path
) -> None:
    # 3 threads on local[2]: 2 // 3 = 0 slots, floored to 1, so one worker passed and trained with 3
    # threads on 2 cores (tune refuses its threads_per_trial the same way).
    with pytest.raises(
        ConfigError,
        match=r"threads_per_worker: expected at most 2 \(the cores of one executor of local\[2\]\), got 3",
    ):
        fit(str(toy), "mlp", strategy="average", threads_per_worker=3, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_threads_per_worker_above_the_cores_are_refused_before_the_jvm_starts(
    toy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fresh driver: the session fit would start asks for spark.task.cpus 3 on local[2], which Spark's
    # constructor refuses in a message naming spark.task.cpus, not the threads the user gave.
    def no_session(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a session was started before the threads were checked")

    monkeypatch.setattr("deepspark.spark.running_session", lambda: None)
    monkeypatch.setattr("deepspark.spark.session", no_session)
    with pytest.raises(
        ConfigError,
        match=r"threads_per_worker: expected at most 2 \(the cores of one executor of local\[2\]\), got 3",
    ):
        fit(
            str(toy),
            "mlp",
            strategy="average",
            threads_per_worker=3,
            master="local[2]",
            run_dir=tmp_path / "run",
        )
    assert not (tmp_path / "run").exists()


def test_dataframe_columns_are_checked(spark: Any, tmp_path: Path) -> None:
    def refused(df: Any, match: str, run: str, **kwargs: Any) -> None:
        with pytest.raises(ConfigError, match=match):
            fit(
                df,
                "mlp",
                workers=2,
                feature_column="x",
                label_column="y",
                input_shape=(1, 2, 2),
                run_dir=tmp_path / run,
                **kwargs,
            )

    doubles = spark.createDataFrame([([0.0] * 4, 0.0), ([1.0] * 4, 1.0)], "x array<float>, y double")
    refused(doubles, "label_column 'y': expected an integral type", "a")
    short = spark.createDataFrame([([0.0] * 3, 0), ([1.0] * 3, 1)], "x array<float>, y int")
    refused(short, r"holds 3 values but the model's input \[1, 2, 2\] needs 4", "b")
    nulls = spark.createDataFrame([([0.0] * 4, 0), (None, 1), ([1.0] * 4, 1)], "x array<float>, y int")
    refused(nulls, r"feature_column 'x': 1 null value\(s\)", "c")
    nans = spark.createDataFrame(
        [([0.0] * 4, 0), ([float("nan"), 1.0, 1.0, 1.0], 1), ([1.0, None, 1.0, 1.0], 1)],
        "x array<float>, y int",
    )
    refused(nans, r"feature_column 'x': 2 row\(s\) hold NaN, infinite or null numbers", "e")
    huge = spark.createDataFrame([([0.0] * 4, 0), ([1e39, 1.0, 1.0, 1.0], 1)], "x array<double>, y int")
    refused(huge, r"1 row\(s\) hold .* beyond float32's \+-3.403e\+38, which train as infinite", "i")
    # Labels are class indices: 10**6 beside 0 made a million-way output layer without a word.
    sparse = spark.createDataFrame([([0.0] * 4, 0), ([1.0] * 4, 10**6)], "x array<float>, y bigint")
    refused(sparse, r"label_column 'y': labels are class indices 0..C-1 and the largest is 1000000", "j")
    arrays = spark.createDataFrame([([0.0] * 4, 0), ([1.0] * 4, 1)], "x array<float>, y int")
    pixels = spark.createDataFrame([(bytearray(4), 0), (bytearray([255] * 4), 1)], "x binary, y int")
    refused(
        arrays,
        "test_data: its feature column holds raw pixel bytes but the training data's holds arrays",
        "d",
        test_data=pixels,
    )
    # The test set's columns have the training data's names: its errors say it is the test set's.
    refused(
        arrays,
        r"^test_data: label_column 'y': 1 null label\(s\)",
        "f",
        test_data=arrays.union(spark.createDataFrame([([0.0] * 4, None)], "x array<float>, y int")),
    )
    refused(arrays, r"^test_data: the DataFrame has no rows", "g", test_data=arrays.limit(0))
    refused(
        arrays,
        r"^test_data: label_column: expected a column",
        "h",
        test_data=arrays.withColumnRenamed("y", "z"),
    )
    assert not any((tmp_path / name).exists() for name in "abcdefghi")


@pytest.mark.slow
def test_the_data_jobs_run_in_groups_of_their_own_and_leave_the_callers_alone(
    spark: Any, tmp_path: Path
) -> None:
    # A Spark job run in the caller's thread is uncancellable by Ctrl-C (pyspark's handler breaks the
    # thread's connection, which loses its job group and local properties): the DataFrame's checks and
    # count, the workers' shuffle (adaptive execution runs it as the plan becomes an RDD) and the test
    # rows' collect run in groups of their own (run_job), as the workers' jobs do.
    sc = spark.sparkContext
    sc.setJobGroup("the-callers-group", "the caller's jobs")
    try:
        df = spark.createDataFrame(
            [(bytes([i, 0, 255, i]), i % 2) for i in range(8)], "x binary, y int"
        ).repartition(3)
        fit(
            df,
            {
                "input_shape": [1, 2, 2],
                "layers": [{"type": "flatten"}, {"type": "linear", "out_features": 2}],
            },
            workers=2,
            feature_column="x",
            label_column="y",
            input_shape=(1, 2, 2),
            test_data=df,
            config={**SGD, "batch_size": 4, "epochs": 1},
            run_dir=tmp_path / "run",
        )
        assert sc.statusTracker().getJobIdsForGroup("the-callers-group") == []
        assert sc.getLocalProperty("spark.jobGroup.id") == "the-callers-group"
    finally:
        for key in ("spark.jobGroup.id", "spark.job.description", "spark.job.interruptOnCancel"):
            sc.setLocalProperty(key, None)


def test_integer_arrays_holding_their_type_s_smallest_value_are_counted(spark: Any) -> None:
    # The check for numbers beyond float32's range took each value's abs(): under ANSI mode (Spark 4's
    # default) that of a tinyint's -128, or of the smallest int or long, overflows, and the counting job
    # failed with Spark's ArithmeticException on data that trains as it is.
    from deepspark.training.frame import describe_frame

    for kind, smallest in (
        ("tinyint", -128),
        ("smallint", -(2**15)),
        ("int", -(2**31)),
        ("bigint", -(2**63)),
    ):
        df = spark.createDataFrame([([smallest, 0, 1, 2], 0), ([3, 4, 5, 6], 1)], f"x array<{kind}>, y int")
        layout = describe_frame(
            df, feature_column="x", label_column="y", input_shape=(1, 2, 2), num_classes=None
        )
        assert (layout.kind, layout.rows, layout.num_classes) == ("array", 2, 2)


@pytest.mark.parametrize(
    ("on_dataframe", "kwargs", "message"),
    [
        (True, {"limit_train": 5}, "limit_train: it selects from a dataset name or directory"),
        (True, {"limit_test": 5}, "limit_test: it selects from a dataset name or directory"),
        (False, {"num_classes": 10}, "num_classes: a dataset name or directory brings its own"),
        (False, {"input_shape": (1, 4, 16)}, "input_shape: a dataset name or directory brings its own"),
    ],
)
def test_arguments_the_data_would_ignore_are_refused(
    spark: Any, toy: Path, tmp_path: Path, on_dataframe: bool, kwargs: dict[str, Any], message: str
) -> None:
    df = spark.createDataFrame([([0.0] * 4, 0), ([1.0] * 4, 1)], "x array<float>, y int")
    data: Any = df if on_dataframe else str(toy)
    columns = {"feature_column": "x", "label_column": "y"} if on_dataframe else {}
    with pytest.raises(ConfigError, match=message):
        fit(data, "mlp", workers=2, **columns, run_dir=tmp_path / "run", **kwargs)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_classes": 0}, r"num_classes: expected an integer >= 2, got 0"),
        ({"num_classes": 1}, r"num_classes: expected an integer >= 2, got 1"),
        ({"num_classes": 3.5}, r"num_classes: expected an integer >= 2, got 3.5"),
        ({"num_classes": "3"}, r"num_classes: expected an integer >= 2, got '3'"),
        ({"input_shape": (1, 2.5, 2)}, r"input_shape: expected \(C, H, W\) .*got \(1, 2.5, 2\)"),
        ({"input_shape": "122"}, r"input_shape: expected \(C, H, W\) .*got '122'"),
        ({"input_shape": 4}, r"input_shape: expected \(C, H, W\) .*got 4"),
        # (H, W, C) was read as H channels of W x C pixels.
        ({"input_shape": (2, 2, 3)}, r"input_shape: images of shape \[2, 2, 3\] look channels-last"),
    ],
)
def test_a_dataframe_s_class_count_and_input_shape_are_checked(
    spark: Any, tmp_path: Path, kwargs: dict[str, Any], message: str
) -> None:
    # A float input size was truncated (2.5 trained as 2) and a float or string class count raised a
    # TypeError from deep inside the row count.
    df = spark.createDataFrame([([0.0] * 4, 0), ([1.0] * 4, 1)], "x array<float>, y int")
    arguments = {"input_shape": (1, 2, 2), **kwargs}
    with pytest.raises(ConfigError, match=message):
        fit(df, "mlp", workers=2, feature_column="x", label_column="y", run_dir=tmp_path / "run", **arguments)
    assert not (tmp_path / "run").exists()


def test_local_run_without_test_examples_records_no_accuracy(toy: Path, tmp_path: Path) -> None:
    result = fit(
        str(toy), "mlp", strategy="local", config={"epochs": 1}, limit_test=0, run_dir=tmp_path / "run"
    )
    assert result.test_accuracy is None
    assert [r["test_accuracy"] for r in _history(result.run_dir)] == [""]
    assert "test_accuracy" not in load_checkpoint(result.model_dir).metadata.get("metrics", {})


def test_async_given_default_average_settings_pushes_after_every_step(
    spark: Any, toy: Path, tmp_path: Path
) -> None:
    # AverageSettings() under async made the workers push every 50 steps (average's default), not 1.
    options: dict[str, Any] = {
        "strategy": "async",
        "workers": 2,
        "config": {**SGD, "batch_size": 8, "epochs": 1},
    }
    result = fit(str(toy), "mlp", average=AverageSettings(), run_dir=tmp_path / "run", **options)
    assert json.loads((result.run_dir / "config.json").read_text())["average"]["tau"] == 1


def test_staleness_is_refused_off_the_async_strategy(toy: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="staleness: bounds the async strategy's parameter server"):
        fit(str(toy), "mlp", workers=2, staleness=4, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_resuming_a_directory_that_is_not_a_training_run_says_so(toy: Path, tmp_path: Path) -> None:
    study = tmp_path / "study"  # a tune run directory: its config.json holds a study's keys
    (study / "checkpoint").mkdir(parents=True)
    (study / "config.json").write_text('{"format": 2, "data": "x", "trials": 4, "objective": "builtin"}')
    with pytest.raises(ConfigError, match=r"is not a deepspark training run \(config.json has no strategy"):
        fit(str(toy), run_dir=study, resume=True)


def test_existing_run_dir_is_refused(toy: Path, tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "x").write_text("")
    with pytest.raises(ConfigError, match=r"already exists; pass resume=True \(--resume "):
        fit(str(toy), "mlp", workers=2, run_dir=tmp_path / "run")


def test_cli_output_that_cannot_be_written_fails_before_training(
    toy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from deepspark.cli import main

    code = main(
        [
            "train",
            str(toy),
            "--model",
            "mlp",
            "--output",
            "/proc/deepspark-model",
            "--run-dir",
            str(tmp_path / "run"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("deepspark: error: output: cannot create /proc/deepspark-model")
    assert not (tmp_path / "run").exists()


def test_cli_output_is_the_whole_model_or_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # --output was a shutil.copytree after training: a copy stopped midway (here a file that cannot be
    # read; a Ctrl-C) left a folder with part of the model, a traceback, and a rerun refused it as existing.
    import deepspark.training
    from deepspark.cli import main
    from deepspark.training import FitResult

    model = tmp_path / "run" / "model"
    model.mkdir(parents=True)
    (model / "metadata.json").write_text("{}")
    (model / "model.safetensors").symlink_to(tmp_path / "gone")  # fails to read, after metadata.json
    result = FitResult(run_dir=tmp_path / "run", model_dir=model, history=(), test_accuracy=None, wall_s=1.0)
    monkeypatch.setattr(deepspark.training, "fit", lambda **kwargs: result)
    code = main(["train", "--run-dir", str(tmp_path / "run2"), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.splitlines()
    assert (
        code == 1
        and len(err) == 1
        and err[0].startswith("deepspark: error: output: could not copy the model")
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no output, whole or in part


def test_a_path_object_is_its_directory_even_when_named_like_a_registered_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Path("./mnist") prints as "mnist", the registered dataset's name: the user's folder must be read.
    _layout_dir(tmp_path / "mnist", train=40, test=30)
    monkeypatch.chdir(tmp_path)
    result = fit(
        Path("./mnist"),
        "mlp",
        strategy="local",
        config={**SGD, "batch_size": 8, "epochs": 1},
        limit_train=20,
        run_dir=tmp_path / "run",
    )
    assert json.loads((result.run_dir / "config.json").read_text())["data"] == str(tmp_path / "mnist")
    checkpoint = load_checkpoint(result.model_dir)
    assert checkpoint.preprocess.input_shape == (1, 8, 8) and len(checkpoint.class_names) == 3


def test_a_config_the_disk_refuses_leaves_the_run_directory_empty_for_the_rerun(
    toy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A full disk when the run's config.json was written (into an empty directory the user made): its
    # temp file stayed, and the rerun once space was freed was refused, "already exists".
    import errno
    import os

    run_dir = tmp_path / "made"
    run_dir.mkdir()

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    config = {"batch_size": 8, "epochs": 1, "seed": 3, "threads": 1}
    with monkeypatch.context() as patched:
        patched.setattr(os, "fsync", full)
        with pytest.raises(OSError, match="No space left on device") as raised:
            fit(str(toy), "mlp", strategy="local", config=config, run_dir=run_dir)
    assert raised.value.filename == str(run_dir / "config.json")
    assert list(run_dir.iterdir()) == []
    assert fit(str(toy), "mlp", strategy="local", config=config, run_dir=run_dir).history


def test_a_run_directory_name_too_long_is_refused_before_any_work(toy: Path, tmp_path: Path) -> None:
    # A 256-byte component: Path.exists raised OSError (ENAMETOOLONG), a traceback instead of the one line.
    with pytest.raises(ConfigError, match=r"^run_dir: cannot use .*File name too long"):
        fit(str(toy), "mlp", strategy="local", run_dir=tmp_path / ("a" * 256) / "run")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_is_refused_before_any_work_and_leaves_nothing(toy: Path, tmp_path: Path) -> None:
    # The probe was an empty file, which a full disk still takes: the run went on to fail at its first
    # checkpoint. RLIMIT_FSIZE 0 refuses any byte, as a full disk does.
    import resource
    import signal

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, hard))
    try:
        with pytest.raises(ConfigError, match=r"^run_dir: cannot write .*/new/run \(File too large\)"):
            fit(str(toy), "mlp", strategy="local", run_dir=tmp_path / "new" / "run")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert list(tmp_path.iterdir()) == []  # nor the folders made for it
