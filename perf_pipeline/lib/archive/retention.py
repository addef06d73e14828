"""Usage retention: whether a usage month past its retention may be archived and dropped."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import psycopg
from psycopg import sql

from perf_pipeline.lib.calendar import past_retention
from perf_pipeline.lib.db import load_query
from perf_pipeline.lib.partitioning import MonthPartition
from perf_pipeline.lib.rollups import LOOKBACK_DAYS


def archive_eligible(month: dt.date, today: dt.date, retention_months: int) -> bool:
    """A month is past retention when it ends on or before the first day of the oldest kept month:
    with retention 12 on 2026-11-27, months up to 2025-10 are archived and 2025-11 … 2026-11 stay
    (:func:`perf_pipeline.lib.calendar.retention_floor`)."""
    return past_retention(month, today, retention_months)


@dataclass(frozen=True)
class RetentionDecision:
    drop: bool
    reason: str


def usage_retention_decision(
    conn: psycopg.Connection, month: dt.date, today: dt.date, retention_months: int
) -> RetentionDecision:
    """Whether usage month ``month`` may be archived and dropped. The rule, all three must hold:

    1. it is past ``PERF_PIPELINE_USAGE_RETENTION_MONTHS`` (:func:`archive_eligible`);
    2. it ends more than ``LOOKBACK_DAYS`` (90) days before ``today``: the rollups recompute that window
       (:data:`perf_pipeline.lib.rollups.LOOKBACK_DAYS`);
    3. every day of the month that has usage rows has a rollup row computed after that day's latest usage
       row (else the rollup may still need to recompute it: never rolled up, or rolled up while the day
       was still filling), and no day of the month is marked in ``usage_rollup_stale_days`` (late rows
       the rollup will recompute).
    Cost: rule 3 reads the month's rows grouped by day (index/BRIN on created_at), once a month.
    """
    part = MonthPartition("usage_log", month)
    if not archive_eligible(part.month, today, retention_months):
        return RetentionDecision(False, f"within retention ({retention_months} months)")
    if part.end.date() > today - dt.timedelta(days=LOOKBACK_DAYS):
        return RetentionDecision(False, f"overlaps the rollups' {LOOKBACK_DAYS}-day recompute window")
    if conn.execute("SELECT to_regclass(%s) IS NULL", (part.name,)).fetchone()[0]:
        return RetentionDecision(True, "past retention; no partition left")
    stale = conn.execute(
        sql.SQL(load_query("archive_usage_days_needing_rollup")).format(partition=sql.Identifier(part.name))
    ).fetchall()
    marked = conn.execute(
        load_query("archive_usage_stale_days"), {"start": part.start.date(), "end": part.end.date()}
    ).fetchall()
    stale = sorted(set(stale) | set(marked))
    if stale:
        days = ", ".join(str(d) for (d,) in stale[:10])
        return RetentionDecision(
            False, f"{len(stale)} day(s) whose rollup is missing or older than their data: {days}"
        )
    return RetentionDecision(
        True, f"past retention, outside the {LOOKBACK_DAYS}-day window, every day rolled up after its data"
    )
