"""The one connection helper, SQL-file loading, advisory locks, lock timeouts and retries.

Every module connects through :func:`connect`; statements that matter live in ``sql/queries`` and are
loaded with :func:`load_query` (cached). DDL on busy tables goes through :func:`run_with_lock_retry`, which
sets a short ``lock_timeout`` so a waiting DDL never queues the platform's writers behind it for long;
:func:`retry` is its backoff loop, for any other statement to retry. Every advisory lock the pipeline takes
has its key in :class:`Locks` and is taken through :func:`advisory_lock` (or :func:`try_advisory_lock` /
:func:`advisory_unlock` where the lock outlives one block); :func:`lock_timeout` bounds a session's waits.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import psycopg
from psycopg import errors, sql

from perf_pipeline.settings import PROJECT_ROOT

log = logging.getLogger(__name__)

SQL_DIR = PROJECT_ROOT / "sql"
QUERIES_DIR = SQL_DIR / "queries"
MIGRATIONS_DIR = SQL_DIR / "migrations"

T = TypeVar("T")


def connect(
    url: str, *, autocommit: bool = False, application_name: str = "perf_pipeline", **kwargs: object
) -> psycopg.Connection:
    """Open a psycopg 3 connection (one TCP round trip plus auth: median 1.7 ms of 50 to the embedded server)."""
    return psycopg.connect(url, autocommit=autocommit, application_name=application_name, **kwargs)


@functools.cache
def load_query(name: str) -> str:
    """Text of ``sql/queries/<name>.sql`` (read once per process)."""
    path = QUERIES_DIR / f"{name}.sql"
    if not path.exists():
        raise FileNotFoundError(f"no SQL file {path}")
    return path.read_text()


def retry(
    work: Callable[[], T],
    *,
    attempts: int,
    what: str,
    on: tuple[type[BaseException], ...] = (errors.LockNotAvailable,),
    first_delay_s: float = 0.05,
    max_delay_s: float = 2.0,
) -> T:
    """``work()`` until it returns, retrying the exceptions ``on`` (a lock timeout by default) up to
    ``attempts`` times with a jittered exponential backoff (``first_delay_s`` doubling up to
    ``max_delay_s``); the last failure is raised. Logs each retry at INFO with ``what``."""
    delay = first_delay_s
    for attempt in range(1, attempts + 1):
        try:
            return work()
        except on as exc:
            if attempt == attempts:
                raise
            log.info("%s: %s (attempt %d/%d), retrying", what, type(exc).__name__, attempt, attempts)
            if delay > 0:
                time.sleep(delay + random.uniform(0, delay))
                delay = min(delay * 2, max_delay_s)
    raise AssertionError("unreachable")


def run_with_lock_retry(
    conn: psycopg.Connection,
    work: Callable[[psycopg.Connection], T],
    *,
    lock_timeout_ms: int = 200,
    attempts: int = 30,
    what: str = "DDL",
) -> T:
    """Run ``work(conn)`` in its own transaction with a short lock_timeout, retrying on lock timeouts.

    A DDL waiting for an ACCESS EXCLUSIVE lock blocks every statement queued behind it; a short
    ``lock_timeout`` bounds that stall, and jittered retries let it through between busy moments.
    Raises the last ``LockNotAvailable`` after ``attempts`` tries.
    """

    def once() -> T:
        with conn.transaction():
            conn.execute(f"SET LOCAL lock_timeout = {int(lock_timeout_ms)}")
            return work(conn)

    return retry(once, attempts=attempts, what=what)


@contextlib.contextmanager
def lock_timeout(conn: psycopg.Connection, ms: int) -> Iterator[None]:
    """``lock_timeout`` of the session set to ``ms`` for the block, then put back as it was.

    For autocommit connections whose statements each wait for a lock (an advisory lock, a LOCK TABLE, a
    DETACH): every wait inside the block gives up after ``ms`` with ``LockNotAvailable``. Costs two
    round trips. A connection that broke meanwhile is left alone.
    """
    previous = conn.execute(
        "SELECT current_setting('lock_timeout'), set_config('lock_timeout', %s, false)", (f"{int(ms)}ms",)
    ).fetchone()[0]
    try:
        yield
    finally:
        if not conn.broken and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
            conn.execute("SELECT set_config('lock_timeout', %s, false)", (previous,))


# ------------------------------------------------------------------------------------------ advisory locks


@dataclass(frozen=True)
class AdvisoryKey:
    """One advisory lock: a bigint (``number``), two int4 (``pair``: how ``pg_locks`` shows them, as
    classid/objid) or a text the server hashes (``name``: ``hashtextextended(name, 0)``)."""

    number: int | None = None
    pair: tuple[int, int] | None = None
    name: str | None = None

    def args(self) -> sql.Composable:
        """The arguments of ``pg_advisory_lock(…)`` and its siblings."""
        if self.name is not None:
            return sql.SQL("hashtextextended({}, 0)").format(sql.Literal(self.name))
        if self.pair is not None:
            return sql.SQL("{}, {}").format(sql.Literal(self.pair[0]), sql.Literal(self.pair[1]))
        return sql.Literal(self.number)


class Locks:
    """Every advisory lock the pipeline takes. Keys never change between versions: an old and a new
    process must exclude each other during a rolling upgrade."""

    #: ``apply_migrations``: one migrating process at a time
    MIGRATIONS = AdvisoryKey(number=0x70657266)  # "perf"
    #: rollups of ``usage_daily_metrics``: one at a time; a free lock means no claim is in use
    ROLLUP = AdvisoryKey(number=0x726F6C6C)  # "roll"
    #: the sealing of the 5-minute KPI buckets: one at a time, a second returns at once
    KPI_SEALING = AdvisoryKey(number=0x6B706962)  # "kpib"
    #: class (first int4) of the export requests' locks; ``sql/queries/export_orphaned_requests.sql``
    #: reads ``pg_locks`` with it
    EXPORT_CLASS = 0x6578706F  # "expo"

    @staticmethod
    def month(table: str, month: dt.date) -> AdvisoryKey:
        """One month of audit_log or usage_log: exclusive for its archive, restore or move out of DEFAULT,
        shared for a rollup reading it."""
        return AdvisoryKey(name=f"perf_pipeline.archive:{table}:{month.replace(day=1)}")

    @staticmethod
    def export(request_id: int) -> AdvisoryKey:
        """One export request: held by the process running it, for as long as its session lives."""
        return AdvisoryKey(pair=(Locks.EXPORT_CLASS, request_id % 2_147_483_647))


def try_advisory_lock(
    conn: psycopg.Connection, key: AdvisoryKey, *, shared: bool = False, wait_s: float | None = 0.0
) -> bool:
    """Take ``key`` at session level; True if held. ``wait_s`` 0: only if free now; ``None``: wait as long
    as it takes; more than 0: wait up to that long (a server-side wait bounded by ``lock_timeout``, no
    polling). The caller releases it with :func:`advisory_unlock` (or uses :func:`advisory_lock`)."""
    mode = "_shared" if shared else ""
    if wait_s is not None and wait_s <= 0:
        row = conn.execute(sql.SQL(f"SELECT pg_try_advisory_lock{mode}({{}})").format(key.args())).fetchone()
        return bool(row and row[0])
    statement = sql.SQL(f"SELECT pg_advisory_lock{mode}({{}})").format(key.args())
    if wait_s is None:
        conn.execute(statement)
        return True
    try:
        with lock_timeout(conn, max(1, int(wait_s * 1000))):
            conn.execute(statement)
        return True
    except errors.LockNotAvailable:
        return False


def advisory_unlock(conn: psycopg.Connection, key: AdvisoryKey, *, shared: bool = False) -> None:
    """Release a session-level ``key``; nothing to do on a broken connection (its session, and so its
    locks, are gone)."""
    if not conn.broken:
        mode = "_shared" if shared else ""
        conn.execute(sql.SQL(f"SELECT pg_advisory_unlock{mode}({{}})").format(key.args()))


@contextlib.contextmanager
def advisory_lock(
    conn: psycopg.Connection, key: AdvisoryKey, *, shared: bool = False, wait_s: float | None = None
) -> Iterator[bool]:
    """``key`` held for the block (session level), released after it, error or not. Yields whether it is
    held: by default it waits as long as it takes (always True); ``wait_s`` as in
    :func:`try_advisory_lock`. Autocommit connections (a session lock taken inside a transaction that
    rolls back is still held)."""
    held = try_advisory_lock(conn, key, shared=shared, wait_s=wait_s)
    try:
        yield held
    finally:
        if held:
            advisory_unlock(conn, key, shared=shared)
