"""Re-warm the dashboard cache every 15 minutes (the user story's cadence) even when no rollup ran."""

import dagster as dg

from perf_pipeline.defs.cache.assets import dashboard_cache

dashboard_cache_job = dg.define_asset_job(
    "dashboard_cache_job",
    selection=dg.AssetSelection.assets(dashboard_cache),
    description="Recompute the dashboard cache from SQL and run its checks.",
)

warm_dashboard_cache_every_15_min = dg.ScheduleDefinition(
    name="warm_dashboard_cache_every_15_min",
    job=dashboard_cache_job,
    cron_schedule="*/15 * * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description=(
        "Every 15 minutes: refresh the KPIs (their windows slide with time) and the standard trend ranges, "
        "and bump the cache generation. Between warms, expired keys are refreshed by the first reader "
        "(single-flight) while others get the stale copy, so the cache is never cold."
    ),
)
