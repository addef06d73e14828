"""Default partition guard: rows in DEFAULT mean a month had no partition when they arrived."""

import dagster as dg

from perf_pipeline.defs.partitions.assets import audit_log_partitions, usage_log_partitions
from perf_pipeline.defs.resources import PostgresResource
from perf_pipeline.lib.partitioning import default_name, default_partition_summary


def _check(postgres: PostgresResource, table: str) -> dg.AssetCheckResult:
    with postgres.connection(autocommit=True) as conn:
        summary = default_partition_summary(conn, table)
    months = ", ".join(f"{m:%Y-%m} ({n})" for m, n in sorted(summary.months.items()))
    return dg.AssetCheckResult(
        passed=summary.rows == 0,
        description=(
            f"{default_name(table)} is empty"
            if not summary.rows
            else f"{summary.rows} row(s) in {default_name(table)}, months: {months}; run job move_default_rows"
        ),
        metadata={
            "rows": summary.rows,
            "threshold": 0,
            "months": months or "none",
            "month_count": len(summary.months),
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
