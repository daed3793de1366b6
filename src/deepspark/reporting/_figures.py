"""The report's figures. Each function returns a matplotlib Figure, or a sentence saying why there is
nothing to draw yet (too few trials, no learning rate, a single run for the scaling plot...).

Where Optuna draws the figure (importance, parallel coordinates, history by trial number), its own
``optuna.visualization.matplotlib`` function is used as is.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import optuna

from deepspark.reporting._runs import StudyRun, TrainingRun
from deepspark.tuning.report import plot_sensitivity, readable_log_ticks
from deepspark.tuning.trial import read_result

__all__ = ["Drawn", "floats", "scaling", "study_figures", "training_figures"]

Drawn = Any  # a matplotlib Figure, or a str: why it was not drawn

_STATE_COLOURS = {
    optuna.trial.TrialState.COMPLETE: "tab:blue",
    optuna.trial.TrialState.PRUNED: "tab:gray",
    optuna.trial.TrialState.FAIL: "tab:red",
    optuna.trial.TrialState.RUNNING: "tab:orange",
}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _optuna_figure(draw: Callable[..., Any], study: optuna.Study, **kwargs: Any) -> Drawn:
    plt = _pyplot()
    # Optuna's plots switch the global style to ggplot; keep that to their own figures.
    with warnings.catch_warnings(), plt.style.context("default"):
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # A searched parameter that kept one value gets identical y limits in the parallel-coordinate
        # plot; matplotlib widens them itself, and its warning reached the end of `deepspark tune`.
        warnings.filterwarnings("ignore", "Attempting to set identical", UserWarning)
        try:
            ax = draw(study, **kwargs)
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            return f"Optuna could not draw it: {exc}"
    fig = ax.get_figure() if hasattr(ax, "get_figure") else ax.flat[0].get_figure()
    fig.set_size_inches(7, 4.5)
    fig.tight_layout()
    return fig


def _complete(run: StudyRun) -> list[optuna.trial.FrozenTrial]:
    return [t for t in run.trials() if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None]


def study_figures(run: StudyRun, *, by: str | None = None) -> dict[str, Drawn]:
    """name -> figure (or the reason it is missing), in the order the report shows them."""
    plt = _pyplot()
    out: dict[str, Drawn] = {}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if plot_sensitivity(ax, run.records, metric=run.metric, maximize=run.maximize, by=by, split=run.split):
        fig.tight_layout()
        out["sensitivity"] = fig
    else:
        plt.close(fig)
        out["sensitivity"] = "no finished trial has a learning rate (learning_rate or lr)"
    complete = _complete(run)
    searched = {n for t in complete for n, d in t.distributions.items() if not d.single()}
    if len(complete) < 2 or not searched:
        reason = f"needs two complete trials and a searched parameter ({len(complete)} complete so far)"
        out["importance"] = out["parallel"] = reason
    else:
        out["importance"] = _optuna_figure(optuna.visualization.matplotlib.plot_param_importances, run.study)
        out["parallel"] = _optuna_figure(optuna.visualization.matplotlib.plot_parallel_coordinate, run.study)
    if complete:
        out["history"] = _optuna_figure(optuna.visualization.matplotlib.plot_optimization_history, run.study)
    else:
        out["history"] = "no complete trial yet"
    out["history_time"] = _history_by_time(run)
    out["intermediate"] = _intermediate(run)
    out["timeline"] = _timeline(run)
    return out


def _seconds(run: StudyRun, when: Any) -> float:
    span = run.span()
    return (when - span[0]).total_seconds() if span else 0.0


def _history_by_time(run: StudyRun) -> Drawn:
    complete = sorted(
        (t for t in _complete(run) if t.datetime_complete is not None),
        key=lambda t: (t.datetime_complete, t.number),
    )
    if not complete:
        return "no complete trial yet"
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [_seconds(run, t.datetime_complete) / 60 for t in complete]
    values = [float(t.value or 0.0) for t in complete]
    pick = max if run.maximize else min
    best = [pick(values[: i + 1]) for i in range(len(values))]
    ax.plot(xs, values, "o", color="tab:blue", alpha=0.5, label="trial value")
    ax.step(xs, best, where="post", color="tab:red", label="best so far")
    ax.set_xlabel("wall time since the first trial started (min)")
    ax.set_ylabel(run.metric)
    ax.set_title("Best value so far vs wall time")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _intermediate(run: StudyRun) -> Drawn:
    trials = [t for t in run.trials() if t.intermediate_values]
    if not trials:
        return "no trial reported a per-epoch value"
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    labelled: set[str] = set()
    values = [v for t in trials for v in t.intermediate_values.values()]
    as_error = run.maximize and all(0.0 <= v <= 1.0 for v in values)
    for t in sorted(trials, key=lambda t: t.number):
        steps = sorted(t.intermediate_values)
        ys = [1.0 - t.intermediate_values[s] if as_error else t.intermediate_values[s] for s in steps]
        state = t.state.name.lower()
        style = {"pruned": "--", "running": ":"}.get(state, "-")
        colour = _STATE_COLOURS.get(t.state, "tab:purple")
        label = None if state in labelled else state
        labelled.add(state)
        ax.plot(steps, ys, style, color=colour, alpha=0.7, label=label)
        if t.state == optuna.trial.TrialState.PRUNED:
            ax.plot(steps[-1], ys[-1], "x", color="black", markersize=8)
    if optuna.trial.TrialState.PRUNED in {t.state for t in trials}:
        ax.plot([], [], "x", color="black", label="pruned here")
    if as_error and all(v < 1.0 for v in values):
        ax.set_yscale("log")
        readable_log_ticks(ax.yaxis, [1.0 - v for v in values])
    ax.set_xlabel("step (epoch)")
    quantity = f"error (1 - {run.metric})" if as_error else run.metric
    ax.set_ylabel(f"{run.split} {quantity}" if run.split else quantity)
    ax.set_title("Per-epoch curves of every trial")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _slot(worker: str) -> str:
    """'host:pid:slot3:attempt1' -> 'host slot3': a resubmitted task keeps its slot's row."""
    parts = worker.split(":")
    slot = next((p for p in parts if re.fullmatch(r"slot\d+", p)), None)
    return f"{parts[0]} {slot}" if slot else worker


