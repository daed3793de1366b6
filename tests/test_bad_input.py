"""Bad input through the ``deepspark`` command, as a new user makes it (issue 11 and the earlier ones).

Each case: exactly one ``error:`` line naming what was wrong, the documented exit code (2 for a usage
error, argparse's included), no Python traceback, and nothing left half-written (the run directory or
output the command was given does not exist afterwards). Almost every case fails before Spark starts;
the data are tiny generated MNIST-layout directories, not MNIST.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deepspark.cli import main
from deepspark.data.idx import write_idx


@dataclass(frozen=True)
class World:
    """The files the cases point at (made once per module)."""

    data: Path  # a 10-class MNIST-layout directory of 8x8 images (not MNIST)
    one_class: Path  # the same with every label 0
    corrupt: Path  # the same with a truncated training-image file
    space: Path  # a valid search space
    bad_space: Path  # a space with an unknown distribution type
    narrow_spec: Path  # a spec with 5 outputs for 10 classes
    wide_spec: Path  # a spec for 28x28 inputs
    fitting_spec: Path  # a spec that fits the data
    model: Path  # a checkpoint for 28x28 grey images
    pickle: Path  # a pickle named like a model
    a_file: Path  # a regular file, where a directory is needed
    foreign_run: Path  # a run directory whose config.json is not a tune study's
    train_run: Path  # a train run's config.json, resumed as a study


def _layout_dir(path: Path, *, classes: int = 10, train: int = 40, test: int = 20, size: int = 8) -> Path:
    rng = np.random.default_rng(0)
    path.mkdir(parents=True)
    for prefix, n in (("train", train), ("t10k", test)):
        write_idx(path / f"{prefix}-images-idx3-ubyte", rng.integers(0, 255, (n, size, size), dtype=np.uint8))
        write_idx(path / f"{prefix}-labels-idx1-ubyte", (np.arange(n) % classes).astype(np.uint8))
    return path


def _spec(path: Path, *, side: int, outputs: int) -> Path:
    layers = [{"type": "flatten"}, {"type": "linear", "out_features": outputs}]
    path.write_text(json.dumps({"input_shape": [1, side, side], "layers": layers}))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    from deepspark.models import Preprocess, build_model, model_spec, save_checkpoint

    root = tmp_path_factory.mktemp("bad-input")
    data = _layout_dir(root / "data")
    one_class = _layout_dir(root / "one-class", classes=1)
    corrupt = _layout_dir(root / "corrupt")
    images = corrupt / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:100])
    space = root / "space.yaml"
    space.write_text("learning_rate: {type: loguniform, low: 1.0e-3, high: 1.0e-2}\nepochs: 1\n")
    bad_space = root / "bad-space.yaml"
    bad_space.write_text("learning_rate: {type: normalish, low: 0.001, high: 0.01}\n")
    spec = model_spec("mlp", hidden=8, depth=1)
    model = root / "ckpt"
    save_checkpoint(
        model,
        build_model(spec, seed=0),
        spec,
        preprocess=Preprocess(input_shape=(1, 28, 28), mean=(0.1307,), std=(0.3081,)),
        class_names=[str(i) for i in range(10)],
    )
    pickled = root / "model.pkl"
    pickled.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    a_file = root / "a-file"
    a_file.write_text("not a directory\n")
    foreign = root / "foreign-run"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"format": "someone-else", "trials": 3}))
    train_run = root / "train-run"
    train_run.mkdir()
    (train_run / "config.json").write_text(json.dumps({"strategy": "local", "workers": 1, "data": str(data)}))
    return World(
        data=data,
        one_class=one_class,
        corrupt=corrupt,
        space=space,
        bad_space=bad_space,
        narrow_spec=_spec(root / "narrow.json", side=8, outputs=5),
        wide_spec=_spec(root / "wide.json", side=28, outputs=10),
        fitting_spec=_spec(root / "fits.json", side=8, outputs=10),
        model=model,
        pickle=pickled,
        a_file=a_file,
        foreign_run=foreign,
        train_run=train_run,
    )


Argv = Callable[[World, Path], list[Any]]


@dataclass(frozen=True)
class Case:
    id: str
    argv: Argv  # (world, run) -> arguments; ``run`` is the path the command may write, which must not exist after
    message: str  # a regular expression the one error line matches
    code: int = 2
    fresh_driver: bool = False  # as in a new process: no active SparkSession to reuse


def _tune(*extra: Any) -> Argv:
    def argv(w: World, run: Path) -> list[Any]:
        return ["tune", "--model", "mlp", "--space", w.space, "--trials", "1", "--run-dir", run, *extra]

    return argv


def _tune_on(data: Callable[[World], Any], *extra: Any) -> Argv:
    def argv(w: World, run: Path) -> list[Any]:
        return [*_tune(*extra)(w, run), "--data-dir", data(w)]

    return argv


def _train(*extra: Any) -> Argv:
    return lambda w, run: ["train", w.data, "--run-dir", run, "--epochs", "1", *extra]


def _with_model(command: str, spec: str) -> Argv:
    """``command`` (tune or train) on the 10-class data with the spec file ``World.<spec>`` as its model."""
    start = _tune_on(lambda w: w.data) if command == "tune" else _train()
    return lambda w, run: [*start(w, run), "--model", getattr(w, spec)]


def _predict(*extra: Any) -> Argv:
    return lambda w, run: ["predict", "--model", w.model, "--input", w.data, *extra]


CASES = [
    # ------------------------------------------------------------------------------------- data
    Case("corrupt-idx", _tune_on(lambda w: w.corrupt), r"train-images-idx3-ubyte: .*truncated"),
    Case(
        "checksum-mismatch",
        lambda w, run: [*_tune("mnist")(w, run), "--data-dir", w.data],
        r"does not hold mnist",
    ),
    Case("unknown-dataset", _tune("no-such-dataset"), r"registered dataset .*'no-such-dataset'"),
    Case("train-limit-train-0", _train("--limit-train", "0"), r"training split .*empty"),
    Case(
        "train-limit-train-negative",
        _train("--workers", "2", "--limit-train", "-1"),
        r"error: limit_train: expected an integer >= 0, got -1$",
    ),
    Case(
        "train-limit-test-negative", _train("--limit-test", "-3"), r"error: limit_test: expected .* got -3$"
    ),
    Case("tune-limit-train-0", _tune_on(lambda w: w.data, "--limit-train", "0"), r"limit_train: .*got 0"),
    # ------------------------------------------------------------------------------ the study
    Case(
        "invalid-space",
        lambda w, run: [*_tune_on(lambda w: w.data)(w, run), "--space", w.bad_space],
        r"unknown distribution 'normalish'",
    ),
    Case(
        "tune-negative-seed", _tune_on(lambda w: w.data, "--seed", "-1"), r"seed: .*0\.\.4294967295, got -1"
    ),
    Case("unknown-sampler", _tune("--sampler", "bayes"), r"--sampler: invalid choice: 'bayes'"),
    Case("unknown-pruner", _tune("--pruner", "hyperband"), r"--pruner: invalid choice: 'hyperband'"),
    Case("unknown-strategy", _train("--strategy", "ring"), r"--strategy: invalid choice: 'ring'"),
    Case(
        "resume-with-a-limit",
        lambda w, run: ["train", "--resume", w.train_run, "--limit-train", "5", "--run-dir", run],
        r"resume: the run's settings are saved in .*; drop \['--limit-train', '--run-dir'\]",
    ),
    Case(
        "resume-a-foreign-run-as-a-train-run",
        lambda w, run: ["train", "--resume", w.foreign_run],
        r"resume: .*foreign-run is not a deepspark training run \(config.json has no strategy",
    ),
    Case("train-workers-0", _train("--workers", "0"), r"workers: expected an integer >= 1, got 0"),
    Case("train-threads-0", _train("--threads", "0"), r"threads_per_worker: expected an integer >= 1, got 0"),
    Case(
        "train-local-threads-above-the-cores",
        _train("--threads", str((os.cpu_count() or 1) + 1)),
        r"threads_per_worker: strategy 'local' trains in this process, .*expected at most \d+, got \d+",
    ),
    Case(
        "train-local-with-a-round-length",
        _train("--tau", "5"),
        r"average: \['tau'\] set how distributed workers",
    ),
    Case(
        "train-local-with-an-outer-step",
        _train("--outer-lr", "0.5"),
        r"average: \['outer_learning_rate'\] .*strategy 'local' trains one process",
    ),
    Case(
        "train-tau-and-round-seconds",
        _train("--workers", "2", "--tau", "5", "--round-seconds", "3"),
        r"average: tau and round_seconds both set the length of a round; give one",
    ),
    Case(
        "train-negative-seed", _train("--seed", "-1"), r"seed: expected an integer in 0..4294967295, got -1"
    ),
    Case(
        "train-local-cuda-without-cuda",
        _train("--device", "cuda"),
        r"device 'cuda': CUDA is not available to torch in this process \(strategy 'local'",
    ),
    Case(
        "train-cuda-where-spark-assigns-no-gpu",
        _train("--workers", "2", "--device", "cuda"),
        r"device 'cuda': Spark assigns tasks no GPU \(spark.task.resource.gpu.amount is not set\)",
    ),
    Case(
        "tune-cuda-where-spark-assigns-no-gpu",
        _tune_on(lambda w: w.data, "--device", "cuda"),
        r"device 'cuda': Spark assigns tasks no GPU \(spark.task.resource.gpu.amount is not set\)",
    ),
    Case(
        "train-local-with-a-master",
        _train("--master", "local[2]"),
        r"master: strategy 'local' trains in this process, not on Spark, so master 'local\[2\]' would be ignored",
    ),
    Case(
        "outer-momentum-of-1",
        _train("--workers", "2", "--outer", "nesterov", "--outer-momentum", "1"),
        r"outer_momentum: expected .*got 1",
    ),
    Case(
        "threads-per-trial-above-the-executor-cores",
        _tune_on(lambda w: w.data, "--threads-per-trial", "3", "--master", "local[2]"),
        r"threads_per_trial: expected at most 2 .*local\[2\].*got 3",
    ),
    Case(
        "threads-per-trial-above-the-cores-before-the-jvm",
        _tune_on(lambda w: w.data, "--threads-per-trial", "3", "--master", "local[2]"),
        r"threads_per_trial: expected at most 2 .*local\[2\].*got 3",
        fresh_driver=True,
    ),
    Case(
        "master-that-does-not-answer",
        _tune_on(lambda w: w.data, "--master", "spark://127.0.0.1:1"),
        r"master spark://127.0.0.1:1: no Spark master answers",
        fresh_driver=True,
    ),
    # --------------------------------------------------------------------------------- models
    *[
        Case(f"{command}-{what}", _with_model(command, spec), message)
        for command in ("tune", "train")
        for what, spec, message in (
            (
                "spec-with-fewer-outputs-than-classes",
                "narrow_spec",
                r"output \[5\] cannot score .* 10 classes",
            ),
            (
                "shape-mismatch",
                "wide_spec",
                r"input shape \[1, 28, 28\] does not match the data's \[1, 8, 8\]",
            ),
        )
    ],
    # A zoo network the data cannot take failed every trial inside Spark (exit 1) instead.
    Case(
        "tune-zoo-model-on-images-too-small",
        _tune_on(lambda w: w.data, "--model", "lenet"),
        r"model 'lenet' cannot take the data \(10 classes of \[1, 8, 8\] images\): layer 2 \(conv\)",
    ),
    Case(
        "tune-zoo-model-on-one-class",
        _tune_on(lambda w: w.one_class),
        r"model 'mlp' cannot .*\(1 classes .*num_classes: .* >= 2, got 1",
    ),
    Case(
        "tune-spec-file-that-is-missing",
        lambda w, run: [*_tune_on(lambda w: w.data)(w, run), "--model", w.data / "spec.json"],
        r"model: expected a zoo model .* or a model spec .*spec.json",
    ),
    Case(
        "train-binary-file-as-a-model-spec",
        lambda w, run: [*_train()(w, run), "--model", w.pickle],
        r"model.pkl is not a model spec: not UTF-8 text",
    ),
    Case(
        "tune-binary-file-as-a-model-spec",
        lambda w, run: [*_tune_on(lambda w: w.data)(w, run), "--model", w.pickle],
        r"model: expected a zoo model .*model.pkl is not a model spec: not UTF-8 text",
    ),
    Case(
        "binary-file-as-a-space",
        lambda w, run: [*_tune_on(lambda w: w.data)(w, run), "--space", w.pickle],
        r"space: .*model.pkl is not UTF-8 text; expected a YAML or JSON file",
    ),
    Case(
        "binary-file-as-predict-labels",
        lambda w, run: [*_predict("--output", run, "--labels", w.pickle)(w, run)],
        r"labels: .*model.pkl is not UTF-8 text",
    ),
    Case(
        "pickle-as-predict-model",
        lambda w, run: ["predict", "--model", w.pickle, "--input", w.data, "--output", run],
        r"refusing to load .*model.pkl.*pickle",
    ),
    Case(
        "predict-mean-without-input-shape",
        lambda w, run: [*_predict("--mean", "0.5", "--output", run)(w, run)],
        r"--mean/--std: .*--input-shape",
    ),
    Case(
        "predict-input-shape-contradicting-the-checkpoint",
        lambda w, run: [*_predict("--input-shape", "1,28,28", "--output", run)(w, run)],
        r"preprocess: model .*ckpt carries its own preprocessing",
    ),
    # ------------------------------------------------------------------ where results go
    Case(
        "predict-output-under-a-file",
        lambda w, run: [*_predict("--output", w.a_file / "preds")(w, run)],
        r"output: cannot write .*a-file/preds \(Not a directory\)",
    ),
    Case(
        "predict-output-under-proc",
        _predict("--output", "/proc/deepspark-preds"),
        r"output: cannot write /proc/deepspark-preds",
    ),
    Case(
        "train-output-under-proc",
        _train("--output", "/proc/deepspark-model"),
        r"output: cannot create /proc/deepspark-model",
    ),
    Case(
        "tune-run-dir-under-proc",
        lambda w, run: [*_tune_on(lambda w: w.data)(w, run), "--run-dir", "/proc/deepspark-run"],
        r"run_dir: cannot write /proc/deepspark-run",
    ),
    Case(
        "tune-run-dir-under-a-file",
        lambda w, run: [*_tune_on(lambda w: w.data)(w, run), "--run-dir", w.a_file / "run"],
        r"run_dir: cannot write .*a-file/run \(Not a directory\)",
    ),
    Case(
        "train-run-dir-under-proc",
        lambda w, run: [*_train()(w, run), "--run-dir", "/proc/deepspark-run"],
        r"run_dir: cannot write /proc/deepspark-run",
    ),
    # A 256-byte path component: Path.exists raised OSError (ENAMETOOLONG), a traceback before any work.
    Case(
        "train-run-dir-name-too-long",
        lambda w, run: [*_train()(w, run), "--run-dir", w.a_file.parent / ("a" * 256) / "run"],
        r"run_dir: cannot use .*/a{256}/run \(File name too long\)",
    ),
    Case(
        "tune-run-dir-name-too-long",
        lambda w, run: [*_tune_on(lambda w: w.data)(w, run), "--run-dir", w.a_file.parent / ("a" * 256)],
        r"run_dir: cannot use .*/a{256} \(File name too long\)",
    ),
    Case(
        "tune-resume-name-too-long",
        lambda w, run: ["tune", "--resume", w.a_file.parent / ("a" * 256)],
        r"resume: cannot use .*/a{256} \(File name too long\)",
    ),
    Case(
        "predict-output-name-too-long",
        lambda w, run: [*_predict("--output", w.a_file.parent / ("a" * 256))(w, run)],
        r"output: cannot write .*/a{256} \(File name too long\)",
    ),
    Case(
        "report-output-under-proc",
        lambda w, run: ["report", w.data, "--output", "/proc/deepspark-report.html"],
        r"output: cannot write /proc/deepspark-report.html",
    ),
    Case(
        "report-output-under-a-file",
        lambda w, run: ["report", w.data, "--output", w.a_file / "report.html"],
        r"output: cannot write .*a-file/report.html \(Not a directory\)",
    ),
    Case(
        "train-master-spark-cannot-parse",
        _train("--workers", "2", "--master", "local[-1]"),
        r"master: expected local, local\[N\], .*got 'local\[-1\]'",
        fresh_driver=True,
    ),
    Case(
        "tune-master-spark-cannot-parse",
        _tune_on(lambda w: w.data, "--master", "foo"),
        r"master: expected local, local\[N\], .*got 'foo'",
        fresh_driver=True,
    ),
    Case(
        "tune-master-of-no-cores",
        _tune_on(lambda w: w.data, "--master", "local[0]"),
        r"master: expected local, local\[N\], .*got 'local\[0\]'",
        fresh_driver=True,
    ),
    Case(
        "report-of-no-run-makes-no-output-folder",
        lambda w, run: ["report", w.data, "--output", run / "report.html"],
        r"run_dirs: .* is neither a study .* nor a training run",
    ),
    # ----------------------------------------------------------------------- run directories
    Case(
        "resume-a-run-dir-of-another-program",
        lambda w, run: ["tune", "--resume", w.foreign_run],
        r"foreign-run/config.json is not a tune study's configuration .*incompatible deepspark version",
    ),
    Case(
        "resume-a-train-run-as-a-study",
        lambda w, run: ["tune", "--resume", w.train_run],
        r"train-run/config.json is not a tune study's configuration",
    ),
    Case(
        "resume-a-directory-that-is-no-run",
        lambda w, run: ["tune", "--resume", w.data],
        r"is not a deepspark run directory \(no config.json\)",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_clear_line_and_leaves_nothing(
    case: Case,
    world: World,
    spark: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run = tmp_path / "runs" / "run"  # its parent is made with it: a refused command leaves neither
    argv = [str(a) for a in case.argv(world, run)]
    jobs_before = len(spark.sparkContext.statusTracker().getJobIdsForGroup())
    with monkeypatch.context() as patch:
        if case.fresh_driver:
            patch.setattr("deepspark.spark.running_session", lambda: None)
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's own usage errors
            code = exc.code
    err = capsys.readouterr().err
    assert code == case.code, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1, err
    assert re.search(r"^deepspark( \w+)?: error: ", errors[0]), errors[0]
    assert re.search(case.message, errors[0]), errors[0]
    assert not run.parent.exists(), sorted(str(p.relative_to(tmp_path)) for p in run.parent.rglob("*"))
    assert len(spark.sparkContext.statusTracker().getJobIdsForGroup()) == jobs_before  # no Spark job ran


def test_a_spec_file_that_fits_is_a_tune_model(world: World) -> None:
    """The other half of the spec-file case: a spec that fits is accepted, and saved as a spec."""
    from deepspark.data import load_dataset
    from deepspark.tuning.objectives import ImageClassifierObjective

    objective = ImageClassifierObjective(model=str(world.fitting_spec))
    data = load_dataset(None, data_dir=world.data)
    objective.check_data(input_shape=data.input_shape, num_classes=data.num_classes)
    objective.check({"learning_rate": 0.01, "epochs": 1})
    assert objective.default_params(["learning_rate"]) == {"learning_rate": 1e-3}
    saved = objective.saved_model
    assert isinstance(saved, dict) and saved["layers"][-1]["out_features"] == 10
    assert ImageClassifierObjective(model=saved).spec == objective.spec  # what a resume rebuilds
    with pytest.raises(Exception, match=r"\['fc'\] are neither training options"):
        objective.check({"fc": 32})


def test_corrupt_and_zero_byte_images_are_error_rows_and_every_row_is_written(
    world: World, spark: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(images / f"{name}.png")
    (images / "corrupt.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + bytes(rng.integers(0, 255, 200, dtype=np.uint8))
    )
    (images / "empty.png").write_bytes(b"")
    out = tmp_path / "preds"
    code = main(
        [
            *("predict", "--model", str(world.model), "--input", f"{images}/*.png"),
            *("--output", str(out), "--master", "local[2]"),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "Traceback" not in captured.err
    import pyarrow.parquet as pq

    rows = pq.read_table(out).to_pylist()
    by_name = {Path(r["path"]).name: r for r in rows}
    assert sorted(Path(r["path"]).name for r in rows) == ["a.png", "b.png", "corrupt.png", "empty.png"]
    assert by_name["a.png"]["error"] is None and by_name["b.png"]["error"] is None
    for bad in ("corrupt.png", "empty.png"):
        assert by_name[bad]["error"] and by_name[bad]["label"] is None
