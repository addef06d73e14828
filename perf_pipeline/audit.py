"""The platform-side audit writer: ``log()`` in microseconds, batched ``COPY`` in background threads.

The platform calls :meth:`AuditWriter.log` on the request path. It validates the event against
``audit_log``'s constraints (so a bad event fails *there*, with a clear :class:`AuditEventError`, never
later in the background), gives it a client-side UUIDv7 id and its timestamp, renders it as one line of
``COPY`` text and appends it to an in-memory queue. No I/O, no database round trip: a few microseconds.

A daemon thread (the flusher) delivers the queue in batches (``batch_size`` events, or every
``flush_interval_ms``), each batch in its own short transaction; between batches no transaction is open.
With a spool, a second daemon thread (the spooler) moves the queue to the spool and the flusher only sends
what the spooler wrote (below). Nothing is created in the schema (no tables, no partitions): a batch lands
in whichever ``audit_log`` partition covers its timestamps, or in ``audit_log_default``.

Delivery is idempotent. The id and timestamp are fixed at ``log()`` time, so the primary key
``(id, "timestamp")`` of an event is the same on every attempt. The first attempt of a batch (its ids
are fresh: nothing can hold them yet) is a plain ``COPY`` into audit_log. Every *re-send* — after any
failed attempt, whose ``COMMIT`` may or may not have happened, and every segment replayed from a previous
process's spool — is ``COPY``-ed into a session-private ``TEMP`` staging table (created once per
connection, ``ON COMMIT DELETE ROWS``) and moved with ``INSERT … SELECT … ON CONFLICT DO NOTHING``: a
batch whose commit succeeded but whose acknowledgement never arrived (connection lost at ``COMMIT``,
process killed after ``COMMIT``) writes nothing twice. Rows skipped that way are counted as
``duplicates_skipped``.

Spool (``spool_dir``, recommended): an append-only local folder of segment files, each the ``COPY`` text
of at most ``batch_size`` events, named by a sequence number. The spooler thread wakes every
``flush_interval_ms`` (at once when ``batch_size`` events are queued, or on :meth:`flush`/:meth:`close`)
and writes what is queued to new segments — taken under the writer's lock with their sequence numbers
(a list swap), written outside it, so ``log()`` never waits for a file write on this path. It never
waits for the database. The flusher sends the segments in sequence order (write-ahead: a segment exists
before its batch is sent) and deletes each only after ``COMMIT`` returned. So:

* database slow, locked or unreachable → the queue still goes to disk every interval; segments wait there
  (memory stays bounded) and are delivered **in order** (by sequence number) once it answers, with
  backoff retries (50 ms doubling to 5 s);
* process killed → the next ``AuditWriter`` on the same folder replays the segments first, in order,
  through the idempotent path;
* fsync policy: segments are written with one ``write()`` and renamed into place, not fsynced by default
  (``spool_fsync=False``): they survive a process crash or SIGKILL (the kernel holds the data), not a
  power loss. ``spool_fsync=True`` fsyncs each segment and the folder (~1–10 ms per segment, on the
  spooler thread, never on ``log()``'s normal path).
* an exclusive ``flock`` on ``<spool_dir>/.lock`` keeps two live writers from sharing one folder.
* spool disk full (a segment write fails): the batch stays in memory and is delivered from there if the
  database is up; no further batch is taken until its segment is written (retried every pass) or it is
  delivered, so memory holds one such batch plus the bounded queue (plus, if the failing write was a
  late spill's, below, what that spill took: at most one queue's worth); ``spool_write_failures`` counts
  the failures.

What a SIGKILL can lose — with a spool: only what is still queued in memory, i.e. events accepted by
``log()`` in about the last ``flush_interval_ms`` (plus the spooler's write in progress), **whatever the
load and whatever the database does**: the spooler drains the queue every interval, and if it is ever late
(starved of the GIL by busy producers, a slow disk) the producer that finds a queued event older than
``flush_interval_ms + max(flush_interval_ms, 50 ms)`` takes the whole queue (a list swap under the lock)
and writes it to segments itself after releasing the lock (~1 ms per ``batch_size`` events in that one
``log()`` call; counted in ``spilled``). Measured (``python -m bench audit_writer``, SIGKILL rows: a
child with 4 producer threads, saturating or paced at 50k/s, killed after a random 1–3 s; 120 kills over
3 runs at 30–42k events/s on a shared 2-core machine; the default 50 ms interval): the oldest event lost
was 30–44 ms old at the kill at the median, **76 ms at most** (≤ 3.8k events), 0 duplicates; before the
spooler thread, 0.1–0.56 s at the median and up to 1.5 s (≤ 55k events). Without a spool: everything in
memory (the queue, up to ``max_queue`` events, and the batch in flight). Call :meth:`flush` after an event
that must not be lost, before answering the request.

``close()`` while a delivery is stuck (lock wait, slow server, half-open TCP; the connection uses TCP
keepalives and ``tcp_user_timeout`` so a dead peer is noticed in about 30 s): the spooler's last pass has
written the queue to the spool, and the closing thread saves whatever is left (without a spool: counts it as
dropped, logged at ERROR), so nothing accepted lives only in the memory of a thread that dies at
interpreter exit.

Full queue (``max_queue`` events or ``max_queue_bytes`` bytes in memory: without a spool, the flusher is
stuck in a slow connect or ``COPY``; with one, the spooler cannot write fast enough or at all):

* with a spool: **spill** — the producer that finds the queue full writes the oldest ``batch_size``
  queued events to a new spool segment (one file write, ~1 ms, under the writer's lock) and goes on;
  order is kept because sequence numbers are taken under that lock (if that write fails, it falls back
  to blocking, below);
* without a spool: **block** up to ``put_timeout`` seconds for room, then raise :class:`AuditQueueFull`;
  the event is counted in ``dropped``. In async code pass ``put_timeout=0`` so ``log()`` never blocks
  the event loop.

Processes: create the writer in the process that logs (after a fork, e.g. in each gunicorn worker); a
forked child inherits no flusher or spooler thread. Each process needs its own ``spool_dir``.

Async code: ``log()`` is safe to call directly from a coroutine (no I/O, no await needed);
:meth:`aflush` and :meth:`aclose` run the blocking waits in a worker thread.

Events whose row the database still refuses (a constraint stricter than the validation here) are retried
one by one so the rest of their batch goes in; the refused lines are appended to
``<spool_dir>/rejected.copy`` (or logged at ERROR without a spool) and counted in ``rejected``.

Metrics: :meth:`AuditWriter.metrics` per writer, and the module-level :func:`metrics` summing every live
writer of the process (for the health report).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import fcntl
import functools
import ipaddress
import json
import logging
import os
import random
import re
import socket
import threading
import time
import uuid
import weakref
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import errors

from perf_pipeline.lib.db import connect
from perf_pipeline.lib.stats import percentile
from perf_pipeline.settings import Settings, get_settings

log = logging.getLogger(__name__)

#: the column order of every COPY line (and of spool segments)
COLUMNS: tuple[str, ...] = (
    "id",
    "timestamp",
    "user_id",
    "entity_type",
    "entity_id",
    "event_type",
    "operation",
    "severity",
    "description",
    "details",
    "ip",
)
SEVERITIES: frozenset[str] = frozenset({"low", "medium", "high", "critical"})
# (field, min chars, max chars) — mirrors the CHECK constraints of audit_log in 0001_core_schema.sql
LIMITS: dict[str, tuple[int, int]] = {
    "event_type": (1, 64),
    "operation": (1, 32),
    "entity_type": (0, 64),
    "entity_id": (0, 128),
    "description": (0, 2000),
}
MAX_DETAILS_BYTES = 1 << 20  # UTF-8 bytes of the JSON; a larger audit payload is a caller's bug, not an event
# bytes of a queued line before its encoded fields: "<uuid 36>\t<YYYY-MM-DD HH:MM:SS.ffffff+00>\t"
_LINE_PREFIX_BYTES = 36 + 1 + 29 + 1

_COLS_SQL = ", ".join(f'"{c}"' for c in COLUMNS)
_STAGING = "audit_log_staging"
_CREATE_STAGING = f"CREATE TEMP TABLE IF NOT EXISTS {_STAGING} (LIKE audit_log) ON COMMIT DELETE ROWS"
_COPY_STAGING = f"COPY {_STAGING} ({_COLS_SQL}) FROM STDIN"
_COPY_DIRECT = f"COPY audit_log ({_COLS_SQL}) FROM STDIN"
_MOVE_STAGING = (
    f"INSERT INTO audit_log ({_COLS_SQL}) SELECT {_COLS_SQL} FROM {_STAGING} ON CONFLICT DO NOTHING"
)

_NEEDS_ESCAPE = re.compile(r"[\\\t\n\r]")
_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_JSON_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
_SEGMENT = re.compile(r"^(\d{16})\.copy$")
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# one encoder object: json.dumps() with options builds a new JSONEncoder per call (~1 µs more)
_JSON = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


class AuditError(Exception):
    """Base class of the audit writer's errors."""


