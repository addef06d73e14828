"""move_default_rows under a live writer and a reader: rows stay visible and writers never fail.

For each rate (200 and 500 inserts/s, each its own committed INSERT into the month being moved, which has
no partition yet so its rows land in DEFAULT) and each backlog (rows of the month already in DEFAULT:
30k and 150k at full scale, 10k and 30k small), a writer and a reader run while
:func:`perf_pipeline.lib.partitioning.move_default_rows` moves the month into its new partition:

* **writer**: failed inserts (target 0) and the longest insert (the switch blocks writers of the table);
* **reader**: ``count(*)`` of the month, sampled continuously: the longest stretch during which it read
  fewer rows than it had already seen (invisible rows; target 0 ms) and its longest query (the switch's
  exclusive part blocks readers);
* **move**: rows moved per second over the whole move, the switch's duration (writers wait this long) and
  its exclusive part (readers wait this long).

``python -m bench move_default`` (``BENCH_SCALE=small`` for the quick sizes).
"""

from __future__ import annotations

import datetime as dt
import os
import threading
import time

import psycopg

from bench.harness import BenchContext, scenario
from perf_pipeline.lib.partitioning import month_bounds, move_default_rows
from perf_pipeline.testing import usage_writer

SCALES = {"full": (30_000, 150_000), "small": (10_000, 30_000)}
RATES = (200, 500)


class _Reader(threading.Thread):
    def __init__(self, url: str, month: dt.date) -> None:
        super().__init__(daemon=True)
        self.url, self.bounds = url, month_bounds(month)
        self.stop = threading.Event()
        self.samples: list[tuple[float, int]] = []
        self.max_ms = 0.0

    def run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self.stop.is_set():
                t0 = time.perf_counter()
                n = conn.execute(
                    "SELECT count(*) FROM usage_log WHERE created_at >= %s AND created_at < %s", self.bounds
                ).fetchone()[0]
                self.max_ms = max(self.max_ms, (time.perf_counter() - t0) * 1000)
                self.samples.append((time.perf_counter(), n))

    def longest_invisible_ms(self) -> float:
        """The longest stretch of samples below the most rows already seen (rows that went out of sight)."""
        longest, seen, since = 0.0, -1, None
        for at, n in self.samples:
            if n < seen:
                since = at if since is None else since
                longest = max(longest, (at - since) * 1000)
            else:
                seen, since = n, None
        return longest


@scenario("move_default", "move_default_rows under a live writer and reader: failures, visibility, move rate")
def run(ctx: BenchContext) -> None:
    scale = os.environ.get("BENCH_SCALE", "full")
    backlogs = SCALES.get(scale, SCALES["full"])
    ctx.row(
        scale=scale, backlogs=f"{backlogs[0]:,} / {backlogs[1]:,} rows", note="compare rows of this run only"
    )
    for backlog in backlogs:
        for rate in RATES:
            with ctx.database("bench_move") as url:
                month = dt.date(2021, 5, 1)
                with psycopg.connect(url, autocommit=True) as conn:
                    conn.execute(
                        "INSERT INTO usage_log (user_id, created_at, duration_minutes, cost_usd, stt_provider) "
                        "SELECT gen_random_uuid(), %s::timestamptz + g * interval '10 seconds', 1, 0.01, 'google' "
                        "FROM generate_series(0, %s - 1) g",
                        (dt.datetime(2021, 5, 1, tzinfo=dt.UTC), backlog),
                    )
                    conn.execute("VACUUM ANALYZE usage_log_default")
                writer, reader = usage_writer(url, month, rate), _Reader(url, month)
                writer.start()
                reader.start()
                time.sleep(1.0)
                with psycopg.connect(url, autocommit=True) as conn:
                    t0 = time.perf_counter()
                    result = move_default_rows(conn, "usage_log")
                    seconds = time.perf_counter() - t0
                time.sleep(1.0)
                writer.stop.set()
                reader.stop.set()
                writer.join()
                reader.join()
                with psycopg.connect(url, autocommit=True) as conn:
                    total, distinct = conn.execute(
                        "SELECT count(*), count(DISTINCT id) FROM usage_log WHERE created_at >= %s AND created_at < %s",
                        month_bounds(month),
                    ).fetchone()
                    left = conn.execute("SELECT count(*) FROM usage_log_default").fetchone()[0]
                ctx.row(
                    backlog=backlog,
                    inserts_per_s=rate,
                    writer_failures=len(writer.failures),
                    writer_max_ms=writer.max_ms,
                    invisible_ms=reader.longest_invisible_ms(),
                    reader_max_ms=reader.max_ms,
                    reader_samples=len(reader.samples),
                    moved_rows=result.rows_moved,
                    move_s=seconds,
                    rows_per_s=result.rows_moved / seconds if seconds else 0.0,
                    switch_ms=result.switch_ms,
                    exclusive_ms=result.exclusive_ms,
                    all_rows_once=total == distinct == backlog + writer.written and left == 0,
                )
                if writer.failures:
                    first = writer.failures[0]
                    ctx.row(first_failure=f"{type(first).__name__}: {first}".splitlines()[0])
