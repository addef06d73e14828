"""AuditWriter on real PostgreSQL: once-each delivery, order, outages, kills, replay, validation, policies."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from perf_pipeline import audit
from perf_pipeline.audit import (
    AuditEventError,
    AuditQueueFull,
    AuditWriter,
    AuditWriterClosed,
    UUIDv7,
    deliver_batch,
    encode_fields,
    prepare_connection,
    uuid7_time_ms,
)
from perf_pipeline.lib.migrations import apply_migrations
from perf_pipeline.settings import PROJECT_ROOT, Settings, SettingsError
from perf_pipeline.testing import silent_server

USER = "6f1c1a52-8f8e-4c59-9a55-0d3a7b0c2f11"
DEAD_URL = "postgresql://postgres@127.0.0.1:1/nowhere"  # port 1: connection refused at once


@pytest.fixture
def clean(db: psycopg.Connection) -> psycopg.Connection:
    db.execute("TRUNCATE audit_log")
    return db


def _log(writer: AuditWriter, i: int, **kw: object) -> str:
    return writer.log(
        "session.create",
        "session",
        str(i),
        "create",
        f"Session {i} created",
        user_id=USER,
        details={"i": i},
        **kw,
    )


def _ids_in_delivery_order(conn: psycopg.Connection) -> list[str]:
    """Ids by (transaction that wrote them, id): batches commit one after another from one connection, so
    xmin grows with delivery order; inside a batch, UUIDv7 ids grow with log() order."""
    rows = conn.execute("SELECT id FROM audit_log ORDER BY xmin::text::bigint, id").fetchall()
    return [str(r[0]) for r in rows]


def _wait_until(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def _count(conn: psycopg.Connection) -> tuple[int, int]:
    return conn.execute("SELECT count(*), count(DISTINCT id) FROM audit_log").fetchone()  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------- ids, encoding


def test_uuid7_is_rfc9562_and_monotonic() -> None:
    gen = UUIDv7()
    now = time.time_ns()
    ids = [
        gen.next(now) for _ in range(10_000)
    ]  # same millisecond: the counter (and its overflow) orders them
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    parsed = uuid.UUID(ids[0])
    assert parsed.version == 7 and parsed.variant == uuid.RFC_4122
    assert uuid7_time_ms(ids[0]) == now // 1_000_000
    assert uuid7_time_ms(ids[-1]) > now // 1_000_000  # 10k ids overflowed the 12-bit counter: ms advanced
    assert gen.next(now - 10**9) > ids[-1]  # the clock stepping back does not break the order


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"severity": "fatal"}, "severity"),
        ({"event_type": ""}, "event_type"),
        ({"event_type": "e" * 65}, "event_type"),
        ({"operation": "o" * 33}, "operation"),
        ({"entity_type": "t" * 65}, "entity_type"),
        ({"entity_id": "i" * 129}, "entity_id"),
        ({"description": "d" * 2001}, "description"),
        ({"description": "nul\x00byte"}, "NUL"),
        ({"description": "lone \udc80 surrogate"}, "Unicode"),
        ({"details": {"when": object()}}, "JSON"),
        ({"details": {1, 2}}, "JSON"),
        ({"details": {"x": float("nan")}}, "JSON"),
        ({"details": {"x": "a\x00b"}}, "NUL"),
        ({"ip": "300.1.1.1"}, "ip"),
        ({"ip": "fe80::1%eth0"}, "ip"),
        ({"ip": 12345}, "ip"),
        ({"user_id": "not-a-uuid"}, "user_id"),
        ({"event_type": None}, "event_type"),
        ({"operation": 5}, "operation"),
    ],
)
def test_invalid_events_raise_at_log_time(
    clean: psycopg.Connection, db_url: str, kwargs: dict[str, object], message: str
) -> None:
    event: dict[str, object] = {
        "event_type": "session.create",
        "entity_type": "session",
        "entity_id": "s1",
        "operation": "create",
        "description": "ok",
    }
    event.update(kwargs)
    with AuditWriter(db_url, flush_interval_ms=5) as writer:
        with pytest.raises(AuditEventError, match=message):
            writer.log(**event)  # type: ignore[arg-type]
        writer.log("session.create", "session", "s2", "create", "the valid one")
        assert writer.flush(10)
        assert writer.metrics()["accepted"] == 1
    assert _count(clean) == (1, 1)


@pytest.mark.parametrize("container", ["list", "dict"])
def test_deeply_nested_details_raise_an_event_error(
    clean: psycopg.Connection, db_url: str, container: str
) -> None:
    """5,000 levels of nesting: a clear AuditEventError naming details (not a RecursionError); the writer
    keeps working."""
    nested: object = 1
    for _ in range(5000):
        nested = [nested] if container == "list" else {"a": nested}
    with AuditWriter(db_url, flush_interval_ms=5) as writer:
        with pytest.raises(AuditEventError, match="details"):
            writer.log("e", None, None, "o", None, details=nested)
        ok = writer.log("e", None, None, "o", None, details={"a": {"b": [1, 2]}})
        assert writer.flush(10)
        assert writer.metrics()["accepted"] == 1
    assert _ids_in_delivery_order(clean) == [ok]


def test_valid_edge_values_round_trip_exactly(clean: psycopg.Connection, db_url: str) -> None:
    tricky = "tab\there\nnewline\r\\backslash \\N «ünïcødé» 🎙️" + "x" * 1900
    details = {"nested": {"list": [1, 2.5, None, True], "text": "a\\u0000 is not NUL\t"}, "emoji": "🎧"}
    with AuditWriter(db_url, flush_interval_ms=5) as writer:
        event_id = writer.log(
            "e" * 64,
            "t" * 64,
            uuid.UUID(USER),
            "o" * 32,
            tricky,
            user_id=uuid.UUID(USER),
            severity="critical",
            details=details,
            ip="2001:db8::1/64",
        )
        bare = writer.log("x", None, None, "y", None)
        before = time.time()
        assert writer.flush(10)
    row = clean.execute(
        "SELECT event_type, entity_type, entity_id, operation, description, user_id::text, severity, details,"
        " host(ip) || '/' || masklen(ip), extract(epoch FROM \"timestamp\") FROM audit_log WHERE id = %s",
        (event_id,),
    ).fetchone()
    assert row[:9] == (
        "e" * 64,
        "t" * 64,
        USER,
        "o" * 32,
        tricky,
        USER,
        "critical",
        details,
        "2001:db8::1/64",
    )
    assert abs(float(row[9]) - uuid7_time_ms(event_id) / 1000) < 0.002  # timestamp taken with the id
    assert float(row[9]) <= before
    bare_row = clean.execute(
        "SELECT entity_type, entity_id, description, details, ip, user_id, severity "
        "FROM audit_log WHERE id = %s",
        (bare,),
    ).fetchone()
    assert bare_row == (None, None, None, None, None, None, "low")


# ------------------------------------------------------------------------------------- delivery, once each


def test_concurrent_producers_write_every_event_once_in_order(
    clean: psycopg.Connection, db_url: str, scratch_dir: Path
) -> None:
    threads, per_thread = 8, 2500
    logged: list[list[str]] = [[] for _ in range(threads)]
    with AuditWriter(db_url, batch_size=700, flush_interval_ms=10, spool_dir=scratch_dir) as writer:

        def produce(k: int) -> None:
            for i in range(per_thread):
                logged[k].append(_log(writer, k * per_thread + i))

        workers = [threading.Thread(target=produce, args=(k,)) for k in range(threads)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        assert writer.flush(60)
        m = writer.metrics()
    all_ids = [i for ids in logged for i in ids]
    assert _count(clean) == (len(all_ids), len(all_ids))
    delivered = _ids_in_delivery_order(clean)
    assert set(delivered) == set(all_ids)
    assert delivered == sorted(all_ids)  # delivered in log() order (ids are taken in queue order)
    for ids in logged:
        assert ids == sorted(ids)
    assert m["written"] == len(all_ids) and m["dropped"] == 0 and m["duplicates_skipped"] == 0
    assert m["batches"] >= len(all_ids) // 700 and m["queued"] == 0 and m["pending"] == 0
    assert list(scratch_dir.glob("*.copy")) == []  # every segment acknowledged and removed
    assert audit.metrics()["writers"] == 0  # closed writers leave the process-wide metrics


def test_redelivery_after_commit_without_ack_writes_nothing_twice(
    clean: psycopg.Connection, db_url: str, scratch_dir: Path
) -> None:
    """A crash after COMMIT but before the segment was deleted: the next writer re-sends that segment."""
    gen = UUIDv7()

    def lines(n: int, offset: int) -> tuple[list[str], bytes]:
        ids, out = [], []
        for i in range(n):
            now = time.time_ns()
            event_id = gen.next(now)
            rest = encode_fields("session.create", "session", str(offset + i), "create", "d", USER)
            out.append(f"{event_id}\t2026-03-01 12:00:00.{i:06d}+00\t{rest}\n")
            ids.append(event_id)
        return ids, "".join(out).encode()

    committed_ids, committed = lines(300, 0)
    fresh_ids, fresh = lines(200, 300)
    with psycopg.connect(db_url, autocommit=True) as conn:
        prepare_connection(conn)
        assert deliver_batch(conn, committed) == 300  # COPY + COMMIT happened …
    (scratch_dir / f"{7:016d}.copy").write_bytes(committed)  # … but the ack (segment removal) did not
    (scratch_dir / f"{8:016d}.copy").write_bytes(fresh)
    with AuditWriter(db_url, spool_dir=scratch_dir, flush_interval_ms=5) as writer:
        assert writer.flush(30)
        m = writer.metrics()
    assert m["recovered"] == 500 and m["replayed"] == 500
    assert m["written"] == 200 and m["duplicates_skipped"] == 300
    assert _count(clean) == (500, 500)
    assert set(_ids_in_delivery_order(clean)) == set(committed_ids + fresh_ids)
    assert list(scratch_dir.glob("*.copy")) == []


_CHILD = textwrap.dedent("""
    import sys, time
    from perf_pipeline.audit import AuditWriter
    url, spool, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    w = AuditWriter(url, spool_dir=spool, batch_size=200, flush_interval_ms=5, spool_fsync=True)
    with open(spool + "/../ids.txt", "w") as out:
        for i in range(n):
            out.write(w.log("session.create", "session", str(i), "create", "d", details={"i": i}) + "\\n")
    deadline = time.monotonic() + 30
    while w.metrics()["spooled"] < n and time.monotonic() < deadline:
        time.sleep(0.01)
    print("READY", w.metrics()["spooled"], flush=True)
    time.sleep(60)
