"""The platform's tables as external assets (group ``platform``): the platform writes them, this code
location creates their partitions, archives them and reads them. Nothing here materializes them; the
sensor ``observe_platform_tables`` reports what PostgreSQL holds (defs/platform/sensors.py)."""

import dagster as dg

from perf_pipeline.defs.time_partitions import AUDIT_LOG_MONTHS, USAGE_LOG_DAYS

AUDIT_LOG = dg.AssetSpec(
    "audit_log",
    group_name="platform",
    kinds={"postgres"},
    partitions_def=AUDIT_LOG_MONTHS,
    # the same months as the asset that creates them
    deps=[dg.AssetDep("audit_log_partitions", partition_mapping=dg.IdentityPartitionMapping())],
    description="The platform's audit trail, written by AuditWriter: one PostgreSQL partition per month "
    "(audit_log_yYYYYmMM). A month shows as materialized while its partition exists; each report carries "
    "the month's row estimate, size and newest row, and a data version that changes when its rows change.",
)
USAGE_LOG = dg.AssetSpec(
    "usage_log",
    group_name="platform",
    kinds={"postgres"},
    partitions_def=USAGE_LOG_DAYS,
    # a day lives in its month's partition (usage_log_yYYYYmMM); Dagster has no day → month mapping between
    # dynamic partitions, so the edge is drawn from every month
    deps=[dg.AssetDep("usage_log_partitions", partition_mapping=dg.AllPartitionMapping())],
    description="One row per transcription billed or not, written by the platform; one Dagster partition per "
    "UTC day (stored in monthly PostgreSQL partitions). A past day is reported again, with a new data "
    "version, when rows for it are written, changed or deleted after it ended (the late-data triggers): "
    "that is what re-runs exactly that day of usage_daily_metrics.",
)
SESSION = dg.AssetSpec(
    "session",
    group_name="platform",
    kinds={"postgres"},
    deps=["platform_schema"],
    description="Transcription sessions (status created/processing/completed/failed), written by the "
    "platform: the live KPIs read the processing and failed ones.",
)
DATA_EXPORT = dg.AssetSpec(
    "data_export",
    group_name="platform",
    kinds={"postgres"},
    deps=["platform_schema"],
    description="Export requests filed by the platform (or perf-pipeline export request); "
    "pending_exports_sensor turns each into an export_job run.",
)
