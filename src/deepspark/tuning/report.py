"""What a study leaves behind: trials.csv, best.json, a leaderboard, and accuracy-vs-learning-rate plot.

Everything is rebuilt from the Optuna storage, so a resumed study reports every trial it ever ran.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from deepspark import rundir
from deepspark._optional import skip_unless
from deepspark.tuning.space import SearchSpace
from deepspark.tuning.trial import TrialRecord, TrialState, read_result

__all__ = [
    "TEST_PROTOCOL",
    "StudySummary",
    "TrialSummary",
    "error_reduction",
    "measures_error",
    "plot_sensitivity",
    "readable_log_ticks",
    "records_from_study",
    "width_param",
    "write_reports",
]

_log = logging.getLogger(__name__)
#: What ``best.json`` (``protocol``) and the HTML report say of a study selected on the test split.
TEST_PROTOCOL = (
    "selected on the test split (the 2016 blog's protocol): the best trial's test accuracy is optimistic"
)
_STATES = {
    optuna.trial.TrialState.COMPLETE: TrialState.COMPLETE,
    optuna.trial.TrialState.PRUNED: TrialState.PRUNED,
    optuna.trial.TrialState.FAIL: TrialState.FAIL,
}


@dataclass(frozen=True)
class TrialSummary:
    """The best or the default trial in ``best.json``: number, full config, value and metrics; with the
    built-in objective, its accuracy on the validation and the test split (None where not measured),
    and with ``refit``, the test accuracy of its configuration trained again on training + validation."""

    trial: int
    config: Mapping[str, Any]
    value: float | None
    metrics: Mapping[str, Any] = field(default_factory=dict)
    validation_accuracy: float | None = None
    test_accuracy: float | None = None
    refit_test_accuracy: float | None = None

    def to_dict(self, *, splits: bool) -> dict[str, Any]:
        out = {
            "trial": self.trial,
            "config": dict(self.config),
            "value": self.value,
            "metrics": dict(self.metrics),
        }
        if splits:
            out.update(validation_accuracy=self.validation_accuracy, test_accuracy=self.test_accuracy)
        if self.refit_test_accuracy is not None:
            out["refit_test_accuracy"] = self.refit_test_accuracy
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> TrialSummary | None:
        if data is None:
            return None
        return cls(
            trial=int(data["trial"]),
            config=dict(data.get("config") or {}),
            value=data.get("value"),
            metrics=dict(data.get("metrics") or {}),
            validation_accuracy=data.get("validation_accuracy"),
            test_accuracy=data.get("test_accuracy"),
            refit_test_accuracy=data.get("refit_test_accuracy"),
        )


@dataclass(frozen=True)
class StudySummary(Mapping[str, Any]):
    """What ``best.json`` holds, as an immutable record.

    It also reads as the mapping ``best.json`` is (``summary["best"]["config"]``, ``dict(summary)``),
    so scripts written against the JSON file work on the record unchanged.
    """

    metric: str = "accuracy"
    direction: str = "maximize"
    counts: Mapping[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    fixed: Mapping[str, Any] = field(default_factory=dict)
    best: TrialSummary | None = None
    default: TrialSummary | None = None
    error_reduction: float | None = None
    #: The split (or metric) ``error_reduction`` is computed on.
    error_reduction_on: str | None = None
    #: Selecting on validation: the error reduction on the validation accuracies.
    validation_error_reduction: float | None = None
    #: With refit: the error reduction between the refitted best and default models, on test.
    refit_error_reduction: float | None = None
    checkpoint: str | None = None
    #: The built-in objective's selection split; None for a Python objective.
    selected_on: str | None = None
    protocol: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """``best.json``'s JSON object (keys that do not apply are left out, as they always were)."""
        splits = self.selected_on is not None
        out: dict[str, Any] = {
            "metric": self.metric,
            "direction": self.direction,
            "counts": dict(self.counts),
            "wall_s": self.wall_s,
            "fixed": dict(self.fixed),
            "best": self.best.to_dict(splits=splits) if self.best is not None else None,
            "default": self.default.to_dict(splits=splits) if self.default is not None else None,
            "error_reduction": self.error_reduction,
            "checkpoint": self.checkpoint,
        }
        optional = {
            "selected_on": self.selected_on,
            "protocol": self.protocol,
            "error_reduction_on": self.error_reduction_on,
            "validation_error_reduction": self.validation_error_reduction,
            "refit_error_reduction": self.refit_error_reduction,
        }
        out.update({k: v for k, v in optional.items() if v is not None})
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StudySummary:
        return cls(
            metric=str(data["metric"]),
            direction=str(data["direction"]),
            counts=dict(data.get("counts") or {}),
            wall_s=float(data.get("wall_s") or 0.0),
            fixed=dict(data.get("fixed") or {}),
            best=TrialSummary.from_dict(data.get("best")),
            default=TrialSummary.from_dict(data.get("default")),
            error_reduction=data.get("error_reduction"),
            error_reduction_on=data.get("error_reduction_on"),
            validation_error_reduction=data.get("validation_error_reduction"),
            refit_error_reduction=data.get("refit_error_reduction"),
            checkpoint=data.get("checkpoint"),
            selected_on=data.get("selected_on"),
            protocol=data.get("protocol"),
        )

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())


