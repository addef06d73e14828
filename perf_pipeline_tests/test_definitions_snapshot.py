"""Snapshot of the code location: every asset (with partitioning, group, pool, check names), job, schedule
(with cron) and sensor. A graph change must be deliberate: regenerate with
``UPDATE_SNAPSHOTS=1 .venv/bin/pytest perf_pipeline_tests/test_definitions_snapshot.py`` and commit the diff.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

SNAPSHOT = Path(__file__).parent / "snapshots" / "definitions.json"


def _snapshot() -> dict:
    from perf_pipeline.definitions import defs

    loaded = defs()
    repo = loaded.get_repository_def()
    graph = loaded.resolve_asset_graph()
    assets = {}
    for key in sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string()):
        node = graph.get(key)
        partitions = node.partitions_def
        assets[key.to_user_string()] = {
            "group": node.group_name,
            "partitions": type(partitions).__name__ if partitions else None,
            "deps": sorted(k.to_user_string() for k in node.parent_keys),
            "checks": sorted(c.name for c in node.check_keys),
            "pools": sorted(node.pools or []),
            "backfill_policy": str(node.backfill_policy.policy_type) if node.backfill_policy else None,
        }
    return {
        "assets": assets,
        "jobs": sorted(j.name for j in repo.get_all_jobs() if not j.name.startswith("__")),
        "schedules": {
            s.name: {"cron": s.cron_schedule, "timezone": s.execution_timezone, "job": s.job_name}
            for s in sorted(repo.schedule_defs, key=lambda s: s.name)
        },
        "sensors": sorted(s.name for s in repo.sensor_defs),
    }


def test_definitions_match_snapshot() -> None:
    current = _snapshot()
    if os.environ.get("UPDATE_SNAPSHOTS"):
        SNAPSHOT.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")
    expected = json.loads(SNAPSHOT.read_text())
    assert current == expected, (
        "the Dagster graph changed: if deliberate, regenerate the snapshot (see module doc)"
    )
