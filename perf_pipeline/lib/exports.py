"""Background exports of usage_log / audit_log: validate a request, stream it to a file, record the result.

A request is a ``data_export`` row (filed by the platform or :func:`file_request`). :func:`run_export`
turns it into a file under the export folder:

* **Validation first.** ``kind``, ``format`` and ``filters`` come from users, who may write anything into
  the table. :func:`validate_request` accepts a fixed set of filter keys with typed values (``user_id``
  UUID, ``start``/``end`` dates between the retention floor and tomorrow, ``entity_type`` and ``severity``
  for audit_log); anything else, of any JSON shape or size, raises :class:`ExportRequestError` with a
  one-line message of bounded length that is stored on the request (status ``failed``). Requests are read
  with a jsonb loader that never fails (:func:`load_json`), so one odd row cannot fail a read of many.
* **Streaming, bounded memory.** ``COPY (SELECT …) TO STDOUT (FORMAT csv)`` is read message by message and
  written through gzip (``csv.gz``) or parsed in bounded blocks by pyarrow's CSV reader into record
  batches for a ``ParquetWriter`` (``parquet``), with the conversion the archive uses
  (:mod:`perf_pipeline.lib.pgcsv`: only an unquoted empty field is NULL). Memory is a few blocks,
  whatever the export's size.
* **Not in the platform's way.** The COPY runs in a READ ONLY transaction with ``statement_timeout``, a
  short ``lock_timeout`` (it never queues behind a DDL, nor makes DDL queue behind it for long) and no
  parallel workers (one backend, one core); partitions outside the date range are pruned at plan time.
* **Atomic files, on disk or on S3.** The export location (``PERF_PIPELINE_EXPORT_DIR``: a folder or an
  ``s3://bucket/prefix``) is a :class:`perf_pipeline.lib.storage.Store`, checked before the request is
  claimed. On disk, data goes to an anonymous ``O_TMPFILE`` in the export folder (a named hidden
  ``.export-<id>-*.part`` where the filesystem lacks O_TMPFILE), is fsynced, then linked/renamed into place
  and the folder fsynced; on S3 it is uploaded under ``.tmp/`` and copied to its final key once complete.
  A killed process leaves no visible file; a failed run removes its temp file; a retry sweeps leftovers of
  earlier attempts of the same request. ``file_path`` records the URI, ``etag`` the store's ETag.
* **One process per request.** A session advisory lock keyed by the request id serializes attempts; it
  dies with the connection, so a killed run never blocks its retry (the session asks for TCP keepalives
  so that PostgreSQL also notices a client that vanished without closing its socket). A retry may wait
  for the lock (``lock_wait_s``): if the earlier attempt then finished, its recorded result is returned.
* **A vanished worker is noticed.** The lock is held from before the claim until the outcome is recorded,
  so a ``running`` request whose lock nobody holds was left by a dead process (:func:`find_orphans`, which
  only reads ``pg_locks``). :func:`sweep_orphans` (called by the sensor every tick) puts such a request back
  to ``pending`` once it has stayed so for a grace period, or fails it after a maximum number of attempts.

Status goes ``pending → running → succeeded | failed`` (and ``running → pending`` when the worker vanished);
a ``failed`` or stuck ``running`` request can be run again (a succeeded one is returned as is).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gzip
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import psycopg
import psycopg.rows
import psycopg.types.json
import pyarrow as pa
import pyarrow.parquet as pq
from psycopg import sql

from perf_pipeline.lib import pgcsv
from perf_pipeline.lib.calendar import day_start, retention_floor
from perf_pipeline.lib.db import Locks, connect, load_query, try_advisory_lock
from perf_pipeline.lib.storage import HashingSink, Store, open_store

log = logging.getLogger(__name__)

UTC = dt.UTC
FORMATS: tuple[str, ...] = ("csv.gz", "parquet")
SEVERITIES: tuple[str, ...] = ("low", "medium", "high", "critical")
_ENTITY_TYPE = re.compile(r"[a-z][a-z0-9_]{0,63}")
#: progress is reported every this many uncompressed bytes
PROGRESS_EVERY_BYTES = 16 << 20
#: gzip level 1: ~4x smaller than raw CSV at several times the speed of level 6 (the export is
#: CPU-bound on the client, and the client shares the machine with PostgreSQL)
GZIP_LEVEL = 1
#: uncompressed bytes gathered before one gzip write (amortizes per-call overhead)
WRITE_BUFFER_BYTES = 1 << 20
#: the setting exports are written under (named in storage errors)
SETTING = "PERF_PIPELINE_EXPORT_DIR"
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
    uri: str  # where the file is: a local path, or s3://bucket/key (data_export.file_path)
    rows: int
    bytes: int  # file size
    csv_bytes: int  # uncompressed CSV streamed by COPY
    sha256: str
    seconds: float
    status: str = "succeeded"
    etag: str | None = None

    @property
    def path(self) -> Path:
        """The file, when it is on local disk (ValueError for an object-storage URI)."""
        if "://" in self.uri:
            raise ValueError(f"{self.uri} is not a local file")
        return Path(self.uri)

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


#: the longest value shown in an error message (a request may hold megabytes of text)
SHOWN_CHARS = 80


def _show(value: object) -> str:
    """``repr`` of a user-supplied value, cut to SHOWN_CHARS: one line, bounded, whatever the input."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}… ({len(text):,} characters)"


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


