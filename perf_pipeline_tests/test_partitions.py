"""Partition lifecycle on real PostgreSQL: create ahead, indexes, the DEFAULT guard and move_default_rows."""

from __future__ import annotations

import datetime as dt
import threading
import time
import uuid

import dagster as dg
import psycopg
import pytest
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG
from psycopg import sql

from perf_pipeline.defs.partitions.assets import audit_log_partitions, usage_log_partitions
from perf_pipeline.defs.partitions.checks import (
    audit_log_default_partition_empty,
    audit_log_months_ahead_exist,
    usage_log_default_partition_empty,
)
from perf_pipeline.defs.partitions.jobs import move_default_rows
from perf_pipeline.defs.partitions.schedules import (
    create_audit_log_partitions_ahead,
    create_usage_log_partitions_ahead,
)
from perf_pipeline.defs.resources import PostgresResource, SettingsResource
from perf_pipeline.lib import partitioning as p
from perf_pipeline.lib.db import load_query
from perf_pipeline.settings import get_settings
from perf_pipeline.testing import PacedWriter, usage_writer

UTC = dt.UTC


def _months(conn: psycopg.Connection, table: str) -> list[str]:
    return sorted(x.name for x in p.list_partitions(conn, table) if not x.is_default)


def _index_parents(conn: psycopg.Connection, table: str, child: str) -> tuple[set[str], set[str]]:
    """(indexes of the parent, parent indexes that the child's indexes are attached to)."""
    parent = {
        r[0]
        for r in conn.execute(
            "SELECT indexrelid::regclass::text FROM pg_index WHERE indrelid = %s::regclass", (table,)
        )
    }
    attached = {
        r[0]
        for r in conn.execute(
            "SELECT i.inhparent::regclass::text FROM pg_index x JOIN pg_inherits i ON i.inhrelid = x.indexrelid "
            "WHERE x.indrelid = %s::regclass",
            (child,),
        )
    }
    return parent, attached


def _insert_audit(conn: psycopg.Connection, ts: dt.datetime, **values: object) -> None:
    conn.execute(
        "INSERT INTO audit_log (id, timestamp, user_id, entity_type, entity_id, event_type, operation, severity, "
        "description, details, ip) VALUES (%s, %s, %s, 'session', %s, 'session.update', 'update', %s, %s, %s, %s)",
        (
            values.get("id", uuid.uuid4()),
            ts,
            values.get("user_id"),
            values.get("entity_id", "s-1"),
            values.get("severity", "low"),
            values.get("description", "d"),
            values.get("details"),
            values.get("ip"),
        ),
    )


def test_create_ahead_is_idempotent_and_exact(db: psycopg.Connection) -> None:
    today = dt.date(2026, 11, 27)
    created = p.create_partitions_ahead(db, "audit_log", today, 3)
    expected = ["audit_log_y2026m11", "audit_log_y2026m12", "audit_log_y2027m01", "audit_log_y2027m02"]
    assert created == expected
    assert p.create_partitions_ahead(db, "audit_log", today, 3) == []
    assert _months(db, "audit_log") == expected
    # bounds are the UTC months
    bound = db.execute(
        "SELECT pg_get_expr(relpartbound, oid) FROM pg_class WHERE relname = 'audit_log_y2027m01'"
    ).fetchone()[0]
    assert "2027-01-01 00:00:00+00" in bound and "2027-02-01 00:00:00+00" in bound
    # every index of the parent exists on the new partition, attached to the parent's index
    for table, child in (("audit_log", "audit_log_y2026m12"),):
        parent, attached = _index_parents(db, table, child)
        assert len(parent) == 4 and attached == parent


