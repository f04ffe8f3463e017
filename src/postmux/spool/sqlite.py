"""SQLite spool: WAL, synchronous=FULL, one writer thread, group commit.

Every request is a small function run by the one writer thread against its connection. The thread
takes whatever requests are waiting (up to `max_batch`), runs each inside a SAVEPOINT (so one bad
request fails alone), and commits them all at once: one fsync answers every caller in the batch.
That is what lets a relay accept faster than the disk can fsync (peers.md: ~1,100-1,400 fsync/s).
With `commit_delay_s` it waits that long for more requests before it commits, under load (as PostgreSQL's
commit_delay and MySQL's binlog_group_commit_sync_delay do): a commit costs the machine about as much CPU
as the messages it answers; a lone caller never waits (`commit_siblings`).

This module holds the writer and the work side (store, lease, settle); the tables, their upgrade and the
quarantine are in sqlite_schema.py, the operator's queue operations in sqlite_queue.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import math
import os
import queue
import socket
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import structlog

from postmux.body import BodyFile
from postmux.envelope import Envelope, domain_of
from postmux.spool import sqlite_outbox, sqlite_queue, sqlite_suppression
from postmux.spool.base import (
    FINAL_STATES,
    Answered,
    AttemptView,
    Bounced,
    DestinationStats,
    DsnBuilder,
    DsnPool,
    MessageView,
    NewMessage,
    OutboxBacklog,
    OutboxEntry,
    OutboxRow,
    Outcome,
    QueuePage,
    RecipientState,
    Selector,
    Settlement,
    SpoolError,
    Stored,
    Suppression,
    settle_futures,
)
from postmux.spool.bodies import HOLD_MAX, INLINE_MAX, BodyStore
from postmux.spool.lock import SpoolLock
from postmux.spool.sqlite_schema import (
    decode_labels,
    delete_message,
    drop_if_finished,
    insert_message,
    prepare,
    quarantine,
    queue_dsn,
    record_attempts,
    recover,
)
from postmux.work import WorkItem, WorkRecipient

T = TypeVar("T")
log = structlog.get_logger("postmux.spool")

CHECKPOINT_INTERVAL_S = 0.2  # how often the checkpointer copies the WAL into the database
# 64 MB of WAL: past this the writer checkpoints itself (SQLite's default is 1000 pages).
WAL_BACKSTOP_PAGES = 16_384

# A request and the caller's future. The future belongs to the caller's event loop: the writer thread only
# reads whether it was cancelled, and hands every outcome of a batch back to that loop in one call
# (`_answer`), where it is set. concurrent.futures' Future and asyncio.wrap_future cost 30 µs of the event
# loop's time a request (a Condition, a lock, two chained callbacks, a wake-up each); this costs 9.
_Job = tuple[Callable[[sqlite3.Connection], Any], "asyncio.Future[Any]"]
_STOP = object()


def default_owner() -> str:
    """This process as a lease owner: host and PID (SQLite is one node, and one process is that node)."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True, slots=True)
class _Lease:
    """What a lease taken now is written with."""

    owner: str
    until: float | None  # None: it does not expire


# A commit (its fsync, the writer's wake-ups and the loop's) costs the machine about as much CPU as the
# messages it answers: with 20 senders at 1.5 KB one answered only ~4 requests (2 messages), and waiting
# 2 ms for more took commits down 57% and postmux's CPU a message 9% (bench/README.md, "Commit delay").
# But each accept then waits up to that much longer, and where the CPU is not what limits (fewer senders)
# that wait is all there is to it: off by default, as PostgreSQL's commit_delay and MySQL's
# binlog_group_commit_sync_delay are. When on, only while the previous batch had COMMIT_SIBLINGS requests
# or more: a sender alone, or a quiet node, is never made to wait.
COMMIT_DELAY_S = 0.0
COMMIT_SIBLINGS = 4


