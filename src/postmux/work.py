"""Work: one message's recipients leased for one delivery transaction, the value every room passes on.

A word of its own (as envelope.py is) so that the spool that leases it, the dispatcher that schedules it
and the delivery that carries it share the type without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from postmux.body import BodyFile, text_size


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

    def answered(self) -> WorkRecipient:
        """After one more attempt that a server answered (not a crash, so local_errors starts again).

        Built field by field: dataclasses.replace costs a few µs, and this runs for every recipient tried.
        """
        return WorkRecipient(self.rid, self.address, self.attempts + 1, self.rounds, 0)


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
    # Members the sender domain's SPF record does not permit (postmux.scheduling.gate.spf_barred), as of
    # the dispatcher's last pick: verdicts pass them over as they do tried ones. Not stored.
    barred: frozenset[str] = frozenset()
    # The shaping key (provider, else domain), set by the dispatcher; not stored.
    destination: str = ""
    # The pool whose warmed-up members sent this work to an overflow pool; it overflows only once.
    overflowed_from: str = ""
    # The rest of a long text, in a file (postmux.body); and whether the text needs no repair on the wire.
    tail: BodyFile | None = None
    clean: bool = False
    # What events about the message carry (Envelope's fields of the same names), kept with it in the spool.
    message_id_header: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return text_size(self.data, self.tail)

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
