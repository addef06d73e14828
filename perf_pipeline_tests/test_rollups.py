"""Daily usage rollups on real PostgreSQL: exact numbers against an independent Python computation,
idempotent re-runs, range backfills in one run, late data re-running exactly its days, the checks, the
schedules and the dashboard's daily metrics view.

The data: 8 UTC days ending 3 days ago, one of them empty, four providers (one present on some days
only), ~20 % non-billable rows, and rows exactly on and just before midnight UTC written with non-UTC
offsets; the rollup runs on a session whose TimeZone is not UTC.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import threading
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import dagster as dg
import psycopg
import pytest

from perf_pipeline.defs.resources import PostgresResource, SettingsResource
from perf_pipeline.defs.rollups.assets import (
    CHECK_NO_MISSING_DAYS,
    CHECK_NON_NEGATIVE,
    CHECK_RECONCILED,
    usage_daily_metrics,
)
from perf_pipeline.defs.rollups.schedules import (
    close_yesterday_metrics,
    refresh_today_metrics,
)
from perf_pipeline.lib import rollups
from perf_pipeline.lib.migrations import MIGRATIONS_DIR
from perf_pipeline.lib.partitioning import add_months, ensure_partitions
from perf_pipeline.testing import AutomationLoop

# Dagster's run tags for a partition range
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"

UTC = dt.UTC
TODAY = dt.datetime.now(UTC).date()
DAYS = [TODAY - dt.timedelta(days=n) for n in range(10, 2, -1)]  # 8 days, oldest first
EMPTY_DAY = DAYS[3]
PROVIDERS = ["google", "assemblyai", "whisper", "deepgram"]
_RND = random.Random(7)
USERS = [uuid.UUID(int=_RND.getrandbits(128)) for _ in range(40)]
TZ_NOT_UTC = "America/Los_Angeles"


@dataclass(frozen=True)
class Row:
    user_id: uuid.UUID
    created_at: dt.datetime
    minutes: Decimal
    cost: Decimal
    billable: bool
    provider: str

    @classmethod
    def at(
        cls,
        user_id: uuid.UUID,
        day: dt.date,
        hour: int,
        minutes: str | int,
        cost: str | int,
        billable: bool = True,
        provider: str = "google",
    ) -> Row:
        """A row of ``day`` at ``hour``:00 UTC (``minutes`` and ``cost`` as Decimal literals)."""
        return cls(
            user_id,
            dt.datetime.combine(day, dt.time(hour), UTC),
            Decimal(minutes),
            Decimal(cost),
            billable,
            provider,
        )


def _generate() -> list[Row]:
    rnd = random.Random(2024)
    rows: list[Row] = []
    for i, day in enumerate(DAYS):
        if day == EMPTY_DAY:
            continue
        start = dt.datetime(day.year, day.month, day.day, tzinfo=UTC)
        providers = PROVIDERS if i % 2 == 0 else PROVIDERS[:3]
        for _ in range(150 + 20 * i):
            at = start + dt.timedelta(microseconds=rnd.randrange(86_400_000_000))
            rows.append(
                Row(
                    rnd.choice(USERS),
                    at,
                    Decimal(rnd.randrange(5, 9000)) / 100,
                    Decimal(rnd.randrange(0, 200000)) / 10000,
                    rnd.random() < 0.8,
                    rnd.choice(providers),
                )
            )
        # midnight edges, written with a +05:00 and a -08:00 offset: the first belongs to `day`, the last
        # microsecond of the day too, the next instant to the next day
        rows.append(
            Row(
                USERS[0],
                start.astimezone(dt.timezone(dt.timedelta(hours=5))),
                Decimal("1.00"),
                Decimal("0.5000"),
                True,
                "google",
            )
        )
        rows.append(
            Row(
                USERS[1],
                (start + dt.timedelta(days=1, microseconds=-1)).astimezone(
                    dt.timezone(dt.timedelta(hours=-8))
                ),
                Decimal("2.00"),
                Decimal("0.2500"),
                True,
                "whisper",
            )
        )
    return rows


ROWS = _generate()


def _insert(conn: psycopg.Connection, rows: list[Row]) -> None:
    with (
        conn.cursor() as cur,
        cur.copy(
            "COPY usage_log (user_id, created_at, duration_minutes, cost_usd, is_billable, stt_provider) FROM STDIN"
        ) as copy,
    ):
        for r in rows:
            copy.write_row((r.user_id, r.created_at, r.minutes, r.cost, r.billable, r.provider))


def _expected(rows: list[Row]) -> tuple[dict[dt.date, dict[str, Any]], dict[tuple[dt.date, str], tuple]]:
    """The rollup computed in Python, independently of the SQL."""
    days: dict[dt.date, dict[str, Any]] = {}
    providers: dict[tuple[dt.date, str], list] = defaultdict(lambda: [0, Decimal(0), Decimal(0)])
    for r in rows:
        day = r.created_at.astimezone(UTC).date()
        d = days.setdefault(
            day, {"sessions": 0, "minutes": Decimal(0), "revenue": Decimal(0), "users": set()}
        )
        d["sessions"] += 1
        d["minutes"] += r.minutes
        d["revenue"] += r.cost if r.billable else 0
        d["users"].add(r.user_id)
        p = providers[(day, r.provider)]
        p[0] += 1
        p[1] += r.minutes
        p[2] += r.cost if r.billable else 0
    return days, {k: tuple(v) for k, v in providers.items()}


@pytest.fixture(scope="module")
def loaded_url(db_url: str) -> str:
    """The module's database with the generated usage loaded (partitions created first)."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        ensure_partitions(conn, "usage_log", [DAYS[0] - dt.timedelta(days=1), TODAY])
        with conn.transaction():
            _insert(conn, ROWS)
    return db_url


