"""Archive old monthly partitions to verified Parquet files, restore them, and decide usage retention.

One month moves through four steps, each recorded in ``archive_manifest`` in the same transaction as
the step itself (or, for the file, right after its atomic rename), so a crash or kill at any point is
finished by calling :func:`archive_partition` again for the same month:

1. **detach** the partition from its parent. ``DETACH PARTITION … CONCURRENTLY`` is refused while the
   parent has a DEFAULT partition (ours always do: the default guard needs one), so the detach is the
   plain one: a catalog-only change (no scan) that holds ACCESS EXCLUSIVE on the parent for a few
   milliseconds, taken with a short ``lock_timeout`` (100 ms) and retried, so a writer queued behind it
   waits at most about ``lock_timeout``. Without a DEFAULT partition the CONCURRENTLY form is used.
2. **export**: ``COPY (SELECT …) TO STDOUT (FORMAT csv)`` in physical order (no sort: the detached table
   no longer changes and ``synchronize_seqscans`` is off, so restore → re-archive gives the same file), cut into ~16 MiB
   record-aligned batches, parsed by pyarrow (:mod:`perf_pipeline.lib.pgcsv`, shared with the exports)
   and appended to a zstd Parquet file (one row group per batch) written atomically to the archive
   location (:mod:`perf_pipeline.lib.storage`: a folder, or an S3 bucket prefix, where the object appears
   under its final key only complete), hashed on the way: memory stays bounded by the batch size.
   The manifest records its URI, size, sha256 and the store's ETag (and VersionId).
3. **verify**: the object is read back from the store (size, sha256, Parquet schema, row count, min/max
   timestamp) and compared with the manifest and with the detached table.
4. **drop** the table (standalone by now, so no lock on the parent), only if it is still standalone and
   holds exactly the exported row count (checked under its ACCESS EXCLUSIVE lock, taken with a
   ``lock_timeout``). Export, verify and drop also refuse a table that was attached again meanwhile.
   The drop relies on a file only if the same run read it back and matched it (size, sha256, rows,
   min/max) against the manifest and the table: a run that resumes at ``verified`` verifies again
   first, and a file found missing or damaged sends the month back to export, never to the drop.

A month whose manifest says ``dropped`` is never archived twice; ``restored`` starts over.
Concurrent runs of the same month are serialized by an advisory lock.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from psycopg import sql

from perf_pipeline.lib import pgcsv
from perf_pipeline.lib.calendar import past_retention
from perf_pipeline.lib.db import (
    Locks,
    advisory_unlock,
    load_query,
    lock_timeout,
    retry,
    run_with_lock_retry,
    try_advisory_lock,
)
from perf_pipeline.lib.memory import release_free_memory
from perf_pipeline.lib.partitioning import (
    MonthPartition,
    add_months,  # noqa: F401 (re-exported)
    attach_partition,
    default_name,
    drop_bound_constraint,
    month_bounds,
    month_start,
    partition_key_column,
    partition_name,
    prepare_partition_table,
)
from perf_pipeline.lib.rollups import LOOKBACK_DAYS
from perf_pipeline.lib.storage import ObjectInfo, StorageError, Store, describe_error, locate, open_store

log = logging.getLogger(__name__)

STEPS = ("detach", "export", "verify", "drop")
#: called after each completed step with its name; tests raise from it to simulate a crash
StepHook = Callable[[str], None]
BATCH_BYTES = 16 << 20
DROP_LOCK_TIMEOUT_MS = 5000
DETACH_LOCK_TIMEOUT_MS = 100
#: exports per archive call whose verification may fail before it gives up (the month stays detached)
VERIFY_ATTEMPTS = 3
#: the setting archives are written under (named in storage errors)
SETTING = "PERF_PIPELINE_ARCHIVE_DIR"
#: the files check reads an object in full when it is new or changed (size, ETag), or was last read in full
#: longer ago than this; otherwise size + ETag suffice (a HEAD). The weekly schedule therefore re-hashes
#: every archive about once a week, and the checks of the monthly archive runs read only what changed.
REHASH_AFTER = dt.timedelta(days=6)

ArchiveLocation = Store | str | os.PathLike[str]


class ArchiveError(RuntimeError):
    """A file does not match its manifest or table, or a month is in a state that forbids the request."""


@dataclass
class ArchiveResult:
    table: str
    month: dt.date
    state: str  # final state: dropped, or absent (no such partition, nothing to do)
    rows: int = 0
    bytes: int = 0
    sha256: str | None = None
    file_path: str | None = None
    etag: str | None = None
    steps_run: list[str] = field(default_factory=list)
    step_ms: dict[str, float] = field(default_factory=dict)
    detach_mode: str | None = None  # plain / concurrently / finalize / none (found already detached)

    @property
    def duration_ms(self) -> float:
        return sum(self.step_ms.values())


@dataclass(frozen=True)
class ManifestRow:
    table_name: str
    month: dt.date
    partition_name: str
    state: str
    file_path: str | None
    rows: int | None
    bytes: int | None
    sha256: str | None
    min_ts: dt.datetime | None
    max_ts: dt.datetime | None
    archive_count: int
    etag: str | None = None
    version_id: str | None = None
    verified_at: dt.datetime | None = None


_MANIFEST_COLUMNS = (
    "table_name, month, partition_name, state, file_path, rows, bytes, sha256, min_ts, max_ts, archive_count, "
    "etag, version_id, verified_at"
)


# ------------------------------------------------------------------------------------------ manifest


def manifest_row(conn: psycopg.Connection, table: str, month: dt.date) -> ManifestRow | None:
    row = conn.execute(
        sql.SQL("SELECT {} FROM archive_manifest WHERE table_name = %s AND month = %s").format(
            sql.SQL(_MANIFEST_COLUMNS)
        ),
        (table, month),
    ).fetchone()
    return ManifestRow(*row) if row else None


def list_manifest(conn: psycopg.Connection, table: str | None = None) -> list[ManifestRow]:
    """Every manifest row (of ``table`` if given), oldest month first."""
    rows = conn.execute(
        sql.SQL(
            "SELECT {} FROM archive_manifest WHERE %(t)s::text IS NULL OR table_name = %(t)s "
            "ORDER BY table_name, month"
        ).format(sql.SQL(_MANIFEST_COLUMNS)),
        {"t": table},
    ).fetchall()
    return [ManifestRow(*r) for r in rows]


def _set_state(conn: psycopg.Connection, table: str, month: dt.date, state: str, **values: object) -> None:
    """Set a month's state (and columns); inserts the row on the first step. Caller's transaction."""
    cols = ["state", *values]
    params = {"table": table, "month": month, "name": partition_name(table, month), "state": state, **values}
    # UPDATE first: an INSERT … ON CONFLICT would check the table's CHECKs against the bare insert row
    updated = conn.execute(
        sql.SQL(
            "UPDATE archive_manifest SET {sets}, updated_at = now() WHERE table_name = %(table)s AND month = %(month)s"
        ).format(
            sets=sql.SQL(", ").join(
                sql.SQL("{} = {}").format(sql.Identifier(c), sql.Placeholder(c)) for c in cols
            )
        ),
        params,
    ).rowcount
    if not updated:
        conn.execute(
            sql.SQL(
                "INSERT INTO archive_manifest (table_name, month, partition_name, {cols}) "
                "VALUES (%(table)s, %(month)s, %(name)s, {vals})"
            ).format(
                cols=sql.SQL(", ").join(map(sql.Identifier, cols)),
                vals=sql.SQL(", ").join(sql.Placeholder(c) for c in cols),
            ),
            params,
        )


def _attach_state(conn: psycopg.Connection, table: str, name: str) -> str:
    """``attached``, ``detach_pending`` (an interrupted DETACH CONCURRENTLY), ``standalone`` or ``absent``."""
    row = conn.execute(
        "SELECT i.inhdetachpending FROM pg_class c LEFT JOIN pg_inherits i "
        "ON i.inhrelid = c.oid AND i.inhparent = %s::regclass "
        "WHERE c.relname = %s AND c.relnamespace = current_schema()::regnamespace",
        (table, name),
    ).fetchone()
    if row is None:
        return "absent"
    if row[0] is None:
        return "standalone"
    return "detach_pending" if row[0] else "attached"


def _has_default(conn: psycopg.Connection, table: str) -> bool:
    return _attach_state(conn, table, default_name(table)) == "attached"


# --------------------------------------------------------------------------------------------- steps


def _detach(conn: psycopg.Connection, table: str, month: dt.date, lock_timeout_ms: int) -> str:
    """Detach (or finish detaching) a month; returns how: ``plain``, ``concurrently``, ``finalize`` or ``none``."""
    name = partition_name(table, month)
    state = _attach_state(conn, table, name)
    parent, child = sql.Identifier(table), sql.Identifier(name)
    mode = "none"
    if state == "detach_pending":
        mode = "finalize"
        run_with_lock_retry(
            conn,
            lambda c: c.execute(sql.SQL("ALTER TABLE {} DETACH PARTITION {} FINALIZE").format(parent, child)),
            lock_timeout_ms=lock_timeout_ms,
            attempts=100,
            what=f"finalize detach {name}",
        )
    elif state == "attached" and not _has_default(conn, table):
        mode = "concurrently"
        # CONCURRENTLY runs two transactions itself, so it cannot share one with the manifest update;
        # the re-run sees the catalog state (standalone / detach_pending) and finishes.
        with lock_timeout(conn, lock_timeout_ms):
            retry(
                lambda: conn.execute(
                    sql.SQL("ALTER TABLE {} DETACH PARTITION {} CONCURRENTLY").format(parent, child)
                ),
                attempts=100,
                what=f"detach {name} concurrently",
            )
    elif state == "attached":

        def work(c: psycopg.Connection) -> None:
            c.execute(sql.SQL("ALTER TABLE {} DETACH PARTITION {}").format(parent, child))
            _set_state(c, table, month, "detached")

        run_with_lock_retry(conn, work, lock_timeout_ms=lock_timeout_ms, attempts=200, what=f"detach {name}")
        return "plain"
    with conn.transaction():
        _set_state(conn, table, month, "detached")
    return mode


@dataclass(frozen=True)
class _Column:
    name: str
    pg_type: str
    arrow: pa.DataType


def _arrow_type(pg_type: str) -> pa.DataType:
    if pg_type.startswith("numeric("):
        precision, scale = (int(x) for x in pg_type[8:-1].split(","))
        return pa.decimal128(precision, scale)
    return {
        "bigint": pa.int64(),
        "integer": pa.int32(),
        "smallint": pa.int16(),
        "boolean": pa.bool_(),
        "double precision": pa.float64(),
        "real": pa.float32(),
        "timestamp with time zone": pa.timestamp("us", tz="UTC"),
        "date": pa.date32(),
    }.get(pg_type, pa.string())  # text, uuid, jsonb, inet: their text form, byte for byte


def table_columns(conn: psycopg.Connection, table: str) -> list[_Column]:
    """The parent's columns in order, with the Arrow type each is archived as."""
    rows = conn.execute(
        "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
        "WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
        (table,),
    ).fetchall()
    return [_Column(n, t, _arrow_type(t)) for n, t in rows]


