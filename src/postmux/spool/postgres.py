"""PostgreSQL spool: one spool shared by several nodes (issue 17), on asyncpg.

The driver was measured first (bench/pg_commit.py, bench/README.md): storing a batch of small messages in
one transaction costs asyncpg 18 us a message at 1,000 a batch and 25 us at 100, psycopg 3 (async) 30 and
41 us; a commit alone (fsync) is ~4 ms with either. So asyncpg, and group commit as the SQLite spool does
it: a writer task on one connection takes every request waiting (up to `max_batch`), runs them in one
transaction and commits once, so one fsync answers every caller of the batch. The batch runs first without
savepoints (a SAVEPOINT and its RELEASE are two round trips a request); if a request fails, the
transaction is rolled back and the batch run again with a savepoint for each request, so one bad request
fails alone. The plain stores of a batch (accepts without an idempotency key) go in one statement for all
of them: a round trip each cost 170-300 us a message at 200 at once, one for all 60 (bench/README.md).

Reads (counts, listings, show, the outbox's head) go through a small pool beside the writer: they never
wait for a commit.

Leases have an owner (`owner`: a node id) and, unless `lease_ttl_s` is None, an expiry. `lease_due` takes
expired leases of any node first, then due queued work, each with SELECT ... FOR UPDATE SKIP LOCKED, so
nodes never wait on each other's rows and no recipient goes to two of them. `open` queues again the leases
of its own owner (a node restarted with the same id: its work in memory died with it); another node's
leases are left to run out.

Message texts are bytea in their row: any node can deliver any message. A text that ingress spilled to a
file (`spill_dir`, a directory of this node) is read into the row at store and the file removed.

LISTEN/NOTIFY: a transaction that makes work due (a message stored without a lease, a deferral, a DSN, a
release or flush) notifies channel `postmux_work` with its owner; every other node's `on_work` callbacks
run when it arrives, so their dispatchers look at once instead of at their next poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import tempfile
from collections import defaultdict
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar, cast

import asyncpg
import structlog

from postmux.envelope import Envelope, domain_of, new_message_id
from postmux.spool import postgres_queue
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
from postmux.spool.postgres_schema import SchemaError, prepare
from postmux.spool.sqlite_schema import decode_labels, encode_labels
from postmux.work import WorkItem, WorkRecipient

T = TypeVar("T")
log = structlog.get_logger("postmux.spool")

CHANNEL = "postmux_work"  # LISTEN/NOTIFY: work became due
READ_POOL_SIZE = 4
DEFAULT_TIMEOUT_S = 10.0  # [spool] timeout
RELISTEN_INTERVAL_S = 1.0  # between tries to listen again after the LISTEN connection was lost
_DISK_FULL = "53100"  # SQLSTATE disk_full

Job = Callable[[asyncpg.Connection], Awaitable[Any]]


def default_owner() -> str:
    """This process as a lease owner, as SQLite's: host and PID. A node meant to recover its own leases
    at a restart is given a stable id instead ([spool] node_id)."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(slots=True)
class _Request:
    run: Job
    future: asyncio.Future[Any]
    wakes: bool  # the change makes work due: NOTIFY the other nodes with the commit
    # A plain store (no idempotency key): the batch may write it with the other stores in one statement.
    stores: _Stores | None = None
    # The writer took it into a batch: from then on its caller waits for the batch (bounded by the
    # statements' timeouts), since giving up then could not stop its commit.
    taken: bool = False


@dataclass(frozen=True, slots=True)
class _Stores:
    messages: Sequence[NewMessage]
    texts: Sequence[bytes]
    now: float
    lease: _Lease | None


@dataclass(frozen=True, slots=True)
class _Lease:
    owner: str
    until: float | None


def _without_nul(selector: Selector) -> Selector | None:
    """The selector as PostgreSQL can be asked it; None when it chooses nothing.

    Text in PostgreSQL cannot hold NUL, so no id, address, pool or member has one, and the server refuses
    such a parameter outright ("invalid byte sequence for encoding UTF8: 0x00": a SpoolError, a 503 to
    the operator). A criterion with NUL in it matches no row, as it matches none in SQLite.
    """
    single = (selector.message_id, selector.pool, selector.domain, selector.sender, selector.member)
    if any(t is not None and "\x00" in t for t in single):
        return None
    if selector.domains is not None and any("\x00" in d for d in selector.domains):
        return replace(selector, domains=frozenset(d for d in selector.domains if "\x00" not in d))
    return selector


class _Retry(Exception):
    """A request of a batch run without savepoints failed: run the batch again with them."""


@dataclass(slots=True)
class _Batch:
    results: list[Outcome] = field(default_factory=list)


