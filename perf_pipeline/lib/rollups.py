"""Incremental daily usage rollups: compute a window of UTC days, read trends, find late data.

The rollup tables (``sql/migrations/0020_usage_daily_metrics.sql``, ``0022_usage_daily_user_sets.sql``,
``0070_usage_period_user_sets.sql``) hold one row per UTC day, one per (day, provider) present, one
sorted array of distinct users per day, and one per ISO week and month with the distinct users of its
closed days. :func:`rollup_days` recomputes any window of days with one set-based statement
(``sql/queries/rollup_upsert.sql``), so one day costs one day of ``usage_log`` and a 90-day backfill is
one scan, not 90 round trips; then, in the same transaction, the weeks and months whose closed days
changed (``sql/queries/rollup_period_user_sets.sql``; never for a refresh of today alone). Reads
(:func:`usage_trends`, :func:`provider_breakdown`) touch the rollup tables only.

Late data (``0021_usage_rollup_stale_days.sql``): writes to ``usage_log`` for past days mark their day in
``usage_rollup_stale_days``; :func:`stale_rolled_up_days` lists the marked days that are already rolled
up (what the automation re-materializes) and :func:`rollup_days` claims the marks of its window before it
reads, so a late row is always either counted or still marked. A claim (``0090_usage_rollup_claims.sql``)
is deleted only by the transaction that commits the new numbers: a rollup that dies after claiming
leaves its claims behind, and they become marks again (:func:`rearm_orphaned_claims`).

Days whose rows are not all in ``usage_log`` are never recomputed: a month archived and dropped by usage
retention (or being archived, restored or moved right now) keeps its rolled-up history, and late rows
written for such a month are reported (:func:`late_rows_in_unavailable_months`) instead of replacing a
day's numbers with the few rows left.

Days are UTC: day ``2025-08-14`` is ``[2025-08-14 00:00Z, 2025-08-15 00:00Z)``. Windows are half-open
``[start, end)`` of dates, like Dagster's partition time windows.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, TypedDict

import psycopg
from psycopg.rows import dict_row

from perf_pipeline.lib.calendar import day_start, month_start, months_between
from perf_pipeline.lib.db import Locks, advisory_lock, advisory_unlock, load_query, try_advisory_lock
from perf_pipeline.lib.partitioning import archive_states

UTC = dt.UTC


#: trends granularity → date_trunc unit
TREND_UNITS: dict[str, str] = {"daily": "day", "weekly": "week", "monthly": "month"}

#: the dashboard's daily metrics view (``dashboard_daily_metrics``) looks back this many days
LOOKBACK_DAYS = 90


class RollupError(ValueError):
    """Bad window or granularity; the message says which."""


def utc_today(now: dt.datetime | None = None) -> dt.date:
    return (now or dt.datetime.now(UTC)).astimezone(UTC).date()


def _window(start: dt.date, end: dt.date) -> dict[str, Any]:
    if end <= start:
        raise RollupError(f"empty window: end {end.isoformat()} must be after start {start.isoformat()}")
    return {"start_day": start, "end_day": end, "start_ts": day_start(start), "end_ts": day_start(end)}


@dataclass(frozen=True)
class Mismatch:
    """One (day, provider) whose rollup differs from ``usage_log``; provider ``*`` is the day total."""

    day: dt.date
    provider: str
    expected_sessions: int | None
    rolled_sessions: int | None
    expected_minutes: Decimal | None
    rolled_minutes: Decimal | None
    expected_revenue: Decimal | None
    rolled_revenue: Decimal | None


@dataclass
class RollupResult:
    start: dt.date
    end: dt.date  # exclusive
    days: int = 0
    rows_scanned: int = 0
    sessions: int = 0
    revenue: Decimal = Decimal(0)
    provider_rows_written: int = 0
    provider_rows_deleted: int = 0
    user_sets_written: int = 0
    period_sets_written: int = 0
    stale_days_cleared: list[dt.date] = field(default_factory=list)
    #: months of the window left as they were: their rows are not all in usage_log (month → why)
    unavailable_months: dict[dt.date, str] = field(default_factory=dict)
    #: claims of rollups that died, turned back into marks by this run
    rearmed_days: list[dt.date] = field(default_factory=list)
    mismatches: list[Mismatch] = field(default_factory=list)
    committed: bool = False
    duration_ms: float = 0.0
    upsert_ms: float = 0.0
    reconcile_ms: float = 0.0

    @property
    def reconciled(self) -> bool:
        return not self.mismatches

    @property
    def skipped_days(self) -> list[dt.date]:
        """Days of the window not recomputed (their month is in :attr:`unavailable_months`)."""
        return [d for d in _days(self.start, self.end) if month_start(d) in self.unavailable_months]


def _require_autocommit(conn: psycopg.Connection) -> None:
    if not conn.autocommit:
        raise RollupError("rollup_days needs an autocommit connection: it runs its own transactions")


def _days(start: dt.date, end: dt.date) -> list[dt.date]:
    return [start + dt.timedelta(days=i) for i in range((end - start).days)]


def _ranges(start: dt.date, end: dt.date, skip_months: set[dt.date]) -> list[tuple[dt.date, dt.date]]:
    """``[start, end)`` without the days of ``skip_months``, as half-open runs of consecutive days."""
    out: list[tuple[dt.date, dt.date]] = []
    for day in _days(start, end):
        if month_start(day) in skip_months:
            continue
        if out and out[-1][1] == day:
            out[-1] = (out[-1][0], day + dt.timedelta(days=1))
        else:
            out.append((day, day + dt.timedelta(days=1)))
    return out


def rearm_orphaned_claims(conn: psycopg.Connection) -> list[dt.date]:
    """Turn the claims of rollups that died back into late-data marks; returns the days re-armed.

    Only when no rollup is running (``pg_try_advisory_lock`` of the rollup lock, released at once): a
    claim that exists then belongs to a rollup that was killed after claiming. The observation sensor calls
    this every tick, so a lost claim is re-armed within a tick of the next moment no rollup runs; every
    rollup also does it first thing. Cost: a try-lock and two tiny tables. Autocommit connection.
    """
    _require_autocommit(conn)
    with advisory_lock(conn, Locks.ROLLUP, wait_s=0) as held:
        if not held:
            return []
        with conn.transaction():
            return [r[0] for r in conn.execute(load_query("rollup_rearm_claims")).fetchall()]


def claim_stale_days(
    conn: psycopg.Connection,
    start: dt.date,
    end: dt.date,
    skip_months: set[dt.date] | frozenset = frozenset(),
) -> tuple[list[dt.date], list[dt.date]]:
    """Claim the late-data marks of ``[start, end)`` (minus ``skip_months``) in a transaction of its own;
    returns (claimed days, days re-armed from claims of rollups that died).

    The caller holds the rollup lock. Must commit before the rollup takes its snapshot (see 0021 and
    0090). Locks: the marked rows; waits for writers still holding a mark of the window (FOR KEY SHARE)
    to commit, which is short.
    """
    with conn.transaction():
        rearmed = [r[0] for r in conn.execute(load_query("rollup_rearm_claims")).fetchall()]
        claimed = conn.execute(
            load_query("rollup_claim_marks"), {"start": start, "end": end, "skip_months": sorted(skip_months)}
        ).fetchall()
    return sorted(r[0] for r in claimed), rearmed


def release_claims(conn: psycopg.Connection) -> list[dt.date]:
    """Turn this rollup's claims back into marks (it did not commit), so the sensor retries those days.

    The caller holds the rollup lock, so every claim is its own. Autocommit connection."""
    with conn.transaction():
        return [r[0] for r in conn.execute(load_query("rollup_rearm_claims")).fetchall()]


def unavailable_months(
    conn: psycopg.Connection, start: dt.date, end: dt.date
) -> tuple[dict[dt.date, str], list[dt.date]]:
    """Months of ``[start, end)`` whose usage_log rows are not all visible, and the months locked shared.

    For each month the window touches, takes the archive's per-month advisory lock in *shared* mode
    without waiting (:meth:`perf_pipeline.lib.db.Locks.month`): archive, restore and
    ``move_default_rows`` hold it exclusively while they change the month, so a month whose lock is
    taken is "being archived, restored or moved right now", and a month locked here stays as it is
    until :func:`_unlock_months`. Then a month with an archive manifest row in any state but
    ``restored`` is detached or dropped (its rows are in an archive file). Returns (month → why, the
    months locked). Cost: one try-lock per month and one manifest read.
    """
    busy: dict[dt.date, str] = {}
    locked: list[dt.date] = []
    for month in months_between(start, end - dt.timedelta(days=1)):
        if try_advisory_lock(conn, Locks.month("usage_log", month), shared=True):
            locked.append(month)
        else:
            busy[month] = "being archived, restored or moved right now"
    for month, state in archive_states(conn, "usage_log").items():
        if month in locked:
            busy[month] = (
                "archived (rows in its archive file)"
                if state == "dropped"
                else (f"archive stopped at {state} (its table is detached)")
            )
    return busy, locked


def _unlock_months(conn: psycopg.Connection, months: list[dt.date]) -> None:
    for month in months:
        advisory_unlock(conn, Locks.month("usage_log", month), shared=True)


def reconcile(conn: psycopg.Connection, start: dt.date, end: dt.date) -> list[Mismatch]:
    """(day, provider) pairs of ``[start, end)`` whose rollup is not exactly ``usage_log``'s numbers.

    Independent of the rollup statement (``sql/queries/rollup_reconcile.sql``). Cost: one scan of the
    window's ``usage_log`` rows. Run inside the rollup's REPEATABLE READ transaction by
    :func:`rollup_days`; alone it compares against the current state.
    """
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(load_query("rollup_reconcile"), _window(start, end)).fetchall()
    return [Mismatch(**r) for r in rows]


def rollup_days(
    conn: psycopg.Connection,
    start: dt.date,
    end: dt.date,
    *,
    work_mem: str = "256MB",
    check: bool = True,
    rollback_on_mismatch: bool = True,
) -> RollupResult:
    """Recompute the rollup of the UTC days ``[start, end)`` and, with ``check``, reconcile it.

    Steps: take the rollup advisory lock (session level; serializes rollups) and, shared, the per-month
    locks of the months it reads (:func:`unavailable_months`: months archived, being archived, restored
    or moved are left as they are); claim the window's late-data marks (own short transaction, claims
    of rollups that died re-armed first); then one REPEATABLE READ transaction running the set-based
    upsert over each run of available days, the recomputation of the weeks and months whose closed days
    changed, on the same snapshot the reconciliation against ``usage_log``, and the deletion of the
    claims: numbers and claims commit together, so a kill at any point leaves every late row counted or
    still marked. If the reconciliation finds a difference, the transaction is rolled back
    (``rollback_on_mismatch``): bad numbers never reach the rollup tables, hence neither the view nor the
    dashboard cache; the differences are returned in ``mismatches`` (``committed`` is False) for the
    blocking asset check. Whenever nothing is committed the claims go back to marks, and errors are
    re-raised.

    Cost: one read of the window's ``usage_log`` rows for the upsert and one for the check; memory
    bounded by ``work_mem`` (raised for the transaction only, so the pre-aggregation hashes in memory).
    Locks: ROW EXCLUSIVE on the rollup tables; usage_log is only read, writers are never blocked; the
    archive of a month of the window waits for the rollup to end.
    Needs an autocommit connection.
    """
    _require_autocommit(conn)
    _window(start, end)  # validates the window
    result = RollupResult(start=start, end=end)
    started = time.perf_counter()
    try_advisory_lock(conn, Locks.ROLLUP, wait_s=None)
    locked: list[dt.date] = []
    try:
        result.unavailable_months, locked = unavailable_months(conn, start, end)
        skip = set(result.unavailable_months)
        result.stale_days_cleared, result.rearmed_days = claim_stale_days(conn, start, end, skip)
        try:
            with conn.transaction():
                # snapshot taken by the first query below, after the claims were committed
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                conn.execute("SELECT set_config('work_mem', %s, true)", (work_mem,))
                changed_days: list[dt.date] = []
                for lo, hi in _ranges(start, end, skip):
                    params = _window(lo, hi)
                    t0 = time.perf_counter()
                    with conn.cursor(row_factory=dict_row) as cur:
                        row = cur.execute(load_query("rollup_upsert"), params).fetchone()
                    result.upsert_ms += (time.perf_counter() - t0) * 1000
                    assert row is not None
                    changed_days += row.pop("changed_days")
                    for key, value in row.items():
                        setattr(result, key, getattr(result, key) + value)
                    # the weeks and months of the range's closed days (0070), on the same snapshot
                    period_row = conn.execute(
                        load_query("rollup_period_user_sets"), {**params, "changed_days": changed_days}
                    ).fetchone()
                    assert period_row is not None
                    result.period_sets_written += period_row[0]
                    if check:
                        t0 = time.perf_counter()
                        result.mismatches += reconcile(conn, lo, hi)
                        result.reconcile_ms += (time.perf_counter() - t0) * 1000
                if result.mismatches and rollback_on_mismatch:
                    raise psycopg.Rollback()  # leaves the block, rolling back, without an error
                # the marks this rollup consumed go with the numbers they led to
                conn.execute("DELETE FROM usage_rollup_claims")
                result.committed = True
        except BaseException:
            if not conn.broken:  # a dead session keeps its claims: re-armed by the next rollup or the sensor
                release_claims(conn)
            raise
        if not result.committed:
            release_claims(conn)
    finally:
        if not conn.broken:  # a dead session has released its locks already
            _unlock_months(conn, locked)
            advisory_unlock(conn, Locks.ROLLUP)
    result.duration_ms = (time.perf_counter() - started) * 1000
    return result


@dataclass(frozen=True)
class LateRows:
    """Rows in usage_log for a month whose other rows are archived (or whose archive stopped half-way)."""

    month: dt.date
    state: str  # the month's archive_manifest state
    rows: int
    days: list[dt.date]
    relation: str  # where they are: the DEFAULT partition (an archived month has no partition)


def late_rows_in_archived_months(conn: psycopg.Connection) -> list[LateRows]:
    """Rows usage_log still shows for months that usage retention archived (manifest state other than
    ``restored``): written after the archive, they sit in ``usage_log_default`` (no partition is ever
    created for an archived month). The rollup keeps such a month's numbers as they were archived and
    does not count them; restoring the month (``perf-pipeline archive restore YYYY-MM --table usage_log``)
    moves them into it, and the automation then recomputes its days. Cost: a manifest read and a scan
    of ``usage_log_default`` (kept empty)."""
    states = archive_states(conn, "usage_log")
    if not states:
        return []
    rows = conn.execute(
        "SELECT date_trunc('month', created_at AT TIME ZONE 'UTC')::date, (created_at AT TIME ZONE 'UTC')::date, "
        "count(*) FROM usage_log_default "
        "WHERE date_trunc('month', created_at AT TIME ZONE 'UTC')::date = ANY(%s) GROUP BY 1, 2 ORDER BY 1, 2",
        (sorted(states),),
    ).fetchall()
    by_month: dict[dt.date, list[tuple[dt.date, int]]] = {}
    for month, day, n in rows:
        by_month.setdefault(month, []).append((day, n))
    return [
        LateRows(month, states[month], sum(n for _, n in days), [d for d, _ in days], "usage_log_default")
        for month, days in sorted(by_month.items())
    ]


# ------------------------------------------------------------------------------------------- late data


def stale_rolled_up_days(
    conn: psycopg.Connection, first: dt.date, last: dt.date
) -> list[tuple[dt.date, dt.datetime]]:
    """Marked days in ``[first, last]`` that are already rolled up, with their mark time, oldest first.

    Days marked but never rolled up are left alone: their first rollup will read the late rows anyway.
    Cost: a join of two small tables (one row per marked day).
    """
    rows = conn.execute(
        """
        SELECT s.day, s.marked_at
        FROM usage_rollup_stale_days s
        JOIN usage_daily_metrics m ON m.day = s.day
        WHERE s.day BETWEEN %s AND %s
        ORDER BY s.day
        """,
        (first, last),
    ).fetchall()
    return [(r[0], r[1]) for r in rows]


# -------------------------------------------------------------------------------------------- checks


@dataclass(frozen=True)
class DayDisagreement:
    """A rolled-up day whose totals are not usage_log's, with no mark pending that would fix it."""

    day: dt.date
    expected_sessions: int
    rolled_sessions: int
    expected_minutes: Decimal
    rolled_minutes: Decimal
    expected_revenue: Decimal
    rolled_revenue: Decimal