""")


def _wait_until_no_writer_session(conn: psycopg.Connection) -> None:
    """Wait until no AuditWriter session (application_name perf_pipeline.audit) is connected to this
    database: a killed client's backend has ended."""
    _wait_until(
        lambda: (
            conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'perf_pipeline.audit' "
                "AND datname = current_database()"
            ).fetchone()[0]
            == 0
        )
    )


def _python_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}


def _start_child(script: str, *args: str) -> subprocess.Popen[str]:
    """``python -c script args…`` with the project importable; its stdout is a text pipe to this test."""
    return subprocess.Popen(
        [sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True, env=_python_env()
    )


def test_killed_process_spool_is_replayed_in_order(
    clean: psycopg.Connection, db_url: str, scratch_dir: Path
) -> None:
    spool, n = scratch_dir / "spool", 3000
    spool.mkdir()
    child = _start_child(_CHILD, DEAD_URL, str(spool), str(n))
    try:
        assert child.stdout is not None
        assert child.stdout.readline().split() == ["READY", str(n)]
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    assert child.returncode == -signal.SIGKILL
    logged = (scratch_dir / "ids.txt").read_text().split()
    assert len(logged) == n and len(list(spool.glob("*.copy"))) >= 1
    with AuditWriter(db_url, spool_dir=spool, flush_interval_ms=5) as writer:
        assert writer.flush(60)
        m = writer.metrics()
    assert m["replayed"] == n and m["written"] == n and m["dropped"] == 0
    assert _count(clean) == (n, n)
    assert _ids_in_delivery_order(clean) == logged


_SATURATED_CHILD = textwrap.dedent("""
    import mmap, sys, threading
    from perf_pipeline.audit import AuditWriter
    url, spool, counts = sys.argv[1], sys.argv[2], sys.argv[3]
    w = AuditWriter(url, spool_dir=spool, metrics_interval_s=None)  # default batch, interval and queue
    with open(counts, "r+b") as fh:
        accepted = memoryview(mmap.mmap(fh.fileno(), 4 * 8)).cast("q")

    def produce(k):
        n = 0
        while True:  # as fast as it can, until SIGKILL
            w.log("session.create", "session", f"p{k}-{n}", "create", "Session created",
                  details={"n": n, "provider": "whisper"})
            n += 1
            accepted[k] = n  # readable by the parent after the kill

    for k in range(4):
        threading.Thread(target=produce, args=(k,), daemon=True).start()
    print("READY", flush=True)
    threading.Event().wait()
""")

# per producer p<k>: the first n (from 0) with no row, i.e. how many of its events are present in a row
_FIRST_MISSING = """
WITH e AS (
    SELECT DISTINCT split_part(entity_id, '-', 2)::bigint AS n FROM audit_log
    WHERE entity_id LIKE %(prefix)s
), r AS (SELECT n, row_number() OVER (ORDER BY n) - 1 AS i FROM e)
SELECT coalesce(min(i) FILTER (WHERE n <> i), count(*)) FROM r
"""


def test_sigkill_under_saturation_with_blocked_database_loses_only_the_last_interval(
    clean: psycopg.Connection, db_url: str, scratch_dir: Path
) -> None:
    """Loss at SIGKILL is bounded by time, not by the queue's size, whatever the database does.

    4 producer threads saturate one writer (spool, default 50 ms interval, 100k-event queue) while another
    session holds ACCESS EXCLUSIVE on audit_log, so the writer's delivery waits on the lock and nothing
    commits. The process is SIGKILLed after more than a second of that. Every event a producer had logged
    more than flush interval + 250 ms (a loaded 2-core machine's scheduling margin) before the kill must
    reach audit_log through the replay of the spool, exactly once."""
    spool, counts = scratch_dir / "spool", scratch_dir / "accepted"
    counts.write_bytes(bytes(4 * 8))
    bound_s = 0.05 + 0.25
    locker = psycopg.connect(db_url)
    try:
        locker.execute("LOCK TABLE audit_log IN ACCESS EXCLUSIVE MODE")
        child = _start_child(_SATURATED_CHILD, db_url, str(spool), str(counts))
        try:
            assert child.stdout is not None and child.stdout.readline().strip() == "READY"
            started = time.monotonic()

            def accepted() -> list[int]:
                return list(memoryview(counts.read_bytes()).cast("q"))

            def saturated_and_blocked() -> bool:
                blocked = clean.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'perf_pipeline.audit' "
                    "AND wait_event_type = 'Lock' AND datname = current_database()"
                ).fetchone()[0]
                return bool(blocked) and time.monotonic() - started > 1.5 and sum(accepted()) > 30_000

            _wait_until(saturated_and_blocked, timeout=60)
            killed_at = time.time()
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            child.wait(30)
        last = accepted()  # producer k had logged events p<k>-0 … p<k>-(last[k] - 1)
    finally:
        locker.rollback()  # the dead client's waiting COPY then fails: it commits nothing
        locker.close()
    _wait_until_no_writer_session(clean)
    assert _count(clean) == (0, 0)  # nothing went in while the lock was held: all from the spool
    with AuditWriter(db_url, spool_dir=spool, flush_interval_ms=5, metrics_interval_s=None) as replay:
        assert replay.flush(120)
    rows, distinct = _count(clean)
    assert rows == distinct  # 0 duplicates
    late: list[str] = []
    for k, n_accepted in enumerate(last):
        first_missing = clean.execute(_FIRST_MISSING, {"prefix": f"p{k}-%"}).fetchone()[0]
        if first_missing >= n_accepted:
            continue  # every accepted event of this producer is there
        assert first_missing > 0, f"producer {k}: none of its {n_accepted} accepted events survived"
        # the newest present event before the gap was logged just before (µs) the first missing one
        (age,) = clean.execute(
            'SELECT extract(epoch FROM %s - "timestamp")::float8 FROM audit_log WHERE entity_id = %s',
            (datetime.fromtimestamp(killed_at, tz=UTC), f"p{k}-{first_missing - 1}"),
        ).fetchone()
        if age > bound_s:
            late.append(
                f"producer {k}: events {first_missing}..{n_accepted - 1} lost, the first logged "
                f"{age * 1000:.0f} ms before the kill"
            )
    assert not late, f"lost events older than {bound_s * 1000:.0f} ms at the kill: {late}"


