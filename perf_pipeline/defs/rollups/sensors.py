"""Late data: re-materialize exactly the days of usage_daily_metrics whose usage_log rows changed after
they were rolled up.

The database marks those days (trigger of migration 0021, table ``usage_rollup_stale_days``); this sensor
reads the marks of days already rolled up and requests one run per run of consecutive marked days
(a single day: ``partition_key``; several: a partition range, one run, one statement), so the day keys
are the run's partition tags. The run claims the marks it covers before reading and deletes its claims
with the numbers it commits; claims left by a run that died are turned back into marks here each tick
(when no rollup runs), so a killed rollup is re-run within about a minute. The cursor remembers
which (day, mark time) pairs were requested, so a mark is requested once even if its run is still
queued at the next tick; a mark made after the run cleared the old one has a new time and is
requested again.
"""

import datetime as dt
import json

import dagster as dg

from perf_pipeline.defs.resources import PostgresResource
from perf_pipeline.defs.rollups.assets import usage_daily_metrics_job
from perf_pipeline.defs.rollups.partitions import first_rollup_day
from perf_pipeline.lib.rollups import rearm_orphaned_claims, stale_rolled_up_days, utc_today

# Dagster's run tags for a partition range (dagster._core.storage.tags, not re-exported publicly)
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"


def _consecutive(days: list[dt.date]) -> list[list[dt.date]]:
    groups: list[list[dt.date]] = []
    for day in sorted(days):
        if groups and day - groups[-1][-1] == dt.timedelta(days=1):
            groups[-1].append(day)
        else:
            groups.append([day])
    return groups


@dg.sensor(
    name="usage_daily_metrics_late_data_sensor",
    job=usage_daily_metrics_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Every minute: re-run usage_daily_metrics for exactly the rolled-up days whose usage_log "
    "rows were inserted, changed or deleted since (marked by a trigger). One indexed read.",
)
def usage_daily_metrics_late_data_sensor(
    context: dg.SensorEvaluationContext, postgres: PostgresResource
) -> dg.SensorResult:
    requested: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    with postgres.connection(autocommit=True) as conn:
        # claims of a rollup that died after taking them become marks again (with a new time) right here
        rearmed = rearm_orphaned_claims(conn)
        marks = stale_rolled_up_days(conn, first_rollup_day(), utc_today())
    if rearmed:
        context.log.warning(
            "re-armed the late-data marks of a rollup that died: %s",
            ", ".join(d.isoformat() for d in rearmed),
        )
    current = {day.isoformat(): marked_at.isoformat() for day, marked_at in marks}
    new = [dt.date.fromisoformat(d) for d, at in current.items() if requested.get(d) != at]
    runs = []
    for group in _consecutive(new):
        first, last = group[0].isoformat(), group[-1].isoformat()
        run_key = "late-" + "+".join(f"{d.isoformat()}@{current[d.isoformat()]}" for d in group)
        tags = {"perf_pipeline/trigger": "late_data", "perf_pipeline/late_days": f"{first}...{last}"}
        if len(group) == 1:
            runs.append(dg.RunRequest(run_key=run_key, partition_key=first, tags=tags))
        else:
            runs.append(
                dg.RunRequest(run_key=run_key, tags={**tags, RANGE_START_TAG: first, RANGE_END_TAG: last})
            )
    if new:
        context.log.info(
            "late data in %d rolled-up day(s): %s", len(new), ", ".join(d.isoformat() for d in new)
        )
    # keep only marks that still exist: a cleared mark can never be requested again under the same time
    return dg.SensorResult(run_requests=runs, cursor=json.dumps(current, sort_keys=True))
