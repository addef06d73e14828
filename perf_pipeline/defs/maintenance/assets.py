"""Database maintenance and health assets: VACUUM/REINDEX, the health report, latency budgets, resources.

Thin Dagster layer over :mod:`perf_pipeline.lib.health`: each body reads its config, calls one lib
function and returns metadata (numeric with stable keys for the UI's plots, markdown for people) and,
where there is a threshold, asset check results beside it.
"""

import time

import dagster as dg

from perf_pipeline.defs.resources import PostgresResource
from perf_pipeline.lib import health
from perf_pipeline.settings import get_settings

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
    for v in result.vacuumed:
        context.log.info(
            "VACUUM (ANALYZE) %s: %.0f ms%s", v.relation, v.duration_ms, "" if v.ok else f" FAILED {v.error}"
        )
    for r in result.reindexed:
        context.log.info(
            "REINDEX INDEX CONCURRENTLY %s (bloat %.0f%%): %s",
            r.index,
            r.bloat_ratio * 100,
            "ok" if r.ok else f"FAILED {r.error}",
        )
    vacuum_md = health.markdown_table(
        ["relation", "duration ms", "result"],
        [(v.relation, v.duration_ms, "ok" if v.ok else f"failed: {v.error}") for v in result.vacuumed],
    )
    reindex_md = (
        health.markdown_table(
            ["index", "table", "est. bloat", "before", "after", "duration ms", "result"],
            [
                (
                    r.index,
                    r.table,
                    f"{r.bloat_ratio:.0%}",
                    health.human_bytes(r.bytes_before),
                    health.human_bytes(r.bytes_after) if r.bytes_after is not None else "",
                    r.duration_ms,
                    "ok" if r.ok else f"failed: {r.error}",
                )
                for r in result.reindexed
            ],
        )
        if result.reindexed
        else f"_no index past {config.bloat_threshold:.0%} estimated bloat ({result.bloat_checked} checked)_"
    )
    metadata: dict[str, object] = {
        "duration_ms": result.duration_ms,
        "relations_vacuumed": sum(v.ok for v in result.vacuumed),
        "vacuum_ms": sum(v.duration_ms for v in result.vacuumed),
        "indexes_reindexed": sum(r.ok for r in result.reindexed),
        "reindex_bytes_freed": sum(
            r.bytes_before - (r.bytes_after or r.bytes_before) for r in result.reindexed
        ),
        "failures": result.failures,
        "vacuum": dg.MetadataValue.md(vacuum_md),
        "reindex": dg.MetadataValue.md(reindex_md),
    }
    for v in result.vacuumed:
        metadata[f"vacuum_ms.{v.relation}"] = v.duration_ms
    if result.failures:
        # a timeout on one relation must not hide the rest: all ran, now the run reports the failure
        raise dg.Failure(description=f"{result.failures} maintenance statement(s) failed", metadata=metadata)
    return dg.MaterializeResult(metadata=metadata)


