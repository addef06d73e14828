"""The health report and how health results read: sizes, dead tuples, index usage, slow statements,
connections and the audit writers, as markdown for people and stably keyed numbers for plots.

``pg_stat_statements`` columns are ``mean_exec_time`` & co. (PostgreSQL 13 and later; the project needs
15), and a missing or unloaded extension is a line in the report, not an exception.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import errors
from psycopg.rows import dict_row

from perf_pipeline.lib.db import load_query
from perf_pipeline.lib.health._catalog import relation_exists
from perf_pipeline.lib.health.maintenance import MaintenanceResult
from perf_pipeline.lib.health.probes import ProbeResult
from perf_pipeline.lib.health.resources import ResourceSnapshot

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
    """``372979391`` → ``"355.7 MB"`` (powers of 1024; bytes without decimals)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


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
    if not relation_exists(conn, "audit_writer_metrics"):
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


def _table(columns: _Columns, rows: Iterable[dict[str, Any]]) -> str:
    """A markdown table of ``rows``, one column per (header, cell of a row)."""
    return markdown_table([h for h, _ in columns], [tuple(cell(r) for _, cell in columns) for r in rows])


def _section(title: str, columns: _Columns, rows: Iterable[dict[str, Any]]) -> str:
    """A ``###`` heading and :func:`_table` of ``rows`` under it."""
    return f"{title}\n\n{_table(columns, rows)}"


#: a markdown table's columns: (header, cell of a row) each
_Columns = tuple[tuple[str, Callable[[dict[str, Any]], object]], ...]

_TABLE_COLUMNS: _Columns = (
    ("table", lambda t: t["table_name"]),
    ("partitions", lambda t: t["partitions"] if t["partitioned"] else ""),
    ("table", lambda t: human_bytes(t["table_bytes"])),
    ("indexes", lambda t: human_bytes(t["index_bytes"])),
    ("total", lambda t: human_bytes(t["total_bytes"])),
    ("rows (est.)", lambda t: t["est_rows"]),
    ("dead tuples", lambda t: t["dead_tuples"]),
    ("dead ratio", lambda t: f"{t['dead_ratio']:.1%}"),
)
_DEAD_COLUMNS: _Columns = (
    ("table", lambda d: d["table_name"]),
    ("parent", lambda d: d["parent"]),
    ("live", lambda d: d["live_tuples"]),
    ("dead", lambda d: d["dead_tuples"]),
    ("dead ratio", lambda d: f"{d['dead_ratio']:.1%}"),
    ("last vacuum", lambda d: d["last_vacuum"]),
    ("last analyze", lambda d: d["last_analyze"]),
)
_INDEX_COLUMNS: _Columns = (
    ("index", lambda i: i["index_name"]),
    ("table", lambda i: i["table_name"]),
    ("partitions", lambda i: i["leaf_indexes"]),
    ("scans", lambda i: i["scans"]),
    ("size", lambda i: human_bytes(i["bytes"])),
    ("enforces constraint", lambda i: "yes" if i["enforces_constraint"] else ""),
    ("unused", lambda i: "**UNUSED**" if i["unused"] else ""),
)
_STATEMENT_COLUMNS: _Columns = (
    ("calls", lambda s: s["calls"]),
    ("mean ms", lambda s: s["mean_ms"]),
    ("max ms", lambda s: s["max_ms"]),
    ("total ms", lambda s: s["total_ms"]),
    ("rows", lambda s: s["rows"]),
    ("query", lambda s: f"`{s['query']}`"),
)
_DATABASE_COLUMNS: _Columns = (
    ("connections (db)", lambda db: db.get("connections")),
    ("active", lambda db: db.get("active")),
    ("idle in tx", lambda db: db.get("idle_in_transaction")),
    ("waiting on locks", lambda db: db.get("waiting_on_locks")),
    ("server connections", lambda db: db.get("server_connections")),
    ("max_connections", lambda db: db.get("max_connections")),
    ("commits", lambda db: db.get("commits")),
    ("rollbacks", lambda db: db.get("rollbacks")),
    ("rollback ratio", lambda db: f"{db.get('rollback_ratio', 0):.2%}"),
    ("cache hit ratio", lambda db: f"{db.get('cache_hit_ratio', 0):.2%}"),
    ("deadlocks", lambda db: db.get("deadlocks")),
)
_WRITER_COLUMNS: _Columns = (
    ("writer", lambda w: w["writer"]),
    ("updated", lambda w: w["updated_at"]),
    ("stale", lambda w: "**STALE**" if w["stale"] else ""),
    ("queued", lambda w: w.get("queued")),
    ("written", lambda w: w.get("written")),
    ("spooled", lambda w: w.get("spooled")),
    ("dropped", lambda w: w.get("dropped")),
    ("rejected", lambda w: w.get("rejected")),
    ("flush p99 ms", lambda w: w.get("flush_p99_ms")),
    ("database reachable", lambda w: w.get("db_reachable")),
    ("last error", lambda w: w.get("last_error") or ""),
)