def _select_for_export(name: str, columns: list[_Column]) -> sql.Composed:
    schema = pa.schema([pa.field(c.name, c.arrow) for c in columns])
    # physical order, no sort: the detached table no longer changes, synchronize_seqscans is off during
    # the export (see _export), and a restore loads rows in file order, so restore → re-archive writes
    # the same file (same sha256); timestamptz columns come as naive UTC text (pgcsv.select_list)
    return sql.SQL("COPY (SELECT {} FROM {}) TO STDOUT (FORMAT csv)").format(
        pgcsv.select_list(schema), sql.Identifier(name)
    )


def file_sha256(path: Path) -> str:
    """sha256 of a local file, read in 1 MiB blocks (bounded memory; costs one sequential read)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def archive_key(table: str, month: dt.date) -> str:
    """The object's key under the archive location: ``<table>/<partition>.parquet``."""
    return f"{table}/{partition_name(table, month)}.parquet"


def archive_path(archive_dir: Path, table: str, month: dt.date) -> Path:
    """Where a month's file is under a local archive folder."""
    return Path(archive_dir) / archive_key(table, month)


@dataclass(frozen=True)
class FileFacts:
    rows: int
    bytes: int
    sha256: str
    min_ts: dt.datetime | None
    max_ts: dt.datetime | None
    etag: str | None = None
    version_id: str | None = None


