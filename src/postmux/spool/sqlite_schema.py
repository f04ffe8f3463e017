"""The SQLite spool's tables, their upgrade from older files, what open does before work resumes, and
the few row writes that the work side (sqlite.py) and the queue operations (sqlite_queue.py) share.

Plain functions of a connection, run by the writer thread of spool/sqlite.py. bench/queue_scale.py
imports the quarantine checks from here and copies the other statements: keep it in step.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Collection, Iterable, Mapping
from typing import Any

import structlog

from postmux.envelope import Envelope, domain_of, new_message_id
from postmux.spool.bodies import MESSAGES_IN_SEG, BodyStore, Placed
from postmux.spool.operations import AttemptView

log = structlog.get_logger("postmux.spool")

SCHEMA = """
CREATE TABLE IF NOT EXISTS message (
    id        TEXT PRIMARY KEY,
    sender    TEXT NOT NULL,
    client_ip TEXT NOT NULL DEFAULT '',
    smtputf8  INTEGER NOT NULL DEFAULT 0,
    created   REAL NOT NULL,
    data      BLOB NOT NULL,
    seg        TEXT NOT NULL DEFAULT '',
    seg_offset INTEGER NOT NULL DEFAULT 0,
    seg_length INTEGER NOT NULL DEFAULT 0,
    clean      INTEGER NOT NULL DEFAULT 0,
    message_id_header TEXT NOT NULL DEFAULT '',
    labels     TEXT NOT NULL DEFAULT '',
    attempts_kept INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS recipient (
    rid         INTEGER PRIMARY KEY,
    message_id  TEXT NOT NULL REFERENCES message(id),
    address     TEXT NOT NULL,
    pool        TEXT NOT NULL,
    domain      TEXT NOT NULL,
    state       TEXT NOT NULL,
    due         REAL NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    last_reply  TEXT NOT NULL DEFAULT '',
    rounds      INTEGER NOT NULL DEFAULT 0,
    local_errors INTEGER NOT NULL DEFAULT 0,
    owner       TEXT NOT NULL DEFAULT '',
    lease_until REAL,
    last_member TEXT NOT NULL DEFAULT '',
    last_at     REAL
);
CREATE INDEX IF NOT EXISTS recipient_due ON recipient(state, due);
CREATE INDEX IF NOT EXISTS recipient_message ON recipient(message_id);
-- The attempts kept for the operator's `postmux queue show` (Settlement.member): one row per recipient
-- per attempt, written in the settle transaction for recipients that stay in the queue, removed with
-- their message. A spool file from before it gets the table at open (CREATE ... IF NOT EXISTS).
CREATE TABLE IF NOT EXISTS attempt (
    aid         INTEGER PRIMARY KEY,
    message_id  TEXT NOT NULL,
    rid         INTEGER NOT NULL,
    member      TEXT NOT NULL,
    reply       TEXT NOT NULL,
    at          REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS attempt_message ON attempt(message_id);
-- Requests answered under an idempotency key (the submission API's Idempotency-Key): written in the same
-- transaction as the messages they stored, so a replay finds either both or neither.
CREATE TABLE IF NOT EXISTS idempotency (
    client       TEXT NOT NULL,
    key          TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    answer       TEXT NOT NULL,
    created      REAL NOT NULL,
    expires      REAL NOT NULL,
    PRIMARY KEY (client, key)
);
CREATE INDEX IF NOT EXISTS idempotency_expires ON idempotency(expires);
-- Rows found unusable at open, moved aside with the reason so an operator can look (or repair and re-add).
-- The webhook outbox (events/webhooks.py): an event record per endpoint that asked for it, appended in the
-- transaction of the change it reports, removed when the endpoint acknowledged it. seq orders one
-- endpoint's rows as they were committed; AUTOINCREMENT so a seq is never reused, even after the newest
-- row went (a sender's place is "after seq N").
CREATE TABLE IF NOT EXISTS webhook_outbox (
    seq       INTEGER PRIMARY KEY AUTOINCREMENT,
    endpoint  TEXT NOT NULL,
    event_id  TEXT NOT NULL,
    created   REAL NOT NULL,
    record    TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS webhook_outbox_endpoint ON webhook_outbox(endpoint, seq);
-- The suppression list (postmux.reputation.suppression): recipients (or *@domain) who get no more mail,
-- per scope ('global', 'sender_domain:D', 'api_key:K'); expires NULL: until removed. Read whole at start
-- into the node's index; written one entry at a time. A spool file from before gets it at open.
CREATE TABLE IF NOT EXISTS suppression (
    address   TEXT NOT NULL,
    scope     TEXT NOT NULL,
    reason    TEXT NOT NULL,
    source    TEXT NOT NULL,
    created   REAL NOT NULL,
    expires   REAL,
    PRIMARY KEY (address, scope)
);
CREATE TABLE IF NOT EXISTS quarantine (
    qid         INTEGER PRIMARY KEY,
    source      TEXT NOT NULL,
    key         TEXT NOT NULL,
    reason      TEXT NOT NULL,
    quarantined REAL NOT NULL,
    fields      TEXT NOT NULL,
    data        BLOB
);
"""

# Columns added after the first schema: a spool file written by an older postmux gets them at open
# (ADD COLUMN fills every existing row with the default). Existing deferred work starts at round 0, so it
# waits the first interval after its next round: a few early retries, never a longer wait than before.
# owner and lease_until: who holds a lease and until when (NULL: it does not expire); they mean something
# only while the recipient is leased, and every lease is written with both.
_ADDED_COLUMNS = (
    ("recipient", "rounds", "INTEGER NOT NULL DEFAULT 0"),
    ("recipient", "local_errors", "INTEGER NOT NULL DEFAULT 0"),
    ("recipient", "owner", "TEXT NOT NULL DEFAULT ''"),
    ("recipient", "lease_until", "REAL"),
    # The text is `data` then seg_length octets at seg_offset of segment file `seg` (spool/bodies.py);
    # clean: ingress found it needs no repair on the wire (postmux.body).
    ("message", "seg", "TEXT NOT NULL DEFAULT ''"),
    ("message", "seg_offset", "INTEGER NOT NULL DEFAULT 0"),
    ("message", "seg_length", "INTEGER NOT NULL DEFAULT 0"),
    ("message", "clean", "INTEGER NOT NULL DEFAULT 0"),
    # For events: the Message-ID header field, and the sender's tags and metadata as JSON
    # {"tags": {...}, "metadata": {...}} ('' when it gave none: nothing to encode on the hot path).
    ("message", "message_id_header", "TEXT NOT NULL DEFAULT ''"),
    ("message", "labels", "TEXT NOT NULL DEFAULT ''"),
    # The member of the recipient's last attempt and when its last outcome was recorded (the selector's
    # `member`, the summary's last error); work settled before them has '' and NULL.
    ("recipient", "last_member", "TEXT NOT NULL DEFAULT ''"),
    ("recipient", "last_at", "REAL"),
    # 1 once the attempt table holds rows of the message: only then does its removal look there, so the
    # usual message, delivered at its first attempt, is removed with no more statements than before.
    ("message", "attempts_kept", "INTEGER NOT NULL DEFAULT 0"),
)

# Indexes on added columns, made once the columns are there. recipient_lease holds only leases that can
# run out, for lease_due's search of expired ones: a spool whose leases do not expire (SQLite's default)
# keeps it empty, so leasing and settling cost what they did before it.
_LATER_INDEXES = """
CREATE INDEX IF NOT EXISTS recipient_lease ON recipient(lease_until)
    WHERE state = 'leased' AND lease_until IS NOT NULL;
CREATE INDEX IF NOT EXISTS message_seg ON message(seg) WHERE seg != '';
"""


def prepare(conn: sqlite3.Connection) -> None:
    """Create what is missing and upgrade an older file; safe to run at every open."""
    conn.executescript(SCHEMA)
    for table, column, declaration in _ADDED_COLUMNS:
        present = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if column not in present:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
            log.info("spool schema upgraded", table=table, column=column)
    conn.executescript(_LATER_INDEXES)


def recover(conn: sqlite3.Connection) -> int:
    # One process owns a SQLite spool, so every lease found at open was held by a process that died.
    # Held work stays held: only an operator's release queues it again.
    cur = conn.execute("UPDATE recipient SET state = 'queued' WHERE state = 'leased'")
    return cur.rowcount


# -- rows written by more than one operation ---------------------------------------------------------


def insert_message(
    conn: sqlite3.Connection, bodies: BodyStore, message_id: str, env: Envelope, now: float
) -> Placed:
    """The message row, its text placed by the body store (in the row, or in a segment file)."""
    placed = bodies.place(env.data, env.tail)
    conn.execute(
        "INSERT INTO message (id, sender, client_ip, smtputf8, created, data, seg, seg_offset, seg_length,"
        " clean, message_id_header, labels) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            message_id,
            env.sender,
            env.client_ip,
            int(env.smtputf8),
            now,
            placed.inline,
            placed.seg,
            placed.offset,
            placed.length,
            int(env.clean),
            env.message_id_header,
            encode_labels(env.tags, env.metadata),
        ),
    )
    return placed


def encode_labels(tags: Mapping[str, str], metadata: Mapping[str, str]) -> str:
    """The sender's tags and metadata as stored: '' when there are none (most mail), else JSON."""
    if not tags and not metadata:
        return ""
    return json.dumps({"tags": dict(tags), "metadata": dict(metadata)}, separators=(",", ":"))


def decode_labels(stored: str) -> tuple[dict[str, str], dict[str, str]]:
    """encode_labels read back; a value that is not what it wrote reads as none (events lose labels, not
    mail)."""
    if not stored:
        return {}, {}
    try:
        value = json.loads(stored)
        tags, metadata = value.get("tags") or {}, value.get("metadata") or {}
    except (ValueError, AttributeError):
        return {}, {}
    if not isinstance(tags, dict) or not isinstance(metadata, dict):
        return {}, {}
    return {str(k): str(v) for k, v in tags.items()}, {str(k): str(v) for k, v in metadata.items()}


def queue_dsn(conn: sqlite3.Connection, bodies: BodyStore, dsn: Envelope, pool: str, now: float) -> None:
    """A DSN is a new message of its own, due now: written in the caller's transaction with its bounce."""
    dsn_id = new_message_id()
    insert_message(conn, bodies, dsn_id, dsn, now)
    for address in dsn.recipients:
        conn.execute(
            "INSERT INTO recipient (message_id, address, pool, domain, state, due)"
            " VALUES (?, ?, ?, ?, 'queued', ?)",
            (dsn_id, address, pool, domain_of(address), now),
        )


def drop_if_finished(conn: sqlite3.Connection, bodies: BodyStore, message_id: str) -> bool:
    """Remove a message none of whose recipients is still in the queue (every one final, or none left).

    Returns whether it was removed."""
    (open_count,) = conn.execute(
        "SELECT count(*) FROM recipient WHERE message_id = ? AND state IN ('queued', 'leased', 'held')",
        (message_id,),
    ).fetchone()
    if open_count == 0:
        conn.execute("DELETE FROM recipient WHERE message_id = ?", (message_id,))
        delete_message(conn, bodies, message_id)
        return True
    return False


def delete_message(conn: sqlite3.Connection, bodies: BodyStore, message_id: str) -> None:
    """The message row goes with its attempts, and its segment file once no other row names it."""
    gone = conn.execute(
        "DELETE FROM message WHERE id = ? RETURNING seg, attempts_kept", (message_id,)
    ).fetchall()
    for seg, attempts_kept in gone:
        if attempts_kept:
            conn.execute("DELETE FROM attempt WHERE message_id = ?", (message_id,))
        bodies.release(conn, seg)


def record_attempts(conn: sqlite3.Connection, message_id: str, attempts: Iterable[AttemptView]) -> None:
    """Keep attempts for the operator's view (spool/base.py, Settlement.member and earlier)."""
    rows = [(message_id, a.rid, a.member, a.reply, a.at) for a in attempts]
    if not rows:
        return
    conn.executemany("INSERT INTO attempt (message_id, rid, member, reply, at) VALUES (?, ?, ?, ?, ?)", rows)
    conn.execute("UPDATE message SET attempts_kept = 1 WHERE id = ? AND attempts_kept = 0", (message_id,))


# -- the quarantine ----------------------------------------------------------------------------------

# Rows no delivery could use: each query names the rows and why. Typed checks because SQLite stores any
# type in any column (a damaged or hand-edited file can hold text where the message bytes should be).
BAD_MESSAGES = """
SELECT id, CASE
    WHEN typeof(data) != 'blob' THEN 'message data is ' || typeof(data) || ', not bytes'
    WHEN typeof(sender) != 'text' THEN 'sender is ' || typeof(sender) || ', not text'
    WHEN typeof(created) NOT IN ('real', 'integer') THEN 'created is ' || typeof(created) || ', not a time'
    ELSE 'message has no recipients' END
FROM message m
WHERE typeof(data) != 'blob' OR typeof(sender) != 'text' OR typeof(created) NOT IN ('real', 'integer')
   OR NOT EXISTS (SELECT 1 FROM recipient r WHERE r.message_id = m.id)
"""
BAD_RECIPIENTS = """
SELECT rid, CASE
    WHEN state NOT IN ('queued', 'leased', 'held', 'delivered', 'bounced', 'expired')
        THEN 'unknown state ' || quote(state)
    WHEN typeof(address) != 'text' OR address = '' THEN 'address is not a non-empty text'
    WHEN typeof(pool) != 'text' OR typeof(domain) != 'text' THEN 'pool or domain is not text'
    WHEN typeof(due) NOT IN ('real', 'integer') THEN 'due is not a time'
    WHEN typeof(attempts) != 'integer' OR typeof(rounds) != 'integer' OR typeof(local_errors) != 'integer'
        THEN 'attempts, rounds or local_errors is not an integer'
    ELSE 'its message is missing' END
FROM recipient r
WHERE state NOT IN ('queued', 'leased', 'held', 'delivered', 'bounced', 'expired')
   OR typeof(address) != 'text' OR address = '' OR typeof(pool) != 'text' OR typeof(domain) != 'text'
   OR typeof(due) NOT IN ('real', 'integer')
   OR typeof(attempts) != 'integer' OR typeof(rounds) != 'integer' OR typeof(local_errors) != 'integer'
   OR NOT EXISTS (SELECT 1 FROM message m WHERE m.id = r.message_id)
"""


def quarantine(
    conn: sqlite3.Connection, now: float, bodies: BodyStore | None = None, missing: Collection[str] = ()
) -> int:
    """Move unusable rows to the quarantine table, so one bad row cannot stop the recovery of the rest.

    A bad recipient goes alone (recipients first, so a message it leaves without recipients follows in
    the same pass); a bad message takes its recipients along (they cannot be delivered without it).
    `missing`: segment files the rows name that are gone (BodyStore.sweep): their messages are bad too.
    """
    moved = 0
    for rid, reason in conn.execute(BAD_RECIPIENTS).fetchall():
        moved += _quarantine_recipient(conn, rid, reason, now)
    bad: dict[str, str] = dict(conn.execute(BAD_MESSAGES).fetchall())
    for seg in missing:
        for (message_id,) in conn.execute(MESSAGES_IN_SEG, (seg,)).fetchall():
            bad.setdefault(message_id, f"message text missing: segment file {seg} is gone")
    for message_id, reason in bad.items():
        row = conn.execute(
            "SELECT id, sender, client_ip, smtputf8, created, data FROM message WHERE id = ?", (message_id,)
        ).fetchone()
        data = row[5] if isinstance(row[5], bytes) else None
        _quarantine_row(conn, "message", str(message_id), reason, now, row[:5], data)
        for rid, reason_r in conn.execute(
            "SELECT rid, 'its message was quarantined' FROM recipient WHERE message_id = ?", (message_id,)
        ).fetchall():
            moved += _quarantine_recipient(conn, rid, reason_r, now)
        if bodies is not None:
            delete_message(conn, bodies, message_id)
        else:
            conn.execute("DELETE FROM attempt WHERE message_id = ?", (message_id,))
            conn.execute("DELETE FROM message WHERE id = ?", (message_id,))
        moved += 1
    return moved


def _quarantine_recipient(conn: sqlite3.Connection, rid: int, reason: str, now: float) -> int:
    row = conn.execute("SELECT * FROM recipient WHERE rid = ?", (rid,)).fetchone()
    _quarantine_row(conn, "recipient", str(rid), reason, now, tuple(row), None)
    conn.execute("DELETE FROM recipient WHERE rid = ?", (rid,))
    return 1


def _quarantine_row(
    conn: sqlite3.Connection,
    source: str,
    key: str,
    reason: str,
    now: float,
    fields: tuple[Any, ...],
    data: bytes | None,
) -> None:
    text = json.dumps([f if isinstance(f, str | int | float | None) else repr(f) for f in fields])
    conn.execute(
        "INSERT INTO quarantine (source, key, reason, quarantined, fields, data) VALUES (?, ?, ?, ?, ?, ?)",
        (source, key, reason, now, text, data),
    )