def test_dagster_asset_creates_the_keys_month_with_indexes(db_url: str, db: psycopg.Connection) -> None:
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("usage_log_months", ["2025-03-01"])  # a key, as the sensor keeps them
    res = dg.materialize(
        [usage_log_partitions],
        partition_key="2025-03-01",
        resources={"postgres": PostgresResource(url=db_url), "settings": SettingsResource()},
        instance=instance,
    )
    assert res.success
    assert "usage_log_y2025m03" in _months(db, "usage_log")
    parent, attached = _index_parents(db, "usage_log", "usage_log_y2025m03")
    assert attached == parent and len(parent) == 4
    meta = res.asset_materializations_for_node("usage_log_partitions")[0].metadata
    assert meta["run_created"].value == 1 and meta["run_months"].value == 1
    assert meta["created_by_this_run"].value is True and meta["attached"].value is True
    again = dg.materialize(
        [usage_log_partitions],
        partition_key="2025-03-01",
        resources={"postgres": PostgresResource(url=db_url), "settings": SettingsResource()},
        instance=instance,
    )
    assert again.asset_materializations_for_node("usage_log_partitions")[0].metadata["run_created"].value == 0


SCHEDULES = {
    "audit_log": create_audit_log_partitions_ahead,
    "usage_log": create_usage_log_partitions_ahead,
}


def test_daily_schedules_request_current_plus_premake_months(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERF_PIPELINE_PREMAKE_MONTHS", "3")
    with dg.instance_for_test() as instance:
        _requests_name_their_months(instance)


def _requests_name_their_months(instance: dg.DagsterInstance) -> None:
    for table, schedule in SCHEDULES.items():
        with dg.build_schedule_context(
            instance=instance,
            scheduled_execution_time=dt.datetime(2026, 11, 27, 0, 10, tzinfo=UTC),
            resources={"settings": SettingsResource()},
        ) as ctx:
            request = schedule(ctx)
        assert request.tags[ASSET_PARTITION_RANGE_START_TAG] == "2026-11-01"
        assert request.tags[ASSET_PARTITION_RANGE_END_TAG] == "2027-02-01"
        # the months it names are keys of the table's partitions (added when missing)
        assert {"2026-11-01", "2027-02-01"} <= set(instance.get_dynamic_partitions(f"{table}_months"))


def test_the_schedules_range_run_creates_every_premake_month(db_url: str, db: psycopg.Connection) -> None:
    now = dt.datetime.now(UTC)
    with dg.instance_for_test() as instance:
        _range_runs(db_url, db, instance, now)


def _range_runs(db_url: str, db: psycopg.Connection, instance: dg.DagsterInstance, now: dt.datetime) -> None:
    months = p.months_ahead(now.date(), get_settings().premake_months)
    for table, asset in (("audit_log", audit_log_partitions), ("usage_log", usage_log_partitions)):
        with dg.build_schedule_context(
            instance=instance, scheduled_execution_time=now, resources={"settings": SettingsResource()}
        ) as ctx:
            request = SCHEDULES[table](ctx)
        res = dg.materialize(
            [asset],
            tags=request.tags,
            resources={"postgres": PostgresResource(url=db_url), "settings": SettingsResource()},
            instance=instance,
        )
        assert res.success
        # one run, one materialization per key, and the body saw the whole window at once
        mats = res.asset_materializations_for_node(f"{table}_partitions")
        assert len(mats) == len(months) and mats[0].metadata["run_months"].value == len(months)
        # each month's own facts on its own partition
        assert {m.metadata["partition"].value for m in mats} == {p.partition_name(table, m) for m in months}
        assert {p.partition_name(table, m) for m in months} <= set(_months(db, table))


def test_months_ahead_check_names_each_missing_month_and_errors_on_this_month(
    db_url: str, db: psycopg.Connection
) -> None:
    """This month and the PREMAKE months after it must be attached: a later month missing is a warning that
    names it and the job to run; this month missing (its rows go to DEFAULT now) is an error."""
    resources = {"postgres": PostgresResource(url=db_url), "settings": SettingsResource()}
    today = dt.datetime.now(UTC).date()
    months = p.months_ahead(today, get_settings().premake_months)
    p.create_partitions_ahead(db, "audit_log", today, get_settings().premake_months)
    check = audit_log_months_ahead_exist(**resources)
    assert check.passed and check.metadata["missing_months"].value == 0
    for month in (months[-1], months[0]):
        db.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(p.partition_name("audit_log", month))))
    check = audit_log_months_ahead_exist(**resources)
    assert not check.passed and check.severity == dg.AssetCheckSeverity.ERROR
    assert check.metadata["missing_months"].value == 2
    assert p.partition_name("audit_log", months[0]) in check.description
    assert p.partition_name("audit_log", months[-1]) in check.description
    assert "create_audit_log_partitions_ahead_job" in check.description
    p.create_partitions_ahead(db, "audit_log", today, 0)  # this month back: only a later one missing
    check = audit_log_months_ahead_exist(**resources)
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
    assert check.metadata["missing_months"].value == 1
    p.create_partitions_ahead(db, "audit_log", today, get_settings().premake_months)
    assert audit_log_months_ahead_exist(**resources).passed


