"""The safety net behind the late-data marks: once a day, every rolled-up day of the last 90 is compared with
usage_log (counts and sums per day, one scan), and a day that disagrees with no mark pending is marked
again, so the observation sensor reports the day changed and the automation re-runs it. A day found here
means a mark was lost (a bug, a write the triggers did not see such as a session with triggers disabled, a
restored backup): the check fails with the days and both numbers, and the days are repaired without anyone.
"""

import datetime as dt

import dagster as dg

from perf_pipeline.defs.metadata import table
from perf_pipeline.defs.resources import PostgresResource
from perf_pipeline.defs.rollups.assets import ASSET_KEY, CHECK_RECONCILE_90, MAX_LISTED
from perf_pipeline.defs.scheduling import utc_schedule
from perf_pipeline.defs.time_partitions import DATA_START
from perf_pipeline.lib.rollups import LOOKBACK_DAYS, find_disagreeing_days, mark_days, utc_today


@dg.asset_check(
    asset=ASSET_KEY,
    name=CHECK_RECONCILE_90,
    blocking=False,
    description=f"Daily: every rolled-up day of the last {LOOKBACK_DAYS} (before today) has exactly "
    "usage_log's sessions, minutes and billable revenue, unless a late-data mark is pending for it or its "
    "month is archived. A day that disagrees is marked again (observed, then re-run by the automation) and listed "
    "here: it means a late-data mark was lost.",
)
def rolled_up_days_match_usage_log_last_90(postgres: PostgresResource) -> dg.AssetCheckResult:
    today = utc_today()
    first = max(DATA_START, today - dt.timedelta(days=LOOKBACK_DAYS))
    last = today - dt.timedelta(days=1)
    if last < first:
        return dg.AssetCheckResult(passed=True, description="no closed day to compare yet")
    with postgres.connection(autocommit=True) as conn:
        bad = find_disagreeing_days(conn, first, last)
        mark_days(conn, [d.day for d in bad])
    listed = [
        {
            "day": d.day.isoformat(),
            "sessions (usage_log)": d.expected_sessions,
            "sessions (rollup)": d.rolled_sessions,
            "minutes (usage_log)": d.expected_minutes,
            "minutes (rollup)": d.rolled_minutes,
            "revenue (usage_log)": d.expected_revenue,
            "revenue (rollup)": d.rolled_revenue,
        }
        for d in bad[:MAX_LISTED]
    ]
    return dg.AssetCheckResult(
        passed=not bad,
        severity=dg.AssetCheckSeverity.WARN,
        description=(
            f"{len(bad)} rolled-up day(s) disagreed with usage_log with no mark pending; marked again for the "
            "automation to re-run"
            if bad
            else f"every rolled-up day from {first} to {last} agrees with usage_log"
        ),
        metadata={
            "disagreeing_days": len(bad),
            "threshold": 0,
            "from": first.isoformat(),
            "to": last.isoformat(),
            "days": table(listed) if bad else "none",
        },
    )


reconcile_usage_rollups_job = dg.define_asset_job(
    "reconcile_usage_rollups_job",
    selection=dg.AssetSelection.checks(dg.AssetCheckKey(ASSET_KEY, CHECK_RECONCILE_90)),
    description=f"Compare the last {LOOKBACK_DAYS} rolled-up days with usage_log and re-mark any day that "
    "disagrees (the automation then re-runs it).",
)

reconcile_usage_rollups = utc_schedule(
    "reconcile_usage_rollups",
    reconcile_usage_rollups_job,
    "20 5 * * *",
    f"Daily at 05:20 UTC (after yesterday's close at 02:00): the safety net behind the late-data "
    f"marks, one scan of {LOOKBACK_DAYS} days of usage_log (counts and sums, no distinct users).",
)
