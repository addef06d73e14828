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
import time
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from perf_pipeline.lib.calendar import add_months, month_bounds, month_start
from perf_pipeline.lib.calendar import months_between as months_between  # re-exported for older importers
from perf_pipeline.lib.db import (
    AdvisoryKey,
    Locks,
    advisory_unlock,
    load_query,
    run_with_lock_retry,
    try_advisory_lock,
)

log = logging.getLogger(__name__)


#: partitioned tables this project manages, and their partition key column
PARTITIONED_TABLES: dict[str, str] = {"audit_log": "timestamp", "usage_log": "created_at"}

_PARTITION = re.compile(r"^(?P<table>[a-z_]+)_y(?P<y>\d{4})m(?P<m>\d{2})$")


class PartitionError(ValueError):
    """Bad table name or month, or a partition whose bounds are not the expected month."""


def _check_table(table: str) -> str:
    if table not in PARTITIONED_TABLES:
        raise PartitionError(
            f"unknown partitioned table {table!r}; expected one of {sorted(PARTITIONED_TABLES)}"
        )
    return table


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
    return MonthPartition(table, month).name


def month_of_partition(name: str) -> dt.date | None:
    """``audit_log_y2025m08`` → 2025-08-01 (None for names that are not monthly partitions)."""
    m = _PARTITION.match(name)
    if not m:
        return None
    return dt.date(int(m["y"]), int(m["m"]), 1)


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


def oldest_month(conn: psycopg.Connection) -> dt.date | None:
    """The oldest month audit_log or usage_log holds: attached partitions and archived months (the archive
    manifest), or None when there is none. Catalog and manifest reads only (milliseconds)."""
    months = [m for table in PARTITIONED_TABLES for m in existing_months(conn, table)]
    row = conn.execute("SELECT min(month) FROM archive_manifest").fetchone()
    if row and row[0] is not None:
        months.append(row[0])
    return min(months) if months else None


def default_name(table: str) -> str:
    """``audit_log`` → ``audit_log_default`` (the DEFAULT partition, which must stay empty)."""
    return f"{_check_table(table)}_default"


def partition_key_column(table: str) -> str:
    return PARTITIONED_TABLES[_check_table(table)]


@dataclass(frozen=True)
class MonthPartition:
    """One month of a partitioned table, named and bounded once: build it where a table and month enter
    (a CLI argument, a Dagster key) and pass it down. ``month`` may be any day of the month (it is
    normalised to the first); an unknown table raises :class:`PartitionError`. Pure value, no I/O."""

    table: str
    month: dt.date

    def __post_init__(self) -> None:
        _check_table(self.table)
        object.__setattr__(self, "month", month_start(self.month))

    @property
    def name(self) -> str:
        """The partition's table: ``audit_log_y2025m08``."""
        return f"{self.table}_y{self.month.year:04d}m{self.month.month:02d}"

    @property
    def start(self) -> dt.datetime:
        """First instant of the month (00:00Z of its first day), inclusive."""
        return month_bounds(self.month)[0]

    @property
    def end(self) -> dt.datetime:
        """First instant of the next month, exclusive."""
        return month_bounds(self.month)[1]

    @property
    def key_column(self) -> str:
        """The parent's partition key column (``timestamp`` / ``created_at``)."""
        return PARTITIONED_TABLES[self.table]

    @property
    def default(self) -> str:
        """The parent's DEFAULT partition (``audit_log_default``)."""
        return f"{self.table}_default"

    @property
    def lock(self) -> AdvisoryKey:
        """The month's advisory lock (:meth:`perf_pipeline.lib.db.Locks.month`)."""
        return Locks.month(self.table, self.month)


def _attach(conn: psycopg.Connection, part: MonthPartition) -> bool:
    """Create ``part`` standalone (if missing) and attach it for its month; False if already attached."""
    attached = conn.execute(
        """
        SELECT pg_get_expr(c.relpartbound, c.oid) FROM pg_class c
        JOIN pg_inherits i ON i.inhrelid = c.oid
        WHERE c.relname = %s AND c.relnamespace = current_schema()::regnamespace
          AND i.inhparent = %s::regclass
        """,
        (part.name, part.table),
    ).fetchone()
    if attached is not None:
        return False
    conn.execute(
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} (LIKE {} INCLUDING DEFAULTS INCLUDING CONSTRAINTS "
            "INCLUDING STORAGE INCLUDING COMMENTS)"
        ).format(sql.Identifier(part.name), sql.Identifier(part.table))
    )
    # ATTACH builds the parent's indexes on the (empty) child, so every index of the parent exists on it.
    conn.execute(
        sql.SQL("ALTER TABLE {} ATTACH PARTITION {} FOR VALUES FROM ({}) TO ({})").format(
            sql.Identifier(part.table),
            sql.Identifier(part.name),
            sql.Literal(part.start),
            sql.Literal(part.end),
        )
    )
    return True


