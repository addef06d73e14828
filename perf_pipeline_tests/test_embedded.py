"""The embedded default: start, reuse, stop — on a private state folder, never the shared servers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psycopg
import redis

from perf_pipeline.embedded import (
    postgres_running,
    redis_running,
    resolve_urls,
    start_postgres,
    start_redis,
    stop_postgres,
    stop_redis,
)
from perf_pipeline.settings import PROJECT_ROOT, Settings


def test_postgres_start_reuse_stop(scratch_dir: Path) -> None:
    url = start_postgres(scratch_dir)
    try:
        with psycopg.connect(url) as conn:
            pid1 = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
            (preload,) = conn.execute("SHOW shared_preload_libraries").fetchone()
            (listen,) = conn.execute("SHOW listen_addresses").fetchone()
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            conn.execute("SELECT count(*) FROM pg_stat_statements").fetchone()
        assert "pg_stat_statements" in preload and listen == "127.0.0.1"
        postmaster = (scratch_dir / "postgres" / "data" / "postmaster.pid").read_text().splitlines()[0]
        assert start_postgres(scratch_dir) == url  # reused: same port, same server process
        assert (scratch_dir / "postgres" / "data" / "postmaster.pid").read_text().splitlines()[
            0
        ] == postmaster
        assert pid1 > 0
    finally:
        assert stop_postgres(scratch_dir) is True
    assert postgres_running(scratch_dir) is None
    assert stop_postgres(scratch_dir) is False
    # a restart keeps the data and the port
    assert start_postgres(scratch_dir) == url
    stop_postgres(scratch_dir)


def test_redis_start_reuse_stop(scratch_dir: Path) -> None:
    url = start_redis(scratch_dir)
    try:
        client = redis.Redis.from_url(url)
        client.set("k", "v")
        assert start_redis(scratch_dir) == url and client.get("k") == b"v"
        assert client.info("server")["redis_version"].startswith("6.")
    finally:
        assert stop_redis(scratch_dir) is True
    assert redis_running(scratch_dir) is None


def test_configured_urls_start_nothing(scratch_dir: Path) -> None:
    settings = Settings(
        database_url="postgresql://u@db.invalid:5432/x",
        redis_url="redis://cache.invalid:6379/0",
        state_dir=scratch_dir,
    )
    urls = resolve_urls(settings)
    assert not urls.embedded_postgres and not urls.embedded_redis
    assert urls.dagster_database_url == "postgresql://u@db.invalid:5432/dagster"
    assert urls.dagster_storage_url().startswith("postgresql+psycopg2://")
    assert not (scratch_dir / "postgres").exists() and not (scratch_dir / "redis").exists()


def test_env_command_prints_exports() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "perf_pipeline.cli", "env"],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        timeout=120,
        check=True,
    )
    lines = dict(line.removeprefix("export ").split("=", 1) for line in proc.stdout.splitlines())
    assert lines["PERF_PIPELINE_DAGSTER_PG_URL"].startswith("postgresql+psycopg2://")
    assert lines["PERF_PIPELINE_REDIS_URL"].startswith("redis://")
    with psycopg.connect(lines["PERF_PIPELINE_DATABASE_URL"]) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
