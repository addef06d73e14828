"""Alerts (issue 7): one alert per failed run / failed check, logged, stored, and POSTed to a webhook;
and the pruning of Dagster's run history."""

import datetime as dt
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer

import dagster as dg
import psycopg
import pytest

from perf_pipeline.defs.alerts.sensors import alert_on_check_failure, alert_on_run_failure
from perf_pipeline.defs.maintenance.retention import prune_runs
from perf_pipeline.defs.resources import PostgresResource, SettingsResource
from perf_pipeline.lib.alerts import Alert, raise_alert
from perf_pipeline.testing import free_port


@dg.asset
def exploding_asset() -> None:
    raise RuntimeError("disk on fire")


@dg.asset(
    check_specs=[
        dg.AssetCheckSpec("always_fails", asset="checked_asset"),
        dg.AssetCheckSpec("always_passes", asset="checked_asset"),
    ]
)
def checked_asset() -> dg.MaterializeResult:
    return dg.MaterializeResult(
        check_results=[
            dg.AssetCheckResult(check_name="always_fails", passed=False, metadata={"p95_ms": 120.0}),
            dg.AssetCheckResult(check_name="always_passes", passed=True),
        ]
    )


@dg.asset
def fine_asset() -> int:
    return 1


class Webhook:
    """A tiny HTTP server on 127.0.0.1 that records the JSON bodies POSTed to it."""

    def __init__(self) -> None:
        self.received: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.received.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook(monkeypatch: pytest.MonkeyPatch) -> Iterator[Webhook]:
    hook = Webhook()
    monkeypatch.setenv("PERF_PIPELINE_ALERT_WEBHOOK_URL", hook.url)
    yield hook
    hook.close()


@pytest.fixture
def clean_alerts(db: psycopg.Connection) -> psycopg.Connection:
    db.execute("TRUNCATE alert_event")
    return db


def _alerts(conn: psycopg.Connection) -> list[tuple]:
    return conn.execute(
        "SELECT alert_key, kind, source, message, webhook_status, webhook_error FROM alert_event ORDER BY id"
    ).fetchall()


def test_raise_alert_records_once_per_key(clean_alerts: psycopg.Connection, db_url: str) -> None:
    alert = Alert("run_failure:abc", "run_failure", "some_job", "boom", {"run_id": "abc"})
    with psycopg.connect(db_url) as conn:
        assert raise_alert(conn, alert) is True
        assert raise_alert(conn, alert) is False
    rows = _alerts(clean_alerts)
    assert rows == [("run_failure:abc", "run_failure", "some_job", "boom", "disabled", None)]


def test_webhook_failure_is_recorded_not_raised(clean_alerts: psycopg.Connection, db_url: str) -> None:
    dead = f"http://127.0.0.1:{free_port()}/hook"  # a port nobody listens on
    with psycopg.connect(db_url) as conn:
        assert raise_alert(
            conn, Alert("check_failure:1", "check_failure", "a:b", "failed", {}), webhook_url=dead
        )
    [row] = _alerts(clean_alerts)
    assert row[4] == "failed" and row[5]


def test_run_failure_sensor_records_logs_and_posts_one_alert_per_failed_run(
    clean_alerts: psycopg.Connection, db_url: str, webhook: Webhook, caplog: pytest.LogCaptureFixture
) -> None:
    instance = dg.DagsterInstance.ephemeral()
    failed = dg.materialize([exploding_asset], instance=instance, raise_on_error=False)
    assert not failed.success
    resources = {"postgres": PostgresResource(url=db_url), "settings": SettingsResource()}

    def tick(run: dg.ExecuteInProcessResult) -> None:
        context = dg.build_run_status_sensor_context(
            sensor_name="alert_on_run_failure",
            dagster_instance=instance,
            dagster_run=run.dagster_run,
            dagster_event=run.get_run_failure_event(),
            resources=resources,
        ).for_run_failure()
        alert_on_run_failure(context)

    with caplog.at_level("WARNING", logger="perf_pipeline.lib.alerts"):
        tick(failed)
        tick(failed)  # the same failure seen again (retried tick): no second alert, no second POST
    rows = _alerts(clean_alerts)
    assert len(rows) == 1
    key, kind, source, message, status, _ = rows[0]
    assert key == f"run_failure:{failed.run_id}" and kind == "run_failure" and status == "sent"
    assert source == failed.dagster_run.job_name
    assert len(webhook.received) == 1
    assert (
        webhook.received[0]["alert_key"] == key and webhook.received[0]["details"]["run_id"] == failed.run_id
    )
    assert sum(key in r.getMessage() for r in caplog.records) == 1

    tick(dg.materialize([exploding_asset], instance=instance, raise_on_error=False))
    assert len(_alerts(clean_alerts)) == 2 and len(webhook.received) == 2