def attach_partition(conn: psycopg.Connection, part: MonthPartition) -> bool:
    """Create (if missing) and attach the partition ``part`` in the caller's transaction.

    For callers that must commit the attach together with their own bookkeeping (archive restore); set a
    ``lock_timeout`` first (:func:`run_with_lock_retry`). False if it was already attached.
    """
    return _attach(conn, part)


def ensure_partition(
    conn: psycopg.Connection, table: str, month: dt.date, *, lock_timeout_ms: int = 200, attempts: int = 50
) -> bool:
    """Create and attach ``table``'s partition for ``month`` if missing. True if it was created.

    Idempotent. Locks: SHARE UPDATE EXCLUSIVE on the parent, ACCESS EXCLUSIVE on the new table and on
    the DEFAULT partition while it is scanned (it should be empty), each bounded by ``lock_timeout_ms``.
    Raises ``psycopg.errors.CheckViolation`` if DEFAULT already holds rows of that month (move them first:
    ``move_default_rows``), and :class:`PartitionError` for a month that is archived or being archived
    (archive_manifest state other than ``restored``): its detached table must not be attached back, nor a
    fresh one created that would shadow the archive (restore the month instead).
    """
    part = MonthPartition(table, month)
    month, name = part.month, part.name
    state = archive_states(conn, table).get(month)
    if state is not None and name not in {p.name for p in list_partitions(conn, table)}:
        raise PartitionError(
            f"{name}: not created/attached, the month is {_archive_reason(state)} "
            f"(perf-pipeline archive restore {month:%Y-%m} --table {table} brings it back)"
        )
    created = run_with_lock_retry(
        conn,
        lambda c: _attach(c, part),
        lock_timeout_ms=lock_timeout_ms,
        attempts=attempts,
        what=f"create {name}",
    )
    if created:
        log.info("created partition %s", name)
    return created


def ensure_partitions(
    conn: psycopg.Connection, table: str, months: list[dt.date], **kwargs: int
) -> list[str]:
    """:func:`ensure_partition` for each month; returns the names created.

    Months that are archived or being archived (see :func:`ensure_partition`) are skipped with a log line.
    """
    have = existing_months(conn, table)
    archived = archive_states(conn, table)
    created = []
    for month in sorted({month_start(m) for m in months}):
        if month not in have and month in archived:
            log.warning(
                "%s: not created, the month is %s",
                partition_name(table, month),
                _archive_reason(archived[month]),
            )
            continue
        if month not in have and ensure_partition(conn, table, month, **kwargs):
            created.append(partition_name(table, month))
    return created


# ----------------------------------------------------------------------------------- create ahead


def months_ahead(today: dt.date, premake: int) -> list[dt.date]:
    """The current month and the ``premake`` months after it."""
    current = month_start(today)
    return [add_months(current, n) for n in range(premake + 1)]


def create_partitions_ahead(
    conn: psycopg.Connection, table: str, today: dt.date, premake: int, **kwargs: int
) -> list[str]:
    """Keep ``table``'s current month and ``premake`` future months created; returns the names created.

    Idempotent (a second call creates nothing). Cost: one catalog read, plus per missing month one
    CREATE TABLE and one ATTACH (milliseconds; locks as in :func:`ensure_partition`).
    """
    return ensure_partitions(conn, table, months_ahead(today, premake), **kwargs)


# ---------------------------------------------------------------------------------- default guard


@dataclass(frozen=True)
class DefaultSummary:
    rows: int
    months: dict[dt.date, int]  # month → rows of that month sitting in DEFAULT