@pytest.fixture
def conn(loaded_url: str) -> Iterator[psycopg.Connection]:
    """Autocommit connection whose session time zone is NOT UTC: day boundaries must not depend on it."""
    with psycopg.connect(loaded_url, autocommit=True, options=f"-c TimeZone={TZ_NOT_UTC}") as c:
        yield c


def _window() -> tuple[dt.date, dt.date]:
    return DAYS[0] - dt.timedelta(days=1), DAYS[-1] + dt.timedelta(days=2)  # a margin of empty days


def _table(conn: psycopg.Connection) -> dict[dt.date, tuple]:
    rows = conn.execute(
        "SELECT day, sessions, total_minutes, revenue, active_users, avg_duration, rows_scanned "
        "FROM usage_daily_metrics ORDER BY day"
    ).fetchall()
    return {r[0]: r[1:] for r in rows}


def _providers(conn: psycopg.Connection) -> dict[tuple[dt.date, str], tuple]:
    rows = conn.execute(
        "SELECT day, stt_provider, sessions, minutes, revenue FROM usage_daily_provider_metrics"
    ).fetchall()
    return {(r[0], r[1]): tuple(r[2:]) for r in rows}


def _resources(url: str) -> dict[str, Any]:
    return {"postgres": PostgresResource(url=url), "settings": SettingsResource()}


# --------------------------------------------------------------------------------------------- tests


def test_rollup_equals_independent_computation(conn: psycopg.Connection) -> None:
    start, end = _window()
    result = rollups.rollup_days(conn, start, end)
    assert result.reconciled, result.mismatches
    assert result.days == (end - start).days
    assert result.rows_scanned == result.sessions == len(ROWS)

    days, providers = _expected(ROWS)
    table = _table(conn)
    assert set(table) == {start + dt.timedelta(days=i) for i in range((end - start).days)}
    for day, (sessions, minutes, revenue, users, avg, scanned) in table.items():
        want = days.get(day)
        if want is None:  # no usage that day: a zero row (the day is rolled up), no average
            assert (sessions, minutes, revenue, users, avg, scanned) == (0, 0, 0, 0, None, 0), day
            continue
        assert (sessions, minutes, revenue, users, scanned) == (
            want["sessions"],
            want["minutes"],
            want["revenue"],
            len(want["users"]),
            want["sessions"],
        ), day
        assert abs(avg - want["minutes"] / want["sessions"]) < Decimal("1e-12"), day
    assert EMPTY_DAY in table and table[EMPTY_DAY][0] == 0
    assert _providers(conn) == providers
    assert {p for (_, p) in _providers(conn)} == set(PROVIDERS)  # every provider, not only two

    # the midnight edges landed on the UTC day, whatever the offset they were written with
    edge = DAYS[0]
    edge_rows = [r for r in ROWS if r.created_at.astimezone(UTC).date() == edge]
    assert table[edge][0] == len(edge_rows)

    sets = dict(conn.execute("SELECT day, user_ids FROM usage_daily_user_sets").fetchall())
    assert sets == {day: sorted(days[day]["users"]) if day in days else [] for day in table}


