"""KPI buckets: seal closed 5-minute buckets of ``usage_log`` so a KPI cache miss stays cheap at any size.

``sql/migrations/0080_usage_kpi_buckets.sql`` holds one row per closed UTC bucket of the last
``usage_kpi_bucket_horizon()`` (48 h): transcriptions, billable revenue, duration sum and count, and a
bitmap of the bucket's users (bit = the user's ordinal in ``usage_user_ordinals``). ``dashboard_kpis.sql``
reads the buckets it can trust from there and the rest from ``usage_log``, so the KPIs are always
``usage_log``'s numbers; :func:`seal_buckets` only makes them cheaper, and a missing, failed or killed
sealing only makes them slower.

Sealing (:func:`seal_buckets`, run by the ``usage_kpi_buckets`` asset every 5 minutes):

1. take the sealing advisory lock, or return at once if another sealing holds it;
2. list the closed buckets of the horizon that are at least ``grace`` old and have no row, or carry a
   late-data mark (a row written into the bucket after it ended: 0080's triggers);
3. claim them in a transaction of its own, before the snapshot, as the daily rollup does (0021): delete
   their marks, so that a late row is then either in the snapshot or marked again, and delete the old
   rows of the marked ones, so that a bucket whose mark is gone never keeps numbers it no longer
   matches, even if the sealing dies before it commits (the bucket is then simply due again, and read
   from usage_log meanwhile). If a late writer holds a mark for more than 5 s (``lock_timeout``), the
   run gives up for this time instead of queueing behind it;
4. wait for every transaction that held an xid at that moment to finish: a row written before its
   bucket ended fires no trigger (0080's triggers read the clock when the row is written), and its
   transaction had an xid from then on, so once those transactions are over the snapshot holds every
   such row. The wait is cluster-wide and all-or-nothing: if they do not finish within ``wait_s`` (a
   long transaction holding an xid), nothing is sealed this time (the claimed buckets stay due, read
   from usage_log, and the asset's ``buckets_trusted_last_24h`` check says so);
5. one REPEATABLE READ transaction: for each run of consecutive buckets, number new users, upsert the
   buckets and reconcile them against ``usage_log`` on the same snapshot (``kpi_buckets_reconcile.sql``);
   any difference rolls it all back;
6. drop buckets and marks older than the first bucket readers trust.

Before step 2, if the bitmaps have grown much wider than the users they hold (ordinals are never
reused), every bucket and ordinal is dropped and the numbering restarts, so that every bucket is due
and resealed densely by the same run (:func:`_compact_if_sparse`).

Buckets are UTC-aligned and half-open: bucket ``10:05`` is ``[10:05, 10:10)``.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.rows import dict_row

from perf_pipeline.lib.db import Locks, advisory_unlock, load_query, try_advisory_lock

#: must equal usage_kpi_bucket_width() (0080)
BUCKET = dt.timedelta(minutes=5)

#: a bucket is sealed once it has been over this long (writers' last statements of it are done)
DEFAULT_GRACE = dt.timedelta(minutes=2)

#: how long a sealing waits for transactions that had written when it looked
DEFAULT_WAIT_S = 30.0

#: how long the claim waits for a late writer holding a mark before the sealing gives up for this time
CLAIM_LOCK_TIMEOUT = "5s"

#: renumber the users when the bitmaps are this many times wider than the users they hold (plus slack):
#: ordinals are never reused, so users who stopped using the platform would widen every bitmap for good
COMPACT_RATIO = 4
COMPACT_SLACK_BITS = 4096

# the bucket bounds, in SQL: the first bucket readers trust, and the end of the last one that is due
_FIRST_TRUSTED = "usage_kpi_bucket_of(now()) - usage_kpi_bucket_horizon() + usage_kpi_bucket_width()"
_DUE_END = "usage_kpi_bucket_of(now() - %(grace)s::interval)"


class KpiBucketError(ValueError):
    """Bad input to the sealing (a naive or unaligned bucket, a negative grace...)."""


@dataclass
class BucketMismatch:
    """A bucket that is not exactly ``usage_log``'s numbers (``kpi_buckets_reconcile.sql``)."""

    bucket: dt.datetime
    expected_transcriptions: int
    bucket_transcriptions: int | None
    expected_billable_cost_usd: Any
    bucket_billable_cost_usd: Any
    expected_active_users: int
    bucket_active_users: int | None


