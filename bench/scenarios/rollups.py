"""Incremental daily rollups vs the former 90-day materialized view, and the cost of late-data detection.

Part 1, same data, same run, side by side, at two history sizes with the same daily volume (so the
second has 10× the history): ``REFRESH MATERIALIZED VIEW CONCURRENTLY`` of the former design's view
(:data:`FORMER_VIEW`, created as ``former_dashboard_daily_metrics``) versus refreshing today's partition
(one day) versus a 91-day backfill (today and the 90 days before: the former view's window), each as
:func:`perf_pipeline.lib.rollups.rollup_days` — with its reconciliation (what the asset runs) and without
(the rollup statement alone). Today is a FULL day of rows (the load ends at 23:59 UTC): the worst case,
the 23:30 refresh.

Part 2, write overhead of the late-data triggers (migration 0021) on inserts into ``usage_log``: a COPY
of 1M rows and single-row INSERTs, into a fresh table with usage_log's columns, constraints and indexes,
with the migration's row triggers versus without, alternated A/B, B/A. Rows of "now" are the normal
path; rows of a past day (late data, which run the marking function) are measured too.

Scales (``BENCH_SCALE``): default ``full`` — 1M and 10M usage rows (9 and 90 days of 111k rows/day);
``small`` — 50k and 500k rows (5.5k rows/day), trigger part on 100k-row COPYs (1–2 minutes).
"""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
from psycopg import sql

from bench.harness import BenchContext, Stats, measure, scenario
from perf_pipeline.lib.db import MIGRATIONS_DIR, connect
from perf_pipeline.lib.rollups import day_start, rollup_days, utc_today
from perf_pipeline.lib.workload import (
    USAGE_COLUMNS,
    WorkloadSpec,
    _Generator,
    copy_csv,
    load_workload,
    render_csv,
)

#: the baseline: the dashboard's daily metrics as the design before the incremental rollups had them, one
#: materialized view over the last 90 days of usage_log that every REFRESH recomputes whole (its definition
#: as it was, only the view's name changed)
FORMER_VIEW = """
CREATE MATERIALIZED VIEW former_dashboard_daily_metrics AS
SELECT
    date_trunc('day', created_at) as day,
    count(*) as total_sessions,
    sum(duration_minutes) as total_minutes,
    sum(CASE WHEN is_billable THEN cost_usd ELSE 0 END) as revenue,
    count(DISTINCT user_id) as active_users,
    avg(duration_minutes) as avg_duration,
    count(*) FILTER (WHERE stt_provider = 'google') as google_sessions,
    count(*) FILTER (WHERE stt_provider = 'assemblyai') as assemblyai_sessions
FROM usage_log
WHERE created_at >= CURRENT_DATE - INTERVAL '90 days'
GROUP BY date_trunc('day', created_at)
ORDER BY day DESC;
CREATE UNIQUE INDEX ON former_dashboard_daily_metrics (day);
"""

SCALES = {
    # label, days, rows/day; trigger part: COPY rows, single-row inserts
    "full": {"sizes": [("1M", 9, 111_111), ("10M", 90, 111_111)], "copy_rows": 1_000_000, "singles": 5000},
    "small": {"sizes": [("50k", 9, 5_555), ("500k", 90, 5_555)], "copy_rows": 100_000, "singles": 1000},
}


def _end_of_today() -> dt.datetime:
    return day_start(utc_today() + dt.timedelta(days=1)) - dt.timedelta(minutes=1)


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000