def find_disagreeing_days(conn: psycopg.Connection, first: dt.date, last: dt.date) -> list[DayDisagreement]:
    """Rolled-up days of ``[first, last]`` whose sessions, minutes or revenue differ from ``usage_log``
    although no late-data mark or claim is pending for them and their month is not archived
    (``sql/queries/rollup_day_totals_disagree.sql``), read on one REPEATABLE READ snapshot.

    Cost: one scan of the window's usage_log rows, counts and sums only (about a second for 90 days of
    2.5M rows). Locks: ACCESS SHARE. Autocommit connection (runs its own transaction).
    """
    _require_autocommit(conn)
    params = _window(first, last + dt.timedelta(days=1))
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        with conn.cursor(row_factory=dict_row) as cur:
            rows = cur.execute(load_query("rollup_day_totals_disagree"), params).fetchall()
    return [DayDisagreement(**r) for r in rows]


def mark_days(conn: psycopg.Connection, days: list[dt.date]) -> None:
    """Mark ``days`` as changed (as the late-data triggers would), so the automation re-runs them.
    One small INSERT; a day already marked keeps its mark."""
    if days:
        with conn.transaction():
            conn.execute(
                "INSERT INTO usage_rollup_stale_days (day) SELECT unnest(%s::date[]) ON CONFLICT (day) DO NOTHING",
                (days,),
            )


