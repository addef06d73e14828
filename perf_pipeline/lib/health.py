"""Database health: maintenance (VACUUM/ANALYZE, REINDEX), the health report, latency probes, resources.

Plain Python over psycopg 3 (no Dagster): the assets in ``perf_pipeline/defs/maintenance`` call it, so do
the tests and the benchmark. What a naive monitor gets wrong, and this module does not:

* ``VACUUM`` cannot run inside a transaction block: :func:`run_maintenance` opens its own autocommit
  connection, one statement per relation, each bounded by ``statement_timeout`` and ``lock_timeout``;
* it vacuums the hot tables and the *recent* partitions only, not the whole history every night;
* ``pg_stat_statements`` columns are ``mean_exec_time`` & co. since PostgreSQL 13, and a missing or
  unloaded extension is a line in the report, not an exception;
* CPU is sampled without sleeping (``psutil.cpu_times`` deltas against a previous sample).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psutil
import psycopg
from psycopg import errors, sql
from psycopg.rows import dict_row

from perf_pipeline.lib.dashboard import standard_trend_requests
from perf_pipeline.lib.db import connect, load_query
from perf_pipeline.lib.partitioning import PARTITIONED_TABLES, add_months, list_partitions, month_start
from perf_pipeline.lib.stats import percentile

log = logging.getLogger(__name__)

#: plain tables the platform writes all day; vacuumed every night whole (they are small or hot)
HOT_TABLES: tuple[str, ...] = ("session", "data_export", "usage_daily_metrics", "alert_event")


# ------------------------------------------------------------------------------------------ helpers


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table (``|`` in cells escaped)."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            text = f"{value:,.3f}" if abs(value) < 1000 else f"{value:,.0f}"
        elif value is None:
            text = ""
        else:
            text = str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _exists(conn: psycopg.Connection, relation: str) -> bool:
    return conn.execute("SELECT to_regclass(%s) IS NOT NULL", (relation,)).fetchone()[0]


# -------------------------------------------------------------------------------------- maintenance


@dataclass
class VacuumResult:
    relation: str
    duration_ms: float
    ok: bool
    error: str | None = None


@dataclass
class ReindexResult:
    index: str
    table: str
    bloat_ratio: float
    bytes_before: int
    bytes_after: int | None
    duration_ms: float
    ok: bool
    error: str | None = None


@dataclass
class MaintenanceResult:
    vacuumed: list[VacuumResult] = field(default_factory=list)
    reindexed: list[ReindexResult] = field(default_factory=list)
    bloat_checked: int = 0
    duration_ms: float = 0.0

    @property
    def failures(self) -> int:
        return sum(not v.ok for v in self.vacuumed) + sum(not r.ok for r in self.reindexed)


def maintenance_targets(
    conn: psycopg.Connection,
    *,
    recent_months: int = 2,
    today: dt.date | None = None,
    hot_tables: Sequence[str] = HOT_TABLES,
) -> list[str]:
    """Relations the nightly maintenance vacuums: the hot plain tables that exist, and for each
    partitioned table its DEFAULT partition and the partitions of the last ``recent_months`` months
    (this month included). Older months are not written any more: autovacuum froze them once, and a
    nightly VACUUM of the whole history would re-read it for nothing. Cost: catalog reads only."""
    if recent_months < 1:
        raise ValueError(f"recent_months must be at least 1, got {recent_months}")
    this_month = month_start(today or dt.datetime.now(dt.UTC).date())
    oldest = add_months(this_month, -(recent_months - 1))
    out = [t for t in hot_tables if _exists(conn, t)]
    for table in PARTITIONED_TABLES:
        if not _exists(conn, table):
            continue
        for part in list_partitions(conn, table):
            if part.is_default or (part.month is not None and oldest <= part.month <= this_month):
                out.append(part.name)
    return out


def _set_timeouts(
    conn: psycopg.Connection, statement_timeout_ms: int, lock_timeout_ms: int, vacuum_cost_delay_ms: float
) -> None:
    # session-level (autocommit: SET LOCAL would not outlive the statement)
    conn.execute(sql.SQL("SET statement_timeout = {}").format(sql.Literal(int(statement_timeout_ms))))
    conn.execute(sql.SQL("SET lock_timeout = {}").format(sql.Literal(int(lock_timeout_ms))))
    # a manual VACUUM is unthrottled by default (vacuum_cost_delay = 0); throttle it like autovacuum
    # does so the platform's queries keep their latency while it reads the recent partitions
    conn.execute(sql.SQL("SET vacuum_cost_delay = {}").format(sql.Literal(float(vacuum_cost_delay_ms))))


def vacuum_analyze(conn: psycopg.Connection, relations: Sequence[str]) -> list[VacuumResult]:
    """``VACUUM (ANALYZE)`` each relation, one statement each, on an autocommit connection.

    Cost: reads the relation's pages not all-visible, its indexes if there are dead tuples, and a sample
    for ANALYZE. Locks: SHARE UPDATE EXCLUSIVE on the relation (readers and writers go on; only DDL and
    another VACUUM wait). A relation that fails (lock or statement timeout) is reported, not fatal.
    """
    if not conn.autocommit:
        raise ValueError("VACUUM cannot run inside a transaction block: pass an autocommit connection")
    results = []
    for rel in relations:
        started = time.perf_counter()
        try:
            conn.execute(sql.SQL("VACUUM (ANALYZE) {}").format(sql.Identifier(rel)))
            results.append(VacuumResult(rel, (time.perf_counter() - started) * 1000, True))
        except (errors.QueryCanceled, errors.LockNotAvailable, errors.UndefinedTable) as exc:
            log.warning("VACUUM (ANALYZE) %s failed: %s", rel, exc)
            results.append(VacuumResult(rel, (time.perf_counter() - started) * 1000, False, str(exc).strip()))
    return results


def index_bloat(conn: psycopg.Connection, tables: Sequence[str]) -> list[dict[str, Any]]:
    """Estimated bloat of the B-tree indexes of ``tables`` (``sql/queries/health_index_bloat.sql``):
    rows with ``index_name``, ``table_name``, ``bytes``, ``entries``, ``bloat_ratio`` (None when the
    table has no statistics). Cost: catalog and pg_stats reads; no index page is read."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(load_query("health_index_bloat"), {"tables": list(tables)}).fetchall()


