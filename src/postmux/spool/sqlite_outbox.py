"""The SQLite webhook outbox (spool/base.py WebhookOutbox): plain functions of a connection.

Appends run in the writer thread inside the caller's transaction (store, settle) or one of their own;
reads run beside the writer on a connection of their own (SqliteSpool._read_beside).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from postmux.spool.base import OutboxBacklog, OutboxEntry, OutboxRow

_CHUNK = 500  # seqs per IN (...): well under SQLite's limit of bound parameters on any build


def append(conn: sqlite3.Connection, rows: Sequence[OutboxRow]) -> None:
    """Rows in the order given: within one endpoint, that order is the order they are sent in."""
    conn.executemany(
        "INSERT INTO webhook_outbox (endpoint, event_id, created, record) VALUES (?, ?, ?, ?)",
        [(r.endpoint, r.event_id, r.created, r.record) for r in rows],
    )


def head(conn: sqlite3.Connection, endpoint: str, after: int, limit: int) -> list[OutboxEntry]:
    rows = conn.execute(
        "SELECT seq, event_id, record, created FROM webhook_outbox"
        " WHERE endpoint = ? AND seq > ? ORDER BY seq LIMIT ?",
        (endpoint, after, limit),
    ).fetchall()
    return [OutboxEntry(seq, event_id, record, created) for seq, event_id, record, created in rows]


def ack(conn: sqlite3.Connection, endpoint: str, seqs: Sequence[int]) -> int:
    removed = 0
    for i in range(0, len(seqs), _CHUNK):
        chunk = list(seqs[i : i + _CHUNK])
        cur = conn.execute(
            f"DELETE FROM webhook_outbox WHERE endpoint = ? AND seq IN ({', '.join('?' * len(chunk))})",
            [endpoint, *chunk],
        )
        removed += cur.rowcount
    return removed


def drop(conn: sqlite3.Connection, endpoint: str) -> int:
    return conn.execute("DELETE FROM webhook_outbox WHERE endpoint = ?", (endpoint,)).rowcount


def backlog(conn: sqlite3.Connection) -> list[OutboxBacklog]:
    # The index (endpoint, seq) answers the count and the head of each endpoint; the head's row gives
    # its time (seq order is commit order, so the head is the oldest but for clock steps).
    heads = conn.execute(
        "SELECT endpoint, count(*), min(seq) FROM webhook_outbox GROUP BY endpoint ORDER BY endpoint"
    ).fetchall()
    out = []
    for endpoint, n, first in heads:
        row = conn.execute("SELECT created FROM webhook_outbox WHERE seq = ?", (first,)).fetchone()
        out.append(OutboxBacklog(endpoint, n, row[0] if row else 0.0))
    return out
