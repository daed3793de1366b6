"""``report()``: one self-contained HTML page (figures inlined as base64 PNG) for run directories.

The report only reads the run directories (see :mod:`deepspark.reporting._runs`); it writes the HTML
and a PNG per figure next to it, wherever ``output`` says.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import logging
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepspark import rundir
from deepspark.errors import ConfigError
from deepspark.reporting import _figures
from deepspark.reporting._runs import StudyRun, TrainingRun, open_runs
from deepspark.tuning.report import TEST_PROTOCOL, best_and_default, error_reduction, measures_error

__all__ = ["Report", "report"]

_log = logging.getLogger(__name__)

_CAPTIONS = {
    "sensitivity": "Sensitivity: error on the split trials are chosen on vs learning rate, one line per "
    "width; the star is the default configuration (not joined to the lines); crosses at the top are "
    "failed or diverged trials.",
    "importance": "Parameter importance (Optuna's evaluator).",
    "parallel": "Parallel coordinates of the complete trials (Optuna).",
    "history": "Optimisation history by trial number (Optuna).",
    "history_time": "Best value so far vs wall time.",
    "intermediate": "Per-epoch values of every trial; dashed lines end where a trial was pruned (x).",
    "timeline": "Timeline: the slot that ran each trial, and when; hatched bars are still running.",
    "scaling": "Scaling: wall time and speedup of the same trial set at different parallelism.",
    "training_curves": "Training loss per round and test accuracy.",
    "training_throughput": "Images per second per round, and bytes communicated.",
    "time_split": "Time split over the rounds: compute, communication, waiting.",
}


@dataclass(frozen=True)
class Report:
    """What :func:`report` wrote: the HTML page and each figure's PNG (name -> path)."""

    html: Path
    figures: Mapping[str, Path] = field(default_factory=dict)
    missing: Mapping[str, str] = field(default_factory=dict)


def report(
    run_dirs: str | Path | Sequence[str | Path],
    *,
    output: str | Path = "report.html",
    by: str | None = None,
) -> Report:
    """Write a self-contained HTML report of one or more run directories (studies or training runs).

    Read-only towards the run directories: a study's journal is read from a private copy, so a study
    still running is reported as it stands (its running trials shown as such) and nothing in the run
    directory changes. Several studies of the same trial set at different parallelism add the scaling
    figure. ``by`` names the parameter that splits the sensitivity plot into lines (default: the
    searched integer or choice parameter with the most distinct values). PNGs of the figures are
    written next to ``output`` as ``<stem>-<figure>.png``.
    """
    paths = [run_dirs] if isinstance(run_dirs, str | Path) else list(run_dirs)
    out = Path(output)
    if out.suffix.lower() not in (".html", ".htm"):
        raise ConfigError(f"output: expected a path ending in .html, got {str(output)!r}")
    if out.exists() and out.is_dir():
        raise ConfigError(f"output: {out} is a directory; expected an .html file path")
    rundir.check_writable(out, name="output")  # before any work; it leaves nothing behind
    sections: list[str] = []
    figures: dict[str, Path] = {}
    missing: dict[str, str] = {}
    with open_runs(paths) as runs:
        if by is not None:
            _check_by(runs, by)
        out.parent.mkdir(parents=True, exist_ok=True)  # only once every run directory opened
        prefixes = _prefixes(runs)
        for run, prefix in zip(runs, prefixes, strict=True):
            if isinstance(run, StudyRun):
                summary = _study_summary(run)
                drawn = _figures.study_figures(run, by=by)
            else:
                summary = _training_summary(run)
                drawn = _figures.training_figures(run)
            blocks = _save(drawn, out, prefix, figures, missing)
            sections.append(_section(run, summary, blocks))
        studies = [r for r in runs if isinstance(r, StudyRun)]
        if len(studies) > 1:
            blocks = _save({"scaling": _figures.scaling(studies)}, out, "", figures, missing)
            rows = _figures.scaling_table(studies)
            table = {
                f"{p} parallel": f"wall {t / 60:.2f} min, speedup {s:.2f}x, efficiency {e:.0%}"
                for p, t, s, e in rows
            }
            sections.append(_block("Scaling", _table(table) + "".join(blocks)))
    title = "deepspark report: " + ", ".join(html.escape(Path(p).name or str(p)) for p in paths)
    page = _PAGE.format(
        title=title,
        created=_dt.datetime.now().isoformat(timespec="seconds"),
        body="\n".join(sections),
    )
    rundir.write_file_atomic(out, page.encode("utf-8"))
    return Report(html=out, figures=figures, missing=missing)