def test_check_failure_sensor_records_one_alert_per_failed_evaluation(
    clean_alerts: psycopg.Connection, db_url: str, webhook: Webhook
) -> None:
    instance = dg.DagsterInstance.ephemeral()
    resources = {"postgres": PostgresResource(url=db_url), "settings": SettingsResource()}
    dg.materialize([checked_asset, fine_asset], instance=instance)

    context = dg.build_sensor_context(instance=instance, cursor=None, resources=resources)
    skip = alert_on_check_failure(context)
    assert "recorded 1 alert" in skip.skip_message
    rows = _alerts(clean_alerts)
    assert len(rows) == 1
    assert rows[0][1] == "check_failure" and rows[0][2] == "checked_asset:always_fails"
    cursor = json.loads(context.cursor)["after_storage_id"]
    assert cursor > 0
    assert webhook.received[0]["details"]["metadata"] == {"p95_ms": 120.0}

    # the next tick reads only new evaluations; a replay from scratch records nothing twice
    again = dg.build_sensor_context(instance=instance, cursor=context.cursor, resources=resources)
    assert "read 0 check evaluation" in alert_on_check_failure(again).skip_message
    replay = dg.build_sensor_context(instance=instance, cursor=None, resources=resources)
    assert "recorded 0 alert" in alert_on_check_failure(replay).skip_message
    assert len(_alerts(clean_alerts)) == 1 and len(webhook.received) == 1

    dg.materialize([checked_asset], instance=instance)  # a new failure is a new alert
    later = dg.build_sensor_context(instance=instance, cursor=context.cursor, resources=resources)
    assert "recorded 1 alert" in alert_on_check_failure(later).skip_message
    assert len(_alerts(clean_alerts)) == 2


def test_prune_runs_deletes_finished_runs_older_than_the_cutoff() -> None:
    instance = dg.DagsterInstance.ephemeral()
    runs = [dg.materialize([fine_asset], instance=instance).run_id for _ in range(3)]
    assert prune_runs(instance, dt.datetime.now(dt.UTC) - dt.timedelta(days=1)) == 0
    assert len(instance.get_runs()) == 3
    deleted = prune_runs(instance, dt.datetime.now(dt.UTC) + dt.timedelta(minutes=1), keep_run_id=runs[-1])
    assert deleted == 2
    assert [r.run_id for r in instance.get_runs()] == [runs[-1]]
    assert instance.all_logs(runs[0]) == []  # the event log went with the run


def test_prune_run_history_job_keeps_recent_runs() -> None:
    from perf_pipeline.defs.maintenance.retention import prune_run_history_job

    instance = dg.DagsterInstance.ephemeral()
    recent = dg.materialize([fine_asset], instance=instance).run_id
    result = prune_run_history_job.execute_in_process(
        instance=instance, resources={"settings": SettingsResource()}
    )
    assert result.success
    assert recent in {r.run_id for r in instance.get_runs()}  # 1 day old at most: within 30 days


def test_a_stale_asset_is_alerted_once_per_lapse(
    clean_alerts: psycopg.Connection, db_url: str, webhook: Webhook, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dagster's own freshness daemon, over the project's code location, moves dashboard_cache to WARN and then
    FAIL as its last refresh ages past 16 and 20 minutes; the sensor records each change once (WARN: about
    to be stale, FAIL: stale), nothing for PASS, and a new lapse after a refresh is a new alert."""
    from dagster._core.test_utils import create_test_daemon_workspace_context, freeze_time
    from dagster._core.workspace.load_target import ModuleTarget
    from dagster._daemon.freshness import FreshnessDaemon

    from perf_pipeline.defs.alerts.sensors import alert_on_stale_asset

    monkeypatch.setenv("PERF_PIPELINE_DATABASE_URL", db_url)
    resources = {"postgres": PostgresResource(url=db_url), "settings": SettingsResource()}
    target = ModuleTarget(
        module_name="perf_pipeline.definitions", attribute=None, working_directory=None, location_name="pp"
    )
    start = dt.datetime.now(dt.UTC)
    cursor = None

    def at(minutes: float) -> list[tuple]:
        """One freshness daemon iteration and one sensor tick, ``minutes`` after the refresh."""
        nonlocal cursor
        with freeze_time(start + dt.timedelta(minutes=minutes)):
            for _ in FreshnessDaemon().run_iteration(workspace):
                pass
        context = dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources)
        alert_on_stale_asset(context)
        cursor = context.cursor
        return [r for r in _alerts(clean_alerts) if r[2] == "dashboard_cache"]

    with (
        dg.instance_for_test() as instance,
        create_test_daemon_workspace_context(target, instance) as workspace,
    ):
        with freeze_time(start):
            instance.report_runless_asset_event(dg.AssetMaterialization("dashboard_cache"))
        assert at(1) == []  # fresh: PASS is no alert
        warned = at(17)
        assert [(r[1], r[3]) for r in warned] == [
            ("stale_asset", "dashboard_cache is about to be stale (freshness PASS → WARN)")
        ]
        assert at(18) == warned  # still WARN: no new change, no new alert
        failed = at(21)
        assert len(failed) == 2 and failed[1][3] == "dashboard_cache is stale (freshness WARN → FAIL)"
        assert [body["kind"] for body in webhook.received] == ["stale_asset", "stale_asset"]
        with freeze_time(start + dt.timedelta(minutes=22)):
            instance.report_runless_asset_event(dg.AssetMaterialization("dashboard_cache"))
        assert len(at(23)) == 2  # refreshed: PASS again, nothing new
        assert len(at(22 + 17)) == 3  # the next lapse is its own alert