def test_rerun_is_idempotent_and_writes_nothing_new(conn: psycopg.Connection) -> None:
    start, end = _window()
    rollups.rollup_days(conn, start, end)
    before = (
        _table(conn),
        _providers(conn),
        conn.execute("SELECT * FROM usage_daily_user_sets ORDER BY day").fetchall(),
    )
    again = rollups.rollup_days(conn, start, end)
    after = (
        _table(conn),
        _providers(conn),
        conn.execute("SELECT * FROM usage_daily_user_sets ORDER BY day").fetchall(),
    )
    assert before == after
    assert (again.provider_rows_written, again.provider_rows_deleted, again.user_sets_written) == (0, 0, 0)


def test_one_day_equals_its_slice_of_a_range(conn: psycopg.Connection) -> None:
    start, end = _window()
    rollups.rollup_days(conn, start, end)
    ranged = _table(conn)
    conn.execute("DELETE FROM usage_daily_metrics")
    for day in DAYS:
        rollups.rollup_days(conn, day, day + dt.timedelta(days=1))
    assert {d: ranged[d] for d in DAYS} == _table(conn)


def test_provider_gone_from_a_day_is_deleted(conn: psycopg.Connection) -> None:
    day = DAYS[0]
    rollups.rollup_days(conn, day, day + dt.timedelta(days=1))
    conn.execute("INSERT INTO usage_daily_provider_metrics VALUES (%s, 'ghost', 1, 1, 1)", (day,))
    conn.execute(
        "UPDATE usage_daily_user_sets SET user_ids = user_ids || gen_random_uuid() WHERE day = %s", (day,)
    )
    result = rollups.rollup_days(conn, day, day + dt.timedelta(days=1))
    assert (result.provider_rows_deleted, result.user_sets_written) == (1, 1)
    assert (day, "ghost") not in _providers(conn)


def test_seed_view_has_the_seed_columns_and_values(conn: psycopg.Connection) -> None:
    start, end = _window()
    rollups.rollup_days(conn, start, end)
    conn.execute("SET TimeZone = 'UTC'")  # the original sketch's date_trunc works in the session zone
    with conn.cursor() as cur:
        cur.execute("SELECT * FROM dashboard_daily_metrics")
        columns = [c.name for c in cur.description]
        view = cur.fetchall()
    assert columns == [
        "day",
        "total_sessions",
        "total_minutes",
        "revenue",
        "active_users",
        "avg_duration",
        "google_sessions",
        "assemblyai_sessions",
    ]
    # the original sketch's materialized view query, verbatim but for the ::date, straight over usage_log
    sketch = conn.execute("""
        SELECT date_trunc('day', created_at)::date as day, count(*) as total_sessions,
               sum(duration_minutes) as total_minutes,
               sum(CASE WHEN is_billable THEN cost_usd ELSE 0 END) as revenue,
               count(DISTINCT user_id) as active_users, avg(duration_minutes) as avg_duration,
               count(*) FILTER (WHERE stt_provider = 'google') as google_sessions,
               count(*) FILTER (WHERE stt_provider = 'assemblyai') as assemblyai_sessions
        FROM usage_log WHERE created_at >= CURRENT_DATE - INTERVAL '90 days'
        GROUP BY date_trunc('day', created_at) ORDER BY day DESC""").fetchall()
    assert view == sketch
    assert EMPTY_DAY not in {r[0] for r in view}  # as in the original sketch: no usage, no row