def records_from_study(study: optuna.Study) -> list[TrialRecord]:
    """Finished trials as records; interrupted attempts (re-run elsewhere) are left out."""
    out = []
    for t in study.get_trials(deepcopy=False):
        if t.state not in _STATES or t.user_attrs.get("deepspark:interrupted"):
            continue
        metrics, duration_s, worker = read_result(t.user_attrs)
        out.append(
            TrialRecord(
                number=t.number,
                state=_STATES[t.state],
                params=dict(t.user_attrs.get("deepspark:config") or t.params),
                value=t.value if t.state == optuna.trial.TrialState.COMPLETE else None,
                metrics=metrics,
                duration_s=duration_s,
                attempts=int(t.user_attrs.get("deepspark:attempts", 1)),
                worker=worker,
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


def measures_error(metric: str, *, maximize: bool) -> bool:
    """Whether a study's values are accuracies, whose error reduction (default to best) is reported: its
    metric is ``accuracy``, maximised. A minimised one is not (a loss returned as a bare number is named
    ``accuracy``, the default metric): 1 - value is no error rate, and the lower best would read as worse."""
    return metric == "accuracy" and maximize


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
    selected_on: str | None = None,
    test_accuracy: Mapping[int, float] | None = None,
    refit_test_accuracy: Mapping[int, float] | None = None,
    space: SearchSpace | None = None,
) -> StudySummary:
    """Write trials.csv, best.json and accuracy_vs_lr.png; return best.json's content as a record.

    ``selected_on`` is the split the built-in objective's trials report ("validation" or "test"; None
    for a Python objective); ``test_accuracy`` holds the test accuracy measured at the end, by trial
    (the best and the default when selecting on validation). Both then appear beside each other as
    ``validation_accuracy`` and ``test_accuracy`` in ``best.json`` and ``trials.csv``.
    ``refit_test_accuracy`` holds, by trial, the test accuracy of the configuration refitted on training
    + validation (:mod:`deepspark.tuning.refit`), written as ``refit_test_accuracy`` in ``best.json``.
    ``space`` names the plot's width parameter (see :func:`width_param`).
    """
    tests = _split_accuracies(records, selected_on, test_accuracy or {})
    param_names = sorted({k for r in records for k in r.params})
    metric_names = sorted(
        {k for r in records for k, v in r.metrics.items() if not isinstance(v, dict | list)}
    )
    # Replaced whole, not rewritten in place: a driver killed midway left a trials.csv cut after some
    # rows (best.json, written next, still the previous end's), and a report read meanwhile saw one.
    with io.StringIO(newline="") as fh:
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
                *(["validation_accuracy", "test_accuracy"] if selected_on else []),
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
                    *(tests.get(r.number, (None, None)) if selected_on else ()),
                    r.error or "",
                ]
            )
        table = fh.getvalue()
    rundir.write_file_atomic(run_dir / "trials.csv", table.encode("utf-8"))
    summary = summarise(
        records,
        metric=metric,
        maximize=maximize,
        fixed=fixed,
        wall_s=wall_s,
        best_checkpoint=best_checkpoint,
        selected_on=selected_on,
        tests=tests,
        refits=refit_test_accuracy or {},
    )
    text = json.dumps(summary.to_dict(), indent=2, default=str)
    rundir.write_file_atomic(run_dir / "best.json", text.encode("utf-8"))
    try:
        _plot(
            run_dir / "accuracy_vs_lr.png",
            records,
            metric=metric,
            maximize=maximize,
            space=space,
            split=selected_on,
        )
    except Exception:  # a plot is a nicety; never lose the study over it
        _log.exception("could not draw the learning-rate plot")
    return summary


