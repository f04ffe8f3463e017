"""Words of one attempt: the transaction handed to a member's transport, and what happened to it.

Shared by the rooms an attempt passes through, so none of them has to import another: scheduling turns a
leased work item into a `Transaction`; delivery runs it and reports an `AttemptOutcome`, the facts only
(a reply per recipient, where it broke off); balancing reads those facts to judge the member's health
(postmux.balancing.health.classify) and scheduling to decide what becomes of the mail
(postmux.scheduling.verdicts). Value types only: no I/O, no decisions.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from postmux.body import HEADER_LIMIT, BodyFile, text_size
from postmux.reply import Reply


@dataclass(frozen=True, slots=True)
class Recipient:
    """One recipient of a transaction: its id in the spool (replies are keyed by it) and its address."""

    rid: int
    address: str


@dataclass(frozen=True, slots=True)
class Transaction:
    """One SMTP transaction to run: a sender, recipients of one domain, the stored message bytes.

    What a transport needs and nothing of the spool's bookkeeping (rounds, tries, leases): the dispatcher
    builds it from the work item it leased (postmux.scheduling.dispatcher.transaction_of).
    """

    sender: str
    recipients: tuple[Recipient, ...]
    data: bytes
    domain: str  # the recipients' domain: a source member looks up its MX hosts
    smtputf8: bool = False  # the client declared SMTPUTF8 (RFC 6531) when it handed the message in
    tail: BodyFile | None = None  # the rest of a long text, in a file (postmux.body)
    clean: bool = False  # CRLF line ends only, no line starting with ".": sent as it is (postmux.body)

    @property
    def size(self) -> int:
        return text_size(self.data, self.tail)

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
        text = self.data
        end = text.find(b"\r\n\r\n")
        if end < 0 and self.tail is not None:
            # The header section goes on into the tail (data may hold little more than the trace header):
            # read as much of it as a header section may be, a small read.
            text += self.tail.head(HEADER_LIMIT)
            end = text.find(b"\r\n\r\n")
        return not text[: end if end >= 0 else len(text)].isascii()


class Breakoff(enum.StrEnum):
    """Where an attempt broke off before the receiver answered the transaction: a fact, not a verdict.

    Which of these count against a member, and how, is balancing's to say (health.classify): a relay that
    cannot be reached is broken, a destination's MX host that cannot be reached says nothing about the
    source IP that tried it.
    """

    CONNECT = "connect"  # the connection was refused or could not be made
    TIMEOUT = "timeout"  # connecting, or waiting for a reply, took too long
    LOST = "lost"  # the connection dropped (reset, closed) before the transaction's last reply
    GREETING = "greeting"  # the server refused the session at its greeting or EHLO (a 421, a 554)
    TLS = "tls"  # STARTTLS was needed and not offered, refused, or its handshake or certificate failed
    AUTH = "auth"  # the member's credentials were refused, or its server offers no AUTH
    BIND = "bind"  # the member's local source address is not on this host
    MX = "mx"  # no host to try: the MX lookup failed or found none reachable from the source address


@dataclass(frozen=True, slots=True)
class AttemptOutcome:
    """What one attempt gave: a reply per recipient id, and where the attempt broke off, if it did.

    Facts only. Whether they count against the member is balancing's judgment (health.classify), what
    becomes of each recipient is the verdicts' (scheduling.verdicts).
    """

    replies: dict[int, Reply]
    remote: str  # the host that answered (the DSN's Remote-MTA), "" when none was reached
    # None when the transaction ran to its end (every reply is the receiver's, but for `unsent`), or when
    # nothing could be sent at all (every recipient in `unsent`).
    breakoff: Breakoff | None = None
    # The replies were made up here (no connection, timeout, DNS), not said by the receiver: shaping's
    # reactions and AIMD listen only to what receivers say.
    local: bool = False
    # The connection's TLS: "TLSv1.3 TLS_AES_256_GCM_SHA384", "none" for plaintext, "" when none was made.
    tls: str = ""
    # This member cannot take this message (its server lacks a needed extension, SMTPUTF8): the replies
    # are permanent only if no other member can take it either; the verdicts decide which.
    unfit: bool = False
    # Recipients refused here before anything was sent (an address that cannot go on the wire): their
    # replies are postmux's, never the receiver's, so they say nothing about the member.
    unsent: frozenset[int] = field(default_factory=frozenset)
    # The connection's two ends, "" when none was made: the peer as "ip:port", the local address it left
    # from (a source member's IP; for a relay, whatever the kernel chose). For events, never decisions.
    peer: str = ""
    source_ip: str = ""
    # The MX hosts passed over before this attempt's host, "name ip:port reply" each, best first: for events
    # (tags.mx_skipped) and the operator, never decisions.
    passed_over: tuple[str, ...] = ()

    def said(self) -> list[Reply]:
        """The replies the receiver itself gave to this transaction (none when it broke off or was local)."""
        if self.local or self.breakoff is not None:
            return []
        if not self.unsent:
            return list(self.replies.values())
        return [reply for rid, reply in self.replies.items() if rid not in self.unsent]
