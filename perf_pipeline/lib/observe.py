"""What the platform wrote, read cheaply enough to ask every minute at any size.

The Dagster code location shows the platform's own tables (``audit_log``, ``usage_log``, ``session``,
``data_export``) as external assets; :func:`snapshot` is everything it reports about them in one short
read, and nothing here scans a table:

* per relation (each month partition of audit_log/usage_log, DEFAULT, session, data_export): the
  cumulative insert/update/delete counters and live-row estimate of ``pg_stat_user_tables`` and the size
  on disk (``pg_total_relation_size``): catalog and statistics reads. The counters change whenever rows
  change, so they are the data version of a month; they restart from 0 after a statistics reset or a
  crash, which reads as one more change (harmless);
* the newest row of each table, through an index: audit_log's greatest id in the newest month (ids are
  UUIDv7, time-ordered, as AuditWriter and the loader write them) via the primary key, usage_log's newest
  ``created_at`` of the last day via its BRIN index, ``session.created_at`` via its B-tree;
* the days of usage_log changed after they ended: the late-data marks and claims (two tiny tables);
* the schema migrations applied (one small table) and the archive manifest.

Cost measured by ``python -m bench observe`` (see the README's Measured section).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from perf_pipeline.lib.archive import ManifestRow, list_manifest
from perf_pipeline.lib.partitioning import (
    PARTITIONED_TABLES,
    default_name,
    month_bounds,
    month_of_partition,
)

PLAIN_TABLES: tuple[str, ...] = ("session", "data_export")


@dataclass(frozen=True)
class RelationStats:
    relation: str
    table: str  # the platform table it belongs to
    month: dt.date | None  # the month of a partition, None for DEFAULT and plain tables
    inserted: int
    updated: int
    deleted: int
    live_rows: int
    bytes: int

    @property
    def version(self) -> str:
        """Changes whenever a row of the relation is written (cumulative statistics counters)."""
        return f"{self.inserted}.{self.updated}.{self.deleted}"


@dataclass(frozen=True)
class Snapshot:
    taken_at: dt.datetime
    relations: list[RelationStats]
    newest_row_at: dict[str, dt.datetime | None]
    #: usage_log days changed after they ended → the time of the change (marks and claims of 0021/0090)
    changed_days: dict[dt.date, dt.datetime]
    migrations: int
    last_migration_at: dt.datetime | None
    manifest: list[ManifestRow] = field(default_factory=list)

    def months(self, table: str) -> dict[dt.date, RelationStats]:
        return {r.month: r for r in self.relations if r.table == table and r.month is not None}

    def plain(self, table: str) -> RelationStats | None:
        return next((r for r in self.relations if r.relation == table), None)


def snapshot(conn: psycopg.Connection) -> Snapshot:
    """Everything the platform tables' observation reports, in a handful of catalog and index reads."""
    rows = conn.execute(
        """
        WITH rels AS (
            SELECT c.oid, c.relname, p.relname AS parent
            FROM pg_inherits i
            JOIN pg_class c ON c.oid = i.inhrelid
            JOIN pg_class p ON p.oid = i.inhparent
            WHERE p.relname = ANY (%(partitioned)s) AND p.relnamespace = current_schema()::regnamespace
            UNION ALL
            SELECT c.oid, c.relname, c.relname
            FROM pg_class c
            WHERE c.relname = ANY (%(plain)s) AND c.relnamespace = current_schema()::regnamespace
        )
        SELECT r.relname, r.parent, coalesce(s.n_tup_ins, 0), coalesce(s.n_tup_upd, 0), coalesce(s.n_tup_del, 0),
               coalesce(s.n_live_tup, 0), pg_total_relation_size(r.oid)
        FROM rels r LEFT JOIN pg_stat_user_tables s ON s.relid = r.oid
        ORDER BY r.relname
        """,
        {"partitioned": list(PARTITIONED_TABLES), "plain": list(PLAIN_TABLES)},
    ).fetchall()
    relations = [
        RelationStats(name, parent, month_of_partition(name), ins, upd, dele, live, size)
        for name, parent, ins, upd, dele, live, size in rows
    ]
    now = conn.execute("SELECT now()").fetchone()[0]
    newest = {
        "audit_log": _newest_audit(conn, relations),
        "usage_log": conn.execute(
            # BRIN on created_at: the blocks of the last day only (a day without usage reads as None)
            "SELECT max(created_at) FROM usage_log WHERE created_at >= %s - interval '1 day'",
            (now,),
        ).fetchone()[0],
        "session": conn.execute("SELECT max(created_at) FROM session").fetchone()[0],
        "data_export": conn.execute("SELECT max(requested_at) FROM data_export").fetchone()[0],
    }
    changed = dict(
        conn.execute(
            "SELECT day, max(at) FROM (SELECT day, marked_at AS at FROM usage_rollup_stale_days "
            "UNION ALL SELECT day, marked_at FROM usage_rollup_claims) m GROUP BY day"
        ).fetchall()
    )
    migrations, last_at = conn.execute("SELECT count(*), max(applied_at) FROM schema_migrations").fetchone()
    return Snapshot(now, relations, newest, changed, migrations, last_at, list_manifest(conn))


def _newest_audit(conn: psycopg.Connection, relations: list[RelationStats]) -> dt.datetime | None:
    """The row with the greatest id of the newest non-empty audit month (a backward primary-key scan of
    one partition, one row); DEFAULT when no month holds rows."""
    months = sorted(
        (
            r
            for r in relations
            if r.table == "audit_log" and r.month is not None and r.inserted + r.live_rows > 0
        ),
        key=lambda r: r.month,  # type: ignore[arg-type, return-value]
        reverse=True,
    )
    for rel in [*months[:2], next((r for r in relations if r.relation == default_name("audit_log")), None)]:
        if rel is None:
            continue
        row = conn.execute(
            sql.SQL('SELECT "timestamp" FROM {} ORDER BY id DESC LIMIT 1').format(
                sql.Identifier(rel.relation)
            )
        ).fetchone()
        if row:
            return row[0]
    return None


def usage_rows_on(conn: psycopg.Connection, day: dt.date) -> int:
    """usage_log rows of one UTC day (the BRIN index reads that day's blocks: milliseconds)."""
    start = dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)
    return conn.execute(
        "SELECT count(*) FROM usage_log WHERE created_at >= %s AND created_at < %s",
        (start, start + dt.timedelta(days=1)),
    ).fetchone()[0]


def days_of(months: set[dt.date], today: dt.date) -> list[dt.date]:
    """Every day of ``months`` up to ``today`` (the days whose rows exist in usage_log's partitions)."""
    out = []
    for month in sorted(months):
        start, end = month_bounds(month)
        day = start.date()
        while day < min(end.date(), today + dt.timedelta(days=1)):
            out.append(day)
            day += dt.timedelta(days=1)
    return out
