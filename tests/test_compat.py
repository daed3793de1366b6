"""The 3.10 stand-ins behave like the standard library's 3.11 originals."""

from __future__ import annotations

from deepspark._compat import StrEnum


class _Color(StrEnum):
    RED = "red"


def test_str_enum_members_are_their_values() -> None:
    assert _Color.RED == "red"
    assert str(_Color.RED) == "red"
    assert f"{_Color.RED}" == "red" and f"{_Color.RED:>5}" == "  red"
    assert _Color("red") is _Color.RED
