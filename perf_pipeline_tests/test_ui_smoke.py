"""The UI's truth, through a real dagster-webserver on a test instance (PostgreSQL storage) and GraphQL:
every definition listed; the lineage edges from the schema and the platform's tables to the cache and
the archives; the months PostgreSQL holds shown as materialized (whoever created them); and a 3-day range
run whose days each carry their own numbers.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import requests
from dagster_graphql import DagsterGraphQLClient

from perf_pipeline.dev import LAUNCH_RUN
from perf_pipeline.settings import PROJECT_ROOT
from perf_pipeline.testing import free_port, stop_process_tree
from perf_pipeline_tests.conftest import create_database, drop_database

REPO_QUERY = """
query {
  repositoriesOrError {
    ... on RepositoryConnection {
      nodes {
        name
        location { name }
        assetNodes { assetKey { path } assetChecksOrError { ... on AssetChecks { checks { name } } } }
        schedules { name }
        sensors { name }
        jobs { name }
      }
    }
  }
}
"""


def _launch_and_succeed(
    webserver: DagsterGraphQLClient,
    repository: str,
    asset: str,
    *,
    timeout: float,
    tags: dict[str, str] | None = None,
) -> None:
    """Launch a run of ``asset`` (with ``tags``) through GraphQL, as the UI does, and assert it succeeds
    within ``timeout`` seconds."""
    params: dict[str, Any] = {
        "selector": {
            "repositoryLocationName": "perf_pipeline",
            "repositoryName": repository,
            "jobName": "__ASSET_JOB",
            "assetSelection": [{"path": [asset]}],
        },
        "runConfigData": {},
    }
    if tags:
        params["executionMetadata"] = {"tags": [{"key": k, "value": v} for k, v in tags.items()]}
    launched = webserver._execute(LAUNCH_RUN, {"params": params})["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]
    deadline = time.monotonic() + timeout
    while (status := webserver.get_run_status(run_id).value) not in ("SUCCESS", "FAILURE", "CANCELED"):
        assert time.monotonic() < deadline, f"run {run_id} still {status}"
        time.sleep(1)
    assert status == "SUCCESS"


@pytest.fixture(scope="module")
def dagster_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dagster_home")


@pytest.fixture(scope="module")
def webserver(
    db_url: str, redis_server_url: str, pg_server_url: str, dagster_home: Path
) -> Iterator[DagsterGraphQLClient]:
    home = dagster_home
    storage_url = create_database(pg_server_url, prefix="ppt_dagster")
    psycopg2_url = urlunsplit(urlsplit(storage_url)._replace(scheme="postgresql+psycopg2"))
    # the project's dagster.yaml minus the queued coordinator (no daemon here: runs launch at once)
    os.environ["PERF_PIPELINE_DAGSTER_PG_URL"] = psycopg2_url  # this test opens the same instance
    (home / "dagster.yaml").write_text(
        "storage:\n  postgres:\n    postgres_url:\n      env: PERF_PIPELINE_DAGSTER_PG_URL\n"
        "run_coordinator:\n  module: dagster._core.run_coordinator\n  class: DefaultRunCoordinator\n"
        "telemetry:\n  enabled: false\n"
    )
    port = free_port()
    env = dict(
        os.environ,
        DAGSTER_HOME=str(home),
        PERF_PIPELINE_DAGSTER_PG_URL=psycopg2_url,
        PERF_PIPELINE_DATABASE_URL=db_url,
        PERF_PIPELINE_REDIS_URL=redis_server_url,
    )
    with open(home / "webserver.log", "w") as log:
        proc = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("dagster-webserver")),
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-w",
                str(PROJECT_ROOT / "workspace.yaml"),
            ],
            cwd=home,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its code server child is stopped with it (see finally)
        )
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/server_info", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"webserver did not start:\n{(home / 'webserver.log').read_text()[-3000:]}"
                )
            time.sleep(0.5)
        yield DagsterGraphQLClient("127.0.0.1", port_number=port)
    finally:
        # the whole tree: terminating the webserver alone left its code server running
        stop_process_tree(proc, grace_s=30)
        drop_database(pg_server_url, storage_url)


def test_lists_every_definition_and_materializes(webserver: DagsterGraphQLClient, db_url: str) -> None:
    from perf_pipeline.definitions import defs

    expected = defs()
    data = webserver._execute(REPO_QUERY)
    (repo,) = data["repositoriesOrError"]["nodes"]
    assert repo["location"]["name"] == "perf_pipeline"
    assets = {"/".join(a["assetKey"]["path"]) for a in repo["assetNodes"]}
    checks = {
        c["name"] for a in repo["assetNodes"] for c in (a["assetChecksOrError"] or {}).get("checks", [])
    }
    graph = expected.resolve_asset_graph()
    assert assets == {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert checks == {k.name for k in graph.asset_check_keys}
    repository = expected.get_repository_def()
    assert {s["name"] for s in repo["schedules"]} == {s.name for s in repository.schedule_defs}
    assert {s["name"] for s in repo["sensors"]} == {s.name for s in repository.sensor_defs}

    _launch_and_succeed(webserver, repo["name"], "platform_schema", timeout=90)


LINEAGE = """
query { assetNodes { assetKey { path } dependencyKeys { path } } }
"""

PARTITIONS = """
query($key: AssetKeyInput!) {
  assetNodeOrError(assetKey: $key) {
    ... on AssetNode {
      partitionKeys
      assetPartitionStatuses {
        __typename
        ... on DefaultPartitionStatuses { materializedPartitions }
        ... on TimePartitionStatuses { ranges { status startKey endKey } }
      }
    }
  }
}
"""

DAY_METADATA = """
query($key: AssetKeyInput!, $partitions: [String!]) {
  assetOrError(assetKey: $key) {
    ... on Asset {
      assetMaterializations(partitions: $partitions) {
        partition
        metadataEntries { label ... on IntMetadataEntry { intValue } ... on FloatMetadataEntry { floatValue } }
      }
    }
  }
}
"""


def test_the_lineage_reads_from_the_schema_to_the_cache_and_the_archives(
    webserver: DagsterGraphQLClient,
) -> None:
    nodes = webserver._execute(LINEAGE)["assetNodes"]
    edges = {
        ("/".join(d["path"]), "/".join(n["assetKey"]["path"])) for n in nodes for d in n["dependencyKeys"]
    }
    for edge in [
        ("platform_schema", "audit_log_partitions"),
        ("platform_schema", "usage_log_partitions"),
        ("audit_log_partitions", "audit_log"),
        ("usage_log_partitions", "usage_log"),
        ("platform_schema", "session"),
        ("platform_schema", "data_export"),
        ("usage_log", "usage_daily_metrics"),
        ("usage_log", "usage_kpi_buckets"),
        ("usage_daily_metrics", "dashboard_cache"),
        ("usage_kpi_buckets", "dashboard_cache"),
        ("audit_log", "audit_log_archive"),
        ("usage_daily_metrics", "usage_log_retention"),
        ("data_export", "data_export_files"),
    ]:
        assert edge in edges, f"missing lineage edge {edge}"
    has_parent = {b for _, b in edges}
    orphans = {"/".join(n["assetKey"]["path"]) for n in nodes} - has_parent - {"platform_schema"}
    assert orphans == set(), f"assets with no upstream: {orphans}"


def test_months_postgresql_holds_are_shown_materialized(
    webserver: DagsterGraphQLClient, db_url: str, dagster_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dagster as dg
    import psycopg

    from perf_pipeline.defs.platform.sensors import observe_platform_tables, store_sensor_result
    from perf_pipeline.defs.resources import PostgresResource, SettingsResource
    from perf_pipeline.lib.partitioning import ensure_partitions, existing_months

    with psycopg.connect(db_url, autocommit=True) as conn:
        # months made outside Dagster, as the workload loader or a migration would
        ensure_partitions(conn, "audit_log", [dt.date(2023, 1, 1), dt.date(2023, 2, 1)])
        attached = {m.isoformat() for m in existing_months(conn, "audit_log")}
    monkeypatch.setenv("DAGSTER_HOME", str(dagster_home))
    with dg.DagsterInstance.get() as instance:  # the webserver's instance: one tick of the sensor, stored
        ctx = dg.build_sensor_context(
            instance=instance,
            resources={"postgres": PostgresResource(url=db_url), "settings": SettingsResource()},
        )
        store_sensor_result(instance, observe_platform_tables(ctx))
    for asset in ("audit_log_partitions", "audit_log"):
        node = webserver._execute(PARTITIONS, {"key": {"path": [asset]}})["assetNodeOrError"]
        statuses = node["assetPartitionStatuses"]
        assert set(statuses["materializedPartitions"]) == attached, asset  # the bar is pg_inherits
        assert attached <= set(node["partitionKeys"])


def test_a_range_run_shows_each_days_own_numbers(webserver: DagsterGraphQLClient, db_url: str) -> None:
    import psycopg

    days = [dt.date(2024, 3, 10) + dt.timedelta(days=i) for i in range(3)]
    with psycopg.connect(db_url, autocommit=True) as conn:
        from perf_pipeline.lib.partitioning import ensure_partitions

        ensure_partitions(conn, "usage_log", [days[0]])
        for i, day in enumerate(days):  # a different number of sessions each day: 10, 20, 30
            conn.execute(
                "INSERT INTO usage_log (user_id, created_at, duration_minutes, cost_usd, stt_provider) "
                "SELECT gen_random_uuid(), %s::timestamptz + g * interval '1 minute', 1, 0.5, 'google' "
                "FROM generate_series(1, %s) g",
                (dt.datetime.combine(day, dt.time(1), dt.UTC), 10 * (i + 1)),
            )
    (repo,) = webserver._execute(REPO_QUERY)["repositoriesOrError"]["nodes"]
    range_tags = {
        "dagster/asset_partition_range_start": days[0].isoformat(),
        "dagster/asset_partition_range_end": days[-1].isoformat(),
    }
    _launch_and_succeed(webserver, repo["name"], "usage_daily_metrics", timeout=120, tags=range_tags)
    events = webserver._execute(
        DAY_METADATA, {"key": {"path": ["usage_daily_metrics"]}, "partitions": [d.isoformat() for d in days]}
    )["assetOrError"]["assetMaterializations"]
    by_day = {
        e["partition"]: {m["label"]: m.get("intValue", m.get("floatValue")) for m in e["metadataEntries"]}
        for e in events
    }
    assert {d: by_day[d.isoformat()]["sessions"] for d in days} == dict(zip(days, (10, 20, 30), strict=True))
    assert {d: by_day[d.isoformat()]["revenue_usd"] for d in days} == dict(
        zip(days, (5.0, 10.0, 15.0), strict=True)
    )
    assert {by_day[d.isoformat()]["run_days"] for d in days} == {3}  # the run's own figure, named as such