def test_flushes_at_interpreter_exit(clean: psycopg.Connection, db_url: str) -> None:
    code = (
        "import sys\nfrom perf_pipeline.audit import AuditWriter\n"
        "w = AuditWriter(sys.argv[1], flush_interval_ms=60000, batch_size=10000)\n"
        "for i in range(250):\n    w.log('login', 'user', str(i), 'login', None)\n"
    )
    subprocess.run([sys.executable, "-c", code, db_url], check=True, env=_python_env(), timeout=60)
    assert _count(clean) == (250, 250)  # nothing triggered a flush but the exit hook


# ------------------------------------------------------------------------------------------------ outages


@pytest.fixture(scope="module")
def private_pg() -> Iterator[tuple[Path, str]]:
    """A PRIVATE embedded PostgreSQL this module may stop and start (never the shared one).

    Its folder is not under pytest's basetemp: concurrent pytest sessions chmod that to 0700 (the server
    runs as another user) and delete old basetemps, which would pull the data folder from under it.
    """
    from perf_pipeline.embedded import start_postgres, stop_postgres

    state = Path(tempfile.mkdtemp(prefix="ppt_audit_pg_"))
    try:
        url = start_postgres(state)
        apply_migrations(url)
        yield state, url
    finally:
        stop_postgres(state)
        shutil.rmtree(state, ignore_errors=True)


