"""Sensors of the export area: launch pending requests once each; fail requests whose run died; re-queue
requests whose worker vanished.

`pending_exports_sensor` first sweeps ``running`` requests whose worker is gone (the request's advisory
lock is free: :func:`perf_pipeline.lib.exports.sweep_orphans`): one that stayed so for ORPHAN_GRACE_S is
put back to ``pending`` or, after MAX_ATTEMPTS claims, marked ``failed`` with the reason. That covers an
``export run`` killed on the command line, a run worker killed with no automatic retry to come, and an
automatic retry that never launched (the failed run says ``dagster/will_retry`` = true, so the failure
sensor left the request to it). Then it reads the oldest pending requests (partial index on status =
'pending') and validates each (cheap, no I/O): an invalid request is marked `failed` with the reason and
gets no run; a valid one gets one `export_job` run whose `run_key` is the request id plus its attempt
count once it has been claimed before, so Dagster itself never launches one attempt twice yet a re-queued
request gets a new run. The cursor also remembers the ids launched and still pending (runs queued behind
the `exports` pool), so a tick does not yield them again, and when each orphaned attempt was first seen.
No request can fail the tick: an unexpected error while checking one fails that request with the reason.

`export_run_failure_sensor` leaves alone a failed run that Dagster's run-retry daemon will re-execute
(tag ``dagster/will_retry`` = true, set when the failure is stored: a killed run worker): the request stays
``running`` and the retry claims it (or, if it never comes, the sweep above re-queues it). When a run that
will not be retried fails or is canceled, the request is marked ``failed`` if it is still claimed by that
run or by a run it re-executes, or by none and not claimed since that run was launched.
"""

import datetime as dt
import json
from typing import Any

import dagster as dg

from perf_pipeline.defs.exports.jobs import REQUEST_TAG, export_job
from perf_pipeline.defs.resources import PostgresResource, SettingsResource
from perf_pipeline.lib.exports import (
    ExportRequestError,
    Orphan,
    SweepResult,
    mark_failed,
    mark_run_ended,
    pending_requests,
    retention_months_from,
    sweep_orphans,
    validate_request,
)

#: pending requests read per tick: bounds the tick's time and the cursor's size
MAX_REQUESTS_PER_TICK = 200
#: run tag: the request's attempt count when the run was launched (0 for a new request)
ATTEMPTS_TAG = "perf_pipeline/export_attempts"
#: seconds a ``running`` request's worker must have been gone (its lock free) before the request is
#: re-queued: longer than Dagster takes to notice a dead run worker and launch its automatic retry (run
#: monitoring polls every 30 s) and than a step's retries after a lost connection (2 × 10 s). A request
#: is therefore re-queued or failed at most ~25 s (TCP keepalive, only for a vanished host) + 15 s (tick)
#: + ORPHAN_GRACE_S + 15 s (tick) ≈ 3 minutes after its worker died.
ORPHAN_GRACE_S = 120.0
#: an orphaned request past its grace is left to a newer run of it that Dagster has queued or started (the
#: automatic retry, waiting for an `exports` pool slot) for at most this long, then re-queued anyway
ORPHAN_DEFER_MAX_S = 1800.0
#: claims of one request after which a vanished worker fails it instead of re-queueing it
MAX_ATTEMPTS = 3
#: runs that may still claim a request
_IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


def export_run_request(request_id: int, kind: str, attempts: int = 0) -> dg.RunRequest:
    """The run of one attempt at a request: ``run_key`` is the request id, plus the attempt count once the
    request has been claimed before (a re-queued request), since Dagster launches a run key only once."""
    return dg.RunRequest(
        run_key=str(request_id) if attempts == 0 else f"{request_id}-attempt-{attempts + 1}",
        run_config={"ops": {"run_data_export": {"config": {"request_id": request_id}}}},
        tags={
            REQUEST_TAG: str(request_id),
            "perf_pipeline/export_kind": kind,
            ATTEMPTS_TAG: str(attempts),
        },
    )


def _load_cursor(raw: str | None) -> dict[str, Any]:
    try:
        cursor = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return cursor if isinstance(cursor, dict) else {}


def newer_run_in_flight(instance: dg.DagsterInstance, orphan: Orphan) -> bool:
    """True if Dagster has a run of this request queued or running other than the one that claimed it
    (and died): an automatic retry on its way, which will claim the request itself."""
    runs = instance.get_runs(
        dg.RunsFilter(tags={REQUEST_TAG: str(orphan.request_id)}, statuses=_IN_FLIGHT), limit=20
    )
    return any(run.run_id != orphan.run_id for run in runs)