def default_partition_summary(conn: psycopg.Connection, table: str) -> DefaultSummary:
    """Rows in ``table``'s DEFAULT partition, by UTC month. Cost: a scan of DEFAULT (kept empty, so tiny)."""
    query = sql.SQL(load_query("partition_default_rows_by_month")).format(
        default=sql.Identifier(default_name(table)), key=sql.Identifier(partition_key_column(table))
    )
    months = {month: count for month, count in conn.execute(query).fetchall()}
    return DefaultSummary(sum(months.values()), months)


def prepare_partition_table(
    conn: psycopg.Connection, part: MonthPartition, *, relation: str | None = None
) -> str:
    """Create the partition ``part`` as a standalone table (if missing), ready to load and attach.

    It gets every index of the parent and a CHECK constraint ``<partition>_bound`` equal to the month's
    bounds, so a later ATTACH does not have to scan it under lock (drop it after the attach:
    :func:`drop_bound_constraint`). ``relation``: another name for the table (a move's working copy,
    renamed at the switch). Locks only the new table. Caller's transaction. Returns the table's name.
    """
    relation = relation or part.name
    key = part.key_column
    conn.execute(
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} (LIKE {} INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING STORAGE "
            "INCLUDING COMMENTS INCLUDING INDEXES)"
        ).format(sql.Identifier(relation), sql.Identifier(part.table))
    )
    has_bound = conn.execute(
        "SELECT 1 FROM pg_constraint WHERE conrelid = %s::regclass AND conname = %s",
        (sql.Identifier(relation).as_string(conn), f"{part.name}_bound"),
    ).fetchone()
    if not has_bound:
        conn.execute(
            sql.SQL(
                "ALTER TABLE {} ADD CONSTRAINT {} CHECK ({} IS NOT NULL AND {} >= {} AND {} < {})"
            ).format(
                sql.Identifier(relation),
                sql.Identifier(f"{part.name}_bound"),
                sql.Identifier(key),
                sql.Identifier(key),
                sql.Literal(part.start),
                sql.Identifier(key),
                sql.Literal(part.end),
            )
        )
    return relation


def drop_bound_constraint(conn: psycopg.Connection, part: MonthPartition) -> None:
    """Drop the ``<partition>_bound`` CHECK of :func:`prepare_partition_table` once the table is attached:
    its partition bound says the same, and its siblings have no such constraint. Catalog only (ACCESS
    EXCLUSIVE on the partition, which the caller's attach already holds). Caller's transaction."""
    conn.execute(
        sql.SQL("ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}").format(
            sql.Identifier(part.name), sql.Identifier(f"{part.name}_bound")
        )
    )


def archive_states(conn: psycopg.Connection, table: str) -> dict[dt.date, str]:
    """Months of ``table`` with an archive in any state but ``restored`` (archive_manifest, migration 0010):
    ``detached`` / ``exported`` / ``verified`` (archive in progress or interrupted: the detached table is
    about to be dropped) or ``dropped``. One small manifest read."""
    return dict(
        conn.execute(
            "SELECT month, state FROM archive_manifest WHERE table_name = %s AND state <> 'restored'",
            (table,),
        ).fetchall()
    )


def _archive_reason(state: str) -> str:
    return "archived" if state == "dropped" else f"archive stopped at {state}"


def _lock_month(conn: psycopg.Connection, part: MonthPartition, wait_ms: int) -> bool:
    """The month's advisory lock (exclusive, session level), waiting up to ``wait_ms`` for a rollup (which
    holds it shared for seconds) or an archive/restore (minutes: then False)."""
    return try_advisory_lock(conn, part.lock, wait_s=max(1, wait_ms) / 1000)


def _standalone_tables(conn: psycopg.Connection, table: str, pattern: str) -> list[str]:
    """Standalone tables of this schema whose name matches ``pattern`` (LIKE) and that carry a
    ``*_bound`` CHECK of :func:`prepare_partition_table`. Catalog read only."""
    return [
        r[0]
        for r in conn.execute(
            """
            SELECT c.relname FROM pg_class c
            WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind = 'r' AND NOT c.relispartition
              AND c.relname LIKE %s
              AND EXISTS (SELECT 1 FROM pg_constraint k
                          WHERE k.conrelid = c.oid AND k.contype = 'c' AND k.conname LIKE '%%\\_bound')
            ORDER BY c.relname
            """,
            (pattern,),
        ).fetchall()
    ]