def report_markdown(report: HealthReport) -> str:
    """The report as markdown sections (tables, dead tuples, indexes, statements, connections, audit
    writers). No I/O."""
    parts = [
        _section("### Tables (partitions grouped under their parent)", _TABLE_COLUMNS, report.tables),
        _section("### Dead tuples (leaf tables, most first)", _DEAD_COLUMNS, report.dead_tuples),
        _section(
            f"### Index usage ({len(report.unused_indexes)} unused; primary keys and constraint indexes are "
            "never flagged)",
            _INDEX_COLUMNS,
            report.indexes,
        ),
        f"### Slow statements (pg_stat_statements)\n\n{report.slow.message}",
    ]
    if report.slow.rows:
        parts.append(_table(_STATEMENT_COLUMNS, report.slow.rows))
    parts.append(_section("### Connections and transactions", _DATABASE_COLUMNS, [report.database]))
    title = "### Audit writers (platform processes, from audit_writer_metrics)"
    if report.audit_writers:
        parts.append(_section(title, _WRITER_COLUMNS, report.audit_writers))
    else:
        parts.append(f"{title}\n\n_no audit writer published metrics in the last day_")
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


# ----------------------------------------------------------------------------- how results read
#
# Every function below turns one health result into the fields a person or a plot reads, in the order the
# UI lists them; the Dagster layer only converts the two marker types (Markdown, Rows) to its metadata
# values. Plain Python, no I/O.


class Markdown(str):
    """Text the UI renders as markdown, not as plain text."""


class Rows(list):
    """Rows (dicts of equal keys) the UI shows as a table, columns in key order."""


@dataclass
class Verdict:
    """The outcome of one threshold check: passed, one sentence for people, and the numbers behind it."""

    passed: bool
    description: str
    fields: dict[str, object]


