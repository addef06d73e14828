"""UI smoke test: a real dagster-webserver on a test instance (PostgreSQL storage), driven through GraphQL.

Lists every asset, check, schedule and sensor the code location defines, launches a materialization of
`platform_schema` on this module's database and waits for it to succeed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import requests
from dagster_graphql import DagsterGraphQLClient

from perf_pipeline.settings import PROJECT_ROOT
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

LAUNCH = """
mutation($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on InvalidSubsetError { message }
  }
}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def webserver(
    db_url: str, redis_server_url: str, pg_server_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DagsterGraphQLClient]:
    home = tmp_path_factory.mktemp("dagster_home")
    storage_url = create_database(pg_server_url, prefix="ppt_dagster")
    psycopg2_url = urlunsplit(urlsplit(storage_url)._replace(scheme="postgresql+psycopg2"))
    # the project's dagster.yaml minus the queued coordinator (no daemon here: runs launch at once)
    (home / "dagster.yaml").write_text(
        "storage:\n  postgres:\n    postgres_url:\n      env: PERF_PIPELINE_DAGSTER_PG_URL\n"
        "run_coordinator:\n  module: dagster._core.run_coordinator\n  class: DefaultRunCoordinator\n"
        "telemetry:\n  enabled: false\n"
    )
    port = _free_port()
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
        # the whole process group: terminating the webserver alone left its code server running
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group is still there
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

    params = {
        "selector": {
            "repositoryLocationName": "perf_pipeline",
            "repositoryName": repo["name"],
            "jobName": "__ASSET_JOB",
            "assetSelection": [{"path": ["platform_schema"]}],
        },
        "runConfigData": {},
    }
    launched = webserver._execute(LAUNCH, {"params": params})["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]
    deadline = time.monotonic() + 90
    while (status := webserver.get_run_status(run_id).value) not in ("SUCCESS", "FAILURE", "CANCELED"):
        assert time.monotonic() < deadline, f"run {run_id} still {status}"
        time.sleep(1)
    assert status == "SUCCESS"