def unattached_partitions(conn: psycopg.Connection, table: str) -> list[str]:
    """Standalone ``{table}_yYYYYmMM`` tables left by an interrupted ``move_default_rows`` of an earlier
    version, which moved rows out of DEFAULT batch by batch and attached last: their rows are invisible to
    queries. Months with an archive in progress or done are the archive's, not listed. The next
    :func:`move_default_rows` puts their rows back into DEFAULT first. Catalog read only."""
    archived = archive_states(conn, table)
    like = _check_table(table).replace("_", "\\_") + "\\_y%"
    out = []
    for name in _standalone_tables(conn, table, like):
        match = _PARTITION.match(name)
        month = month_of_partition(name)
        if match and match["table"] == table and month is not None and month not in archived:
            out.append(name)
    return out


def move_copies(conn: psycopg.Connection, table: str) -> list[str]:
    """Working copies ``{table}_yYYYYmMM_moving`` of a move in progress or interrupted: duplicates of rows
    that are still in DEFAULT (visible there), reused and finished by the next run. Catalog read only."""
    like = _check_table(table).replace("_", "\\_") + "\\_y%\\_moving"
    return _standalone_tables(conn, table, like)


def _primary_key(conn: psycopg.Connection, table: str) -> list[str]:
    return [
        r[0]
        for r in conn.execute(
            """
            SELECT a.attname FROM pg_index i
            JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
            WHERE i.indrelid = %s::regclass AND i.indisprimary
            ORDER BY array_position(i.indkey, a.attnum)
            """,
            (table,),
        ).fetchall()
    ]


@dataclass
class MoveResult:
    rows_moved: int = 0
    batches: int = 0  # pre-copy batches
    months: list[dt.date] = field(default_factory=list)
    partitions_created: list[str] = field(default_factory=list)
    #: longest switch transaction: writers of the table wait this long at most (plus a lock wait)
    switch_ms: float = 0.0
    #: longest part of it with the table locked exclusively: readers of the table wait this long at most
    exclusive_ms: float = 0.0
    #: rows an interrupted older move had parked in a standalone table, put back into DEFAULT first
    rows_returned: int = 0