def test_database_stopped_mid_stream_then_restarted(private_pg: tuple[Path, str], scratch_dir: Path) -> None:
    from perf_pipeline.embedded import start_postgres, stop_postgres

    state, url = private_pg
    logged: list[str] = []
    stop_logging = threading.Event()
    writer = AuditWriter(
        url, batch_size=200, flush_interval_ms=10, spool_dir=scratch_dir, connect_timeout_s=2
    )

    def produce() -> None:
        i = 0
        while not stop_logging.is_set():
            logged.append(_log(writer, i))
            i += 1
            if i % 20 == 0:
                time.sleep(0.002)  # ~5-10k events/s: a steady stream, not a tight loop

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        _wait_until(lambda: writer.metrics()["written"] > 0)  # delivering before the outage
        stop_postgres(state)
        _wait_until(lambda: writer.metrics()["failed_attempts"] > 0)
        time.sleep(0.5)  # events keep coming while the database is down
        during = writer.metrics()
        assert during["spooled"] > 0 and not during["db_reachable"] and during["dropped"] == 0
        assert start_postgres(state) == url  # same port: the writer's URL works again
        time.sleep(0.3)
    finally:
        stop_logging.set()
        producer.join()
    assert writer.flush(60)
    m = writer.metrics()
    writer.close()
    with psycopg.connect(url) as conn:
        assert _count(conn) == (len(logged), len(logged))
        assert _ids_in_delivery_order(conn) == logged  # in order, across the outage
    assert m["written"] + m["duplicates_skipped"] == len(logged) and m["dropped"] == 0
    assert list(scratch_dir.glob("*.copy")) == []


