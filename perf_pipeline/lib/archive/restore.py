""":func:`restore_partition`: load an archived month back from its file and attach it again."""

from __future__ import annotations

import datetime as dt
import io
import time
from dataclasses import dataclass

import psycopg
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from psycopg import sql

from perf_pipeline.lib.archive.files import locate_file
from perf_pipeline.lib.archive.manifest import (
    ArchiveError,
    Attachment,
    State,
    attach_state,
    has_default,
    manifest_row,
)
from perf_pipeline.lib.archive.run import detach
from perf_pipeline.lib.db import advisory_unlock, load_query, retry, run_with_lock_retry, try_advisory_lock
from perf_pipeline.lib.memory import release_free_memory
from perf_pipeline.lib.partitioning import (
    MonthPartition,
    attach_partition,
    drop_bound_constraint,
    prepare_partition_table,
)
from perf_pipeline.lib.storage import Store


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
    landed in DEFAULT while it was archived are moved into it before the attach. Locks: the month's
    advisory lock (waited for), then the attach's (bounded by ``lock_timeout_ms``, retried).
    """
    part = MonthPartition(table, month)
    month, name = part.month, part.name
    started = time.perf_counter()
    try_advisory_lock(conn, part.lock, wait_s=None)
    try:
        m = manifest_row(conn, table, month)
        if m is None:
            raise ArchiveError(f"{name}: no archive of this month in archive_manifest")
        if m.state == State.RESTORED:
            return RestoreResult(table, month, m.rows or 0, 0.0, already=True)
        attached = attach_state(conn, table, name)
        if m.state == State.DROPPED:
            store, key = locate_file(m.file_path)
            info = store.info(key)
            if info is None or info.size != m.bytes or store.sha256(key)[1] != m.sha256:
                raise ArchiveError(
                    f"{name}: archive file {store.uri(key)} is missing or does not match its sha256"
                )
            if attached == Attachment.ATTACHED:
                raise ArchiveError(f"{name} is attached although the manifest says dropped; not touching it")
            with conn.transaction():
                conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))
                prepare_partition_table(conn, part)
                rows = _copy_file_into(conn, name, store, key)
            if rows != m.rows:
                raise ArchiveError(f"{name}: loaded {rows} rows, manifest says {m.rows}")
        else:
            rows = m.rows or 0
            if attached == Attachment.ABSENT:
                raise ArchiveError(f"{name}: manifest state {m.state} but the table is gone")
            if attached == Attachment.DETACH_PENDING:
                detach(conn, part, lock_timeout_ms)

        move = sql.SQL(load_query("partition_move_default_batch")).format(
            default=sql.Identifier(part.default),
            target=sql.Identifier(name),
            key=sql.Identifier(part.key_column),
        )
        late = 0
        with_default = has_default(conn, part)

        def work(c: psycopg.Connection) -> None:
            nonlocal late
            # rows of this month that arrived while it was archived sit in DEFAULT (and would make the
            # ATTACH fail): they join the restored month in the same transaction
            if with_default:
                late = c.execute(move, {"start": part.start, "end": part.end, "batch": 2**62}).fetchone()[0]
            attach_partition(c, part)
            drop_bound_constraint(c, part)  # the partition bound says the same; siblings have none
            c.execute(
                "UPDATE archive_manifest SET state = %s, restored_at = now(), updated_at = now() "
                "WHERE table_name = %s AND month = %s",
                (State.RESTORED.value, table, month),
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
        if m.state != State.DROPPED:
            rows = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(name))).fetchone()[0]
        else:
            rows += late
        return RestoreResult(table, month, rows, (time.perf_counter() - started) * 1000, late_rows=late)
    finally:
        advisory_unlock(conn, part.lock)