class UnreadableJSON(str):
    """Stands for a JSON value Python's parser cannot load (nested deeper than its recursion limit, which
    PostgreSQL's jsonb allows): its first characters, so the request can still be shown; validation
    rejects it."""


def load_json(data: str | bytes) -> object:
    """``json.loads`` that never raises: unloadable text becomes :class:`UnreadableJSON`. Installed as the
    jsonb loader of the cursors reading requests, so one deep ``filters`` value cannot fail a whole read."""
    try:
        return json.loads(data)
    except (RecursionError, ValueError):
        text = data.decode(errors="replace") if isinstance(data, bytes) else data
        return UnreadableJSON(text[:200])


def requester_uuid(value: object) -> str:
    """``value`` as a canonical UUID string, or :class:`ExportRequestError` naming it."""
    if not isinstance(value, str):
        raise ExportRequestError(f"requested_by must be a UUID string, got {_show(value)}")
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise ExportRequestError(f"requested_by is not a UUID: {_show(value)}") from None


def _date(key: str, value: object) -> dt.date:
    # ASCII digits only (\d would take any script's digits), and no more than date.fromisoformat allows
    if not isinstance(value, str) or not re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", value):
        raise ExportRequestError(f"filter {key!r} must be a date string YYYY-MM-DD, got {_show(value)}")
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise ExportRequestError(f"filter {key!r} is not a valid date: {_show(value)}") from None


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
    identifier) and ``severity`` (one of low/medium/high/critical, or a list of them). Both dates must lie
    between the retention floor and tomorrow (UTC: a client ahead of UTC may already be there).
    ``retention_months`` maps kind → months kept online. Raises :class:`ExportRequestError`, whose message
    is one line of bounded length, for any value of any type (a client may write anything into the table).
    """
    if not isinstance(kind, str) or kind not in KINDS:
        raise ExportRequestError(f"unknown kind {_show(kind)}; expected one of {', '.join(KINDS)}")
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise ExportRequestError(f"unknown format {_show(fmt)}; expected one of {', '.join(FORMATS)}")
    if isinstance(filters, UnreadableJSON):
        raise ExportRequestError(
            "filters cannot be read (JSON nested too deeply, or a number too long); expected a flat JSON object"
        )
    if not isinstance(filters, dict):
        raise ExportRequestError(f"filters must be a JSON object, got {_json_type(filters)}")
    spec = KINDS[kind]
    unknown = sorted(set(filters) - spec.filter_keys)
    if unknown:
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise ExportRequestError(
            f"unknown filter key(s) for {kind}: {', '.join(map(_show, unknown[:5]))}{more}; "
            f"allowed: {', '.join(sorted(spec.filter_keys))}"
        )

    user_id = filters.get("user_id")
    if user_id is not None:
        if not isinstance(user_id, str):
            raise ExportRequestError(f"filter 'user_id' must be a UUID string, got {_show(user_id)}")
        try:
            user_id = str(uuid.UUID(user_id))
        except ValueError:
            raise ExportRequestError(f"filter 'user_id' is not a UUID: {_show(user_id)}") from None

    months = retention_months[kind]
    # older months may already be archived and dropped: an export of them would be silently incomplete
    floor = retention_floor(today, months)
    latest = today + dt.timedelta(days=1)
    accepted = (
        f"dates must be between {floor} and {latest} (UTC days: the oldest one {kind} keeps online, "
        "and tomorrow)"
    )
    start = _date("start", filters["start"]) if filters.get("start") is not None else floor
    end = _date("end", filters["end"]) if filters.get("end") is not None else today
    for key, day in (("start", start), ("end", end)):
        if day < floor:
            raise ExportRequestError(
                f"{key} {day} is beyond the retention of {kind} ({months} months: rows before {floor} may "
                f"be archived); {accepted}"
            )
        if day > latest:
            raise ExportRequestError(f"{key} {day} is in the future; {accepted}")
    if start > end:
        raise ExportRequestError(f"start {start} is after end {end}")

    entity_type = filters.get("entity_type")
    if entity_type is not None and (
        not isinstance(entity_type, str) or not _ENTITY_TYPE.fullmatch(entity_type)
    ):
        raise ExportRequestError(
            f"filter 'entity_type' must be a lowercase identifier ([a-z][a-z0-9_]*, "
            f"at most 64 characters), got {_show(entity_type)}"
        )

    severities: tuple[str, ...] | None = None
    raw = filters.get("severity")
    if raw is not None:
        values = [raw] if isinstance(raw, str) else raw
        if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
            raise ExportRequestError(
                f"filter 'severity' must be a severity or a non-empty list of them, got {_show(raw)}"
            )
        bad = [v for v in values if v not in SEVERITIES]
        if bad:
            raise ExportRequestError(
                f"filter 'severity': unknown value(s) {_show(bad)}; expected {', '.join(SEVERITIES)}"
            )
        severities = tuple(dict.fromkeys(values))

    return ExportPlan(
        request_id=request_id,
        kind=kind,
        format=fmt,
        start=day_start(start),
        end=day_start(end + dt.timedelta(days=1)),
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
    """Insert a pending request and return its id (one indexed INSERT; the caller's transaction).

    ``requested_by`` must be a UUID (else :class:`ExportRequestError`, before any SQL); kind, format and
    filters are validated when the request is launched (the platform may file anything)."""
    row = conn.execute(
        "INSERT INTO data_export (requested_by, kind, format, filters) VALUES (%s, %s, %s, %s) RETURNING id",
        (requester_uuid(requested_by), kind, fmt, psycopg.types.json.Jsonb(dict(filters or {}))),
    ).fetchone()
    assert row is not None
    return int(row[0])


def get_request(conn: psycopg.Connection, request_id: int) -> dict[str, Any] | None:
    """The request row as a dict (primary-key lookup), or None. ``filters`` that Python cannot load come
    back as :class:`UnreadableJSON`."""
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        psycopg.types.json.set_json_loads(load_json, cur)
        return cur.execute("SELECT * FROM data_export WHERE id = %s", (request_id,)).fetchone()


class PendingRequest(NamedTuple):
    id: int
    kind: str
    format: str
    filters: Any  # any JSON value (or UnreadableJSON): validated by validate_request
    requested_at: dt.datetime
    attempts: int  # claims so far (0 for a new request, more for a re-queued one)


def pending_requests(conn: psycopg.Connection, limit: int = 200) -> list[PendingRequest]:
    """Oldest pending requests, read from the partial pending index. Never fails on a row's content."""
    with conn.cursor() as cur:
        psycopg.types.json.set_json_loads(load_json, cur)  # one deeply nested filters must not fail the read
        rows = cur.execute(
            "SELECT id, kind, format, filters, requested_at, attempts FROM data_export "
            "WHERE status = 'pending' ORDER BY requested_at, id LIMIT %s",
            (limit,),
        ).fetchall()
    return [PendingRequest(*row) for row in rows]


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
    conn: psycopg.Connection,
    request_id: int,
    run_id: str | Sequence[str],
    error: str,
    launched_at_attempts: int | None = None,
) -> bool:
    """Mark a request ``failed`` because its run ``run_id`` failed or was canceled.

    ``run_id`` may be several ids: the run and the runs it re-executes (an automatic retry that died
    before its op started leaves the request claimed by its parent run). Only while the request is still
    ``pending``/``running`` and claimed by one of them, or by no run: then only if it has not been claimed
    since the run was launched (``launched_at_attempts``, the attempt count the run was launched at, when
    known), so that a late notice about an old run never fails a retry in progress or a request re-queued
    after that run died. One-row UPDATE; True if it changed.
    """
    run_ids = [run_id] if isinstance(run_id, str) else [r for r in run_id if r]
    cur = conn.execute(
        "UPDATE data_export SET status = 'failed', error = %(error)s, finished_at = now() "
        "WHERE id = %(id)s AND status IN ('pending', 'running') AND (run_id = ANY(%(runs)s) "
        "OR (run_id IS NULL AND (%(attempts)s::int IS NULL OR attempts = %(attempts)s::int)))",
        {
            "error": error[:2000],
            "id": request_id,
            "runs": [r[:64] for r in run_ids],
            "attempts": launched_at_attempts,
        },
    )
    return cur.rowcount == 1


