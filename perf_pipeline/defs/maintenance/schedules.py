"""When the maintenance and health assets run, and why at that cadence."""

import dagster as dg

from perf_pipeline.defs.maintenance.assets import (
    db_health_report,
    db_maintenance,
    query_latency_budgets,
    system_resources,
)
from perf_pipeline.defs.scheduling import utc_schedule

db_maintenance_job = dg.define_asset_job(
    "db_maintenance_job",
    selection=[db_maintenance],
    description="VACUUM (ANALYZE) of hot tables and recent partitions, REINDEX CONCURRENTLY of bloated indexes.",
)

db_health_job = dg.define_asset_job(
    "db_health_job",
    selection=[db_health_report, query_latency_budgets],
    description="Health report and query latency budgets.",
)

system_resources_job = dg.define_asset_job(
    "system_resources_job", selection=[system_resources], description="CPU, memory, disk and connections."
)

vacuum_and_reindex = utc_schedule(
    "vacuum_and_reindex",
    db_maintenance_job,
    "0 3 * * *",
    "Daily at 03:00 UTC, the platform's quietest hour: VACUUM (ANALYZE) of the hot tables and recent partitions, REINDEX CONCURRENTLY of bloated indexes.",
)

check_db_health = utc_schedule(
    "check_db_health",
    db_health_job,
    "10 * * * *",
    "Hourly at :10: sizes and ratios plot hour by hour, and a latency regression (a dropped "
    "index, a bad plan) fails a check within the hour. Off the hour, away from the rollups.",
)

sample_system_resources = utc_schedule(
    "sample_system_resources",
    system_resources_job,
    "*/5 * * * *",
    "Every 5 minutes: the CPU check averages over the interval since the previous sample.",
)
