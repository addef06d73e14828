"""The partitions every partitioned asset shares, so that each partition bar is what PostgreSQL holds.

* :data:`AUDIT_LOG_MONTHS` / :data:`USAGE_LOG_MONTHS`: the months attached to audit_log / usage_log
  (``pg_inherits``) plus this month and the ``PERF_PIPELINE_PREMAKE_MONTHS`` after it (the months created
  ahead). They are *dynamic* partitions kept by the ``observe_platform_tables`` sensor: a month archived
  and dropped leaves the bar, a month restored comes back (Dagster OSS cannot unmark a time-window
  partition: ``wipe_asset_partitions`` is not supported by its SQL event log storage).
* :data:`USAGE_LOG_DAYS`: the UTC days of those usage months, up to today (dynamic, same keeper).
* :data:`DAYS`: the UTC days of the rollup, from the first month of data (``PERF_PIPELINE_DATA_START``, or
  the oldest month the database holds, read once when the code location loads) to today: the rollup keeps
  the history of archived months too.
* :data:`AUDIT_ARCHIVE_MONTHS` / :data:`USAGE_RETENTION_MONTHS`: from the first month of data to the newest
  month past its retention (``PERF_PIPELINE_AUDIT_RETENTION_MONTHS`` / ``..._USAGE_RETENTION_MONTHS``): a
  month still kept online is not offered for archiving at all.

Monthly key ``2025-08-01`` is the partition ``audit_log_y2025m08``; daily key ``2025-08-14`` is the day
``[2025-08-14 00:00Z, 2025-08-15 00:00Z)``.
"""

from __future__ import annotations

import datetime as dt
import logging

import dagster as dg

from perf_pipeline.lib.calendar import month_start, retention_floor
from perf_pipeline.lib.partitioning import oldest_month
from perf_pipeline.settings import Settings, get_settings

log = logging.getLogger(__name__)


def resolve_data_start(settings: Settings | None = None, *, today: dt.date | None = None) -> dt.date:
    """The first month of the partitions: the setting if given; else the oldest month in the database of
    ``PERF_PIPELINE_DATABASE_URL`` (a short read: one connection, 2 s connect timeout; this month when the
    database holds none); else, without a configured or reachable database, this month minus the longest
    retention (a superset, so no month that may exist is hidden). The URL comes from the settings only:
    ``perf-pipeline dev`` exports the embedded server's URL to ``dagster dev`` before the code location
    loads."""
    settings = settings or get_settings()
    if settings.data_start is not None:
        return settings.data_start
    this_month = month_start(today or dt.datetime.now(dt.UTC).date())
    fallback = retention_floor(
        this_month, max(settings.audit_retention_months, settings.usage_retention_months)
    )
    url = settings.database_url
    if url is None:
        return fallback
    try:
        import psycopg

        with psycopg.connect(
            url, connect_timeout=2, autocommit=True, application_name="perf_pipeline.load"
        ) as conn:
            oldest = oldest_month(conn)
    except Exception as exc:  # noqa: BLE001 — any failure here must not stop the code location from loading
        log.warning(
            "PERF_PIPELINE_DATA_START unset and the database unreadable (%s): partitions start %s",
            exc,
            fallback,
        )
        return fallback
    return min(oldest, this_month) if oldest else this_month


_settings = get_settings()
DATA_START = resolve_data_start(_settings)

AUDIT_LOG_MONTHS = dg.DynamicPartitionsDefinition(name="audit_log_months")
USAGE_LOG_MONTHS = dg.DynamicPartitionsDefinition(name="usage_log_months")
USAGE_LOG_DAYS = dg.DynamicPartitionsDefinition(name="usage_log_days")
TABLE_MONTHS: dict[str, dg.DynamicPartitionsDefinition] = {
    "audit_log": AUDIT_LOG_MONTHS,
    "usage_log": USAGE_LOG_MONTHS,
}
# end_offset=1: today (the partial day) is a partition too
DAYS = dg.DailyPartitionsDefinition(start_date=DATA_START.isoformat(), end_offset=1, timezone="UTC")
# negative end_offset: the last month offered is the newest one past retention
AUDIT_ARCHIVE_MONTHS = dg.MonthlyPartitionsDefinition(
    start_date=DATA_START.isoformat(), end_offset=-_settings.audit_retention_months, timezone="UTC"
)
USAGE_RETENTION_MONTHS = dg.MonthlyPartitionsDefinition(
    start_date=DATA_START.isoformat(), end_offset=-_settings.usage_retention_months, timezone="UTC"
)
