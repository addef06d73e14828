"""How numbers and tables reach the Dagster UI: the one presentation helper of the code location.

Metadata is for people and for the plots: floats rounded to what a reader can use, sizes in human units
next to the exact byte count where it matters (Dagster has no size type; ``dagster/size_bytes`` is the
key its asset page shows as storage), tables as ``MetadataValue.table`` (the UI renders and sorts them),
and plot keys grouped by a prefix that sorts in reading order.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import dagster as dg

from perf_pipeline.lib.health import human_bytes


def rounded(value: float | None, digits: int = 2) -> float:
    """A float for people: ``digits`` decimals; None and NaN become 0.0."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return 0.0
    return round(float(value), digits)


def size(n: int | float | None) -> str:
    """``372979391`` → ``"355.7 MB"``."""
    return human_bytes(float(n or 0))


def _cell(value: object) -> object:
    if isinstance(value, bool) or value is None or isinstance(value, int | str):
        return value if value is not None else ""
    if isinstance(value, float):
        return rounded(value, 3 if abs(value) < 10 else 1)
    return str(value)


def table(rows: Iterable[Mapping[str, object]]) -> dg.TableMetadataValue:
    """Rows of equal keys as a table the UI renders (columns in the rows' key order)."""
    records = [dg.TableRecord({k: _cell(v) for k, v in row.items()}) for row in rows]
    return dg.MetadataValue.table(records=records)
