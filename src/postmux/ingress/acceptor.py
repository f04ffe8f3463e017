"""The one accept path: route each recipient, store durably, hand the work on (to the dispatcher).

The caller answers 250 only after `accept` returns, which is only after the spool has committed. What
routes and what takes the work are Protocols (Routes, WorkSink): ingress knows no scheduling class.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from email.utils import formatdate
from typing import Protocol

import dkim
import structlog

from postmux.address import literal_address
from postmux.dkim import DkimSigner
from postmux.envelope import (
    LABEL_NAME_MAX,
    LABEL_VALUE_MAX,
    LABELS_MAX,
    Envelope,
    domain_of,
    new_message_id,
)
from postmux.events.bus import EventBus
from postmux.events.outbox import NO_OUTBOX, EventOutbox
from postmux.events.types import Event, EventType
from postmux.headers import head_field_value, header_section_end, take_fields
from postmux.reputation.returns import ReturnedMail
from postmux.reputation.suppression import Found, SuppressionList
from postmux.spool.base import Answered, NewMessage, Spool
from postmux.work import WorkItem

# Requests to postmux in the header section, never part of the mail: taken out before it is stored.
POOL_HEADER = "X-Postmux-Pool"
TAG_HEADER = "X-Postmux-Tag"  # name=value (or a bare name), one field per tag
META_HEADER = "X-Postmux-Meta"  # name=value, one field per entry
_REQUEST_HEADERS = (POOL_HEADER, TAG_HEADER, META_HEADER)
_REQUEST_PREFIX = b"x-postmux-"

log = structlog.get_logger("postmux.accept")


class Accepts(Protocol):
    """What ingress hands a complete message to: the Acceptor here, or a worker's link to it."""

    async def accept(self, envelope: Envelope) -> str:
        """Store durably and return the queue id; raises SpoolError when it could not."""
        ...


@dataclass(frozen=True, slots=True)
class Submission:
    """A message for `Acceptor.accept_all`: its envelope, and the pool asked for by name ("": routes)."""

    envelope: Envelope
    pool: str = ""


class Routes(Protocol):
    """Which pool a recipient's mail leaves by (scheduling/router.py's Router; first match wins)."""

    def pool_for(
        self,
        sender_domain: str,
        recipient_domain: str,
        client_ip: str = "",
        pool_header: str = "",
        auth_user: str = "",
    ) -> str: ...


class WorkSink(Protocol):
    """What takes accepted work for delivery: the dispatcher. Each call is cheap and never blocks."""

    def has_room(self) -> bool:
        """Whether work handed over now is held in memory; else it waits in the spool, due now."""
        ...

    def submit(self, items: Iterable[WorkItem]) -> None:
        """Take work already leased to this process, its bytes in memory (the hot path)."""
        ...

    def scan_soon(self) -> None:
        """Read due work from the spool soon (work that was stored without a lease)."""
        ...