def _drop_leftover_concurrent_builds(conn: psycopg.Connection, table: str) -> None:
    """A REINDEX CONCURRENTLY that failed leaves an invalid ``<index>_ccnew`` index behind, which is still
    maintained on every write: drop it (DROP INDEX CONCURRENTLY, no blocking lock)."""
    rows = conn.execute(
        """
        SELECT ci.relname FROM pg_index x
        JOIN pg_class ci ON ci.oid = x.indexrelid
        JOIN pg_class ct ON ct.oid = x.indrelid
        WHERE ct.relname = %s AND ct.relnamespace = current_schema()::regnamespace
          AND NOT x.indisvalid AND ci.relname ~ '_ccnew[0-9]*$'
        """,
        (table,),
    ).fetchall()
    for (name,) in rows:
        log.warning("dropping invalid leftover index %s", name)
        conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(name)))


def reindex_bloated(
    conn: psycopg.Connection, tables: Sequence[str], *, bloat_threshold: float, min_index_bytes: int
) -> tuple[list[ReindexResult], int]:
    """``REINDEX INDEX CONCURRENTLY`` every B-tree index of ``tables`` whose estimated bloat ratio is at
    least ``bloat_threshold`` and whose size is at least ``min_index_bytes``. Returns (results, indexes
    checked).

    Cost: builds a new copy of each chosen index (a full scan of its table), then swaps it in.
    Locks: SHARE UPDATE EXCLUSIVE on the table during the build (writers go on); the final swap waits
    for transactions using the old index, bounded by the session's ``lock_timeout``.
    """
    if not conn.autocommit:
        raise ValueError("REINDEX CONCURRENTLY cannot run inside a transaction block")
    candidates = index_bloat(conn, tables)
    results = []
    for row in candidates:
        ratio = row["bloat_ratio"]
        if ratio is None or ratio < bloat_threshold or row["bytes"] < min_index_bytes:
            continue
        started = time.perf_counter()
        try:
            _drop_leftover_concurrent_builds(conn, row["table_name"])
            conn.execute(sql.SQL("REINDEX INDEX CONCURRENTLY {}").format(sql.Identifier(row["index_name"])))
            after = conn.execute(
                "SELECT pg_relation_size(%s::regclass)", (sql.Identifier(row["index_name"]).as_string(conn),)
            ).fetchone()[0]
            results.append(
                ReindexResult(
                    row["index_name"],
                    row["table_name"],
                    ratio,
                    row["bytes"],
                    after,
                    (time.perf_counter() - started) * 1000,
                    True,
                )
            )
        except (errors.QueryCanceled, errors.LockNotAvailable, errors.DeadlockDetected) as exc:
            log.warning("REINDEX INDEX CONCURRENTLY %s failed: %s", row["index_name"], exc)
            _drop_leftover_concurrent_builds(conn, row["table_name"])
            results.append(
                ReindexResult(
                    row["index_name"],
                    row["table_name"],
                    ratio,
                    row["bytes"],
                    None,
                    (time.perf_counter() - started) * 1000,
                    False,
                    str(exc).strip(),
                )
            )
    return results, len(candidates)


