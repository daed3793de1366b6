"""The 2016 blog's experiment end to end: the default `cnn` configuration vs the best found by tuning
learning rate x fully-connected width (plus a cosine schedule and random rotations, scalings and
shifts, fixed for all tuned trials), on full MNIST, on the embedded local Spark.

The default configuration is trial 0 of the same study: deepspark's DEFAULT_TRAIN_CONFIG on the
zoo `cnn`. Trials are selected on validation; then the selected configuration and the default are
trained again on all 60,000 training images (the preset's refit) and measured once on test. Prints the
test accuracy of both and the error reduction; target: the selected configuration's test accuracy >= 99.5%
within the time budget (60 minutes on 2 cores, refit included).

The study spends its budget: it runs trials until its timeout (the budget less a reserve for the refit),
not a fixed count (the `paper` preset's 6 trials ended these studies at 16-21 of the 60 minutes). At the
timeout the running trials are interrupted (their partial work is lost), and the refit of the best
configuration found so far takes the reserve. Trials are pruned by the median rule from half their epochs
on, not from the first: with a cosine schedule the early epochs rank trials poorly, and the preset's
`median` (from epoch 1) pruned all 22 trials that ended after the first 4 (the default's included), 17 of
them after their first or second epoch (seed 1, 2026-11-25; docs/benchmarks.md). Run:

    .venv/bin/python benchmarks/hpo_paper.py [--budget-min 60] [--trials N] [--epochs 10] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import optuna

from deepspark.models.zoo import model_spec
from deepspark.spark import session
from deepspark.training import DEFAULT_TRAIN_CONFIG
from deepspark.tuning import tune
from deepspark.tuning.presets import preset


def main() -> None:
    paper = preset("paper")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--budget-min", type=float, default=60.0)
    parser.add_argument(
        "--trials",
        type=int,
        default=1000,
        help="at most this many trials; by default more than the budget holds, so the timeout ends the study",
    )
    parser.add_argument("--epochs", type=int, default=paper["space"]["epochs"])
    parser.add_argument("--run-dir", default=None)
    parser.add_argument("--seed", type=int, default=0, help="seeds the sampler and every trial's training")
    parser.add_argument(
        "--epoch-s",
        type=float,
        default=130.0,
        help="the reserve for the refit, in seconds per epoch: the study's timeout is the budget minus "
        "epochs x this. Measured (2 cores, 2026-11-25): the refit took 7.4 min for fc 512 and 12.3 "
        "and 18.0 min for fc 2048 at 10 epochs (1.3x the trial's own time: the default's shorter refit "
        "ends first and the best's goes on with one thread); 130 s reserves 21.7 min",
    )
    args = parser.parse_args()
    # The `paper` preset's study. Earlier studies here (6 epochs, lr up to 4e-3) found nothing good
    # above ~2e-3 (3.7e-3: 98.1%) and missed 99.5% with seed 1; see docs/benchmarks.md.
    paper["space"] = {**paper["space"], "epochs": args.epochs, "seed": args.seed}
    paper["trials"] = args.trials
    paper["pruner"] = optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=max(1, args.epochs // 2))
    cnn = model_spec(paper["model"]).hyperparameters
    default = {**DEFAULT_TRAIN_CONFIG.to_dict(), "fc": 1024, **cnn}
    default.pop("threads")
    default["seed"] = args.seed
    timeout = max(60.0, args.budget_min * 60 - args.epochs * args.epoch_s)
    session("local[2]", app_name="hpo-paper")
    run_dir = Path(args.run_dir) if args.run_dir else Path(tempfile.mkdtemp(prefix="hpo-paper-")) / "run"
    print(
        f"{os.cpu_count()} cores; budget {args.budget_min:.0f} min; "
        f"up to {args.trials} trials, {paper['parallelism']} at a time, until {timeout / 60:.1f} min; "
        f"then the refit"
    )
    print(f"default configuration (trial 0): {default}")
    started = time.perf_counter()
    result = tune(**paper, default_config=default, run_dir=run_dir, seed=args.seed, timeout=timeout)
    wall = time.perf_counter() - started
    print(f"the study stopped: {result.stop_reason or 'all trials done'} after {result.wall_s / 60:.1f} min")
    for r in sorted(result.records, key=lambda r: r.number):
        print(
            f"trial {r.number:2d} {r.state.value:8s} val_acc={r.value if r.value is not None else float('nan'):.4f} "
            f"lr={r.params.get('learning_rate'):.5f} fc={r.params.get('fc')} epochs={r.params.get('epochs')} "
            f"{'(default)' if r.is_default else ''} {r.duration_s:.0f}s"
        )
    assert result.best is not None and result.default is not None
    # Selected on validation (tune's default): trial values are validation accuracies; the test accuracy
    # of the best and the default was measured once, at the end (best.json).
    tests = {k: (result.summary.get(k) or {}).get("test_accuracy") for k in ("best", "default")}
    print(f"selected on: {result.selected_on}")
    print(
        f"default configuration: validation accuracy {result.default.value:.4f}, "
        f"test accuracy {_fmt(tests['default'])}"
    )
    refits = {k: (result.summary.get(k) or {}).get("refit_test_accuracy") for k in ("best", "default")}
    print(
        f"best (trial {result.best.number}): validation accuracy {result.best.value:.4f}, "
        f"test accuracy {_fmt(tests['best'])} (trained on training - validation)"
    )
    if result.error_reduction is not None:
        on = result.summary.get("error_reduction_on", "test")
        print(f"error reduction vs default (on {on}): {100 * result.error_reduction:.1f}% (the blog: 34%)")
    # The preset refits: the selected configuration (and the default) trained again on all the
    # training images, measured once on test. That is the selected configuration's test accuracy.
    best_test = refits["best"]
    accurate = best_test is not None and best_test >= 0.995
    print(
        f"refitted on training + validation: default {_fmt(refits['default'])}, best {_fmt(best_test)} "
        f"(target: best's test >= 0.9950: {'yes' if accurate else 'no'})"
    )
    reduction = result.summary.get("refit_error_reduction")
    if reduction is not None:
        print(f"error reduction vs default, refitted models on test: {100 * reduction:.1f}% (the blog: 34%)")
    # The target is the accuracy within the budget: a refit that overruns the reserve is a fail too.
    in_time = wall <= args.budget_min * 60
    print(
        f"wall: {wall / 60:.1f} min with the refit (budget {args.budget_min:.0f} min: "
        f"{'within' if in_time else 'OVER'}); run dir {run_dir}"
    )
    print(
        f"target: best's test >= 0.9950 within {args.budget_min:.0f} min: "
        f"{'PASS' if accurate and in_time else 'FAIL'}"
    )


def _fmt(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.4f}"


if __name__ == "__main__":
    main()
