"""Killed exports: a run worker under a real dagster-daemon, and `perf-pipeline export run` on its own.

Issue 9 end to end: SIGKILL an export run's worker mid-export under a real dagster-daemon.

A private Dagster instance (this repo's dagster.yaml, storage in a fresh database on the test PostgreSQL
server) and `dagster-daemon run` on this repo's workspace: the exports sensor launches the request's run,
the test kills the run worker while its COPY streams, and then only watches. Dagster must mark the run
failed, its run-retry daemon must launch a re-execution by itself, and that retry must finish the same
request: status ``succeeded`` after 2 attempts, never ``failed`` on the way, one file with every row, no
third run. About 30–50 s (daemon and code server start-up, two run starts, two paced exports).

The instance differs from dagster.yaml in polling intervals only (queued-run dequeue 1 s, event-log
consumer 1 s): the retry decisions are Dagster's, with the repo's run_retries and run_monitoring settings.
Exports are paced at 2 MB/s so that the kill lands mid-stream.

The other tests SIGKILL `perf-pipeline export run ID` (a real subprocess, paced with
PERF_PIPELINE_EXPORT_MAX_MB_S so that it is mid-stream) and drive `pending_exports_sensor` tick by tick: the
request is left `running` with no process, a tick after the grace re-queues it with a new run key, running
that succeeds with a correct file; repeated deaths end `failed` with the reason; a live export is never
touched.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pyarrow.parquet as pq
import pytest
import yaml

from bench.soak import run_pid
from perf_pipeline.defs.exports import sensors
from perf_pipeline.defs.exports.jobs import export_job
from perf_pipeline.defs.resources import PostgresResource, SettingsResource
from perf_pipeline.lib import exports as ex
from perf_pipeline.lib.db import Locks
from perf_pipeline.lib.workload import WorkloadSpec, load_workload
from perf_pipeline.settings import PROJECT_ROOT
from perf_pipeline.testing import stop_process_tree
from perf_pipeline_tests.conftest import Location, create_database, drop_database

BIN = Path(sys.executable).parent
REQUESTER = "00000000-0000-4000-8000-000000000009"
START = (dt.datetime.now(dt.UTC) - dt.timedelta(days=6)).date()


def _wait(check, timeout: float, what: str, step: float = 0.1):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def platform_url(db_url: str) -> str:
    # ~7 MB of audit CSV: paced at 2 MB/s, an attempt streams for ~3.5 s
    load_workload(db_url, WorkloadSpec(days=7, usage_per_day=10, audit_per_day=4000))
    return db_url


@pytest.fixture
def daemon(
    platform_url: str, pg_server_url: str, redis_url: str, tmp_path: Path
) -> Iterator[tuple[object, dict[str, str]]]:
    """(instance, env): a DagsterInstance on a private DAGSTER_HOME, with dagster-daemon running on it."""
    dagster_db = create_database(pg_server_url, prefix="ppt_dagster")
    home = tmp_path / "dagster_home"
    home.mkdir()
    config = yaml.safe_load((PROJECT_ROOT / "dagster.yaml").read_text())
    config["run_coordinator"].setdefault("config", {})["dequeue_interval_seconds"] = 1
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    env = {
        "DAGSTER_HOME": str(home),
        "PERF_PIPELINE_DATABASE_URL": platform_url,
        "PERF_PIPELINE_REDIS_URL": redis_url,
        "PERF_PIPELINE_DAGSTER_DATABASE_URL": dagster_db,
        "PERF_PIPELINE_DAGSTER_PG_URL": urlunsplit(
            urlsplit(dagster_db)._replace(scheme="postgresql+psycopg2")
        ),
        "PERF_PIPELINE_DAGSTER_ARTIFACTS_DIR": str(tmp_path / "storage"),
        "PERF_PIPELINE_DAGSTER_COMPUTE_LOGS_DIR": str(tmp_path / "compute_logs"),
        "PERF_PIPELINE_EXPORT_DIR": str(tmp_path / "exports"),
        "PERF_PIPELINE_EXPORT_MAX_MB_S": "2",
        "DAGSTER_EVENT_LOG_CONSUMER_DAEMON_INTERVAL_SECONDS": "1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    proc: subprocess.Popen[bytes] | None = None
    try:
        import dagster as dg

        from perf_pipeline.cli import apply_pool_limits

        apply_pool_limits(env)  # also creates Dagster's schema before two processes race to
        proc = subprocess.Popen(
            [str(BIN / "dagster-daemon"), "run", "-w", str(PROJECT_ROOT / "workspace.yaml")],
            env={**os.environ, **env},
            cwd=home,
            stdout=(tmp_path / "daemon.log").open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped as one below
        )
        with dg.DagsterInstance.get() as instance:
            yield instance, env
    finally:
        if proc is not None:  # its threads finish their iteration first: no need to wait long
            stop_process_tree(proc, grace_s=5)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        drop_database(pg_server_url, dagster_db)


def test_a_killed_export_run_worker_is_retried_and_finishes_the_request(
    daemon: tuple[object, dict[str, str]], platform_url: str
) -> None:
    import dagster as dg

    instance, env = daemon
    with psycopg.connect(platform_url, autocommit=True) as conn:
        request_id = ex.file_request(conn, REQUESTER, "audit_log", "parquet", {"start": str(START)})
    t0 = time.monotonic()

    def runs() -> list[dg.DagsterRun]:
        return list(instance.get_runs(dg.RunsFilter(tags={"perf_pipeline/export_request": str(request_id)})))  # type: ignore[attr-defined]

    def request() -> dict:
        with psycopg.connect(platform_url, autocommit=True) as conn:
            req = ex.get_request(conn, request_id)
        assert req is not None
        return req

    # the sensor's run, mid-COPY: the request is claimed by it (set just before the COPY starts)
    first = _wait(lambda: next(iter(runs()), None), 90, "the exports sensor to launch a run")
    _wait(
        lambda: request()["status"] == "running" and request()["run_id"] == first.run_id,
        90,
        "the run's export to start",
        0.05,
    )
    pid = run_pid(instance, first.run_id)
    assert pid is not None and pid != os.getpid()
    time.sleep(0.5)  # well inside the ~3.5 s stream
    assert request()["status"] == "running"
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    launched_s = time.monotonic() - t0

    statuses_seen: set[str] = set()

    def retried_ok() -> dg.DagsterRun | None:
        statuses_seen.add(request()["status"])
        for run in runs():
            if run.parent_run_id == first.run_id and run.status == dg.DagsterRunStatus.SUCCESS:
                return run
        return None

    retry = _wait(retried_ok, 120, "an automatic retry of the killed run to succeed", 0.25)
    retry_ok_s = time.monotonic() - killed_at

    killed = instance.get_run_by_id(first.run_id)  # type: ignore[attr-defined]
    assert killed.status == dg.DagsterRunStatus.FAILURE
    assert killed.tags.get("dagster/will_retry") == "true"
    assert killed.tags.get("dagster/auto_retry_run_id") == retry.run_id
    assert "dagster/failure_reason" not in killed.tags  # marked failed from outside: not a step failure
    step_events = {
        e.dagster_event.event_type_value
        for e in instance.all_logs(first.run_id)  # type: ignore[attr-defined]
        if e.dagster_event is not None and e.dagster_event.is_step_event
    }
    assert "STEP_SUCCESS" not in step_events and "STEP_FAILURE" not in step_events  # the step died with it
    assert retry.tags.get("dagster/retry_number") == "1" and retry.root_run_id == first.run_id

    req = request()
    assert req["status"] == "succeeded" and req["attempts"] == 2 and req["run_id"] == retry.run_id
    assert "failed" not in statuses_seen  # the request was left to the retry, never failed on the way
    with psycopg.connect(platform_url) as conn:
        (rows,) = conn.execute(
            "SELECT count(*) FROM audit_log WHERE timestamp >= %s",
            (dt.datetime.combine(START, dt.time(), dt.UTC),),
        ).fetchone()
    export_dir = Path(env["PERF_PIPELINE_EXPORT_DIR"])
    assert sorted(os.listdir(export_dir)) == [
        f"export-{request_id}-audit_log.parquet"
    ]  # one file, no leftovers
    assert req["rows"] == rows == pq.read_metadata(export_dir / os.listdir(export_dir)[0]).num_rows > 20_000
    assert len(runs()) == 2  # the killed run and its retry: the sensor never launched the request again
    print(
        f"\nrun started + export claimed {launched_s:.1f} s after filing; killed pid {pid}; "
        f"retry run {retry.run_id[:8]} succeeded {retry_ok_s:.1f} s after the kill"
    )


# ------------------------------------------------------------------ `perf-pipeline export run` killed alone


def _start_cli_export(
    url: str, request_id: int, export_dir: Path | str, log: Path, mb_s: float
) -> subprocess.Popen:
    """`perf-pipeline export run ID` in a child process of its own (its own process group)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
        "PERF_PIPELINE_DATABASE_URL": url,
        "PERF_PIPELINE_REDIS_URL": "redis://127.0.0.1:1/0",  # not used; keeps the embedded Redis off
        "PERF_PIPELINE_EXPORT_DIR": str(export_dir),
        "PERF_PIPELINE_EXPORT_MAX_MB_S": str(mb_s),
    }
    with log.open("ab") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "perf_pipeline.cli", "export", "run", str(request_id)],
            env=env,
            cwd=PROJECT_ROOT,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )


