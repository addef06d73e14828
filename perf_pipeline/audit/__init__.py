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
  power loss. ``spool_fsync=True`` fsyncs each segment and the folder (on the spooler thread, never on
  ``log()``'s normal path). A segment of 5000 events (1.2 MB) takes ~0.2 ms without fsync and ~1.1–1.4 ms
  with it, medians on this project's ext4 disk (``BENCH_AUDIT_PARTS=spool python -m bench audit_writer``;
  slower disks pay more for the fsync).
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
and writes it to segments itself after releasing the lock (~0.2 ms per ``batch_size`` events in that one
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
  queued events to a new spool segment (one file write, ~0.2 ms, under the writer's lock) and goes on;
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

The package: :mod:`~perf_pipeline.audit.events` (the event, its validation and COPY encoding, UUIDv7 ids),
:mod:`~perf_pipeline.audit.spool` (segment files, a previous process's leftovers),
:mod:`~perf_pipeline.audit.delivery` (plain and idempotent ``COPY``), :mod:`~perf_pipeline.audit.counters`
(what a writer counts, its metrics), :mod:`~perf_pipeline.audit.writer` (:class:`AuditWriter`, its
threads). It imports neither Dagster nor the embedded servers: the platform imports it on its own.
"""

from __future__ import annotations

from perf_pipeline.audit.delivery import deliver_batch, prepare_connection
from perf_pipeline.audit.errors import AuditError, AuditEventError, AuditQueueFull, AuditWriterClosed
from perf_pipeline.audit.events import (
    COLUMNS,
    LIMITS,
    MAX_DETAILS_BYTES,
    SEVERITIES,
    AuditEvent,
    UUIDv7,
    encode_fields,
    uuid7_time_ms,
)
from perf_pipeline.audit.writer import AuditWriter, metrics

__all__: list[str] = [
    "COLUMNS",
    "LIMITS",
    "MAX_DETAILS_BYTES",
    "SEVERITIES",
    "AuditError",
    "AuditEvent",
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
