"""Default partition guard: rows in DEFAULT mean a month had no partition when they arrived; a standalone
month table left by an interrupted move_default_rows holds rows queries cannot see."""

import dagster as dg

from perf_pipeline.defs.partitions.assets import audit_log_partitions, usage_log_partitions
from perf_pipeline.defs.resources import PostgresResource
from perf_pipeline.lib.partitioning import (
    default_name,
    default_partition_summary,
    move_copies,
    unattached_partitions,
)


def _check(postgres: PostgresResource, table: str) -> dg.AssetCheckResult:
    with postgres.connection(autocommit=True) as conn:
        summary = default_partition_summary(conn, table)
        # an older version's interrupted move left rows in a table it never attached (DEFAULT already empty)
        unattached = unattached_partitions(conn, table)
        copies = move_copies(conn, table)
    months = ", ".join(f"{m:%Y-%m} ({n})" for m, n in sorted(summary.months.items()))
    problems = []
    if summary.rows:
        problems.append(f"{summary.rows} row(s) in {default_name(table)}, months: {months}")
    if unattached:
        problems.append(f"moved rows in unattached table(s) {', '.join(unattached)} (invisible to queries)")
    return dg.AssetCheckResult(
        passed=not problems,
        description=(
            f"{default_name(table)} is empty"
            if not problems
            else "; ".join(problems) + "; run job move_default_rows"
        ),
        metadata={
            "rows": summary.rows,
            "threshold": 0,
            "months": months or "none",
            "month_count": len(summary.months),
            "unattached_tables": len(unattached),
            # working copies of a move in progress or interrupted: duplicates of rows still in DEFAULT,
            # harmless; the next move_default_rows reuses and finishes them
            "move_copies": ", ".join(copies) or "none",
        },
    )


@dg.asset_check(
    asset=audit_log_partitions,
    name="audit_log_default_partition_empty",
    description="Fails with the count and months of rows in audit_log_default (fix: job move_default_rows).",
)
def audit_log_default_partition_empty(postgres: PostgresResource) -> dg.AssetCheckResult:
    return _check(postgres, "audit_log")


@dg.asset_check(
    asset=usage_log_partitions,
    name="usage_log_default_partition_empty",
    description="Fails with the count and months of rows in usage_log_default (fix: job move_default_rows).",
)
def usage_log_default_partition_empty(postgres: PostgresResource) -> dg.AssetCheckResult:
    return _check(postgres, "usage_log")
