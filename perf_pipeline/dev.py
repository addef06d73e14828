"""``perf-pipeline dev`` (``make dev``): a living system to look at, through Dagster, in about a minute.

1. The embedded PostgreSQL and Redis (or the configured ones), migrations, and — on an empty database —
   a demo workload of :data:`DEMO`: 15 months of audit and usage data, so that a month is old enough to
   archive and every screen has something to show.
2. ``dagster dev`` (webserver and daemon, every schedule and sensor running by default), started as a child
   process; the Dagster partitions start at the demo's first month (the oldest month in the database).
3. The first hour, lived through once, as runs and a backfill in Dagster's history: every day of the demo
   rolled up by one backfill (one run, one statement), queued in the instance before ``dagster dev``
   starts, so that the daemon's first tick submits it (the backfill daemon looks every 30 s; a backfill
   launched once the UI is up waited that long); then, through the webserver's GraphQL API (the calls the
   UI makes), the schema, the months ahead of both tables, the KPI buckets sealed, the health report and
   latency budgets; and, once the rollup is done, the machine's resources. The daemon warms the
   dashboard cache by itself (declarative automation, after the rollup and the sealing); the command waits
   for that too before it calls the system living. It runs once per Dagster instance: a later ``make dev`` finds the rollup materialized and leaves the history alone.

The command prints where each step is, then the time it took to reach a populated UI, and stays in the
foreground with ``dagster dev`` until interrupted (Ctrl-C stops both).
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from perf_pipeline.lib.workload import WorkloadSpec

#: the demo: 15 months of data (so that, with 12 months of audit retention, old months can be archived),
#: ~0.7M rows in all: a few seconds to load
DEMO = WorkloadSpec(days=455, usage_per_day=400, audit_per_day=800, users=800)

#: the launchRun mutation the UI sends; its answer's __typename says why a launch was refused
LAUNCH_RUN = """
mutation($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on InvalidSubsetError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}
"""
_LAUNCH_BACKFILL = """
mutation($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
  }
}
"""
_BACKFILL_STATUS = """
query($id: String!) {
  partitionBackfillOrError(backfillId: $id) {
    ... on PartitionBackfill { status runs(limit: 50) { runId status } }
  }
}
"""
_RUN_STATUS = """
query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }
"""
_LATEST_MATERIALIZATION = """
query($key: AssetKeyInput!) {
  assetNodes(assetKeys: [$key]) { assetMaterializations(limit: 1) { runId } }
}
"""
_REPO = """
query { repositoriesOrError { ... on RepositoryConnection { nodes { name location { name } } } } }
"""
DONE = {"SUCCESS", "FAILURE", "CANCELED"}


class BootstrapError(RuntimeError):
    """A bootstrap launch was refused; the message says which and why."""


class _GraphQL:
    def __init__(self, host: str, port: int) -> None:
        from dagster_graphql import DagsterGraphQLClient

        self.client = DagsterGraphQLClient(host, port_number=port)
        repo = self.client._execute(_REPO)["repositoriesOrError"]["nodes"][0]
        self.selector = {"repositoryLocationName": repo["location"]["name"], "repositoryName": repo["name"]}

    def run(
        self,
        what: str,
        *,
        job: str = "__ASSET_JOB",
        assets: list[str] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> str:
        params: dict[str, object] = {"selector": {**self.selector, "jobName": job}, "runConfigData": {}}
        if assets:
            params["selector"]["assetSelection"] = [{"path": [a]} for a in assets]  # type: ignore[index]
        params["executionMetadata"] = {
            "tags": [
                {"key": k, "value": v} for k, v in {"perf_pipeline/bootstrap": what, **(tags or {})}.items()
            ]
        }
        out = self.client._execute(LAUNCH_RUN, {"params": params})["launchRun"]
        if out["__typename"] != "LaunchRunSuccess":
            raise BootstrapError(f"{what}: {out}")
        return out["run"]["runId"]

    def run_status(self, run_id: str) -> str:
        return self.client._execute(_RUN_STATUS, {"id": run_id})["runOrError"].get("status", "UNKNOWN")

    def materialized(self, asset: str) -> bool:
        nodes = self.client._execute(_LATEST_MATERIALIZATION, {"key": {"path": [asset]}})["assetNodes"]
        return bool(nodes and nodes[0]["assetMaterializations"])

    def backfill_status(self, backfill_id: str) -> tuple[str, list[str]]:
        data = self.client._execute(_BACKFILL_STATUS, {"id": backfill_id})["partitionBackfillOrError"]
        return data.get("status", "UNKNOWN"), [r["status"] for r in data.get("runs", [])]


def _wait_for_webserver(host: str, port: int, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BootstrapError(f"dagster dev exited with code {proc.returncode} before the UI came up")
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/server_info", timeout=2) as resp:  # noqa: S310
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise BootstrapError(f"the Dagster UI did not answer on {host}:{port} within {timeout_s:.0f} s")


def observe_once(database_url: str) -> None:
    """One tick of ``observe_platform_tables`` into the instance of DAGSTER_HOME, before the daemon runs:
    the partition keys exist before the first runs name them, and usage_log's days are reported before
    the rollup's backfill (so automation does not re-run every day once after it)."""
    import dagster as dg

    from perf_pipeline.defs.platform.sensors import observe_platform_tables, store_sensor_result
    from perf_pipeline.defs.resources import PostgresResource, SettingsResource

    with dg.DagsterInstance.get() as instance:
        ctx = dg.build_sensor_context(
            instance=instance,
            resources={"postgres": PostgresResource(url=database_url), "settings": SettingsResource()},
        )
        store_sensor_result(instance, observe_platform_tables(ctx))


