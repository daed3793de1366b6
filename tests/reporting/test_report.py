"""deepspark report: a self-contained HTML page of studies and training runs that never touches them."""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

from deepspark.cli import main
from deepspark.errors import ConfigError
from deepspark.reporting import report

SPACE = {
    "learning_rate": {"type": "loguniform", "low": 1e-3, "high": 1e-1},
    "hidden": {"type": "choice", "values": [64, 128, 256]},
    "epochs": 3,
}
DEFAULT = {"learning_rate": 0.01, "hidden": 128, "epochs": 2}


def _sensitive(config, reporter):
    """An error curve with its minimum near lr=0.01, better with width; learning rates above 0.04 "diverge"."""
    lr, width = config["learning_rate"], config["hidden"]
    if lr > 0.04:
        raise FloatingPointError("training diverged: loss is nan")
    error = 0.01 * (1 + math.log10(lr / 0.01) ** 2) * (256 / width) ** 0.3
    for epoch in range(1, config["epochs"] + 1):
        reporter.report(epoch, 1 - error * (1 + 1 / epoch), final=epoch == config["epochs"])
    return {"accuracy": 1 - error}


def _pixels_vary(png: bytes) -> bool:
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    colours = image.getcolors(maxcolors=1 << 16)
    return colours is None or len(colours) > 8


