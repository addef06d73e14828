"""Soak (issue 9): the whole system under a realistic load for DURATION, with faults, judged as an operator would.

``make soak DURATION=30m`` / ``python -m bench.soak --duration 30m``. Everything runs on PRIVATE servers
under a temporary state folder (never the shared ``.perf_pipeline`` ones) and only on 127.0.0.1:

* an embedded PostgreSQL (platform database seeded small, 15 months so that months are past the 12-month
  audit retention; Dagster's storage in its own database) and an embedded Redis;
* ``dagster-webserver`` and ``dagster-daemon`` (the processes ``perf-pipeline dev`` runs), the pool limits
  written as the CLI does, every schedule and sensor started with ``dagster schedule|sensor start --start-all``;
* the dashboard API (``perf-pipeline serve``, 2 workers) under ``--clients`` concurrent HTTP/1.1
  connections (default 100), each paced at ``--client-rps`` requests/s over KPIs and the standard trends;
* platform writers: an :class:`~perf_pipeline.audit.AuditWriter` (with a spool) logging ``--audit-rps``
  events/s and a usage writer inserting a session + usage row ``--usage-rps`` times/s;
* an export request every ``--export-every`` seconds (the exports sensor launches the runs);
* mid-way, one month of audit_log archived by launching ``audit_log_archive`` through the GraphQL API.

Faults (at 30 %, 45 % and 60 % of the duration): PostgreSQL restarted (fast stop, start), Redis restarted
(empty: no persistence), and the process of a running export run killed with SIGKILL. Nobody intervenes:
the script only measures how long each recovery took (bounded waits). A long-running process that exits
is restarted by the script's supervisor, as systemd would (counted and reported as a restart).

Report: failed runs (each with the fault it followed and the run that recovered it: Dagster's automatic
retry of it, or for a scheduled/sensor job a later successful run of the job — for export_job only a run
of the same request counts), failed API requests, lost (and duplicated) audit events and usage rows, p99
API latency per 5-minute window, RSS of every long-running process at start and end (followed by pid),
cache hit rate, each recovery time (for the killed run worker: marked failed, retry launched, retry
succeeded, request succeeded, counted from the kill) and the final status of every export request filed.
Exit code 1 if a target is missed: every failed run recovered, every export request succeeded, 0 failed
API requests, 0 lost events. Results in ``bench/results/soak.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import psutil
import psycopg
import redis

from bench.harness import RESULTS_DIR, percentile, print_table
from perf_pipeline.dev import LAUNCH_RUN
from perf_pipeline.settings import PROJECT_ROOT
from perf_pipeline.testing import stop_process_tree

BIN = Path(sys.executable).parent
ADMIN_TOKEN = "soak-admin-token-" + "x" * 16
TARGETS = (
    "every failed run recovered (automatic retry, or a later run of its job / of the same export request), "
    "every export request succeeded, 0 failed API requests, 0 lost events"
)
#: run tags Dagster puts on runs (dagster._core.storage.tags) and the exports' request tag
PARENT_RUN_TAG, ROOT_RUN_TAG, RETRY_NUMBER_TAG = (
    "dagster/parent_run_id",
    "dagster/root_run_id",
    "dagster/retry_number",
)
EXPORT_REQUEST_TAG = "perf_pipeline/export_request"


def parse_duration(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"duration like 90s, 10m, 1h; got {text!r}")
    return float(m.group(1)) * {"": 60, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--duration",
        type=parse_duration,
        default=parse_duration(os.environ.get("DURATION", "30m")),
        help="how long the load runs (90s, 10m, 1h; default $DURATION or 30m)",
    )
    p.add_argument("--clients", type=int, default=100, help="concurrent API connections (default 100)")
    p.add_argument("--client-rps", type=float, default=2.0, help="requests/s of each connection (default 2)")
    p.add_argument("--audit-rps", type=float, default=200.0, help="audit events/s (default 200)")
    p.add_argument("--usage-rps", type=float, default=10.0, help="usage rows (+ sessions)/s (default 10)")
    p.add_argument("--export-every", type=float, default=180.0, help="seconds between export requests")
    p.add_argument("--seed-days", type=int, default=450, help="days of seeded data (default 450)")
    p.add_argument("--no-faults", action="store_true", help="no restarts and no kill (a plain soak)")
    p.add_argument("--keep", action="store_true", help="keep the temporary state folder (logs, data)")
    args = p.parse_args(argv)
    if args.duration < 60:
        p.error("--duration must be at least 60 s")
    return args


def log(msg: str) -> None:
    print(f"[{dt.datetime.now(dt.UTC):%H:%M:%S}] {msg}", flush=True)


# ------------------------------------------------------------------------------------ processes


@dataclass
class Managed:
    """A long-running process started, watched and (if it exits) restarted by the soak."""

    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    logfile: Path
    proc: subprocess.Popen[bytes] | None = None
    restarts: list[float] = field(default_factory=list)

    def start(self) -> None:
        with open(self.logfile, "ab") as fh:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=self.cwd,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30) -> None:
        if not self.alive():
            return
        assert self.proc is not None
        stop_process_tree(self.proc, grace_s=timeout)

    def rss_mb(self) -> dict[str, tuple[int, float]]:
        """label → (pid, RSS MB) of the process and of each descendant (labelled by command)."""
        if not self.alive():
            return {}
        assert self.proc is not None
        out: dict[str, tuple[int, float]] = {}
        try:
            root = psutil.Process(self.proc.pid)
            for p in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    label = self.name if p.pid == root.pid else f"{self.name}/{_short(p.cmdline())}"
                    while label in out:
                        label += "'"
                    out[label] = (p.pid, p.memory_info().rss / 2**20)
        except psutil.Error:
            pass
        return out


def snapshot_rss(managed: list[Managed], state: Path) -> dict[str, tuple[int, float]]:
    """label → (pid, MB) of every long-running process: the managed ones and their children, PostgreSQL
    (pid 0: aggregate figures) and Redis."""
    out: dict[str, tuple[int, float]] = {}
    for m in managed:
        out.update(m.rss_mb())
    out.update({k: (0, v) for k, v in postgres_rss_mb(state).items()})
    with contextlib.suppress(OSError, ValueError):
        pid = int((state / "redis" / "redis.pid").read_text())
        out["redis-server"] = (pid, pid_rss_mb(pid))
    return out


def _short(cmdline: list[str]) -> str:
    text = " ".join(Path(cmdline[0]).name if i == 0 else a for i, a in enumerate(cmdline[:6]))
    if "resource_tracker" in text:
        return "resource tracker"
    if "multiprocessing" in text:
        return "spawned worker"
    return text[:60]


def pid_rss_mb(pid: int) -> float:
    try:
        return psutil.Process(pid).memory_info().rss / 2**20
    except psutil.Error:
        return float("nan")


def postgres_rss_mb(state_dir: Path) -> dict[str, float]:
    """Postmaster RSS, its backends' private memory and count (PIDs change on restart: postmaster.pid)."""
    pidfile = state_dir / "postgres" / "data" / "postmaster.pid"
    try:
        pid = int(pidfile.read_text().split()[0])
        root = psutil.Process(pid)
        kids = root.children()
        uss = 0
        for k in kids:  # a backend may exit while we look
            with contextlib.suppress(psutil.Error):
                uss += k.memory_full_info().uss
        return {
            "postgres (postmaster)": root.memory_info().rss / 2**20,
            # backends share shared_buffers: their RSS double-counts it, their USS (private memory) does not
            "postgres backends (USS sum)": uss / 2**20,
            "postgres backends (count)": float(len(kids)),
        }
    except (OSError, ValueError, psutil.Error):
        return {}