def rounded(value: float | None, digits: int = 2) -> float:
    """A float for people: ``digits`` decimals; None and NaN become 0.0."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return 0.0
    return round(float(value), digits)


def size(n: float | None) -> str:
    """``372979391`` → ``"355.7 MB"``; None is 0 B."""
    return human_bytes(float(n or 0))


def maintenance_log_lines(result: MaintenanceResult) -> list[str]:
    """One log line per VACUUM and per REINDEX of ``result``: relation, duration or bloat, outcome."""
    lines = [
        f"VACUUM (ANALYZE) {v.relation}: {v.duration_ms:.0f} ms" + ("" if v.ok else f" FAILED {v.error}")
        for v in result.vacuumed
    ]
    lines += [
        f"REINDEX INDEX CONCURRENTLY {r.index} (bloat {r.bloat_ratio * 100:.0f}%): "
        + ("ok" if r.ok else f"FAILED {r.error}")
        for r in result.reindexed
    ]
    return lines


def maintenance_fields(result: MaintenanceResult, *, bloat_threshold: float) -> dict[str, object]:
    """The nightly maintenance as it reads: totals, then a row per relation vacuumed and per index rebuilt
    (or why none was), then each relation's VACUUM duration as a plot key."""
    fields: dict[str, object] = {
        "duration_ms": rounded(result.duration_ms, 1),
        "relations_vacuumed": sum(v.ok for v in result.vacuumed),
        "vacuum_ms": rounded(sum(v.duration_ms for v in result.vacuumed), 1),
        "indexes_reindexed": sum(r.ok for r in result.reindexed),
        "reindex_bytes_freed": sum(
            r.bytes_before - (r.bytes_after or r.bytes_before) for r in result.reindexed
        ),
        "failures": result.failures,
        "vacuum": Rows(
            {
                "relation": v.relation,
                "duration_ms": v.duration_ms,
                "result": "ok" if v.ok else f"failed: {v.error}",
            }
            for v in result.vacuumed
        ),
        "reindex": Rows(
            {
                "index": r.index,
                "table": r.table,
                "estimated_bloat": f"{r.bloat_ratio:.0%}",
                "before": size(r.bytes_before),
                "after": size(r.bytes_after) if r.bytes_after is not None else "",
                "duration_ms": r.duration_ms,
                "result": "ok" if r.ok else f"failed: {r.error}",
            }
            for r in result.reindexed
        )
        if result.reindexed
        else f"no index past {bloat_threshold:.0%} estimated bloat ({result.bloat_checked} checked)",
    }
    for v in result.vacuumed:
        fields[f"vacuum_ms.{v.relation}"] = rounded(v.duration_ms, 1)
    return fields


#: rollback ratio from which the rollback check warns (usually an application retry loop)
ROLLBACK_RATIO_MAX = 0.10


def health_report_fields(report: HealthReport, *, duration_ms: float) -> dict[str, object]:
    """The health report as it reads: the summary first, the headline numbers, a table per section, then
    the plotted series grouped by prefix (audit writers, per-table bytes, dead-tuple ratios)."""
    db = report.database
    numbers = report_metrics(report)
    fields: dict[str, object] = {
        # a person reads this first; the tables below have the detail, the numbers feed the plots
        "summary": Markdown(report_summary(report)),
        "dagster/size_bytes": int(db.get("database_bytes", 0)),
        "database_size": size(db.get("database_bytes", 0)),
        "connections": int(db.get("connections", 0)),
        "active_connections": int(db.get("active", 0)),
        "rollback_ratio": rounded(float(db.get("rollback_ratio", 0.0)), 4),
        "cache_hit_ratio": rounded(float(db.get("cache_hit_ratio", 1.0)), 4),
        "unused_indexes": len(report.unused_indexes),
        "slowest_mean_ms": rounded(numbers.get("slowest_mean_ms"), 2),
        "pg_stat_statements": report.slow.status,
        "tables": Rows(
            {
                "table": t["table_name"],
                "partitions": t["partitions"] if t["partitioned"] else "",
                "table_size": size(t["table_bytes"]),
                "index_size": size(t["index_bytes"]),
                "total_size": size(t["total_bytes"]),
                "rows_estimate": int(t["est_rows"]),
                "dead_tuples": int(t["dead_tuples"]),
                "dead_ratio": f"{t['dead_ratio']:.1%}",
            }
            for t in report.tables
        ),
        "dead_tuples": Rows(
            {
                "table": d["table_name"],
                "parent": d["parent"] or "",
                "live": int(d["live_tuples"]),
                "dead": int(d["dead_tuples"]),
                "dead_ratio": f"{d['dead_ratio']:.1%}",
                "last_vacuum": str(d["last_vacuum"] or ""),
                "last_analyze": str(d["last_analyze"] or ""),
            }
            for d in report.dead_tuples
        ),
        "indexes": Rows(
            {
                "index": i["index_name"],
                "table": i["table_name"],
                "partitions": int(i["leaf_indexes"]),
                "scans": int(i["scans"]),
                "size": size(i["bytes"]),
                "enforces_constraint": bool(i["enforces_constraint"]),
                "unused": bool(i["unused"]),
            }
            for i in report.indexes
        ),
        "slow_statements": Rows(
            {
                "calls": int(q["calls"]),
                "mean_ms": float(q["mean_ms"]),
                "max_ms": float(q["max_ms"]),
                "total_ms": float(q["total_ms"]),
                "rows": int(q["rows"]),
                "query": str(q["query"])[:300],
            }
            for q in report.slow.rows
        )
        if report.slow.rows
        else report.slow.message,
        "duration_ms": rounded(duration_ms, 1),
    }
    # the plotted series, grouped by prefix (the UI sorts keys): audit writers, then per-table bytes and
    # dead-tuple ratios
    for key, value in sorted(numbers.items()):
        if key.startswith("audit_"):
            fields[f"writers.{key}"] = rounded(value, 2)
        elif key.startswith("bytes."):
            fields[f"table_bytes.{key[len('bytes.') :]}"] = int(value)
        elif key.startswith("dead_ratio."):
            fields[key] = rounded(value, 4)
    return fields