def run_maintenance(
    url: str,
    *,
    recent_months: int = 2,
    tables: Sequence[str] | None = None,
    bloat_threshold: float = 0.35,
    min_index_bytes: int = 8 * 1024 * 1024,
    statement_timeout_ms: int = 30 * 60 * 1000,
    lock_timeout_ms: int = 5000,
    vacuum_cost_delay_ms: float = 2.0,
    today: dt.date | None = None,
) -> MaintenanceResult:
    """Nightly maintenance: ``VACUUM (ANALYZE)`` of :func:`maintenance_targets` (or ``tables``), then
    ``REINDEX INDEX CONCURRENTLY`` of their indexes past ``bloat_threshold`` (estimated, just after ANALYZE
    refreshed the statistics the estimate needs).

    Opens its own autocommit connection (VACUUM and REINDEX CONCURRENTLY refuse transaction blocks) with
    ``statement_timeout`` / ``lock_timeout`` set for the session. Cost and locks: see
    :func:`vacuum_analyze` and :func:`reindex_bloated`; nothing takes an ACCESS EXCLUSIVE lock.
    """
    started = time.perf_counter()
    result = MaintenanceResult()
    with connect(url, autocommit=True, application_name="perf_pipeline.maintenance") as conn:
        _set_timeouts(conn, statement_timeout_ms, lock_timeout_ms, vacuum_cost_delay_ms)
        targets = (
            list(tables)
            if tables is not None
            else maintenance_targets(conn, recent_months=recent_months, today=today)
        )
        result.vacuumed = vacuum_analyze(conn, targets)
        result.reindexed, result.bloat_checked = reindex_bloated(
            conn, targets, bloat_threshold=bloat_threshold, min_index_bytes=min_index_bytes
        )
    result.duration_ms = (time.perf_counter() - started) * 1000
    return result


# ------------------------------------------------------------------------------------- health report


@dataclass
class SlowStatements:
    status: str  # "ok" | "not installed" | "not loaded" | "no privilege"
    message: str
    rows: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class HealthReport:
    tables: list[dict[str, Any]]
    dead_tuples: list[dict[str, Any]]
    indexes: list[dict[str, Any]]
    slow: SlowStatements
    database: dict[str, Any]
    server_version_num: int
    audit_writers: list[dict[str, Any]] = field(default_factory=list)

    @property
    def unused_indexes(self) -> list[dict[str, Any]]:
        return [i for i in self.indexes if i["unused"]]


