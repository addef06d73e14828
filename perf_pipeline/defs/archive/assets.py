"""``audit_log_archive`` and ``usage_log_retention``: one monthly key ↔ one month leaving the database.

Only months past their retention are keys at all (defs/time_partitions.py): a month still kept online is
not offered. A key materializes when its month is archived (detach → Parquet → verify → drop, resumable,
:mod:`perf_pipeline.lib.archive`); a month that cannot go fails its run with the reason (a usage month
whose days are not all rolled up after their data, a month with nothing to archive), never a green run
that did nothing. Months archived outside Dagster (the CLI) are shown as archived, and restored months
as not, by the ``observe_platform_tables`` sensor.
"""

import datetime as dt

import dagster as dg

from perf_pipeline.defs.resources import PostgresResource
from perf_pipeline.defs.time_partitions import AUDIT_ARCHIVE_MONTHS, USAGE_RETENTION_MONTHS
from perf_pipeline.lib.archive import ArchiveResult, archive_partition, usage_retention_decision
from perf_pipeline.settings import get_settings


def _result(result: ArchiveResult, why: str) -> dg.MaterializeResult:
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": dg.MetadataValue.int(result.rows),
            "dagster/size_bytes": dg.MetadataValue.int(result.bytes),
            "state": result.state,
            "steps_run": ", ".join(result.steps_run) or "none (archived before)",
            "detach_mode": result.detach_mode or "",
            "sha256": result.sha256 or "",
            "file": dg.MetadataValue.path(result.file_path or ""),
            "etag": result.etag or "",
            "why": why,
            "duration_ms": round(result.duration_ms, 1),
            **{f"step_ms.{step}": round(ms, 1) for step, ms in result.step_ms.items()},
        }
    )


def _archive(
    context: dg.AssetExecutionContext, postgres: PostgresResource, table: str, why: str
) -> ArchiveResult:
    month = context.partition_time_window.start.date()
    with postgres.connection(autocommit=True) as conn:
        result = archive_partition(conn, table, month, get_settings().archive_dir)
    if result.state == "absent":
        raise dg.Failure(
            description=f"{table} {month:%Y-%m}: no partition and no archive of this month: nothing to archive",
            allow_retries=False,
        )
    context.log.info("%s %s: %s (%s)", table, f"{month:%Y-%m}", result.state, why)
    return result


@dg.asset(
    partitions_def=AUDIT_ARCHIVE_MONTHS,
    pool="postgres_heavy",
    group_name="archive",
    kinds={"postgres", "parquet"},
    deps=[dg.AssetDep("audit_log", partition_mapping=dg.IdentityPartitionMapping())],
    description="Audit months past PERF_PIPELINE_AUDIT_RETENTION_MONTHS: detach → COPY to zstd Parquet under "
    "PERF_PIPELINE_ARCHIVE_DIR (a folder or an s3:// prefix) → verify, read back from the store (size, sha256, "
    "schema, rows, min/max) → drop, each step recorded in archive_manifest; re-running a key finishes an "
    "interrupted archive (re-proving the file before any drop) and never archives a month twice.",
)
def audit_log_archive(context: dg.AssetExecutionContext, postgres: PostgresResource) -> dg.MaterializeResult:
    retention = get_settings().audit_retention_months
    why = f"past {retention} months of retention"
    return _result(_archive(context, postgres, "audit_log", why), why)


@dg.asset(
    partitions_def=USAGE_RETENTION_MONTHS,
    pool="postgres_heavy",
    group_name="archive",
    kinds={"postgres", "parquet"},
    deps=[
        dg.AssetDep("usage_log", partition_mapping=dg.AllPartitionMapping()),
        # a month goes only after its days are rolled up: the rollup keeps their numbers
        dg.AssetDep("usage_daily_metrics", partition_mapping=dg.TimeWindowPartitionMapping()),
    ],
    description="Usage months past PERF_PIPELINE_USAGE_RETENTION_MONTHS, outside the rollups' 90-day window "
    "and with every day rolled up after its data and no late-data mark pending: archived like "
    "audit_log_archive, then dropped. A month that may not go yet fails its run with the days to roll up.",
)
def usage_log_retention(
    context: dg.AssetExecutionContext, postgres: PostgresResource
) -> dg.MaterializeResult:
    settings = get_settings()
    month = context.partition_time_window.start.date()
    with postgres.connection(autocommit=True) as conn:
        decision = usage_retention_decision(
            conn, month, dt.datetime.now(dt.UTC).date(), settings.usage_retention_months
        )
    if not decision.drop:
        raise dg.Failure(
            description=f"usage_log {month:%Y-%m} kept: {decision.reason}. Roll those days up (materialize "
            "usage_daily_metrics for them), then run this month again.",
            allow_retries=False,
        )
    return _result(_archive(context, postgres, "usage_log", decision.reason), decision.reason)
