"""AuditWriter: 100 audited operations synchronous vs through the writer, delivery paths, sustained throughput.

1. What auditing costs a request path: 100 operations, each creating a session (INSERT + COMMIT), audited
   (a) synchronously, one ``INSERT INTO audit_log`` + ``COMMIT`` per operation, (b) through
   ``AuditWriter.log()``, (c) not at all (the floor). Milliseconds per 100 operations (target < 2 s), and
   the time spent inside the audit call per operation (p50/p99 µs).
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
4. SIGKILL: a child process with one ``AuditWriter`` (spool folder) and 4 producer threads, (a) saturating
   it, (b) paced at 50k events/s in total, killed with SIGKILL after a random 1–3 s; a new writer on the same
   spool then replays it and the rows in audit_log are counted. Each producer logs ``entity_id`` "p<k>-<n>"
   and publishes the count ``log()`` accepted in a shared memory map the parent reads after the kill: lost =
   accepted − distinct present; age of the oldest lost event = kill time − timestamp of the newest present
   event before the first missing one (consecutive events of a producer are µs apart); duplicates = rows −
   distinct ids (must be 0). Per variant: p50/max over the rounds.

``BENCH_SCALE=small``: 100k events and fewer rounds (5 kills per variant instead of 20); default: 1M
events. The SIGKILL rounds take about 2.5 minutes at the default scale, 50 s small.
``spool``: one spool segment of ``batch_size`` (5000) realistic events written as the writer writes it
(:meth:`perf_pipeline.audit.spool.Spool.write`: one write + rename), without and with fsync; median and
max ms over 50 segments — the cost the writer's docstrings quote per segment.

``BENCH_AUDIT_PARTS``: a comma-separated subset of ``ops,delivery,sustained,kill,spool`` (default: all).
"""

from __future__ import annotations

import mmap
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psycopg
from psycopg import sql

from bench.harness import BenchContext, percentile, scenario
from perf_pipeline.audit import COLUMNS, AuditEvent, AuditWriter, deliver_batch, prepare_connection

SMALL = os.environ.get("BENCH_SCALE", "").lower() == "small"
EVENTS = 100_000 if SMALL else 1_000_000
ROUNDS = 5 if SMALL else 10
PRODUCERS = 4
ROOT = str(Path(__file__).resolve().parents[2])  # the checkout the child process imports from
KILL_ROUNDS = 5 if SMALL else 20
PARTS = {
    p.strip() for p in os.environ.get("BENCH_AUDIT_PARTS", "ops,delivery,sustained,kill,spool").split(",")
}
USER = "6f1c1a52-8f8e-4c59-9a55-0d3a7b0c2f11"


def _create_session(conn: psycopg.Connection, i: int) -> str:
    row = conn.execute(
        "INSERT INTO session (user_id, title, status) VALUES (%s, %s, 'created') RETURNING id",
        (USER, f"bench session {i}"),
    ).fetchone()
    conn.commit()
    assert row is not None
    return str(row[0])


def _audited_operations(ctx: BenchContext, url: str) -> None:
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
            test="100 audited operations",
            variant=variant,
            rounds=len(samples),
            median_ms=statistics.median(samples),
            p95_ms=percentile(samples, 95),
            audit_call_p50_us=percentile(audit_us[variant], 50),
            audit_call_p99_us=percentile(audit_us[variant], 99),
            target="< 2000 ms",
        )
    ctx.ratio(
        "sync audit / AuditWriter (100 ops, median)",
        medians["sync INSERT+COMMIT"],
        medians["AuditWriter.log()"],
        target="> 1",
    )


def _payload(n: int, offset: int) -> bytes:
    from perf_pipeline.audit import UUIDv7

    gen, lines = UUIDv7(), []
    for i in range(n):
        event_id = gen.next(time.time_ns())
        rest = AuditEvent(
            "session.create",
            "session",
            str(offset + i),
            "create",
            f"Session {i} created",
            USER,
            details={"i": i},
            ip="10.1.2.3",
        ).encode()
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