# ------------------------------------------------------------------------------------ load


@dataclass
class ApiLoad:
    """``clients`` HTTP connections, each paced at ``rps``, recording (time, ms, ok) per request."""

    base: str
    clients: int
    rps: float
    today: dt.date
    samples: list[tuple[float, float, bool]] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    failures: list[tuple[float, str, str]] = field(default_factory=list)  # (time, path, what)

    def paths(self) -> list[str]:
        from perf_pipeline.lib.dashboard import standard_trend_requests

        out = ["/api/v1/admin/dashboard/kpis"] * 4
        for r in standard_trend_requests(self.today):
            out.append(
                f"/api/v1/admin/dashboard/usage-trends?start_date={r.start}&end_date={r.end}"
                f"&granularity={r.granularity}"
            )
        # a few less common ranges (cached after their first request, like a real admin's)
        for days in (3, 14, 60):
            out.append(
                f"/api/v1/admin/dashboard/usage-trends?start_date={self.today - dt.timedelta(days=days)}"
                f"&end_date={self.today}&granularity=daily"
            )
        return out

    async def run(self, until: float) -> None:
        limits = httpx.Limits(max_connections=self.clients, max_keepalive_connections=self.clients)
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        paths = self.paths()
        async with httpx.AsyncClient(
            base_url=self.base, limits=limits, headers=headers, timeout=httpx.Timeout(10.0)
        ) as client:

            async def one(i: int) -> None:
                rng = random.Random(i)
                await asyncio.sleep(rng.random() / self.rps)
                while time.time() < until:
                    t0 = time.perf_counter()
                    ok = False
                    path = rng.choice(paths)
                    try:
                        r = await client.get(path)
                        ok = r.status_code == 200
                        what = f"HTTP {r.status_code}"
                    except httpx.HTTPError as exc:
                        what = type(exc).__name__
                    if not ok:
                        self.errors[what] += 1
                        self.failures.append((time.time(), path, what))
                    ms = (time.perf_counter() - t0) * 1000
                    self.samples.append((time.time(), ms, ok))
                    await asyncio.sleep(max(0.0, 1 / self.rps - ms / 1000))

            await asyncio.gather(*(one(i) for i in range(self.clients)))


