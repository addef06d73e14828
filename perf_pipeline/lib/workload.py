"""Reproducible synthetic workload: sessions, usage_log and audit_log rows, loaded with COPY.

Rows are generated column-wise with NumPy (no Python loop per row), rendered to CSV by pyarrow's C++
writer, and streamed into PostgreSQL with ``COPY … FROM STDIN`` over two connections in parallel (one
per core on the reference machine). The same ``seed`` and ``end`` always give the same rows.

Shape of the data, chosen to look like a transcription platform:

* users are Zipf-distributed (s = 1.1): a few heavy users, a long tail;
* providers google / assemblyai / whisper at 50 / 30 / 20 %; ~80 % of usage is billable;
* durations are log-normal (median ~8 min); cost = provider rate × minutes;
* one session per usage row; sessions of the last two hours are still created/processing, older ones
  completed, ~5 % failed;
* audit events: mostly low severity, ~1.8 % high and ~0.2 % critical; ids are UUIDv7 (time-ordered, as
  the platform's audit writer generates them) so the primary-key index is appended to, not sprayed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import logging
import queue as queue_mod
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from psycopg import sql

from perf_pipeline.audit import COLUMNS as AUDIT_WRITER_COLUMNS
from perf_pipeline.lib.db import connect
from perf_pipeline.lib.partitioning import (
    ensure_partitions,
    existing_months,
    month_bounds,
    month_start,
    partition_name,
)

log = logging.getLogger(__name__)

PROVIDERS = np.array(["google", "assemblyai", "whisper"])
PROVIDER_SHARES = np.array([0.5, 0.3, 0.2])
PROVIDER_RATE_PER_MIN = np.array([0.024, 0.015, 0.006])
SEVERITIES = np.array(["low", "medium", "high", "critical"])
SEVERITY_SHARES = np.array([0.85, 0.13, 0.018, 0.002])
ENTITY_TYPES = np.array(["session", "user", "data_export", "billing", "settings"])
ENTITY_SHARES = np.array([0.5, 0.2, 0.1, 0.1, 0.1])
OPERATIONS = np.array(["create", "read", "update", "delete", "export", "login"])
OPERATION_SHARES = np.array([0.3, 0.35, 0.2, 0.05, 0.05, 0.05])
DAY = 86_400_000_000  # microseconds

USAGE_COLUMNS = (
    "user_id",
    "session_id",
    "created_at",
    "duration_minutes",
    "cost_usd",
    "is_billable",
    "stt_provider",
)
SESSION_COLUMNS = ("id", "user_id", "title", "status", "stt_provider", "duration", "created_at", "updated_at")
AUDIT_COLUMNS = AUDIT_WRITER_COLUMNS  # the same COPY column order as the platform's audit writer

CHUNK_ROWS = 250_000
T = TypeVar("T")


class WorkloadError(ValueError):
    """Bad generator arguments; the message names the argument."""


@dataclass(frozen=True)
class WorkloadSpec:
    days: int
    usage_per_day: int
    audit_per_day: int
    users: int = 5000
    seed: int = 42
    end: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC).replace(second=0, microsecond=0))

    def __post_init__(self) -> None:
        for name in ("days", "users"):
            if getattr(self, name) < 1:
                raise WorkloadError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("usage_per_day", "audit_per_day", "seed"):
            if getattr(self, name) < 0:
                raise WorkloadError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.end.tzinfo is None:
            raise WorkloadError("end must be timezone-aware (UTC)")

    @property
    def first_day(self) -> dt.date:
        """Days are UTC calendar days; the last one is ``end``'s day, filled only up to ``end``."""
        return self.end.astimezone(dt.UTC).date() - dt.timedelta(days=self.days - 1)

    @property
    def start(self) -> dt.datetime:
        d = self.first_day
        return dt.datetime(d.year, d.month, d.day, tzinfo=dt.UTC)

    def day_window(self, day: int) -> tuple[int, int]:
        """[start, end) of day ``day`` (0 = oldest) in Unix microseconds, cut at ``end``."""
        lo = int(self.start.timestamp() * 1_000_000) + day * DAY
        return lo, min(lo + DAY, int(self.end.timestamp() * 1_000_000))

    def rows_on_day(self, day: int, per_day: int) -> int:
        """``per_day`` rows on a full day, pro rata on the partial last day."""
        lo, hi = self.day_window(day)
        return per_day if hi - lo == DAY else round(per_day * (hi - lo) / DAY)

    def total_rows(self, per_day: int) -> int:
        return sum(self.rows_on_day(d, per_day) for d in range(self.days))


