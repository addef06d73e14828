"""`export_job`: one run exports one `data_export` request (run config carries the request id).

The op is thin: it calls :func:`perf_pipeline.lib.exports.run_export`, logs progress, and records rows,
bytes, duration and throughput on the `data_export_files` asset so the UI plots every export's cost.
It declares the `exports` pool, whose limit (PERF_PIPELINE_EXPORT_CONCURRENCY, default 2) caps how many
exports scan the database at once, whatever the number of pending requests.

Crash recovery is Dagster's run retries (``run_retries`` in dagster.yaml, opted into by the job's tags):

* The job runs its one step **in the run worker's process** (``in_process_executor``). With the default
  multiprocess executor the step ran in a child process that outlived a SIGKILLed run worker: the orphan
  kept its PostgreSQL session, hence the request's advisory lock, so the automatic retry failed at once
  with "being run by another process" (a step failure, which is not retried) while the orphan finished the
  export under a run already marked failed. In process, killing the run worker kills the export, its
  session ends, and the lock is free for the retry.
* A run whose worker died is marked failed by the code server without a step failure, so the run-retry
  daemon re-executes it (``dagster/max_retries`` 1); a run that failed inside the op (bad request, COPY
  error, timeout) is a step failure and is not retried (``dagster/retry_on_asset_or_op_failure`` false):
  run_export already recorded why on the request.
* The retry exports the same request (same run config): it waits for the request's lock if an earlier
  attempt still holds it, returns the recorded result if that attempt finished, and otherwise claims the
  request and replaces any earlier file atomically, so a request is never exported twice nor lost.
* A lost PostgreSQL connection (the server restarting) is not a reason to give up: the step is retried in
  the same run (``RetryRequested``, TRANSIENT_RETRIES × TRANSIENT_RETRY_WAIT_S); a statement timeout is.
* Whatever Dagster does or fails to do (a retry that never launches, a run worker killed with no retry
  left, an ``export run`` killed on the command line), `pending_exports_sensor` re-queues a ``running``
  request whose worker is gone (its advisory lock free) after a grace period, or fails it after
  MAX_ATTEMPTS claims (sensors.py): no request stays ``running`` without a process.
"""

import dagster as dg
import psycopg

from perf_pipeline.defs.resources import PostgresResource, SettingsResource
from perf_pipeline.lib.exports import (
    ExportBusyError,
    ExportRequestError,
    Progress,
    retention_months_from,
    run_export,
)
from perf_pipeline.lib.storage import StorageError

#: run tag naming the request a run exports (read by the run-failure sensors)
REQUEST_TAG = "perf_pipeline/export_request"
#: a lost or refused PostgreSQL connection (server restart, failover) retries the step in the same run
#: this many times, this many seconds apart; a statement timeout or cancel (QueryCanceled) is not retried
TRANSIENT_RETRIES = 2
TRANSIENT_RETRY_WAIT_S = 10.0

data_export_files = dg.AssetSpec(
    "data_export_files",
    group_name="exports",
    deps=["data_export"],
    description="Files written by export runs under PERF_PIPELINE_EXPORT_DIR (a folder or an s3:// prefix); one "
    "materialization per finished export (rows, bytes, duration_ms, mb_per_s, sha256, ETag).",
    kinds={"postgres", "file"},
)


class ExportRequestConfig(dg.Config):
    request_id: int


@dg.op(
    pool="exports",
    description="Stream one export request to its file (COPY … TO STDOUT → csv.gz or parquet), atomically.",
)
def run_data_export(
    context: dg.OpExecutionContext,
    config: ExportRequestConfig,
    postgres: PostgresResource,
    settings: SettingsResource,
) -> None:
    cfg = settings.get()

    def progress(p: Progress) -> None:
        context.log.info(
            f"export {config.request_id}: {p.rows:,} rows, {p.csv_bytes / 1e6:,.1f} MB of CSV "
            f"in {p.seconds:.1f} s"
        )

    def waiting() -> None:
        context.log.warning(
            f"export request {config.request_id} is held by another process (an earlier attempt still "
            f"ending?); waiting up to {cfg.export_statement_timeout_s} s for it"
        )

    try:
        result = run_export(
            postgres.url,
            config.request_id,
            cfg.export_dir,
            statement_timeout_s=cfg.export_statement_timeout_s,
            retention_months=retention_months_from(cfg),
            run_id=context.run_id,
            progress=progress,
            max_mb_per_s=cfg.export_max_mb_s,
            # a live attempt's COPY ends within statement_timeout; after that the holder is stuck
            lock_wait_s=cfg.export_statement_timeout_s,
            on_lock_wait=waiting,
        )
    except ExportRequestError as exc:
        # the request is already marked failed with this message; retrying the run cannot help
        raise dg.Failure(
            description=f"export request {config.request_id} rejected: {exc}", allow_retries=False
        ) from exc
    except ExportBusyError as exc:
        # still held after the wait: the holder records its own outcome on the request
        raise dg.Failure(description=str(exc), allow_retries=False) from exc
    except StorageError as exc:
        # the export location is unusable (names PERF_PIPELINE_EXPORT_DIR); nothing was claimed or written:
        # the failure sensor marks the request failed with this message
        raise dg.Failure(description=str(exc), allow_retries=False) from exc
    except psycopg.OperationalError as exc:
        if isinstance(exc, psycopg.errors.QueryCanceled):  # statement_timeout or a cancel: recorded, final
            raise
        context.log.warning(
            f"export request {config.request_id}: PostgreSQL connection error, retrying: {exc}"
        )
        raise dg.RetryRequested(
            max_retries=TRANSIENT_RETRIES, seconds_to_wait=TRANSIENT_RETRY_WAIT_S
        ) from exc
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
                "path": dg.MetadataValue.path(result.uri),
                "etag": result.etag or "",
            },
        )
    )


@dg.job(
    description="Export one data_export request (launched by pending_exports_sensor, run_key = request id, "
    "plus the attempt when re-queued).",
    # A run whose process died (killed, OOM) is retried once by the run-retry daemon (run_retries enabled
    # in dagster.yaml); a run that failed inside the op (bad request, timeout) is not: it recorded why.
    tags={"dagster/max_retries": "1", "dagster/retry_on_asset_or_op_failure": "false"},
    # the step runs in the run worker itself, so a killed run worker leaves no orphaned step process
    # holding the request (see the module docstring)
    executor_def=dg.in_process_executor,
)
def export_job() -> None:
    run_data_export()