class UsageWriter(threading.Thread):
    """The platform's usage inserts: one session + one usage_log row per transaction, paced; reconnects
    and retries the same row (same ids: at-least-once, deduplicated by the session primary key)."""

    def __init__(self, url: str, rps: float, until: float, user_id: str) -> None:
        super().__init__(daemon=True, name="usage-writer")
        self.url, self.rps, self.until, self.user_id = url, rps, until, user_id
        self.acked: list[str] = []
        self.errors = 0
        self.last_ok = 0.0

    def run(self) -> None:
        conn: psycopg.Connection | None = None
        while time.time() < self.until:
            sid = str(uuid.uuid4())
            while time.time() < self.until + 60:  # a row being retried is finished after the end, briefly
                try:
                    if conn is None or conn.closed:
                        conn = psycopg.connect(self.url, connect_timeout=3, application_name="soak.usage")
                    with conn.transaction():
                        conn.execute(
                            "INSERT INTO session (id, user_id, status, stt_provider, duration) "
                            "VALUES (%s, %s, 'completed', 'whisper', 300) ON CONFLICT (id) DO NOTHING",
                            (sid, self.user_id),
                        )
                        conn.execute(
                            "INSERT INTO usage_log (user_id, session_id, duration_minutes, cost_usd, "
                            "stt_provider) SELECT %s, %s, 5, 0.03, 'whisper' WHERE NOT EXISTS "
                            "(SELECT 1 FROM usage_log WHERE session_id = %s "
                            "AND created_at > now() - interval '1 hour')",
                            (self.user_id, sid, sid),
                        )
                    self.acked.append(sid)
                    self.last_ok = time.time()
                    break
                except psycopg.Error:
                    self.errors += 1
                    if conn is not None:
                        with contextlib.suppress(Exception):
                            conn.close()
                    conn = None
                    time.sleep(0.5)
            time.sleep(1 / self.rps)
        if conn is not None:
            conn.close()


class AuditLoad(threading.Thread):
    """The platform's audit events through the real AuditWriter (spooled), paced; keeps every id."""

    def __init__(self, writer: Any, rps: float, until: float, marker: str) -> None:
        super().__init__(daemon=True, name="audit-load")
        self.writer, self.rps, self.until, self.marker = writer, rps, until, marker
        self.ids: list[str] = []
        self.errors: Counter[str] = Counter()

    def run(self) -> None:
        rng = random.Random(5)
        users = [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(200)]
        period, nxt = 1 / self.rps, time.perf_counter()
        while time.time() < self.until:
            try:
                self.ids.append(
                    self.writer.log(
                        "soak.event",
                        "session",
                        str(uuid.uuid4()),
                        rng.choice(["create", "read", "update"]),
                        "soak event",
                        user_id=rng.choice(users),
                        severity=rng.choice(["low"] * 40 + ["high"]),
                        details={"soak": self.marker, "n": len(self.ids)},
                        ip="127.0.0.1",
                    )
                )
            except Exception as exc:  # noqa: BLE001 — counted and reported: a refused event is a lost one
                self.errors[type(exc).__name__] += 1
            nxt += period
            time.sleep(max(0.0, nxt - time.perf_counter()))


# ------------------------------------------------------------------------------------ Dagster

DAEMONS = "query { instance { daemonHealth { allDaemonStatuses { daemonType healthy required } } } }"
REPO = "query { repositoriesOrError { ... on RepositoryConnection { nodes { name } } } }"


def graphql(
    port: int, query: str, variables: dict[str, Any] | None = None, timeout: float = 30
) -> dict[str, Any]:
    r = httpx.post(
        f"http://127.0.0.1:{port}/graphql",
        json={"query": query, "variables": variables or {}},
        timeout=timeout,
    )
    r.raise_for_status()
    body = r.json()
    if body.get("errors"):
        raise RuntimeError(body["errors"])
    return body["data"]


def daemons_healthy(port: int) -> bool:
    try:
        statuses = graphql(port, DAEMONS, timeout=5)["instance"]["daemonHealth"]["allDaemonStatuses"]
    except Exception:  # noqa: BLE001 — webserver or storage still coming back
        return False
    return all(s["healthy"] for s in statuses if s["required"])


def step_started(instance: Any, run_id: str) -> bool:
    """True once a step of the run has started (a kill after this point interrupts real work)."""
    return any(
        e.dagster_event is not None and e.dagster_event.event_type_value == "STEP_START"
        for e in instance.all_logs(run_id)
    )


RUN_PID = re.compile(r"(?:Started process for run|parent process|Executing steps in process) \(pid: (\d+)\)")


def run_pid(instance: Any, run_id: str) -> int | None:
    """The run worker's pid, from its engine events ('Started process for run (pid: N).', 'Executing steps
    in process (pid: N)' with the in-process executor of export_job, or 'Executing steps using multiprocess
    executor: parent process (pid: N)'); engine events carry the text in the event's message."""
    for event in instance.all_logs(run_id):
        text = (
            f"{event.user_message or ''} {(event.dagster_event.message or '') if event.dagster_event else ''}"
        )
        m = RUN_PID.search(text)
        if m:
            return int(m.group(1))
    return None