def _check_by(runs: Sequence[Any], by: str) -> None:
    """Refuse a ``by`` that is not a parameter of every study: its lines would all be ``by=None``."""
    for run in runs:
        if not isinstance(run, StudyRun):
            continue
        space = run.config.get("space")
        names = set(space) if isinstance(space, Mapping) else set()
        names.update(k for r in run.records for k in r.params)
        if by not in names:
            raise ConfigError(
                f"by: expected a parameter of the study in {run.path} (one of {sorted(names)}), got {by!r}"
            )


def _prefixes(runs: Sequence[Any]) -> list[str]:
    if len(runs) == 1:
        return [""]
    out: list[str] = []
    for i, run in enumerate(runs):
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", run.path.resolve().name) or f"run{i}"
        out.append(f"{name}-" if f"{name}-" not in out else f"{name}{i}-")
    return out


def _save(
    drawn: Mapping[str, Any], out: Path, prefix: str, figures: dict[str, Path], missing: dict[str, str]
) -> list[str]:
    """Write each figure's PNG next to the HTML; return its HTML blocks (inlined PNG or the reason)."""

    blocks = []
    for name, fig in drawn.items():
        key = f"{prefix}{name}"
        caption = html.escape(_CAPTIONS.get(name, name))
        if isinstance(fig, str):
            missing[key] = fig
            blocks.append(
                f'<figure class="missing"><figcaption>{caption}<br><em>Not drawn: '
                f"{html.escape(fig)}</em></figcaption></figure>"
            )
            continue
        path = out.with_name(f"{out.stem}-{key}.png")
        data = rundir.write_figure_atomic(fig, path)
        figures[key] = path
        encoded = base64.b64encode(data).decode("ascii")
        blocks.append(
            f'<figure id="{html.escape(key)}"><img alt="{html.escape(name)}" '
            f'src="data:image/png;base64,{encoded}"><figcaption>{caption}</figcaption></figure>'
        )
    return blocks


# ------------------------------------------------------------------------------------------- summary
def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
    return str(value)