def slow_statements(conn: psycopg.Connection, limit: int = 10) -> SlowStatements:
    """Top ``limit`` statements of this database by mean execution time, from pg_stat_statements.

    Never raises for a missing extension: runs in a savepoint (or its own statement on an autocommit
    connection) and reports why there are no rows. Cost: one read of the extension's shared memory.
    """
    version = conn.execute("SHOW server_version_num").fetchone()[0]
    if int(version) < 130000:  # the project supports PostgreSQL >= 15; say so rather than mis-read columns
        return SlowStatements(
            "unsupported", f"pg_stat_statements: PostgreSQL {version} < 13 is not supported"
        )
    installed = conn.execute(
        "SELECT extversion FROM pg_extension WHERE extname = 'pg_stat_statements'"
    ).fetchone()
    if installed is None:
        return SlowStatements(
            "not installed",
            "pg_stat_statements is not installed in this database: no slow-statement report "
            "(CREATE EXTENSION pg_stat_statements; it also needs shared_preload_libraries).",
        )
    try:
        with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
            rows = cur.execute(load_query("health_slow_statements"), {"limit": limit}).fetchall()
    except errors.ObjectNotInPrerequisiteState:
        return SlowStatements(
            "not loaded",
            "pg_stat_statements is installed but not loaded: add it to shared_preload_libraries and "
            "restart PostgreSQL to get the slow-statement report.",
        )
    except errors.InsufficientPrivilege:
        return SlowStatements(
            "no privilege", "pg_stat_statements: this role may not read it (grant pg_read_all_stats)."
        )
    return SlowStatements(
        "ok", f"pg_stat_statements {installed[0]}: top {len(rows)} statements by mean time", rows
    )


#: a writer that has not published for this long is shown as stale (it publishes every ~15 s)
AUDIT_WRITER_STALE = dt.timedelta(minutes=2)


def audit_writers(
    conn: psycopg.Connection, *, within: dt.timedelta = dt.timedelta(days=1)
) -> list[dict[str, Any]]:
    """The platform's AuditWriter counters published in ``audit_writer_metrics`` (migration 0060) over
    ``within``, newest first, each with ``stale`` set when it stopped publishing. Empty without the table."""
    if not _exists(conn, "audit_writer_metrics"):
        return []
    rows = conn.execute(
        "SELECT writer, updated_at, metrics, now() - updated_at > %s FROM audit_writer_metrics "
        "WHERE updated_at > now() - %s ORDER BY updated_at DESC",
        (AUDIT_WRITER_STALE, within),
    ).fetchall()
    return [{"writer": w, "updated_at": at, "stale": stale, **m} for w, at, m, stale in rows]


def health_report(conn: psycopg.Connection, *, top_statements: int = 10, dead_rows: int = 20) -> HealthReport:
    """Everything the ``db_health_report`` asset shows. Cost: catalog and statistics reads (a few ms to a
    few hundred ms with thousands of partitions); no locks beyond ACCESS SHARE on catalogs."""
    with conn.cursor(row_factory=dict_row) as cur:
        tables = cur.execute(load_query("health_table_sizes")).fetchall()
        dead = cur.execute(load_query("health_dead_tuples"), {"limit": dead_rows}).fetchall()
        indexes = cur.execute(load_query("health_index_usage")).fetchall()
        database = cur.execute(load_query("health_database_stats")).fetchone() or {}
    for t in tables:
        total = t["live_tuples"] + t["dead_tuples"]
        t["dead_ratio"] = t["dead_tuples"] / total if total else 0.0
    version = int(conn.execute("SHOW server_version_num").fetchone()[0])
    return HealthReport(
        tables,
        dead,
        indexes,
        slow_statements(conn, top_statements),
        dict(database),
        version,
        audit_writers(conn),
    )