def _arrow_schema(columns: list[_Column]) -> pa.Schema:
    return pa.schema([pa.field(c.name, c.arrow) for c in columns])


def _export(
    conn: psycopg.Connection, table: str, month: dt.date, store: Store, batch_bytes: int
) -> tuple[FileFacts, ObjectInfo]:
    name = partition_name(table, month)
    columns = table_columns(conn, table)
    schema = _arrow_schema(columns)
    key = partition_key_column(table)
    rows, lo, hi = 0, None, None
    conn.execute("SET synchronize_seqscans = off")  # a scan starting mid-table would reorder the file
    try:
        # the store's writer: the object appears under its final key only complete (committed on a clean
        # exit of the block, discarded on an error), hashed as it is written
        with (
            store.writer(archive_key(table, month)) as out,
            conn.cursor() as cur,
            cur.copy(_select_for_export(name, columns)) as copy,
            pq.ParquetWriter(out.sink, schema, compression="zstd") as writer,
        ):
            for i, batch in enumerate(pgcsv.record_batches(iter(copy), batch_bytes)):
                if i % 4 == 3:
                    release_free_memory()  # keeps RSS flat whatever the month's size (lib/memory.py)
                part = pgcsv.parse(batch, schema)
                writer.write_table(part)
                rows += part.num_rows
                mm = pc.min_max(part[key])
                lo = mm["min"].as_py() if lo is None else min(lo, mm["min"].as_py())
                hi = mm["max"].as_py() if hi is None else max(hi, mm["max"].as_py())
            if rows == 0:
                writer.write_table(schema.empty_table())
    finally:
        # the session goes on (other months, the caller's work): do not leave the setting behind on errors
        if conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
            conn.execute("RESET synchronize_seqscans")
    info = out.info
    assert info is not None
    return FileFacts(rows, out.size, out.sha256, lo, hi, info.etag, info.version_id), info


