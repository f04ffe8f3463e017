"""The SQLite suppression list (spool/base.py SuppressionStore): plain functions of a connection.

Writes run in the writer thread in a transaction of their own; the read of every entry at start runs
beside the writer (SqliteSpool._read_beside).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from postmux.spool.base import Suppression


def every(conn: sqlite3.Connection) -> list[Suppression]:
    rows = conn.execute(
        "SELECT address, scope, reason, source, created, expires FROM suppression ORDER BY created, address"
    ).fetchall()
    return [Suppression(*row) for row in rows]


def put(conn: sqlite3.Connection, entries: Sequence[Suppression]) -> None:
    conn.executemany(
        "INSERT OR REPLACE INTO suppression (address, scope, reason, source, created, expires)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        [(e.address, e.scope, e.reason, e.source, e.created, e.expires) for e in entries],
    )


def remove(conn: sqlite3.Connection, address: str, scope: str) -> bool:
    cur = conn.execute("DELETE FROM suppression WHERE address = ? AND scope = ?", (address, scope))
    return cur.rowcount > 0