@dataclass
class SealResult:
    buckets: list[dt.datetime] = field(default_factory=list)  # recomputed (sealed if committed)
    stale_buckets_cleared: list[dt.datetime] = field(default_factory=list)
    rows_read: int = 0
    new_users: int = 0
    mismatches: list[BucketMismatch] = field(default_factory=list)
    committed: bool = False
    waited_s: float = 0.0
    skipped: str = ""  # why nothing was sealed although buckets were due, else ""
    pruned_buckets: int = 0
    pruned_marks: int = 0
    compacted_from_bits: int = 0  # the bitmap width before the users were renumbered, else 0
    duration_ms: float = 0.0

    @property
    def reconciled(self) -> bool:
        return not self.mismatches


def _require_autocommit(conn: psycopg.Connection) -> None:
    if not conn.autocommit:
        raise KpiBucketError("seal_buckets needs an autocommit connection: it runs its own transactions")


def buckets_due(conn: psycopg.Connection, grace: dt.timedelta = DEFAULT_GRACE) -> list[dt.datetime]:
    """Closed buckets readers may trust, over for at least ``grace``, with no row or with a late mark:
    the untrusted buckets of the whole horizon."""
    return untrusted_buckets(conn, grace, within=None)


def _claim(conn: psycopg.Connection, buckets: list[dt.datetime]) -> list[dt.datetime]:
    """Delete the marks of ``buckets`` and the rows of the marked ones, in one committed transaction;
    returns the marked buckets."""
    with conn.transaction():
        conn.execute(f"SET LOCAL lock_timeout = '{CLAIM_LOCK_TIMEOUT}'")
        marked = [
            r[0]
            for r in conn.execute(
                "DELETE FROM usage_kpi_stale_buckets WHERE bucket = ANY(%s::timestamptz[]) RETURNING bucket",
                (buckets,),
            ).fetchall()
        ]
        if marked:
            conn.execute("DELETE FROM usage_kpi_buckets WHERE bucket = ANY(%s::timestamptz[])", (marked,))
    return sorted(marked)


def wait_for_writers(conn: psycopg.Connection, wait_s: float) -> tuple[bool, float]:
    """Wait until every transaction with an xid at this moment has ended; (all ended, seconds waited).

    Uses the current snapshot's in-progress list (``pg_current_snapshot()``) and ``pg_xact_status``:
    needs no privilege on other sessions, unlike ``pg_stat_activity``.
    """
    started = time.monotonic()
    row = conn.execute("SELECT array(SELECT pg_snapshot_xip(pg_current_snapshot()))::text[]").fetchone()
    xids: list[str] = row[0] if row else []
    while xids:
        row = conn.execute(
            "SELECT array(SELECT x FROM unnest(%s::text[]) AS x "
            "WHERE pg_xact_status(x::xid8) = 'in progress')::text[]",
            (xids,),
        ).fetchone()
        xids = row[0] if row else []
        if not xids:
            break
        if time.monotonic() - started >= wait_s:
            return False, time.monotonic() - started
        time.sleep(0.05)
    return True, time.monotonic() - started


