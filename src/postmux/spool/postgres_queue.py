"""The PostgreSQL spool's queue operations, webhook outbox and suppression list: coroutines of a connection.

The same statements as sqlite_queue.py, sqlite_outbox.py and sqlite_suppression.py, in PostgreSQL's
words. Changes run in the spool's writer transaction (postgres.py); reads on a pooled connection beside it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any

import asyncpg

from postmux.body import HEADER_LIMIT
from postmux.envelope import Envelope
from postmux.spool import queue_sql
from postmux.spool.base import OutboxBacklog, OutboxEntry, OutboxRow, Suppression
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
from postmux.spool.postgres_schema import OUTBOX_LOCK

_QUEUED = (RecipientState.QUEUED,)
_HELD = (RecipientState.HELD,)
_WAITING = (RecipientState.QUEUED, RecipientState.HELD)

_MESSAGE_COLUMNS = "id, sender, created, octet_length(data), client_ip, smtputf8, message_id_header, labels"

QueueDsn = Callable[[asyncpg.Connection, Envelope, str, float], Awaitable[None]]


def numbered(sql: str, first: int = 1) -> str:
    """Turn each `?` into $1, $2, ... (the selector's terms are built as SQLite's, with `?`)."""
    parts = sql.split("?")
    out = [parts[0]]
    for i, part in enumerate(parts[1:]):
        out.append(f"${first + i}{part}")
    return "".join(out)


# -- the selector in SQL (as sqlite_queue.py) -----------------------------------------------------------


def _in_list(column: str, values: list[str]) -> tuple[str, list[Any]]:
    return f"{column} = ANY(?::text[])", [values]


def _recipient_terms(
    sel: Selector, states: Collection[RecipientState] | None, prefix: str = ""
) -> tuple[list[str], list[Any]]:
    return queue_sql.recipient_terms(sel, states, _in_list, prefix)


_message_terms = queue_sql.message_terms


def _where(sel: Selector, now: float, states: Collection[RecipientState] | None) -> tuple[str, list[Any]]:
    return queue_sql.where(sel, now, states, _in_list, "true")


# -- a message and its recipients, read ------------------------------------------------------------------


async def _read_message(
    conn: asyncpg.Connection, message_id: str, limit: int | None = None, *, with_attempts: bool = False
) -> MessageView | None:
    text = "data" if limit is None else f"substring(data FROM 1 FOR {int(limit)})"
    row = await conn.fetchrow(f"SELECT {_MESSAGE_COLUMNS}, {text} FROM message WHERE id = $1", message_id)
    if row is None:
        return None
    recipients = tuple(
        queue_sql.recipient_view(list(r))
        for r in await conn.fetch(
            f"SELECT {queue_sql.RECIPIENT_COLUMNS} FROM recipient WHERE message_id = $1 ORDER BY rid",
            message_id,
        )
    )
    attempts: tuple[AttemptView, ...] = ()
    if with_attempts:
        attempts = tuple(
            AttemptView(*r)
            for r in await conn.fetch(
                "SELECT rid, member, reply, at FROM attempt WHERE message_id = $1 ORDER BY at, aid",
                message_id,
            )
        )
    values = list(row)
    return queue_sql.message_view(values[:8], recipients, bytes(values[8]), attempts)


# -- reads ---------------------------------------------------------------------------------------------


async def list_queue(
    conn: asyncpg.Connection, sel: Selector, now: float, limit: int, after: str
) -> QueuePage:
    limit = min(limit, MAX_PAGE)
    m_terms, m_params = _message_terms(sel, now, "m.")
    if sel.message_id is not None:
        m_terms.append("m.id = ?")
        m_params.append(sel.message_id)
    r_terms, r_params = _recipient_terms(sel, None)
    terms = ["m.id > ?", *m_terms]
    if r_terms:
        terms.append(f"EXISTS (SELECT 1 FROM recipient WHERE message_id = m.id AND {' AND '.join(r_terms)})")
    else:
        terms.append("EXISTS (SELECT 1 FROM recipient WHERE message_id = m.id)")
    sql = f"SELECT {_MESSAGE_COLUMNS} FROM message m WHERE {' AND '.join(terms)} ORDER BY m.id LIMIT ?"
    rows = [list(r) for r in await conn.fetch(numbered(sql), after, *m_params, *r_params, limit + 1)]
    more = len(rows) > limit
    rows = rows[:limit]
    chosen: dict[str, list[RecipientView]] = defaultdict(list)
    if rows:
        terms = ["message_id = ANY(?::text[])", *r_terms]
        for r in await conn.fetch(
            numbered(
                f"SELECT message_id, {queue_sql.RECIPIENT_COLUMNS} FROM recipient WHERE {' AND '.join(terms)}"
                " ORDER BY message_id, rid"
            ),
            [r[0] for r in rows],
            *r_params,
        ):
            values = list(r)
            chosen[values[0]].append(queue_sql.recipient_view(values[1:]))
    messages = tuple(queue_sql.message_view(r, tuple(chosen.get(r[0], ()))) for r in rows)
    return QueuePage(messages, rows[-1][0] if more else None)


async def show(conn: asyncpg.Connection, message_id: str) -> MessageView | None:
    return await _read_message(conn, message_id, with_attempts=True)


async def stats(conn: asyncpg.Connection, sel: Selector, now: float, limit: int) -> list[DestinationStats]:
    r_terms, r_params = _recipient_terms(sel, OPEN_STATES, "r.")
    m_terms, m_params = _message_terms(sel, now, "m.")
    where = " AND ".join([*r_terms, *m_terms])
    params = [*r_params, *m_params]
    rows = await conn.fetch(
        numbered(
            "SELECT r.pool, r.domain, r.state, count(*), min(m.created)"
            f" FROM recipient r JOIN message m ON m.id = r.message_id WHERE {where}"
            " GROUP BY r.pool, r.domain, r.state"
        ),
        *params,
    )
    last_error = {
        (r[0], r[1]): r[2]
        for r in await conn.fetch(
            numbered(
                "SELECT DISTINCT ON (r.pool, r.domain) r.pool, r.domain, r.last_reply"
                f" FROM recipient r JOIN message m ON m.id = r.message_id WHERE {where}"
                " AND r.last_reply != '' AND r.last_at IS NOT NULL"
                " ORDER BY r.pool, r.domain, r.last_at DESC"
            ),
            *params,
        )
    }
    counts: dict[tuple[str, str], dict[str, int]] = defaultdict(dict)
    oldest: dict[tuple[str, str], float] = {}
    for pool, domain, state, n, created in (list(r) for r in rows):
        counts[(pool, domain)][state] = n
        oldest[(pool, domain)] = min(created, oldest.get((pool, domain), created))
    found = [
        DestinationStats(key[0], key[1], n, max(0.0, now - oldest[key]), last_error.get(key, ""))
        for key, n in counts.items()
    ]
    found.sort(key=lambda d: (-d.total, d.pool, d.domain))
    return found[:limit]


# -- changes (in the writer's transaction) ---------------------------------------------------------------


async def drop_if_finished(conn: asyncpg.Connection, message_ids: Sequence[str]) -> set[str]:
    """Remove the messages none of whose recipients is still in the queue; returns those removed.

    The message rows are locked first (in id order): two nodes settling the last two recipients of one
    message at once would each see the other's still open and neither remove it; with the lock, the
    second waits for the first's commit and then sees both final.
    """
    if not message_ids:
        return set()
    await conn.execute(
        "SELECT 1 FROM message WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE", list(message_ids)
    )
    rows = await conn.fetch(
        """
        WITH gone AS (
            DELETE FROM message m WHERE m.id = ANY($1::text[]) AND NOT EXISTS (
                SELECT 1 FROM recipient r
                WHERE r.message_id = m.id AND r.state IN ('queued', 'leased', 'held'))
            RETURNING m.id, m.attempts_kept
        ), recipients AS (
            DELETE FROM recipient WHERE message_id IN (SELECT id FROM gone)
        ), attempts AS (
            DELETE FROM attempt WHERE message_id IN (SELECT id FROM gone WHERE attempts_kept)
        )
        SELECT id FROM gone
        """,
        list(message_ids),
    )
    return {r["id"] for r in rows}


def _count(status: str) -> int:
    return int(status.rsplit(" ", 1)[-1])


async def hold(conn: asyncpg.Connection, sel: Selector, now: float) -> int:
    where, params = _where(sel, now, _QUEUED)
    return _count(await conn.execute(numbered(f"UPDATE recipient SET state = 'held' WHERE {where}"), *params))


async def release(conn: asyncpg.Connection, sel: Selector, now: float) -> int:
    where, params = _where(sel, now, _HELD)
    sql = f"UPDATE recipient SET state = 'queued', due = ?, local_errors = 0 WHERE {where}"
    return _count(await conn.execute(numbered(sql), now, *params))


async def flush(conn: asyncpg.Connection, sel: Selector, now: float) -> int:
    where, params = _where(sel, now, _QUEUED)
    sql = f"UPDATE recipient SET due = ? WHERE due > ? AND {where}"
    return _count(await conn.execute(numbered(sql), now, now, *params))


async def move(conn: asyncpg.Connection, sel: Selector, pool: str, now: float) -> int:
    where, params = _where(sel, now, _WAITING)
    sql = f"UPDATE recipient SET pool = ? WHERE pool != ? AND {where}"
    return _count(await conn.execute(numbered(sql), pool, pool, *params))


async def delete(conn: asyncpg.Connection, sel: Selector, now: float) -> int:
    where, params = _where(sel, now, _WAITING)
    # One statement: the attempts go with exactly the recipients deleted. A DELETE of attempts by a
    # subquery of its own ran on its snapshot, so a recipient another node leased meanwhile (which the
    # recipient DELETE, checking the state again on the locked row, then left) lost its kept attempts.
    gone = await conn.fetch(
        numbered(
            f"WITH gone AS (DELETE FROM recipient WHERE {where} RETURNING rid, message_id),"
            " attempts AS (DELETE FROM attempt WHERE rid IN (SELECT rid FROM gone))"
            " SELECT message_id, count(*) FROM gone GROUP BY message_id"
        ),
        *params,
    )
    await drop_if_finished(conn, sorted(r[0] for r in gone))
    return sum(r[1] for r in gone)


async def bounce(
    conn: asyncpg.Connection,
    sel: Selector,
    now: float,
    reply: str,
    dsn: DsnBuilder,
    dsn_pool: DsnPool,
    queue_dsn: QueueDsn,
) -> list[Bounced]:
    where, params = _where(sel, now, _WAITING)
    # The recipients are locked as they are chosen. Chosen by a plain SELECT and updated by rid later,
    # one that another node leased in between (its _lease_due committed while this bounce was busy with
    # earlier messages) was overwritten as bounced, its DSN sent and its message removed while that node
    # delivered it. FOR UPDATE checks the state again on a row changed since this statement's snapshot
    # (PostgreSQL re-evaluates the WHERE on the newest version), so a committed lease drops out; SKIP
    # LOCKED passes over a row another transaction holds now, most likely a node leasing it (the lease
    # takes its rows the same way): its attempt decides it, as for any leased recipient, and a bounce
    # never waits on another node. Once locked, no other transaction can change a row before the commit.
    chosen: dict[str, list[int]] = defaultdict(list)
    for r in await conn.fetch(
        numbered(
            f"SELECT message_id, rid FROM recipient WHERE {where} ORDER BY message_id, rid"
            " FOR UPDATE SKIP LOCKED"
        ),
        *params,
    ):
        chosen[r[0]].append(r[1])
    bounced: list[Bounced] = []
    for message_id, rids in chosen.items():
        message = await _read_message(conn, message_id, limit=HEADER_LIMIT)
        if message is None:
            continue
        # The state is said again in the UPDATE all the same, and the DSN and the answer name the rows it
        # changed, never merely those chosen: what the sender is told is what was done.
        changed = {
            r[0]
            for r in await conn.fetch(
                "UPDATE recipient SET state = 'bounced', last_reply = $1, last_at = $2"
                " WHERE rid = ANY($3::bigint[]) AND state IN ('queued', 'held') RETURNING rid",
                reply,
                now,
                rids,
            )
        }
        recipients = tuple(r for r in message.recipients if r.rid in changed)
        if not recipients:
            continue
        envelope = dsn(message, recipients)
        if envelope is not None:
            pool = dsn_pool if isinstance(dsn_pool, str) else dsn_pool(message)
            await queue_dsn(conn, envelope, pool, now)
        await drop_if_finished(conn, [message_id])
        bounced.append(Bounced(message, recipients))
    return bounced


# -- the webhook outbox ----------------------------------------------------------------------------------


async def outbox_append(conn: asyncpg.Connection, rows: Sequence[OutboxRow]) -> None:
    """Rows in the order given. seq must be commit order across nodes (spool/base.py, outbox_head): a
    sequence alone is not (a node may take seq 7, another 8 and commit first, and a sender that read 8
    would skip 7 for good), so appends take a transaction-long advisory lock: one node's transaction
    appending outbox rows at a time, its seqs all below those of the next. Only transactions with rows
    pay it (no webhook configured: no rows, no lock)."""
    await conn.execute("SELECT pg_advisory_xact_lock($1)", OUTBOX_LOCK)
    await conn.executemany(
        "INSERT INTO webhook_outbox (endpoint, event_id, created, record) VALUES ($1, $2, $3, $4)",
        [(r.endpoint, r.event_id, r.created, r.record) for r in rows],
    )


async def outbox_head(conn: asyncpg.Connection, endpoint: str, after: int, limit: int) -> list[OutboxEntry]:
    rows = await conn.fetch(
        "SELECT seq, event_id, record, created FROM webhook_outbox"
        " WHERE endpoint = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        endpoint,
        after,
        limit,
    )
    return [OutboxEntry(r[0], r[1], r[2], r[3]) for r in rows]


async def outbox_ack(conn: asyncpg.Connection, endpoint: str, seqs: Sequence[int]) -> int:
    status = await conn.execute(
        "DELETE FROM webhook_outbox WHERE endpoint = $1 AND seq = ANY($2::bigint[])", endpoint, list(seqs)
    )
    return _count(status)


async def outbox_drop(conn: asyncpg.Connection, endpoint: str) -> int:
    return _count(await conn.execute("DELETE FROM webhook_outbox WHERE endpoint = $1", endpoint))


async def outbox_backlog(conn: asyncpg.Connection) -> list[OutboxBacklog]:
    rows = await conn.fetch(
        "SELECT DISTINCT ON (endpoint) endpoint, count(*) OVER (PARTITION BY endpoint), created"
        " FROM webhook_outbox ORDER BY endpoint, seq"
    )
    return [OutboxBacklog(r[0], r[1], r[2]) for r in rows]


# -- the suppression list --------------------------------------------------------------------------------


async def suppressions(conn: asyncpg.Connection) -> list[Suppression]:
    rows = await conn.fetch(
        "SELECT address, scope, reason, source, created, expires FROM suppression ORDER BY created, address"
    )
    return [Suppression(*r) for r in rows]


async def suppression_put(conn: asyncpg.Connection, entries: Sequence[Suppression]) -> None:
    await conn.executemany(
        "INSERT INTO suppression (address, scope, reason, source, created, expires)"
        " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (address, scope) DO UPDATE SET"
        " reason = excluded.reason, source = excluded.source, created = excluded.created,"
        " expires = excluded.expires",
        [(e.address, e.scope, e.reason, e.source, e.created, e.expires) for e in entries],
    )


async def suppression_remove(conn: asyncpg.Connection, address: str, scope: str) -> bool:
    status = await conn.execute("DELETE FROM suppression WHERE address = $1 AND scope = $2", address, scope)
    return _count(status) > 0