def test_without_spool_a_full_queue_blocks_then_raises(db_url: str) -> None:
    writer = AuditWriter(DEAD_URL, batch_size=10, max_queue=10, put_timeout=0.2)
    try:
        for i in range(10):  # taken by the flusher as its one in-memory batch (it cannot deliver it)
            _log(writer, i)
        _wait_until(lambda: writer.metrics()["pending"] == 10)
        for i in range(10):
            _log(writer, 10 + i)  # fills the queue
        started = time.monotonic()
        with pytest.raises(AuditQueueFull):
            _log(writer, 99)
        assert time.monotonic() - started >= 0.19  # it blocked for put_timeout first
        m = writer.metrics()
        assert (m["dropped"], m["queued"], m["pending"], m["accepted"]) == (1, 10, 10, 20)
    finally:
        assert writer.close(timeout=0.3) is False
    assert writer.metrics()["dropped"] == 21  # no spool: what was undelivered at close is counted lost
    with pytest.raises(AuditWriterClosed):
        _log(writer, 100)


def _assert_spool_replays(clean: psycopg.Connection, db_url: str, spool: Path, logged: list[str]) -> None:
    """A new writer on the healthy database replays ``spool`` within 30 s; audit_log then holds exactly
    ``logged``, in that order."""
    with AuditWriter(db_url, spool_dir=spool, flush_interval_ms=5) as replay:
        assert replay.flush(30)
    assert _ids_in_delivery_order(clean) == logged


@contextlib.contextmanager
def _writer_stuck_in_connect(scratch_dir: Path, **kwargs: Any) -> Iterator[AuditWriter]:
    """An AuditWriter spooling to ``scratch_dir`` whose database accepts connections and never answers (a
    database stuck in connect; the writer gives up after 2 s, then tries again); the port is closed on exit."""
    with silent_server() as listener:
        stuck_url = f"postgresql://postgres@127.0.0.1:{listener.getsockname()[1]}/stuck"
        yield AuditWriter(
            stuck_url, flush_interval_ms=5, spool_dir=scratch_dir, connect_timeout_s=2, **kwargs
        )


def test_with_spool_a_full_queue_spills_and_order_is_kept(
    clean: psycopg.Connection, db_url: str, scratch_dir: Path
) -> None:
    with _writer_stuck_in_connect(scratch_dir, batch_size=50, max_queue=100) as writer:
        logged = [_log(writer, 0)]
        _wait_until(
            lambda: writer.metrics()["spooled"] == 1
        )  # the spooler wrote event 0; the flusher hangs in connect() 2 s
        time.sleep(0.05)
        started = time.perf_counter()
        logged += [_log(writer, i) for i in range(1, 351)]
        took = time.perf_counter() - started
        m = writer.metrics()
        # the spooler and the producer (spilling when the queue is full) share the 350 events: how many
        # each wrote depends on thread scheduling; the queue never held more than max_queue
        assert m["queued"] <= 100 and m["dropped"] == 0
        assert took < 1.0  # producers never waited for the stuck database
        # the database still hangs, yet every event reaches the spool (the spooler does not wait for it)
        _wait_until(lambda: writer.metrics()["spooled"] == 351)
        writer.close(timeout=1)
    assert len(list(scratch_dir.glob("*.copy"))) >= 8  # no segment holds more than batch_size events
    _assert_spool_replays(clean, db_url, scratch_dir, logged)