# ---------------------------------------------------------------------------- requests whose worker died


@dataclass(frozen=True)
class Orphan:
    """A ``running`` request whose advisory lock nobody holds: the process that claimed it is gone."""

    request_id: int
    attempts: int
    run_id: str | None

    @property
    def key(self) -> str:
        """Identifies this orphaned attempt (a new claim makes a new key)."""
        return f"{self.request_id}:{self.attempts}"


def find_orphans(conn: psycopg.Connection) -> tuple[float, list[Orphan]]:
    """Running requests whose worker is gone (their advisory lock is free), and the server's clock (epoch s).

    Read-only: pg_locks is read, no lock is taken, so a worker starting meanwhile is never disturbed. Cost:
    the partial index on running requests and one read of the server's lock table.
    """
    rows = conn.execute(load_query("export_orphaned_requests"), {"lock_class": Locks.EXPORT_CLASS}).fetchall()
    now = float(rows[0][0])
    return now, [Orphan(int(i), int(a), r) for _, i, a, r in rows if i is not None]


def release_orphan(conn: psycopg.Connection, orphan: Orphan, max_attempts: int) -> str | None:
    """Put an orphaned request back to ``pending`` (a new run will claim it), or after ``max_attempts``
    claims mark it ``failed`` with a reason naming the attempts. Returns "requeued", "failed" or None.

    One short transaction holding the request's advisory lock, taken without waiting: since every worker
    takes that lock before it claims a request and keeps it until it has recorded the outcome, holding it
    proves no worker is in the middle of this request; if a worker holds it (it just claimed the request),
    nothing changes. The UPDATE also requires the status and attempt count seen, so a request claimed
    again meanwhile is left alone. A worker asking for the lock during these milliseconds waits for it
    (Dagster runs) or reports the request busy (``export run`` from the command line).
    """
    with conn.transaction():
        row = conn.execute(
            sql.SQL("SELECT pg_try_advisory_xact_lock({})").format(Locks.export(orphan.request_id).args())
        ).fetchone()
        if not (row and row[0]):
            return None
        last = f"attempt {orphan.attempts} (run {orphan.run_id or 'unknown'})"
        gone = (
            "stopped without recording a result: its process is gone (killed, out of memory, or its "
            "connection lost)"
        )
        if orphan.attempts >= max_attempts:
            outcome = "failed"
            cur = conn.execute(
                "UPDATE data_export SET status = 'failed', finished_at = now(), error = %s "
                "WHERE id = %s AND status = 'running' AND attempts = %s",
                (
                    f"gave up after {orphan.attempts} attempts (at most {max_attempts}): {last} {gone}; "
                    f"run it again with `perf-pipeline export run {orphan.request_id}`",
                    orphan.request_id,
                    orphan.attempts,
                ),
            )
        else:
            outcome = "requeued"
            cur = conn.execute(
                "UPDATE data_export SET status = 'pending', run_id = NULL, finished_at = NULL, error = %s "
                "WHERE id = %s AND status = 'running' AND attempts = %s",
                (
                    f"{last} {gone}; queued again (at most {max_attempts} attempts)",
                    orphan.request_id,
                    orphan.attempts,
                ),
            )
    return outcome if cur.rowcount == 1 else None


