"""Wall time of the same fixed set of K real MNIST trials at parallelism 1 and 2 (1 thread each).

Speedup = T(1) / T(2); efficiency = speedup / 2. Target: efficiency >= 0.9 (the 2016 blog's 13 nodes
gave 7x, 0.54). The grid sampler makes both runs train exactly the same K configurations. Run:

    .venv/bin/python benchmarks/hpo_scaling.py [--trials 8] [--limit-train 30000] [--epochs 1]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from deepspark.spark import session
from deepspark.tuning import tune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--limit-train", type=int, default=30000)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    rates = [round(1e-3 * 1.5**i, 6) for i in range(args.trials)]
    space = {
        "learning_rate": {"type": "grid", "values": rates},
        "conv1": 16,
        "conv2": 32,
        "fc": 256,
        "epochs": args.epochs,
        "batch_size": 128,
    }
    session("local[2]", app_name="hpo-scaling")
    print(
        f"{os.cpu_count()} cores; {args.trials} trials of cnn(16,32,256), {args.epochs} epoch(s) on "
        f"{args.limit_train} MNIST images; 1 thread per trial"
    )
    walls: dict[int, float] = {}
    durations: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        # Warm-up (not timed): Python workers start and import torch once, as they would in a long study.
        tune(
            dataset="mnist",
            model="cnn",
            space={**space, "learning_rate": {"type": "grid", "values": [1e-3]}, "epochs": 1},
            limit_train=512,
            limit_test=256,
            trials=2,
            parallelism=2,
            sampler="grid",
            pruner="none",
            default_config=False,
            run_dir=Path(tmp) / "warm",
        )
        for parallelism in (1, 2):
            started = time.perf_counter()
            result = tune(
                dataset="mnist",
                model="cnn",
                space=space,
                trials=args.trials,
                parallelism=parallelism,
                threads_per_trial=1,
                sampler="grid",
                pruner="none",
                default_config=False,
                limit_train=args.limit_train,
                run_dir=Path(tmp) / f"p{parallelism}",
            )
            walls[parallelism] = time.perf_counter() - started
            durations[parallelism] = sum(r.duration_s for r in result.records) / len(result.records)
            assert result.counts()["complete"] == args.trials, result.counts()
            print(
                f"parallelism {parallelism}: wall {walls[parallelism]:.1f}s, mean trial "
                f"{durations[parallelism]:.1f}s, best accuracy {result.best.value:.4f}",
                flush=True,
            )
    speedup = walls[1] / walls[2]
    efficiency = speedup / 2
    print(
        f"speedup: {speedup:.2f}x on 2 workers; efficiency: {efficiency:.2f} "
        f"(target >= 0.90: {'PASS' if efficiency >= 0.9 else 'FAIL'})"
    )
    print(f"mean trial time grew {durations[2] / durations[1]:.2f}x when two trials shared the machine")


if __name__ == "__main__":
    main()
