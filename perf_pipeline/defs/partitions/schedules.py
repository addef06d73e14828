"""Daily: keep the current month and PERF_PIPELINE_PREMAKE_MONTHS future months created, data or not."""

import dagster as dg
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from perf_pipeline.defs.partitions.assets import (
    MONTHLY_PARTITIONS,
    audit_log_partitions,
    usage_log_partitions,
)
from perf_pipeline.lib.partitioning import months_ahead
from perf_pipeline.settings import get_settings

create_partitions_job = dg.define_asset_job(
    "create_partitions_ahead_job",
    selection=dg.AssetSelection.assets(audit_log_partitions, usage_log_partitions),
    partitions_def=MONTHLY_PARTITIONS,
    description="Create the premake months of audit_log and usage_log and check their DEFAULT partitions.",
)


@dg.schedule(
    job=create_partitions_job,
    cron_schedule="10 0 * * *",
    execution_timezone="UTC",
    description="Daily at 00:10 UTC: one run over the range current month … +PERF_PIPELINE_PREMAKE_MONTHS "
    "(single-run backfill policy), so future months exist before any row needs them, even on days "
    "with no data; also evaluates the *_default_partition_empty checks.",
)
def create_partitions_ahead_daily(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
    day = context.scheduled_execution_time.date()
    months = months_ahead(day, get_settings().premake_months)
    return dg.RunRequest(
        run_key=f"partitions-{day.isoformat()}",
        tags={
            ASSET_PARTITION_RANGE_START_TAG: months[0].isoformat(),
            ASSET_PARTITION_RANGE_END_TAG: months[-1].isoformat(),
        },
    )