def report_markdown(report: HealthReport) -> str:
    """The report as markdown sections (tables, dead tuples, indexes, statements, connections)."""
    db = report.database
    parts = [
        "### Tables (partitions grouped under their parent)",
        markdown_table(
            ["table", "partitions", "table", "indexes", "total", "rows (est.)", "dead tuples", "dead ratio"],
            [
                (
                    t["table_name"],
                    t["partitions"] if t["partitioned"] else "",
                    human_bytes(t["table_bytes"]),
                    human_bytes(t["index_bytes"]),
                    human_bytes(t["total_bytes"]),
                    t["est_rows"],
                    t["dead_tuples"],
                    f"{t['dead_ratio']:.1%}",
                )
                for t in report.tables
            ],
        ),
        "### Dead tuples (leaf tables, most first)",
        markdown_table(
            ["table", "parent", "live", "dead", "dead ratio", "last vacuum", "last analyze"],
            [
                (
                    d["table_name"],
                    d["parent"],
                    d["live_tuples"],
                    d["dead_tuples"],
                    f"{d['dead_ratio']:.1%}",
                    d["last_vacuum"],
                    d["last_analyze"],
                )
                for d in report.dead_tuples
            ],
        ),
        f"### Index usage ({len(report.unused_indexes)} unused; primary keys and constraint indexes are "
        "never flagged)",
        markdown_table(
            ["index", "table", "partitions", "scans", "size", "enforces constraint", "unused"],
            [
                (
                    i["index_name"],
                    i["table_name"],
                    i["leaf_indexes"],
                    i["scans"],
                    human_bytes(i["bytes"]),
                    "yes" if i["enforces_constraint"] else "",
                    "**UNUSED**" if i["unused"] else "",
                )
                for i in report.indexes
            ],
        ),
        "### Slow statements (pg_stat_statements)",
        report.slow.message,
    ]
    if report.slow.rows:
        parts.append(
            markdown_table(
                ["calls", "mean ms", "max ms", "total ms", "rows", "query"],
                [
                    (s["calls"], s["mean_ms"], s["max_ms"], s["total_ms"], s["rows"], f"`{s['query']}`")
                    for s in report.slow.rows
                ],
            )
        )
    parts += [
        "### Connections and transactions",
        markdown_table(
            [
                "connections (db)",
                "active",
                "idle in tx",
                "waiting on locks",
                "server connections",
                "max_connections",
                "commits",
                "rollbacks",
                "rollback ratio",
                "cache hit ratio",
                "deadlocks",
            ],
            [
                (
                    db.get("connections"),
                    db.get("active"),
                    db.get("idle_in_transaction"),
                    db.get("waiting_on_locks"),
                    db.get("server_connections"),
                    db.get("max_connections"),
                    db.get("commits"),
                    db.get("rollbacks"),
                    f"{db.get('rollback_ratio', 0):.2%}",
                    f"{db.get('cache_hit_ratio', 0):.2%}",
                    db.get("deadlocks"),
                )
            ],
        ),
    ]
    parts.append("### Audit writers (platform processes, from audit_writer_metrics)")
    if report.audit_writers:
        parts.append(
            markdown_table(
                [
                    "writer",
                    "updated",
                    "stale",
                    "queued",
                    "written",
                    "spooled",
                    "dropped",
                    "rejected",
                    "flush p99 ms",
                    "database reachable",
                    "last error",
                ],
                [
                    (
                        w["writer"],
                        w["updated_at"],
                        "**STALE**" if w["stale"] else "",
                        w.get("queued"),
                        w.get("written"),
                        w.get("spooled"),
                        w.get("dropped"),
                        w.get("rejected"),
                        w.get("flush_p99_ms"),
                        w.get("db_reachable"),
                        w.get("last_error") or "",
                    )
                    for w in report.audit_writers
                ],
            )
        )
    else:
        parts.append("_no audit writer published metrics in the last day_")
    return "\n\n".join(parts)


