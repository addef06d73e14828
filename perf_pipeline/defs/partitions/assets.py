"""``audit_log_partitions`` / ``usage_log_partitions``: a monthly key ↔ one PostgreSQL partition.

Materializing ``2025-08-01`` creates ``audit_log_y2025m08`` (with every index of the parent) if it is
missing. The keys are the months attached in PostgreSQL plus this month and the
PERF_PIPELINE_PREMAKE_MONTHS after it (dynamic partitions kept by the ``observe_platform_tables`` sensor,
defs/time_partitions.py): a month however it was created shows as materialized, an archived month leaves
the bar, and the daily schedule can always name the months it keeps created ahead.
"""

import datetime as dt
import time

import dagster as dg

from perf_pipeline.defs.resources import PostgresResource
from perf_pipeline.defs.time_partitions import TABLE_MONTHS
from perf_pipeline.lib.partitioning import (
    default_partition_summary,
    ensure_partitions,
    existing_months,
    month_of_key,
    partition_name,
)


def _create(
    context: dg.AssetExecutionContext, postgres: PostgresResource, table: str
) -> dg.MaterializeResult:
    started = time.perf_counter()
    months = sorted(month_of_key(key) for key in context.partition_keys)
    with postgres.connection(autocommit=True) as conn:
        created = ensure_partitions(conn, table, months)
        attached = existing_months(conn, table)
        default_rows = default_partition_summary(conn, table).rows
    context.log.info(
        "%s: %d month(s) requested, created %s",
        table,
        len(months),
        ", ".join(created) or "none (all existed)",
    )
    missing = [m for m in months if m not in attached]  # archived months: ensure_partitions left them alone
    for month in months:
        name = partition_name(table, month)
        context.add_asset_metadata(
            {
                "partition": name,
                "created_by_this_run": name in created,
                "attached": month in attached,
            },
            partition_key=month.isoformat(),
        )
    if missing:
        raise dg.Failure(
            description=f"{table}: not attached after the run: "
            + ", ".join(partition_name(table, m) for m in missing)
            + " (archived months are restored with perf-pipeline archive restore, not re-created)",
        )
    return dg.MaterializeResult(
        metadata={
            "run_months": len(months),
            "run_created": len(created),
            "default_rows": default_rows,
            "run_duration_ms": round((time.perf_counter() - started) * 1000, 1),
        }
    )


def _asset(table: str):
    @dg.asset(
        name=f"{table}_partitions",
        partitions_def=TABLE_MONTHS[table],
        backfill_policy=dg.BackfillPolicy.single_run(),
        group_name="partitions",
        kinds={"postgres"},
        deps=["platform_schema"],
        freshness_policy=dg.FreshnessPolicy.time_window(
            fail_window=dt.timedelta(days=2), warn_window=dt.timedelta(hours=26)
        ),
        description=f"{table}'s monthly partitions: one key ↔ {table}_yYYYYmMM, created (with all indexes) if "
        "missing; DDL under a short lock_timeout with retries. Fresh when the daily run of "
        f"create_{table}_partitions_ahead succeeded within a day.",
    )
    def _partitions(context: dg.AssetExecutionContext, postgres: PostgresResource) -> dg.MaterializeResult:
        return _create(context, postgres, table)

    return _partitions


audit_log_partitions = _asset("audit_log")
usage_log_partitions = _asset("usage_log")