def test_a_producer_spools_the_queue_when_the_spooler_is_late(
    clean: psycopg.Connection, db_url: str, scratch_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spooler stalls (as when busy producers starve it of the GIL, or the disk is slow; simulated by
    making its passes do nothing): the first log() that finds a queued event older than flush interval +
    max(flush interval, 50 ms) writes the queue to the spool itself, so memory alone never holds it longer."""
    writer = AuditWriter(DEAD_URL, flush_interval_ms=5, spool_dir=scratch_dir, metrics_interval_s=None)
    try:
        stalled = threading.Event()
        monkeypatch.setattr(writer, "_spool_queue", stalled.set)
        assert stalled.wait(10)  # the spooler's passes now do nothing
        logged = [_log(writer, 0), _log(writer, 1)]
        assert writer.metrics()["spooled"] == 0  # not late yet: nothing moved
        time.sleep(0.06)  # the queued events age past 5 + 50 ms
        logged.append(_log(writer, 2))
        m = writer.metrics()
        assert (m["spilled"], m["spooled"], m["queued"]) == (2, 2, 1)  # the late two, on disk; the new one
        monkeypatch.undo()
    finally:
        writer.close(timeout=1)
    _assert_spool_replays(clean, db_url, scratch_dir, logged)


def test_rows_the_database_refuses_are_set_aside_and_the_rest_delivered(
    clean: psycopg.Connection, db_url: str, scratch_dir: Path
) -> None:
    # a constraint stricter than log()'s validation (a schema that moved on): only that row may be lost
    clean.execute(
        "ALTER TABLE audit_log ADD CONSTRAINT test_no_poison CHECK (description <> 'poison') NOT VALID"
    )
    try:
        with AuditWriter(db_url, spool_dir=scratch_dir, flush_interval_ms=5) as writer:
            ids = [writer.log("e", None, None, "o", "poison" if i == 4 else f"ok {i}") for i in range(10)]
            assert writer.flush(30)
            m = writer.metrics()
    finally:
        clean.execute("ALTER TABLE audit_log DROP CONSTRAINT test_no_poison")
    assert (m["written"], m["rejected"], m["dropped"]) == (9, 1, 0)
    assert set(_ids_in_delivery_order(clean)) == set(ids) - {ids[4]}
    rejected = (scratch_dir / "rejected.copy").read_bytes().decode()
    assert rejected.startswith(ids[4]) and rejected.count("\n") == 1


def test_from_settings_uses_the_configured_database_and_spool(
    clean: psycopg.Connection, db_url: str, scratch_dir: Path
) -> None:
    settings = Settings.from_env(
        {"PERF_PIPELINE_DATABASE_URL": db_url, "PERF_PIPELINE_AUDIT_SPOOL_DIR": str(scratch_dir / "spool")}
    )
    with AuditWriter.from_settings(settings, flush_interval_ms=5) as writer:
        assert writer.url == db_url
        event_id = writer.log("login", "user", "u1", "login", None)
        assert (scratch_dir / "spool" / ".lock").exists()
        assert writer.flush(10)
    assert _ids_in_delivery_order(clean) == [event_id]


def test_from_settings_without_a_database_url_names_the_variable(scratch_dir: Path) -> None:
    """The library never starts or looks for an embedded server: an unset URL is a clear error."""
    settings = Settings.from_env({"PERF_PIPELINE_AUDIT_SPOOL_DIR": str(scratch_dir / "spool")})
    with pytest.raises(SettingsError, match="PERF_PIPELINE_DATABASE_URL"):
        AuditWriter.from_settings(settings)
    assert not (scratch_dir / "spool").exists()  # nothing was created


def test_the_package_imports_without_dagster_or_the_embedded_servers() -> None:
    code = (
        "import sys, perf_pipeline.audit\n"
        "assert 'dagster' not in sys.modules, 'dagster'\n"
        "assert 'perf_pipeline.embedded' not in sys.modules, 'perf_pipeline.embedded'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PROJECT_ROOT, timeout=60)


def test_two_writers_cannot_share_a_spool(db_url: str, scratch_dir: Path) -> None:
    with AuditWriter(db_url, spool_dir=scratch_dir), pytest.raises(audit.AuditError, match="in use"):
        AuditWriter(db_url, spool_dir=scratch_dir)


# -------------------------------------------------------------------------------------- async, metrics


def test_usable_from_async_code(clean: psycopg.Connection, db_url: str) -> None:
    async def handler(writer: AuditWriter, i: int) -> str:
        return writer.log("api.call", "request", str(i), "read", None, severity="medium")

    async def main() -> list[str]:
        writer = AuditWriter(db_url, flush_interval_ms=5, put_timeout=0)
        ids = await asyncio.gather(*(handler(writer, i) for i in range(100)))
        assert await writer.aflush(10)
        process_wide = audit.metrics()
        assert process_wide["writers"] >= 1 and process_wide["written"] >= 100
        await writer.aclose()
        return list(ids)

    ids = asyncio.run(main())
    assert set(_ids_in_delivery_order(clean)) == set(ids)


def test_metrics_are_plain_json(db_url: str) -> None:
    with AuditWriter(db_url) as writer:
        _log(writer, 1)
        assert writer.flush(10)
        m = writer.metrics()
    json.dumps(m)
    for key in ("queued", "written", "spooled", "dropped", "flush_p50_ms", "flush_p99_ms"):
        assert key in m
    assert m["flush_p99_ms"] >= m["flush_p50_ms"] > 0


def test_metrics_are_published_for_the_health_report(db_url: str, db: psycopg.Connection) -> None:
    from perf_pipeline.lib import health

    db.execute("DELETE FROM audit_writer_metrics")
    writer = AuditWriter(db_url, name="published", metrics_interval_s=0.05)
    try:
        for i in range(7):
            _log(writer, i)
        assert writer.flush(10)
    finally:
        writer.close()  # publishes a last snapshot, with every event written
    # the writer's backend drops its TEMP staging table as it exits, after close() returned; the health
    # query's pg_table_size() of a table being dropped is NULL (a health report defect, reported): wait it out
    _wait_until(
        lambda: (
            db.execute("SELECT count(*) FROM pg_class WHERE relname = 'audit_log_staging'").fetchone()[0] == 0
        )
    )
    ((key, metrics),) = db.execute("SELECT writer, metrics FROM audit_writer_metrics").fetchall()
    assert key.endswith(f":{os.getpid()}:published")
    assert metrics["written"] == 7 and metrics["dropped"] == 0
    report = health.health_report(db)
    assert [w["writer"] for w in report.audit_writers] == [key]
    assert health.report_metrics(report)["audit_dropped"] == 0.0
    assert "published" in health.report_markdown(report)
    db.execute("UPDATE audit_writer_metrics SET updated_at = now() - interval '10 minutes'")
    stale = health.health_report(db)
    assert stale.audit_writers[0]["stale"] and health.report_metrics(stale)["audit_writers"] == 0.0


# ------------------------------------------------------------------------------- stuck delivery at close


_STUCK_CHILD = textwrap.dedent("""
    import sys, time
    import psycopg
    from perf_pipeline.audit import AuditWriter
    url, spool = sys.argv[1], sys.argv[2] or None
    w = AuditWriter(url, spool_dir=spool, batch_size=10, flush_interval_ms=5, metrics_interval_s=None)
    ids = [w.log("session.create", "session", str(i), "create", "d") for i in range(10)]
    with psycopg.connect(url, autocommit=True) as probe:  # wait until the flusher's COPY waits on the lock
        deadline = time.monotonic() + 20
        while not probe.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                                "'perf_pipeline.audit' AND wait_event_type = 'Lock' "
                                "AND datname = current_database()").fetchone()[0]:
            assert time.monotonic() < deadline, "flusher never blocked"
            time.sleep(0.01)
    ids += [w.log("session.create", "session", str(i), "create", "d") for i in range(10, 15)]
    done = w.close(timeout=0.5)
    m = w.metrics()
    print(" ".join(ids), flush=True)
    print("CLOSED", done, w._thread.is_alive(), m["dropped"], flush=True)
    # interpreter exit now: the daemon flusher, still stuck in its COPY, dies with the process
