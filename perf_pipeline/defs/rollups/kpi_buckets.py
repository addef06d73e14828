"""`usage_kpi_buckets`: usage_log pre-aggregated in closed 5-minute buckets for the real-time KPIs (0080).

A KPI cache miss reads the buckets sealed here and only minutes of its 24-hour window from usage_log, so
its cost no longer grows with the rows per day. Sealing is optional for correctness: a bucket without a
trusted row is read from usage_log, so a late, failed or killed sealing makes the KPIs slower, never
wrong. The check is computed by the asset itself, on the sealing's own snapshot (as the daily rollup's).
"""

import datetime as dt

import dagster as dg

from perf_pipeline.defs.metadata import table
from perf_pipeline.defs.resources import PostgresResource
from perf_pipeline.defs.scheduling import utc_schedule
from perf_pipeline.lib.kpi_buckets import DEFAULT_GRACE, SealResult, seal_buckets, untrusted_buckets

ASSET_KEY = dg.AssetKey("usage_kpi_buckets")
CHECK_RECONCILED = "buckets_reconciled_with_usage_log"
CHECK_TRUSTED = "buckets_trusted_last_24h"
MAX_LISTED = 20


@dg.asset(
    key=ASSET_KEY,
    group_name="rollups",
    kinds={"postgres"},
    # the buckets are the last 48 h of usage_log (today's and yesterday's days)
    deps=[dg.AssetDep("usage_log", partition_mapping=dg.AllPartitionMapping())],
    # sealed every 5 minutes: never more than 10 minutes old while the schedule runs
    freshness_policy=dg.FreshnessPolicy.time_window(
        fail_window=dt.timedelta(minutes=10), warn_window=dt.timedelta(minutes=7)
    ),
    description=(
        "usage_log per closed 5-minute UTC bucket of the last 48 h (transcriptions, billable revenue, "
        "duration sum and count, a bitmap of the bucket's users) in usage_kpi_buckets: what a KPI cache "
        "miss reads instead of the 24 hours' rows. Seals the buckets that are due (no row yet, or a late "
        "row marked them), reconciles them on the same snapshot, drops what fell out of the 48 h."
    ),
    check_specs=[
        dg.AssetCheckSpec(
            CHECK_RECONCILED,
            asset=ASSET_KEY,
            blocking=True,
            description="Every sealed bucket's numbers and user set exactly equal usage_log's, on the "
            "sealing's own snapshot; otherwise nothing is written.",
        ),
        dg.AssetCheckSpec(
            CHECK_TRUSTED,
            asset=ASSET_KEY,
            blocking=False,
            description="Every closed bucket of the last 24 h (over for the grace period) has a trusted row "
            "after the run: none missing, none marked by a late row. Failing means KPI misses read "
            "usage_log for those buckets (still exact, slower): a sealing skipped or failed.",
        ),
    ],
)
def usage_kpi_buckets(context: dg.AssetExecutionContext, postgres: PostgresResource) -> dg.MaterializeResult:
    with postgres.connection(autocommit=True) as conn:
        result = seal_buckets(conn)
        untrusted = untrusted_buckets(conn)
    if result.compacted_from_bits:
        context.log.info(
            "bitmaps were %d bits wide for far fewer users: renumbered the users, resealing every bucket",
            result.compacted_from_bits,
        )
    if result.skipped:
        context.log.warning("nothing sealed: %s", result.skipped)
    elif result.buckets:
        context.log.info(
            "sealed %d bucket(s) %s … %s (%d rows, %d new users)",
            len(result.buckets),
            result.buckets[0].isoformat(),
            result.buckets[-1].isoformat(),
            result.rows_read,
            result.new_users,
        )
    else:
        context.log.info("no bucket due")
    if result.mismatches:
        context.log.error(
            "reconciliation failed on %d bucket(s); nothing written, the KPIs read them from usage_log",
            len(result.mismatches),
        )
    return dg.MaterializeResult(
        metadata={
            "buckets_sealed": len(result.buckets) if result.committed else 0,
            "rows": result.rows_read,
            "new_users": result.new_users,
            "late_buckets_cleared": len(result.stale_buckets_cleared),
            "waited_for_writers_s": round(result.waited_s, 3),
            "skipped": result.skipped or "no",
            "pruned_buckets": result.pruned_buckets,
            "renumbered_users_from_bits": result.compacted_from_bits,
            "duration_ms": result.duration_ms,
            "committed": result.committed,
        },
        check_results=[
            dg.AssetCheckResult(
                check_name=CHECK_RECONCILED,
                passed=result.reconciled,
                severity=dg.AssetCheckSeverity.ERROR,
                metadata={
                    "mismatching_buckets": len(result.mismatches),
                    "mismatches": _mismatch_table(result) if result.mismatches else "none",
                    "buckets_checked": len(result.buckets) if not result.skipped else 0,
                },
            ),
            dg.AssetCheckResult(
                check_name=CHECK_TRUSTED,
                passed=not untrusted,
                severity=dg.AssetCheckSeverity.WARN,
                metadata={
                    "untrusted_buckets": len(untrusted),
                    "threshold": 0,
                    "oldest": untrusted[0].isoformat() if untrusted else "none",
                    "skipped": result.skipped or "no",
                },
            ),
        ],
    )


def _mismatch_table(result: SealResult) -> dg.TableMetadataValue:
    return table(
        {
            "bucket": m.bucket.isoformat(),
            "transcriptions (usage_log)": m.expected_transcriptions,
            "transcriptions (bucket)": m.bucket_transcriptions,
            "revenue (usage_log)": m.expected_billable_cost_usd,
            "revenue (bucket)": m.bucket_billable_cost_usd,
            "active users (usage_log)": m.expected_active_users,
            "active users (bucket)": m.bucket_active_users,
        }
        for m in result.mismatches[:MAX_LISTED]
    )


usage_kpi_buckets_job = dg.define_asset_job(
    "usage_kpi_buckets_job",
    selection=[ASSET_KEY],
    executor_def=dg.in_process_executor,  # one small step every 5 minutes: no step process to spawn
    description="Seal the closed 5-minute buckets of usage_log that are due into usage_kpi_buckets.",
)

seal_kpi_buckets = utc_schedule(
    "seal_kpi_buckets",
    usage_kpi_buckets_job,
    "2-59/5 * * * *",
    (
        "Every 5 minutes, 2 minutes after a bucket ends: seal the buckets over for at least "
        f"{int(DEFAULT_GRACE.total_seconds() // 60)} minutes and those late rows marked. A KPI cache miss "
        "then reads at most about a quarter of an hour of usage_log rows."
    ),
)