def report_summary(report: HealthReport) -> str:
    """The report in four lines for a person: size and connections, the largest tables, unused indexes
    and the slowest statement, the worst dead-tuple ratio. Markdown."""
    db = report.database
    largest = ", ".join(
        f"{t['table_name']} {human_bytes(t['total_bytes'])}"
        + (f" ({t['partitions']} partitions)" if t["partitioned"] else "")
        for t in report.tables[:3]
    )
    unused = report.unused_indexes
    slow = report.slow.rows[0] if report.slow.rows else None
    worst = max(report.dead_tuples, key=lambda d: d["dead_ratio"], default=None)
    lines = [
        f"**Database {human_bytes(db.get('database_bytes', 0))}** · {db.get('connections', 0)} client connections of "
        f"{db.get('max_connections', 0)} ({db.get('active', 0)} active, {db.get('idle_in_transaction', 0)} idle in "
        f"transaction) · rollback ratio {db.get('rollback_ratio', 0):.2%} · cache hit {db.get('cache_hit_ratio', 1):.2%}",
        f"Largest tables: {largest or 'none'}",
        f"Unused indexes: {len(unused)} ({human_bytes(sum(i['bytes'] for i in unused))})"
        + (
            f" · slowest statement {slow['mean_ms']:.2f} ms mean over {slow['calls']} calls"
            if slow
            else f" · {report.slow.message}"
        ),
        f"Highest dead-tuple ratio: {worst['table_name']} {worst['dead_ratio']:.1%}"
        if worst
        else "No dead tuples reported",
    ]
    return "\n\n".join(lines)


def report_metrics(report: HealthReport) -> dict[str, float]:
    """Numeric, stably keyed values of the report (plotted over time by the UI)."""
    db = report.database
    out: dict[str, float] = {
        "bytes": float(db.get("database_bytes", 0)),
        "unused_indexes": float(len(report.unused_indexes)),
        "unused_index_bytes": float(sum(i["bytes"] for i in report.unused_indexes)),
        "connections": float(db.get("connections", 0)),
        "active_connections": float(db.get("active", 0)),
        "server_connections": float(db.get("server_connections", 0)),
        "rollback_ratio": float(db.get("rollback_ratio", 0.0)),
        "cache_hit_ratio": float(db.get("cache_hit_ratio", 1.0)),
    }
    for t in report.tables:
        out[f"bytes.{t['table_name']}"] = float(t["total_bytes"])
        out[f"dead_ratio.{t['table_name']}"] = float(t["dead_ratio"])
    if report.slow.rows:
        out["slowest_mean_ms"] = float(report.slow.rows[0]["mean_ms"])
    live = [w for w in report.audit_writers if not w["stale"]]
    out["audit_writers"] = float(len(live))
    for key in ("queued", "spooled", "dropped", "rejected"):
        out[f"audit_{key}"] = float(sum(w.get(key) or 0 for w in live))
    out["audit_flush_p99_ms"] = max((float(w.get("flush_p99_ms") or 0) for w in live), default=0.0)
    return out


# ---------------------------------------------------------------------------------- latency probes

AUDIT = "audit"
ANALYTICS = "analytics"


@dataclass(frozen=True)
class Probe:
    """One query the dashboard or the audit views depend on. ``needs_index``: a plan without any index
    scan is a regression even if it is still fast on today's data (it will not stay fast)."""

    name: str
    group: str  # AUDIT | ANALYTICS
    query: str  # sql/queries/<query>.sql
    needs_index: bool
    requires_table: str | None = None


PROBES: tuple[Probe, ...] = (
    Probe("audit_user_latest", AUDIT, "health_probe_audit_user_latest", True),
    Probe("audit_entity_history", AUDIT, "health_probe_audit_entity_history", True),
    Probe("audit_critical_24h", AUDIT, "health_probe_audit_critical_24h", True),
    # the dashboard's own statements, so a budget measures exactly what the API runs on a cache miss
    Probe("kpis", ANALYTICS, "dashboard_kpis", False),
    Probe("trends", ANALYTICS, "rollup_trends", False, requires_table="usage_daily_metrics"),
    Probe("usage_by_user", ANALYTICS, "health_probe_usage_by_user", True),
)

_INDEX_NODES = {"Index Scan", "Index Only Scan", "Bitmap Index Scan"}

#: a probe that needs an index may do without one while its plan touches fewer shared buffers than this
#: (1 MB): on a tiny table a sequential scan is the right plan, and stays fast
NO_INDEX_BLOCKS_ALLOWED = 128