""")


@pytest.mark.parametrize("with_spool", [True, False], ids=["spool", "no_spool"])
def test_close_while_delivery_is_stuck_keeps_queued_events(
    clean: psycopg.Connection, db_url: str, scratch_dir: Path, with_spool: bool
) -> None:
    """D5: a delivery stuck on a lock (slow server, half-open TCP) must not make close() forget the queue.

    The flusher's COPY of the first 10 events waits behind an ACCESS EXCLUSIVE lock; 5 more events are
    logged; close() gives up while the thread is still stuck and the process exits. With a spool every
    one of the 15 events must be on disk and replayed by the next writer; without one the 5 queued events
    must at least be counted as dropped (not silently vanish)."""
    spool = scratch_dir / "spool"
    locker = psycopg.connect(db_url)
    try:
        locker.execute("LOCK TABLE audit_log IN ACCESS EXCLUSIVE MODE")
        child = subprocess.run(
            [sys.executable, "-c", _STUCK_CHILD, db_url, str(spool) if with_spool else ""],
            capture_output=True,
            text=True,
            env=_python_env(),
            timeout=60,
        )
    finally:
        locker.rollback()  # releases the lock; the dead client's COPY then fails: nothing committed by it
        locker.close()
    assert child.returncode == 0, child.stderr
    ids_line, closed_line = child.stdout.splitlines()
    logged = ids_line.split()
    _, done, alive, dropped = closed_line.split()
    assert len(logged) == 15 and done == "False" and alive == "True"  # the scenario really happened
    _wait_until_no_writer_session(clean)
    assert _count(clean) == (0, 0)
    if not with_spool:
        assert int(dropped) == 5  # the queued events, counted and logged as lost
        assert "lost" in child.stderr
        return
    assert int(dropped) == 0
    with AuditWriter(db_url, spool_dir=spool, flush_interval_ms=5) as replay:
        assert replay.flush(30)
        m = replay.metrics()
    assert m["replayed"] == 15 and m["written"] == 15
    assert _ids_in_delivery_order(clean) == logged  # every event, in log() order


# ------------------------------------------------------------------------------------ memory byte bounds


def test_details_limit_is_measured_in_utf8_bytes(clean: psycopg.Connection, db_url: str) -> None:
    """D6: 600k 'é' are 600k characters but 1.2 MB of UTF-8, over the 1 MiB limit."""
    assert audit.MAX_DETAILS_BYTES == 1 << 20
    with AuditWriter(db_url, flush_interval_ms=5) as writer:
        with pytest.raises(AuditEventError, match="bytes"):
            writer.log("e", None, None, "o", None, details={"x": "é" * 600_000})
        with pytest.raises(AuditEventError, match="bytes"):
            writer.log("e", None, None, "o", None, details={"x": "🎙" * 270_000})  # 4 bytes each
        ok = writer.log("e", None, None, "o", None, details={"x": "é" * 500_000})  # ~1.0 MB: allowed
        assert writer.flush(30)
    assert _ids_in_delivery_order(clean) == [ok]


def _big(writer: AuditWriter, i: int) -> str:
    return writer.log("e", None, None, "o", None, details={"i": i, "pad": "p" * 1000})


def test_queue_byte_budget_without_spool_blocks_then_raises() -> None:
    """D6: max_queue_bytes bounds the queue by bytes with the same policy as max_queue (here: no spool)."""
    writer = AuditWriter(DEAD_URL, batch_size=10, max_queue=100_000, max_queue_bytes=50_000, put_timeout=0.1)
    try:
        for i in range(10):  # the one in-memory batch the flusher holds (it cannot deliver it)
            _big(writer, i)
        _wait_until(lambda: writer.metrics()["pending"] == 10)
        accepted = 0
        with pytest.raises(AuditQueueFull):
            for i in range(10, 1000):
                _big(writer, i)
                accepted += 1
        m = writer.metrics()
        assert 40 <= accepted < 50 and m["queued"] == accepted  # ~1.1 kB each: 50 kB hold fewer than 50
        assert m["queued_bytes"] <= 50_000 and m["dropped"] == 1
    finally:
        writer.close(timeout=0.3)


def test_queue_byte_budget_with_spool_spills(
    clean: psycopg.Connection, db_url: str, scratch_dir: Path
) -> None:
    with _writer_stuck_in_connect(
        scratch_dir, batch_size=10, max_queue=100_000, max_queue_bytes=30_000
    ) as writer:
        logged = [_big(writer, 0)]
        _wait_until(lambda: writer.metrics()["spooled"] == 1)  # the flusher hangs in connect() for 2 s
        logged += [_big(writer, i) for i in range(1, 200)]
        m = writer.metrics()
        # the overflow went to the spool (spilled by the producer or written by the spooler: scheduling)
        assert m["queued_bytes"] <= 30_000 and m["dropped"] == 0
        _wait_until(lambda: writer.metrics()["spooled"] == 200)
        writer.close(timeout=1)
    _assert_spool_replays(clean, db_url, scratch_dir, logged)


def _failing_spool_writes(writer: AuditWriter, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make every spool segment write fail as on a full disk; returns the list of attempted sequences."""
    attempts: list[int] = []

    def disk_full(seq: int, payload: bytes) -> None:
        attempts.append(seq)
        raise OSError(28, "No space left on device")

    assert writer._spool is not None
    monkeypatch.setattr(writer._spool, "write", disk_full)
    return attempts