def read_file_facts(
    store: Store, name: str, key: str, *, sha256: str | None = None, schema: pa.Schema | None = None
) -> FileFacts:
    """Row count, size, sha256 and min/max of column ``key`` of archive object ``name``, read from the store
    in row groups (memory: one column chunk). ``sha256``: the digest already computed over this object by
    the caller (not read a second time). ``schema``: the Arrow schema the file must have (ArchiveError
    otherwise)."""
    info = store.info(name)
    if info is None:
        raise FileNotFoundError(store.uri(name))
    with store.open_input(name) as f:
        parquet = pq.ParquetFile(f)
        if schema is not None and not parquet.schema_arrow.equals(schema):
            raise ArchiveError(
                f"{store.uri(name)} has the schema {_schema_text(parquet.schema_arrow)}, the table has "
                f"{_schema_text(schema)}"
            )
        lo = hi = None
        for batch in parquet.iter_batches(columns=[key], batch_size=1 << 20):
            if batch.num_rows:
                mm = pc.min_max(batch.column(0))
                lo = mm["min"].as_py() if lo is None else min(lo, mm["min"].as_py())
                hi = mm["max"].as_py() if hi is None else max(hi, mm["max"].as_py())
        rows = parquet.metadata.num_rows
    return FileFacts(rows, info.size, sha256 or store.sha256(name)[1], lo, hi, info.etag, info.version_id)


def _schema_text(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name} {f.type}" for f in schema)


def _verify(conn: psycopg.Connection, table: str, month: dt.date, m: ManifestRow) -> FileFacts:
    """Compare object ↔ manifest ↔ detached table; raise ArchiveError naming the first mismatch.

    Everything is read back from the store as it is now: size and ETag (a HEAD or stat), sha256 (one
    sequential read), then the Parquet footer (schema, rows) and the key column (min/max). Cost: about two
    reads of the object and one count/min/max of the table. Returns what was read (ETag and version
    included, for the manifest).
    """
    store, name = _locate(m.file_path)
    where = store.uri(name)
    info = store.info(name)
    if info is None:
        raise ArchiveError(f"{m.partition_name}: archive file {where} is missing")
    key = partition_key_column(table)
    if m.bytes is not None and info.size != m.bytes:
        raise ArchiveError(
            f"{m.partition_name}: archive file {where} is {info.size} bytes, the manifest says {m.bytes}"
        )
    size, sha = store.sha256(name)
    if sha != m.sha256 or size != info.size:  # cheap and decisive: a damaged file never reaches the reader
        raise ArchiveError(f"{m.partition_name}: archive file {where} does not match its sha256")
    try:
        facts = read_file_facts(
            store, name, key, sha256=sha, schema=_arrow_schema(table_columns(conn, table))
        )
    except (OSError, pa.ArrowException) as exc:
        raise ArchiveError(f"{m.partition_name}: archive file {where} is unreadable: {exc}") from exc
    except ArchiveError as exc:
        raise ArchiveError(f"{m.partition_name}: archive file does not match: {exc}") from exc
    db_rows, db_min, db_max = conn.execute(
        sql.SQL("SELECT count(*), min({k}), max({k}) FROM {t}").format(
            k=sql.Identifier(key), t=sql.Identifier(m.partition_name)
        )
    ).fetchone()
    problems = []
    if facts.sha256 != m.sha256:
        problems.append(f"sha256 {facts.sha256[:12]}… ≠ manifest {str(m.sha256)[:12]}…")
    if facts.rows != m.rows or facts.rows != db_rows:
        problems.append(f"rows: file {facts.rows}, manifest {m.rows}, table {db_rows}")
    if (facts.min_ts, facts.max_ts) != (db_min, db_max) or (facts.min_ts, facts.max_ts) != (
        m.min_ts,
        m.max_ts,
    ):
        problems.append(f"min/max {key}: file {facts.min_ts}/{facts.max_ts}, table {db_min}/{db_max}")
    if problems:
        raise ArchiveError(f"{m.partition_name}: archive file does not match: " + "; ".join(problems))
    return facts


def _locate(file_path: str | None) -> tuple[Store, str]:
    """The store and key of a manifest's file_path (a local path, or s3://bucket/key)."""
    return locate(file_path or "", SETTING)


def _now(conn: psycopg.Connection) -> dt.datetime:
    return conn.execute("SELECT statement_timestamp()").fetchone()[0]


