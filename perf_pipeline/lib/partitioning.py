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
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from perf_pipeline.lib.db import load_query, run_with_lock_retry

log = logging.getLogger(__name__)

UTC = dt.UTC

#: partitioned tables this project manages, and their partition key column
PARTITIONED_TABLES: dict[str, str] = {"audit_log": "timestamp", "usage_log": "created_at"}

#: first month of the Dagster monthly partitions (older months can still exist in the database)
FIRST_MONTH = dt.date(2024, 1, 1)

_PARTITION = re.compile(r"^(?P<table>[a-z_]+)_y(?P<y>\d{4})m(?P<m>\d{2})$")


class PartitionError(ValueError):
    """Bad table name or month, or a partition whose bounds are not the expected month."""


def _check_table(table: str) -> str:
    if table not in PARTITIONED_TABLES:
        raise PartitionError(
            f"unknown partitioned table {table!r}; expected one of {sorted(PARTITIONED_TABLES)}"
        )
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
    return (
        dt.datetime(start.year, start.month, 1, tzinfo=UTC),
        dt.datetime(end.year, end.month, 1, tzinfo=UTC),
    )


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


def default_name(table: str) -> str:
    """``audit_log`` → ``audit_log_default`` (the DEFAULT partition, which must stay empty)."""
    return f"{_check_table(table)}_default"


def partition_key_column(table: str) -> str:
    return PARTITIONED_TABLES[_check_table(table)]


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
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} (LIKE {} INCLUDING DEFAULTS INCLUDING CONSTRAINTS "
            "INCLUDING STORAGE INCLUDING COMMENTS)"
        ).format(sql.Identifier(name), sql.Identifier(table))
    )
    # ATTACH builds the parent's indexes on the (empty) child, so every index of the parent exists on it.
    conn.execute(
        sql.SQL("ALTER TABLE {} ATTACH PARTITION {} FOR VALUES FROM ({}) TO ({})").format(
            sql.Identifier(table), sql.Identifier(name), sql.Literal(start), sql.Literal(end)
        )
    )
    return True


def attach_partition(conn: psycopg.Connection, table: str, month: dt.date) -> bool:
    """Create (if missing) and attach ``table``'s partition for ``month`` in the caller's transaction.

    For callers that must commit the attach together with their own bookkeeping (archive restore); set a
    ``lock_timeout`` first (:func:`run_with_lock_retry`). False if it was already attached.
    """
    month = month_start(month)
    return _attach(conn, table, partition_name(table, month), month)


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
    month = month_start(month)
    name = partition_name(table, month)
    state = archive_states(conn, table).get(month)
    if state is not None and name not in {p.name for p in list_partitions(conn, table)}:
        raise PartitionError(
            f"{name}: not created/attached, the month is {_archive_reason(state)} "
            f"(perf-pipeline archive restore {month:%Y-%m} --table {table} brings it back)"
        )
    created = run_with_lock_retry(
        conn,
        lambda c: _attach(c, table, name, month),
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


def prepare_partition_table(conn: psycopg.Connection, table: str, month: dt.date) -> str:
    """Create ``month``'s partition as a standalone table (if missing), ready to load and attach.

    It gets every index of the parent and a CHECK constraint equal to the month's bounds, so a later
    ATTACH does not have to scan it under lock. Locks only the new table. Caller's transaction.
    """
    name = partition_name(table, month)
    key = partition_key_column(table)
    start, end = month_bounds(month)
    conn.execute(
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} (LIKE {} INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING STORAGE "
            "INCLUDING COMMENTS INCLUDING INDEXES)"
        ).format(sql.Identifier(name), sql.Identifier(table))
    )
    has_bound = conn.execute(
        "SELECT 1 FROM pg_constraint WHERE conrelid = %s::regclass AND conname = %s", (name, f"{name}_bound")
    ).fetchone()
    if not has_bound:
        conn.execute(
            sql.SQL(
                "ALTER TABLE {} ADD CONSTRAINT {} CHECK ({} IS NOT NULL AND {} >= {} AND {} < {})"
            ).format(
                sql.Identifier(name),
                sql.Identifier(f"{name}_bound"),
                sql.Identifier(key),
                sql.Identifier(key),
                sql.Literal(start),
                sql.Identifier(key),
                sql.Literal(end),
            )
        )
    return name


def archive_lock_key(table: str, month: dt.date) -> sql.Composed:
    """The per-month advisory lock key of the archive (:mod:`perf_pipeline.lib.archive` takes it for a whole
    archive or restore); :func:`move_default_rows` takes the same one, so neither sees the other half-done."""
    return sql.SQL("hashtextextended({}, 0)").format(
        sql.Literal(f"perf_pipeline.archive:{table}:{month_start(month)}")
    )


