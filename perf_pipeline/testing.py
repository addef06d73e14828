"""Helpers the tests and the benchmarks share: free ports, and the Dagster daemon's automation loop driven
by hand (the observation sensor's events stored as the daemon stores them, then one evaluation of the
assets' automation conditions). Not imported by the code location itself."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass, field

import dagster as dg


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class AutomationLoop:
    """One daemon tick at a time: ``observe_platform_tables`` (its runless events reported to ``instance``)
    and the automation condition evaluation of ``assets``. Cursors are kept between ticks, as the daemon
    keeps them."""

    database_url: str
    instance: dg.DagsterInstance
    assets: Sequence[str] = ("usage_daily_metrics", "dashboard_cache")
    observe_cursor: str | None = None
    automation_cursor: object | None = None
    defs: dg.Definitions = field(init=False)

    def __post_init__(self) -> None:
        from perf_pipeline.definitions import defs

        self.defs = defs()

    def observe(self) -> dg.SensorResult:
        from perf_pipeline.defs.platform.sensors import observe_platform_tables, store_sensor_result
        from perf_pipeline.defs.resources import PostgresResource

        ctx = dg.build_sensor_context(
            instance=self.instance,
            cursor=self.observe_cursor,
            resources={"postgres": PostgresResource(url=self.database_url)},
        )
        result = observe_platform_tables(ctx)
        store_sensor_result(self.instance, result)
        self.observe_cursor = result.cursor
        return result

    def prime(self) -> None:
        """Bring the instance to the database's present, as a daemon that has been running would have it:
        one observation, every day rolled up outside Dagster (by a test) shown as materialized, and a
        first evaluation (the conditions' initial one, which requests nothing). Changes count from here."""
        import psycopg

        self.observe()
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            days = [r[0] for r in conn.execute("SELECT day FROM usage_daily_metrics ORDER BY day")]
        for day in days:
            self.instance.report_runless_asset_event(
                dg.AssetMaterialization(asset_key="usage_daily_metrics", partition=day.isoformat())
            )
        self.tick()

    def tick(self) -> dict[str, set[str]]:
        """Observe, then evaluate: the partitions (or ``""`` for an unpartitioned asset) each asset of
        ``assets`` would be requested for."""
        self.observe()
        evaluated = dg.evaluate_automation_conditions(
            defs=self.defs,
            instance=self.instance,
            asset_selection=dg.AssetSelection.assets(*self.assets),
            cursor=self.automation_cursor,  # type: ignore[arg-type]
        )
        self.automation_cursor = evaluated.cursor
        # an unpartitioned asset's request is the partition None, shown as ""
        return {
            key: {p or "" for p in evaluated.get_requested_partitions(dg.AssetKey(key))}
            for key in self.assets
        }