def _require_standalone(conn: psycopg.Connection, table: str, month: dt.date, state: str) -> None:
    """Refuse to go on with a month whose detached table was attached to ``table`` again (by hand or by an
    older ``move_default_rows``): rows written since then are in it and not in the file."""
    name = partition_name(table, month)
    if _attach_state(conn, table, name) == "attached":
        raise ArchiveError(
            f"{name} is attached to {table} again although its archive stopped at {state}: not exporting or "
            f"dropping it (rows written since are not in the file). It is live data again: run perf-pipeline "
            f"archive restore {month:%Y-%m} --table {table} (marks it restored), then archive it again"
        )


def _drop(conn: psycopg.Connection, table: str, month: dt.date, m: ManifestRow, lock_timeout_ms: int) -> None:
    """Drop the verified, detached table and mark the month dropped, in one transaction.

    Locks the table ACCESS EXCLUSIVE first (bounded by ``lock_timeout_ms``, retried): ATTACH also needs that
    lock, so after it nobody can attach the table or write into it; then it must still be standalone and
    hold exactly the manifest's row count, else :class:`ArchiveError` and nothing is dropped. No lock on
    the parent. Cost: one count(*) of the table.
    """
    name = partition_name(table, month)
    ident = sql.Identifier(name)

    def work(c: psycopg.Connection) -> None:
        state = _attach_state(c, table, name)
        if state != "absent":
            c.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(ident))
            state = _attach_state(c, table, name)
            if state != "standalone":
                raise ArchiveError(
                    f"{name} is {state.replace('_', ' ')} to {table} although its archive was verified: not "
                    f"dropping it; run perf-pipeline archive restore {month:%Y-%m} --table {table}, then archive "
                    f"it again"
                )
            rows = c.execute(sql.SQL("SELECT count(*) FROM {}").format(ident)).fetchone()[0]
            if rows != m.rows:
                raise ArchiveError(
                    f"{name} has {rows} rows, the manifest says {m.rows}: rows were written into the detached "
                    f"table after the export; not dropping it. Run perf-pipeline archive restore {month:%Y-%m} "
                    f"--table {table}, then archive it again"
                )
            c.execute(sql.SQL("DROP TABLE {}").format(ident))
        # absent: the table is already gone (nothing to drop); the verified file is the month
        c.execute(
            "UPDATE archive_manifest SET state = 'dropped', dropped_at = now(), "
            "updated_at = now(), archive_count = archive_count + 1 "
            "WHERE table_name = %s AND month = %s",
            (table, month),
        )

    # Only the detached table is locked, so no platform statement queues behind this wait. The wait must
    # outlast deadlock_timeout (1 s by default): that is when PostgreSQL cancels an autovacuum blocking a
    # lock request. With the detach's 100 ms timeout, a freshly loaded month being auto-vacuumed kept the
    # drop retrying for 60 s at 10M rows (measured); with 5 s it waits ~1 s.
    run_with_lock_retry(
        conn,
        work,
        lock_timeout_ms=max(lock_timeout_ms, DROP_LOCK_TIMEOUT_MS),
        attempts=100,
        what=f"drop {name}",
    )


