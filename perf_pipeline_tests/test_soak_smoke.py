"""The soak's measuring parts (bench/soak.py), on the real servers: what it counts must be what happened.

The full soak (webserver, daemon, API, faults) takes minutes and runs as ``make soak``; here its writers,
its loss accounting, its latency windows and its duration parsing are checked in a few seconds.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import psycopg
import pytest

from bench.soak import AuditLoad, RunInfo, UsageWriter, judge_failed_runs, parse_duration, wait_all, windows
from perf_pipeline.audit import AuditWriter


def test_parse_duration() -> None:
    assert parse_duration("30m") == 1800
    assert parse_duration("90s") == 90
    assert parse_duration("1h") == 3600
    assert parse_duration("10") == 600  # bare number: minutes, as in DURATION=10
    with pytest.raises(Exception, match="duration"):
        parse_duration("ten minutes")


def test_windows_p99_and_failures_per_window() -> None:
    start = 1000.0
    samples = [(start + i * 0.5, float(i % 100), i % 250 != 0) for i in range(1200)]  # 600 s of samples
    win = windows(samples, start, size=300)
    assert [w["requests"] for w in win] == [600, 600]
    assert [w["failed"] for w in win] == [3, 2]  # i = 0, 250, 500 | 750, 1000
    assert 98 <= win[0]["p99_ms"] <= 99


def test_wait_all_times_each_check_on_its_own() -> None:
    t0 = time.time()
    out = wait_all(
        {"now": lambda: True, "soon": lambda: time.time() > t0 + 0.3, "never": lambda: False},
        t0,
        timeout=1.0,
        step=0.05,
    )
    assert out["now"] is not None and out["now"] < 0.2
    assert out["soon"] is not None and 0.3 <= out["soon"] < 0.8
    assert out["never"] is None


def test_writers_account_for_every_row(db_url: str, scratch_dir: Path) -> None:
    """Paced writers for ~3 s: every acknowledged usage row and every logged audit id is in the database,
    once; the soak's loss figures are computed exactly this way."""
    until = time.time() + 3
    marker, user = uuid.uuid4().hex, str(uuid.uuid4())
    writer = AuditWriter(db_url, spool_dir=scratch_dir / "spool", name="soak-test")
    audit = AuditLoad(writer, 300.0, until, marker)
    usage = UsageWriter(db_url, 20.0, until, user)
    audit.start()
    usage.start()
    audit.join(20)
    usage.join(20)
    assert writer.close(timeout=30)
    assert not audit.is_alive() and not usage.is_alive()
    assert len(audit.ids) > 300 and not audit.errors
    assert len(usage.acked) > 20 and usage.errors == 0
    with psycopg.connect(db_url) as conn:
        ids = [
            str(r[0])
            for r in conn.execute(
                "SELECT id FROM audit_log WHERE event_type = 'soak.event' AND details->>'soak' = %s",
                (marker,),
            )
        ]
        usage_rows, sessions = conn.execute(
            "SELECT count(*), count(DISTINCT session_id) FROM usage_log WHERE user_id = %s", (user,)
        ).fetchone()
    assert sorted(ids) == sorted(audit.ids)
    assert usage_rows == sessions == len(set(usage.acked)) == len(usage.acked)


def test_failed_runs_are_judged_by_what_really_recovered_them() -> None:
    """A killed export run retried to success is recovered by its automatic retry (with the latency); a
    failed export whose request never succeeded is not recovered by a later export of another request
    (the old rule counted that); a scheduled job's failure is recovered by a later run of the job."""
    req = "perf_pipeline/export_request"
    runs = [
        RunInfo("killed01", "export_job", "FAILURE", {req: "7", "dagster/will_retry": "true"}, 100.0, 101.0),
        RunInfo(
            "retry001",
            "export_job",
            "SUCCESS",
            {
                req: "7",
                "dagster/root_run_id": "killed01",
                "dagster/parent_run_id": "killed01",
                "dagster/retry_number": "1",
            },
            105.0,
            131.0,
        ),
        RunInfo("failed02", "export_job", "FAILURE", {req: "8", "dagster/will_retry": "false"}, 200.0, 201.0),
        RunInfo("other003", "export_job", "SUCCESS", {req: "9"}, 300.0, 310.0),
        RunInfo("sched004", "db_health_job", "FAILURE", {}, 400.0, 402.0),
        RunInfo("sched005", "db_health_job", "SUCCESS", {}, 4000.0, 4010.0),
    ]
    rows, unrecovered = judge_failed_runs(runs, [("kill run worker", 99.0)], "killed01", 0.0)
    by_run = {r["run"]: r for r in rows}
    assert set(by_run) == {"killed01", "failed02", "sched004"} and unrecovered == 1
    assert by_run["killed01"]["recovered_by"] == "automatic retry retry001"
    assert by_run["killed01"]["recovered_after_s"] == 30.0 and by_run["killed01"]["killed"] is True
    assert by_run["killed01"]["near_fault"] == "kill run worker"
    assert by_run["failed02"]["recovered_by"] is None  # other003 exported request 9, not 8
    assert by_run["sched004"]["recovered_by"] == "later run of its job sched005"
