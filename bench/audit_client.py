"""A concurrent client running the audit views' three lookups (a user's latest 100 events, one entity's
history, the high and critical events of the last 24 h), for "p95 before vs during" figures of a scenario
that loads the database."""

from __future__ import annotations

import random
import threading
import time

from bench.harness import Stats
from perf_pipeline.lib.db import connect, load_query

AUDIT_QUERIES = (
    "health_probe_audit_user_latest",
    "health_probe_audit_entity_history",
    "health_probe_audit_critical_24h",
)


def lookup_args(url: str, n: int = 50, seed: int = 6) -> list[dict[str, object]]:
    """Recent users and entities, as an admin UI would look them up."""
    with connect(url) as conn:
        users = [
            r[0]
            for r in conn.execute(
                'SELECT user_id FROM audit_log WHERE user_id IS NOT NULL ORDER BY "timestamp" DESC LIMIT %s',
                (n * 20,),
            ).fetchall()
        ]
        entities = conn.execute(
            "SELECT entity_type, entity_id FROM audit_log WHERE entity_type IS NOT NULL "
            'ORDER BY "timestamp" DESC LIMIT %s',
            (n * 20,),
        ).fetchall()
    rng = random.Random(seed)
    return [
        {"user_id": rng.choice(users), "entity_type": e[0], "entity_id": e[1]}
        for e in rng.sample(entities, min(n, len(entities)))
    ]


class AuditClient(threading.Thread):
    """The three audit lookups back to back on one connection, timed client-side; ``window(start, end)``
    takes wall-clock (``time.time()``) bounds, so they can come from database timestamps too."""

    def __init__(self, url: str, args: list[dict[str, object]]) -> None:
        super().__init__(daemon=True)
        self.url, self.args = url, args
        self.samples: list[tuple[float, float]] = []  # (wall-clock start, ms)
        self.stop = threading.Event()

    def run(self) -> None:
        queries = [load_query(q) for q in AUDIT_QUERIES]
        with connect(self.url, autocommit=True, application_name="bench.audit_client") as conn:
            i = 0
            while not self.stop.is_set():
                for query in queries:
                    started, t0 = time.time(), time.perf_counter()
                    conn.execute(query, self.args[i % len(self.args)]).fetchall()
                    self.samples.append((started, (time.perf_counter() - t0) * 1000))
                i += 1

    def window(self, start: float, end: float) -> Stats:
        return Stats([ms for t, ms in self.samples if start <= t < end])