@dataclass
class LoadResult:
    sessions: int = 0
    usage_rows: int = 0
    audit_rows: int = 0
    seconds: float = 0.0
    partitions_created: list[str] = field(default_factory=list)

    @property
    def rows_per_s(self) -> float:
        rows = self.sessions + self.usage_rows + self.audit_rows
        return rows / self.seconds if self.seconds else 0.0


# ------------------------------------------------------------------------------------------ generation


def _uuid_strings(raw: np.ndarray) -> pa.Array:
    """(n, 16) uint8 → n canonical UUID strings, vectorized."""
    n = raw.shape[0]
    hexed = np.frombuffer(raw.tobytes().hex().encode(), dtype="S1").reshape(n, 32)
    dash = np.full((n, 1), b"-", dtype="S1")
    parts = [
        hexed[:, 0:8],
        dash,
        hexed[:, 8:12],
        dash,
        hexed[:, 12:16],
        dash,
        hexed[:, 16:20],
        dash,
        hexed[:, 20:32],
    ]
    joined = np.ascontiguousarray(np.concatenate(parts, axis=1)).view("S36").ravel()
    return pa.array(joined, type=pa.binary(36)).cast(pa.string())


def _uuid4(rng: np.random.Generator, n: int) -> np.ndarray:
    raw = rng.integers(0, 256, size=(n, 16), dtype=np.uint8)
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x40
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80
    return raw