def archive_partition(
    conn: psycopg.Connection,
    table: str,
    month: dt.date,
    archive_dir: ArchiveLocation,
    *,
    hook: StepHook | None = None,
    lock_timeout_ms: int = DETACH_LOCK_TIMEOUT_MS,
    batch_bytes: int = BATCH_BYTES,
) -> ArchiveResult:
    """Detach → export → verify → drop ``table``'s partition of ``month``, resuming from the manifest.

    ``archive_dir``: a local folder, an ``s3://bucket/prefix`` URL or a :class:`Store`; it is checked
    (:meth:`Store.check`: bucket there, a probe object written and deleted) before anything else, so a bad
    location fails with :class:`StorageError` naming PERF_PIPELINE_ARCHIVE_DIR before any table is touched.
    A month already exported is verified and read where the manifest says it is.

    ``conn`` must be in autocommit mode. Idempotent: an already archived month returns at once
    (state ``dropped``, nothing re-exported); a month with no partition and no manifest row returns
    ``absent``. Locks: ACCESS EXCLUSIVE on the parent for the detach only (bounded by ``lock_timeout_ms``,
    retried), then only the detached table. Cost: one sequential read of the partition for the export,
    two of the object and one count of the table for the verification; memory ~3 × ``batch_bytes``.
    """
    month = month_start(month)
    name = partition_name(table, month)
    store = open_store(archive_dir, SETTING)
    store.check()
    result = ArchiveResult(table, month, "absent")
    verify_failures = 0
    # the drop relies on the file only if this very run read it back and matched it against the manifest
    # and the table: a run resuming at `verified` (after a crash, on another host, with the folder not
    # mounted or the file damaged since) proves it again first, and exports again if it does not hold
    proven_in_this_run = False
    try_advisory_lock(conn, Locks.month(table, month), wait_s=None)
    try:
        while True:
            m = manifest_row(conn, table, month)
            state = m.state if m else None
            if state == "dropped":
                assert m is not None
                result.state, result.rows, result.bytes = "dropped", m.rows or 0, m.bytes or 0
                result.sha256, result.file_path, result.etag = m.sha256, m.file_path, m.etag
                return result
            started = time.perf_counter()
            if state in ("detached", "exported", "verified"):
                _require_standalone(conn, table, month, state)
            if state in (None, "restored"):
                if _attach_state(conn, table, name) == "absent":
                    return result
                step = "detach"
                result.detach_mode = _detach(conn, table, month, lock_timeout_ms)
            elif state == "detached":
                step = "export"
                facts, info = _export(conn, table, month, store, batch_bytes)
                with conn.transaction():
                    _set_state(
                        conn,
                        table,
                        month,
                        "exported",
                        file_path=info.uri,
                        rows=facts.rows,
                        bytes=facts.bytes,
                        sha256=facts.sha256,
                        min_ts=facts.min_ts,
                        max_ts=facts.max_ts,
                        etag=facts.etag,
                        version_id=facts.version_id,
                        verified_at=None,
                    )
            elif state == "exported" or (state == "verified" and not proven_in_this_run):
                step = "verify"
                assert m is not None
                try:
                    facts = _verify(conn, table, month, m)
                except ArchiveError as exc:
                    # the table is still there: export again rather than trust a damaged or missing file,
                    # but not forever (a disk that keeps damaging files, data pyarrow cannot round-trip)
                    verify_failures += 1
                    with conn.transaction():
                        _set_state(conn, table, month, "detached")
                    if verify_failures >= VERIFY_ATTEMPTS:
                        raise ArchiveError(
                            f"{name}: verification failed {verify_failures} times, giving up (last: {exc}). The "
                            f"month stays detached (invisible to queries, recorded as detached in archive_manifest, "
                            f"flagged by the archive files check): fix the cause and run the archive again, or "
                            f"perf-pipeline archive restore {month:%Y-%m} --table {table}"
                        ) from exc
                    log.warning(
                        "%s; exporting again (attempt %d/%d)", exc, verify_failures + 1, VERIFY_ATTEMPTS
                    )
                    continue
                proven_in_this_run = True
                with conn.transaction():
                    # what was read back: the ETag/version the files check compares later, and when
                    _set_state(
                        conn,
                        table,
                        month,
                        "verified",
                        etag=facts.etag,
                        version_id=facts.version_id,
                        verified_at=_now(conn),
                    )
                if state == "verified":
                    log.info("%s: resumed at verified; the file was read back and still matches", name)
            elif state == "verified":
                step = "drop"
                assert m is not None
                _drop(conn, table, month, m, lock_timeout_ms)
            else:
                raise ArchiveError(f"{name}: unexpected manifest state {state!r}")
            result.steps_run.append(step)
            result.step_ms[step] = result.step_ms.get(step, 0.0) + (time.perf_counter() - started) * 1000
            log.info("%s: %s done in %.0f ms", name, step, result.step_ms[step])
            if hook is not None:
                hook(step)
    finally:
        advisory_unlock(conn, Locks.month(table, month))


@dataclass(frozen=True)
class VerifyReport:
    ok: list[str]
    problems: dict[str, str]  # partition name → what is wrong
    read_in_full: list[str] = field(default_factory=list)  # of ok: read back and re-hashed by this check


def verify_archives(
    conn: psycopg.Connection,
    table: str | None = None,
    *,
    rehash_after: dt.timedelta = REHASH_AFTER,
) -> VerifyReport:
    """Check every dropped month's object against its manifest row, and flag every month whose archive
    stopped half-way (detached / exported / verified: its table is detached, so its rows are invisible to
    queries until the archive is run again or the month restored).

    Every object is looked up (a HEAD on S3, a stat on disk): missing, or a size other than the manifest's,
    is a problem. It is read back in full — sha256 and Parquet row count — when it was never read in full
    since it was recorded, when its ETag differs from the recorded one (rewritten, restored from a backup),
    or when its last full read is older than ``rehash_after``; a match then records the ETag, VersionId and
    ``verified_at`` on the manifest row. Otherwise size and ETag suffice. Cost: one HEAD per archive, plus
    one full read of each object that is new, changed or due (memory: one block).
    """
    ok, problems, read_in_full = [], {}, []
    now = _now(conn)
    for m in list_manifest(conn, table):
        if m.state in ("detached", "exported", "verified"):
            problems[m.partition_name] = (
                f"archive stopped at {m.state}: the table is detached (its rows are invisible to queries); run "
                f"the archive of {m.month:%Y-%m} again or restore it"
            )
            continue
        if m.state != "dropped":
            continue
        try:
            problem, full = _check_object(conn, m, now, rehash_after)
        except (OSError, StorageError, pa.ArrowException) as exc:
            problem, full = f"cannot read {m.file_path}: {type(exc).__name__}: {describe_error(exc)}", False
        if problem:
            problems[m.partition_name] = problem
        else:
            ok.append(m.partition_name)
            if full:
                read_in_full.append(m.partition_name)
    return VerifyReport(ok, problems, read_in_full)