def move_default_rows(
    conn: psycopg.Connection,
    table: str,
    *,
    batch_size: int = 10_000,
    lock_timeout_ms: int = 200,
    attempts: int = 50,
    month_lock_wait_ms: int = 10_000,
) -> MoveResult:
    """Move every row of ``table``'s DEFAULT partition into its month's partition, creating it.

    ``conn`` must be in autocommit mode. Rows stay visible, exactly once, the whole time, and writers
    never fail. Per month:

    1. **Pre-copy** (no lock on the table): the rows of the month are *copied* from DEFAULT into a
       working copy ``{partition}_moving`` (the parent's indexes, a bound CHECK), about ``batch_size``
       rows per committed batch (:file:`sql/queries/partition_move_precopy.sql`). They stay in DEFAULT, so
       queries see each row once, and a run that stops here leaves the table as it was: the copy is
       reused by the next run.
    2. **Switch**, one short transaction, its locks taken with ``lock_timeout_ms`` and retried
       (``attempts``). First ``LOCK TABLE ONLY {table} IN SHARE ROW EXCLUSIVE MODE``: writers of the table
       queue (rather than route a row into DEFAULT with the old partition set, which fails their INSERT
       with a partition-constraint error after the attach), readers go on, the copy is made exactly
       DEFAULT's rows of the month (rows changed since the pre-copy) and they are deleted from DEFAULT
       (the late-data triggers mark their days; readers still see them until the commit). Then ACCESS
       EXCLUSIVE on the parent and on DEFAULT, for catalog work only: the copy is renamed to the
       partition and attached (its bound CHECK spares the scan of it) and the bound CHECK dropped. A query sees the month in DEFAULT before the commit and in its partition
       after it, never neither (a reader planning while only DEFAULT was locked would run on the new
       snapshot with the old partition set: an empty month). Writers wait for the whole switch
       (``switch_ms``), readers for its exclusive part (``exclusive_ms``); both grow with the month's rows
       in DEFAULT (measured by ``python -m bench partitions``).
    3. If the locks cannot be had within the attempts (a long transaction reading DEFAULT), nothing
       changed: :class:`PartitionError` says so; run it again.

    Locks: the month's archive advisory lock (waited for up to ``month_lock_wait_ms``: a rollup reading
    the month holds it shared for seconds; a month being archived or restored is skipped), then as
    above. A standalone ``{partition}`` table left by an older, interrupted version of this function
    (rows moved out of DEFAULT, never attached) has its rows put back into DEFAULT first, in one
    transaction. Cost: one pass over DEFAULT per month for the pre-copy (block ranges), then in the
    switch one pass over the copy and two over the month's DEFAULT rows, with primary-key probes.

    Months with an archive manifest row in any state but ``restored`` are not touched: an interrupted
    archive's detached table (state detached/exported/verified) must not get rows nor be attached back,
    since the resumed archive drops it; a dropped month would be shadowed by a fresh partition. Their rows
    stay in DEFAULT and :class:`PartitionError` says which months and what to do (restore moves them in).
    """
    result = MoveResult()
    for name in unattached_partitions(conn, table):
        month = month_of_partition(name)
        assert month is not None
        part = MonthPartition(table, month)
        if not _lock_month(conn, part, month_lock_wait_ms):
            continue  # an archive or restore of that month is running: the next run returns them
        try:
            result.rows_returned += _return_parked_rows(conn, table, name)
        finally:
            advisory_unlock(conn, part.lock)
    skipped: dict[dt.date, str] = {}  # month → why its rows stay in DEFAULT
    summary = default_partition_summary(conn, table)
    archived = archive_states(conn, table)
    for month in sorted(summary.months):
        if month in archived:
            skipped[month] = _archive_reason(archived[month])
            continue
        part = MonthPartition(table, month)
        if not _lock_month(conn, part, month_lock_wait_ms):
            skipped[month] = "being archived or restored right now"
            continue
        try:
            # re-read under the lock: an archive may have started since the summary
            state = archive_states(conn, table).get(month)
            if state is not None:
                skipped[month] = _archive_reason(state)
                continue
            _move_month(conn, part, batch_size, lock_timeout_ms, attempts, result)
        finally:
            advisory_unlock(conn, part.lock)
    if skipped:
        months = ", ".join(f"{m:%Y-%m} ({why})" for m, why in sorted(skipped.items()))
        raise PartitionError(
            f"{table}: DEFAULT holds rows of month(s) left there: {months}. A partition for them would be "
            f"dropped by the archive or shadow it: finish an interrupted archive (perf-pipeline archive run "
            f"YYYY-MM --table {table}), then restore the month (perf-pipeline archive restore YYYY-MM --table "
            f"{table}), which moves these rows in"
        )
    return result


def _return_parked_rows(conn: psycopg.Connection, table: str, name: str) -> int:
    """Put the rows of an older move's unattached ``name`` back into DEFAULT (visible again) and drop it, in
    one transaction (re-checked under the table's lock)."""
    with conn.transaction():
        conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(sql.Identifier(name)))
        if name not in unattached_partitions(conn, table):
            return 0
        rows = conn.execute(
            sql.SQL("WITH moved AS (DELETE FROM {} RETURNING *) INSERT INTO {} SELECT * FROM moved").format(
                sql.Identifier(name), sql.Identifier(default_name(table))
            )
        ).rowcount
        conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(name)))
    log.warning("%s: put %d row(s) an interrupted move had left unattached back into DEFAULT", name, rows)
    return rows


