"""Sending a batch of ``COPY`` lines to ``audit_log``: plain ``COPY`` for a first send, idempotent re-sends.

A batch's first send is a plain ``COPY`` into audit_log (its fresh UUIDv7 ids cannot be there yet). Every
re-send — after a failed attempt whose ``COMMIT`` may or may not have happened, or a segment replayed from
a previous process's spool — is ``COPY``-ed into a session-private ``TEMP`` staging table and moved with
``INSERT … SELECT … ON CONFLICT DO NOTHING``, so a batch already committed writes nothing twice.
"""

from __future__ import annotations

import logging

import psycopg
from psycopg import errors

from perf_pipeline.audit.events import COLUMNS

log = logging.getLogger(__name__)

_COLS_SQL = ", ".join(f'"{c}"' for c in COLUMNS)
_STAGING = "audit_log_staging"
_CREATE_STAGING = f"CREATE TEMP TABLE IF NOT EXISTS {_STAGING} (LIKE audit_log) ON COMMIT DELETE ROWS"
_COPY_STAGING = f"COPY {_STAGING} ({_COLS_SQL}) FROM STDIN"
_COPY_DIRECT = f"COPY audit_log ({_COLS_SQL}) FROM STDIN"
_MOVE_STAGING = (
    f"INSERT INTO audit_log ({_COLS_SQL}) SELECT {_COLS_SQL} FROM {_STAGING} ON CONFLICT DO NOTHING"
)


def prepare_connection(conn: psycopg.Connection) -> None:
    """Create this session's TEMP staging table (once per connection; session-private, no locks on
    audit_log; dropped by PostgreSQL when the session ends)."""
    conn.execute(_CREATE_STAGING)


def deliver_batch(conn: psycopg.Connection, payload: bytes, *, idempotent: bool = True) -> int:
    """Write one batch of COPY lines into audit_log in one transaction; returns the rows inserted.

    ``idempotent`` (any batch that may have been sent before): ``COPY`` into the TEMP staging table, then
    ``INSERT … SELECT … ON CONFLICT DO NOTHING`` into audit_log; rows whose primary key is already there
    are skipped, so re-sending a batch is harmless (~15 µs per row on the server). Otherwise (a batch
    never sent before, so none of its fresh UUIDv7 ids can exist): a plain ``COPY`` into audit_log, about
    twice as fast; a unique violation there raises ``UniqueViolation`` and nothing is written.
    Locks: ROW EXCLUSIVE on audit_log and the partitions written, like any INSERT. ``conn`` must be an
    autocommit connection on which :func:`prepare_connection` ran.
    """
    with conn.cursor() as cur:
        if not idempotent:
            # one statement in autocommit is its own transaction: no BEGIN/COMMIT round trips
            with cur.copy(_COPY_DIRECT) as copy:
                copy.write(payload)
            return cur.rowcount
        with conn.transaction():
            with cur.copy(_COPY_STAGING) as copy:
                copy.write(payload)
            cur.execute(_MOVE_STAGING)
            return cur.rowcount


def deliver_one_by_one(conn: psycopg.Connection, payload: bytes) -> tuple[int, list[bytes]]:
    """Slow path for a batch the database refused: each line in its own transaction."""
    inserted, refused = 0, []
    for line in payload.splitlines(keepends=True):
        try:
            inserted += deliver_batch(conn, line)
        except (errors.DataError, errors.IntegrityError) as exc:
            log.error("audit_log refused an event (%s): %r", exc, line[:300])
            refused.append(line)
    return inserted, refused


__all__: list[str] = ["deliver_batch", "deliver_one_by_one", "prepare_connection"]