def test_default_guard_fails_then_move_default_rows_fixes_it(db_url: str, db: psycopg.Connection) -> None:
    resources = {"postgres": PostgresResource(url=db_url)}
    assert audit_log_default_partition_empty(**resources).passed
    # months without partitions: rows land in DEFAULT
    stray = [dt.datetime(2023, 5, 3, 12, tzinfo=UTC) + dt.timedelta(minutes=7 * i) for i in range(25)]
    stray += [dt.datetime(2023, 6, 30, 23, 59, 59, 999999, tzinfo=UTC), dt.datetime(2023, 6, 1, tzinfo=UTC)]
    for i, ts in enumerate(stray):
        _insert_audit(
            db,
            ts,
            user_id=uuid.uuid4() if i % 2 else None,
            description="" if i == 3 else f"row {i}",
            details='{"a": [1, 2]}' if i % 3 else None,
            ip="10.0.0.1" if i % 4 else None,
        )
    assert db.execute("SELECT count(*) FROM audit_log_default").fetchone()[0] == 27
    before = db.execute("SELECT * FROM audit_log ORDER BY id").fetchall()

    check = audit_log_default_partition_empty(**resources)
    assert not check.passed
    assert check.metadata["rows"].value == 27
    assert check.metadata["months"].value == "2023-05 (25), 2023-06 (2)"

    result = move_default_rows.execute_in_process(
        run_config={"ops": {"move_default_rows_op": {"config": {"batch_size": 10}}}},
        resources=resources,
        instance=dg.DagsterInstance.ephemeral(),
    )
    assert result.success
    assert result.output_for_node("move_default_rows_op") == {"audit_log": 27, "usage_log": 0}
    assert audit_log_default_partition_empty(**resources).passed
    assert usage_log_default_partition_empty(**resources).passed
    assert {"audit_log_y2023m05", "audit_log_y2023m06"} <= set(_months(db, "audit_log"))
    # every column of every row identical, nothing lost or duplicated
    assert db.execute("SELECT * FROM audit_log ORDER BY id").fetchall() == before
    assert db.execute("SELECT count(*) FROM audit_log_y2023m05").fetchone()[0] == 25
    parent, attached = _index_parents(db, "audit_log", "audit_log_y2023m06")
    assert attached == parent
    # re-running is a no-op
    assert p.move_default_rows(db, "audit_log").rows_moved == 0


def _constraints(conn: psycopg.Connection, relation: str) -> set[str]:
    return {
        r[0]
        for r in conn.execute("SELECT conname FROM pg_constraint WHERE conrelid = %s::regclass", (relation,))
    }