@pytest.fixture(scope="module")
def study_dir(spark, tmp_path_factory, request) -> Path:
    from pyspark import cloudpickle

    from deepspark.tuning import tune

    cloudpickle.register_pickle_by_value(request.module)  # the autouse fixture runs after this one

    run = tmp_path_factory.mktemp("study") / "run"
    tune(
        _sensitive,
        space=SPACE,
        trials=8,
        parallelism=2,
        sampler="random",
        pruner="none",
        default_config=DEFAULT,
        run_dir=run,
        seed=3,
    )
    return run


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _inlined(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def test_study_report_has_every_figure_with_data_and_is_self_contained(study_dir, tmp_path) -> None:
    result = report(study_dir, output=tmp_path / "out" / "report.html")
    expected = {
        "sensitivity",
        "importance",
        "parallel",
        "history",
        "history_time",
        "intermediate",
        "timeline",
    }
    assert set(result.figures) == expected, result.missing
    for name, path in result.figures.items():
        assert path.parent == tmp_path / "out" and path.name == f"report-{name}.png"
        assert _pixels_vary(path.read_bytes()), name
    page = result.html.read_text(encoding="utf-8")
    images = _inlined(page)
    assert len(images) == len(expected) and all(_pixels_vary(png) for png in images)
    # Self-contained: nothing is fetched from anywhere.
    assert not re.search(r'(src|href)="(?!data:)', page) and "<script" not in page
    assert "best configuration" in page and "error reduction" in page
    assert "complete 7, fail 1" in page  # the one learning rate above 0.04 (seed 3) "diverged"
    # The trials' span, named apart from best.json's wall_s (the driver's whole call): both were "wall time".
    assert re.search(r"<th>wall time of the trials</th><td>[^<]+ \(while any trial ran\)</td>", page)


def test_sensitivity_lines_follow_the_width_parameter_from_the_trials(study_dir, tmp_path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from deepspark.reporting._runs import open_runs
    from deepspark.tuning.report import plot_sensitivity, width_param

    with open_runs([study_dir]) as (run,):
        assert width_param(run.records) == "hidden"
        fig, ax = plt.subplots()
        assert plot_sensitivity(ax, run.records, metric="accuracy", maximize=True)
        labels = ax.get_legend_handles_labels()[1]
        plt.close(fig)
    widths = sorted(
        {r.params["hidden"] for r in run.records if not r.is_default and r.state.value == "complete"}
    )
    assert [lab for lab in labels if lab.startswith("hidden=")] == [f"hidden={w}" for w in widths]
    assert "default" in labels and "diverged" in labels


def test_by_that_is_no_parameter_of_the_study_is_refused_before_anything_is_written(
    study_dir, tmp_path
) -> None:
    """A typo in --by drew one line labelled 'widht=None' and said nothing."""
    with pytest.raises(
        ConfigError, match=r"by: expected a parameter of the study in .*'hidden'.*got 'widht'"
    ):
        report(study_dir, output=tmp_path / "out" / "x.html", by="widht")
    assert not (tmp_path / "out").exists()
    assert "sensitivity" in report(study_dir, output=tmp_path / "y.html", by="epochs").figures


def test_sensitivity_axis_names_the_split_the_trials_were_chosen_on(study_dir) -> None:
    """Selected on validation, the plot must not call its values test error (test is measured once)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from deepspark.reporting._runs import open_runs
    from deepspark.tuning.report import plot_sensitivity

    with open_runs([study_dir]) as (run,):
        # a Python objective's values are its own: no split; the built-in objective's say which
        assert run.split == (None if run.config["objective"] != "builtin" else run.config["select_on"])
        seen = {}
        for split in ("validation", None):
            fig, ax = plt.subplots()
            assert plot_sensitivity(ax, run.records, metric="accuracy", maximize=True, split=split)
            seen[split] = (ax.get_ylabel(), ax.get_title())
            plt.close(fig)
    assert seen["validation"][0] == "validation error (1 - accuracy)"
    assert seen["validation"][1].startswith("Validation error vs learning rate")
    assert seen[None][0] == "error (1 - accuracy)" and "test" not in seen[None][1].lower()


def test_a_report_puts_the_callers_optuna_verbosity_back(study_dir, tmp_path) -> None:
    import optuna

    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.DEBUG)  # a notebook's own setting
    try:
        report([study_dir], output=tmp_path / "r.html")
        assert optuna.logging.get_verbosity() == optuna.logging.DEBUG
    finally:
        optuna.logging.set_verbosity(before)


def test_report_never_changes_the_run_directory(study_dir, tmp_path) -> None:
    before = _snapshot(study_dir)
    assert main(["report", str(study_dir), "--output", str(tmp_path / "r.html")]) == 0
    assert _snapshot(study_dir) == before
    assert (tmp_path / "r.html").is_file() and (tmp_path / "r-sensitivity.png").is_file()


def test_partial_study_shows_running_trials(study_dir, tmp_path) -> None:
    """A journal copied mid-study (a trial asked for but not told, and a torn last line) is reported."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("config.json", "study.journal"):
        (partial / name).write_bytes((study_dir / name).read_bytes())
    storage = JournalStorage(JournalFileBackend(str(partial / "study.journal")))
    study = optuna.load_study(study_name=None, storage=storage)
    trial = study.ask({"learning_rate": optuna.distributions.FloatDistribution(1e-3, 1e-1, log=True)})
    trial.report(0.9, 1)
    with (partial / "study.journal").open("ab") as fh:
        fh.write(b'{"op_code": 6, "worker_id": "x", "tri')  # a write in progress
    result = report(partial, output=tmp_path / "p.html")
    page = result.html.read_text(encoding="utf-8")
    assert "PARTIAL: 1 trial(s) still running" in page and "running 1" in page
    assert "timeline" in result.figures and "intermediate" in result.figures


def _training_dir(root: Path) -> Path:
    run = root / "train"
    run.mkdir()
    config = {"strategy": "average", "workers": 2, "model": "lenet", "data": "mnist", "config": {"epochs": 2}}
    (run / "config.json").write_text(json.dumps(config))
    from deepspark.training._fit import HISTORY_COLUMNS

    with (run / "history.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=HISTORY_COLUMNS)
        writer.writeheader()
        for i in range(8):
            writer.writerow(
                {
                    "round": i,
                    "epoch": (i + 1) / 4,
                    "samples": 15000,
                    "workers": 2,
                    "train_loss": 2.0 / (i + 1),
                    "test_accuracy": 0.9 + i / 100 if i % 2 else "",
                    "test_loss": "",
                    "seconds": 3.0 + i % 3,
                    "compute_s": 2.5,
                    "comm_s": 0.3,
                    "wait_s": 0.1,
                    "bytes": 2_000_000,
                    "elapsed_s": 4.0 * (i + 1),
                }
            )
    return run


def test_training_run_report(tmp_path) -> None:
    run = _training_dir(tmp_path)
    before = _snapshot(run)
    result = report(run, output=tmp_path / "t.html")
    assert set(result.figures) == {"training_curves", "training_throughput", "time_split"}
    assert all(_pixels_vary(p.read_bytes()) for p in result.figures.values())
    page = result.html.read_text(encoding="utf-8")
    assert "training run" in page and "0.9700" in page and "communication" in page
    assert _snapshot(run) == before


def test_training_history_cells_that_are_not_numbers_are_left_out(tmp_path) -> None:
    """A hand-edited history.csv: a test accuracy that is not a number raised ValueError, and a missing
    elapsed_s column read as a wall time of 0.0 s."""
    run = _training_dir(tmp_path)
    with (run / "history.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    rows[-1]["test_accuracy"] = "n/a"  # round 7; round 5 measured 0.95
    columns = [c for c in rows[0] if c != "elapsed_s"]
    with (run / "history.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    page = report(run, output=tmp_path / "t.html").html.read_text(encoding="utf-8")
    assert "<th>test accuracy</th><td>0.9500</td>" in page
    assert "<th>rounds</th><td>8 (epoch 2.0)</td>" in page and "wall time" not in page


def test_a_history_row_cut_short_is_left_out(tmp_path) -> None:
    """A history.csv whose last row is still being written (or was cut by a kill): its cells were read
    as numbers, round 7's test accuracy 0.97 cut to 0.9 and reported as the run's; 8 rounds counted."""
    run = _training_dir(tmp_path)
    data = (run / "history.csv").read_bytes()
    cut = data.rindex(b"0.97") + len(b"0.9")
    (run / "history.csv").write_bytes(data[:cut])
    page = report(run, output=tmp_path / "t.html").html.read_text(encoding="utf-8")
    assert "<th>test accuracy</th><td>0.9500</td>" in page
    assert "<th>rounds</th><td>7 (epoch 1.75)</td>" in page


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("config.json", "[" * 100_000),
        ("model/metadata.json", "[" * 100_000),
        ("model/metadata.json", '{"metrics": [1]}'),
    ],
)
def test_a_json_file_of_a_run_nested_too_deeply_or_malformed_is_left_out_not_a_traceback(
    tmp_path, name: str, text: str
) -> None:
    """The parser's RecursionError (and dict() of a list of metrics, a TypeError) escaped the report."""
    run = _training_dir(tmp_path)
    (run / name).parent.mkdir(exist_ok=True)
    (run / name).write_text(text)
    page = report(run, output=tmp_path / "t.html").html.read_text(encoding="utf-8")
    assert "training run" in page


def test_a_history_that_is_not_text_is_reported_not_a_traceback(tmp_path) -> None:
    run = _training_dir(tmp_path)
    (run / "history.csv").write_bytes(b"\xff\xfe\x00round,epoch\r\n\x00\x01,\xff\r\n")
    page = report(run, output=tmp_path / "t.html").html.read_text(encoding="utf-8")
    assert "<th>rounds</th><td>1 (epoch \ufffd)</td>" in page and "<th>test accuracy</th>" not in page


def test_scaling_figure_from_two_studies_at_different_parallelism(spark, tmp_path) -> None:
    from deepspark.tuning import tune

    grid = {"learning_rate": {"type": "grid", "values": [0.01, 0.02, 0.03, 0.04]}, "hidden": 64, "epochs": 1}
    runs = []
    for p in (1, 2):
        runs.append(tmp_path / f"p{p}")
        tune(
            _sensitive,
            space=grid,
            trials=4,
            parallelism=p,
            sampler="grid",
            pruner="none",
            default_config=False,
            run_dir=runs[-1],
        )
    result = report(runs, output=tmp_path / "s.html")
    assert "scaling" in result.figures and _pixels_vary(result.figures["scaling"].read_bytes())
    assert "p1-sensitivity" in result.figures and "p2-timeline" in result.figures
    page = result.html.read_text(encoding="utf-8")
    assert "1 parallel" in page and "2 parallel" in page and "efficiency" in page


def _journal_study(run: Path, parallelism: int) -> Any:
    """A maximising study in ``run`` (a study run directory: config.json and study.journal) recorded
    as run at ``parallelism``."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from deepspark.tuning.runner import CLUSTER_ATTR

    run.mkdir()
    (run / "config.json").write_text(json.dumps({"space": SPACE, "objective": "f", "study_name": run.name}))
    storage = JournalStorage(JournalFileBackend(str(run / "study.journal")))
    study = optuna.create_study(study_name=run.name, storage=storage, direction="maximize")
    study.set_user_attr(CLUSTER_ATTR, {"parallelism": parallelism})
    return study


def test_no_speedup_is_drawn_between_studies_of_other_trial_sets(tmp_path) -> None:
    """A 2-trial study at parallelism 2 beside a 6-trial one at 1 was drawn as a 3x "speedup"."""
    runs = []
    for parallelism, trials in ((1, 6), (2, 2)):
        run = tmp_path / f"p{parallelism}"
        study = _journal_study(run, parallelism)
        for _ in range(trials):
            study.tell(study.ask(), 0.5)
        runs.append(run)
    result = report(runs, output=tmp_path / "s.html")
    assert "scaling" not in result.figures
    assert (
        "not runs of one trial set" in result.missing["scaling"]
        and "p1: 6 finished trials" in result.missing["scaling"]
    )
    assert "efficiency" not in result.html.read_text(encoding="utf-8")


@pytest.mark.parametrize("given", [{"dataset": "/data/mine"}, {"dataset": None, "data_dir": "/data/mine"}])
def test_the_summary_names_the_dataset_directory_however_it_was_given(tmp_path, given) -> None:
    # `tune --data-dir DIR` keeps "dataset": null and DIR in "data_dir": the summary named no dataset.
    run = tmp_path / "run"
    study = _journal_study(run, 1)
    study.tell(study.ask(), 0.5)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, **given, "model": "mlp"}))
    page = report(run, output=tmp_path / "s.html").html.read_text(encoding="utf-8")
    assert "<th>dataset</th><td>/data/mine</td>" in page
    assert "optimistic" not in page


def test_a_study_selected_on_test_says_its_best_accuracy_is_optimistic(tmp_path) -> None:
    # best.json and the leaderboard said so; the report's summary gave the accuracy without a word.
    run = tmp_path / "run"
    study = _journal_study(run, 1)
    study.tell(study.ask(), 0.5)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "objective": "builtin", "select_on": "test"}))
    page = report(run, output=tmp_path / "s.html").html.read_text(encoding="utf-8")
    assert "<th>best</th><td>test accuracy 0.5 (trial 0)</td>" in page
    assert "<th>protocol</th><td>selected on the test split (the 2016 blog&#x27;s protocol): the best" in page


def test_a_resumed_study_s_downtime_is_not_counted_as_its_wall_time(tmp_path) -> None:
    """Four 10 s trials one at a time with the driver down 1000 s between the second and the third,
    beside the same four two at a time: drawn as a 52x "speedup" of parallelism 2."""
    import datetime as dt

    import optuna

    t0 = dt.datetime(2026, 1, 1)
    starts = {1: [0, 10, 1020, 1030], 2: [0, 0, 10, 10]}
    runs = []
    for parallelism, offsets in starts.items():
        run = tmp_path / f"p{parallelism}"
        study = _journal_study(run, parallelism)
        for number, offset in enumerate(offsets):
            begun = t0 + dt.timedelta(seconds=offset)
            study.add_trial(
                optuna.trial.FrozenTrial(
                    number=number,
                    trial_id=number,
                    state=optuna.trial.TrialState.COMPLETE,
                    value=0.5,
                    datetime_start=begun,
                    datetime_complete=begun + dt.timedelta(seconds=10),
                    params={},
                    distributions={},
                    user_attrs={},
                    system_attrs={},
                    intermediate_values={},
                )
            )
        runs.append(run)
    page = report(runs, output=tmp_path / "s.html").html.read_text(encoding="utf-8")
    assert "wall 0.67 min, speedup 1.00x" in page  # 40 s of trials at parallelism 1
    assert "wall 0.33 min, speedup 2.00x, efficiency 100%" in page


def test_bad_run_dir_and_output_are_config_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="neither a study"):
        report(tmp_path, output=tmp_path / "x.html")
    with pytest.raises(ConfigError, match="not a directory"):
        report(tmp_path / "missing", output=tmp_path / "x.html")
    with pytest.raises(ConfigError, match=r"output: expected a path ending in \.html"):
        report(_training_dir(tmp_path), output=tmp_path / "x.png")


@pytest.mark.parametrize("journal", [b"not json\n{}\n", b"\xff\xfe\n"], ids=["not-json", "not-text"])
def test_a_journal_optuna_did_not_write_is_a_config_error(tmp_path, journal) -> None:
    """A JSONDecodeError / UnicodeDecodeError traceback from Optuna's journal reader before."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "study.journal").write_bytes(journal)
    with pytest.raises(ConfigError, match=r"run_dirs: .*study\.journal is not an Optuna journal"):
        report(run, output=tmp_path / "x.html")
    assert not (tmp_path / "x.html").exists()


def test_a_study_without_its_config_json_is_reported_as_its_journal_holds_it(tmp_path) -> None:
    """With config.json gone (a journal copied alone), a minimised loss read as an accuracy, maximised:
    the worst trial was reported as the best."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    run = tmp_path / "run"
    run.mkdir()
    storage = JournalStorage(JournalFileBackend(str(run / "study.journal")))
    study = optuna.create_study(study_name="run", storage=storage, direction="minimize")
    study.set_user_attr("metric", "loss")
    study.set_user_attr("objective", "fit_loss")
    lr = {"learning_rate": optuna.distributions.FloatDistribution(1e-3, 1e-1, log=True)}
    for value in (0.9, 0.2, 0.5):
        study.tell(study.ask(lr), value)
    page = report(run, output=tmp_path / "x.html").html.read_text(encoding="utf-8")
    assert "<th>metric</th><td>loss (minimize)</td>" in page
    assert "<th>best</th><td>loss 0.2 (trial 1)</td>" in page


def test_a_stored_study_whose_database_is_gone_is_refused_and_never_created(tmp_path) -> None:
    """Opening a missing SQLite file created an empty database in the run directory (then 'holds no
    study'); a URL SQLAlchemy cannot load was its NoSuchModuleError traceback."""
    run = tmp_path / "run"
    run.mkdir()
    url = f"sqlite:///{run / 'study.db'}"
    (run / "config.json").write_text(json.dumps({"storage": url, "study_name": "run"}))
    before = _snapshot(run)
    with pytest.raises(
        ConfigError, match=r"run_dirs: the storage sqlite:.*study\.db named by .* does not exist"
    ):
        report(run, output=tmp_path / "x.html")
    assert _snapshot(run) == before
    (run / "study.db").touch()  # empty: opening it wrote Optuna's tables into it
    with pytest.raises(
        ConfigError, match=r"run_dirs: the storage sqlite:.*study\.db named by .* is an empty file"
    ):
        report(run, output=tmp_path / "x.html")
    assert (run / "study.db").stat().st_size == 0
    # A sqlite URL SQLAlchemy cannot parse was its ArgumentError traceback, raised before the open.
    (run / "config.json").write_text(json.dumps({"storage": "sqlite:::bad", "study_name": "run"}))
    with pytest.raises(ConfigError, match=r"run_dirs: cannot open the storage sqlite:::bad"):
        report(run, output=tmp_path / "x.html")
    (run / "config.json").write_text(json.dumps({"storage": "nodriver://host/db", "study_name": "run"}))
    with pytest.raises(ConfigError, match=r"run_dirs: cannot open the storage nodriver://host/db"):
        report(run, output=tmp_path / "x.html")


def test_cli_train_writes_the_report_of_a_real_training_run(spark, tmp_path, capsys) -> None:
    from _datasets import bar_dataset

    data = bar_dataset(tmp_path / "data", train=40, test=20)
    run = tmp_path / "run"
    args = [
        "train",
        str(data),
        "--model",
        "mlp",
        "--strategy",
        "local",
        "--epochs",
        "2",
        "--run-dir",
        str(run),
    ]
    assert main(args) == 0
    assert f"report: {run / 'report.html'}" in capsys.readouterr().out
    page = (run / "report.html").read_text(encoding="utf-8")
    assert "training run" in page and "test accuracy" in page and len(_inlined(page)) == 3
    assert _pixels_vary((run / "report-training_curves.png").read_bytes())


def _chromium() -> str:
    """Debian's chromium, installed with apt when missing; the test is skipped, saying why, without apt."""
    import os
    import shutil
    import subprocess

    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if shutil.which("apt-get") is None:
        pytest.skip("chromium is not installed and apt-get is unavailable to install it")
    if os.geteuid() != 0:
        pytest.skip("chromium is not installed and installing it with apt-get needs root")
    done = subprocess.run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    found = shutil.which("chromium")
    if not found:
        pytest.skip(f"apt-get install chromium failed: {done.stderr[-500:]}")
    return found


@pytest.mark.slow
def test_headless_chromium_shows_the_figures_offline(study_dir, tmp_path) -> None:
    import subprocess

    import numpy as np
    from PIL import Image

    browser = _chromium()
    result = report(study_dir, output=tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1200,2400",
            f"--screenshot={shot}",
            result.html.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 2400)
    pixels = np.asarray(image, dtype=np.int16)
    ink = float((pixels.min(axis=2) < 200).mean())
    # The plot lines and markers: strongly coloured pixels (matplotlib's blue, orange, red), not text.
    coloured = int((pixels.max(axis=2) - pixels.min(axis=2) > 80).sum())
    assert ink > 0.02, f"the screenshot is nearly blank ({ink:.2%} non-white)"
    assert coloured > 2000, f"no figure visible: {coloured} coloured pixels"


def test_a_searched_parameter_that_kept_one_value_draws_without_matplotlib_warnings(tmp_path) -> None:
    """Optuna's parallel-coordinate plot sets identical y limits for such a parameter, and matplotlib's
    UserWarning about it was printed on stderr, source line included, at the end of `deepspark tune`."""
    import warnings

    import optuna

    run = tmp_path / "p1"
    study = _journal_study(run, 1)
    distributions = {
        "learning_rate": optuna.distributions.FloatDistribution(1e-3, 1e-1, log=True),
        "hidden": optuna.distributions.CategoricalDistribution([64, 128, 256]),
    }
    for lr, value in ((1e-2, 0.5), (2e-2, 0.6), (3e-2, 0.7)):
        params = {"learning_rate": lr, "hidden": 128}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=value))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = report([run], output=tmp_path / "r.html")
    assert "parallel" in result.figures
    assert not [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
