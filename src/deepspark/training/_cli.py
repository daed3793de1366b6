"""The ``deepspark train`` sub-command: parses arguments, calls :func:`deepspark.training.fit`, prints.

No logic of its own beyond turning flags into ``fit``'s arguments and showing progress.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_train_parser"]


def add_train_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``train`` on the ``deepspark`` command's sub-parsers."""
    from deepspark.training._fit import STRATEGIES
    from deepspark.training.average import OUTER

    p = subparsers.add_parser(
        "train",
        help="train a model: in one process, or data-parallel on Spark (--strategy average|allreduce|async)",
        description="Train a zoo model or spec on a dataset. --strategy local (the default for one worker) "
        "trains in this process; average runs SparkNet-style model averaging over --workers Spark tasks, async a "
        "parameter server on the driver with a staleness bound. "
        "The run directory holds config.json, history.csv, curve.png, checkpoint/ and model/ (a checkpoint "
        "that `deepspark predict` takes).",
    )
    p.add_argument(
        "dataset",
        nargs="?",
        default=None,
        help="dataset name (mnist) or MNIST-layout directory (default: --data-dir if given, else mnist)",
    )
    p.add_argument(
        "--model",
        default=None,
        help="zoo model (mlp, lenet, cnn; default cnn for local, else lenet) or a spec JSON/YAML file",
    )
    p.add_argument(
        "--strategy",
        default=None,
        choices=list(STRATEGIES),
        help="default local for one worker, average for several",
    )
    p.add_argument("--workers", type=int, default=None, help="Spark tasks training at once (default 1)")
    p.add_argument(
        "--tau",
        type=int,
        default=None,
        help=(
            "average: local steps per round (default 50; the last round also takes a remainder below it); "
            "async: steps between pushes (default 1)"
        ),
    )
    p.add_argument("--round-seconds", type=float, default=None, help="average: rounds of S seconds instead")
    p.add_argument("--outer", default=None, choices=list(OUTER), help="average: outer step (default plain)")
    p.add_argument("--outer-lr", type=float, default=None, help="average: Nesterov outer learning rate (0.7)")
    p.add_argument(
        "--outer-momentum", type=float, default=None, help="average: Nesterov outer momentum (0.5)"
    )
    p.add_argument(
        "--staleness", type=int, default=None, help="async: most pushes a worker may run ahead (default 2)"
    )
    p.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="average, async: a worker silent this long (frozen) is lost and its Spark job re-run; "
        "allreduce: the gang is restarted from its last round (default 60, at least 1)",
    )
    p.add_argument(
        "--worker-memory",
        default=None,
        metavar="SIZE",
        help="average, async, allreduce: rows a worker keeps in memory (e.g. 4g); a larger partition is "
        "kept in a file in Spark's local directory (default: half of spark.executor.pyspark.memory, else "
        "a quarter of the host's available memory)",
    )
    p.add_argument(
        "--device",
        default=None,
        choices=["auto", "cpu", "cuda"],
        help="auto: the GPU Spark assigned each task (spark.task.resource.gpu.amount) when CUDA can use it, "
        "else CPU; cuda: an unusable GPU is an error",
    )
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="learning rate")
    p.add_argument("--batch-size", type=int, default=None, help="per worker")
    p.add_argument("--optimizer", default=None, choices=["sgd", "momentum", "adam"])
    p.add_argument("--schedule", default=None, choices=["constant", "cosine"], help="learning-rate schedule")
    p.add_argument(
        "--threads", type=int, default=None, help="threads per worker (spark.task.cpus; default 1)"
    )
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--limit-train", type=int, default=None, help="use only the first N training images")
    p.add_argument("--limit-test", type=int, default=None, help="use only the first N test images")
    p.add_argument(
        "--data-dir",
        default=None,
        help="a dataset directory; alone it is the dataset, with a name it must hold that dataset's verified files",
    )
    p.add_argument("--master", default=None, help="Spark master URL (default: active session or local[*])")
    p.add_argument(
        "--run-dir",
        default=None,
        help="where the run lives (default runs/<dataset>-<model>-<time>, then -2, -3, ... within one second)",
    )
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the run in RUN_DIR")
    p.add_argument("--output", default=None, help="also save the final model checkpoint to this new path")
    p.set_defaults(func=_cmd_train)
    return p