def test_spool_disk_full_while_database_down_keeps_memory_bounded(
    clean: psycopg.Connection, db_url: str, scratch_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """D6: spool writes failing (ENOSPC) while the database is down: no batch piles up in memory per cycle;
    once the disk has room again every event reaches the spool and, later, the database, in order."""
    writer = AuditWriter(DEAD_URL, batch_size=10, flush_interval_ms=5, spool_dir=scratch_dir)
    try:
        attempts = _failing_spool_writes(writer, monkeypatch)
        logged = [_log(writer, i) for i in range(300)]
        _wait_until(lambda: len(attempts) >= 20)  # many flusher cycles met the full disk
        m = writer.metrics()
        assert m["pending"] <= 10 and m["queued"] + m["pending"] == 300 and m["dropped"] == 0
        monkeypatch.undo()  # the disk has room again
        _wait_until(lambda: writer.metrics()["spooled"] == 300)
    finally:
        writer.close(timeout=0.5)
    assert writer.metrics()["dropped"] == 0
    _assert_spool_replays(clean, db_url, scratch_dir, logged)


def test_spool_disk_full_while_database_up_still_delivers(
    clean: psycopg.Connection, db_url: str, scratch_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full spool disk must not stop delivery to a healthy database (batches go straight from memory)."""
    with AuditWriter(db_url, batch_size=10, flush_interval_ms=5, spool_dir=scratch_dir) as writer:
        attempts = _failing_spool_writes(writer, monkeypatch)
        logged = [_log(writer, i) for i in range(300)]
        assert writer.flush(30)
        m = writer.metrics()
    assert attempts and m["written"] == 300 and m["dropped"] == 0
    assert _ids_in_delivery_order(clean) == logged
