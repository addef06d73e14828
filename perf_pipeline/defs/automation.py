"""Declarative automation: the sensor that evaluates the assets' ``automation_condition``s.

In open-source Dagster the conditions fire only while an automation condition sensor runs; this one runs
by default, over every asset, every 30 seconds. Requests for several partitions of one asset become one
backfill, which honours the asset's ``BackfillPolicy.single_run()``: the late days of
``usage_daily_metrics`` re-run as one run per range of consecutive days, one SQL statement each.
"""

import dagster as dg

automation = dg.AutomationConditionSensorDefinition(
    "automation",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    emit_backfills=True,
    description="Evaluates every asset's automation condition each 30 s: re-runs of rolled-up days whose "
    "usage_log rows changed (usage_daily_metrics), and the dashboard cache after its upstreams or every "
    "15 minutes (dashboard_cache).",
)
