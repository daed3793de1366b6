"""Fixtures shared by the training tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

CRASH = "driver crash (test)"


@pytest.fixture
def driver_crash() -> Callable[[int], Callable[[dict[str, Any]], None]]:
    """``driver_crash(n)``: an ``on_round`` callback raising after round ``n``, as a driver that dies there
    (the run's checkpoint then holds round ``n`` when ``checkpoint_seconds=0``)."""

    def at(last: int) -> Callable[[dict[str, Any]], None]:
        def crash(row: dict[str, Any]) -> None:
            if row["round"] == last:
                raise RuntimeError(CRASH)

        return crash

    return at
