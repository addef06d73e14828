"""The daily partitions of the usage rollup: one Dagster partition key per UTC day of `usage_daily_metrics`."""

import datetime as dt

import dagster as dg

#: first day the rollup covers; older usage_log rows (if any) are never rolled up
ROLLUP_START_DATE = "2024-01-01"

# end_offset=1: today (the partial day) is a partition too, refreshed every 30 minutes
daily_partitions = dg.DailyPartitionsDefinition(start_date=ROLLUP_START_DATE, timezone="UTC", end_offset=1)


def first_rollup_day() -> dt.date:
    return dt.date.fromisoformat(ROLLUP_START_DATE)
