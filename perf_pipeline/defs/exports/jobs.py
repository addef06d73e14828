"""`export_job`: one run exports one `data_export` request (run config carries the request id).

The op is thin: it calls :func:`perf_pipeline.lib.exports.run_export`, logs progress, and records rows,
bytes, duration and throughput on the `data_export_files` asset so the UI plots every export's cost.
It declares the `exports` pool, whose limit (PERF_PIPELINE_EXPORT_CONCURRENCY, default 2) caps how many
exports scan the database at once, whatever the number of pending requests.
"""

import dagster as dg

from perf_pipeline.defs.resources import PostgresResource
from perf_pipeline.lib.exports import (
    ExportBusyError,
    ExportRequestError,
    Progress,
    retention_months_from,
    run_export,
)
from perf_pipeline.settings import get_settings

#: run tag naming the request a run exports (read by the run-failure sensors)
REQUEST_TAG = "perf_pipeline/export_request"

data_export_files = dg.AssetSpec(
    "data_export_files",
    group_name="exports",
    description="Files written by export runs under PERF_PIPELINE_EXPORT_DIR; one materialization per "
    "finished export (rows, bytes, duration_ms, mb_per_s, sha256).",
    kinds={"postgres", "file"},
)


class ExportRequestConfig(dg.Config):
    request_id: int


@dg.op(
    pool="exports",
    description="Stream one export request to its file (COPY … TO STDOUT → csv.gz or parquet), atomically.",
)
def run_data_export(
    context: dg.OpExecutionContext, config: ExportRequestConfig, postgres: PostgresResource
) -> None:
    settings = get_settings()

    def progress(p: Progress) -> None:
        context.log.info(
            f"export {config.request_id}: {p.rows:,} rows, {p.csv_bytes / 1e6:,.1f} MB of CSV "
            f"in {p.seconds:.1f} s"
        )

    try:
        result = run_export(
            postgres.url,
            config.request_id,
            settings.export_dir,
            statement_timeout_s=settings.export_statement_timeout_s,
            retention_months=retention_months_from(settings),
            run_id=context.run_id,
            progress=progress,
            max_mb_per_s=settings.export_max_mb_s,
        )
    except ExportRequestError as exc:
        # the request is already marked failed with this message; retrying the run cannot help
        raise dg.Failure(
            description=f"export request {config.request_id} rejected: {exc}", allow_retries=False
        ) from exc
    except ExportBusyError as exc:
        raise dg.Failure(description=str(exc), allow_retries=False) from exc
    context.log_event(
        dg.AssetMaterialization(
            asset_key=data_export_files.key,
            description=f"export request {result.request_id}",
            metadata={
                "request_id": result.request_id,
                "rows": result.rows,
                "bytes": result.bytes,
                "csv_bytes": result.csv_bytes,
                "duration_ms": result.seconds * 1000,
                "mb_per_s": result.mb_per_s,
                "sha256": result.sha256,
                "path": dg.MetadataValue.path(str(result.path)),
            },
        )
    )


@dg.job(
    description="Export one data_export request (launched by pending_exports_sensor, run_key = request id).",
    # A run whose process died (killed, OOM) is retried once if the instance enables run retries; a run
    # that failed inside the op (bad request, timeout) is not: it already recorded why.
    tags={"dagster/max_retries": "1", "dagster/retry_on_asset_or_op_failure": "false"},
)
def export_job() -> None:
    run_data_export()
