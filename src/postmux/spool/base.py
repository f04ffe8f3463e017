"""The spool seam: one Protocol, so SQLite (one node) and PostgreSQL (several nodes) are interchangeable."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from postmux.envelope import Envelope


class SpoolError(Exception):
    """The spool could not do what was asked; nothing of the request was stored.

    `disk_full` tells a full disk (ask the client to retry later, 452 4.3.1) from other failures.
    """

    def __init__(self, message: str, *, disk_full: bool = False) -> None:
        super().__init__(message)
        self.disk_full = disk_full


class RecipientState(enum.StrEnum):
    QUEUED = "queued"  # waiting for its due time
    LEASED = "leased"  # taken by a node for delivery right now
    # Set aside until an operator releases it: never leased, never expires, kept across restarts (as
    # Postfix's hold queue). Work that crashed postmux's own code `[retry] max_local_errors` times in a row.
    HELD = "held"
    DELIVERED = "delivered"
    BOUNCED = "bounced"
    EXPIRED = "expired"


FINAL_STATES = frozenset({RecipientState.DELIVERED, RecipientState.BOUNCED, RecipientState.EXPIRED})


@dataclass(frozen=True, slots=True)
class WorkRecipient:
    rid: int
    address: str
    attempts: int  # tries so far, one per member tried
    # Rounds ended so far: times the recipient went back to the spool to wait after members were tried.
    # The retry schedule counts these, not attempts (a round tries every usable member once).
    rounds: int = 0
    # Attempts in a row that crashed postmux's own code (the message's fault, not the member's).
    local_errors: int = 0


@dataclass(slots=True)
class WorkItem:
    """One message's recipients that share a pool and a domain, leased for one delivery transaction."""

    message_id: str
    sender: str
    pool: str
    domain: str
    recipients: list[WorkRecipient]
    data: bytes
    created: float
    client_ip: str = ""
    smtputf8: bool = False
    # Members already tried in this round, so an immediate retry goes elsewhere.
    tried: set[str] = field(default_factory=set)
    # Members that cannot take this message at all in this round (no SMTPUTF8), a subset of `tried`.
    unfit: set[str] = field(default_factory=set)
    # The shaping key (provider, else domain), set by the dispatcher; not stored.
    destination: str = ""
    # The pool whose warmed-up members sent this work to an overflow pool; it overflows only once.
    overflowed_from: str = ""

    @property
    def queue(self) -> str:
        return f"{self.pool}/{self.destination or self.domain}"

    @property
    def attempts(self) -> int:
        return max((r.attempts for r in self.recipients), default=0)

    @property
    def rounds(self) -> int:
        return max((r.rounds for r in self.recipients), default=0)

    @property
    def local_errors(self) -> int:
        return max((r.local_errors for r in self.recipients), default=0)

    @property
    def needs_smtputf8(self) -> bool:
        """Whether this transaction can only go to a server that offers SMTPUTF8 (RFC 6531).

        SMTPUTF8 at MAIL only says the client may have used UTF-8; what needs the extension is UTF-8 in
        an address or in the header. All-ASCII mail goes anywhere, as Postfix's SMTPUTF8 support does
        (a UTF-8 body needs only 8BITMIME).
        """
        if not self.smtputf8:
            return False
        if not self.sender.isascii() or not all(r.address.isascii() for r in self.recipients):
            return True
        end = self.data.find(b"\r\n\r\n")
        return not self.data[: end if end >= 0 else len(self.data)].isascii()


@dataclass(frozen=True, slots=True)
class Settlement:
    """What became of some recipients of one message, recorded in one transaction.

    state QUEUED with `due` means deferred; HELD sets them aside until released; a final state ends them.
    `rounds` never goes down (the larger of the stored and the given count is kept); `local_errors` is
    written as given, so any outcome that was not a crash starts the count again. A `dsn` envelope (for
    bounces and expiries) is queued in the same transaction, so a bounce can never be recorded without its
    DSN.
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


class Spool(Protocol):
    """Durable message storage with per-recipient state.

    Every method is one round trip to the store and resolves only once the change is durable
    (fsync'd); concurrent callers share commits (group commit), so latency is one commit, not a queue.
    """

    commits: int  # transactions committed so far: each one fsync

    async def open(self) -> int:
        """Create or open the store and recover: work leased by a process that died is queued again.

        Returns how many recipients were recovered.
        """
        ...

    async def close(self) -> None: ...

    async def store(
        self, message_id: str, envelope: Envelope, pools: Mapping[str, str], now: float, *, lease: bool = True
    ) -> list[WorkItem]:
        """Store a message durably under `message_id`; `pools` maps each recipient to its pool.

        Returns, with `lease`, the message's work already leased to this process so the
        caller can deliver it at once without reading it back; without, the work is queued and due now.
        """
        ...

    async def settle(self, settlements: Sequence[Settlement], now: float) -> None:
        """Record outcomes; a message whose recipients are all final is removed."""
        ...

    async def lease_due(self, now: float, limit: int) -> list[WorkItem]:
        """Lease up to `limit` recipients that are due, grouped into work items with their bytes."""
        ...

    async def counts(self) -> dict[str, int]:
        """Recipients per state, for metrics and the admin API."""
        ...

    async def release(self, message_id: str, now: float) -> int:
        """Queue a message's held recipients again, due at `now`, with their count of crashes cleared.

        Returns how many were released (0: no such message, or nothing of it held). The full queue
        operations (hold, release, flush by filter) are a later issue's; this is the way out of HELD.
        """
        ...
