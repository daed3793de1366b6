"""Search spaces: a YAML file or a dict of parameter → distribution, turned into Optuna distributions.

Every parameter is validated here, before any Spark job starts::

    learning_rate: {type: loguniform, low: 1.0e-4, high: 1.0e-2}
    fc:            {type: choice, values: [256, 512, 1024]}
    conv2:         {type: int, low: 32, high: 96, step: 32}
    dropout:       {type: uniform, low: 0.2, high: 0.6}
    batch_size:    {type: grid, values: [32, 64]}
    epochs: 3      # a bare value is fixed: every trial gets it
"""

from __future__ import annotations

import itertools
import math
import numbers
import os
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepspark import textfile
from deepspark.errors import ConfigError
from deepspark.validation import is_finite_number

__all__ = ["DISTRIBUTIONS", "SearchSpace", "is_fixed_value", "load_space"]

DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice", "grid")


@dataclass(frozen=True)
class SearchSpace:
    """Validated parameters: ``params`` are searched, ``fixed`` are passed to every trial as they are."""

    params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    fixed: Mapping[str, Any] = field(default_factory=dict)

    def distributions(self) -> dict[str, Any]:
        """Optuna distributions for the searched parameters."""
        import optuna.distributions as d

        out: dict[str, Any] = {}
        for name, p in self.params.items():
            kind = p["type"]
            if kind == "uniform":
                out[name] = d.FloatDistribution(p["low"], p["high"])
            elif kind == "loguniform":
                out[name] = d.FloatDistribution(p["low"], p["high"], log=True)
            elif kind == "int":
                out[name] = d.IntDistribution(
                    p["low"], p["high"], step=p.get("step", 1), log=p.get("log", False)
                )
            else:
                out[name] = d.CategoricalDistribution(tuple(p["values"]))
        return out

    def grid(self) -> dict[str, list[Any]]:
        """The grid for Optuna's GridSampler: every parameter must have a finite set of values."""
        grid: dict[str, list[Any]] = {}
        for name, p in self.params.items():
            if p["type"] in ("choice", "grid"):
                grid[name] = list(p["values"])
            elif p["type"] == "int" and not p.get("log", False):
                grid[name] = list(range(p["low"], p["high"] + 1, p.get("step", 1)))
            else:
                raise ConfigError(
                    f"space: parameter {name!r} is a continuous {p['type']} distribution, which the grid sampler "
                    "cannot enumerate; give it 'values' (type: grid or choice) or use sampler 'tpe' or 'random'"
                )
        return grid

    def grid_size(self) -> int:
        return math.prod(len(v) for v in self.grid().values()) if self.params else 1

    def grid_points(self, seed: int = 0) -> list[dict[str, Any]]:
        """Every point of :meth:`grid`, once, in an order shuffled by ``seed``.

        A study that runs only the first ``n`` points then covers the grid evenly rather than
        varying the last parameter only; the same seed gives the same order, so ``--resume``
        continues the same plan.
        """
        grid = self.grid()
        names = sorted(grid)
        points = [
            dict(zip(names, values, strict=True)) for values in itertools.product(*(grid[n] for n in names))
        ]
        random.Random(seed).shuffle(points)
        return points

    def contains(self, name: str, value: Any) -> bool:
        """Whether the searched parameter ``name`` can take ``value``."""
        p = self.params[name]
        if p["type"] in ("choice", "grid"):
            return any(_same_choice(value, v) for v in p["values"])
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return False
        if p["type"] == "int":
            return (
                float(value).is_integer()
                and p["low"] <= value <= p["high"]
                and (value - p["low"]) % p["step"] == 0
            )
        return bool(p["low"] <= value <= p["high"])

    def value(self, name: str, value: Any) -> Any:
        """``value`` (which :meth:`contains`) as a sampled trial gets it: the choice it equals, an int for
        an ``int`` parameter, a float for a continuous one. A default configuration's ``4.0`` for an int
        parameter would otherwise reach the objective as a float, unlike every sampled value."""
        p = self.params[name]
        if p["type"] in ("choice", "grid"):
            return next(v for v in p["values"] if _same_choice(value, v))
        return int(value) if p["type"] == "int" else float(value)

    def check(self, validate: Callable[[Mapping[str, Any]], object]) -> None:
        """Raise :class:`ConfigError` unless ``validate`` accepts every value the space can give.

        ``validate(config)`` raises ConfigError for a configuration the objective cannot take. Each
        parameter is tried alone with the fixed values at the values that bound what it can take (low
        and high, a non-integer in between for a continuous range, every choice), so a range that is
        valid only in part fails here, before Spark starts, and not trial by trial at run time.
        """
        validate(dict(self.fixed))
        for name, p in self.params.items():
            for value in _probes(p):
                try:
                    validate({**self.fixed, name: value})
                except ConfigError as exc:
                    raise ConfigError(
                        f"space: parameter {name!r} is {_describe(p)}, but the objective cannot take "
                        f"{name}={value!r}: {exc}"
                    ) from None

    def to_dict(self) -> dict[str, Any]:
        return {**{k: dict(v) for k, v in self.params.items()}, **dict(self.fixed)}


