"""Overhead of the nightly maintenance and the health report on a 10M-row database (issue 7).

Seeds audit_log (5M) and usage_log (5M, plus 5M sessions) with ``load_workload`` ending now, dirties the
hot data a little (5 % of sessions updated, as status changes do), then:

1. a concurrent client runs the three audit lookups in a loop for a while: p95 *before*;
2. ``run_maintenance`` (VACUUM (ANALYZE) of hot tables and recent partitions, REINDEX CONCURRENTLY past
   the bloat threshold) runs while the same client keeps measuring: p95 *during*, and the ratio;
3. the health report and the latency probes, timed.

``BENCH_SCALE=small`` runs the same at 300k rows (about a minute).
"""

from __future__ import annotations

import os
import time

from bench.audit_client import AuditClient, lookup_args
from bench.harness import BenchContext, Stats, scenario
from perf_pipeline.lib import health
from perf_pipeline.lib.db import connect
from perf_pipeline.lib.workload import WorkloadSpec, load_workload


def _spec() -> tuple[WorkloadSpec, float]:
    """(workload, seconds the client measures before maintenance)."""
    if os.environ.get("BENCH_SCALE") == "small":
        return WorkloadSpec(days=30, usage_per_day=3_334, audit_per_day=5_000, seed=11), 5.0
    return WorkloadSpec(days=90, usage_per_day=55_556, audit_per_day=55_556, seed=11), 15.0


@scenario(
    "maintenance", "db_maintenance + db_health_report on 10M rows: durations, audit p95 during vs before"
)
def run(ctx: BenchContext) -> None:
    spec, baseline_s = _spec()
    with ctx.database("bench_maint") as url:
        loaded = load_workload(url, spec)
        rows = loaded.audit_rows + loaded.usage_rows + loaded.sessions
        ctx.row(step="load", rows=rows, seconds=loaded.seconds)
        with connect(url, autocommit=True) as conn:
            # status changes of 5 % of the sessions: dead tuples for VACUUM to clean, as in production
            t0 = time.perf_counter()
            updated = conn.execute(
                "UPDATE session SET updated_at = updated_at + interval '1 second' "
                "WHERE (hashtext(id::text) & 1023) < 51"
            ).rowcount
            ctx.row(step="dirty 5% of sessions", rows=updated, seconds=time.perf_counter() - t0)
            conn.execute("CHECKPOINT")

        client = AuditClient(url, lookup_args(url, seed=3))
        client.start()
        time.sleep(1.0)  # warm the client's connection and caches; not measured
        before_start = time.time()
        time.sleep(baseline_s)
        before_end = maint_start = time.time()
        result = health.run_maintenance(url)
        maint_end = time.time()
        if maint_end - maint_start < 2.0:  # too short to measure "during": keep the client running a bit
            time.sleep(0.5)
        client.stop.set()
        client.join()

        before = client.window(before_start, before_end)
        during = client.window(maint_start, maint_end)
        ctx.row(
            step="db_maintenance",
            duration_ms=result.duration_ms,
            relations_vacuumed=sum(v.ok for v in result.vacuumed),
            vacuum_ms=sum(v.duration_ms for v in result.vacuumed),
            indexes_reindexed=sum(r.ok for r in result.reindexed),
            failures=result.failures,
        )
        slowest = sorted(result.vacuumed, key=lambda v: -v.duration_ms)[:3]
        for v in slowest:
            ctx.row(step=f"  vacuum {v.relation}", duration_ms=v.duration_ms)
        for r in result.reindexed:
            ctx.row(
                step=f"  reindex {r.index}",
                duration_ms=r.duration_ms,
                bloat=r.bloat_ratio,
                mb_before=r.bytes_before / 2**20,
                mb_after=(r.bytes_after or 0) / 2**20,
            )
        ctx.row(
            step="audit lookups before", samples=len(before.samples), p50_ms=before.median, p95_ms=before.p95
        )
        ctx.row(
            step="audit lookups during maintenance",
            samples=len(during.samples),
            p50_ms=during.median,
            p95_ms=during.p95,
        )
        ctx.ratio("audit p95 during / before maintenance", during.p95, before.p95, target="<= 1.5")

        with connect(url, autocommit=True) as conn:
            timings = []
            for _ in range(3):
                t0 = time.perf_counter()
                report = health.health_report(conn)
                health.report_markdown(report)
                timings.append((time.perf_counter() - t0) * 1000)
            ctx.row(
                step="db_health_report",
                p50_ms=Stats(timings).median,
                max_ms=max(timings),
                tables=len(report.tables),
                indexes=len(report.indexes),
                slow_statements=report.slow.status,
            )
            t0 = time.perf_counter()
            probes = health.run_probes(conn, runs=5)
            ctx.row(step="query_latency_budgets", duration_ms=(time.perf_counter() - t0) * 1000)
            for p in probes:
                ctx.row(
                    step=f"  probe {p.name}",
                    p50_ms=p.p50_ms,
                    p95_ms=p.p95_ms,
                    index_used=p.index_used,
                    skipped=p.skipped or "",
                )
