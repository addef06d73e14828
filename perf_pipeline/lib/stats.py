"""The one percentile function (latency figures in metadata, metrics and benchmarks)."""

from __future__ import annotations

from collections.abc import Sequence


def percentile(samples: Sequence[float], pct: float) -> float:
    """Linear-interpolated percentile (``pct`` in 0–100) of ``samples``; NaN when empty. O(n log n)."""
    ordered = sorted(samples)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * pct / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)