class SqliteSpool:
    """The embedded single-node spool. One process owns the file; at open, its leases are reclaimed.

    `lease_ttl_s`: leases run out this long after they are taken or renewed, and the next `lease_due`
    takes them over. None (the default): they do not expire, because the one process that could hold them
    is this one (spool/lock.py), and its work in memory needs no renewal while it lives.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        group_commit: bool = True,
        max_batch: int = 1000,
        owner: str | None = None,
        lease_ttl_s: float | None = None,
        inline_max: int = INLINE_MAX,
        commit_delay_s: float = COMMIT_DELAY_S,
        commit_siblings: int = COMMIT_SIBLINGS,
    ) -> None:
        if lease_ttl_s is not None and not (lease_ttl_s > 0 and math.isfinite(lease_ttl_s)):
            raise ValueError(f"lease_ttl_s must be a finite number of seconds > 0, not {lease_ttl_s}")
        self.path = Path(path)
        self.group_commit = group_commit
        self.max_batch = max_batch if group_commit else 1
        self.commit_delay_s = commit_delay_s
        self.commit_siblings = commit_siblings
        self._busy = False  # the last batch had commit_siblings requests or more: the next one waits
        self._owner = owner or default_owner()
        self._lease_ttl_s = lease_ttl_s
        self._jobs: queue.SimpleQueue[_Job | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._checkpointer: threading.Thread | None = None
        self._checkpointer_stop = threading.Event()
        self._closing = False
        self.commits = 0  # how many fsyncs were paid, to show what group commit buys
        self.quarantined = 0  # rows moved to the quarantine table at the last open
        self._lock = SpoolLock(self.path)
        self.bodies = BodyStore(self.path, inline_max)
        self.swept = 0  # orphan body files removed at the last open

    @property
    def owner(self) -> str:
        return self._owner

    @property
    def lease_ttl_s(self) -> float | None:
        return self._lease_ttl_s

    @property
    def spill_dir(self) -> Path:
        return self.bodies.incoming

    def _lease(self, now: float) -> _Lease:
        ttl = self._lease_ttl_s
        return _Lease(self._owner, None if ttl is None else now + ttl)

    # -- the writer thread -------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: the WAL is fsync'd at every commit, so a committed message survives power loss.
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=OFF")
        conn.execute("PRAGMA busy_timeout=5000")
        # The checkpointer thread copies the WAL into the database; the writer checkpoints only past this
        # backstop, and then has only what came since the checkpointer's last pass to copy.
        conn.execute(f"PRAGMA wal_autocheckpoint={WAL_BACKSTOP_PAGES}")
        prepare(conn)
        self.bodies.make_dirs()
        return conn

    def _checkpoints(self, stop: threading.Event) -> None:
        """Copy the WAL into the database beside the writer, so no commit waits for a checkpoint.

        With SQLite's default (the committing connection checkpoints once the WAL passes 1000 pages), one
        group commit every ~2,000 messages at 1.5 KB also wrote 4 MB into the database and fsync'd it, and
        every accept waiting on that commit waited with it (issue 12, bench/README.md: in one process at
        1.5 KB, 822-841 msgs/s with an accept p99 of 67-74 ms before; 853-1,009 msgs/s and 21-69 ms with
        this). PASSIVE never blocks the writer. Under steady load it seldom catches up at the very moment
        the writer starts a transaction (which is when SQLite starts the WAL over), so the WAL still grows
        to the writer's backstop; the writer's own checkpoint there finds all but the last 0.2 s already
        copied, and starts the WAL over.
        """
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA synchronous=FULL")  # the database is fsync'd before the WAL is reused
            conn.execute("PRAGMA busy_timeout=5000")
            while not stop.wait(CHECKPOINT_INTERVAL_S):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as e:
                    log.warning("spool checkpoint failed; the writer's backstop will do it", error=str(e))
        finally:
            conn.close()

    def _run(self, conn: sqlite3.Connection) -> None:
        while True:
            first = self._jobs.get()
            if first is _STOP:
                self._refuse_late_jobs()
                conn.close()
                return
            batch: list[_Job] = [first]  # type: ignore[list-item]
            stop = False
            until = time.monotonic() + self.commit_delay_s if self._busy and self.commit_delay_s else None
            while len(batch) < self.max_batch:
                try:
                    nxt = self._next_job(until)
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                batch.append(nxt)  # type: ignore[arg-type]
            self._busy = len(batch) >= self.commit_siblings
            # A caller that gave up (its task was cancelled) before its turn is not run at all. One that
            # gives up while its request runs finds it done or not, as any cancelled caller of a commit.
            batch = [job for job in batch if not job[1].cancelled()]
            if batch:
                _answer(self._commit_safely(conn, batch))
            if stop:
                self._refuse_late_jobs()
                conn.close()
                return

    def _next_job(self, until: float | None) -> _Job | object:
        """A request that is waiting; with `until`, one that comes before then. Raises queue.Empty."""
        if until is not None:
            remaining = until - time.monotonic()
            if remaining > 0:
                return self._jobs.get(timeout=remaining)
        return self._jobs.get_nowait()

    def _commit_safely(self, conn: sqlite3.Connection, batch: list[_Job]) -> list[Outcome]:
        """The one writer must outlive any surprise: a batch that breaks fails its callers, the next runs."""
        try:
            return self._commit_batch(conn, batch)
        except Exception as e:
            return [(fut, None, SpoolError(f"spool writer failed: {e}")) for _, fut in batch]

    def _refuse_late_jobs(self) -> None:
        """Requests queued behind the stop get a clear error instead of waiting forever."""
        late: list[Outcome] = []
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not _STOP:
                late.append((job[1], None, SpoolError("spool is closing")))  # type: ignore[index]
        _answer(late)

    def _commit_batch(self, conn: sqlite3.Connection, batch: list[_Job]) -> list[Outcome]:
        results: list[Outcome] = []
        bodies = self.bodies
        try:
            conn.execute("BEGIN IMMEDIATE")
            for fn, fut in batch:
                conn.execute("SAVEPOINT job")
                mark = bodies.mark()
                try:
                    value = fn(conn)
                except Exception as e:
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    bodies.undo(mark)
                    results.append((fut, None, e))
                else:
                    conn.execute("RELEASE job")
                    results.append((fut, value, None))
            bodies.before_commit()  # the texts are durable before any row that names them
            conn.execute("COMMIT")
            self.commits += 1
            bodies.after_commit(committed=True)
        except Exception as e:
            # The commit itself failed (disk full, I/O error): nothing in the batch is durable.
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            with contextlib.suppress(OSError):
                bodies.after_commit(committed=False)
            results = [(fut, None, e) for _, fut in batch]
        return results

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._thread is None or self._closing:
            raise SpoolError("spool is not open")
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._jobs.put((fn, fut))
        try:
            return await fut
        except sqlite3.Error as e:
            raise SpoolError(str(e), disk_full=_is_disk_full(e)) from e
        except OSError as e:
            # The segment files (spool/bodies.py) fail as the file system does: a full disk is 452 4.3.1 to
            # a client, like SQLITE_FULL, and any other failure a plain spool failure, never a stray OSError.
            raise SpoolError(f"spool body files: {e}", disk_full=e.errno in _DISK_FULL) from e

    async def _read_beside(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Read on a connection of its own in a worker thread: WAL lets it read while the writer writes,
        and a pass over a million rows (bench/queue_scale: 36 ms to count them) must not hold up accepts."""
        if self._thread is None or self._closing:
            raise SpoolError("spool is not open")
        try:
            return await asyncio.to_thread(self._read, fn)
        except sqlite3.Error as e:
            raise SpoolError(str(e)) from e

    def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            conn.execute("PRAGMA busy_timeout=5000")
            return fn(conn)
        finally:
            conn.close()

    # -- the Spool protocol: work ------------------------------------------------------------------

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
        self._checkpointer_stop = threading.Event()
        self._checkpointer = threading.Thread(
            target=self._checkpoints, args=(self._checkpointer_stop,), name="postmux-spool-ckpt", daemon=True
        )
        self._checkpointer.start()
        self._closing = False
        try:
            self.swept, missing = await self._call(self.bodies.sweep)
            self.quarantined = await self._call(lambda c: quarantine(c, time.time(), self.bodies, missing))
            if self.quarantined:
                log.error("spool rows quarantined at open", rows=self.quarantined, table="quarantine")
            return await self._call(recover)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._thread is None:
            self._lock.release()
            return
        self._closing = True
        if self._checkpointer is not None:
            self._checkpointer_stop.set()
            await asyncio.to_thread(self._checkpointer.join)
            self._checkpointer = None
        self._jobs.put(_STOP)
        await asyncio.to_thread(self._thread.join)
        self._thread = None
        self._lock.release()

    async def store(
        self,
        message_id: str,
        envelope: Envelope,
        pools: Mapping[str, str],
        now: float,
        *,
        lease: bool = True,
        outbox: Sequence[OutboxRow] = (),
    ) -> list[WorkItem]:
        taken = self._lease(now) if lease else None
        try:
            return await self._call(
                lambda c: _store(c, self.bodies, message_id, envelope, pools, now, taken, outbox)
            )
        except BaseException:
            # The tail is the spool's from the call on: unless adopted by a committed row, it goes.
            if envelope.tail is not None:
                with contextlib.suppress(OSError):
                    os.unlink(envelope.tail.path)
            raise

    async def store_all(
        self,
        messages: Sequence[NewMessage],
        now: float,
        *,
        lease: bool = True,
        answer: Answered | None = None,
    ) -> Stored:
        taken = self._lease(now) if lease else None
        try:
            stored = await self._call(lambda c: _store_all(c, self.bodies, messages, now, taken, answer))
        except BaseException:
            _drop_tails(messages)  # as in `store`: the tails are the spool's from the call on
            raise
        if stored.answered is not None:
            _drop_tails(messages)
        return stored

    async def answered(self, client: str, key: str, now: float) -> Answered | None:
        return await self._read_beside(lambda c: _answered(c, client, key, now))

    async def settle(
        self,
        settlements: Sequence[Settlement],
        now: float,
        *,
        outbox: Sequence[OutboxRow] = (),
        again: bool = False,
    ) -> None:
        def run(conn: sqlite3.Connection) -> None:
            # As PostgreSQL's: a retry of a settle that did commit (its error came after) does nothing.
            if again and _settled_already(conn, settlements, now):
                return
            _settle(conn, self.bodies, settlements, now, outbox)

        await self._call(run)

    async def lease_due(self, now: float, limit: int) -> list[WorkItem]:
        taken = self._lease(now)
        return await self._call(lambda c: _lease_due(c, self.bodies, now, limit, taken))

    async def give_back(self) -> int:
        return 0  # nobody else can take it: the next open recovers it (see the protocol)

    async def renew(self, now: float, rids: Collection[int]) -> int:
        taken = self._lease(now)
        if taken.until is None:
            if self._thread is None or self._closing:
                raise SpoolError("spool is not open")
            return 0  # nothing expires, so there is nothing to extend (and no round trip to pay)
        held = sorted(set(rids))
        return await self._call(lambda c: _renew(c, taken, held))

    async def counts(self) -> dict[str, int]:
        return await self._read_beside(_counts)

    # -- the QueueOperations protocol --------------------------------------------------------------

    async def list_queue(
        self, selector: Selector, now: float, *, limit: int = 100, after: str = ""
    ) -> QueuePage:
        return await self._read_beside(lambda c: sqlite_queue.list_queue(c, selector, now, limit, after))

    async def show(self, message_id: str, now: float) -> MessageView | None:
        return await self._read_beside(lambda c: sqlite_queue.show(c, self.bodies, message_id))

    async def stats(self, selector: Selector, now: float, *, limit: int = 1000) -> list[DestinationStats]:
        return await self._read_beside(lambda c: sqlite_queue.stats(c, selector, now, limit))

    async def hold(self, selector: Selector, now: float) -> int:
        selector.require_criterion("hold")
        return await self._call(lambda c: sqlite_queue.hold(c, selector, now))

    async def release(self, selector: Selector | str, now: float) -> int:
        chosen = Selector(message_id=selector) if isinstance(selector, str) else selector
        chosen.require_criterion("release")
        return await self._call(lambda c: sqlite_queue.release(c, chosen, now))

    async def delete(self, selector: Selector, now: float) -> int:
        selector.require_criterion("delete")
        return await self._call(lambda c: sqlite_queue.delete(c, self.bodies, selector, now))

    async def bounce(
        self, selector: Selector, now: float, *, reply: str, dsn: DsnBuilder, dsn_pool: DsnPool
    ) -> list[Bounced]:
        selector.require_criterion("bounce")
        return await self._call(
            lambda c: sqlite_queue.bounce(c, self.bodies, selector, now, reply, dsn, dsn_pool)
        )

    async def flush(self, selector: Selector, now: float) -> int:
        selector.require_criterion("flush")
        return await self._call(lambda c: sqlite_queue.flush(c, selector, now))

    async def move(self, selector: Selector, pool: str, now: float) -> int:
        selector.require_criterion("move")
        return await self._call(lambda c: sqlite_queue.move(c, selector, pool, now))

    # -- the WebhookOutbox protocol ----------------------------------------------------------------

    async def outbox_append(self, rows: Sequence[OutboxRow]) -> None:
        if rows:
            await self._call(lambda c: sqlite_outbox.append(c, rows))

    async def outbox_head(self, endpoint: str, after: int, limit: int) -> list[OutboxEntry]:
        return await self._read_beside(lambda c: sqlite_outbox.head(c, endpoint, after, limit))

    async def outbox_ack(self, endpoint: str, seqs: Sequence[int]) -> int:
        if not seqs:
            return 0
        return await self._call(lambda c: sqlite_outbox.ack(c, endpoint, seqs))

    async def outbox_backlog(self) -> list[OutboxBacklog]:
        return await self._read_beside(sqlite_outbox.backlog)

    async def outbox_drop(self, endpoint: str) -> int:
        return await self._call(lambda c: sqlite_outbox.drop(c, endpoint))

    # -- the SuppressionStore protocol -------------------------------------------------------------

    async def suppressions(self) -> list[Suppression]:
        return await self._read_beside(sqlite_suppression.every)

    async def suppression_put(self, entries: Sequence[Suppression]) -> None:
        if entries:
            await self._call(lambda c: sqlite_suppression.put(c, entries))

    async def suppression_remove(self, address: str, scope: str) -> bool:
        return await self._call(lambda c: sqlite_suppression.remove(c, address, scope))


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _answer(outcomes: list[Outcome]) -> None:
    """From the writer thread: hand a batch's outcomes to their callers' event loop, one wake-up for all
    (almost always one loop; a loop already closed has no caller left to tell)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[Outcome]] = {}
    for outcome in outcomes:
        by_loop.setdefault(outcome[0].get_loop(), []).append(outcome)
    for loop, theirs in by_loop.items():
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle_futures, theirs)


def _is_disk_full(e: sqlite3.Error) -> bool:
    # SQLITE_FULL (13): the disk or the file system quota is full; the primary code is the low byte.
    return (getattr(e, "sqlite_errorcode", 0) & 0xFF) == sqlite3.SQLITE_FULL


# -- what the writer thread runs for the work side (plain functions of a connection) ------------------


def _store(
    conn: sqlite3.Connection,
    bodies: BodyStore,
    message_id: str,
    env: Envelope,
    pools: Mapping[str, str],
    now: float,
    lease: _Lease | None,
    outbox: Sequence[OutboxRow] = (),
) -> list[WorkItem]:
    placed = insert_message(conn, bodies, message_id, env, now)
    if outbox:
        sqlite_outbox.append(conn, outbox)
    state = RecipientState.LEASED if lease else RecipientState.QUEUED
    owner, until = (lease.owner, lease.until) if lease else ("", None)
    groups: dict[tuple[str, str], list[WorkRecipient]] = defaultdict(list)
    for address in env.recipients:
        pool, domain = pools[address], domain_of(address)
        cur = conn.execute(
            "INSERT INTO recipient (message_id, address, pool, domain, state, due, owner, lease_until)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (message_id, address, pool, domain, state.value, now, owner, until),
        )
        assert cur.lastrowid is not None
        groups[(pool, domain)].append(WorkRecipient(cur.lastrowid, address, 0))
    if not lease:
        return []
    # The text stays in memory as it came; a tail is now the adopted segment file.
    tail = bodies.file(placed.seg, placed.offset, placed.length) if env.tail is not None else None
    return [
        WorkItem(
            message_id,
            env.sender,
            pool,
            domain,
            rcpts,
            env.data,
            now,
            env.client_ip,
            env.smtputf8,
            tail=tail,
            clean=env.clean,
            message_id_header=env.message_id_header,
            tags=env.tags,
            metadata=env.metadata,
        )
        for (pool, domain), rcpts in groups.items()
    ]


def _store_all(
    conn: sqlite3.Connection,
    bodies: BodyStore,
    messages: Sequence[NewMessage],
    now: float,
    lease: _Lease | None,
    answer: Answered | None,
) -> Stored:
    if answer is not None:
        conn.execute("DELETE FROM idempotency WHERE expires <= ?", (now,))
        first = _answered(conn, answer.client, answer.key, now)
        if first is not None:
            return Stored([], first)
        conn.execute(
            "INSERT INTO idempotency (client, key, request_hash, answer, created, expires)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (answer.client, answer.key, answer.request_hash, answer.answer, answer.created, answer.expires),
        )
    work: list[WorkItem] = []
    for m in messages:
        work += _store(conn, bodies, m.message_id, m.envelope, m.pools, now, lease, m.outbox)
    return Stored(work)


def _drop_tails(messages: Sequence[NewMessage]) -> None:
    """Tails no committed row adopted: removed, as `store` removes its own."""
    for m in messages:
        if m.envelope.tail is not None:
            with contextlib.suppress(OSError):
                os.unlink(m.envelope.tail.path)


def _answered(conn: sqlite3.Connection, client: str, key: str, now: float) -> Answered | None:
    row = conn.execute(
        "SELECT request_hash, answer, created, expires FROM idempotency"
        " WHERE client = ? AND key = ? AND expires > ?",
        (client, key, now),
    ).fetchone()
    return None if row is None else Answered(client, key, str(row[0]), str(row[1]), row[2], row[3])


def _settle(
    conn: sqlite3.Connection,
    bodies: BodyStore,
    settlements: Sequence[Settlement],
    now: float,
    outbox: Sequence[OutboxRow] = (),
) -> None:
    if outbox:
        sqlite_outbox.append(conn, outbox)
    if len(settlements) == 1 and _settle_last(conn, bodies, settlements[0]):
        return
    touched: set[str] = set()
    waiting: set[str] = set()
    delivered: list[Settlement] = []
    for s in settlements:
        # last_member: the member of the last attempt; an outcome without one (no usable member) keeps it.
        conn.executemany(
            "UPDATE recipient SET state = ?, due = ?, attempts = max(attempts, ?), last_reply = ?,"
            " rounds = max(rounds, ?), local_errors = ?, last_member = coalesce(nullif(?, ''), last_member),"
            " last_at = ? WHERE rid = ?",
            [
                (s.state.value, s.due, s.attempts, s.reply, s.rounds, s.local_errors, s.member, now, rid)
                for rid in s.rids
            ],
        )
        if s.dsn is not None:
            queue_dsn(conn, bodies, s.dsn, s.dsn_pool, now)
        if s.member or s.earlier:
            # Kept for the operator's view; a delivered recipient's only once its message is known to
            # stay (below), so the usual message, delivered and removed, costs no row.
            if s.state is RecipientState.DELIVERED:
                delivered.append(s)
            else:
                record_attempts(conn, s.message_id, _attempts(s, now))
        if s.state in FINAL_STATES:
            touched.add(s.message_id)
        elif s.state in (RecipientState.QUEUED, RecipientState.HELD):
            waiting.add(s.message_id)
    for message_id in waiting:
        bodies.settle_in_row(conn, message_id)  # a message that waits holds no shared segment
    removed = {message_id for message_id in touched if drop_if_finished(conn, bodies, message_id)}
    for s in delivered:
        if s.message_id not in removed:
            record_attempts(conn, s.message_id, _attempts(s, now))


def _settled_already(conn: sqlite3.Connection, settlements: Sequence[Settlement], now: float) -> bool:
    """Whether a settle of these settlements at `now` committed before (postgres.py's, the same rule)."""
    rids = sorted({rid for s in settlements for rid in s.rids})
    if not rids:
        return False
    found: list[float | None] = []
    for at in range(0, len(rids), _CHUNK):
        chunk = rids[at : at + _CHUNK]
        found += [
            row[0]
            for row in conn.execute(
                f"SELECT last_at FROM recipient WHERE rid IN ({', '.join('?' * len(chunk))})", chunk
            )
        ]
    return not found or now in found


def _settle_last(conn: sqlite3.Connection, bodies: BodyStore, s: Settlement) -> bool:
    """The usual settlement, which ends the last recipients of its message (delivered at the first try):
    the message goes with its recipients at once, without first writing their state (and the state's index)
    only to delete them. Whether they were its last is asked with these recipients left out of the count,
    so a recipient settled meanwhile (an operator's bounce) cannot make the count look right by accident.
    False, with nothing written: anything else, which `_settle` records step by step.
    """
    if s.state not in FINAL_STATES or s.dsn is not None or s.earlier or not s.rids:
        return False
    rids = list(dict.fromkeys(s.rids))
    (others,) = conn.execute(
        "SELECT count(*) FROM recipient WHERE message_id = ? AND state IN ('queued', 'leased', 'held')"
        f" AND rid NOT IN ({', '.join('?' * len(rids))})",
        (s.message_id, *rids),
    ).fetchone()
    if others:
        return False
    conn.execute("DELETE FROM recipient WHERE message_id = ?", (s.message_id,))
    delete_message(conn, bodies, s.message_id)
    return True


def _attempts(s: Settlement, now: float) -> list[AttemptView]:
    """The attempts a settlement tells of: the earlier ones of its round, then its own (at `now`)."""
    own = [AttemptView(rid, s.member, s.reply, now) for rid in s.rids] if s.member else []
    return [*s.earlier, *own]


_LEASE_COLUMNS = "rid, message_id, address, pool, domain, attempts, rounds, local_errors"
_CHUNK = 500  # rids per IN (...): well under SQLite's limit of bound parameters on any build


def _lease_due(
    conn: sqlite3.Connection, bodies: BodyStore, now: float, limit: int, lease: _Lease
) -> list[WorkItem]:
    # Leases that ran out first: their owner stopped renewing (presumed dead) and their work is the
    # oldest. The partial index recipient_lease holds only leases that can run out, so this search costs
    # nothing on a spool whose leases do not expire. Named, because without statistics the planner
    # would take recipient_due and walk every lease in flight on each call.
    rows = conn.execute(
        f"SELECT {_LEASE_COLUMNS} FROM recipient INDEXED BY recipient_lease"
        " WHERE state = 'leased' AND lease_until <= ? ORDER BY lease_until LIMIT ?",
        (now, limit),
    ).fetchall()
    if len(rows) < limit:
        rows += conn.execute(
            f"SELECT {_LEASE_COLUMNS} FROM recipient"
            " WHERE state = 'queued' AND due <= ? ORDER BY due LIMIT ?",
            (now, limit - len(rows)),
        ).fetchall()
    if not rows:
        return []
    for i in range(0, len(rows), _CHUNK):  # one statement a chunk: cheaper than one a row
        rids = [r[0] for r in rows[i : i + _CHUNK]]
        conn.execute(
            "UPDATE recipient SET state = 'leased', owner = ?, lease_until = ?"
            f" WHERE rid IN ({', '.join('?' * len(rids))})",
            [lease.owner, lease.until, *rids],
        )
    groups: dict[tuple[str, str, str], list[WorkRecipient]] = defaultdict(list)
    for rid, message_id, address, pool, domain, attempts, rounds, local_errors in rows:
        groups[(message_id, pool, domain)].append(WorkRecipient(rid, address, attempts, rounds, local_errors))
    messages: dict[str, _Stored] = {}
    for message_id in {k[0] for k in groups}:
        stored = _read_stored(conn, bodies, message_id)
        if stored is None:
            # A recipient without its message cannot be delivered; park it rather than loop on it.
            conn.execute(
                "UPDATE recipient SET state = 'bounced', last_reply = 'message body missing from spool'"
                " WHERE message_id = ?",
                (message_id,),
            )
            continue
        messages[message_id] = stored
    items = []
    for (message_id, pool, domain), rcpts in groups.items():
        if message_id not in messages:
            continue
        m = messages[message_id]
        items.append(
            WorkItem(
                message_id,
                m.sender,
                pool,
                domain,
                rcpts,
                m.data,
                m.created,
                m.client_ip,
                m.smtputf8,
                tail=m.tail,
                clean=m.clean,
                message_id_header=m.message_id_header,
                tags=m.tags,
                metadata=m.metadata,
            )
        )
    return items


@dataclass(frozen=True, slots=True)
class _Stored:
    sender: str
    client_ip: str
    smtputf8: bool
    created: float
    data: bytes
    tail: BodyFile | None
    clean: bool
    message_id_header: str
    tags: dict[str, str]
    metadata: dict[str, str]


def _read_stored(conn: sqlite3.Connection, bodies: BodyStore, message_id: str) -> _Stored | None:
    """A message's row with its text: read into memory up to HOLD_MAX octets, else streamed from its file.

    None when the row or its segment file is gone (a damaged spool: the caller parks its recipients).
    """
    row = conn.execute(
        "SELECT sender, client_ip, smtputf8, created, data, seg, seg_offset, seg_length, clean,"
        " message_id_header, labels FROM message WHERE id = ?",
        (message_id,),
    ).fetchone()
    if row is None:
        return None
    sender, client_ip, smtputf8, created, data, seg, offset, length, clean, header_id, labels = row
    tail = None
    if length > HOLD_MAX:
        tail = bodies.file(seg, offset, length)
        if not os.path.exists(tail.path):
            return None
    else:
        try:
            data = bodies.joined(data, seg, offset, length)
        except OSError:
            return None
    tags, metadata = decode_labels(labels)
    return _Stored(
        sender, client_ip, bool(smtputf8), created, data, tail, bool(clean), header_id, tags, metadata
    )


def _renew(conn: sqlite3.Connection, lease: _Lease, rids: Sequence[int]) -> int:
    # By rid, as PostgreSQL's: a lease whose work the owner no longer holds must run out (Spool.renew).
    renewed = 0
    for at in range(0, len(rids), _CHUNK):
        chunk = rids[at : at + _CHUNK]
        cur = conn.execute(
            f"UPDATE recipient SET lease_until = ? WHERE rid IN ({', '.join('?' * len(chunk))})"
            " AND state = 'leased' AND owner = ? AND lease_until IS NOT NULL",
            (lease.until, *chunk, lease.owner),
        )
        renewed += cur.rowcount
    return renewed


def _counts(conn: sqlite3.Connection) -> dict[str, int]:
    counts = {s.value: 0 for s in RecipientState}
    for state, n in conn.execute("SELECT state, count(*) FROM recipient GROUP BY state"):
        counts[state] = n
    return counts
