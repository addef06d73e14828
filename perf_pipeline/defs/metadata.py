"""How numbers and tables reach the Dagster UI: the one presentation helper of the code location.

Metadata is for people and for the plots: floats rounded to what a reader can use, sizes in human units
next to the exact byte count where it matters (Dagster has no size type; ``dagster/size_bytes`` is the
key its asset page shows as storage), tables as ``MetadataValue.table`` (the UI renders and sorts them),
and plot keys grouped by a prefix that sorts in reading order. ``rounded`` and ``size`` live in
:mod:`perf_pipeline.lib.health.report` with the rest of how results read, and are re-exported here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import dagster as dg

from perf_pipeline.lib.health.report import Markdown, Rows, Verdict, rounded, size

__all__ = ["as_metadata", "check_result", "rounded", "size", "table"]


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


def as_metadata(fields: Mapping[str, object]) -> dict[str, object]:
    """Fields from :mod:`perf_pipeline.lib.health.report` as Dagster metadata: ``Rows`` become tables,
    ``Markdown`` rendered markdown, everything else stays as it is (same keys, same order)."""
    out: dict[str, object] = {}
    for key, value in fields.items():
        if isinstance(value, Rows):
            out[key] = table(value)
        elif isinstance(value, Markdown):
            out[key] = dg.MetadataValue.md(str(value))
        else:
            out[key] = value
    return out


def check_result(
    check_name: str, verdict: Verdict, *, severity: dg.AssetCheckSeverity | None = None
) -> dg.AssetCheckResult:
    """A check result from a :class:`~perf_pipeline.lib.health.report.Verdict` (its fields as metadata)."""
    return dg.AssetCheckResult(
        check_name=check_name,
        passed=verdict.passed,
        description=verdict.description,
        metadata=as_metadata(verdict.fields),
        **({"severity": severity} if severity is not None else {}),
    )
