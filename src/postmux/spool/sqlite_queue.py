"""The SQLite spool's queue operations: a Selector turned into SQL, and each operation on it.

Plain functions of a connection. The changes run in the writer thread of spool/sqlite.py (one SAVEPOINT
each, so an operation that fails changes nothing); the reads (list_queue, show, stats) run on a
connection of their own beside it. No index is added for them: they must not slow the work side, and an
operator's listing may read more of the queue than it shows (the costs are in spool/base.py).
"""

from __future__ import annotations

import sqlite3
from collections import defaultdict
from collections.abc import Collection
from typing import Any

from postmux.body import HEADER_LIMIT
from postmux.spool import queue_sql
from postmux.spool.bodies import BodyStore
from postmux.spool.operations import (
    MAX_PAGE,
    OPEN_STATES,
    AttemptView,
    Bounced,
    DestinationStats,
    DsnBuilder,
    DsnPool,
    MessageView,
    QueuePage,
    RecipientState,
    RecipientView,
    Selector,
)
from postmux.spool.sqlite_schema import drop_if_finished, queue_dsn

_QUEUED = (RecipientState.QUEUED,)
_HELD = (RecipientState.HELD,)
_WAITING = (RecipientState.QUEUED, RecipientState.HELD)  # what operations act on: not leased, not final

_MESSAGE_COLUMNS = (
    "id, sender, created, length(data) + seg_length, client_ip, smtputf8, message_id_header, labels"
)
_CHUNK = 500  # message ids per IN (...): well under SQLite's limit of bound parameters on any build


# -- the selector in SQL -------------------------------------------------------------------------------


def _in_list(column: str, values: list[str]) -> tuple[str, list[Any]]:
    return (f"{column} IN ({', '.join('?' * len(values))})", values) if values else ("0", [])


def _recipient_terms(
    sel: Selector, states: Collection[RecipientState] | None, prefix: str = ""
) -> tuple[list[str], list[Any]]:
    return queue_sql.recipient_terms(sel, states, _in_list, prefix)


_message_terms = queue_sql.message_terms


def _where(sel: Selector, now: float, states: Collection[RecipientState] | None) -> tuple[str, list[Any]]:
    return queue_sql.where(sel, now, states, _in_list, "1")


# -- a message and its recipients, read ------------------------------------------------------------------


def _read_message(
    conn: sqlite3.Connection,
    bodies: BodyStore,
    message_id: str,
    limit: int | None = None,
    *,
    with_attempts: bool = False,
) -> MessageView | None:
    """The message with its text (an operator's view), or with at most `limit` octets of its segment (a
    DSN's source, which quotes only the header section: a 50 MB text is not read for a bounce), and its
    attempts when asked.

    Its text is None when its segment file is gone (it was delivered between the two reads, or the spool
    is damaged).
    """
    row = conn.execute(
        f"SELECT {_MESSAGE_COLUMNS}, data, seg, seg_offset, seg_length FROM message WHERE id = ?",
        (message_id,),
    ).fetchone()
    if row is None:
        return None
    data: bytes | None
    try:
        data = bodies.joined(row[8], row[9], row[10], row[11], limit)
    except OSError:
        data = None
    recipients = tuple(
        queue_sql.recipient_view(r)
        for r in conn.execute(
            f"SELECT {queue_sql.RECIPIENT_COLUMNS} FROM recipient WHERE message_id = ? ORDER BY rid",
            (message_id,),
        )
    )
    attempts: tuple[AttemptView, ...] = ()
    if with_attempts:
        attempts = tuple(
            AttemptView(*r)
            for r in conn.execute(
                "SELECT rid, member, reply, at FROM attempt WHERE message_id = ? ORDER BY at, aid",
                (message_id,),
            )
        )
    return queue_sql.message_view(row[:8], recipients, data, attempts)


# -- reads ---------------------------------------------------------------------------------------------