class Acceptor:
    def __init__(
        self,
        spool: Spool,
        routes: Routes,
        sink: WorkSink,
        bus: EventBus,
        hostname: str,
        clock: Callable[[], float] = time.time,
        outbox: EventOutbox = NO_OUTBOX,
        signer: DkimSigner | None = None,
        suppressions: SuppressionList | None = None,
        returns: ReturnedMail | None = None,
    ) -> None:
        self.hostname = hostname
        self.suppressions = suppressions
        self.returns = returns
        self.signer = signer or DkimSigner()
        self.spool = spool
        self.routes = routes
        self.sink = sink
        self.bus = bus
        self.clock = clock
        self.outbox = outbox

    async def accept(self, envelope: Envelope) -> str:
        """Store the message durably and return its queue id; raises SpoolError when it could not.

        Recipients on the suppression list are left out, each with a Suppressed event; a message left
        with none is not stored, and its id is only in those events.

        Mail to the return-path domain ([verp]: DSNs, complaint reports) is not queued: it is read and
        told as events (reputation/returns.py), and its answer names no queue id.
        """
        if self.returns is not None and self.returns.takes(envelope):
            await self._take_returned(envelope, self.returns)
            return "report"
        now = self.clock()
        asked = take_requests(envelope)
        envelope, stopped = self._sort_out(envelope)
        if not envelope.recipients:
            message_id = new_message_id()
            self._tell_suppressed(_as_asked(envelope, asked), message_id, stopped, now)
            return message_id
        signed = await self._signatures(envelope, asked)
        message, receptions = self._prepare(envelope, asked, signed, "", now)
        hot = self.sink.has_room()
        work = await self.spool.store(
            message.message_id, message.envelope, message.pools, now, lease=hot, outbox=message.outbox
        )
        self._hand_on([message], work, hot, receptions)
        self._tell_suppressed(message.envelope, message.message_id, stopped, now)
        return message.message_id

    async def _take_returned(self, envelope: Envelope, returns: ReturnedMail) -> None:
        """A DSN or complaint report: its hard bounces and complaints go on the suppression list (durable
        before the 250), then its events out."""
        events = returns.read(envelope)
        if self.suppressions is not None:
            await self.suppressions.note_bounces(events)
            await self.suppressions.note_complaints(events)
        for event in events:
            self.bus.emit(event)

    async def accept_all(
        self, submissions: Sequence[Submission], answer: Callable[[list[str]], Answered] | None = None
    ) -> list[str] | Answered:
        """Store several messages in one transaction (all or none) and return their queue ids, in order.

        `answer`, given the ids, makes the idempotency record stored with them (Spool.store_all): when
        its key was answered already, nothing is stored and that first answer is returned instead.
        Raises SpoolError when nothing could be stored. Suppressed recipients as in `accept`.
        """
        now = self.clock()
        asked = [take_requests(s.envelope) for s in submissions]
        sorted_out = [self._sort_out(s.envelope) for s in submissions]
        kept = [i for i, (envelope, _) in enumerate(sorted_out) if envelope.recipients]
        signed = {i: await self._signatures(sorted_out[i][0], asked[i]) for i in kept}
        prepared = {
            i: self._prepare(sorted_out[i][0], asked[i], signed[i], submissions[i].pool, now) for i in kept
        }
        ids = [prepared[i][0].message_id if i in prepared else new_message_id() for i in range(len(asked))]
        messages = [message for message, _ in prepared.values()]
        record = answer(ids) if answer is not None else None
        hot = self.sink.has_room()
        stored = await self.spool.store_all(messages, now, lease=hot, answer=record)
        if stored.answered is not None:
            return stored.answered
        self._hand_on(messages, stored.work, hot, [e for _, events in prepared.values() for e in events])
        for i, (envelope, stopped) in enumerate(sorted_out):
            shown = prepared[i][0].envelope if i in prepared else _as_asked(envelope, asked[i])
            self._tell_suppressed(shown, ids[i], stopped, now)
        return ids

    def _sort_out(self, envelope: Envelope) -> tuple[Envelope, list[Found]]:
        """The envelope without the recipients the suppression list stops, and those, with the entry.

        At RCPT (SMTP) or in the API (refuse) they were refused already; what reaches here was accepted
        to be dropped ([suppression] action = "drop"), came through an ingress worker (which has no
        list), or was added to the list since its RCPT.
        """
        if self.suppressions is None or not len(self.suppressions):
            return envelope, []
        api_key = envelope.auth_user if envelope.protocol == "HTTP" else ""
        stopped: list[Found] = []
        kept: list[str] = []
        for rcpt in envelope.recipients:
            found = self.suppressions.stopped(rcpt, envelope.sender, api_key)
            if found is None:
                kept.append(rcpt)
            else:
                stopped.append(found)
        if not stopped:
            return envelope, []
        return replace(envelope, recipients=tuple(kept)), stopped

    def _tell_suppressed(self, envelope: Envelope, message_id: str, stopped: list[Found], now: float) -> None:
        for found in stopped:
            self.bus.emit(suppressed(envelope, message_id, found, now))

    async def _signatures(self, envelope: Envelope, asked: Asked) -> bytes:
        """The DKIM-Signature fields of the text as it will be stored ([[dkim]]; b"" when none applies).

        Once per message, here, over the bytes delivery sends (postmux.dkim): never per attempt. In a
        thread: the body's hash is a pass over all of it (its tail read from disk) and RSA takes ~1 ms,
        which the loop's other sessions should not wait for. A text that cannot be signed (a header section
        dkimpy cannot parse) goes unsigned, said in the log: refusing it would be the signer's fault.
        """
        if not self.signer.domains:
            return b""
        try:
            return await asyncio.to_thread(
                self.signer.signatures, asked.data, envelope.tail, clean=envelope.clean
            )
        except (dkim.DKIMException, OSError, ValueError) as e:
            log.warning("message left unsigned", reason=str(e), message_id=asked.message_id_header)
            return b""

    def _prepare(
        self, envelope: Envelope, asked: Asked, signed: bytes, pool: str, now: float
    ) -> tuple[NewMessage, list[Event]]:
        """The message as it will be stored (its id, its Received field, its DKIM signatures, each
        recipient's pool, the webhook rows of its Reception events, which commit with it), and those events.

        `pool`, when given (the HTTP API's `pool`, checked by the caller), takes every recipient;
        otherwise the routes choose, the X-Postmux-Pool header among what they match.
        """
        sender_domain = envelope.sender_domain
        pool_header = asked.pool
        pools = {
            rcpt: pool
            or self.routes.pool_for(
                sender_domain, domain_of(rcpt), envelope.client_ip, pool_header, envelope.auth_user
            )
            for rcpt in envelope.recipients
        }
        message_id = new_message_id()
        envelope = replace(
            envelope,  # one copy of the envelope, as it is stored: a replace costs ~5 µs
            data=self._received(envelope, message_id, now) + signed + asked.data,
            tags=asked.tags,
            metadata=asked.metadata,
            message_id_header=asked.message_id_header,
        )
        receptions = [reception(envelope, message_id, rcpt, pools[rcpt], now) for rcpt in envelope.recipients]
        # The webhook rows commit with the message (events/outbox.py): a kept message's Reception is
        # never lost, and one refused has none. No webhook: no rows, nothing encoded.
        return NewMessage(message_id, envelope, pools, self.outbox.rows(receptions)), receptions

    def _hand_on(
        self, messages: list[NewMessage], work: list[WorkItem], hot: bool, receptions: list[Event]
    ) -> None:
        """After the commit: the senders told of new webhook rows, the work handed on, the events out."""
        if any(m.outbox for m in messages):
            self.outbox.committed()
        if hot:
            self.sink.submit(work)
        else:
            self.sink.scan_soon()
        for event in receptions:
            self.bus.emit(event)

    def _received(self, envelope: Envelope, message_id: str, now: float) -> bytes:
        """The trace header every relay prepends (RFC 5321 4.4), the only change made to the bytes here.

        (The SMTP reader has already broken any line over 998 octets, [smtp] long_lines, ingress/folding.py.)

        It carries no recipient (one message, many recipients) and goes before the existing headers, so
        signatures made upstream stay valid.
        """
        line = (
            f"Received: {received_from(envelope.helo, envelope.client_ip)}\r\n"
            f"\tby {self.hostname} (postmux) with {envelope.protocol} id {message_id};\r\n"
            f"\t{formatdate(now)}\r\n"
        )
        return line.encode("utf-8", "replace")


