"""The dashboard's numbers, computed from SQL: real-time KPIs and usage trends.

These are the source of truth the cache (:mod:`perf_pipeline.lib.cache`) stores and the asset checks
compare against. KPIs read ``usage_kpi_buckets``, ``usage_log`` and ``session``
(``sql/queries/dashboard_kpis.sql``); trends read the daily rollups through :mod:`perf_pipeline.lib.rollups`, so a 90-day trend
costs 90 rollup rows, not 90 days of ``usage_log``.

Payloads are plain JSON-able dicts (dates as ISO strings, numbers as int/float) so that what the API
serves from Redis and what it serves from the SQL fallback are byte-for-byte the same shape.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Literal, TypedDict

import psycopg
from psycopg.rows import dict_row

from perf_pipeline.lib import rollups
from perf_pipeline.lib.db import load_query
from perf_pipeline.lib.partitioning import add_months, month_start
from perf_pipeline.lib.rollups import ProviderShare, TrendPoint

Granularity = Literal["daily", "weekly", "monthly"]
GRANULARITIES: tuple[Granularity, ...] = ("daily", "weekly", "monthly")

# Longest range a trends request may ask for, per granularity: a year of days, two years of weeks,
# three years of months. Past that, the answer is a different report (and an expensive one).
MAX_RANGE_DAYS: dict[str, int] = {"daily": 366, "weekly": 731, "monthly": 1096}

# Ranges the dashboard asks for, kept warm by the dashboard_cache asset: (granularity, periods back,
# today's period included). Daily: the last 7/30/90 days. Weekly and monthly ranges start on a period's
# first day (13 whole ISO weeks, 12 whole months, the current one to date): a chart of "the last 12
# months" whose first bar held only the last few days of a month would read as a drop in usage, and an
# aligned range reads each closed period's distinct users from one usage_period_user_sets row.
STANDARD_TRENDS: tuple[tuple[Granularity, int], ...] = (
    ("daily", 7),
    ("daily", 30),
    ("daily", 90),
    ("weekly", 13),
    ("monthly", 12),
)

KPI_FIELDS = (
    "active_transcriptions",
    "transcriptions_last_hour",
    "active_users_24h",
    "failed_last_hour",
    "error_rate_percent",
    "daily_revenue_usd",
    "avg_duration_minutes",
)


class TrendRangeError(ValueError):
    """A trends request with a bad range or granularity; the message says what is wrong."""


@dataclass(frozen=True)
class TrendRequest:
    start: dt.date
    end: dt.date
    granularity: Granularity

    @property
    def cache_suffix(self) -> str:
        return f"{self.granularity}:{self.start.isoformat()}:{self.end.isoformat()}"


def validate_trend_request(start: dt.date, end: dt.date, granularity: str) -> TrendRequest:
    """Check a trends request (no I/O). Raises :class:`TrendRangeError` with a message for people."""
    if granularity not in GRANULARITIES:
        raise TrendRangeError(f"granularity must be one of {', '.join(GRANULARITIES)}; got {granularity!r}")
    if end < start:
        raise TrendRangeError(f"end_date {end.isoformat()} is before start_date {start.isoformat()}")
    days = (end - start).days + 1
    limit = MAX_RANGE_DAYS[granularity]
    if days > limit:
        raise TrendRangeError(
            f"a {granularity} range may span at most {limit} days; "
            f"{start.isoformat()}..{end.isoformat()} spans {days}"
        )
    return TrendRequest(start, end, granularity)  # type: ignore[arg-type]


def standard_trend_requests(today: dt.date) -> list[TrendRequest]:
    """The ranges the dashboard opens with, ending ``today`` (UTC): the last 7/30/90 days daily, the
    last 13 ISO weeks weekly and the last 12 months monthly (whole periods, the current one to date)."""
    requests = []
    for granularity, periods in STANDARD_TRENDS:
        if granularity == "daily":
            start = today - dt.timedelta(days=periods - 1)
        elif granularity == "weekly":
            start = today - dt.timedelta(days=today.weekday(), weeks=periods - 1)  # a Monday
        else:
            start = add_months(month_start(today), -(periods - 1))
        requests.append(TrendRequest(start, today, granularity))
    return requests


def compute_kpis(conn: psycopg.Connection, as_of: dt.datetime | None = None) -> dict[str, Any]:
    """Real-time KPIs at ``as_of`` (default: the database's ``now()``).

    Cost: one statement (see ``sql/queries/dashboard_kpis.sql``): the window's sealed 5-minute buckets
    from ``usage_kpi_buckets`` (:mod:`perf_pipeline.lib.kpi_buckets`), minutes of usage_log rows (the
    partial buckets at the window's ends and where the last hour starts, the buckets not sealed yet)
    and two tiny partial-index scans on session; without sealed buckets, the whole 24 h of usage_log. Takes ACCESS SHARE locks only. The same ``as_of`` gives the same numbers (except the live ``active_transcriptions``).
    """
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(load_query("dashboard_kpis"), {"as_of": as_of}).fetchone()
    assert row is not None
    return {
        "real_time": {
            "active_transcriptions": int(row["active_transcriptions"]),
            "transcriptions_last_hour": int(row["transcriptions_last_hour"]),
            "active_users_24h": int(row["active_users_24h"]),
            "failed_last_hour": int(row["failed_last_hour"]),
            "error_rate_percent": float(row["error_rate_percent"]),
            "daily_revenue_usd": float(row["daily_revenue_usd"]),
            "avg_duration_minutes": float(row["avg_duration_minutes"]),
        },
        "timestamp": row["as_of"].astimezone(dt.UTC).isoformat(),
    }


class TrendPeriod(TypedDict):
    """The range a trend covers, as asked (ISO dates, both days included)."""

    start_date: str
    end_date: str
    granularity: Granularity


class UsageTrends(TypedDict):
    """The usage-trends payload: what the cache stores and the dashboard API serves, byte for byte."""

    period: TrendPeriod
    transcription_trend: list[TrendPoint]
    provider_breakdown: list[ProviderShare]


def compute_usage_trends(conn: psycopg.Connection, request: TrendRequest) -> UsageTrends:
    """Usage trends for ``request`` in the dashboard API's response shape, with a real provider breakdown:
    the rows of :func:`perf_pipeline.lib.rollups.usage_trends` and ``provider_breakdown`` as they are.

    Cost: two statements over the daily rollups (``usage_daily_metrics`` and
    ``usage_daily_provider_metrics``), one row per day and provider in range: a few ms for 90 days.
    ACCESS SHARE locks only.
    """
    return UsageTrends(
        period=TrendPeriod(
            start_date=request.start.isoformat(),
            end_date=request.end.isoformat(),
            granularity=request.granularity,
        ),
        transcription_trend=rollups.usage_trends(conn, request.start, request.end, request.granularity),
        provider_breakdown=rollups.provider_breakdown(conn, request.start, request.end),
    )