class PostgresSpool:
    """The shared spool of several nodes, in one PostgreSQL database named by `dsn`."""

    def __init__(
        self,
        dsn: str,
        *,
        owner: str | None = None,
        lease_ttl_s: float | None = None,
        max_batch: int = 1000,
        spill_dir: str | Path | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        if lease_ttl_s is not None and not (lease_ttl_s > 0 and lease_ttl_s < float("inf")):
            raise ValueError(f"lease_ttl_s must be a finite number of seconds > 0, not {lease_ttl_s}")
        if not (timeout_s > 0 and timeout_s < float("inf")):
            raise ValueError(f"timeout_s must be a finite number of seconds > 0, not {timeout_s}")
        self.dsn = dsn
        # Every wait on the server is bounded by it ([spool] timeout): connecting, each statement's answer
        # (asyncpg's command_timeout), a pooled connection, a request's turn at the writer. A stalled link
        # (no RST: a dead path, a frozen host) would otherwise hold every accept unanswered and pile them
        # up in memory, to commit when the link came back, after their clients had given up.
        self.timeout_s = timeout_s
        self.max_batch = max_batch
        self._owner = owner or default_owner()
        self._lease_ttl_s = lease_ttl_s
        self._spill_dir = Path(spill_dir) if spill_dir else Path(tempfile.gettempdir()) / "postmux-spill"
        self._jobs: asyncio.Queue[_Request | None] = asyncio.Queue()
        self._writer: asyncpg.Connection | None = None
        self._listener: asyncpg.Connection | None = None
        self._reads: asyncpg.Pool | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._wakers: list[Callable[[], None]] = []
        self._relisten: asyncio.Task[None] | None = None
        self.commits = 0

    @property
    def owner(self) -> str:
        return self._owner

    @property
    def lease_ttl_s(self) -> float | None:
        return self._lease_ttl_s

    @property
    def spill_dir(self) -> Path:
        return self._spill_dir

    def on_work(self, wake: Callable[[], None]) -> None:
        """Call `wake` when another node made work due (LISTEN/NOTIFY); it must not block."""
        self._wakers.append(wake)

    def _lease(self, now: float) -> _Lease:
        ttl = self._lease_ttl_s
        return _Lease(self._owner, None if ttl is None else now + ttl)

    # -- open and close ------------------------------------------------------------------------------

    async def open(self) -> int:
        self._spill_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._writer = await self._connect()
            await prepare(self._writer)
            # min_size 0: no connection is kept open for its own sake, so an outage costs no pool
            # maintenance retrying one (asyncpg logged a traceback at each, outage review item 6).
            self._reads = await asyncpg.create_pool(
                self.dsn,
                min_size=0,
                max_size=READ_POOL_SIZE,
                timeout=self.timeout_s,
                command_timeout=self.timeout_s,
            )
            await self._listen()
        except SchemaError as e:
            await self._disconnect()
            raise SpoolError(str(e)) from e
        except _DRIVER_ERRORS as e:
            await self._disconnect()
            raise SpoolError(f"PostgreSQL spool: {e}") from e
        self._closing = False
        self._jobs = asyncio.Queue()
        self._task = asyncio.create_task(self._run(), name="postmux-spool-writer")
        try:
            return await self._call(_recover_for(self._owner), wakes=True)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        relisten, self._relisten = self._relisten, None
        if relisten is not None:
            relisten.cancel()
            await asyncio.gather(relisten, return_exceptions=True)
        if self._task is not None:
            self._closing = True
            self._jobs.put_nowait(None)
            with contextlib.suppress(Exception):
                await self._task
            self._task = None
        await self._disconnect()

    async def _connect(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.dsn, timeout=self.timeout_s, command_timeout=self.timeout_s)

    async def _listen(self) -> None:
        listener = await self._connect()
        await listener.add_listener(CHANNEL, self._notified)
        listener.add_termination_listener(self._listener_lost)
        self._listener = listener

    def _listener_lost(self, _conn: object) -> None:
        """The LISTEN connection ended (server restart, network): listen again, and meanwhile scan."""
        if self._listener is not None and not self._closing:
            self._listener = None
            self._relisten = asyncio.get_running_loop().create_task(
                self._listen_again(), name="spool-relisten"
            )

    async def _listen_again(self) -> None:
        while not self._closing and self._task is not None:
            try:
                await self._listen()
            except _DRIVER_ERRORS as e:
                log.warning("spool LISTEN connection lost; trying again", error=str(e))
                await asyncio.sleep(RELISTEN_INTERVAL_S)
                continue
            # Notifications sent while nobody listened are lost: look once, as if one had come.
            for wake in self._wakers:
                wake()
            return

    async def _disconnect(self) -> None:
        listener, writer, reads = self._listener, self._writer, self._reads
        self._listener = self._writer = None
        self._reads = None
        if listener is not None:
            with contextlib.suppress(Exception):
                await listener.close(timeout=5)
        if writer is not None:
            with contextlib.suppress(Exception):
                await writer.close(timeout=5)
        if reads is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(reads.close(), 5)

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        if payload == self._owner:
            return  # this node's own change: its dispatcher was told already
        for wake in self._wakers:
            wake()

    # -- the writer ------------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            first = await self._jobs.get()
            # A caller that gave up before its turn is dropped here, and not counted in max_batch: after
            # a stall every abandoned request goes at the writer's next turn, with the text it held.
            batch: list[_Request] = [] if first is None or first.future.done() else [first]
            stop = first is None
            while not stop and len(batch) < self.max_batch:
                try:
                    nxt = self._jobs.get_nowait()
                except asyncio.QueueEmpty:
                    break
                if nxt is None:
                    stop = True
                elif not nxt.future.done():
                    batch.append(nxt)
            for r in batch:
                r.taken = True
            if batch:
                await self._commit_safely(batch)
            if stop:
                self._refuse_late_jobs()
                return

    def _refuse_late_jobs(self) -> None:
        while True:
            try:
                job = self._jobs.get_nowait()
            except asyncio.QueueEmpty:
                return
            if job is not None and not job.future.done():
                job.future.set_exception(SpoolError("spool is closing"))

    async def _commit_safely(self, batch: list[_Request]) -> None:
        """The writer outlives any failure: a batch that breaks fails its callers, the next one runs."""
        try:
            if self._writer is None or self._writer.is_closed():
                self._writer = await self._connect()  # the server restarted, or the link broke
            try:
                done = await self._commit(batch, savepoints=len(batch) == 1)
            except _Retry as retry:
                cause = retry.__cause__
                assert cause is not None  # raised from the request's error
                if self._link_broken(cause):
                    raise cause from None  # no request's fault: a retry would fail as well
                done = await self._commit(batch, savepoints=True)
        except Exception as e:
            if self._link_broken(e) and self._writer is not None:
                # The server restarted or a proxy cut the link: the next batch connects again.
                with contextlib.suppress(Exception):
                    self._writer.terminate()
            for r in batch:
                if not r.future.done():
                    r.future.set_exception(e)
            return
        settle_futures(done.results)

    def _link_broken(self, e: BaseException) -> bool:
        return isinstance(e, _LINK_ERRORS) or self._writer is None or self._writer.is_closed()

    async def _commit(self, batch: list[_Request], *, savepoints: bool) -> _Batch:
        conn = self._writer
        assert conn is not None
        done = _Batch()
        tx = conn.transaction()
        await tx.start()
        try:
            stored: dict[int, Stored] = {}
            if not savepoints:
                try:
                    stored = await _store_together(conn, batch)
                except Exception as e:
                    raise _Retry() from e
            for i, r in enumerate(batch):
                if i in stored:
                    done.results.append((r.future, stored[i], None))
                    continue
                if not savepoints:
                    try:
                        value = await r.run(conn)
                    except Exception as e:
                        raise _Retry() from e
                    done.results.append((r.future, value, None))
                    continue
                sp = conn.transaction()
                await sp.start()
                try:
                    value = await r.run(conn)
                except Exception as e:
                    await sp.rollback()
                    done.results.append((r.future, None, e))
                else:
                    await sp.commit()
                    done.results.append((r.future, value, None))
            if any(r.wakes for r, (_, _, err) in zip(batch, done.results, strict=True) if err is None):
                await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, self._owner)
        except BaseException as e:
            cause = e.__cause__ if isinstance(e, _Retry) else e
            if isinstance(cause, (*_LINK_ERRORS, asyncio.CancelledError)) or conn.is_closed():
                # A timeout (TimeoutError is an OSError) or a broken link: a ROLLBACK would wait on the
                # same link. The connection is dropped instead; the server rolls back a transaction whose
                # connection ended, and the next batch connects again.
                conn.terminate()
            else:
                with contextlib.suppress(Exception):
                    await tx.rollback()
            raise
        # If this COMMIT's answer does not come (the link stalls or drops after it was sent), the
        # outcome is unknown: the server may have committed. The callers get an error (an accept: 451),
        # and what follows is at least once: a client sends again (a duplicate, as any MTA's lost "250"),
        # a settle is retried idempotently (Spool.settle's `again`), a lease runs out (Spool.renew).
        await tx.commit()
        self.commits += 1
        return done

    async def _call(
        self,
        run: Callable[[asyncpg.Connection], Awaitable[T]],
        *,
        wakes: bool = False,
        stores: _Stores | None = None,
    ) -> T:
        if self._task is None or self._closing:
            raise SpoolError("spool is not open")
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        request = _Request(run, fut, wakes, stores)
        self._jobs.put_nowait(request)
        try:
            # A turn at the writer within the timeout: behind a stalled batch, the caller gives up (the
            # writer then drops its request unrun) rather than wait without end. Once taken, the batch's
            # own statement timeouts bound the wait, and the caller must hear how it ended.
            await asyncio.wait([fut], timeout=self.timeout_s)
        except asyncio.CancelledError:
            fut.cancel()
            raise
        if not fut.done() and not request.taken:
            fut.cancel()
            raise SpoolError(f"PostgreSQL spool: no turn at the writer within {self.timeout_s:g} s")
        try:
            return await fut
        except _DRIVER_ERRORS as e:
            raise _spool_error(e) from e

    async def _read(self, run: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        reads = self._reads
        if reads is None or self._task is None or self._closing:
            raise SpoolError("spool is not open")
        try:
            async with reads.acquire(timeout=self.timeout_s) as proxy:
                # The pool's proxy forwards every method of the connection it holds.
                conn = cast(asyncpg.Connection, proxy)
                try:
                    return await run(conn)
                except _LINK_ERRORS:
                    conn.terminate()  # a stalled link: releasing it would wait on it again
                    raise
        except _DRIVER_ERRORS as e:
            raise _spool_error(e) from e

    # -- the Spool protocol: work ----------------------------------------------------------------------

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
        stored = await self.store_all(
            [NewMessage(message_id, envelope, pools, outbox)], now, lease=lease, answer=None
        )
        return stored.work

    async def store_all(
        self,
        messages: Sequence[NewMessage],
        now: float,
        *,
        lease: bool = True,
        answer: Answered | None = None,
    ) -> Stored:
        try:
            texts = [_whole_text(m.envelope) for m in messages]
        except OSError as e:
            _drop_tails(messages)
            raise SpoolError(f"spool: cannot read a spilled text: {e}") from e
        _drop_tails(messages)  # read into memory: the row will hold the text, the file is done with
        taken = self._lease(now) if lease else None

        async def run(conn: asyncpg.Connection) -> Stored:
            return await _store_all(conn, messages, texts, now, taken, answer)

        stores = _Stores(messages, texts, now, taken) if answer is None else None
        return await self._call(run, wakes=not lease, stores=stores)

    async def answered(self, client: str, key: str, now: float) -> Answered | None:
        return await self._read(lambda c: _answered(c, client, key, now))

    async def settle(
        self,
        settlements: Sequence[Settlement],
        now: float,
        *,
        outbox: Sequence[OutboxRow] = (),
        again: bool = False,
    ) -> None:
        wakes = any(
            s.dsn is not None or (s.state is RecipientState.QUEUED and s.due <= now) for s in settlements
        )

        async def run(conn: asyncpg.Connection) -> None:
            if again and await _settled_already(conn, settlements, now):
                return
            await _settle(conn, settlements, now, outbox)

        await self._call(run, wakes=wakes)

    async def lease_due(self, now: float, limit: int) -> list[WorkItem]:
        taken = self._lease(now)
        return await self._call(lambda c: _lease_due(c, now, limit, taken))

    async def give_back(self) -> int:
        # A node stopped to be upgraded or removed would otherwise hold its share of the queue back for
        # lease_ttl_s. What it still holds was in memory, or in an attempt cut off at the drain timeout:
        # the latter may be sent twice, as after a crash, or as this node would send it after a restart.
        given: int = await self._call(_recover_for(self._owner), wakes=True)
        return given

    async def renew(self, now: float, rids: Collection[int]) -> int:
        taken = self._lease(now)
        if taken.until is None:
            if self._task is None or self._closing:
                raise SpoolError("spool is not open")
            return 0
        held = sorted(set(rids))
        return await self._call(lambda c: _renew(c, taken, held))

    async def counts(self) -> dict[str, int]:
        return await self._read(_counts)

    # -- the QueueOperations protocol ------------------------------------------------------------------

    async def list_queue(
        self, selector: Selector, now: float, *, limit: int = 100, after: str = ""
    ) -> QueuePage:
        if limit < 1:
            raise ValueError(f"a page holds at least one message, not {limit}")
        chosen = _without_nul(selector)
        if chosen is None:
            return QueuePage(())
        # No id holds NUL, and ids sort bytewise (COLLATE "C"): the ids after "x\0..." are those after "x".
        after = after.split("\x00", 1)[0]
        return await self._read(lambda c: postgres_queue.list_queue(c, chosen, now, limit, after))

    async def show(self, message_id: str, now: float) -> MessageView | None:
        if "\x00" in message_id:
            return None  # no message has that id (see _without_nul)
        return await self._read(lambda c: postgres_queue.show(c, message_id))

    async def stats(self, selector: Selector, now: float, *, limit: int = 1000) -> list[DestinationStats]:
        chosen = _without_nul(selector)
        if chosen is None:
            return []
        return await self._read(lambda c: postgres_queue.stats(c, chosen, now, limit))

    async def hold(self, selector: Selector, now: float) -> int:
        selector.require_criterion("hold")
        chosen = _without_nul(selector)
        if chosen is None:
            return 0
        return await self._call(lambda c: postgres_queue.hold(c, chosen, now))

    async def release(self, selector: Selector | str, now: float) -> int:
        wanted = Selector(message_id=selector) if isinstance(selector, str) else selector
        wanted.require_criterion("release")
        chosen = _without_nul(wanted)
        if chosen is None:
            return 0
        return await self._call(lambda c: postgres_queue.release(c, chosen, now), wakes=True)

    async def delete(self, selector: Selector, now: float) -> int:
        selector.require_criterion("delete")
        chosen = _without_nul(selector)
        if chosen is None:
            return 0
        return await self._call(lambda c: postgres_queue.delete(c, chosen, now))

    async def bounce(
        self, selector: Selector, now: float, *, reply: str, dsn: DsnBuilder, dsn_pool: DsnPool
    ) -> list[Bounced]:
        selector.require_criterion("bounce")
        chosen = _without_nul(selector)
        if chosen is None:
            return []

        async def run(c: asyncpg.Connection) -> list[Bounced]:
            return await postgres_queue.bounce(c, chosen, now, reply, dsn, dsn_pool, queue_dsn)

        return await self._call(run, wakes=True)

    async def flush(self, selector: Selector, now: float) -> int:
        selector.require_criterion("flush")
        chosen = _without_nul(selector)
        if chosen is None:
            return 0
        return await self._call(lambda c: postgres_queue.flush(c, chosen, now), wakes=True)

    async def move(self, selector: Selector, pool: str, now: float) -> int:
        selector.require_criterion("move")
        chosen = _without_nul(selector)
        if chosen is None:
            return 0
        return await self._call(lambda c: postgres_queue.move(c, chosen, pool, now), wakes=True)

    # -- the WebhookOutbox protocol --------------------------------------------------------------------

    async def outbox_append(self, rows: Sequence[OutboxRow]) -> None:
        if rows:
            await self._call(lambda c: postgres_queue.outbox_append(c, rows))

    async def outbox_head(self, endpoint: str, after: int, limit: int) -> list[OutboxEntry]:
        return await self._read(lambda c: postgres_queue.outbox_head(c, endpoint, after, limit))

    async def outbox_ack(self, endpoint: str, seqs: Sequence[int]) -> int:
        if not seqs:
            return 0
        return await self._call(lambda c: postgres_queue.outbox_ack(c, endpoint, seqs))

    async def outbox_backlog(self) -> list[OutboxBacklog]:
        return await self._read(postgres_queue.outbox_backlog)

    async def outbox_drop(self, endpoint: str) -> int:
        return await self._call(lambda c: postgres_queue.outbox_drop(c, endpoint))

    # -- the SuppressionStore protocol -----------------------------------------------------------------

    async def suppressions(self) -> list[Suppression]:
        return await self._read(postgres_queue.suppressions)

    async def suppression_put(self, entries: Sequence[Suppression]) -> None:
        if entries:
            await self._call(lambda c: postgres_queue.suppression_put(c, entries))

    async def suppression_remove(self, address: str, scope: str) -> bool:
        return await self._call(lambda c: postgres_queue.suppression_remove(c, address, scope))


# What a broken connection raises: asyncpg's connection errors, its client errors (a call on a connection
# that is going away), the socket's.
_LINK_ERRORS = (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError)
_DRIVER_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError)


