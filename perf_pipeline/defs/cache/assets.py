"""`dashboard_cache`: the dashboard's KPIs and standard usage trends, computed from SQL and written to Redis
in one MULTI/EXEC together with a new cache generation (which invalidates every other cached range).

Triggered by declarative automation: after any day of ``usage_daily_metrics`` or a sealing of
``usage_kpi_buckets`` is materialized, and at least every 15 minutes (the KPIs' windows slide with time).
"""

import datetime as dt

import dagster as dg

from perf_pipeline.defs.resources import PostgresResource, RedisResource, SettingsResource
from perf_pipeline.lib.cache import KPIS_KEY, warm_dashboard_cache

#: re-warm after an upstream update (a rollup of any day, a KPI sealing), and on every quarter hour. Armed
#: until a run is requested after the trigger (see defs/rollups/assets.py: an update reported in the tick
#: right after a request must not be forgotten)
_TRIGGER = dg.AutomationCondition.any_deps_updated() | dg.AutomationCondition.cron_tick_passed(
    "*/15 * * * *", "UTC"
)
REFRESH = (
    _TRIGGER.since(
        (dg.AutomationCondition.newly_requested() & ~_TRIGGER) | dg.AutomationCondition.initial_evaluation()
    )
    & ~dg.AutomationCondition.any_deps_in_progress()
    & ~dg.AutomationCondition.in_progress()
).with_label("after any upstream update, and every quarter hour")


@dg.asset(
    group_name="cache",
    deps=["usage_daily_metrics", "usage_kpi_buckets"],
    kinds={"redis", "postgres"},
    automation_condition=REFRESH,
    freshness_policy=dg.FreshnessPolicy.time_window(
        fail_window=dt.timedelta(minutes=20), warn_window=dt.timedelta(minutes=16)
    ),
    description=(
        "Real-time KPIs and usage trends (daily 7/30/90 days, weekly, monthly, with provider breakdown) "
        "written to Redis in one pipelined transaction with a new cache generation: re-warmed after every "
        "rollup or KPI sealing and at least every 15 minutes (declarative automation). The API reads them "
        "cache-aside (perf_pipeline.lib.cache)."
    ),
)
def dashboard_cache(
    context: dg.AssetExecutionContext,
    postgres: PostgresResource,
    redis: RedisResource,
    settings: SettingsResource,
) -> dg.MaterializeResult:
    cfg = settings.get()
    today = dt.datetime.now(dt.UTC).date()
    client = redis.client()
    try:
        with postgres.connection(autocommit=True) as conn:
            result = warm_dashboard_cache(
                conn,
                client,
                today=today,
                kpi_ttl_s=cfg.kpi_ttl_seconds,
                trends_ttl_s=cfg.trends_ttl_seconds,
            )
    finally:
        client.close()
    context.log.info(
        "cache generation %d: %d keys, %d bytes", result.generation, len(result.keys), result.bytes
    )
    return dg.MaterializeResult(
        metadata={
            "keys": len(result.keys),
            "dagster/size_bytes": dg.MetadataValue.int(result.bytes),
            "duration_ms": round(result.duration_ms, 1),
            "compute_ms": round(sum(e.compute_ms for e in result.keys.values()), 1),
            "generation": result.generation,
            "entries": dg.MetadataValue.table(
                records=[
                    dg.TableRecord(
                        {
                            "key": key,
                            "compute_ms": round(e.compute_ms, 1),
                            "ttl_s": cfg.kpi_ttl_seconds if key == KPIS_KEY else cfg.trends_ttl_seconds,
                        }
                    )
                    for key, e in result.keys.items()
                ]
            ),
        }
    )
