"""Monthly, early morning: archive the audit month that just left retention, and apply usage retention;
every tick also finishes any month whose archive stopped half-way. Weekly: the archive files checks alone,
which re-hash every archived object not read in full for 6 days (the monthly runs' checks read only new
or changed objects). The two monthly job + schedule pairs come from one factory, :func:`_monthly`."""

import datetime as dt
from collections.abc import Iterator

import dagster as dg

from perf_pipeline.defs.archive.assets import audit_log_archive, usage_log_retention
from perf_pipeline.defs.archive.checks import (
    audit_log_archive_files_match_manifest,
    usage_log_archive_files_match_manifest,
)
from perf_pipeline.defs.resources import PostgresResource
from perf_pipeline.defs.scheduling import utc_schedule_decorator
from perf_pipeline.defs.time_partitions import AUDIT_ARCHIVE_MONTHS, USAGE_RETENTION_MONTHS
from perf_pipeline.lib.archive import UNFINISHED, list_manifest
from perf_pipeline.lib.calendar import add_months

#: the newest eligible month plus this many before it: a missed or failed month is retried next time
CATCH_UP_MONTHS = 2

archive_files_check_job = dg.define_asset_job(
    "archive_files_check_job",
    selection=dg.AssetSelection.checks(
        audit_log_archive_files_match_manifest, usage_log_archive_files_match_manifest
    ),
    description="The archive files checks alone (no archive): every archived object looked up (size, ETag) "
    "and those new, changed or not read in full for 6 days read back and re-hashed.",
)


def _requests(
    context: dg.ScheduleEvaluationContext,
    postgres: PostgresResource,
    table: str,
    partitions: dg.TimeWindowPartitionsDefinition,
) -> Iterator[dg.RunRequest]:
    day = context.scheduled_execution_time.date()
    offered = partitions.get_partition_keys(current_time=context.scheduled_execution_time)
    if not offered:
        return
    newest = dt.date.fromisoformat(offered[-1])
    months = {add_months(newest, -back).isoformat() for back in range(CATCH_UP_MONTHS + 1)}
    with postgres.connection(autocommit=True) as conn:
        unfinished = [m.month for m in list_manifest(conn, table) if m.state in UNFINISHED]
    for month in unfinished:
        if month.isoformat() in offered:
            months.add(month.isoformat())
        else:  # not a key of the archive partitions: only `perf-pipeline archive run` can finish it
            context.log.warning(
                "archive of %s %s stopped half-way but is not one of this asset's months: run "
                "`perf-pipeline archive run %s --table %s` (or restore it)",
                table,
                f"{month:%Y-%m}",
                f"{month:%Y-%m}",
                table,
            )
    for month in sorted(m for m in months if m in offered):
        # the tick's day is in the run_key: Dagster skips a request whose run_key this schedule used before,
        # so a per-month key alone would never retry a failed or interrupted month. Re-requesting an archived
        # month is cheap: archive_partition returns at once for a month in state dropped.
        yield dg.RunRequest(run_key=f"{month}@{day.isoformat()}", partition_key=month)


def _monthly(
    *,
    table: str,
    asset: dg.AssetsDefinition,
    partitions: dg.MonthlyPartitionsDefinition,
    job_name: str,
    job_description: str,
    schedule_name: str,
    cron: str,
    schedule_description: str,
) -> tuple[object, dg.ScheduleDefinition]:
    """``asset``'s job (one month per run) and its monthly schedule, which requests the newest month past
    retention, the :data:`CATCH_UP_MONTHS` before it, and every month of ``table`` whose archive stopped
    half-way (one manifest read per tick)."""
    job = dg.define_asset_job(
        job_name,
        selection=dg.AssetSelection.assets(asset),
        partitions_def=partitions,
        description=job_description,
    )

    @utc_schedule_decorator(job, cron, schedule_description, name=schedule_name)
    def _schedule(
        context: dg.ScheduleEvaluationContext, postgres: PostgresResource
    ) -> Iterator[dg.RunRequest]:
        yield from _requests(context, postgres, table, partitions)

    return job, _schedule


audit_log_archive_job, archive_audit_log = _monthly(
    table="audit_log",
    asset=audit_log_archive,
    partitions=AUDIT_ARCHIVE_MONTHS,
    job_name="audit_log_archive_job",
    job_description="Archive one audit month (detach → Parquet → verify → drop).",
    schedule_name="archive_audit_log",
    cron="30 3 2 * *",
    schedule_description="Monthly on the 2nd at 03:30 UTC (quiet hours): archive the audit month that just "
    "passed PERF_PIPELINE_AUDIT_RETENTION_MONTHS, retry the two before it, and finish every month whose "
    "archive stopped half-way (manifest state detached / exported / verified).",
)
usage_log_retention_job, apply_usage_log_retention = _monthly(
    table="usage_log",
    asset=usage_log_retention,
    partitions=USAGE_RETENTION_MONTHS,
    job_name="usage_log_retention_job",
    job_description="Archive and drop one usage month past retention.",
    schedule_name="apply_usage_log_retention",
    cron="45 3 2 * *",
    schedule_description="Monthly on the 2nd at 03:45 UTC (after the audit archive): archive and drop the usage "
    "month that passed PERF_PIPELINE_USAGE_RETENTION_MONTHS, unless the rollups may still recompute it; retry "
    "the two before it and finish every usage month whose archive stopped half-way.",
)


@utc_schedule_decorator(
    archive_files_check_job,
    "30 4 * * 0",
    "Weekly on Sunday at 04:30 UTC: the archive files checks, which read back and re-hash every "
    "archived object not read in full for 6 days (so each archive is re-hashed about once a week; a damaged "
    "or lost object is found within a week even when no archive runs).",
)
def rehash_archive_files(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
    return dg.RunRequest(run_key=context.scheduled_execution_time.date().isoformat())