def _spool_error(e: BaseException) -> SpoolError:
    if isinstance(e, TimeoutError):  # asyncpg's command_timeout or connect timeout: str(e) is empty
        return SpoolError("PostgreSQL spool: no answer in time ([spool] timeout): the link or server stalled")
    code = getattr(e, "sqlstate", None)
    return SpoolError(f"PostgreSQL spool: {e}", disk_full=code == _DISK_FULL)


def _whole_text(env: Envelope) -> bytes:
    """The message's text in one piece: a spilled tail is read back (the row holds the whole text)."""
    return env.data if env.tail is None else env.data + env.tail.read()


def _drop_tails(messages: Sequence[NewMessage]) -> None:
    for m in messages:
        if m.envelope.tail is not None:
            with contextlib.suppress(OSError):
                os.unlink(m.envelope.tail.path)


# -- what the writer runs for the work side (coroutines of a connection) ---------------------------------


def _recover_for(owner: str) -> Callable[[asyncpg.Connection], Awaitable[int]]:
    async def recover(conn: asyncpg.Connection) -> int:
        # This owner's leases were held by its previous life (a node restarted under the same id): its
        # work in memory died with it. Other owners' leases run out and are taken over by lease_due.
        status = await conn.execute(
            "UPDATE recipient SET state = 'queued', owner = '', lease_until = NULL"
            " WHERE state = 'leased' AND owner = $1",
            owner,
        )
        return _rowcount(status)

    return recover