@dataclass(frozen=True)
class RunInfo:
    """What the report needs of one run record."""

    run_id: str
    job: str
    status: str  # DagsterRunStatus value
    tags: dict[str, str]
    created: float
    ended: float | None

    @classmethod
    def of(cls, record: Any) -> RunInfo:
        r = record.dagster_run
        return cls(
            r.run_id,
            r.job_name,
            r.status.value,
            dict(r.tags),
            record.create_timestamp.timestamp(),
            record.end_time,
        )

    @property
    def root(self) -> str:
        return self.tags.get(ROOT_RUN_TAG, self.run_id)


def judge_failed_runs(
    runs: list[RunInfo], fault_times: list[tuple[str, float]], killed_run_id: str | None, load_start: float
) -> tuple[list[dict[str, object]], int]:
    """One row per failed run with what recovered it, and the number not recovered.

    A failed run is recovered by (1) a successful run in its run group created after it — Dagster's
    automatic retry (``dagster/retry_number`` tag) or a re-execution; else (2) for a run exporting a
    request, a later successful run of the same request; else (3) for other jobs, a later successful run of
    the same job (the next schedule tick or sensor run re-triggering it). A later export of another request
    recovers nothing. ``recovered_after_s``: from the failed run's end to the recovering run's end.
    """
    rows: list[dict[str, object]] = []
    unrecovered = 0
    for r in runs:
        if r.status != "FAILURE":
            continue
        later_ok = [o for o in runs if o.status == "SUCCESS" and o.created > r.created]
        in_group = [o for o in later_ok if o.root == r.root]
        request = r.tags.get(EXPORT_REQUEST_TAG)
        if in_group:
            by, how = (
                in_group[0],
                "automatic retry" if RETRY_NUMBER_TAG in in_group[0].tags else "re-execution",
            )
        elif request is not None:
            same = [o for o in later_ok if o.tags.get(EXPORT_REQUEST_TAG) == request]
            by, how = (same[0], "later run of the same request") if same else (None, None)
        else:
            same = [o for o in later_ok if o.job == r.job]
            by, how = (same[0], "later run of its job") if same else (None, None)
        near = [name for name, ft in fault_times if ft - 5 <= r.created <= ft + 120][-1:]  # the latest before
        rows.append(
            {
                "job": r.job,
                "run": r.run_id[:8],
                "created_s": r.created - load_start,
                "killed": r.run_id == killed_run_id,
                "near_fault": ", ".join(near),
                "will_retry": r.tags.get("dagster/will_retry", ""),
                "failure_reason": r.tags.get("dagster/failure_reason", ""),
                "recovered_by": f"{how} {by.run_id[:8]}" if by else None,
                "recovered_after_s": (by.ended - r.ended) if by and by.ended and r.ended else None,
            }
        )
        unrecovered += by is None
    return rows, unrecovered


# ------------------------------------------------------------------------------------ helpers


