"""Monthly, early morning: archive the audit month that just left retention, and apply usage retention."""

import datetime as dt
from collections.abc import Iterator

import dagster as dg

from perf_pipeline.defs.archive.assets import ARCHIVE_PARTITIONS, audit_log_archive, usage_log_retention
from perf_pipeline.lib.partitioning import FIRST_MONTH, add_months, month_start
from perf_pipeline.settings import get_settings

#: the newest eligible month plus this many before it: a missed or failed month is retried next time
CATCH_UP_MONTHS = 2

audit_archive_job = dg.define_asset_job(
    "audit_log_archive_job",
    selection=dg.AssetSelection.assets(audit_log_archive),
    partitions_def=ARCHIVE_PARTITIONS,
    description="Archive one audit month (detach → Parquet → verify → drop).",
)
usage_retention_job = dg.define_asset_job(
    "usage_log_retention_job",
    selection=dg.AssetSelection.assets(usage_log_retention),
    partitions_def=ARCHIVE_PARTITIONS,
    description="Archive and drop one usage month past retention.",
)


def _requests(day: dt.date, retention_months: int) -> Iterator[dg.RunRequest]:
    newest = add_months(month_start(day), -retention_months - 1)
    for back in range(CATCH_UP_MONTHS, -1, -1):
        month = add_months(newest, -back)
        if month >= FIRST_MONTH:
            # run_key per month: an archived month is never requested twice by this schedule
            yield dg.RunRequest(run_key=month.isoformat(), partition_key=month.isoformat())


@dg.schedule(
    job=audit_archive_job,
    cron_schedule="30 3 2 * *",
    execution_timezone="UTC",
    description="Monthly on the 2nd at 03:30 UTC (quiet hours): archive the audit month that just passed "
    "PERF_PIPELINE_AUDIT_RETENTION_MONTHS, and retry the two before it if they did not finish.",
)
def archive_audit_log_monthly(context: dg.ScheduleEvaluationContext) -> Iterator[dg.RunRequest]:
    yield from _requests(context.scheduled_execution_time.date(), get_settings().audit_retention_months)


@dg.schedule(
    job=usage_retention_job,
    cron_schedule="45 3 2 * *",
    execution_timezone="UTC",
    description="Monthly on the 2nd at 03:45 UTC (after the audit archive): archive and drop the usage month that "
    "passed PERF_PIPELINE_USAGE_RETENTION_MONTHS, unless the rollups may still recompute it.",
)
def usage_log_retention_monthly(context: dg.ScheduleEvaluationContext) -> Iterator[dg.RunRequest]:
    yield from _requests(context.scheduled_execution_time.date(), get_settings().usage_retention_months)