def summarise(
    records: Sequence[TrialRecord],
    *,
    metric: str,
    maximize: bool,
    fixed: Mapping[str, Any],
    wall_s: float,
    best_checkpoint: Path | None,
    selected_on: str | None,
    tests: Mapping[int, tuple[float | None, float | None]],
    refits: Mapping[int, float] | None = None,
) -> StudySummary:
    """The study's summary (best.json): ``tests`` is (validation, test) accuracy by trial, ``refits``
    the refitted configuration's test accuracy by trial."""
    refits = refits or {}
    best, default = best_and_default(records, maximize=maximize)

    def entry(record: TrialRecord | None) -> TrialSummary | None:
        if record is None:
            return None
        validation, test = tests.get(record.number, (None, None))
        return TrialSummary(
            trial=record.number,
            config=dict(record.params),
            value=record.value,
            metrics=dict(record.metrics),
            validation_accuracy=validation,
            test_accuracy=test,
            refit_test_accuracy=refits.get(record.number),
        )

    reduction: float | None = None
    reduction_on: str | None = None
    validation_reduction: float | None = None
    refit_reduction: float | None = None
    if best is not None and default is not None and measures_error(metric, maximize=maximize):
        # The honest figure is on test accuracy, measured once for both at the end; a study without
        # those (a Python objective, a model that never arrived) falls back on the selection metric.
        best_test, default_test = (
            tests.get(best.number, (None, None))[1],
            tests.get(default.number, (None, None))[1],
        )
        if best_test is not None and default_test is not None:
            reduction, reduction_on = error_reduction(default_test, best_test), "test"
        elif best.value is not None and default.value is not None:
            reduction, reduction_on = error_reduction(default.value, best.value), selected_on or metric
        if reduction is None:  # the default made no error: there is none to reduce, on any split
            reduction_on = None
        if selected_on == "validation" and best.value is not None and default.value is not None:
            validation_reduction = error_reduction(default.value, best.value)
        if best.number in refits and default.number in refits:
            refit_reduction = error_reduction(refits[default.number], refits[best.number])
    protocol = None
    if selected_on == "test":
        protocol = TEST_PROTOCOL
    return StudySummary(
        metric=metric,
        direction="maximize" if maximize else "minimize",
        counts={s.value: sum(r.state is s for r in records) for s in TrialState},
        wall_s=wall_s,
        fixed=dict(fixed),
        best=entry(best),
        default=entry(default),
        error_reduction=reduction,
        error_reduction_on=reduction_on,
        validation_error_reduction=validation_reduction,
        refit_error_reduction=refit_reduction,
        checkpoint=str(best_checkpoint) if best_checkpoint else None,
        selected_on=selected_on,
        protocol=protocol,
    )


