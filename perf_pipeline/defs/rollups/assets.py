"""The daily usage rollup as a daily-partitioned asset, with its blocking checks.

One partition key is one UTC day, one row of ``usage_daily_metrics``. A run of one key (the 30-minute
refresh of today, a late-data re-run) and a backfill of a whole range (one run:
``BackfillPolicy.single_run()``) are the same code path: :func:`perf_pipeline.lib.rollups.rollup_days`
over ``context.partition_time_window``, one set-based statement.

The checks are computed by the asset itself, because reconciliation must use the rollup's own snapshot
(REPEATABLE READ): a separate check step would see rows inserted since and fail spuriously on today.
A failed reconciliation also rolls the rollup back, so bad numbers never reach the tables that the view
and the dashboard cache read (the blocking check then stops downstream steps of the same run).
"""

import datetime as dt

import dagster as dg

from perf_pipeline.defs.resources import PostgresResource
from perf_pipeline.defs.rollups.partitions import daily_partitions, first_rollup_day
from perf_pipeline.lib.rollups import (
    LOOKBACK_DAYS,
    LateRows,
    RollupResult,
    late_rows_in_archived_months,
    missing_days,
    negative_days,
    rollup_days,
    utc_today,
)

ASSET_KEY = dg.AssetKey("usage_daily_metrics")
CHECK_RECONCILED = "reconciled_with_usage_log"
CHECK_NON_NEGATIVE = "no_negative_values"
CHECK_NO_MISSING_DAYS = "no_missing_days_last_90"
CHECK_NO_LATE_ROWS_ARCHIVED = "no_late_rows_in_archived_months"
#: evaluated by its own daily job (defs/rollups/reconciliation.py), not by every rollup run
CHECK_RECONCILE_90 = "rolled_up_days_match_usage_log_last_90"
MAX_LISTED = 20  # days listed in check metadata; the counts are always complete


@dg.asset(
    key=ASSET_KEY,
    group_name="rollups",
    kinds={"postgres"},
    partitions_def=daily_partitions,
    backfill_policy=dg.BackfillPolicy.single_run(),
    pool="postgres_heavy",
    description=(
        "Daily usage metrics (sessions, minutes, revenue, exact active users, per-provider numbers) in "
        "usage_daily_metrics / usage_daily_provider_metrics / usage_daily_user_sets, one partition per UTC "
        "day, upserted. Any range is one set-based SQL statement; the seed-compatible view "
        "dashboard_daily_metrics reads it."
    ),
    check_specs=[
        dg.AssetCheckSpec(
            CHECK_RECONCILED,
            asset=ASSET_KEY,
            blocking=True,
            description="Sessions, minutes and billable revenue per day and per provider "
            "exactly equal usage_log's, on the rollup's own snapshot.",
        ),
        dg.AssetCheckSpec(
            CHECK_NON_NEGATIVE,
            asset=ASSET_KEY,
            blocking=True,
            description="No negative number in the rolled-up days.",
        ),
        dg.AssetCheckSpec(
            CHECK_NO_MISSING_DAYS,
            asset=ASSET_KEY,
            blocking=False,
            description="Every day of the last 90 (before today) has a rollup row; "
            "a gap means a backfill is due.",
        ),
        dg.AssetCheckSpec(
            CHECK_NO_LATE_ROWS_ARCHIVED,
            asset=ASSET_KEY,
            blocking=False,
            description="No usage_log row exists for a month that usage retention archived. Such late rows "
            "sit in usage_log_default and are not counted: the rollup keeps the archived month's numbers "
            "rather than recompute its days from the few rows left. Fix: restore the month (perf-pipeline "
            "archive restore YYYY-MM --table usage_log), which moves them in; its days are then re-rolled.",
        ),
    ],
)
def usage_daily_metrics(
    context: dg.AssetExecutionContext, postgres: PostgresResource
) -> dg.MaterializeResult:
    window = context.partition_time_window
    start, end = window.start.date(), window.end.date()
    keys = context.partition_keys
    context.log.info(
        "rolling up %d day(s): %s", len(keys), keys[0] if len(keys) == 1 else f"{keys[0]}...{keys[-1]}"
    )
    with postgres.connection(autocommit=True) as conn:
        result = rollup_days(conn, start, end)
        negatives = negative_days(conn, start, end)
        today = utc_today()
        first = max(first_rollup_day(), today - dt.timedelta(days=LOOKBACK_DAYS))
        missing = missing_days(conn, first, today - dt.timedelta(days=1)) if first < today else []
        late_rows = late_rows_in_archived_months(conn)
    for month, why in sorted(result.unavailable_months.items()):
        context.log.warning(
            "%s: days kept as they are, not recomputed: the month is %s", month.strftime("%Y-%m"), why
        )
    if result.rearmed_days:
        context.log.warning(
            "re-armed the late-data marks of a rollup that died after claiming them: %s",
            ", ".join(d.isoformat() for d in result.rearmed_days),
        )
    if not result.committed:
        context.log.error(
            "reconciliation failed on %d day(s); the rollup was rolled back, the tables keep "
            "their previous numbers",
            len({m.day for m in result.mismatches}),
        )
    if result.stale_days_cleared:
        context.log.info(
            "late-data marks cleared: %s", ", ".join(d.isoformat() for d in result.stale_days_cleared)
        )

    mismatch_days = sorted({m.day for m in result.mismatches})
    checks = [
        dg.AssetCheckResult(
            check_name=CHECK_RECONCILED,
            passed=result.reconciled,
            severity=dg.AssetCheckSeverity.ERROR,
            metadata={
                "mismatching_days": len(mismatch_days),
                "mismatches": dg.MetadataValue.md(_mismatch_table(result)) if result.mismatches else "none",
                "days_checked": result.days,
                "rolled_back": not result.committed,
                "duration_ms": result.reconcile_ms,
            },
        ),
        dg.AssetCheckResult(
            check_name=CHECK_NON_NEGATIVE,
            passed=not negatives,
            severity=dg.AssetCheckSeverity.ERROR,
            metadata={
                "negative_days": len(negatives),
                "days": ", ".join(d.isoformat() for d in negatives[:MAX_LISTED]) or "none",
            },
        ),
        dg.AssetCheckResult(
            check_name=CHECK_NO_MISSING_DAYS,
            passed=not missing,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={
                "missing_days": len(missing),
                "threshold": 0,
                "from": first.isoformat(),
                "to": (today - dt.timedelta(days=1)).isoformat(),
                "days": ", ".join(d.isoformat() for d in missing[:MAX_LISTED]) or "none",
            },
        ),
    ]
    checks.append(_late_rows_check(late_rows))
    return dg.MaterializeResult(
        metadata={
            "rows": result.rows_scanned,
            "rows_scanned": result.rows_scanned,
            "duration_ms": result.duration_ms,
            "upsert_ms": result.upsert_ms,
            "sessions": result.sessions,
            "revenue": float(result.revenue),
            "days": result.days,
            "first_day": start.isoformat(),
            "last_day": (end - dt.timedelta(days=1)).isoformat(),
            "late_days_cleared": len(result.stale_days_cleared),
            "days_kept_archived": len(result.skipped_days),
            "committed": result.committed,
        },
        check_results=checks,
    )


