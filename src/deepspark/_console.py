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

from deepspark.tuning import StudyResult, TrialEvent, TrialState

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
            if event.kind == "start":
                self._counts["running"] += 1
            elif event.kind == "retry":
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
    table = Table(title=f"leaderboard ({metric})")
    for col in ("trial", metric, *params, "seconds", "note"):
        table.add_column(col, justify="right" if col != "note" else "left")
    for r in rows:
        note = "default" if r.is_default else ""
        if r.attempts > 1:
            note += f" {r.attempts} attempts"
        table.add_row(
            str(r.number),
            f"{r.value:.4f}",
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
            f"best: trial {result.best.number}, {metric} {result.best.value:.4f}, "
            f"config {dict(summary['best']['config'])}"
        )
    if result.default is not None and result.default.value is not None:
        console.print(f"default configuration: {metric} {result.default.value:.4f}")
    if result.error_reduction is not None:
        console.print(f"error reduction vs the default configuration: {100 * result.error_reduction:.1f}%")
    if result.stop_reason:
        console.print(f"[yellow]stopped early: {result.stop_reason}[/yellow]")
    console.print(f"run directory: {result.run_dir} (trials.csv, best.json, best/, study.journal)")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)