def _check_object(
    conn: psycopg.Connection, m: ManifestRow, now: dt.datetime, rehash_after: dt.timedelta
) -> tuple[str | None, bool]:
    """(problem or None, whether the object was read in full) for one dropped month."""
    store, name = _locate(m.file_path)
    where = store.uri(name)
    info = store.info(name)
    if info is None:
        return f"file {where} is missing", False
    if m.bytes is not None and info.size != m.bytes:
        return f"file {where} is {info.size} bytes, the manifest says {m.bytes}", False
    due = m.verified_at is None or now - m.verified_at > rehash_after
    if not due and m.etag is not None and info.etag == m.etag:
        return None, False
    size, sha = store.sha256(name)
    if sha != m.sha256:
        return f"sha256 {sha[:12]}… ≠ manifest {str(m.sha256)[:12]}…", True
    with store.open_input(name) as f:
        rows = pq.ParquetFile(f).metadata.num_rows
    if rows != m.rows:
        return f"file has {rows} rows, manifest says {m.rows}", True
    conn.execute(
        "UPDATE archive_manifest SET etag = %s, version_id = %s, verified_at = %s "
        "WHERE table_name = %s AND month = %s AND state = 'dropped' AND sha256 = %s",
        (info.etag, info.version_id, now, m.table_name, m.month, m.sha256),
    )
    return None, True


# --------------------------------------------------------------------------------------------- restore


@dataclass
class RestoreResult:
    table: str
    month: dt.date
    rows: int
    duration_ms: float
    already: bool = False
    late_rows: int = 0  # rows of the month found in DEFAULT (written while it was archived), moved in


def _copy_file_into(conn: psycopg.Connection, name: str, store: Store, key: str) -> int:
    """COPY the archive object into table ``name``, row group by row group, straight from the store
    (ranged reads: memory is one batch, whatever the month's size)."""
    with store.open_input(key) as f:
        return _copy_parquet_into(conn, name, pq.ParquetFile(f))


def _copy_parquet_into(conn: psycopg.Connection, name: str, parquet: pq.ParquetFile) -> int:
    columns = parquet.schema_arrow.names
    stmt = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT csv)").format(
        sql.Identifier(name), sql.SQL(", ").join(map(sql.Identifier, columns))
    )
    rows = 0
    with conn.cursor() as cur, cur.copy(stmt) as copy:
        for i, batch in enumerate(parquet.iter_batches(batch_size=100_000)):
            if i % 8 == 7:
                release_free_memory()
            buf = io.BytesIO()
            # pyarrow quotes empty strings and leaves NULLs unquoted-empty, as COPY's CSV expects
            pacsv.write_csv(pa.Table.from_batches([batch]), buf, pacsv.WriteOptions(include_header=False))
            copy.write(buf.getbuffer())
            rows += batch.num_rows
    return rows


