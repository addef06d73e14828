"""A month's Parquet file: write it from the detached table, read it back, check it against the manifest.

The export is ``COPY (SELECT …) TO STDOUT (FORMAT csv)`` in physical order, cut into record-aligned
batches parsed by pyarrow (:mod:`perf_pipeline.lib.pgcsv`) and appended to a zstd Parquet file (one row
group per batch), written atomically to the archive location (:mod:`perf_pipeline.lib.storage`) and
hashed on the way: memory stays bounded by the batch size.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from psycopg import sql

from perf_pipeline.lib import pgcsv
from perf_pipeline.lib.archive.manifest import (
    UNFINISHED,
    ArchiveError,
    ManifestRow,
    State,
    db_now,
    list_manifest,
)
from perf_pipeline.lib.memory import release_free_memory
from perf_pipeline.lib.partitioning import MonthPartition
from perf_pipeline.lib.storage import ObjectInfo, StorageError, Store, describe_error, locate

BATCH_BYTES = 16 << 20
#: the setting archives are written under (named in storage errors)
SETTING = "PERF_PIPELINE_ARCHIVE_DIR"
#: the files check reads an object in full when it is new or changed (size, ETag), or was last read in full
#: longer ago than this; otherwise size + ETag suffice (a HEAD). The weekly schedule therefore re-hashes
#: every archive about once a week, and the checks of the monthly archive runs read only what changed.
REHASH_AFTER = dt.timedelta(days=6)

ArchiveLocation = Store | str | os.PathLike[str]


@dataclass(frozen=True)
class Column:
    """A column of the archived table: its name, PostgreSQL type and the Arrow type it is written as."""

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


def table_columns(conn: psycopg.Connection, table: str) -> list[Column]:
    """The parent's columns in order, with the Arrow type each is archived as."""
    rows = conn.execute(
        "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
        "WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
        (table,),
    ).fetchall()
    return [Column(n, t, _arrow_type(t)) for n, t in rows]


def arrow_schema(columns: list[Column]) -> pa.Schema:
    """The Parquet file's schema for these columns, in order."""
    return pa.schema([pa.field(c.name, c.arrow) for c in columns])


def _select_for_export(name: str, columns: list[Column]) -> sql.Composed:
    # physical order, no sort: the detached table no longer changes, synchronize_seqscans is off during
    # the export (see export_file), and a restore loads rows in file order, so restore → re-archive writes
    # the same file (same sha256); timestamptz columns come as naive UTC text (pgcsv.select_list)
    return sql.SQL("COPY (SELECT {} FROM {}) TO STDOUT (FORMAT csv)").format(
        pgcsv.select_list(arrow_schema(columns)), sql.Identifier(name)
    )


def file_sha256(path: Path) -> str:
    """sha256 of a local file, read in 1 MiB blocks (bounded memory; costs one sequential read)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def object_key(part: MonthPartition) -> str:
    """The object's key under the archive location: ``<table>/<partition>.parquet``."""
    return f"{part.table}/{part.name}.parquet"


def archive_key(table: str, month: dt.date) -> str:
    """The object's key under the archive location: ``<table>/<partition>.parquet``."""
    return object_key(MonthPartition(table, month))


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


def export_file(
    conn: psycopg.Connection, part: MonthPartition, store: Store, batch_bytes: int
) -> tuple[FileFacts, ObjectInfo]:
    """Write ``part``'s (detached) table to its object in ``store``: one sequential read of the table,
    memory about three batches. Returns what was written (rows, size, sha256, min/max key, ETag)."""
    columns = table_columns(conn, part.table)
    schema = arrow_schema(columns)
    key = part.key_column
    rows, lo, hi = 0, None, None
    conn.execute("SET synchronize_seqscans = off")  # a scan starting mid-table would reorder the file
    try:
        # the store's writer: the object appears under its final key only complete (committed on a clean
        # exit of the block, discarded on an error), hashed as it is written
        with (
            store.writer(object_key(part)) as out,
            conn.cursor() as cur,
            cur.copy(_select_for_export(part.name, columns)) as copy,
            pq.ParquetWriter(out.sink, schema, compression="zstd") as writer,
        ):
            for i, batch in enumerate(pgcsv.record_batches(iter(copy), batch_bytes)):
                if i % 4 == 3:
                    release_free_memory()  # keeps RSS flat whatever the month's size (lib/memory.py)
                chunk = pgcsv.parse(batch, schema)
                writer.write_table(chunk)
                rows += chunk.num_rows
                mm = pc.min_max(chunk[key])
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


def verify_file(conn: psycopg.Connection, part: MonthPartition, m: ManifestRow) -> FileFacts:
    """Compare object ↔ manifest ↔ detached table; raise ArchiveError naming the first mismatch.

    Everything is read back from the store as it is now: size and ETag (a HEAD or stat), sha256 (one
    sequential read), then the Parquet footer (schema, rows) and the key column (min/max). Cost: about two
    reads of the object and one count/min/max of the table. Returns what was read (ETag and version
    included, for the manifest).
    """
    store, name = locate_file(m.file_path)
    where = store.uri(name)
    info = store.info(name)
    if info is None:
        raise ArchiveError(f"{m.partition_name}: archive file {where} is missing")
    key = part.key_column
    if m.bytes is not None and info.size != m.bytes:
        raise ArchiveError(
            f"{m.partition_name}: archive file {where} is {info.size} bytes, the manifest says {m.bytes}"
        )
    size, sha = store.sha256(name)
    if sha != m.sha256 or size != info.size:  # cheap and decisive: a damaged file never reaches the reader
        raise ArchiveError(f"{m.partition_name}: archive file {where} does not match its sha256")
    try:
        facts = read_file_facts(
            store, name, key, sha256=sha, schema=arrow_schema(table_columns(conn, part.table))
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


def locate_file(file_path: str | None) -> tuple[Store, str]:
    """The store and key of a manifest's file_path (a local path, or s3://bucket/key)."""
    return locate(file_path or "", SETTING)


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
    now = db_now(conn)
    for m in list_manifest(conn, table):
        if m.state in UNFINISHED:
            problems[m.partition_name] = (
                f"archive stopped at {m.state}: the table is detached (its rows are invisible to queries); run "
                f"the archive of {m.month:%Y-%m} again or restore it"
            )
            continue
        if m.state != State.DROPPED:
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
    store, name = locate_file(m.file_path)
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
        "WHERE table_name = %s AND month = %s AND state = %s AND sha256 = %s",
        (info.etag, info.version_id, now, m.table_name, m.month, State.DROPPED.value, m.sha256),
    )
    return None, True
