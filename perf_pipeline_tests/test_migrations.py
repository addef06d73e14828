"""Migrations: fresh apply, re-apply is a no-op, edited files and bad names refused, concurrent appliers."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import psycopg
import pytest

from perf_pipeline.lib.db import MIGRATIONS_DIR
from perf_pipeline.lib.migrations import MigrationError, apply_migrations, discover


def _tables(url: str) -> dict[str, str]:
    with psycopg.connect(url) as conn:
        return dict(
            conn.execute(
                "SELECT relname, relkind FROM pg_class WHERE relnamespace = 'public'::regnamespace AND relkind IN ('r','p')"
            ).fetchall()
        )


def test_fresh_apply_creates_schema_and_reapply_is_noop(empty_db_url: str) -> None:
    applied = apply_migrations(empty_db_url)
    assert applied == [m.name for m in discover()]
    tables = _tables(empty_db_url)
    assert tables["audit_log"] == "p" and tables["usage_log"] == "p"  # partitioned
    assert tables["session"] == "r" and tables["data_export"] == "r"
    assert {"audit_log_default", "usage_log_default"} <= set(tables)
    assert apply_migrations(empty_db_url) == []
    with psycopg.connect(empty_db_url) as conn:
        rows = conn.execute("SELECT filename, checksum FROM schema_migrations ORDER BY filename").fetchall()
    assert [r[0] for r in rows] == applied
    assert all(len(r[1]) == 64 for r in rows)


def test_seed_indexes_exist(db: psycopg.Connection) -> None:
    names = {r[0] for r in db.execute("SELECT indexname FROM pg_indexes WHERE schemaname = 'public'")}
    assert {
        "idx_audit_log_user_timestamp",
        "idx_audit_log_entity_timestamp",
        "idx_audit_log_critical_events",
        "idx_usage_log_user_created",
        "idx_usage_log_billing_analysis",
    } <= names
    (pred,) = db.execute(
        "SELECT pg_get_expr(indpred, indrelid) FROM pg_index WHERE indexrelid = 'idx_usage_log_billing_analysis'::regclass"
    ).fetchone()
    assert "is_billable" in pred


def test_constraints_reject_bad_rows(db: psycopg.Connection) -> None:
    with pytest.raises(psycopg.errors.CheckViolation):
        db.execute("INSERT INTO audit_log (event_type, operation, severity) VALUES ('x', 'y', 'urgent')")
    with pytest.raises(psycopg.errors.CheckViolation):
        db.execute("INSERT INTO session (user_id, status) VALUES (gen_random_uuid(), 'paused')")
    with pytest.raises(psycopg.errors.CheckViolation):
        db.execute(
            "INSERT INTO usage_log (user_id, duration_minutes, stt_provider) VALUES (gen_random_uuid(), -1, 'google')"
        )


def _copy_migrations(tmp: Path) -> Path:
    target = tmp / "migrations"
    shutil.copytree(MIGRATIONS_DIR, target)
    return target


def test_edited_applied_file_is_refused_naming_it(empty_db_url: str, scratch_dir: Path) -> None:
    folder = _copy_migrations(scratch_dir)
    apply_migrations(empty_db_url, folder)
    first = sorted(folder.glob("*.sql"))[0]
    first.write_text(first.read_text() + "\n-- an edit\n")
    with pytest.raises(MigrationError, match=first.name):
        apply_migrations(empty_db_url, folder)


def test_new_file_is_applied_once_in_order(empty_db_url: str, scratch_dir: Path) -> None:
    folder = _copy_migrations(scratch_dir)
    apply_migrations(empty_db_url, folder)
    (folder / "9998_extra.sql").write_text("CREATE TABLE extra_a (id int);")
    (folder / "9999_extra2.sql").write_text("CREATE TABLE extra_b (id int REFERENCES extra_a (id));")
    (folder / "9998_extra.sql").write_text("CREATE TABLE extra_a (id int PRIMARY KEY);")
    assert apply_migrations(empty_db_url, folder) == ["9998_extra.sql", "9999_extra2.sql"]
    assert apply_migrations(empty_db_url, folder) == []


def test_failed_migration_rolls_back_and_names_file(empty_db_url: str, scratch_dir: Path) -> None:
    folder = _copy_migrations(scratch_dir)
    (folder / "9990_broken.sql").write_text("CREATE TABLE half_done (id int);\nSELECT * FROM no_such_table;")
    with pytest.raises(MigrationError, match="9990_broken.sql"):
        apply_migrations(empty_db_url, folder)
    assert "half_done" not in _tables(empty_db_url)


def test_bad_names_are_refused(scratch_dir: Path) -> None:
    (scratch_dir / "1_bad name.sql").write_text("SELECT 1")
    with pytest.raises(MigrationError, match="1_bad name.sql"):
        discover(scratch_dir)
    (scratch_dir / "1_bad name.sql").unlink()
    (scratch_dir / "0001_a.sql").write_text("SELECT 1")
    (scratch_dir / "0001_b.sql").write_text("SELECT 1")
    with pytest.raises(MigrationError, match="already used"):
        discover(scratch_dir)


def test_concurrent_appliers_apply_each_file_once(pg_server_url: str) -> None:
    from perf_pipeline_tests.conftest import create_database, drop_database

    url = create_database(pg_server_url)
    try:
        results: list[list[str]] = []
        errors: list[BaseException] = []

        def apply() -> None:
            try:
                results.append(apply_migrations(url))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=apply) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        applied = [name for r in results for name in r]
        assert sorted(applied) == sorted(m.name for m in discover())  # each exactly once, across all threads
    finally:
        drop_database(pg_server_url, url)
