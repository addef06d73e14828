"""The one way a fixed-cadence schedule of this code location is defined: :func:`utc_schedule` for a job run
as it is, :func:`utc_schedule_decorator` for a function that builds each tick's run request.

Every such schedule runs in UTC, is on from the first deployment (an operator turns one off in the UI or
with ``dagster schedule stop``), is named after what it is for, and says its cadence in its description.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import dagster as dg

if TYPE_CHECKING:  # what define_asset_job returns
    from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition


#: what every schedule here shares: UTC, and on from the first deployment
_UTC_RUNNING: dict[str, Any] = {
    "execution_timezone": "UTC",
    "default_status": dg.DefaultScheduleStatus.RUNNING,
}


def utc_schedule(
    name: str, job: dg.JobDefinition | UnresolvedAssetJobDefinition, cron: str, description: str
) -> dg.ScheduleDefinition:
    """A schedule that starts ``job`` on ``cron`` (UTC), running by default. ``name`` says what it is for
    (not when: the cadence belongs in ``description``, which the UI shows beside it). Costs nothing until
    a tick: building it reads no storage."""
    return dg.ScheduleDefinition(
        name=name,
        job=job,
        cron_schedule=cron,
        description=description,
        **_UTC_RUNNING,
    )


def utc_schedule_decorator(
    job: dg.JobDefinition | UnresolvedAssetJobDefinition,
    cron: str,
    description: str,
    *,
    name: str | None = None,
) -> Callable[[Callable[..., Any]], dg.ScheduleDefinition]:
    """:func:`utc_schedule` for a schedule that decides each tick's run itself (a partition key, a run
    key): decorates a function of the tick's context; the schedule's name is ``name``, or the function's
    name when not given (a factory building one schedule per table passes it)."""
    return dg.schedule(job=job, cron_schedule=cron, description=description, name=name, **_UTC_RUNNING)
