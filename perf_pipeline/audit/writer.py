"""AuditWriter: validates and queues events on the caller's thread, spools and delivers them in the background.

The design (queue, spooler and flusher threads, spill, what a SIGKILL can lose, close(), the full-queue
policies) is described in the package docstring (:mod:`perf_pipeline.audit`). Encoding is in
:mod:`~perf_pipeline.audit.events`, the spool folder in :mod:`~perf_pipeline.audit.spool`, sending a batch
in :mod:`~perf_pipeline.audit.delivery`, the counters in :mod:`~perf_pipeline.audit.counters`.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import os
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

from perf_pipeline.audit.counters import Counters, combine
from perf_pipeline.audit.delivery import deliver_batch, deliver_one_by_one, prepare_connection
from perf_pipeline.audit.errors import AuditQueueFull, AuditWriterClosed
from perf_pipeline.audit.events import LINE_PREFIX_BYTES, AuditEvent, UUIDv7
from perf_pipeline.audit.spool import Spool
from perf_pipeline.lib.db import connect
from perf_pipeline.settings import Settings, SettingsError, get_settings

log = logging.getLogger(__name__)


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


_WRITERS: weakref.WeakSet[AuditWriter] = weakref.WeakSet()


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
        self._counters = Counters()  # under _lock
        self._spool_failing = False  # the last segment write failed (errors are logged once per episode)
        self._spool = Spool(Path(spool_dir), spool_fsync) if spool_dir is not None else None
        self._seq = 1
        if self._spool is not None:
            self._replay_leftovers(self._spool)
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

    def _replay_leftovers(self, spool: Spool) -> None:
        """Queue the segments a previous process left in the spool for delivery first, in order, through
        the idempotent path (constructor only; reads each segment once to count its events)."""
        recovered = spool.recover()
        for seq, count in recovered:
            self._pending.append(_Batch(seq, count, own=False, payload=None, spooled=True, attempts=1))
        if recovered:
            self._seq = recovered[-1][0] + 1
            self._counters.recovered = sum(c for _, c in recovered)
            log.info(
                "audit spool %s: replaying %d events from %d segments",
                spool.folder,
                self._counters.recovered,
                len(recovered),
            )

    @classmethod
    def from_settings(cls, settings: Settings | None = None, **kwargs: Any) -> AuditWriter:
        """A writer on PERF_PIPELINE_DATABASE_URL, spooling to PERF_PIPELINE_AUDIT_SPOOL_DIR.

        Raises :class:`~perf_pipeline.settings.SettingsError` when PERF_PIPELINE_DATABASE_URL is unset: the
        library does not look for an embedded server (a development entry point that wants one resolves
        its URL first, e.g. with ``perf_pipeline.embedded.resolve_urls``, and passes it to the constructor).
        """
        settings = settings or get_settings()
        if not settings.database_url:
            raise SettingsError(
                "AuditWriter.from_settings needs PERF_PIPELINE_DATABASE_URL (the platform database); "
                "it is unset"
            )
        kwargs.setdefault("spool_dir", settings.audit_spool_dir)
        return cls(settings.database_url, **kwargs)

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
        ``batch_size`` events to a segment (~0.2 ms); without, waits up to ``put_timeout`` then raises
        :class:`AuditQueueFull`. With a spool, also when the spooler is late (the queue has not been empty
        for flush interval + max(flush interval, 50 ms)): takes the queue and writes it to segments itself
        after releasing the lock (~0.2 ms per ``batch_size`` events, other producers go on), so what only
        memory holds stays bounded in time.
        """
        tail = AuditEvent(
            event_type, entity_type, entity_id, operation, description, user_id, severity, details, ip
        ).encode_line_tail()
        size = LINE_PREFIX_BYTES + len(tail)
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
            self._counters.accepted += 1
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

    def _take_queue(self) -> list[bytes]:
        """Empty the queue and return its lines, oldest first (lock held; a list swap, O(1))."""
        lines, self._queue = self._queue, []
        self._queue_bytes = 0
        self._taken_through_ns = time.monotonic_ns()
        return lines

    def _next_seq(self) -> int:
        """Take the next segment sequence number (lock held): sequence order is delivery order."""
        seq = self._seq
        self._seq += 1
        return seq

    def _count_spool_write_failure(self) -> bool:
        """Count a failed segment write (lock held); True for the first failure of an episode, which is
        the one to log."""
        self._counters.spool_write_failures += 1
        first, self._spool_failing = not self._spool_failing, True
        return first

    def _spool_leftovers(self, when: str) -> list[bytes]:
        """At the end of the writer's life, write what is still queued to one new spool segment, queued for
        delivery after every pending batch (lock held; one file write, ~0.2 ms per ``batch_size`` events).

        Returns what could not be spooled (no spool, or the write failed: logged) for the caller to count
        as lost; an empty list otherwise. ``when`` says in the log which end this is.
        """
        leftover = self._take_queue()
        if not leftover or self._spool is None:
            return leftover
        seq = self._next_seq()
        try:
            self._spool.write(seq, b"".join(leftover))
        except OSError as exc:
            log.error("audit writer %r: spooling the queue %s failed: %s", self.name, when, exc)
            return leftover
        self._pending.append(_Batch(seq, len(leftover), own=True, payload=None, spooled=True))
        log.warning(
            "audit writer %r %s: %d queued events written to spool segment %d",
            self.name,
            when,
            len(leftover),
            seq,
        )
        return []

    def _spill(self) -> _Batch | None:
        """Write the oldest ``batch_size`` queued events to a new segment (lock held, spool present; one
        write, ~0.2 ms). Under the lock, so sequence order == file order == log() order. None when the write
        failed (the events are back in the queue)."""
        assert self._spool is not None
        seq = self._next_seq()
        lines, payload = self._pop_lines(min(self.batch_size, len(self._queue)))
        try:
            self._spool.write(seq, payload)
        except OSError as exc:  # disk full, folder gone
            self._queue[:0] = lines
            self._queue_bytes += len(payload)
            if self._count_spool_write_failure():
                log.error("audit spool write failed while spilling the queue (%s)", exc)
            return None
        batch = _Batch(seq, len(lines), own=True, payload=None, spooled=True)
        self._pending.append(batch)
        self._counters.spilled += len(lines)
        return batch

    def _take_late(self) -> tuple[list[bytes], list[_Batch]]:
        """The spooler has not emptied the queue for ``_late_ns`` (starved of the GIL by busy producers, a
        slow disk): take the whole queue for the calling producer to write (lock held; a list swap, and
        one pending batch of at most ``batch_size`` events per future segment, with its sequence number,
        so the order is kept). The producer writes them after releasing the lock (:meth:`_write_late`)."""
        lines = self._take_queue()
        batches = []
        for offset in range(0, len(lines), self.batch_size):
            batch = _Batch(
                self._next_seq(),
                min(self.batch_size, len(lines) - offset),
                own=True,
                payload=None,
                spooled=False,
                writing=True,
            )
            self._pending.append(batch)
            batches.append(batch)
        self._counters.spilled += len(lines)
        return lines, batches

    def _write_late(self, lines: list[bytes], batches: list[_Batch]) -> None:
        """Write what :meth:`_take_late` took, from the producer, no lock held (~0.2 ms per segment). If a
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
            # batch-sized write (~0.2 ms) instead of the whole queue keeps this producer's stall short (more
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
                self._counters.dropped += 1
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
            target = self._counters.accepted + self._counters.recovered
            while self._counters.settled < target:
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
                c = self._counters
                return c.settled >= c.accepted + c.recovered
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
        Cost: one segment write per batch, ~0.2 ms each. The stuck thread keeps the spool's flock until it
        ends; if it ever returns it delivers these segments itself and runs its normal shutdown.
        """
        with self._lock:
            if self._spool is not None:
                try:
                    for batch in self._pending:
                        # (a batch the spooler is writing, if it is stuck on the disk too, stays its job)
                        if not batch.spooled and batch.payload is not None and not batch.writing:
                            self._spool.write(batch.seq, batch.payload)
                            batch.spooled = True
                except OSError as exc:
                    log.error(
                        "audit writer %r: spooling the batches in flight at close failed: %s", self.name, exc
                    )
            leftover = self._spool_leftovers("closed while its delivery is stuck")
            in_flight = sum(b.count for b in self._pending if b.own and not b.spooled)
            if leftover:
                self._counters.drop(len(leftover))
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
            return self._counters.metrics(
                queued=len(self._queue),
                queued_bytes=self._queue_bytes,
                pending=sum(b.count for b in self._pending),
                spooled=sum(b.count for b in self._pending if b.spooled),
                db_reachable=self._conn is not None and self._backoff == 0,
            )

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
            self._pending.append(_Batch(self._next_seq(), n, own=True, payload=payload, spooled=False))
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
        even with producers spilling meanwhile — and written outside it (one write, ~0.2 ms per 5000 events),
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
                    lines = self._take_queue()
                else:
                    lines, payload = self._pop_lines(min(remaining, self.batch_size))
                remaining = max(0, remaining - len(lines))
                if not remaining:  # what was queued when the pass began is taken (spills take the oldest too)
                    self._taken_through_ns = max(self._taken_through_ns, started_ns)
                batch = _Batch(
                    self._next_seq(), len(lines), own=True, payload=None, spooled=False, writing=True
                )
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
                first = self._count_spool_write_failure()
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
                inserted, refused = deliver_one_by_one(conn, payload)
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
            self._counters.delivered(
                count=batch.count,
                inserted=inserted,
                refused=len(refused),
                replay=not batch.own,
                latency_ms=latency,
            )
            self._backoff = 0.0
            self._done.notify_all()
        return True

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            self._counters.failed_attempts += 1
            self._counters.last_error = f"{type(exc).__name__}: {exc}".strip()[:500]
            self._backoff = min(5.0, self._backoff * 2) if self._backoff else 0.05
            self._retry_at = time.monotonic() + self._backoff
            if self._spool is not None:
                for b in self._pending:
                    if b.spooled:
                        b.payload = None
        log.warning("audit delivery failed (retry in %.2fs): %s", self._backoff, self._counters.last_error)
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    def _shutdown(self) -> None:
        """Last step of the thread: spool what is left (or count it as dropped), close the connection."""
        if self._spool is None:
            self._take_batch()
        with self._lock:
            # with a spool, something is left only if the spooler's writes failed
            leftover = self._spool_leftovers("at shutdown")
            lost = len(leftover) + sum(b.count for b in self._pending if b.own and not b.spooled)
            if lost:
                self._counters.drop(lost)
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
    return combine(writer.metrics() for writer in list(_WRITERS))


def _close_all() -> None:
    for writer in list(_WRITERS):
        with contextlib.suppress(Exception):
            writer.close(timeout=5.0)


atexit.register(_close_all)

__all__: list[str] = ["AuditWriter", "metrics"]