def _uuid7(rng: np.random.Generator, ts_us: np.ndarray) -> np.ndarray:
    """UUIDv7 (RFC 9562): 48-bit Unix ms timestamp, then random bits with version/variant set."""
    raw = _uuid4(rng, ts_us.shape[0])
    ms = (ts_us // 1000).astype(">u8")
    raw[:, 0:6] = ms.view(np.uint8).reshape(-1, 8)[:, 2:8]
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x70
    return raw


def _pick(values: np.ndarray, idx: np.ndarray) -> pa.Array:
    """values[idx] as an Arrow string array (a C take; converting NumPy unicode arrays is slow)."""
    return pc.take(pa.array(values.tolist(), pa.string()), pa.array(idx))


def _zipf_probs(n: int, s: float = 1.1) -> np.ndarray:
    weights = 1.0 / np.arange(1, n + 1) ** s
    return weights / weights.sum()


def _timestamps(rng: np.random.Generator, spec: WorkloadSpec, per_day: int, day: int) -> np.ndarray:
    """Sorted microsecond timestamps of day ``day`` (0 = oldest), as many as the day gets."""
    lo, hi = spec.day_window(day)
    return np.sort(rng.integers(lo, hi, size=spec.rows_on_day(day, per_day), dtype=np.int64))


def _ts_array(ts_us: np.ndarray) -> pa.Array:
    return pa.array(ts_us, type=pa.int64()).cast(pa.timestamp("us", tz="UTC"))


class _Generator:
    def __init__(self, spec: WorkloadSpec) -> None:
        self.spec = spec
        users_rng = np.random.default_rng([spec.seed, 0])
        self.user_ids = _uuid_strings(_uuid4(users_rng, spec.users))
        self.user_probs = _zipf_probs(spec.users)
        self.end_us = int(spec.end.timestamp() * 1_000_000)

    def _rng(self, kind: int, day: int) -> np.random.Generator:
        # one independent stream per (table, day): reproducible whatever the chunking or thread order
        return np.random.default_rng([self.spec.seed, kind, day])

    def usage_and_sessions(self, day: int) -> tuple[pa.Table, pa.Table]:
        rng = self._rng(1, day)
        ts = _timestamps(rng, self.spec, self.spec.usage_per_day, day)
        n = len(ts)
        users = pc.take(self.user_ids, pa.array(rng.choice(self.spec.users, size=n, p=self.user_probs)))
        session_ids = _uuid_strings(_uuid4(rng, n))
        prov_idx = rng.choice(len(PROVIDERS), size=n, p=PROVIDER_SHARES)
        minutes = np.clip(np.round(rng.lognormal(mean=2.1, sigma=0.8, size=n), 2), 0.05, 240.0)
        cost = np.round(minutes * PROVIDER_RATE_PER_MIN[prov_idx], 4)
        billable = rng.random(n) < 0.8
        usage = pa.table(
            {
                "user_id": users,
                "session_id": session_ids,
                "created_at": _ts_array(ts),
                "duration_minutes": minutes,
                "cost_usd": cost,
                "is_billable": billable,
                "stt_provider": _pick(PROVIDERS, prov_idx),
            }
        )
        age_us = self.end_us - ts
        recent = age_us < 2 * 3_600_000_000
        roll = rng.random(n)
        status = np.where(
            recent,
            np.select(
                [roll < 0.10, roll < 0.70, roll < 0.95], ["created", "processing", "completed"], "failed"
            ),
            np.where(roll < 0.95, "completed", "failed"),
        )
        seconds = np.round(minutes * 60).astype(np.int64)
        processing_us = np.where(
            status == "failed",
            rng.integers(1, 600, size=n) * 1_000_000,
            np.where(np.isin(status, ["created", "processing"]), 0, seconds * 300_000),
        )
        updated = np.minimum(ts + processing_us, np.maximum(ts, self.end_us))
        sessions = pa.table(
            {
                "id": session_ids,
                "user_id": users,
                "title": pc.binary_join_element_wise(
                    "Session ", pc.cast(pa.array(ts % 1_000_000), pa.string()), ""
                ),
                "status": pa.array(status),
                "stt_provider": _pick(PROVIDERS, prov_idx),
                "duration": seconds,
                "created_at": _ts_array(ts),
                "updated_at": _ts_array(updated),
            }
        )
        return usage, sessions

    def audit(self, day: int) -> pa.Table:
        """Day ``day``'s audit events."""
        rng = self._rng(2, day)
        ts = _timestamps(rng, self.spec, self.spec.audit_per_day, day)
        n = len(ts)
        ids = _uuid_strings(_uuid7(rng, ts))
        user_idx = rng.choice(self.spec.users, size=n, p=self.user_probs)
        users = pc.if_else(
            pa.array(rng.random(n) < 0.95),
            pc.take(self.user_ids, pa.array(user_idx)),
            pa.nulls(n, pa.string()),
        )
        etype_idx = rng.choice(len(ENTITY_TYPES), size=n, p=ENTITY_SHARES)
        pool = max(1000, n * self.spec.days // 20)
        entity_no = rng.integers(0, pool, size=n)
        entity_ids = pc.binary_join_element_wise(
            _pick(ENTITY_TYPES, etype_idx), pc.cast(pa.array(entity_no), pa.string()), "-"
        )
        op_idx = rng.choice(len(OPERATIONS), size=n, p=OPERATION_SHARES)
        event_types = pc.binary_join_element_wise(
            _pick(ENTITY_TYPES, etype_idx), _pick(OPERATIONS, op_idx), "."
        )
        severity = _pick(SEVERITIES, rng.choice(len(SEVERITIES), size=n, p=SEVERITY_SHARES))
        description = pc.binary_join_element_wise(
            _pick(OPERATIONS, op_idx), _pick(ENTITY_TYPES, etype_idx), entity_ids, " "
        )
        request = pc.cast(pa.array(rng.integers(0, 2**40, size=n)), pa.string())
        details = pc.binary_join_element_wise('{"request_id": "', request, '", "source": "api"}', "")
        ip = rng.integers(0, 256, size=(n, 3))
        ips = pc.binary_join_element_wise(
            "10", *(pc.cast(pa.array(ip[:, k]), pa.string()) for k in range(3)), "."
        )
        table = pa.table(
            {
                "id": ids,
                "timestamp": _ts_array(ts),
                "user_id": users,
                "entity_type": _pick(ENTITY_TYPES, etype_idx),
                "entity_id": entity_ids,
                "event_type": event_types,
                "operation": _pick(OPERATIONS, op_idx),
                "severity": severity,
                "description": description,
                "details": details,
                "ip": ips,
            }
        )
        return table


# ------------------------------------------------------------------------------------------------ load


def render_csv(table: pa.Table) -> memoryview:
    """An Arrow table as headerless CSV (pyarrow's C++ writer: 264 MB of audit rows in 1.2 s here)."""
    buf = io.BytesIO()
    pacsv.write_csv(table, buf, pacsv.WriteOptions(include_header=False, batch_size=8192))
    return buf.getbuffer()


def copy_csv(conn: psycopg.Connection, target: str, columns: tuple[str, ...], data: memoryview) -> None:
    """Stream CSV bytes into ``target`` with COPY, in 1 MiB writes. Caller commits."""
    stmt = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT csv)").format(
        sql.Identifier(target), sql.SQL(", ").join(map(sql.Identifier, columns))
    )
    with conn.cursor() as cur, cur.copy(stmt) as copy:
        for off in range(0, len(data), 1 << 20):
            copy.write(data[off : off + (1 << 20)])