def restore_partition(
    conn: psycopg.Connection, table: str, month: dt.date, *, lock_timeout_ms: int = 200
) -> RestoreResult:
    """Load an archived month back from its file and re-attach it to ``table``.

    ``conn`` must be in autocommit mode. The file is read where the manifest says it is (a local path or an
    s3:// object, streamed from the store) and checked against the manifest first (size, sha256). The
    table is loaded standalone with the parent's indexes and a bound CHECK, so the attach scans
    neither it nor holds locks during the load; attach and manifest update commit together. Safe to
    re-run: a half-loaded table from a crashed restore is dropped and loaded again. A month whose
    table still exists (archive stopped before the drop) is simply re-attached. Rows of the month that
    landed in DEFAULT while it was archived are moved into it before the attach.
    """
    month = month_start(month)
    name = partition_name(table, month)
    started = time.perf_counter()
    try_advisory_lock(conn, Locks.month(table, month), wait_s=None)
    try:
        m = manifest_row(conn, table, month)
        if m is None:
            raise ArchiveError(f"{name}: no archive of this month in archive_manifest")
        if m.state == "restored":
            return RestoreResult(table, month, m.rows or 0, 0.0, already=True)
        attach_state = _attach_state(conn, table, name)
        if m.state == "dropped":
            store, key = _locate(m.file_path)
            info = store.info(key)
            if info is None or info.size != m.bytes or store.sha256(key)[1] != m.sha256:
                raise ArchiveError(
                    f"{name}: archive file {store.uri(key)} is missing or does not match its sha256"
                )
            if attach_state == "attached":
                raise ArchiveError(f"{name} is attached although the manifest says dropped; not touching it")
            with conn.transaction():
                conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))
                prepare_partition_table(conn, MonthPartition(table, month))
                rows = _copy_file_into(conn, name, store, key)
            if rows != m.rows:
                raise ArchiveError(f"{name}: loaded {rows} rows, manifest says {m.rows}")
        else:
            rows = m.rows or 0
            if attach_state == "absent":
                raise ArchiveError(f"{name}: manifest state {m.state} but the table is gone")
            if attach_state == "detach_pending":
                _detach(conn, table, month, lock_timeout_ms)

        start, end = month_bounds(month)
        move = sql.SQL(load_query("partition_move_default_batch")).format(
            default=sql.Identifier(default_name(table)),
            target=sql.Identifier(name),
            key=sql.Identifier(partition_key_column(table)),
        )
        late = 0
        has_default = _has_default(conn, table)

        def work(c: psycopg.Connection) -> None:
            nonlocal late
            # rows of this month that arrived while it was archived sit in DEFAULT (and would make the
            # ATTACH fail): they join the restored month in the same transaction
            if has_default:
                late = c.execute(move, {"start": start, "end": end, "batch": 2**62}).fetchone()[0]
            attach_partition(c, MonthPartition(table, month))
            drop_bound_constraint(
                c, MonthPartition(table, month)
            )  # the partition bound says the same; siblings have none
            c.execute(
                "UPDATE archive_manifest SET state = 'restored', restored_at = now(), updated_at = now() "
                "WHERE table_name = %s AND month = %s",
                (table, month),
            )

        # a writer that adds another late row meanwhile fails the attach's CHECK: move again
        retry(
            lambda: run_with_lock_retry(
                conn, work, lock_timeout_ms=lock_timeout_ms, attempts=100, what=f"attach {name}"
            ),
            attempts=10,
            what=f"attach {name}",
            on=(psycopg.errors.CheckViolation,),
            first_delay_s=0,
        )
        if m.state != "dropped":
            rows = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(name))).fetchone()[0]
        else:
            rows += late
        return RestoreResult(table, month, rows, (time.perf_counter() - started) * 1000, late_rows=late)
    finally:
        advisory_unlock(conn, Locks.month(table, month))


# ------------------------------------------------------------------------------------------ retention


def archive_eligible(month: dt.date, today: dt.date, retention_months: int) -> bool:
    """A month is past retention when it ends on or before the first day of the oldest kept month:
    with retention 12 on 2026-11-27, months up to 2025-10 are archived and 2025-11 … 2026-11 stay."""
    return past_retention(month, today, retention_months)


@dataclass(frozen=True)
class RetentionDecision:
    drop: bool
    reason: str


def usage_retention_decision(
    conn: psycopg.Connection, month: dt.date, today: dt.date, retention_months: int
) -> RetentionDecision:
    """Whether usage month ``month`` may be archived and dropped. The rule, all three must hold:

    1. it is past ``PERF_PIPELINE_USAGE_RETENTION_MONTHS`` (:func:`archive_eligible`);
    2. it ends more than 90 days before ``today``: the rollups recompute the last 90 days;
    3. every day of the month that has usage rows has a rollup row computed after that day's latest usage
       row (else the rollup may still need to recompute it: never rolled up, or rolled up while the day
       was still filling), and no day of the month is marked in ``usage_rollup_stale_days`` (late rows
       the rollup will recompute).
    Cost: rule 3 reads the month's rows grouped by day (index/BRIN on created_at), once a month.
    """
    month = month_start(month)
    if not archive_eligible(month, today, retention_months):
        return RetentionDecision(False, f"within retention ({retention_months} months)")
    _, end = month_bounds(month)
    if end.date() > today - dt.timedelta(days=LOOKBACK_DAYS):
        return RetentionDecision(False, f"overlaps the rollups' {LOOKBACK_DAYS}-day recompute window")
    name = partition_name("usage_log", month)
    if conn.execute("SELECT to_regclass(%s) IS NULL", (name,)).fetchone()[0]:
        return RetentionDecision(True, "past retention; no partition left")
    stale = conn.execute(
        sql.SQL(load_query("archive_usage_days_needing_rollup")).format(partition=sql.Identifier(name))
    ).fetchall()
    start, end = month_bounds(month)
    marked = conn.execute(
        load_query("archive_usage_stale_days"), {"start": start.date(), "end": end.date()}
    ).fetchall()
    stale = sorted(set(stale) | set(marked))
    if stale:
        days = ", ".join(str(d) for (d,) in stale[:10])
        return RetentionDecision(
            False, f"{len(stale)} day(s) whose rollup is missing or older than their data: {days}"
        )
    return RetentionDecision(
        True, "past retention, outside the 90-day window, every day rolled up after its data"
    )
