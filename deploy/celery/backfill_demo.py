"""Runs on dagster-celery: a 30-day rollup backfill spread across two local Celery workers.

    .venv/bin/python deploy/celery/backfill_demo.py [--days 30]

What it does, all on this machine and cleaned up afterwards:
1. a fresh platform database with 35 days of usage (embedded or configured PostgreSQL), migrated;
2. a fresh Dagster storage database and a DAGSTER_HOME whose dagster.yaml is deploy/celery/dagster.yaml
   (CeleryRunLauncher, Redis broker on database 15 of the configured or embedded Redis);
3. two workers: `dagster-celery worker start -A dagster_celery.app` (one task at a time each), and
   `dagster-daemon run` (backfill daemon + queued run coordinator);
4. `dagster job backfill -j usage_daily_metrics_job --from … --to …`: one run per day;
5. waits for every run, then reports how many runs each worker executed (from the pid recorded in each
   run's RUN_START event, mapped to the worker process that owns it) and checks the rollup rows.

Nothing here is a scheduler or a queue of ours: Dagster's backfill daemon makes the runs, Celery moves
them, Dagster's run storage records them.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psutil
import psycopg
from psycopg import sql

from perf_pipeline.embedded import resolve_urls
from perf_pipeline.lib.migrations import apply_migrations
from perf_pipeline.lib.workload import WorkloadSpec, load_workload
from perf_pipeline.settings import PROJECT_ROOT, get_settings

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


def _db(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def _recreate(server: str, name: str) -> str:
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return _db(server, name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--timeout", type=int, default=900, help="seconds to wait for the backfill")
    args = parser.parse_args()

    settings = get_settings()
    urls = resolve_urls(settings)
    server = _db(urls.database_url, "postgres")
    platform = _recreate(server, "perf_pipeline_celery_demo")
    storage = _recreate(server, "dagster_celery_demo")
    apply_migrations(platform)
    end = dt.datetime.now(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    load_workload(platform, WorkloadSpec(days=args.days + 5, usage_per_day=3000, audit_per_day=0, end=end))
    last = (end - dt.timedelta(days=1)).date()
    first = last - dt.timedelta(days=args.days - 1)

    broker = urlunsplit(urlsplit(urls.redis_url)._replace(path="/15"))
    home = settings.state_dir / "dagster_celery_home"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    (home / "dagster.yaml").symlink_to(HERE / "dagster.yaml")
    (home / "celery.yaml").write_text(f"execution:\n  config:\n    broker: {broker}\n    backend: {broker}\n")
    env = dict(
        os.environ,
        DAGSTER_HOME=str(home),
        PERF_PIPELINE_DATABASE_URL=platform,
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        PERF_PIPELINE_REDIS_URL=urls.redis_url,
        PERF_PIPELINE_DAGSTER_PG_URL=urlunsplit(urlsplit(storage)._replace(scheme="postgresql+psycopg2")),
        PERF_PIPELINE_CELERY_BROKER_URL=broker,
    )
    workspace = str(PROJECT_ROOT / "workspace.yaml")
    procs: dict[str, subprocess.Popen] = {}
    logs = []
    try:
        for name in ("worker1", "worker2"):
            log = open(home / f"{name}.log", "w")  # noqa: SIM115 (closed in finally)
            logs.append(log)
            procs[name] = subprocess.Popen(
                [
                    str(BIN / "dagster-celery"),
                    "worker",
                    "start",
                    "-A",
                    "dagster_celery.app",
                    "-y",
                    str(home / "celery.yaml"),
                    "-n",
                    name,
                    "--",
                    "--pool=solo",
                ],
                env=env,
                cwd=home,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        log = open(home / "daemon.log", "w")  # noqa: SIM115
        logs.append(log)
        procs["daemon"] = subprocess.Popen(
            [str(BIN / "dagster-daemon"), "run", "-w", workspace],
            env=env,
            cwd=home,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        time.sleep(8)
        started = time.monotonic()
        subprocess.run(
            [
                str(BIN / "dagster"),
                "job",
                "backfill",
                "-w",
                workspace,
                "-l",
                "perf_pipeline",
                "-j",
                "usage_daily_metrics_job",
                "--from",
                first.isoformat(),
                "--to",
                last.isoformat(),
                "--noprompt",
            ],
            env=env,
            cwd=home,
            check=True,
        )
        print(f"backfill of {args.days} days submitted ({first} … {last}); waiting for the runs", flush=True)

        os.environ.update(env)
        import dagster as dg

        with dg.DagsterInstance.get() as instance:
            while True:
                runs = instance.get_runs(filters=dg.RunsFilter(job_name="usage_daily_metrics_job"))
                done = [r for r in runs if r.is_finished]
                if len(done) >= args.days or time.monotonic() - started > args.timeout:
                    break
                time.sleep(2)
            elapsed = time.monotonic() - started
            # which worker ran each run: the run's RUN_START event carries the pid of the run worker,
            # a child of one of the two celery worker processes
            children = {
                name: {c.pid for c in psutil.Process(p.pid).children(recursive=True)}
                for name, p in procs.items()
                if name.startswith("worker")
            }
            per_worker: collections.Counter[str] = collections.Counter()
            statuses = collections.Counter(r.status.value for r in runs)
            for run in runs:
                records = instance.get_records_for_run(
                    run.run_id, of_type=dg.DagsterEventType.RUN_START
                ).records
                pid = records[0].event_log_entry.dagster_event.pid if records else None
                owner = next((n for n, pids in children.items() if pid in pids), "unknown")
                per_worker[owner] += 1
        with psycopg.connect(platform) as conn:
            (rolled,) = conn.execute(
                "SELECT count(*) FROM usage_daily_metrics WHERE day BETWEEN %s AND %s", (first, last)
            ).fetchone()
        print(f"runs: {len(runs)} ({dict(statuses)}), wall time {elapsed:.1f} s")
        print(f"runs per worker: {dict(per_worker)}")
        print(f"usage_daily_metrics rows for the {args.days} days: {rolled}")
        ok = (
            statuses.get("SUCCESS", 0) == args.days
            and rolled == args.days
            and all(per_worker[w] > 0 for w in ("worker1", "worker2"))
        )
        print("OK: the backfill spread across both workers" if ok else "FAILED: see logs in " + str(home))
        return 0 if ok else 1
    finally:
        for proc in procs.values():
            for child in psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []:
                child.terminate()
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        for log in logs:
            log.close()
        for name in ("perf_pipeline_celery_demo", "dagster_celery_demo"):
            with psycopg.connect(server, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


if __name__ == "__main__":
    sys.exit(main())