@dataclass(frozen=True, slots=True)
class Asked:
    """What the header section asks of postmux, and the text without those fields."""

    data: bytes
    pool: str  # "" when none was asked for
    tags: dict[str, str]
    metadata: dict[str, str]
    message_id_header: str


def take_requests(envelope: Envelope) -> Asked:
    """postmux's request fields taken out of the text, their tags and metadata added to the envelope's
    own, and the Message-ID noted for events. One cut and one lower-casing of the header section.

    Looked for in `data`, which holds the header section unless that is longer than [smtp] spill_bytes
    (1 MiB by default): a field past that, in the text's file, stays in the text.
    """
    data = envelope.data
    head = data[: header_section_end(data)]
    lowered = head.lower()
    header_id = envelope.message_id_header or head_field_value(head, lowered, "Message-ID").strip().strip(
        "<>"
    )
    header_id = header_id[:LABEL_VALUE_MAX]
    if _REQUEST_PREFIX not in lowered:  # most mail: nothing asked
        return Asked(data, "", envelope.tags, envelope.metadata, header_id)
    data, taken = take_fields(data, _REQUEST_HEADERS)
    tags = {**envelope.tags, **labels(taken.get(TAG_HEADER.lower(), ()))}
    metadata = {**envelope.metadata, **labels(taken.get(META_HEADER.lower(), ()))}
    pools = taken.get(POOL_HEADER.lower())
    return Asked(data, pools[-1] if pools else "", tags, metadata, header_id)


