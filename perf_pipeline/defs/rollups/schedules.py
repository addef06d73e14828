"""Cadence of the usage rollup: today's partial day every 30 minutes (the dashboard's cadence), yesterday
closed at 02:00 UTC (late rows of the evening, committed after midnight, are then in)."""

import datetime as dt

import dagster as dg

from perf_pipeline.defs.rollups.assets import usage_daily_metrics_job
from perf_pipeline.defs.scheduling import utc_schedule_decorator


def _day_of(context: dg.ScheduleEvaluationContext) -> dt.date:
    return context.scheduled_execution_time.astimezone(dt.UTC).date()


@utc_schedule_decorator(
    usage_daily_metrics_job,
    "*/30 * * * *",
    "Every 30 minutes: recompute today's (UTC) partial day of usage_daily_metrics. "
    "Costs one day of usage_log, whatever the history.",
)
def refresh_today_metrics(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
    day = _day_of(context)
    tick = context.scheduled_execution_time.astimezone(dt.UTC)
    return dg.RunRequest(run_key=f"today-{tick:%Y-%m-%dT%H%M}", partition_key=day.isoformat())


@utc_schedule_decorator(
    usage_daily_metrics_job,
    "0 2 * * *",
    "At 02:00 UTC: recompute yesterday's day in full, now that it is over (the 30-minute "
    "refresh last ran before midnight).",
)
def close_yesterday_metrics(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
    day = _day_of(context) - dt.timedelta(days=1)
    return dg.RunRequest(run_key=f"close-{day.isoformat()}", partition_key=day.isoformat())
