"""What the oldest supported Python (3.10) and PySpark (3.5) lack, in one place."""

from __future__ import annotations

import enum
import sys
import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow as pa
    from pyspark.sql import DataFrame, SparkSession
    from pyspark.sql.types import StructType

__all__ = ["StrEnum", "arrow_to_dataframe", "dataframe_to_arrow", "to_arrow_schema"]

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:

    class StrEnum(str, enum.Enum):
        """``enum.StrEnum`` (3.11): members are strings, and ``str()``/f-strings give the value."""

        def __str__(self) -> str:
            return str(self.value)

        def __format__(self, format_spec: str) -> str:
            return format(str(self.value), format_spec)


def _arrow_tables() -> bool:
    """Whether pyspark takes and gives Arrow tables itself: ``DataFrame.toArrow`` and
    ``createDataFrame(pa.Table)`` both came in pyspark 4.0."""
    from pyspark.sql import DataFrame

    return hasattr(DataFrame, "toArrow")


def dataframe_to_arrow(df: DataFrame) -> pa.Table:
    """``df``'s rows on the driver as one Arrow table (``DataFrame.toArrow``).

    pyspark 3.5 has no ``toArrow``: there the rows come through ``toPandas`` (Arrow-backed when
    ``spark.sql.execution.arrow.pyspark.enabled`` is on, as in the sessions deepspark starts) and go back
    to Arrow under the schema Spark itself gives the columns, so the types are those ``toArrow`` gives
    (an int column with nulls is still an int column, not pandas' float).
    """
    if _arrow_tables():
        return df.toArrow()
    import pyarrow as pa
    from pyspark.sql.pandas.types import to_arrow_schema

    return pa.Table.from_pandas(df.toPandas(), schema=to_arrow_schema(df.schema), preserve_index=False)


def arrow_to_dataframe(spark: SparkSession, table: pa.Table) -> DataFrame:
    """A DataFrame of ``table``'s rows (``spark.createDataFrame(table)``).

    pyspark 3.5 takes no Arrow table: there the rows go through pandas, under the Spark schema of the
    table's Arrow schema (a binary column stays binary).
    """
    if _arrow_tables():
        return spark.createDataFrame(table)
    from pyspark.sql.pandas.types import from_arrow_schema

    with warnings.catch_warnings():
        # pyspark 3.5 calls pandas' is_categorical_dtype, which pandas 2.1 deprecates, once per column.
        warnings.filterwarnings("ignore", category=FutureWarning, module="pyspark")
        return spark.createDataFrame(table.to_pandas(), schema=from_arrow_schema(table.schema))


def to_arrow_schema(schema: StructType, *, timezone: str | None) -> pa.Schema:
    """The Arrow schema of Spark's ``schema``, its timestamps in ``timezone``: the session's time zone, in
    which pyspark 4 hands timestamps to Python and checks that they come back.

    pyspark 3.5's ``to_arrow_schema`` has no ``timezone`` parameter and labels every timestamp UTC, which
    its workers take back whatever the session's zone (the zone only labels the same instants).
    """
    from pyspark.sql.pandas.types import to_arrow_schema as pyspark_schema

    if _arrow_tables():
        return pyspark_schema(schema, timezone=timezone)
    return pyspark_schema(schema)