def is_fixed_value(value: Any) -> bool:
    """Whether ``value`` can be a fixed parameter's: what JSON carries to a trial and a journal holds."""
    return value is None or isinstance(value, str | int | float | bool)


def _same_choice(a: Any, b: Any) -> bool:
    """Whether ``a`` is the choice ``b``: equal, and both booleans or neither (``True == 1``)."""
    return bool(a == b) and isinstance(a, bool) == isinstance(b, bool)


def _probes(p: Mapping[str, Any]) -> list[Any]:
    """The values that bound what a parameter can take (see :meth:`SearchSpace.check`)."""
    if p["type"] in ("choice", "grid"):
        return list(p["values"])
    if p["type"] == "int":
        return [p["low"], p["high"]]
    inside = p["low"] + (p["high"] - p["low"]) / math.e  # not an integer: catches integer-only options
    return [p["low"], p["high"]] + ([] if float(inside).is_integer() else [inside])


def _describe(p: Mapping[str, Any]) -> str:
    if p["type"] in ("choice", "grid"):
        return f"{p['type']} {list(p['values'])}"
    step = f" step {p['step']}" if p["type"] == "int" and p.get("step", 1) != 1 else ""
    return f"{p['type']} from {p['low']:g} to {p['high']:g}{step}"


def _number(name: str, key: str, value: Any) -> float:
    if not is_finite_number(value):
        raise ConfigError(f"space: parameter {name!r}: {key} must be a finite number, got {value!r}")
    return float(value)


def _parse_param(name: str, raw: Mapping[str, Any]) -> dict[str, Any]:
    kind = raw.get("type")
    if kind not in DISTRIBUTIONS:
        raise ConfigError(
            f"space: parameter {name!r}: unknown distribution {kind!r}; expected one of {list(DISTRIBUTIONS)}"
        )
    allowed = {
        "uniform": {"low", "high"},
        "loguniform": {"low", "high"},
        "int": {"low", "high", "step", "log"},
        "choice": {"values"},
        "grid": {"values"},
    }[kind]
    extra = set(raw) - allowed - {"type"}
    if extra:
        raise ConfigError(
            f"space: parameter {name!r} ({kind}): unknown key(s) {sorted(extra)}; allowed {sorted(allowed)}"
        )
    if kind in ("choice", "grid"):
        values = raw.get("values")
        if not isinstance(values, list | tuple) or not values:
            raise ConfigError(
                f"space: parameter {name!r} ({kind}): 'values' must be a non-empty list, got {values!r}"
            )
        for v in values:
            if v is not None and not isinstance(v, str | int | float | bool):
                raise ConfigError(
                    f"space: parameter {name!r}: values must be numbers, strings or booleans, got {v!r}"
                )
        if len(set(map(repr, values))) != len(values):
            raise ConfigError(f"space: parameter {name!r}: values {list(values)} contain duplicates")
        for i, v in enumerate(values):
            same = [w for w in values[:i] if w == v]
            if same:
                # Optuna finds a choice by ==: a trial given True is recorded as 1 (and 1.0 as 1).
                raise ConfigError(
                    f"space: parameter {name!r}: values {list(values)} hold {same[0]!r} and {v!r}, which "
                    "compare equal, so Optuna would record one as the other; keep one (or give them as strings)"
                )
        return {"type": kind, "values": list(values)}
    for key in ("low", "high"):
        if key not in raw:
            raise ConfigError(f"space: parameter {name!r} ({kind}) needs '{key}'")
    low, high = _number(name, "low", raw["low"]), _number(name, "high", raw["high"])
    if kind == "int":
        if not low.is_integer() or not high.is_integer():
            raise ConfigError(
                f"space: parameter {name!r} (int): low and high must be integers, got {low:g}, {high:g}"
            )
        # The integers given, not their floats: float() rounds above 2**53 (2**53 + 1 became 2**53).
        return _int_param(name, raw, int(raw["low"]), int(raw["high"]))
    if low >= high:
        raise ConfigError(
            f"space: parameter {name!r}: low must be less than high, got low={low:g}, high={high:g}"
        )
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"space: parameter {name!r}: loguniform bounds must be > 0, got low={low:g}")
    return {"type": kind, "low": low, "high": high}


