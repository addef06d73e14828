"""The one way a fixed-cadence schedule of this code location is defined.

Every such schedule runs in UTC, is on from the first deployment (an operator turns one off in the UI or
with ``dagster schedule stop``), is named after what it is for, and says its cadence in its description.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import dagster as dg

if TYPE_CHECKING:  # what define_asset_job returns
    from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition


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
        execution_timezone="UTC",
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description=description,
    )
