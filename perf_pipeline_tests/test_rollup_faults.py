"""Rollups under faults, on real PostgreSQL with real processes: a rollup killed after it claimed the
late-data marks (SIGKILL, pg_terminate_backend), the daily reconciliation that re-marks a day whose mark
was lost, and days whose usage month was archived and dropped by usage retention (never recomputed from
the rows left, late rows reported).
"""

from __future__ import annotations

import datetime as dt
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import psycopg
import pytest
from psycopg import sql

from perf_pipeline.defs.resources import PostgresResource
from perf_pipeline.defs.rollups.assets import CHECK_NO_LATE_ROWS_ARCHIVED, usage_daily_metrics
from perf_pipeline.defs.rollups.reconciliation import rolled_up_days_match_usage_log_last_90
from perf_pipeline.lib import archive, rollups
from perf_pipeline.lib.db import Locks
from perf_pipeline.lib.partitioning import add_months, ensure_partitions, months_between
from perf_pipeline.testing import AutomationLoop

UTC = dt.UTC
TODAY = dt.datetime.now(UTC).date()
VICTIM = "ppt_rollup_victim"

# one rollup of one day in a child process, so that it can be killed for real
_ROLLUP = """
import datetime as dt, sys
import psycopg
from perf_pipeline.lib.rollups import rollup_days
day = dt.date.fromisoformat(sys.argv[2])
with psycopg.connect(sys.argv[1], autocommit=True, application_name=sys.argv[3]) as conn:
    rollup_days(conn, day, day + dt.timedelta(days=1))
"""


def _resources(url: str) -> dict[str, Any]:
    return {"postgres": PostgresResource(url=url)}


def _add_rows(conn: psycopg.Connection, day: dt.date, n: int, tag: str) -> None:
    """``n`` usage rows spread over the UTC ``day``; one committed statement."""
    conn.execute(
        "INSERT INTO usage_log (user_id, created_at, duration_minutes, cost_usd, is_billable, stt_provider) "
        "SELECT md5(%(tag)s || (g %% 50))::uuid, %(start)s::timestamptz + (g::bigint * 86399 / %(n)s) * interval '1 second', "
        "1.5, 0.0100, g %% 4 <> 0, (ARRAY['google', 'assemblyai', 'whisper'])[1 + g %% 3] "
        "FROM generate_series(0, %(n)s - 1) g",
        {"tag": tag, "start": dt.datetime.combine(day, dt.time(), UTC), "n": n},
    )


def _sessions(conn: psycopg.Connection, day: dt.date) -> tuple[int | None, int]:
    """(rolled-up sessions, usage_log rows) of a day."""
    rolled = conn.execute("SELECT sessions FROM usage_daily_metrics WHERE day = %s", (day,)).fetchone()
    truth = conn.execute(
        "SELECT count(*) FROM usage_log WHERE created_at >= %s AND created_at < %s",
        (
            dt.datetime.combine(day, dt.time(), UTC),
            dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), UTC),
        ),
    ).fetchone()[0]
    return (rolled[0] if rolled else None), truth


def _pending(conn: psycopg.Connection, day: dt.date) -> bool:
    """A mark or a claim exists for ``day``: something will still recompute it."""
    marked = conn.execute("SELECT 1 FROM usage_rollup_stale_days WHERE day = %s", (day,)).fetchone()
    claimed = None
    if conn.execute("SELECT to_regclass('usage_rollup_claims') IS NOT NULL").fetchone()[0]:
        claimed = conn.execute("SELECT 1 FROM usage_rollup_claims WHERE day = %s", (day,)).fetchone()
    return bool(marked or claimed)


def _loop(url: str) -> AutomationLoop:
    """The daemon's observation + automation loop on a fresh instance, primed with today's database."""
    loop = AutomationLoop(url, dg.DagsterInstance.ephemeral())
    loop.prime()
    return loop


def _requested(loop: AutomationLoop) -> set[str]:
    """One daemon tick: the days of usage_daily_metrics automation requests."""
    return loop.tick()["usage_daily_metrics"]


