"""Database maintenance and health assets: VACUUM/REINDEX, the health report, latency budgets, resources.

Thin Dagster layer over :mod:`perf_pipeline.lib.health`: each body reads its config, calls one lib
function and returns what :mod:`perf_pipeline.lib.health.report` says the result reads as (numeric
fields with stable keys for the UI's plots, tables and markdown for people) and, where there is a
threshold, asset check results from its verdicts beside it.
"""

import time

import dagster as dg

from perf_pipeline.defs.metadata import as_metadata, check_result
from perf_pipeline.defs.resources import PostgresResource, SettingsResource
from perf_pipeline.lib import health
from perf_pipeline.lib.health import report

GROUP = "maintenance"


class MaintenanceConfig(dg.Config):
    recent_months: int = 2
    """Months of audit_log/usage_log partitions vacuumed (this month included), plus DEFAULT."""
    bloat_threshold: float = 0.5
    """Estimated bloat ratio (0–1) from which an index is rebuilt with REINDEX INDEX CONCURRENTLY."""
    min_index_mb: float = 8.0
    """Smaller indexes are never rebuilt (their bloat costs nothing worth a rebuild)."""
    statement_timeout_s: int = 1800
    lock_timeout_ms: int = 5000
    vacuum_cost_delay_ms: float = 2.0
    """Throttle of the manual VACUUM (autovacuum's default): protects the platform's query latency."""


@dg.asset(
    group_name=GROUP,
    kinds={"postgres"},
    pool="postgres_heavy",
    deps=["audit_log", "usage_log", "session", "data_export", "usage_daily_metrics"],
    description="Nightly VACUUM (ANALYZE) of the hot tables and recent partitions (autocommit, per-table "
    "duration), then REINDEX INDEX CONCURRENTLY of their indexes past the estimated bloat "
    "threshold. statement_timeout and lock_timeout bound every statement.",
)
def db_maintenance(
    context: dg.AssetExecutionContext, config: MaintenanceConfig, postgres: PostgresResource
) -> dg.MaterializeResult:
    result = health.run_maintenance(
        postgres.url,
        recent_months=config.recent_months,
        bloat_threshold=config.bloat_threshold,
        min_index_bytes=int(config.min_index_mb * 1024 * 1024),
        statement_timeout_ms=config.statement_timeout_s * 1000,
        lock_timeout_ms=config.lock_timeout_ms,
        vacuum_cost_delay_ms=config.vacuum_cost_delay_ms,
    )
    for line in report.maintenance_log_lines(result):
        context.log.info(line)
    metadata = as_metadata(report.maintenance_fields(result, bloat_threshold=config.bloat_threshold))
    if result.failures:
        # a timeout on one relation must not hide the rest: all ran, now the run reports the failure
        raise dg.Failure(description=f"{result.failures} maintenance statement(s) failed", metadata=metadata)
    return dg.MaterializeResult(metadata=metadata)


@dg.asset(
    group_name=GROUP,
    kinds={"postgres"},
    deps=["audit_log", "usage_log", "session", "data_export"],
    description="Health report: table and index sizes (partitions grouped under their parent), dead-tuple "
    "ratios, index usage with unused indexes flagged, slowest statements (pg_stat_statements), "
    "connections and rollback ratio.",
    check_specs=[
        dg.AssetCheckSpec(
            "rollback_ratio_below_10_pct",
            asset="db_health_report",
            description="Fewer than 10 % of the database's transactions rolled back since the statistics "
            "were reset (more usually means an application retry loop).",
        )
    ],
)
def db_health_report(context: dg.AssetExecutionContext, postgres: PostgresResource) -> dg.MaterializeResult:
    started = time.perf_counter()
    with postgres.connection(autocommit=True) as conn:
        result = health.health_report(conn)
    if result.slow.status != "ok":
        context.log.warning(result.slow.message)
    fields = report.health_report_fields(result, duration_ms=(time.perf_counter() - started) * 1000)
    return dg.MaterializeResult(
        metadata=as_metadata(fields),
        check_results=[
            check_result(
                "rollback_ratio_below_10_pct",
                report.rollback_verdict(result),
                severity=dg.AssetCheckSeverity.WARN,
            )
        ],
    )


class BudgetConfig(dg.Config):
    runs: int = 5
    """Timed EXPLAIN ANALYZE executions per query (after one warm-up)."""
    audit_budget_ms: float | None = None
    """p95 budget of the audit lookups; default PERF_PIPELINE_AUDIT_BUDGET_MS."""
    analytics_budget_ms: float | None = None
    """p95 budget of KPIs, trends and usage by user; default PERF_PIPELINE_ANALYTICS_BUDGET_MS."""


_GROUP_CHECKS = {health.AUDIT: "audit_lookups_within_budget", health.ANALYTICS: "analytics_within_budget"}


