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
up (what the sensor re-materializes) and :func:`rollup_days` clears the marks of its window before it
reads, so a late row is always either counted or still marked.

Days are UTC: day ``2025-08-14`` is ``[2025-08-14 00:00Z, 2025-08-15 00:00Z)``. Windows are half-open
``[start, end)`` of dates, like Dagster's partition time windows.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import psycopg
from psycopg.rows import dict_row

from perf_pipeline.lib.db import load_query

UTC = dt.UTC

#: session-level advisory lock serializing rollups (two runs of the same day never interleave)
ROLLUP_LOCK_KEY = 0x726F6C6C  # "roll"

#: trends granularity → date_trunc unit
TREND_UNITS: dict[str, str] = {"daily": "day", "weekly": "week", "monthly": "month"}

#: the seed's dashboard looks back this many days (``dashboard_daily_metrics``)
LOOKBACK_DAYS = 90


class RollupError(ValueError):
    """Bad window or granularity; the message says which."""


def day_start(day: dt.date) -> dt.datetime:
    """00:00Z of a UTC day."""
    return dt.datetime(day.year, day.month, day.day, tzinfo=UTC)


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
    mismatches: list[Mismatch] = field(default_factory=list)
    committed: bool = False
    duration_ms: float = 0.0
    upsert_ms: float = 0.0
    reconcile_ms: float = 0.0

    @property
    def reconciled(self) -> bool:
        return not self.mismatches


def _require_autocommit(conn: psycopg.Connection) -> None:
    if not conn.autocommit:
        raise RollupError("rollup_days needs an autocommit connection: it runs its own transactions")


def claim_stale_days(conn: psycopg.Connection, start: dt.date, end: dt.date) -> list[dt.date]:
    """Delete (and return) the late-data marks of ``[start, end)``, in a transaction of its own.

    Must commit before the rollup takes its snapshot (see 0021). Locks: the marked rows; waits for
    writers still holding a mark of the window (FOR KEY SHARE) to commit, which is short.
    """
    with conn.transaction():
        rows = conn.execute(
            "DELETE FROM usage_rollup_stale_days WHERE day >= %s AND day < %s RETURNING day", (start, end)
        ).fetchall()
    return sorted(r[0] for r in rows)


def restore_stale_days(conn: psycopg.Connection, days: list[dt.date]) -> None:
    """Put back marks claimed by a rollup that then failed, so the sensor retries those days."""
    if days:
        with conn.transaction():
            conn.execute(
                "INSERT INTO usage_rollup_stale_days (day) SELECT unnest(%s::date[]) ON CONFLICT (day) DO NOTHING",
                (days,),
            )


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

    Steps: take the rollup advisory lock (session level; serializes rollups), clear the window's
    late-data marks (own short transaction), then one REPEATABLE READ transaction running the
    set-based upsert, the recomputation of the weeks and months whose closed days changed, and, on the
    same snapshot, the reconciliation against ``usage_log``. If the
    reconciliation finds a difference, the transaction is rolled back (``rollback_on_mismatch``): bad
    numbers never reach the rollup tables, hence neither the view nor the dashboard cache; the
    differences are returned in ``mismatches`` (``committed`` is False) for the blocking asset check.
    Whenever nothing is committed the claimed marks are put back, and errors are re-raised.

    Cost: one read of the window's ``usage_log`` rows for the upsert and one for the check; memory
    bounded by ``work_mem`` (raised for the transaction only, so the pre-aggregation hashes in memory).
    Locks: ROW EXCLUSIVE on the rollup tables; usage_log is only read, writers are never blocked.
    Needs an autocommit connection.
    """
    _require_autocommit(conn)
    params = _window(start, end)
    result = RollupResult(start=start, end=end)
    started = time.perf_counter()
    conn.execute("SELECT pg_advisory_lock(%s)", (ROLLUP_LOCK_KEY,))
    try:
        result.stale_days_cleared = claim_stale_days(conn, start, end)
        try:
            with conn.transaction():
                # snapshot taken by the first query below, after the marks were cleared and committed
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                conn.execute("SELECT set_config('work_mem', %s, true)", (work_mem,))
                t0 = time.perf_counter()
                with conn.cursor(row_factory=dict_row) as cur:
                    row = cur.execute(load_query("rollup_upsert"), params).fetchone()
                result.upsert_ms = (time.perf_counter() - t0) * 1000
                assert row is not None
                changed_days = row.pop("changed_days")
                for key, value in row.items():
                    setattr(result, key, value)
                # the weeks and months of the window's closed days (0070), on the same snapshot
                period_row = conn.execute(
                    load_query("rollup_period_user_sets"), {**params, "changed_days": changed_days}
                ).fetchone()
                assert period_row is not None
                result.period_sets_written = period_row[0]
                if check:
                    t0 = time.perf_counter()
                    result.mismatches = reconcile(conn, start, end)
                    result.reconcile_ms = (time.perf_counter() - t0) * 1000
                    if result.mismatches and rollback_on_mismatch:
                        raise psycopg.Rollback()  # leaves the block, rolling back, without an error
                result.committed = True
        except BaseException:
            restore_stale_days(conn, result.stale_days_cleared)
            raise
        if not result.committed:
            restore_stale_days(conn, result.stale_days_cleared)
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (ROLLUP_LOCK_KEY,))
    result.duration_ms = (time.perf_counter() - started) * 1000
    return result


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


def usage_trends(
    conn: psycopg.Connection, start: dt.date, end: dt.date, granularity: str
) -> list[dict[str, Any]]:
    """Usage per period over the days ``[start, end]`` (inclusive), from the rollup tables only.

    ``granularity``: ``daily``, ``weekly`` (ISO weeks, Monday first) or ``monthly``. Every period
    overlapping the range has an entry, oldest first; ``period`` is the ISO date of the period's start
    (a Monday, a 1st), its numbers cover only the days inside ``[start, end]``. Keys: ``period``,
    ``session_count``, ``total_minutes``, ``total_cost`` (billable revenue), ``active_users`` (exact
    distinct users of the period), ``avg_duration`` (minutes per session, 0.0 without sessions) and
    ``providers`` (``provider``, ``session_count``, ``minutes``, ``revenue``, most sessions first).
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
    by_period: dict[dt.date, list[dict[str, Any]]] = {}
    for p in providers:
        by_period.setdefault(p["period"], []).append(
            {
                "provider": p["provider"],
                "session_count": int(p["session_count"]),
                "minutes": float(p["minutes"]),
                "revenue": float(p["revenue"]),
            }
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


def provider_breakdown(conn: psycopg.Connection, start: dt.date, end: dt.date) -> list[dict[str, Any]]:
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