def _split_accuracies(
    records: Sequence[TrialRecord], selected_on: str | None, test_accuracy: Mapping[int, float]
) -> dict[int, tuple[float | None, float | None]]:
    """(validation accuracy, test accuracy) by trial: the trial's value is the accuracy on the split it
    was selected on; the other is known only where it was measured (test: the best and the default)."""
    if selected_on is None:
        return {}
    out: dict[int, tuple[float | None, float | None]] = {}
    for r in records:
        if r.state is not TrialState.COMPLETE:
            continue
        if selected_on == "test":
            out[r.number] = (None, r.value)
        else:
            out[r.number] = (r.value, test_accuracy.get(r.number))
    return out


LEARNING_RATES = ("learning_rate", "lr")


def width_param(
    records: Sequence[TrialRecord], *, lr: str | None = None, space: SearchSpace | None = None
) -> str | None:
    """The parameter that splits the sensitivity plot into lines: a searched integer or choice
    parameter, other than the learning rate, with the most distinct values among the trials (ties: by
    name); None when none varies.

    With ``space``, the candidates are the space's ``int``/``choice``/``grid`` parameters, whatever their
    names. Without it (a report that has only the trials) they are read from the trials: a parameter
    whose values are all integers or labels and that varies across the non-default trials.
    """
    trials = [r for r in records if not r.is_default]
    skip = {lr or "", *LEARNING_RATES}
    if space is not None:
        names = sorted(
            n for n, p in space.params.items() if p["type"] in ("int", "choice", "grid") and n not in skip
        )
    else:
        names = sorted({k for r in trials for k in r.params} - skip)
    best, best_count = None, 1
    for name in names:
        values = [r.params.get(name) for r in trials if name in r.params]
        if not values or (space is None and not all(_discrete(v) for v in values)):
            continue
        count = len({repr(v) for v in values})
        if count > best_count:
            best, best_count = name, count
    return best


def _discrete(value: Any) -> bool:
    if isinstance(value, bool | str):
        return True
    return isinstance(value, int | float) and math.isfinite(value) and float(value).is_integer()


def learning_rate_param(records: Sequence[TrialRecord]) -> str | None:
    return next((n for n in LEARNING_RATES if any(n in r.params for r in records)), None)


