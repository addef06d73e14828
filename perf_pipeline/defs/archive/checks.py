"""Each archived month's file still matches its manifest row (exists, size, ETag; sha256 and row count when
new, changed or due for its weekly re-hash), and no month's archive stopped half-way (its table detached,
rows invisible). One factory, :func:`_files_check`, makes ``<table>_archive_files_match_manifest`` for each
archived table. ``archive_files_check_job`` runs them alone; its weekly schedule is the re-hash."""

import dagster as dg

from perf_pipeline.defs.archive.assets import audit_log_archive, usage_log_retention
from perf_pipeline.defs.resources import PostgresResource
from perf_pipeline.lib.archive import verify_archives


def _files_check(asset: dg.AssetsDefinition, table: str) -> dg.AssetChecksDefinition:
    """``<table>_archive_files_match_manifest`` on ``asset``: :func:`verify_archives` of ``table`` (one HEAD
    per archive, plus a full read of each object new, changed or due)."""
    noun = table.removesuffix("_log")

    @dg.asset_check(
        asset=asset,
        name=f"{table}_archive_files_match_manifest",
        description=f"Every archived {noun} month's Parquet file exists with its manifest size and ETag, and is "
        "read back in full (sha256, row count) when new, changed, or not read in full for 6 days (the weekly "
        "rehash_archive_files); fails too for a month whose archive stopped half-way (detached, exported "
        "or verified: its rows are invisible until it is archived again or restored).",
    )
    def _check(postgres: PostgresResource) -> dg.AssetCheckResult:
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

    return _check


audit_log_archive_files_match_manifest = _files_check(audit_log_archive, "audit_log")
usage_log_archive_files_match_manifest = _files_check(usage_log_retention, "usage_log")