def _rowcount(status: str) -> int:
    """asyncpg's command tag ("UPDATE 3", "DELETE 0", "INSERT 0 5") to its row count."""
    return int(status.rsplit(" ", 1)[-1])


_INSERT_MESSAGE = """
WITH m AS (
    INSERT INTO message (id, sender, client_ip, smtputf8, created, data, clean, message_id_header, labels)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
)
INSERT INTO recipient (message_id, address, pool, domain, state, due, owner, lease_until)
SELECT $1, t.address, t.pool, t.domain, $13, $5, $14, $15
FROM unnest($10::text[], $11::text[], $12::text[]) WITH ORDINALITY AS t(address, pool, domain, n)
ORDER BY t.n
RETURNING rid
"""


async def _insert_message(
    conn: asyncpg.Connection,
    message_id: str,
    env: Envelope,
    text: bytes,
    pools: Mapping[str, str],
    now: float,
    lease: _Lease | None,
) -> list[int]:
    """The message row and its recipients in one statement (one round trip); the recipients' rids in
    the envelope's order."""
    addresses = list(env.recipients)
    state = RecipientState.LEASED if lease else RecipientState.QUEUED
    rows = await conn.fetch(
        _INSERT_MESSAGE,
        message_id,
        env.sender,
        env.client_ip,
        env.smtputf8,
        now,
        text,
        env.clean,
        env.message_id_header,
        encode_labels(env.tags, env.metadata),
        addresses,
        [pools[a] for a in addresses],
        [domain_of(a) for a in addresses],
        state.value,
        lease.owner if lease else "",
        lease.until if lease else None,
    )
    return sorted(r["rid"] for r in rows)  # bigserial in insertion order, which is the envelope's


