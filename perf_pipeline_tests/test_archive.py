"""Archive → verify → drop → restore of monthly partitions on real PostgreSQL, crash at every step,
a concurrent writer, the Dagster assets/checks/schedules, the CLI and the usage retention rule.

The whole module runs twice: archives in a local folder and in an S3 bucket (the session's private
SeaweedFS), each with a database of its own (``module_location``)."""

from __future__ import annotations

import datetime as dt
import io
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import psycopg
import pyarrow.parquet as pq
import pytest

from perf_pipeline import cli
from perf_pipeline.defs.archive.assets import audit_log_archive, usage_log_retention
from perf_pipeline.defs.archive.checks import audit_log_archive_files_match_manifest
from perf_pipeline.defs.archive.schedules import archive_audit_log
from perf_pipeline.defs.resources import PostgresResource
from perf_pipeline.lib import archive as a
from perf_pipeline.lib.migrations import apply_migrations
from perf_pipeline.lib.partitioning import (
    PartitionError,
    ensure_partition,
    ensure_partitions,
    list_partitions,
    move_default_rows,
)
from perf_pipeline.lib.storage import Store
from perf_pipeline.lib.workload import WorkloadSpec, load_workload
from perf_pipeline.settings import PROJECT_ROOT, get_settings
from perf_pipeline.testing import materialize
from perf_pipeline_tests.conftest import Location, create_database, drop_database

UTC = dt.UTC


@pytest.fixture(scope="module")
def seeded(module_location: Location, pg_server_url: str) -> Iterator[str]:
    """Jan-Jun 2024 of generated audit and usage rows (+ hand-made edge rows in March), ~80 rows/day; a
    database per storage backend (the module runs once per backend)."""
    db_url = create_database(pg_server_url)
    apply_migrations(db_url)
    yield _seed(db_url)
    drop_database(pg_server_url, db_url)


def _seed(db_url: str) -> str:
    load_workload(
        db_url,
        WorkloadSpec(
            days=182,
            usage_per_day=30,
            audit_per_day=80,
            users=50,
            end=dt.datetime(2024, 6, 30, 23, 0, tzinfo=UTC),
        ),
    )
    with psycopg.connect(db_url, autocommit=True) as conn:
        rows = [
            # NULLs, an empty string, quotes, commas, a newline, unicode, nested JSON, IPv6, month edges
            (dt.datetime(2024, 3, 1, tzinfo=UTC), None, None, None, "", None, None),
            (
                dt.datetime(2024, 3, 31, 23, 59, 59, 999999, tzinfo=UTC),
                uuid.uuid4(),
                "session",
                'a "quoted", id',
                'line one\nline "two", 3',
                '{"k": ["x", {"y": null}], "ü": "é"}',
                "2001:db8::1",
            ),
            (
                dt.datetime(2024, 3, 15, 12, 0, 0, 1, tzinfo=UTC),
                uuid.uuid4(),
                "user",
                "u-1",
                "\\back\\slash\t",
                "[]",
                "192.168.0.0/24",
            ),
        ]
        for ts, user, etype, eid, desc, details, ip in rows:
            conn.execute(
                "INSERT INTO audit_log (timestamp, user_id, entity_type, entity_id, event_type, operation, "
                "severity, description, details, ip) VALUES (%s, %s, %s, %s, 'x.y', 'update', 'critical', "
                "%s, %s, %s)",
                (ts, user, etype, eid, desc, details, ip),
            )
    return db_url


@pytest.fixture(scope="module")
def archive_dir(module_location: Location) -> Path | str:
    """One archive location for the module, as in production: the file check sees every archived month.
    A local folder (Path) or an s3://bucket/prefix URL."""
    return module_location.value


@pytest.fixture(scope="module")
def store(module_location: Location) -> Store:
    """The archive location's store: what the tests read back and damage."""
    return module_location.store


