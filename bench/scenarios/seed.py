"""Workload generator throughput: 1M audit rows (plus the usage/session load, reported apart)."""

from __future__ import annotations

import datetime as dt
import resource

from bench.harness import BenchContext, scenario
from perf_pipeline.lib.workload import WorkloadSpec, load_workload

END = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)


@scenario("seed", "perf-pipeline seed: 1M audit rows over 2 months, and 1M usage rows (+1M sessions)")
def run(ctx: BenchContext) -> None:
    for label, spec in [
        ("audit 1M", WorkloadSpec(days=60, usage_per_day=0, audit_per_day=16_950, end=END)),
        ("usage 1M + sessions 1M", WorkloadSpec(days=60, usage_per_day=16_950, audit_per_day=0, end=END)),
    ]:
        for attempt in range(3):
            with ctx.database("bench_seed") as url:
                result = load_workload(url, spec)
            rows = result.audit_rows or result.usage_rows
            ctx.row(
                load=label,
                attempt=attempt + 1,
                rows=rows,
                seconds=result.seconds,
                rows_per_s=rows / result.seconds,
            )
    ctx.row(load="peak RSS of the loader", mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
