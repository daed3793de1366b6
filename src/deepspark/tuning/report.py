"""What a study leaves behind: trials.csv, best.json, a leaderboard, and accuracy-vs-learning-rate plot.

Everything is rebuilt from the Optuna storage, so a resumed study reports every trial it ever ran.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna

from deepspark._optional import skip_unless
from deepspark.tuning.trial import TrialRecord, TrialState

__all__ = ["error_reduction", "records_from_study", "write_reports"]

_log = logging.getLogger(__name__)
_STATES = {
    optuna.trial.TrialState.COMPLETE: TrialState.COMPLETE,
    optuna.trial.TrialState.PRUNED: TrialState.PRUNED,
    optuna.trial.TrialState.FAIL: TrialState.FAIL,
}


def records_from_study(study: optuna.Study) -> list[TrialRecord]:
    """Finished trials as records; interrupted attempts (re-run elsewhere) are left out."""
    out = []
    for t in study.get_trials(deepcopy=False):
        if t.state not in _STATES or t.user_attrs.get("deepspark:interrupted"):
            continue
        metrics = {k[len("metric:") :]: v for k, v in t.user_attrs.items() if k.startswith("metric:")}
        out.append(
            TrialRecord(
                number=t.number,
                state=_STATES[t.state],
                params=dict(t.user_attrs.get("deepspark:config") or t.params),
                value=t.value if t.state == optuna.trial.TrialState.COMPLETE else None,
                metrics=metrics,
                duration_s=float(t.user_attrs.get("duration_s", 0.0)),
                attempts=int(t.user_attrs.get("deepspark:attempts", 1)),
                worker=str(t.user_attrs.get("worker", "")),
                error=t.user_attrs.get("error"),
                traceback=t.user_attrs.get("traceback"),
                is_default=bool(t.user_attrs.get("deepspark:default")),
                intermediate=dict(t.intermediate_values),
            )
        )
    return out


def error_reduction(default_accuracy: float, best_accuracy: float) -> float | None:
    """Relative drop in error rate, the blog's measure: 99.2% → 99.47% is a 34% reduction."""
    default_error = 1.0 - default_accuracy
    if default_error <= 0:
        return None
    return (default_error - (1.0 - best_accuracy)) / default_error


def best_and_default(
    records: Sequence[TrialRecord], *, maximize: bool
) -> tuple[TrialRecord | None, TrialRecord | None]:
    complete = [r for r in records if r.state is TrialState.COMPLETE and r.value is not None]
    best = None
    if complete:
        # Ties go to the lower trial number, the rule the coordinator keeps best/ by.
        sign = -1.0 if maximize else 1.0
        best = min(complete, key=lambda r: (sign * float(r.value or 0.0), r.number))
    default = next((r for r in complete if r.is_default), None)
    return best, default


def leaderboard(records: Sequence[TrialRecord], *, maximize: bool, top: int = 10) -> list[TrialRecord]:
    complete = [r for r in records if r.state is TrialState.COMPLETE and r.value is not None]
    return sorted(complete, key=lambda r: float(r.value or 0.0), reverse=maximize)[:top]


def write_reports(
    run_dir: Path,
    records: Sequence[TrialRecord],
    *,
    metric: str,
    maximize: bool,
    fixed: dict[str, Any],
    wall_s: float,
    best_checkpoint: Path | None,
) -> dict[str, Any]:
    """Write trials.csv, best.json and accuracy_vs_lr.png; return best.json's content."""
    param_names = sorted({k for r in records for k in r.params})
    metric_names = sorted(
        {k for r in records for k, v in r.metrics.items() if not isinstance(v, dict | list)}
    )
    with (run_dir / "trials.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            [
                "number",
                "state",
                "value",
                "default",
                "attempts",
                "duration_s",
                "worker",
                *[f"param_{p}" for p in param_names],
                *[f"metric_{m}" for m in metric_names],
                "error",
            ]
        )
        for r in sorted(records, key=lambda r: r.number):
            writer.writerow(
                [
                    r.number,
                    r.state.value,
                    r.value,
                    r.is_default,
                    r.attempts,
                    f"{r.duration_s:.3f}",
                    r.worker,
                    *[r.params.get(p) for p in param_names],
                    *[r.metrics.get(m) for m in metric_names],
                    r.error or "",
                ]
            )
    best, default = best_and_default(records, maximize=maximize)
    counts = {s.value: sum(r.state is s for r in records) for s in TrialState}
    summary: dict[str, Any] = {
        "metric": metric,
        "direction": "maximize" if maximize else "minimize",
        "counts": counts,
        "wall_s": wall_s,
        "fixed": fixed,
        "best": None,
        "default": None,
        "error_reduction": None,
        "checkpoint": str(best_checkpoint) if best_checkpoint else None,
    }
    if best is not None:
        summary["best"] = {
            "trial": best.number,
            "config": dict(best.params),
            "value": best.value,
            "metrics": dict(best.metrics),
        }
    if default is not None:
        summary["default"] = {
            "trial": default.number,
            "config": dict(default.params),
            "value": default.value,
            "metrics": dict(default.metrics),
        }
        if best is not None and metric == "accuracy" and best.value is not None and default.value is not None:
            summary["error_reduction"] = error_reduction(default.value, best.value)
    (run_dir / "best.json").write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    try:
        _plot(run_dir / "accuracy_vs_lr.png", records, metric=metric)
    except Exception:  # a plot is a nicety; never lose the study over it
        _log.exception("could not draw the learning-rate plot")
    return summary


def _plot(path: Path, records: Sequence[TrialRecord], *, metric: str) -> None:
    complete = [
        r
        for r in records
        if r.state is TrialState.COMPLETE and r.value is not None and "learning_rate" in r.params
    ]
    if not complete or not skip_unless("matplotlib", feature="the learning-rate plot (accuracy_vs_lr.png)"):
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = next(
        (w for w in ("fc", "hidden", "conv2", "conv1") if all(w in r.params for r in complete)), None
    )
    fig, ax = plt.subplots(figsize=(6, 4))
    groups: dict[Any, list[TrialRecord]] = {}
    for r in complete:
        groups.setdefault(r.params.get(width) if width else "all", []).append(r)

    def order(key: Any) -> tuple[int, float, str]:  # widths numerically, anything else after, by name
        return (0, float(key), "") if isinstance(key, int | float) else (1, 0.0, str(key))

    for key in sorted(groups, key=order):
        rs = sorted(groups[key], key=lambda r: float(r.params["learning_rate"]))
        ax.plot(
            [r.params["learning_rate"] for r in rs],
            [float(r.value or 0.0) for r in rs],
            "o-",
            label=f"{width}={key}" if width else "trials",
        )
    for r in complete:
        if r.is_default:
            ax.plot(r.params["learning_rate"], float(r.value or 0.0), "k*", markersize=12, label="default")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"test {metric}")
    ax.set_title("Test accuracy vs learning rate" + (f" by {width} width" if width else ""))
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def is_finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)
