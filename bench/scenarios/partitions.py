"""Partition lifecycle: archive throughput and memory, writer stall, pg_partman side by side, audit query
latency at two sizes.

Scale (``BENCH_SCALE``): ``full`` (default) measures 1M and 10M rows, as issue 3 asks; ``small`` measures
100k and 300k so the scenario runs in about a minute on a shared machine.

* **archive**: a month of N audit rows is archived by :func:`perf_pipeline.lib.archive.archive_partition`
  in a separate worker process (so its peak RSS is the archive's, not the loader's): seconds, rows/s,
  per-step ms, file size, peak RSS.
* **writer stall**: a writer inserts into ``audit_log`` at 500 rows/s (one autocommit INSERT each, its own
  connection) while (a) nothing else happens (baseline), (b) the premake months of both tables are
  created, (c) the archive runs (the detach window is reported apart), (d) a month is detached while a
  4 s reader holds a lock on ``audit_log`` (the case ``lock_timeout`` + retries exist for): max / p99 ms
  and failed inserts. Target: max ≤ 200 ms, 0 failures.
* **pg_partman**: on the system PostgreSQL 15 (installed with apt-get when missing and run as root),
  ``partman.run_maintenance()`` vs :func:`create_partitions_ahead` creating the same 3 premake months.
* **queries**: the health probes' audit lookups (latest 100 of a user, an entity's history, critical
  events of the last 24 h) on N rows ending now: p95 ms and the large/small ratio (target p95 ≤ 5 ms,
  ratio ≤ 1.5).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg
from psycopg import sql

from bench.harness import BenchContext, measure, scenario
from perf_pipeline.lib.db import load_query
from perf_pipeline.lib.partitioning import (
    add_months,
    create_partitions_ahead,
    ensure_partition,
    month_start,
    partition_name,
)
from perf_pipeline.lib.stats import percentile
from perf_pipeline.lib.workload import WorkloadSpec, load_workload

SCALES = {"full": (1_000_000, 10_000_000), "small": (100_000, 300_000)}
ARCHIVE_MONTH = dt.date(2025, 6, 1)
WRITER_RATE = 500
SYSTEM_PG15 = "postgresql://postgres@127.0.0.1:5432/postgres"
PREMAKE = 3

_WORKER = r"""
import datetime as dt, json, resource, sys, time
from pathlib import Path
import psycopg
from perf_pipeline.lib.archive import archive_partition
url, month, folder = sys.argv[1], dt.date.fromisoformat(sys.argv[2]), Path(sys.argv[3])
marks = {"start": time.time()}
with psycopg.connect(url, autocommit=True) as conn:
    r = archive_partition(conn, "audit_log", month, folder, hook=lambda step: marks.__setitem__(step, time.time()))