def test_trends_weekly_monthly_active_users_are_exact(conn: psycopg.Connection) -> None:
    start, end = _window()
    rollups.rollup_days(conn, start, end)
    first, last = DAYS[1], DAYS[-1]
    in_range = [r for r in ROWS if first <= r.created_at.astimezone(UTC).date() <= last]
    for granularity, period_of in [
        ("daily", lambda d: d),
        ("weekly", lambda d: d - dt.timedelta(days=d.weekday())),
        ("monthly", lambda d: d.replace(day=1)),
    ]:
        trends = rollups.usage_trends(conn, first, last, granularity)
        json.dumps(trends)  # JSON-friendly
        expected: dict[dt.date, list[Row]] = defaultdict(list)
        for r in in_range:
            expected[period_of(r.created_at.astimezone(UTC).date())].append(r)
        periods = sorted({period_of(first + dt.timedelta(days=i)) for i in range((last - first).days + 1)})
        assert [t["period"] for t in trends] == [p.isoformat() for p in periods], granularity
        for t in trends:
            rows = expected.get(dt.date.fromisoformat(t["period"]), [])
            assert t["session_count"] == len(rows)
            assert t["active_users"] == len({r.user_id for r in rows}), (granularity, t["period"])
            assert t["total_minutes"] == pytest.approx(float(sum(r.minutes for r in rows)), abs=1e-9)
            assert t["total_cost"] == pytest.approx(float(sum(r.cost for r in rows if r.billable)), abs=1e-9)
            assert sum(p["session_count"] for p in t["providers"]) == len(rows)
            assert {p["provider"] for p in t["providers"]} == {r.provider for r in rows}
    # a week's distinct users is less than the sum of its days' (users come back): not additive
    daily = rollups.usage_trends(conn, first, last, "daily")
    weekly = rollups.usage_trends(conn, first, last, "weekly")
    assert sum(t["active_users"] for t in weekly) < sum(t["active_users"] for t in daily)

    breakdown = rollups.provider_breakdown(conn, first, last)
    counts = defaultdict(int)
    for r in in_range:
        counts[r.provider] += 1
    assert {b["provider"]: b["session_count"] for b in breakdown} == counts
    assert sum(b["percentage"] for b in breakdown) == pytest.approx(100, abs=0.05)
    with pytest.raises(rollups.RollupError):
        rollups.usage_trends(conn, first, last, "hourly")


def test_checks_detect_bad_numbers(conn: psycopg.Connection) -> None:
    start, end = _window()
    rollups.rollup_days(conn, start, end)
    day = DAYS[2]
    assert rollups.reconcile(conn, start, end) == []
    conn.execute(
        "UPDATE usage_daily_metrics SET revenue = revenue + 0.0001, sessions = -sessions WHERE day = %s",
        (day,),
    )
    conn.execute(
        "UPDATE usage_daily_provider_metrics SET minutes = minutes - 0.01 WHERE day = %s AND stt_provider "
        "= 'google'",
        (DAYS[4],),
    )
    bad = rollups.reconcile(conn, start, end)
    assert {(m.day, m.provider) for m in bad} == {(day, "*"), (DAYS[4], "google")}
    assert rollups.negative_days(conn, start, end) == [day]
    conn.execute("DELETE FROM usage_daily_metrics WHERE day = %s", (DAYS[5],))
    assert rollups.missing_days(conn, DAYS[0], DAYS[-1]) == [DAYS[5]]
    rollups.rollup_days(conn, start, end)  # repaired
    assert rollups.reconcile(conn, start, end) == [] and rollups.negative_days(conn, start, end) == []


def test_bad_numbers_are_rolled_back_and_fail_the_blocking_check(
    loaded_url: str, conn: psycopg.Connection
) -> None:
    """Fault injected in the database: a trigger corrupting revenue on write. The reconciliation sees it
    on the rollup's own snapshot, the rollup is rolled back, the blocking check fails, marks stay."""
    day = DAYS[4]
    rollups.rollup_days(conn, day, day + dt.timedelta(days=1))
    conn.execute("INSERT INTO usage_rollup_stale_days (day) VALUES (%s)", (day,))
    conn.execute("""
        CREATE FUNCTION test_corrupt_revenue() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN NEW.revenue := NEW.revenue + 1; RETURN NEW; END $$""")
    conn.execute(
        "CREATE TRIGGER corrupt BEFORE INSERT OR UPDATE ON usage_daily_metrics "
        "FOR EACH ROW EXECUTE FUNCTION test_corrupt_revenue()"
    )
    try:
        conn.execute(
            "UPDATE usage_daily_metrics SET computed_at = now() - interval '1 day' WHERE day = %s", (day,)
        )
        before = _table(conn)[day]  # the corrupting trigger ran once here: the state to keep
        run = dg.materialize(
            [usage_daily_metrics],
            partition_key=day.isoformat(),
            resources=_resources(loaded_url),
            instance=dg.DagsterInstance.ephemeral(),
            raise_on_error=False,
        )
        checks = {e.check_name: e for e in run.get_asset_check_evaluations()}
        assert not checks[CHECK_RECONCILED].passed
        assert checks[CHECK_RECONCILED].blocking
        assert checks[CHECK_RECONCILED].metadata["rolled_back"].value is True
        assert _table(conn)[day] == before  # untouched
        assert day in {r[0] for r in conn.execute("SELECT day FROM usage_rollup_stale_days")}
    finally:
        conn.execute("DROP TRIGGER corrupt ON usage_daily_metrics")
        conn.execute("DROP FUNCTION test_corrupt_revenue()")
    repaired = rollups.rollup_days(conn, day, day + dt.timedelta(days=1))
    assert repaired.committed and repaired.reconciled and repaired.stale_days_cleared == [day]


