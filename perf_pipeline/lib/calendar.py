"""UTC month and day arithmetic shared by partitions, archive, retention, exports and rollups.

Months are named by their first day (``dt.date(2025, 8, 1)``) and cover
``[2025-08-01 00:00Z, 2025-09-01 00:00Z)``; days are UTC: day ``2025-08-14`` is
``[2025-08-14 00:00Z, 2025-08-15 00:00Z)``. Pure functions, no I/O.
"""

from __future__ import annotations

import datetime as dt

UTC = dt.UTC


def month_start(value: dt.date | dt.datetime) -> dt.date:
    """First day of the (UTC) month containing ``value``."""
    if isinstance(value, dt.datetime):
        value = value.astimezone(UTC).date() if value.tzinfo else value.date()
    return value.replace(day=1)


def add_months(month: dt.date, n: int) -> dt.date:
    """First day of the month ``n`` months after ``month``'s (``n`` may be negative)."""
    index = month.year * 12 + (month.month - 1) + n
    return dt.date(index // 12, index % 12 + 1, 1)


def day_start(day: dt.date) -> dt.datetime:
    """00:00Z of a UTC day."""
    return dt.datetime(day.year, day.month, day.day, tzinfo=UTC)


def month_bounds(month: dt.date) -> tuple[dt.datetime, dt.datetime]:
    """[start, end) of a month as UTC timestamps."""
    start = month_start(month)
    return day_start(start), day_start(add_months(start, 1))


def months_between(first: dt.date, last: dt.date) -> list[dt.date]:
    """Every month from ``first``'s to ``last``'s, inclusive."""
    out, cur, last = [], month_start(first), month_start(last)
    while cur <= last:
        out.append(cur)
        cur = add_months(cur, 1)
    return out


def retention_floor(today: dt.date, retention_months: int) -> dt.date:
    """The first day of the oldest month kept online: the first day of the month ``retention_months``
    before ``today``'s month. With retention 12 on 2026-11-27 it is 2025-11-01: months up to 2025-10 are
    past retention (archived), 2025-11 … 2026-11 stay."""
    return add_months(month_start(today), -retention_months)


def past_retention(month: dt.date, today: dt.date, retention_months: int) -> bool:
    """Whether ``month`` ends on or before :func:`retention_floor` (it may be archived)."""
    return month_start(month) < retention_floor(today, retention_months)
