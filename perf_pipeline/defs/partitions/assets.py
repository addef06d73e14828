"""``audit_log_partitions`` / ``usage_log_partitions``: a monthly key ↔ one PostgreSQL partition.

Materializing ``2025-08-01`` creates ``audit_log_y2025m08`` (with every index of the parent) if it is
missing. The keys run from :data:`FIRST_MONTH` to PERF_PIPELINE_PREMAKE_MONTHS months after the current
one, so the daily schedule can always name the months it keeps created ahead.
"""

import datetime as dt
import time

import dagster as dg

from perf_pipeline.defs.resources import PostgresResource
from perf_pipeline.lib.partitioning import (
    FIRST_MONTH,
    default_partition_summary,
    ensure_partitions,
    months_between,
    partition_name,
)
from perf_pipeline.settings import get_settings

#: current month + PREMAKE future months: end_offset=1 already adds the (incomplete) current month
MONTHLY_PARTITIONS = dg.MonthlyPartitionsDefinition(
    start_date=FIRST_MONTH.isoformat(), end_offset=get_settings().premake_months + 1, timezone="UTC"
)


def _create(
    context: dg.AssetExecutionContext, postgres: PostgresResource, table: str
) -> dg.MaterializeResult:
    started = time.perf_counter()
    window = context.partition_time_window
    months = months_between(window.start.date(), (window.end - dt.timedelta(days=1)).date())
    with postgres.connection(autocommit=True) as conn:
        created = ensure_partitions(conn, table, months)
        default_rows = default_partition_summary(conn, table).rows
    context.log.info(
        "%s: %d month(s) requested, created %s", table, len(months), ", ".join(created) or "none"
    )
    listing = "\n".join(
        f"- `{partition_name(table, m)}`" + (" (created)" if partition_name(table, m) in created else "")
        for m in months
    )
    return dg.MaterializeResult(
        metadata={
            "months": len(months),
            "created": len(created),
            "default_rows": default_rows,
            "duration_ms": (time.perf_counter() - started) * 1000,
            "partitions": dg.MetadataValue.md(listing),
        }
    )


@dg.asset(
    partitions_def=MONTHLY_PARTITIONS,
    backfill_policy=dg.BackfillPolicy.single_run(),
    group_name="partitions",
    kinds={"postgres"},
    description="audit_log's monthly partitions: one key ↔ audit_log_yYYYYmMM, created (with all indexes) if missing; "
    "DDL under a short lock_timeout with retries.",
)
def audit_log_partitions(
    context: dg.AssetExecutionContext, postgres: PostgresResource
) -> dg.MaterializeResult:
    return _create(context, postgres, "audit_log")


@dg.asset(
    partitions_def=MONTHLY_PARTITIONS,
    backfill_policy=dg.BackfillPolicy.single_run(),
    group_name="partitions",
    kinds={"postgres"},
    description="usage_log's monthly partitions: one key ↔ usage_log_yYYYYmMM, created (with all indexes) if missing; "
    "DDL under a short lock_timeout with retries.",
)
def usage_log_partitions(
    context: dg.AssetExecutionContext, postgres: PostgresResource
) -> dg.MaterializeResult:
    return _create(context, postgres, "usage_log")
