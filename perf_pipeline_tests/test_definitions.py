"""The code location loads, validates with Dagster's own CLI, and the schema asset materializes."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import psycopg

from perf_pipeline.defs.schema.assets import platform_schema
from perf_pipeline.settings import PROJECT_ROOT
from perf_pipeline.testing import materialize


def test_definitions_load() -> None:
    from perf_pipeline.definitions import defs

    loaded = defs()
    keys = {k.to_user_string() for k in loaded.resolve_asset_graph().get_all_asset_keys()}
    assert "platform_schema" in keys
    assert {"postgres", "redis"} <= set(loaded.resources)


def test_dagster_definitions_validate() -> None:
    env = dict(
        os.environ,
        DAGSTER_HOME=tempfile.mkdtemp(prefix="ppt_dagster_"),
        PERF_PIPELINE_DATABASE_URL="postgresql://u@db.invalid/x",
        PERF_PIPELINE_REDIS_URL="redis://c.invalid/0",
    )
    proc = subprocess.run(
        [
            os.path.join(os.path.dirname(sys.executable), "dagster"),
            "definitions",
            "validate",
            "-m",
            "perf_pipeline.definitions",
        ],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Validation successful" in proc.stderr + proc.stdout


def test_platform_schema_materializes_on_an_empty_database(empty_db_url: str) -> None:
    result = materialize([platform_schema], empty_db_url)
    assert result.success
    metadata = result.asset_materializations_for_node("platform_schema")[0].metadata
    assert metadata["applied"].value == metadata["migrations"].value > 0
    with psycopg.connect(empty_db_url) as conn:
        assert conn.execute("SELECT to_regclass('audit_log') IS NOT NULL").fetchone()[0]
    again = materialize([platform_schema], empty_db_url)
    assert again.asset_materializations_for_node("platform_schema")[0].metadata["applied"].value == 0