async def queue_dsn(conn: asyncpg.Connection, dsn: Envelope, pool: str, now: float) -> None:
    """A DSN is a new message of its own, due now, written in the caller's transaction with its bounce."""
    await _insert_message(conn, new_message_id(), dsn, dsn.data, {a: pool for a in dsn.recipients}, now, None)


async def _store_all(
    conn: asyncpg.Connection,
    messages: Sequence[NewMessage],
    texts: Sequence[bytes],
    now: float,
    lease: _Lease | None,
    answer: Answered | None,
) -> Stored:
    if answer is not None:
        await conn.execute("DELETE FROM idempotency WHERE expires <= $1", now)
        # Of two nodes racing with one key, the second's insert waits for the first's commit, then
        # conflicts: it stores nothing and returns the first answer.
        inserted = await conn.fetchval(
            "INSERT INTO idempotency (client, key, request_hash, answer, created, expires)"
            " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (client, key) DO NOTHING RETURNING 1",
            answer.client,
            answer.key,
            answer.request_hash,
            answer.answer,
            answer.created,
            answer.expires,
        )
        if inserted is None:
            return Stored([], await _answered(conn, answer.client, answer.key, now))
    work: list[WorkItem] = []
    for m, text in zip(messages, texts, strict=True):
        rids = await _insert_message(conn, m.message_id, m.envelope, text, m.pools, now, lease)
        if m.outbox:
            await postgres_queue.outbox_append(conn, m.outbox)
        if lease is not None:
            work += _work_of(m, text, rids, now)
    return Stored(work)