def archive_states(conn: psycopg.Connection, table: str) -> dict[dt.date, str]:
    """Months of ``table`` with an archive in any state but ``restored`` (archive_manifest, migration 0010):
    ``detached`` / ``exported`` / ``verified`` (archive in progress or interrupted: the detached table is
    about to be dropped) or ``dropped``. One small catalog + manifest read."""
    if conn.execute("SELECT to_regclass('archive_manifest') IS NULL").fetchone()[0]:
        return {}
    return dict(
        conn.execute(
            "SELECT month, state FROM archive_manifest WHERE table_name = %s AND state <> 'restored'",
            (table,),
        ).fetchall()
    )


def _archive_reason(state: str) -> str:
    return "archived" if state == "dropped" else f"archive stopped at {state}"


def _try_month_lock(conn: psycopg.Connection, table: str, month: dt.date) -> bool:
    """Session advisory lock of the month's archive, without waiting (an archive holds it for minutes)."""
    return bool(
        conn.execute(
            sql.SQL("SELECT pg_try_advisory_lock({})").format(archive_lock_key(table, month))
        ).fetchone()[0]
    )


def _unlock_month(conn: psycopg.Connection, table: str, month: dt.date) -> None:
    conn.execute(sql.SQL("SELECT pg_advisory_unlock({})").format(archive_lock_key(table, month)))


def unattached_partitions(conn: psycopg.Connection, table: str) -> list[str]:
    """Standalone ``{table}_yYYYYmMM`` tables left by an interrupted :func:`move_default_rows`: they carry the
    bound CHECK of :func:`prepare_partition_table`, are attached to nothing, and their month has no archive
    in progress or done (a detached table being archived, or a half-restored one, is the archive's).

    Their rows are invisible to queries on ``table`` while DEFAULT may already be empty. Catalog read only.
    """
    archived = archive_states(conn, table)
    rows = conn.execute(
        """
        SELECT c.relname FROM pg_class c
        JOIN pg_constraint k ON k.conrelid = c.oid AND k.contype = 'c' AND k.conname = c.relname || '_bound'
        WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind = 'r' AND NOT c.relispartition
          AND c.relname LIKE %s
        ORDER BY c.relname
        """,
        (_check_table(table).replace("_", "\\_") + "\\_y%",),
    ).fetchall()
    out = []
    for (name,) in rows:
        match = _PARTITION.match(name)
        month = month_of_partition(name)
        if match and match["table"] == table and month is not None and month not in archived:
            out.append(name)
    return out


def _attach_interrupted_moves(
    conn: psycopg.Connection,
    table: str,
    result: MoveResult,
    lock_timeout_ms: int,
    attempts: int,
    *,
    final: bool,
) -> None:
    """Attach every :func:`unattached_partitions` table (an earlier run moved rows into it, then its attach
    failed or the process died). Under the month's advisory lock, re-checked there. If DEFAULT holds rows of
    the month, ATTACH fails its check: the caller's move loop takes the month (it reuses the table). With
    ``final`` (the end of a run) a table that still cannot be attached raises :class:`PartitionError`.
    """
    for name in unattached_partitions(conn, table):
        month = month_of_partition(name)
        assert month is not None
        if not _try_month_lock(conn, table, month):
            log.info("%s: its month is locked by another run; leaving it to that run", name)
            continue
        try:
            if name not in unattached_partitions(conn, table):
                continue
            try:
                if ensure_partition(conn, table, month, lock_timeout_ms=lock_timeout_ms, attempts=attempts):
                    log.warning(
                        "%s: attached (moved rows were left in it unattached by an earlier run)", name
                    )
                    result.partitions_created.append(name)
            except (psycopg.errors.CheckViolation, psycopg.errors.LockNotAvailable) as exc:
                if final:
                    raise PartitionError(
                        f"{table}: {name} holds moved rows but is not attached ({type(exc).__name__}: "
                        f"{str(exc).strip()}); its rows are invisible to queries until move_default_rows is "
                        f"run again"
                    ) from exc
                log.warning("%s: attach failed (%s); the move below retries", name, type(exc).__name__)
        finally:
            _unlock_month(conn, table, month)


@dataclass
class MoveResult:
    rows_moved: int = 0
    batches: int = 0
    months: list[dt.date] = field(default_factory=list)
    partitions_created: list[str] = field(default_factory=list)


