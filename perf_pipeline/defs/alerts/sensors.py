"""Alert sensors: every failed run, every failed asset check and every asset that turns stale (its freshness
policy fails or warns) becomes one alert (row, log, webhook).

The sensors are idempotent per failure: the alert key is the run id or the event's storage id, and
:func:`perf_pipeline.lib.alerts.raise_alert` inserts it at most once. The event sensors keep a JSON cursor
(the last event storage id they read), so a tick reads only new events.
"""

import json
from collections.abc import Callable

import dagster as dg

from perf_pipeline.defs.resources import PostgresResource, SettingsResource
from perf_pipeline.lib.alerts import Alert, raise_alert

#: check evaluations read per tick (a tick stays well under a second even with a backlog)
CHECK_BATCH = 500


@dg.run_failure_sensor(
    name="alert_on_run_failure",
    description="Records an alert (alert_event row, log, optional webhook) for every failed run.",
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def alert_on_run_failure(
    context: dg.RunFailureSensorContext, postgres: PostgresResource, settings: SettingsResource
) -> None:
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
        recorded = raise_alert(conn, alert, webhook_url=settings.get().alert_webhook_url)
    context.log.info("%s %s", "recorded" if recorded else "already recorded", alert.key)


def _cursor(raw: str | None) -> int:
    if not raw:
        return 0
    try:
        return int(json.loads(raw)["after_storage_id"])
    except (ValueError, KeyError, TypeError):
        return 0  # an unreadable cursor re-reads history; raise_alert dedupes what was already recorded


def _alert_new_events(
    context: dg.SensorEvaluationContext,
    postgres: PostgresResource,
    settings: SettingsResource,
    event_type: dg.DagsterEventType,
    to_alert: Callable[[dg.EventLogRecord], Alert | None],
) -> tuple[int, int]:
    """Reads up to :data:`CHECK_BATCH` events of ``event_type`` after the sensor's cursor (one indexed read
    of the instance's event log), raises the alert ``to_alert`` makes of each (None: not alerting), all on
    one platform connection, and moves the cursor past the last event read. Returns (events read, alerts
    recorded)."""
    records = context.instance.event_log_storage.get_event_records(
        dg.EventRecordsFilter(event_type=event_type, after_cursor=_cursor(context.cursor) or None),
        limit=CHECK_BATCH,
        ascending=True,
    )
    recorded = 0
    webhook = settings.get().alert_webhook_url
    with postgres.connection() as conn:
        for record in records:
            alert = to_alert(record)
            if alert is not None:
                recorded += raise_alert(conn, alert, webhook_url=webhook)
    if records:
        context.update_cursor(json.dumps({"after_storage_id": records[-1].storage_id}))
    return len(records), recorded


def _check_failure_alert(record: dg.EventLogRecord) -> Alert | None:
    evaluation = record.event_log_entry.dagster_event.event_specific_data
    if evaluation is None or evaluation.passed:
        return None
    source = f"{evaluation.asset_key.to_user_string()}:{evaluation.check_name}"
    metadata = {
        k: v.value for k, v in evaluation.metadata.items() if isinstance(v.value, int | float | str | bool)
    }
    return Alert(
        key=f"check_failure:{record.storage_id}",
        kind="check_failure",
        source=source,
        message=evaluation.description or f"asset check {source} failed ({evaluation.severity.value})",
        details={
            "run_id": record.run_id,
            "severity": evaluation.severity.value,
            "partition": evaluation.partition,
            "metadata": metadata,
        },
    )


def _stale_asset_alert(record: dg.EventLogRecord) -> Alert | None:
    change = record.event_log_entry.dagster_event.event_specific_data
    state = getattr(change, "new_state", None)
    if state is None or state.value not in ("WARN", "FAIL"):
        return None
    asset = change.key.to_user_string()
    return Alert(
        key=f"stale:{record.storage_id}",
        kind="stale_asset",
        source=asset,
        message=f"{asset} is {'stale' if state.value == 'FAIL' else 'about to be stale'} "
        f"(freshness {change.previous_state.value} → {state.value})",
        details={"asset": asset, "state": state.value, "previous": change.previous_state.value},
    )


@dg.sensor(
    name="alert_on_check_failure",
    description="Records an alert (alert_event row, log, optional webhook) for every failed asset check "
    "evaluation (both severities), reading new evaluations from the instance's event log.",
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def alert_on_check_failure(
    context: dg.SensorEvaluationContext, postgres: PostgresResource, settings: SettingsResource
) -> dg.SkipReason:
    read, recorded = _alert_new_events(
        context, postgres, settings, dg.DagsterEventType.ASSET_CHECK_EVALUATION, _check_failure_alert
    )
    return dg.SkipReason(f"read {read} check evaluation(s), recorded {recorded} alert(s)")


@dg.sensor(
    name="alert_on_stale_asset",
    description="Records an alert (alert_event row, log, optional webhook) when an asset's freshness policy "
    "goes to WARN or FAIL (freshness state changes written by Dagster's freshness daemon): today's rollup, "
    "the KPI buckets, the dashboard cache or the partitions created ahead fell behind their cadence.",
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def alert_on_stale_asset(
    context: dg.SensorEvaluationContext, postgres: PostgresResource, settings: SettingsResource
) -> dg.SkipReason:
    read, recorded = _alert_new_events(
        context, postgres, settings, dg.DagsterEventType.FRESHNESS_STATE_CHANGE, _stale_asset_alert
    )
    return dg.SkipReason(f"read {read} freshness change(s), recorded {recorded} alert(s)")
