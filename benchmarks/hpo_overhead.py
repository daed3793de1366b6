"""Per-trial orchestration overhead: ``deepspark.tuning.tune`` vs Hyperopt's ``SparkTrials``.

Both tools run the same no-op objective (it returns the sampled ``x``) with the same parallelism (2) for
the same number of trials, in one process, on one shared ``local[2]`` SparkSession. The objective does
no work, so everything a study costs is orchestration overhead:

* overhead per trial     = wall / N
* slot-seconds per trial = wall x parallelism / N (the task-slot time each trial occupies)
* ratio                  = SparkTrials' overhead per trial / deepspark's
* the floor              = plain Optuna in this one process (``study.optimize`` of the same no-op objective,
  N trials, one at a time) on the same ``JournalStorage`` file backend deepspark uses: what sampling and
  storing a trial costs with no distribution at all. deepspark's overhead per trial (wall / N) and its
  steady state (first start to last finish / N) are printed as multiples of it.

What is excluded, for both tools alike:

* JVM start-up: the SparkSession is created first (``deepspark.spark.session("local[2]")``) and shared;
* warm-up: each tool first runs a small study (``--warmup`` trials, default 4) that is not counted; it
  starts Spark's Python worker daemon and warms the JVM and the driver's imports for both.

Spark reuses a Python worker only after a task that read its whole input partition (SPARK-26549).
deepspark's trial worker reads its one-element partition, so its workers (torch and deepspark imported)
stay warm from one study to the next; SparkTrials' tasks do not, so each of its trials starts a fresh
worker, and a deepspark study right after SparkTrials has to start fresh ones too (SparkTrials took the
idle ones). So the warm-up runs SparkTrials first and deepspark last, and the timed deepspark runs come
before the timed SparkTrials runs: each tool is timed on a session warm for it. The table's "py workers"
column counts the workers each timed run used, so this is measured, not assumed.

Random search is used for both (hyperopt ``rand.suggest``, deepspark ``sampler="random"`` with
``pruner="none"``) so that the samplers' own cost does not dominate; ``--tpe`` also runs both with TPE.
SparkTrials gets ``max_queue_len=parallelism`` (a queued trial for each slot; with hyperopt's default
of 1, fmin queues at most one new trial per 1-second tick), see ``--max-queue-len``.

Run (needs the ``bench`` extra, ``hyperopt==0.2.7``)::

    .venv/bin/python benchmarks/hpo_overhead.py                 # 200 trials, random search
    .venv/bin/python benchmarks/hpo_overhead.py --trials 40     # quicker
    .venv/bin/python benchmarks/hpo_overhead.py --tpe           # also compare with TPE
    .venv/bin/python benchmarks/hpo_overhead.py --floor-only    # only the plain-Optuna floor (no Spark)

deepspark's timed run and the floor are repeated (``--repeats``, default 3) and the median run kept:
a few milliseconds per trial move with the machine's noise from run to run.

The script exits 0 whether or not the target ratio (``--target``, default 20x) is met; the last line
says PASS or FAIL.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import logging
import os
import platform
import sys
import tempfile
import time
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PARALLELISM = 2
MASTER = f"local[{PARALLELISM}]"

# --------------------------------------------------------------------------------------------------
# Compatibility shim for hyperopt 0.2.7.
#
# ``import hyperopt`` runs ``hyperopt/atpe.py``, whose top level does ``import pkg_resources``.
# ``pkg_resources`` was part of setuptools and is gone from the setuptools this venv has (>= 81), so
# ``import hyperopt`` fails with ModuleNotFoundError - in the driver, and also in every Spark Python
# worker, because SparkTrials' task function refers to ``hyperopt.base`` and unpickling it imports the
# ``hyperopt`` package. hyperopt uses only ``pkg_resources.resource_string`` (to load ATPE's model
# files, which this benchmark never does), so the shim provides just that function, on importlib.
# Driver: the shim is put in ``sys.modules`` only while hyperopt is imported. Workers: the same source
# is shipped as ``pkg_resources.py`` with ``SparkContext.addPyFile`` before either tool runs (so both
# tools run under the same Spark settings). Nothing is installed when a real pkg_resources exists.
# No other shim was needed: hyperopt's fmin/rand/tpe run on numpy 2, and SparkTrials' use of
# pyspark (VersionUtils, pinned-thread mode, inheritable_thread_target, setLocalProperty) works on
# pyspark 4.3 (Thread.setDaemon only warns on Python 3.11).
# --------------------------------------------------------------------------------------------------
PKG_RESOURCES_SHIM = '''\
"""Minimal stand-in for setuptools' removed pkg_resources (hyperopt 0.2.7 needs resource_string)."""
import importlib
import pathlib