@dg.sensor(
    job=export_job,
    minimum_interval_seconds=15,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Every 15 s: one export_job run per new pending data_export request (run_key = request id, "
    "plus the attempt when re-queued); invalid requests are marked failed without a run; running requests "
    f"whose worker is gone are re-queued, or failed after {MAX_ATTEMPTS} attempts.",
)
def pending_exports_sensor(
    context: dg.SensorEvaluationContext, postgres: PostgresResource, settings: SettingsResource
) -> dg.SensorResult:
    cursor = _load_cursor(context.cursor)
    launched: set[int] = {i for i in cursor.get("launched", []) if isinstance(i, int)}
    orphans_seen = cursor.get("orphans", {})
    retention = retention_months_from(settings.get())
    today = dt.datetime.now(dt.UTC).date()
    runs: list[dg.RunRequest] = []
    rejected: list[int] = []
    with postgres.connection(autocommit=True) as conn:
        try:
            sweep = sweep_orphans(
                conn,
                orphans_seen if isinstance(orphans_seen, dict) else {},
                grace_s=ORPHAN_GRACE_S,
                max_attempts=MAX_ATTEMPTS,
                defer=lambda orphan: newer_run_in_flight(context.instance, orphan),
                defer_max_s=ORPHAN_DEFER_MAX_S,
            )
        except Exception as exc:  # the sweep must never keep pending requests from being launched
            context.log.error(f"could not look for exports whose worker is gone: {type(exc).__name__}: {exc}")
            sweep = SweepResult(seen=orphans_seen if isinstance(orphans_seen, dict) else {})
        for request_id in sweep.requeued:
            context.log.warning(f"export request {request_id}: its worker is gone; queued again")
        for request_id in sweep.failed:
            context.log.warning(f"export request {request_id}: its worker is gone again; failed")
        for request_id, message in sweep.errors:
            context.log.error(f"export request {request_id}: could not re-queue it: {message[:500]}")
        launched -= set(sweep.requeued)  # pending again: a new attempt, launched below
        rows = pending_requests(conn, MAX_REQUESTS_PER_TICK)
        for req in rows:
            if req.id in launched:
                continue
            try:
                validate_request(
                    req.id, req.kind, req.format, req.filters, today=today, retention_months=retention
                )
            except ExportRequestError as exc:
                if mark_failed(conn, req.id, str(exc), statuses=("pending",)):
                    rejected.append(req.id)
                context.log.warning(f"export request {req.id} rejected: {exc}")
                continue
            except Exception as exc:  # a bug, not a bad value: fail this request with why, go on
                message = f"the request could not be checked: {type(exc).__name__}: {exc}"[:500]
                if mark_failed(conn, req.id, message, statuses=("pending",)):
                    rejected.append(req.id)
                context.log.error(f"export request {req.id}: {message}")
                continue
            runs.append(export_run_request(req.id, req.kind, req.attempts))
            launched.add(req.id)
    # keep only ids still pending: a request that started (or was rejected) never comes back as pending
    # unless the sweep re-queues it (then it is dropped from `launched` above and gets a new run key); if
    # someone resets one by hand, Dagster's run_key dedupe refuses a second run of the same attempt
    still_pending = {row.id for row in rows}
    new_cursor = json.dumps({"launched": sorted(launched & still_pending), "orphans": sweep.seen})
    skip = None if runs else f"no new pending export requests ({len(rejected)} rejected)"
    return dg.SensorResult(run_requests=runs, cursor=new_cursor, skip_reason=skip)


#: set by Dagster on a failed run when run retries are enabled: "true" if the run-retry daemon will
#: re-execute it (dagster._core.storage.tags.WILL_RETRY_TAG)
WILL_RETRY_TAG = "dagster/will_retry"


def _request_id(run: dg.DagsterRun) -> int | None:
    raw = run.tags.get(REQUEST_TAG)
    return int(raw) if raw and raw.isdigit() else None


def _launched_at_attempts(run: dg.DagsterRun) -> int | None:
    raw = run.tags.get(ATTEMPTS_TAG)  # also on automatic retries: Dagster copies the run's tags
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
        mark_run_ended(
            conn,
            request_id,
            _lineage(run),
            f"Dagster run {run.run_id} failed: {message}",
            _launched_at_attempts(run),
        )


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
            _launched_at_attempts(context.dagster_run),
        )