def missing_days(conn: psycopg.Connection, first: dt.date, last: dt.date) -> list[dt.date]:
    """Days in ``[first, last]`` without a rollup row (cost: an index scan of at most that many rows)."""
    rows = conn.execute(
        """
        SELECT d::date FROM generate_series(%s::date::timestamp, %s::date::timestamp, interval '1 day') AS d
        WHERE NOT EXISTS (SELECT 1 FROM usage_daily_metrics m WHERE m.day = d::date)
        ORDER BY 1
        """,
        (first, last),
    ).fetchall()
    return [r[0] for r in rows]


def rolled_up(conn: psycopg.Connection, start: dt.date, end: dt.date) -> dict[dt.date, dict[str, Any]]:
    """The rollup rows of ``[start, end)`` (day → sessions, total_minutes, revenue, active_users,
    avg_duration, rows_scanned, computed_at). Cost: a primary-key range read, one row per day."""
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            "SELECT day, sessions, total_minutes, revenue, active_users, avg_duration, rows_scanned, computed_at "
            "FROM usage_daily_metrics WHERE day >= %s AND day < %s ORDER BY day",
            (start, end),
        ).fetchall()
    return {r.pop("day"): r for r in rows}


def negative_days(conn: psycopg.Connection, start: dt.date, end: dt.date) -> list[dt.date]:
    """Days of ``[start, end)`` with a negative number in the day or provider rollup."""
    rows = conn.execute(
        """
        SELECT day FROM usage_daily_metrics
        WHERE day >= %(s)s AND day < %(e)s
          AND (sessions < 0 OR total_minutes < 0 OR revenue < 0 OR active_users < 0 OR avg_duration < 0
               OR rows_scanned < 0)
        UNION
        SELECT day FROM usage_daily_provider_metrics
        WHERE day >= %(s)s AND day < %(e)s AND (sessions < 0 OR minutes < 0 OR revenue < 0)
        ORDER BY 1
        """,
        {"s": start, "e": end},
    ).fetchall()
    return [r[0] for r in rows]