class AuditEventError(AuditError, ValueError):
    """The event cannot be stored in audit_log (the message names the field); raised by ``log()``."""


class AuditQueueFull(AuditError):
    """No spool and the queue stayed full for ``put_timeout`` seconds; the event was not accepted."""


class AuditWriterClosed(AuditError):
    """``log()`` after ``close()``."""


# ------------------------------------------------------------------------------------------- encoding


class UUIDv7:
    """Monotonic UUIDv7 ids (RFC 9562 §5.7; method 1 of §6.2: a 12-bit counter in ``rand_a``).

    48-bit Unix milliseconds, version 7, a counter seeded randomly in [0, 2048) every new millisecond and
    incremented within it (when it would pass 4095, the millisecond is advanced by one, as §6.2 allows),
    variant ``10``, then 62 random bits. Ids from one generator therefore sort in generation order, even
    when the clock steps back. Not thread-safe by itself: the writer calls it under its lock.
    """

    def __init__(self) -> None:
        self._rng = random.Random(os.urandom(32))
        self._ms = -1
        self._counter = 0

    def next(self, now_ns: int) -> str:
        ms = now_ns // 1_000_000
        if ms > self._ms:
            self._ms, self._counter = ms, self._rng.getrandbits(11)
        else:
            self._counter += 1
            if self._counter > 0xFFF:
                self._ms, self._counter = self._ms + 1, self._rng.getrandbits(11)
        value = (
            (self._ms << 80) | (0x7 << 76) | (self._counter << 64) | (0b10 << 62) | self._rng.getrandbits(62)
        )
        h = f"{value:032x}"
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def uuid7_time_ms(value: str | uuid.UUID) -> int:
    """The Unix millisecond timestamp inside a UUIDv7."""
    return uuid.UUID(str(value)).int >> 80


def _text(name: str, value: object, *, required: bool) -> str:
    """Validate one text field and return it escaped for COPY text format (``\\N`` for NULL)."""
    if value is None:
        if required:
            raise AuditEventError(f"{name} is required")
        return "\\N"
    if not isinstance(value, str):
        if isinstance(value, (int, uuid.UUID)) and not isinstance(value, bool) and name == "entity_id":
            value = str(value)
        else:
            raise AuditEventError(f"{name} must be a string, got {type(value).__name__}")
    lo, hi = LIMITS[name]
    if not lo <= len(value) <= hi:
        raise AuditEventError(f"{name} must be {lo}–{hi} characters, got {len(value)}")
    if "\x00" in value:
        raise AuditEventError(f"{name} contains a NUL character (PostgreSQL text cannot store it)")
    return value.translate(_ESCAPES) if _NEEDS_ESCAPE.search(value) else value


def _user_id(value: object) -> str:
    if value is None:
        return "\\N"
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, str):
        if _CANONICAL_UUID.fullmatch(value):  # the common case, ~0.2 µs instead of ~1.5 µs for uuid.UUID()
            return value
        try:
            return str(uuid.UUID(value))
        except ValueError:
            pass
    raise AuditEventError(f"user_id must be a UUID, got {value!r:.80}")


def _details(value: object) -> str:
    if value is None:
        return "\\N"
    try:
        text = _JSON.encode(value)
    except RecursionError:
        # the encoder recurses once per level: nesting deeper than the interpreter's recursion limit
        # (~1000 levels, fewer when log() is itself called deep in a stack) cannot be encoded
        raise AuditEventError(
            "details is nested too deeply to encode as JSON (keep it to a few levels of lists/objects)"
        ) from None
    except (TypeError, ValueError) as exc:
        raise AuditEventError(f"details must be JSON-serializable (no NaN/Infinity): {exc}") from None
    if len(text) * 4 > MAX_DETAILS_BYTES:  # a UTF-8 character is ≤ 4 bytes: only a large text can be over
        size = len(text.encode("utf-8", "surrogatepass"))  # ~0.1 ms per MB, paid by large payloads only
        if size > MAX_DETAILS_BYTES:
            raise AuditEventError(
                f"details is {size} bytes as UTF-8 JSON; the limit is {MAX_DETAILS_BYTES} bytes"
            )
    if "\\u0000" in text and _JSON_NUL.search(text):
        raise AuditEventError("details contains a NUL character (\\u0000), which jsonb cannot store")
    return text.translate(_ESCAPES) if _NEEDS_ESCAPE.search(text) else text


