"""When the maintenance and health assets run, and why at that cadence."""

import dagster as dg

from perf_pipeline.defs.maintenance.assets import (
    db_health_report,
    db_maintenance,
    query_latency_budgets,
    system_resources,
)

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

nightly_db_maintenance = dg.ScheduleDefinition(
    name="nightly_db_maintenance",
    job=db_maintenance_job,
    cron_schedule="0 3 * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Daily at 03:00 UTC, the platform's quietest hour: VACUUM (ANALYZE) of the hot tables and recent partitions, REINDEX CONCURRENTLY of bloated indexes.",
)

db_health_hourly = dg.ScheduleDefinition(
    name="db_health_hourly",
    job=db_health_job,
    cron_schedule="10 * * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Hourly at :10: sizes and ratios plot hour by hour, and a latency regression (a dropped "
    "index, a bad plan) fails a check within the hour. Off the hour, away from the rollups.",
)

system_resources_every_5_min = dg.ScheduleDefinition(
    name="system_resources_every_5_min",
    job=system_resources_job,
    cron_schedule="*/5 * * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Every 5 minutes: the CPU check averages over the interval since the previous sample.",
)