@dg.asset(
    group_name=GROUP,
    kinds={"postgres"},
    description="Health report: table and index sizes (partitions grouped under their parent), dead-tuple "
    "ratios, index usage with unused indexes flagged, slowest statements (pg_stat_statements), "
    "connections and rollback ratio.",
    check_specs=[
        dg.AssetCheckSpec(
            "rollback_ratio_below_10_pct",
            asset="db_health_report",
            description="The seed alerts when more than 10 % of transactions roll back.",
        )
    ],
)
def db_health_report(context: dg.AssetExecutionContext, postgres: PostgresResource) -> dg.MaterializeResult:
    started = time.perf_counter()
    with postgres.connection(autocommit=True) as conn:
        report = health.health_report(conn)
    if report.slow.status != "ok":
        context.log.warning(report.slow.message)
    metadata: dict[str, object] = dict(health.report_metrics(report))
    metadata.update(
        {
            "duration_ms": (time.perf_counter() - started) * 1000,
            "pg_stat_statements": report.slow.status,
            "report": dg.MetadataValue.md(health.report_markdown(report)),
            "unused_index_names": dg.MetadataValue.md(
                "\n".join(f"- `{i['index_name']}` on `{i['table_name']}`" for i in report.unused_indexes)
                or "_none_"
            ),
        }
    )
    ratio = float(report.database.get("rollback_ratio", 0.0))
    return dg.MaterializeResult(
        metadata=metadata,
        check_results=[
            dg.AssetCheckResult(
                check_name="rollback_ratio_below_10_pct",
                passed=ratio < 0.10,
                severity=dg.AssetCheckSeverity.WARN,
                metadata={"rollback_ratio": ratio, "threshold": 0.10},
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


def _budget_check(group: str, budget_ms: float, results: list[health.ProbeResult]) -> dg.AssetCheckResult:
    mine = [r for r in results if r.group == group]
    failing = [r for r in mine if not r.within(budget_ms)]
    measured = [r for r in mine if not r.skipped]
    metadata: dict[str, object] = {
        "budget_ms": budget_ms,
        "p95_ms": max((r.p95_ms for r in measured), default=0.0),
        "queries": len(measured),
        "failing": len(failing),
        "results": dg.MetadataValue.md(
            health.markdown_table(
                ["query", "p50 ms", "p95 ms", "blocks", "index used", "indexes", "result"],
                [
                    (
                        r.name,
                        r.p50_ms,
                        r.p95_ms,
                        r.blocks,
                        "yes" if r.index_used else "no",
                        ", ".join(r.indexes),
                        r.skipped
                        or (
                            "ok"
                            if r.within(budget_ms)
                            else "over budget"
                            if r.p95_ms > budget_ms
                            else f"no index scan ({r.blocks} blocks)"
                        ),
                    )
                    for r in mine
                ],
            )
        ),
    }
    for r in measured:
        metadata[f"p95_ms.{r.name}"] = r.p95_ms
    if failing:
        metadata["plan"] = dg.MetadataValue.md(
            "\n\n".join(
                f"**{r.name}** (p95 {r.p95_ms:.2f} ms, budget {budget_ms:g} ms, indexes: "
                f"{', '.join(r.indexes) or 'none'})\n\n```\n{r.plan_text}\n```"
                for r in failing
            )
        )
    return dg.AssetCheckResult(
        check_name=_GROUP_CHECKS[group],
        passed=not failing,
        metadata=metadata,
        description=", ".join(r.name for r in failing) or None,
    )


@dg.asset(
    group_name=GROUP,
    kinds={"postgres"},
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
    context: dg.AssetExecutionContext, config: BudgetConfig, postgres: PostgresResource
) -> dg.MaterializeResult:
    settings = get_settings()
    budgets = {
        health.AUDIT: config.audit_budget_ms or settings.audit_budget_ms,
        health.ANALYTICS: config.analytics_budget_ms or settings.analytics_budget_ms,
    }
    with postgres.connection(autocommit=True) as conn:
        results = health.run_probes(conn, runs=config.runs)
    metadata: dict[str, object] = {}
    for r in results:
        if r.skipped:
            context.log.info("%s %s", r.name, r.skipped)
            metadata[f"{r.name}"] = r.skipped
            continue
        metadata[f"p50_ms.{r.name}"] = r.p50_ms
        metadata[f"p95_ms.{r.name}"] = r.p95_ms
        metadata[f"index_used.{r.name}"] = r.index_used
        metadata[f"blocks.{r.name}"] = r.blocks
    measured = [r for r in results if not r.skipped]
    metadata["p95_ms"] = max((r.p95_ms for r in measured), default=0.0)
    return dg.MaterializeResult(
        metadata=metadata,
        check_results=[_budget_check(group, budgets[group], results) for group in _GROUP_CHECKS],
    )


class ResourceConfig(dg.Config):
    memory_max_pct: float = 70.0
    """The seed's target: memory < 70 % of the machine."""
    cpu_max_pct: float = 60.0
    """The seed's target: CPU < 60 % on average (since the previous materialization)."""
    connection_max_ratio: float = 0.8
    """Client connections / max_connections."""
    active_connections_max: int = 50
    """The seed alerts above 50 active connections."""


@dg.asset(
    group_name=GROUP,
    kinds={"python"},
    description="CPU (average since the previous materialization, sampled without sleeping), memory, disk "
    "and database connections, checked against the seed's thresholds.",
    check_specs=[
        dg.AssetCheckSpec("memory_below_threshold", asset="system_resources"),
        dg.AssetCheckSpec("cpu_below_threshold", asset="system_resources"),
        dg.AssetCheckSpec("connections_within_limit", asset="system_resources"),
    ],
)
def system_resources(
    context: dg.AssetExecutionContext, config: ResourceConfig, postgres: PostgresResource
) -> dg.MaterializeResult:
    previous = None
    last = context.instance.get_latest_materialization_event(context.asset_key)
    if last is not None and last.asset_materialization is not None:
        md = last.asset_materialization.metadata
        if {"cpu_busy_s", "cpu_total_s", "boot_time"} <= md.keys():
            previous = health.CpuSample(
                float(md["cpu_busy_s"].value), float(md["cpu_total_s"].value), float(md["boot_time"].value)
            )
    state_dir = get_settings().state_dir
    with postgres.connection(autocommit=True) as conn:
        # psutil measures the machine this run executes on (with the embedded setup, the database's too)
        snap = health.system_resources(
            conn, previous=previous, disk_path=str(state_dir) if state_dir.exists() else "/"
        )
    if snap.cpu_percent is not None and snap.cpu_window_s >= 1:
        cpu, cpu_source = snap.cpu_percent, "cpu_times delta"
    else:
        # without a comparable sample (first run, reboot) the 1-minute load average stands in for the CPU
        cpu, cpu_source = min(100.0, snap.load_1m_per_core * 100), "load average (1 min)"
    metadata: dict[str, object] = {
        "cpu_percent": cpu,
        "cpu_window_s": snap.cpu_window_s,
        "cpu_source": cpu_source,
        "memory_percent": snap.memory_percent,
        "memory_available_bytes": snap.memory_available_bytes,
        "disk_percent": snap.disk_percent,
        "disk_free_bytes": snap.disk_free_bytes,
        "load_1m_per_core": snap.load_1m_per_core,
        "connections": snap.connections,
        "active_connections": snap.active_connections,
        "max_connections": snap.max_connections,
        # the next materialization averages the CPU over the interval from this sample
        "cpu_busy_s": snap.cpu.busy_s,
        "cpu_total_s": snap.cpu.total_s,
        "boot_time": snap.cpu.boot_time,
    }
    checks = [
        dg.AssetCheckResult(
            check_name="memory_below_threshold",
            passed=snap.memory_percent < config.memory_max_pct,
            metadata={"memory_percent": snap.memory_percent, "threshold": config.memory_max_pct},
        ),
        dg.AssetCheckResult(
            check_name="cpu_below_threshold",
            passed=cpu < config.cpu_max_pct,
            metadata={
                "cpu_percent": cpu,
                "threshold": config.cpu_max_pct,
                "window_s": snap.cpu_window_s,
                "source": cpu_source,
            },
        ),
        dg.AssetCheckResult(
            check_name="connections_within_limit",
            passed=snap.connection_ratio < config.connection_max_ratio
            and snap.active_connections <= config.active_connections_max,
            metadata={
                "connections": snap.connections,
                "max_connections": snap.max_connections,
                "ratio": snap.connection_ratio,
                "ratio_threshold": config.connection_max_ratio,
                "active_connections": snap.active_connections,
                "active_threshold": config.active_connections_max,
            },
        ),
    ]
    return dg.MaterializeResult(metadata=metadata, check_results=checks)
