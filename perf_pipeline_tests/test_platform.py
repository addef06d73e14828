"""The platform's tables in the Dagster graph, on real PostgreSQL: what observe_platform_tables reports
(runless events, as the daemon stores them) and that the partition bars follow PostgreSQL — months created
outside Dagster shown, archived months moved from the partition bars to the archive's, restored months
back; data versions that change only when rows change; the schema applied from the CLI."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import dagster as dg
import psycopg
import pytest

from perf_pipeline import cli
from perf_pipeline.defs.platform import sensors as platform_sensors
from perf_pipeline.lib import archive
from perf_pipeline.lib.partitioning import ensure_partitions, months_between
from perf_pipeline.testing import AutomationLoop

UTC = dt.UTC
TODAY = dt.datetime.now(UTC).date()


def _materialized(instance: dg.DagsterInstance, asset: str) -> set[str]:
    return set(instance.get_materialized_partitions(dg.AssetKey(asset)))


def _bar(instance: dg.DagsterInstance, partitions: str) -> set[str]:
    """The keys of a dynamic partitions definition: what the partition bar shows."""
    return set(instance.get_dynamic_partitions(partitions))


def _latest(
    instance: dg.DagsterInstance, asset: str, partition: str | None = None
) -> dg.AssetMaterialization:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(
            asset_key=dg.AssetKey(asset), asset_partitions=[partition] if partition else None
        ),
        limit=1,
    ).records
    assert records, f"{asset}[{partition}] was never reported"
    return records[0].asset_materialization


@pytest.fixture
def loop(db_url: str) -> AutomationLoop:
    return AutomationLoop(db_url, dg.DagsterInstance.ephemeral())


def test_months_in_postgresql_are_the_partition_bars(
    db_url: str, loop: AutomationLoop, tmp_path: Path
) -> None:
    month = dt.date(2022, 8, 1)
    with psycopg.connect(db_url, autocommit=True) as conn:
        # created outside Dagster (as the workload loader or move_default_rows do)
        ensure_partitions(conn, "audit_log", [month])
        ensure_partitions(conn, "usage_log", months_between(TODAY - dt.timedelta(days=3), TODAY))
        conn.execute(
            "INSERT INTO audit_log (timestamp, event_type, operation) "
            "SELECT '2022-08-01'::timestamptz + g * interval '1 hour', 'x.y', 'read' FROM generate_series(0, 99) g"
        )
        conn.execute(
            "INSERT INTO usage_log (user_id, created_at, duration_minutes, stt_provider) "
            "VALUES (gen_random_uuid(), now() - interval '2 days', 1, 'google')"
        )
    loop.observe()
    instance = loop.instance
    assert "2022-08-01" in _materialized(instance, "audit_log_partitions")
    assert "2022-08-01" in _materialized(instance, "audit_log")
    report = _latest(instance, "audit_log", "2022-08-01")
    assert report.metadata["partition"].value == "audit_log_y2022m08"
    assert report.metadata["dagster/size_bytes"].value > 0
    version = report.tags["dagster/data_version"]
    # every day of usage_log's attached months up to today is shown, not tomorrow
    days = _materialized(instance, "usage_log")
    assert TODAY.isoformat() in days and (TODAY - dt.timedelta(days=2)).isoformat() in days
    assert (TODAY + dt.timedelta(days=1)).isoformat() not in days

    # nothing changed: nothing reported again
    assert loop.observe().asset_events in (None, [])
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO audit_log (timestamp, event_type, operation) VALUES ('2022-08-20Z', 'x.y', 'update')"
        )
    # the statistics counters reach pg_stat_user_tables when the writing session reports them (≤ 1 s)
    deadline = dt.datetime.now() + dt.timedelta(seconds=10)
    while _latest(instance, "audit_log", "2022-08-01").tags["dagster/data_version"] == version:
        assert dt.datetime.now() < deadline, "a written month was not reported with a new data version"
        loop.observe()

    # the bars list exactly the attached months plus the months created ahead, and usage_log's days
    assert "2022-08-01" in _bar(instance, "audit_log_months")
    assert TODAY.replace(day=1).isoformat() in _bar(instance, "usage_log_months")
    assert (TODAY - dt.timedelta(days=2)).isoformat() in _bar(instance, "usage_log_days")

    # archived and dropped: gone from the partition bars, shown on the archive's
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert archive.archive_partition(conn, "audit_log", month, tmp_path).state == "dropped"
    loop.observe()
    assert "2022-08-01" not in _bar(instance, "audit_log_months")
    assert "2022-08-01" in _materialized(instance, "audit_log_archive")
    assert _latest(instance, "audit_log_archive", "2022-08-01").metadata["dagster/row_count"].value == 101
    # restored: back on the bars, and the archive's latest report says so
    with psycopg.connect(db_url, autocommit=True) as conn:
        archive.restore_partition(conn, "audit_log", month)
    loop.observe()
    assert "2022-08-01" in _bar(instance, "audit_log_months")
    assert "2022-08-01" in _materialized(instance, "audit_log_partitions")
    assert _latest(instance, "audit_log_archive", "2022-08-01").metadata["state"].value.startswith("restored")
    # archived again: the latest report says dropped again
    with psycopg.connect(db_url, autocommit=True) as conn:
        archive.archive_partition(conn, "audit_log", month, tmp_path)
    loop.observe()
    assert _latest(instance, "audit_log_archive", "2022-08-01").metadata["state"].value == "dropped"
    assert "2022-08-01" not in _bar(instance, "audit_log_months")


def test_live_tables_are_reported_when_they_change_at_most_every_quarter_hour(
    db_url: str, loop: AutomationLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("INSERT INTO session (user_id) SELECT gen_random_uuid() FROM generate_series(1, 5)")
    loop.observe()
    first = _latest(loop.instance, "session")
    assert first.metadata["rows_estimate"].value >= 0 and first.metadata["newest_row_at"].value > 0
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("INSERT INTO session (user_id) VALUES (gen_random_uuid())")
    loop.observe()  # changed, but reported less than 15 minutes ago: not again yet
    assert _latest(loop.instance, "session").tags == first.tags
    monkeypatch.setattr(platform_sensors, "REPORT_EVERY_S", 0)
    deadline = dt.datetime.now() + dt.timedelta(seconds=10)
    while _latest(loop.instance, "session").tags == first.tags:
        assert dt.datetime.now() < deadline
        loop.observe()


def test_migrations_applied_outside_dagster_show_on_platform_schema(
    db_url: str, loop: AutomationLoop, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    loop.observe()
    total = _latest(loop.instance, "platform_schema").metadata["migrations_applied_total"].value
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone()[0] == total
    assert loop.observe().asset_events in (None, [])  # reported once

    # the CLI reports them itself when a Dagster instance is configured
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    cli.report_schema_materialization(db_url, "a test")
    with dg.DagsterInstance.get() as instance:
        reported = _latest(instance, "platform_schema")
    assert reported.metadata["migrations_applied_total"].value == total
    assert reported.metadata["applied_by"].value == "a test"