def list_queue(conn: sqlite3.Connection, sel: Selector, now: float, limit: int, after: str) -> QueuePage:
    if limit < 1:
        raise ValueError(f"a page holds at least one message, not {limit}")
    limit = min(limit, MAX_PAGE)
    m_terms, m_params = _message_terms(sel, now, "m.")
    if sel.message_id is not None:  # straight to it through the primary key, not a walk of the queue
        m_terms.append("m.id = ?")
        m_params.append(sel.message_id)
    r_terms, r_params = _recipient_terms(sel, None)
    terms = ["m.id > ?", *m_terms]
    if r_terms:
        terms.append(f"EXISTS (SELECT 1 FROM recipient WHERE message_id = m.id AND {' AND '.join(r_terms)})")
    else:
        terms.append("EXISTS (SELECT 1 FROM recipient WHERE message_id = m.id)")
    rows = conn.execute(
        f"SELECT {_MESSAGE_COLUMNS} FROM message m WHERE {' AND '.join(terms)} ORDER BY m.id LIMIT ?",
        [after, *m_params, *r_params, limit + 1],
    ).fetchall()
    more = len(rows) > limit
    rows = rows[:limit]
    chosen = _chosen_recipients(conn, [r[0] for r in rows], r_terms, r_params)
    messages = tuple(queue_sql.message_view(r, tuple(chosen.get(r[0], ()))) for r in rows)
    return QueuePage(messages, rows[-1][0] if more else None)


def _chosen_recipients(
    conn: sqlite3.Connection, message_ids: list[str], r_terms: list[str], r_params: list[Any]
) -> dict[str, list[RecipientView]]:
    chosen: dict[str, list[RecipientView]] = defaultdict(list)
    for i in range(0, len(message_ids), _CHUNK):
        ids = message_ids[i : i + _CHUNK]
        terms = [f"message_id IN ({', '.join('?' * len(ids))})", *r_terms]
        for row in conn.execute(
            f"SELECT message_id, {queue_sql.RECIPIENT_COLUMNS} FROM recipient WHERE {' AND '.join(terms)}"
            " ORDER BY message_id, rid",
            [*ids, *r_params],
        ):
            chosen[row[0]].append(queue_sql.recipient_view(row[1:]))
    return chosen


def show(conn: sqlite3.Connection, bodies: BodyStore, message_id: str) -> MessageView | None:
    return _read_message(conn, bodies, message_id, with_attempts=True)


def stats(conn: sqlite3.Connection, sel: Selector, now: float, limit: int) -> list[DestinationStats]:
    r_terms, r_params = _recipient_terms(sel, OPEN_STATES, "r.")
    m_terms, m_params = _message_terms(sel, now, "m.")
    where = " AND ".join([*r_terms, *m_terms])
    params = [*r_params, *m_params]
    rows = conn.execute(
        "SELECT r.pool, r.domain, r.state, count(*), min(m.created)"
        f" FROM recipient r JOIN message m ON m.id = r.message_id WHERE {where}"
        " GROUP BY r.pool, r.domain, r.state",
        params,
    ).fetchall()
    # SQLite's bare column: beside one max(), r.last_reply comes from the row that holds the maximum, so
    # this is each group's reply recorded last (work settled before last_at existed has none).
    last_error = {
        (pool, domain): reply
        for pool, domain, reply, _ in conn.execute(
            "SELECT r.pool, r.domain, r.last_reply, max(r.last_at)"
            f" FROM recipient r JOIN message m ON m.id = r.message_id WHERE {where}"
            " AND r.last_reply != '' AND r.last_at IS NOT NULL GROUP BY r.pool, r.domain",
            params,
        )
    }
    counts: dict[tuple[str, str], dict[str, int]] = defaultdict(dict)
    oldest: dict[tuple[str, str], float] = {}
    for pool, domain, state, n, created in rows:
        counts[(pool, domain)][state] = n
        oldest[(pool, domain)] = min(created, oldest.get((pool, domain), created))
    found = [
        DestinationStats(pool, domain, n, max(0.0, now - oldest[key]), last_error.get(key, ""))
        for key, n in counts.items()
        for pool, domain in (key,)
    ]
    found.sort(key=lambda d: (-d.total, d.pool, d.domain))
    return found[:limit]