def rollback_verdict(report: HealthReport) -> Verdict:
    """Whether fewer than :data:`ROLLBACK_RATIO_MAX` of the transactions rolled back since the statistics
    reset."""
    ratio = float(report.database.get("rollback_ratio", 0.0))
    return Verdict(
        ratio < ROLLBACK_RATIO_MAX,
        f"{ratio:.2%} of transactions rolled back since the statistics reset (threshold 10 %)",
        {"rollback_ratio": rounded(ratio, 4), "threshold": ROLLBACK_RATIO_MAX},
    )


def probe_verdict(r: ProbeResult, budget_ms: float) -> str:
    """One probe's outcome in words: ok, over budget, no index scan, or why it was skipped."""
    if r.skipped:
        return r.skipped
    if r.within(budget_ms):
        return "ok"
    return "over budget" if r.p95_ms > budget_ms else f"no index scan ({r.blocks} buffers)"


def probe_fields(results: Sequence[ProbeResult]) -> dict[str, object]:
    """The probes as plot keys: the worst p95 first, then per query p50 and p95, the plan's buffers and
    whether it used an index (a skipped probe says why instead)."""
    measured = [r for r in results if not r.skipped]
    fields: dict[str, object] = {"p95_ms": rounded(max((r.p95_ms for r in measured), default=0.0), 2)}
    for r in results:
        if r.skipped:
            fields[f"skipped.{r.name}"] = r.skipped
            continue
        fields[f"latency_p50_ms.{r.name}"] = rounded(r.p50_ms, 3)
        fields[f"latency_p95_ms.{r.name}"] = rounded(r.p95_ms, 3)
        fields[f"plan_buffers.{r.name}"] = r.blocks
        fields[f"plan_index_used.{r.name}"] = r.index_used
    return fields


