"""The default `cnn` configuration on full MNIST, in one process: test accuracy and wall time.

Target: >= 99.2% test accuracy, the 2016 blog's default configuration. Run:

    .venv/bin/python benchmarks/baseline_mnist.py [--threads N] [--epochs N]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from deepspark.data import load_dataset
from deepspark.models import model_spec
from deepspark.training import DEFAULT_TRAIN_CONFIG, TrainConfig, train_one_process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--epochs", type=int, default=DEFAULT_TRAIN_CONFIG.epochs)
    args = parser.parse_args()
    data = load_dataset("mnist")
    config = TrainConfig.from_dict(
        {**DEFAULT_TRAIN_CONFIG.to_dict(), "epochs": args.epochs, "threads": args.threads}
    )
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"config: cnn (conv32-pool-conv64-pool-fc1024-dropout-fc10), {config}")
    started = time.perf_counter()
    result = train_one_process(
        model_spec("cnn"),
        data,
        config,
        callback=lambda m: print(
            f"epoch {m.epoch}: train loss {m.train_loss:.4f}  "
            f"test accuracy {m.test_accuracy:.4f}  ({m.seconds:.0f}s)",
            flush=True,
        ),
    )
    wall = time.perf_counter() - started
    ok = result.test_accuracy >= 0.992
    print(f"test accuracy: {result.test_accuracy:.4f} (target >= 0.9920: {'PASS' if ok else 'FAIL'})")
    print(f"wall time: {wall:.1f}s")


if __name__ == "__main__":
    main()
