"""``observe_platform_tables``: the Dagster UI tells what PostgreSQL holds, whoever changed it.

Every minute one short read (:func:`perf_pipeline.lib.observe.snapshot`: catalog statistics, a few index
probes, no table scan) becomes runless asset events, reported through the sensor (no run is launched):

* the platform's tables (external assets): a month of ``audit_log``, a day of ``usage_log``, ``session``
  and ``data_export`` are reported when they change, with a data version — the statistics counters of
  the month (or table), and for a past day of usage_log the time its late-data mark was set. A reported
  day of usage_log is an *updated upstream partition* for declarative automation, which re-runs exactly
  that day of ``usage_daily_metrics``. A partition that keeps changing (this month, today, the live
  tables) is reported at most every 15 minutes;
* the partition bars are the database: the months of audit_log and usage_log (and the days of usage_log)
  are dynamic partitions kept equal to ``pg_inherits`` (plus the months ahead), so an archived month
  leaves them and a restored one comes back; every month attached is materialized on
  ``audit_log_partitions`` / ``usage_log_partitions`` and on the external tables, including months created
  outside Dagster (the workload loader, a migration, ``move_default_rows``); every month archived
  (``archive_manifest`` state ``dropped``) is materialized on ``audit_log_archive`` / ``usage_log_retention``
  (a restored month keeps that mark, with a newer report saying it is restored: Dagster OSS cannot unmark a
  time-window partition);
* ``platform_schema`` is materialized when migrations were applied outside Dagster (``perf-pipeline
  migrate`` without a Dagster instance, ``perf-pipeline dev``).

Why a sensor rather than observable source assets: one read serves four tables, their partitions and the
reconciliation of the partition and archive assets; it costs no run (an observation job per minute would
be a process start and a run in the history every minute); and runless materializations of external
assets are what Dagster's automation and partition status read (observations of an external AssetSpec are
not, see the README's asset-graph section).
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Iterable

import dagster as dg

from perf_pipeline.defs.resources import PostgresResource, SettingsResource
from perf_pipeline.defs.time_partitions import (
    AUDIT_ARCHIVE_MONTHS,
    TABLE_MONTHS,
    USAGE_LOG_DAYS,
    USAGE_RETENTION_MONTHS,
)
from perf_pipeline.lib import observe
from perf_pipeline.lib.partitioning import months_ahead, partition_name
from perf_pipeline.lib.rollups import rearm_orphaned_claims

#: dagster._core.definitions.data_version.DATA_VERSION_TAG (and its "user provided" companion): the tags a
#: runless event carries its data version in (not re-exported by dagster)
DATA_VERSION_TAG = "dagster/data_version"
DATA_VERSION_IS_USER_PROVIDED_TAG = "dagster/data_version_is_user_provided"
#: a partition that keeps changing is reported at most this often
REPORT_EVERY_S = 900
SCHEMA_KEY = dg.AssetKey("platform_schema")


def _key(asset: str, partition: str | None = None) -> str:
    return f"{asset}|{partition or ''}"


class _Reporter:
    """Collects the tick's runless events and dynamic-partition changes, keeps the cursor's last versions."""

    def __init__(self, context: dg.SensorEvaluationContext, cursor: dict) -> None:
        self.context = context
        self.versions: dict[str, list] = cursor.get("versions", {})
        self.seen: set[str] = set()
        self.events: list[dg.AssetMaterialization] = []
        self.partition_requests: list[dg.AddDynamicPartitionsRequest | dg.DeleteDynamicPartitionsRequest] = []
        self.now = time.time()

    def report(
        self,
        asset: str,
        partition: str | None,
        version: str,
        metadata: dict[str, object],
        *,
        changing: bool = False,
    ) -> bool:
        """Report ``asset``[``partition``] if its version changed (a ``changing`` one at most every
        REPORT_EVERY_S seconds); True if reported."""
        key = _key(asset, partition)
        self.seen.add(key)
        last = self.versions.get(key)
        if last is not None and last[0] == version:
            return False
        if last is not None and changing and self.now - last[1] < REPORT_EVERY_S:
            return False
        self.events.append(
            dg.AssetMaterialization(
                asset_key=asset,
                partition=partition,
                metadata=metadata,
                tags={DATA_VERSION_TAG: version, DATA_VERSION_IS_USER_PROVIDED_TAG: "true"},
            )
        )
        self.versions[key] = [version, self.now]
        return True

    def keep_partitions(self, partitions: dg.DynamicPartitionsDefinition, wanted: Iterable[str]) -> None:
        """Make the dynamic partitions ``partitions`` exactly ``wanted`` (added in order, removed)."""
        wanted = sorted(set(wanted))
        have = set(self.context.instance.get_dynamic_partitions(partitions.name))
        add = [k for k in wanted if k not in have]
        drop = sorted(have - set(wanted))
        if add:
            self.partition_requests.append(partitions.build_add_request(add))
        if drop:
            self.partition_requests.append(partitions.build_delete_request(drop))

    def exists(self, asset: str, partitions: Iterable[str], metadata_of) -> None:
        """Materialize the ``partitions`` of ``asset`` that Dagster does not show yet (no version)."""
        shown = self.context.instance.get_materialized_partitions(dg.AssetKey(asset))
        for partition in partitions:
            if partition not in shown:
                self.events.append(
                    dg.AssetMaterialization(
                        asset_key=asset, partition=partition, metadata=metadata_of(partition)
                    )
                )

    def cursor(self) -> str:
        # only keys still reported: a vanished partition or a consumed mark is forgotten
        return json.dumps(
            {"versions": {k: v for k, v in self.versions.items() if k in self.seen}}, sort_keys=True
        )


def _month_key(month: dt.date) -> str:
    return month.isoformat()


def _table_metadata(rel: observe.RelationStats | None, newest: dt.datetime | None) -> dict[str, object]:
    metadata: dict[str, object] = {}
    if rel is not None:
        metadata["rows_estimate"] = dg.MetadataValue.int(rel.live_rows)
        metadata["dagster/size_bytes"] = dg.MetadataValue.int(rel.bytes)
    if newest is not None:
        metadata["newest_row_at"] = dg.MetadataValue.timestamp(newest)
    return metadata


@dg.sensor(
    name="observe_platform_tables",
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Every minute, one cheap read of PostgreSQL (statistics and index probes, no table scan) "
    "reported as runless events: months and days of audit_log/usage_log, session and data_export when "
    "they change (a late write to a past usage day re-runs that day's rollup through automation); the "
    "partition bars kept equal to pg_inherits (dynamic partitions); months archived shown on the archive "
    "assets; migrations applied outside Dagster on platform_schema.",
)
def observe_platform_tables(
    context: dg.SensorEvaluationContext, postgres: PostgresResource, settings: SettingsResource
) -> dg.SensorResult:
    cursor = json.loads(context.cursor) if context.cursor else {}
    r = _Reporter(context, cursor)
    with postgres.connection(autocommit=True) as conn:
        # the claims of a rollup that died after taking them become marks again, with a new time: the day
        # is reported changed below, and automation re-runs it (lib/rollups.py, migration 0090)
        rearmed = rearm_orphaned_claims(conn)
        if rearmed:
            context.log.warning(
                "re-armed the late-data marks of a rollup that died: %s",
                ", ".join(d.isoformat() for d in rearmed),
            )
        snap = observe.snapshot(conn)
        today = snap.taken_at.astimezone(dt.UTC).date()
        this_month = today.replace(day=1)
        ahead = [m.isoformat() for m in months_ahead(today, settings.get().premake_months)]

        for table, partitions in TABLE_MONTHS.items():
            attached = {_month_key(m) for m in snap.months(table)}
            # the bar: every attached month, and the months the daily schedule will create ahead
            r.keep_partitions(partitions, attached | set(ahead))
            # a month shown materialized on the partition asset exactly when its partition is attached
            r.exists(
                f"{table}_partitions",
                sorted(attached),
                lambda key, t=table: {
                    "partition": partition_name(t, dt.date.fromisoformat(key)),
                    "found_in_postgresql": "attached; created outside this asset (loader, migration, move)",
                },
            )
        # audit_log, a month at a time
        for month, rel in sorted(snap.months("audit_log").items()):
            metadata = _table_metadata(rel, snap.newest_row_at["audit_log"] if month == this_month else None)
            metadata["partition"] = rel.relation
            r.report("audit_log", _month_key(month), rel.version, metadata, changing=month >= this_month)

        # usage_log, a day at a time: present once, again on each late change; today as it fills
        usage_months = snap.months("usage_log")
        usage_days = {d.isoformat() for d in observe.days_of(set(usage_months), today)}
        r.keep_partitions(USAGE_LOG_DAYS, usage_days)
        marked = {d.isoformat(): at for d, at in snap.changed_days.items() if d.isoformat() in usage_days}
        shown = context.instance.get_materialized_partitions(dg.AssetKey("usage_log"))
        for day, at in sorted(marked.items()):
            r.report(
                "usage_log",
                day,
                f"late:{at.isoformat()}",
                {
                    "rows": dg.MetadataValue.int(observe.usage_rows_on(conn, dt.date.fromisoformat(day))),
                    "changed_after_the_day_at": dg.MetadataValue.timestamp(at),
                },
            )
        current = usage_months.get(this_month)
        if today.isoformat() in usage_days and current is not None:
            key = _key("usage_log", today.isoformat())
            last = r.versions.get(key)
            r.seen.add(key)
            if last is None or (last[0] != current.version and r.now - last[1] >= REPORT_EVERY_S):
                r.report(
                    "usage_log",
                    today.isoformat(),
                    current.version,
                    {
                        "rows": dg.MetadataValue.int(observe.usage_rows_on(conn, today)),
                        **_table_metadata(None, snap.newest_row_at["usage_log"]),
                    },
                    changing=True,
                )
        reported = {e.partition for e in r.events if e.asset_key == dg.AssetKey("usage_log")}
        for day in sorted(usage_days - shown - reported):
            r.events.append(dg.AssetMaterialization(asset_key="usage_log", partition=day))

    # the live tables
    for table in observe.PLAIN_TABLES:
        rel = snap.plain(table)
        if rel is not None:
            r.report(table, None, rel.version, _table_metadata(rel, snap.newest_row_at[table]), changing=True)

    # archives: a month shows as archived when the manifest says dropped; a restored month gets a newer
    # report saying so (its mark cannot be removed in Dagster OSS)
    for table, asset, offered_def in (
        ("audit_log", "audit_log_archive", AUDIT_ARCHIVE_MONTHS),
        ("usage_log", "usage_log_retention", USAGE_RETENTION_MONTHS),
    ):
        offered = set(offered_def.get_partition_keys())
        shown = context.instance.get_materialized_partitions(dg.AssetKey(asset))
        for m in sorted(snap.manifest, key=lambda m: m.month):
            key = _month_key(m.month)
            if m.table_name != table or key not in offered or m.state not in ("dropped", "restored"):
                continue
            seen = _key(asset, key)
            if seen not in r.versions and key in shown and m.state == "dropped":
                r.seen.add(seen)  # archived by a run of the asset: shown already
                r.versions[seen] = ["dropped", r.now]
                continue
            if m.state == "restored" and key not in shown:
                continue  # never shown as archived: nothing to correct
            r.report(
                asset,
                key,
                m.state,
                {
                    "state": "dropped" if m.state == "dropped" else "restored: online again, not archived",
                    "dagster/row_count": dg.MetadataValue.int(m.rows or 0),
                    "dagster/size_bytes": dg.MetadataValue.int(m.bytes or 0),
                    "sha256": m.sha256 or "",
                    "file": m.file_path or "",
                },
            )

    # migrations applied outside a platform_schema run
    latest = context.instance.get_latest_materialization_event(SCHEMA_KEY)
    recorded = None
    if latest is not None and latest.asset_materialization is not None:
        entry = latest.asset_materialization.metadata.get("migrations_applied_total")
        recorded = entry.value if entry is not None else None
    if snap.migrations and recorded != snap.migrations:
        r.events.append(
            dg.AssetMaterialization(
                asset_key=SCHEMA_KEY,
                metadata={
                    "migrations_applied_total": dg.MetadataValue.int(snap.migrations),
                    "last_applied_at": dg.MetadataValue.timestamp(snap.last_migration_at)
                    if snap.last_migration_at
                    else "",
                    "applied_by": "outside Dagster (perf-pipeline migrate or dev)",
                },
            )
        )

    return dg.SensorResult(
        asset_events=r.events,
        dynamic_partitions_requests=r.partition_requests,
        cursor=r.cursor(),
        skip_reason=None if r.events or r.partition_requests else "nothing changed since the last tick",
    )


def store_sensor_result(instance: dg.DagsterInstance, result: dg.SensorResult) -> None:
    """What the daemon does with a tick of this sensor, for a tick run outside it (``perf-pipeline dev``
    before the daemon starts, the tests): the dynamic-partition changes first, then the runless events."""
    for request in result.dynamic_partitions_requests or []:
        if isinstance(request, dg.AddDynamicPartitionsRequest):
            instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
        else:
            for key in request.partition_keys:
                instance.delete_dynamic_partition(request.partitions_def_name, key)
    for event in result.asset_events or []:
        instance.report_runless_asset_event(event)
