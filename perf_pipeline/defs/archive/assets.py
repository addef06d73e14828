"""``audit_log_archive`` and ``usage_log_retention``: one monthly key ↔ one month leaving the database.

Only months past their retention are keys at all (defs/time_partitions.py): a month still kept online is
not offered. A key materializes when its month is archived (detach → Parquet → verify → drop, resumable,
:mod:`perf_pipeline.lib.archive`); a month that cannot go fails its run with the reason (a usage month
whose days are not all rolled up after their data, a month with nothing to archive), never a green run
that did nothing. Months archived outside Dagster (the CLI) are shown as archived, and restored months
as not, by the ``observe_platform_tables`` sensor. Both assets come from one factory,
:func:`_archive_asset`; they differ in which months may go (:data:`Decide`).
"""

import datetime as dt
from collections.abc import Callable, Sequence

import dagster as dg
import psycopg

from perf_pipeline.defs.resources import PostgresResource, SettingsResource
from perf_pipeline.defs.time_partitions import AUDIT_ARCHIVE_MONTHS, USAGE_RETENTION_MONTHS
from perf_pipeline.lib.archive import (
    ArchiveResult,
    RetentionDecision,
    archive_partition,
    usage_retention_decision,
)
from perf_pipeline.lib.rollups import LOOKBACK_DAYS
from perf_pipeline.settings import Settings

#: whether a month (past retention: it is a key) may be archived now, and why; reads the database if needed
Decide = Callable[[psycopg.Connection, dt.date, Settings], RetentionDecision]


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


def _archive_asset(
    *,
    name: str,
    table: str,
    partitions_def: dg.MonthlyPartitionsDefinition,
    deps: Sequence[dg.AssetDep],
    description: str,
    decide: Decide,
    kept_hint: str = "",
) -> dg.AssetsDefinition:
    """The archive asset of ``table``: a key's run asks ``decide`` whether its month may go (a refusal fails
    the run with the reason and ``kept_hint``), then archives it (:func:`archive_partition`, on the same
    autocommit connection). A month with no partition and no archive fails the run too."""

    @dg.asset(
        name=name,
        partitions_def=partitions_def,
        pool="postgres_heavy",
        group_name="archive",
        kinds={"postgres", "parquet"},
        deps=list(deps),
        description=description,
    )
    def _asset(
        context: dg.AssetExecutionContext, postgres: PostgresResource, settings: SettingsResource
    ) -> dg.MaterializeResult:
        month = context.partition_time_window.start.date()
        config = settings.get()
        with postgres.connection(autocommit=True) as conn:
            decision = decide(conn, month, config)
            if not decision.drop:
                raise dg.Failure(
                    description=f"{table} {month:%Y-%m} kept: {decision.reason}.{kept_hint}",
                    allow_retries=False,
                )
            result = archive_partition(conn, table, month, config.archive_dir)
        if result.state == "absent":
            raise dg.Failure(
                description=f"{table} {month:%Y-%m}: no partition and no archive of this month: nothing to archive",
                allow_retries=False,
            )
        context.log.info("%s %s: %s (%s)", table, f"{month:%Y-%m}", result.state, decision.reason)
        return _result(result, decision.reason)

    return _asset


def _past_audit_retention(conn: psycopg.Connection, month: dt.date, settings: Settings) -> RetentionDecision:
    """Every key of the audit archive may go: its month is past retention (the keys stop there)."""
    return RetentionDecision(True, f"past {settings.audit_retention_months} months of retention")


def _usage_may_go(conn: psycopg.Connection, month: dt.date, settings: Settings) -> RetentionDecision:
    """:func:`usage_retention_decision` for today (UTC); one grouped read of the month."""
    today = dt.datetime.now(dt.UTC).date()
    return usage_retention_decision(conn, month, today, settings.usage_retention_months)


audit_log_archive = _archive_asset(
    name="audit_log_archive",
    table="audit_log",
    partitions_def=AUDIT_ARCHIVE_MONTHS,
    deps=[dg.AssetDep("audit_log", partition_mapping=dg.IdentityPartitionMapping())],
    description="Audit months past PERF_PIPELINE_AUDIT_RETENTION_MONTHS: detach → COPY to zstd Parquet under "
    "PERF_PIPELINE_ARCHIVE_DIR (a folder or an s3:// prefix) → verify, read back from the store (size, sha256, "
    "schema, rows, min/max) → drop, each step recorded in archive_manifest; re-running a key finishes an "
    "interrupted archive (re-proving the file before any drop) and never archives a month twice.",
    decide=_past_audit_retention,
)

usage_log_retention = _archive_asset(
    name="usage_log_retention",
    table="usage_log",
    partitions_def=USAGE_RETENTION_MONTHS,
    deps=[
        dg.AssetDep("usage_log", partition_mapping=dg.AllPartitionMapping()),
        # a month goes only after its days are rolled up: the rollup keeps their numbers
        dg.AssetDep("usage_daily_metrics", partition_mapping=dg.TimeWindowPartitionMapping()),
    ],
    description="Usage months past PERF_PIPELINE_USAGE_RETENTION_MONTHS, outside the rollups' "
    f"{LOOKBACK_DAYS}-day window "
    "and with every day rolled up after its data and no late-data mark pending: archived like "
    "audit_log_archive, then dropped. A month that may not go yet fails its run with the days to roll up.",
    decide=_usage_may_go,
    kept_hint=" Roll those days up (materialize usage_daily_metrics for them), then run this month again.",
)