def plot_sensitivity(
    ax: Any,
    records: Sequence[TrialRecord],
    *,
    metric: str,
    maximize: bool,
    by: str | None = None,
    space: SearchSpace | None = None,
    split: str | None = None,
) -> bool:
    """Draw the blog's figure on ``ax``: error (log) vs learning rate (log), a line per width.

    ``split`` names the split the trials' values were measured on ("validation" or "test"; None for a
    Python objective, whose values are whatever it returned): it is what the axis says.

    Failed trials (diverged or raised) are crosses along the top edge at their learning rate, pruned
    trials hollow circles at their last reported value; the default configuration is a star, not
    joined to the lines (it may train differently, e.g. for fewer epochs). With an accuracy-like
    metric (maximised, within [0, 1]) the y axis is the error 1 - metric. Returns False (nothing drawn)
    when no trial has a learning rate.
    """
    lr = learning_rate_param(records)
    if lr is None:
        return False
    rated = [r for r in records if _finite(r.params.get(lr))]
    scored = [r for r in rated if r.state is TrialState.COMPLETE and _finite(r.value)]
    values = [float(r.value or 0.0) for r in scored]
    as_error = maximize and all(0.0 <= v <= 1.0 for v in values)

    def y(value: float) -> float:
        return 1.0 - value if as_error else value

    by = by or width_param(rated, lr=lr, space=space)
    groups: dict[Any, list[TrialRecord]] = {}
    for r in scored:
        if not r.is_default:
            groups.setdefault(r.params.get(by) if by else "trials", []).append(r)

    def order(key: Any) -> tuple[int, float, str]:  # widths numerically, anything else after, by name
        if isinstance(key, int | float) and not isinstance(key, bool):
            return (0, float(key), "")
        return (1, 0.0, str(key))

    for key in sorted(groups, key=order):
        rs = sorted(groups[key], key=lambda r: float(r.params[lr]))
        ax.plot(
            [float(r.params[lr]) for r in rs],
            [y(float(r.value or 0.0)) for r in rs],
            "o-",
            label=f"{by}={key}" if by else "trials",
        )
    for r in scored:
        if r.is_default:
            ax.plot(float(r.params[lr]), y(float(r.value or 0.0)), "k*", markersize=14, label="default")
    pruned = [
        (float(r.params[lr]), y(r.intermediate[max(r.intermediate)]))
        for r in rated
        if r.state is TrialState.PRUNED and r.intermediate
    ]
    if pruned:
        ax.plot(*zip(*pruned, strict=True), "o", mfc="none", color="gray", label="pruned (last value)")
    ys = [y(v) for v in values] + [p[1] for p in pruned]
    positive = [v for v in ys if v > 0]
    failed = [r for r in rated if r.state is TrialState.FAIL]
    if failed:
        top = max(positive) * 1.3 if positive else 1.0
        diverged = [r for r in failed if "diverg" in (r.error or "").lower()]
        for group, label, marker in (
            (diverged, "diverged", "v"),
            ([r for r in failed if r not in diverged], "failed", "x"),
        ):
            if group:
                xs = [float(r.params[lr]) for r in group]
                ax.plot(xs, [top] * len(xs), marker, color="tab:red", markersize=9, label=label)
        positive.append(top)
    ax.set_xscale("log")
    if ys and all(v > 0 for v in ys):
        ax.set_yscale("log")
    readable_log_ticks(ax.xaxis, [float(r.params[lr]) for r in rated])
    readable_log_ticks(ax.yaxis, positive)
    ax.set_xlabel(lr.replace("_", " "))
    quantity = f"error (1 - {metric})" if as_error else metric
    ax.set_ylabel(f"{split} {quantity}" if split else quantity)
    title = f"{split + ' ' if split else ''}{'error' if as_error else metric} vs {lr.replace('_', ' ')}"
    ax.set_title(title[:1].upper() + title[1:] + (f" by {by}" if by else ""))
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    return True


def readable_log_ticks(axis: Any, values: Sequence[float]) -> None:
    """On a log axis spanning less than a decade matplotlib shows one labelled tick or none: label
    a few round values inside the range instead."""
    positive = [v for v in values if v > 0]
    if not positive or axis.get_scale() != "log":
        return
    low, high = min(positive), max(positive)
    if high / low >= 10:
        return
    import matplotlib.ticker as mticker

    if high == low:
        low, high = low / 1.5, high * 1.5
    ticks = sorted({float(f"{v:.2g}") for v in _geomspace(low, high, 5)})
    axis.set_major_locator(mticker.FixedLocator(ticks))
    axis.set_major_formatter(mticker.FuncFormatter(lambda v, _pos: f"{v:.3g}"))
    axis.set_minor_formatter(mticker.NullFormatter())


def _geomspace(low: float, high: float, n: int) -> list[float]:
    step = (math.log(high) - math.log(low)) / (n - 1)
    return [math.exp(math.log(low) + i * step) for i in range(n)]


def _plot(
    path: Path,
    records: Sequence[TrialRecord],
    *,
    metric: str,
    maximize: bool,
    space: SearchSpace | None,
    split: str | None,
) -> None:
    if not skip_unless("matplotlib", feature="the learning-rate plot (accuracy_vs_lr.png)"):
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    try:
        drawn = plot_sensitivity(ax, records, metric=metric, maximize=maximize, space=space, split=split)
    except BaseException:
        plt.close(fig)
        raise
    if not drawn:
        plt.close(fig)
        return
    fig.tight_layout()
    rundir.write_figure_atomic(fig, path)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)
