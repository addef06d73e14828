"""Database health: maintenance (VACUUM/ANALYZE, REINDEX), the health report, latency probes, resources.

Plain Python over psycopg 3 (no Dagster): the assets in ``perf_pipeline/defs/maintenance`` call it, so do
the command line, the tests and the benchmark. One module per concern, every public name re-exported here:

* :mod:`.maintenance` — nightly ``VACUUM (ANALYZE)`` of the hot tables and recent partitions on its own
  autocommit connection, ``REINDEX INDEX CONCURRENTLY`` of bloated indexes;
* :mod:`.report` — the health report (sizes, dead tuples, index usage, pg_stat_statements, connections,
  audit writers) and how every health result reads: markdown for people, stably keyed numbers for plots;
* :mod:`.probes` — the latency probes behind the budgets (``EXPLAIN (ANALYZE, BUFFERS)`` on live data);
* :mod:`.resources` — CPU sampled without sleeping (``psutil.cpu_times`` deltas), memory, disk,
  connections.
"""

from perf_pipeline.lib.health.maintenance import (
    HOT_TABLES,
    MaintenanceResult,
    ReindexResult,
    VacuumResult,
    index_bloat,
    maintenance_targets,
    reindex_bloated,
    run_maintenance,
    vacuum_analyze,
)
from perf_pipeline.lib.health.probes import (
    ANALYTICS,
    AUDIT,
    NO_INDEX_BLOCKS_ALLOWED,
    PROBES,
    Probe,
    ProbeResult,
    probe_params,
    run_probe,
    run_probes,
)
from perf_pipeline.lib.health.report import (
    AUDIT_WRITER_STALE,
    HealthReport,
    SlowStatements,
    audit_writers,
    health_report,
    human_bytes,
    markdown_table,
    report_markdown,
    report_metrics,
    report_summary,
    slow_statements,
)
from perf_pipeline.lib.health.resources import (
    CpuSample,
    ResourceSnapshot,
    cpu_percent_between,
    cpu_sample,
    system_resources,
)

__all__ = [
    "ANALYTICS",
    "AUDIT",
    "AUDIT_WRITER_STALE",
    "HOT_TABLES",
    "NO_INDEX_BLOCKS_ALLOWED",
    "PROBES",
    "CpuSample",
    "HealthReport",
    "MaintenanceResult",
    "Probe",
    "ProbeResult",
    "ReindexResult",
    "ResourceSnapshot",
    "SlowStatements",
    "VacuumResult",
    "audit_writers",
    "cpu_percent_between",
    "cpu_sample",
    "health_report",
    "human_bytes",
    "index_bloat",
    "maintenance_targets",
    "markdown_table",
    "probe_params",
    "reindex_bloated",
    "report_markdown",
    "report_metrics",
    "report_summary",
    "run_maintenance",
    "run_probe",
    "run_probes",
    "slow_statements",
    "system_resources",
    "vacuum_analyze",
]
