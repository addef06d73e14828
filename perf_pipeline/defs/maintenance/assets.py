"""Database maintenance and health assets: VACUUM/REINDEX, the health report, latency budgets, resources.

Thin Dagster layer over :mod:`perf_pipeline.lib.health`: each body reads its config, calls one lib
function and returns metadata (numeric with stable keys for the UI's plots, markdown for people) and,
where there is a threshold, asset check results beside it.
"""

import time

import dagster as dg

from perf_pipeline.defs.metadata import rounded, size, table
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
    metadata: dict[str, object] = {
        "duration_ms": rounded(result.duration_ms, 1),
        "relations_vacuumed": sum(v.ok for v in result.vacuumed),
        "vacuum_ms": rounded(sum(v.duration_ms for v in result.vacuumed), 1),
        "indexes_reindexed": sum(r.ok for r in result.reindexed),
        "reindex_bytes_freed": sum(
            r.bytes_before - (r.bytes_after or r.bytes_before) for r in result.reindexed
        ),
        "failures": result.failures,
        "vacuum": table(
            {
                "relation": v.relation,
                "duration_ms": v.duration_ms,
                "result": "ok" if v.ok else f"failed: {v.error}",
            }
            for v in result.vacuumed
        ),
        "reindex": table(
            {
                "index": r.index,
                "table": r.table,
                "estimated_bloat": f"{r.bloat_ratio:.0%}",
                "before": size(r.bytes_before),
                "after": size(r.bytes_after) if r.bytes_after is not None else "",
                "duration_ms": r.duration_ms,
                "result": "ok" if r.ok else f"failed: {r.error}",
            }
            for r in result.reindexed
        )
        if result.reindexed
        else f"no index past {config.bloat_threshold:.0%} estimated bloat ({result.bloat_checked} checked)",
    }
    for v in result.vacuumed:
        metadata[f"vacuum_ms.{v.relation}"] = rounded(v.duration_ms, 1)
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
        report = health.health_report(conn)
    if report.slow.status != "ok":
        context.log.warning(report.slow.message)
    db = report.database
    numbers = health.report_metrics(report)
    ratio = float(db.get("rollback_ratio", 0.0))
    metadata: dict[str, object] = {
        # a person reads this first; the tables below have the detail, the numbers feed the plots
        "summary": dg.MetadataValue.md(health.report_summary(report)),
        "dagster/size_bytes": dg.MetadataValue.int(int(db.get("database_bytes", 0))),
        "database_size": size(db.get("database_bytes", 0)),
        "connections": int(db.get("connections", 0)),
        "active_connections": int(db.get("active", 0)),
        "rollback_ratio": rounded(ratio, 4),
        "cache_hit_ratio": rounded(float(db.get("cache_hit_ratio", 1.0)), 4),
        "unused_indexes": len(report.unused_indexes),
        "slowest_mean_ms": rounded(numbers.get("slowest_mean_ms"), 2),
        "pg_stat_statements": report.slow.status,
        "tables": table(
            {
                "table": t["table_name"],
                "partitions": t["partitions"] if t["partitioned"] else "",
                "table_size": size(t["table_bytes"]),
                "index_size": size(t["index_bytes"]),
                "total_size": size(t["total_bytes"]),
                "rows_estimate": int(t["est_rows"]),
                "dead_tuples": int(t["dead_tuples"]),
                "dead_ratio": f"{t['dead_ratio']:.1%}",
            }
            for t in report.tables
        ),
        "dead_tuples": table(
            {
                "table": d["table_name"],
                "parent": d["parent"] or "",
                "live": int(d["live_tuples"]),
                "dead": int(d["dead_tuples"]),
                "dead_ratio": f"{d['dead_ratio']:.1%}",
                "last_vacuum": str(d["last_vacuum"] or ""),
                "last_analyze": str(d["last_analyze"] or ""),
            }
            for d in report.dead_tuples
        ),
        "indexes": table(
            {
                "index": i["index_name"],
                "table": i["table_name"],
                "partitions": int(i["leaf_indexes"]),
                "scans": int(i["scans"]),
                "size": size(i["bytes"]),
                "enforces_constraint": bool(i["enforces_constraint"]),
                "unused": bool(i["unused"]),
            }
            for i in report.indexes
        ),
        "slow_statements": table(
            {
                "calls": int(q["calls"]),
                "mean_ms": float(q["mean_ms"]),
                "max_ms": float(q["max_ms"]),
                "total_ms": float(q["total_ms"]),
                "rows": int(q["rows"]),
                "query": str(q["query"])[:300],
            }
            for q in report.slow.rows
        )
        if report.slow.rows
        else report.slow.message,
        "duration_ms": rounded((time.perf_counter() - started) * 1000, 1),
    }
    # the plotted series, grouped by prefix (the UI sorts keys): audit writers, then per-table bytes and
    # dead-tuple ratios
    for key, value in sorted(numbers.items()):
        if key.startswith("audit_"):
            metadata[f"writers.{key}"] = rounded(value, 2)
        elif key.startswith("bytes."):
            metadata[f"table_bytes.{key[len('bytes.') :]}"] = int(value)
        elif key.startswith("dead_ratio."):
            metadata[key] = rounded(value, 4)
    return dg.MaterializeResult(
        metadata=metadata,
        check_results=[
            dg.AssetCheckResult(
                check_name="rollback_ratio_below_10_pct",
                passed=ratio < 0.10,
                severity=dg.AssetCheckSeverity.WARN,
                description=f"{ratio:.2%} of transactions rolled back since the statistics reset (threshold 10 %)",
                metadata={"rollback_ratio": rounded(ratio, 4), "threshold": 0.10},
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


def _verdict(r: health.ProbeResult, budget_ms: float) -> str:
    if r.skipped:
        return r.skipped
    if r.within(budget_ms):
        return "ok"
    return "over budget" if r.p95_ms > budget_ms else f"no index scan ({r.blocks} buffers)"


def _budget_check(group: str, budget_ms: float, results: list[health.ProbeResult]) -> dg.AssetCheckResult:
    mine = [r for r in results if r.group == group]
    failing = [r for r in mine if not r.within(budget_ms)]
    measured = [r for r in mine if not r.skipped]
    worst = max((r.p95_ms for r in measured), default=0.0)
    metadata: dict[str, object] = {
        "p95_ms": rounded(worst, 2),
        "budget_ms": budget_ms,
        "queries": len(measured),
        "failing": len(failing),
        "results": table(
            {
                "query": r.name,
                "p50_ms": r.p50_ms if not r.skipped else 0.0,
                "p95_ms": r.p95_ms if not r.skipped else 0.0,
                "buffers": r.blocks,
                "index_used": r.index_used,
                "indexes": ", ".join(r.indexes),
                "result": _verdict(r, budget_ms),
            }
            for r in mine
        ),
    }
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
        description=(
            f"worst p95 {worst:.2f} ms of {len(measured)} queries, budget {budget_ms:g} ms"
            if not failing
            else "over budget or without an index scan: " + ", ".join(r.name for r in failing)
        ),
    )


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
    context: dg.AssetExecutionContext, config: BudgetConfig, postgres: PostgresResource
) -> dg.MaterializeResult:
    settings = get_settings()
    budgets = {
        health.AUDIT: config.audit_budget_ms or settings.audit_budget_ms,
        health.ANALYTICS: config.analytics_budget_ms or settings.analytics_budget_ms,
    }
    with postgres.connection(autocommit=True) as conn:
        results = health.run_probes(conn, runs=config.runs)
    measured = [r for r in results if not r.skipped]
    # plot keys sort latency first (p50 then p95 per query), then the plans' buffers and index use
    metadata: dict[str, object] = {"p95_ms": rounded(max((r.p95_ms for r in measured), default=0.0), 2)}
    for r in results:
        if r.skipped:
            context.log.info("%s %s", r.name, r.skipped)
            metadata[f"skipped.{r.name}"] = r.skipped
            continue
        metadata[f"latency_p50_ms.{r.name}"] = rounded(r.p50_ms, 3)
        metadata[f"latency_p95_ms.{r.name}"] = rounded(r.p95_ms, 3)
        metadata[f"plan_buffers.{r.name}"] = r.blocks
        metadata[f"plan_index_used.{r.name}"] = r.index_used
    return dg.MaterializeResult(
        metadata=metadata,
        check_results=[_budget_check(group, budgets[group], results) for group in _GROUP_CHECKS],
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
            conn,
            previous=previous,
            disk_path=str(state_dir) if state_dir.exists() else "/",
            min_window_s=config.first_sample_s,
        )
    cpu = snap.cpu_percent if snap.cpu_percent is not None else 0.0
    since = "the previous sample" if snap.since_previous else "this run"
    metadata: dict[str, object] = {
        "cpu_percent": rounded(cpu, 1),
        "cpu_window_s": rounded(snap.cpu_window_s, 1),
        "cpu_measured_since": since,
        "memory_percent": rounded(snap.memory_percent, 1),
        "memory_available": size(snap.memory_available_bytes),
        "disk_percent": rounded(snap.disk_percent, 1),
        "disk_free": size(snap.disk_free_bytes),
        "load_1m_per_core": rounded(snap.load_1m_per_core, 2),
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
            description=f"memory {snap.memory_percent:.1f} % in use (threshold {config.memory_max_pct:g} %)",
            metadata={"memory_percent": rounded(snap.memory_percent, 1), "threshold": config.memory_max_pct},
        ),
        dg.AssetCheckResult(
            check_name="cpu_below_threshold",
            passed=cpu < config.cpu_max_pct,
            description=f"CPU {cpu:.1f} % on average over {snap.cpu_window_s:.1f} s since {since} "
            f"(threshold {config.cpu_max_pct:g} %)",
            metadata={
                "cpu_percent": rounded(cpu, 1),
                "threshold": config.cpu_max_pct,
                "window_s": rounded(snap.cpu_window_s, 1),
            },
        ),
        dg.AssetCheckResult(
            check_name="connections_within_limit",
            passed=snap.connection_ratio < config.connection_max_ratio
            and snap.active_connections <= config.active_connections_max,
            description=f"{snap.connections} of {snap.max_connections} connections, {snap.active_connections} active",
            metadata={
                "connections": snap.connections,
                "max_connections": snap.max_connections,
                "ratio": rounded(snap.connection_ratio, 3),
                "ratio_threshold": config.connection_max_ratio,
                "active_connections": snap.active_connections,
                "active_threshold": config.active_connections_max,
            },
        ),
    ]
    return dg.MaterializeResult(metadata=metadata, check_results=checks)