def test_late_rows_rerun_exactly_their_day(loaded_url: str, conn: psycopg.Connection) -> None:
    """The daemon's loop, by hand: observe_platform_tables reports a past day of usage_log changed (its
    late-data mark) and declarative automation requests exactly that day of usage_daily_metrics — only if it
    was rolled up before; today is the schedule's."""
    start, end = _window()
    conn.execute("DELETE FROM usage_rollup_stale_days")
    instance = dg.DagsterInstance.ephemeral()
    loop = AutomationLoop(loaded_url, instance)
    assert loop.tick()["usage_daily_metrics"] == set()  # days never rolled up: a backfill's business
    rolled = dg.materialize(
        [usage_daily_metrics],
        resources=_resources(loaded_url),
        instance=instance,
        tags={RANGE_START_TAG: start.isoformat(), RANGE_END_TAG: (end - dt.timedelta(days=1)).isoformat()},
    )
    assert rolled.success
    assert loop.tick()["usage_daily_metrics"] == set()  # nothing changed since

    late_day = DAYS[5]
    late = Row.at(USERS[3], late_day, 12, "7.77", "1.2345", provider="newprovider")
    now_row = Row(USERS[3], dt.datetime.now(UTC), Decimal("1.00"), Decimal("0.0100"), True, "google")
    _insert(conn, [late, now_row])  # today's row is the schedule's business: not marked
    not_rolled = DAYS[0] - dt.timedelta(days=30)  # marked, but never rolled up: left to its first rollup
    ensure_partitions(conn, "usage_log", [not_rolled])
    _insert(
        conn,
        [Row.at(USERS[4], not_rolled, 1, 1, 0, billable=False)],
    )
    assert {r[0] for r in conn.execute("SELECT day FROM usage_rollup_stale_days")} == {late_day, not_rolled}

    assert loop.tick()["usage_daily_metrics"] == {late_day.isoformat()}
    assert loop.tick()["usage_daily_metrics"] == set()  # requested once, even while its run is queued
    run = dg.materialize(
        [usage_daily_metrics],
        partition_key=late_day.isoformat(),
        resources=_resources(loaded_url),
        instance=instance,
    )
    assert run.success
    assert {e.check_name: e.passed for e in run.get_asset_check_evaluations()}[CHECK_RECONCILED]
    days, _ = _expected([*ROWS, late])
    assert _table(conn)[late_day][:3] == (
        days[late_day]["sessions"],
        days[late_day]["minutes"],
        days[late_day]["revenue"],
    )
    assert (late_day, "newprovider") in _providers(conn)
    assert {r[0] for r in conn.execute("SELECT day FROM usage_rollup_stale_days")} == {not_rolled}
    assert loop.tick()["usage_daily_metrics"] == set()

    # an UPDATE moving a row between two rolled-up days marks both: both requested (one backfill, one range)
    conn.execute(
        "UPDATE usage_log SET created_at = created_at + interval '1 day' "
        "WHERE created_at = %s AND stt_provider = 'newprovider'",
        (late.created_at,),
    )
    assert loop.tick()["usage_daily_metrics"] == {
        late_day.isoformat(),
        (late_day + dt.timedelta(days=1)).isoformat(),
    }
    moved = dg.materialize(
        [usage_daily_metrics],
        resources=_resources(loaded_url),
        instance=instance,
        tags={
            RANGE_START_TAG: late_day.isoformat(),
            RANGE_END_TAG: (late_day + dt.timedelta(days=1)).isoformat(),
        },
    )
    assert moved.success
    # a DELETE marks its day
    conn.execute("DELETE FROM usage_log WHERE stt_provider = 'newprovider'")
    assert loop.tick()["usage_daily_metrics"] == {(late_day + dt.timedelta(days=1)).isoformat()}
    rollups.rollup_days(conn, start, end)
    conn.execute(
        "DELETE FROM usage_log WHERE created_at >= %s AND created_at < %s",
        (rollups.day_start(not_rolled), rollups.day_start(not_rolled + dt.timedelta(days=1))),
    )
    conn.execute("DELETE FROM usage_rollup_stale_days")


