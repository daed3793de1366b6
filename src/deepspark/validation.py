"""One way to check a parameter, one message shape: ``NAME: expected WHAT, got VALUE``.

Every public entry point validates where it receives a value, before any Spark job starts, and raises
:class:`~deepspark.errors.ConfigError` through these helpers so every message reads the same way.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection
from typing import Any

from deepspark.errors import ConfigError

__all__ = [
    "check_choice",
    "check_heartbeat_timeout",
    "check_int",
    "check_number",
    "check_positive_int",
    "check_size",
    "data_kind",
    "fail",
    "is_finite_number",
]


def fail(name: str, expected: str, given: Any) -> ConfigError:
    """The error for parameter ``name``: what was expected and what was given."""
    return ConfigError(f"{name}: expected {expected}, got {given!r}")


def is_finite_number(value: Any) -> bool:
    """Whether ``value`` is an int or float (not a bool) that is finite as a float: an int beyond the
    float range (``10**400``, from a settings file) is not, where ``math.isfinite`` raised OverflowError."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def data_kind(value: Any) -> str:
    """What a ``data`` argument is, for the error when it is none of the kinds accepted: the full type
    name, since a pandas ``DataFrame`` named bare reads as the Spark one the message asks for."""
    kind = type(value)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    if kind.__module__.startswith("pandas") and kind.__name__ == "DataFrame":
        name += " (a pandas DataFrame: make it a Spark one with spark.createDataFrame(df))"
    return name


def check_int(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an int within [minimum, maximum]; bools and floats are refused."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise fail(name, _int_range(minimum, maximum), value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise fail(name, _int_range(minimum, maximum), value)
    return value


def check_positive_int(name: str, value: Any) -> int:
    return check_int(name, value, minimum=1)


def _int_range(minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f"an integer in {minimum}..{maximum}"
    if minimum is not None:
        return f"an integer >= {minimum}"
    if maximum is not None:
        return f"an integer <= {maximum}"
    return "an integer"


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A finite number within the given bounds (``*_open`` excludes the bound itself)."""
    if low is not None and high is not None:
        expected = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        expected = f"a number {'>' if low_open else '>='} {low:g}"
    elif high is not None:
        expected = f"a number {'<' if high_open else '<='} {high:g}"
    else:
        expected = "a finite number"
    if not is_finite_number(value):
        raise fail(name, expected, value)
    if low is not None and (value < low or (low_open and value == low)):
        raise fail(name, expected, value)
    if high is not None and (value > high or (high_open and value == high)):
        raise fail(name, expected, value)
    return float(value)


def check_choice(name: str, value: Any, choices: Collection[Any]) -> Any:
    if value not in choices:
        raise fail(name, f"one of {list(choices)}", value)
    return value


def check_heartbeat_timeout(value: Any) -> float | None:
    """Seconds a silent peer is given before it counts as lost: at least
    :data:`deepspark.wire.MIN_HEARTBEAT_TIMEOUT`, or None for no heartbeat clock."""
    from deepspark.wire import MIN_HEARTBEAT_TIMEOUT

    if value is None:
        return None
    try:
        seconds = check_number("heartbeat_timeout", value, low=0, low_open=True)
    except ConfigError:
        raise fail("heartbeat_timeout", "a positive number of seconds (or None)", value) from None
    if seconds < MIN_HEARTBEAT_TIMEOUT:
        # Below a second an ordinary pause of a busy worker (garbage collection, a first import)
        # reads as a frozen host: every trial was re-queued until it gave up (measured: 0.01 s).
        raise fail(
            "heartbeat_timeout",
            f"at least {MIN_HEARTBEAT_TIMEOUT:g} second (or None for no heartbeat clock)",
            seconds,
        )
    return seconds


_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def check_size(name: str, value: Any) -> int:
    """``value`` as a number of bytes: an int >= 0, or a string in Spark's size syntax (``"512m"``,
    ``"4g"``: binary units k, m, g, t, optionally followed by ``b``)."""
    if isinstance(value, str):
        match = re.fullmatch(r"(\d+)\s*([kmgt]?)b?", value.strip().lower())
        if match is None:
            raise fail(name, "a size in bytes, e.g. 512m or 4g", value)
        return int(match[1]) * _SIZE_UNITS[match[2]]
    return check_int(name, value, minimum=0)
