"""Monthly range partitions of ``audit_log`` and ``usage_log``: names, bounds, listing, creation.

The one partition-name function lives here: month ``2025-08`` of ``audit_log`` is ``audit_log_y2025m08``
and covers ``[2025-08-01 00:00Z, 2025-09-01 00:00Z)``. Dagster's monthly partition key ``2025-08-01``
maps onto it one-to-one (:func:`month_of_key`).

Creating a partition never takes an ACCESS EXCLUSIVE lock on the parent: the new month is created as a
standalone table, then ``ATTACH PARTITION``-ed, which takes SHARE UPDATE EXCLUSIVE on the parent (readers
and writers go on) and ACCESS EXCLUSIVE only on the new empty table and, briefly, on the DEFAULT partition
that PostgreSQL scans to prove none of its rows belong to the new month. Both steps run with a short
``lock_timeout`` and retries (:func:`perf_pipeline.lib.db.run_with_lock_retry`).
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from dataclasses import dataclass

import psycopg
from psycopg import sql

from perf_pipeline.lib.db import run_with_lock_retry

log = logging.getLogger(__name__)

UTC = dt.UTC

#: partitioned tables this project manages, and their partition key column
PARTITIONED_TABLES: dict[str, str] = {"audit_log": "timestamp", "usage_log": "created_at"}

_PARTITION = re.compile(r"^(?P<table>[a-z_]+)_y(?P<y>\d{4})m(?P<m>\d{2})$")


class PartitionError(ValueError):
    """Bad table name or month, or a partition whose bounds are not the expected month."""


def _check_table(table: str) -> str:
    if table not in PARTITIONED_TABLES:
        raise PartitionError(f"unknown partitioned table {table!r}; expected one of {sorted(PARTITIONED_TABLES)}")
    return table


def month_start(value: dt.date | dt.datetime) -> dt.date:
    """First day of the (UTC) month containing ``value``."""
    if isinstance(value, dt.datetime):
        value = value.astimezone(UTC).date() if value.tzinfo else value.date()
    return value.replace(day=1)


def add_months(month: dt.date, n: int) -> dt.date:
    index = month.year * 12 + (month.month - 1) + n
    return dt.date(index // 12, index % 12 + 1, 1)


def month_of_key(key: str) -> dt.date:
    """Dagster monthly partition key (``2025-08-01``) or ``2025-08`` → first day of that month."""
    try:
        parsed = dt.date.fromisoformat(key if len(key) > 7 else f"{key}-01")
    except ValueError:
        raise PartitionError(f"not a month: {key!r} (expected YYYY-MM or YYYY-MM-01)") from None
    if parsed.day != 1:
        raise PartitionError(f"not a month: {key!r} (a monthly key is the month's first day)")
    return parsed


def partition_name(table: str, month: dt.date) -> str:
    """``audit_log`` + 2025-08 → ``audit_log_y2025m08``."""
    month = month_start(month)
    return f"{_check_table(table)}_y{month.year:04d}m{month.month:02d}"


def month_of_partition(name: str) -> dt.date | None:
    """``audit_log_y2025m08`` → 2025-08-01 (None for names that are not monthly partitions)."""
    m = _PARTITION.match(name)
    if not m:
        return None
    return dt.date(int(m["y"]), int(m["m"]), 1)


def month_bounds(month: dt.date) -> tuple[dt.datetime, dt.datetime]:
    """[start, end) of a month as UTC timestamps."""
    start = month_start(month)
    end = add_months(start, 1)
    return (dt.datetime(start.year, start.month, 1, tzinfo=UTC), dt.datetime(end.year, end.month, 1, tzinfo=UTC))


def months_between(first: dt.date, last: dt.date) -> list[dt.date]:
    """Every month from ``first``'s to ``last``'s, inclusive."""
    out, cur, last = [], month_start(first), month_start(last)
    while cur <= last:
        out.append(cur)
        cur = add_months(cur, 1)
    return out


@dataclass(frozen=True)
class PartitionInfo:
    name: str
    month: dt.date | None  # None for DEFAULT
    is_default: bool


def list_partitions(conn: psycopg.Connection, table: str) -> list[PartitionInfo]:
    """Attached partitions of ``table`` (catalog read, no locks beyond AccessShare on the catalogs)."""
    rows = conn.execute(
        """
        SELECT c.relname, pg_get_expr(c.relpartbound, c.oid)
        FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        JOIN pg_class p ON p.oid = i.inhparent
        JOIN pg_namespace n ON n.oid = p.relnamespace
        WHERE p.relname = %s AND n.nspname = current_schema()
        ORDER BY c.relname
        """,
        (_check_table(table),),
    ).fetchall()
    return [PartitionInfo(name, month_of_partition(name), bound == "DEFAULT") for name, bound in rows]


def existing_months(conn: psycopg.Connection, table: str) -> set[dt.date]:
    return {p.month for p in list_partitions(conn, table) if p.month is not None}


def _attach(conn: psycopg.Connection, table: str, name: str, month: dt.date) -> bool:
    """Create ``name`` standalone (if missing) and attach it for ``month``; False if already attached."""
    start, end = month_bounds(month)
    attached = conn.execute(
        """
        SELECT pg_get_expr(c.relpartbound, c.oid) FROM pg_class c
        JOIN pg_inherits i ON i.inhrelid = c.oid
        WHERE c.relname = %s AND c.relnamespace = current_schema()::regnamespace
          AND i.inhparent = %s::regclass
        """,
        (name, table),
    ).fetchone()
    if attached is not None:
        return False
    conn.execute(
        sql.SQL("CREATE TABLE IF NOT EXISTS {} (LIKE {} INCLUDING DEFAULTS INCLUDING CONSTRAINTS "
                "INCLUDING STORAGE INCLUDING COMMENTS)").format(sql.Identifier(name), sql.Identifier(table))
    )
    # ATTACH builds the parent's indexes on the (empty) child, so every index of the parent exists on it.
    conn.execute(
        sql.SQL("ALTER TABLE {} ATTACH PARTITION {} FOR VALUES FROM ({}) TO ({})").format(
            sql.Identifier(table), sql.Identifier(name), sql.Literal(start), sql.Literal(end)
        )
    )
    return True


def ensure_partition(conn: psycopg.Connection, table: str, month: dt.date, *, lock_timeout_ms: int = 200,
                     attempts: int = 50) -> bool:
    """Create and attach ``table``'s partition for ``month`` if missing. True if it was created.

    Idempotent. Locks: SHARE UPDATE EXCLUSIVE on the parent, ACCESS EXCLUSIVE on the new table and on
    the DEFAULT partition while it is scanned (it should be empty), each bounded by ``lock_timeout_ms``.
    Raises ``psycopg.errors.CheckViolation`` if DEFAULT already holds rows of that month (move them first:
    ``move_default_rows``).
    """
    month = month_start(month)
    name = partition_name(table, month)
    created = run_with_lock_retry(conn, lambda c: _attach(c, table, name, month),
                                  lock_timeout_ms=lock_timeout_ms, attempts=attempts, what=f"create {name}")
    if created:
        log.info("created partition %s", name)
    return created


def ensure_partitions(conn: psycopg.Connection, table: str, months: list[dt.date], **kwargs: int) -> list[str]:
    """:func:`ensure_partition` for each month; returns the names created."""
    have = existing_months(conn, table)
    created = []
    for month in sorted({month_start(m) for m in months}):
        if month not in have and ensure_partition(conn, table, month, **kwargs):
            created.append(partition_name(table, month))
    return created