_INSERT_MESSAGES = """
WITH m AS (
    INSERT INTO message (id, sender, client_ip, smtputf8, created, data, clean, message_id_header, labels)
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::boolean[], $5::float8[], $6::bytea[],
                         $7::boolean[], $8::text[], $9::text[])
)
INSERT INTO recipient (message_id, address, pool, domain, state, due, owner, lease_until)
SELECT t.message_id, t.address, t.pool, t.domain, t.state, t.due, t.owner, t.lease_until
FROM unnest($10::text[], $11::text[], $12::text[], $13::text[], $14::text[], $15::float8[], $16::text[],
            $17::float8[])
    WITH ORDINALITY AS t(message_id, address, pool, domain, state, due, owner, lease_until, n)
ORDER BY t.n
RETURNING rid
"""


async def _store_together(conn: asyncpg.Connection, batch: Sequence[_Request]) -> dict[int, Stored]:
    """The batch's plain stores (by their place in it) in one statement: one round trip for all of them,
    where one each cost the spool 2-3x SQLite's time a message at 200 at once (bench/README.md). Fewer
    than two: nothing to gain, they run as the other requests do."""
    chosen = [(i, r.stores) for i, r in enumerate(batch) if r.stores is not None]
    if len(chosen) < 2:
        return {}
    message_columns: list[list[Any]] = [[] for _ in range(9)]
    recipient_columns: list[list[Any]] = [[] for _ in range(8)]
    for _, unit in chosen:
        lease = unit.lease
        state = RecipientState.LEASED.value if lease else RecipientState.QUEUED.value
        for m, text in zip(unit.messages, unit.texts, strict=True):
            env = m.envelope
            labels = encode_labels(env.tags, env.metadata)
            row = (m.message_id, env.sender, env.client_ip, env.smtputf8, unit.now, text, env.clean)
            for column, value in zip(message_columns, (*row, env.message_id_header, labels), strict=True):
                column.append(value)
            for address in env.recipients:
                values = (m.message_id, address, m.pools[address], domain_of(address), state, unit.now)
                owner = (lease.owner, lease.until) if lease else ("", None)
                for column, value in zip(recipient_columns, (*values, *owner), strict=True):
                    column.append(value)
    rids = sorted(r["rid"] for r in await conn.fetch(_INSERT_MESSAGES, *message_columns, *recipient_columns))
    outbox = [row for _, unit in chosen for m in unit.messages for row in m.outbox]
    if outbox:
        await postgres_queue.outbox_append(conn, outbox)
    results: dict[int, Stored] = {}
    at = 0
    for i, unit in chosen:
        work: list[WorkItem] = []
        for m, text in zip(unit.messages, unit.texts, strict=True):
            mine = rids[at : at + len(m.envelope.recipients)]
            at += len(mine)
            if unit.lease is not None:
                work += _work_of(m, text, mine, unit.now)
        results[i] = Stored(work)
    return results


