"""Checks of `dashboard_cache`: keys present and fresh, values equal to a fresh SQL computation, hit rate."""

import datetime as dt
import time

import dagster as dg

from perf_pipeline.defs.cache.assets import dashboard_cache
from perf_pipeline.defs.resources import PostgresResource, RedisResource, SettingsResource
from perf_pipeline.lib.cache import KPIS_KEY, current_generation, hit_rate, iter_entries, trends_key
from perf_pipeline.lib.dashboard import compute_kpis, compute_usage_trends, standard_trend_requests

HIT_RATE_THRESHOLD = 0.90
HIT_RATE_WINDOW_MINUTES = 15  # one warm interval


def _standard_keys(today: dt.date) -> dict[str, object]:
    keys: dict[str, object] = {KPIS_KEY: None}
    keys.update({trends_key(r): r for r in standard_trend_requests(today)})
    return keys


@dg.asset_check(
    asset=dashboard_cache,
    blocking=False,
    description="Every warmed key is in Redis, of the current generation, and younger than its TTL.",
)
def dashboard_cache_keys_fresh(redis: RedisResource, settings: SettingsResource) -> dg.AssetCheckResult:
    cfg = settings.get()
    keys = list(_standard_keys(dt.datetime.now(dt.UTC).date()))
    client = redis.client()
    try:
        generation = current_generation(client)
        entries = dict(iter_entries(client, keys))
    finally:
        client.close()
    now = time.time()
    missing = [k for k, e in entries.items() if e is None]
    old_generation = [k for k, e in entries.items() if e is not None and e.gen < generation]
    ages = {k: now - e.computed_at for k, e in entries.items() if e is not None}
    ttl = {k: cfg.kpi_ttl_seconds if k == KPIS_KEY else cfg.trends_ttl_seconds for k in keys}
    too_old = [k for k, age in ages.items() if age > ttl[k]]
    return dg.AssetCheckResult(
        passed=not (missing or old_generation or too_old),
        metadata={
            "keys": len(keys),
            "missing": len(missing),
            "stale": len(old_generation) + len(too_old),
            "max_age_s": round(max(ages.values(), default=0.0), 1),
            "kpi_ttl_s": cfg.kpi_ttl_seconds,
            "trends_ttl_s": cfg.trends_ttl_seconds,
            "problems": dg.MetadataValue.md(
                "\n".join(
                    [f"- missing `{k}`" for k in missing]
                    + [f"- older generation `{k}`" for k in old_generation]
                    + [f"- `{k}` is {ages[k]:.0f} s old (TTL {ttl[k]} s)" for k in too_old]
                )
                or "none"
            ),
        },
    )


@dg.asset_check(
    asset=dashboard_cache,
    blocking=False,
    description="Cached values equal a fresh SQL computation (KPIs recomputed at the cached instant; "
    "the live active_transcriptions gauge is reported, not compared).",
)
def dashboard_cache_matches_sql(postgres: PostgresResource, redis: RedisResource) -> dg.AssetCheckResult:
    wanted = _standard_keys(dt.datetime.now(dt.UTC).date())
    client = redis.client()
    try:
        entries = dict(iter_entries(client, list(wanted)))
    finally:
        client.close()
    mismatched: list[str] = []
    compared = 0
    gauge_drift = 0
    started = time.perf_counter()
    with postgres.connection(autocommit=True) as conn:
        for key, entry in entries.items():
            if entry is None:
                mismatched.append(f"`{key}`: not cached")
                continue
            compared += 1
            if key == KPIS_KEY:
                cached = dict(entry.payload["real_time"])
                fresh = compute_kpis(conn, dt.datetime.fromisoformat(entry.payload["timestamp"]))["real_time"]
                gauge_drift = abs(fresh.pop("active_transcriptions") - cached.pop("active_transcriptions"))
                same = fresh == cached
            else:
                same = compute_usage_trends(conn, wanted[key]) == entry.payload  # type: ignore[arg-type]
            if not same:
                mismatched.append(f"`{key}`: cached value differs from SQL")
    return dg.AssetCheckResult(
        passed=not mismatched,
        metadata={
            "compared": compared,
            "mismatched": len(mismatched),
            "active_transcriptions_drift": gauge_drift,
            "duration_ms": round((time.perf_counter() - started) * 1000, 1),
            "problems": dg.MetadataValue.md("\n".join(f"- {m}" for m in mismatched) or "none"),
        },
    )


@dg.asset_check(
    asset=dashboard_cache,
    blocking=False,
    description=f"Share of dashboard reads served from Redis over the last {HIT_RATE_WINDOW_MINUTES} "
    f"minutes is at least {HIT_RATE_THRESHOLD:.0%}; with no read in the window it passes and says so.",
)
def dashboard_cache_hit_rate(redis: RedisResource) -> dg.AssetCheckResult:
    client = redis.client()
    try:
        rate = hit_rate(client, window_minutes=HIT_RATE_WINDOW_MINUTES)
    finally:
        client.close()
    counts = {f"outcome.{k}": v for k, v in rate.counts.items()}
    if rate.requests == 0:
        return dg.AssetCheckResult(
            passed=True,
            severity=dg.AssetCheckSeverity.WARN,
            description=f"no dashboard read in the last {HIT_RATE_WINDOW_MINUTES} minutes: no hit rate to measure yet",
            metadata={
                "requests": 0,
                "threshold": HIT_RATE_THRESHOLD,
                "window_minutes": HIT_RATE_WINDOW_MINUTES,
            },
        )
    return dg.AssetCheckResult(
        passed=rate.rate >= HIT_RATE_THRESHOLD,
        severity=dg.AssetCheckSeverity.WARN,
        description=f"{rate.rate:.1%} of {rate.requests} reads served from Redis (threshold {HIT_RATE_THRESHOLD:.0%})",
        metadata={
            "hit_rate": round(rate.rate, 4),
            "threshold": HIT_RATE_THRESHOLD,
            "requests": rate.requests,
            "window_minutes": HIT_RATE_WINDOW_MINUTES,
            **counts,
        },
    )