def test_trigger_marks_past_days_only_at_the_utc_midnight_edge(conn: psycopg.Connection) -> None:
    """The boundary is today 00:00Z (not the session's zone): the last microsecond of yesterday is late,
    today's first instant is not. Other sessions' marks are not involved (own rows, deleted after)."""
    midnight = rollups.day_start(TODAY)
    ensure_partitions(conn, "usage_log", [TODAY - dt.timedelta(days=1), TODAY])
    conn.execute("DELETE FROM usage_rollup_stale_days")
    edge = [
        Row(USERS[6], midnight, Decimal(1), Decimal(0), True, "edge"),
        Row(USERS[6], midnight + dt.timedelta(hours=1), Decimal(1), Decimal(0), True, "edge"),
    ]
    _insert(conn, edge)
    assert conn.execute("SELECT count(*) FROM usage_rollup_stale_days").fetchone()[0] == 0
    _insert(
        conn, [Row(USERS[6], midnight - dt.timedelta(microseconds=1), Decimal(1), Decimal(0), True, "edge")]
    )
    assert [r[0] for r in conn.execute("SELECT day FROM usage_rollup_stale_days")] == [
        TODAY - dt.timedelta(days=1)
    ]
    conn.execute("DELETE FROM usage_log WHERE stt_provider = 'edge'")
    conn.execute("DELETE FROM usage_rollup_stale_days")


@pytest.mark.parametrize("mark_exists", [True, False])
def test_late_writer_in_flight_is_never_lost(
    loaded_url: str, conn: psycopg.Connection, mark_exists: bool
) -> None:
    """A late row committing while its day is rolled up is either counted or stays marked.

    With a committed mark already there, the writer locks it (FOR KEY SHARE): the rollup's claim waits
    for the writer's commit and then counts its rows. Without one, the writer's own mark is invisible to
    the claim: the rollup does not wait, does not count the rows, and the mark survives for the next run.
    """
    day = DAYS[6]
    rollups.rollup_days(conn, day, day + dt.timedelta(days=1))
    before = _table(conn)[day][0]
    if mark_exists:
        conn.execute("INSERT INTO usage_rollup_stale_days (day) VALUES (%s)", (day,))
    row = Row.at(USERS[5], day, 3, "3.00", "0.0300")
    box: dict[str, rollups.RollupResult] = {}
    with psycopg.connect(loaded_url) as writer:
        _insert(writer, [row])
        _insert(writer, [row])  # a second late row of the same day and transaction: no second mark write
        done = threading.Event()

        def roll() -> None:
            with psycopg.connect(loaded_url, autocommit=True) as c:
                box["r"] = rollups.rollup_days(c, day, day + dt.timedelta(days=1))
            done.set()

        thread = threading.Thread(target=roll)
        thread.start()
        assert done.wait(0.5) is not mark_exists  # waits for the writer only when it locked a mark
        writer.commit()
        thread.join(10)
    marks = {r[0] for r in conn.execute("SELECT day FROM usage_rollup_stale_days")}
    if mark_exists:
        assert box["r"].stale_days_cleared == [day]
        assert _table(conn)[day][0] == before + 2 and day not in marks
    else:
        assert box["r"].stale_days_cleared == []
        assert _table(conn)[day][0] == before and day in marks  # not counted, still marked
    conn.execute(
        "DELETE FROM usage_log WHERE created_at = %s AND user_id = %s", (row.created_at, row.user_id)
    )
    rollups.rollup_days(conn, day, day + dt.timedelta(days=1))
    assert rollups.reconcile(conn, day, day + dt.timedelta(days=1)) == []


