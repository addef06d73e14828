"""Database health (issue 7): maintenance, the health report, latency budgets, system resources.

Every test runs on the module's real database (conftest ``db_url``), seeded once with a small workload
(~60k audit rows, ~60k usage rows) so the planner uses the same indexes it uses at scale.
"""

import datetime as dt
import time

import dagster as dg
import psycopg
import pytest

from perf_pipeline.defs.maintenance.assets import (
    db_health_report,
    db_maintenance,
    query_latency_budgets,
    system_resources,
)
from perf_pipeline.defs.resources import PostgresResource, SettingsResource
from perf_pipeline.lib import health
from perf_pipeline.lib.partitioning import (
    add_months,
    ensure_partition,
    list_partitions,
    month_start,
    partition_name,
)
from perf_pipeline.lib.workload import WorkloadSpec, load_workload

TODAY = dt.datetime.now(dt.UTC).date()
OLD_MONTH = add_months(month_start(TODAY), -6)


@pytest.fixture(scope="module")
def seeded_url(db_url: str) -> str:
    load_workload(db_url, WorkloadSpec(days=40, usage_per_day=1500, audit_per_day=1500, seed=7))
    with psycopg.connect(db_url, autocommit=True) as conn:
        ensure_partition(conn, "audit_log", OLD_MONTH)  # history that nightly maintenance must leave alone
    return db_url


def _materialize(
    assets: list, url: str, run_config: dict | None = None, instance: dg.DagsterInstance | None = None
) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        assets,
        resources={"postgres": PostgresResource(url=url), "settings": SettingsResource()},
        instance=instance or dg.DagsterInstance.ephemeral(),
        run_config=run_config,
        raise_on_error=False,
    )


def _checks(result: dg.ExecuteInProcessResult) -> dict[str, dg.AssetCheckEvaluation]:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def _wait_for(conn: psycopg.Connection, query: str, params: tuple = (), timeout: float = 15.0) -> None:
    """Cumulative statistics reach other sessions asynchronously (PostgreSQL ≥ 15 flushes them at most
    once a second per backend): poll until ``query`` is true."""
    deadline = time.monotonic() + timeout
    while True:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        if conn.execute(query, params).fetchone()[0]:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"statistics never satisfied: {query}")
        time.sleep(0.2)


# ------------------------------------------------------------------------------------------ maintenance


def test_maintenance_targets_hot_tables_and_recent_partitions_only(seeded_url: str) -> None:
    with psycopg.connect(seeded_url, autocommit=True) as conn:
        targets = health.maintenance_targets(conn, recent_months=2, today=TODAY)
        audit_parts = {p.name for p in list_partitions(conn, "audit_log")}
    this, previous = month_start(TODAY), add_months(month_start(TODAY), -1)
    for table in ("audit_log", "usage_log"):
        assert partition_name(table, this) in targets
        assert partition_name(table, previous) in targets
        assert f"{table}_default" in targets
    assert {"session", "data_export", "alert_event"} <= set(targets)
    old = partition_name("audit_log", OLD_MONTH)
    assert old in audit_parts and old not in targets
    assert "audit_log" not in targets  # never the whole partitioned table (= all of history)


def test_vacuum_runs_outside_a_transaction_with_per_table_durations(seeded_url: str) -> None:
    result = health.run_maintenance(
        seeded_url, recent_months=2, today=TODAY, statement_timeout_ms=60_000, lock_timeout_ms=2000
    )
    assert result.failures == 0
    assert [v.relation for v in result.vacuumed]
    assert all(v.ok and v.duration_ms > 0 for v in result.vacuumed)
    with psycopg.connect(seeded_url, autocommit=True) as conn:
        current = partition_name("audit_log", month_start(TODAY))
        _wait_for(
            conn,
            "SELECT last_vacuum IS NOT NULL AND last_analyze IS NOT NULL FROM pg_stat_user_tables "
            "WHERE relname = %s",
            (current,),
        )
        old = conn.execute(
            "SELECT last_vacuum FROM pg_stat_user_tables WHERE relname = %s",
            (partition_name("audit_log", OLD_MONTH),),
        ).fetchone()[0]
        assert old is None
        # inside a transaction PostgreSQL refuses VACUUM; the lib refuses such a connection up front
        with psycopg.connect(seeded_url) as tx_conn:
            with pytest.raises(ValueError, match="transaction block"):
                health.vacuum_analyze(tx_conn, ["session"])
            with pytest.raises(psycopg.errors.ActiveSqlTransaction):
                tx_conn.execute("VACUUM (ANALYZE) session")


