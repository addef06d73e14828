"""The dashboard HTTP API on real PostgreSQL and Redis: values against SQL computed straight from
usage_log, auth, parameter validation, OpenAPI, /healthz, and Redis stopped mid-test (private server)."""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import psycopg_pool
import pytest
import redis as redis_lib
from fastapi.testclient import TestClient
from psycopg.rows import dict_row

from perf_pipeline.api.app import KpisResponse, TrendsResponse, create_app
from perf_pipeline.embedded import launch_redis_server
from perf_pipeline.lib import cache as cache_lib
from perf_pipeline.lib.cache import DashboardCache, serving_client
from perf_pipeline.lib.dashboard import TrendRequest, compute_kpis
from perf_pipeline.lib.rollups import rollup_days
from perf_pipeline.settings import Settings, SettingsError
from perf_pipeline.testing import asgi_request, free_port, serve_api, silent_server

ADMIN = "admin-token-0123456789abcdef"
USER = "user-token-0123456789abcdef"
FIRST_DAY = dt.date(2025, 6, 1)
LAST_DAY = dt.date(2025, 9, 10)
SETTINGS = Settings(admin_tokens=(ADMIN,), user_tokens=(USER,))
AUTH = {"Authorization": f"Bearer {ADMIN}"}
TRENDS = "/api/v1/admin/dashboard/usage-trends"
KPIS = "/api/v1/admin/dashboard/kpis"
EXPORT = "/api/v1/exports/{request_id}"
EXPORT_FILE = "/api/v1/exports/{request_id}/file"