def seal_buckets(
    conn: psycopg.Connection,
    *,
    grace: dt.timedelta = DEFAULT_GRACE,
    wait_s: float = DEFAULT_WAIT_S,
    buckets: list[dt.datetime] | None = None,
    check: bool = True,
) -> SealResult:
    """Compute the buckets due (or ``buckets``, which must be closed, trusted by readers, and at least
    ``grace`` old), reconcile them, prune what the horizon left behind. Idempotent, and safe to kill at
    any point: what is not committed stays due, and is read from ``usage_log`` until a later run seals
    it. Needs an autocommit connection.

    Cost: two reads of the due buckets' ``usage_log`` rows (one range scan each: buckets, reconciliation)
    plus one pass over the user ordinals per bucket. Locks: ROW EXCLUSIVE on the bucket tables;
    ``usage_log`` is only read.
    """
    _require_autocommit(conn)
    if grace < dt.timedelta(0):
        raise KpiBucketError(f"grace must not be negative, got {grace}")
    if wait_s < 0:
        raise KpiBucketError(f"wait_s must not be negative, got {wait_s}")
    result = SealResult()
    started = time.perf_counter()
    if not try_advisory_lock(conn, Locks.KPI_SEALING):
        result.skipped = "another sealing is running"
        result.duration_ms = (time.perf_counter() - started) * 1000
        return result
    try:
        result.compacted_from_bits = _compact_if_sparse(conn)
        due = buckets_due(conn, grace)
        if buckets is not None:
            _check_requested(conn, buckets, grace)
            due = sorted(set(buckets))
        result.buckets = due
        if due:
            try:
                result.stale_buckets_cleared = _claim(conn, due)
            except psycopg.errors.LockNotAvailable:
                # a late writer holds a mark (FOR KEY SHARE) and has not committed: claim next time
                result.skipped = (
                    f"a writer held a late-data mark for over {CLAIM_LOCK_TIMEOUT}; "
                    "the buckets stay read from usage_log until the next sealing"
                )
                due = []
        if due:
            ended, result.waited_s = wait_for_writers(conn, wait_s)
            if ended:
                _seal(conn, due, result, check)
            else:
                result.skipped = (
                    f"transactions that had written were still running after {wait_s:g} s; "
                    "the buckets stay read from usage_log until the next sealing"
                )
        result.pruned_buckets, result.pruned_marks = _prune(conn)
    finally:
        advisory_unlock(conn, Locks.KPI_SEALING)
    result.duration_ms = (time.perf_counter() - started) * 1000
    return result


def _check_requested(conn: psycopg.Connection, buckets: list[dt.datetime], grace: dt.timedelta) -> None:
    for b in buckets:
        if b.tzinfo is None:
            raise KpiBucketError(f"bucket {b} is naive; give a timezone-aware UTC instant")
    row = conn.execute(f"SELECT {_FIRST_TRUSTED}, {_DUE_END}", {"grace": grace}).fetchone()
    assert row is not None
    first, end = row
    for b in buckets:
        aligned = b.timestamp() % BUCKET.total_seconds() == 0
        if not aligned or not first <= b < end:
            raise KpiBucketError(
                f"bucket {b.isoformat()} is not a whole {BUCKET} bucket in "
                f"[{first.isoformat()}, {end.isoformat()}): only closed buckets readers trust, over for "
                "the grace period, can be sealed"
            )


def contiguous_runs(buckets: list[dt.datetime]) -> list[list[dt.datetime]]:
    """``buckets`` (sorted) split into runs of consecutive buckets."""
    runs: list[list[dt.datetime]] = []
    for b in buckets:
        if runs and b - runs[-1][-1] == BUCKET:
            runs[-1].append(b)
        else:
            runs.append([b])
    return runs


def _seal(conn: psycopg.Connection, buckets: list[dt.datetime], result: SealResult, check: bool) -> None:
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        # one range scan per run of consecutive buckets (a late row 47 h back adds its own bucket, not
        # the 47 h between), its bounds known at plan time: pruned and estimated with the values
        for run in contiguous_runs(buckets):
            params = {"buckets": run, "lo": run[0], "hi": run[-1] + BUCKET}
            result.new_users += conn.execute(load_query("kpi_buckets_ordinals"), params).rowcount
            row = conn.execute(load_query("kpi_buckets_seal"), params).fetchone()
            assert row is not None
            result.rows_read += int(row[1])
            if check:
                with conn.cursor(row_factory=dict_row) as c:
                    result.mismatches += [
                        BucketMismatch(**r) for r in c.execute(load_query("kpi_buckets_reconcile"), params)
                    ]
        if result.mismatches:
            raise psycopg.Rollback()
        result.committed = True


