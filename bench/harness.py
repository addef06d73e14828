"""Benchmark harness: scenarios register here; each prints a table of median/p95 and side-by-side ratios.

A scenario is a function ``run(ctx: BenchContext) -> None`` registered with :func:`scenario`. It measures
with :func:`measure` (repeated timings → :class:`Stats`), reports rows with :meth:`BenchContext.row`, and
compares variants measured in the same run with :meth:`BenchContext.ratio` — never against numbers from
another run, because the machines are shared and noisy.

Scenarios get their own database (created and dropped by the harness) on the configured or embedded
PostgreSQL, and the configured or embedded Redis.
"""

from __future__ import annotations

import json
import os
import secrets
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

from perf_pipeline.lib.stats import percentile

SCENARIOS: dict[str, tuple[Callable[[BenchContext], None], str]] = {}
RESULTS_DIR = Path(__file__).parent / "results"


def scenario(
    name: str, description: str
) -> Callable[[Callable[[BenchContext], None]], Callable[[BenchContext], None]]:
    def register(fn: Callable[[BenchContext], None]) -> Callable[[BenchContext], None]:
        SCENARIOS[name] = (fn, description)
        return fn

    return register


@dataclass
class Stats:
    samples: list[float]  # milliseconds

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def p95(self) -> float:
        return percentile(self.samples, 95)

    @property
    def p99(self) -> float:
        return percentile(self.samples, 99)

    @property
    def max(self) -> float:
        return max(self.samples)


def measure(fn: Callable[[], object], *, repeat: int = 20, warmup: int = 2) -> Stats:
    """Time ``fn`` ``repeat`` times after ``warmup`` untimed calls; milliseconds."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    return Stats(samples)


@dataclass
class BenchContext:
    name: str
    server_url: str  # PostgreSQL, database `postgres`
    redis_url: str
    rows: list[dict[str, object]] = field(default_factory=list)

    def row(self, **values: object) -> None:
        """One result line; printed as a table at the end and saved to bench/results/<scenario>.json."""
        self.rows.append(values)
        print("  " + "  ".join(f"{k}={_fmt(v)}" for k, v in values.items()), flush=True)

    def ratio(self, label: str, numerator: float, denominator: float, target: str = "") -> float:
        value = numerator / denominator if denominator else float("inf")
        self.row(metric=label, ratio=value, target=target)
        return value

    @contextmanager
    def database(self, prefix: str = "bench", keep: bool = False) -> Iterator[str]:
        """A fresh database with migrations applied, dropped afterwards (kept with ``keep`` or
        ``BENCH_KEEP_DB``)."""
        from perf_pipeline.lib.migrations import apply_migrations

        name = f"{prefix}_{secrets.token_hex(4)}"
        with psycopg.connect(self.server_url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        url = urlunsplit(urlsplit(self.server_url)._replace(path=f"/{name}"))
        try:
            apply_migrations(url)
            yield url
        finally:
            if not (keep or os.environ.get("BENCH_KEEP_DB")):
                with psycopg.connect(self.server_url, autocommit=True) as conn:
                    conn.execute(
                        sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                    )


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def print_table(rows: list[dict[str, object]]) -> None:
    if not rows:
        return
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    widths = {c: max(len(c), *(len(_fmt(r.get(c, ""))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    print("  ".join("-" * widths[c] for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c, "")).ljust(widths[c]) for c in columns))


def run(names: list[str]) -> int:
    import importlib
    import pkgutil

    import bench.scenarios as pkg
    from perf_pipeline.embedded import resolve_urls

    for mod in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"bench.scenarios.{mod.name}")
    if names in ([], ["all"]):
        names = list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(f"unknown scenario(s): {', '.join(unknown)}; known: {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    urls = resolve_urls()
    server = urlunsplit(urlsplit(urls.database_url)._replace(path="/postgres"))
    RESULTS_DIR.mkdir(exist_ok=True)
    for name in names:
        fn, description = SCENARIOS[name]
        print(f"\n=== {name}: {description}", flush=True)
        ctx = BenchContext(name, server, urls.redis_url)
        started = time.perf_counter()
        fn(ctx)
        print(f"\n--- {name} ({time.perf_counter() - started:.1f} s)")
        print_table(ctx.rows)
        (RESULTS_DIR / f"{name}.json").write_text(json.dumps(ctx.rows, indent=2, default=str))
    return 0
