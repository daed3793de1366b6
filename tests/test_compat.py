"""The 3.10 stand-ins behave like the standard library's 3.11 originals, and the pyspark 3.5 ones like
pyspark 4.0's Arrow table methods."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from deepspark._compat import StrEnum, arrow_to_dataframe, dataframe_to_arrow


class _Color(StrEnum):
    RED = "red"


def test_str_enum_members_are_their_values() -> None:
    assert _Color.RED == "red"
    assert str(_Color.RED) == "red"
    assert f"{_Color.RED}" == "red" and f"{_Color.RED:>5}" == "  red"
    assert _Color("red") is _Color.RED


def test_dataframe_to_arrow_gives_spark_column_types_and_rows(spark: Any) -> None:
    df = spark.createDataFrame(
        [(1, b"ab", [1.0, 2.5]), (None, b"", []), (3, b"\x00", None)], "n int, b binary, a array<float>"
    )
    table = dataframe_to_arrow(df)
    assert table.column_names == ["n", "b", "a"]
    assert table.column("n").type == pa.int32()  # nulls keep an int column (pandas would give float64)
    assert table.column("b").type == pa.binary()
    assert pa.types.is_list(table.column("a").type) and table.column("a").type.value_type == pa.float32()
    assert table.to_pydict() == {"n": [1, None, 3], "b": [b"ab", b"", b"\x00"], "a": [[1.0, 2.5], [], None]}


def test_arrow_to_dataframe_keeps_types_and_rows(spark: Any) -> None:
    table = pa.table(
        {
            "id": pa.array([0, 1, 2], pa.int64()),
            "image": pa.array([b"\x01\x02", b"", b"\xff"], pa.binary()),
            "label": pa.array([7, None, 9], pa.int32()),
        }
    )
    df = arrow_to_dataframe(spark, table)
    assert df.dtypes == [("id", "bigint"), ("image", "binary"), ("label", "int")]
    rows = sorted(df.collect())
    assert [(r.id, bytes(r.image), r.label) for r in rows] == [
        (0, b"\x01\x02", 7),
        (1, b"", None),
        (2, b"\xff", 9),
    ]
