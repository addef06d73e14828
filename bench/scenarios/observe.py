"""The cost of watching the platform: ``observe_platform_tables`` every minute, at two sizes side by side.

Two databases with the scale run's shape (24 months of audit_log and usage_log partitions, the days of
usage_log as Dagster partitions), one ten times the other (full: 1.2M vs 12M rows; small: 120k vs 1.2M),
each with its own Dagster instance on PostgreSQL (as deployed). Per database:

* ``snapshot``: :func:`perf_pipeline.lib.observe.snapshot` alone (catalog statistics, index probes), median
  of 20;
* ``first_tick``: the sensor's first evaluation on a fresh instance and the storing of its result (every
  month and day registered as a dynamic partition, every month reported): what a new deployment pays once;
* ``steady_tick``: an evaluation where nothing changed (the usual minute), median of 10;
* ``late_row_tick``: an evaluation after one late usage row (a past day marked), median of 5: one day
  reported.

The snapshot and the steady tick must not grow with the rows (ratio large/small near 1): nothing scans a
table. ``python -m bench observe`` (``BENCH_SCALE=small`` for the quick sizes, ``BENCH_SCALE=scale`` for the
scale run's 100M audit rows against 10M).
"""

from __future__ import annotations

import datetime as dt
import os
import statistics
import time
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

from bench.harness import BenchContext, scenario
from perf_pipeline.lib.workload import WorkloadSpec, load_workload

DAYS = 730  # 24 months, as the scale run
#: audit and usage rows per day at each size (small, large): the large database is ten times the small;
#: ``scale`` is the scale run's size (100M audit + 20M usage rows vs 10M + 2M; ~45 GB, ~30 min to load)
SCALES = {
    "full": ((1_370, 274), (13_700, 2_740)),
    "small": ((137, 27), (1_370, 274)),
    "scale": ((13_700, 2_740), (137_000, 27_400)),
}


def _median_ms(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def _dagster_db(ctx: BenchContext, name: str) -> str:
    with psycopg.connect(ctx.server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = urlunsplit(urlsplit(ctx.server_url)._replace(path=f"/{name}"))
    return url.replace("postgresql://", "postgresql+psycopg2://", 1)


def _measure(ctx: BenchContext, url: str, label: str, dagster_url: str) -> dict[str, float]:
    import dagster as dg

    from perf_pipeline.defs.platform.sensors import observe_platform_tables, store_sensor_result
    from perf_pipeline.defs.resources import PostgresResource, SettingsResource
    from perf_pipeline.lib.observe import snapshot

    with psycopg.connect(url, autocommit=True) as conn:
        snap_ms = _median_ms(lambda: snapshot(conn), 20)
        rows = conn.execute(
            "SELECT (SELECT count(*) FROM audit_log) + (SELECT count(*) FROM usage_log)"
        ).fetchone()[0]
    resources = {"postgres": PostgresResource(url=url), "settings": SettingsResource()}
    overrides = {"storage": {"postgres": {"postgres_url": dagster_url}}}
    with dg.instance_for_test(overrides=overrides) as instance:
        cursor: list[str | None] = [None]

        def tick() -> dg.SensorResult:
            ctx_ = dg.build_sensor_context(instance=instance, cursor=cursor[0], resources=resources)
            result = observe_platform_tables(ctx_)
            if isinstance(result, dg.SensorResult):
                store_sensor_result(instance, result)
                cursor[0] = result.cursor
            else:  # a SkipReason: nothing changed, the cursor stays
                cursor[0] = ctx_.cursor
            return result

        t0 = time.perf_counter()
        first = tick()
        first_ms = (time.perf_counter() - t0) * 1000
        first_events = len(first.asset_events or []) if isinstance(first, dg.SensorResult) else 0
        partitions = len(instance.get_dynamic_partitions("usage_log_days")) + len(
            instance.get_dynamic_partitions("audit_log_months")
        )
        steady_ms = _median_ms(tick, 10)

        late: list[float] = []
        with psycopg.connect(url, autocommit=True) as conn:
            for i in range(5):
                day = dt.datetime.now(dt.UTC) - dt.timedelta(days=30 + i)
                conn.execute(
                    "INSERT INTO usage_log (user_id, created_at, duration_minutes, cost_usd, stt_provider) "
                    "VALUES (gen_random_uuid(), %s, 1, 0.01, 'google')",
                    (day,),
                )
                t0 = time.perf_counter()
                tick()
                late.append((time.perf_counter() - t0) * 1000)
    ctx.row(
        database=label,
        rows=rows,
        dynamic_partitions=partitions,
        snapshot_ms=snap_ms,
        first_tick_ms=first_ms,
        first_tick_events=first_events,
        steady_tick_ms=steady_ms,
        late_row_tick_ms=statistics.median(late),
    )
    return {"snapshot": snap_ms, "steady": steady_ms, "late": statistics.median(late)}


@scenario(
    "observe", "observe_platform_tables: snapshot and sensor tick cost, 24 months, two sizes side by side"
)
def run(ctx: BenchContext) -> None:
    scale = os.environ.get("BENCH_SCALE", "full")
    sizes = SCALES.get(scale, SCALES["full"])
    today = dt.datetime.now(dt.UTC).date()
    start = (today - dt.timedelta(days=DAYS)).replace(day=1)
    # the code location's partitions start at the data's first month (read once, at import)
    os.environ["PERF_PIPELINE_DATA_START"] = start.strftime("%Y-%m")
    ctx.row(scale=scale, months=24, note="compare rows of this run only")
    results = []
    for label, (audit, usage) in zip(("small", "large"), sizes, strict=True):
        with ctx.database(f"bench_observe_{label}") as url:
            spec = WorkloadSpec(days=DAYS, usage_per_day=usage, audit_per_day=audit, users=5_000)
            load_workload(url, spec, progress=True)
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("VACUUM ANALYZE")
            dagster_url = _dagster_db(ctx, f"bench_observe_dagster_{label}")
            try:
                results.append(_measure(ctx, url, label, dagster_url))
            finally:
                with psycopg.connect(ctx.server_url, autocommit=True) as conn:
                    conn.execute(
                        sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                            sql.Identifier(f"bench_observe_dagster_{label}")
                        )
                    )
    small, large = results
    ctx.ratio("snapshot large/small", large["snapshot"], small["snapshot"], "≈ 1 (no scan)")
    ctx.ratio("steady tick large/small", large["steady"], small["steady"], "≈ 1 (no scan)")
    ctx.ratio("late-row tick large/small", large["late"], small["late"], "≈ 1")