def test_asset_materializes_a_range_in_one_run_with_checks_and_metadata(
    loaded_url: str, conn: psycopg.Connection
) -> None:
    conn.execute("DELETE FROM usage_daily_metrics")
    first, last = DAYS[0].isoformat(), DAYS[-1].isoformat()
    instance = dg.DagsterInstance.ephemeral()
    run = dg.materialize(
        [usage_daily_metrics],
        resources=_resources(loaded_url),
        instance=instance,
        tags={RANGE_START_TAG: first, RANGE_END_TAG: last},
    )
    assert run.success
    mats = run.asset_materializations_for_node("usage_daily_metrics")
    assert sorted(m.partition for m in mats) == [d.isoformat() for d in DAYS]  # one run, every day
    days, _ = _expected(ROWS)
    for m in mats:
        day = dt.date.fromisoformat(m.partition)
        want = days.get(day, {"sessions": 0, "revenue": Decimal(0), "users": set()})
        # each day carries its own numbers, never the run's totals
        assert m.metadata["sessions"].value == want["sessions"] == m.metadata["dagster/row_count"].value
        assert m.metadata["revenue_usd"].value == pytest.approx(round(float(want["revenue"]), 2))
        assert m.metadata["active_users"].value == len(want["users"])
        # the run's own figures are named as such (Dagster copies them onto every day)
        assert m.metadata["run_days"].value == len(DAYS)
        assert m.metadata["run_rows_read"].value == len(ROWS)
    assert len({m.metadata["sessions"].value for m in mats}) > 3
    checks = {e.check_name: e for e in run.get_asset_check_evaluations()}
    assert checks[CHECK_RECONCILED].passed and checks[CHECK_NON_NEGATIVE].passed
    # most of the last 90 days were never rolled up here: the (non-blocking) gap check says so
    assert not checks[CHECK_NO_MISSING_DAYS].passed
    assert checks[CHECK_NO_MISSING_DAYS].metadata["missing_days"].value > 70
    assert set(_table(conn)) == set(DAYS)


def test_schedules_target_today_and_yesterday() -> None:
    at = dt.datetime(2025, 8, 14, 0, 30, tzinfo=UTC)
    ctx = dg.build_schedule_context(scheduled_execution_time=at)
    today = refresh_today_metrics(ctx)
    assert today.partition_key == "2025-08-14"
    assert refresh_today_metrics.cron_schedule == "*/30 * * * *"
    closing = close_yesterday_metrics(
        dg.build_schedule_context(scheduled_execution_time=dt.datetime(2025, 8, 14, 2, 0, tzinfo=UTC))
    )
    assert closing.partition_key == "2025-08-13"
    assert close_yesterday_metrics.cron_schedule == "0 2 * * *"


def test_bad_window_is_refused(conn: psycopg.Connection) -> None:
    with pytest.raises(rollups.RollupError):
        rollups.rollup_days(conn, DAYS[1], DAYS[1])
    with psycopg.connect(conn.info.dsn) as not_autocommit, pytest.raises(rollups.RollupError):
        rollups.rollup_days(not_autocommit, DAYS[1], DAYS[2])


def _period_of(day: dt.date, unit: str) -> dt.date:
    return day - dt.timedelta(days=day.weekday()) if unit == "week" else day.replace(day=1)


def _period_end(period: dt.date, unit: str) -> dt.date:
    if unit == "week":
        return period + dt.timedelta(days=6)
    return add_months(period, 1) - dt.timedelta(days=1)


def _users_by_day(conn: psycopg.Connection) -> dict[dt.date, set[uuid.UUID]]:
    """Distinct users per UTC day straight from usage_log (independent of every rollup table)."""
    by_day: dict[dt.date, set[uuid.UUID]] = defaultdict(set)
    for day, user in conn.execute(
        "SELECT (created_at AT TIME ZONE 'UTC')::date, user_id FROM usage_log WHERE user_id IS NOT NULL"
    ):
        by_day[day].add(user)
    return by_day


def _assert_trend_users_exact(
    conn: psycopg.Connection, by_day: dict[dt.date, set[uuid.UUID]], first: dt.date, last: dt.date
) -> None:
    for granularity, unit in (("weekly", "week"), ("monthly", "month")):
        got = {t["period"]: t["active_users"] for t in rollups.usage_trends(conn, first, last, granularity)}
        want: dict[str, set[uuid.UUID]] = defaultdict(set)
        for i in range((last - first).days + 1):
            day = first + dt.timedelta(days=i)
            want[_period_of(day, unit).isoformat()] |= by_day.get(day, set())
        assert got == {p: len(users) for p, users in want.items()}, (granularity, first, last)