def _cmd_train(args: argparse.Namespace) -> int:
    from rich.console import Console

    from deepspark.errors import ConfigError
    from deepspark.training import fit

    if args.mlflow is not None:
        from deepspark.reporting import check_tracking_uri  # the report layer sits above training: CLI only

        check_tracking_uri(args.mlflow)  # the extra and the URI, before any Spark job
    output = Path(args.output) if args.output else None
    if output is not None:  # checked before any work, so a finished model is never lost to a bad path
        if output.exists():
            raise ConfigError(f"output: {output} already exists; choose a new checkpoint path")
        try:  # create and remove it: permission bits alone do not tell (root, /proc, read-only mounts)
            output.mkdir()
            try:
                (output / ".probe").write_bytes(b"\0")  # a byte: a full disk still takes an empty file
            finally:
                shutil.rmtree(output, ignore_errors=True)
        except OSError as exc:
            raise ConfigError(
                f"output: cannot create {output} ({exc.strerror}); choose a path in a writable directory"
            ) from None
    config = {
        k: v
        for k, v in {
            "epochs": args.epochs,
            "learning_rate": args.lr,
            "batch_size": args.batch_size,
            "optimizer": args.optimizer,
            "lr_schedule": args.schedule,
            "seed": args.seed,
        }.items()
        if v is not None
    }
    average = {
        k: v
        for k, v in {
            "tau": args.tau,
            "round_seconds": args.round_seconds,
            "outer": args.outer,
            "outer_learning_rate": args.outer_lr,
            "outer_momentum": args.outer_momentum,
        }.items()
        if v is not None
    }
    console = Console(stderr=True)
    if args.resume:
        conflicting = [
            flag
            for flag, value in (
                ("dataset", args.dataset),
                ("--model", args.model),
                ("--strategy", args.strategy),
                ("--workers", args.workers),
                ("--threads", args.threads),
                ("--staleness", args.staleness),
                ("--device", args.device),
                ("--data-dir", args.data_dir),
                ("--limit-train", args.limit_train),
                ("--limit-test", args.limit_test),
                ("--run-dir", args.run_dir),  # the run is RUN_DIR: another would be ignored
                *((f"--{k}", v) for k, v in {**config, **average}.items()),
            )
            if value is not None
        ]
        if conflicting:
            raise ConfigError(
                f"resume: the run's settings are saved in {args.resume}/config.json; drop {conflicting}"
            )
        options: dict[str, Any] = {"data": _saved_data(args.resume), "run_dir": args.resume, "resume": True}
    else:
        # A --data-dir without a dataset name IS the dataset: that directory, never MNIST instead (as a
        # path, so that `--data-dir mnist` reads ./mnist and not the registered dataset of that name).
        dataset = args.dataset or (
            str(Path(args.data_dir).expanduser().absolute()) if args.data_dir else "mnist"
        )
        data_dir = args.data_dir if args.dataset else None
        # 0 is a value, not "unset": fit refuses it (`or 1` would train one worker, one thread instead).
        workers = args.workers if args.workers is not None else 1
        threads = args.threads if args.threads is not None else 1
        model = args.model or ("cnn" if workers == 1 and args.strategy in (None, "local") else "lenet")
        options = {
            "data": dataset,
            "model": model,
            "strategy": args.strategy,
            "workers": workers,
            "config": config,
            "average": average,
            "run_dir": args.run_dir or _default_run_dir(f"runs/{Path(dataset).name}-{Path(model).stem}"),
            "threads_per_worker": threads,
        }
        if args.staleness is not None:
            options["staleness"] = args.staleness
        if args.device is not None:
            options["device"] = args.device
    if args.heartbeat_timeout is not None:  # not saved with the run: a resume may change it
        options["heartbeat_timeout"] = args.heartbeat_timeout
    if args.worker_memory is not None:  # not saved either: it changes where rows are kept, not training
        options["worker_memory"] = args.worker_memory
    progress = _Progress(console)
    try:
        result = fit(
            **options,
            data_dir=None if args.resume else data_dir,
            limit_train=args.limit_train,
            limit_test=args.limit_test,
            master=args.master,
            on_round=progress.update,
        )
    finally:
        progress.stop()
    if output is not None:
        _copy_model(result.model_dir, output)
    split = result.time_split
    wall = max(split.get("wall_s", result.wall_s), 1e-9)
    accuracy = f"{result.test_accuracy:.4f}" if result.test_accuracy is not None else "n/a"
    as_json = getattr(args, "json", False)  # --json: stdout holds the JSON object alone
    out = sys.stderr if as_json else sys.stdout
    print(f"test accuracy: {accuracy}  wall: {result.wall_s:.1f} s  run: {result.run_dir}", file=out)
    if split:
        parts = ", ".join(
            f"{name} {split[key]:.1f} s ({100 * split[key] / wall:.0f}%)"
            for name, key in (
                ("compute", "compute_s"),
                ("communication", "communication_s"),
                ("waiting", "waiting_s"),
                ("Spark scheduling and start-up", "scheduling_s"),
            )
            if key in split
        )
        print(f"time: {parts}", file=out)
    if result.bytes_per_epoch:
        print(f"communicated: {result.bytes_per_epoch / 1e6:.1f} MB per epoch", file=out)
    if result.devices:
        print(
            "devices: " + ", ".join(f"worker {k}: {v}" for k, v in sorted(result.devices.items())), file=out
        )
    print(f"model: {result.model_dir}" + (f" (and {output})" if output else ""), file=out)
    from deepspark.reporting import write_run_report  # the report layer sits above training: CLI only

    written = write_run_report(result.run_dir)
    if written is not None:
        print(f"report: {written}", file=out)
    if args.mlflow is not None:
        from deepspark.reporting import log_to_mlflow

        print(f"mlflow: {log_to_mlflow(result.run_dir, tracking_uri=args.mlflow)}", file=out)
    if as_json:
        summary = {
            "run_dir": str(result.run_dir),
            "model_dir": str(result.model_dir),
            "output": str(output) if output else None,
            "test_accuracy": result.test_accuracy,
            "wall_s": result.wall_s,
            "time_split": dict(split),
            "bytes_per_epoch": result.bytes_per_epoch,
            "devices": {str(k): v for k, v in result.devices.items()},
            "report": str(written) if written is not None else None,
            "epochs": float(result.history[-1]["epoch"]) if result.history else 0.0,
        }
        print(json.dumps(summary, sort_keys=True, default=str), flush=True)
    return 0