print(json.dumps({"rows": r.rows, "bytes": r.bytes, "state": r.state, "step_ms": r.step_ms, "marks": marks,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _archive_in_worker(url: str, month: dt.date, folder: Path) -> dict:
    """archive_partition in a fresh Python process: its own peak RSS, and no GIL shared with the writer."""
    proc = subprocess.run(
        [sys.executable, "-c", _WORKER, url, month.isoformat(), str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode:
        raise RuntimeError(f"archive worker failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


class Writer(threading.Thread):
    """The platform's writer: one autocommit INSERT into audit_log (current month) every 1/rate s."""

    def __init__(self, url: str, rate: int = WRITER_RATE) -> None:
        super().__init__(daemon=True)
        self.url, self.interval = url, 1 / rate
        self.halt = threading.Event()
        self.samples: list[tuple[float, float]] = []  # (wall start, latency ms)
        self.failures = 0

    def run(self) -> None:
        with psycopg.connect(self.url, autocommit=True, application_name="bench.writer") as conn:
            nxt = time.perf_counter()
            while not self.halt.is_set():
                wall, t0 = time.time(), time.perf_counter()
                try:
                    conn.execute(
                        "INSERT INTO audit_log (event_type, operation, description) "
                        "VALUES ('session.create', 'create', 'bench writer')"
                    )
                except psycopg.Error:
                    self.failures += 1
                self.samples.append((wall, (time.perf_counter() - t0) * 1000))
                nxt += self.interval
                time.sleep(max(0.0, nxt - time.perf_counter()))

    def window(self, lo: float, hi: float) -> list[float]:
        return [ms for wall, ms in self.samples if lo <= wall <= hi]


def _stall_row(ctx: BenchContext, label: str, latencies: list[float], failures: int, **extra: object) -> None:
    ctx.row(
        stall=label,
        inserts=len(latencies),
        max_ms=max(latencies, default=float("nan")),
        p99_ms=percentile(latencies, 99),
        failed=failures,
        target="max ≤ 200 ms, 0 failed",
        **extra,
    )


def _during(writer: Writer, work) -> tuple[list[float], object]:
    lo = time.time()
    out = work()
    return writer.window(lo, time.time()), out


def _statement(text: str) -> str:
    """The statement of a sql/queries file without its comment header and trailing semicolon."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("--")]
    return "\n".join(lines).strip().rstrip(";")


def _query_latency(ctx: BenchContext, url: str, n: int) -> dict[str, float]:
    with psycopg.connect(url, autocommit=True) as conn:
        users = [
            r[0]
            for r in conn.execute(
                "SELECT user_id FROM audit_log TABLESAMPLE SYSTEM (1) WHERE user_id IS NOT NULL LIMIT 50"
            )
        ]
        entities = conn.execute(
            "SELECT entity_type, entity_id FROM audit_log TABLESAMPLE SYSTEM (1) "
            "WHERE entity_type IS NOT NULL LIMIT 50"
        ).fetchall()
        queries = {
            "latest 100 of a user": (
                load_query("health_probe_audit_user_latest"),
                [{"user_id": u} for u in users],
            ),
            "entity history": (
                load_query("health_probe_audit_entity_history"),
                [{"entity_type": t, "entity_id": e} for t, e in entities],
            ),
            "critical last 24 h": (load_query("health_probe_audit_critical_24h"), [None]),
        }
        out = {}
        for label, (text, params) in queries.items():
            it = iter(params * 1000)
            stats = measure(
                lambda text=text, it=it: conn.execute(text, next(it)).fetchall(), repeat=300, warmup=20
            )
            # the server's own execution time too: on a shared 2-core machine the client-side figure also
            # carries the scheduling delays of both processes
            server = [
                conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + _statement(text), next(it)).fetchone()[0][0][
                    "Execution Time"
                ]
                for _ in range(100)
            ]
            ctx.row(
                query=label,
                rows_in_table=n,
                median_ms=stats.median,
                p95_ms=stats.p95,
                server_p95_ms=percentile(server, 95),
                target="p95 ≤ 5 ms",
            )
            out[label] = stats.p95
            out[f"{label} (server)"] = percentile(server, 95)
    return out


def _archive(ctx: BenchContext, url: str, n: int, folder: Path) -> None:
    """Load an N-row month, then archive it in a worker process with the writer running."""
    end = dt.datetime(2025, 6, 30, 23, 59, 59, tzinfo=dt.UTC)
    load_workload(url, WorkloadSpec(days=30, usage_per_day=0, audit_per_day=n // 30, end=end))
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute("SELECT count(*) FROM audit_log_y2025m06").fetchone()[0]
        conn.execute("CHECKPOINT")
    writer = Writer(url)
    writer.start()
    time.sleep(1.0)
    started = time.time()
    try:
        out = _archive_in_worker(url, ARCHIVE_MONTH, folder)
    finally:
        finished = time.time()
        time.sleep(0.5)
        writer.halt.set()
        writer.join()
    seconds = sum(out["step_ms"].values()) / 1000
    ctx.row(
        archive=f"{rows:,}-row month",
        rows=out["rows"],
        seconds=seconds,
        rows_per_s=out["rows"] / seconds,
        file_mb=out["bytes"] / 1e6,
        peak_rss_mb=out["peak_rss_mb"],
        **{f"{k}_ms": v for k, v in out["step_ms"].items()},
    )
    marks = out["marks"]
    _stall_row(
        ctx, f"archive of {rows:,} rows (whole run)", writer.window(started, finished), writer.failures
    )
    _stall_row(ctx, "  of which the detach", writer.window(marks["start"] - 0.05, marks["detach"] + 0.05), 0)


def _stalls(ctx: BenchContext, url: str) -> None:
    today = dt.datetime.now(dt.UTC).date()
    with psycopg.connect(url, autocommit=True) as conn:
        ensure_partition(conn, "audit_log", today)
        for k in (1, 2):  # two small old months to detach
            month = add_months(month_start(today), -30 - k)
            ensure_partition(conn, "audit_log", month)
            conn.execute(
                "INSERT INTO audit_log (timestamp, event_type, operation) "
                "SELECT %s::timestamptz + g * interval '1 minute', 'x.y', 'read' FROM generate_series(1, 1000) g",
                (dt.datetime(month.year, month.month, 1, tzinfo=dt.UTC),),
            )
        writer = Writer(url)
        writer.start()
        time.sleep(3.0)
        _stall_row(
            ctx,
            "baseline (writer alone, 3 s)",
            writer.window(time.time() - 3.0, time.time()),
            writer.failures,
        )
        failures = writer.failures
        lat, created = _during(
            writer,
            lambda: (
                create_partitions_ahead(conn, "audit_log", today, PREMAKE)
                + create_partitions_ahead(conn, "usage_log", today, PREMAKE)
            ),
        )
        _stall_row(ctx, f"create {len(created)} premake partitions", lat, writer.failures - failures)
        folder = Path(tempfile.mkdtemp(prefix="bench_stall_"))
        try:
            failures = writer.failures
            month = add_months(month_start(today), -31)
            lat, out = _during(writer, lambda: _archive_in_worker(url, month, folder))
            _stall_row(
                ctx,
                "archive of a 1,000-row month",
                lat,
                writer.failures - failures,
                detach_ms=out["step_ms"]["detach"],
            )

            # a reader holding AccessShare on audit_log for 4 s: the detach must wait for it, and
            # writers queue behind a waiting detach; lock_timeout (100 ms) + retries bound that queueing
            month = add_months(month_start(today), -32)
            ready = threading.Event()

            def reader() -> None:
                with psycopg.connect(url) as r:
                    r.execute("SELECT count(*) FROM audit_log WHERE event_type = 'none'")
                    ready.set()
                    time.sleep(4.0)  # longer than the worker's start-up, so its detach meets the lock
                    r.rollback()

            t = threading.Thread(target=reader, daemon=True)
            t.start()
            ready.wait()
            failures = writer.failures
            lat, out = _during(writer, lambda: _archive_in_worker(url, month, folder))
            t.join()
            _stall_row(
                ctx,
                "archive while a 4 s reader holds audit_log",
                lat,
                writer.failures - failures,
                detach_ms=out["step_ms"]["detach"],
            )
        finally:
            writer.halt.set()
            writer.join()
            shutil.rmtree(folder, ignore_errors=True)


def _ensure_partman() -> str | None:
    """Install postgresql-15-partman when missing (root only); None if it is available, else why not."""
    if Path("/usr/share/postgresql/15/extension/pg_partman.control").exists():
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "pg_partman not installed and not root: skipped"
    proc = subprocess.run(
        ["apt-get", "install", "-y", "-q", "postgresql-15-partman"],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )
    if proc.returncode:
        return f"apt-get install postgresql-15-partman failed: {proc.stderr.strip()[-300:]}"
    return None


def _fresh_db(server: str, name: str) -> str:
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return server.rsplit("/", 1)[0] + f"/{name}"


def _drop_db(server: str, name: str) -> None:
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _partman(ctx: BenchContext) -> None:
    try:
        psycopg.connect(SYSTEM_PG15, connect_timeout=3).close()
    except psycopg.Error as exc:
        ctx.row(partman="skipped", reason=f"system PostgreSQL 15 not reachable: {exc}")
        return
    why = _ensure_partman()
    if why:
        ctx.row(partman="skipped", reason=why)
        return
    from perf_pipeline.lib.migrations import apply_migrations

    today = dt.datetime.now(dt.UTC).date()
    repeat = 7
    ours_url, pm_url = (
        _fresh_db(SYSTEM_PG15, "bench_parts_ours"),
        _fresh_db(SYSTEM_PG15, "bench_parts_partman"),
    )
    try:
        apply_migrations(ours_url)
        apply_migrations(pm_url)
        with psycopg.connect(pm_url, autocommit=True) as conn:
            # the same audit_log (0001, with its indexes), handed to pg_partman 4.x native partitioning,
            # which brings its own DEFAULT partition
            conn.execute("DROP TABLE audit_log_default")
            conn.execute("CREATE SCHEMA partman")
            conn.execute("CREATE EXTENSION pg_partman SCHEMA partman")
            conn.execute(
                "SELECT partman.create_parent('public.audit_log', 'timestamp', 'native', 'monthly', "
                "p_premake := %s, p_start_partition := %s)",
                (PREMAKE, month_start(today).isoformat()),
            )
            # by default partman 4.x premakes only while data keeps arriving; ours creates ahead regardless
            conn.execute("UPDATE partman.part_config SET infinite_time_partitions = true")
            conn.execute("SELECT partman.run_maintenance('public.audit_log')")
            version = conn.execute(
                "SELECT extversion FROM pg_extension WHERE extname = 'pg_partman'"
            ).fetchone()[0]
        pm, ours = [], []
        for _ in range(repeat):
            with psycopg.connect(pm_url, autocommit=True) as conn:
                children = sorted(
                    r[0]
                    for r in conn.execute(
                        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                        "WHERE i.inhparent = 'audit_log'::regclass AND c.relname <> 'audit_log_default'"
                    )
                )
                for name in children[-PREMAKE:]:  # partman names (audit_log_pYYYY_MM) sort by month
                    conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(name)))
                t0 = time.perf_counter()
                conn.execute("SELECT partman.run_maintenance('public.audit_log')")
                pm.append((time.perf_counter() - t0) * 1000)
                # it extends forward from the newest child (it does not fill gaps): count what it made
                made = (
                    conn.execute(
                        "SELECT count(*) FROM pg_inherits WHERE inhparent = 'audit_log'::regclass "
                        "AND inhrelid <> 'audit_log_default'::regclass"
                    ).fetchone()[0]
                    - len(children)
                    + PREMAKE
                )
            with psycopg.connect(ours_url, autocommit=True) as conn:
                for m in range(1, PREMAKE + 1):
                    conn.execute(
                        sql.SQL("DROP TABLE IF EXISTS {}").format(
                            sql.Identifier(partition_name("audit_log", add_months(month_start(today), m)))
                        )
                    )
                ensure_partition(conn, "audit_log", today)
                t0 = time.perf_counter()
                created = create_partitions_ahead(conn, "audit_log", today, PREMAKE)
                ours.append((time.perf_counter() - t0) * 1000)
        ctx.row(
            premake=f"pg_partman {version} run_maintenance()",
            months=made,
            median_ms=sorted(pm)[repeat // 2],
            max_ms=max(pm),
            server="system PostgreSQL 15",
        )
        ctx.row(
            premake="perf_pipeline create_partitions_ahead()",
            months=len(created),
            median_ms=sorted(ours)[repeat // 2],
            max_ms=max(ours),
            server="system PostgreSQL 15",
        )
    finally:
        _drop_db(SYSTEM_PG15, "bench_parts_ours")
        _drop_db(SYSTEM_PG15, "bench_parts_partman")


@scenario(
    "partitions",
    "archive 1M/10M-row months (s, rows/s, RSS), writer stall, pg_partman premake, "
    "audit query p95 at 1M vs 10M (BENCH_SCALE=small: 100k/300k)",
)
def run(ctx: BenchContext) -> None:
    scale = os.environ.get("BENCH_SCALE", "full")
    small, large = SCALES[scale]
    ctx.row(scale=scale, sizes=f"{small:,} / {large:,}", note="shared machine: compare rows of this run only")

    with ctx.database("bench_parts") as url:
        _stalls(ctx, url)
    _partman(ctx)

    p95: dict[int, dict[str, float]] = {}
    for n in (small, large):
        folder = Path(tempfile.mkdtemp(prefix="bench_archive_"))
        try:
            with ctx.database("bench_parts") as url:
                load_workload(
                    url,
                    WorkloadSpec(
                        days=30,
                        usage_per_day=0,
                        audit_per_day=n // 30,
                        end=dt.datetime.now(dt.UTC).replace(microsecond=0),
                    ),
                )
                p95[n] = _query_latency(ctx, url, n)
                _archive(ctx, url, n, folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    for label in p95[small]:
        ctx.ratio(f"p95 {label}: {large:,} / {small:,} rows", p95[large][label], p95[small][label], "≤ 1.5")