def test_period_user_sets_keep_weekly_monthly_users_exact_for_any_range(conn: psycopg.Connection) -> None:
    """usage_period_user_sets (0070): written for the closed days of the window's weeks and months only,
    equal to the union of their days' users, used by ranges starting on a period's first day, and
    every range, aligned or not, still counts exactly the distinct users of its days."""
    start, end = _window()
    first = min(start - dt.timedelta(days=3), _period_of(start, "month"))
    rollups.rollup_days(conn, first, TODAY + dt.timedelta(days=1))  # every day queried below is rolled up
    again = rollups.rollup_days(conn, first, TODAY + dt.timedelta(days=1))
    assert again.period_sets_written == 0  # nothing changed, last_day unchanged: nothing rewritten
    today_only = rollups.rollup_days(conn, TODAY, TODAY + dt.timedelta(days=1))
    assert today_only.period_sets_written == 0  # the 30-minute refresh never touches period sets

    by_day = _users_by_day(conn)
    stored = conn.execute(
        "SELECT unit, period, last_day, user_ids, active_users FROM usage_period_user_sets"
    ).fetchall()
    expected_keys = {
        (unit, _period_of(first + dt.timedelta(days=i), unit))
        for unit in ("week", "month")
        for i in range((TODAY - first).days)  # closed days only
    }
    assert {(u, p) for u, p, *_ in stored} == expected_keys
    for unit, period, last_day, user_ids, active_users in stored:
        assert last_day == min(_period_end(period, unit), TODAY - dt.timedelta(days=1))
        want = set().union(
            *(by_day.get(period + dt.timedelta(days=i), set()) for i in range((last_day - period).days + 1))
        )
        assert user_ids == sorted(want) and active_users == len(want), (unit, period)

    # every range of the last ~2 weeks, plus ranges starting on each period's first day
    starts = {first + dt.timedelta(days=i) for i in range((TODAY - first).days + 1)}
    starts |= {_period_of(d, unit) for d in list(starts) for unit in ("week", "month")}
    for s in sorted(starts):
        for e in sorted({s, DAYS[2], DAYS[-1], TODAY - dt.timedelta(days=1), TODAY}):
            if s <= e:
                _assert_trend_users_exact(conn, by_day, s, e)

    # aligned ranges read the period rows, not the closed days' sets: without those sets, same answer
    aligned_month = rollups.usage_trends(conn, _period_of(first, "month"), TODAY, "monthly")
    aligned_week = rollups.usage_trends(conn, _period_of(DAYS[0], "week"), TODAY, "weekly")
    with conn.transaction(force_rollback=True):
        gone = conn.execute(
            "DELETE FROM usage_daily_user_sets WHERE day < %s", (TODAY - dt.timedelta(days=1),)
        ).rowcount
        assert gone >= len(DAYS)
        assert rollups.usage_trends(conn, _period_of(first, "month"), TODAY, "monthly") == aligned_month
        assert rollups.usage_trends(conn, _period_of(DAYS[0], "week"), TODAY, "weekly") == aligned_week

    # a late row of a new user on a closed day: its week and month are recomputed, the counts follow
    newcomer = uuid.UUID(int=_RND.getrandbits(128))
    late = Row.at(newcomer, DAYS[2], 9, "1.00", "0.1")
    _insert(conn, [late])
    try:
        rerun = rollups.rollup_days(conn, DAYS[2], DAYS[2] + dt.timedelta(days=1))
        assert rerun.period_sets_written == 2  # its ISO week and its month
        by_day = _users_by_day(conn)
        assert newcomer in by_day[DAYS[2]]
        _assert_trend_users_exact(conn, by_day, _period_of(DAYS[2], "month"), TODAY)
        _assert_trend_users_exact(conn, by_day, _period_of(DAYS[2], "week"), TODAY)
    finally:
        conn.execute("DELETE FROM usage_log WHERE user_id = %s", (newcomer,))
        rollups.rollup_days(conn, DAYS[2], DAYS[2] + dt.timedelta(days=1))
    _assert_trend_users_exact(conn, _users_by_day(conn), _period_of(first, "month"), TODAY)


def test_migration_0070_backfills_period_sets_of_existing_history(conn: psycopg.Connection) -> None:
    """An upgraded database gets its period rows from the day sets already there (the migration's
    INSERT), and reads from them are exact."""
    start, end = _window()
    rollups.rollup_days(conn, start, end)
    backfill = (MIGRATIONS_DIR / "0070_usage_period_user_sets.sql").read_text()
    backfill = backfill[backfill.index("INSERT INTO usage_period_user_sets") :]
    with conn.transaction(force_rollback=True):
        conn.execute("DELETE FROM usage_period_user_sets")
        conn.execute(backfill)
        rows = conn.execute(
            "SELECT count(*), min(last_day), max(last_day) FROM usage_period_user_sets"
        ).fetchone()
        assert rows[0] >= 2 and rows[2] < TODAY
        _assert_trend_users_exact(
            conn, _users_by_day(conn), _period_of(start, "month"), end - dt.timedelta(days=1)
        )