def _work_of(m: NewMessage, text: bytes, rids: Sequence[int], now: float) -> list[WorkItem]:
    env = m.envelope
    groups: dict[tuple[str, str], list[WorkRecipient]] = defaultdict(list)
    for rid, address in zip(rids, env.recipients, strict=True):
        groups[(m.pools[address], domain_of(address))].append(WorkRecipient(rid, address, 0))
    return [
        WorkItem(
            m.message_id,
            env.sender,
            pool,
            domain,
            rcpts,
            text,
            now,
            env.client_ip,
            env.smtputf8,
            clean=env.clean,
            message_id_header=env.message_id_header,
            tags=env.tags,
            metadata=env.metadata,
        )
        for (pool, domain), rcpts in groups.items()
    ]


async def _answered(conn: asyncpg.Connection, client: str, key: str, now: float) -> Answered | None:
    row = await conn.fetchrow(
        "SELECT request_hash, answer, created, expires FROM idempotency"
        " WHERE client = $1 AND key = $2 AND expires > $3",
        client,
        key,
        now,
    )
    if row is None:
        return None
    return Answered(client, key, row["request_hash"], row["answer"], row["created"], row["expires"])


_SETTLE = """
UPDATE recipient SET state = $1, due = $2, attempts = greatest(attempts, $3), last_reply = $4,
    rounds = greatest(rounds, $5), local_errors = $6, last_member = coalesce(nullif($7, ''), last_member),
    last_at = $8, owner = '', lease_until = NULL
WHERE rid = ANY($9::bigint[])
"""


async def _settle(
    conn: asyncpg.Connection, settlements: Sequence[Settlement], now: float, outbox: Sequence[OutboxRow]
) -> None:
    if outbox:
        await postgres_queue.outbox_append(conn, outbox)
    if settlements:
        await conn.executemany(
            _SETTLE,
            [
                (
                    s.state.value,
                    s.due,
                    s.attempts,
                    s.reply,
                    s.rounds,
                    s.local_errors,
                    s.member,
                    now,
                    list(s.rids),
                )
                for s in settlements
            ],
        )
    touched = sorted({s.message_id for s in settlements if s.state in FINAL_STATES})
    delivered: list[Settlement] = []
    kept: list[tuple[str, AttemptView]] = []
    for s in settlements:
        if s.dsn is not None:
            await queue_dsn(conn, s.dsn, s.dsn_pool, now)
        if s.member or s.earlier:
            if s.state is RecipientState.DELIVERED:
                delivered.append(s)
            else:
                kept += [(s.message_id, a) for a in _attempts(s, now)]
    removed = await postgres_queue.drop_if_finished(conn, touched)
    for s in delivered:
        if s.message_id not in removed:
            kept += [(s.message_id, a) for a in _attempts(s, now)]
    await record_attempts(conn, kept)


async def _settled_already(conn: asyncpg.Connection, settlements: Sequence[Settlement], now: float) -> bool:
    """Whether a settle of these settlements at `now` committed before (its reply was lost): one of their
    recipients was settled at `now` (last_at: the settle's own time, the same float on a retry), or none
    of them is left (their message was finished and removed). All or nothing, as its transaction was."""
    rids = sorted({rid for s in settlements for rid in s.rids})
    if not rids:
        return False  # events alone: nothing tells whether they were appended (Spool.settle)
    rows = await conn.fetch("SELECT last_at FROM recipient WHERE rid = ANY($1::bigint[])", rids)
    return not rows or any(r["last_at"] == now for r in rows)


