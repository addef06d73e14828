"""Dagster's own storage retention: runs (and their event logs) older than PERF_PIPELINE_RUN_HISTORY_DAYS.

Tick history is pruned by Dagster itself (``retention:`` in dagster.yaml). Runs and their event logs have
no built-in retention, so this job deletes finished runs older than the setting through the instance API
(``DagsterInstance.delete_run`` removes the run and its event log rows). Runs still queued or in
progress are never deleted.
"""

import datetime as dt

import dagster as dg

from perf_pipeline.defs.resources import SettingsResource
from perf_pipeline.defs.scheduling import utc_schedule

FINISHED = [dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED]
BATCH = 200


def prune_runs(instance: dg.DagsterInstance, cutoff: dt.datetime, *, keep_run_id: str | None = None) -> int:
    """Delete finished runs created before ``cutoff``; returns how many. Cost: per run, one DELETE of the
    run and its event log rows in Dagster's storage; batches of 200 so memory stays flat."""
    deleted = 0
    while True:
        records = instance.get_run_records(
            filters=dg.RunsFilter(created_before=cutoff, statuses=FINISHED), limit=BATCH
        )
        ids = [r.dagster_run.run_id for r in records if r.dagster_run.run_id != keep_run_id]
        if not ids:
            return deleted
        for run_id in ids:
            instance.delete_run(run_id)
        deleted += len(ids)


class PruneConfig(dg.Config):
    days: int | None = None
    """Days of run history kept; default PERF_PIPELINE_RUN_HISTORY_DAYS."""


@dg.op(description="Delete finished Dagster runs (and their event logs) older than the retention.")
def prune_run_history(
    context: dg.OpExecutionContext, config: PruneConfig, settings: SettingsResource
) -> None:
    days = config.days or settings.get().run_history_days
    cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(days=days)
    deleted = prune_runs(context.instance, cutoff, keep_run_id=context.run_id)
    context.log.info("deleted %d run(s) created before %s", deleted, cutoff.isoformat())


@dg.job(description="Prunes Dagster run history older than PERF_PIPELINE_RUN_HISTORY_DAYS.")
def prune_run_history_job() -> None:
    prune_run_history()


prune_old_runs = utc_schedule(
    "prune_old_runs",
    prune_run_history_job,
    "0 4 * * *",
    "Daily at 04:00 UTC, after the 03:00 maintenance: Dagster's run and event-log tables "
    "would otherwise grow without bound.",
)