def _get(url: str, request_id: int) -> dict:
    with psycopg.connect(url, autocommit=True) as conn:
        req = ex.get_request(conn, request_id)
    assert req is not None
    return req


def _streaming(url: str, request_id: int, attempts: int) -> bool:
    """The request is claimed by attempt ``attempts`` and its COPY is on the wire."""
    with psycopg.connect(url, autocommit=True) as conn:
        req = ex.get_request(conn, request_id)
        copying = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'perf_pipeline.export' "
            "AND datname = current_database() AND query LIKE 'COPY%%'"
        ).fetchone()
    return bool(req and req["status"] == "running" and req["attempts"] == attempts and copying[0])


def _orphaned(url: str, request_id: int) -> bool:
    """Nobody holds the request's advisory lock (the killed worker's session is over)."""
    with psycopg.connect(url, autocommit=True) as conn:
        (held,) = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = %s::bigint::oid "
            "AND objid = %s::bigint::oid AND objsubid = 2 AND granted",
            (Locks.EXPORT_CLASS, request_id),
        ).fetchone()
    return held == 0


def _visible_names(export_dir: Path | Location) -> list[str]:
    """Names in the export location that are not hidden temporary ones."""
    if isinstance(export_dir, Location):
        return [k for k in export_dir.objects() if not k.startswith(".")]
    return [n for n in os.listdir(export_dir) if not n.startswith(".")]


