"""``archive_manifest``: one row per archived (table, month), its state and the facts of its file.

A month's state moves ``detached`` → ``exported`` → ``verified`` → ``dropped`` (and ``restored`` once it
is loaded back); :class:`State` names these stored strings. Each change is written in the transaction of
the step it records.
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass

import psycopg
from psycopg import sql

from perf_pipeline.lib.partitioning import MonthPartition


class ArchiveError(RuntimeError):
    """A file does not match its manifest or table, or a month is in a state that forbids the request."""


class State(enum.StrEnum):
    """``archive_manifest.state``: the values are the strings stored in the table (and its CHECK)."""

    DETACHED = "detached"  # the month's table is detached from its parent (rows invisible to queries)
    EXPORTED = "exported"  # its file is written; file_path, rows, bytes, sha256, min/max recorded
    VERIFIED = "verified"  # the file was read back and matched the manifest and the table
    DROPPED = "dropped"  # the table is dropped: the file is the month
    RESTORED = "restored"  # loaded back from the file and attached again


class Attachment(enum.StrEnum):
    """Where a month's table stands relative to its parent, from the catalog (:func:`attach_state`)."""

    ATTACHED = "attached"
    DETACH_PENDING = "detach_pending"  # an interrupted DETACH … CONCURRENTLY
    STANDALONE = "standalone"
    ABSENT = "absent"


#: states of an archive that stopped half-way: the month's table is detached, its rows invisible to queries
UNFINISHED: tuple[State, ...] = (State.DETACHED, State.EXPORTED, State.VERIFIED)


@dataclass(frozen=True)
class ManifestRow:
    table_name: str
    month: dt.date
    partition_name: str
    state: str  # one of State's values, as stored (a plain str: it goes into Dagster metadata and tags)
    file_path: str | None
    rows: int | None
    bytes: int | None
    sha256: str | None
    min_ts: dt.datetime | None
    max_ts: dt.datetime | None
    archive_count: int
    etag: str | None = None
    version_id: str | None = None
    verified_at: dt.datetime | None = None


_MANIFEST_COLUMNS = (
    "table_name, month, partition_name, state, file_path, rows, bytes, sha256, min_ts, max_ts, archive_count, "
    "etag, version_id, verified_at"
)


def manifest_row(conn: psycopg.Connection, table: str, month: dt.date) -> ManifestRow | None:
    """The manifest row of ``table``'s ``month`` (its first day), or None. One primary-key read."""
    row = conn.execute(
        sql.SQL("SELECT {} FROM archive_manifest WHERE table_name = %s AND month = %s").format(
            sql.SQL(_MANIFEST_COLUMNS)
        ),
        (table, month),
    ).fetchone()
    return ManifestRow(*row) if row else None


def list_manifest(conn: psycopg.Connection, table: str | None = None) -> list[ManifestRow]:
    """Every manifest row (of ``table`` if given), oldest month first."""
    rows = conn.execute(
        sql.SQL(
            "SELECT {} FROM archive_manifest WHERE %(t)s::text IS NULL OR table_name = %(t)s "
            "ORDER BY table_name, month"
        ).format(sql.SQL(_MANIFEST_COLUMNS)),
        {"t": table},
    ).fetchall()
    return [ManifestRow(*r) for r in rows]


def set_state(conn: psycopg.Connection, part: MonthPartition, state: State, **values: object) -> None:
    """Set a month's state (and columns); inserts the row on the first step. Caller's transaction."""
    cols = ["state", *values]
    params = {
        "table": part.table,
        "month": part.month,
        "name": part.name,
        "state": State(state).value,
        **values,
    }
    # UPDATE first: an INSERT … ON CONFLICT would check the table's CHECKs against the bare insert row
    updated = conn.execute(
        sql.SQL(
            "UPDATE archive_manifest SET {sets}, updated_at = now() WHERE table_name = %(table)s AND month = %(month)s"
        ).format(
            sets=sql.SQL(", ").join(
                sql.SQL("{} = {}").format(sql.Identifier(c), sql.Placeholder(c)) for c in cols
            )
        ),
        params,
    ).rowcount
    if not updated:
        conn.execute(
            sql.SQL(
                "INSERT INTO archive_manifest (table_name, month, partition_name, {cols}) "
                "VALUES (%(table)s, %(month)s, %(name)s, {vals})"
            ).format(
                cols=sql.SQL(", ").join(map(sql.Identifier, cols)),
                vals=sql.SQL(", ").join(sql.Placeholder(c) for c in cols),
            ),
            params,
        )


def attach_state(conn: psycopg.Connection, table: str, name: str) -> Attachment:
    """Whether table ``name`` is attached to parent ``table``, half-detached, standalone or absent. One
    catalog read."""
    row = conn.execute(
        "SELECT i.inhdetachpending FROM pg_class c LEFT JOIN pg_inherits i "
        "ON i.inhrelid = c.oid AND i.inhparent = %s::regclass "
        "WHERE c.relname = %s AND c.relnamespace = current_schema()::regnamespace",
        (table, name),
    ).fetchone()
    if row is None:
        return Attachment.ABSENT
    if row[0] is None:
        return Attachment.STANDALONE
    return Attachment.DETACH_PENDING if row[0] else Attachment.ATTACHED


def has_default(conn: psycopg.Connection, part: MonthPartition) -> bool:
    """Whether ``part``'s parent has its DEFAULT partition attached. One catalog read."""
    return attach_state(conn, part.table, part.default) == Attachment.ATTACHED


def db_now(conn: psycopg.Connection) -> dt.datetime:
    """The database's ``statement_timestamp()`` (the clock the manifest's timestamps use)."""
    return conn.execute("SELECT statement_timestamp()").fetchone()[0]