def test_rows_an_older_move_left_unattached_are_put_back_then_moved(db: psycopg.Connection) -> None:
    """An earlier version moved rows out of DEFAULT batch by batch and attached last: a crash mid-month left
    7 rows in a standalone table, invisible. The new move first puts them back into DEFAULT (visible), then
    moves the whole month at once."""
    for i in range(30):
        _insert_audit(db, dt.datetime(2022, 2, 1, tzinfo=UTC) + dt.timedelta(hours=i), description=f"r{i}")
    before = db.execute("SELECT * FROM audit_log ORDER BY id").fetchall()
    with db.transaction():
        p.prepare_partition_table(db, p.MonthPartition("audit_log", dt.date(2022, 2, 1)))
    start, end = p.month_bounds(dt.date(2022, 2, 1))
    with db.transaction():
        moved = db.execute(
            sql.SQL(load_query("partition_move_default_batch")).format(
                default=sql.Identifier("audit_log_default"),
                target=sql.Identifier("audit_log_y2022m02"),
                key=sql.Identifier("timestamp"),
            ),
            {"start": start, "end": end, "batch": 7},
        ).fetchone()[0]
    assert moved == 7
    assert "audit_log_y2022m02" not in _months(db, "audit_log")  # standalone, invisible to audit_log
    assert p.unattached_partitions(db, "audit_log") == ["audit_log_y2022m02"]
    result = p.move_default_rows(db, "audit_log", batch_size=5)
    assert result.rows_returned == 7 and result.rows_moved == 30
    assert result.partitions_created == ["audit_log_y2022m02"]
    assert db.execute("SELECT * FROM audit_log ORDER BY id").fetchall() == before
    assert p.unattached_partitions(db, "audit_log") == [] and p.move_copies(db, "audit_log") == []
    # like its siblings: no leftover bound CHECK, index names of the partition
    assert not any(c.endswith("_bound") for c in _constraints(db, "audit_log_y2022m02"))
    indexes = {
        r[0]
        for r in db.execute(
            "SELECT indexrelid::regclass::text FROM pg_index WHERE indrelid = 'audit_log_y2022m02'::regclass"
        )
    }
    assert indexes and all(i.startswith("audit_log_y2022m02_") and "moving" not in i for i in indexes)


def test_an_interrupted_move_left_every_row_visible_and_the_next_run_is_exact(db: psycopg.Connection) -> None:
    """A run that stopped after its pre-copy left a working copy; since then rows of the month were updated,
    deleted and added in DEFAULT. Every row stayed visible once, and the next run moves exactly DEFAULT's."""
    month = dt.date(2022, 3, 1)
    for i in range(40):
        _insert_audit(db, dt.datetime(2022, 3, 2, tzinfo=UTC) + dt.timedelta(hours=i), description=f"c{i}")
    start, end = p.month_bounds(month)
    with db.transaction():
        p.prepare_partition_table(
            db, p.MonthPartition("audit_log", month), relation="audit_log_y2022m03_moving"
        )
    db.execute(
        sql.SQL(load_query("partition_move_precopy")).format(
            default=sql.Identifier("audit_log_default"),
            scratch=sql.Identifier("audit_log_y2022m03_moving"),
            key=sql.Identifier("timestamp"),
        ),
        {"first_block": 0, "end_block": 1 << 30, "start": start, "end": end},
    )
    assert p.move_copies(db, "audit_log") == ["audit_log_y2022m03_moving"]
    db.execute("UPDATE audit_log SET description = 'changed after the copy' WHERE description = 'c3'")
    db.execute("DELETE FROM audit_log WHERE description = 'c4'")
    _insert_audit(db, dt.datetime(2022, 3, 20, tzinfo=UTC), description="new after the copy")
    month_rows = "SELECT * FROM audit_log WHERE timestamp >= %s AND timestamp < %s ORDER BY id"
    before = db.execute(month_rows, (start, end)).fetchall()
    assert len(before) == 40  # the copy is invisible: each row is seen once, in DEFAULT
    result = p.move_default_rows(db, "audit_log")
    assert result.rows_moved == 40 and "audit_log_y2022m03" in _months(db, "audit_log")
    assert db.execute(month_rows, (start, end)).fetchall() == before
    assert db.execute("SELECT count(*) FROM audit_log_y2022m03").fetchone()[0] == 40
    assert p.move_copies(db, "audit_log") == []


_MOVE = """
import sys, psycopg
from perf_pipeline.lib.partitioning import move_default_rows
with psycopg.connect(sys.argv[1], autocommit=True) as conn:
    move_default_rows(conn, "usage_log", batch_size=2000)
"""