def wait_until(check: Callable[[], bool], timeout: float, step: float = 0.25) -> float | None:
    """Seconds until ``check()`` held, or None after ``timeout``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        with contextlib.suppress(Exception):
            if check():
                return time.monotonic() - t0
        time.sleep(step)
    return None


def wait_all(
    checks: dict[str, Callable[[], bool]], since: float, timeout: float, step: float = 0.25
) -> dict[str, float | None]:
    """For each named check, seconds from ``since`` (a time.time()) until it first held; None after ``timeout``.
    All checks are polled together, so each figure is its own recovery time."""
    out: dict[str, float | None] = dict.fromkeys(checks)
    deadline = time.time() + timeout
    while time.time() < deadline and any(v is None for v in out.values()):
        for name, check in checks.items():
            if out[name] is None:
                with contextlib.suppress(Exception):
                    if check():
                        out[name] = time.time() - since
        time.sleep(step)
    return out


def windows(
    samples: list[tuple[float, float, bool]], start: float, size: float = 300
) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    if not samples:
        return out
    end = max(t for t, _, _ in samples)
    w = start
    while w <= end:
        ms = [m for t, m, _ in samples if w <= t < w + size]
        failed = sum(1 for t, _, ok in samples if w <= t < w + size and not ok)
        if ms:
            out.append(
                {
                    "window": f"{(w - start) / 60:.0f}-{(w + size - start) / 60:.0f} min",
                    "requests": len(ms),
                    "failed": failed,
                    "rps": len(ms) / size,
                    "p50_ms": percentile(ms, 50),
                    "p99_ms": percentile(ms, 99),
                    "max_ms": max(ms),
                }
            )
        w += size
    return out


# ------------------------------------------------------------------------------------ the soak


def main(argv: list[str] | None = None) -> int:  # noqa: C901 — one linear story, kept in one place
    args = parse_args(argv)
    import dagster as dg

    from perf_pipeline import embedded
    from perf_pipeline.audit import AuditWriter
    from perf_pipeline.cli import apply_pool_limits
    from perf_pipeline.lib import cache, exports
    from perf_pipeline.lib.migrations import apply_migrations
    from perf_pipeline.lib.workload import WorkloadSpec, load_workload

    root = Path(tempfile.mkdtemp(prefix="soak_"))
    state = root / "state"
    managed: list[Managed] = []
    report: list[dict[str, object]] = []
    recoveries: list[dict[str, object]] = []
    events: list[str] = []
    stopping = threading.Event()
    started_at = time.time()
    log(f"soak for {args.duration:.0f} s; private servers and logs under {root}")
    try:
        pg_url = embedded.start_postgres(state)
        redis_url = embedded.start_redis(state)
        dagster_url = embedded.with_database(pg_url, embedded.DAGSTER_DB)
        log(f"private PostgreSQL {pg_url}, Redis {redis_url}")
        apply_migrations(pg_url)
        t0 = time.perf_counter()
        loaded = load_workload(
            pg_url, WorkloadSpec(days=args.seed_days, usage_per_day=1000, audit_per_day=2000)
        )
        log(
            f"seeded {loaded.audit_rows:,} audit + {loaded.usage_rows:,} usage rows in {time.perf_counter() - t0:.1f} s"
        )

        home = root / "dagster_home"
        home.mkdir()
        (home / "dagster.yaml").symlink_to(PROJECT_ROOT / "dagster.yaml")
        env = dict(os.environ)
        env.update(
            {
                "PERF_PIPELINE_DATABASE_URL": pg_url,
                "PERF_PIPELINE_REDIS_URL": redis_url,
                "PERF_PIPELINE_DAGSTER_DATABASE_URL": dagster_url,
                "PERF_PIPELINE_DAGSTER_PG_URL": urlunsplit(
                    urlsplit(dagster_url)._replace(scheme="postgresql+psycopg2")
                ),
                "DAGSTER_HOME": str(home),
                "PERF_PIPELINE_STATE_DIR": str(state),
                "PERF_PIPELINE_DAGSTER_ARTIFACTS_DIR": str(state / "dagster_storage"),
                "PERF_PIPELINE_DAGSTER_COMPUTE_LOGS_DIR": str(state / "dagster_compute_logs"),
                "PERF_PIPELINE_ARCHIVE_DIR": str(state / "archive"),
                "PERF_PIPELINE_EXPORT_DIR": str(state / "exports"),
                "PERF_PIPELINE_AUDIT_SPOOL_DIR": str(state / "audit_spool"),
                "PERF_PIPELINE_ADMIN_TOKENS": ADMIN_TOKEN,
            }
        )
        pools = apply_pool_limits(
            {k: v for k, v in env.items() if k.startswith(("PERF_PIPELINE", "DAGSTER"))}
        )
        os.environ.update({k: v for k, v in env.items() if k.startswith(("PERF_PIPELINE", "DAGSTER"))})
        log(f"pool limits {pools}")

        web_port, api_port = embedded.free_port(), embedded.free_port()
        workspace = str(PROJECT_ROOT / "workspace.yaml")
        managed += [
            Managed(
                "dagster-webserver",
                [str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(web_port), "-w", workspace],
                env,
                home,
                root / "webserver.log",
            ),
            Managed(
                "dagster-daemon",
                [str(BIN / "dagster-daemon"), "run", "-w", workspace],
                env,
                home,
                root / "daemon.log",
            ),
            Managed(
                "dashboard-api",
                [str(BIN / "perf-pipeline"), "serve", "--port", str(api_port), "--workers", "2"],
                env,
                PROJECT_ROOT,
                root / "api.log",
            ),
        ]
        for m in managed:
            m.start()
        for cmd in (["schedule", "start", "--start-all"], ["sensor", "start", "--start-all"]):
            out = subprocess.run(
                [str(BIN / "dagster"), *cmd, "-w", workspace],
                env=env,
                cwd=home,
                capture_output=True,
                text=True,
                timeout=300,
            )
            log(f"dagster {' '.join(cmd)}: rc={out.returncode} {(out.stdout or out.stderr).strip()[-300:]}")
        up = wait_until(
            lambda: (
                httpx.get(f"http://127.0.0.1:{web_port}/server_info", timeout=2).is_success
                and httpx.get(f"http://127.0.0.1:{api_port}/healthz", timeout=2).is_success
            ),
            240,
            1,
        )
        if up is None:
            raise RuntimeError(f"webserver or API did not come up; see {root}/*.log")
        repo_name = graphql(web_port, REPO)["repositoriesOrError"]["nodes"][0]["name"]
        log(f"webserver :{web_port}, API :{api_port} up; repository {repo_name!r}")

        def supervise() -> None:
            while not stopping.wait(2):
                for m in managed:
                    if not m.alive() and not stopping.is_set():
                        rc = m.proc.returncode if m.proc else None
                        events.append(
                            f"{m.name} exited (rc={rc}) at +{time.time() - started_at:.0f} s; restarted"
                        )
                        log(events[-1])
                        m.restarts.append(time.time())
                        m.start()

        threading.Thread(target=supervise, daemon=True, name="supervisor").start()

        instance = dg.DagsterInstance.get()
        until = time.time() + args.duration
        load_start = time.time()
        marker = uuid.uuid4().hex
        usage_user = str(uuid.uuid4())
        writer = AuditWriter(pg_url, spool_dir=state / "audit_spool_soak", name="soak")
        audit = AuditLoad(writer, args.audit_rps, until, marker)
        usage = UsageWriter(pg_url, args.usage_rps, until, usage_user)
        api = ApiLoad(
            f"http://127.0.0.1:{api_port}", args.clients, args.client_rps, dt.datetime.now(dt.UTC).date()
        )
        api_thread = threading.Thread(
            target=lambda: asyncio.run(api.run(until)), daemon=True, name="api-load"
        )
        rc = redis.Redis.from_url(redis_url, socket_timeout=2)
        minute_stats: dict[int, dict[str, int]] = {}

        def sample_hits() -> None:
            with contextlib.suppress(redis.RedisError):
                now = int(time.time() // 60)
                for m in range(now - 2, now + 1):
                    h = rc.hgetall(f"{cache.STATS_PREFIX}{m}")
                    if h:
                        minute_stats[m] = {k.decode(): int(v) for k, v in h.items()}

        time.sleep(5)  # let the API warm
        rss_start = snapshot_rss(managed, state)
        audit.start()
        usage.start()
        api_thread.start()
        log(
            f"load on: {args.clients} API connections × {args.client_rps}/s, {args.audit_rps} audit events/s, "
            f"{args.usage_rps} usage rows/s, an export every {args.export_every:.0f} s"
        )

        plan: list[tuple[float, str]] = [(0.5, "archive")]
        if not args.no_faults:
            plan += [(0.3, "restart postgres"), (0.45, "restart redis"), (0.58, "kill run worker")]
        plan.sort()
        next_export = time.time() + 20
        exports_filed: list[int] = []
        archive_run: str | None = None
        killed: dict[str, Any] = {}
        fault_times: list[tuple[str, float]] = []

        def file_export(kind: str, fmt: str, filters: dict[str, object]) -> int | None:
            try:
                with psycopg.connect(pg_url, connect_timeout=3) as conn:
                    rid = exports.file_request(conn, usage_user, kind, fmt, filters)
                exports_filed.append(rid)
                return rid
            except psycopg.Error as exc:
                events.append(f"export request not filed ({exc.__class__.__name__}); filed again next time")
                return None

        while time.time() < until:
            sample_hits()
            elapsed = (time.time() - load_start) / args.duration
            if time.time() >= next_export:
                file_export("usage_log", "csv.gz", {"start": str(dt.date.today() - dt.timedelta(days=30))})
                next_export = time.time() + args.export_every
            if plan and elapsed >= plan[0][0]:
                _, action = plan.pop(0)
                t = time.time()
                events.append(f"{action} at +{t - load_start:.1f} s")
                fault_times.append((action, t))
                log(f"--- {action}")
                if action == "restart postgres":
                    written = writer.metrics()["written"]
                    embedded.stop_postgres(state)
                    down = time.time() - t
                    embedded.start_postgres(state)
                    up = time.time()
                    # every recovery time counts from the stop command
                    times = wait_all(
                        {
                            "audit_writer_delivering_s": lambda written=written: (
                                writer.metrics()["written"] > written and writer.metrics()["db_reachable"]
                            ),
                            "usage_writer_inserting_s": lambda up=up: usage.last_ok > up,
                            "daemons_healthy_s": lambda: daemons_healthy(web_port),
                        },
                        t,
                        300,
                    )
                    failed_api = sum(1 for ts, _, ok in list(api.samples) if ts >= t and not ok)
                    recoveries.append(
                        {
                            "fault": "PostgreSQL restart",
                            "stop_s": down,
                            "up_again_s": up - t,
                            **times,
                            "api_failed_meanwhile": failed_api,
                        }
                    )
                elif action == "restart redis":
                    embedded.stop_redis(state)
                    embedded.start_redis(state)
                    up = time.time()
                    times = wait_all(
                        {"cache_refilled_s": lambda: rc.exists(cache.KPIS_KEY) == 1}, t, 300, 0.1
                    )
                    failed_api = sum(1 for ts, _, ok in list(api.samples) if ts >= t and not ok)
                    recoveries.append(
                        {
                            "fault": "Redis restart (empty)",
                            "up_again_s": up - t,
                            **times,
                            "api_failed_meanwhile": failed_api,
                        }
                    )
                elif action == "archive":
                    from perf_pipeline.lib.partitioning import add_months, month_start

                    month = add_months(month_start(dt.date.today()), -14)
                    params = {
                        "selector": {
                            "repositoryLocationName": "perf_pipeline",
                            "repositoryName": repo_name,
                            "jobName": "__ASSET_JOB",
                            "assetSelection": [{"path": ["audit_log_archive"]}],
                        },
                        "runConfigData": {},
                        "executionMetadata": {
                            "tags": [{"key": "dagster/partition", "value": month.isoformat()}]
                        },
                    }
                    launched = graphql(web_port, LAUNCH_RUN, {"params": params})["launchRun"]
                    if launched["__typename"] == "LaunchRunSuccess":
                        archive_run = launched["run"]["runId"]
                        events.append(f"archive of audit_log {month:%Y-%m} launched: run {archive_run}")
                    else:
                        events.append(f"archive launch failed: {launched}")
                    log(events[-1])
                elif action == "kill run worker":
                    # the whole retained audit_log as Parquet: long enough to be killed inside its step
                    rid = file_export("audit_log", "parquet", {})
                    victim = None
                    deadline = time.time() + 240
                    while rid is not None and victim is None and time.time() < deadline:
                        for r in instance.get_runs(
                            dg.RunsFilter(tags={"perf_pipeline/export_request": str(rid)})
                        ):
                            if r.status == dg.DagsterRunStatus.STARTED and step_started(instance, r.run_id):
                                victim = (r.run_id, run_pid(instance, r.run_id))
                        time.sleep(0.2)
                    if victim is not None and victim[1] is None:
                        events.append(f"run {victim[0]}: no run worker pid in its events")
                        victim = None
                    if victim is None:
                        recoveries.append(
                            {"fault": "kill run worker", "note": f"no export run started (request {rid})"}
                        )
                    else:
                        run_id, pid = victim
                        assert pid is not None
                        os.kill(pid, signal.SIGKILL)
                        t = time.time()
                        killed = {"run_id": run_id, "pid": pid, "request": rid}
                        log(f"killed run worker pid {pid} of export run {run_id}")

                        def retries(run_id: str = run_id) -> list[Any]:
                            return list(instance.get_runs(dg.RunsFilter(tags={PARENT_RUN_TAG: run_id})))

                        def request_status(rid: int | None = rid) -> str | None:
                            with psycopg.connect(pg_url, connect_timeout=3) as conn:
                                req = exports.get_request(conn, rid) if rid is not None else None
                            return (
                                None if req is None else f"{req['status']} after {req['attempts']} attempts"
                            )

                        # every figure counts from the kill; the checks are polled together
                        times = wait_all(
                            {
                                "marked_failed_s": lambda run_id=run_id: (
                                    instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.FAILURE
                                ),
                                "retry_launched_s": lambda: bool(retries()),
                                "retry_succeeded_s": lambda: any(
                                    k.status == dg.DagsterRunStatus.SUCCESS for k in retries()
                                ),
                                "request_succeeded_s": lambda: (request_status() or "").startswith(
                                    "succeeded"
                                ),
                            },
                            t,
                            300,
                            0.5,
                        )
                        recoveries.append(
                            {
                                "fault": "SIGKILL of an export run worker",
                                "run": run_id[:8],
                                "retry_run": ", ".join(k.run_id[:8] for k in retries()),
                                **times,
                                "request": request_status(),
                            }
                        )
                if action != "archive":
                    log(f"recovery: {recoveries[-1]}")
            time.sleep(1)

        log("load window over; draining")
        api_thread.join(30)
        audit.join(10)
        usage.join(90)
        writer_closed = writer.close(timeout=120)
        sample_hits()
        rss_end = snapshot_rss(managed, state)

        # let runs in flight finish (bounded), then judge every run
        wait_until(
            lambda: (
                not instance.get_runs(
                    dg.RunsFilter(
                        statuses=[
                            dg.DagsterRunStatus.STARTED,
                            dg.DagsterRunStatus.STARTING,
                            dg.DagsterRunStatus.QUEUED,
                        ]
                    )
                )
            ),
            180,
            2,
        )
        records = sorted(instance.get_run_records(), key=lambda rec: rec.create_timestamp)
        infos = [RunInfo.of(rec) for rec in records]
        statuses = Counter(r.status for r in infos)
        by_job = Counter(f"{r.job}:{r.status}" for r in infos)
        # unrecovered failures miss the target (see judge_failed_runs for what recovers a failed run)
        failed_runs, unrecovered = judge_failed_runs(infos, fault_times, killed.get("run_id"), load_start)
        retried_ok = sum(1 for f in failed_runs if str(f["recovered_by"]).startswith("automatic retry"))

        with psycopg.connect(pg_url) as conn:
            found = {
                str(r[0])
                for r in conn.execute(
                    "SELECT id FROM audit_log WHERE event_type = 'soak.event' AND details->>'soak' = %s",
                    (marker,),
                )
            }
            audit_rows = conn.execute(
                "SELECT count(*) FROM audit_log WHERE event_type = 'soak.event' AND details->>'soak' = %s",
                (marker,),
            ).fetchone()[0]
            usage_rows = conn.execute(
                "SELECT count(*), count(DISTINCT session_id) FROM usage_log WHERE user_id = %s", (usage_user,)
            ).fetchone()
            export_status = Counter(
                r[0]
                for r in conn.execute("SELECT status FROM data_export WHERE id = ANY(%s)", (exports_filed,))
            )
        exports_not_ok = sum(n for status, n in export_status.items() if status != "succeeded")
        lost_audit = len(set(audit.ids) - found)
        lost_usage = len(set(usage.acked)) - usage_rows[1]
        totals: Counter[str] = Counter()
        for counts in minute_stats.values():
            totals.update(counts)
        served = sum(totals.get(k, 0) for k in cache.SERVED_FROM_CACHE)
        n_req = len(api.samples)
        failed_req = sum(1 for _, _, ok in api.samples if not ok)

        report += [
            {"metric": "duration_s", "value": args.duration},
            {"metric": "runs", "value": dict(statuses)},
            {"metric": "runs by job", "value": dict(by_job)},
            {"metric": "failed runs", "value": len(failed_runs)},
            {"metric": "failed runs retried automatically to success", "value": retried_ok},
            {"metric": "failed runs not recovered", "value": unrecovered},
            {"metric": "API requests", "value": n_req},
            {"metric": "failed API requests", "value": failed_req, "detail": dict(api.errors)},
            {"metric": "API p99 ms (whole run)", "value": percentile([m for _, m, _ in api.samples], 99)},
            {"metric": "audit events logged", "value": len(audit.ids), "detail": dict(audit.errors)},
            {
                "metric": "audit events lost",
                "value": lost_audit,
                "detail": f"rows {audit_rows}, duplicates {audit_rows - len(found)}, writer closed clean {writer_closed}, "
                f"writer metrics { ({k: v for k, v in writer.metrics().items() if 'ms' not in k}) }",
            },
            {
                "metric": "usage rows acknowledged",
                "value": len(usage.acked),
                "detail": f"retries {usage.errors}",
            },
            {"metric": "usage rows lost", "value": lost_usage, "detail": f"rows {usage_rows[0]}"},
            {"metric": "exports filed", "value": len(exports_filed), "detail": dict(export_status)},
            {"metric": "exports not succeeded", "value": exports_not_ok},
            {
                "metric": "archive run",
                "value": (
                    instance.get_run_by_id(archive_run).status.value if archive_run else "not launched"
                ),
            },
            {
                "metric": "cache hit rate",
                "value": served / sum(totals.values()) if totals else float("nan"),
                "detail": dict(totals),
            },
            {"metric": "process restarts by supervisor", "value": sum(len(m.restarts) for m in managed)},
        ]
        end_by_pid = {pid: mb for pid, mb in rss_end.values() if pid}
        for name, (pid, mb) in rss_start.items():  # the processes alive at the start, followed by pid
            if pid and pid in end_by_pid:
                end, note = end_by_pid[pid], ""
            elif name in rss_end:
                end, note = rss_end[name][1], "" if not pid else f"new process (pid {pid} gone)"
            else:
                end, note = float("nan"), "gone"
            report.append({"metric": f"RSS MB {name}", "value": f"{mb:.0f} → {end:.0f}", "detail": note})
        win = windows(api.samples, load_start)
        print("\n--- API latency per 5-minute window")
        print_table(win)
        print("\n--- failed runs")
        print_table(failed_runs)
        print("\n--- recoveries")
        print_table(recoveries)
        for ts, path, what in api.failures[:50]:
            events.append(f"API {what} at +{ts - load_start:.1f} s: {path}")
        print("\n--- events")
        for e in events:
            print("  " + e)
        print(
            f"\n--- soak ({args.duration:.0f} s, {os.cpu_count()} cores shared, load average "
            f"{os.getloadavg()[0]:.1f})"
        )
        print_table(report)
        RESULTS_DIR.mkdir(exist_ok=True)
        (RESULTS_DIR / "soak.json").write_text(
            json.dumps(
                {
                    "summary": report,
                    "windows": win,
                    "recoveries": recoveries,
                    "failed_runs": failed_runs,
                    "events": events,
                },
                indent=2,
                default=str,
            )
        )
        ok = (
            unrecovered == 0
            and exports_not_ok == 0
            and failed_req == 0
            and lost_audit == 0
            and lost_usage == 0
        )
        print(f"\ntargets ({TARGETS}): {'met' if ok else 'MISSED'}")
        return 0 if ok else 1
    finally:
        stopping.set()
        for m in managed:
            m.stop()
        with contextlib.suppress(Exception):
            from perf_pipeline import embedded as emb

            emb.stop_redis(state)
            emb.stop_postgres(state)
        if args.keep:
            log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