# -- changes (in the writer thread) --------------------------------------------------------------------


def hold(conn: sqlite3.Connection, sel: Selector, now: float) -> int:
    sel.require_criterion("hold")
    where, params = _where(sel, now, _QUEUED)
    return conn.execute(f"UPDATE recipient SET state = 'held' WHERE {where}", params).rowcount


def release(conn: sqlite3.Connection, sel: Selector, now: float) -> int:
    sel.require_criterion("release")
    # The crash count starts again: the operator released it because the fault is believed fixed, and a
    # message that still crashes gets the full count before it is held again. Rounds are kept, so the
    # retry schedule and max_age go on where they were (mail past max_age gets one try, then expires,
    # as Postfix does with mail released from its hold queue).
    where, params = _where(sel, now, _HELD)
    return conn.execute(
        f"UPDATE recipient SET state = 'queued', due = ?, local_errors = 0 WHERE {where}", [now, *params]
    ).rowcount


def flush(conn: sqlite3.Connection, sel: Selector, now: float) -> int:
    sel.require_criterion("flush")
    # Only what is not due yet: one already due keeps its earlier time, and with it its place in line.
    where, params = _where(sel, now, _QUEUED)
    return conn.execute(
        f"UPDATE recipient SET due = ? WHERE due > ? AND {where}", [now, now, *params]
    ).rowcount


def move(conn: sqlite3.Connection, sel: Selector, pool: str, now: float) -> int:
    sel.require_criterion("move")
    where, params = _where(sel, now, _WAITING)
    return conn.execute(
        f"UPDATE recipient SET pool = ? WHERE pool != ? AND {where}", [pool, pool, *params]
    ).rowcount


def delete(conn: sqlite3.Connection, bodies: BodyStore, sel: Selector, now: float) -> int:
    sel.require_criterion("delete")
    where, params = _where(sel, now, _WAITING)
    touched = [m for (m,) in conn.execute(f"SELECT DISTINCT message_id FROM recipient WHERE {where}", params)]
    conn.execute(f"DELETE FROM attempt WHERE rid IN (SELECT rid FROM recipient WHERE {where})", params)
    removed = conn.execute(f"DELETE FROM recipient WHERE {where}", params).rowcount
    for message_id in touched:
        drop_if_finished(conn, bodies, message_id)
    return removed


def bounce(
    conn: sqlite3.Connection,
    bodies: BodyStore,
    sel: Selector,
    now: float,
    reply: str,
    dsn: DsnBuilder,
    dsn_pool: DsnPool,
) -> list[Bounced]:
    sel.require_criterion("bounce")
    # One job of the one writer thread: nothing leases between this SELECT and the UPDATEs below.
    where, params = _where(sel, now, _WAITING)
    chosen: dict[str, list[int]] = defaultdict(list)
    for message_id, rid in conn.execute(
        f"SELECT message_id, rid FROM recipient WHERE {where} ORDER BY message_id, rid", params
    ):
        chosen[message_id].append(rid)
    bounced: list[Bounced] = []
    for message_id, rids in chosen.items():
        message = _read_message(conn, bodies, message_id, limit=HEADER_LIMIT)
        if message is None:
            continue  # a recipient without its message: the quarantine's business at the next open
        wanted = set(rids)
        recipients = tuple(r for r in message.recipients if r.rid in wanted)
        envelope = dsn(message, recipients)
        conn.executemany(
            "UPDATE recipient SET state = 'bounced', last_reply = ?, last_at = ? WHERE rid = ?",
            [(reply, now, r) for r in rids],
        )
        if envelope is not None:
            pool = dsn_pool if isinstance(dsn_pool, str) else dsn_pool(message)
            queue_dsn(conn, bodies, envelope, pool, now)
        drop_if_finished(conn, bodies, message_id)
        bounced.append(Bounced(message, recipients))
    return bounced