def test_a_move_killed_at_any_moment_loses_nothing_and_hides_nothing(
    db_url: str, db: psycopg.Connection
) -> None:
    """SIGKILL the move in a child process at random moments (pre-copy or switch): after each kill the month's
    rows are all visible exactly once (in DEFAULT, or in the attached partition); a run at the end finishes."""
    import random
    import signal
    import subprocess
    import sys

    month = dt.date(2021, 9, 1)
    start, end = p.month_bounds(month)
    db.execute(
        "INSERT INTO usage_log (user_id, created_at, duration_minutes, cost_usd, stt_provider) "
        "SELECT md5(g::text)::uuid, %s::timestamptz + g * interval '40 seconds', 1, 0.01, 'google' "
        "FROM generate_series(0, 59999) g",
        (dt.datetime(2021, 9, 1, tzinfo=UTC),),
    )
    count = "SELECT count(*), count(DISTINCT id) FROM usage_log WHERE created_at >= %s AND created_at < %s"
    assert db.execute(count, (start, end)).fetchone() == (60000, 60000)
    rnd = random.Random(5)
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", _MOVE, db_url], stderr=subprocess.PIPE, text=True)
        time.sleep(rnd.uniform(0.4, 2.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        assert db.execute(count, (start, end)).fetchone() == (60000, 60000)
        if "usage_log_y2021m09" in _months(db, "usage_log"):
            break
    p.move_default_rows(db, "usage_log")
    assert "usage_log_y2021m09" in _months(db, "usage_log")
    assert db.execute(count, (start, end)).fetchone() == (60000, 60000)
    assert db.execute("SELECT count(*) FROM usage_log_default").fetchone()[0] == 0
    assert p.move_copies(db, "usage_log") == []


def _audit_writer(url: str, rate: float = 300) -> PacedWriter:
    """Inserts into audit_log (current month) at ~``rate``/s on its own connection; records latencies/failures."""
    return PacedWriter(
        url,
        rate,
        "INSERT INTO audit_log (event_type, operation, description) VALUES ('session.create', 'create', 'writer')",
    )


def test_concurrent_writer_never_fails_during_partition_creation(db_url: str, db: psycopg.Connection) -> None:
    p.ensure_partition(db, "audit_log", dt.datetime.now(UTC).date())
    writer = _audit_writer(db_url)
    writer.start()
    time.sleep(0.3)
    created = p.create_partitions_ahead(db, "audit_log", dt.datetime.now(UTC).date(), 24)
    created += p.create_partitions_ahead(db, "usage_log", dt.datetime.now(UTC).date(), 24)
    time.sleep(0.3)
    writer.stop.set()
    writer.join()
    assert len(created) >= 40
    assert writer.failures == []
    assert len(writer.latencies) > 50
    assert db.execute("SELECT count(*) FROM audit_log WHERE description = 'writer'").fetchone()[0] == len(
        writer.latencies
    )
    assert db.execute("SELECT count(*) FROM audit_log_default").fetchone()[0] == 0


def test_definitions_expose_the_interface_names() -> None:
    from perf_pipeline.definitions import defs

    loaded = defs()
    graph = loaded.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert {
        "audit_log_partitions",
        "usage_log_partitions",
        "audit_log_archive",
        "usage_log_retention",
    } <= keys
    checks = {k.name for k in graph.asset_check_keys}
    assert {
        "audit_log_default_partition_empty",
        "usage_log_default_partition_empty",
        "audit_log_archive_files_match_manifest",
        "usage_log_archive_files_match_manifest",
    } <= checks
    assert loaded.resolve_job_def("move_default_rows") is not None
    schedules = {s.name: s for s in loaded.schedules or []}
    for name in (
        "create_audit_log_partitions_ahead",
        "create_usage_log_partitions_ahead",
        "archive_audit_log",
        "apply_usage_log_retention",
    ):
        assert schedules[name].description
    assert schedules["create_audit_log_partitions_ahead"].cron_schedule == "10 0 * * *"
    assert schedules["archive_audit_log"].cron_schedule == "30 3 2 * *"


def test_a_move_that_cannot_get_its_locks_changes_nothing(db_url: str, db: psycopg.Connection) -> None:
    """A session holding the table (here SHARE UPDATE EXCLUSIVE on the parent) keeps the switch from taking
    its locks: the move gives up after its attempts with a clear error, and nothing changed — the rows are
    still in DEFAULT, visible (an older version left them in an unattached table, invisible). The next run
    finishes."""
    resources = {"postgres": PostgresResource(url=db_url)}
    for i in range(12):
        _insert_audit(db, dt.datetime(2021, 3, 1, tzinfo=UTC) + dt.timedelta(hours=i), description=f"m{i}")
    before = db.execute("SELECT * FROM audit_log ORDER BY id").fetchall()
    with psycopg.connect(db_url) as blocker:
        blocker.execute("LOCK TABLE audit_log IN SHARE UPDATE EXCLUSIVE MODE")
        with pytest.raises(p.PartitionError, match="could not switch audit_log_y2021m03.*nothing changed"):
            p.move_default_rows(db, "audit_log", batch_size=5, lock_timeout_ms=20, attempts=2)
        blocker.rollback()
    assert db.execute("SELECT count(*) FROM audit_log_default").fetchone()[0] == 12
    assert db.execute("SELECT * FROM audit_log ORDER BY id").fetchall() == before
    assert p.unattached_partitions(db, "audit_log") == []
    check = audit_log_default_partition_empty(**resources)
    assert not check.passed and check.metadata["rows"].value == 12
    assert check.metadata["move_copies"].value == "audit_log_y2021m03_moving"

    result = p.move_default_rows(db, "audit_log")
    assert result.rows_moved == 12 and result.partitions_created == ["audit_log_y2021m03"]
    assert db.execute("SELECT * FROM audit_log ORDER BY id").fetchall() == before
    assert audit_log_default_partition_empty(**resources).passed


@pytest.mark.parametrize("rate", [200, 500])
def test_move_under_a_live_writer_keeps_rows_visible_and_the_writer_working(
    db_url: str, db: psycopg.Connection, rate: int
) -> None:
    """A writer commits single rows into the month being moved. It used to get `violates partition
    constraint` during the ATTACH, a reader saw the month's count fall to 0, and at 500/s the job gave up
    with 21,200 rows parked in an unattached table. Now: no writer failure, the month's count never goes
    down, and every row ends in the partition exactly once."""
    month = dt.date(2021, 5, 1) if rate == 200 else dt.date(2021, 6, 1)
    start, end = p.month_bounds(month)
    db.execute(
        "INSERT INTO usage_log (user_id, created_at, duration_minutes, cost_usd, stt_provider) "
        "SELECT gen_random_uuid(), %s::timestamptz + g * interval '1 minute', 1, 0.01, 'google' "
        "FROM generate_series(0, 29999) g",
        (dt.datetime(month.year, month.month, 1, tzinfo=UTC),),
    )
    writer = usage_writer(db_url, month, rate)
    seen: list[int] = []
    stop_reader = threading.Event()

    def reader() -> None:
        with psycopg.connect(db_url, autocommit=True) as r:
            while not stop_reader.is_set():
                seen.append(
                    r.execute(
                        "SELECT count(*) FROM usage_log WHERE created_at >= %s AND created_at < %s",
                        (start, end),
                    ).fetchone()[0]
                )

    reading = threading.Thread(target=reader, daemon=True)
    writer.start()
    reading.start()
    time.sleep(0.5)
    result = p.move_default_rows(db, "usage_log", batch_size=2000)
    time.sleep(0.5)
    writer.stop.set()
    stop_reader.set()
    writer.join()
    reading.join()
    assert writer.failures == []
    assert result.partitions_created == [p.partition_name("usage_log", month)]
    drops = [(i, a, b) for i, (a, b) in enumerate(zip(seen, seen[1:], strict=False)) if b < a]
    assert len(seen) > 10 and not drops, f"the month's count went down: {drops[:5]}"
    total = db.execute(
        "SELECT count(*), count(DISTINCT id) FROM usage_log WHERE created_at >= %s AND created_at < %s",
        (start, end),
    ).fetchone()
    assert total == (30000 + writer.written, 30000 + writer.written)
    assert db.execute("SELECT count(*) FROM usage_log_default").fetchone()[0] == 0
