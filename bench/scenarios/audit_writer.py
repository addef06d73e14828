"""AuditWriter: the seed's "100 audited operations" test side by side, delivery paths, sustained throughput.

1. The seed's test (US010, ``test_audit_logging_performance``): 100 operations, each creating a session
   (INSERT + COMMIT), audited (a) synchronously, one ``INSERT INTO audit_log`` + ``COMMIT`` per operation,
   (b) through ``AuditWriter.log()``, (c) not at all (the floor). Milliseconds per 100 operations.
2. Delivery paths alone, same rows: the plain ``COPY`` a batch's first send uses, the idempotent ``COPY`` →
   TEMP staging → ``INSERT … ON CONFLICT DO NOTHING`` every re-send uses, and a replay of batches already
   delivered (all skipped): rows/s.
3. Sustained, 4 producer threads: (a) saturated — they call ``log()`` as fast as they can: events/s from
   the first ``log()`` until ``flush()`` returned (everything committed); (b) paced at the target rate
   (50k events/s in total): ``log()`` latency at that load. Both report ``log()`` p50/p99/p99.9 in µs and
   the rows counted in the database against the ids returned (lost must be 0). Targets: p99 ≤ 50 µs,
   ≥ 50k events/s. In CPython the producers and the flusher share one GIL, so the saturated p99 also
   measures waiting for the GIL (5 ms switch interval) behind the other threads; (c) saturated again
   with ``sys.setswitchinterval(0.0005)`` (an application-wide knob, not set by the writer) shows it.

``BENCH_SCALE=small``: 100k events and fewer rounds (about a minute); default: 1M events.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import threading
import time
import uuid

import psycopg
from psycopg import sql

from bench.harness import BenchContext, percentile, scenario
from perf_pipeline.audit import COLUMNS, AuditWriter, deliver_batch, encode_fields, prepare_connection

SMALL = os.environ.get("BENCH_SCALE", "").lower() == "small"
EVENTS = 100_000 if SMALL else 1_000_000
ROUNDS = 5 if SMALL else 10
PRODUCERS = 4
USER = "6f1c1a52-8f8e-4c59-9a55-0d3a7b0c2f11"


def _create_session(conn: psycopg.Connection, i: int) -> str:
    row = conn.execute(
        "INSERT INTO session (user_id, title, status) VALUES (%s, %s, 'created') RETURNING id",
        (USER, f"bench session {i}"),
    ).fetchone()
    conn.commit()
    assert row is not None
    return str(row[0])


def _seed_test(ctx: BenchContext, url: str) -> None:
    insert = sql.SQL("INSERT INTO audit_log ({}) VALUES ({})").format(
        sql.SQL(", ").join(map(sql.Identifier, COLUMNS[2:])), sql.SQL(", ").join(sql.Placeholder() * 9)
    )
    results: dict[str, list[float]] = {"no audit": [], "sync INSERT+COMMIT": [], "AuditWriter.log()": []}
    audit_us: dict[str, list[float]] = {k: [] for k in results}  # time inside the audit call, per operation
    with (
        tempfile.TemporaryDirectory(prefix="bench_audit_") as spool,
        psycopg.connect(url) as conn,
        AuditWriter(url, spool_dir=spool) as writer,
    ):
        for _ in range(ROUNDS):
            for variant in results:
                started = time.perf_counter()
                for i in range(100):
                    session_id = _create_session(conn, i)
                    t0 = time.perf_counter()
                    if variant == "sync INSERT+COMMIT":
                        conn.execute(
                            insert,
                            (
                                USER,
                                "session",
                                session_id,
                                "session.create",
                                "create",
                                "low",
                                f"Session bench session {i} created",
                                None,
                                None,
                            ),
                        )
                        conn.commit()
                    elif variant == "AuditWriter.log()":
                        writer.log(
                            "session.create",
                            "session",
                            session_id,
                            "create",
                            f"Session bench session {i} created",
                            user_id=USER,
                        )
                    audit_us[variant].append((time.perf_counter() - t0) * 1e6)
                results[variant].append((time.perf_counter() - started) * 1000)
        assert writer.flush(60)
    medians = {k: statistics.median(v) for k, v in results.items()}
    for variant, samples in results.items():
        ctx.row(
            test="seed: 100 audited operations",
            variant=variant,
            rounds=len(samples),
            median_ms=statistics.median(samples),
            p95_ms=percentile(samples, 95),
            audit_call_p50_us=percentile(audit_us[variant], 50),
            audit_call_p99_us=percentile(audit_us[variant], 99),
            target="< 2000 ms",
        )
    ctx.ratio(
        "seed: sync audit / AuditWriter (100 ops, median)",
        medians["sync INSERT+COMMIT"],
        medians["AuditWriter.log()"],
        target="> 1",
    )


def _payload(n: int, offset: int) -> bytes:
    from perf_pipeline.audit import UUIDv7

    gen, lines = UUIDv7(), []
    for i in range(n):
        event_id = gen.next(time.time_ns())
        rest = encode_fields(
            "session.create",
            "session",
            str(offset + i),
            "create",
            f"Session {i} created",
            USER,
            details={"i": i},
            ip="10.1.2.3",
        )
        lines.append(f"{event_id}\t2026-03-01 12:00:00.{i % 1_000_000:06d}+00\t{rest}\n")
    return "".join(lines).encode()


def _delivery_paths(ctx: BenchContext, url: str) -> None:
    batch, batches = 5000, 20 if SMALL else 40
    payloads = [_payload(batch, k * batch) for k in range(batches)]
    with psycopg.connect(url, autocommit=True) as conn:
        prepare_connection(conn)
        for label, idempotent in (
            ("re-send: COPY → staging, INSERT … ON CONFLICT DO NOTHING", True),
            ("first send: plain COPY into audit_log (autocommit)", False),
        ):
            conn.execute("TRUNCATE audit_log")
            started = time.perf_counter()
            for payload in payloads:
                deliver_batch(conn, payload, idempotent=idempotent)
            seconds = time.perf_counter() - started
            rows = batch * batches
            ctx.row(
                test="delivery path",
                variant=label,
                rows=rows,
                batch=batch,
                seconds=seconds,
                rows_per_s=rows / seconds,
            )
        started = time.perf_counter()
        for payload in payloads:  # replay of everything already there: all skipped, nothing written twice
            assert deliver_batch(conn, payload) == 0
        seconds = time.perf_counter() - started
        ctx.row(
            test="delivery path",
            variant="replay of delivered batches (all skipped)",
            rows=batch * batches,
            batch=batch,
            seconds=seconds,
            rows_per_s=batch * batches / seconds,
        )
        conn.execute("TRUNCATE audit_log")


def _sustained(ctx: BenchContext, url: str, rate: int | None, switch_interval_s: float | None = None) -> None:
    """4 producers; ``rate`` None: as fast as they can (throughput); else paced to ``rate`` events/s in total
    (latency at a given load: each thread logs a burst of 25 events, then sleeps to keep its share)."""
    label = "saturated" if rate is None else f"paced {rate:,}/s"
    if switch_interval_s is not None:
        label += f", sys.setswitchinterval({switch_interval_s})"
    per_thread = EVENTS // PRODUCERS
    latencies: list[list[int]] = [[] for _ in range(PRODUCERS)]
    ids: list[list[str]] = [[] for _ in range(PRODUCERS)]
    spool = tempfile.TemporaryDirectory(prefix="bench_audit_")
    writer = AuditWriter(url, spool_dir=spool.name)
    start = threading.Barrier(PRODUCERS + 1)

    def produce(k: int) -> None:
        lat, out, clock = latencies[k], ids[k], time.perf_counter_ns
        entity = str(uuid.uuid4())
        start.wait()
        began = time.perf_counter()
        for i in range(per_thread):
            if rate is not None and i % 25 == 0:
                ahead = began + i * PRODUCERS / rate - time.perf_counter()
                if ahead > 0:
                    time.sleep(ahead)
            t0 = clock()
            event_id = writer.log(
                "session.create",
                "session",
                entity,
                "create",
                "Session created",
                user_id=USER,
                details={"n": i, "provider": "whisper"},
                ip="10.1.2.3",
            )
            lat.append(clock() - t0)
            out.append(event_id)

    threads = [threading.Thread(target=produce, args=(k,)) for k in range(PRODUCERS)]
    default_interval = sys.getswitchinterval()
    if switch_interval_s is not None:
        sys.setswitchinterval(switch_interval_s)
    try:
        for t in threads:
            t.start()
        start.wait()
        started = time.perf_counter()
        for t in threads:
            t.join()
        logged_s = time.perf_counter() - started
        flushed = writer.flush(600)
        total_s = time.perf_counter() - started
    finally:
        sys.setswitchinterval(default_interval)
    m = writer.metrics()
    writer.close()
    spool.cleanup()
    all_lat = [x / 1000 for lat in latencies for x in lat]
    logged = {i for out in ids for i in out}
    with psycopg.connect(url) as conn:
        rows, distinct = conn.execute("SELECT count(*), count(DISTINCT id) FROM audit_log").fetchone()  # type: ignore[misc]
    lost = len(logged) - distinct
    test = f"4 producers, {label}"
    ctx.row(
        test=test,
        events=len(logged),
        flushed=flushed,
        log_phase_s=logged_s,
        total_s=total_s,
        events_per_s=len(logged) / total_s,
        target_events_per_s=">= 50,000",
    )
    ctx.row(
        test=test,
        metric="log() latency µs",
        p50=percentile(all_lat, 50),
        p99=percentile(all_lat, 99),
        p999=percentile(all_lat, 99.9),
        max=max(all_lat),
        target_p99="<= 50 µs",
    )
    ctx.row(
        test=test,
        metric="delivery",
        rows=rows,
        distinct_ids=distinct,
        lost=lost,
        duplicates=rows - distinct,
        dropped=m["dropped"],
        spilled=m["spilled"],
        batches=m["batches"],
        flush_p50_ms=m["flush_p50_ms"],
        flush_p99_ms=m["flush_p99_ms"],
        target_lost="0",
    )


@scenario(
    "audit_writer", "AuditWriter: seed's 100 audited ops sync vs async, delivery paths, 4-thread throughput"
)
def run(ctx: BenchContext) -> None:
    with ctx.database("bench_audit") as url:
        _seed_test(ctx, url)
        _delivery_paths(ctx, url)
        # the third run shows what the GIL costs the flusher: with 4 busy producers each time it gets the
        # GIL back after network I/O it waits up to the 5 ms switch interval (an application may shorten it)
        for rate, interval in ((None, None), (50_000, None), (None, 0.0005)):
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("TRUNCATE audit_log")
            _sustained(ctx, url, rate, interval)
