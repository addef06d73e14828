"""Database maintenance: VACUUM (ANALYZE) of the hot tables and recent partitions, REINDEX CONCURRENTLY of
bloated indexes.

``VACUUM`` cannot run inside a transaction block: :func:`run_maintenance` opens its own autocommit
connection, one statement per relation, each bounded by ``statement_timeout`` and ``lock_timeout``; it
vacuums the hot tables and the *recent* partitions only, not the whole history every night.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import errors, sql
from psycopg.rows import dict_row

from perf_pipeline.lib.calendar import add_months, month_start
from perf_pipeline.lib.db import connect, load_query
from perf_pipeline.lib.health._catalog import relation_exists
from perf_pipeline.lib.partitioning import PARTITIONED_TABLES, list_partitions

log = logging.getLogger(__name__)

#: plain tables the platform writes all day; vacuumed every night whole (they are small or hot)
HOT_TABLES: tuple[str, ...] = ("session", "data_export", "usage_daily_metrics", "alert_event")


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
    out = [t for t in hot_tables if relation_exists(conn, t)]
    for table in PARTITIONED_TABLES:
        if not relation_exists(conn, table):
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
        after: int | None = None
        error: str | None = None
        try:
            _drop_leftover_concurrent_builds(conn, row["table_name"])
            conn.execute(sql.SQL("REINDEX INDEX CONCURRENTLY {}").format(sql.Identifier(row["index_name"])))
            after = conn.execute(
                "SELECT pg_relation_size(%s::regclass)", (sql.Identifier(row["index_name"]).as_string(conn),)
            ).fetchone()[0]
        except (errors.QueryCanceled, errors.LockNotAvailable, errors.DeadlockDetected) as exc:
            log.warning("REINDEX INDEX CONCURRENTLY %s failed: %s", row["index_name"], exc)
            _drop_leftover_concurrent_builds(conn, row["table_name"])
            error = str(exc).strip()
        results.append(
            ReindexResult(
                row["index_name"],
                row["table_name"],
                ratio,
                row["bytes"],
                after,
                (time.perf_counter() - started) * 1000,
                error is None,
                error,
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
