"""SQLite spool: WAL, synchronous=FULL, one writer thread, group commit.

Every request is a small function run by the one writer thread against its connection. The thread
takes whatever requests are waiting (up to `max_batch`), runs each inside a SAVEPOINT (so one bad
request fails alone), and commits them all at once: one fsync answers every caller in the batch.
That is what lets a relay accept faster than the disk can fsync (peers.md: ~1,100-1,400 fsync/s).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import structlog

from postmux.envelope import Envelope, domain_of, new_message_id
from postmux.spool.base import (
    FINAL_STATES,
    RecipientState,
    Settlement,
    SpoolError,
    WorkItem,
    WorkRecipient,
)
from postmux.spool.lock import SpoolLock

T = TypeVar("T")
log = structlog.get_logger("postmux.spool")

SCHEMA = """
CREATE TABLE IF NOT EXISTS message (
    id        TEXT PRIMARY KEY,
    sender    TEXT NOT NULL,
    client_ip TEXT NOT NULL DEFAULT '',
    smtputf8  INTEGER NOT NULL DEFAULT 0,
    created   REAL NOT NULL,
    data      BLOB NOT NULL
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
    local_errors INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS recipient_due ON recipient(state, due);
CREATE INDEX IF NOT EXISTS recipient_message ON recipient(message_id);
-- Rows found unusable at open, moved aside with the reason so an operator can look (or repair and re-add).
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
_ADDED_COLUMNS = (
    ("recipient", "rounds", "INTEGER NOT NULL DEFAULT 0"),
    ("recipient", "local_errors", "INTEGER NOT NULL DEFAULT 0"),
)

_Job = tuple[Callable[[sqlite3.Connection], Any], Future[Any]]
_STOP = object()


class SqliteSpool:
    """The embedded single-node spool. One process owns the file; at open, its leases are reclaimed."""

    def __init__(self, path: str | Path, *, group_commit: bool = True, max_batch: int = 1000) -> None:
        self.path = Path(path)
        self.group_commit = group_commit
        self.max_batch = max_batch if group_commit else 1
        self._jobs: queue.SimpleQueue[_Job | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closing = False
        self.commits = 0  # how many fsyncs were paid, to show what group commit buys
        self.quarantined = 0  # rows moved to the quarantine table at the last open
        self._lock = SpoolLock(self.path)

    # -- the writer thread -------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: the WAL is fsync'd at every commit, so a committed message survives power loss.
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=OFF")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.executescript(SCHEMA)
        _migrate(conn)
        return conn

    def _run(self, conn: sqlite3.Connection) -> None:
        while True:
            first = self._jobs.get()
            if first is _STOP:
                self._refuse_late_jobs()
                conn.close()
                return
            batch: list[_Job] = [first]  # type: ignore[list-item]
            stop = False
            while len(batch) < self.max_batch:
                try:
                    nxt = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                batch.append(nxt)  # type: ignore[arg-type]
            # A caller that gave up (its task was cancelled) before its turn is not run at all; the rest
            # are marked running, which makes them uncancellable, so their results can always be set.
            batch = [job for job in batch if job[1].set_running_or_notify_cancel()]
            if batch:
                self._commit_safely(conn, batch)
            if stop:
                self._refuse_late_jobs()
                conn.close()
                return

    def _commit_safely(self, conn: sqlite3.Connection, batch: list[_Job]) -> None:
        """The one writer must outlive any surprise: a batch that breaks fails its callers, the next runs."""
        try:
            self._commit_batch(conn, batch)
        except Exception as e:
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(SpoolError(f"spool writer failed: {e}"))

    def _refuse_late_jobs(self) -> None:
        """Requests queued behind the stop get a clear error instead of waiting forever."""
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is not _STOP and job[1].set_running_or_notify_cancel():  # type: ignore[index]
                job[1].set_exception(SpoolError("spool is closing"))  # type: ignore[index]

    def _commit_batch(self, conn: sqlite3.Connection, batch: list[_Job]) -> None:
        results: list[tuple[Future[Any], Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for fn, fut in batch:
                conn.execute("SAVEPOINT job")
                try:
                    value = fn(conn)
                except Exception as e:
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    results.append((fut, None, e))
                else:
                    conn.execute("RELEASE job")
                    results.append((fut, value, None))
            conn.execute("COMMIT")
            self.commits += 1
        except Exception as e:
            # The commit itself failed (disk full, I/O error): nothing in the batch is durable.
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            results = [(fut, None, e) for _, fut in batch]
        for fut, value, err in results:
            if err is None:
                fut.set_result(value)
            else:
                fut.set_exception(err)

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._thread is None or self._closing:
            raise SpoolError("spool is not open")
        fut: Future[T] = Future()
        self._jobs.put((fn, fut))
        try:
            return await asyncio.wrap_future(fut)
        except sqlite3.Error as e:
            raise SpoolError(str(e), disk_full=_is_disk_full(e)) from e

    # -- the Spool protocol ------------------------------------------------------------------------

    async def open(self) -> int:
        # The lock comes before recovery: recovering a live process's leases would deliver them twice.
        self._lock.acquire()
        try:
            conn = await asyncio.to_thread(self._connect)
        except BaseException:
            self._lock.release()
            raise
        self._thread = threading.Thread(target=self._run, args=(conn,), name="postmux-spool", daemon=True)
        self._thread.start()
        self._closing = False
        try:
            self.quarantined = await self._call(lambda c: _quarantine(c, time.time()))
            if self.quarantined:
                log.error("spool rows quarantined at open", rows=self.quarantined, table="quarantine")
            return await self._call(_recover)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._thread is None:
            self._lock.release()
            return
        self._closing = True
        self._jobs.put(_STOP)
        await asyncio.to_thread(self._thread.join)
        self._thread = None
        self._lock.release()

    async def store(
        self, message_id: str, envelope: Envelope, pools: Mapping[str, str], now: float, *, lease: bool = True
    ) -> list[WorkItem]:
        return await self._call(lambda c: _store(c, message_id, envelope, pools, now, lease))

    async def settle(self, settlements: Sequence[Settlement], now: float) -> None:
        await self._call(lambda c: _settle(c, settlements, now))

    async def lease_due(self, now: float, limit: int) -> list[WorkItem]:
        return await self._call(lambda c: _lease_due(c, now, limit))

    async def release(self, message_id: str, now: float) -> int:
        return await self._call(lambda c: _release(c, message_id, now))

    async def counts(self) -> dict[str, int]:
        """Counted on a connection of its own in a worker thread: WAL lets it read while the writer
        writes, and a count over a million rows (bench/queue_scale: 36 ms) must not hold up accepts."""
        if self._thread is None or self._closing:
            raise SpoolError("spool is not open")
        try:
            return await asyncio.to_thread(self._read, _counts)
        except sqlite3.Error as e:
            raise SpoolError(str(e)) from e

    def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            conn.execute("PRAGMA busy_timeout=5000")
            return fn(conn)
        finally:
            conn.close()


def _migrate(conn: sqlite3.Connection) -> None:
    for table, column, declaration in _ADDED_COLUMNS:
        present = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if column not in present:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
            log.info("spool schema upgraded", table=table, column=column)


def _is_disk_full(e: sqlite3.Error) -> bool:
    # SQLITE_FULL (13): the disk or the file system quota is full; the primary code is the low byte.
    return (getattr(e, "sqlite_errorcode", 0) & 0xFF) == sqlite3.SQLITE_FULL


# -- what the writer thread runs (plain functions of a connection) -----------------------------------

# Rows no delivery could use: each query names the rows and why. Typed checks because SQLite stores any
# type in any column (a damaged or hand-edited file can hold text where the message bytes should be).
_BAD_MESSAGES = """
SELECT id, CASE
    WHEN typeof(data) != 'blob' THEN 'message data is ' || typeof(data) || ', not bytes'
    WHEN typeof(sender) != 'text' THEN 'sender is ' || typeof(sender) || ', not text'
    WHEN typeof(created) NOT IN ('real', 'integer') THEN 'created is ' || typeof(created) || ', not a time'
    ELSE 'message has no recipients' END
FROM message m
WHERE typeof(data) != 'blob' OR typeof(sender) != 'text' OR typeof(created) NOT IN ('real', 'integer')
   OR NOT EXISTS (SELECT 1 FROM recipient r WHERE r.message_id = m.id)
"""
_BAD_RECIPIENTS = """
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


def _quarantine(conn: sqlite3.Connection, now: float) -> int:
    """Move unusable rows to the quarantine table, so one bad row cannot stop the recovery of the rest.

    A bad recipient goes alone (recipients first, so a message it leaves without recipients follows in
    the same pass); a bad message takes its recipients along (they cannot be delivered without it).
    """
    moved = 0
    for rid, reason in conn.execute(_BAD_RECIPIENTS).fetchall():
        moved += _quarantine_recipient(conn, rid, reason, now)
    for message_id, reason in conn.execute(_BAD_MESSAGES).fetchall():
        row = conn.execute(
            "SELECT id, sender, client_ip, smtputf8, created, data FROM message WHERE id = ?", (message_id,)
        ).fetchone()
        data = row[5] if isinstance(row[5], bytes) else None
        _quarantine_row(conn, "message", str(message_id), reason, now, row[:5], data)
        for rid, reason_r in conn.execute(
            "SELECT rid, 'its message was quarantined' FROM recipient WHERE message_id = ?", (message_id,)
        ).fetchall():
            moved += _quarantine_recipient(conn, rid, reason_r, now)
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


def _recover(conn: sqlite3.Connection) -> int:
    # One process owns a SQLite spool, so every lease found at open was held by a process that died.
    # Held work stays held: only an operator's release queues it again.
    cur = conn.execute("UPDATE recipient SET state = 'queued' WHERE state = 'leased'")
    return cur.rowcount


def _insert_message(conn: sqlite3.Connection, message_id: str, env: Envelope, now: float) -> None:
    conn.execute(
        "INSERT INTO message (id, sender, client_ip, smtputf8, created, data) VALUES (?, ?, ?, ?, ?, ?)",
        (message_id, env.sender, env.client_ip, int(env.smtputf8), now, env.data),
    )


def _store(
    conn: sqlite3.Connection,
    message_id: str,
    env: Envelope,
    pools: Mapping[str, str],
    now: float,
    lease: bool,
) -> list[WorkItem]:
    _insert_message(conn, message_id, env, now)
    state = RecipientState.LEASED if lease else RecipientState.QUEUED
    groups: dict[tuple[str, str], list[WorkRecipient]] = defaultdict(list)
    for address in env.recipients:
        pool, domain = pools[address], domain_of(address)
        cur = conn.execute(
            "INSERT INTO recipient (message_id, address, pool, domain, state, due) VALUES (?, ?, ?, ?, ?, ?)",
            (message_id, address, pool, domain, state.value, now),
        )
        assert cur.lastrowid is not None
        groups[(pool, domain)].append(WorkRecipient(cur.lastrowid, address, 0))
    if not lease:
        return []
    return [
        WorkItem(message_id, env.sender, pool, domain, rcpts, env.data, now, env.client_ip, env.smtputf8)
        for (pool, domain), rcpts in groups.items()
    ]


def _settle(conn: sqlite3.Connection, settlements: Sequence[Settlement], now: float) -> None:
    touched: set[str] = set()
    for s in settlements:
        conn.executemany(
            "UPDATE recipient SET state = ?, due = ?, attempts = max(attempts, ?), last_reply = ?,"
            " rounds = max(rounds, ?), local_errors = ? WHERE rid = ?",
            [(s.state.value, s.due, s.attempts, s.reply, s.rounds, s.local_errors, rid) for rid in s.rids],
        )
        if s.dsn is not None:
            dsn_id = new_message_id()
            _insert_message(conn, dsn_id, s.dsn, now)
            for address in s.dsn.recipients:
                conn.execute(
                    "INSERT INTO recipient (message_id, address, pool, domain, state, due)"
                    " VALUES (?, ?, ?, ?, 'queued', ?)",
                    (dsn_id, address, s.dsn_pool, domain_of(address), now),
                )
        if s.state in FINAL_STATES:
            touched.add(s.message_id)
    for message_id in touched:
        (open_count,) = conn.execute(
            "SELECT count(*) FROM recipient WHERE message_id = ? AND state IN ('queued', 'leased', 'held')",
            (message_id,),
        ).fetchone()
        if open_count == 0:
            conn.execute("DELETE FROM recipient WHERE message_id = ?", (message_id,))
            conn.execute("DELETE FROM message WHERE id = ?", (message_id,))


def _lease_due(conn: sqlite3.Connection, now: float, limit: int) -> list[WorkItem]:
    rows = conn.execute(
        "SELECT rid, message_id, address, pool, domain, attempts, rounds, local_errors FROM recipient"
        " WHERE state = 'queued' AND due <= ? ORDER BY due LIMIT ?",
        (now, limit),
    ).fetchall()
    if not rows:
        return []
    conn.executemany("UPDATE recipient SET state = 'leased' WHERE rid = ?", [(r[0],) for r in rows])
    groups: dict[tuple[str, str, str], list[WorkRecipient]] = defaultdict(list)
    for rid, message_id, address, pool, domain, attempts, rounds, local_errors in rows:
        groups[(message_id, pool, domain)].append(WorkRecipient(rid, address, attempts, rounds, local_errors))
    messages: dict[str, tuple[str, str, int, float, bytes]] = {}
    for message_id in {k[0] for k in groups}:
        row = conn.execute(
            "SELECT sender, client_ip, smtputf8, created, data FROM message WHERE id = ?", (message_id,)
        ).fetchone()
        if row is None:
            # A recipient without its message cannot be delivered; park it rather than loop on it.
            conn.execute(
                "UPDATE recipient SET state = 'bounced', last_reply = 'message body missing from spool'"
                " WHERE message_id = ?",
                (message_id,),
            )
            continue
        messages[message_id] = row
    items = []
    for (message_id, pool, domain), rcpts in groups.items():
        if message_id not in messages:
            continue
        sender, client_ip, smtputf8, created, data = messages[message_id]
        items.append(
            WorkItem(message_id, sender, pool, domain, rcpts, data, created, client_ip, bool(smtputf8))
        )
    return items


def _counts(conn: sqlite3.Connection) -> dict[str, int]:
    counts = {s.value: 0 for s in RecipientState}
    for state, n in conn.execute("SELECT state, count(*) FROM recipient GROUP BY state"):
        counts[state] = n
    return counts


def _release(conn: sqlite3.Connection, message_id: str, now: float) -> int:
    # The crash count starts again: the operator released it because the fault is believed fixed, and a
    # message that still crashes gets the full count before it is held again. Rounds are kept, so the
    # retry schedule and max_age go on where they were (mail past max_age gets one try, then expires,
    # as Postfix does with mail released from its hold queue).
    cur = conn.execute(
        "UPDATE recipient SET state = 'queued', due = ?, local_errors = 0"
        " WHERE message_id = ? AND state = 'held'",
        (now, message_id),
    )
    return cur.rowcount