def _ip(value: object) -> str:
    if value is None:
        return "\\N"
    if isinstance(
        value,
        (ipaddress.IPv4Address, ipaddress.IPv6Address, ipaddress.IPv4Interface, ipaddress.IPv6Interface),
    ):
        return str(value)
    if isinstance(value, str):
        normalized = _parse_ip(value)
        if normalized is not None:
            return normalized
    raise AuditEventError(f"ip must be an IPv4/IPv6 address (optionally /prefix), got {value!r:.80}")


@functools.lru_cache(maxsize=8192)  # client addresses repeat; parsing one costs ~2 µs, a cache hit ~0.1 µs
def _parse_ip(value: str) -> str | None:
    if "%" in value:  # PostgreSQL's inet has no IPv6 zone ids
        return None
    try:
        return str(ipaddress.ip_interface(value) if "/" in value else ipaddress.ip_address(value))
    except ValueError:
        return None


def encode_fields(
    event_type: str,
    entity_type: str | None,
    entity_id: str | None,
    operation: str,
    description: str | None,
    user_id: str | uuid.UUID | None = None,
    severity: str = "low",
    details: Any = None,
    ip: str | None = None,
) -> str:
    """Validate an event and render every column after ``id`` and ``timestamp`` as COPY text.

    Costs a few µs (most of it ``json.dumps`` of ``details``). Raises :class:`AuditEventError`.
    """
    if severity not in SEVERITIES:
        raise AuditEventError(f"severity must be one of {sorted(SEVERITIES)}, got {severity!r:.80}")
    return "\t".join(
        (
            _user_id(user_id),
            _text("entity_type", entity_type, required=False),
            _text("entity_id", entity_id, required=False),
            _text("event_type", event_type, required=True),
            _text("operation", operation, required=True),
            severity,
            _text("description", description, required=False),
            _details(details),
            _ip(ip),
        )
    )


# ---------------------------------------------------------------------------------------------- delivery


def prepare_connection(conn: psycopg.Connection) -> None:
    """Create this session's TEMP staging table (once per connection; session-private, no locks on
    audit_log; dropped by PostgreSQL when the session ends)."""
    conn.execute(_CREATE_STAGING)


def deliver_batch(conn: psycopg.Connection, payload: bytes, *, idempotent: bool = True) -> int:
    """Write one batch of COPY lines into audit_log in one transaction; returns the rows inserted.

    ``idempotent`` (any batch that may have been sent before): ``COPY`` into the TEMP staging table, then
    ``INSERT … SELECT … ON CONFLICT DO NOTHING`` into audit_log; rows whose primary key is already there
    are skipped, so re-sending a batch is harmless (~15 µs per row on the server). Otherwise (a batch
    never sent before, so none of its fresh UUIDv7 ids can exist): a plain ``COPY`` into audit_log, about
    twice as fast; a unique violation there raises ``UniqueViolation`` and nothing is written.
    Locks: ROW EXCLUSIVE on audit_log and the partitions written, like any INSERT. ``conn`` must be an
    autocommit connection on which :func:`prepare_connection` ran.
    """
    with conn.cursor() as cur:
        if not idempotent:
            # one statement in autocommit is its own transaction: no BEGIN/COMMIT round trips
            with cur.copy(_COPY_DIRECT) as copy:
                copy.write(payload)
            return cur.rowcount
        with conn.transaction():
            with cur.copy(_COPY_STAGING) as copy:
                copy.write(payload)
            cur.execute(_MOVE_STAGING)
            return cur.rowcount


def _deliver_one_by_one(conn: psycopg.Connection, payload: bytes) -> tuple[int, list[bytes]]:
    """Slow path for a batch the database refused: each line in its own transaction."""
    inserted, refused = 0, []
    for line in payload.splitlines(keepends=True):
        try:
            inserted += deliver_batch(conn, line)
        except (errors.DataError, errors.IntegrityError) as exc:
            log.error("audit_log refused an event (%s): %r", exc, line[:300])
            refused.append(line)
    return inserted, refused


# ------------------------------------------------------------------------------------------------ spool


@dataclass
class _Batch:
    seq: int
    count: int
    own: bool  # logged by this writer (counts towards flush()); False for segments of a previous process
    payload: bytes | None  # None: read it back from the spool segment
    spooled: bool  # its segment file exists
    attempts: int = 0
    writing: bool = False  # the spooler is writing its segment: not deliverable until that is done
    sending: bool = False  # the delivery thread is sending it: the spooler leaves it alone


