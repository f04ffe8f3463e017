"""The spool seam, so SQLite (one node) and PostgreSQL (several nodes) are interchangeable.

Two Protocols over one store: `Spool`, the work side the acceptor and the dispatcher use (store, lease,
settle), and `QueueOperations`, the operator's side (list, show, hold, release, delete, bounce, flush,
move, stats). A backend implements both (`SpoolBackend`); tests/contract runs the same suite on each.

Leases. Work is leased to an owner (a node) until an expiry. An owner keeps what it holds with `renew`;
a lease that runs out belongs to a node presumed dead, and the next `lease_due` of any node takes it
over (PostgreSQL: the other nodes recover a dead node's work without anyone restarting it). SQLite is
one node, held to one process by spool/lock.py: its leases do not expire unless `lease_ttl_s` is given,
and `open` takes back every lease a process that died left behind.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from postmux.envelope import Envelope
from postmux.spool.operations import (
    FINAL_STATES,
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
from postmux.work import WorkItem

__all__ = [
    "FINAL_STATES",
    "OPEN_STATES",
    "Answered",
    "AttemptView",
    "Bounced",
    "DestinationStats",
    "DsnBuilder",
    "DsnPool",
    "MessageView",
    "NewMessage",
    "OutboxBacklog",
    "OutboxEntry",
    "OutboxRow",
    "QueueOperations",
    "QueuePage",
    "RecipientState",
    "RecipientView",
    "Selector",
    "Settlement",
    "Spool",
    "SpoolBackend",
    "SpoolError",
    "Stored",
    "WebhookOutbox",
]


class SpoolError(Exception):
    """The spool could not do what was asked; nothing of the request was stored.

    `disk_full` tells a full disk (ask the client to retry later, 452 4.3.1) from other failures.
    """

    def __init__(self, message: str, *, disk_full: bool = False) -> None:
        super().__init__(message)
        self.disk_full = disk_full


@dataclass(frozen=True, slots=True)
class Settlement:
    """What became of some recipients of one message, recorded in one transaction.

    state QUEUED with `due` means deferred; HELD sets them aside until released; a final state ends them.
    `rounds` never goes down (the larger of the stored and the given count is kept); `local_errors` is
    written as given, so any outcome that was not a crash starts the count again. A `dsn` envelope (for
    bounces and expiries) is queued in the same transaction, so a bounce can never be recorded without its
    DSN.

    `member`: the member whose attempt this outcome comes from ("" when no attempt was made: no usable
    member, every member held back). With one, the spool keeps the attempt (member, reply, time) for the
    operator's `show`, and the member as the recipient's last; a recipient delivered and removed with its
    message keeps nothing, so the hot path writes no more than before. `earlier`: attempts at these
    recipients in the same round that ended without a settlement of their own (a 4xx from one member, then
    the next at once), kept the same way.
    """

    message_id: str
    rids: Sequence[int]
    state: RecipientState
    reply: str = ""
    due: float = 0.0
    attempts: int = 0  # tries so far, in memory retries included
    rounds: int = 0
    local_errors: int = 0
    dsn: Envelope | None = None
    dsn_pool: str = ""
    member: str = ""
    earlier: Sequence[AttemptView] = ()


@dataclass(frozen=True, slots=True)
class NewMessage:
    """One message of `Spool.store_all`: as `store`'s arguments (`outbox`: its webhook rows)."""

    message_id: str
    envelope: Envelope
    pools: Mapping[str, str]
    outbox: Sequence[OutboxRow] = ()


@dataclass(frozen=True, slots=True)
class Answered:
    """A request already answered under an idempotency key: what it was and what it was told.

    `client` is whose keys these are (an API key's name: two clients may pick the same key), `key` the
    client's Idempotency-Key, `request_hash` a digest of the request it came with, `answer` the response
    body it got (JSON text). The record counts until `expires`; after that the key is free again.
    """

    client: str
    key: str
    request_hash: str
    answer: str
    created: float
    expires: float


@dataclass(frozen=True, slots=True)
class Stored:
    """What `store_all` did: stored the messages (`work`, as `store` returns it), or, when the idempotency
    key had been answered already, nothing (`work` empty, `answered` the first answer)."""

    work: list[WorkItem]
    answered: Answered | None = None


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """An event record for one webhook endpoint, to append to that endpoint's outbox (events/webhooks.py).

    `record` is the JSON text of Event.as_record(), sent as it is (never parsed again).
    """

    endpoint: str
    event_id: str
    record: str
    created: float


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """A row waiting in an endpoint's outbox: `seq` orders one endpoint's rows as they were committed."""

    seq: int
    event_id: str
    record: str
    created: float


