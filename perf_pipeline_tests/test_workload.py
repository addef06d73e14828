"""The workload generator: counts, reproducibility, partition placement, realistic shape."""

from __future__ import annotations

import datetime as dt

import psycopg
import pytest

from perf_pipeline.lib.migrations import apply_migrations
from perf_pipeline.lib.partitioning import partition_name
from perf_pipeline.lib.workload import WorkloadError, WorkloadSpec, load_workload
from perf_pipeline_tests.conftest import create_database, drop_database

# ends mid-day on a month boundary's second day: data spans three months and a partial last day
END = dt.datetime(2025, 10, 2, 6, 0, tzinfo=dt.UTC)
SPEC = WorkloadSpec(days=40, usage_per_day=300, audit_per_day=500, users=200, seed=7, end=END)


@pytest.fixture(scope="module")
def loaded(db_url: str) -> str:
    result = load_workload(db_url, SPEC)
    assert result.usage_rows == SPEC.total_rows(300) and result.audit_rows == SPEC.total_rows(500)
    return db_url


def test_row_counts(loaded: str) -> None:
    with psycopg.connect(loaded) as conn:
        (usage,) = conn.execute("SELECT count(*) FROM usage_log").fetchone()
        (audit,) = conn.execute("SELECT count(*) FROM audit_log").fetchone()
        (sessions,) = conn.execute("SELECT count(*) FROM session").fetchone()
    assert usage == sessions == 39 * 300 + 75  # 39 full days + a quarter of the last
    assert audit == 39 * 500 + 125


def test_rows_land_in_their_month_partition(loaded: str) -> None:
    with psycopg.connect(loaded) as conn:
        for table, column in (("audit_log", "timestamp"), ("usage_log", "created_at")):
            rows = conn.execute(
                f"SELECT tableoid::regclass::text, date_trunc('month', \"{column}\" AT TIME ZONE 'UTC')::date, count(*) "
                f"FROM {table} GROUP BY 1, 2"
            ).fetchall()
            assert len(rows) == 3  # August, September, October
            for part, month, _count in rows:
                assert part == partition_name(table, month)
            (default,) = conn.execute(f"SELECT count(*) FROM {table}_default").fetchone()
            assert default == 0


def test_time_span_and_partial_last_day(loaded: str) -> None:
    with psycopg.connect(loaded) as conn:
        lo, hi = conn.execute("SELECT min(created_at), max(created_at) FROM usage_log").fetchone()
    assert lo >= dt.datetime(2025, 8, 24, tzinfo=dt.UTC)
    assert hi < END


def test_shape_is_realistic(loaded: str) -> None:
    with psycopg.connect(loaded) as conn:
        providers = dict(conn.execute("SELECT stt_provider, count(*) FROM usage_log GROUP BY 1").fetchall())
        (billable,) = conn.execute("SELECT avg(is_billable::int) FROM usage_log").fetchone()
        statuses = {r[0] for r in conn.execute("SELECT DISTINCT status FROM session")}
        severities = dict(conn.execute("SELECT severity, count(*) FROM audit_log GROUP BY 1").fetchall())
        (top_user_share,) = conn.execute(
            "SELECT max(c)::float / sum(c) FROM (SELECT count(*) c FROM usage_log GROUP BY user_id) t"
        ).fetchone()
        (bad_sessions,) = conn.execute(
            "SELECT count(*) FROM session WHERE updated_at < created_at"
        ).fetchone()
    assert set(providers) == {"google", "assemblyai", "whisper"}
    assert providers["google"] > providers["assemblyai"] > providers["whisper"]
    assert 0.75 < billable < 0.85
    assert statuses == {"created", "processing", "completed", "failed"}
    assert (
        severities["low"]
        > severities["medium"]
        > severities.get("high", 0) + severities.get("critical", 0)
        > 0
    )
    assert top_user_share > 5 / 200  # Zipf: the heaviest user has far more than a uniform share
    assert bad_sessions == 0


def _fingerprint(url: str) -> tuple:
    with psycopg.connect(url) as conn:
        return (
            conn.execute("SELECT md5(string_agg(t::text, ',' ORDER BY t.id)) FROM audit_log t").fetchone()[0],
            conn.execute(
                "SELECT md5(string_agg(concat_ws('|', user_id, session_id, created_at, duration_minutes, cost_usd, "
                "is_billable, stt_provider), ',' ORDER BY created_at, session_id)) FROM usage_log"
            ).fetchone()[0],
            conn.execute("SELECT md5(string_agg(s::text, ',' ORDER BY s.id)) FROM session s").fetchone()[0],
        )


def test_same_seed_gives_identical_rows_other_seed_differs(loaded: str, pg_server_url: str) -> None:
    small = WorkloadSpec(days=40, usage_per_day=300, audit_per_day=500, users=200, seed=7, end=END)
    other = WorkloadSpec(days=40, usage_per_day=300, audit_per_day=500, users=200, seed=8, end=END)
    urls = [create_database(pg_server_url) for _ in range(2)]
    try:
        for url, spec in zip(urls, (small, other), strict=True):
            apply_migrations(url)
            load_workload(url, spec, workers=1)  # a different worker count must not change the rows
        assert _fingerprint(urls[0]) == _fingerprint(loaded)
        assert _fingerprint(urls[1]) != _fingerprint(loaded)
    finally:
        for url in urls:
            drop_database(pg_server_url, url)


def test_loading_into_existing_partitions_goes_through_the_parent(db_url: str) -> None:
    # the module's data already created Aug-Oct 2025; a second load into the same months must append
    extra = WorkloadSpec(
        days=2,
        usage_per_day=10,
        audit_per_day=10,
        users=5,
        seed=99,
        end=dt.datetime(2025, 9, 10, tzinfo=dt.UTC),
    )
    with psycopg.connect(db_url) as conn:
        (before,) = conn.execute("SELECT count(*) FROM audit_log").fetchone()
    load_workload(db_url, extra)
    with psycopg.connect(db_url) as conn:
        (after,) = conn.execute("SELECT count(*) FROM audit_log").fetchone()
        (default,) = conn.execute("SELECT count(*) FROM audit_log_default").fetchone()
    assert after - before == extra.total_rows(10) and default == 0


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"days": 0}, "days"),
        ({"users": 0}, "users"),
        ({"usage_per_day": -1}, "usage_per_day"),
        ({"end": dt.datetime(2025, 1, 1)}, "end"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, name: str) -> None:
    base = {"days": 1, "usage_per_day": 1, "audit_per_day": 1}
    with pytest.raises(WorkloadError, match=name):
        WorkloadSpec(**(base | kwargs))