def _late_rows_check(late: list[LateRows]) -> dg.AssetCheckResult:
    where = "; ".join(
        f"{r.rows} row(s) of {r.month:%Y-%m} (archive state {r.state}) in {r.relation}, days "
        + ", ".join(d.isoformat() for d in r.days[:MAX_LISTED])
        for r in late
    )
    return dg.AssetCheckResult(
        check_name=CHECK_NO_LATE_ROWS_ARCHIVED,
        passed=not late,
        severity=dg.AssetCheckSeverity.ERROR,
        description=(
            f"late rows for archived months, not counted: {where}. Restore each month "
            f"(perf-pipeline archive restore YYYY-MM --table usage_log) to count them"
            if late
            else "no usage_log row for an archived month"
        ),
        metadata={
            "late_rows": sum(r.rows for r in late),
            "months": ", ".join(f"{r.month:%Y-%m}" for r in late) or "none",
            "threshold": 0,
        },
    )


def _mismatch_table(result: RollupResult) -> str:
    lines = [
        "| day | provider | sessions (usage_log / rollup) | minutes | revenue |",
        "|---|---|---|---|---|",
    ]
    for m in result.mismatches[:MAX_LISTED]:
        lines.append(
            f"| {m.day} | {m.provider} | {m.expected_sessions} / {m.rolled_sessions} | "
            f"{m.expected_minutes} / {m.rolled_minutes} | {m.expected_revenue} / {m.rolled_revenue} |"
        )
    return "\n".join(lines)


usage_daily_metrics_job = dg.define_asset_job(
    "usage_daily_metrics_job",
    selection=dg.AssetSelection.assets(ASSET_KEY)
    - dg.AssetSelection.checks(dg.AssetCheckKey(ASSET_KEY, CHECK_RECONCILE_90)),
    partitions_def=daily_partitions,
    description="Roll up usage for the given day(s); a partition range runs as one run, one statement.",
)
