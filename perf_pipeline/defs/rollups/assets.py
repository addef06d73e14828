"""The daily usage rollup as a daily-partitioned asset, with its blocking checks.

One partition key is one UTC day, one row of ``usage_daily_metrics``. A run of one key (the 30-minute
refresh of today, a late-data re-run) and a backfill of a whole range (one run:
``BackfillPolicy.single_run()``) are the same code path: :func:`perf_pipeline.lib.rollups.rollup_days`
over ``context.partition_time_window``, one set-based statement.

Triggers: today's refresh and yesterday's close are schedules (stated cadences); a past day is re-run by
declarative automation when ``usage_log`` reports that day changed (late rows: see defs/platform), and
only if it was rolled up before. Each day of a run gets its own numbers as its partition's metadata
(``context.add_asset_metadata(..., partition_key=day)``); what describes the whole run is named ``run_*``
(Dagster copies a run's own metadata onto every partition of a range run: dagster-io/dagster#18123).

The checks are computed by the asset itself, because reconciliation must use the rollup's own snapshot
(REPEATABLE READ): a separate check step would see rows inserted since and fail spuriously on today.
A failed reconciliation also rolls the rollup back, so bad numbers never reach the tables that the view
and the dashboard cache read (the blocking check then stops downstream steps of the same run).
"""

import datetime as dt

import dagster as dg