def _attempts(s: Settlement, now: float) -> list[AttemptView]:
    own = [AttemptView(rid, s.member, s.reply, now) for rid in s.rids] if s.member else []
    return [*s.earlier, *own]


async def record_attempts(conn: asyncpg.Connection, kept: Sequence[tuple[str, AttemptView]]) -> None:
    if not kept:
        return
    await conn.executemany(
        "INSERT INTO attempt (message_id, rid, member, reply, at) VALUES ($1, $2, $3, $4, $5)",
        [(mid, a.rid, a.member, a.reply, a.at) for mid, a in kept],
    )
    await conn.execute(
        "UPDATE message SET attempts_kept = true WHERE id = ANY($1::text[]) AND NOT attempts_kept",
        sorted({mid for mid, _ in kept}),
    )


_LEASE_RETURNING = (
    "RETURNING r.rid, r.message_id, r.address, r.pool, r.domain, r.attempts, r.rounds, r.local_errors"
)


async def _lease_due(conn: asyncpg.Connection, now: float, limit: int, lease: _Lease) -> list[WorkItem]:
    # Leases that ran out first (their owner stopped renewing: presumed dead; their work is the oldest),
    # then due queued work. SKIP LOCKED: rows another node is taking right now are passed over, not
    # waited for.
    rows = list(
        await conn.fetch(
            "UPDATE recipient r SET owner = $1, lease_until = $2 FROM ("
            " SELECT rid FROM recipient WHERE state = 'leased' AND lease_until <= $3"
            " ORDER BY lease_until LIMIT $4 FOR UPDATE SKIP LOCKED) p"
            f" WHERE r.rid = p.rid {_LEASE_RETURNING}",
            lease.owner,
            lease.until,
            now,
            limit,
        )
    )
    if len(rows) < limit:
        rows += await conn.fetch(
            "UPDATE recipient r SET state = 'leased', owner = $1, lease_until = $2 FROM ("
            " SELECT rid FROM recipient WHERE state = 'queued' AND due <= $3"
            " ORDER BY due LIMIT $4 FOR UPDATE SKIP LOCKED) p"
            f" WHERE r.rid = p.rid {_LEASE_RETURNING}",
            lease.owner,
            lease.until,
            now,
            limit - len(rows),
        )
    if not rows:
        return []
    rows.sort(key=lambda r: r["rid"])
    groups: dict[tuple[str, str, str], list[WorkRecipient]] = defaultdict(list)
    for r in rows:
        groups[(r["message_id"], r["pool"], r["domain"])].append(
            WorkRecipient(r["rid"], r["address"], r["attempts"], r["rounds"], r["local_errors"])
        )
    wanted = sorted({k[0] for k in groups})
    messages = {
        m["id"]: m
        for m in await conn.fetch(
            "SELECT id, sender, client_ip, smtputf8, created, data, clean, message_id_header, labels"
            " FROM message WHERE id = ANY($1::text[])",
            wanted,
        )
    }
    missing = [mid for mid in wanted if mid not in messages]
    if missing:
        # A recipient without its message cannot be delivered; park it rather than loop on it.
        await conn.execute(
            "UPDATE recipient SET state = 'bounced', last_reply = 'message body missing from spool'"
            " WHERE message_id = ANY($1::text[])",
            missing,
        )
    items = []
    for (message_id, pool, domain), rcpts in groups.items():
        m = messages.get(message_id)
        if m is None:
            continue
        tags, metadata = decode_labels(m["labels"])
        items.append(
            WorkItem(
                message_id,
                m["sender"],
                pool,
                domain,
                rcpts,
                bytes(m["data"]),
                m["created"],
                m["client_ip"],
                m["smtputf8"],
                clean=m["clean"],
                message_id_header=m["message_id_header"],
                tags=tags,
                metadata=metadata,
            )
        )
    return items


async def _renew(conn: asyncpg.Connection, lease: _Lease, rids: Sequence[int]) -> int:
    # By rid, never by owner alone: a row leased to this owner whose work it no longer holds must run
    # out (base.py, Spool.renew). Still only this owner's leases: a rid taken over by another node since
    # is that node's to renew.
    if not rids:
        return 0
    status = await conn.execute(
        "UPDATE recipient SET lease_until = $1"
        " WHERE rid = ANY($3::bigint[]) AND state = 'leased' AND owner = $2 AND lease_until IS NOT NULL",
        lease.until,
        lease.owner,
        rids,
    )
    return _rowcount(status)


async def _counts(conn: asyncpg.Connection) -> dict[str, int]:
    counts = {s.value: 0 for s in RecipientState}
    for row in await conn.fetch("SELECT state, count(*) AS n FROM recipient GROUP BY state"):
        counts[row["state"]] = row["n"]
    return counts