def untrusted_buckets(
    conn: psycopg.Connection,
    grace: dt.timedelta = DEFAULT_GRACE,
    within: dt.timedelta | None = dt.timedelta(hours=24),
) -> list[dt.datetime]:
    """Closed buckets of the last ``within`` (None: the whole horizon), over for ``grace``, that KPI
    readers cannot trust: no row, or a late-data mark. Empty on a healthy system right after a sealing."""
    rows = conn.execute(
        f"""
        SELECT g.bucket
        FROM generate_series(greatest({_FIRST_TRUSTED},
                                      usage_kpi_bucket_of(now() - %(within)s::interval)),
                             {_DUE_END} - usage_kpi_bucket_width(), usage_kpi_bucket_width()) AS g(bucket)
        WHERE NOT EXISTS (SELECT 1 FROM usage_kpi_buckets k WHERE k.bucket = g.bucket)
           OR EXISTS (SELECT 1 FROM usage_kpi_stale_buckets s WHERE s.bucket = g.bucket)
        ORDER BY g.bucket
        """,
        {"grace": grace, "within": within},
    ).fetchall()
    return [r[0] for r in rows]


def _compact_if_sparse(conn: psycopg.Connection) -> int:
    """Renumber the users when the bitmaps have grown much wider than the users of the last 48 h; returns
    the width before (0 if nothing was done).

    Drops every bucket and ordinal in one transaction and restarts the numbering: every bucket is then
    due, the next steps of the same sealing recompute them with dense ordinals, and meanwhile (or if the
    sealing dies) readers read ``usage_log``. Cost: one pass over the buckets' bitmaps to count the users.
    """
    row = conn.execute(
        """
        SELECT (SELECT coalesce(max(ordinal) + 1, 0) FROM usage_user_ordinals) AS width,
               (SELECT coalesce(bit_count(bit_or(k.user_bits || repeat('0', k.n - length(k.user_bits))::varbit)), 0)
                FROM (SELECT user_bits, max(length(user_bits)) OVER () AS n FROM usage_kpi_buckets) AS k) AS users
        """
    ).fetchone()
    assert row is not None
    width, users = int(row[0]), int(row[1])
    if width <= COMPACT_RATIO * users + COMPACT_SLACK_BITS:
        return 0
    with conn.transaction():
        conn.execute("DELETE FROM usage_kpi_buckets")
        conn.execute("DELETE FROM usage_user_ordinals")
        conn.execute("SELECT setval(pg_get_serial_sequence('usage_user_ordinals', 'ordinal'), 0, false)")
    return width


def _prune(conn: psycopg.Connection) -> tuple[int, int]:
    """Drop buckets and marks readers no longer trust (before the first trusted bucket)."""
    with conn.transaction():
        buckets = conn.execute(f"DELETE FROM usage_kpi_buckets WHERE bucket < {_FIRST_TRUSTED}").rowcount
        marks = conn.execute(f"DELETE FROM usage_kpi_stale_buckets WHERE bucket < {_FIRST_TRUSTED}").rowcount
    return buckets, marks


def sealed_buckets(conn: psycopg.Connection) -> list[dt.datetime]:
    """The buckets that have a row, oldest first."""
    return [r[0] for r in conn.execute("SELECT bucket FROM usage_kpi_buckets ORDER BY bucket").fetchall()]


def stale_buckets(conn: psycopg.Connection) -> list[dt.datetime]:
    """The buckets carrying a late-data mark, oldest first."""
    return [
        r[0] for r in conn.execute("SELECT bucket FROM usage_kpi_stale_buckets ORDER BY bucket").fetchall()
    ]
