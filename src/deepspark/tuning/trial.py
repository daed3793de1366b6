"""What a trial is, seen from both sides: the immutable record on the driver and the reporter an
objective talks to inside a Spark task."""

from __future__ import annotations

import enum
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from deepspark import wire
from deepspark.errors import DeepsparkError
from deepspark.validation import fail

__all__ = [
    "RESULT_ATTR",
    "Reporter",
    "TrialPruned",
    "TrialRecord",
    "TrialState",
    "read_result",
    "result_attr",
]

#: The Optuna user attribute a finished trial's result is kept in: one journal write per trial for its
#: metrics, duration and worker (each user attribute is an append to the journal: ~0.4 ms).
RESULT_ATTR = "deepspark:result"


class TrialState(enum.Enum):
    """Final states. A trial's record is immutable once it reaches one of them."""

    COMPLETE = "complete"
    PRUNED = "pruned"
    FAIL = "fail"


class TrialPruned(DeepsparkError):
    """Raised inside an objective by :meth:`Reporter.report` when the pruner stops the trial."""


@dataclass(frozen=True)
class TrialRecord:
    """One finished trial. ``attempts`` > 1 means an infrastructure failure made us run it again."""

    number: int
    state: TrialState
    params: Mapping[str, Any]
    value: float | None = None
    metrics: Mapping[str, Any] = field(default_factory=dict)
    duration_s: float = 0.0
    attempts: int = 1
    worker: str = ""
    error: str | None = None
    traceback: str | None = None
    is_default: bool = False
    intermediate: Mapping[int, float] = field(default_factory=dict)


class Reporter:
    """The objective's line to the driver: per-step metrics for pruning, and the model to keep.

    An objective is called as ``objective(config, reporter)``. ``reporter.data`` is the value that
    was broadcast once for the whole study; ``reporter.threads`` is the thread budget of the task.
    """

    def __init__(
        self,
        *,
        conn: wire.Connection | None,
        number: int,
        attempt: int,
        data: Any,
        threads: int,
    ) -> None:
        self._conn = conn
        self.number = number
        self.attempt = attempt
        self.data = data
        self.threads = threads
        self._pruned = False
        self._model_files: Callable[[], Mapping[str, bytes]] | None = None

    def report(self, step: int, value: float, *, final: bool = False) -> None:
        """Report the metric after ``step`` (an epoch, say; an integer >= 0, as Optuna requires); raises
        :class:`TrialPruned` if told to stop.

        ``final=True`` marks the last step: it is recorded for the pruner's statistics, but a trial that
        has already done all its work is not pruned for it.
        """
        # Optuna refuses a negative step on the driver: say so here, as this trial's own error. A float
        # is refused too (int() would turn 1.5 into a step 1 that another report may also claim).
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise fail("step", "an integer >= 0 (the epoch or iteration the value was measured after)", step)
        step = int(step)  # numpy's integers too
        if self._conn is None:
            return
        self._conn.send(
            {"op": "report", "trial": self.number, "step": step, "value": float(value), "final": final}
        )
        answer, _ = self._conn.recv()
        if answer.get("prune"):
            self._pruned = True
            raise TrialPruned(f"trial {self.number} pruned at step {step} (value {value:g})")

    def should_prune(self) -> bool:
        return self._pruned

    def keep_model(self, files: Callable[[], Mapping[str, bytes]]) -> None:
        """Offer this trial's model; ``files`` is called only if the driver asks (a new best)."""
        self._model_files = files

    def model_files(self) -> Mapping[str, bytes] | None:
        """The files offered with :meth:`keep_model` (made now), or None if the objective offered none.

        The worker calls this only when the driver asks for the model (the trial is the best so far).
        """
        if self._model_files is None:
            return None
        return dict(self._model_files())


def result_attr(record: TrialRecord) -> dict[str, Any]:
    """``RESULT_ATTR``'s value for a finished trial: the objective's numbers and labels, its duration
    and the worker that ran it (JSON-ready: what a journal and an RDB storage can hold)."""
    # Lists and dicts too (the worker checked they are JSON-able): dropping them lost what the docs
    # promise the records keep; trials.csv leaves them out, its cells being scalars.
    metrics = {
        k: v for k, v in record.metrics.items() if isinstance(v, int | float | str | bool | list | dict)
    }
    return {"metrics": metrics, "duration_s": record.duration_s, "worker": record.worker}


def read_result(user_attrs: Mapping[str, Any]) -> tuple[dict[str, Any], float, str]:
    """(metrics, duration in seconds, worker) of a finished trial from its user attributes; studies
    written before ``RESULT_ATTR`` kept them as ``metric:<name>``, ``duration_s`` and ``worker``."""
    result = user_attrs.get(RESULT_ATTR)
    if isinstance(result, Mapping):
        return (
            dict(result.get("metrics") or {}),
            float(result.get("duration_s") or 0.0),
            str(result.get("worker") or ""),
        )
    metrics = {k[len("metric:") :]: v for k, v in user_attrs.items() if k.startswith("metric:")}
    return metrics, float(user_attrs.get("duration_s", 0.0)), str(user_attrs.get("worker", ""))
