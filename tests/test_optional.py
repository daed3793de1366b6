"""Optional dependencies: ``pip install deepspark`` alone tunes; the extras raise their install hint when used."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from deepspark._optional import available, install_hint, require
from deepspark.errors import DeepsparkError, MissingDependencyError

_SCRIPT = """
import sys
from pathlib import Path

import deepspark
from deepspark.errors import MissingDependencyError

for name in ("onnx", "onnxruntime", "matplotlib"):
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        sys.exit(f"{name} was importable")

work = Path(sys.argv[1])


def objective(config, reporter):
    return {"accuracy": 1.0 - (config["x"] - 0.3) ** 2}


result = deepspark.tune(
    objective,
    space={"x": {"type": "uniform", "low": 0.0, "high": 1.0}},
    trials=2,
    parallelism=1,
    sampler="random",
    pruner="none",
    default_config=False,
    run_dir=work / "study",
    master="local[1]",
)
assert result.counts()["complete"] == 2, result.counts()
assert (work / "study" / "best.json").exists()
assert not (work / "study" / "accuracy_vs_lr.png").exists()

from deepspark.inference import load_model
from deepspark.models import Preprocess, build_model, model_spec, save_checkpoint

spec = model_spec("mlp", hidden=8)
preprocess = Preprocess(input_shape=(1, 28, 28), mean=(0.0,), std=(1.0,))
save_checkpoint(work / "ckpt", build_model(spec, seed=0).eval(), spec, preprocess=preprocess)
assert load_model(work / "ckpt").backend == "torch"  # auto: ONNX is only an optimisation
try:
    load_model(work / "ckpt", backend="onnx")
except MissingDependencyError as exc:
    print("HINT:", exc)
else:
    sys.exit("backend='onnx' ran without onnx installed")
"""


def test_require_names_the_extra_that_installs_a_missing_module() -> None:
    with pytest.raises(MissingDependencyError, match=r"pip install 'deepspark\[onnx\]'") as info:
        require("onnx.no_such_submodule", feature="ONNX export")
    assert isinstance(info.value, DeepsparkError) and isinstance(info.value, ImportError)
    assert "ONNX export" in str(info.value)
    assert install_hint("matplotlib.pyplot") == "pip install 'deepspark[report]'"
    assert install_hint("hyperopt") == "pip install 'deepspark[bench]'"
    assert not available("onnx.no_such_submodule") and available("json")


@pytest.mark.slow
def test_a_fresh_venv_without_extras_installs_and_tunes(tmp_path: Path) -> None:
    """``pip install deepspark`` (no extras) in a new virtual environment, then a tiny tune there.

    The extras are really absent (a test that hid them from this venv with a ``sitecustomize`` ran the same
    script and checked the same hint: this one covers it). pip takes the versions of constraints.txt
    (wheels from its cache, which ``make`` filled, and this machine's torch).
    """
    root = Path(__file__).resolve().parents[1]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            # No .pyc for all of torch's files up front (half the install's time): the tune below
            # compiles just the modules it imports, as Python does for any package.
            "--no-compile",
            "-c",
            str(root / "constraints.txt"),
            str(root),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    listed = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True, check=True
    ).stdout.lower()
    assert "deepspark==" in listed and "onnx==" not in listed and "matplotlib==" not in listed
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYSPARK_PYTHON"] = str(python)
    work = tmp_path / "work"
    work.mkdir()
    done = subprocess.run(
        [str(python), "-c", textwrap.dedent(_SCRIPT), str(work)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    hint = next(line for line in done.stdout.splitlines() if line.startswith("HINT:"))
    assert "pip install 'deepspark[onnx]'" in hint and "onnxruntime" in hint
