"""`dashboard_cache`: the dashboard's KPIs and standard usage trends, computed from SQL and written to Redis
in one MULTI/EXEC together with a new cache generation (which invalidates every other cached range)."""

import datetime as dt

import dagster as dg

from perf_pipeline.defs.resources import PostgresResource, RedisResource
from perf_pipeline.lib.cache import warm_dashboard_cache
from perf_pipeline.settings import get_settings


@dg.asset(
    group_name="cache",
    deps=["usage_daily_metrics", "usage_kpi_buckets"],
    kinds={"redis", "postgres"},
    description=(
        "Real-time KPIs and usage trends (daily 7/30/90 days, weekly, monthly, with provider breakdown) "
        "written to Redis in one pipelined transaction with a new cache generation: re-materialized after "
        "every usage_daily_metrics materialization (sensor) and every 15 minutes (schedule). The API reads "
        "them cache-aside (perf_pipeline.lib.cache)."
    ),
)
def dashboard_cache(
    context: dg.AssetExecutionContext, postgres: PostgresResource, redis: RedisResource
) -> dg.MaterializeResult:
    settings = get_settings()
    today = dt.datetime.now(dt.UTC).date()
    client = redis.client()
    try:
        with postgres.connection(autocommit=True) as conn:
            result = warm_dashboard_cache(
                conn,
                client,
                today=today,
                kpi_ttl_s=settings.kpi_ttl_seconds,
                trends_ttl_s=settings.trends_ttl_seconds,
            )
    finally:
        client.close()
    context.log.info(
        "cache generation %d: %d keys, %d bytes", result.generation, len(result.keys), result.bytes
    )
    table = "\n".join(
        ["| key | compute ms | TTL s |", "|---|---:|---:|"]
        + [
            f"| `{key}` | {e.compute_ms:.1f} | {e.expires_at - e.computed_at:.0f} |"
            for key, e in result.keys.items()
        ]
    )
    return dg.MaterializeResult(
        metadata={
            "keys": len(result.keys),
            "bytes": result.bytes,
            "duration_ms": result.duration_ms,
            "generation": result.generation,
            "compute_ms": sum(e.compute_ms for e in result.keys.values()),
            "entries": dg.MetadataValue.md(table),
        }
    )
