"""Dashboard API under load: the API's acceptance load tests (``ab -n 1000 -c 10`` on /kpis, ``ab -n 500
-c 5`` on 14 days of /usage-trends), 100 and 1,000 concurrent connections, with Redis and with Redis stopped
(SQL fallback).

Setup: a fresh database with ~1M usage rows over 90 days (``BENCH_SCALE=small``: 90k), rolled up; a
PRIVATE redis-server (so stopping it disturbs nobody); ``perf-pipeline serve`` (uvicorn, 2 workers) on
127.0.0.1; the cache warmed as the ``dashboard_cache`` asset does. Load generators: ``ab`` (apache2-utils;
the acceptance tests' tool) and ``wrk`` (latency percentiles in µs, many connections), installed with
apt-get when missing. The hit rate of each run is the difference of the Redis outcome counters around it.

Targets (issue 5): acceptance tests — /kpis mean < 500 ms and /usage-trends mean < 1 s, 0 failures;
p99 ≤ 20 ms at 100 connections from cache; 0 failures at 1,000 connections; hit rate ≥ 99 % at steady
state.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import redis

from bench.harness import BenchContext, measure, scenario
from perf_pipeline.lib.cache import OUTCOMES, DashboardCache, hit_rate, serving_client, warm_dashboard_cache
from perf_pipeline.lib.dashboard import TrendRequest, compute_kpis, compute_usage_trends
from perf_pipeline.lib.db import connect
from perf_pipeline.lib.rollups import rollup_days
from perf_pipeline.lib.workload import WorkloadSpec, load_workload
from perf_pipeline.testing import private_redis, serve_api

TOKEN = "bench-admin-token-0123456789"
SMALL = os.environ.get("BENCH_SCALE") == "small"
DAYS = 90
USAGE_PER_DAY = 1_000 if SMALL else 11_112  # ~90k / ~1M rows (and as many sessions)
WRK_SECONDS = 5 if SMALL else 15


def _ensure_tools() -> None:
    missing = [pkg for tool, pkg in (("ab", "apache2-utils"), ("wrk", "wrk")) if shutil.which(tool) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        raise RuntimeError(f"install {' '.join(missing)} (apt-get install {' '.join(missing)})")
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True)


def _load_generator(argv: list[str], url: str) -> str:
    """The output of a load generator (``argv``: ab or wrk and its options) run against ``url`` with the
    admin token; CalledProcessError when it fails."""
    return subprocess.run(
        [*argv, "-H", f"Authorization: Bearer {TOKEN}", url], capture_output=True, text=True, check=True
    ).stdout


def _ab(url: str, n: int, c: int) -> dict[str, float]:
    out = _load_generator(["ab", "-q", "-l", "-s", "30", "-n", str(n), "-c", str(c)], url)

    def num(pattern: str, default: float = 0.0) -> float:
        m = re.search(pattern, out)
        return float(m.group(1)) if m else default

    return {
        "requests": num(r"Complete requests:\s+(\d+)"),
        "rps": num(r"Requests per second:\s+([\d.]+)"),
        "mean_ms": num(r"Time per request:\s+([\d.]+) \[ms\] \(mean\)"),
        "p50_ms": _ab_pct(out, 50),
        "p99_ms": _ab_pct(out, 99),
        "failures": num(r"Failed requests:\s+(\d+)") + num(r"Non-2xx responses:\s+(\d+)"),
    }


def _ab_pct(out: str, pct: int) -> float:
    m = re.search(rf"^\s*{pct}%\s+(\d+)", out, re.MULTILINE)
    return float(m.group(1)) if m else float("nan")


def _wrk(url: str, connections: int, seconds: int) -> dict[str, float]:
    out = _load_generator(
        ["wrk", "-t", "2", "-c", str(connections), "-d", f"{seconds}s", "--latency", "--timeout", "10s"], url
    )

    def latency(pct: int) -> float:
        m = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s)\b", out, re.MULTILINE)
        if not m:
            return float("nan")
        return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]

    m = re.search(r"(\d+) requests in", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "requests": float(m.group(1)) if m else 0.0,
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "p50_ms": latency(50),
        "p99_ms": latency(99),
        "failures": (sum(int(x) for x in errors.groups()) if errors else 0)
        + (int(non2xx.group(1)) if non2xx else 0),
        "errors": ("connect {} read {} write {} timeout {}".format(*errors.groups()) if errors else "none")
        + (f", non-2xx {non2xx.group(1)}" if non2xx else ""),
    }


def _counts(client: redis.Redis) -> dict[str, int]:
    try:
        return hit_rate(client, window_minutes=30).counts
    except redis.RedisError:
        return {k: 0 for k in OUTCOMES}


@scenario(
    "dashboard_api",
    "dashboard API: acceptance ab tests, 100 / 1,000 connections, hit rate, Redis stopped "
    "(~1M usage rows; BENCH_SCALE=small: 90k)",
)
def run(ctx: BenchContext) -> None:
    _ensure_tools()
    with contextlib.ExitStack() as stack:
        db_url = stack.enter_context(ctx.database("bench_dash"))
        end = dt.datetime.now(dt.UTC).replace(second=0, microsecond=0)
        loaded = load_workload(
            db_url, WorkloadSpec(days=DAYS, usage_per_day=USAGE_PER_DAY, audit_per_day=0, end=end)
        )
        today = end.date()
        with connect(db_url, autocommit=True) as conn:
            t0 = time.perf_counter()
            rollup_days(conn, today - dt.timedelta(days=DAYS), today + dt.timedelta(days=1), check=False)
            rollup_s = time.perf_counter() - t0
            conn.execute("ANALYZE")
        ctx.row(
            test="setup",
            usage_rows=loaded.usage_rows,
            sessions=loaded.sessions,
            load_s=loaded.seconds,
            rollup_s=rollup_s,
        )

        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_redis_")))
        redis_url, _ = stack.enter_context(private_redis(root))
        client = redis.Redis.from_url(redis_url)
        env = {
            "PERF_PIPELINE_DATABASE_URL": db_url,
            "PERF_PIPELINE_REDIS_URL": redis_url,
            "PERF_PIPELINE_ADMIN_TOKENS": TOKEN,
        }
        base = stack.enter_context(serve_api(env, workers=2)).base

        with connect(db_url, autocommit=True) as conn:
            warm = warm_dashboard_cache(conn, client, today=today, kpi_ttl_s=60, trends_ttl_s=300)
        ctx.row(
            test="warm (dashboard_cache asset body)",
            keys=len(warm.keys),
            bytes=warm.bytes,
            duration_ms=warm.duration_ms,
        )

        # the read path in this process, no HTTP: what one request costs on a Redis hit vs from SQL
        trend_request = TrendRequest(today - dt.timedelta(days=13), today, "daily")
        with connect(db_url, autocommit=True) as conn:
            sql_kpis = measure(lambda: compute_kpis(conn), repeat=20)
            sql_trends = measure(lambda: compute_usage_trends(conn, trend_request), repeat=20)

            @contextlib.contextmanager
            def same_conn() -> Iterator[object]:
                yield conn

            reader = DashboardCache(serving_client(redis_url, 50), same_conn)  # type: ignore[arg-type]
            hit_kpis = measure(reader.kpis_json, repeat=500, warmup=5)
            hit_trends = measure(lambda: reader.usage_trends_json(trend_request), repeat=500, warmup=5)
        for label, st in (
            ("in-process: KPIs from SQL", sql_kpis),
            ("in-process: trends 14 d from SQL", sql_trends),
            ("in-process: KPIs Redis hit", hit_kpis),
            ("in-process: trends Redis hit", hit_trends),
        ):
            ctx.row(test=label, p50_ms=st.median, p99_ms=st.p99, max_ms=st.max)
        ctx.ratio("KPIs: SQL p50 / Redis hit p50", sql_kpis.median, hit_kpis.median)

        kpis = f"{base}/api/v1/admin/dashboard/kpis"
        start = (
            today - dt.timedelta(days=13)
        ).isoformat()  # the acceptance test's 14-day range, ending today
        trends = f"{base}/api/v1/admin/dashboard/usage-trends?start_date={start}&end_date={today.isoformat()}"

        def measured(label: str, fn, target: str = "") -> dict[str, float]:  # type: ignore[no-untyped-def]
            before = _counts(client)
            result = fn()
            time.sleep(1.5)  # the API flushes its hit/miss counts to Redis every second
            after = _counts(client)
            delta = {k: after[k] - before[k] for k in OUTCOMES}
            served = sum(delta.values())
            cached = delta["hit"] + delta["stale"] + delta["waited"]
            ctx.row(
                test=label,
                **result,
                hit_rate=cached / served if served else float("nan"),
                recomputes=delta["miss"],
                target=target,
            )
            return result

        # 0. the framework's floor on this machine right now: FastAPI's static /docs page, no I/O
        floor = _wrk(f"{base}/docs", 100, WRK_SECONDS)
        ctx.row(test="floor: wrk /docs c=100", **floor, target="(reference)")
        # 1. the acceptance load tests (ab, mean latency and failures), answered from the cache
        measured("acceptance ab kpis n=1000 c=10", lambda: _ab(kpis, 1000, 10), "mean < 500 ms, 0 failures")
        measured("acceptance ab trends n=500 c=5", lambda: _ab(trends, 500, 5), "mean < 1000 ms, 0 failures")
        # 2. steady state at 100 connections (both endpoints), then 1,000 connections
        c100 = measured(
            "wrk kpis c=100", lambda: _wrk(kpis, 100, WRK_SECONDS), "p99 <= 20 ms, hit rate >= 99%"
        )
        ctx.ratio("kpis c=100 rps / floor rps (same run)", c100["rps"], floor["rps"])
        measured("wrk trends c=100", lambda: _wrk(trends, 100, WRK_SECONDS), "p99 <= 20 ms, hit rate >= 99%")
        measured("ab kpis n=10000 c=1000", lambda: _ab(kpis, 10_000, 1000), "0 failures")
        measured("wrk kpis c=1000", lambda: _wrk(kpis, 1000, WRK_SECONDS), "0 failures")

        # 3. Redis stopped: every request is answered from SQL (counted by the servers, not in Redis)
        with contextlib.suppress(redis.ConnectionError):
            client.shutdown(nosave=True)
        time.sleep(0.5)
        health = httpx.get(f"{base}/healthz", timeout=5).json()
        ctx.row(test="redis stopped: /healthz", status=health["status"], redis_ok=health["redis"]["ok"])
        for label, fn, target in (
            ("NO REDIS ab kpis n=1000 c=10", lambda: _ab(kpis, 1000, 10), "0 failures (SQL fallback)"),
            ("NO REDIS ab trends n=500 c=5", lambda: _ab(trends, 500, 5), "0 failures (SQL fallback)"),
            ("NO REDIS wrk kpis c=100", lambda: _wrk(kpis, 100, WRK_SECONDS), "0 failures (SQL fallback)"),
            (
                "NO REDIS wrk trends c=100",
                lambda: _wrk(trends, 100, WRK_SECONDS),
                "0 failures (SQL fallback)",
            ),
        ):
            ctx.row(test=label, **fn(), target=target)
