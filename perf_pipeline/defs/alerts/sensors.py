"""Alert sensors: every failed run, every failed asset check and every asset that turns stale (its freshness
policy fails or warns) becomes one alert (row, log, webhook).

The sensors are idempotent per failure: the alert key is the run id or the event's storage id, and
:func:`perf_pipeline.lib.alerts.raise_alert` inserts it at most once. The event sensors keep a JSON cursor
(the last event storage id they read), so a tick reads only new events.
"""

import json

import dagster as dg

from perf_pipeline.defs.resources import PostgresResource
from perf_pipeline.lib.alerts import Alert, raise_alert
from perf_pipeline.settings import get_settings

#: check evaluations read per tick (a tick stays well under a second even with a backlog)
CHECK_BATCH = 500


@dg.run_failure_sensor(
    name="alert_on_run_failure",
    description="Records an alert (alert_event row, log, optional webhook) for every failed run.",
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def alert_on_run_failure(context: dg.RunFailureSensorContext, postgres: PostgresResource) -> None:
    run = context.dagster_run
    message = context.failure_event.message or "run failed"
    alert = Alert(
        key=f"run_failure:{run.run_id}",
        kind="run_failure",
        source=run.job_name,
        message=message,
        details={"run_id": run.run_id, "job_name": run.job_name, "tags": dict(run.tags)},
    )
    with postgres.connection() as conn:
        recorded = raise_alert(conn, alert, webhook_url=get_settings().alert_webhook_url)
    context.log.info("%s %s", "recorded" if recorded else "already recorded", alert.key)


def _cursor(raw: str | None) -> int:
    if not raw:
        return 0
    try:
        return int(json.loads(raw)["after_storage_id"])
    except (ValueError, KeyError, TypeError):
        return 0  # an unreadable cursor re-reads history; raise_alert dedupes what was already recorded


@dg.sensor(
    name="alert_on_check_failure",
    description="Records an alert (alert_event row, log, optional webhook) for every failed asset check "
    "evaluation (both severities), reading new evaluations from the instance's event log.",
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def alert_on_check_failure(context: dg.SensorEvaluationContext, postgres: PostgresResource) -> dg.SkipReason:
    after = _cursor(context.cursor)
    records = context.instance.event_log_storage.get_event_records(
        dg.EventRecordsFilter(
            event_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION, after_cursor=after or None
        ),
        limit=CHECK_BATCH,
        ascending=True,
    )
    recorded = 0
    webhook = get_settings().alert_webhook_url
    with postgres.connection() as conn:
        for record in records:
            evaluation = record.event_log_entry.dagster_event.event_specific_data
            if evaluation is None or evaluation.passed:
                continue
            source = f"{evaluation.asset_key.to_user_string()}:{evaluation.check_name}"
            metadata = {
                k: v.value
                for k, v in evaluation.metadata.items()
                if isinstance(v.value, int | float | str | bool)
            }
            alert = Alert(
                key=f"check_failure:{record.storage_id}",
                kind="check_failure",
                source=source,
                message=evaluation.description
                or f"asset check {source} failed ({evaluation.severity.value})",
                details={
                    "run_id": record.run_id,
                    "severity": evaluation.severity.value,
                    "partition": evaluation.partition,
                    "metadata": metadata,
                },
            )
            recorded += raise_alert(conn, alert, webhook_url=webhook)
    if records:
        context.update_cursor(json.dumps({"after_storage_id": records[-1].storage_id}))
    return dg.SkipReason(f"read {len(records)} check evaluation(s), recorded {recorded} alert(s)")


@dg.sensor(
    name="alert_on_stale_asset",
    description="Records an alert (alert_event row, log, optional webhook) when an asset's freshness policy "
    "goes to WARN or FAIL (freshness state changes written by Dagster's freshness daemon): today's rollup, "
    "the KPI buckets, the dashboard cache or the partitions created ahead fell behind their cadence.",
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def alert_on_stale_asset(context: dg.SensorEvaluationContext, postgres: PostgresResource) -> dg.SkipReason:
    after = _cursor(context.cursor)
    records = context.instance.event_log_storage.get_event_records(
        dg.EventRecordsFilter(
            event_type=dg.DagsterEventType.FRESHNESS_STATE_CHANGE, after_cursor=after or None
        ),
        limit=CHECK_BATCH,
        ascending=True,
    )
    recorded = 0
    webhook = get_settings().alert_webhook_url
    with postgres.connection() as conn:
        for record in records:
            change = record.event_log_entry.dagster_event.event_specific_data
            state = getattr(change, "new_state", None)
            if state is None or state.value not in ("WARN", "FAIL"):
                continue
            asset = change.key.to_user_string()
            alert = Alert(
                key=f"stale:{record.storage_id}",
                kind="stale_asset",
                source=asset,
                message=f"{asset} is {'stale' if state.value == 'FAIL' else 'about to be stale'} "
                f"(freshness {change.previous_state.value} → {state.value})",
                details={"asset": asset, "state": state.value, "previous": change.previous_state.value},
            )
            recorded += raise_alert(conn, alert, webhook_url=webhook)
    if records:
        context.update_cursor(json.dumps({"after_storage_id": records[-1].storage_id}))
    return dg.SkipReason(f"read {len(records)} freshness change(s), recorded {recorded} alert(s)")
