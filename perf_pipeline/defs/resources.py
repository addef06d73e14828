"""Resources every area shares: the platform's PostgreSQL, the dashboard's Redis and the project's settings.

The two servers' URLs come from the environment through ``EnvVar`` (``perf-pipeline dev`` exports them,
also for the embedded servers), so the same definitions run locally, in CI and in production. Every other
setting reaches an asset, check, op, sensor or schedule through :class:`SettingsResource` (resource key
``settings``), never by reading the environment in the body.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
import psycopg
import redis

from perf_pipeline.lib.db import connect
from perf_pipeline.settings import Settings


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


class SettingsResource(dg.ConfigurableResource):
    """The project's configuration (:class:`perf_pipeline.settings.Settings`), resource key ``settings``.

    Take it as a parameter and read ``settings.get()``::

        @dg.asset
        def my_asset(postgres: PostgresResource, settings: SettingsResource) -> None:
            months = settings.get().premake_months

    ``get()`` reads the ``PERF_PIPELINE_*`` variables of this process each time it is called (a few
    microseconds, no I/O), as ``get_settings()`` does, so a changed environment is seen by the next run or
    tick; a bad value raises :class:`perf_pipeline.settings.SettingsError` naming the variable. It has no
    configuration of its own: tests and scripts that build their own ``resources={...}`` add
    ``"settings": SettingsResource()``.
    """

    def get(self) -> Settings:
        return Settings.from_env()


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(
        resources={
            "postgres": PostgresResource(url=dg.EnvVar("PERF_PIPELINE_DATABASE_URL")),
            "redis": RedisResource(url=dg.EnvVar("PERF_PIPELINE_REDIS_URL")),
            "settings": SettingsResource(),
        }
    )
