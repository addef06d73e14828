"""Latency probes: the audit lookups and dashboard queries run with ``EXPLAIN (ANALYZE, BUFFERS)`` on the
live data, their p50/p95 and the indexes their plans use, for the latency budgets."""

from __future__ import annotations

import datetime as dt
import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from perf_pipeline.lib.dashboard import standard_trend_requests
from perf_pipeline.lib.db import load_query
from perf_pipeline.lib.health._catalog import relation_exists
from perf_pipeline.lib.stats import percentile

AUDIT = "audit"
ANALYTICS = "analytics"


@dataclass(frozen=True)
class Probe:
    """One query the dashboard or the audit views depend on. ``needs_index``: a plan without any index
    scan is a regression even if it is still fast on today's data (it will not stay fast)."""

    name: str
    group: str  # AUDIT | ANALYTICS
    query: str  # sql/queries/<query>.sql
    needs_index: bool
    requires_table: str | None = None


PROBES: tuple[Probe, ...] = (
    Probe("audit_user_latest", AUDIT, "health_probe_audit_user_latest", True),
    Probe("audit_entity_history", AUDIT, "health_probe_audit_entity_history", True),
    Probe("audit_critical_24h", AUDIT, "health_probe_audit_critical_24h", True),
    # the dashboard's own statements, so a budget measures exactly what the API runs on a cache miss
    Probe("kpis", ANALYTICS, "dashboard_kpis", False),
    Probe("trends", ANALYTICS, "rollup_trends", False, requires_table="usage_daily_metrics"),
    Probe("usage_by_user", ANALYTICS, "health_probe_usage_by_user", True),
)

_INDEX_NODES = {"Index Scan", "Index Only Scan", "Bitmap Index Scan"}

#: a probe that needs an index may do without one while its plan touches fewer shared buffers than this
#: (1 MB): on a tiny table a sequential scan is the right plan, and stays fast
NO_INDEX_BLOCKS_ALLOWED = 128


@dataclass
class ProbeResult:
    name: str
    group: str
    skipped: str | None = None
    samples_ms: list[float] = field(default_factory=list)
    indexes: list[str] = field(default_factory=list)
    needs_index: bool = False
    shared_hit: int = 0
    shared_read: int = 0
    plan_text: str = ""

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.samples_ms) if self.samples_ms else float("nan")

    @property
    def p95_ms(self) -> float:
        return percentile(self.samples_ms, 95)

    @property
    def index_used(self) -> bool:
        return bool(self.indexes)

    @property
    def blocks(self) -> int:
        """Shared buffers the plan touched (hit + read), all nodes."""
        return self.shared_hit + self.shared_read

    @property
    def missing_index(self) -> bool:
        """Needs an index, used none, and read enough that it matters (see NO_INDEX_BLOCKS_ALLOWED)."""
        return self.needs_index and not self.index_used and self.blocks >= NO_INDEX_BLOCKS_ALLOWED

    def within(self, budget_ms: float) -> bool:
        """Skipped probes pass; others need p95 within budget and no :attr:`missing_index`."""
        if self.skipped:
            return True
        return self.p95_ms <= budget_ms and not self.missing_index


def _plan_indexes(node: Mapping[str, Any]) -> list[str]:
    found = [node["Index Name"]] if node.get("Node Type") in _INDEX_NODES and "Index Name" in node else []
    for child in node.get("Plans", []):
        found += _plan_indexes(child)
    return found


def probe_params(conn: psycopg.Connection) -> dict[str, Any]:
    """Arguments for the probes from the live data (``health_probe_params.sql``); placeholders that match
    nothing when the tables are empty, so the probes still run (and measure an empty lookup)."""
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(load_query("health_probe_params")).fetchone() or {}
    nobody = "00000000-0000-0000-0000-000000000000"
    return {
        "user_id": row.get("audit_user_id") or nobody,
        "entity_type": row.get("entity_type") or "session",
        "entity_id": row.get("entity_id") or "none",
        "usage_user_id": row.get("usage_user_id") or nobody,
    }


def run_probe(
    conn: psycopg.Connection, probe: Probe, params: Mapping[str, Any], *, runs: int = 5, warmup: int = 1
) -> ProbeResult:
    """Run ``EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)`` of the probe ``warmup + runs`` times; the timed
    samples are PostgreSQL's planning + execution time (no network, no client). Keeps the indexes the
    plan used and, for the report, the last plan as text. Cost: ``runs + warmup + 1`` executions of
    the query (read-only; ACCESS SHARE locks only)."""
    result = ProbeResult(probe.name, probe.group, needs_index=probe.needs_index)
    if probe.requires_table and not relation_exists(conn, probe.requires_table):
        result.skipped = f"skipped: table {probe.requires_table} does not exist"
        return result
    query = load_query(probe.query)
    today = dt.datetime.now(dt.UTC).date()
    # dashboard_kpis at now(); rollup_trends: the dashboard's standard weekly range (13 ISO weeks)
    weekly = next(r for r in standard_trend_requests(today) if r.granularity == "weekly")
    args = {"as_of": None, "start": weekly.start, "end": weekly.end, "unit": "week", **params}
    if probe.name == "usage_by_user":
        args["user_id"] = params["usage_user_id"]
    explain = sql.SQL("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) ") + sql.SQL(query)  # type: ignore[arg-type]
    for i in range(warmup + runs):
        plan = conn.execute(explain, args).fetchone()[0]
        doc = (json.loads(plan) if isinstance(plan, str) else plan)[0]
        if i < warmup:
            continue
        result.samples_ms.append(float(doc.get("Planning Time", 0.0)) + float(doc["Execution Time"]))
        result.indexes = sorted(set(_plan_indexes(doc["Plan"])))
        result.shared_hit = int(doc["Plan"].get("Shared Hit Blocks", 0))
        result.shared_read = int(doc["Plan"].get("Shared Read Blocks", 0))
    text = conn.execute(sql.SQL("EXPLAIN (ANALYZE, BUFFERS) ") + sql.SQL(query), args).fetchall()  # type: ignore[arg-type]
    result.plan_text = "\n".join(r[0] for r in text)
    return result


def run_probes(
    conn: psycopg.Connection, *, runs: int = 5, probes: Sequence[Probe] = PROBES
) -> list[ProbeResult]:
    """Every probe against the live data (see :func:`run_probe`). Rolls back whatever it read in."""
    params = probe_params(conn)
    out = [run_probe(conn, p, params, runs=runs) for p in probes]
    if not conn.autocommit:
        conn.rollback()
    return out