@dataclass(frozen=True, slots=True)
class OutboxBacklog:
    """What waits for one endpoint: how many rows, and when the oldest (the head) was appended."""

    endpoint: str
    rows: int
    oldest_created: float


class Spool(Protocol):
    """Durable message storage with per-recipient state and leases: the side work goes through.

    Every method that changes something is one round trip to the store and resolves only once the change
    is durable (fsync'd); concurrent callers share commits (group commit), so latency is one commit, not
    a queue. Reads (counts) do not wait for writes.
    """

    commits: int  # transactions committed so far: each one fsync

    @property
    def owner(self) -> str:
        """Whom this handle's leases belong to: a node id (SQLite: one per process)."""
        ...

    @property
    def lease_ttl_s(self) -> float | None:
        """How long a lease lasts without renewal; None: leases do not expire (one node only)."""
        ...

    @property
    def spill_dir(self) -> Path:
        """Where ingress writes a long text as it arrives (Envelope.tail, postmux.body): on the same file
        system as the spool's own files, so `store` takes it over with a rename, never a copy."""
        ...

    async def open(self) -> int:
        """Create or open the store and recover: work this owner held before a restart is queued again.

        SQLite, one process by its lock, queues every lease it finds (their process died). Returns how
        many recipients were recovered. Cost: one pass over the leased recipients.
        """
        ...

    async def close(self) -> None:
        """Stop; calls after it fail with SpoolError. Leases stay in the store for the next open."""
        ...

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
        """Store a message durably under `message_id`; `pools` maps each recipient to its pool.

        `outbox`: webhook rows (the message's Reception events) appended in the same transaction, so an
        accepted message's events can never be lost while the message is kept; none given, none written.

        The text is envelope.data then envelope.tail (a file in `spill_dir`), both durable before this
        returns. The tail's file is the spool's from the call on, whatever the outcome: kept as the
        spool's own, or removed if the store fails; the caller never touches it again.

        Returns, with `lease`, the message's work already leased to this owner (until now + lease_ttl_s)
        so the caller can deliver it at once without reading it back; without, the work is queued and due
        now. Cost: one round trip, one row per recipient.
        """
        ...

    async def store_all(
        self,
        messages: Sequence[NewMessage],
        now: float,
        *,
        lease: bool = True,
        answer: Answered | None = None,
    ) -> Stored:
        """Store several messages, as `store` does each (their webhook rows too), in one transaction: all
        of them or none.

        With `answer`, the idempotency record is written in that same transaction, so a request is
        either stored with its answer or not at all, whatever crash comes between. If a live record for
        (answer.client, answer.key) exists already (expires > now), nothing is stored and it is returned
        instead: of two requests racing with one key, one stores and the other gets its answer. Records
        that have expired by `now` are removed in the same transaction. Cost: one round trip.
        """
        ...

    async def answered(self, client: str, key: str, now: float) -> Answered | None:
        """The live idempotency record for (client, key) at `now`, if any. Cost: one indexed read,
        beside the writer."""
        ...

    async def settle(
        self,
        settlements: Sequence[Settlement],
        now: float,
        *,
        outbox: Sequence[OutboxRow] = (),
        again: bool = False,
    ) -> None:
        """Record outcomes; a message whose recipients are all final is removed.

        `again`: this very call (the same settlements, rows and `now`) was made before and failed, maybe
        after its commit (a lost COMMIT reply, a timeout): if that commit happened (one of its recipients
        was settled at `now`, or none of them is left), nothing is done, so a retry never queues a second
        DSN, appends its events twice or keeps its attempts twice. Rows given with no settlement (events
        that change no state) cannot be told apart so: they are appended again, with the same event ids.

        `outbox`: webhook rows (the events that tell of these outcomes) appended in the same transaction:
        an outcome is never recorded without its events, nor its events without it. Settlements may be
        empty, to append events that report no change of state (a try passed on to another member).

        Recorded whoever holds the lease now: an outcome is a fact about the recipient, even from a node
        whose lease ran out meanwhile. Cost: one round trip, one write per recipient.
        """
        ...

    async def lease_due(self, now: float, limit: int) -> list[WorkItem]:
        """Lease up to `limit` recipients to this owner, grouped into work items with their bytes.

        First leases that ran out (lease_until <= now, of any owner: it stopped renewing, so it is
        presumed dead; their attempts and rounds are kept), then queued recipients due by `now`, the
        earliest first. Each lease runs until now + lease_ttl_s. Never the same recipient to two callers.
        Cost: one round trip; SQLite: an index search for each kind (so a million deferred recipients not
        due cost nothing), PostgreSQL: SELECT ... FOR UPDATE SKIP LOCKED, so nodes never wait on each
        other's rows.
        """
        ...

    async def give_back(self) -> int:
        """Before a clean stop: the work this owner still holds goes back to the queue for other owners.

        Called once the owner's attempts have ended, before `close`. A shared spool (PostgreSQL) queues
        it again and wakes the other nodes, which would otherwise wait `lease_ttl_s` for it; SQLite, one
        process's, keeps it leased for its own next `open` and returns 0. Returns how many recipients
        went back. Cost: one round trip, one write per lease held.
        """
        ...

    async def renew(self, now: float, rids: Collection[int]) -> int:
        """Extend this owner's leases of `rids` to now + lease_ttl_s: the owner's heartbeat.

        `rids` are the recipients the owner really holds (in memory, or in an attempt), never every
        lease the store names it the owner of: a lease whose work the owner no longer has (an outcome it
        gave up recording, a lease whose commit reply was lost) must run out, so the next `lease_due`
        (another owner's, or this one's own) takes it; renewed by owner name it would be held until a
        restart. A rid not leased to this owner (settled meanwhile, taken over) is left alone.

        An owner that keeps work longer than lease_ttl_s must renew well within it (every
        lease_ttl_s / 3), or its work is leased again by the next `lease_due`. Returns how many leases
        were extended (0 when leases do not expire). Cost: one round trip, one write per lease held.
        """
        ...

    async def counts(self) -> dict[str, int]:
        """Recipients per state, for metrics and the admin API. Cost: one pass over the recipients, read
        beside the writer (never holding up accepts)."""
        ...