def _rows(conn: psycopg.Connection, table: str, month: dt.date) -> list[tuple]:
    key = "timestamp" if table == "audit_log" else "created_at"
    start, end = dt.datetime(month.year, month.month, 1, tzinfo=UTC), None
    end = dt.datetime(month.year + month.month // 12, month.month % 12 + 1, 1, tzinfo=UTC)
    return conn.execute(
        f'SELECT * FROM {table} WHERE "{key}" >= %s AND "{key}" < %s ORDER BY id',  # noqa: S608
        (start, end),
    ).fetchall()


def _attached(conn: psycopg.Connection, table: str) -> set[str]:
    return {p.name for p in list_partitions(conn, table)}


class _Crash(RuntimeError):
    pass


def _crash_after(step: str):
    def hook(done: str) -> None:
        if done == step:
            raise _Crash(step)

    return hook


def test_archive_verify_drop_restore_rearchive(seeded: str, archive_dir: Path | str, store: Store) -> None:
    month = dt.date(2024, 3, 1)
    with psycopg.connect(seeded, autocommit=True) as conn:
        before = _rows(conn, "audit_log", month)
        assert len(before) > 2000
        result = a.archive_partition(conn, "audit_log", month, archive_dir)
        assert result.state == "dropped" and result.steps_run == ["detach", "export", "verify", "drop"]
        assert result.detach_mode == "plain"  # DETACH CONCURRENTLY is refused while audit_log_default exists
        assert result.rows == len(before)
        # table gone, queries no longer see the month, nothing fell into DEFAULT
        assert "audit_log_y2024m03" not in _attached(conn, "audit_log")
        assert conn.execute("SELECT to_regclass('audit_log_y2024m03')").fetchone()[0] is None
        assert _rows(conn, "audit_log", month) == []
        m = a.manifest_row(conn, "audit_log", month)
        assert m is not None and m.state == "dropped" and m.rows == len(before)
        key = "audit_log/audit_log_y2024m03.parquet"
        assert a.archive_key("audit_log", month) == key
        if isinstance(archive_dir, Path):
            assert Path(m.file_path or "") == archive_dir / key
        else:
            assert m.file_path == f"{archive_dir}/{key}"  # the object's URI, read back by verify and restore
        info = store.info(key)
        assert info is not None and (info.size, info.etag) == (m.bytes, m.etag) and m.etag
        assert m.verified_at is not None  # read back in full by the verify step
        assert store.sha256(key) == (m.bytes, m.sha256)
        with store.open_input(key) as f:
            parquet = pq.ParquetFile(f)
            assert parquet.metadata.num_rows == len(before)
            assert parquet.metadata.row_group(0).column(0).compression == "ZSTD"
        assert m.min_ts == min(r[1] for r in before) and m.max_ts == max(r[1] for r in before)
        assert [k for k in store.walk() if "/." in f"/{k}"] == []  # no temporary object left
        assert a.verify_archives(conn, "audit_log").problems == {}
        # re-running an archived month does nothing
        again = a.archive_partition(conn, "audit_log", month, archive_dir)
        assert again.steps_run == [] and again.state == "dropped"

        restored = a.restore_partition(conn, "audit_log", month)
        assert restored.rows == len(before)
        assert "audit_log_y2024m03" in _attached(conn, "audit_log")
        # the bound CHECK that let the attach skip its scan is gone, as on every sibling
        constraints = conn.execute(
            "SELECT conname FROM pg_constraint WHERE conrelid = 'audit_log_y2024m03'::regclass"
        ).fetchall()
        assert constraints and not [c for (c,) in constraints if c.endswith("_bound")]
        assert _rows(conn, "audit_log", month) == before  # every column of every row
        assert a.restore_partition(conn, "audit_log", month).already
        # restore → re-archive is lossless: the same rows give the same file
        rearchived = a.archive_partition(conn, "audit_log", month, archive_dir)
        assert (
            rearchived.state == "dropped" and rearchived.sha256 == m.sha256 and rearchived.rows == len(before)
        )
        assert a.manifest_row(conn, "audit_log", month).archive_count == 2


#: the steps of an archive run after which it may die, before the drop (a month of its own for each)
_STEPS = ["detach", "export", "verify"]


@pytest.mark.parametrize("step", _STEPS)
def test_crash_after_each_step_is_finished_by_a_rerun(seeded: str, archive_dir: Path, step: str) -> None:
    month = [dt.date(2024, 2, 1), dt.date(2024, 4, 1), dt.date(2024, 5, 1)][_STEPS.index(step)]
    with psycopg.connect(seeded, autocommit=True) as conn:
        before = _rows(conn, "audit_log", month)
        with pytest.raises(_Crash):
            a.archive_partition(conn, "audit_log", month, archive_dir, hook=_crash_after(step))
        state = a.manifest_row(conn, "audit_log", month).state
        assert state == {"detach": "detached", "export": "exported", "verify": "verified"}[step]
        result = a.archive_partition(conn, "audit_log", month, archive_dir)
        remaining = ["detach", "export", "verify", "drop"]
        # a run resuming at `verified` reads the file back again before it drops (it relies only on a file
        # it proved itself)
        expected = remaining[remaining.index(step) + 1 :] if step != "verify" else ["verify", "drop"]
        assert result.steps_run == expected
        assert result.state == "dropped" and result.rows == len(before)
        a.restore_partition(conn, "audit_log", month)
        assert _rows(conn, "audit_log", month) == before
        # leave it archived for the check test
        a.archive_partition(conn, "audit_log", month, archive_dir)


_KILL_AFTER = """
import datetime as dt, os, signal, sys
import psycopg
from perf_pipeline.lib.archive import archive_partition
url, month, folder, step = sys.argv[1], dt.date.fromisoformat(sys.argv[2]), sys.argv[3], sys.argv[4]
def hook(done):
    if done == step:
        os.kill(os.getpid(), signal.SIGKILL)  # no finally, no rollback: the process just dies
with psycopg.connect(url, autocommit=True) as conn:
    archive_partition(conn, "usage_log", month, folder, hook=hook)
"""


@pytest.mark.parametrize("step", _STEPS)
def test_sigkill_after_each_step_is_finished_by_a_rerun(seeded: str, archive_dir: Path, step: str) -> None:
    month = [dt.date(2024, 1, 1), dt.date(2024, 2, 1), dt.date(2024, 3, 1)][_STEPS.index(step)]
    with psycopg.connect(seeded, autocommit=True) as conn:
        before = _rows(conn, "usage_log", month)
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_AFTER, seeded, month.isoformat(), str(archive_dir), step],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    with psycopg.connect(seeded, autocommit=True) as conn:
        assert (
            a.manifest_row(conn, "usage_log", month).state
            == {"detach": "detached", "export": "exported", "verify": "verified"}[step]
        )
        result = a.archive_partition(conn, "usage_log", month, archive_dir)  # the killed run's lock is gone
        assert result.state == "dropped" and result.rows == len(before) > 0
        a.restore_partition(conn, "usage_log", month)
        assert _rows(conn, "usage_log", month) == before