from perf_pipeline.defs.resources import PostgresResource
from perf_pipeline.defs.time_partitions import DATA_START, DAYS
from perf_pipeline.lib.rollups import (
    LOOKBACK_DAYS,
    LateRows,
    RollupResult,
    late_rows_in_archived_months,
    missing_days,
    negative_days,
    rolled_up,
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

#: a past day that was rolled up is re-run when usage_log reports it changed (a late write); today is the
#: 30-minute schedule's, a day never rolled up waits for its first rollup (a backfill). The trigger stays
#: armed until a run is requested for the day *after* the change: Dagster's own since_last_handled() is
#: reset by the tick that follows a request, so a late write reported in that same tick (the earlier run of
#: the day just ended, or still runs) would be forgotten, and the day left wrong with its mark pending
_USAGE_CHANGED = dg.AutomationCondition.any_deps_updated()
LATE_DATA_RERUN = (
    _USAGE_CHANGED.since(
        (dg.AutomationCondition.newly_requested() & ~_USAGE_CHANGED)
        | dg.AutomationCondition.initial_evaluation()
    )
    & ~dg.AutomationCondition.missing()
    & ~dg.AutomationCondition.in_latest_time_window()
    & ~dg.AutomationCondition.in_progress()
).with_label("re-run a rolled-up past day whose usage_log rows changed")


@dg.asset(
    key=ASSET_KEY,
    group_name="rollups",
    kinds={"postgres"},
    partitions_def=DAYS,
    # a day of the rollup reads that day of usage_log (usage_log's days are dynamic partitions, same keys)
    deps=[dg.AssetDep("usage_log", partition_mapping=dg.IdentityPartitionMapping())],
    backfill_policy=dg.BackfillPolicy.single_run(),
    pool="postgres_heavy",
    automation_condition=LATE_DATA_RERUN,
    # today is refreshed every 30 minutes: the newest rollup is never older than that plus a margin
    freshness_policy=dg.FreshnessPolicy.time_window(
        fail_window=dt.timedelta(minutes=75), warn_window=dt.timedelta(minutes=45)
    ),
    description=(
        "Daily usage metrics (sessions, minutes, revenue, exact active users, per-provider numbers) in "
        "usage_daily_metrics / usage_daily_provider_metrics / usage_daily_user_sets, one partition per UTC "
        "day, upserted. Any range is one set-based SQL statement; dashboard_daily_metrics (the dashboard's "
        "daily metrics view, in the columns the dashboard expects) reads it."
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
        first = max(DATA_START, today - dt.timedelta(days=LOOKBACK_DAYS))
        missing = missing_days(conn, first, today - dt.timedelta(days=1)) if first < today else []
        late_rows = late_rows_in_archived_months(conn)
        days = rolled_up(conn, start, end)
    for month, why in sorted(result.unavailable_months.items()):
        context.log.warning(
            "%s: days kept as they are, not recomputed: the month is %s", f"{month:%Y-%m}", why
        )
    if result.rearmed_days:
        context.log.warning(
            "re-armed the late-data marks of a rollup that died after claiming them: %s",
            ", ".join(d.isoformat() for d in result.rearmed_days),
        )
    if not result.committed:
        context.log.error(
            "reconciliation failed on %d day(s); the rollup was rolled back, the tables keep their previous "
            "numbers",
            len({m.day for m in result.mismatches}),
        )
    if result.stale_days_cleared:
        context.log.info(
            "late-data marks consumed: %s", ", ".join(d.isoformat() for d in result.stale_days_cleared)
        )
    _per_day_metadata(context, result, days)

    mismatch_days = sorted({m.day for m in result.mismatches})
    checks = [
        dg.AssetCheckResult(
            check_name=CHECK_RECONCILED,
            passed=result.reconciled,
            severity=dg.AssetCheckSeverity.ERROR,
            metadata={
                "mismatching_days": len(mismatch_days),
                "threshold": 0,
                "mismatches": _mismatch_table(result) if result.mismatches else "none",
                "days_checked": result.days,
                "rolled_back": not result.committed,
                "duration_ms": round(result.reconcile_ms, 1),
            },
        ),
        dg.AssetCheckResult(
            check_name=CHECK_NON_NEGATIVE,
            passed=not negatives,
            severity=dg.AssetCheckSeverity.ERROR,
            metadata={
                "negative_days": len(negatives),
                "threshold": 0,
                "days": ", ".join(d.isoformat() for d in negatives[:MAX_LISTED]) or "none",
            },
        ),
        dg.AssetCheckResult(
            check_name=CHECK_NO_MISSING_DAYS,
            passed=not missing,
            severity=dg.AssetCheckSeverity.WARN,
            description=(
                f"every day from {first} to {today - dt.timedelta(days=1)} is rolled up"
                if not missing
                else f"{len(missing)} day(s) not rolled up: backfill usage_daily_metrics for them"
            ),
            metadata={
                "missing_days": len(missing),
                "threshold": 0,
                "from": first.isoformat(),
                "to": (today - dt.timedelta(days=1)).isoformat(),
                "days": ", ".join(d.isoformat() for d in missing[:MAX_LISTED]) or "none",
            },
        ),
        _late_rows_check(late_rows),
    ]
    return dg.MaterializeResult(
        # the whole run's figures (copied onto each day of a range run, hence the run_ prefix)
        metadata={
            "run_days": len(keys),
            "run_first_day": keys[0],
            "run_last_day": keys[-1],
            "run_rows_read": result.rows_scanned,
            "run_duration_ms": round(result.duration_ms, 1),
            "run_upsert_ms": round(result.upsert_ms, 1),
            "run_reconcile_ms": round(result.reconcile_ms, 1),
            "run_late_days_consumed": len(result.stale_days_cleared),
            "run_committed": result.committed,
        },
        check_results=checks,
    )


def _per_day_metadata(context: dg.AssetExecutionContext, result: RollupResult, days: dict) -> None:
    """Each day's own numbers on its own partition, whatever the size of the run."""
    kept = set(result.skipped_days)
    for key in context.partition_keys:
        day = dt.date.fromisoformat(key)
        row = days.get(day)
        if row is None:
            context.add_asset_metadata({"status": "no rollup row"}, partition_key=key)
            continue
        context.add_asset_metadata(
            {
                "sessions": int(row["sessions"]),
                "dagster/row_count": int(row["sessions"]),
                "minutes": round(float(row["total_minutes"]), 2),
                "revenue_usd": round(float(row["revenue"]), 2),
                "active_users": int(row["active_users"]),
                "avg_duration_min": round(float(row["avg_duration"]), 2)
                if row["avg_duration"] is not None
                else 0.0,
                "status": (
                    f"kept: its month is {result.unavailable_months[day.replace(day=1)]}"
                    if day in kept
                    else ("rolled up" if result.committed else "rolled back (reconciliation failed)")
                ),
            },
            partition_key=key,
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


def _mismatch_table(result: RollupResult) -> dg.TableMetadataValue:
    return dg.MetadataValue.table(
        records=[
            dg.TableRecord(
                {
                    "day": m.day.isoformat(),
                    "provider": m.provider,
                    "sessions (usage_log)": m.expected_sessions or 0,
                    "sessions (rollup)": m.rolled_sessions or 0,
                    "minutes (usage_log)": float(m.expected_minutes or 0),
                    "minutes (rollup)": float(m.rolled_minutes or 0),
                    "revenue (usage_log)": float(m.expected_revenue or 0),
                    "revenue (rollup)": float(m.rolled_revenue or 0),
                }
            )
            for m in result.mismatches[:MAX_LISTED]
        ]
    )


usage_daily_metrics_job = dg.define_asset_job(
    "usage_daily_metrics_job",
    selection=dg.AssetSelection.assets(ASSET_KEY)
    - dg.AssetSelection.checks(dg.AssetCheckKey(ASSET_KEY, CHECK_RECONCILE_90)),
    partitions_def=DAYS,
    description="Roll up usage for the given day(s); a partition range runs as one run, one statement.",
)
