"""Rich output for people at a terminal: the live tuning progress bar and the leaderboard.

Only the CLI uses this module; the library itself logs and never prints.
"""

from __future__ import annotations

import threading
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from deepspark.tuning import StudyResult, TrialEvent, TrialEventKind, TrialState

__all__ = ["StudyProgress", "print_study"]


class StudyProgress:
    """done/running/pruned/failed, best so far, elapsed and ETA, updated from coordinator events."""

    def __init__(self, console: Console, *, maximize: bool) -> None:
        self._console = console
        self._maximize = maximize
        self._lock = threading.Lock()
        self._counts = {"complete": 0, "pruned": 0, "fail": 0, "running": 0, "retry": 0}
        self._best: float | None = None
        self._progress = Progress(
            TextColumn("[bold]trials"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self._task: Any = None

    def start(self, total: int, parallelism: int) -> None:
        self._console.print(f"running {total} trial(s), {parallelism} at a time")
        self._task = self._progress.add_task("trials", total=total, status=self._status())
        self._progress.start()

    def stop(self) -> None:
        if self._task is not None:  # a display never started prints an empty line when stopped
            self._progress.stop()

    def _status(self) -> str:
        c = self._counts
        best = "-" if self._best is None else f"{self._best:.4f}"
        return (
            f"running {c['running']}  done {c['complete']}  pruned {c['pruned']}  failed {c['fail']}"
            f"  retried {c['retry']}  best {best}"
        )

    def __call__(self, event: TrialEvent) -> None:
        with self._lock:
            if event.kind is TrialEventKind.START:
                self._counts["running"] += 1
            elif event.kind is TrialEventKind.RETRY:
                self._counts["retry"] += 1
                self._counts["running"] += 1
            elif event.record is not None:
                self._counts["running"] = max(0, self._counts["running"] - 1)
                self._counts[event.record.state.value] += 1
                v = event.record.value
                if (
                    event.record.state is TrialState.COMPLETE
                    and v is not None
                    and (self._best is None or (v > self._best if self._maximize else v < self._best))
                ):
                    self._best = v
                if self._task is not None:
                    self._progress.advance(self._task)
            if self._task is not None:
                self._progress.update(self._task, status=self._status())


def print_study(console: Console, result: StudyResult, *, top: int = 10) -> None:
    from deepspark.tuning.report import leaderboard

    summary = result.summary
    maximize = summary.get("direction", "maximize") == "maximize"
    metric = summary.get("metric", "value")
    rows = leaderboard(result.records, maximize=maximize, top=top)
    # Only what differs between trials: fixed settings would crowd the table.
    params = sorted(
        k for k in {k for r in rows for k in r.params} if len({repr(r.params.get(k)) for r in rows}) > 1
    )
    selected_on = result.selected_on
    tests = _tests(summary)
    if selected_on == "validation":
        # Ranked on validation; test accuracy only where it was measured (the best and the default).
        title = f"leaderboard (validation {metric}; test {metric} of the best and the default)"
        values: tuple[str, ...] = ("validation", "test")
    elif selected_on == "test":
        title = f"leaderboard (test {metric}: selected on TEST, the 2016 blog's protocol: optimistic)"
        values = ("test",)
    else:
        title, values = f"leaderboard ({metric})", (metric,)
    table = Table(title=title)
    for col in ("trial", *values, *params, "seconds", "note"):
        table.add_column(col, justify="right" if col != "note" else "left")
    for r in rows:
        note = "default" if r.is_default else ""
        if r.attempts > 1:
            note += f" {r.attempts} attempts"
        test = tests.get(r.number)
        shown = [f"{r.value:.4f}"] + ([] if len(values) == 1 else ["-" if test is None else f"{test:.4f}"])
        table.add_row(
            str(r.number),
            *shown,
            *[_fmt(r.params.get(p)) for p in params],
            f"{r.duration_s:.1f}",
            note.strip(),
        )
    console.print(table)
    counts = result.counts()
    console.print(
        f"trials: {counts['complete']} complete, {counts['pruned']} pruned, {counts['fail']} failed;"
        f" wall {result.wall_s:.1f}s"
    )
    failed = [r for r in result.records if r.state is TrialState.FAIL]
    for r in failed[:5]:
        console.print(f"[red]trial {r.number} failed:[/red] {r.error}")
    if result.best is not None:
        console.print(
            f"best: trial {result.best.number}, {_scores(result.best, selected_on, tests, metric)}, "
            f"config {dict(summary['best']['config'])}"
        )
    if result.default is not None and result.default.value is not None:
        console.print(f"default configuration: {_scores(result.default, selected_on, tests, metric)}")
    if result.error_reduction is not None:
        on = summary.get("error_reduction_on")
        console.print(
            f"error reduction vs the default configuration: {100 * result.error_reduction:.1f}%"
            + (f" (on {on} {metric})" if on else "")
        )
    refits = {k: (summary.get(k) or {}).get("refit_test_accuracy") for k in ("best", "default")}
    if any(v is not None for v in refits.values()):
        refitted = ", ".join(f"{k} {v:.4f}" for k, v in refits.items() if v is not None)
        reduction = summary.get("refit_error_reduction")
        console.print(
            f"refitted on training + validation, test {metric}: {refitted}"
            + (f"; error reduction {100 * reduction:.1f}%" if reduction is not None else "")
            + f" (models in {result.run_dir / 'refit'})"
        )
    if selected_on == "test":
        console.print(
            "[yellow]selected on the test split (--select-on test, the 2016 blog's protocol): the best "
            "trial's test accuracy is optimistic[/yellow]"
        )
    if result.stop_reason:
        console.print(f"[yellow]stopped early: {result.stop_reason}[/yellow]")
    kept = [
        name
        for name in ("trials.csv", "best.json", "best/", "study.journal")
        if (result.run_dir / name).exists()
    ]
    console.print(f"run directory: {result.run_dir} ({', '.join(kept)})")  # best/ only when a trial completed


def _tests(summary: Any) -> dict[int, float]:
    """Test accuracy by trial, where best.json has it."""
    out = {}
    for key in ("best", "default"):
        entry = summary.get(key) or {}
        if entry.get("test_accuracy") is not None:
            out[int(entry["trial"])] = float(entry["test_accuracy"])
    return out


def _scores(record: Any, selected_on: str | None, tests: dict[int, float], metric: str) -> str:
    if selected_on == "validation":
        test = tests.get(record.number)
        shown = "not measured (its model did not arrive)" if test is None else f"{test:.4f}"
        return f"validation {metric} {record.value:.4f}, test {metric} {shown}"
    if selected_on == "test":
        return f"test {metric} {record.value:.4f} (selected on test)"
    return f"{metric} {record.value:.4f}"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)