def queue_rollup_backfill(today: dt.date | None = None) -> tuple[str, str]:
    """Queue the backfill of every day of the demo in the instance (the call the UI's "Materialize" of a
    partition range makes, made before the daemon starts, so that its first tick submits it). Returns the
    backfill's id and title. Through Dagster's own ``PartitionBackfill`` (not a public API: the only
    public way is the GraphQL mutation, which needs the webserver up)."""
    import dagster as dg
    from dagster._core.definitions.selector import (
        PartitionRangeSelector,
        PartitionsByAssetSelector,
        PartitionsSelector,
    )
    from dagster._core.execution.backfill import PartitionBackfill
    from dagster._core.utils import make_new_backfill_id

    from perf_pipeline.definitions import defs
    from perf_pipeline.defs.time_partitions import DATA_START

    today = today or dt.datetime.now(dt.UTC).date()
    title = f"the demo's days, {DATA_START} … {today}"
    selector = PartitionsByAssetSelector(
        asset_key=dg.AssetKey("usage_daily_metrics"),
        partitions=PartitionsSelector(
            ranges=[PartitionRangeSelector(start=DATA_START.isoformat(), end=today.isoformat())]
        ),
    )
    with dg.DagsterInstance.get() as instance:
        backfill = PartitionBackfill.from_partitions_by_assets(
            backfill_id=make_new_backfill_id(),
            asset_graph=defs().get_repository_def().asset_graph,
            backfill_timestamp=time.time(),
            tags={"perf_pipeline/bootstrap": "rollup"},
            dynamic_partitions_store=instance,
            partitions_by_assets=[selector],
            title=title,
            description="make dev: the first rollup of the demo workload",
            run_config=None,
        )
        instance.add_backfill(backfill)
    return backfill.backfill_id, title


def needs_bootstrap() -> bool:
    """True until this Dagster instance has rolled the usage up once (a first ``make dev``)."""
    import dagster as dg

    with dg.DagsterInstance.get() as instance:
        return instance.get_latest_materialization_event(dg.AssetKey("usage_daily_metrics")) is None