def copy_table(conn: psycopg.Connection, target: str, columns: tuple[str, ...], table: pa.Table) -> int:
    """Stream an Arrow table into ``target`` with COPY (CSV); returns the row count. Caller commits."""
    copy_csv(conn, target, columns, render_csv(table))
    return table.num_rows


_DONE = object()


def _prefetch(items: Iterator[T], depth: int = 2) -> Iterator[T]:
    """Run ``items`` in a background thread, ``depth`` ahead: generation overlaps the COPY that consumes it."""
    q: queue_mod.Queue = queue_mod.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put(item)
            q.put(_DONE)
        except BaseException as exc:
            q.put(exc)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            with contextlib.suppress(queue_mod.Empty):
                q.get(timeout=0.05)


def _run_parallel(url: str, jobs: list[Callable[[psycopg.Connection], None]], workers: int) -> None:
    """Run load jobs over ``workers`` connections; each job runs in (and commits) its own transaction."""
    lock = threading.Lock()
    queue = list(reversed(jobs))
    errors: list[BaseException] = []

    def worker() -> None:
        with connect(url, application_name="perf_pipeline.seed") as conn:
            conn.execute("SET synchronous_commit = off")  # a load is re-runnable; no need to wait for fsync
            conn.commit()
            while True:
                with lock:
                    if not queue or errors:
                        return
                    job = queue.pop()
                try:
                    with conn.transaction():
                        job(conn)
                except BaseException as exc:  # surfaced in the calling thread below
                    with lock:
                        errors.append(exc)
                    return

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(min(workers, len(jobs)) or 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def _days_by_month(spec: WorkloadSpec) -> dict[dt.date, list[int]]:
    out: dict[dt.date, list[int]] = {}
    for day in range(spec.days):
        out.setdefault(month_start(spec.first_day + dt.timedelta(days=day)), []).append(day)
    return out


#: one unit of load work, rendered ahead: (target table or None for the month's table, columns, rows, CSV)
Piece = tuple[str | None, tuple[str, ...], int, memoryview]


def _pieces(tables: Iterator[list[tuple[str | None, tuple[str, ...], pa.Table]]]) -> Iterator[Piece]:
    for group in tables:
        for target, columns, table in group:
            for lo in range(0, table.num_rows, CHUNK_ROWS):  # bounded CSV buffer per COPY
                part = table.slice(lo, CHUNK_ROWS)
                yield target, columns, part.num_rows, render_csv(part)


def _load_month(
    conn: psycopg.Connection,
    table: str,
    month: dt.date,
    pieces: Iterator[Piece],
    on_rows: Callable[[int], None],
) -> None:
    """COPY a month of rows. A month with no partition yet is bulk-loaded: COPY into a fresh standalone
    table, then ATTACH, which builds the parent's indexes by sorting (3-4x cheaper than maintaining them
    row by row), all in the caller's transaction, so a failure leaves nothing behind."""
    name = partition_name(table, month)
    fresh = month not in existing_months(conn, table)
    # loaded under its final name: the caller's transaction hides it until commit, and drops it on failure
    main = name if fresh else table
    if fresh:
        conn.execute(
            sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)").format(
                sql.Identifier(name), sql.Identifier(table)
            )
        )
    for target, columns, rows, data in _prefetch(pieces):
        copy_csv(conn, target or main, columns, data)
        on_rows(rows)
    if fresh:
        lo, hi = month_bounds(month)
        conn.execute(
            sql.SQL("ALTER TABLE {} ATTACH PARTITION {} FOR VALUES FROM ({}) TO ({})").format(
                sql.Identifier(table), sql.Identifier(name), sql.Literal(lo), sql.Literal(hi)
            )
        )


