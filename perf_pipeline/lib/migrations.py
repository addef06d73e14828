"""Ordered, checksummed, once-each schema migrations from ``sql/migrations/NNNN_name.sql``.

``apply_migrations`` takes a session-level advisory lock (so two processes migrating at once apply each
file once), records every applied file with its sha256 in ``schema_migrations``, and refuses to go on
when an applied file was edited afterwards (the error names the file). Each file runs in its own
transaction, unless its first line is ``-- perf_pipeline: no-transaction`` (for CREATE INDEX
CONCURRENTLY and the like).
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg

from perf_pipeline.lib.db import MIGRATIONS_DIR, Locks, advisory_unlock, try_advisory_lock

log = logging.getLogger(__name__)

_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
NO_TRANSACTION = "-- perf_pipeline: no-transaction"


class MigrationError(RuntimeError):
    """A migration file is malformed, edited after being applied, or failed; the message names it."""


@dataclass(frozen=True)
class Migration:
    name: str
    path: Path
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()

    @property
    def transactional(self) -> bool:
        return not self.sql.startswith(NO_TRANSACTION)


def discover(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """All migration files, ordered by number; malformed names and duplicate numbers are errors."""
    found: list[Migration] = []
    numbers: dict[str, str] = {}
    for path in sorted(directory.glob("*.sql")):
        m = _NAME.match(path.name)
        if not m:
            raise MigrationError(f"{path.name}: migration files are named NNNN_lowercase_name.sql")
        if m.group(1) in numbers:
            raise MigrationError(f"{path.name}: number {m.group(1)} is already used by {numbers[m.group(1)]}")
        numbers[m.group(1)] = path.name
        found.append(Migration(path.name, path, path.read_text()))
    return found


_BOOKKEEPING = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    filename   text PRIMARY KEY,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    duration_ms double precision NOT NULL
)
"""


def apply_migrations(url: str, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply pending migrations in order; returns the names applied (empty when up to date)."""
    migrations = discover(directory)
    applied_now: list[str] = []
    with psycopg.connect(url, autocommit=True, application_name="perf_pipeline.migrate") as conn:
        try_advisory_lock(conn, Locks.MIGRATIONS, wait_s=None)
        try:
            conn.execute(_BOOKKEEPING)
            applied = dict(conn.execute("SELECT filename, checksum FROM schema_migrations").fetchall())
            for mig in migrations:
                if mig.name in applied:
                    if applied[mig.name] != mig.checksum:
                        raise MigrationError(
                            f"{mig.name} was edited after it was applied (checksum {applied[mig.name][:12]}… "
                            f"recorded, {mig.checksum[:12]}… on disk); add a new migration instead"
                        )
                    continue
                log.info("applying %s", mig.name)
                started = time.perf_counter()
                try:
                    if mig.transactional:
                        with conn.transaction():
                            conn.execute(mig.sql)
                            _record(conn, mig, started)
                    else:
                        conn.execute(mig.sql)
                        _record(conn, mig, started)
                except psycopg.Error as exc:
                    raise MigrationError(f"{mig.name} failed: {exc}") from exc
                applied_now.append(mig.name)
        finally:
            advisory_unlock(conn, Locks.MIGRATIONS)
    return applied_now


def _record(conn: psycopg.Connection, mig: Migration, started: float) -> None:
    conn.execute(
        "INSERT INTO schema_migrations (filename, checksum, duration_ms) VALUES (%s, %s, %s)",
        (mig.name, mig.checksum, (time.perf_counter() - started) * 1000),
    )