def _copy_model(model_dir: Path, output: Path) -> None:
    """``--output``: the final model's folder, copied whole or not at all. A copy stopped midway (Ctrl-C,
    a failed read or write) left a folder holding some of the files, which a rerun refused as existing."""
    from deepspark import rundir
    from deepspark.errors import RunError

    if output.exists():  # made since it was checked, before training: someone else's, never replaced
        raise RunError(f"output: {output} was made while the run trained; the model is in {model_dir}")
    try:
        rundir.write_dir_atomic(
            output, {path.name: path.read_bytes() for path in sorted(model_dir.iterdir())}
        )
    except OSError as exc:
        raise RunError(
            f"output: could not copy the model to {output} ({exc.strerror or exc}); it is in {model_dir}"
        ) from None


def _saved_data(run_dir: str) -> str:
    from deepspark.errors import ConfigError
    from deepspark.training._fit import _read_config

    saved = _read_config(Path(run_dir))  # a training run's config.json, else the error says so
    data = saved.get("data")
    if not isinstance(data, str) or data == "DataFrame":
        raise ConfigError(
            f"resume: the run in {run_dir} trained on a DataFrame; resume it from Python with "
            "deepspark.fit(the_same_dataframe, run_dir=..., resume=True)"
        )
    return data


class _Progress:
    """A rich progress bar over epochs with the latest round's loss, accuracy, images/s and bytes."""

    def __init__(self, console: Any) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("epoch {task.completed:.2f}"),
            BarColumn(bar_width=20),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self._task: Any = None
        self._accuracy = ""

    def update(self, row: dict[str, Any]) -> None:
        if self._task is None:
            self._progress.start()
            self._task = self._progress.add_task("train", total=None, info="")
        if row.get("test_accuracy") not in ("", None):
            self._accuracy = f" acc {float(row['test_accuracy']):.4f}"
        seconds = float(row.get("seconds") or 0) or 1e-9
        info = (
            f"round {row['round']} loss {float(row['train_loss']):.4f}{self._accuracy} "
            f"{float(row['samples']) / seconds:.0f} img/s {float(row['bytes']) / 1e6:.1f} MB"
        )
        self._progress.update(self._task, completed=float(row["epoch"]), info=info)

    def stop(self) -> None:
        if self._task is not None:
            self._progress.stop()


def _default_run_dir(prefix: str) -> str:
    """``PREFIX-YYYYmmdd-HHMMSS``, with ``-2``, ``-3``, ... when a run started in the same second has it
    (the second run was refused: its directory was taken)."""
    name = base = f"{prefix}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    for n in itertools.count(2):
        if not os.path.lexists(name):
            return name
        name = f"{base}-{n}"
    raise AssertionError("unreachable")
