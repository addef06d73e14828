"""The audit writer's counters, one object per writer, and how they become metrics.

:class:`Counters` holds what a writer counts (events accepted, written, skipped as duplicates, replayed,
spilled, dropped, rejected; batches, failed attempts, failed spool writes; the last error and recent
delivery latencies). It has no lock of its own: the writer reads and updates it under its lock.
:meth:`Counters.metrics` renders them with the writer's gauges as the metrics dictionary (the keys the
health report and ``audit_writer_metrics`` show); :func:`combine` sums the dictionaries of several writers.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from perf_pipeline.lib.stats import percentile

#: delivery latencies kept for the flush p50/p99
LATENCY_SAMPLES = 2048


def _percentile(samples: list[float], pct: float) -> float:
    return percentile(samples, pct) if samples else 0.0


@dataclass
class Counters:
    """What one writer counts (updated under the writer's lock). Field names are the metric names."""

    accepted: int = 0  # events log() accepted
    recovered: int = 0  # events found in the spool at start (a previous process's)
    settled: int = 0  # events acknowledged or dropped, in delivery order (own and recovered)
    written: int = 0  # rows inserted into audit_log
    duplicates_skipped: int = 0  # rows a re-send found already there
    replayed: int = 0  # recovered events delivered
    spilled: int = 0  # events producers wrote to the spool themselves (full queue, late spooler)
    dropped: int = 0  # events given up (no spool, or a spool that could not be written)
    rejected: int = 0  # events the database refused (set aside in rejected.copy)
    batches: int = 0  # batches delivered
    failed_attempts: int = 0  # delivery attempts that failed (connection, server)
    spool_write_failures: int = 0  # segment writes that failed (disk full, folder gone)
    last_error: str | None = None
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))

    def delivered(self, *, count: int, inserted: int, refused: int, replay: bool, latency_ms: float) -> None:
        """Account for one acknowledged batch of ``count`` events: ``inserted`` rows went in, ``refused``
        lines were set aside, the rest were already there (duplicates). O(1)."""
        self.batches += 1
        self.written += inserted
        self.rejected += refused
        self.duplicates_skipped += count - inserted - refused
        self.settled += count
        if replay:
            self.replayed += count
        self.latencies.append(latency_ms)

    def drop(self, count: int) -> None:
        """Account for ``count`` events given up at close (they count as settled, so flush() returns)."""
        self.dropped += count
        self.settled += count

    def metrics(
        self, *, queued: int, queued_bytes: int, pending: int, spooled: int, db_reachable: bool
    ) -> dict[str, Any]:
        """The metrics dictionary: these counters with the writer's gauges (a sort of ≤ 2048 latencies)."""
        latencies = list(self.latencies)
        return {
            "accepted": self.accepted,
            "queued": queued,
            "queued_bytes": queued_bytes,
            "pending": pending,
            # events in spool segments not yet acknowledged (a healthy writer shows the batch in flight)
            "spooled": spooled,
            "written": self.written,
            "duplicates_skipped": self.duplicates_skipped,
            "recovered": self.recovered,
            "replayed": self.replayed,
            "spilled": self.spilled,
            "dropped": self.dropped,
            "rejected": self.rejected,
            "batches": self.batches,
            "failed_attempts": self.failed_attempts,
            "spool_write_failures": self.spool_write_failures,
            "flush_p50_ms": _percentile(latencies, 50),
            "flush_p99_ms": _percentile(latencies, 99),
            "db_reachable": db_reachable,
            "last_error": self.last_error,
        }


def combine(per_writer: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Sum of several writers' :meth:`Counters.metrics`: counters add up, a ``*_ms`` value is the worst
    writer's, ``writers`` says how many there are (flags and texts are left out)."""
    out: dict[str, Any] = {"writers": 0}
    for m in per_writer:
        out["writers"] += 1
        for key, value in m.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if key.endswith("_ms"):
                out[key] = max(out.get(key, 0.0), value)
            else:
                out[key] = out.get(key, 0) + value
    return out


__all__: list[str] = ["Counters", "combine"]