def _move_month(
    conn: psycopg.Connection,
    part: MonthPartition,
    batch_size: int,
    lock_timeout_ms: int,
    attempts: int,
    result: MoveResult,
) -> None:
    """Pre-copy the month's DEFAULT rows into its working copy, then switch (see :func:`move_default_rows`)."""
    table, month, name = part.table, part.month, part.name
    copy = f"{name}_moving"
    start, end = part.start, part.end
    default = part.default
    idents = {
        "default": sql.Identifier(default),
        "scratch": sql.Identifier(copy),
        "key": sql.Identifier(part.key_column),
    }
    with conn.transaction():
        prepare_partition_table(conn, part, relation=copy)
    blocks, rows = conn.execute(
        "SELECT greatest(pg_relation_size(%s::regclass) / current_setting('block_size')::int, 1), "
        "greatest(reltuples::bigint, 1) FROM pg_class WHERE oid = %s::regclass",
        (default, default),
    ).fetchone()
    step = max(1, int(blocks * batch_size / rows))
    precopy = sql.SQL(load_query("partition_move_precopy")).format(**idents)
    for first in range(0, blocks, step):
        with conn.transaction():
            conn.execute(
                precopy, {"first_block": first, "end_block": first + step, "start": start, "end": end}
            )
        result.batches += 1
    pk = _primary_key(conn, table)
    sync = {
        **idents,
        "pk_d": sql.SQL(", ").join(sql.Identifier("d", c) for c in pk),
        "pk_s": sql.SQL(", ").join(sql.Identifier("s", c) for c in pk),
    }
    stale = sql.SQL(load_query("partition_move_sync_stale")).format(**sync)
    missing = sql.SQL(load_query("partition_move_sync_missing")).format(**sync)

    def switch(c: psycopg.Connection) -> int:
        t0 = time.perf_counter()
        # phase 1, writers of the table wait, readers go on: the copy becomes exactly DEFAULT's rows, which
        # are deleted from DEFAULT (uncommitted: every reader still sees them there)
        c.execute(sql.SQL("LOCK TABLE ONLY {} IN SHARE ROW EXCLUSIVE MODE").format(sql.Identifier(table)))
        c.execute(stale)
        c.execute(missing, {"start": start, "end": end})
        moved = c.execute(
            sql.SQL("DELETE FROM ONLY {default} WHERE {key} >= %s AND {key} < %s").format(**idents),
            (start, end),
        ).rowcount
        copied = c.execute(sql.SQL("SELECT count(*) FROM {}").format(idents["scratch"])).fetchone()[0]
        if copied != moved:  # cannot happen with writers locked out; never attach a copy that is not exact
            raise PartitionError(
                f"{name}: the copy holds {copied} rows, DEFAULT held {moved}; nothing changed"
            )
        # phase 2, readers wait too, for catalog work only: a query that planned with the old partition set
        # and ran on a snapshot taken after this commit would find the month empty (seen: a count of 0);
        # holding the parent exclusively makes every query plan after the commit. Queries in flight finish
        # first (the lock_timeout bounds that wait)
        t1 = time.perf_counter()
        c.execute(sql.SQL("LOCK TABLE ONLY {} IN ACCESS EXCLUSIVE MODE").format(sql.Identifier(table)))
        c.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(idents["default"]))
        _rename_with_indexes(c, copy, name)
        c.execute(
            sql.SQL("ALTER TABLE {} ATTACH PARTITION {} FOR VALUES FROM ({}) TO ({})").format(
                sql.Identifier(table), sql.Identifier(name), sql.Literal(start), sql.Literal(end)
            )
        )
        drop_bound_constraint(c, part)
        done = time.perf_counter()
        result.switch_ms = max(result.switch_ms, (done - t0) * 1000)
        result.exclusive_ms = max(result.exclusive_ms, (done - t1) * 1000)
        return moved

    try:
        moved = run_with_lock_retry(
            conn, switch, lock_timeout_ms=lock_timeout_ms, attempts=attempts, what=f"switch {name}"
        )
    except psycopg.errors.LockNotAvailable as exc:
        raise PartitionError(
            f"{table}: could not switch {name} in (its locks were not free in {attempts} attempts of "
            f"{lock_timeout_ms} ms: a long transaction holds {default} or {table}); nothing changed, the rows "
            f"are still in {default}, visible. Run move_default_rows again"
        ) from exc
    result.rows_moved += moved
    result.months.append(month)
    result.partitions_created.append(name)
    log.info("%s: moved %d row(s) from %s, switch %.0f ms", name, moved, default, result.switch_ms)


def _rename_with_indexes(conn: psycopg.Connection, old: str, new: str) -> None:
    """Rename table ``old`` to ``new`` and its indexes' ``old`` prefix to ``new`` (catalog only)."""
    conn.execute(sql.SQL("ALTER TABLE {} RENAME TO {}").format(sql.Identifier(old), sql.Identifier(new)))
    for (index,) in conn.execute(
        "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = %s::regclass",
        (sql.Identifier(new).as_string(conn),),
    ).fetchall():
        if index.startswith(old):
            conn.execute(
                sql.SQL("ALTER INDEX {} RENAME TO {}").format(
                    sql.Identifier(index), sql.Identifier(new + index[len(old) :])
                )
            )