@dataclass
class ProbeResult:
    name: str
    group: str
    skipped: str | None = None
    samples_ms: list[float] = field(default_factory=list)
    indexes: list[str] = field(default_factory=list)
    needs_index: bool = False
    shared_hit: int = 0
    shared_read: int = 0
    plan_text: str = ""

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.samples_ms) if self.samples_ms else float("nan")

    @property
    def p95_ms(self) -> float:
        return percentile(self.samples_ms, 95)

    @property
    def index_used(self) -> bool:
        return bool(self.indexes)

    @property
    def blocks(self) -> int:
        """Shared buffers the plan touched (hit + read), all nodes."""
        return self.shared_hit + self.shared_read

    @property
    def missing_index(self) -> bool:
        """Needs an index, used none, and read enough that it matters (see NO_INDEX_BLOCKS_ALLOWED)."""
        return self.needs_index and not self.index_used and self.blocks >= NO_INDEX_BLOCKS_ALLOWED

    def within(self, budget_ms: float) -> bool:
        """Skipped probes pass; others need p95 within budget and no :attr:`missing_index`."""
        if self.skipped:
            return True
        return self.p95_ms <= budget_ms and not self.missing_index


def _plan_indexes(node: Mapping[str, Any]) -> list[str]:
    found = [node["Index Name"]] if node.get("Node Type") in _INDEX_NODES and "Index Name" in node else []
    for child in node.get("Plans", []):
        found += _plan_indexes(child)
    return found


def probe_params(conn: psycopg.Connection) -> dict[str, Any]:
    """Arguments for the probes from the live data (``health_probe_params.sql``); placeholders that match
    nothing when the tables are empty, so the probes still run (and measure an empty lookup)."""
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(load_query("health_probe_params")).fetchone() or {}
    nobody = "00000000-0000-0000-0000-000000000000"
    return {
        "user_id": row.get("audit_user_id") or nobody,
        "entity_type": row.get("entity_type") or "session",
        "entity_id": row.get("entity_id") or "none",
        "usage_user_id": row.get("usage_user_id") or nobody,
    }


def run_probe(
    conn: psycopg.Connection, probe: Probe, params: Mapping[str, Any], *, runs: int = 5, warmup: int = 1
) -> ProbeResult:
    """Run ``EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)`` of the probe ``warmup + runs`` times; the timed
    samples are PostgreSQL's planning + execution time (no network, no client). Keeps the indexes the
    plan used and, for the report, the last plan as text. Cost: ``runs + warmup + 1`` executions of
    the query (read-only; ACCESS SHARE locks only)."""
    result = ProbeResult(probe.name, probe.group, needs_index=probe.needs_index)
    if probe.requires_table and not _exists(conn, probe.requires_table):
        result.skipped = f"skipped: table {probe.requires_table} does not exist"
        return result
    query = load_query(probe.query)
    today = dt.datetime.now(dt.UTC).date()
    # dashboard_kpis at now(); rollup_trends: the dashboard's standard weekly range (13 ISO weeks)
    weekly = next(r for r in standard_trend_requests(today) if r.granularity == "weekly")
    args = {"as_of": None, "start": weekly.start, "end": weekly.end, "unit": "week", **params}
    if probe.name == "usage_by_user":
        args["user_id"] = params["usage_user_id"]
    explain = sql.SQL("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) ") + sql.SQL(query)  # type: ignore[arg-type]
    for i in range(warmup + runs):
        plan = conn.execute(explain, args).fetchone()[0]
        doc = (json.loads(plan) if isinstance(plan, str) else plan)[0]
        if i < warmup:
            continue
        result.samples_ms.append(float(doc.get("Planning Time", 0.0)) + float(doc["Execution Time"]))
        result.indexes = sorted(set(_plan_indexes(doc["Plan"])))
        result.shared_hit = int(doc["Plan"].get("Shared Hit Blocks", 0))
        result.shared_read = int(doc["Plan"].get("Shared Read Blocks", 0))
    text = conn.execute(sql.SQL("EXPLAIN (ANALYZE, BUFFERS) ") + sql.SQL(query), args).fetchall()  # type: ignore[arg-type]
    result.plan_text = "\n".join(r[0] for r in text)
    return result


