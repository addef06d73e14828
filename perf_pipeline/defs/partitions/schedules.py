"""Daily, per table: keep the current month and PERF_PIPELINE_PREMAKE_MONTHS future months created, data or not."""

import dagster as dg
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from perf_pipeline.defs.partitions.assets import audit_log_partitions, usage_log_partitions
from perf_pipeline.defs.resources import SettingsResource
from perf_pipeline.defs.scheduling import utc_schedule_decorator
from perf_pipeline.defs.time_partitions import TABLE_MONTHS
from perf_pipeline.lib.partitioning import months_ahead


def _create_ahead(table: str, asset: dg.AssetsDefinition, cron: str) -> tuple[object, dg.ScheduleDefinition]:
    partitions = TABLE_MONTHS[table]
    job = dg.define_asset_job(
        f"create_{table}_partitions_ahead_job",
        selection=dg.AssetSelection.assets(asset),
        partitions_def=partitions,
        description=f"Create the premake months of {table} and check its DEFAULT partition and months ahead.",
    )

    @utc_schedule_decorator(
        job,
        cron,
        f"Daily (cron {cron}, UTC): one run over the range current month … +PERF_PIPELINE_PREMAKE_MONTHS of "
        f"{table} (single-run backfill policy), so future months exist before any row needs them, even on days "
        "with no data; also evaluates the DEFAULT and months-ahead checks.",
        name=f"create_{table}_partitions_ahead",
    )
    def _schedule(context: dg.ScheduleEvaluationContext, settings: SettingsResource) -> dg.RunRequest:
        day = context.scheduled_execution_time.date()
        keys = [m.isoformat() for m in months_ahead(day, settings.get().premake_months)]
        # the months ahead must be keys of the dynamic partitions before the run names them (the
        # observe_platform_tables sensor adds them too, every minute)
        missing = [k for k in keys if not context.instance.has_dynamic_partition(partitions.name, k)]
        if missing:
            context.instance.add_dynamic_partitions(partitions.name, missing)
        return dg.RunRequest(
            run_key=f"{table}-partitions-{day.isoformat()}",
            tags={ASSET_PARTITION_RANGE_START_TAG: keys[0], ASSET_PARTITION_RANGE_END_TAG: keys[-1]},
        )

    return job, _schedule


create_audit_log_partitions_ahead_job, create_audit_log_partitions_ahead = _create_ahead(
    "audit_log", audit_log_partitions, "10 0 * * *"
)
create_usage_log_partitions_ahead_job, create_usage_log_partitions_ahead = _create_ahead(
    "usage_log", usage_log_partitions, "12 0 * * *"
)
