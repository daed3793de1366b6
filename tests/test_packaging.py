"""The package's metadata: compatible ranges in pyproject.toml, exact versions in constraints.txt."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # 3.11+: the metadata is checked on the development Python

ROOT = Path(__file__).resolve().parents[1]
OLDEST_PYTHON = (3, 10)


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _constraints() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[_norm(name)] = Version(version)
    return pins


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_dependencies_are_ranges_not_pins() -> None:
    deps = {_norm(r.name): r for r in map(Requirement, _project()["dependencies"])}
    assert str(deps["pyspark"].specifier) == ">=3.5"
    assert str(deps["torch"].specifier) == ">=2.3"
    for req in deps.values():
        assert not any(s.operator in ("==", "===") for s in req.specifier), req
    assert _project()["requires-python"] == ">=3.10,<3.14"


def test_optional_parts_are_extras() -> None:
    deps = {_norm(Requirement(r).name) for r in _project()["dependencies"]}
    extras = _project()["optional-dependencies"]
    assert deps.isdisjoint({"onnx", "onnxruntime", "matplotlib", "hyperopt", "mlflow", "optuna-dashboard"})
    assert {_norm(Requirement(r).name) for r in extras["onnx"]} == {"onnx", "onnxruntime"}
    assert {_norm(Requirement(r).name) for r in extras["report"]} == {"matplotlib"}
    assert {_norm(Requirement(r).name) for r in extras["bench"]} == {"hyperopt"}
    assert {_norm(Requirement(r).name) for r in extras["mlflow"]} == {"mlflow"}
    assert {_norm(Requirement(r).name) for r in extras["dashboard"]} == {"optuna-dashboard"}


def test_constraints_pin_the_tested_versions_inside_the_ranges() -> None:
    pins = _constraints()
    assert pins["torch"] == Version("2.13.0")  # this machine's local CPU wheel
    project = _project()
    required = [Requirement(r) for r in project["dependencies"]]
    required += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    for req in required:
        if _norm(req.name) == "deepspark":
            continue
        assert _norm(req.name) in pins, f"{req.name} has no exact version in constraints.txt"
        assert req.specifier.contains(pins[_norm(req.name)], prereleases=True), (req, pins[_norm(req.name)])


def test_make_installs_every_extra_with_the_constraints() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    stamp_rule = next(line for line in makefile.splitlines() if line.startswith("$(STAMP):"))
    assert "constraints.txt" in stamp_rule and "pyproject.toml" in stamp_rule
    assert "-c constraints.txt -e '.[dev,all]'" in makefile
    assert set(_project()["optional-dependencies"]["all"][0].split("[")[1].rstrip("]").split(",")) == {
        "onnx",
        "report",
        "bench",
        "mlflow",
        "dashboard",
    }


@pytest.mark.parametrize("folder", ["src", "tests", "benchmarks", "examples"])
def test_sources_parse_on_the_oldest_python(folder: str) -> None:
    """No 3.11+ syntax (``except*``, PEP 695 generics); mypy checks the standard library's 3.10 API."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]
    assert tool["mypy"]["python_version"] == "3.10" and tool["ruff"]["target-version"] == "py310"
    for path in sorted((ROOT / folder).rglob("*.py")):
        ast.parse(path.read_text(encoding="utf-8"), str(path), feature_version=OLDEST_PYTHON)