def _rollup_part(ctx: BenchContext, label: str, days: int, per_day: int, repeat: int) -> dict[str, Stats]:
    spec = WorkloadSpec(days=days, usage_per_day=per_day, audit_per_day=0, end=_end_of_today())
    today = utc_today()
    out: dict[str, Stats] = {}
    with ctx.database("bench_rollups") as url:
        loaded = load_workload(url, spec)
        ctx.row(size=label, step="load usage+sessions", rows=loaded.usage_rows, seconds=loaded.seconds)
        with connect(url, autocommit=True, options="-c TimeZone=UTC") as conn:
            conn.execute(FORMER_VIEW)
            conn.execute("VACUUM ANALYZE")  # same starting point for every variant (visibility map, stats)

            def refresh() -> object:
                return conn.execute("REFRESH MATERIALIZED VIEW CONCURRENTLY former_dashboard_daily_metrics")

            window = (today - dt.timedelta(days=90), today + dt.timedelta(days=1))
            first = _timed(lambda: rollup_days(conn, *window, check=False))  # cold: writes every row
            ctx.row(size=label, step="backfill 91 days, first (empty rollup)", ms=first)
            variants: list[tuple[str, Callable[[], object], int]] = [
                ("former view: REFRESH MATERIALIZED VIEW CONCURRENTLY", refresh, max(2, repeat // 3)),
                (
                    "backfill 91 days (statement)",
                    lambda: rollup_days(conn, *window, check=False),
                    max(2, repeat // 3),
                ),
                (
                    "backfill 91 days + reconciliation",
                    lambda: rollup_days(conn, *window),
                    max(2, repeat // 3),
                ),
                (
                    "today (statement)",
                    lambda: rollup_days(conn, today, today + dt.timedelta(days=1), check=False),
                    repeat,
                ),
                (
                    "today + reconciliation (asset)",
                    lambda: rollup_days(conn, today, today + dt.timedelta(days=1)),
                    repeat,
                ),
            ]
            for name, fn, n in variants:
                stats = measure(fn, repeat=n, warmup=1)
                out[name] = stats
                ctx.row(size=label, step=name, median_ms=stats.median, p95_ms=stats.p95, samples=n)
            today_rows = conn.execute(
                "SELECT rows_scanned FROM usage_daily_metrics WHERE day = %s", (today,)
            ).fetchone()[0]
            ctx.row(size=label, step="rows in today's partition", rows=today_rows)
    full = out["former view: REFRESH MATERIALIZED VIEW CONCURRENTLY"].median
    ctx.ratio(
        f"{label}: full refresh / today (asset)",
        full,
        out["today + reconciliation (asset)"].median,
        ">= 50 at 10M",
    )
    ctx.ratio(f"{label}: full refresh / today (statement)", full, out["today (statement)"].median)
    ctx.ratio(
        f"{label}: backfill 91 days (statement) / full refresh",
        out["backfill 91 days (statement)"].median,
        full,
        "<= 1",
    )
    ctx.ratio(
        f"{label}: backfill 91 days + reconciliation / full refresh",
        out["backfill 91 days + reconciliation"].median,
        full,
    )
    return out


SCRATCH = "usage_log_trigger_bench"


def _trigger_statements() -> list[str]:
    """The CREATE TRIGGER statements of usage_log (latest: migration 0023), retargeted at the scratch table."""
    text = (MIGRATIONS_DIR / "0023_usage_log_late_triggers_date_bin.sql").read_text()
    out = []
    for block in text.split(";\n"):
        stmt = "\n".join(line for line in block.splitlines() if not line.lstrip().startswith("--")).strip()
        if stmt.startswith("CREATE TRIGGER usage_log_late_"):
            out.append(stmt.replace(" ON usage_log ", f" ON {SCRATCH} "))
    assert len(out) == 3, "expected the insert/update/delete triggers of migration 0023"
    return out


def _backend_cpu_ms(pid: int) -> float:
    """CPU time a local PostgreSQL backend has used, from /proc; NaN if the server is not local.

    On a shared machine the wall clock mostly measures the neighbours; the backend's own CPU time is
    what the trigger adds. ``schedstat`` counts nanoseconds (``stat`` only 10 ms ticks)."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e6
    except (OSError, ValueError, IndexError):
        pass
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def _trigger_part(ctx: BenchContext, copy_rows: int, n_singles: int) -> None:
    """Each sample: a fresh copy of usage_log's structure (same columns, constraints, indexes) with or
    without the migration's row triggers, loaded, committed, dropped. Alternated A/B, B/A, … so the
    machine's drift hits both sides alike."""
    today = utc_today()
    now_spec = WorkloadSpec(days=1, usage_per_day=copy_rows, audit_per_day=0, end=_end_of_today(), seed=7)
    late_spec = WorkloadSpec(
        days=1,
        usage_per_day=copy_rows,
        audit_per_day=0,
        end=day_start(today) - dt.timedelta(minutes=1),
        seed=8,
    )
    csv_now = render_csv(_Generator(now_spec).usage_and_sessions(0)[0])
    csv_late = render_csv(_Generator(late_spec).usage_and_sessions(0)[0])
    triggers = _trigger_statements()
    table = sql.Identifier(SCRATCH)
    with ctx.database("bench_rollup_trigger") as url, connect(url, autocommit=True) as conn:

        def sample(on: bool, fn: Callable[[psycopg.Connection], None]) -> tuple[float, float]:
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(table))
            conn.execute(
                sql.SQL(
                    "CREATE TABLE {} (LIKE usage_log INCLUDING DEFAULTS INCLUDING CONSTRAINTS "
                    "INCLUDING INDEXES)"
                ).format(table)
            )
            if on:
                for stmt in triggers:
                    conn.execute(stmt)
            with connect(url) as c:
                pid = c.info.backend_pid
                cpu0 = _backend_cpu_ms(pid)
                t0 = time.perf_counter()
                fn(c)
                c.commit()
                elapsed = time.perf_counter() - t0
                cpu = _backend_cpu_ms(pid) - cpu0
            conn.execute(sql.SQL("DROP TABLE {}").format(table))
            conn.execute("DELETE FROM usage_rollup_stale_days")
            return elapsed * 1000, cpu

        def copy(data: memoryview) -> Callable[[psycopg.Connection], None]:
            return lambda c: copy_csv(c, SCRATCH, USAGE_COLUMNS, data)

        def singles(at: dt.datetime, *, commit_each: bool) -> Callable[[psycopg.Connection], None]:
            # one INSERT statement per row, issued by a server-side loop (EXECUTE: planned afresh each
            # time, like a client's statement) so the client's and the network's jitter stay out of it
            body = sql.SQL(
                "DO $$ BEGIN FOR i IN 1..{n} LOOP "
                "EXECUTE format('INSERT INTO %I (user_id, created_at, duration_minutes, cost_usd, stt_provider) "
                "VALUES (gen_random_uuid(), %L, 5.5, 0.1, ''google'')', {table}, {at}); {commit} "
                "END LOOP; END $$"
            ).format(
                n=sql.Literal(n_singles),
                table=sql.Literal(SCRATCH),
                at=sql.Literal(at.isoformat()),
                commit=sql.SQL("COMMIT;" if commit_each else ""),
            )

            def run(c: psycopg.Connection) -> None:
                c.autocommit = True  # a DO block may COMMIT only outside a transaction block
                c.execute(body)
                c.autocommit = False

            return run

        now = dt.datetime.now(dt.UTC)
        late_at = day_start(today - dt.timedelta(days=1)) + dt.timedelta(hours=12)
        cases: list[tuple[str, Callable[[psycopg.Connection], None], int]] = [
            (f"COPY {copy_rows:,} rows of today", copy(csv_now), 3),
            (f"{n_singles} single-row INSERTs of now, one transaction", singles(now, commit_each=False), 4),
            (f"{n_singles} single-row INSERTs of now, each committed", singles(now, commit_each=True), 4),
            (f"COPY {copy_rows:,} LATE rows (yesterday)", copy(csv_late), 2),
            (f"{n_singles} LATE single-row INSERTs, each committed", singles(late_at, commit_each=True), 4),
        ]
        for name, fn, pairs in cases:
            samples: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
            for i in range(pairs):
                for on in (True, False) if i % 2 == 0 else (False, True):
                    samples[on].append(sample(on, fn))
            wall = {on: Stats([w for w, _ in samples[on]]).median for on in samples}
            cpu = {on: Stats([c for _, c in samples[on]]).median for on in samples}
            ctx.row(
                insert=name,
                with_trigger_ms=wall[True],
                without_ms=wall[False],
                overhead_pct=(wall[True] / wall[False] - 1) * 100,
                server_cpu_with_ms=cpu[True],
                server_cpu_without_ms=cpu[False],
                cpu_overhead_pct=(cpu[True] / cpu[False] - 1) * 100 if cpu[False] > 0 else float("nan"),
                samples=pairs,
            )


@scenario(
    "rollups",
    "daily rollups: the former view's REFRESH MATERIALIZED VIEW CONCURRENTLY vs today's partition vs a 91-day "
    "backfill (1M/10M usage rows); late-data trigger write overhead (COPY 1M, single rows)",
)
def run(ctx: BenchContext) -> None:
    scale = SCALES[os.environ.get("BENCH_SCALE", "full")]
    today_by_size: dict[str, float] = {}
    for label, days, per_day in scale["sizes"]:
        out = _rollup_part(ctx, label, days, per_day, repeat=9)
        today_by_size[label] = out["today + reconciliation (asset)"].median
    (small_label, small), (big_label, big) = today_by_size.items()
    ctx.ratio(f"today's refresh {big_label} / {small_label} history (flat = ~1)", big, small, "~1")
    _trigger_part(ctx, scale["copy_rows"], scale["singles"])