@dataclass
class SweepResult:
    requeued: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    deferred: list[int] = field(default_factory=list)  # orphaned past the grace, left to a run on its way
    errors: list[tuple[int, str]] = field(default_factory=list)
    seen: dict[str, float] = field(default_factory=dict)  # Orphan.key → server time first seen orphaned


def sweep_orphans(
    conn: psycopg.Connection,
    seen: Mapping[str, float],
    *,
    grace_s: float,
    max_attempts: int,
    defer: Callable[[Orphan], bool] | None = None,
    defer_max_s: float = 0.0,
) -> SweepResult:
    """Re-queue or fail the ``running`` requests whose worker has been gone for ``grace_s`` seconds.

    ``seen`` (kept by the caller between calls, e.g. in a sensor cursor) maps each orphaned attempt to the
    server time it was first seen orphaned; the result's ``seen`` is the map to keep. An attempt orphaned
    for ``grace_s`` is released (:func:`release_orphan`), unless ``defer(orphan)`` says a run that will
    claim it is on its way (Dagster's automatic retry), for at most ``defer_max_s`` beyond the grace. The
    grace lets such a retry, or a step retried in the same run after a lost connection, claim the request
    first. Called every ``tick`` seconds, a request is re-queued or failed at most
    ``session end + tick + grace_s + tick`` after its worker died, where the session ends at once for a
    killed process (its socket closes) and within the TCP keepalive time (:data:`TCP_KEEPALIVES`) for a
    host that vanished. An error on one request is recorded in ``errors`` and the others go on.
    Cost: :func:`find_orphans`, plus one short transaction per released request.
    """
    now, orphans = find_orphans(conn)
    result = SweepResult()
    for orphan in orphans:
        first = seen.get(orphan.key)
        first = float(first) if isinstance(first, int | float) else now
        result.seen[orphan.key] = first
        if now - first < grace_s:
            continue
        try:
            if defer is not None and now - first < grace_s + defer_max_s and defer(orphan):
                result.deferred.append(orphan.request_id)
                continue
            outcome = release_orphan(conn, orphan, max_attempts)
        except Exception as exc:  # one request's trouble must not stop the sweep of the others
            result.errors.append((orphan.request_id, f"{type(exc).__name__}: {exc}"))
            continue
        if outcome is not None:
            del result.seen[orphan.key]
            (result.requeued if outcome == "requeued" else result.failed).append(orphan.request_id)
    return result


