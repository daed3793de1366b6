"""Refit: the configurations a study chose on validation, trained again on training + validation.

Selecting on a held-out tenth of the training split leaves that tenth out of the chosen trial's model.
Once the choice is made the validation split has done its job, so ``refit`` trains the best
configuration, and the default one (the error reduction then compares like with like), again on
training + validation with the same settings and seed, and measures those models once on test:
scikit-learn's ``GridSearchCV(refit=True)`` for a Spark study. The test split still takes no part in any
choice: which configurations are refitted is fixed by validation before the test split is read.

Each configuration is one Spark task (side by side, up to the cluster's slots) running the study's own
objective with the study's thread budget; its model lands in ``run_dir/refit/<best|default>/`` as a
deepspark checkpoint with a ``trial.json`` naming the trial it refits (``deepspark predict`` takes it).
"""

from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepspark import rundir
from deepspark.tuning.trial import Reporter, TrialRecord

__all__ = ["refit_models"]


@dataclass(frozen=True)
class _Spec:
    """What a refit task needs, copied out of the driver's objects before the closure is made."""

    objective: Any
    broadcast: Any
    threads: int


_Item = tuple[str, int, dict[str, Any]]


def _task(spec: _Spec, items: Iterable[_Item]) -> Iterator[tuple[str, float, dict[str, bytes]]]:
    from pyspark import TaskContext

    from deepspark.spark import limit_task_threads

    threads = limit_task_threads(spec.threads, TaskContext.get())
    data = spec.broadcast.value
    for name, number, config in items:
        # No connection: nothing is reported per epoch, nothing is pruned.
        reporter = Reporter(conn=None, number=number, attempt=1, data=data, threads=threads)
        out = spec.objective(config, reporter)
        yield name, float(out["accuracy"]), dict(reporter.model_files() or {})


def refit_models(
    spark: Any,
    *,
    objective: Any,
    data: Any,
    chosen: Mapping[str, TrialRecord | None],
    threads: int,
    run_dir: Path,
) -> dict[int, float]:
    """Train each chosen trial's configuration (``{name: record}``) on ``data``, whose training split
    holds training + validation and whose test split is the test split; ``objective`` evaluates on
    test. Keep each model in ``run_dir/refit/<name>/``; return its test accuracy by trial number.

    A trial chosen under two names (the default configuration is the best) is trained once and kept
    under both.
    """
    names: dict[int, list[str]] = {}  # trial -> the names it was chosen under
    items: list[_Item] = []
    for name, record in chosen.items():
        if record is None:
            continue
        if record.number not in names:
            items.append((name, record.number, dict(record.params)))
        names.setdefault(record.number, []).append(name)
    # Refits of an earlier state of the study (a resume that finished more trials) are stale now.
    shutil.rmtree(run_dir / rundir.REFIT_DIR, ignore_errors=True)
    if not items:
        return {}
    from deepspark.spark import job_group, job_result, release_broadcast

    sc = spark.sparkContext
    broadcast = sc.broadcast(data)
    try:
        body = functools.partial(_task, _Spec(objective=objective, broadcast=broadcast, threads=threads))
        # In a job group of its own, from a thread (job_result): a Ctrl-C cancels it, and the caller's
        # thread keeps its own job group and local properties (pyspark's handler broke the caller's
        # connection).
        results = job_result(
            sc,
            sc.parallelize(items, len(items)).mapPartitions(body).collect,
            group=job_group("deepspark-refit"),
        )
    finally:
        release_broadcast(broadcast)
    numbers = {name: number for name, number, _ in items}
    out: dict[int, float] = {}
    for name, accuracy, files in results:
        number = numbers[name]
        trial = json.dumps({"trial": number, "refit": "training + validation", "test_accuracy": accuracy})
        for kept in names[number]:
            rundir.write_dir_atomic(
                run_dir / rundir.REFIT_DIR / kept, {**files, "trial.json": trial.encode()}
            )
        out[number] = accuracy
    return out
