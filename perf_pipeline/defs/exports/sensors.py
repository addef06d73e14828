"""Sensors of the export area: launch pending requests once each; fail requests whose run died.

`pending_exports_sensor` reads the oldest pending requests (partial index on status = 'pending'),
validates each (cheap, no I/O): an invalid request is marked `failed` with the reason and gets no run; a
valid one gets one `export_job` run with `run_key` = request id, so Dagster itself never launches a
request twice. The cursor also remembers the ids launched and still pending (runs queued behind the
`exports` pool), so a tick does not yield them again. One bad row never fails the tick.

`export_run_failure_sensor` leaves alone a failed run that Dagster's run-retry daemon will re-execute
(tag ``dagster/will_retry`` = true, set when the failure is stored: a killed run worker): the request stays
``running`` and the retry claims it. When a run that will not be retried fails or is canceled, the request
is marked ``failed`` if it is still claimed by that run or by a run it re-executes.
"""

import datetime as dt
import json

import dagster as dg

from perf_pipeline.defs.exports.jobs import REQUEST_TAG, export_job
from perf_pipeline.defs.resources import PostgresResource
from perf_pipeline.lib.exports import (
    ExportRequestError,
    mark_failed,
    mark_run_ended,
    pending_requests,
    retention_months_from,
    validate_request,
)
from perf_pipeline.settings import get_settings

#: pending requests read per tick: bounds the tick's time and the cursor's size
MAX_REQUESTS_PER_TICK = 200


def export_run_request(request_id: int, kind: str) -> dg.RunRequest:
    return dg.RunRequest(
        run_key=str(request_id),
        run_config={"ops": {"run_data_export": {"config": {"request_id": request_id}}}},
        tags={REQUEST_TAG: str(request_id), "perf_pipeline/export_kind": kind},
    )


@dg.sensor(
    job=export_job,
    minimum_interval_seconds=15,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Every 15 s: one export_job run per new pending data_export request (run_key = request id); "
    "invalid requests are marked failed without a run.",
)
def pending_exports_sensor(
    context: dg.SensorEvaluationContext, postgres: PostgresResource
) -> dg.SensorResult:
    cursor = json.loads(context.cursor) if context.cursor else {}
    launched: set[int] = set(cursor.get("launched", []))
    settings = get_settings()
    retention = retention_months_from(settings)
    today = dt.datetime.now(dt.UTC).date()
    runs: list[dg.RunRequest] = []
    rejected: list[int] = []
    with postgres.connection(autocommit=True) as conn:
        rows = pending_requests(conn, MAX_REQUESTS_PER_TICK)
        for request_id, kind, fmt, filters, _requested_at in rows:
            if request_id in launched:
                continue
            try:
                validate_request(request_id, kind, fmt, filters, today=today, retention_months=retention)
            except ExportRequestError as exc:
                if mark_failed(conn, request_id, str(exc), statuses=("pending",)):
                    rejected.append(request_id)
                context.log.warning(f"export request {request_id} rejected: {exc}")
                continue
            runs.append(export_run_request(request_id, kind))
            launched.add(request_id)
    # keep only ids still pending: a request that started (or was rejected) never comes back as pending,
    # and if someone resets it by hand, Dagster's run_key dedupe still refuses a second run
    still_pending = {row[0] for row in rows}
    new_cursor = json.dumps({"launched": sorted(launched & still_pending)})
    skip = None if runs else f"no new pending export requests ({len(rejected)} rejected)"
    return dg.SensorResult(run_requests=runs, cursor=new_cursor, skip_reason=skip)


#: set by Dagster on a failed run when run retries are enabled: "true" if the run-retry daemon will
#: re-execute it (dagster._core.storage.tags.WILL_RETRY_TAG)
WILL_RETRY_TAG = "dagster/will_retry"


def _request_id(run: dg.DagsterRun) -> int | None:
    raw = run.tags.get(REQUEST_TAG)
    return int(raw) if raw and raw.isdigit() else None


def _lineage(run: dg.DagsterRun) -> list[str]:
    """The run and the runs it re-executes (an automatic retry's parent and root)."""
    return list(dict.fromkeys(r for r in (run.run_id, run.parent_run_id, run.root_run_id) if r))


def will_be_retried(instance: dg.DagsterInstance, run: dg.DagsterRun) -> bool:
    """True when the run-retry daemon will re-execute this failed run (read from the stored run, whose tag
    is written right after the failure event)."""
    stored = instance.get_run_by_id(run.run_id) or run
    return stored.tags.get(WILL_RETRY_TAG, "").lower() == "true"


@dg.run_failure_sensor(
    monitored_jobs=[export_job],
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="When an export run fails and will not be retried automatically, mark its request failed so "
    "it does not stay 'running' (a killed run worker's run is retried: its request is left to the retry).",
)
def export_run_failure_sensor(context: dg.RunFailureSensorContext, postgres: PostgresResource) -> None:
    run = context.dagster_run
    request_id = _request_id(run)
    if request_id is None:
        return
    if will_be_retried(context.instance, run):
        context.log.info(f"run {run.run_id} will be retried automatically; request {request_id} left to it")
        return
    message = context.failure_event.message or "run failed"
    with postgres.connection(autocommit=True) as conn:
        mark_run_ended(conn, request_id, _lineage(run), f"Dagster run {run.run_id} failed: {message}")


@dg.run_status_sensor(
    run_status=dg.DagsterRunStatus.CANCELED,
    monitored_jobs=[export_job],
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="When an export run is canceled (even while queued), mark its request failed: its run_key "
    "is spent, so the pending sensor would never launch it again.",
)
def export_run_canceled_sensor(context: dg.RunStatusSensorContext, postgres: PostgresResource) -> None:
    request_id = _request_id(context.dagster_run)
    if request_id is None:
        return
    with postgres.connection(autocommit=True) as conn:
        mark_run_ended(
            conn,
            request_id,
            _lineage(context.dagster_run),
            f"Dagster run {context.dagster_run.run_id} was canceled",
        )
