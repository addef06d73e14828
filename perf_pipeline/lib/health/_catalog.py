"""Catalog look-ups the health modules share."""

from __future__ import annotations

import psycopg


def relation_exists(conn: psycopg.Connection, relation: str) -> bool:
    """Whether ``relation`` resolves on the search path. Cost: one catalog look-up, no lock."""
    return conn.execute("SELECT to_regclass(%s) IS NOT NULL", (relation,)).fetchone()[0]