def _kill_mid_stream(
    url: str, request_id: int, attempts: int, export_dir: Path | Location, log: Path
) -> None:
    """Start `export run`, SIGKILL it while its COPY streams, wait until PostgreSQL has ended its session."""
    target = export_dir.value if isinstance(export_dir, Location) else export_dir
    child = _start_cli_export(url, request_id, target, log, mb_s=1.0)  # ~7 MB of CSV: ~7 s
    try:
        _wait(
            lambda: child.poll() is not None or _streaming(url, request_id, attempts),
            60,
            "the export to stream",
        )
        assert child.poll() is None, f"the export ended by itself: {log.read_text()[-2000:]}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait(30)
    _wait(lambda: _orphaned(url, request_id), 30, "PostgreSQL to end the killed export's session")
    req = _get(url, request_id)
    assert req["status"] == "running" and req["attempts"] == attempts  # what issue 2 saw: running, forever
    assert _visible_names(export_dir) == []  # nothing visible


class _Sensor:
    """`pending_exports_sensor`, one tick at a time, its cursor kept between ticks."""

    def __init__(self, url: str, instance: object | None = None) -> None:
        import dagster as dg

        self.instance = instance or dg.DagsterInstance.ephemeral()
        self.postgres = PostgresResource(url=url)
        self.cursor: str | None = None

    def tick(self) -> list:
        import dagster as dg

        ctx = dg.build_sensor_context(
            instance=self.instance,
            cursor=self.cursor,
            resources={"postgres": self.postgres, "settings": SettingsResource()},
        )
        result = sensors.pending_exports_sensor(ctx)
        assert isinstance(result, dg.SensorResult)
        self.cursor = result.cursor
        return list(result.run_requests or [])


@pytest.fixture
def quiet_table(platform_url: str) -> str:
    """No other request pending or running: each tick is about this test's request only."""
    with psycopg.connect(platform_url, autocommit=True) as conn:
        conn.execute("UPDATE data_export SET status = 'failed' WHERE status IN ('pending', 'running')")
    return platform_url


