"""The trial worker: one runs inside each Spark task and pulls trials from the driver until told to stop.

A worker lives for many trials, so the broadcast data is deserialised, and the Python worker warmed up,
once per task rather than once per trial. Everything it needs arrives as arguments, so the pickled
closure carries no SparkSession and no driver object.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import socket
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from deepspark import wire
from deepspark.tuning.trial import Reporter, TrialPruned

__all__ = ["WorkerSpec", "run_worker"]

_log = logging.getLogger(__name__)

Objective = Callable[[dict[str, Any], Reporter], Any]


class WorkerSpec:
    """The fields a worker needs, copied out of the driver's objects before the closure is made."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        token: str,
        objective: Objective,
        metric: str,
        broadcast: Any,
        threads: int,
    ) -> None:
        self.host, self.port, self.token = host, port, token
        self.objective, self.metric = objective, metric
        self.broadcast, self.threads = broadcast, threads


def _number(value: Any) -> float | None:
    """``value`` as a float when it is a number (numpy and torch scalars included), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):  # int, float and numpy's scalar types
        return float(value)
    if getattr(value, "shape", None) == () and callable(getattr(value, "item", None)):
        item = value.item()  # a 0-d numpy array or a one-element torch tensor
        if isinstance(item, numbers.Real) and not isinstance(item, bool):
            return float(item)
    return None


def _metrics(out: Any, metric: str) -> tuple[float, dict[str, Any]]:
    if isinstance(out, bool) or out is None:
        raise TypeError(f"the objective must return a number or a dict holding {metric!r}, got {out!r}")
    number = _number(out)
    if number is not None:
        return number, {metric: number}
    if isinstance(out, Mapping):
        if metric not in out:
            raise KeyError(f"the objective returned {sorted(out)}, which lacks the metric {metric!r}")
        value = _number(out[metric])
        if value is None:  # as a bare return: True is no 1.0, nor "0.5" a 0.5
            raise TypeError(f"the objective's {metric!r} must be a number, got {out[metric]!r}")
        clean = {}
        for k, v in out.items():
            number = _number(v)
            clean[str(k)] = number if number is not None else v
            try:
                json.dumps(clean[str(k)], allow_nan=True)
            except (TypeError, ValueError) as exc:
                # The result travels to the driver as JSON: an unsendable value would kill the worker
                # (and every retry of the trial) instead of failing the trial with the reason.
                raise TypeError(
                    f"the objective returned {str(k)!r}: {type(v).__name__}, which the driver cannot "
                    f"receive ({exc}); return numbers, strings, lists or dicts of them"
                ) from None
        return value, clean
    raise TypeError(
        f"the objective must return a number or a dict holding {metric!r}, got {type(out).__name__}"
    )


def _send_model(conn: wire.Connection, number: int, reporter: Reporter) -> None:
    """The trial's model files as one frame: their names and sizes in the header, their bytes (safetensors
    weights, JSON spec) one after another in the payload."""
    files = None
    try:
        files = reporter.model_files()
    except Exception:
        _log.exception("trial %d: could not serialise its model", number)
    if files is None:
        conn.send({"op": "model", "trial": number, "files": None})
        return
    sizes = [[name, len(data)] for name, data in files.items()]
    conn.send({"op": "model", "trial": number, "files": sizes}, b"".join(files.values()))


def run_worker(spec: WorkerSpec, slot: int, partition: Iterable[Any]) -> Iterator[dict[str, Any]]:
    """Body of the Spark task: connect, then ask → run → tell until the driver says stop."""
    from pyspark import TaskContext

    from deepspark.spark import limit_task_threads

    for _ in partition:
        # Spark reuses a Python worker only after a task that consumed its whole input (SPARK-26549);
        # draining the one-element partition keeps workers, and their imported torch, warm between studies.
        pass
    ctx = TaskContext.get()
    # The driver sized parallelism so that this many threads per task never oversubscribes the cores.
    threads = limit_task_threads(spec.threads, ctx)
    data = spec.broadcast.value if spec.broadcast is not None else None
    worker = f"{socket.gethostname()}:{os.getpid()}:slot{slot}"
    if ctx is not None:
        worker += f":attempt{ctx.attemptNumber()}"
    done = 0
    hello: dict[str, Any] = {"worker": worker, "slot": slot, "threads": threads}
    if ctx is not None:
        hello["stage"] = ctx.stageId()  # a speculative copy of this task stands by (Coordinator)
    with wire.connect(spec.host, spec.port, token=spec.token, hello=hello, timeout=60) as conn:
        while True:
            conn.send({"op": "next"})
            task, _ = conn.recv()
            if task.get("stop"):
                break
            number, params = int(task["trial"]), dict(task["params"])
            reporter = Reporter(
                conn=conn, number=number, attempt=int(task.get("attempt", 1)), data=data, threads=threads
            )
            started = time.perf_counter()
            result: dict[str, Any] = {"op": "done", "trial": number}
            heartbeat = task.get("heartbeat_s")
            with wire.Heartbeat(conn, float(heartbeat) if heartbeat else None, {"trial": number}):
                try:
                    value, metrics = _metrics(spec.objective(params, reporter), spec.metric)
                    if not math.isfinite(value):
                        raise FloatingPointError(f"the objective's {spec.metric} is {value}")
                    result.update(state="complete", value=value, metrics=metrics)
                except TrialPruned:
                    result.update(state="pruned")
                except (Exception, SystemExit) as exc:  # the objective's failure is the trial's FAIL
                    result.update(
                        state="fail",
                        error=f"{type(exc).__name__}: {exc}",
                        traceback="".join(traceback.format_exception(exc))[-8000:],
                    )
            result["duration_s"] = time.perf_counter() - started
            conn.send(result)
            answer, _ = conn.recv()
            if answer.get("send_model"):
                _send_model(conn, number, reporter)
                conn.recv()
            done += 1
    yield {"worker": worker, "trials": done}
