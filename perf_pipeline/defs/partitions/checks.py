"""Checks of the partition assets, one factory for both tables:

* ``<table>_default_partition_empty``: rows in DEFAULT mean a month had no partition when they arrived
  (fix: job move_default_rows); a standalone month table left unattached by an older, interrupted move
  holds rows queries cannot see;
* ``<table>_months_ahead_exist``: this month and the PERF_PIPELINE_PREMAKE_MONTHS after it are attached;
  the next month missing within a week of its start is an error (its rows would land in DEFAULT).
"""

import datetime as dt

import dagster as dg

from perf_pipeline.defs.partitions.assets import audit_log_partitions, usage_log_partitions
from perf_pipeline.defs.resources import PostgresResource, SettingsResource
from perf_pipeline.lib.calendar import add_months
from perf_pipeline.lib.partitioning import (
    default_name,
    default_partition_summary,
    existing_months,
    months_ahead,
    move_copies,
    partition_name,
    unattached_partitions,
)

#: the next month must exist this many days before it starts
NEXT_MONTH_DEADLINE_DAYS = 7


def _default_check(asset: dg.AssetsDefinition, table: str) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=asset,
        name=f"{table}_default_partition_empty",
        description=f"{default_name(table)} holds no row: every row has its month's partition. Fails with the "
        "count and months of rows found there (fix: job move_default_rows).",
    )
    def _check(postgres: PostgresResource) -> dg.AssetCheckResult:
        with postgres.connection(autocommit=True) as conn:
            summary = default_partition_summary(conn, table)
            # an older version's interrupted move left rows in a table it never attached (DEFAULT empty)
            unattached = unattached_partitions(conn, table)
            copies = move_copies(conn, table)
        months = ", ".join(f"{m:%Y-%m} ({n})" for m, n in sorted(summary.months.items()))
        problems = []
        if summary.rows:
            problems.append(f"{summary.rows} row(s) in {default_name(table)}, months: {months}")
        if unattached:
            problems.append(
                f"moved rows in unattached table(s) {', '.join(unattached)} (invisible to queries)"
            )
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

    return _check


def _ahead_check(asset: dg.AssetsDefinition, table: str) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=asset,
        name=f"{table}_months_ahead_exist",
        description=f"This month and the PERF_PIPELINE_PREMAKE_MONTHS months after it are attached to {table}. "
        f"The next month missing {NEXT_MONTH_DEADLINE_DAYS} days or less before it starts is an error: from its "
        "first second, its rows would land in DEFAULT.",
    )
    def _check(postgres: PostgresResource, settings: SettingsResource) -> dg.AssetCheckResult:
        today = dt.datetime.now(dt.UTC).date()
        wanted = months_ahead(today, settings.get().premake_months)
        with postgres.connection(autocommit=True) as conn:
            attached = existing_months(conn, table)
        missing = [m for m in wanted if m not in attached]
        next_month = add_months(wanted[0], 1)
        days_left = (next_month - today).days
        urgent = next_month in missing and days_left <= NEXT_MONTH_DEADLINE_DAYS
        return dg.AssetCheckResult(
            passed=not missing,
            severity=dg.AssetCheckSeverity.ERROR
            if urgent or wanted[0] in missing
            else dg.AssetCheckSeverity.WARN,
            description=(
                f"{len(wanted)} months attached ({wanted[0]:%Y-%m} … {wanted[-1]:%Y-%m})"
                if not missing
                else "missing: "
                + ", ".join(partition_name(table, m) for m in missing)
                + f"; next month starts in {days_left} day(s): run create_{table}_partitions_ahead_job"
            ),
            metadata={
                "missing_months": len(missing),
                "threshold": 0,
                "next_month_starts_in_days": days_left,
                "deadline_days": NEXT_MONTH_DEADLINE_DAYS,
            },
        )

    return _check


audit_log_default_partition_empty = _default_check(audit_log_partitions, "audit_log")
usage_log_default_partition_empty = _default_check(usage_log_partitions, "usage_log")
audit_log_months_ahead_exist = _ahead_check(audit_log_partitions, "audit_log")
usage_log_months_ahead_exist = _ahead_check(usage_log_partitions, "usage_log")
