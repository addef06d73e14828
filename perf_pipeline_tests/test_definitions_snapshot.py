"""Snapshot of the code location: every asset (group, partitioning, dependencies with their partition
mappings, automation condition, freshness policy, checks, pool, backfill policy), job, schedule (cron and
default status) and sensor (default status). A graph change must be deliberate: regenerate with
``UPDATE_SNAPSHOTS=1 .venv/bin/pytest perf_pipeline_tests/test_definitions_snapshot.py`` and commit the diff.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import dagster as dg

SNAPSHOT = Path(__file__).parent / "snapshots" / "definitions.json"


def _mapping(node, parent: dg.AssetKey) -> str:
    mapping = node.partition_mappings.get(parent) if hasattr(node, "partition_mappings") else None
    return type(mapping).__name__ if mapping is not None else "default"


def _snapshot() -> dict:
    from perf_pipeline.definitions import defs

    loaded = defs()
    repo = loaded.get_repository_def()
    graph = loaded.resolve_asset_graph()
    assets = {}
    for key in sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string()):
        node = graph.get(key)
        partitions = node.partitions_def
        condition = node.automation_condition
        freshness = getattr(node, "freshness_policy", None)
        assets[key.to_user_string()] = {
            "group": node.group_name,
            "kind": "external" if not node.is_executable else "materializable",
            "partitions": type(partitions).__name__ if partitions else None,
            "deps": {p.to_user_string(): _mapping(node, p) for p in sorted(node.parent_keys, key=str)},
            "checks": sorted(c.name for c in node.check_keys),
            "pools": sorted(node.pools or []),
            "backfill_policy": str(node.backfill_policy.policy_type) if node.backfill_policy else None,
            "automation": (condition.get_label() or type(condition).__name__) if condition else None,
            "freshness": type(freshness).__name__ if freshness else None,
        }
    return {
        "assets": assets,
        "jobs": sorted(j.name for j in repo.get_all_jobs() if not j.name.startswith("__")),
        "schedules": {
            s.name: {
                "cron": s.cron_schedule,
                "timezone": s.execution_timezone,
                "job": s.job_name,
                "default_status": s.default_status.value,
            }
            for s in sorted(repo.schedule_defs, key=lambda s: s.name)
        },
        "sensors": {s.name: s.default_status.value for s in sorted(repo.sensor_defs, key=lambda s: s.name)},
    }


def test_definitions_match_snapshot() -> None:
    current = _snapshot()
    if os.environ.get("UPDATE_SNAPSHOTS"):
        SNAPSHOT.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")
    expected = json.loads(SNAPSHOT.read_text())
    assert current == expected, (
        "the Dagster graph changed: if deliberate, regenerate the snapshot (see module doc)"
    )


def test_every_schedule_and_sensor_runs_by_default() -> None:
    snap = _snapshot()
    assert {
        name: s["default_status"] for name, s in snap["schedules"].items() if s["default_status"] != "RUNNING"
    } == {}
    assert {name: status for name, status in snap["sensors"].items() if status != "RUNNING"} == {}


def test_the_lineage_is_one_graph_from_the_schema_to_the_cache_and_the_archives() -> None:
    """No orphan: every asset reaches platform_schema upstream, and the platform's tables lead to the
    dashboard cache, the archive and the retention."""
    assets = _snapshot()["assets"]
    parents = {k: set(v["deps"]) for k, v in assets.items()}

    def ancestors(key: str) -> set[str]:
        out, todo = set(), [key]
        while todo:
            for p in parents[todo.pop()]:
                if p not in out:
                    out.add(p)
                    todo.append(p)
        return out

    assert {k for k in assets if k != "platform_schema" and "platform_schema" not in ancestors(k)} == set()
    assert {"usage_log", "usage_daily_metrics", "usage_kpi_buckets"} <= ancestors("dashboard_cache")
    assert "audit_log" in ancestors("audit_log_archive")
    assert {"usage_log", "usage_daily_metrics"} <= ancestors("usage_log_retention")
    assert {assets[k]["group"] for k in ("audit_log", "usage_log", "session", "data_export")} == {"platform"}
    assert all(assets[k]["kind"] == "external" for k in ("audit_log", "usage_log", "session", "data_export"))
