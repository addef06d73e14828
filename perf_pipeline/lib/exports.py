"""Background exports of usage_log / audit_log: validate a request, stream it to a file, record the result.

A request is a ``data_export`` row (filed by the platform or :func:`file_request`). :func:`run_export`
turns it into a file under the export folder:

* **Validation first.** ``kind``, ``format`` and ``filters`` come from users. :func:`validate_request`
  accepts a fixed set of filter keys with typed values (``user_id`` UUID, ``start``/``end`` dates,
  ``entity_type`` and ``severity`` for audit_log) and a date range within retention; anything else raises
  :class:`ExportRequestError` with a message that is stored on the request (status ``failed``).
* **Streaming, bounded memory.** ``COPY (SELECT …) TO STDOUT (FORMAT csv)`` is read message by message and
  written through gzip (``csv.gz``) or parsed in bounded blocks by pyarrow's CSV reader into record
  batches for a ``ParquetWriter`` (``parquet``). Memory is a few blocks, whatever the export's size.
* **Not in the platform's way.** The COPY runs in a READ ONLY transaction with ``statement_timeout``, a
  short ``lock_timeout`` (it never queues behind a DDL, nor makes DDL queue behind it for long) and no
  parallel workers (one backend, one core); partitions outside the date range are pruned at plan time.
* **Atomic files.** Data goes to an anonymous ``O_TMPFILE`` in the export folder (a named hidden
  ``.export-<id>-*.part`` where the filesystem lacks O_TMPFILE), is fsynced, then linked/renamed into place
  and the folder fsynced. A killed process leaves no visible file; a failed run removes its temp file; a
  retry sweeps leftovers of earlier attempts of the same request.
* **One process per request.** A session advisory lock keyed by the request id serializes attempts; it
  dies with the connection, so a killed run never blocks its retry (the session asks for TCP keepalives
  so that PostgreSQL also notices a client that vanished without closing its socket). A retry may wait
  for the lock (``lock_wait_s``): if the earlier attempt then finished, its recorded result is returned.

Status goes ``pending → running → succeeded | failed``; a ``failed`` or stuck ``running`` request can be
run again (a succeeded one is returned as is).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import gzip
import hashlib
import io
import json
import logging
import os
import re
import secrets
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import psycopg.rows
import psycopg.types.json
import pyarrow as pa
import pyarrow.parquet as pq
from psycopg import sql

from perf_pipeline.lib import pgcsv
from perf_pipeline.lib.db import connect, load_query
from perf_pipeline.lib.partitioning import add_months, month_start

log = logging.getLogger(__name__)

UTC = dt.UTC
FORMATS: tuple[str, ...] = ("csv.gz", "parquet")
SEVERITIES: tuple[str, ...] = ("low", "medium", "high", "critical")
_ENTITY_TYPE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
#: first key of the two-key advisory lock that serializes attempts at one request ("expo")
ADVISORY_LOCK_CLASS = 0x6578706F
#: progress is reported every this many uncompressed bytes
PROGRESS_EVERY_BYTES = 16 << 20
#: gzip level 1: ~4x smaller than raw CSV at several times the speed of level 6 (the export is
#: CPU-bound on the client, and the client shares the machine with PostgreSQL)
GZIP_LEVEL = 1
#: uncompressed bytes gathered before one gzip write (amortizes per-call overhead)
WRITE_BUFFER_BYTES = 1 << 20
#: CSV bytes parsed at once for Parquet exports: memory is one block plus one row group
PARQUET_BLOCK_BYTES = 2 << 20
#: rows per Parquet row group (batches are gathered up to this before a write)
PARQUET_ROW_GROUP_ROWS = 64 * 1024
LOCK_TIMEOUT_MS = 2000
#: TCP keepalives of an export's session (idle s, interval s, probes): PostgreSQL ends the session of a
#: client that vanished without closing its socket (host crash, network cut) within ~25 s, releasing
#: the request's advisory lock for a retry; a killed process closes its socket and needs none of this
TCP_KEEPALIVES = (10, 5, 3)


class ExportRequestError(ValueError):
    """The request is invalid (kind, format, filters); the message is stored on the request."""


class ExportBusyError(RuntimeError):
    """Another process is exporting this request right now."""


@dataclass(frozen=True)
class ExportKind:
    """One exportable table: its query, columns, the filters it accepts and its Parquet schema."""

    table: str
    query: str  # sql/queries/<query>.sql
    filter_keys: frozenset[str]
    schema: pa.Schema
    retention_setting: str  # Settings attribute with the months kept online


KINDS: dict[str, ExportKind] = {
    "usage_log": ExportKind(
        table="usage_log",
        query="export_usage_log",
        filter_keys=frozenset({"user_id", "start", "end"}),
        schema=pa.schema(
            [
                ("id", pa.int64()),
                ("user_id", pa.string()),
                ("session_id", pa.string()),
                ("created_at", pa.timestamp("us", tz="UTC")),
                ("duration_minutes", pa.decimal128(10, 2)),
                ("cost_usd", pa.decimal128(12, 4)),
                ("is_billable", pa.bool_()),
                ("stt_provider", pa.string()),
            ]
        ),
        retention_setting="usage_retention_months",
    ),
    "audit_log": ExportKind(
        table="audit_log",
        query="export_audit_log",
        filter_keys=frozenset({"user_id", "start", "end", "entity_type", "severity"}),
        schema=pa.schema(
            [
                ("id", pa.string()),
                ("timestamp", pa.timestamp("us", tz="UTC")),
                ("user_id", pa.string()),
                ("entity_type", pa.string()),
                ("entity_id", pa.string()),
                ("event_type", pa.string()),
                ("operation", pa.string()),
                ("severity", pa.string()),
                ("description", pa.string()),
                ("details", pa.string()),  # jsonb, as PostgreSQL prints it
                ("ip", pa.string()),  # inet, as PostgreSQL prints it
            ]
        ),
        retention_setting="audit_retention_months",
    ),
}


@dataclass(frozen=True)
class ExportPlan:
    """A validated request: what to select. ``start``/``end`` are UTC instants, end exclusive."""

    request_id: int
    kind: str
    format: str
    start: dt.datetime
    end: dt.datetime
    user_id: str | None = None
    entity_type: str | None = None
    severities: tuple[str, ...] | None = None

    @property
    def filename(self) -> str:
        return f"export-{self.request_id}-{self.kind}.{self.format}"

    def params(self) -> dict[str, Any]:
        return {
            "start": self.start,
            "end": self.end,
            "user_id": self.user_id,
            "entity_type": self.entity_type,
            "severities": list(self.severities) if self.severities is not None else None,
        }


@dataclass
class ExportResult:
    request_id: int
    path: Path
    rows: int
    bytes: int  # file size
    csv_bytes: int  # uncompressed CSV streamed by COPY
    sha256: str
    seconds: float
    status: str = "succeeded"

    @property
    def mb_per_s(self) -> float:
        return self.csv_bytes / 1e6 / self.seconds if self.seconds else 0.0


@dataclass
class Progress:
    rows: int = 0
    csv_bytes: int = 0
    started: float = field(default_factory=time.perf_counter)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started


ProgressCallback = Callable[[Progress], None]


# ------------------------------------------------------------------------------------------ validation


def retention_floor(kind: str, today: dt.date, retention_months: int) -> dt.date:
    """First day still online: the first day of the month ``retention_months`` before ``today``'s month.

    Older months may already be archived to files and dropped, so an export of them would be silently
    incomplete; such requests are refused instead.
    """
    return add_months(month_start(today), -retention_months)


def _date(key: str, value: object) -> dt.date:
    if not isinstance(value, str) or not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        raise ExportRequestError(f"filter {key!r} must be a date string YYYY-MM-DD, got {value!r}")
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise ExportRequestError(f"filter {key!r} is not a valid date: {value!r}") from None


def validate_request(
    request_id: int,
    kind: object,
    fmt: object,
    filters: object,
    *,
    today: dt.date,
    retention_months: Mapping[str, int],
) -> ExportPlan:
    """Check a request against the fixed vocabulary and return what to export. Pure, costs nothing.

    ``filters`` keys: ``user_id`` (UUID string), ``start`` and ``end`` (``YYYY-MM-DD``, UTC days, both
    inclusive; default: the retention floor and today), and for audit_log ``entity_type`` (lowercase
    identifier) and ``severity`` (one of low/medium/high/critical, or a list of them).
    ``retention_months`` maps kind → months kept online. Raises :class:`ExportRequestError`.
    """
    if not isinstance(kind, str) or kind not in KINDS:
        raise ExportRequestError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise ExportRequestError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if not isinstance(filters, dict):
        raise ExportRequestError(f"filters must be a JSON object, got {type(filters).__name__}")
    spec = KINDS[kind]
    unknown = sorted(set(filters) - spec.filter_keys)
    if unknown:
        raise ExportRequestError(
            f"unknown filter key(s) for {kind}: {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(sorted(spec.filter_keys))}"
        )

    user_id = filters.get("user_id")
    if user_id is not None:
        if not isinstance(user_id, str):
            raise ExportRequestError(f"filter 'user_id' must be a UUID string, got {user_id!r}")
        try:
            user_id = str(uuid.UUID(user_id))
        except ValueError:
            raise ExportRequestError(f"filter 'user_id' is not a UUID: {user_id!r}") from None

    floor = retention_floor(kind, today, retention_months[kind])
    start = _date("start", filters["start"]) if filters.get("start") is not None else floor
    end = _date("end", filters["end"]) if filters.get("end") is not None else today
    if start > end:
        raise ExportRequestError(f"start {start} is after end {end}")
    if start < floor:
        raise ExportRequestError(
            f"start {start} is beyond the retention of {kind} ({retention_months[kind]} months: rows before "
            f"{floor} may be archived); request {floor} or later"
        )

    entity_type = filters.get("entity_type")
    if entity_type is not None and (not isinstance(entity_type, str) or not _ENTITY_TYPE.match(entity_type)):
        raise ExportRequestError(
            f"filter 'entity_type' must be a lowercase identifier ([a-z][a-z0-9_]*, "
            f"at most 64 characters), got {entity_type!r}"
        )

    severities: tuple[str, ...] | None = None
    raw = filters.get("severity")
    if raw is not None:
        values = [raw] if isinstance(raw, str) else raw
        if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
            raise ExportRequestError(
                f"filter 'severity' must be a severity or a non-empty list of them, got {raw!r}"
            )
        bad = [v for v in values if v not in SEVERITIES]
        if bad:
            raise ExportRequestError(
                f"filter 'severity': unknown value(s) {bad!r}; expected {', '.join(SEVERITIES)}"
            )
        severities = tuple(dict.fromkeys(values))

    as_instant = lambda d: dt.datetime(d.year, d.month, d.day, tzinfo=UTC)  # noqa: E731
    return ExportPlan(
        request_id=request_id,
        kind=kind,
        format=fmt,
        start=as_instant(start),
        end=as_instant(end + dt.timedelta(days=1)),
        user_id=user_id,
        entity_type=entity_type,
        severities=severities,
    )


def export_select(conn: psycopg.Connection, plan: ExportPlan) -> str:
    """The SELECT of ``plan`` with its (validated) values merged in as quoted literals (no round trip)."""
    query = load_query(KINDS[plan.kind].query).strip().rstrip(";")
    return psycopg.ClientCursor(conn).mogrify(query, plan.params())


# ------------------------------------------------------------------------------------- request rows


def file_request(
    conn: psycopg.Connection,
    requested_by: str,
    kind: str,
    fmt: str,
    filters: Mapping[str, object] | None = None,
) -> int:
    """Insert a pending request and return its id (one indexed INSERT; the caller's transaction)."""
    row = conn.execute(
        "INSERT INTO data_export (requested_by, kind, format, filters) VALUES (%s, %s, %s, %s) RETURNING id",
        (requested_by, kind, fmt, psycopg.types.json.Jsonb(dict(filters or {}))),
    ).fetchone()
    assert row is not None
    return int(row[0])


def get_request(conn: psycopg.Connection, request_id: int) -> dict[str, Any] | None:
    """The request row as a dict (primary-key lookup), or None."""
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        return cur.execute("SELECT * FROM data_export WHERE id = %s", (request_id,)).fetchone()


def pending_requests(
    conn: psycopg.Connection, limit: int = 200
) -> list[tuple[int, Any, Any, Any, dt.datetime]]:
    """Oldest pending requests (id, kind, format, filters, requested_at), read from the partial pending index."""
    return conn.execute(
        "SELECT id, kind, format, filters, requested_at FROM data_export WHERE status = 'pending' "
        "ORDER BY requested_at, id LIMIT %s",
        (limit,),
    ).fetchall()


def mark_failed(
    conn: psycopg.Connection, request_id: int, error: str, statuses: tuple[str, ...] = ("pending", "running")
) -> bool:
    """Set a request ``failed`` with ``error`` if its status is in ``statuses``; True if it changed.

    One-row UPDATE by primary key, committed by the caller (autocommit connections commit at once).
    """
    cur = conn.execute(
        "UPDATE data_export SET status = 'failed', error = %s, finished_at = now() "
        "WHERE id = %s AND status = ANY(%s)",
        (error[:2000], request_id, list(statuses)),
    )
    return cur.rowcount == 1


def mark_run_ended(
    conn: psycopg.Connection, request_id: int, run_id: str | Sequence[str], error: str
) -> bool:
    """Mark a request ``failed`` because its run ``run_id`` failed or was canceled.

    ``run_id`` may be several ids: the run and the runs it re-executes (an automatic retry that died
    before its op started leaves the request claimed by its parent run). Only while the request is still
    ``pending``/``running`` and not claimed by another run (a late notice about an old run must not fail
    a retry in progress). One-row UPDATE; True if it changed.
    """
    run_ids = [run_id] if isinstance(run_id, str) else [r for r in run_id if r]
    cur = conn.execute(
        "UPDATE data_export SET status = 'failed', error = %s, finished_at = now() "
        "WHERE id = %s AND status IN ('pending', 'running') AND (run_id IS NULL OR run_id = ANY(%s))",
        (error[:2000], request_id, [r[:64] for r in run_ids]),
    )
    return cur.rowcount == 1


def retention_months_from(settings: object) -> dict[str, int]:
    """kind → months kept online, from a :class:`perf_pipeline.settings.Settings`."""
    return {kind: int(getattr(settings, spec.retention_setting)) for kind, spec in KINDS.items()}


# ------------------------------------------------------------------------------------------- files


class _HashingSink(io.RawIOBase):
    """Writes to a file descriptor through a 1 MiB buffer, hashing and counting what passes.

    Also the sink of GzipFile and pyarrow's ParquetWriter. It owns its buffer (rather than wrapping the
    descriptor in a BufferedWriter) so that an abandoned export never flushes stale bytes later, from a
    garbage collector, into a descriptor number that may by then belong to another file.
    """

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd
        self._buffer = bytearray()
        self.sha256 = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:  # type: ignore[override]
        view = memoryview(data).cast("B")
        self.sha256.update(view)
        self._buffer += view
        self.size += len(view)
        if len(self._buffer) >= WRITE_BUFFER_BYTES:
            self.flush()
        return len(view)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        view = memoryview(self._buffer)
        while view:
            view = view[os.write(self._fd, view) :]
        view.release()
        self._buffer.clear()

    def close(self) -> None:
        # GzipFile and pyarrow close their sink when done; the descriptor stays open for fsync and link
        if not self.closed:
            self.flush()
        super().close()

    def abort(self) -> None:
        """Drop unwritten bytes and close without writing (also makes the collector's close a no-op)."""
        self._buffer.clear()
        super().close()


class _AtomicFile:
    """A file that becomes visible under ``final`` only on :meth:`commit`, complete and fsynced.

    Prefers ``O_TMPFILE`` (an unnamed inode: nothing to clean after SIGKILL), else a hidden named
    ``.export-<id>-<random>.part`` next to the target, which :func:`sweep_leftovers` removes on retry.
    """

    def __init__(self, final: Path, request_id: int) -> None:
        self.final = final
        self.folder = final.parent
        self.part: Path | None = None
        tag = f".export-{request_id}-{secrets.token_hex(4)}"
        self._tag = tag
        try:
            self.fd = os.open(self.folder, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o640)
        except (AttributeError, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
            self.part = self.folder / f"{tag}.part"
            self.fd = os.open(self.part, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o640)

    def commit(self) -> None:
        """fsync the data, put it in place atomically (replacing an older file), fsync the folder."""
        os.fsync(self.fd)
        dir_fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if self.part is None:
                staged = self.folder / f"{self._tag}.link"
                # linkat(AT_SYMLINK_FOLLOW) gives the unnamed inode a (hidden) name; passing dst_dir_fd
                # makes Python call linkat rather than link(), which would not follow /proc's symlink
                os.link(f"/proc/self/fd/{self.fd}", staged.name, dst_dir_fd=dir_fd, follow_symlinks=True)
            else:
                staged = self.part
            os.replace(staged, self.final)  # atomic, replaces the file of an earlier attempt
            self.part = None
            os.close(self.fd)
            self.fd = -1
            os.fsync(dir_fd)  # make the new name itself durable
        finally:
            os.close(dir_fd)

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.part is not None:
            self.part.unlink(missing_ok=True)
            self.part = None


def sweep_leftovers(export_dir: Path, request_id: int) -> list[Path]:
    """Remove hidden temp names left by killed attempts at ``request_id`` (call only under its lock)."""
    removed = []
    for path in export_dir.glob(f".export-{request_id}-*"):
        if path.suffix in (".part", ".link"):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


# ----------------------------------------------------------------------------------------- streaming


def _write_csv_gz(
    messages: Iterator[Any], sink: _HashingSink, progress: Progress, report: Callable[[], None]
) -> None:
    with gzip.GzipFile(fileobj=sink, mode="wb", compresslevel=GZIP_LEVEL, mtime=0) as gz:
        buffer = bytearray()
        for chunk in messages:
            buffer += chunk
            progress.rows += 1
            if len(buffer) >= WRITE_BUFFER_BYTES:
                gz.write(buffer)
                progress.csv_bytes += len(buffer)
                buffer.clear()
                report()
        gz.write(buffer)
        progress.csv_bytes += len(buffer)
        report()


def _write_parquet(
    messages: Iterator[Any],
    sink: _HashingSink,
    spec: ExportKind,
    progress: Progress,
    report: Callable[[], None],
) -> None:
    """Parse COPY's CSV in blocks of ~PARQUET_BLOCK_BYTES into Arrow, write row groups as they fill.

    Each COPY message is one whole row, so a block cut between messages never splits a row (even one
    with newlines inside a quoted field): every block is a self-contained CSV document, parsed by the
    conversion the archive uses too (:func:`perf_pipeline.lib.pgcsv.parse`: only an unquoted empty field is
    NULL, never text such as ``NA`` or ``null``; timestamps come as naive UTC, see :func:`_stream`).
    """
    with pq.ParquetWriter(sink, spec.schema, compression="zstd") as writer:
        tables: list[pa.Table] = []
        rows = 0
        buffer = bytearray()

        def parse_block() -> None:
            nonlocal rows
            if buffer:
                table = pgcsv.parse(bytes(buffer), spec.schema)
                progress.csv_bytes += len(buffer)
                buffer.clear()
                tables.append(table)
                rows += table.num_rows
                report()

        def write_group() -> None:
            nonlocal rows
            if tables:
                writer.write_table(pa.concat_tables(tables))  # zero-copy: one row group from the chunks
                tables.clear()
                rows = 0

        for chunk in messages:
            buffer += chunk
            progress.rows += 1
            if len(buffer) >= PARQUET_BLOCK_BYTES:
                parse_block()
                if rows >= PARQUET_ROW_GROUP_ROWS:
                    write_group()
        parse_block()
        write_group()  # an empty result still gets a valid file: schema, no row groups


def _lock(
    conn: psycopg.Connection,
    request_id: int,
    wait_s: float = 0.0,
    on_wait: Callable[[], None] | None = None,
) -> bool:
    """Take the request's session advisory lock; True if held. With ``wait_s`` > 0, wait that long for it
    (a server-side wait bounded by ``lock_timeout``, no polling), calling ``on_wait`` first."""
    key = (ADVISORY_LOCK_CLASS, request_id % 2_147_483_647)
    row = conn.execute("SELECT pg_try_advisory_lock(%s, %s)", key).fetchone()
    if (row and row[0]) or wait_s <= 0:
        return bool(row and row[0])
    if on_wait is not None:
        on_wait()
    previous = conn.execute(
        "SELECT current_setting('lock_timeout'), set_config('lock_timeout', %s, false)",
        (str(max(1, int(wait_s * 1000))),),
    ).fetchone()
    try:
        conn.execute("SELECT pg_advisory_lock(%s, %s)", key)
        return True
    except psycopg.errors.LockNotAvailable:
        return False
    finally:
        conn.execute("SELECT set_config('lock_timeout', %s, false)", (previous[0] if previous else "0",))


def run_export(
    url: str,
    request_id: int,
    export_dir: Path,
    *,
    statement_timeout_s: int,
    retention_months: Mapping[str, int],
    run_id: str = "cli",
    today: dt.date | None = None,
    progress: ProgressCallback | None = None,
    progress_every_bytes: int = PROGRESS_EVERY_BYTES,
    max_mb_per_s: float = 0.0,
    lock_wait_s: float = 0.0,
    on_lock_wait: Callable[[], None] | None = None,
) -> ExportResult:
    """Export request ``request_id`` to ``export_dir`` and record the outcome on the request.

    Cost: one sequential scan of the partitions in the date range (``COPY … TO STDOUT``, one backend, no
    parallel workers), client CPU for gzip or Parquet encoding, and the file's size on disk; memory stays
    at a few MiB (csv.gz) or a few blocks plus one row group (parquet). Locks: ACCESS SHARE on the scanned
    partitions for the duration of the COPY (``lock_timeout`` 2 s to get it), a session advisory lock on
    the request id, and row locks of the one-row status updates.

    ``max_mb_per_s`` (> 0) paces the stream to that many MB of CSV per second: the client reads slower and
    the server's COPY waits on its socket, so an export takes at most about half a core on a 2-core server
    instead of a whole one; the COPY lasts longer (``statement_timeout_s`` must allow size / rate).

    A succeeded request is returned as recorded (not exported again). Another process holding the
    request (an earlier attempt still ending) is waited for up to ``lock_wait_s`` seconds (0: not at all;
    ``on_lock_wait`` is called when the wait starts). Raises :class:`ExportRequestError` (request marked
    ``failed``), :class:`ExportBusyError` (another process still holds the request), or the error that
    interrupted the export (request marked ``failed``, temp file removed).
    """
    today = today or dt.datetime.now(UTC).date()
    export_dir.mkdir(parents=True, exist_ok=True)
    with connect(url, autocommit=True, application_name="perf_pipeline.export") as conn:
        idle, interval, count = TCP_KEEPALIVES
        conn.execute(
            "SELECT set_config('tcp_keepalives_idle', %s, false), "
            "set_config('tcp_keepalives_interval', %s, false), set_config('tcp_keepalives_count', %s, false)",
            (str(idle), str(interval), str(count)),
        )
        if not _lock(conn, request_id, lock_wait_s, on_lock_wait):
            raise ExportBusyError(f"export request {request_id} is being run by another process")
        req = get_request(conn, request_id)
        if req is None:
            raise ExportRequestError(f"no export request with id {request_id}")
        if req["status"] == "succeeded":
            return ExportResult(
                request_id,
                Path(req["file_path"]),
                req["rows"],
                req["bytes"],
                req["csv_bytes"] or 0,
                req["sha256"],
                0.0,
                status="succeeded",
            )
        sweep_leftovers(export_dir, request_id)
        try:
            plan = validate_request(
                request_id,
                req["kind"],
                req["format"],
                req["filters"],
                today=today,
                retention_months=retention_months,
            )
        except ExportRequestError as exc:
            mark_failed(conn, request_id, str(exc), statuses=("pending", "running", "failed"))
            raise
        conn.execute(
            "UPDATE data_export SET status = 'running', started_at = now(), finished_at = NULL, error = NULL, "
            "attempts = attempts + 1, run_id = %s WHERE id = %s",
            (run_id[:64], request_id),
        )
        try:
            result = _stream(
                conn, plan, export_dir, statement_timeout_s, progress, progress_every_bytes, max_mb_per_s
            )
        except BaseException as exc:  # also KeyboardInterrupt / Dagster's interrupt: record why, re-raise
            message = f"{type(exc).__name__}: {exc}".strip().rstrip(":")
            with contextlib.suppress(Exception):
                if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                    conn.rollback()
                mark_failed(conn, request_id, message)
            raise
        conn.execute(
            "UPDATE data_export SET status = 'succeeded', finished_at = now(), file_path = %s, rows = %s, "
            "bytes = %s, csv_bytes = %s, sha256 = %s, error = NULL WHERE id = %s",
            (str(result.path), result.rows, result.bytes, result.csv_bytes, result.sha256, request_id),
        )
        return result


def _stream(
    conn: psycopg.Connection,
    plan: ExportPlan,
    export_dir: Path,
    statement_timeout_s: int,
    progress_cb: ProgressCallback | None,
    progress_every_bytes: int,
    max_mb_per_s: float = 0.0,
) -> ExportResult:
    spec = KINDS[plan.kind]
    final = export_dir / plan.filename
    progress = Progress()
    next_report = [progress_every_bytes]
    started = time.monotonic()

    def report() -> None:
        if max_mb_per_s > 0:  # pace: never ahead of max_mb_per_s since the start
            ahead = progress.csv_bytes / (max_mb_per_s * 1e6) - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
        if progress_cb is not None and progress.csv_bytes >= next_report[0]:
            next_report[0] = progress.csv_bytes + progress_every_bytes
            progress_cb(progress)

    select = sql.SQL(export_select(conn, plan))  # type: ignore[arg-type]
    if plan.format == "csv.gz":  # PostgreSQL's CSV as is, with a header; timestamps with their +00
        statement = sql.SQL("COPY ({}) TO STDOUT (FORMAT csv, HEADER true)").format(select)
    else:  # for pgcsv.parse: no header, timestamptz as naive UTC text (the plan is the same: a subquery)
        statement = sql.SQL("COPY (SELECT {} FROM ({}) AS export) TO STDOUT (FORMAT csv)").format(
            pgcsv.select_list(spec.schema), select
        )
    target = _AtomicFile(final, plan.request_id)
    sink = _HashingSink(target.fd)
    try:
        with conn.transaction():
            conn.execute(
                "SELECT set_config('statement_timeout', %s, true), set_config('lock_timeout', %s, true), "
                "set_config('max_parallel_workers_per_gather', '0', true), set_config('TimeZone', 'UTC', true), "
                "set_config('transaction_read_only', 'on', true)",
                (str(statement_timeout_s * 1000), str(LOCK_TIMEOUT_MS)),
            )
            with conn.cursor() as cur:
                with cur.copy(statement) as copy:
                    if plan.format == "csv.gz":
                        _write_csv_gz(iter(copy), sink, progress, report)
                    else:
                        _write_parquet(iter(copy), sink, spec, progress, report)
                rows = cur.rowcount  # COPY's command tag: exact, whatever newlines are inside the fields
            if rows < 0:
                raise RuntimeError("COPY ended without reporting its row count")
        sink.close()
        size, digest = sink.size, sink.sha256.hexdigest()
        target.commit()
    except BaseException:
        sink.abort()
        target.discard()
        raise
    if progress_cb is not None:
        progress.rows = rows
        progress_cb(progress)
    log.info(
        "export %d: %d rows, %d CSV bytes → %s (%d bytes) in %.2f s",
        plan.request_id,
        rows,
        progress.csv_bytes,
        final,
        size,
        progress.seconds,
    )
    return ExportResult(plan.request_id, final, rows, size, progress.csv_bytes, digest, progress.seconds)


def describe(req: Mapping[str, Any]) -> str:
    """A human-readable summary of a request row (for the CLI)."""
    lines = [f"{k}: {json.dumps(v) if k == 'filters' else v}" for k, v in req.items() if v is not None]
    return "\n".join(lines)