# --------------------------------------------------------------------------------------------- reads


def _unit(granularity: str) -> str:
    try:
        return TREND_UNITS[granularity]
    except KeyError:
        raise RollupError(
            f"granularity must be one of {', '.join(TREND_UNITS)}; got {granularity!r}"
        ) from None


class ProviderUsage(TypedDict):
    """One STT provider's usage within a trend period."""

    provider: str
    session_count: int
    minutes: float
    revenue: float  # billable


class TrendPoint(TypedDict):
    """One period of a usage trend: the row :func:`usage_trends` returns, cached and served as is (the
    dashboard API's ``transcription_trend`` items are declared from it). JSON-ready: ``period`` is the ISO
    date of the period's first day (a day, a Monday, a 1st), numbers are int/float."""

    period: str
    session_count: int
    total_minutes: float
    total_cost: float  # billable revenue
    active_users: int  # exact distinct users of the period
    avg_duration: float  # minutes per session, 0.0 without sessions
    providers: list[ProviderUsage]  # most sessions first


class ProviderShare(TypedDict):
    """One STT provider's sessions over a whole range and their share in percent (2 decimals)."""

    provider: str
    session_count: int
    percentage: float


def usage_trends(
    conn: psycopg.Connection, start: dt.date, end: dt.date, granularity: str
) -> list[TrendPoint]:
    """Usage per period over the days ``[start, end]`` (inclusive), from the rollup tables only.

    ``granularity``: ``daily``, ``weekly`` (ISO weeks, Monday first) or ``monthly``. Every period
    overlapping the range has a :class:`TrendPoint`, oldest first; its numbers cover only the days inside
    ``[start, end]``.
    Cost: two index range scans of the rollup tables, no ``usage_log`` access. Weekly/monthly active
    users: one ``usage_period_user_sets`` row per period starting inside the range, plus the day sets
    of its days not yet in that row (today, yesterday before its closing run); a period cut by the
    range's start unions its days' sets (one array element per user and day).
    """
    if end < start:
        raise RollupError(f"end {end.isoformat()} is before start {start.isoformat()}")
    params = {"start": start, "end": end, "unit": _unit(granularity)}
    with conn.cursor(row_factory=dict_row) as cur:
        periods = cur.execute(load_query("rollup_trends"), params).fetchall()
        providers = cur.execute(load_query("rollup_trends_providers"), params).fetchall()
    by_period: dict[dt.date, list[ProviderUsage]] = {}
    for p in providers:
        by_period.setdefault(p["period"], []).append(
            ProviderUsage(
                provider=p["provider"],
                session_count=int(p["session_count"]),
                minutes=float(p["minutes"]),
                revenue=float(p["revenue"]),
            )
        )
    return [
        {
            "period": r["period"].isoformat(),
            "session_count": int(r["session_count"]),
            "total_minutes": float(r["total_minutes"]),
            "total_cost": float(r["total_cost"]),
            "active_users": int(r["active_users"]),
            "avg_duration": float(r["avg_duration"]),
            "providers": by_period.get(r["period"], []),
        }
        for r in periods
    ]


def provider_breakdown(conn: psycopg.Connection, start: dt.date, end: dt.date) -> list[ProviderShare]:
    """Sessions per STT provider over the days ``[start, end]`` and their share in percent (2 decimals),
    most sessions first; every provider present. Cost: a few rollup rows per day, no ``usage_log``."""
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(load_query("rollup_provider_breakdown"), {"start": start, "end": end}).fetchall()
    return [
        {
            "provider": r["provider"],
            "session_count": int(r["session_count"]),
            "percentage": float(r["percentage"]),
        }
        for r in rows
    ]