class _Spool:
    """Append-only folder of segment files ``<seq:016d>.copy``; the flusher deletes one once delivered."""

    def __init__(self, folder: Path, fsync: bool) -> None:
        self.folder = folder
        self.fsync = fsync
        folder.mkdir(parents=True, exist_ok=True)
        self._lock_fh = open(folder / ".lock", "a")  # noqa: SIM115 — held for the writer's lifetime
        try:
            fcntl.flock(self._lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_fh.close()
            raise AuditError(f"spool folder {folder} is in use by another live AuditWriter") from None

    def path(self, seq: int) -> Path:
        return self.folder / f"{seq:016d}.copy"

    def recover(self) -> list[tuple[int, int]]:
        """(seq, events) of the segments left by a previous process, oldest first.

        A ``.tmp`` file is a segment whose writer died mid-write: its complete lines are kept.
        """
        for tmp in sorted(self.folder.glob("*.copy.tmp")):
            data = tmp.read_bytes()
            data = data[: data.rfind(b"\n") + 1]
            if data:
                final = tmp.with_suffix("")
                final.write_bytes(data)
                log.warning(
                    "recovered %d complete events from the partial spool segment %s",
                    data.count(b"\n"),
                    tmp.name,
                )
            tmp.unlink()
        found = []
        for p in self.folder.iterdir():
            m = _SEGMENT.match(p.name)
            if m:
                found.append((int(m.group(1)), p.read_bytes().count(b"\n")))
        return sorted(found)

    def write(self, seq: int, payload: bytes) -> None:
        """One write() + rename(); fsync of the file and the folder when ``fsync``."""
        final = self.path(seq)
        tmp = final.with_name(final.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        if self.fsync:
            dfd = os.open(self.folder, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    def read(self, seq: int) -> bytes:
        return self.path(seq).read_bytes()

    def remove(self, seq: int) -> None:
        self.path(seq).unlink(missing_ok=True)

    def reject(self, lines: list[bytes]) -> None:
        with open(self.folder / "rejected.copy", "ab") as fh:
            fh.write(b"".join(lines))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            fcntl.flock(self._lock_fh, fcntl.LOCK_UN)
        self._lock_fh.close()


# ------------------------------------------------------------------------------------------------ writer

_WRITERS: weakref.WeakSet[AuditWriter] = weakref.WeakSet()


def _percentile(samples: list[float], pct: float) -> float:
    return percentile(samples, pct) if samples else 0.0


class AuditWriter:
    """Thread-safe, non-blocking audit logger over one database connection (see the module docstring).

    ``url``: the platform database. ``batch_size``: events per COPY (and at most per spool segment).
    ``flush_interval_ms``: how long an event waits in memory before it is sent (no spool) or written to
    the spool. ``max_queue``: events held in memory; ``max_queue_bytes``: bytes of COPY text held in the
    queue (one event is always accepted into an empty queue). ``spool_dir``: enables the spool (write-ahead
    segments written by a spooler thread, replay, spill when full or late). ``put_timeout``: without a
    spool, how long ``log()`` waits for room in a full queue. Starts its threads at once (the flusher, plus
    the spooler with a spool); replays an existing spool first (the constructor reads the segments left
    there to count their events: ~1 s per GB of spool; no database round trip).
    """

    def __init__(
        self,
        url: str,
        *,
        batch_size: int = 5000,
        flush_interval_ms: int = 50,
        max_queue: int = 100_000,
        spool_dir: str | os.PathLike[str] | None = None,
        spool_fsync: bool = False,
        put_timeout: float = 1.0,
        connect_timeout_s: int = 5,
        statement_timeout_ms: int = 30_000,
        name: str = "audit",
        metrics_interval_s: float | None = 15.0,
        max_queue_bytes: int = 64 << 20,
    ) -> None:
        if batch_size < 1 or max_queue < batch_size or flush_interval_ms < 1 or max_queue_bytes < 1:
            raise ValueError(
                "need batch_size ≥ 1, max_queue ≥ batch_size, flush_interval_ms ≥ 1 and max_queue_bytes ≥ 1"
            )
        self.url = url
        self.name = name
        self.batch_size = batch_size
        self.flush_interval = flush_interval_ms / 1000
        self.max_queue = max_queue
        self.max_queue_bytes = max_queue_bytes
        self.put_timeout = put_timeout
        self._connect_kwargs: dict[str, object] = {
            "connect_timeout": connect_timeout_s,
            "application_name": f"perf_pipeline.{name}",
            "options": f"-c statement_timeout={int(statement_timeout_ms)}",
            # a half-open TCP connection (peer gone, no RST) would hang the flusher until the kernel's
            # defaults (~2 h): probe after 10 s idle every 5 s, give up after 3 misses, and cap unacknowledged
            # sent data (keepalives do not cover a connection with data in flight) — never shorter than the
            # server's statement_timeout, so a legitimately slow COPY is cut by the server, not by TCP
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
            "tcp_user_timeout": max(30_000, int(statement_timeout_ms) + 5_000),
        }
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)  # producers/flush()/close() → spooler (or flusher)
        self._ready = threading.Condition(self._lock)  # spooler → delivery thread: a segment is written
        self._room = threading.Condition(self._lock)  # flusher → producers blocked on a full queue
        self._done = threading.Condition(self._lock)  # flusher → flush()
        # a list, not a deque: the spooler takes the whole queue with a swap (O(1)), or a batch out of a
        # longer one with a slice and a join (~0.15 ms per 5000 lines) instead of 5000 popleft() (~0.4 ms)
        self._queue: list[bytes] = []
        self._queue_bytes = 0  # sum of len() of the queued lines (under _lock)
        # every event logged before this moment (monotonic ns) has left the queue (under _lock)
        self._taken_through_ns = time.monotonic_ns()
        # with a spool, a queued event older than this means the spooler is late: producers spill it
        self._late_ns = int((self.flush_interval + max(self.flush_interval, 0.05)) * 1e9)
        self._pending: deque[_Batch] = deque()  # handed to the flusher, not yet acknowledged, oldest first
        self._ids = UUIDv7()
        self._ts_second = -1
        self._ts_prefix = ""
        self._closed = False
        self._stop = False
        self._flush_wanted = False
        self._conn: psycopg.Connection | None = None
        self._retry_at = 0.0
        self._backoff = 0.0
        # counters (under _lock)
        self._accepted = 0
        self._recovered = 0  # events found in the spool at start (a previous process's)
        self._settled = 0  # events acknowledged or dropped, in delivery order (own and recovered)
        self._written = 0
        self._duplicates = 0
        self._replayed = 0
        self._spilled = 0
        self._dropped = 0
        self._rejected = 0
        self._batches = 0
        self._failures = 0
        self._spool_write_failures = 0
        self._spool_failing = False  # the last segment write failed (errors are logged once per episode)
        self._last_error: str | None = None
        self._latencies: deque[float] = deque(maxlen=2048)
        self._spool = _Spool(Path(spool_dir), spool_fsync) if spool_dir is not None else None
        self._seq = 1
        if self._spool is not None:
            recovered = self._spool.recover()
            for seq, count in recovered:
                self._pending.append(_Batch(seq, count, own=False, payload=None, spooled=True, attempts=1))
            if recovered:
                self._seq = recovered[-1][0] + 1
                self._recovered = sum(c for _, c in recovered)
                log.info(
                    "audit spool %s: replaying %d events from %d segments",
                    spool_dir,
                    sum(c for _, c in recovered),
                    len(recovered),
                )
        # publishing the counters to audit_writer_metrics (0060) lets the health report see this process
        self._metrics_interval = metrics_interval_s
        self._metrics_key = f"{socket.gethostname()}:{os.getpid()}:{name}"
        self._metrics_due = time.monotonic()
        # with a spool, two threads: the spooler moves the queue to segments every flush interval and is
        # never stuck behind the database; the flusher only sends segments. Without one, the flusher does both
        self._thread = threading.Thread(target=self._run, name=f"{name}-flusher", daemon=True)
        self._spooler: threading.Thread | None = None
        if self._spool is not None:
            self._spooler = threading.Thread(target=self._run_spooler, name=f"{name}-spooler", daemon=True)
            self._spooler.start()
        self._thread.start()
        _WRITERS.add(self)

    @classmethod
    def from_settings(cls, settings: Settings | None = None, **kwargs: Any) -> AuditWriter:
        """A writer on the configured (or running embedded) database, spooling to PERF_PIPELINE_AUDIT_SPOOL_DIR."""
        from perf_pipeline.embedded import resolve_urls

        settings = settings or get_settings()
        kwargs.setdefault("spool_dir", settings.audit_spool_dir)
        url = settings.database_url or resolve_urls(settings, start=False).database_url
        return cls(url, **kwargs)

    # ---------------------------------------------------------------------------------------- producers

    def log(
        self,
        event_type: str,
        entity_type: str | None,
        entity_id: str | None,
        operation: str,
        description: str | None,
        user_id: str | uuid.UUID | None = None,
        severity: str = "low",
        details: Any = None,
        ip: str | None = None,
    ) -> str:
        """Validate and enqueue one event; returns its id (UUIDv7 string). Never touches the network.

        Cost: ~5–15 µs (validation, ``json.dumps`` of ``details``). Raises :class:`AuditEventError` for an
        event audit_log would refuse. When the queue is full: with a spool, writes its oldest
        ``batch_size`` events to a segment (~1 ms); without, waits up to ``put_timeout`` then raises
        :class:`AuditQueueFull`. With a spool, also when the spooler is late (the queue has not been empty
        for flush interval + max(flush interval, 50 ms)): takes the queue and writes it to segments itself
        after releasing the lock (~1 ms per ``batch_size`` events, other producers go on), so what only
        memory holds stays bounded in time.
        """
        rest = encode_fields(
            event_type, entity_type, entity_id, operation, description, user_id, severity, details, ip
        )
        try:
            tail = f"{rest}\n".encode()
        except UnicodeEncodeError as exc:
            raise AuditEventError(f"event text is not valid Unicode (lone surrogate?): {exc}") from None
        size = _LINE_PREFIX_BYTES + len(tail)
        late: tuple[list[bytes], list[_Batch]] | None = None
        with self._lock:
            if self._closed:
                raise AuditWriterClosed(f"audit writer {self.name!r} is closed")
            if len(self._queue) >= self.max_queue or self._queue_bytes + size > self.max_queue_bytes:
                self._make_room(size)
            if self._spool is not None:
                if not self._queue:
                    self._taken_through_ns = time.monotonic_ns()
                elif time.monotonic_ns() - self._taken_through_ns > self._late_ns and not self._spool_failing:
                    late = self._take_late()
            now = time.time_ns()
            event_id = self._ids.next(now)
            second, micros = divmod(now // 1000, 1_000_000)
            if second != self._ts_second:
                self._ts_second = second
                self._ts_prefix = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(second))
            self._queue.append(f"{event_id}\t{self._ts_prefix}.{micros:06d}+00\t".encode() + tail)
            self._queue_bytes += size
            self._accepted += 1
            if len(self._queue) == self.batch_size:
                self._wake.notify()
        if late is not None:
            self._write_late(*late)
        return event_id

    def _full(self, size: int) -> bool:
        """Whether an event of ``size`` bytes does not fit (lock held). An empty queue always takes one."""
        return len(self._queue) >= self.max_queue or (
            bool(self._queue) and self._queue_bytes + size > self.max_queue_bytes
        )

    def _pop_lines(self, n: int) -> tuple[list[bytes], bytes]:
        """The oldest ``n`` queued lines, removed, and their concatenation (lock held; the join's length
        gives the bytes freed without a second pass over the lines, ~0.2 ms less lock time per 5000)."""
        queue = self._queue
        lines = queue[:n]
        del queue[:n]
        payload = b"".join(lines)
        self._queue_bytes -= len(payload)
        if not queue:
            self._taken_through_ns = time.monotonic_ns()
        return lines, payload

    def _spill(self) -> _Batch | None:
        """Write the oldest ``batch_size`` queued events to a new segment (lock held, spool present; one
        write, ~1 ms). Under the lock, so sequence order == file order == log() order. None when the write
        failed (the events are back in the queue)."""
        assert self._spool is not None
        seq = self._seq
        self._seq += 1
        lines, payload = self._pop_lines(min(self.batch_size, len(self._queue)))
        try:
            self._spool.write(seq, payload)
        except OSError as exc:  # disk full, folder gone
            self._queue[:0] = lines
            self._queue_bytes += len(payload)
            self._spool_write_failures += 1
            first, self._spool_failing = not self._spool_failing, True
            if first:
                log.error("audit spool write failed while spilling the queue (%s)", exc)
            return None
        batch = _Batch(seq, len(lines), own=True, payload=None, spooled=True)
        self._pending.append(batch)
        self._spilled += len(lines)
        return batch

    def _take_late(self) -> tuple[list[bytes], list[_Batch]]:
        """The spooler has not emptied the queue for ``_late_ns`` (starved of the GIL by busy producers, a
        slow disk): take the whole queue for the calling producer to write (lock held; a list swap, and
        one pending batch of at most ``batch_size`` events per future segment, with its sequence number,
        so the order is kept). The producer writes them after releasing the lock (:meth:`_write_late`)."""
        lines, self._queue = self._queue, []
        self._queue_bytes = 0
        self._taken_through_ns = time.monotonic_ns()
        batches = []
        for offset in range(0, len(lines), self.batch_size):
            batch = _Batch(
                self._seq,
                min(self.batch_size, len(lines) - offset),
                own=True,
                payload=None,
                spooled=False,
                writing=True,
            )
            self._seq += 1
            self._pending.append(batch)
            batches.append(batch)
        self._spilled += len(lines)
        return lines, batches

    def _write_late(self, lines: list[bytes], batches: list[_Batch]) -> None:
        """Write what :meth:`_take_late` took, from the producer, no lock held (~1 ms per segment). If a
        write fails, that batch and the ones after it stay in memory, deliverable from there, and are
        retried by the spooler (which takes nothing more meanwhile)."""
        log.warning("audit spooler late: a producer writes the %d queued events to the spool", len(lines))
        offset = 0
        for i, batch in enumerate(batches):
            payload = b"".join(lines[offset : offset + batch.count])
            offset += batch.count
            if self._write_segment(batch, payload):
                continue
            rest = []
            for b in batches[i + 1 :]:
                rest.append(b"".join(lines[offset : offset + b.count]))
                offset += b.count
            with self._lock:
                for b, data in zip(batches[i + 1 :], rest, strict=True):
                    b.payload, b.writing = data, False
                self._ready.notify_all()
            return

    def _make_room(self, size: int) -> None:
        """Called with the lock held and the queue full (events or bytes): spill to the spool, or wait."""
        if self._spool is not None:
            # the oldest batch_size events become the next segment: they are older than what stays queued
            # and newer than every pending batch, so the sequence order is still the log() order; one
            # batch-sized write (~1 ms) instead of the whole queue keeps this producer's stall short (more
            # than one only when a batch's bytes do not free room for a large event)
            while self._queue and self._full(size):
                batch = self._spill()
                if batch is None:  # the write failed: fall back to waiting for room, below
                    break
                log.warning("audit queue full: spilled %d events to spool segment %d", batch.count, batch.seq)
            if not self._full(size):
                return
        deadline = time.monotonic() + self.put_timeout
        while self._full(size) and not self._closed:
            left = deadline - time.monotonic()
            if left <= 0:
                self._dropped += 1
                raise AuditQueueFull(
                    f"audit queue full ({self.max_queue} events / {self.max_queue_bytes} bytes) "
                    f"for {self.put_timeout}s and no room in a spool; event not recorded"
                )
            self._wake.notify()
            self._room.wait(left)
        if self._closed:
            raise AuditWriterClosed(f"audit writer {self.name!r} is closed")

    # ------------------------------------------------------------------------------------------ control

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Block until every event logged before this call (and every event replayed from the spool
        found at start) is in the database, or dropped.

        True when done, False on timeout (the events stay queued/spooled). Cost: up to one batch's COPY
        plus ``flush_interval_ms``; longer while the database is unreachable.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            target = self._accepted + self._recovered
            while self._settled < target:
                if not self._thread.is_alive():
                    return False
                self._flush_wanted = True
                self._wake.notify()
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._done.wait(0.5 if left is None else min(left, 0.5))
            return True

    def close(self, timeout: float = 10.0) -> bool:
        """Stop accepting events, deliver what is queued (up to ``timeout`` s), stop the thread.

        With a spool, what could not be delivered stays in it for the next writer; without one it is
        counted as dropped. True when everything was delivered. Registered to run at interpreter exit.
        """
        with self._lock:
            if self._stop:
                return self._settled >= self._accepted + self._recovered
            self._closed = True
            self._room.notify_all()
        # database down and a spool: what is queued goes to the spool below, no point waiting for it
        done = self.flush(0 if self._spool is not None and self._backoff else timeout)
        with self._lock:
            self._stop = True
            self._wake.notify_all()
            self._ready.notify_all()
        deadline = time.monotonic() + max(5.0, timeout)
        if self._spooler is not None:  # its last pass writes the queue to the spool (no database involved)
            self._spooler.join(timeout=max(0.0, deadline - time.monotonic()))
        self._thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            # the flusher is stuck inside a delivery (lock wait, slow server, half-open TCP): _shutdown has
            # not run, and this daemon thread dies at interpreter exit with whatever is only in memory
            self._save_queue_from_closing_thread()
        elif self._spool is not None:
            self._spool.close()
        _WRITERS.discard(self)
        return done

    def _save_queue_from_closing_thread(self) -> None:
        """close() with the flusher still stuck: spool the queue (or count it as dropped) from this thread.

        Under the lock, so the segment takes the next sequence number after every batch already pending
        (delivery order is kept) and no producer or spill interleaves. Batches the flusher took but has
        not spooled (no spool, or a spool write that failed) are written to their own segment too: if the
        stuck delivery does commit later, the replay of that segment is idempotent (duplicates skipped).
        Cost: one segment write per batch, ~1 ms each. The stuck thread keeps the spool's flock until it
        ends; if it ever returns it delivers these segments itself and runs its normal shutdown.
        """
        with self._lock:
            leftover, self._queue = self._queue, []
            self._queue_bytes = 0
            if self._spool is not None:
                try:
                    for batch in self._pending:
                        # (a batch the spooler is writing, if it is stuck on the disk too, stays its job)
                        if not batch.spooled and batch.payload is not None and not batch.writing:
                            self._spool.write(batch.seq, batch.payload)
                            batch.spooled = True
                    if leftover:
                        seq = self._seq
                        self._seq += 1
                        self._spool.write(seq, b"".join(leftover))
                        self._pending.append(_Batch(seq, len(leftover), own=True, payload=None, spooled=True))
                        log.warning(
                            "audit writer %r closed while its delivery is stuck: %d queued events "
                            "written to spool segment %d",
                            self.name,
                            len(leftover),
                            seq,
                        )
                        leftover = []
                except OSError as exc:
                    log.error("audit writer %r: spooling the queue at close failed: %s", self.name, exc)
            in_flight = sum(b.count for b in self._pending if b.own and not b.spooled)
            if leftover:
                self._dropped += len(leftover)
                self._settled += len(leftover)
                self._done.notify_all()
            if leftover or in_flight:
                log.error(
                    "audit writer %r closed while its delivery is stuck: %d queued events are lost and "
                    "%d in flight are lost unless that delivery completes before the process exits",
                    self.name,
                    len(leftover),
                    in_flight,
                )

    async def aflush(self, timeout: float | None = 30.0) -> bool:
        """:meth:`flush` for async code (waits in a worker thread, not on the event loop)."""
        return await asyncio.to_thread(self.flush, timeout)

    async def aclose(self, timeout: float = 10.0) -> bool:
        """:meth:`close` for async code."""
        return await asyncio.to_thread(self.close, timeout)

    def __enter__(self) -> AuditWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def metrics(self) -> dict[str, Any]:
        """Counters and gauges of this writer (cheap: one lock, a sort of ≤ 2048 latencies)."""
        with self._lock:
            latencies = list(self._latencies)
            return {
                "accepted": self._accepted,
                "queued": len(self._queue),
                "queued_bytes": self._queue_bytes,
                "pending": sum(b.count for b in self._pending),
                # events in spool segments not yet acknowledged (a healthy writer shows the batch in flight)
                "spooled": sum(b.count for b in self._pending if b.spooled),
                "written": self._written,
                "duplicates_skipped": self._duplicates,
                "recovered": self._recovered,
                "replayed": self._replayed,
                "spilled": self._spilled,
                "dropped": self._dropped,
                "rejected": self._rejected,
                "batches": self._batches,
                "failed_attempts": self._failures,
                "spool_write_failures": self._spool_write_failures,
                "flush_p50_ms": _percentile(latencies, 50),
                "flush_p99_ms": _percentile(latencies, 99),
                "db_reachable": self._conn is not None and self._backoff == 0,
                "last_error": self._last_error,
            }

    # ------------------------------------------------------------------------------------------ flusher

    def _run(self) -> None:
        """The flusher (delivery) thread. With a spool it only sends the segments the spooler wrote, in
        sequence order; without one it also takes the queue, one batch at a time."""
        while True:
            with self._lock:
                if self._spool is None:
                    if not self._stop and not self._flush_wanted and len(self._queue) < self.batch_size:
                        wait = self.flush_interval
                        if self._backoff:
                            wait = min(wait, max(0.0, self._retry_at - time.monotonic()))
                        self._wake.wait(wait)
                    self._flush_wanted = False
                elif not self._stop:
                    retry_in = self._retry_at - time.monotonic() if self._backoff else 0.0
                    if not self._deliverable() or retry_in > 0:
                        wait = self.flush_interval
                        if retry_in > 0:
                            wait = min(wait, retry_in)
                        self._ready.wait(wait)
                stopping = self._stop
            if stopping and self._spooler is not None:
                self._spooler.join()  # its last pass spools the queue; deliver that too if the database is up
            try:
                self._cycle()
            except Exception:  # never let the thread die: events would pile up unseen
                log.exception("audit flusher cycle failed")
                time.sleep(0.1)
            if stopping:
                self._shutdown()
                return

    def _deliverable(self) -> bool:
        """Whether the oldest pending batch can be sent now (lock held): not while its segment is written."""
        return bool(self._pending) and not self._pending[0].writing

    def _take_batch(self) -> None:
        """Without a spool: move the oldest ``batch_size`` queued events into the one pending batch (memory
        holds one undelivered batch at most; the rest waits in the bounded queue)."""
        with self._lock:
            if not self._queue or self._pending:
                return
            n = min(len(self._queue), self.batch_size)
            _, payload = self._pop_lines(n)
            self._pending.append(_Batch(self._seq, n, own=True, payload=payload, spooled=False))
            self._seq += 1
            self._room.notify_all()

    # ------------------------------------------------------------------------------------------ spooler

    def _run_spooler(self) -> None:
        """The spooler thread (spool only): every ``flush_interval`` (or at once when ``batch_size`` events
        are queued, or on flush()/close()), writes the queue to spool segments. It never waits for the
        database, so the queue — what a SIGKILL can lose — holds about one interval's worth whatever
        delivery is doing (slow, locked, down). Its last pass, at close(), empties the queue."""
        due = time.monotonic()
        while True:
            with self._lock:
                left = due - time.monotonic()
                if (
                    not self._stop
                    and not self._flush_wanted
                    and len(self._queue) < self.batch_size
                    and left > 0
                ):
                    self._wake.wait(left)
                self._flush_wanted = False
                stopping = self._stop
            due = time.monotonic() + self.flush_interval
            try:
                self._spool_queue()
            except Exception:  # never let the thread die: the queue would only live in memory
                log.exception("audit spooler pass failed")
                time.sleep(0.1)
            if stopping:
                return

    def _spool_queue(self) -> None:
        """One spooler pass: what is queued when it begins, oldest first, into segments of at most
        ``batch_size`` events (what arrives while it writes waits for the next pass: one segment per
        interval at a steady rate, not a stream of tiny ones).

        Each batch is taken under the lock — the sequence number with it, so segment order is log() order
        even with producers spilling meanwhile — and written outside it (one write, ~1 ms per 5000 events),
        so ``log()`` never waits for a file write on this path. Taking the whole queue is a list swap
        (O(1)); a queue longer than one batch gives a slice and a join under the lock (~0.15 ms per 5000).

        A batch whose segment write fails (disk full) stays pending in memory — deliverable straight from
        memory like a spool-less writer's — and no further batch is taken until it is written (retried
        every pass) or delivered: memory then holds that one batch plus the bounded queue, whose
        full-queue policy applies.
        """
        if not self._save_unsaved():
            return
        remaining, started_ns = -1, 0
        while remaining:
            with self._lock:
                queue = self._queue
                if remaining < 0:  # this pass takes what is queued now, not what arrives while it writes
                    remaining, started_ns = len(queue), time.monotonic_ns()
                if not queue:
                    self._taken_through_ns = max(self._taken_through_ns, started_ns)
                    return
                payload: bytes | None = None
                if len(queue) <= min(remaining, self.batch_size):
                    lines, self._queue = queue, []
                    self._queue_bytes = 0
                    self._taken_through_ns = time.monotonic_ns()
                else:
                    lines, payload = self._pop_lines(min(remaining, self.batch_size))
                remaining = max(0, remaining - len(lines))
                if not remaining:  # what was queued when the pass began is taken (spills take the oldest too)
                    self._taken_through_ns = max(self._taken_through_ns, started_ns)
                batch = _Batch(self._seq, len(lines), own=True, payload=None, spooled=False, writing=True)
                self._seq += 1
                self._pending.append(batch)
                self._room.notify_all()
            if not self._write_segment(batch, b"".join(lines) if payload is None else payload):
                return

    def _save_unsaved(self) -> bool:
        """Retry the segments whose write failed (batches not being sent); True when none is left unsaved."""
        with self._lock:
            unsaved = [
                b for b in self._pending if not b.spooled and not b.sending and not b.writing and b.payload
            ]
            for b in unsaved:
                b.writing = True
        for i, batch in enumerate(unsaved):
            assert batch.payload is not None
            if not self._write_segment(batch, batch.payload):
                with self._lock:
                    for b in unsaved[i + 1 :]:
                        b.writing = False
                    self._ready.notify_all()
                return False
        with self._lock:
            return all(b.spooled or not b.own for b in self._pending)

    def _write_segment(self, batch: _Batch, payload: bytes) -> bool:
        """Write a taken batch (``writing`` set) to its segment, no lock held; then hand it to delivery.

        False when the write failed: the batch keeps its payload in memory and stays deliverable.
        """
        assert self._spool is not None
        try:
            self._spool.write(batch.seq, payload)
        except OSError as exc:
            with self._lock:
                batch.payload, batch.writing = payload, False
                self._spool_write_failures += 1
                first, self._spool_failing = not self._spool_failing, True
                self._ready.notify_all()
            if first:
                log.error(
                    "audit spool write failed (%s): batches wait in memory (at most one) until it works "
                    "again; the queue's full-queue policy applies meanwhile",
                    exc,
                )
            return False
        with self._lock:
            batch.spooled, batch.writing = True, False
            # database down or behind: keep memory bounded, the segment has the payload
            batch.payload = None if self._backoff or len(self._pending) > 2 else payload
            if self._spool_failing:
                self._spool_failing = False
                log.warning("audit spool writable again")
            self._ready.notify_all()
        return True

    # ---------------------------------------------------------------------------------------- delivery

    def _cycle(self) -> None:
        if self._spool is None:
            self._take_batch()
        self._publish_metrics()
        while True:
            if self._backoff and time.monotonic() < self._retry_at:
                return
            with self._lock:
                if not self._deliverable():
                    return
                batch = self._pending[0]
                batch.sending = True
            try:
                delivered = self._deliver(batch)
            finally:
                with self._lock:
                    batch.sending = False
            if not delivered:
                return
            # without a spool, no _take_batch() here: what arrived meanwhile waits for a full batch or the
            # interval, so a steady stream goes in batch_size / flush_interval batches, not one tiny COMMIT
            # per delivery (with a spool, the spooler's passes set that pace)

    def _publish_metrics(self) -> None:
        """Upsert this writer's counters (one short statement every ``metrics_interval_s``; skipped while
        the database is unreachable; turned off for good if the table does not exist)."""
        if self._metrics_interval is None or self._backoff or time.monotonic() < self._metrics_due:
            return
        self._metrics_due = time.monotonic() + self._metrics_interval
        try:
            self._connection().execute(
                "INSERT INTO audit_writer_metrics (writer, updated_at, metrics) VALUES (%s, now(), %s::jsonb) "
                "ON CONFLICT (writer) DO UPDATE SET updated_at = excluded.updated_at, metrics = excluded.metrics",
                (self._metrics_key, json.dumps(self.metrics(), default=str)),
            )
        except errors.UndefinedTable:
            log.warning(
                "audit_writer_metrics does not exist (run `perf-pipeline migrate`): metrics stay local"
            )
            self._metrics_interval = None
        except (psycopg.Error, OSError):
            pass  # delivery will notice and back off; metrics are best effort

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            conn = connect(self.url, autocommit=True, **self._connect_kwargs)
            prepare_connection(conn)
            self._conn = conn
        return self._conn

    def _deliver(self, batch: _Batch) -> bool:
        started = time.perf_counter()
        refused: list[bytes] = []
        try:
            payload = batch.payload
            if payload is None:
                assert self._spool is not None
                payload = self._spool.read(batch.seq)
            # a batch that was sent before (failed attempt, or a previous process's segment) may already be
            # committed: only such re-sends need the idempotent staging path
            resend = batch.attempts > 0
            batch.attempts += 1
            conn = self._connection()
            try:
                try:
                    inserted = deliver_batch(conn, payload, idempotent=resend)
                except errors.UniqueViolation:  # cannot happen for fresh ids; be safe anyway
                    inserted = deliver_batch(conn, payload, idempotent=True)
            except (errors.DataError, errors.IntegrityError):
                log.exception(
                    "audit batch %d refused; retrying its %d events one by one", batch.seq, batch.count
                )
                inserted, refused = _deliver_one_by_one(conn, payload)
                if refused and self._spool is not None:
                    self._spool.reject(refused)
        except (psycopg.Error, OSError) as exc:
            self._fail(exc)
            return False
        latency = (time.perf_counter() - started) * 1000
        if batch.spooled and self._spool is not None:
            self._spool.remove(batch.seq)  # the acknowledgement: only now may the segment go
        with self._lock:
            self._pending.popleft()
            self._batches += 1
            self._written += inserted
            self._rejected += len(refused)
            self._duplicates += batch.count - inserted - len(refused)
            self._settled += batch.count
            if not batch.own:
                self._replayed += batch.count
            self._latencies.append(latency)
            self._backoff = 0.0
            self._done.notify_all()
        return True

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            self._failures += 1
            self._last_error = f"{type(exc).__name__}: {exc}".strip()[:500]
            self._backoff = min(5.0, self._backoff * 2) if self._backoff else 0.05
            self._retry_at = time.monotonic() + self._backoff
            if self._spool is not None:
                for b in self._pending:
                    if b.spooled:
                        b.payload = None
        log.warning("audit delivery failed (retry in %.2fs): %s", self._backoff, self._last_error)
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    def _shutdown(self) -> None:
        """Last step of the thread: spool what is left (or count it as dropped), close the connection."""
        if self._spool is None:
            self._take_batch()
        with self._lock:
            leftover, self._queue = self._queue, []  # with a spool: only if the spooler's writes failed
            self._queue_bytes = 0
            if leftover and self._spool is not None:
                seq = self._seq
                self._seq += 1
                try:
                    self._spool.write(seq, b"".join(leftover))
                except OSError as exc:
                    log.error("audit writer %r: spooling the queue at shutdown failed: %s", self.name, exc)
                else:
                    self._pending.append(_Batch(seq, len(leftover), own=True, payload=None, spooled=True))
                    leftover = []
            lost = len(leftover) + sum(b.count for b in self._pending if b.own and not b.spooled)
            if lost:
                self._dropped += lost
                self._settled += lost
                log.error(
                    "audit writer %r closed with %d undelivered events and no spool: they are lost",
                    self.name,
                    lost,
                )
            self._done.notify_all()
        if self._conn is not None:
            self._metrics_due = 0.0  # a last snapshot, so the report does not show the writer as stuck
            with contextlib.suppress(Exception):
                self._publish_metrics()
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None


def metrics() -> dict[str, Any]:
    """Sum of :meth:`AuditWriter.metrics` over every live writer of this process (for the health report).

    Counters add up; ``flush_p99_ms`` is the worst writer's; ``writers`` says how many there are.
    """
    out: dict[str, Any] = {"writers": 0}
    for writer in list(_WRITERS):
        m = writer.metrics()
        out["writers"] += 1
        for key, value in m.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if key.endswith("_ms"):
                out[key] = max(out.get(key, 0.0), value)
            else:
                out[key] = out.get(key, 0) + value
    return out


def _close_all() -> None:
    for writer in list(_WRITERS):
        with contextlib.suppress(Exception):
            writer.close(timeout=5.0)


atexit.register(_close_all)

__all__: list[str] = [
    "COLUMNS",
    "AuditError",
    "AuditEventError",
    "AuditQueueFull",
    "AuditWriter",
    "AuditWriterClosed",
    "UUIDv7",
    "deliver_batch",
    "encode_fields",
    "metrics",
    "prepare_connection",
    "uuid7_time_ms",
]
