"""Refresh the dashboard cache after the rollups change: one run per new usage_daily_metrics
materialization batch (a 90-day backfill gives one or a few runs, not 90)."""

import json

import dagster as dg

from perf_pipeline.defs.cache.schedules import dashboard_cache_job

ROLLUP_KEY = dg.AssetKey("usage_daily_metrics")


@dg.sensor(
    name="refresh_dashboard_cache_after_rollup",
    job=dashboard_cache_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(
        "Every 30 s: if usage_daily_metrics was materialized since the last tick, request one "
        "dashboard_cache run (run_key = the newest materialization's storage id), so the dashboard "
        "serves new rollup numbers within a minute instead of at the next 15-minute warm."
    ),
)
def refresh_dashboard_cache_after_rollup(
    context: dg.SensorEvaluationContext,
) -> dg.SensorResult | dg.SkipReason:
    seen = json.loads(context.cursor)["last_storage_id"] if context.cursor else 0
    # newest materialization only: one indexed query however many partitions were rolled up
    records = context.instance.fetch_materializations(ROLLUP_KEY, limit=1).records
    if not records:
        return dg.SkipReason("usage_daily_metrics has never been materialized")
    latest = records[0].storage_id
    if latest <= seen:
        return dg.SkipReason(f"no usage_daily_metrics materialization after storage id {seen}")
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=f"usage_daily_metrics@{latest}")],
        cursor=json.dumps({"last_storage_id": latest}),
    )
