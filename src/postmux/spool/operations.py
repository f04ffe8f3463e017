"""The words of queue operations: which recipients an operator means (a Selector), and what they see.

These are the values the spool's queue operations take and return (spool/base.py, QueueOperations), and
so the substrate of the admin API and the CLI's `queue`, `hold`, `release`, `delete`, `bounce`, `flush`
and `move`. Plain values, no I/O: every backend returns the same ones.

A provider (`postmux queue list --provider google`) is not a criterion here: the spool stores domains,
and which domains a provider runs is the scheduler's knowledge (scheduling/providers.py, the MX cache).
The admin side turns a provider into the `domains` it knows of, so the spool never needs DNS.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from postmux.envelope import Envelope

# A page of a listing holds at most this many messages, however many are asked for: one call's work and
# answer stay bounded whatever the size of the queue.
MAX_PAGE = 1000


class RecipientState(enum.StrEnum):
    QUEUED = "queued"  # waiting for its due time
    LEASED = "leased"  # taken by a node for delivery right now
    # Set aside until an operator releases it: never leased, never expires, kept across restarts (as
    # Postfix's hold queue). Work that crashed postmux's own code `[retry] max_local_errors` times in a row,
    # or that an operator held.
    HELD = "held"
    DELIVERED = "delivered"
    BOUNCED = "bounced"
    EXPIRED = "expired"


FINAL_STATES = frozenset({RecipientState.DELIVERED, RecipientState.BOUNCED, RecipientState.EXPIRED})
# Recipients still in the queue: a message stays while one of its recipients is in one of these.
OPEN_STATES = frozenset({RecipientState.QUEUED, RecipientState.LEASED, RecipientState.HELD})


@dataclass(frozen=True, slots=True)
class Selector:
    """Which recipients a queue operation acts on: every criterion given must hold; none given: all.

    Message criteria (`message_id`, `sender`, `older_than_s`) select all of a message's recipients;
    recipient criteria (`pool`, `domain`, `domains`, `member`, `state`) select some of them. `sender` is
    compared exactly, so "" selects mail from the null sender (DSNs); domains are compared lower case, as
    they are stored. `domains`: the recipient's domain is one of these (a provider's, as the admin side
    found them); an empty set chooses nothing. `member`: the member of the recipient's last attempt.

    A mass action (hold, release, flush, move, delete, bounce) refuses a selector without any criterion
    unless it says `everything=True`, so a forgotten filter cannot empty or stall the queue (as
    `postsuper -d ALL` must say ALL).
    """

    message_id: str | None = None
    pool: str | None = None
    domain: str | None = None
    sender: str | None = None
    state: RecipientState | None = None
    older_than_s: float | None = None  # accepted at least this many seconds before the operation's `now`
    member: str | None = None
    domains: frozenset[str] | None = None
    everything: bool = False

    def __post_init__(self) -> None:
        age = self.older_than_s
        if age is not None and not (age >= 0 and math.isfinite(age)):
            raise ValueError(f"older_than_s must be a finite number of seconds >= 0, not {age}")
        if self.domain is not None:
            object.__setattr__(self, "domain", self.domain.lower().rstrip("."))
        if self.domains is not None:
            object.__setattr__(self, "domains", frozenset(d.lower().rstrip(".") for d in self.domains))
        if self.state is not None:
            object.__setattr__(self, "state", RecipientState(self.state))

    @property
    def is_empty(self) -> bool:
        """No criterion and no `everything`: what a mass action refuses."""
        return not self.everything and all(
            v is None
            for v in (
                self.message_id,
                self.pool,
                self.domain,
                self.sender,
                self.state,
                self.older_than_s,
                self.member,
                self.domains,
            )
        )

    def require_criterion(self, operation: str) -> None:
        if self.is_empty:
            raise ValueError(
                f"{operation} with no criterion would act on every message: name one, or say everything"
            )


@dataclass(frozen=True, slots=True)
class RecipientView:
    """One recipient as the spool holds it."""

    rid: int
    address: str
    pool: str
    domain: str
    state: RecipientState
    due: float  # when it is (or was) due; for a leased one, when it was due before it was leased
    attempts: int
    rounds: int
    last_reply: str
    # Who holds the lease and until when; only for a leased recipient ("" and None otherwise).
    # lease_until None on a leased recipient: the lease does not expire (a spool without lease_ttl_s).
    owner: str = ""
    lease_until: float | None = None
    # The member of its last attempt and when its last outcome was recorded ("" and None: never tried).
    last_member: str = ""
    last_at: float | None = None


@dataclass(frozen=True, slots=True)
class AttemptView:
    """One attempt at one recipient that the spool kept: the member, its reply, when it was recorded.

    Kept while the message is in the queue: for recipients that waited (deferred, held) or failed, and
    for delivered ones of a message that stays; removed with the message.
    """

    rid: int
    member: str
    reply: str
    at: float


@dataclass(frozen=True, slots=True)
class MessageView:
    """One message in the queue: its envelope's fields and its recipients.

    `recipients` are those the listing's selector chose (all of them from `show`); `data` is the message
    bytes, given by `show` and to a bounce's DSN builder, None in a listing (a page of 25 MB bodies would
    not be bounded).
    """

    message_id: str
    sender: str
    created: float
    size: int  # bytes of the message as received
    client_ip: str
    smtputf8: bool
    recipients: tuple[RecipientView, ...]
    data: bytes | None = None
    attempts: tuple[AttemptView, ...] = ()  # from `show` only: every attempt kept, oldest first
    # For events about it (an operator's bounce): its Message-ID field, and the sender's tags and metadata.
    message_id_header: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)
    metadata: Mapping[str, str] = field(default_factory=dict)

    def age_s(self, now: float) -> float:
        return max(0.0, now - self.created)

    @property
    def envelope(self) -> Envelope:
        """The envelope as accepted (recipients: those in this view); only where `data` was read."""
        if self.data is None:
            raise ValueError("a listing does not carry the message bytes: show the message")
        rcpts = tuple(r.address for r in self.recipients)
        return Envelope(self.sender, rcpts, self.data, client_ip=self.client_ip, smtputf8=self.smtputf8)


@dataclass(frozen=True, slots=True)
class QueuePage:
    """One page of a listing, in message id order (ids sort by acceptance time)."""

    messages: tuple[MessageView, ...]
    # Pass as `after` for the next page; None when this page is the last.
    next_after: str | None = None


@dataclass(frozen=True, slots=True)
class DestinationStats:
    """The recipients still in the queue for one pool and domain."""

    pool: str
    domain: str
    counts: Mapping[str, int] = field(default_factory=dict)  # per open state: queued, leased, held
    oldest_age_s: float = 0.0  # age of the oldest message with a recipient here
    last_error: str = ""  # the reply recorded last for a recipient here that is not delivered

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass(frozen=True, slots=True)
class Bounced:
    """What a bounce ended in one message: the message (its header section in `data`) and the recipients
    it bounced, as they were just before. Exactly what its DSN names and what the caller reports (an
    event each), taken from the spool's answer, never gathered through the DSN builder: PostgreSQL may
    run a transaction's work twice (spool/postgres.py, a batch run again after a failure), and only the
    run that was committed answers."""

    message: MessageView
    recipients: tuple[RecipientView, ...]


# Where the DSN of a message goes (a pool name), given the message: the route to its sender's domain.
DsnPool = str | Callable[[MessageView], str]


# Builds the DSN of a bounce an operator asked for: the message (with its bytes) and the recipients bounced
# now, to the envelope to queue (None: none, as for the null sender). The spool calls it inside its
# transaction, maybe in another thread, so a bounce is never recorded without its DSN: it must be pure
# (delivery/dsn.build_dsn is), as it may be called again for the same message when the transaction is run
# again. The spool knows no DSN format; the caller brings it.
DsnBuilder = Callable[[MessageView, Sequence[RecipientView]], Envelope | None]