def run_probes(
    conn: psycopg.Connection, *, runs: int = 5, probes: Sequence[Probe] = PROBES
) -> list[ProbeResult]:
    """Every probe against the live data (see :func:`run_probe`). Rolls back whatever it read in."""
    params = probe_params(conn)
    out = [run_probe(conn, p, params, runs=runs) for p in probes]
    if not conn.autocommit:
        conn.rollback()
    return out


# ------------------------------------------------------------------------------------- resources


@dataclass(frozen=True)
class CpuSample:
    """Cumulative CPU seconds of the whole machine (all cores) at one instant."""

    busy_s: float
    total_s: float
    boot_time: float


def cpu_sample() -> CpuSample:
    """Non-blocking CPU sample (reads /proc/stat; microseconds)."""
    t = psutil.cpu_times()
    idle = t.idle + getattr(t, "iowait", 0.0)
    total = sum(t)
    return CpuSample(busy_s=total - idle, total_s=total, boot_time=psutil.boot_time())


def cpu_percent_between(before: CpuSample, after: CpuSample) -> float | None:
    """Average CPU utilisation (0–100, all cores) between two samples; None if they do not compare
    (a reboot in between, or no time elapsed)."""
    if before.boot_time != after.boot_time or after.total_s <= before.total_s:
        return None
    return max(0.0, min(100.0, 100 * (after.busy_s - before.busy_s) / (after.total_s - before.total_s)))


@dataclass
class ResourceSnapshot:
    cpu_percent: float | None
    cpu_window_s: float
    cpu: CpuSample
    memory_percent: float
    memory_available_bytes: int
    disk_percent: float
    disk_free_bytes: int
    load_1m_per_core: float
    connections: int
    active_connections: int
    max_connections: int
    since_previous: bool = False  # the CPU averages since ``previous`` (else over this call)

    @property
    def connection_ratio(self) -> float:
        return self.connections / self.max_connections if self.max_connections else 0.0


def system_resources(
    conn: psycopg.Connection,
    *,
    previous: CpuSample | None = None,
    disk_path: str = "/",
    min_window_s: float = 0.0,
) -> ResourceSnapshot:
    """CPU, memory, disk and database connections, without blocking.

    CPU is the average utilisation since ``previous`` (e.g. the sample stored with the last
    materialization: "CPU < 60 %" is about an average, not an instant); without a usable previous sample
    (a first run, a reboot since) it is measured over this call, which then lasts at least
    ``min_window_s`` seconds (it sleeps the rest: an instant's reading is noise, the load average a
    different quantity). Cost: /proc reads, a statvfs, one pg_stat_activity read, and that sleep.
    """
    first = cpu_sample()
    row = conn.execute(
        """
        SELECT count(*) FILTER (WHERE backend_type = 'client backend'),
               count(*) FILTER (WHERE backend_type = 'client backend' AND state = 'active'),
               current_setting('max_connections')::int
        FROM pg_stat_activity
        """
    ).fetchone()
    mem = psutil.virtual_memory()
    disk = psutil.disk_usage(disk_path)
    now = cpu_sample()
    usable = previous is not None and cpu_percent_between(previous, now) is not None
    if not usable and min_window_s > 0:
        cores = psutil.cpu_count() or 1
        left = min_window_s - (now.total_s - first.total_s) / cores
        if left > 0:
            time.sleep(left)
            now = cpu_sample()
    base = previous if usable and previous is not None else first
    cpu = cpu_percent_between(base, now)
    cores = psutil.cpu_count() or 1
    return ResourceSnapshot(
        cpu_percent=cpu,
        cpu_window_s=(now.total_s - base.total_s) / cores,
        cpu=now,
        memory_percent=mem.percent,
        memory_available_bytes=mem.available,
        disk_percent=disk.percent,
        disk_free_bytes=disk.free,
        load_1m_per_core=psutil.getloadavg()[0] / cores,
        connections=row[0],
        active_connections=row[1],
        max_connections=row[2],
        since_previous=usable,
    )