def _timeline(run: StudyRun) -> Drawn:
    trials = [t for t in run.trials() if run.started(t) is not None]
    if not trials:
        return "no trial has started yet"
    span = run.span()
    end_of_run = span[1] if span else None
    rows: dict[str, list[optuna.trial.FrozenTrial]] = {}
    for t in trials:
        worker = read_result(t.user_attrs)[2]
        rows.setdefault(_slot(worker) if worker else "(not yet recorded)", []).append(t)
    names = sorted(rows, key=lambda n: (n.startswith("("), n))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.5 * len(names)))
    for i, name in enumerate(names):
        for t in rows[name]:
            start = _seconds(run, run.started(t))
            end = _seconds(run, t.datetime_complete or end_of_run)
            running = t.state == optuna.trial.TrialState.RUNNING
            ax.barh(
                i,
                max(end - start, 1e-3),
                left=start,
                color=_STATE_COLOURS.get(t.state, "tab:purple"),
                edgecolor="black",
                hatch="//" if running else None,
                alpha=0.8,
            )
            ax.text(start + (end - start) / 2, i, str(t.number), ha="center", va="center", fontsize=7)
    from matplotlib.patches import Patch

    handles = [Patch(color=colour, label=state.name.lower()) for state, colour in _STATE_COLOURS.items()]
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_ylim(-0.6, len(names) - 0.4)
    ax.set_xlabel("seconds since the first trial started")
    ax.set_title("Timeline: which slot ran which trial when (numbers are trial numbers)", fontsize=10)
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def observed_parallelism(run: StudyRun) -> int:
    """The recorded parallelism, else the most trials seen running at one moment."""
    recorded = run.cluster.get("parallelism")
    if isinstance(recorded, int) and recorded > 0:
        return recorded
    events = []
    for t in run.trials():
        begun = run.started(t)
        if begun is not None and t.datetime_complete is not None:
            events += [(begun, 1), (t.datetime_complete, -1)]
    level = peak = 0
    for _, step in sorted(events, key=lambda e: (e[0], e[1])):
        level += step
        peak = max(peak, level)
    return max(peak, 1)


def wall_seconds(run: StudyRun) -> float:
    return run.busy_seconds()


def _unlike_trial_sets(runs: Sequence[StudyRun]) -> str | None:
    """Why the finished ``runs`` are not runs of one trial set (the same space and number of finished
    trials), or None: the wall times of studies of other sizes or spaces give no speedup."""
    sets: dict[tuple[str, int], list[str]] = {}
    for run in runs:
        if not run.running():
            key = (json.dumps(run.config.get("space"), sort_keys=True, default=str), len(run.records))
            sets.setdefault(key, []).append(run.path.name)
    if len(sets) < 2:
        return None
    described = "; ".join(
        f"{', '.join(names)}: {count} finished trials" for (_, count), names in sets.items()
    )
    return f"the studies are not runs of one trial set (the same space and number of trials): {described}"