class QueueOperations(Protocol):
    """The operator's side of the spool: the substrate of the admin API and the CLI's queue commands.

    Each takes a Selector and the operation's `now`. A leased recipient is in a node's hands (an attempt
    may be running): hold, delete, bounce, flush and move leave it alone and it keeps the outcome it
    gets; repeat the operation once it has settled. Changes are one round trip, durable on return; reads
    (list_queue, show, stats) do not hold up the writer. Costs are stated for SQLite; PostgreSQL has
    indexes of its own for the same statements.
    """

    async def list_queue(
        self, selector: Selector, now: float, *, limit: int = 100, after: str = ""
    ) -> QueuePage:
        """Messages with a recipient the selector chooses, in id order after the message id `after`.

        Each with the recipients chosen and without its bytes; at most min(limit, MAX_PAGE) messages.
        Cost: walks messages from `after` in id order until the page is full, so a selector that
        chooses little of a large queue reads much of it (bounded by the queue, never held in memory).
        """
        ...

    async def show(self, message_id: str, now: float) -> MessageView | None:
        """One message with its bytes, every recipient (state, attempts, last reply and member, due,
        lease) and every attempt kept (Settlement.member), oldest first.

        None when the spool does not have it (delivered and removed, or never accepted). Cost: one read.
        """
        ...

    async def hold(self, selector: Selector, now: float) -> int:
        """Set queued recipients aside (HELD) until released: never leased, never expired meanwhile.

        Refuses an empty selector. Returns how many were held. Cost: one write per recipient chosen.
        """
        ...

    async def release(self, selector: Selector | str, now: float) -> int:
        """Queue held recipients again, due at `now`, with their count of crashes cleared.

        `selector` chooses them (a str: that message's held recipients); an empty selector is refused.
        Returns how many were released (0: nothing it chose is held): the way out of HELD.
        """
        ...

    async def delete(self, selector: Selector, now: float) -> int:
        """Remove queued and held recipients without a DSN (as `postsuper -d`), and their attempts; a
        message with nothing left in the queue goes with them. Refuses an empty selector. Returns how many
        were removed."""
        ...

    async def bounce(
        self, selector: Selector, now: float, *, reply: str, dsn: DsnBuilder, dsn_pool: DsnPool
    ) -> list[Bounced]:
        """End queued and held recipients as BOUNCED with `reply`, each message's DSN queued with it.

        `dsn` builds the DSN of each message (None: send none) and is queued to `dsn_pool` (a pool, or
        what gives the pool of a message's DSN: the route to its sender) in the same transaction, so a
        bounce is never recorded without its DSN, and a builder that fails changes nothing. Only
        recipients the bounce itself moved from queued or held to bounced are named, in the DSN and in
        the answer: one another node leases meanwhile (PostgreSQL) is left to its attempt. Refuses an
        empty selector. Returns what was bounced, per message in id order. Cost: one read of each chosen
        message's bytes and one DSN built per message, inside one transaction.
        """
        ...

    async def flush(self, selector: Selector, now: float) -> int:
        """Make queued recipients due at `now` (their deferral ends early, as `postqueue -f`).

        Held ones stay held (release does that). Refuses an empty selector. Returns how many. The caller
        wakes the dispatcher (PostgreSQL will also NOTIFY the other nodes).
        """
        ...

    async def move(self, selector: Selector, pool: str, now: float) -> int:
        """Give queued and held recipients to another pool, their state and due time kept.

        The spool does not know the pools: the caller checks `pool` names one. Refuses an empty
        selector. Returns how many moved.
        """
        ...

    async def stats(self, selector: Selector, now: float, *, limit: int = 1000) -> list[DestinationStats]:
        """Recipients in the queue per pool and domain, with the age of the oldest message and the reply
        recorded last for one of them that is not delivered: the `limit` largest, largest first. Cost: one
        pass over the recipients chosen, read beside the writer."""
        ...