@pytest.mark.parametrize("damage", ["truncated", "deleted", "replaced"])
def test_a_resumed_drop_proves_the_file_again_after_a_sigkill(
    seeded: str, module_location: Location, damage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed right after `verify` committed, the file then damaged, lost (a host without the folder) or
    replaced by another valid Parquet file: the resumed run (the CLI, as an operator or the monthly
    schedule would) must not drop the table on the strength of the old verification. It exports again,
    verifies, and only then drops; the month restores row for row."""
    month = {
        "truncated": dt.date(2022, 4, 1),
        "deleted": dt.date(2022, 5, 1),
        "replaced": dt.date(2022, 6, 1),
    }[damage]
    location = module_location.sub(f"resumed-{damage}")
    folder, store = location.value, location.store
    with psycopg.connect(seeded, autocommit=True) as conn:
        _fresh_usage_month(conn, month, 300)
        before = _rows(conn, "usage_log", month)
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_AFTER, seeded, month.isoformat(), str(folder), "verify"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    key = a.archive_key("usage_log", month)
    with psycopg.connect(seeded, autocommit=True) as conn:
        assert a.manifest_row(conn, "usage_log", month).state == "verified"
        _damage(store, key, damage)
    monkeypatch.setenv("PERF_PIPELINE_DATABASE_URL", seeded)
    monkeypatch.setenv("PERF_PIPELINE_REDIS_URL", "redis://127.0.0.1:1/0")  # not used; no embedded Redis
    monkeypatch.setenv("PERF_PIPELINE_ARCHIVE_DIR", str(folder))
    assert cli.main(["archive", "run", month.strftime("%Y-%m"), "--table", "usage_log"]) == 0
    with psycopg.connect(seeded, autocommit=True) as conn:
        m = a.manifest_row(conn, "usage_log", month)
        assert m.state == "dropped" and m.rows == len(before)
        assert store.sha256(key)[1] == m.sha256 and _parquet_rows(store, key) == len(before)
        a.restore_partition(conn, "usage_log", month)
        assert _rows(conn, "usage_log", month) == before


def _parquet_rows(store: Store, key: str) -> int:
    with store.open_input(key) as f:
        return pq.ParquetFile(f).metadata.num_rows


def _damage(store: Store, key: str, how: str) -> None:
    """Damage an archive object in its store: cut in half, deleted, a byte flipped, or replaced by another
    valid Parquet file of the same name (one row short)."""
    data = store.read_bytes(key)
    if how == "truncated":
        store.write_bytes(key, data[: len(data) // 2])
    elif how == "deleted":
        assert store.delete(key)
    elif how == "flipped":
        flipped = bytearray(data)
        flipped[len(flipped) // 2] ^= 0xFF
        store.write_bytes(key, bytes(flipped))
    else:
        with store.open_input(key) as f:
            table = pq.read_table(f)
        out = io.BytesIO()
        pq.write_table(table.slice(1), out, compression="zstd")
        store.write_bytes(key, out.getvalue())


def test_late_rows_of_an_archived_month_come_back_with_its_restore(seeded: str, archive_dir: Path) -> None:
    month = dt.date(2024, 4, 1)  # archived by the crash test above when it ran first on this worker
    with psycopg.connect(seeded, autocommit=True) as conn:
        row = a.manifest_row(conn, "audit_log", month)
        if row is None or row.state != "dropped":
            a.archive_partition(conn, "audit_log", month, archive_dir)
        archived_rows = a.manifest_row(conn, "audit_log", month).rows
        conn.execute(
            "INSERT INTO audit_log (timestamp, event_type, operation, description) "
            "VALUES ('2024-04-15 10:00Z', 'x.y', 'update', 'late')"
        )
        assert conn.execute("SELECT count(*) FROM audit_log_default").fetchone()[0] == 1
        # a fresh partition would shadow the archive: move_default_rows refuses and says what to do
        with pytest.raises(PartitionError, match="2024-04.*restore"):
            move_default_rows(conn, "audit_log")
        restored = a.restore_partition(conn, "audit_log", month)
        assert restored.late_rows == 1 and restored.rows == archived_rows + 1
        assert conn.execute("SELECT count(*) FROM audit_log_default").fetchone()[0] == 0
        assert len(_rows(conn, "audit_log", month)) == archived_rows + 1
        again = a.archive_partition(conn, "audit_log", month, archive_dir)
        assert again.rows == archived_rows + 1 and a.verify_archives(conn, "audit_log").problems == {}


def test_damaged_file_is_exported_again_before_the_drop(seeded: str, archive_dir: Path, store: Store) -> None:
    month = dt.date(2024, 6, 1)
    with psycopg.connect(seeded, autocommit=True) as conn:
        with pytest.raises(_Crash):
            a.archive_partition(conn, "usage_log", month, archive_dir, hook=_crash_after("export"))
        key = a.archive_key("usage_log", month)
        store.write_bytes(key, store.read_bytes(key)[:-100])  # truncated: verification must not pass it
        result = a.archive_partition(conn, "usage_log", month, archive_dir)
        assert result.steps_run == ["export", "verify", "drop"]  # the failed verification re-exported
        assert a.verify_archives(conn, "usage_log").problems == {}


def test_concurrent_writer_never_fails_during_archive(seeded: str, archive_dir: Path) -> None:
    month = dt.date(2024, 1, 1)
    stop = threading.Event()
    latencies: list[float] = []
    failures: list[BaseException] = []

    def writer() -> None:
        with psycopg.connect(seeded, autocommit=True) as w:
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    w.execute(
                        "INSERT INTO audit_log (event_type, operation) VALUES ('session.create', 'create')"
                    )
                except BaseException as exc:  # recorded: asserted empty below
                    failures.append(exc)
                latencies.append((time.perf_counter() - t0) * 1000)
                time.sleep(0.002)

    with psycopg.connect(seeded, autocommit=True) as conn:
        ensure_partition(conn, "audit_log", dt.datetime.now(UTC).date())
        before = conn.execute("SELECT count(*) FROM audit_log").fetchone()[0]
        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        time.sleep(0.2)
        result = a.archive_partition(conn, "audit_log", month, archive_dir)
        time.sleep(0.2)
        stop.set()
        thread.join()
        assert result.state == "dropped"
        assert failures == []
        assert len(latencies) > 20
        after = conn.execute("SELECT count(*) FROM audit_log").fetchone()[0]
        assert after == before - result.rows + len(latencies)


def test_dagster_archive_asset_check_and_schedule(
    seeded: str, archive_dir: Path, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PERF_PIPELINE_ARCHIVE_DIR", str(archive_dir))
    resources = {"postgres": PostgresResource(url=seeded)}
    with psycopg.connect(seeded, autocommit=True) as conn:
        june = len(_rows(conn, "audit_log", dt.date(2024, 6, 1)))
    res = materialize([audit_log_archive], seeded, partition_key="2024-06-01")
    mats = res.asset_materializations_for_node("audit_log_archive")
    assert len(mats) == 1 and mats[0].metadata["dagster/row_count"].value == june > 0
    assert mats[0].metadata["state"].value == "dropped"
    # a month within retention is not offered at all: the partitions end at the newest month past it
    this_month = dt.datetime.now(UTC).date().replace(day=1)
    keys = audit_log_archive.partitions_def.get_partition_keys()
    retention = get_settings().audit_retention_months
    assert keys[-1] == a.add_months(this_month, -retention - 1).isoformat()
    assert a.add_months(this_month, -1).isoformat() not in keys

    assert audit_log_archive_files_match_manifest(**resources).passed
    victim = "audit_log/audit_log_y2024m06.parquet"
    _damage(store, victim, "flipped")  # same size, new ETag: read in full, the sha256 no longer matches
    check = audit_log_archive_files_match_manifest(**resources)
    assert not check.passed and check.metadata["files_bad"].value == 1
    store.delete(victim)
    assert "missing" in audit_log_archive_files_match_manifest(**resources).metadata["problems"].value

    monkeypatch.setenv("PERF_PIPELINE_AUDIT_RETENTION_MONTHS", "12")
    tick = dt.datetime(2026, 11, 2, 3, 30, tzinfo=UTC)
    ctx = dg.build_schedule_context(scheduled_execution_time=tick, resources=resources)
    keys = [r.partition_key for r in archive_audit_log(ctx)]
    assert keys == ["2025-08-01", "2025-09-01", "2025-10-01"]
    # a month whose archive stopped half-way is requested by every tick until it is finished, with a run_key
    # of that tick (a run_key the schedule used before would be skipped by Dagster)
    may = dt.date(2024, 5, 1)
    with psycopg.connect(seeded, autocommit=True) as conn:
        row = a.manifest_row(conn, "audit_log", may)  # archived already if another test ran first here
        if row is None or row.state != "dropped":
            a.archive_partition(conn, "audit_log", may, archive_dir)
        a.restore_partition(conn, "audit_log", may)
        with pytest.raises(_Crash):
            a.archive_partition(conn, "audit_log", may, archive_dir, hook=_crash_after("detach"))
        for day in (tick, tick.replace(month=12)):
            requests = list(
                archive_audit_log(
                    dg.build_schedule_context(scheduled_execution_time=day, resources=resources)
                )
            )
            assert requests[0].partition_key == "2024-05-01"
            assert requests[0].run_key == f"2024-05-01@{day.date().isoformat()}"
        assert a.archive_partition(conn, "audit_log", may, archive_dir).state == "dropped"
    assert [r.partition_key for r in archive_audit_log(ctx)] == keys
    assert a.archive_eligible(dt.date(2025, 10, 1), dt.date(2026, 11, 2), 12)
    assert not a.archive_eligible(dt.date(2025, 11, 1), dt.date(2026, 11, 2), 12)


def test_cli_archive_restore_and_list(
    seeded: str, archive_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PERF_PIPELINE_DATABASE_URL", seeded)
    monkeypatch.setenv("PERF_PIPELINE_REDIS_URL", "redis://127.0.0.1:1/0")  # not used; no embedded Redis
    monkeypatch.setenv("PERF_PIPELINE_ARCHIVE_DIR", str(archive_dir))
    month = dt.date(2024, 3, 1)
    with psycopg.connect(seeded, autocommit=True) as conn:
        row = a.manifest_row(conn, "audit_log", month)  # archived already if another test ran first here
        if row is None or row.state != "dropped":
            a.archive_partition(conn, "audit_log", month, archive_dir)
    assert cli.main(["archive", "list"]) == 0
    assert "audit_log_y2024m03" in capsys.readouterr().out
    assert cli.main(["archive", "restore", "2024-03"]) == 0
    assert "restored" in capsys.readouterr().out
    with psycopg.connect(seeded, autocommit=True) as conn:
        assert "audit_log_y2024m03" in _attached(conn, "audit_log")
    assert cli.main(["archive", "restore", "1999-01"]) == 2  # no such archive: a clear error


def _fill_rollups(conn: psycopg.Connection, first: str, last: str, computed_at: str) -> None:
    """Rows of usage_daily_metrics for [first, last]: zeros in every other NOT NULL column (only day and
    computed_at matter to the retention rule, whatever else the rollup table holds)."""
    others = [
        r[0]
        for r in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'usage_daily_metrics' "
            "AND table_schema = current_schema() AND is_nullable = 'NO' AND column_default IS NULL "
            "AND column_name NOT IN ('day', 'computed_at')"
        )
    ]
    cols = ", ".join(["day", "computed_at", *others])
    zeros = "".join(", 0" for _ in others)
    conn.execute(
        f"INSERT INTO usage_daily_metrics ({cols}) "  # noqa: S608 - catalog column names
        f"SELECT d::date, %s::timestamptz{zeros} FROM generate_series(%s::date, %s::date, '1 day') d "
        "ON CONFLICT (day) DO UPDATE SET computed_at = EXCLUDED.computed_at",
        (computed_at, first, last),
    )


def test_usage_retention_rule(seeded: str, archive_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    today = dt.date(2026, 11, 27)
    may = dt.date(2024, 5, 1)
    with psycopg.connect(seeded, autocommit=True) as conn:
        # rules 1 and 2: retention, then the rollups' 90-day recompute window
        assert "within retention" in a.usage_retention_decision(conn, dt.date(2026, 7, 1), today, 24).reason
        # rule 2 holds on its own even below the settings' floor of 4 months (2026-09 ends 2026-10-01)
        assert "90-day" in a.usage_retention_decision(conn, dt.date(2026, 9, 1), today, 1).reason
        assert not a.usage_retention_decision(conn, dt.date(2026, 9, 1), today, 1).drop
        if conn.execute("SELECT to_regclass('usage_daily_metrics') IS NULL").fetchone()[0]:
            # rollups not installed: rules 1-2 alone, then a stand-in table for rule 3
            assert a.usage_retention_decision(conn, may, today, 24).drop
            conn.execute("CREATE TABLE usage_daily_metrics (day date PRIMARY KEY, computed_at timestamptz)")
        # rule 3: never rolled up
        decision = a.usage_retention_decision(conn, may, today, 24)
        assert not decision.drop and "31 day(s)" in decision.reason
        # rolled up, but 2024-05-07 while the day was still filling
        _fill_rollups(conn, "2024-05-01", "2024-05-31", "2024-06-01 00:05Z")
        _fill_rollups(conn, "2024-05-07", "2024-05-07", "2024-05-07 12:00Z")
        decision = a.usage_retention_decision(conn, may, today, 24)
        assert not decision.drop and "1 day(s)" in decision.reason and "2024-05-07" in decision.reason
        _fill_rollups(conn, "2024-05-07", "2024-05-08", "2024-06-01 00:05Z")
        assert a.usage_retention_decision(conn, may, today, 24).drop
        if conn.execute("SELECT to_regclass('usage_rollup_stale_days') IS NOT NULL").fetchone()[0]:
            # a late row marked 2024-05-20 for the late-data sensor: keep the month until it is recomputed
            conn.execute("INSERT INTO usage_rollup_stale_days (day) VALUES ('2024-05-20')")
            decision = a.usage_retention_decision(conn, may, today, 24)
            assert not decision.drop and "2024-05-20" in decision.reason
            conn.execute("DELETE FROM usage_rollup_stale_days WHERE day = '2024-05-20'")
        rows = len(_rows(conn, "usage_log", may))

    # the asset: 2024-05 is past 24 months of retention and fully rolled up → archived and dropped
    monkeypatch.setenv("PERF_PIPELINE_ARCHIVE_DIR", str(archive_dir))
    res = materialize([usage_log_retention], seeded, partition_key="2024-05-01")
    mats = res.asset_materializations_for_node("usage_log_retention")
    assert len(mats) == 1 and mats[0].metadata["dagster/row_count"].value == rows > 0
    with psycopg.connect(seeded, autocommit=True) as conn:
        assert conn.execute("SELECT to_regclass('usage_log_y2024m05') IS NULL").fetchone()[0]
        assert a.manifest_row(conn, "usage_log", may).state == "dropped"
    # a month the rollups still need: the run fails and says which days, the partition stays
    kept = materialize([usage_log_retention], seeded, partition_key="2024-04-01", raise_on_error=False)
    assert not kept.success and kept.asset_materializations_for_node("usage_log_retention") == []
    failure = next(e for e in kept.all_events if e.event_type_value == "STEP_FAILURE")
    assert "usage_log 2024-04 kept" in failure.event_specific_data.error.message
    assert "Roll those days up" in failure.event_specific_data.error.message
    with psycopg.connect(seeded, autocommit=True) as conn:
        assert conn.execute("SELECT to_regclass('usage_log_y2024m04') IS NOT NULL").fetchone()[0]


def test_without_default_partition_the_detach_is_concurrent(
    pg_server_url: str, module_location: Location
) -> None:
    url = create_database(pg_server_url, "ppt_nodefault")
    try:
        apply_migrations(url)
        month = dt.date(2024, 2, 1)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("DROP TABLE audit_log_default")
            ensure_partition(conn, "audit_log", month)
            conn.execute(
                "INSERT INTO audit_log (timestamp, event_type, operation) "
                "SELECT '2024-02-01'::timestamptz + g * interval '1 hour', 'x.y', 'read' "
                "FROM generate_series(0, 99) g"
            )
            before = _rows(conn, "audit_log", month)
            result = a.archive_partition(conn, "audit_log", month, module_location.sub("nodefault").value)
            assert result.state == "dropped" and result.rows == 100 and result.detach_mode == "concurrently"
            a.restore_partition(conn, "audit_log", month)
            assert _rows(conn, "audit_log", month) == before
    finally:
        drop_database(pg_server_url, url)


# ------------------------------------------------------------------ review defects (months of 2023: own data)


def _fresh_month(conn: psycopg.Connection, month: dt.date, n: int) -> None:
    """``n`` audit rows spread over ``month`` (its partition created first)."""
    ensure_partition(conn, "audit_log", month)
    conn.execute(
        "INSERT INTO audit_log (timestamp, event_type, operation, description) "
        "SELECT %s::timestamptz + g * interval '5 hours', 'x.y', 'read', 'row ' || g FROM generate_series(0, %s) g",
        (dt.datetime(month.year, month.month, 1, tzinfo=UTC), n - 1),
    )


def _fresh_usage_month(conn: psycopg.Connection, month: dt.date, n: int) -> None:
    """``n`` usage rows spread over ``month`` (its partition created first)."""
    ensure_partition(conn, "usage_log", month)
    conn.execute(
        "INSERT INTO usage_log (user_id, created_at, duration_minutes, cost_usd, stt_provider) "
        "SELECT md5('u' || g %% 7)::uuid, %s::timestamptz + g * interval '2 hours', g %% 30 + 0.5, 0.01 * g, "
        "'whisper' FROM generate_series(0, %s) g",
        (dt.datetime(month.year, month.month, 1, tzinfo=UTC), n - 1),
    )


def _late_row(conn: psycopg.Connection, ts: str, description: str) -> None:
    conn.execute(
        "INSERT INTO audit_log (timestamp, event_type, operation, description) VALUES (%s, 'x.y', 'update', %s)",
        (ts, description),
    )


def test_a_month_mid_archive_is_never_reattached_and_dropped_with_new_rows(
    seeded: str, archive_dir: Path
) -> None:
    """Reviewer's repro: archive stopped at `verified`; a late row lands in DEFAULT; move_default_rows used to
    reuse the detached table, attach it back (new writes went into it) and the resumed archive dropped it:
    102 rows before the resume, 100 after a restore."""
    month = dt.date(2023, 7, 1)
    with psycopg.connect(seeded, autocommit=True) as conn:
        _fresh_month(conn, month, 100)
        with pytest.raises(_Crash):
            a.archive_partition(conn, "audit_log", month, archive_dir, hook=_crash_after("verify"))
        _late_row(conn, "2023-07-20 10:00Z", "late")
        with pytest.raises(PartitionError, match=r"2023-07 \(archive stopped at verified\)"):
            move_default_rows(conn, "audit_log")
        assert "audit_log_y2023m07" not in _attached(conn, "audit_log")  # left alone: still being archived
        # nor does creating partitions (the partitions asset, a workload load) attach it back
        with pytest.raises(PartitionError, match="archive stopped at verified"):
            ensure_partition(conn, "audit_log", month)
        assert ensure_partitions(conn, "audit_log", [month]) == []
        assert "audit_log_y2023m07" not in _attached(conn, "audit_log")
        _late_row(conn, "2023-07-21 10:00Z", "after")  # a write after the (refused) move: DEFAULT again
        assert conn.execute("SELECT count(*) FROM audit_log_default").fetchone()[0] == 2
        result = a.archive_partition(conn, "audit_log", month, archive_dir)
        assert result.state == "dropped" and result.rows == 100
        restored = a.restore_partition(conn, "audit_log", month)
        assert restored.late_rows == 2 and restored.rows == 102
        assert len(_rows(conn, "audit_log", month)) == 102  # nothing lost
        assert a.archive_partition(conn, "audit_log", month, archive_dir).rows == 102


def test_drop_refuses_a_reattached_or_changed_table(seeded: str, archive_dir: Path) -> None:
    """Whatever re-attached or wrote into a detached month, the drop step does not remove those rows."""
    with psycopg.connect(seeded, autocommit=True) as conn:
        # 1. re-attached by someone else while at `verified`, then written to
        month = dt.date(2023, 8, 1)
        _fresh_month(conn, month, 50)
        with pytest.raises(_Crash):
            a.archive_partition(conn, "audit_log", month, archive_dir, hook=_crash_after("verify"))
        with conn.transaction():
            from perf_pipeline.lib.partitioning import MonthPartition, attach_partition

            attach_partition(conn, MonthPartition("audit_log", month))
        _late_row(conn, "2023-08-20 10:00Z", "written after the re-attach")
        with pytest.raises(a.ArchiveError, match="attached to audit_log again.*restore"):
            a.archive_partition(conn, "audit_log", month, archive_dir)
        assert len(_rows(conn, "audit_log", month)) == 51
        assert a.manifest_row(conn, "audit_log", month).state == "verified"
        # what the message says to do: restore (marks it restored), then archive again
        a.restore_partition(conn, "audit_log", month)
        assert a.archive_partition(conn, "audit_log", month, archive_dir).rows == 51

        # 2. still standalone at `verified`, but a row was written straight into it
        month = dt.date(2023, 9, 1)
        _fresh_month(conn, month, 40)
        with pytest.raises(_Crash):
            a.archive_partition(conn, "audit_log", month, archive_dir, hook=_crash_after("verify"))
        conn.execute(
            "INSERT INTO audit_log_y2023m09 (timestamp, event_type, operation) VALUES ('2023-09-09Z', 'x.y', 'read')"
        )
        # the resumed run proves the file again: it no longer matches the table, so the month is exported
        # again with the new row before anything is dropped
        result = a.archive_partition(conn, "audit_log", month, archive_dir)
        assert result.steps_run == ["export", "verify", "drop"] and result.rows == 41
        a.restore_partition(conn, "audit_log", month)
        assert conn.execute("SELECT count(*) FROM audit_log_y2023m09").fetchone()[0] == 41

        # 3. a row written into the detached table between this run's verification and its drop
        def write_after_verify(done: str) -> None:
            if done == "verify":
                conn.execute(
                    "INSERT INTO audit_log_y2023m09 (timestamp, event_type, operation) "
                    "VALUES ('2023-09-10Z', 'x.y', 'read')"
                )

        with pytest.raises(a.ArchiveError, match="42 rows, the manifest says 41"):
            a.archive_partition(conn, "audit_log", month, archive_dir, hook=write_after_verify)
        assert conn.execute("SELECT count(*) FROM audit_log_y2023m09").fetchone()[0] == 42
        a.restore_partition(conn, "audit_log", month)
        assert a.archive_partition(conn, "audit_log", month, archive_dir).rows == 42


def test_a_verify_that_keeps_failing_stops_after_a_few_exports(
    seeded: str, archive_dir: Path, store: Store
) -> None:
    month = dt.date(2023, 10, 1)
    exports = []

    def damage_every_export(done: str) -> None:
        if done == "export":
            exports.append(done)
            if len(exports) > 6:
                raise _Crash("still re-exporting after 6 attempts")
            key = a.archive_key("audit_log", month)
            store.write_bytes(key, store.read_bytes(key)[:-100])  # a disk that keeps damaging the file

    with psycopg.connect(seeded, autocommit=True) as conn:
        _fresh_month(conn, month, 20)
        with pytest.raises(a.ArchiveError, match=r"verification failed 3 times"):
            a.archive_partition(conn, "audit_log", month, archive_dir, hook=damage_every_export)
        assert len(exports) == 3
        assert a.manifest_row(conn, "audit_log", month).state == "detached"
        assert conn.execute("SELECT count(*) FROM audit_log_y2023m10").fetchone()[0] == 20  # still there
        problems = a.verify_archives(conn, "audit_log").problems
        assert "archive stopped at detached" in problems["audit_log_y2023m10"]
        # the disk is fine again: the next run finishes it
        assert a.archive_partition(conn, "audit_log", month, archive_dir).state == "dropped"
        assert "audit_log_y2023m10" not in a.verify_archives(conn, "audit_log").problems


def test_a_row_larger_than_the_csv_block_size_archives(seeded: str, archive_dir: Path) -> None:
    """An ~18 MB details value spans more than two of the archive's 8 MiB pyarrow blocks: it used to fail the
    export after the detach ("straddling object straddles two block boundaries"), month invisible."""
    month = dt.date(2023, 11, 1)
    with psycopg.connect(seeded, autocommit=True) as conn:
        _fresh_month(conn, month, 10)
        conn.execute(
            "INSERT INTO audit_log (timestamp, event_type, operation, details) "
            "VALUES ('2023-11-15Z', 'big.row', 'update', jsonb_build_object('blob', repeat(E'a\"b,\\n', 2300000)))"
        )
        before = _rows(conn, "audit_log", month)
        result = a.archive_partition(conn, "audit_log", month, archive_dir)
        assert result.state == "dropped" and result.rows == 11
        a.restore_partition(conn, "audit_log", month)
        assert _rows(conn, "audit_log", month) == before
        a.archive_partition(conn, "audit_log", month, archive_dir)


def test_a_failed_export_does_not_leave_synchronize_seqscans_off(seeded: str, tmp_path: Path) -> None:
    """The failure is made with a folder in the way of the temporary file, so this one runs on local disk."""
    archive_dir = tmp_path / "archive"
    month = dt.date(2023, 12, 1)
    blocker = archive_dir / "audit_log" / ".audit_log_y2023m12.parquet.tmp"
    blocker.mkdir(parents=True)  # the temp file cannot be created: the export fails after the SET
    with psycopg.connect(seeded, autocommit=True) as conn:
        _fresh_month(conn, month, 5)
        with pytest.raises(OSError):
            a.archive_partition(conn, "audit_log", month, archive_dir)
        assert conn.execute("SHOW synchronize_seqscans").fetchone()[0] == "on"
        assert a.manifest_row(conn, "audit_log", month).state == "detached"
        blocker.rmdir()
        assert a.archive_partition(conn, "audit_log", month, archive_dir).state == "dropped"


# ------------------------------------------------------------------------------- object storage specifics


def test_the_files_check_reads_in_full_only_new_changed_or_due_objects(
    seeded: str, archive_dir: Path | str, store: Store
) -> None:
    """The check looks every archive up (size, ETag) but re-reads and re-hashes only an object never read in
    full, rewritten since (another ETag), or not read in full for REHASH_AFTER; a match records when."""
    month = dt.date(2023, 6, 1)
    key = a.archive_key("audit_log", month)
    with psycopg.connect(seeded, autocommit=True) as conn:
        _fresh_month(conn, month, 30)
        a.archive_partition(conn, "audit_log", month, archive_dir)
        name = "audit_log_y2023m06"
        verified_at = a.manifest_row(conn, "audit_log", month).verified_at
        assert verified_at is not None  # read back in full by the archive's own verify step
        report = a.verify_archives(conn, "audit_log")
        assert name in report.ok and name not in report.read_in_full  # size + ETag only
        assert a.manifest_row(conn, "audit_log", month).verified_at == verified_at

        # due: its last full read is older than REHASH_AFTER (the weekly schedule's run)
        conn.execute(
            "UPDATE archive_manifest SET verified_at = verified_at - %s - interval '1 hour' "
            "WHERE table_name = 'audit_log' AND month = %s",
            (a.REHASH_AFTER, month),
        )
        report = a.verify_archives(conn, "audit_log")
        assert name in report.ok and name in report.read_in_full
        assert a.manifest_row(conn, "audit_log", month).verified_at > verified_at

        # rewritten with the same bytes (e.g. put back from a backup): S3's ETag is the content's (the same),
        # a local file's changes (new inode): then it is read in full once, found fine, the new one recorded
        old_etag = a.manifest_row(conn, "audit_log", month).etag
        store.write_bytes(key, store.read_bytes(key))
        changed = store.info(key).etag != old_etag
        assert changed == (store.info(key).etag or "").startswith("local:")
        report = a.verify_archives(conn, "audit_log")
        assert name in report.ok and (name in report.read_in_full) == changed
        assert a.manifest_row(conn, "audit_log", month).etag == store.info(key).etag
        assert name not in a.verify_archives(conn, "audit_log").read_in_full

        # the same size, other bytes: a new ETag gives it away at once, not a week later
        _damage(store, key, "flipped")
        problem = a.verify_archives(conn, "audit_log").problems[name]
        assert "sha256" in problem
        # never read in full since it was recorded (a row from before migration 0100): read in full
        store.write_bytes(key, store.read_bytes(key))  # (still the damaged bytes)
        conn.execute(
            "UPDATE archive_manifest SET etag = NULL, verified_at = NULL WHERE table_name = 'audit_log' "
            "AND month = %s",
            (month,),
        )
        assert "sha256" in a.verify_archives(conn, "audit_log").problems[name]


def test_a_bad_archive_location_is_refused_before_anything_is_touched(
    db_url: str,
    seaweedfs_server: object,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """`PERF_PIPELINE_ARCHIVE_DIR=s3://bucket/audit` used to be taken as a relative folder named `s3:`: the
    archive "succeeded", dropped the month, and the file sat under `./s3:/bucket/audit`. Now a missing
    bucket, refused credentials or a malformed URL is one line naming the setting, before the detach."""
    month = dt.date(2023, 5, 1)
    with psycopg.connect(db_url, autocommit=True) as conn:
        _fresh_month(conn, month, 20)
    monkeypatch.setenv("PERF_PIPELINE_DATABASE_URL", db_url)
    monkeypatch.setenv("PERF_PIPELINE_REDIS_URL", "redis://127.0.0.1:1/0")  # not used; no embedded Redis
    monkeypatch.chdir(tmp_path)  # a relative "s3:" folder would appear here (or under the project root)
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    cases = [
        ("s3://no-such-bucket-ppt/audit", {}, "bucket 'no-such-bucket-ppt' does not exist"),
        ("s3://Not_A_Bucket/audit", {}, "is not a bucket name"),
        ("s3://bucket-ppt/audit?region=x", {}, "AWS_ENDPOINT_URL"),
        ("gs://bucket-ppt/audit", {}, "only s3:// object storage is supported"),
        (
            f"s3://{seaweedfs_server.create_bucket()}/audit",  # type: ignore[attr-defined]
            {"AWS_SECRET_ACCESS_KEY": "not-the-right-secret-0123456789"},
            "credentials were refused",
        ),
    ]
    for value, env, fragment in cases:
        monkeypatch.setenv("PERF_PIPELINE_ARCHIVE_DIR", value)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        assert cli.main(["archive", "run", month.strftime("%Y-%m")]) == 2, value
        err = capsys.readouterr().err
        assert "PERF_PIPELINE_ARCHIVE_DIR" in err and fragment in err, err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert "not-the-right-secret" not in err and secret not in err
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        with psycopg.connect(db_url, autocommit=True) as conn:
            assert "audit_log_y2023m05" in _attached(conn, "audit_log")  # not detached, not dropped
            assert a.manifest_row(conn, "audit_log", month) is None
    assert not list(tmp_path.iterdir()) and not (PROJECT_ROOT / "s3:").exists()