def move_default_rows(
    conn: psycopg.Connection,
    table: str,
    *,
    batch_size: int = 10_000,
    lock_timeout_ms: int = 200,
    attempts: int = 50,
    max_rounds: int = 20,
) -> MoveResult:
    """Move every row of ``table``'s DEFAULT partition into its month's partition, creating it.

    ``conn`` must be in autocommit mode. Per month: the partition is prepared as a standalone table
    (:func:`prepare_partition_table`), rows move in batches of ``batch_size`` (each batch is one
    ``DELETE … RETURNING`` feeding an ``INSERT`` in one transaction: a row is in exactly one place at
    every commit, so a crash loses or duplicates nothing and a re-run continues), then the table is
    attached. Rows a writer adds to DEFAULT meanwhile make ATTACH fail its check; they are moved and
    the attach retried (``max_rounds``). A table whose attach failed (lock timeouts) or was never reached
    (the process died) is attached at the start of the next run and retried before returning
    (:func:`unattached_partitions`); if it still cannot be attached, :class:`PartitionError` names it. Locks: the month's archive advisory lock (not waited for: a month
    being archived is skipped), ROW EXCLUSIVE on DEFAULT per batch; the attach as in :func:`ensure_partition`.
    Cost: one index-less scan of DEFAULT per batch (DEFAULT is small).

    Months with an archive manifest row in any state but ``restored`` are not touched: an interrupted
    archive's detached table (state detached/exported/verified) must not get rows nor be attached back,
    since the resumed archive drops it; a dropped month would be shadowed by a fresh partition. Their rows
    stay in DEFAULT and :class:`PartitionError` says which months and what to do (restore moves them in).
    """
    result = MoveResult()
    default = sql.Identifier(default_name(table))
    key = sql.Identifier(partition_key_column(table))
    move = sql.SQL(load_query("partition_move_default_batch"))
    skipped: dict[dt.date, str] = {}  # month → why its rows stay in DEFAULT
    # rows an interrupted run moved into a table it did not attach: DEFAULT may be empty already
    _attach_interrupted_moves(conn, table, result, lock_timeout_ms, attempts, final=False)
    for _ in range(max_rounds):
        summary = default_partition_summary(conn, table)
        for month, state in archive_states(conn, table).items():
            if month in summary.months:
                skipped[month] = _archive_reason(state)
        todo = sorted(set(summary.months) - set(skipped))
        if not todo:
            # a month whose attach failed below (lock timeouts) gets its retries here, before returning
            _attach_interrupted_moves(conn, table, result, lock_timeout_ms, attempts, final=True)
            if skipped:
                months = ", ".join(f"{m:%Y-%m} ({why})" for m, why in sorted(skipped.items()))
                raise PartitionError(
                    f"{table}: DEFAULT holds rows of month(s) left there: {months}. A partition for them "
                    f"would be dropped by the archive or shadow it: finish an interrupted archive (perf-pipeline "
                    f"archive run YYYY-MM --table {table}), then restore the month (perf-pipeline archive "
                    f"restore YYYY-MM --table {table}), which moves these rows in"
                )
            return result
        for month in todo:
            if not _try_month_lock(conn, table, month):
                skipped[month] = "being archived or restored right now"
                continue
            try:
                # re-read under the lock: an archive may have started since the summary
                state = archive_states(conn, table).get(month)
                if state is not None:
                    skipped[month] = _archive_reason(state)
                    continue
                _move_month(conn, table, month, move, default, key, batch_size, result)
                try:
                    if ensure_partition(
                        conn, table, month, lock_timeout_ms=lock_timeout_ms, attempts=attempts
                    ):
                        result.partitions_created.append(partition_name(table, month))
                except psycopg.errors.CheckViolation:
                    log.info(
                        "%s: new rows of %s arrived in DEFAULT during the move; moving them too", table, month
                    )
                except psycopg.errors.LockNotAvailable:
                    # the rows are in the standalone table now: retried before returning, and by the next run
                    log.warning("%s: could not attach %s yet (lock timeouts); retrying later", table, month)
            finally:
                _unlock_month(conn, table, month)
    raise PartitionError(
        f"{table}: DEFAULT kept receiving rows after {max_rounds} rounds of move_default_rows"
    )


def _move_month(
    conn: psycopg.Connection,
    table: str,
    month: dt.date,
    move: sql.SQL,
    default: sql.Identifier,
    key: sql.Identifier,
    batch_size: int,
    result: MoveResult,
) -> None:
    """Prepare ``month``'s standalone table and move its DEFAULT rows into it, one transaction per batch."""
    start, end = month_bounds(month)
    name = partition_name(table, month)
    with conn.transaction():
        prepare_partition_table(conn, table, month)
    while True:
        with conn.transaction():
            moved = conn.execute(
                move.format(default=default, target=sql.Identifier(name), key=key),
                {"start": start, "end": end, "batch": batch_size},
            ).fetchone()[0]
        if not moved:
            break
        result.rows_moved += moved
        result.batches += 1
    if month not in result.months:
        result.months.append(month)
