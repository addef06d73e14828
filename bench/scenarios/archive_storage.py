"""Archives and exports on local disk vs S3 (a private SeaweedFS on this machine), side by side in one run.

Starts its own SeaweedFS (``perf_pipeline.testing``, the code the tests use) and a throw-away database,
loads a 1M-row audit month (2025-06), a 250k-row month (2025-05) and ~100 MB of recent audit CSV, then
alternates local and S3, ``ROUNDS`` (3) times each, every operation in a child process of its own (so its
peak RSS, VmHWM, is the operation's, imports included):

* **archive** of the 1M-row month (:func:`archive_partition`: detach → Parquet → verify, read back from the
  store → drop), then **restore** of it (:func:`restore_partition`: sha256 of the object, then streamed
  into a table and re-attached), which leaves the month ready for the next archive;
* **export** of the ~100 MB (CSV size) request as csv.gz (``perf-pipeline export run``), unpaced
  (``PERF_PIPELINE_EXPORT_MAX_MB_S=0``: the default 15 MB/s pace would hide the storage's cost);
* **memory with the month's size on S3**: the 250k-row month archived to S3 once, its peak RSS beside the
  1M-row month's.

Prints wall seconds, rows/s and peak RSS per operation, medians per backend, and the S3/local ratios. The
S3 server shares the 2 cores with PostgreSQL and the child: S3 figures include its CPU.
``BENCH_SCALE=small``: 100k / 25k rows and a 10 MB export (about a minute).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import BenchContext, scenario
from perf_pipeline.lib import exports
from perf_pipeline.lib.db import connect
from perf_pipeline.lib.workload import LoadResult, WorkloadSpec, load_workload
from perf_pipeline.settings import PROJECT_ROOT
from perf_pipeline.testing import seaweedfs

BIG_MONTH = dt.date(2025, 6, 1)
SMALL_MONTH = dt.date(2025, 5, 1)
AUDIT_CSV_BYTES_PER_ROW = 247  # measured on the generator's rows (bench/scenarios/exports.py)
ROUNDS = 3  # BENCH_SCALE=small: 2
REQUESTER = "00000000-0000-4000-8000-00000000b0a5"


def _scale() -> tuple[int, int, int]:
    """(rows of the big month, rows of the small month, CSV bytes of the export)."""
    if os.environ.get("BENCH_SCALE") == "small":
        return 100_000, 25_000, 10_000_000
    return 1_000_000, 250_000, 100_000_000


def _load_audit(url: str, days: int, rows_per_day: int, **spec: Any) -> LoadResult:
    """``rows_per_day`` audit rows a day (no usage) over ``days`` days; the WorkloadSpec's other fields from
    ``spec``."""
    return load_workload(url, WorkloadSpec(days=days, usage_per_day=0, audit_per_day=rows_per_day, **spec))


#: archive or restore one month in this process, then report what it did and the process's peak RSS
_ARCHIVE_CHILD = r"""
import datetime as dt, json, sys, time
import psycopg
from perf_pipeline.lib.archive import archive_partition, restore_partition
url, op, month, where = sys.argv[1], sys.argv[2], dt.date.fromisoformat(sys.argv[3]), sys.argv[4]
with psycopg.connect(url, autocommit=True) as conn:
    t0 = time.perf_counter()
    if op == "archive":
        r = archive_partition(conn, "audit_log", month, where)
        out = {"rows": r.rows, "bytes": r.bytes, "state": r.state, "step_ms": r.step_ms, "uri": r.file_path}
    else:
        r = restore_partition(conn, "audit_log", month)
        out = {"rows": r.rows}
    out["seconds"] = time.perf_counter() - t0
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
out["peak_rss_mb"] = int(hwm.split()[1]) / 1024
print(json.dumps(out), flush=True)
"""

#: `perf-pipeline export run ID`, then the process's peak RSS (VmHWM: ru_maxrss would carry the parent's)
_EXPORT_CHILD = """
import sys
from perf_pipeline.cli import main
code = main(["export", "run", sys.argv[1]])
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
print("PEAK_RSS_KB", hwm.split()[1], flush=True)
sys.exit(code)
"""


def _child(argv: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", *argv], env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, check=False
    )
    return done, time.perf_counter() - t0


def _archive_op(url: str, op: str, month: dt.date, where: str, env: dict[str, str]) -> dict:
    done, wall = _child([_ARCHIVE_CHILD, url, op, month.isoformat(), where], env)
    if done.returncode != 0:
        raise RuntimeError(f"{op} of {month} to {where} failed: {done.stderr[-2000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["child_wall_s"] = wall
    return out


def _export_op(url: str, redis_url: str, where: str, env: dict[str, str]) -> dict:
    with connect(url, autocommit=True) as conn:
        request_id = exports.file_request(conn, REQUESTER, "audit_log", "csv.gz", {})
    child_env = dict(
        env,
        PERF_PIPELINE_DATABASE_URL=url,
        PERF_PIPELINE_REDIS_URL=redis_url,
        PERF_PIPELINE_EXPORT_DIR=where,
        PERF_PIPELINE_EXPORT_MAX_MB_S="0",
    )
    done, wall = _child([_EXPORT_CHILD, str(request_id)], child_env)
    peak = [int(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("PEAK_RSS_KB")]
    with connect(url, autocommit=True) as conn:
        req = exports.get_request(conn, request_id) or {}
    if done.returncode != 0 or req.get("status") != "succeeded" or not peak:
        raise RuntimeError(f"export to {where} failed (exit {done.returncode}): {done.stderr[-2000:]}")
    seconds = (req["finished_at"] - req["started_at"]).total_seconds()
    return {
        "rows": req["rows"],
        "csv_mb": req["csv_bytes"] / 1e6,
        "file_mb": req["bytes"] / 1e6,
        "seconds": seconds,
        "child_wall_s": wall,
        "peak_rss_mb": peak[0] / 1024,
    }


def _op_row(ctx: BenchContext, where: dict[str, object], op: str, out: dict, **extra: object) -> None:
    """The result line of one operation: ``where`` it ran (round, backend), what it was, its seconds, rows/s
    and peak RSS from ``out``, then ``extra`` figures."""
    ctx.row(
        **where,
        op=op,
        seconds=out["seconds"],
        rows_per_s=out["rows"] / out["seconds"],
        peak_rss_mb=out["peak_rss_mb"],
        **extra,
    )


@scenario(
    "archive_storage",
    "archive + restore of a 1M-row month and a 100 MB export: local disk vs S3 (SeaweedFS), "
    "seconds, rows/s, peak RSS, S3/local ratios",
)
def run(ctx: BenchContext) -> None:
    big, small, export_bytes = _scale()
    rounds = 2 if os.environ.get("BENCH_SCALE") == "small" else ROUNDS
    with (
        tempfile.TemporaryDirectory(prefix="bench_storage_") as tmp,
        seaweedfs(Path(tmp) / "seaweedfs") as server,
        ctx.database("bench_storage") as url,
    ):
        env = {**os.environ, **server.env(), "PYTHONPATH": str(PROJECT_ROOT)}
        bucket = server.create_bucket("bench")
        where = {"local": str(Path(tmp) / "local"), "s3": f"s3://{bucket}/bench"}
        started = time.perf_counter()
        june = _load_audit(url, 30, big // 30, end=dt.datetime(2025, 6, 30, 23, 59, tzinfo=dt.UTC))
        may = _load_audit(url, 31, small // 31, end=dt.datetime(2025, 5, 31, 23, 59, tzinfo=dt.UTC), seed=7)
        days = 30
        recent = _load_audit(url, days, export_bytes // AUDIT_CSV_BYTES_PER_ROW // (days - 1) + 1, seed=8)
        with connect(url, autocommit=True) as conn:
            conn.execute("VACUUM (ANALYZE) audit_log")
            conn.execute("CHECKPOINT")
        ctx.row(
            step="load",
            big_month_rows=june.audit_rows,
            small_month_rows=may.audit_rows,
            export_rows=recent.audit_rows,
            seconds=time.perf_counter() - started,
        )

        results: dict[tuple[str, str], list[dict]] = {}
        for round_no in range(1, rounds + 1):
            for backend in ("local", "s3"):
                for op in ("archive", "restore"):
                    out = _archive_op(url, op, BIG_MONTH, where[backend], env)
                    results.setdefault((backend, op), []).append(out)
                    _op_row(
                        ctx,
                        {"round": round_no, "backend": backend},
                        f"{op} {out['rows']:,}-row month",
                        out,
                        file_mb=out.get("bytes", 0) / 1e6 or "",
                        **{f"{k}_ms": v for k, v in out.get("step_ms", {}).items()},
                    )
                out = _export_op(url, ctx.redis_url, where[backend], env)
                results.setdefault((backend, "export"), []).append(out)
                _op_row(
                    ctx,
                    {"round": round_no, "backend": backend},
                    f"export csv.gz ({out['csv_mb']:,.0f} MB of CSV)",
                    out,
                    mb_per_s=out["csv_mb"] / out["seconds"],
                    file_mb=out["file_mb"],
                )

        flat = _archive_op(url, "archive", SMALL_MONTH, where["s3"], env)
        _op_row(
            ctx, {"backend": "s3"}, f"archive {flat['rows']:,}-row month", flat, file_mb=flat["bytes"] / 1e6
        )

        def median(backend: str, op: str, key: str) -> float:
            return statistics.median(r[key] for r in results[(backend, op)])

        for op in ("archive", "restore", "export"):
            for backend in ("local", "s3"):
                ctx.row(
                    summary=f"{op} ({backend}), median of {rounds}",
                    seconds=median(backend, op, "seconds"),
                    rows_per_s=median(backend, op, "rows") / median(backend, op, "seconds"),
                    peak_rss_mb=median(backend, op, "peak_rss_mb"),
                )
            ctx.ratio(
                f"{op} seconds, S3 / local", median("s3", op, "seconds"), median("local", op, "seconds")
            )
            ctx.ratio(
                f"{op} peak RSS, S3 / local",
                median("s3", op, "peak_rss_mb"),
                median("local", op, "peak_rss_mb"),
            )
        ctx.ratio(
            f"S3 archive peak RSS, {median('s3', 'archive', 'rows'):,.0f} / {flat['rows']:,} rows",
            median("s3", "archive", "peak_rss_mb"),
            flat["peak_rss_mb"],
            target="≈ 1 (flat with the month's size)",
        )
