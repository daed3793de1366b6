"""The ``deepspark predict`` sub-command: parses arguments, calls :func:`deepspark.inference.predict`,
prints the summary. No logic of its own."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict
from typing import Any

__all__ = ["add_predict_parser"]

_log = logging.getLogger("deepspark.predict")

_INPUT_HELP = (
    "what to predict: a glob of image files ('images/**/*.png'; ** recurses), a directory of images, "
    "a Parquet table (file or directory) with an image/tensor/URL column, a directory of MNIST-layout "
    "IDX files, a .txt file of http(s) URLs (one per line) or a .csv file with a 'url' column"
)


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _shape(text: str) -> tuple[int, int, int]:
    try:
        c, h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected C,H,W (e.g. 1,28,28), got {text!r}") from None
    return c, h, w


def add_predict_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``predict`` on the ``deepspark`` command's sub-parsers."""
    p = subparsers.add_parser(
        "predict",
        help="apply a trained model to images, URLs or tensors with Spark; write predictions as Parquet",
        description="Batch inference on Spark: every input row appears once in the output, with label, "
        "probability, top_k and an error column (a bad image or URL fills the error; the job goes on).",
    )
    p.add_argument(
        "--model", required=True, help="checkpoint directory, TorchScript (.pt), .pt2 or .onnx file"
    )
    p.add_argument("--input", required=True, help=_INPUT_HELP)
    p.add_argument("--output", required=True, help="Parquet directory to write the predictions to")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p.add_argument("--top-k", type=int, default=5, help="classes listed per row (default: 5)")
    p.add_argument("--labels", default=None, help="text file with one class name per line")
    p.add_argument("--batch-size", type=int, default=256, help="rows per forward pass (default: 256)")
    p.add_argument("--backend", choices=["auto", "torch", "onnx"], default="auto", help="default: auto")
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="auto: the GPU Spark assigned each task when usable, else the CPU; cuda: insist (default: auto)",
    )
    p.add_argument("--master", default=None, help="Spark master (default: spark.master, else local[*])")
    p.add_argument("--input-column", default=None, help="the image/tensor/URL column of a Parquet/CSV input")
    p.add_argument("--decode-threads", type=int, default=2, help="decode threads per task (default: 2)")
    g = p.add_argument_group("preprocessing, for model files without a metadata.json next to them")
    g.add_argument("--input-shape", type=_shape, default=None, metavar="C,H,W")
    g.add_argument("--mean", type=_floats, default=None, metavar="M[,M,M]", help="default: 0")
    g.add_argument("--std", type=_floats, default=None, metavar="S[,S,S]", help="default: 1")
    u = p.add_argument_group("URL inputs")
    u.add_argument("--url-timeout", type=float, default=10.0, help="seconds per attempt (default: 10)")
    u.add_argument("--url-max-bytes", type=int, default=20 * 1024 * 1024, help="default: 20 MiB")
    u.add_argument("--url-retries", type=int, default=2, help="retries on 5xx/connection errors (default: 2)")
    p.set_defaults(func=_cmd_predict)
    return p


class _Progress:
    """Draws :class:`~deepspark.inference.PredictProgress` snapshots: a rich bar on a terminal, otherwise a
    log line when tasks finish (at most one every few seconds, and one at the end)."""

    _LOG_EVERY = 5.0

    def __init__(self, console: Any) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self._console = console
        self._bar = (
            Progress(
                TextColumn("[bold]predict"),
                BarColumn(),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                console=console,
                transient=False,
            )
            if console.is_terminal
            else None
        )
        self._task: Any = None
        self._logged = (0, 0.0)  # (tasks done, seconds) at the last log line

    def __call__(self, p: Any) -> None:
        rows = f"{p.rows_done:,}" + (f"/{p.rows_total:,}" if p.rows_total else "") + " rows"
        status = f"{rows}, {p.tasks_done}/{p.tasks_total} tasks"
        if self._bar is not None:
            if self._task is None:
                self._task = self._bar.add_task("predict", total=None, status=status)
                self._bar.start()
            self._bar.update(self._task, completed=p.tasks_done, total=p.tasks_total or None, status=status)
            if p.finished:
                self._bar.stop()
            return
        done, at = self._logged
        if p.finished or (p.tasks_done != done and p.seconds - at >= self._LOG_EVERY):
            self._logged = (p.tasks_done, p.seconds)
            _log.info("predict: %s (%.1f s)%s", status, p.seconds, " done" if p.finished else "")

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def _cmd_predict(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from deepspark.errors import ConfigError
    from deepspark.inference import UrlPolicy, predict
    from deepspark.models import Preprocess

    if args.input_shape is None and (args.mean is not None or args.std is not None):
        raise ConfigError(
            "--mean/--std: they describe a model file's preprocessing together with --input-shape"
        )
    preprocess = (
        Preprocess(input_shape=args.input_shape, mean=args.mean or (0.0,), std=args.std or (1.0,))
        if args.input_shape
        else None
    )
    progress = _Progress(Console(stderr=True))
    try:
        result = predict(
            args.input,
            args.model,
            top_k=args.top_k,
            labels=args.labels,
            batch_size=args.batch_size,
            backend=args.backend,
            input_column=args.input_column,
            output=args.output,
            overwrite=args.overwrite,
            preprocess=preprocess,
            url_policy=UrlPolicy(
                timeout=args.url_timeout, max_bytes=args.url_max_bytes, retries=args.url_retries
            ),
            decode_threads=args.decode_threads,
            device=args.device,
            progress=progress,
            master=args.master,
        )
    finally:
        progress.stop()
    s = result.summary
    assert s is not None  # output= was given, so the job ran
    table = Table(title=f"predictions written to {s.output}", show_header=False)
    table.add_row("rows", f"{s.rows:,}")
    table.add_row("errors", f"{s.errors:,}")
    table.add_row("rows/s", f"{s.rows_per_second:,.1f}  ({s.seconds:.2f} s wall)")
    table.add_row(
        "model loads", f"{s.model_loads} in {s.workers} Python worker(s), {s.partitions} partition(s)"
    )
    table.add_row("backend", f"{s.backend} ({s.model_format}), {s.threads_per_task} thread(s) per task")
    table.add_row("devices", ", ".join(s.devices) or "-")
    table.add_row("batch size", str(s.batch_size))
    phases = ", ".join(f"{name} {sec:.2f}" for name, sec in s.phase_seconds.items())
    table.add_row("task seconds", f"{phases}  (summed over tasks; decode overlaps forward)")
    if getattr(args, "json", False):  # stdout holds the JSON object alone
        Console(stderr=True).print(table)
        print(json.dumps(asdict(s), sort_keys=True, default=str), flush=True)
    else:
        Console().print(table)
    return 0