def labels(values: Iterable[str]) -> dict[str, str]:
    """`name=value` fields (a bare name has the value ""), bounded as the API bounds them (envelope.py):
    past LABELS_MAX the rest are ignored, and names and values are cut to their limits."""
    found: dict[str, str] = {}
    for value in values:
        name, _, text = value.partition("=")
        name = name.strip()[:LABEL_NAME_MAX]
        if name and (name in found or len(found) < LABELS_MAX):
            found[name] = text.strip()[:LABEL_VALUE_MAX]
    return found


def reception(envelope: Envelope, message_id: str, rcpt: str, pool: str, now: float) -> Event:
    """The Reception event of one recipient: what came in, from whom, with the sender's labels."""
    return Event(
        EventType.RECEPTION,
        id=message_id,
        sender=envelope.sender,
        recipient=rcpt,
        pool=pool,
        queue=f"{pool}/{domain_of(rcpt)}",
        size=envelope.size,
        timestamp=now,
        tags=envelope.tags,
        metadata=envelope.metadata,
        message_id=envelope.message_id_header,
        created=now,
        client=envelope.client_ip,
        helo=envelope.helo,
        auth_user=envelope.auth_user,
    )


def suppressed(envelope: Envelope, message_id: str, found: Found, now: float) -> Event:
    """The Suppressed event of one recipient dropped for the suppression list, and why (tags)."""
    return Event(
        EventType.SUPPRESSED,
        id=message_id,
        sender=envelope.sender,
        recipient=found.recipient,
        size=envelope.size,
        response=found.reply,
        timestamp=now,
        tags={
            **envelope.tags,
            "reason": "suppressed",
            "suppression_source": found.entry.source,
            "suppression_scope": found.entry.scope,
        },
        metadata=envelope.metadata,
        message_id=envelope.message_id_header,
        created=now,
        client=envelope.client_ip,
        auth_user=envelope.auth_user,
    )


def _as_asked(envelope: Envelope, asked: Asked) -> Envelope:
    """The envelope with what its header fields asked for (tags, metadata), for the events of a message
    that is not stored."""
    return replace(
        envelope, tags=asked.tags, metadata=asked.metadata, message_id_header=asked.message_id_header
    )


# RFC 5321 4.1.2 Domain (sub-domain *("." sub-domain), letters, digits and inner hyphens), with "_" as
# real hosts have, and a final dot; at most 255 octets (4.5.3.1.2).
_HELO_DOMAIN = re.compile(
    r"(?=.{1,255}\Z)[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?)*\.?\Z",
    re.ASCII,
)
_HELO_KEPT = re.compile(r"[^A-Za-z0-9.:_\[\]@-]", re.ASCII)  # what a shown bad HELO keeps; the rest is "?"
HELO_SHOWN_MAX = 64
_CLAUSE_WORDS = {"from", "by", "via", "with", "id", "for"}


def is_helo_name(helo: str) -> bool:
    """A domain or an address literal ([192.0.2.1], [IPv6:2001:db8::1]): RFC 5321 4.1.1.1 / 4.1.3.

    Not one of the Received clause words (RFC 5321 4.4), which a reader could take for a second clause.
    """
    if _HELO_DOMAIN.match(helo):
        return helo.lower() not in _CLAUSE_WORDS
    # The address parser's own literal rule: ipaddress alone takes an IPv6 zone ("%anything", spaces and
    # parentheses included), which would carry a forged clause into the header.
    return literal_address(helo) is not None


def received_from(helo: str, client_ip: str) -> str:
    """The `from` clause of the Received field: `from HELO ([ip])`, as Postfix writes `from HELO (rdns [ip])`.

    The HELO argument is the client's to choose, and it went into the field verbatim: an EHLO of
    `a.test ([192.0.2.1]) by mx.victim.test` or one holding `;` made the field read as two hops, or end
    its date early (RFC 5322 3.6.7: the date follows the last ";"). A name that is a domain or an address
    literal (RFC 5321 4.4, From-domain) is written as it is; anything else is shown inside the comment,
    with every character but letters, digits and `.:_[]@-` replaced by "?" and cut to 64, so it can open
    no comment, quote, clause or line: `from unknown ([ip] helo=a.test??[192.0.2.1]??by?mx...)`.
    """
    if is_helo_name(helo):
        return f"from {helo} ([{client_ip}])"
    if not helo:
        return f"from unknown ([{client_ip}])"
    shown = _HELO_KEPT.sub("?", helo[:HELO_SHOWN_MAX])
    return f"from unknown ([{client_ip}] helo={shown})"