class WebhookOutbox(Protocol):
    """The webhook outbox: per endpoint, event records in the order they were committed, until sent.

    Rows are appended with the change they report (`Spool.store` and `Spool.settle` take them), or alone
    with `outbox_append`; a sender reads an endpoint's head, posts it, and acknowledges it. Each endpoint
    has rows of its own (fanned out when appended), so a slow endpoint's backlog never holds up another.
    Nothing is written for an endpoint that does not exist: with no webhook configured the outbox costs
    nothing. Reads do not hold up the writer.
    """

    async def outbox_append(self, rows: Sequence[OutboxRow]) -> None:
        """Append rows in one transaction (events that go with no change of the queue: member events).
        Cost: one round trip, shared with other writes (group commit)."""
        ...

    async def outbox_head(self, endpoint: str, after: int, limit: int) -> list[OutboxEntry]:
        """Up to `limit` of the endpoint's rows with seq > `after`, oldest first.

        `after` is the last seq the sender already posted (its acknowledgement may still be on its way to
        the disk). So seq order must be commit order: once a reader has seen seq N, no row with a seq
        below N may commit later (SQLite: one writer; PostgreSQL will need a commit-ordered sequence or a
        lock on append, else a sender reading past a row still uncommitted would skip it for good).
        Cost: one index search, read beside the writer.
        """
        ...

    async def outbox_ack(self, endpoint: str, seqs: Sequence[int]) -> int:
        """Remove rows the endpoint acknowledged; returns how many went. Durable on return, but a sender
        need not wait for it: a row whose removal a crash undoes is posted again (at least once)."""
        ...

    async def outbox_backlog(self) -> list[OutboxBacklog]:
        """Per endpoint that has rows (configured or not), how many and the oldest's time, by name.
        Cost: one pass over the outbox index, read beside the writer."""
        ...

    async def outbox_drop(self, endpoint: str) -> int:
        """Remove every row of `endpoint` (an operator's `postmux webhooks --drop`: no sender will post
        them); returns how many went. Cost: one statement over the endpoint's rows, group-committed."""
        ...


@dataclass(frozen=True, slots=True)
class Suppression:
    """One entry of the suppression list: mail to `address` ("user@example.com", or "*@example.com" for
    a whole domain) within `scope` ("global", "sender_domain:example.org", "api_key:NAME") is not sent."""

    address: str
    scope: str
    reason: str
    source: str  # bounce | complaint | unsubscribe | manual
    created: float
    expires: float | None = None  # Unix time; None: until removed

    def expired(self, now: float) -> bool:
        return self.expires is not None and self.expires <= now


class SuppressionStore(Protocol):
    """The suppression list's entries, kept with the spool (one (address, scope) one entry).

    The node reads them all at start (`suppressions`) into an index in memory and writes each change
    through (`suppression_put`, `suppression_remove`), so a lookup per RCPT never reaches the store.
    """

    async def suppressions(self) -> list[Suppression]:
        """Every entry, expired ones included. Cost: one pass over the table, read beside the writer."""
        ...

    async def suppression_put(self, entries: Sequence[Suppression]) -> None:
        """Add or replace entries (by address and scope) in one transaction; durable on return."""
        ...

    async def suppression_remove(self, address: str, scope: str) -> bool:
        """Remove one entry; False when there was none. Durable on return."""
        ...


class SpoolBackend(Spool, QueueOperations, WebhookOutbox, SuppressionStore, Protocol):
    """What a spool implementation provides (SqliteSpool; a PostgreSQL spool next)."""


# A caller's request, answered: its future, and the value or the error it gets.
Outcome = tuple["asyncio.Future[Any]", Any, BaseException | None]


def settle_futures(outcomes: Sequence[Outcome]) -> None:
    """On the callers' loop: each future gets its result or error, unless its caller gave up meanwhile.

    Both spools' writers answer a batch at once through this (SQLite's from its thread, by one
    call_soon_threadsafe a loop; PostgreSQL's from its task)."""
    for fut, value, err in outcomes:
        if fut.done():
            continue
        if err is None:
            fut.set_result(value)
        else:
            fut.set_exception(err)
