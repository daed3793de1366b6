"""Search-space parsing: every bad input is a ConfigError naming the parameter."""

from __future__ import annotations

import pytest

from deepspark.errors import ConfigError
from deepspark.tuning import load_space


def test_parses_each_distribution_and_fixed_values() -> None:
    space = load_space(
        {
            "lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
            "p": {"type": "uniform", "low": 0.1, "high": 0.5},
            "width": {"type": "int", "low": 16, "high": 64, "step": 16},
            "opt": {"type": "choice", "values": ["adam", "sgd"]},
            "bs": {"type": "grid", "values": [32, 64]},
            "epochs": 2,
        }
    )
    dists = space.distributions()
    assert dists["lr"].log and dists["lr"].low == 1e-4
    assert dists["width"].step == 16
    assert dists["opt"].choices == ("adam", "sgd")
    assert space.fixed == {"epochs": 2}


def test_grid_enumerates_discrete_params() -> None:
    space = load_space(
        {"w": {"type": "int", "low": 1, "high": 3}, "o": {"type": "choice", "values": ["a", "b"]}}
    )
    assert space.grid() == {"w": [1, 2, 3], "o": ["a", "b"]}
    assert space.grid_size() == 6


def test_grid_rejects_continuous() -> None:
    space = load_space({"lr": {"type": "uniform", "low": 0.0, "high": 1.0}})
    with pytest.raises(ConfigError, match="'lr'.*continuous"):
        space.grid()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"x": {"type": "normal", "low": 0, "high": 1}}, "unknown distribution 'normal'"),
        ({"x": {"type": "uniform", "low": 1, "high": 1}}, "low must be less than high"),
        ({"x": {"type": "uniform", "low": 2, "high": 1}}, "low must be less than high"),
        ({"x": {"type": "loguniform", "low": 0, "high": 1}}, "loguniform bounds must be > 0"),
        ({"x": {"type": "loguniform", "low": -1, "high": 1}}, "loguniform bounds must be > 0"),
        ({"x": {"type": "choice", "values": []}}, "non-empty list"),
        ({"x": {"type": "choice", "values": [1, True]}}, "hold 1 and True, which compare equal"),
        ({"x": {"type": "grid", "values": [0, 1.0, False]}}, "hold 0 and False, which compare equal"),
        ({"x": {"type": "choice", "values": ["a", 1, 1.0]}}, "hold 1 and 1.0, which compare equal"),
        ({"x": {"type": "int", "low": 0.5, "high": 3}}, "must be integers"),
        ({"x": {"type": "int", "low": 2**53 + 1, "high": 2**53}}, "low must be less than high"),
        (  # Optuna would sample up to 96 and warn; the space's description said 100
            {"x": {"type": "int", "low": 32, "high": 100, "step": 32}},
            r"high 100 is not low 32 plus a whole number of steps 32: the largest value is 96; give high: 96",
        ),
        (
            {"x": {"type": "int", "low": 1, "high": 8, "log": "false"}},
            "log must be true or false, got 'false'",
        ),
        ({"x": {"type": "uniform", "low": 0}}, "needs 'high'"),
        # Beyond the float range (a settings file may hold any integer): math.isfinite raised OverflowError.
        ({"x": {"type": "int", "low": 1, "high": 10**400}}, "high must be a finite number"),
        ({"x": {"type": "uniform", "low": -(10**400), "high": 1}}, "low must be a finite number"),
        ({"x": {"type": "uniform", "low": 0, "high": 1, "q": 2}}, "unknown key"),
    ],
)
def test_bad_spaces_are_clear_errors(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        load_space(raw)
    assert "'x'" in str(info.value)


def test_yaml_file(tmp_path) -> None:
    path = tmp_path / "space.yaml"
    path.write_text("learning_rate: {type: loguniform, low: 1.0e-4, high: 1.0e-2}\nepochs: 3\n")
    space = load_space(str(path))
    assert set(space.params) == {"learning_rate"} and space.fixed == {"epochs": 3}


@pytest.mark.parametrize(
    ("text", "key", "line"),
    [
        (
            "learning_rate: {type: loguniform, low: 1.0e-4, high: 1.0e-2}\nepochs: 3\nlearning_rate: 0.5\n",
            "learning_rate",
            3,
        ),
        ('{"x": {"type": "uniform", "low": 0.1, "high": 0.9,\n "low": 0.5}}', "low", 2),
    ],
    ids=["yaml-parameter", "json-bound"],
)
def test_a_key_given_twice_is_refused_not_the_last_kept(tmp_path, text: str, key: str, line: int) -> None:
    """YAML and JSON loaders keep a repeated key's last value: the searched learning rate became fixed."""
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"gives the key '{key}' twice \(again at line {line}\)"):
        load_space(str(path))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("x: " + "[" * 100_000 + "]" * 100_000, "is nested too deeply"),
        ("epochs: " + "9" * 5000 + "\n", "holds a value that cannot be read"),
        (
            "x:\n  type: choice\n  values: [1, 2]\nz:\n"
            + "".join(f"  - &l{i} [{', '.join([f'*l{i - 1}'] * 10) if i else '1, 1'}]\n" for i in range(9)),
            "expands its YAML aliases to more than 1,000,000 values",
        ),
    ],
    ids=["deep", "long-int", "alias-bomb"],
)
def test_a_space_file_that_would_exhaust_the_loader_is_a_config_error(
    tmp_path, text: str, message: str
) -> None:
    """Deep nesting was a RecursionError and a 5000-digit integer a ValueError (tracebacks); the alias
    bomb's error message printed its billion values (a minute, then a MemoryError under 3 GiB)."""
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_space(str(path))


def test_int_bounds_are_kept_exactly_above_float_precision() -> None:
    space = load_space(
        {
            "seed": {"type": "int", "low": 2**53 + 1, "high": 2**60 + 1},
            "n": {"type": "int", "low": 1.0, "high": 3},
        }
    )
    # As floats the two bounds are equal: compared as the integers given, they are a range.
    near = load_space({"near": {"type": "int", "low": 2**53, "high": 2**53 + 1}})
    assert near.grid() == {"near": [2**53, 2**53 + 1]}
    assert space.params["seed"]["low"] == 2**53 + 1 and space.params["seed"]["high"] == 2**60 + 1
    assert space.distributions()["seed"].high == 2**60 + 1 and space.params["n"]["low"] == 1