@pytest.fixture(scope="module")
def usage_db(db_url: str) -> str:
    """~100 days of usage (3 providers, 37 users, some non-billable rows), rolled up, plus live sessions."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("""
            INSERT INTO usage_log (user_id, session_id, created_at, duration_minutes, cost_usd, is_billable,
                                   stt_provider)
            SELECT md5('user' || (i * 7 % 37))::uuid, gen_random_uuid(),
                   timestamptz '2025-06-01 00:00Z' + i * interval '37 minutes',
                   (i % 50) + 0.25, ((i % 50) + 0.25) * 0.0125, i % 5 <> 0,
                   (ARRAY['google', 'assemblyai', 'whisper'])[1 + i % 3]
            FROM generate_series(0, 3900) AS i""")
        # the last few hours, relative to now, for the KPIs
        conn.execute("""
            INSERT INTO usage_log (user_id, session_id, created_at, duration_minutes, cost_usd, is_billable,
                                   stt_provider)
            SELECT gen_random_uuid(), gen_random_uuid(), now() - i * interval '7 minutes', 3 + i, 0.1 * i, true,
                   'google'
            FROM generate_series(1, 30) AS i""")
        conn.execute("""
            INSERT INTO session (user_id, status, created_at, updated_at)
            SELECT gen_random_uuid(), s, now() - interval '2 hours', now() - interval '10 minutes'
            FROM unnest(ARRAY['processing', 'processing', 'failed', 'completed']) AS s""")
        rollup_days(conn, FIRST_DAY, LAST_DAY + dt.timedelta(days=1))
    return db_url


@pytest.fixture(scope="module")
def pool(usage_db: str) -> Iterator[psycopg_pool.ConnectionPool]:
    with psycopg_pool.ConnectionPool(usage_db, min_size=1, max_size=4, kwargs={"autocommit": True}) as p:
        yield p


def _client(
    redis_url: str, pool: psycopg_pool.ConnectionPool, **kwargs: Any
) -> tuple[TestClient, DashboardCache]:
    cache = DashboardCache(serving_client(redis_url, 200), pool.connection, **kwargs)
    return TestClient(create_app(SETTINGS, cache)), cache


def sql_trends(
    conn: psycopg.Connection, start: dt.date, end: dt.date, granularity: str
) -> list[dict[str, Any]]:
    """The oracle: trends straight from usage_log (not the rollups), periods that have usage."""
    unit = {"daily": "day", "weekly": "week", "monthly": "month"}[granularity]
    q = """
        SELECT date_trunc(%(unit)s, created_at AT TIME ZONE 'UTC')::date AS period,
               count(*) AS session_count, sum(duration_minutes)::float8 AS total_minutes,
               coalesce(sum(cost_usd) FILTER (WHERE is_billable), 0)::float8 AS total_cost,
               count(DISTINCT user_id) AS active_users, avg(duration_minutes)::float8 AS avg_duration
        FROM usage_log
        WHERE created_at >= %(start)s::date AT TIME ZONE 'UTC'
          AND created_at < (%(end)s::date + 1) AT TIME ZONE 'UTC'
        GROUP BY 1 ORDER BY 1"""
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(q, {"unit": unit, "start": start, "end": end}).fetchall()
        prov = cur.execute(
            q.replace("AS period,", "AS period, stt_provider,").replace(
                "GROUP BY 1 ORDER BY 1", "GROUP BY 1, 2 ORDER BY 1, 2"
            ),
            {"unit": unit, "start": start, "end": end},
        ).fetchall()
    for r in rows:
        r["providers"] = {
            p["stt_provider"]: (p["session_count"], p["total_minutes"], p["total_cost"])
            for p in prov
            if p["period"] == r["period"]
        }
    return rows


def assert_trends_equal(api: dict[str, Any], oracle: list[dict[str, Any]]) -> None:
    served = [p for p in api["transcription_trend"] if p["session_count"] > 0]
    assert [dt.date.fromisoformat(p["period"]) for p in served] == [r["period"] for r in oracle]
    for p, r in zip(served, oracle, strict=True):
        assert p["session_count"] == r["session_count"]
        assert p["active_users"] == r["active_users"]
        assert p["total_minutes"] == pytest.approx(r["total_minutes"])
        assert p["total_cost"] == pytest.approx(r["total_cost"])
        assert p["avg_duration"] == pytest.approx(r["avg_duration"])
        got = {x["provider"]: (x["session_count"], x["minutes"], x["revenue"]) for x in p["providers"]}
        assert got.keys() == r["providers"].keys()
        for name, (count, minutes, revenue) in r["providers"].items():
            assert got[name][0] == count
            assert got[name][1] == pytest.approx(minutes)
            assert got[name][2] == pytest.approx(revenue)


# ------------------------------------------------------------------------------------------ values


@pytest.mark.parametrize(
    "granularity,start,end",
    [
        ("daily", dt.date(2025, 8, 1), dt.date(2025, 8, 14)),
        ("weekly", dt.date(2025, 6, 4), dt.date(2025, 8, 20)),
        ("monthly", dt.date(2025, 6, 1), dt.date(2025, 9, 10)),
    ],
)
def test_usage_trends_equal_sql(
    redis_url: str,
    pool: psycopg_pool.ConnectionPool,
    usage_db: str,
    granularity: str,
    start: dt.date,
    end: dt.date,
) -> None:
    client, cache = _client(redis_url, pool)
    params = {"start_date": start.isoformat(), "end_date": end.isoformat(), "granularity": granularity}
    first = client.get(TRENDS, params=params, headers=AUTH)
    assert first.status_code == 200, first.text
    body = first.json()
    TrendsResponse.model_validate(body)  # bodies are served as cached, so check them against the schema
    assert first.headers["content-type"] == "application/json"
    assert body["period"] == {
        "start_date": start.isoformat(),
        "end_date": end.isoformat(),
        "granularity": granularity,
    }
    with psycopg.connect(usage_db) as conn:
        oracle = sql_trends(conn, start, end, granularity)
    assert_trends_equal(body, oracle)

    total = sum(r["session_count"] for r in oracle)
    breakdown = {b["provider"]: b for b in body["provider_breakdown"]}
    assert set(breakdown) == {"google", "assemblyai", "whisper"}
    for name, b in breakdown.items():
        expected = sum(r["providers"].get(name, (0,))[0] for r in oracle)
        assert b["session_count"] == expected > 0  # the original sketch summed an exhausted cursor: always 0
        assert b["percentage"] == pytest.approx(100 * expected / total, abs=0.01)

    # the second request is a cache hit with the same body
    second = client.get(TRENDS, params=params, headers=AUTH)
    assert second.json() == body
    key = cache_lib.trends_key(TrendRequest(start, end, granularity))  # type: ignore[arg-type]
    assert cache.recomputations[key] == 1 and cache.counts["hit"] == 1


def test_kpis_equal_sql(redis_url: str, pool: psycopg_pool.ConnectionPool, usage_db: str) -> None:
    client, cache = _client(redis_url, pool)
    body = client.get(KPIS, headers=AUTH).json()
    KpisResponse.model_validate(body)
    with psycopg.connect(usage_db) as conn:
        expected = compute_kpis(conn, dt.datetime.fromisoformat(body["timestamp"]))
    assert body == expected
    kpis = body["real_time"]
    assert kpis["active_transcriptions"] == 2 and kpis["failed_last_hour"] == 1
    assert kpis["transcriptions_last_hour"] == 8  # rows at now - 7, 14, … 56 minutes
    assert client.get(KPIS, headers=AUTH).json() == body
    assert cache.counts == {"miss": 1, "hit": 1}


# -------------------------------------------------------------------------------------------- auth


def test_auth_401_403_200(redis_url: str, pool: psycopg_pool.ConnectionPool) -> None:
    client, _ = _client(redis_url, pool)
    params = {"start_date": "2025-08-01", "end_date": "2025-08-02"}
    for path, p in ((KPIS, None), (TRENDS, params)):
        missing = client.get(path, params=p)
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert (
            client.get(path, params=p, headers={"Authorization": "Bearer not-a-known-token-xx"}).status_code
            == 401
        )
        assert client.get(path, params=p, headers={"Authorization": f"Basic {ADMIN}"}).status_code == 401
        assert client.get(path, params=p, headers={"Authorization": f"Bearer {ADMIN}x"}).status_code == 401
        forbidden = client.get(path, params=p, headers={"Authorization": f"Bearer {USER}"})
        assert forbidden.status_code == 403 and forbidden.json()["detail"] == "admin role required"
        assert client.get(path, params=p, headers=AUTH).status_code == 200


def test_no_configured_tokens_means_nobody_gets_in(redis_url: str, pool: psycopg_pool.ConnectionPool) -> None:
    cache = DashboardCache(serving_client(redis_url, 200), pool.connection)
    client = TestClient(create_app(Settings(), cache))
    assert client.get(KPIS, headers={"Authorization": "Bearer "}).status_code == 401
    assert client.get(KPIS, headers=AUTH).status_code == 401


# ---------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "params,message",
    [
        ({"start_date": "2025-13-01", "end_date": "2025-08-02"}, "valid date"),
        ({"start_date": "yesterday", "end_date": "2025-08-02"}, "valid date"),
        ({"end_date": "2025-08-02"}, "Field required"),
        ({"start_date": "2025-08-10", "end_date": "2025-08-01"}, "is before start_date"),
        ({"start_date": "2024-01-01", "end_date": "2025-08-01"}, "at most 366 days"),
        (
            {"start_date": "2019-01-01", "end_date": "2025-08-01", "granularity": "monthly"},
            "at most 1096 days",
        ),
        ({"start_date": "2025-08-01", "end_date": "2025-08-02", "granularity": "hourly"}, "daily"),
    ],
)
def test_bad_parameters_are_422_and_nothing_is_cached(
    redis_url: str,
    redis_client: redis_lib.Redis,
    pool: psycopg_pool.ConnectionPool,
    params: dict[str, str],
    message: str,
) -> None:
    client, cache = _client(redis_url, pool)
    response = client.get(TRENDS, params=params, headers=AUTH)
    assert response.status_code == 422, response.text
    assert message in response.text
    assert not cache.recomputations and not cache.counts
    assert redis_client.dbsize() == 0


def test_openapi_schema_documents_the_endpoints(redis_url: str, pool: psycopg_pool.ConnectionPool) -> None:
    client, _ = _client(redis_url, pool)
    schema = client.get("/openapi.json").json()
    assert {KPIS, TRENDS, "/healthz"} <= set(schema["paths"])
    trends = schema["paths"][TRENDS]["get"]
    assert {p["name"] for p in trends["parameters"]} == {"start_date", "end_date", "granularity"}
    assert trends["security"] == [{"HTTPBearer": []}]
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert "TrendsResponse" in schema["components"]["schemas"]


# ------------------------------------------------------------------------------ Redis down, health


def test_healthz_reports_postgres_and_redis(
    private_redis: tuple[str, Path, int], pool: psycopg_pool.ConnectionPool
) -> None:
    url, _, _ = private_redis
    client, _ = _client(url, pool)
    ok = client.get("/healthz")
    assert ok.status_code == 200
    assert ok.json()["status"] == "ok" and ok.json()["postgres"]["ok"] and ok.json()["redis"]["ok"]
    with contextlib.suppress(redis_lib.ConnectionError):
        redis_lib.Redis.from_url(url).shutdown(nosave=True)
    degraded = client.get("/healthz")
    assert degraded.status_code == 200  # still serving, from SQL
    assert degraded.json()["status"] == "degraded" and not degraded.json()["redis"]["ok"]
    assert degraded.json()["redis"]["error"]


def test_redis_stopped_mid_test_serves_from_sql_then_refills(
    private_redis: tuple[str, Path, int], pool: psycopg_pool.ConnectionPool
) -> None:
    import time

    url, root, port = private_redis
    client, cache = _client(url, pool, retry_after_s=0.3)
    params = {"start_date": "2025-07-01", "end_date": "2025-07-31", "granularity": "weekly"}
    trends = client.get(TRENDS, params=params, headers=AUTH).json()
    kpis = client.get(KPIS, headers=AUTH).json()
    assert cache.counts["miss"] == 2

    with contextlib.suppress(redis_lib.ConnectionError):
        redis_lib.Redis.from_url(url).shutdown(nosave=True)
    for _ in range(3):
        r = client.get(TRENDS, params=params, headers=AUTH)
        assert r.status_code == 200 and r.json() == trends
        k = client.get(KPIS, headers=AUTH)
        assert k.status_code == 200 and k.json()["real_time"] == kpis["real_time"]
    assert cache.counts["fallback"] == 6

    launch_redis_server(root, port)
    time.sleep(0.35)
    assert client.get(TRENDS, params=params, headers=AUTH).json() == trends
    assert client.get(KPIS, headers=AUTH).status_code == 200
    restarted = redis_lib.Redis.from_url(url)
    key = cache_lib.trends_key(TrendRequest(dt.date(2025, 7, 1), dt.date(2025, 7, 31), "weekly"))
    assert restarted.exists(key) and restarted.exists(cache_lib.KPIS_KEY)  # refilled
    assert client.get(TRENDS, params=params, headers=AUTH).json() == trends
    assert cache.counts["hit"] == 1 and cache.counts["miss"] == 4


def test_database_down_is_503_unless_cached(redis_url: str, pool: psycopg_pool.ConnectionPool) -> None:
    from contextlib import contextmanager

    @contextmanager
    def unreachable() -> Iterator[psycopg.Connection]:
        # a real refused connection (nothing listens on port 1), not a mock
        with psycopg.connect("postgresql://postgres@127.0.0.1:1/postgres", connect_timeout=2) as conn:
            yield conn

    good, _ = _client(redis_url, pool)
    cached = good.get(KPIS, headers=AUTH).json()  # fills Redis while PostgreSQL is reachable
    down = TestClient(create_app(SETTINGS, DashboardCache(serving_client(redis_url, 200), unreachable)))
    assert down.get(KPIS, headers=AUTH).json() == cached  # still served from Redis
    missing = down.get(TRENDS, params={"start_date": "2025-07-01", "end_date": "2025-07-02"}, headers=AUTH)
    assert missing.status_code == 503 and missing.json() == {"detail": "the database is unavailable"}
    health = down.get("/healthz")
    assert (
        health.status_code == 503
        and health.json()["status"] == "down"
        and not health.json()["postgres"]["ok"]
    )


def test_perf_pipeline_serve_runs_the_api(usage_db: str, redis_url: str) -> None:
    import httpx

    env = {
        "PERF_PIPELINE_DATABASE_URL": usage_db,
        "PERF_PIPELINE_REDIS_URL": redis_url,
        "PERF_PIPELINE_ADMIN_TOKENS": ADMIN,
    }
    with serve_api(env, workers=1, timeout=30) as server:
        base = server.base
        health = httpx.get(f"{base}/healthz", timeout=2)
        assert health.status_code == 200 and health.json()["status"] == "ok"
        assert httpx.get(f"{base}{KPIS}").status_code == 401
        kpis = httpx.get(f"{base}{KPIS}", headers=AUTH)
        assert kpis.status_code == 200 and kpis.json()["real_time"]["active_transcriptions"] == 2
    assert server.stopped_cleanly  # SIGTERM stops it (and its workers) within 15 s


# ------------------------------------------------------------------------- the near-cache fast path


def _scope(app: Any, path: str, query: bytes = b"", auth: list[bytes] | None = None) -> dict[str, Any]:
    headers = [(b"authorization", a) for a in (auth if auth is not None else [f"Bearer {ADMIN}".encode()])]
    return {
        "type": "http",
        "method": "GET",
        "path": path,
        "query_string": query,
        "headers": headers,
        "app": app,
    }


def test_served_app_needs_configured_urls(redis_url: str) -> None:
    """The app factory never looks for an embedded server: an unset URL stops it at once, naming the
    variable (``perf-pipeline serve`` sets both before it builds the app)."""
    with pytest.raises(SettingsError, match="PERF_PIPELINE_DATABASE_URL"):
        create_app(Settings(redis_url=redis_url, admin_tokens=(ADMIN,)))
    with pytest.raises(SettingsError, match="PERF_PIPELINE_REDIS_URL"):
        create_app(Settings(database_url="postgresql://127.0.0.1:1/x", admin_tokens=(ADMIN,)))


def test_fast_path_serves_only_what_fastapi_would_serve(
    redis_url: str, pool: psycopg_pool.ConnectionPool
) -> None:
    from perf_pipeline.api.app import HotReadsMiddleware

    cache = DashboardCache(serving_client(redis_url, 200), pool.connection, local_ttl_s=30)
    app = create_app(SETTINGS, cache)
    client = TestClient(app)
    query = b"start_date=2025-07-01&end_date=2025-07-14&granularity=weekly"
    kpis = client.get(KPIS, headers=AUTH)
    trends = client.get(TRENDS, params=dict(p.split("=") for p in query.decode().split("&")), headers=AUTH)
    assert kpis.status_code == trends.status_code == 200  # both now in the near cache
    decide = HotReadsMiddleware._cached_body
    assert decide(_scope(app, KPIS)) == kpis.content
    assert decide(_scope(app, TRENDS, query)) == trends.content
    assert decide(_scope(app, TRENDS, query, [f"bearer   {ADMIN}".encode()])) == trends.content
    # everything else goes to FastAPI
    for scope in (
        _scope(app, KPIS, auth=[]),
        _scope(app, KPIS, auth=[f"Bearer {USER}".encode()]),
        _scope(app, KPIS, auth=[f"Basic {ADMIN}".encode()]),
        _scope(app, KPIS, auth=[f"Bearer {ADMIN}".encode(), f"Bearer {USER}".encode()]),
        _scope(app, TRENDS, query + b"&start_date=2025-07-02"),
        _scope(app, TRENDS, b"start_date=20250701&end_date=2025-07-14&granularity=weekly"),
        _scope(app, TRENDS, b"start_date=2025-07-14&end_date=2025-07-01&granularity=weekly"),
        _scope(app, TRENDS, b"start_date=2025-07-01&end_date=2025-07-14&granularity=hourly"),
        _scope(app, TRENDS, b"start_date=2025-07-01&end_date=2025-07-15&granularity=weekly"),  # not cached
        _scope(app, TRENDS, query + b"&x=1"),
        _scope(app, "/healthz"),
    ):
        assert decide(scope) is None, scope
    # and through HTTP, with the answers in the near cache, auth and validation are unchanged
    assert client.get(KPIS).status_code == 401
    assert client.get(KPIS, headers={"Authorization": f"Bearer {USER}"}).status_code == 403
    bad = client.get(TRENDS, params={"start_date": "2025-07-14", "end_date": "2025-07-01"}, headers=AUTH)
    assert bad.status_code == 422
    served = client.get(KPIS, headers=AUTH)
    assert served.content == kpis.content and served.headers["content-type"] == "application/json"
    assert cache.recomputations[cache_lib.KPIS_KEY] == 1


# ------------------------------------------------- odd query bytes, HEAD, the documented error answers


def _asgi(
    app: Any, method: str, path: str, query: bytes = b"", auth: str | None = ADMIN
) -> tuple[int, dict[str, str], bytes]:
    """One request straight through the ASGI app (no HTTP client in between, so a body sent for a HEAD
    is seen): status, headers, body."""
    status, headers, bodies = asgi_request(app, method, path, query=query, token=auth)
    return status, headers, b"".join(bodies)


def test_percent_encoded_non_ascii_bytes_are_answered_not_500(
    redis_url: str, pool: psycopg_pool.ConnectionPool
) -> None:
    from perf_pipeline.api.app import HotReadsMiddleware

    cache = DashboardCache(serving_client(redis_url, 200), pool.connection, local_ttl_s=30)
    app = create_app(SETTINGS, cache)
    client = TestClient(app, raise_server_exceptions=False)
    query = "start_date=2025-07-01&end_date=2025-07-14&granularity=weekly"
    warm = client.get(f"{TRENDS}?{query}", headers=AUTH)
    assert warm.status_code == 200  # now in the near cache: the fast path parses every request below
    for extra in ("x=%C3%A9", "x=%FF", "%FF=1", "%C3%A9=%E2%82%AC", "x=%F0%9F%98%80%80"):
        response = client.get(f"{TRENDS}?{query}&{extra}", headers=AUTH)
        assert response.status_code == 200, (extra, response.text)  # unknown parameters are ignored
        assert response.content == warm.content
        assert HotReadsMiddleware._cached_body(_scope(app, TRENDS, f"{query}&{extra}".encode())) is None
    for bad in (
        "start_date=%FF&end_date=2025-07-14",
        "start_date=2025-07-01&end_date=2025-07-14&granularity=%C3%A9",
        "start_date=%EF%BC%92%EF%BC%90%EF%BC%92%EF%BC%95-07-01&end_date=2025-07-14",  # full-width digits
        "start_date=2025-07-01%0A&end_date=2025-07-14",
    ):
        response = client.get(f"{TRENDS}?{bad}", headers=AUTH)
        assert response.status_code == 422, (bad, response.text)
        assert HotReadsMiddleware._cached_body(_scope(app, TRENDS, bad.encode())) is None


def test_head_answers_like_get_without_a_body(redis_url: str, pool: psycopg_pool.ConnectionPool) -> None:
    cache = DashboardCache(serving_client(redis_url, 200), pool.connection, local_ttl_s=30)
    app = create_app(SETTINGS, cache)
    trends = b"start_date=2025-07-01&end_date=2025-07-14&granularity=weekly"
    cases = [
        (KPIS, b"", ADMIN),  # a miss (SQL), then the same from the near cache (fast path)
        (KPIS, b"", ADMIN),
        (TRENDS, trends, ADMIN),
        (TRENDS, trends, ADMIN),
        (KPIS, b"", None),  # 401
        (TRENDS, trends, USER),  # 403
        (TRENDS, b"start_date=2025-07-14&end_date=2025-07-01", ADMIN),  # 422
        ("/healthz", b"", None),
        ("/openapi.json", b"", None),
    ]
    for path, query, token in cases:
        got = _asgi(app, "GET", path, query, token)
        head = _asgi(app, "HEAD", path, query, token)
        assert head[0] == got[0], (path, query, token)
        if path == "/healthz":  # its body (latencies, counters) differs from one call to the next
            assert head[1].keys() == got[1].keys(), (head, got)
        else:
            assert head[1] == got[1], (path, query, token)  # content-length included
        assert head[2] == b"" and got[2], (path, query, token)
    hits = cache.counts["hit"]
    assert _asgi(app, "HEAD", KPIS)[0] == 200
    assert cache.counts["hit"] == hits + 1 and cache.recomputations[cache_lib.KPIS_KEY] == 1  # near cache
    # through HTTP too, and a method that is not allowed lists HEAD with GET
    client = TestClient(app)
    assert client.head(KPIS, headers=AUTH).status_code == 200
    not_allowed = client.post(KPIS, headers=AUTH)
    assert not_allowed.status_code == 405
    assert {m.strip() for m in not_allowed.headers["allow"].split(",")} == {"GET", "HEAD"}


def test_openapi_declares_the_error_answers_of_authenticated_endpoints(
    redis_url: str, pool: psycopg_pool.ConnectionPool
) -> None:
    client, _ = _client(redis_url, pool)
    schema = client.get("/openapi.json").json()
    secured = [
        (path, method, op)
        for path, item in schema["paths"].items()
        for method, op in item.items()
        if op.get("security")
    ]
    assert {(path, method) for path, method, _ in secured} == {
        (KPIS, "get"),
        (TRENDS, "get"),
        (EXPORT, "get"),
        (EXPORT_FILE, "get"),
    }
    for path, method, op in secured:
        for code in ("401", "403"):
            answer = op["responses"].get(code)
            assert answer and answer["description"], (path, method, code)
            assert answer["content"]["application/json"]["schema"], (path, method, code)
    assert "WWW-Authenticate" in schema["paths"][KPIS]["get"]["responses"]["401"]["headers"]
    trends_422 = schema["paths"][TRENDS]["get"]["responses"]["422"]
    assert trends_422["content"]["application/json"]["schema"]


# ------------------------------------------------------------------------ schemathesis over the API


def _schemathesis_run(app: Any, token: str | None) -> tuple[collections.Counter[int], list[str]]:
    """Run schemathesis over the app in process: every phase and check, as ``schemathesis run --checks
    all`` does, 50 examples per operation, derandomized. Returns the statuses answered and every
    problem found (failed checks, and exceptions the app raised, which a server answers with a 500)."""
    import schemathesis
    from schemathesis.engine import events, from_schema
    from schemathesis.python import asgi

    config: dict[str, Any] = {
        "seed": 20250601,
        "continue-on-failure": True,
        "generation": {"max-examples": 50, "deterministic": True, "database": "none"},
        # a range can be inverted or too long for its granularity with both dates valid (documented 422)
        "operations": [
            {
                "include-path": TRENDS,
                "checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "401", "403", "422"]}},
            }
        ],
    }
    if token is not None:
        config["headers"] = {"Authorization": f"Bearer {token}"}
    schema = schemathesis.openapi.from_asgi(
        "/openapi.json", app, config=schemathesis.Config.from_dict(config)
    )
    statuses: collections.Counter[int] = collections.Counter()
    problems: list[str] = []
    try:
        for event in from_schema(schema).execute():
            if isinstance(event, events.ScenarioFinished):
                for interaction in event.recorder.interactions.values():
                    if interaction.response is not None:
                        statuses[interaction.response.status_code] += 1
                for checks in event.recorder.checks.values():
                    for check in checks:
                        if check.failure_info is not None:
                            problems.append(f"{check.name}: {check.failure_info.code_sample}")
            elif isinstance(event, (events.NonFatalError, events.FatalError)):
                problems.append(f"{type(event).__name__}: {getattr(event, 'value', None) or event}")
    finally:
        asgi.shutdown_lifespans()
    return statuses, problems


@pytest.mark.parametrize("token", [ADMIN, None], ids=["admin", "no-token"])
def test_schemathesis_finds_no_server_error_and_no_schema_violation(
    token: str | None, redis_url: str, pool: psycopg_pool.ConnectionPool
) -> None:
    # the API's near cache (1 s), so the fast path answers the repeated requests
    cache = DashboardCache(serving_client(redis_url, 200), pool.connection, local_ttl_s=1.0)
    statuses, problems = _schemathesis_run(create_app(SETTINGS, cache), token)
    assert not [s for s in statuses if s >= 500], statuses
    assert not problems, "\n".join(sorted(set(problems)))
    assert statuses.total() >= 100, statuses
    assert statuses[200] > 0 and statuses[401] > 0


# --------------------------------------------------------------------------------- /healthz timing


def _postgres_url(port: int) -> str:
    return f"postgresql://postgres:not-a-real-password@127.0.0.1:{port}/postgres"


def _timed_healthz(client: TestClient) -> tuple[float, Any]:
    import time

    t0 = time.perf_counter()
    response = client.get("/healthz")
    return time.perf_counter() - t0, response


def test_healthz_answers_within_a_second_when_postgres_refuses(redis_url: str) -> None:
    url = _postgres_url(free_port())  # nobody listens there: connections are refused
    app = create_app(Settings(database_url=url, redis_url=redis_url, admin_tokens=(ADMIN,)))
    with TestClient(app) as client:  # the served configuration: its own pool, near cache, settings
        elapsed, response = _timed_healthz(client)
    assert elapsed < 1.5, elapsed
    body = response.json()
    assert response.status_code == 503 and body["status"] == "down" and body["failing"] == ["postgres"]
    assert not body["postgres"]["ok"] and body["postgres"]["error"] and body["redis"]["ok"]
    assert "not-a-real-password" not in response.text


def test_healthz_answers_within_a_second_when_postgres_hangs_without_piling_up_threads(
    redis_url: str,
) -> None:
    import threading

    with silent_server() as listener:  # a hung PostgreSQL, as the client sees it
        url = _postgres_url(listener.getsockname()[1])
        app = create_app(Settings(database_url=url, redis_url=redis_url, admin_tokens=(ADMIN,)))
        with TestClient(app) as client:
            errors = []
            for _ in range(4):  # ~3 s: the first probe gives up (connect_timeout) and a second starts
                elapsed, response = _timed_healthz(client)
                assert elapsed < 1.5, elapsed
                body = response.json()
                assert response.status_code == 503 and body["status"] == "down", body
                assert body["failing"] == ["postgres"] and body["redis"]["ok"], body
                errors.append(body["postgres"]["error"])
                probes = [t for t in threading.enumerate() if t.name == "healthz-postgres"]
                assert len(probes) <= 1, probes  # a probe still running is waited for, never doubled
                assert "not-a-real-password" not in response.text
            assert errors[0].startswith("no answer after"), errors
            listener.close()  # the app's pool stops waiting for the silent server: a quick shutdown


def test_healthz_says_degraded_and_names_redis_when_redis_stops(
    usage_db: str, private_redis: tuple[str, Path, int]
) -> None:
    url, _, _ = private_redis
    app = create_app(Settings(database_url=usage_db, redis_url=url, admin_tokens=(ADMIN,)))
    with TestClient(app) as client:
        elapsed, ok = _timed_healthz(client)
        assert ok.status_code == 200 and ok.json()["status"] == "ok" and ok.json()["failing"] == []
        with contextlib.suppress(redis_lib.ConnectionError):
            redis_lib.Redis.from_url(url).shutdown(nosave=True)
        elapsed, degraded = _timed_healthz(client)
    assert elapsed < 1.5, elapsed
    body = degraded.json()
    assert degraded.status_code == 200 and body["status"] == "degraded" and body["failing"] == ["redis"]
    assert body["postgres"]["ok"] and not body["redis"]["ok"] and body["redis"]["error"]


def test_health_errors_never_show_a_password() -> None:
    """/healthz shows the servers' errors: a driver that echoes its connection string must not leak it."""
    from perf_pipeline.lib.redact import redact_text, url_secrets

    secrets = url_secrets("postgresql://app:s%40cr3t@db:5432/x", "redis://:r3dis-pw@cache:6379/0")
    for message in (
        'connection to "postgresql://app:s@cr3t@db:5432/x" failed',
        "invalid connection option: host=db password=s%40cr3t user=app",
        "password='some other one' rejected",
        "AUTH r3dis-pw failed",
    ):
        shown = redact_text(message, secrets)
        assert not any(secret in shown for secret in ("s@cr3t", "s%40cr3t", "some other one", "r3dis-pw")), (
            shown
        )