def retention_months_from(settings: object) -> dict[str, int]:
    """kind → months kept online, from a :class:`perf_pipeline.settings.Settings`."""
    return {kind: int(getattr(settings, spec.retention_setting)) for kind, spec in KINDS.items()}


# ------------------------------------------------------------------------------------------- files


def _temp_tag(request_id: int) -> str:
    # hidden temp names of a request's attempts: .export-<id>-<random>.part (what a retry sweeps)
    return f".export-{request_id}"


def sweep_leftovers(export_dir: Store | str | os.PathLike[str], request_id: int) -> list[str]:
    """Remove temporary names left by killed attempts at ``request_id`` (call only under its lock). The
    export's writer does this itself before it writes; this is for an operator's cleanup."""
    store = open_store(export_dir, SETTING)
    # a key at the top of the folder: the sweep looks in that folder for the tag .export-<id>
    return store.sweep_temps(f"export-{request_id}", _temp_tag(request_id))


# ----------------------------------------------------------------------------------------- streaming


def _write_csv_gz(
    messages: Iterator[Any], sink: HashingSink, progress: Progress, report: Callable[[], None]
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
    sink: HashingSink,
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
    """Take the request's session advisory lock (:meth:`Locks.export`); True if held. With ``wait_s`` > 0,
    wait that long for it (a server-side wait bounded by ``lock_timeout``, no polling), calling ``on_wait``
    first. Released with the session (the process that runs the export keeps it to the end)."""
    key = Locks.export(request_id)
    if try_advisory_lock(conn, key):
        return True
    if wait_s <= 0:
        return False
    if on_wait is not None:
        on_wait()
    return try_advisory_lock(conn, key, wait_s=wait_s)


def run_export(
    url: str,
    request_id: int,
    export_dir: Store | str | os.PathLike[str],
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
    """Export request ``request_id`` to ``export_dir`` (a folder, ``s3://bucket/prefix`` or a
    :class:`Store`) and record the outcome on the request.

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
    interrupted the export (request marked ``failed``, temp file removed). The location is checked
    (:meth:`Store.check`) after the request is validated and before it is claimed: an unusable one raises
    :class:`perf_pipeline.lib.storage.StorageError` naming PERF_PIPELINE_EXPORT_DIR, the request untouched.
    """
    today = today or dt.datetime.now(UTC).date()
    store = open_store(export_dir, SETTING)
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
                req["file_path"],
                req["rows"],
                req["bytes"],
                req["csv_bytes"] or 0,
                req["sha256"],
                0.0,
                status="succeeded",
                etag=req.get("etag"),
            )
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
        store.check()  # before the claim: a bad location leaves the request as it was
        conn.execute(
            "UPDATE data_export SET status = 'running', started_at = now(), finished_at = NULL, error = NULL, "
            "attempts = attempts + 1, run_id = %s WHERE id = %s",
            (run_id[:64], request_id),
        )
        try:
            result = _stream(
                conn, plan, store, statement_timeout_s, progress, progress_every_bytes, max_mb_per_s
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
            "bytes = %s, csv_bytes = %s, sha256 = %s, etag = %s, error = NULL WHERE id = %s",
            (result.uri, result.rows, result.bytes, result.csv_bytes, result.sha256, result.etag, request_id),
        )
        return result


def _stream(
    conn: psycopg.Connection,
    plan: ExportPlan,
    store: Store,
    statement_timeout_s: int,
    progress_cb: ProgressCallback | None,
    progress_every_bytes: int,
    max_mb_per_s: float = 0.0,
) -> ExportResult:
    spec = KINDS[plan.kind]
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
    # sweeps what killed attempts at this request left, then writes where nothing is visible until commit
    target = store.writer(plan.filename, temp_tag=_temp_tag(plan.request_id))
    sink = target.sink
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
        size, digest = sink.size, sink.sha256.hexdigest()
        info = target.commit()
    except BaseException:
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
        info.uri,
        size,
        progress.seconds,
    )
    return ExportResult(
        plan.request_id, info.uri, rows, size, progress.csv_bytes, digest, progress.seconds, etag=info.etag
    )


def describe(req: Mapping[str, Any]) -> str:
    """A human-readable summary of a request row (for the CLI)."""
    lines = [f"{k}: {json.dumps(v) if k == 'filters' else v}" for k, v in req.items() if v is not None]
    return "\n".join(lines)