def scaling(runs: Sequence[StudyRun]) -> Drawn:
    """Wall time and speedup vs parallel trials, from several runs of the same trial set."""
    unlike = _unlike_trial_sets(runs)
    if unlike is not None:
        return unlike
    points: dict[int, float] = {}
    for run in runs:
        if run.running():
            continue
        wall = wall_seconds(run)
        if wall > 0:
            p = observed_parallelism(run)
            points[p] = min(wall, points.get(p, math.inf))
    if len(points) < 2:
        return "needs finished studies at two or more parallelism levels"
    ps = sorted(points)
    base_p, base_t = ps[0], points[ps[0]]
    speedup = [base_t / points[p] for p in ps]
    ideal = [p / base_p for p in ps]
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(ps, [points[p] / 60 for p in ps], "o-", label="measured")
    left.plot(ps, [base_t / 60 / i for i in ideal], "k--", label="ideal")
    left.set_xlabel("parallel trials")
    left.set_ylabel("wall time (min)")
    left.set_title("Wall time vs parallel trials")
    right.plot(ps, speedup, "o-", label="measured")
    right.plot(ps, ideal, "k--", label="ideal (linear)")
    for p, s, i in zip(ps, speedup, ideal, strict=True):
        right.annotate(f"{s:.2f}x, eff. {s / i:.0%}", (p, s), textcoords="offset points", xytext=(4, -12))
    right.set_xlabel("parallel trials")
    right.set_ylabel(f"speedup over {base_p} parallel")
    right.set_title("Speedup")
    for ax in (left, right):
        ax.set_xticks(ps)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def scaling_table(runs: Sequence[StudyRun]) -> list[tuple[int, float, float, float]]:
    """(parallelism, wall s, speedup, efficiency) per finished run, against the least parallel one."""
    if _unlike_trial_sets(runs) is not None:
        return []
    rows = sorted(
        (observed_parallelism(r), wall_seconds(r)) for r in runs if not r.running() and wall_seconds(r) > 0
    )
    if not rows:
        return []
    base_p, base_t = rows[0]
    return [(p, t, base_t / t, (base_t / t) / (p / base_p)) for p, t in rows]


# ------------------------------------------------------------------------------------------ training
def floats(rows: Sequence[Any], key: str) -> list[float | None]:
    """Column ``key`` of history.csv's rows as numbers; None where a cell is empty, missing or not a number."""
    out: list[float | None] = []
    for row in rows:
        try:
            out.append(float(row.get(key, "")))
        except (TypeError, ValueError):
            out.append(None)
    return out


def training_figures(run: TrainingRun) -> dict[str, Drawn]:
    if not run.history:
        reason = "history.csv has no round yet"
        return {"training_curves": reason, "training_throughput": reason, "time_split": reason}
    plt = _pyplot()
    h = run.history
    epochs = [e or 0.0 for e in floats(h, "epoch")]
    out: dict[str, Drawn] = {}

    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    loss = floats(h, "train_loss")
    loss_ax.plot(
        [e for e, v in zip(epochs, loss, strict=True) if v is not None], [v for v in loss if v is not None]
    )
    if all(v is None or v > 0 for v in loss):
        loss_ax.set_yscale("log")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("train loss")
    loss_ax.set_title("Training loss per round")
    accuracy = floats(h, "test_accuracy")
    tested = [(e, a) for e, a in zip(epochs, accuracy, strict=True) if a is not None]
    if tested:
        acc_ax.plot([e for e, _ in tested], [100 * a for _, a in tested], "o-", color="tab:red")
    else:
        acc_ax.text(0.5, 0.5, "no test accuracy recorded", ha="center", transform=acc_ax.transAxes)
    acc_ax.set_xlabel("epoch")
    acc_ax.set_ylabel("test accuracy (%)")
    acc_ax.set_title("Test accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    out["training_curves"] = fig

    fig, (speed_ax, bytes_ax) = plt.subplots(1, 2, figsize=(10, 4))
    samples, seconds, sent = floats(h, "samples"), floats(h, "seconds"), floats(h, "bytes")
    rates = [(e, s / t) for e, s, t in zip(epochs, samples, seconds, strict=True) if s is not None and t]
    speed_ax.plot([e for e, _ in rates], [r for _, r in rates], "o-")
    speed_ax.set_xlabel("epoch")
    speed_ax.set_ylabel("images / s")
    speed_ax.set_title("Throughput per round")
    total, cumulative = 0.0, []
    for b in sent:
        total += b or 0.0
        cumulative.append(total / 1e6)
    bytes_ax.plot(epochs, cumulative, "o-", color="tab:green")
    bytes_ax.set_xlabel("epoch")
    bytes_ax.set_ylabel("MB communicated (cumulative)")
    bytes_ax.set_title(f"Bytes communicated: {total / 1e6:.1f} MB in all")
    for ax in (speed_ax, bytes_ax):
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    out["training_throughput"] = fig

    split = time_split(run)
    fig, ax = plt.subplots(figsize=(8, 2.2))
    left = 0.0
    for (name, value), colour in zip(split.items(), ("tab:blue", "tab:orange", "tab:gray"), strict=False):
        ax.barh(0, value, left=left, color=colour, label=f"{name} {value:.1f} s")
        left += value
    ax.set_yticks([])
    ax.set_xlabel("seconds (sum over rounds)")
    ax.set_title("Where the time went")
    ax.legend(fontsize=8, ncols=3, loc="upper center", bbox_to_anchor=(0.5, -0.45))
    fig.tight_layout()
    out["time_split"] = fig
    return out


def time_split(run: TrainingRun) -> dict[str, float]:
    """compute / communication / waiting seconds summed over the rounds of history.csv."""
    compute = sum(v or 0.0 for v in floats(run.history, "compute_s"))
    comm = sum(v or 0.0 for v in floats(run.history, "comm_s"))
    rounds = sum(v or 0.0 for v in floats(run.history, "seconds"))
    return {"compute": compute, "communication": comm, "waiting": max(0.0, rounds - compute - comm)}