def _start_victim(url: str, day: dt.date) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _ROLLUP, url, day.isoformat(), VICTIM],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_lock_wait(conn: psycopg.Connection, proc: subprocess.Popen) -> int:
    """The victim's backend pid, once it waits on a lock (its claim is committed by then)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        row = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND wait_event_type = 'Lock'",
            (VICTIM,),
        ).fetchone()
        if row:
            return row[0]
        assert proc.poll() is None, (
            f"the rollup ended before blocking: {proc.stderr.read() if proc.stderr else ''}"
        )
        time.sleep(0.02)
    raise AssertionError("the rollup never blocked on the locked rollup table")


@pytest.fixture(scope="module")
def url(db_url: str) -> str:
    with psycopg.connect(db_url, autocommit=True) as conn:
        ensure_partitions(conn, "usage_log", months_between(TODAY - dt.timedelta(days=40), TODAY))
    return db_url


@pytest.fixture
def conn(url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(url, autocommit=True) as c:
        yield c


@pytest.mark.parametrize("kill", ["sigkill", "pg_terminate_backend"])
def test_a_rollup_killed_after_claiming_leaves_the_day_marked(
    url: str, conn: psycopg.Connection, kill: str
) -> None:
    """The issue's repro: 2,000 rows rolled up, 100 late rows, the re-run blocked on a lock held by another
    session and killed there. The day must stay marked (as a claim), be re-armed by the late-data sensor
    and end at 2,100 — it used to end at 2,000 with no mark, forever."""
    day = TODAY - dt.timedelta(days=5 if kill == "sigkill" else 6)
    _add_rows(conn, day, 2000, f"base-{kill}")
    rollups.rollup_days(conn, day, day + dt.timedelta(days=1))
    loop = _loop(url)  # the daemon, running all along
    _add_rows(conn, day, 100, f"late-{kill}")
    assert _sessions(conn, day) == (2000, 2100) and _pending(conn, day)

    with psycopg.connect(url) as blocker:  # another session holding the rollup table
        blocker.execute("LOCK TABLE usage_daily_metrics IN EXCLUSIVE MODE")
        proc = _start_victim(url, day)
        try:
            pid = _wait_for_lock_wait(conn, proc)
            if kill == "sigkill":
                proc.send_signal(signal.SIGKILL)
            else:
                conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
        blocker.rollback()
    deadline = time.monotonic() + 30  # the server notices the killed client's closed socket
    while conn.execute("SELECT 1 FROM pg_stat_activity WHERE application_name = %s", (VICTIM,)).fetchone():
        assert time.monotonic() < deadline
        time.sleep(0.05)

    assert _sessions(conn, day) == (2000, 2100)
    assert _pending(conn, day), "the killed rollup took the day's late-data mark with it"
    assert day.isoformat() in _requested(loop)  # re-armed and requested, nobody involved
    run = dg.materialize(
        [usage_daily_metrics],
        partition_key=day.isoformat(),
        resources=_resources(url),
        instance=loop.instance,
    )
    assert run.success
    assert _sessions(conn, day) == (2100, 2100)
    view = conn.execute(
        "SELECT total_sessions FROM dashboard_daily_metrics WHERE day = %s", (day,)
    ).fetchone()
    assert view == (2100,)
    assert not _pending(conn, day)


def test_rollups_killed_at_random_moments_never_lose_a_day(url: str, conn: psycopg.Connection) -> None:
    """Natural timing: late rows, a rollup in a child process, SIGKILL after a random delay. After every kill
    the day is either right or still pending (marked or claimed); the sensor and a re-run then make it right."""
    day = TODAY - dt.timedelta(days=8)
    _add_rows(conn, day, 200_000, "loop-base")  # a rollup of ~0.5 s: kills land inside it often
    rollups.rollup_days(conn, day, day + dt.timedelta(days=1))
    rnd = random.Random(11)
    loop = _loop(url)
    outcomes = {"right": 0, "pending": 0}
    for round_ in range(10):
        _add_rows(conn, day, 50, f"loop-{round_}")
        proc = _start_victim(url, day)
        time.sleep(rnd.uniform(0.3, 1.5))  # import and connect take a few hundred ms: kills land all over
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        deadline = time.monotonic() + 30
        while conn.execute(
            "SELECT 1 FROM pg_stat_activity WHERE application_name = %s", (VICTIM,)
        ).fetchone():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        rolled, truth = _sessions(conn, day)
        if rolled == truth:
            outcomes["right"] += 1
        else:
            assert _pending(conn, day), f"round {round_}: {rolled} rolled up, {truth} in usage_log, no mark"
            outcomes["pending"] += 1
            _requested(loop)  # re-arms a dead rollup's claims
            rollups.rollup_days(conn, day, day + dt.timedelta(days=1))
            assert _sessions(conn, day) == (truth, truth)
    assert sum(outcomes.values()) == 10


def test_daily_reconciliation_remarks_a_day_whose_mark_was_lost(url: str, conn: psycopg.Connection) -> None:
    day, marked_day = TODAY - dt.timedelta(days=12), TODAY - dt.timedelta(days=13)
    for d in (day, marked_day):
        _add_rows(conn, d, 300, f"recon-{d}")
    rollups.rollup_days(conn, marked_day, day + dt.timedelta(days=1))
    loop = _loop(url)
    check = rolled_up_days_match_usage_log_last_90(**_resources(url))
    assert check.passed
    # a write the triggers did not see (a session with triggers disabled): nothing marks the day
    with conn.transaction():
        conn.execute("SET LOCAL session_replication_role = replica")
        _add_rows(conn, day, 7, "unseen")
    _add_rows(conn, marked_day, 5, "seen")  # marked by the trigger: the sensor's business, not reported
    assert not _pending(conn, day)
    check = rolled_up_days_match_usage_log_last_90(**_resources(url))
    assert not check.passed and check.metadata["disagreeing_days"].value == 1
    listed = check.metadata["days"].records
    assert [r.data["day"] for r in listed] == [day.isoformat()]
    assert listed[0].data["sessions (usage_log)"] == listed[0].data["sessions (rollup)"] + 7
    assert _pending(conn, day)  # marked again: observed, then re-run by the automation
    assert {day.isoformat(), marked_day.isoformat()} <= _requested(loop)
    rollups.rollup_days(conn, marked_day, day + dt.timedelta(days=1))
    assert rolled_up_days_match_usage_log_last_90(**_resources(url)).passed


def test_days_of_an_archived_month_keep_their_history(
    url: str, conn: psycopg.Connection, tmp_path: Path
) -> None:
    """Usage retention archived and dropped a month; one late row for one of its days then landed in DEFAULT.
    Re-running that day (the late-data sensor, or by hand) used to rewrite it from that one row (1000 → 1
    session, reconcile passing); it must keep the archived numbers, report the late row and where it is,
    and count it once the month is restored."""
    month = dt.date(2024, 5, 1)
    ensure_partitions(conn, "usage_log", [month])
    for n in range(3):
        _add_rows(conn, month + dt.timedelta(days=19 + n), 1000, f"archived-{n}")
    late_day, other_day = month + dt.timedelta(days=19), month + dt.timedelta(days=20)
    rollups.rollup_days(conn, month, add_months(month, 1))
    history = conn.execute(
        "SELECT day, sessions, total_minutes, revenue, active_users FROM usage_daily_metrics "
        "WHERE day >= %s AND day < %s ORDER BY day",
        (month, add_months(month, 1)),
    ).fetchall()
    assert archive.archive_partition(conn, "usage_log", month, tmp_path).state == "dropped"
    loop = _loop(url)

    conn.execute(
        "INSERT INTO usage_log (user_id, created_at, duration_minutes, cost_usd, stt_provider) "
        "VALUES (gen_random_uuid(), %s, 1.00, 1.0000, 'google')",
        (dt.datetime.combine(late_day, dt.time(12), UTC),),
    )
    assert conn.execute("SELECT count(*) FROM usage_log_default").fetchone()[0] == 1
    instance = loop.instance
    # the month is not in usage_log any more: nothing to recompute, automation requests nothing
    assert _requested(loop) == set()
    for key in (late_day, other_day):  # runs by hand (or a backfill) of the archived days
        run = dg.materialize(
            [usage_daily_metrics], partition_key=key.isoformat(), resources=_resources(url), instance=instance
        )
        assert run.success
        checks = {e.check_name: e for e in run.get_asset_check_evaluations()}
        late = checks[CHECK_NO_LATE_ROWS_ARCHIVED]
        assert not late.passed
        assert "1 row(s) of 2024-05" in (late.description or "") and "usage_log_default" in late.description
        assert late_day.isoformat() in late.description
    after = conn.execute(
        "SELECT day, sessions, total_minutes, revenue, active_users FROM usage_daily_metrics "
        "WHERE day >= %s AND day < %s ORDER BY day",
        (month, add_months(month, 1)),
    ).fetchall()
    assert after == history  # nothing recomputed from the rows left
    assert _pending(conn, late_day)  # the mark stays until the rows are all back
    assert _requested(loop) == set()  # nothing re-runs the archived days every minute
    assert rolled_up_days_match_usage_log_last_90(**_resources(url)).passed  # archived days are not compared

    archive.restore_partition(conn, "usage_log", month)  # moves the late row in
    rollups.rollup_days(conn, late_day, late_day + dt.timedelta(days=1))
    assert _sessions(conn, late_day) == (1001, 1001)
    assert not _pending(conn, late_day)
    run = dg.materialize(
        [usage_daily_metrics],
        partition_key=late_day.isoformat(),
        resources=_resources(url),
        instance=instance,
    )
    assert {e.check_name: e.passed for e in run.get_asset_check_evaluations()}[CHECK_NO_LATE_ROWS_ARCHIVED]


def test_a_running_archive_keeps_its_month_out_of_a_rollup(url: str, conn: psycopg.Connection) -> None:
    """While archive, restore or move_default_rows hold a month, a rollup leaves that month's days as they are
    (reported), and the archive cannot start while a rollup reads the month."""
    month = dt.date(2024, 7, 1)
    ensure_partitions(conn, "usage_log", [month])
    _add_rows(conn, month + dt.timedelta(days=3), 100, "held")
    day = month + dt.timedelta(days=3)
    key = Locks.month("usage_log", month)
    with psycopg.connect(url, autocommit=True) as holder:
        holder.execute(sql.SQL("SELECT pg_advisory_lock({})").format(key.args()))
        result = rollups.rollup_days(conn, day, day + dt.timedelta(days=1))
        assert result.skipped_days == [day] and "right now" in result.unavailable_months[month]
        assert (
            conn.execute("SELECT count(*) FROM usage_daily_metrics WHERE day = %s", (day,)).fetchone()[0] == 0
        )
        # released explicitly: a closed connection's backend drops its session locks only once it has
        # exited, which closing the client does not wait for
        holder.execute(sql.SQL("SELECT pg_advisory_unlock({})").format(key.args()))
    result = rollups.rollup_days(conn, day, day + dt.timedelta(days=1))
    assert result.skipped_days == [] and _sessions(conn, day) == (100, 100)


def test_a_day_is_never_rolled_up_from_a_half_moved_month(url: str, conn: psycopg.Connection) -> None:
    """30,000 rows of one day sit in usage_log_default (the month had no partition) and the day is rolled
    up. A reader's open transaction keeps move_default_rows from switching: it gives up, and the late-data
    sensor's re-run of the day must still count 30,000 (it used to roll up 0 from the half-moved month and
    clear the mark). Rollups running during a successful move only ever commit 30,000, and the move leaves
    the day marked until its rows are in the new partition."""
    from perf_pipeline.lib.partitioning import PartitionError, move_default_rows

    month = dt.date(2024, 2, 1)
    day = dt.date(2024, 2, 20)
    _add_rows(conn, day, 30_000, "half-moved")
    assert conn.execute("SELECT count(*) FROM usage_log_default").fetchone()[0] == 30_000
    rollups.rollup_days(conn, day, day + dt.timedelta(days=1))
    assert _sessions(conn, day) == (30_000, 30_000)

    with psycopg.connect(url) as reader:  # an open transaction that read the table: its lock stays
        reader.execute("SELECT count(*) FROM usage_log WHERE created_at >= '2024-02-01'")
        with pytest.raises(PartitionError, match="nothing changed"):
            move_default_rows(conn, "usage_log", lock_timeout_ms=50, attempts=3)
        assert _sessions(conn, day) == (30_000, 30_000)  # all rows still visible in DEFAULT
        rollups.mark_days(conn, [day])  # e.g. a late row: the sensor re-runs the day meanwhile
        rollups.rollup_days(conn, day, day + dt.timedelta(days=1))
        assert _sessions(conn, day) == (30_000, 30_000)
        reader.rollback()

    committed: list[int] = []
    after_switch: list[bool] = []  # a rollup started once the rows had left DEFAULT: it may clear the mark
    stop = threading.Event()

    def rolling() -> None:
        with psycopg.connect(url, autocommit=True) as c:
            while not stop.is_set():
                moved = c.execute("SELECT NOT EXISTS (SELECT 1 FROM usage_log_default)").fetchone()[0]
                r = rollups.rollup_days(c, day, day + dt.timedelta(days=1))
                if day not in r.skipped_days:
                    committed.append(_sessions(c, day)[0] or 0)
                    after_switch.append(moved)

    thread = threading.Thread(target=rolling, daemon=True)
    thread.start()
    time.sleep(0.2)
    result = move_default_rows(conn, "usage_log", batch_size=5000)
    stop.set()
    thread.join()
    assert result.partitions_created == [f"usage_log_y{month:%Y}m{month:%m}"]
    assert committed and set(committed) == {30_000}, set(committed)
    # the switch's DELETE marked the day: the sensor re-runs it once visible. Only a rollup that started
    # after the switch committed (it read the new partition) may have cleared that mark.
    assert _pending(conn, day) or any(after_switch), committed
    rollups.rollup_days(conn, day, day + dt.timedelta(days=1))
    assert _sessions(conn, day) == (30_000, 30_000) and not _pending(conn, day)