@dg.asset(
    group_name=GROUP,
    kinds={"postgres"},
    deps=["audit_log", "usage_log", "session", "usage_daily_metrics", "usage_kpi_buckets"],
    description="The audit lookups and dashboard queries run on the live data with EXPLAIN (ANALYZE, "
    "BUFFERS) several times: p50/p95 and the indexes used per query; checks against the "
    "latency budgets (a missing index scan where one is needed also fails, plan attached).",
    check_specs=[
        dg.AssetCheckSpec(
            "audit_lookups_within_budget",
            asset="query_latency_budgets",
            description="Audit lookups: p95 ≤ PERF_PIPELINE_AUDIT_BUDGET_MS (50 ms) and an index scan.",
        ),
        dg.AssetCheckSpec(
            "analytics_within_budget",
            asset="query_latency_budgets",
            description="KPIs, trends, usage by user: p95 ≤ PERF_PIPELINE_ANALYTICS_BUDGET_MS (200 ms).",
        ),
    ],
)
def query_latency_budgets(
    context: dg.AssetExecutionContext,
    config: BudgetConfig,
    postgres: PostgresResource,
    settings: SettingsResource,
) -> dg.MaterializeResult:
    configured = settings.get()  # a run-config value overrides the deployment's setting for one run
    budgets = {
        health.AUDIT: config.audit_budget_ms or configured.audit_budget_ms,
        health.ANALYTICS: config.analytics_budget_ms or configured.analytics_budget_ms,
    }
    with postgres.connection(autocommit=True) as conn:
        results = health.run_probes(conn, runs=config.runs)
    for r in results:
        if r.skipped:
            context.log.info("%s %s", r.name, r.skipped)
    # plot keys sort latency first (p50 then p95 per query), then the plans' buffers and index use
    return dg.MaterializeResult(
        metadata=as_metadata(report.probe_fields(results)),
        check_results=[
            check_result(name, report.budget_verdict(group, budgets[group], results))
            for group, name in _GROUP_CHECKS.items()
        ],
    )


class ResourceConfig(dg.Config):
    memory_max_pct: float = 70.0
    """Memory in use stays below this share of the machine (70 %)."""
    cpu_max_pct: float = 60.0
    """CPU stays below this on average since the previous materialization (60 %)."""
    connection_max_ratio: float = 0.8
    """Client connections / max_connections."""
    active_connections_max: int = 50
    """Active (running a statement) client connections."""
    first_sample_s: float = 1.0
    """Without a previous sample (a first run, a reboot), the CPU is measured over this many seconds."""


@dg.asset(
    group_name=GROUP,
    kinds={"python"},
    deps=["platform_schema"],  # the database server it counts connections of
    description="CPU (the average since the previous materialization, from cumulative CPU times; over one "
    "second on a first run), memory, disk and database connections, checked against their thresholds.",
    check_specs=[
        dg.AssetCheckSpec(
            "memory_below_threshold",
            asset="system_resources",
            description="Memory in use is below 70 % of the machine (run config memory_max_pct).",
        ),
        dg.AssetCheckSpec(
            "cpu_below_threshold",
            asset="system_resources",
            description="CPU averaged since the previous sample (or over a second on a first run) is below "
            "60 % (run config cpu_max_pct).",
        ),
        dg.AssetCheckSpec(
            "connections_within_limit",
            asset="system_resources",
            description="Client connections below 80 % of max_connections and at most 50 active at once.",
        ),
    ],
)
def system_resources(
    context: dg.AssetExecutionContext,
    config: ResourceConfig,
    postgres: PostgresResource,
    settings: SettingsResource,
) -> dg.MaterializeResult:
    previous = None
    last = context.instance.get_latest_materialization_event(context.asset_key)
    if last is not None and last.asset_materialization is not None:
        md = last.asset_materialization.metadata
        if {"cpu_busy_s", "cpu_total_s", "boot_time"} <= md.keys():
            previous = health.CpuSample(
                float(md["cpu_busy_s"].value), float(md["cpu_total_s"].value), float(md["boot_time"].value)
            )
    state_dir = settings.get().state_dir
    with postgres.connection(autocommit=True) as conn:
        # psutil measures the machine this run executes on (with the embedded setup, the database's too)
        snap = health.system_resources(
            conn,
            previous=previous,
            disk_path=str(state_dir) if state_dir.exists() else "/",
            min_window_s=config.first_sample_s,
        )
    checks = [
        check_result("memory_below_threshold", report.memory_verdict(snap, config.memory_max_pct)),
        check_result("cpu_below_threshold", report.cpu_verdict(snap, config.cpu_max_pct)),
        check_result(
            "connections_within_limit",
            report.connections_verdict(snap, config.connection_max_ratio, config.active_connections_max),
        ),
    ]
    return dg.MaterializeResult(metadata=as_metadata(report.resources_fields(snap)), check_results=checks)
