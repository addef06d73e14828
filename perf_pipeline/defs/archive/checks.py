"""Each archived month's file still matches its manifest row (exists, size, ETag; sha256 and row count when
new, changed or due for its weekly re-hash), and no month's archive stopped half-way (its table detached,
rows invisible). ``archive_files_check_job`` runs both checks alone; its weekly schedule is the re-hash."""

import dagster as dg

from perf_pipeline.defs.archive.assets import audit_log_archive, usage_log_retention
from perf_pipeline.defs.resources import PostgresResource
from perf_pipeline.lib.archive import verify_archives


def _check(postgres: PostgresResource, table: str) -> dg.AssetCheckResult:
    with postgres.connection(autocommit=True) as conn:
        report = verify_archives(conn, table)
    bad = "\n".join(f"- `{name}`: {problem}" for name, problem in sorted(report.problems.items()))
    return dg.AssetCheckResult(
        passed=not report.problems,
        metadata={
            "files_ok": len(report.ok),
            "files_bad": len(report.problems),
            "files_read_in_full": len(report.read_in_full),
            "files_checked_by_etag": len(report.ok) - len(report.read_in_full),
            "threshold": 0,
            "problems": dg.MetadataValue.md(bad or "_none_"),
        },
    )


@dg.asset_check(
    asset=audit_log_archive,
    name="audit_log_archive_files_match_manifest",
    description="Every archived audit month's Parquet file exists with its manifest size and ETag, and is read "
    "back in full (sha256, row count) when new, changed, or not read in full for 6 days (the weekly "
    "archive_files_weekly_rehash); fails too for a month whose archive stopped half-way (detached, exported "
    "or verified: its rows are invisible until it is archived again or restored).",
)
def audit_log_archive_files_match_manifest(postgres: PostgresResource) -> dg.AssetCheckResult:
    return _check(postgres, "audit_log")


@dg.asset_check(
    asset=usage_log_retention,
    name="usage_log_archive_files_match_manifest",
    description="Every archived usage month's Parquet file exists with its manifest size and ETag, and is read "
    "back in full (sha256, row count) when new, changed, or not read in full for 6 days (the weekly "
    "archive_files_weekly_rehash); fails too for a month whose archive stopped half-way (detached, exported "
    "or verified: its rows are invisible until it is archived again or restored).",
)
def usage_log_archive_files_match_manifest(postgres: PostgresResource) -> dg.AssetCheckResult:
    return _check(postgres, "usage_log")
