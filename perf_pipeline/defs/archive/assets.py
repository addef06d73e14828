"""``audit_log_archive`` and ``usage_log_retention``: one monthly key ↔ one month leaving the database.

A key is materialized only when its month was actually archived (or was already): months still within
retention, or usage months the rollups may still recompute, yield no materialization and say why in
the log. The work and its resumability live in :mod:`perf_pipeline.lib.archive`.
"""

import datetime as dt
from collections.abc import Iterator

import dagster as dg

from perf_pipeline.defs.resources import PostgresResource
from perf_pipeline.lib.archive import (
    ArchiveResult,
    archive_eligible,
    archive_partition,
    usage_retention_decision,
)
from perf_pipeline.lib.partitioning import FIRST_MONTH
from perf_pipeline.settings import get_settings

#: completed months only: the current month is never archived
ARCHIVE_PARTITIONS = dg.MonthlyPartitionsDefinition(start_date=FIRST_MONTH.isoformat(), timezone="UTC")


def _result(result: ArchiveResult) -> dg.MaterializeResult:
    return dg.MaterializeResult(
        metadata={
            "rows": result.rows,
            "bytes": result.bytes,
            "duration_ms": result.duration_ms,
            "state": result.state,
            "detach_mode": result.detach_mode or "",
            "steps_run": ", ".join(result.steps_run) or "none (already archived)",
            "sha256": result.sha256 or "",
            "file": dg.MetadataValue.path(result.file_path or ""),
            "etag": result.etag or "",
            **{f"{step}_ms": ms for step, ms in result.step_ms.items()},
        }
    )


@dg.asset(
    partitions_def=ARCHIVE_PARTITIONS,
    pool="postgres_heavy",
    output_required=False,
    group_name="archive",
    kinds={"postgres", "parquet"},
    description="Audit months older than PERF_PIPELINE_AUDIT_RETENTION_MONTHS: detach → COPY to zstd Parquet under "
    "PERF_PIPELINE_ARCHIVE_DIR (a folder or an s3:// prefix) → verify, read back from the store (size, sha256, "
    "schema, rows, min/max) → drop, each step recorded in archive_manifest; re-running a key finishes an "
    "interrupted archive and never archives a month twice.",
)
def audit_log_archive(
    context: dg.AssetExecutionContext, postgres: PostgresResource
) -> Iterator[dg.MaterializeResult]:
    settings = get_settings()
    month = context.partition_time_window.start.date()
    today = dt.datetime.now(dt.UTC).date()
    if not archive_eligible(month, today, settings.audit_retention_months):
        context.log.info("%s is within retention (%d months): kept", month, settings.audit_retention_months)
        return
    with postgres.connection(autocommit=True) as conn:
        result = archive_partition(conn, "audit_log", month, settings.archive_dir)
    if result.state == "absent":
        context.log.info("no audit_log partition for %s: nothing to archive", month)
        return
    yield _result(result)


@dg.asset(
    partitions_def=ARCHIVE_PARTITIONS,
    pool="postgres_heavy",
    output_required=False,
    group_name="archive",
    kinds={"postgres", "parquet"},
    description="Usage months older than PERF_PIPELINE_USAGE_RETENTION_MONTHS, outside the rollups' 90-day window and "
    "with every day rolled up after its data: archived like audit_log_archive, then dropped.",
)
def usage_log_retention(
    context: dg.AssetExecutionContext, postgres: PostgresResource
) -> Iterator[dg.MaterializeResult]:
    settings = get_settings()
    month = context.partition_time_window.start.date()
    today = dt.datetime.now(dt.UTC).date()
    with postgres.connection(autocommit=True) as conn:
        decision = usage_retention_decision(conn, month, today, settings.usage_retention_months)
        if not decision.drop:
            context.log.info("usage_log %s kept: %s", month, decision.reason)
            return
        result = archive_partition(conn, "usage_log", month, settings.archive_dir)
    if result.state == "absent":
        context.log.info("no usage_log partition for %s: nothing to drop", month)
        return
    context.log.info("usage_log %s archived and dropped: %s", month, decision.reason)
    yield _result(result)