# ------------------------------------------------------------------- invalidation through the API


def test_invalidation_reaches_the_api_within_local_ttl(usage_db: str, redis_url: str) -> None:
    """A rollup row changes and the cache generation is bumped: the API (its served configuration,
    local_ttl_s = 1 s) serves the new number within local_ttl_s plus a margin, measured."""
    import time

    day = dt.date(2025, 8, 3)
    params = {"start_date": "2025-08-01", "end_date": "2025-08-07", "granularity": "daily"}
    settings = Settings(database_url=usage_db, redis_url=redis_url, admin_tokens=(ADMIN,))
    with TestClient(create_app(settings)) as client, psycopg.connect(usage_db, autocommit=True) as conn:
        cache: DashboardCache = client.app.state.cache  # type: ignore[attr-defined]
        assert cache.local_ttl_s == 1.0

        def sessions() -> int:
            response = client.get(TRENDS, params=params, headers=AUTH)
            assert response.status_code == 200
            points = {p["period"]: p["session_count"] for p in response.json()["transcription_trend"]}
            return points[day.isoformat()]

        before = sessions()
        hot_until = time.monotonic() + 1.5  # past one local_ttl_s: the copy has been refreshed once
        while time.monotonic() < hot_until:
            assert sessions() == before
            time.sleep(0.02)
        conn.execute("UPDATE usage_daily_metrics SET sessions = sessions + 1000 WHERE day = %s", (day,))
        try:
            cache_lib.invalidate(redis_lib.Redis.from_url(redis_url))
            invalidated = time.monotonic()
            while (value := sessions()) != before + 1000:
                assert value == before
                assert time.monotonic() - invalidated < 2.5, "the new value did not reach the API in 2.5 s"
                time.sleep(0.02)
            delay = time.monotonic() - invalidated
        finally:
            conn.execute("UPDATE usage_daily_metrics SET sessions = sessions - 1000 WHERE day = %s", (day,))
            cache_lib.invalidate(redis_lib.Redis.from_url(redis_url))
    print(f"invalidation reached the API after {delay:.2f} s")
    assert delay < 2.0, delay