def _int_param(name: str, raw: Mapping[str, Any], low: int, high: int) -> dict[str, Any]:
    if low >= high:
        raise ConfigError(
            f"space: parameter {name!r}: low must be less than high, got low={low}, high={high}"
        )
    step = raw.get("step", 1)
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ConfigError(f"space: parameter {name!r} (int): step must be a positive integer, got {step!r}")
    if (high - low) % step:
        # Optuna would lower high to the last value reached (with a warning), while the space's
        # description and the report said the value given.
        last = low + (high - low) // step * step
        raise ConfigError(
            f"space: parameter {name!r} (int): high {high} is not low {low} plus a whole number of steps "
            f"{step}: the largest value is {last}; give high: {last}"
        )
    log = raw.get("log", False)
    # Not bool(log): bool("false") is True, so a quoted YAML value searched on a log scale.
    if not isinstance(log, bool):
        raise ConfigError(f"space: parameter {name!r} (int): log must be true or false, got {log!r}")
    if log and (low <= 0 or step != 1):
        raise ConfigError(f"space: parameter {name!r} (int, log): needs low > 0 and step 1")
    return {"type": "int", "low": low, "high": high, "step": step, "log": log}


def load_space(space: SearchSpace | Mapping[str, Any] | str | os.PathLike[str] | None) -> SearchSpace:
    """Parse and validate a search space from a dict or a YAML/JSON file."""
    if space is None:
        return SearchSpace()
    if isinstance(space, SearchSpace):
        return space
    if isinstance(space, str | os.PathLike):
        path = Path(space)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"space: cannot read {path}: {exc}") from exc
        except UnicodeDecodeError:
            raise ConfigError(f"space: {path} is not UTF-8 text; expected a YAML or JSON file") from None
        try:
            space = textfile.load(text, yaml_syntax=True) or {}  # JSON files too: JSON is YAML
        except textfile.SettingsError as exc:
            raise ConfigError(f"space: {path} {exc}") from None
    if not isinstance(space, Mapping):
        raise ConfigError(
            f"space: expected a mapping of parameter name to distribution, got {type(space).__name__}"
        )
    params: dict[str, dict[str, Any]] = {}
    fixed: dict[str, Any] = {}
    for name, raw in space.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"space: parameter names must be non-empty strings, got {name!r}")
        if isinstance(raw, Mapping):
            params[name] = _parse_param(name, raw)
        elif is_fixed_value(raw):
            fixed[name] = raw
        else:
            raise ConfigError(
                f"space: parameter {name!r}: expected a distribution mapping or a fixed value, got {raw!r}"
            )
    return SearchSpace(params=params, fixed=fixed)