def load_workload(url: str, spec: WorkloadSpec, *, workers: int = 2, progress: bool = False) -> LoadResult:
    """Generate and COPY the workload described by ``spec``, one transaction per (table, month).

    Months whose partition does not exist yet are bulk-loaded and attached (see :func:`_load_month`);
    other months are COPYed through the parent.
    Cost: dominated by PostgreSQL's COPY and index builds (README quotes the measured rate).
    """
    from tqdm import tqdm

    gen = _Generator(spec)
    result = LoadResult()
    started = time.perf_counter()
    by_month = _days_by_month(spec)

    total = 2 * spec.total_rows(spec.usage_per_day) + spec.total_rows(spec.audit_per_day)
    bar = tqdm(total=total, unit="rows", unit_scale=True, disable=not progress, desc="load")
    lock = threading.Lock()

    def done(rows: int) -> None:
        with lock:
            bar.update(rows)

    def usage_job(days: list[int]) -> Callable[[psycopg.Connection], None]:
        def tables() -> Iterator[list[tuple[str | None, tuple[str, ...], pa.Table]]]:
            for day in days:
                usage, sessions = gen.usage_and_sessions(day)
                yield [("session", SESSION_COLUMNS, sessions), (None, USAGE_COLUMNS, usage)]

        return lambda conn: _load_month(conn, "usage_log", by_month_of[days[0]], _pieces(tables()), done)

    def audit_job(days: list[int]) -> Callable[[psycopg.Connection], None]:
        tables = ([(None, AUDIT_COLUMNS, gen.audit(day))] for day in days)
        return lambda conn: _load_month(conn, "audit_log", by_month_of[days[0]], _pieces(tables), done)

    by_month_of = {d: m for m, days in by_month.items() for d in days}
    jobs: list[Callable[[psycopg.Connection], None]] = []
    if spec.usage_per_day:
        jobs += [usage_job(days) for days in by_month.values()]
    if spec.audit_per_day:
        jobs += [audit_job(days) for days in by_month.values()]
    _run_parallel(url, jobs, workers)
    result.usage_rows = result.sessions = spec.total_rows(spec.usage_per_day)
    result.audit_rows = spec.total_rows(spec.audit_per_day)
    months = sorted(by_month)
    bar.close()
    with connect(url, autocommit=True) as conn:
        for table in ("usage_log", "audit_log"):
            result.partitions_created += ensure_partitions(conn, table, months)
        conn.execute("ANALYZE session")
        conn.execute("ANALYZE usage_log")
        conn.execute("ANALYZE audit_log")
    result.seconds = time.perf_counter() - started
    return result


def database_is_empty(url: str) -> bool:
    """True when the platform tables hold no rows (used by `make dev` to decide on a demo load)."""
    with connect(url) as conn:
        return conn.execute(
            "SELECT NOT EXISTS (SELECT 1 FROM usage_log) AND NOT EXISTS (SELECT 1 FROM audit_log)"
        ).fetchone()[0]
