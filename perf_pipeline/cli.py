"""`perf-pipeline …`: the operator's command line.

Every command works on the configured servers (``PERF_PIPELINE_DATABASE_URL`` / ``PERF_PIPELINE_REDIS_URL``)
or, when those are unset, on the embedded ones, which it starts if needed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import logging
import os
import shlex
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence

from perf_pipeline.settings import PROJECT_ROOT, Settings, SettingsError, get_settings, shown

log = logging.getLogger("perf_pipeline")

Handler = Callable[[argparse.Namespace], int]


def _urls(start: bool = True):
    from perf_pipeline.embedded import resolve_urls

    return resolve_urls(get_settings(), start=start)


def dagster_environment(settings: Settings | None = None) -> dict[str, str]:
    """Environment for `dagster dev` / `dagster-daemon`: URLs, DAGSTER_HOME, artifact folders."""
    from perf_pipeline.embedded import ensure_database

    settings = settings or get_settings()
    urls = _urls()
    ensure_database(urls.dagster_database_url)
    home = settings.state_dir / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    link = home / "dagster.yaml"
    if not link.is_symlink():
        link.unlink(missing_ok=True)
        link.symlink_to(PROJECT_ROOT / "dagster.yaml")
    env = urls.exports()
    env.update(
        {
            "DAGSTER_HOME": str(home),
            "PERF_PIPELINE_DAGSTER_ARTIFACTS_DIR": str(settings.state_dir / "dagster_storage"),
            "PERF_PIPELINE_DAGSTER_COMPUTE_LOGS_DIR": str(settings.state_dir / "dagster_compute_logs"),
        }
    )
    return env


def pool_limits(settings: Settings | None = None) -> dict[str, int]:
    """Dagster pool limits: heavy database work one at a time; exports as configured."""
    settings = settings or get_settings()
    return {"postgres_heavy": 1, "exports": settings.export_concurrency}


def apply_pool_limits(env: dict[str, str]) -> dict[str, int]:
    """Write the pool limits into the Dagster instance (they live in its storage, not in dagster.yaml)."""
    import dagster as dg

    with environment(env), dg.DagsterInstance.get() as instance:
        limits = pool_limits()
        for pool, limit in limits.items():
            instance.event_log_storage.set_concurrency_slots(pool, limit)
        return limits


@contextlib.contextmanager
def environment(env: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` with ``env`` set for the duration, then as it was (variables it added removed again).
    The environment is the whole process's: not for use while other threads read it."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ------------------------------------------------------------------------------------------- commands


def cmd_env(args: argparse.Namespace) -> int:
    for key, value in dagster_environment().items():
        print(f"export {key}={shlex.quote(value)}")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from perf_pipeline.lib.redact import redact_url

    urls = _urls()
    print(f"PostgreSQL: {redact_url(urls.database_url)}{'  (embedded)' if urls.embedded_postgres else ''}")
    print(f"Redis:      {redact_url(urls.redis_url)}{'  (embedded)' if urls.embedded_redis else ''}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from perf_pipeline.embedded import stop_postgres, stop_redis

    settings = get_settings()
    if settings.database_url is None:
        print("embedded PostgreSQL:", "stopped" if stop_postgres(settings.state_dir) else "was not running")
    if settings.redis_url is None:
        print("embedded Redis:", "stopped" if stop_redis(settings.state_dir) else "was not running")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from perf_pipeline.lib.migrations import apply_migrations

    url = _urls().database_url
    applied = apply_migrations(url)
    print(f"applied {len(applied)} migration(s)" + (": " + ", ".join(applied) if applied else "; up to date"))
    if applied and os.environ.get("DAGSTER_HOME"):
        report_schema_materialization(url, "perf-pipeline migrate")
    return 0


def report_schema_materialization(url: str, by: str) -> None:
    """Show the migrations just applied on ``platform_schema`` in the Dagster instance of DAGSTER_HOME (a
    runless materialization); without a reachable instance the observe_platform_tables sensor reports them
    within a minute of the daemon running. Never fails the command."""
    import dagster as dg

    from perf_pipeline.lib.db import connect

    try:
        with connect(url, autocommit=True) as conn:
            total = conn.execute("SELECT count(*) FROM schema_migrations").fetchone()[0]
        with dg.DagsterInstance.get() as instance:
            instance.report_runless_asset_event(
                dg.AssetMaterialization(
                    asset_key="platform_schema",
                    metadata={"migrations_applied_total": dg.MetadataValue.int(total), "applied_by": by},
                )
            )
    except Exception as exc:  # noqa: BLE001 — the migrations are applied; the UI catches up through the sensor
        log.warning("could not report the migrations to the Dagster instance (%s); the sensor will", exc)


def cmd_seed(args: argparse.Namespace) -> int:
    from perf_pipeline.lib.migrations import apply_migrations
    from perf_pipeline.lib.workload import WorkloadSpec, database_is_empty, load_workload

    url = _urls().database_url
    apply_migrations(url)
    if args.if_empty and not database_is_empty(url):
        print("database already holds usage/audit rows; not seeding (--if-empty)")
        return 0
    spec_kwargs = dict(
        days=args.days,
        usage_per_day=args.usage_per_day,
        audit_per_day=args.audit_per_day,
        users=args.users,
        seed=args.seed,
    )
    if args.end:
        spec_kwargs["end"] = args.end
    result = load_workload(url, WorkloadSpec(**spec_kwargs), workers=args.workers, progress=not args.quiet)
    rows = result.sessions + result.usage_rows + result.audit_rows
    print(
        f"loaded {result.sessions:,} sessions, {result.usage_rows:,} usage rows, {result.audit_rows:,} audit rows "
        f"in {result.seconds:.2f} s ({rows / result.seconds:,.0f} rows/s)"
    )
    return 0


def cmd_settings(args: argparse.Namespace) -> int:
    for var, default, doc in Settings.documented():
        current = os.environ.get(var)
        print(
            f"{var}\n    {doc}\n    default: {default or '(unset)'}"
            + (f"\n    current: {shown(var, current)}" if current else "")
        )
    settings = get_settings()
    if any(str(loc).startswith("s3://") for loc in (settings.archive_dir, settings.export_dir)):
        from perf_pipeline.lib.redact import redact_url
        from perf_pipeline.lib.storage import AWS_SECRET_VARIABLES, AWS_VARIABLES

        print("\nObject storage (read by pyarrow as the AWS SDK does; secrets not shown):")
        for var in AWS_VARIABLES:
            value = os.environ.get(var)
            if value is None:
                continue
            if var in AWS_SECRET_VARIABLES:
                value = "(set, not shown)"
            elif var.startswith("AWS_ENDPOINT_URL"):
                value = redact_url(value) or ""
            print(f"{var}: {value}")
    return 0


def cmd_storage(args: argparse.Namespace) -> int:
    """`storage check`: prove both locations usable (bucket there, a probe object written and deleted)."""
    from perf_pipeline.lib.storage import open_store

    settings = get_settings()
    for var, location in (
        ("PERF_PIPELINE_ARCHIVE_DIR", settings.archive_dir),
        ("PERF_PIPELINE_EXPORT_DIR", settings.export_dir),
    ):
        store = open_store(location, var)
        store.check()  # StorageError: one line naming the setting (main)
        print(f"{var}: {store.describe()}: ok")
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    """Start servers, migrate, load a demo if empty, run `dagster dev` and bootstrap it (perf_pipeline/dev.py)."""
    from perf_pipeline import dev

    return dev.run(args.host, args.port, force_bootstrap=args.bootstrap, skip_bootstrap=args.no_bootstrap)


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the dashboard API (uvicorn, ``--workers`` processes) on the configured or embedded servers."""
    import uvicorn

    settings = get_settings()
    # worker processes read their URLs from the environment: hand them the resolved ones
    os.environ.update(_urls().exports())
    if not settings.admin_tokens:
        log.warning("PERF_PIPELINE_ADMIN_TOKENS is empty: every dashboard request will be answered 401")
    uvicorn.run(
        "perf_pipeline.api.app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level="warning" if not args.access_log else "info",
        access_log=args.access_log,
        backlog=args.backlog,
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """`export request …` files a data_export request (validated first); `export status ID` prints one;
    `export run ID` runs one in this process (what export_job does, without Dagster).

    A bad request (any field) is an ExportRequestError, a ValueError: main prints it in one line, exit 2.
    A request held by another process, or an export that failed while running (recorded on the request),
    is one ``error:`` line and exit 1."""
    import psycopg

    from perf_pipeline.lib import exports
    from perf_pipeline.lib.db import connect

    settings = get_settings()
    retention = exports.retention_months_from(settings)
    if args.export_command == "request":
        requested_by = exports.requester_uuid(args.requested_by)
        filters = {
            k: v
            for k, v in {
                "user_id": args.user_id,
                "start": args.start,
                "end": args.end,
                "entity_type": args.entity_type,
                "severity": args.severity,
            }.items()
            if v is not None
        }
        # refuse now what the export job would refuse later (raises ExportRequestError, a ValueError)
        exports.validate_request(
            0,
            args.kind,
            args.format,
            filters,
            today=dt.datetime.now(dt.UTC).date(),
            retention_months=retention,
        )
        with connect(_urls().database_url) as conn:
            request_id = exports.file_request(conn, requested_by, args.kind, args.format, filters)
            conn.commit()
        print(request_id)
        return 0
    url = _urls().database_url
    with connect(url, autocommit=True) as conn:
        found = exports.get_request(conn, args.id)
    if found is None:
        print(f"error: no export request {args.id}", file=sys.stderr)
        return 1
    if args.export_command == "status":
        print(exports.describe(found))
        return 0 if found["status"] != "failed" else 1
    try:
        result = exports.run_export(
            url,
            args.id,
            settings.export_dir,
            statement_timeout_s=settings.export_statement_timeout_s,
            retention_months=retention,
            max_mb_per_s=settings.export_max_mb_s,
            progress=lambda p: print(
                f"{p.rows:,} rows, {p.csv_bytes / 1e6:,.1f} MB in {p.seconds:.1f} s", file=sys.stderr
            ),
        )
    except exports.ExportBusyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (psycopg.Error, OSError) as exc:  # recorded on the request (unless the database is unreachable)
        print(
            f"error: export request {args.id} failed: {type(exc).__name__}: {_redacted(exc)}", file=sys.stderr
        )
        return 1
    print(
        f"{result.uri}: {result.rows:,} rows, {result.bytes:,} bytes ({result.csv_bytes / 1e6:,.1f} MB of CSV) "
        f"in {result.seconds:.2f} s, sha256 {result.sha256}"
    )
    return 0


def cmd_archive(args: argparse.Namespace) -> int:
    """`archive list` prints archive_manifest; `archive restore YYYY-MM` loads a month back and re-attaches it;
    `archive run YYYY-MM` archives one month now (what audit_log_archive does, retention not checked)."""
    from perf_pipeline.lib import archive
    from perf_pipeline.lib.db import connect
    from perf_pipeline.lib.partitioning import month_of_key

    with connect(_urls().database_url, autocommit=True) as conn:
        if args.archive_command == "list":
            for m in archive.list_manifest(conn, args.table):
                print(
                    f"{m.partition_name}  {m.state:<9} rows={m.rows if m.rows is not None else '-'} "
                    f"bytes={m.bytes if m.bytes is not None else '-'} sha256={(m.sha256 or '-')[:16]} {m.file_path or ''}"
                )
            return 0
        month = month_of_key(args.month)
        try:
            if args.archive_command == "restore":
                r = archive.restore_partition(conn, args.table, month)
                print(
                    f"{args.table} {month:%Y-%m}: "
                    + (
                        "already restored"
                        if r.already
                        else f"restored {r.rows:,} rows and re-attached in {r.duration_ms / 1000:.2f} s"
                    )
                )
            else:
                a = archive.archive_partition(conn, args.table, month, get_settings().archive_dir)
                print(
                    f"{args.table} {month:%Y-%m}: {a.state}, {a.rows:,} rows, {a.bytes:,} bytes, "
                    f"steps {', '.join(a.steps_run) or 'none'} in {a.duration_ms / 1000:.2f} s, {a.file_path or ''}"
                )
        except archive.ArchiveError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    """The db_health_report (markdown) and, with --budgets, the latency probes against their budgets."""
    from perf_pipeline.lib import health
    from perf_pipeline.lib.db import connect

    settings = get_settings()
    with connect(_urls().database_url, autocommit=True) as conn:
        print(health.report_markdown(health.health_report(conn)))
        if not args.budgets:
            return 0
        budgets = {health.AUDIT: settings.audit_budget_ms, health.ANALYTICS: settings.analytics_budget_ms}
        results = health.run_probes(conn)
    print("\n### Query latency budgets\n")
    print(
        health.markdown_table(
            ["query", "group", "p50 ms", "p95 ms", "budget ms", "index used", "result"],
            [
                (
                    r.name,
                    r.group,
                    r.p50_ms,
                    r.p95_ms,
                    budgets[r.group],
                    r.index_used,
                    r.skipped or ("ok" if r.within(budgets[r.group]) else "FAIL"),
                )
                for r in results
            ],
        )
    )
    return 0 if all(r.within(budgets[r.group]) for r in results) else 1


# --------------------------------------------------------------------------------------------- parser


def _date(value: str) -> dt.datetime:
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO date/time: {value!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def _request_id(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a request id: {value[:40]!r}") from None
    if not 1 <= number < 2**63:
        raise argparse.ArgumentTypeError(f"not a request id: {number}")
    return number


def _positive(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {number}")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="perf-pipeline",
        description="Keeps the platform's audit/usage/session/export tables fast (Dagster code location + tools). "
        "Uses PERF_PIPELINE_DATABASE_URL / PERF_PIPELINE_REDIS_URL, or embedded servers when unset.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Handler, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(handler=handler)
        return p

    add(
        "env",
        cmd_env,
        "print shell `export` lines for the URLs in use (starts the embedded servers if needed)",
    )
    add(
        "up",
        cmd_up,
        "start the embedded PostgreSQL and Redis (those not configured by URL) and print the URLs",
    )
    add("down", cmd_down, "stop the embedded PostgreSQL and Redis")
    add("migrate", cmd_migrate, "apply pending sql/migrations in order (idempotent)")
    add("settings", cmd_settings, "list every setting, its default and current value")
    p = add(
        "storage",
        cmd_storage,
        "check the archive and export locations (folders or s3:// prefixes) can be written",
    )
    p.add_argument("storage_command", choices=["check"], metavar="check")
    p = add(
        "health",
        cmd_health,
        "print the database health report (sizes, dead tuples, index usage, slow statements)",
    )
    p.add_argument(
        "--budgets", action="store_true", help="also run the latency probes; exit 1 if one is over budget"
    )
    p = add("seed", cmd_seed, "load a reproducible synthetic workload with COPY")
    p.add_argument(
        "--days", type=int, required=True, help="UTC calendar days of data, ending today (partial)"
    )
    p.add_argument(
        "--usage-per-day", type=_positive, required=True, help="usage_log rows (and sessions) per day"
    )
    p.add_argument("--audit-per-day", type=_positive, required=True, help="audit_log rows per day")
    p.add_argument("--users", type=int, default=5000, help="distinct users, Zipf-skewed (default 5000)")
    p.add_argument("--seed", type=_positive, default=42, help="random seed (same seed and --end: same rows)")
    p.add_argument("--end", type=_date, help="end of the data (ISO, UTC; default: now)")
    p.add_argument("--workers", type=int, default=2, help="parallel COPY connections (default 2)")
    p.add_argument("--if-empty", action="store_true", help="do nothing if usage_log or audit_log has rows")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p = add(
        "dev",
        cmd_dev,
        "start servers, migrate, load a demo workload if empty, run `dagster dev` (UI + daemon) and bootstrap it",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=3000)
    p.add_argument(
        "--bootstrap", action="store_true", help="launch the first hour's runs even if this instance has them"
    )
    p.add_argument("--no-bootstrap", action="store_true", help="only start Dagster, launch nothing")
    p = add(
        "serve",
        cmd_serve,
        "run the dashboard HTTP API (FastAPI on uvicorn): /api/v1/admin/dashboard/…, /healthz",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=2, help="uvicorn worker processes (default 2)")
    p.add_argument("--backlog", type=int, default=4096, help="listen backlog (default 4096)")
    p.add_argument("--access-log", action="store_true", help="log every request")
    p = add(
        "export", cmd_export, "background exports of usage_log / audit_log: file a request, show one, run one"
    )
    export_sub = p.add_subparsers(dest="export_command", required=True, metavar="ACTION")
    e = export_sub.add_parser(
        "request", help="file a data_export request (the sensor launches it); prints its id"
    )
    e.add_argument("--requested-by", required=True, help="UUID of the requesting user")
    e.add_argument("--kind", required=True, help="usage_log or audit_log")
    e.add_argument("--format", default="csv.gz", help="csv.gz (default) or parquet")
    e.add_argument("--user-id", help="only this user's rows (UUID)")
    e.add_argument("--start", help="first UTC day, YYYY-MM-DD (default: oldest day within retention)")
    e.add_argument("--end", help="last UTC day, inclusive, YYYY-MM-DD (default: today)")
    e.add_argument("--entity-type", help="audit_log only: this entity type")
    e.add_argument("--severity", action="append", help="audit_log only: this severity (repeatable)")
    e = export_sub.add_parser("status", help="print a request: status, file, rows, bytes, sha256, error")
    e.add_argument("id", type=_request_id)
    e = export_sub.add_parser(
        "run", help="run a request now in this process (retry of a failed one included)"
    )
    e.add_argument("id", type=_request_id)
    p = add(
        "archive",
        cmd_archive,
        "archived monthly partitions: list the manifest, restore a month, archive one now",
    )
    archive_sub = p.add_subparsers(dest="archive_command", required=True, metavar="ACTION")
    for action, help_ in (
        ("list", "print archive_manifest (state, rows, bytes, sha256, file) per month"),
        ("restore", "load YYYY-MM back from its verified file and re-attach it (queries see it again)"),
        ("run", "archive YYYY-MM now: detach, Parquet, verify, drop (resumes an interrupted one)"),
    ):
        e = archive_sub.add_parser(action, help=help_)
        if action != "list":
            e.add_argument("month", help="YYYY-MM")
        e.add_argument(
            "--table", choices=["audit_log", "usage_log"], default="audit_log" if action != "list" else None
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.handler(args)
    except SettingsError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # WorkloadError, PartitionError, …: bad input, named in the message
        print(f"error: {_redacted(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # unreachable servers and the like: one line, never a traceback or a secret
        message = _unavailable(exc)
        if message is None:
            if args.verbose:
                raise
            message = f"{type(exc).__name__}: {_redacted(exc)} (run with -v for the traceback)"
        print(f"error: {message}", file=sys.stderr)
        return 2 if _unavailable(exc) else 1


def _redacted(exc: BaseException) -> str:
    from perf_pipeline.lib.redact import redact_text, url_secrets

    settings = Settings.from_env()
    secrets = url_secrets(settings.database_url, settings.redis_url, settings.dagster_database_url)
    secrets += settings.secret_tokens()
    secrets += tuple(v for k in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN") if (v := os.environ.get(k)))
    return redact_text(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__, secrets)


def _unavailable(exc: BaseException) -> str | None:
    """One line for an unreachable server, an unusable archive/export location or an embedded server that
    would not start, else None."""
    import psycopg
    import redis

    from perf_pipeline.embedded import EmbeddedError
    from perf_pipeline.lib.redact import redact_url
    from perf_pipeline.lib.storage import StorageError

    settings = Settings.from_env()
    if isinstance(exc, psycopg.OperationalError) and not isinstance(exc, psycopg.errors.QueryCanceled):
        where = redact_url(settings.database_url) if settings.database_url else "the embedded PostgreSQL"
        return f"cannot use PostgreSQL at {where}: {_redacted(exc)}"
    if isinstance(exc, redis.RedisError):
        where = redact_url(settings.redis_url) if settings.redis_url else "the embedded Redis"
        return f"cannot use Redis at {where}: {_redacted(exc)}"
    if isinstance(exc, EmbeddedError | StorageError):  # StorageError names the setting
        return _redacted(exc)
    return None


if __name__ == "__main__":
    sys.exit(main())