def test_a_killed_cli_export_is_requeued_by_the_sensor_and_then_succeeds(
    quiet_table: str, tmp_path: Path, location: Location, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On local disk and on S3 (where the kill lands mid-upload: no object, and the retry's file whole)."""
    import dagster as dg

    url = quiet_table
    monkeypatch.setattr(sensors, "ORPHAN_GRACE_S", 1.0, raising=False)
    with psycopg.connect(url, autocommit=True) as conn:
        request_id = ex.file_request(conn, REQUESTER, "audit_log", "parquet", {"start": str(START)})
    _kill_mid_stream(url, request_id, 1, location, tmp_path / "cli.log")

    sensor = _Sensor(url)
    assert sensor.tick() == []  # first seen orphaned now: within the grace, left alone
    assert _get(url, request_id)["status"] == "running"
    runs = _wait(sensor.tick, 30, "a tick after the grace to re-queue the request", 0.2)
    req = _get(url, request_id)
    assert req["status"] == "pending" and req["attempts"] == 1 and req["run_id"] is None
    assert "attempt 1 (run cli) stopped without recording a result" in req["error"]
    (run,) = runs
    assert run.run_key == f"{request_id}-attempt-2"  # a new key: Dagster launches each run key once
    assert run.tags["perf_pipeline/export_attempts"] == "1"
    assert sensor.tick() == []  # launched once

    monkeypatch.setenv("PERF_PIPELINE_EXPORT_DIR", str(location.value))
    monkeypatch.setenv("PERF_PIPELINE_EXPORT_MAX_MB_S", "0")
    result = export_job.execute_in_process(
        run_config=run.run_config,
        tags=run.tags,
        resources={"postgres": PostgresResource(url=url), "settings": SettingsResource()},
        instance=dg.DagsterInstance.ephemeral(),
    )
    assert result.success
    req = _get(url, request_id)
    assert req["status"] == "succeeded" and req["attempts"] == 2 and req["error"] is None
    path = location.fetch(req["file_path"], tmp_path)
    assert location.objects() == [path.name]  # one object, no leftovers
    data = path.read_bytes()
    assert (req["bytes"], req["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
    table = pq.read_table(path, columns=["id"])
    with psycopg.connect(url) as conn:
        ids = {
            str(r[0])
            for r in conn.execute(
                "SELECT id FROM audit_log WHERE timestamp >= %s",
                (dt.datetime.combine(START, dt.time(), dt.UTC),),
            )
        }
    assert req["rows"] == table.num_rows == len(ids) > 20_000
    assert set(table.column("id").to_pylist()) == ids


def test_repeated_deaths_end_failed_with_the_reason(
    quiet_table: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, export_dir = quiet_table, tmp_path / "exports"
    export_dir.mkdir()
    monkeypatch.setattr(sensors, "ORPHAN_GRACE_S", 0.0, raising=False)
    with psycopg.connect(url, autocommit=True) as conn:
        request_id = ex.file_request(conn, REQUESTER, "audit_log", "csv.gz", {"start": str(START)})
    sensor = _Sensor(url)
    keys = []
    for attempt in (1, 2, 3):  # sensors.MAX_ATTEMPTS
        _kill_mid_stream(url, request_id, attempt, export_dir, tmp_path / "cli.log")
        keys += [r.run_key for r in sensor.tick()]
        req = _get(url, request_id)
        if attempt < 3:
            assert req["status"] == "pending", req
        else:
            assert req["status"] == "failed", req
    assert keys == [f"{request_id}-attempt-2", f"{request_id}-attempt-3"]
    assert req["error"].startswith(
        "gave up after 3 attempts (at most 3): attempt 3 (run cli) stopped without recording a result"
    )
    assert f"perf-pipeline export run {request_id}" in req["error"] and req["finished_at"] is not None
    assert sensor.tick() == [] and _get(url, request_id)["status"] == "failed"  # not launched again
    assert os.listdir(export_dir) == []


def test_a_live_export_is_never_swept(
    quiet_table: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, export_dir = quiet_table, tmp_path / "exports"
    export_dir.mkdir()
    monkeypatch.setattr(sensors, "ORPHAN_GRACE_S", 0.0, raising=False)  # sweep the moment a worker is gone
    with psycopg.connect(url, autocommit=True) as conn:
        request_id = ex.file_request(conn, REQUESTER, "audit_log", "csv.gz", {"start": str(START)})
    log = tmp_path / "cli.log"
    child = _start_cli_export(url, request_id, export_dir, log, mb_s=2.0)  # ~3.5 s
    try:
        _wait(lambda: _streaming(url, request_id, 1), 60, "the export to stream")
        with psycopg.connect(url, autocommit=True) as conn:  # as if it had been running for a day: only
            conn.execute(  # the lock tells a live worker from a dead one
                "UPDATE data_export SET started_at = now() - interval '1 day' WHERE id = %s", (request_id,)
            )
        sensor, ticks = _Sensor(url), 0
        while child.poll() is None:
            runs = sensor.tick()
            if child.poll() is None:  # the worker was alive through the whole tick
                ticks += 1
                assert runs == []
                req = _get(url, request_id)
                assert req["status"] in ("running", "succeeded") and req["attempts"] == 1
            time.sleep(0.1)
        assert child.wait(60) == 0, log.read_text()[-2000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait(30)
    assert ticks >= 3
    req = _get(url, request_id)
    assert req["status"] == "succeeded" and req["attempts"] == 1
    assert sensor.tick() == [] and _get(url, request_id)["status"] == "succeeded"