def test_lock_timeout_bounds_a_blocked_vacuum_and_the_rest_still_runs(seeded_url: str) -> None:
    with psycopg.connect(seeded_url) as holder:
        # SHARE UPDATE EXCLUSIVE conflicts with VACUUM's own lock (as a running ALTER TABLE or ANALYZE would)
        holder.execute("LOCK TABLE data_export IN SHARE UPDATE EXCLUSIVE MODE")
        started = time.perf_counter()
        result = health.run_maintenance(
            seeded_url, tables=["data_export", "session"], lock_timeout_ms=300, statement_timeout_ms=60_000
        )
        elapsed = time.perf_counter() - started
        holder.rollback()
    blocked, other = result.vacuumed
    assert blocked.relation == "data_export" and not blocked.ok and "lock timeout" in (blocked.error or "")
    assert other.relation == "session" and other.ok
    assert result.failures == 1
    assert elapsed < 10


def test_bloated_index_is_rebuilt_concurrently_and_a_compact_one_is_not(seeded_url: str) -> None:
    with psycopg.connect(seeded_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE bloat_demo (id bigint PRIMARY KEY, payload text NOT NULL)")
        conn.execute("INSERT INTO bloat_demo SELECT g, md5(g::text) FROM generate_series(1, 60000) g")
        conn.execute("CREATE INDEX bloat_demo_payload ON bloat_demo (payload)")
        # 9 rows of 10 deleted evenly: every leaf page keeps a tenth of its entries, none becomes empty,
        # so VACUUM cannot give the pages back — only a rebuild can
        conn.execute("DELETE FROM bloat_demo WHERE id % 10 <> 0")
        conn.execute("VACUUM (ANALYZE) bloat_demo")
        conn.execute("CREATE INDEX bloat_demo_fresh ON bloat_demo (id, payload)")  # built compact
        conn.execute("ANALYZE bloat_demo")
        before = {r["index_name"]: r for r in health.index_bloat(conn, ["bloat_demo"])}
        assert before["bloat_demo_payload"]["bloat_ratio"] > 0.7
        assert before["bloat_demo_fresh"]["bloat_ratio"] < 0.3
        results, checked = health.reindex_bloated(
            conn, ["bloat_demo"], bloat_threshold=0.5, min_index_bytes=0
        )
        assert checked == 3
        assert {r.index for r in results} == {"bloat_demo_pkey", "bloat_demo_payload"}
        assert all(r.ok and r.bytes_after is not None and r.bytes_after < r.bytes_before / 3 for r in results)
        valid = conn.execute(
            "SELECT bool_and(indisvalid) FROM pg_index WHERE indrelid = 'bloat_demo'::regclass"
        ).fetchone()[0]
        assert valid
        conn.execute("DROP TABLE bloat_demo")


def test_db_maintenance_asset_reports_per_table_durations(seeded_url: str) -> None:
    result = _materialize([db_maintenance], seeded_url)
    assert result.success
    md = result.asset_materializations_for_node("db_maintenance")[0].metadata
    current = partition_name("usage_log", month_start(TODAY))
    assert md[f"vacuum_ms.{current}"].value > 0
    assert md["relations_vacuumed"].value >= 6
    assert md["failures"].value == 0
    assert db_maintenance.op.pool == "postgres_heavy"


def test_db_maintenance_asset_fails_when_a_relation_could_not_be_vacuumed(seeded_url: str) -> None:
    with psycopg.connect(seeded_url) as holder:
        holder.execute("LOCK TABLE data_export IN SHARE UPDATE EXCLUSIVE MODE")
        result = _materialize(
            [db_maintenance],
            seeded_url,
            run_config={"ops": {"db_maintenance": {"config": {"lock_timeout_ms": 200}}}},
        )
        holder.rollback()
    assert not result.success
    failure = result.get_step_failure_events()[0].step_failure_data.user_failure_data
    assert failure.description == "1 maintenance statement(s) failed"
    assert failure.metadata["relations_vacuumed"].value >= 6  # the others were still vacuumed


# ---------------------------------------------------------------------------------------------- report


def test_sizes_are_grouped_under_the_parent(seeded_url: str) -> None:
    with psycopg.connect(seeded_url, autocommit=True) as conn:
        report = health.health_report(conn)
        leaves = list_partitions(conn, "audit_log")
        expected = conn.execute(
            "SELECT sum(pg_table_size(c.oid) + pg_indexes_size(c.oid)) FROM pg_inherits i "
            "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'audit_log'::regclass"
        ).fetchone()[0]
    by_name = {t["table_name"]: t for t in report.tables}
    assert by_name["audit_log"]["partitioned"] and by_name["audit_log"]["partitions"] == len(leaves)
    assert by_name["audit_log"]["total_bytes"] == expected
    assert by_name["audit_log"]["est_rows"] > 50_000
    assert not any(name.startswith("audit_log_") for name in by_name)  # no partition listed on its own
    assert by_name["session"]["partitions"] == 0
    metrics = health.report_metrics(report)
    assert metrics["bytes.audit_log"] == expected
    assert 0 <= metrics["dead_ratio.session"] <= 1


def test_unused_index_is_flagged_and_used_and_constraint_indexes_are_not(seeded_url: str) -> None:
    with psycopg.connect(seeded_url, autocommit=True) as conn:
        conn.execute("CREATE INDEX idx_test_never_read ON session (title)")
        conn.execute("CREATE INDEX idx_test_read ON session (stt_provider, duration)")
        conn.execute("ALTER TABLE data_export ADD CONSTRAINT data_export_file_unique UNIQUE (file_path)")
        with psycopg.connect(seeded_url, autocommit=True) as reader:
            reader.execute("SET enable_seqscan = off")
            reader.execute("SELECT count(*) FROM session WHERE stt_provider = 'google' AND duration > 60")
        _wait_for(conn, "SELECT idx_scan > 0 FROM pg_stat_user_indexes WHERE indexrelname = 'idx_test_read'")
        report = health.health_report(conn)
        md = health.report_markdown(report)
        audit_partitions = len(list_partitions(conn, "audit_log"))
    unused = {i["index_name"] for i in report.unused_indexes}
    by_name = {i["index_name"]: i for i in report.indexes}
    assert "idx_test_never_read" in unused
    assert "idx_test_read" not in unused and by_name["idx_test_read"]["scans"] > 0
    for name in ("session_pkey", "data_export_pkey", "data_export_file_unique", "audit_log_pkey"):
        assert by_name[name]["enforces_constraint"] and name not in unused
    # partition indexes are grouped under the parent index
    assert by_name["idx_audit_log_entity_timestamp"]["leaf_indexes"] == audit_partitions
    assert not any(name.startswith("audit_log_y") for name in by_name)
    assert "idx_test_never_read" in md and "**UNUSED**" in md


def test_connections_and_rollback_ratio(seeded_url: str) -> None:
    with psycopg.connect(seeded_url, autocommit=True) as conn:
        with psycopg.connect(seeded_url) as failing:
            for _ in range(5):
                failing.execute("SELECT 1")
                failing.rollback()
        _wait_for(conn, "SELECT xact_rollback >= 5 FROM pg_stat_database WHERE datname = current_database()")
        report = health.health_report(conn)
    db = report.database
    assert db["connections"] >= 1 and db["max_connections"] > 0
    assert db["rollbacks"] >= 5 and 0 < db["rollback_ratio"] < 1
    assert health.report_metrics(report)["rollback_ratio"] == db["rollback_ratio"]


def test_slow_statements_or_a_clear_line_when_pg_stat_statements_is_missing(seeded_url: str) -> None:
    with psycopg.connect(seeded_url, autocommit=True) as conn:
        preloaded = "pg_stat_statements" in conn.execute("SHOW shared_preload_libraries").fetchone()[0]
        installed = conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'pg_stat_statements'").fetchone()
        slow = health.slow_statements(conn)
        if installed and preloaded:  # the embedded server
            assert slow.status == "ok" and slow.rows
            assert {"mean_ms", "max_ms", "calls", "query"} <= slow.rows[0].keys()
        elif installed:  # the system PostgreSQL 15: extension available, library not preloaded
            assert slow.status == "not loaded" and "shared_preload_libraries" in slow.message
        conn.execute("DROP EXTENSION IF EXISTS pg_stat_statements")
        try:
            report = health.health_report(conn)  # must not raise
            assert report.slow.status == "not installed"
            assert "pg_stat_statements is not installed" in health.report_markdown(report)
            assert report.tables  # the rest of the report is still there
        finally:
            if installed:
                conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")


def test_db_health_report_asset_metadata(seeded_url: str) -> None:
    result = _materialize([db_health_report], seeded_url)
    assert result.success
    md = result.asset_materializations_for_node("db_health_report")[0].metadata
    assert md["table_bytes.audit_log"].value > 0
    assert md["unused_indexes"].value >= 1
    assert md["pg_stat_statements"].value in {"ok", "not loaded", "not installed"}
    # a person reads the summary first; the tables are tables the UI renders
    assert list(md)[0] == "summary" and "Largest tables: audit_log" in md["summary"].value
    tables = {r.data["table"]: r.data for r in md["tables"].value.records}
    assert "audit_log" in tables and tables["audit_log"]["partitions"] >= 1
    assert _checks(result)["rollback_ratio_below_10_pct"].passed


# ------------------------------------------------------------------------------------- latency budgets


def test_budgets_pass_on_a_healthy_schema_and_fail_without_the_needed_index(seeded_url: str) -> None:
    healthy = _materialize([query_latency_budgets], seeded_url)
    assert healthy.success
    checks = _checks(healthy)
    assert checks["audit_lookups_within_budget"].passed, checks["audit_lookups_within_budget"].metadata
    assert checks["analytics_within_budget"].passed, checks["analytics_within_budget"].metadata
    md = healthy.asset_materializations_for_node("query_latency_budgets")[0].metadata
    for name in ("audit_user_latest", "audit_entity_history", "audit_critical_24h", "kpis", "usage_by_user"):
        assert md[f"latency_p95_ms.{name}"].value >= md[f"latency_p50_ms.{name}"].value > 0
    assert md["plan_index_used.audit_user_latest"].value is True

    with psycopg.connect(seeded_url, autocommit=True) as conn:
        conn.execute("DROP INDEX idx_audit_log_user_timestamp")
        try:
            broken = _materialize([query_latency_budgets], seeded_url)
        finally:
            conn.execute(
                'CREATE INDEX idx_audit_log_user_timestamp ON audit_log (user_id, "timestamp" DESC) '
                "WHERE user_id IS NOT NULL"
            )
    audit = _checks(broken)["audit_lookups_within_budget"]
    assert not audit.passed
    assert audit.description.endswith(": audit_user_latest")
    plan = audit.metadata["plan"].value
    assert "audit_user_latest" in plan and "Seq Scan" in plan
    assert any("no index scan" in r.data["result"] for r in audit.metadata["results"].value.records)
    assert _checks(broken)["analytics_within_budget"].passed


def test_budget_is_configurable_and_an_over_budget_query_fails(seeded_url: str) -> None:
    result = _materialize(
        [query_latency_budgets],
        seeded_url,
        run_config={"ops": {"query_latency_budgets": {"config": {"runs": 2, "analytics_budget_ms": 0.001}}}},
    )
    analytics = _checks(result)["analytics_within_budget"]
    assert not analytics.passed
    assert analytics.metadata["budget_ms"].value == 0.001
    assert any(r.data["result"] == "over budget" for r in analytics.metadata["results"].value.records)
    assert "plan" in analytics.metadata
    assert _checks(result)["audit_lookups_within_budget"].passed


def test_a_sequential_scan_fails_only_where_it_reads_enough_to_matter() -> None:
    tiny = health.ProbeResult("q", health.AUDIT, samples_ms=[1.0], needs_index=True, shared_hit=6)
    assert tiny.within(50)  # a 6-page table: the planner is right to scan it
    big = health.ProbeResult("q", health.AUDIT, samples_ms=[1.0], needs_index=True, shared_hit=5000)
    assert big.missing_index and not big.within(50)
    indexed = health.ProbeResult(
        "q", health.AUDIT, samples_ms=[1.0], needs_index=True, shared_hit=5000, indexes=["idx"]
    )
    assert indexed.within(50) and not indexed.within(0.5)


def test_trends_probe_is_skipped_without_the_rollup_table(seeded_url: str) -> None:
    probe = health.Probe(
        "trends_missing", health.ANALYTICS, "rollup_trends", False, requires_table="no_such_rollup_table"
    )
    with psycopg.connect(seeded_url, autocommit=True) as conn:
        result = health.run_probe(conn, probe, health.probe_params(conn))
    assert result.skipped and "does not exist" in result.skipped
    assert result.within(0.0001)


# ------------------------------------------------------------------------------------------- resources


def test_cpu_average_between_samples() -> None:
    a = health.CpuSample(busy_s=100.0, total_s=1000.0, boot_time=1.0)
    assert health.cpu_percent_between(a, health.CpuSample(130.0, 1100.0, 1.0)) == pytest.approx(30.0)
    assert health.cpu_percent_between(a, health.CpuSample(1.0, 50.0, 2.0)) is None  # rebooted
    assert health.cpu_percent_between(a, a) is None


def test_system_resources_sample_without_blocking(seeded_url: str) -> None:
    previous = health.cpu_sample()
    burn = time.perf_counter()
    while time.perf_counter() - burn < 0.3:  # some CPU to measure
        pass
    with psycopg.connect(seeded_url, autocommit=True) as conn:
        started = time.perf_counter()
        snap = health.system_resources(conn, previous=previous)
        elapsed = time.perf_counter() - started
    assert elapsed < 0.5  # the original sketch's cpu_percent(interval=1) blocked a full second
    assert snap.cpu_percent is not None and 0 < snap.cpu_percent <= 100
    assert 0 < snap.memory_percent < 100 and 0 <= snap.disk_percent <= 100
    assert snap.connections >= 1 and snap.max_connections > snap.connections


def test_a_previous_sample_of_a_moment_ago_still_gives_a_full_window(seeded_url: str) -> None:
    """Two samples close together (a scheduled run right after another) average over at least
    ``min_window_s``, never over a few milliseconds: such a reading failed the CPU check in a busy test run."""
    with psycopg.connect(seeded_url, autocommit=True) as conn:
        previous = health.cpu_sample()
        time.sleep(0.05)  # a few clock ticks: the two samples differ, so the previous one is usable
        snap = health.system_resources(conn, previous=previous, min_window_s=0.5)
    assert snap.cpu_window_s >= 0.45 and snap.cpu_percent is not None


def test_system_resources_asset_checks_against_thresholds(seeded_url: str) -> None:
    instance = dg.DagsterInstance.ephemeral()
    first = _materialize([system_resources], seeded_url, instance=instance)
    assert first.success
    md = first.asset_materializations_for_node("system_resources")[0].metadata
    checks = _checks(first)
    assert checks["memory_below_threshold"].passed == (md["memory_percent"].value < 70)
    assert checks["connections_within_limit"].passed
    # a first run has no previous sample: the CPU is measured over a real second, not read off the load
    # average or a few milliseconds (which read 100 % and failed the check on the first click)
    assert md["cpu_window_s"].value >= 0.9 and md["cpu_measured_since"].value == "this run"
    cpu = checks["cpu_below_threshold"]
    assert cpu.metadata["window_s"].value >= 0.9 and cpu.passed == (md["cpu_percent"].value < 60)
    assert all(c.description for c in checks.values())
    # the next run averages over the interval since this one
    second = _materialize([system_resources], seeded_url, instance=instance)
    assert second.asset_materializations_for_node("system_resources")[0].metadata[
        "cpu_measured_since"
    ].value == ("the previous sample")
    # a threshold below the measured value fails the check
    strict = _materialize(
        [system_resources],
        seeded_url,
        instance=instance,
        run_config={
            "ops": {"system_resources": {"config": {"memory_max_pct": 0.01, "connection_max_ratio": 0.0}}}
        },
    )
    assert not _checks(strict)["memory_below_threshold"].passed
    assert not _checks(strict)["connections_within_limit"].passed
    assert "cpu_busy_s" in strict.asset_materializations_for_node("system_resources")[0].metadata