def budget_verdict(group: str, budget_ms: float, results: Sequence[ProbeResult]) -> Verdict:
    """Whether every probe of ``group`` (:data:`AUDIT` or :data:`ANALYTICS`) is within ``budget_ms``:
    a row per probe and, when one fails, the plans of the failing probes."""
    mine = [r for r in results if r.group == group]
    failing = [r for r in mine if not r.within(budget_ms)]
    measured = [r for r in mine if not r.skipped]
    worst = max((r.p95_ms for r in measured), default=0.0)
    fields: dict[str, object] = {
        "p95_ms": rounded(worst, 2),
        "budget_ms": budget_ms,
        "queries": len(measured),
        "failing": len(failing),
        "results": Rows(
            {
                "query": r.name,
                "p50_ms": r.p50_ms if not r.skipped else 0.0,
                "p95_ms": r.p95_ms if not r.skipped else 0.0,
                "buffers": r.blocks,
                "index_used": r.index_used,
                "indexes": ", ".join(r.indexes),
                "result": probe_verdict(r, budget_ms),
            }
            for r in mine
        ),
    }
    if failing:
        fields["plan"] = Markdown(
            "\n\n".join(
                f"**{r.name}** (p95 {r.p95_ms:.2f} ms, budget {budget_ms:g} ms, indexes: "
                f"{', '.join(r.indexes) or 'none'})\n\n```\n{r.plan_text}\n```"
                for r in failing
            )
        )
    return Verdict(
        not failing,
        f"worst p95 {worst:.2f} ms of {len(measured)} queries, budget {budget_ms:g} ms"
        if not failing
        else "over budget or without an index scan: " + ", ".join(r.name for r in failing),
        fields,
    )


def resources_fields(snap: ResourceSnapshot) -> dict[str, object]:
    """The machine's resources as they read, then the CPU sample the next run averages from."""
    return {
        "cpu_percent": rounded(_cpu(snap), 1),
        "cpu_window_s": rounded(snap.cpu_window_s, 1),
        "cpu_measured_since": _cpu_since(snap),
        "memory_percent": rounded(snap.memory_percent, 1),
        "memory_available": size(snap.memory_available_bytes),
        "disk_percent": rounded(snap.disk_percent, 1),
        "disk_free": size(snap.disk_free_bytes),
        "load_1m_per_core": rounded(snap.load_1m_per_core, 2),
        "connections": snap.connections,
        "active_connections": snap.active_connections,
        "max_connections": snap.max_connections,
        # the next materialization averages the CPU over the interval from this sample
        "cpu_busy_s": snap.cpu.busy_s,
        "cpu_total_s": snap.cpu.total_s,
        "boot_time": snap.cpu.boot_time,
    }


def _cpu(snap: ResourceSnapshot) -> float:
    return snap.cpu_percent if snap.cpu_percent is not None else 0.0


def _cpu_since(snap: ResourceSnapshot) -> str:
    return "the previous sample" if snap.since_previous else "this run"


def memory_verdict(snap: ResourceSnapshot, max_pct: float) -> Verdict:
    """Whether memory in use is below ``max_pct`` % of the machine."""
    return Verdict(
        snap.memory_percent < max_pct,
        f"memory {snap.memory_percent:.1f} % in use (threshold {max_pct:g} %)",
        {"memory_percent": rounded(snap.memory_percent, 1), "threshold": max_pct},
    )


def cpu_verdict(snap: ResourceSnapshot, max_pct: float) -> Verdict:
    """Whether the CPU, averaged over the snapshot's window, is below ``max_pct`` %."""
    cpu = _cpu(snap)
    return Verdict(
        cpu < max_pct,
        f"CPU {cpu:.1f} % on average over {snap.cpu_window_s:.1f} s since {_cpu_since(snap)} "
        f"(threshold {max_pct:g} %)",
        {"cpu_percent": rounded(cpu, 1), "threshold": max_pct, "window_s": rounded(snap.cpu_window_s, 1)},
    )


def connections_verdict(snap: ResourceSnapshot, max_ratio: float, active_max: int) -> Verdict:
    """Whether client connections stay below ``max_ratio`` of max_connections and at most ``active_max``
    of them are active."""
    return Verdict(
        snap.connection_ratio < max_ratio and snap.active_connections <= active_max,
        f"{snap.connections} of {snap.max_connections} connections, {snap.active_connections} active",
        {
            "connections": snap.connections,
            "max_connections": snap.max_connections,
            "ratio": rounded(snap.connection_ratio, 3),
            "ratio_threshold": max_ratio,
            "active_connections": snap.active_connections,
            "active_threshold": active_max,
        },
    )