def resource_string(package_or_module, resource_name):
    module = importlib.import_module(package_or_module)
    return (pathlib.Path(module.__file__).parent / resource_name).read_bytes()
'''


def _needs_pkg_resources_shim() -> bool:
    import importlib.util

    return importlib.util.find_spec("pkg_resources") is None


def import_hyperopt() -> types.ModuleType:
    """``import hyperopt``, with the pkg_resources shim in place if this setuptools lacks it."""
    from deepspark._optional import available, require

    if not available("hyperopt"):
        require("hyperopt", feature="the hyperopt benchmark")  # raises, with the pip install line
    if not _needs_pkg_resources_shim():
        import hyperopt

        return hyperopt
    shim = types.ModuleType("pkg_resources")
    exec(compile(PKG_RESOURCES_SHIM, "<pkg_resources shim>", "exec"), shim.__dict__)
    sys.modules["pkg_resources"] = shim
    try:
        import hyperopt
    finally:
        del sys.modules["pkg_resources"]  # hyperopt.atpe keeps its reference; nothing else sees it
    return hyperopt


def quiet_hyperopt() -> None:
    """hyperopt sets its loggers to INFO when imported (one "Total Trials" line per fmin): quieten them."""
    for name in ("hyperopt", "hyperopt-spark", "hyperopt.fmin"):
        logging.getLogger(name).setLevel(logging.WARNING)


def ship_pkg_resources_shim(spark: Any, workdir: Path) -> bool:
    """Make the shim importable in the Spark Python workers; return whether it was needed."""
    if not _needs_pkg_resources_shim():
        return False
    path = workdir / "pkg_resources.py"
    path.write_text(PKG_RESOURCES_SHIM, encoding="utf-8")
    spark.sparkContext.addPyFile(str(path))
    return True


# --------------------------------------------------------------------------------------------------
# The no-op objectives.
# --------------------------------------------------------------------------------------------------
def deepspark_objective(config: dict[str, Any], reporter: Any) -> float:
    del reporter
    return float(config["x"])


def hyperopt_objective(params: dict[str, Any]) -> dict[str, Any]:
    # The value, as a hyperopt result dict so that it can also carry the worker's pid (to count the
    # Python worker processes SparkTrials used; deepspark's trial events already name theirs).
    return {"loss": float(params["x"]), "status": "ok", "worker_pid": os.getpid()}  # "ok" == STATUS_OK


@dataclass(frozen=True)
class Run:
    tool: str
    algo: str
    trials: int
    wall_s: float
    ok: int
    workers: int  # distinct Python worker processes that ran trials
    first_start_s: float | None = None  # deepspark only: from tune() to the first trial's start
    steady_s: float | None = None  # deepspark only: (last finish - first start) / trials

    @property
    def per_trial(self) -> float:
        return self.wall_s / self.trials

    @property
    def slot_s(self) -> float:
        return self.wall_s * PARALLELISM / self.trials


def run_deepspark(n: int, algo: str, workdir: Path, label: str) -> Run:
    from deepspark.tuning import tune

    run_dir = Path(tempfile.mkdtemp(prefix=f"deepspark-{label}-", dir=workdir)) / "run"
    events: list[tuple[float, str, str]] = []

    def on_event(event: Any) -> None:
        events.append((time.perf_counter(), event.kind, event.worker))

    started = time.perf_counter()
    result = tune(
        deepspark_objective,
        space={"x": {"type": "uniform", "low": 0.0, "high": 1.0}},
        trials=n,
        parallelism=PARALLELISM,
        sampler=algo,
        pruner="none",
        run_dir=run_dir,
        default_config=False,
        on_event=on_event,
    )
    wall = time.perf_counter() - started
    starts = [t for t, kind, _ in events if kind == "start"]
    finishes = [t for t, kind, _ in events if kind == "finish"]
    # A worker is named host:pid:slotN:attemptM; count distinct host:pid.
    workers = {w.rsplit(":slot", 1)[0] for _, _, w in events if w}
    first = starts[0] - started if starts else None
    steady = (finishes[-1] - starts[0]) / n if starts and finishes else None
    return Run("deepspark", algo, n, wall, result.counts().get("complete", 0), len(workers), first, steady)


@dataclass(frozen=True)
class Floor:
    algo: str
    trials: int
    wall_s: float

    @property
    def per_trial(self) -> float:
        return self.wall_s / self.trials


def optuna_sampler(algo: str, seed: int) -> Any:
    """The sampler deepspark's ``tune`` makes for ``algo`` on a one-parameter space (runner._sampler)."""
    import optuna

    if algo == "tpe":
        return optuna.samplers.TPESampler(
            seed=seed, constant_liar=True, multivariate=True, n_startup_trials=2
        )
    return optuna.samplers.RandomSampler(seed=seed)


def run_optuna_floor(n: int, algo: str, workdir: Path, seed: int) -> Floor:
    """Plain Optuna, one process, N trials of the no-op objective, journal file storage as deepspark's."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    path = Path(tempfile.mkdtemp(prefix=f"optuna-{algo}-", dir=workdir)) / "study.journal"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = JournalStorage(JournalFileBackend(str(path)))
    study = optuna.create_study(
        storage=storage,
        study_name="floor",
        direction="maximize",
        sampler=optuna_sampler(algo, seed),
        pruner=optuna.pruners.NopPruner(),
    )
    started = time.perf_counter()
    study.optimize(lambda trial: trial.suggest_float("x", 0.0, 1.0), n_trials=n)
    return Floor(algo, n, time.perf_counter() - started)


def measure_floors(n: int, algos: list[str], workdir: Path, args: argparse.Namespace) -> dict[str, Floor]:
    """The floor per sampler, after an untimed study that pays for the imports and the first journal."""
    run_optuna_floor(max(args.warmup, 1), "random", workdir, args.seed)
    floors = {}
    for algo in algos:
        measured = [run_optuna_floor(n, algo, workdir, args.seed) for _ in range(args.repeats)]
        floors[algo] = floor = _median(measured, key=lambda f: f.wall_s)
        print(
            f"floor: plain Optuna ({algo}), one process, journal file: {n} trials in {floor.wall_s:.2f} s, "
            f"{floor.per_trial * 1000:.2f} ms per trial (the median of "
            f"{', '.join(f'{f.per_trial * 1000:.2f}' for f in measured)})",
            flush=True,
        )
    return floors


def _median(items: list[Any], *, key: Callable[[Any], float]) -> Any:
    """The middle item by ``key`` (the lower middle for an even count): a run that really happened."""
    return sorted(items, key=key)[(len(items) - 1) // 2]


def run_sparktrials(spark: Any, n: int, algo: str, max_queue_len: int, seed: int) -> Run:
    import numpy as np

    hyperopt = import_hyperopt()
    quiet_hyperopt()
    suggest = {"random": hyperopt.rand.suggest, "tpe": hyperopt.tpe.suggest}[algo]
    trials = hyperopt.SparkTrials(parallelism=PARALLELISM, spark_session=spark)
    started = time.perf_counter()
    hyperopt.fmin(
        hyperopt_objective,
        space={"x": hyperopt.hp.uniform("x", 0.0, 1.0)},
        algo=suggest,
        max_evals=n,
        trials=trials,
        max_queue_len=max_queue_len,
        rstate=np.random.default_rng(seed),
        show_progressbar=False,
    )
    wall = time.perf_counter() - started
    workers = {r.get("worker_pid") for r in trials.results if r.get("status") == "ok"}
    return Run("SparkTrials", algo, n, wall, trials.count_successful_trials(), len(workers))


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def print_table(runs: list[Run]) -> None:
    header = (
        f"{'tool':<12} {'sampler':<7} {'trials':>6} {'ok':>4} {'wall s':>8} "
        f"{'overhead s/trial':>16} {'slot-s/trial':>12} {'trials/s':>9} {'py workers':>10}"
    )
    print(header)
    print("-" * len(header))
    for r in runs:
        print(
            f"{r.tool:<12} {r.algo:<7} {r.trials:>6} {r.ok:>4} {r.wall_s:>8.2f} "
            f"{r.per_trial:>16.4f} {r.slot_s:>12.4f} {r.trials / r.wall_s:>9.1f} {r.workers:>10}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--trials", type=int, default=200, help="timed trials per tool (default 200)")
    parser.add_argument(
        "--warmup", type=int, default=4, help="untimed warm-up trials per tool, run first (default 4)"
    )
    parser.add_argument("--tpe", action="store_true", help="also run both tools with TPE")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed runs of deepspark and of the floor, the median kept (default 3; SparkTrials runs once)",
    )
    parser.add_argument(
        "--max-queue-len",
        type=int,
        default=PARALLELISM,
        help=f"hyperopt fmin max_queue_len (default {PARALLELISM} = parallelism)",
    )
    parser.add_argument(
        "--target", type=float, default=20.0, help="the ratio SparkTrials/deepspark to reach (default 20)"
    )
    parser.add_argument("--seed", type=int, default=0, help="hyperopt rstate and Optuna sampler seed")
    parser.add_argument(
        "--floor-only", action="store_true", help="measure only the plain-Optuna floor (no Spark, no tools)"
    )
    args = parser.parse_args(argv)
    if args.trials < 1 or args.warmup < 0 or args.max_queue_len < 1:
        parser.error("--trials and --max-queue-len must be >= 1, --warmup >= 0")

    warnings.filterwarnings("ignore", category=DeprecationWarning)  # Thread.setDaemon in SparkTrials
    # pyspark's inheritable_thread_target (used by SparkTrials' per-trial threads) warns on every trial.
    warnings.filterwarnings("ignore", message="Spark session is not provided")
    logging.getLogger("py4j").setLevel(logging.WARNING)
    # Spark's Python workers must run this interpreter (the venv); deepspark.spark.session also does this.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

    from deepspark.spark import session

    if args.floor_only:
        with tempfile.TemporaryDirectory(prefix="hpo-overhead-") as tmp:
            measure_floors(args.trials, ["random", "tpe"] if args.tpe else ["random"], Path(tmp), args)
        return 0
    load_before = _load()
    print("HPO orchestration overhead: deepspark.tuning.tune vs hyperopt SparkTrials (no-op objective)")
    print(
        f"date {datetime.datetime.now().isoformat(timespec='seconds')}  host {platform.node()}  "
        f"cores {os.cpu_count()}  load avg (1/5/15 min) {load_before}"
    )
    print(
        f"python {platform.python_version()}  pyspark {_version('pyspark')}  "
        f"hyperopt {_version('hyperopt')}  optuna {_version('optuna')}  "
        f"numpy {_version('numpy')}  deepspark {_version('deepspark')}"
    )

    t0 = time.perf_counter()
    spark = session(MASTER, app_name="hpo-overhead-bench")
    print(
        f"SparkSession {spark.sparkContext.master} started in {time.perf_counter() - t0:.1f} s "
        "(shared by both tools; not counted)"
    )
    algos = ["random", "tpe"] if args.tpe else ["random"]
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="hpo-overhead-") as tmp:
        workdir = Path(tmp)
        floors = measure_floors(args.trials, algos, workdir, args)
        if ship_pkg_resources_shim(spark, workdir):
            print(
                "hyperopt 0.2.7 needs pkg_resources, which this setuptools lacks: shipped a shim "
                "(see the comment in this script)"
            )
        if args.warmup:
            # SparkTrials first: its tasks take the idle Python workers and never hand them back
            # (SPARK-26549), so a deepspark study right after it starts fresh workers (measured: 1.99 s
            # to the first trial against ~0.2 s). Each tool's timed run follows its own warm-up.
            t0 = time.perf_counter()
            run_sparktrials(spark, args.warmup, "random", args.max_queue_len, args.seed)
            t1 = time.perf_counter()
            run_deepspark(args.warmup, "random", workdir, "warmup")
            t2 = time.perf_counter()
            print(
                f"warm-up (not counted): {args.warmup} trials each, SparkTrials {t1 - t0:.1f} s, "
                f"deepspark {t2 - t1:.1f} s; it starts Spark's Python worker daemon and warms the JVM "
                "and the driver's imports for both tools"
            )
            print(
                "  SparkTrials' tasks leave no Python worker to reuse (SPARK-26549), so it warmed up first; "
                "the 'py workers' column counts the workers each timed run used"
            )
        print(
            f"timing {args.trials} trials per tool, parallelism {PARALLELISM}, "
            f"SparkTrials max_queue_len {args.max_queue_len} ...",
            flush=True,
        )
        for algo in algos:
            timed = [run_deepspark(args.trials, algo, workdir, f"{algo}{i}") for i in range(args.repeats)]
            runs.append(_median(timed, key=lambda r: r.wall_s))
            print(
                f"  deepspark   {algo:<6} {runs[-1].wall_s:7.2f} s (the median of "
                f"{', '.join(f'{r.wall_s:.2f}' for r in timed)} s; steady state "
                f"{', '.join(f'{(r.steady_s or 0) * 1000:.1f}' for r in timed)} ms per trial)",
                flush=True,
            )
        for algo in algos:
            runs.append(run_sparktrials(spark, args.trials, algo, args.max_queue_len, args.seed))
            print(f"  SparkTrials {algo:<6} {runs[-1].wall_s:7.2f} s", flush=True)
    spark.stop()

    print()
    print_table(runs)
    print()
    print(
        f"overhead/trial = wall / trials; slot-s/trial = wall x {PARALLELISM} / trials; "
        "ok = trials that completed;"
    )
    print("py workers = distinct Spark Python worker processes that ran the timed trials")
    for r in runs:
        if r.tool == "deepspark" and r.first_start_s is not None and r.steady_s is not None:
            print(
                f"deepspark ({r.algo}): {r.first_start_s:.2f} s from tune() to the first trial "
                f"(Spark jobs, Python workers, imports; target <= 0.5 s on a warm session: "
                f"{'PASS' if r.first_start_s <= 0.5 else 'FAIL'}), then {r.steady_s * 1000:.1f} ms per trial"
            )
    for r in runs:
        floor = floors.get(r.algo)
        if r.tool != "deepspark" or floor is None or floor.per_trial <= 0:
            continue
        steady = (
            f"; steady state {r.steady_s * 1000:.1f} ms = {r.steady_s / floor.per_trial:.1f}x (target <= 2x: "
            f"{'PASS' if r.steady_s <= 2 * floor.per_trial else 'FAIL'})"
            if r.steady_s is not None
            else ""
        )
        print(
            f"deepspark ({r.algo}) vs the plain-Optuna floor of {floor.per_trial * 1000:.2f} ms per trial: "
            f"overhead {r.per_trial * 1000:.1f} ms = {r.per_trial / floor.per_trial:.1f}x the floor{steady}"
        )
    print(f"load avg (1/5/15 min): before {load_before}, after {_load()} on {os.cpu_count()} cores")
    incomplete = [r for r in runs if r.ok != r.trials]
    for r in incomplete:
        print(f"WARNING: {r.tool} ({r.algo}) completed {r.ok} of {r.trials} trials")

    ratios = {}
    for algo in algos:
        ds = next(r for r in runs if r.tool == "deepspark" and r.algo == algo)
        ht = next(r for r in runs if r.tool == "SparkTrials" and r.algo == algo)
        ratios[algo] = ht.per_trial / ds.per_trial
    if "tpe" in ratios:
        print(f"ratio with TPE: {ratios['tpe']:.1f}x")
    verdict = "PASS" if ratios["random"] >= args.target and not incomplete else "FAIL"
    print(f"ratio: {ratios['random']:.1f}x (target >= {args.target:g}x): {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
