"""Resources every area shares: the platform's PostgreSQL and the dashboard's Redis.

Both read their URL from the environment through ``EnvVar`` (``perf-pipeline dev`` exports them, also
for the embedded servers), so the same definitions run locally, in CI and in production.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
import psycopg
import redis

from perf_pipeline.lib.db import connect


class PostgresResource(dg.ConfigurableResource):
    """The platform database. ``connection()`` opens a psycopg 3 connection per use (no pool: runs are
    short-lived processes; a pool would only hold idle connections)."""

    url: str
    application_name: str = "perf_pipeline.dagster"

    @contextmanager
    def connection(self, *, autocommit: bool = False) -> Iterator[psycopg.Connection]:
        with connect(self.url, autocommit=autocommit, application_name=self.application_name) as conn:
            yield conn


class RedisResource(dg.ConfigurableResource):
    """The dashboard cache."""

    url: str
    socket_timeout_ms: int = 2000

    def client(self) -> redis.Redis:
        timeout = self.socket_timeout_ms / 1000
        return redis.Redis.from_url(self.url, socket_timeout=timeout, socket_connect_timeout=timeout)


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(
        resources={
            "postgres": PostgresResource(url=dg.EnvVar("PERF_PIPELINE_DATABASE_URL")),
            "redis": RedisResource(url=dg.EnvVar("PERF_PIPELINE_REDIS_URL")),
        }
    )
