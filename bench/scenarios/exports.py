"""A 100 MB export (uncompressed CSV size) of audit_log while the platform's audit lookups keep running.

Seeds audit_log with ``load_workload`` (ending now, ~420k rows ≈ 100 MB of CSV over 30 days), then, for
each format (csv.gz, parquet):

1. a concurrent client runs the platform's three audit lookups (user's latest events, an entity's history,
   high/critical events of the last 24 h: ``health_probe_audit_*.sql``) back to back: p95 *before*;
2. ``perf-pipeline export run ID`` runs in a child process (the same code path as ``export_job``) while
   the client goes on: p95 *during* the export and the ratio; the child's peak RSS is its own VmHWM; seconds and MB/s are the export's own (claim → file in place, from the request row), and
   the child's wall time (Python start-up included) is reported beside them.

Targets: loading < 5 min, export ≤ 10 s, peak RSS ≤ 200 MB, p95 during / before ≤ 2.
``BENCH_SCALE=small``: a 10 MB export (about a minute in all).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.audit_client import AuditClient, lookup_args
from bench.harness import BenchContext, scenario
from perf_pipeline.lib import exports
from perf_pipeline.lib.db import connect
from perf_pipeline.lib.workload import WorkloadSpec, load_workload
from perf_pipeline.settings import PROJECT_ROOT

AUDIT_CSV_BYTES_PER_ROW = 247  # measured on the generator's rows


def _scale() -> tuple[int, float]:
    """(target CSV bytes, seconds the client measures before each export)."""
    if os.environ.get("BENCH_SCALE") == "small":
        return 10_000_000, 3.0
    return 100_000_000, 8.0


#: the child: `perf-pipeline export run ID`, then its peak RSS. VmHWM is the high-water mark of the
#: process's own address space; ru_maxrss would not do: Linux carries it across exec, so a child forked
#: from this (large) bench process would report the bench's RSS.
_CHILD = """
import sys
from perf_pipeline.cli import main
code = main(["export", "run", sys.argv[1]])
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
print("PEAK_RSS_KB", hwm.split()[1], flush=True)
sys.exit(code)
"""


def _export_in_child(url: str, redis_url: str, request_id: int, folder: Path) -> tuple[float, float, int]:
    """Run `perf-pipeline export run ID` in a child process; (wall seconds, peak RSS MB, exit code)."""
    env = dict(
        os.environ,
        PERF_PIPELINE_DATABASE_URL=url,
        PERF_PIPELINE_REDIS_URL=redis_url,
        PERF_PIPELINE_EXPORT_DIR=str(folder),
    )
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(request_id)],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - t0
    peak = [int(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("PEAK_RSS_KB")]
    if done.returncode != 0 or not peak:
        raise RuntimeError(f"export child failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return wall, peak[0] / 1024, done.returncode


@scenario(
    "exports", "100 MB audit_log export (csv.gz, parquet): seconds, MB/s, child peak RSS, audit p95 ratio"
)
def run(ctx: BenchContext) -> None:
    target_bytes, baseline_s = _scale()
    days = 30
    per_day = target_bytes // AUDIT_CSV_BYTES_PER_ROW // (days - 1) + 1  # the last day is partial (ends now)
    with ctx.database("bench_exports") as url, tempfile.TemporaryDirectory(prefix="bench_exports_") as tmp:
        loaded = load_workload(url, WorkloadSpec(days=days, usage_per_day=0, audit_per_day=per_day, seed=6))
        ctx.row(step="load audit_log", rows=loaded.audit_rows, seconds=loaded.seconds, target="< 300 s")
        client = AuditClient(url, lookup_args(url))
        client.start()
        time.sleep(1.0)  # warm the client's connection and caches; not measured
        try:
            for fmt in exports.FORMATS:
                with connect(url, autocommit=True) as conn:
                    request_id = exports.file_request(
                        conn, "00000000-0000-4000-8000-00000000b006", "audit_log", fmt, {}
                    )
                before_start = time.time()
                time.sleep(baseline_s)
                before_end = time.time()
                wall, rss_mb, code = _export_in_child(url, ctx.redis_url, request_id, Path(tmp))
                with connect(url, autocommit=True) as conn:
                    req = exports.get_request(conn, request_id) or {}
                if code != 0 or req.get("status") != "succeeded":
                    raise RuntimeError(f"export {request_id} ({fmt}) failed: exit {code}, {req.get('error')}")
                seconds = (req["finished_at"] - req["started_at"]).total_seconds()
                # "during" is the export itself (claim → file in place, same clock), not the child's start-up
                before = client.window(before_start, before_end)
                during = client.window(req["started_at"].timestamp(), req["finished_at"].timestamp())
                ctx.row(
                    step=f"export {fmt}",
                    rows=req["rows"],
                    csv_mb=req["csv_bytes"] / 1e6,
                    file_mb=req["bytes"] / 1e6,
                    seconds=seconds,
                    mb_per_s=req["csv_bytes"] / 1e6 / seconds,
                    child_wall_s=wall,
                    peak_rss_mb=rss_mb,
                    target="<= 10 s, RSS <= 200 MB",
                )
                ctx.row(
                    step=f"  audit lookups before ({fmt})",
                    samples=len(before.samples),
                    p50_ms=before.median,
                    p95_ms=before.p95,
                )
                ctx.row(
                    step=f"  audit lookups during ({fmt})",
                    samples=len(during.samples),
                    p50_ms=during.median,
                    p95_ms=during.p95,
                )
                ctx.ratio(f"audit p95 during / before export ({fmt})", during.p95, before.p95, target="<= 2")
        finally:
            client.stop.set()
            client.join()