def bootstrap(host: str, port: int, backfill: str, *, today: dt.date | None = None, log=print) -> float:
    """Launch the first hour's runs, wait for them and for the queued ``backfill``'s run, then sample the
    machine; return the seconds it took."""
    from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

    from perf_pipeline.lib.partitioning import months_ahead
    from perf_pipeline.settings import get_settings

    started = time.monotonic()
    today = today or dt.datetime.now(dt.UTC).date()
    api = _GraphQL(host, port)
    ahead = [m.isoformat() for m in months_ahead(today, get_settings().premake_months)]
    range_tags = {ASSET_PARTITION_RANGE_START_TAG: ahead[0], ASSET_PARTITION_RANGE_END_TAG: ahead[-1]}
    runs = {
        "schema": api.run("schema", assets=["platform_schema"]),
        "audit_log months ahead": api.run(
            "partitions", job="create_audit_log_partitions_ahead_job", tags=range_tags
        ),
        "usage_log months ahead": api.run(
            "partitions", job="create_usage_log_partitions_ahead_job", tags=range_tags
        ),
        "KPI buckets": api.run("kpi buckets", job="usage_kpi_buckets_job"),
        "health report and budgets": api.run("health", job="db_health_job"),
    }
    log(f"bootstrap: launched {len(runs)} runs; the rollup's backfill is queued")
    pending = dict(runs)
    backfill_done = False
    while pending or not backfill_done:
        for name, run_id in list(pending.items()):
            status = api.run_status(run_id)
            if status in DONE:
                log(f"bootstrap: {name}: {status.lower()}")
                del pending[name]
        if not backfill_done:
            # one run (the asset's single-run backfill policy): done when it is, without waiting for the
            # daemon's next tick to mark the backfill itself complete
            _, run_states = api.backfill_status(backfill)
            if run_states and all(s in DONE for s in run_states):
                log(f"bootstrap: rollup backfill: {', '.join(s.lower() for s in run_states)}")
                backfill_done = True
        if time.monotonic() - started > 900:
            log("bootstrap: still running after 15 minutes; see the Runs page")
            return time.monotonic() - started
        time.sleep(1)
    # last, once the bootstrap's own runs have stopped using the CPU: its first sample is one second long
    resources = api.run("resources", job="system_resources_job")
    while (status := api.run_status(resources)) not in DONE:
        time.sleep(1)
    log(f"bootstrap: machine resources: {status.lower()}")
    # the cache is the automation's to warm (after the rollup and the sealing): wait for it to have done so
    deadline = time.monotonic() + 180
    while not api.materialized("dashboard_cache"):
        if time.monotonic() > deadline:
            log(
                "bootstrap: the automation has not warmed the dashboard cache after 3 minutes; see its sensor"
            )
            return time.monotonic() - started
        time.sleep(1)
    log("bootstrap: dashboard cache warmed by the automation")
    return time.monotonic() - started


def _port_in_use(host: str, port: int) -> str | None:
    """Why ``port`` cannot be listened on at ``host`` (e.g. "Address already in use"), or None when it can.
    Checked before anything starts: otherwise the wait for the UI would find the other process's webserver
    and the bootstrap would talk to the wrong Dagster."""
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the webserver binds: TIME_WAIT is fine
        try:
            s.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def run(host: str, port: int, *, force_bootstrap: bool = False, skip_bootstrap: bool = False) -> int:
    """What ``perf-pipeline dev`` does (see the module docstring). Returns dagster dev's exit code."""
    from perf_pipeline.cli import apply_pool_limits, dagster_environment
    from perf_pipeline.lib.migrations import apply_migrations
    from perf_pipeline.lib.workload import database_is_empty, load_workload
    from perf_pipeline.settings import PROJECT_ROOT

    started = time.monotonic()
    busy = _port_in_use(host, port)
    if busy:
        print(
            f"error: {host}:{port} is already in use ({busy}): is another `make dev` running? Stop it "
            "(Ctrl-C in its terminal) or choose another port with `perf-pipeline dev --port N`",
            file=sys.stderr,
        )
        return 2
    env = dagster_environment()
    url = env["PERF_PIPELINE_DATABASE_URL"]
    applied = apply_migrations(url)
    print(f"migrations: {len(applied)} applied")
    if database_is_empty(url):
        print(
            f"empty database: loading a demo workload ({DEMO.days} days: {DEMO.usage_per_day} usage rows and "
            f"{DEMO.audit_per_day} audit events a day)"
        )
        load_workload(url, DEMO, progress=True)
    os.environ.update(env)
    print("Dagster pools:", ", ".join(f"{k}={v}" for k, v in apply_pool_limits(env).items()))
    first_time = (force_bootstrap or needs_bootstrap()) and not skip_bootstrap
    backfill = ""
    if first_time:
        observe_once(url)
        backfill, title = queue_rollup_backfill()
        print(f"queued the backfill of usage_daily_metrics: {title}")
    dagster = Path(sys.executable).with_name("dagster")
    argv = [str(dagster), "dev", "-w", str(PROJECT_ROOT / "workspace.yaml"), "-h", host, "-p", str(port)]
    print("starting", " ".join(argv))
    # from DAGSTER_HOME, where its dagster.yaml is (from the project root Dagster warns about the other one)
    proc = subprocess.Popen(argv, cwd=env["DAGSTER_HOME"], env=os.environ.copy(), start_new_session=True)
    # a SIGTERM (a supervisor, `kill`) stops dagster dev too, as Ctrl-C does
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        _wait_for_webserver(host, port, proc)
        print(f"Dagster UI: http://{host}:{port} (up in {time.monotonic() - started:.0f} s)")
        if first_time:
            took = bootstrap(host, port, backfill)
            print(
                f"a living system in {time.monotonic() - started:.0f} s (bootstrap {took:.0f} s): open "
                f"http://{host}:{port}/runs and http://{host}:{port}/asset-groups"
            )
        return proc.wait()
    except (KeyboardInterrupt, SystemExit):
        return 0
    except BootstrapError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