def _minutes(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _study_summary(run: StudyRun) -> dict[str, str]:
    best, default = best_and_default(run.records, maximize=run.maximize)
    metric = run.metric
    out: dict[str, str] = {
        "kind": "tuning study",
        "metric": f"{metric} ({'max' if run.maximize else 'min'}imize)",
    }
    split = run.split
    # best.json holds what the study measured at its end (test, refit); shown where it names the same
    # trial as the journal (a study still running may have found a better one since).
    saved = run.saved_summary(best, default)
    for key, record in (("best", best), ("default", default)):
        if record is None:
            continue
        out[key] = f"{split + ' ' if split else ''}{metric} {_fmt(record.value)} (trial {record.number})"
        entry = saved.get(key)
        if isinstance(entry, Mapping):
            if split == "validation" and entry.get("test_accuracy") is not None:
                out[key] += f"; test accuracy {_fmt(entry['test_accuracy'])}"
            if entry.get("refit_test_accuracy") is not None:
                out[key] += (
                    f"; refitted on training + validation: test accuracy {_fmt(entry['refit_test_accuracy'])}"
                )
        if key == "best":
            out["best configuration"] = _fmt(dict(record.params))
            if split == "test":
                out["protocol"] = TEST_PROTOCOL
    if best is not None and default is not None and measures_error(metric, maximize=run.maximize):
        if saved.get("error_reduction") is not None:
            on = saved.get("error_reduction_on") or split or metric
            out["error reduction"] = (
                f"{saved['error_reduction']:.1%} (relative drop in {on} error, default to best)"
            )
        elif best.value is not None and default.value is not None:
            reduction = error_reduction(default.value, best.value)
            if reduction is not None:
                on = split or metric
                out["error reduction"] = f"{reduction:.1%} (relative drop in {on} error, default to best)"
        if saved.get("refit_error_reduction") is not None:
            out["error reduction, refitted"] = f"{saved['refit_error_reduction']:.1%} (on test)"
    counts: dict[str, int] = {}
    for t in run.trials():
        counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
    out["trials by state"] = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none yet"
    if run.running():
        out["status"] = (
            f"PARTIAL: {len(run.running())} trial(s) still running (as of {run.last_write:%Y-%m-%d %H:%M:%S})"
        )
    wall = _figures.wall_seconds(run)
    durations = [r.duration_s for r in run.records if r.duration_s > 0]
    # While any trial ran: best.json's wall_s is the driver's whole call (Spark's start, the reports, the
    # refit), so the two are named apart; a resumed study's downtime is in neither.
    out["wall time of the trials"] = f"{_minutes(wall)} (while any trial ran)"
    if durations:
        out["per-trial time"] = (
            f"mean {_minutes(statistics.fmean(durations))}, median {_minutes(statistics.median(durations))}, "
            f"max {_minutes(max(durations))}"
        )
    cluster = run.cluster
    if cluster:
        out["cluster"] = (
            f"master {cluster.get('master')}, {cluster.get('cores')} cores, {cluster.get('slots')} slots, "
            f"{cluster.get('parallelism')} parallel trials, {cluster.get('threads_per_trial')} thread(s) per trial"
        )
    else:
        out["parallel trials (observed)"] = str(_figures.observed_parallelism(run))
    config = run.config
    # A study of a directory given with --data-dir names it there (its "dataset" is null).
    named = {**config, "dataset": config.get("dataset") or config.get("data_dir")}
    for key in ("dataset", "model", "sampler", "pruner"):
        if named.get(key) is not None:
            out[key] = str(named[key])
    return out


def _training_summary(run: TrainingRun) -> dict[str, str]:
    config = run.config
    out: dict[str, str] = {"kind": "training run"}
    for key in ("strategy", "workers", "model", "data", "threads_per_worker"):
        if config.get(key) is not None:
            out[key] = _fmt(config[key]) if not isinstance(config[key], dict) else "(a spec)"
    if isinstance(config.get("config"), Mapping):
        out["training config"] = _fmt(config["config"])
    # history.csv and metadata.json are read as they are: a cell that is not a number is left out, never
    # a traceback, and a missing column is not shown as 0.
    (accuracy,) = _figures.floats([run.model_metrics], "test_accuracy")
    if accuracy is None:
        tested = [a for a in _figures.floats(run.history, "test_accuracy") if a is not None]
        accuracy = tested[-1] if tested else None
    if accuracy is not None:
        out["test accuracy"] = f"{accuracy:.4f}"
    if run.history:
        last = run.history[-1]
        out["rounds"] = f"{len(run.history)} (epoch {last.get('epoch')})"
        (elapsed,) = _figures.floats([last], "elapsed_s")
        if elapsed is not None:
            out["wall time (training rounds)"] = _minutes(elapsed)
        split = _figures.time_split(run)
        total = sum(split.values()) or 1.0
        out["time split"] = ", ".join(f"{k} {v:.1f} s ({v / total:.0%})" for k, v in split.items())
    else:
        out["status"] = "no round recorded yet"
    return out


# ---------------------------------------------------------------------------------------------- HTML
def _table(rows: Mapping[str, str]) -> str:
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows.items())
    return f'<table class="summary">{cells}</table>'


def _block(title: str, body: str) -> str:
    return f"<section><h2>{html.escape(title)}</h2>{body}</section>"


def _section(run: StudyRun | TrainingRun, summary: Mapping[str, str], blocks: Sequence[str]) -> str:
    title = f"{run.path} ({'study' if isinstance(run, StudyRun) else 'training run'})"
    return _block(title, _table(summary) + "\n".join(blocks))


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1100px; color: #222; }}
table.summary {{ border-collapse: collapse; margin: 1em 0; }}
table.summary th {{ text-align: left; padding: 0.2em 1em 0.2em 0; vertical-align: top; }}
table.summary td {{ padding: 0.2em 0; }}
figure {{ margin: 1.5em 0; }}
figure img {{ max-width: 100%; border: 1px solid #ddd; }}
figure.missing {{ color: #777; }}
section {{ border-top: 2px solid #444; margin-top: 2em; }}
</style></head>
<body>
<h1>{title}</h1>
<p>Written {created} by <code>deepspark report</code>; read-only view of the run directories.</p>
{body}
</body></html>
"""