def kill_child() -> None:
    """The killed process of :func:`_kill_rounds` (``python -c``; argv: url spool counts_file rate|-).

    One writer, 4 producer threads logging "p<k>-<n>" as fast as they can (or paced to ``rate`` in total);
    after each ``log()`` returned, producer k stores n + 1 in slot k of the shared map, so the parent knows
    what was accepted when it killed the process. Runs until killed.
    """
    url, spool, counts_file, rate_arg = sys.argv[1:5]
    rate = None if rate_arg == "-" else int(rate_arg)
    writer = AuditWriter(url, spool_dir=spool, metrics_interval_s=None)
    with open(counts_file, "r+b") as fh:
        shared = mmap.mmap(fh.fileno(), PRODUCERS * 8)
    accepted = memoryview(shared).cast("q")  # one aligned 8-byte store per event: readable after a SIGKILL
    start = threading.Barrier(PRODUCERS + 1)

    def produce(k: int) -> None:
        log, prefix = writer.log, f"p{k}-"
        start.wait()
        began, n = time.perf_counter(), 0
        while True:
            if rate is not None and n % 25 == 0:
                ahead = began + n * PRODUCERS / rate - time.perf_counter()
                if ahead > 0:
                    time.sleep(ahead)
            log(
                "session.create",
                "bench.kill",
                f"{prefix}{n}",
                "create",
                "Session created",
                user_id=USER,
                details={"n": n, "provider": "whisper"},
                ip="10.1.2.3",
            )
            n += 1
            accepted[k] = n

    for k in range(PRODUCERS):
        threading.Thread(target=produce, args=(k,), daemon=True).start()
    start.wait()
    print("READY", flush=True)
    threading.Event().wait()


# per producer: distinct events present among the accepted ones, and the first missing one (NULL: none)
_KILL_COUNTS = """
WITH e AS (
    SELECT split_part(entity_id, '-', 1) AS p, split_part(entity_id, '-', 2)::bigint AS n
    FROM audit_log WHERE entity_type = 'bench.kill' GROUP BY 1, 2
), r AS (
    SELECT p, n, row_number() OVER (PARTITION BY p ORDER BY n) - 1 AS i FROM e
), acc AS (
    SELECT 'p' || (k - 1) AS p, a FROM unnest(%s::bigint[]) WITH ORDINALITY AS u(a, k)
)
SELECT acc.p, acc.a, count(r.n) FILTER (WHERE r.n < acc.a), min(r.i) FILTER (WHERE r.n <> r.i)
FROM acc LEFT JOIN r ON r.p = acc.p GROUP BY acc.p, acc.a ORDER BY acc.p
"""


def _kill_round(url: str, rate: int | None, rng: random.Random) -> dict[str, float]:
    """One child killed after a random 1–3 s of logging: accepted, lost, oldest lost age, duplicates."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE audit_log")
    with tempfile.TemporaryDirectory(prefix="bench_audit_kill_") as tmp:
        spool, counts_file = Path(tmp) / "spool", Path(tmp) / "accepted"
        counts_file.write_bytes(bytes(PRODUCERS * 8))
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from bench.scenarios.audit_writer import kill_child; kill_child()",
                url,
                str(spool),
                str(counts_file),
                "-" if rate is None else str(rate),
            ],
            stdout=subprocess.PIPE,
            text=True,
            env={
                **os.environ,
                "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
            },
        )
        try:
            assert child.stdout is not None and child.stdout.readline().strip() == "READY"
            ready = time.time()
            time.sleep(rng.uniform(1.0, 3.0))
            killed_at = time.time()
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            child.wait(30)
        with open(counts_file, "rb") as fh:
            accepted = list(memoryview(fh.read()).cast("q"))
        started = time.perf_counter()
        with AuditWriter(url, spool_dir=spool, metrics_interval_s=None) as replay:
            assert replay.flush(600), "replay did not finish"
            replayed = replay.metrics()["replayed"]
        replay_s = time.perf_counter() - started
    with psycopg.connect(url, autocommit=True) as conn:
        rows, distinct = conn.execute("SELECT count(*), count(DISTINCT id) FROM audit_log").fetchone()  # type: ignore[misc]
        lost, oldest = 0, 0.0
        for p, acc, present, first_gap in conn.execute(_KILL_COUNTS, (accepted,)).fetchall():
            lost += acc - present
            if acc == present:
                continue
            missing = present if first_gap is None else first_gap  # every n before it is present
            if missing == 0:
                age = killed_at - ready  # nothing of this producer survived: as old as the run
            else:
                (ts,) = conn.execute(
                    'SELECT extract(epoch FROM min("timestamp"))::float8 FROM audit_log '
                    "WHERE entity_type = 'bench.kill' AND entity_id = %s",
                    (f"{p}-{missing - 1}",),
                ).fetchone()  # type: ignore[misc]
                age = killed_at - ts
            oldest = max(oldest, age)
    return {
        "accepted": float(sum(accepted)),
        "run_s": killed_at - ready,
        "lost": float(lost),
        "oldest_lost_ms": oldest * 1000,
        "duplicates": float(rows - distinct),
        "replayed": float(replayed),
        "replay_s": replay_s,
    }


def _kill_rounds(ctx: BenchContext, url: str, rate: int | None) -> None:
    rng = random.Random(20260301 if rate is None else rate)
    rounds = [_kill_round(url, rate, rng) for _ in range(KILL_ROUNDS)]
    col = {k: [r[k] for r in rounds] for k in rounds[0]}
    ctx.row(
        test=f"SIGKILL, 4 producers, {'saturated' if rate is None else f'paced {rate:,}/s'}",
        rounds=len(rounds),
        accepted_p50=statistics.median(col["accepted"]),
        events_per_s_p50=statistics.median(a / s for a, s in zip(col["accepted"], col["run_s"], strict=True)),
        lost_p50=statistics.median(col["lost"]),
        lost_max=max(col["lost"]),
        oldest_lost_ms_p50=statistics.median(col["oldest_lost_ms"]),
        oldest_lost_ms_max=max(col["oldest_lost_ms"]),
        duplicates=sum(col["duplicates"]),
        replayed_p50=statistics.median(col["replayed"]),
        replay_s_p50=statistics.median(col["replay_s"]),
    )


def _spool_segments(ctx: BenchContext, segments: int = 50, events: int = 5000) -> None:
    """Median/max time of one :meth:`Spool.write` of ``events`` encoded events, fsync off and on."""
    import tempfile
    import uuid

    from perf_pipeline.audit.spool import Spool

    tail = AuditEvent(
        "document.update",
        "document",
        str(uuid.uuid4()),
        "update",
        "edited the transcript",
        str(uuid.uuid4()),
        "low",
        {"changed": ["title", "speakers"], "words": 1234},
        "10.1.2.3",
    ).encode_line_tail()
    payload = b"".join(
        f"{uuid.uuid4()}\t2026-12-02 19:00:00.000000+00\t".encode() + tail for _ in range(events)
    )
    for fsync in (False, True):
        with tempfile.TemporaryDirectory() as folder:
            spool = Spool(Path(folder), fsync)
            times = []
            for seq in range(segments):
                t0 = time.perf_counter()
                spool.write(seq, payload)
                times.append((time.perf_counter() - t0) * 1000)
                spool.remove(seq)
            spool.close()
        ctx.row(
            test=f"spool segment, {events} events, fsync {'on' if fsync else 'off'}",
            rounds=segments,
            segment_kb=round(len(payload) / 1024),
            write_ms_p50=statistics.median(times),
            write_ms_max=max(times),
        )


@scenario(
    "audit_writer",
    "AuditWriter: 100 audited ops sync vs async, delivery paths, 4-thread throughput, SIGKILL loss",
)
def run(ctx: BenchContext) -> None:
    with ctx.database("bench_audit") as url:
        if "ops" in PARTS:
            _audited_operations(ctx, url)
        if "delivery" in PARTS:
            _delivery_paths(ctx, url)
        # the third run shows what the GIL costs the flusher: with 4 busy producers each time it gets the
        # GIL back after network I/O it waits up to the 5 ms switch interval (an application may shorten it)
        if "sustained" in PARTS:
            for rate, interval in ((None, None), (50_000, None), (None, 0.0005)):
                with psycopg.connect(url, autocommit=True) as conn:
                    conn.execute("TRUNCATE audit_log")
                _sustained(ctx, url, rate, interval)
        if "kill" in PARTS:
            for rate in (None, 50_000):
                _kill_rounds(ctx, url, rate)
    if "spool" in PARTS:
        _spool_segments(ctx)
