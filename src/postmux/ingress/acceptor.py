"""The one accept path: route each recipient, store durably, hand the work on (to the dispatcher).

The caller answers 250 only after `accept` returns, which is only after the spool has committed. What
routes and what takes the work are Protocols (Routes, WorkSink): ingress knows no scheduling class.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from email.utils import formatdate
from typing import Protocol

import dkim
import structlog

from postmux import dmarc as dmarc_module
from postmux.address import literal_address
from postmux.body import BodyFile
from postmux.config import DmarcSettings, UnsubscribeSettings
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
from postmux.headers import (
    has_obsolete_field,
    head_field_value,
    header_section_end,
    take_fields,
    take_header,
)
from postmux.ingress.compose import sender_domain_allowed
from postmux.reputation.returns import ReturnedMail
from postmux.reputation.suppression import Found, SuppressionList
from postmux.spool.base import Answered, NewMessage, Spool
from postmux.unsubscribe import MESSAGE_ID_MAX, Claim, has_list_unsubscribe, issue
from postmux.unsubscribe import fields as unsubscribe_fields
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

    def accept(self, envelope: Envelope) -> Awaitable[str]:
        """Store durably; the awaitable gives the queue id, or raises SpoolError when it could not."""
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
        dmarc: DmarcSettings | None = None,
        unsubscribe: UnsubscribeSettings | None = None,
        returns: ReturnedMail | None = None,
    ) -> None:
        self.reconfigure(dmarc or DmarcSettings(), unsubscribe)
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

    def reconfigure(self, dmarc: DmarcSettings, unsubscribe: UnsubscribeSettings | None) -> None:
        """The accept-time policies ([dmarc], [unsubscribe]), at build and at each reload."""
        if dmarc.alignment != "off":
            dmarc_module.organizational_domain("example.com")  # the PSL loads here (~0.1 s), not in a DATA
        self.dmarc = dmarc
        self.unsubscribe = unsubscribe

    async def accept(self, envelope: Envelope) -> str:
        """Store the message durably and return its queue id (the first copy's, when it is stored as one
        copy per recipient for [unsubscribe]); raises SpoolError when it could not, AcceptRefused when a
        policy refuses it (nothing stored).

        Recipients on the suppression list are left out, each with a Suppressed event; a message left
        with none is not stored, and its id is only in those events.

        Mail to the return-path domain ([verp]: DSNs, complaint reports) is not queued: it is read and
        told as events (reputation/returns.py), and its answer names no queue id.
        """
        if self.returns is not None and self.returns.takes(envelope):
            await self._take_returned(envelope, self.returns)
            return "report"
        now = self.clock()
        envelope, stopped = self._sort_out(envelope)
        if not envelope.recipients:
            message_id = new_message_id()
            drop_tail(envelope)  # stored nowhere: the tail file is ours to remove
            told = _suppressed(_as_asked(envelope, take_requests(envelope)), message_id, stopped, now)
            await self.outbox.commit(told)
            self._emit(told)
            return message_id
        planned = await self._plan(Submission(envelope), now)
        prepared = [self._prepare(p, now) for p in planned]
        messages = [message for message, _ in prepared]
        events = [e for _, theirs in prepared for e in theirs]
        if stopped:  # the Suppressed events' webhook rows commit with the message, as its Receptions' do
            told = _suppressed(messages[0].envelope, messages[0].message_id, stopped, now)
            messages[0] = self._with_rows(messages[0], told)
            events += told
        hot = self.sink.has_room()
        if len(messages) == 1:
            message = messages[0]
            work = await self.spool.store(
                message.message_id, message.envelope, message.pools, now, lease=hot, outbox=message.outbox
            )
        else:  # the copies of one message: all durable (one transaction) before the 250
            work = (await self.spool.store_all(messages, now, lease=hot)).work
        self._hand_on(messages, work, hot, events)
        return messages[0].message_id

    async def _take_returned(self, envelope: Envelope, returns: ReturnedMail) -> None:
        """A DSN or complaint report: its hard bounces and complaints go on the suppression list, and its
        events' webhook rows into the outbox, both durable before the 250, then its events out.

        The 250 ends the reporter's part (an ISP's feedback loop does not send a report twice): an event
        that reached the webhooks only a moment after it, as the bus's loose events do, could be lost to a
        crash in that moment. A failure before the 250 is a 451, and the reporter sends it again.
        """
        events = returns.read(envelope)
        if self.suppressions is not None:
            await self.suppressions.note_bounces(events)
            await self.suppressions.note_complaints(events)
        await self.outbox.commit(events)
        self._emit(events)

    def _with_rows(self, message: NewMessage, events: Sequence[Event]) -> NewMessage:
        """`message` with the webhook rows of more of its events, to commit with it."""
        rows = self.outbox.rows(events)
        return replace(message, outbox=(*message.outbox, *rows)) if rows else message

    def _emit(self, events: Iterable[Event]) -> None:
        for event in events:
            self.bus.emit(event)

    async def accept_all(
        self, submissions: Sequence[Submission], answer: Callable[[list[str]], Answered] | None = None
    ) -> list[str] | Answered:
        """Store several messages in one transaction (all or none) and return their queue ids, in order.

        A submission whose recipients `split` would part is stored as its copies, each with an id: a
        caller that must know which id went to whom splits first (the HTTP API does).

        `answer`, given the ids, makes the idempotency record stored with them (Spool.store_all): when
        its key was answered already, nothing is stored and that first answer is returned instead.
        Raises SpoolError when nothing could be stored, AcceptRefused when a policy refuses one message.
        Suppressed recipients as in `accept`: a submission left with none is stored as nothing, and has an
        id of its own that only its Suppressed events name.
        """
        now = self.clock()
        sorted_out = [self._sort_out(s.envelope) for s in submissions]
        planned_per: list[list[Planned]] = []
        for submission, (envelope, _) in zip(submissions, sorted_out, strict=True):
            if envelope.recipients:
                planned_per.append(await self._plan(replace(submission, envelope=envelope), now))
            else:
                drop_tail(envelope)  # stored nowhere: the tail file is ours to remove
                planned_per.append([])
        prepared = {p.message_id: self._prepare(p, now) for ps in planned_per for p in ps}
        firsts = [ps[0].message_id if ps else new_message_id() for ps in planned_per]
        ids: list[str] = []
        for ps, first in zip(planned_per, firsts, strict=True):
            ids += [p.message_id for p in ps] or [first]
        told: list[Event] = []
        unstored: list[Event] = []  # a submission left with no recipient: its events commit on their own
        for first, (envelope, stopped) in zip(firsts, sorted_out, strict=True):
            if not stopped:
                continue
            kept = prepared.get(first)
            shown = kept[0].envelope if kept else _as_asked(envelope, take_requests(envelope))
            theirs = _suppressed(shown, first, stopped, now)
            if kept:
                prepared[first] = (self._with_rows(kept[0], theirs), kept[1])
            else:
                unstored += theirs
            told += theirs
        messages = [message for message, _ in prepared.values()]
        record = answer(ids) if answer is not None else None
        hot = self.sink.has_room()
        stored = await self.spool.store_all(messages, now, lease=hot, answer=record)
        if stored.answered is not None:
            return stored.answered
        await self.outbox.commit(unstored)
        receptions = [e for _, events in prepared.values() for e in events]
        self._hand_on(messages, stored.work, hot, receptions + told)
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

    def split(self, submission: Submission) -> list[Submission]:
        """The submission as the messages `accept_all` will store: one, or, when [unsubscribe] stamps some
        of its recipients' mail, one per such recipient (a token names one) and one for the rest."""
        envelope = submission.envelope
        asked = take_requests(envelope)
        groups = self._copies(envelope, asked, self._pools(envelope, asked, submission.pool))
        if len(groups) == 1:
            return [submission]
        return [replace(submission, envelope=replace(envelope, recipients=rcpts)) for rcpts, _ in groups]

    def check(self, envelope: Envelope) -> None:
        """The accept-time policies' refusal of a message, raised (AcceptRefused) before it is built into
        a request's answer; `accept` checks again, so a caller need not."""
        self._alignment(envelope, take_requests(envelope))

    async def _plan(self, submission: Submission, now: float) -> list[Planned]:
        """The copies to store of one submission: checked by the accept-time policies, each recipient's
        pool chosen, stamped with its unsubscribe fields, signed. Raises AcceptRefused."""
        envelope = submission.envelope
        asked = take_requests(envelope)
        try:
            _refuse_obs_from(asked.data[: header_section_end(asked.data)])
            own = self._alignment(envelope, asked)
        except AcceptRefused:
            drop_tail(envelope)  # the tail is ours from the call on (Spool.store), and is stored nowhere
            raise
        pools = self._pools(envelope, asked, submission.pool)
        planned: list[Planned] = []
        for i, (rcpts, stamped) in enumerate(self._copies(envelope, asked, pools)):
            message_id = new_message_id()
            # One copy of all the recipients (most mail) is the envelope itself: a replace costs 5-20 µs.
            copy = envelope if rcpts is envelope.recipients else replace(envelope, recipients=rcpts)
            if i and envelope.tail is not None:  # each stored message owns its tail file (postmux.body)
                copy = replace(copy, tail=await asyncio.to_thread(copy_tail, envelope.tail, i))
            text = asked
            if stamped:
                fields = self._unsubscribe_fields(envelope, asked, rcpts[0], message_id, now)
                data = asked.data
                if fields:
                    # A sender's own List-Unsubscribe-Post without a List-Unsubscribe (which would have
                    # left the mail alone) means nothing (RFC 8058 3.1) and would make ours the second:
                    # the message carries one, ours, next to our List-Unsubscribe.
                    data, _ = take_header(data, "List-Unsubscribe-Post")
                text = replace(asked, data=fields + data)
            signed = await self._signatures(copy, text)
            planned.append(Planned(copy, text, signed, {r: pools[r] for r in rcpts}, message_id, own))
        return planned

    def _pools(self, envelope: Envelope, asked: Asked, pool: str) -> dict[str, str]:
        """Each recipient's pool: `pool`, when given (the HTTP API's `pool`, checked by the caller), takes
        every recipient; otherwise the routes choose, the X-Postmux-Pool header among what they match."""
        sender_domain = envelope.sender_domain
        return {
            rcpt: pool
            or self.routes.pool_for(
                sender_domain, domain_of(rcpt), envelope.client_ip, asked.pool, envelope.auth_user
            )
            for rcpt in envelope.recipients
        }

    def _alignment(self, envelope: Envelope, asked: Asked) -> dict[str, str]:
        """[dmarc] alignment: the Reception events' own tags (warn), AcceptRefused (refuse), or nothing."""
        policy = self.dmarc
        if policy.alignment == "off":
            return {}
        head = asked.data[: header_section_end(asked.data)]
        verdict = dmarc_module.judge(
            head,
            self.signer.signing_domain(head),
            envelope.sender_domain,
            dkim_mode=policy.dkim_mode,
            spf_mode=policy.spf_mode,
            count_spf=policy.count_spf,
        )
        if verdict.aligned:
            return {}
        reason = _printable(verdict.reason)
        if policy.alignment == "refuse":
            log.warning("message refused: DMARC alignment", reason=reason, sender=envelope.sender)
            raise AcceptRefused(f"550 5.7.26 DMARC alignment: {reason}", f"DMARC alignment: {reason}")
        return {"dmarc": "fail", "dmarc_reason": reason}

    def _copies(
        self, envelope: Envelope, asked: Asked, pools: dict[str, str]
    ) -> list[tuple[tuple[str, ...], bool]]:
        """The recipients of each message to store, and whether its mail gets the unsubscribe fields: the
        recipients [unsubscribe] opts in, each alone (a token names one recipient), the rest together.

        Mail that carries a List-Unsubscribe field already is the sender's list's: left as it is, whole.
        """
        policy = self.unsubscribe
        if policy is None or not envelope.sender:
            return [(envelope.recipients, False)]
        by_domain = bool(policy.sender_domains) and sender_domain_allowed(
            envelope.sender, policy.sender_domains
        )
        stamped = [r for r in envelope.recipients if by_domain or pools[r] in policy.pools]
        if not stamped or has_list_unsubscribe(asked.data[: header_section_end(asked.data)]):
            return [(envelope.recipients, False)]
        rest = tuple(r for r in envelope.recipients if r not in set(stamped))
        return ([(rest, False)] if rest else []) + [((r,), True) for r in stamped]

    def _unsubscribe_fields(
        self, envelope: Envelope, asked: Asked, rcpt: str, message_id: str, now: float
    ) -> bytes:
        """RFC 8058's two fields for one recipient's copy, with its signed token: put before the text's
        own fields, under the DKIM signature made next (RFC 8058 4). b"" when the URI would not fit on a
        line (an address and domain of hundreds of octets each): that copy goes without, said in the log."""
        policy = self.unsubscribe
        assert policy is not None
        message_id_header = asked.message_id_header
        if len(message_id_header) > MESSAGE_ID_MAX:
            message_id_header = ""  # not in the token: it would only make the URI longer
        claim = Claim(rcpt, envelope.sender_domain, message_id, message_id_header, int(now))
        made = unsubscribe_fields(policy.url, policy.mailto, issue(claim, policy.secrets[0]))
        if made is None:
            log.warning("unsubscribe fields left out: the URI is over 998 octets", recipient=rcpt)
            return b""
        return made

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

    def _prepare(self, planned: Planned, now: float) -> tuple[NewMessage, list[Event]]:
        """The message as it will be stored (its id, its Received field, its DKIM signatures, each
        recipient's pool, the webhook rows of its Reception events, which commit with it), and those events.
        """
        asked = planned.asked
        envelope = replace(
            planned.envelope,  # one copy of the envelope, as it is stored: a replace costs ~5 µs
            data=self._received(planned.envelope, planned.message_id, now) + planned.signed + asked.data,
            tags=asked.tags,
            metadata=asked.metadata,
            message_id_header=asked.message_id_header,
        )
        pools = planned.pools
        receptions = [
            reception(envelope, planned.message_id, rcpt, pools[rcpt], now, planned.own_tags)
            for rcpt in envelope.recipients
        ]
        # The webhook rows commit with the message (events/outbox.py): a kept message's Reception is
        # never lost, and one refused has none. No webhook: no rows, nothing encoded.
        return NewMessage(planned.message_id, envelope, pools, self.outbox.rows(receptions)), receptions

    def _hand_on(
        self, messages: list[NewMessage], work: list[WorkItem], hot: bool, events: list[Event]
    ) -> None:
        """After the commit: the senders told of new webhook rows, the work handed on, the events out
        (the Receptions, and the Suppressed of recipients left out)."""
        if any(m.outbox for m in messages):
            self.outbox.committed()
        if hot:
            self.sink.submit(work)
        else:
            self.sink.scan_soon()
        self._emit(events)

    def _received(self, envelope: Envelope, message_id: str, now: float) -> bytes:
        """The trace header every relay prepends (RFC 5321 4.4), the only change made to the bytes here.

        (The SMTP reader has already broken any line over 998 octets, [smtp] long_lines, ingress/folding.py.)

        It carries no recipient (one message, many recipients) and goes before the existing headers, so
        signatures made upstream stay valid.
        """
        line = (
            f"Received: {received_from(envelope.helo, envelope.client_ip)}\r\n"
            f"\tby {self.hostname} (postmux) with {envelope.protocol} id {message_id};\r\n"
            f"\t{date_field(int(now))}\r\n"
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


@dataclass(frozen=True, slots=True)
class Planned:
    """One message to store, before its Received field: its envelope (its recipients), its text (with any
    unsubscribe fields), its DKIM signatures, each recipient's pool, its id, and postmux's own tags for
    its Reception events (a DMARC warning)."""

    envelope: Envelope
    asked: Asked
    signed: bytes
    pools: dict[str, str]
    message_id: str
    own_tags: dict[str, str]


def _refuse_obs_from(head: bytes) -> None:
    """Refuse a From field written with white space before its colon (`From :`, RFC 5322 4.5 obs-optional).

    Receivers disagree about it: Mail::DKIM reads it as a From field, OpenDKIM does not (a message whose
    only From is `From :` is a permerror there, however it is signed), dkimpy's parser and Python's email
    package drop it, some mail readers show it. The author - the field DKIM and DMARC exist to protect -
    would be one thing to postmux and another to the receiver, or a second From next to an aligned one.
    RFC 5322 4 forbids generating obsolete syntax, so no sender needs it: 550 5.6.0 (RFC 3463 5.6.0,
    other media error), naming the fix, rather than mail signed with a signature that fails.
    """
    if has_obsolete_field(head, "From"):
        reason = "a From field with white space before its colon (obsolete syntax, RFC 5322 4.5): write From:"
        log.warning("message refused: obsolete From field", reason=reason)
        raise AcceptRefused(f"550 5.6.0 {reason}", reason)


class AcceptRefused(Exception):
    """A message a policy refuses ([dmarc] alignment = "refuse", a `From :` field): nothing was stored.
    `reply` is the SMTP reply (5yz and its enhanced code), `reason` the words an HTTP client is told (422)."""

    def __init__(self, reply: str, reason: str) -> None:
        super().__init__(reason)
        self.reply = reply
        self.reason = reason


def drop_tail(envelope: Envelope) -> None:
    if envelope.tail is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(envelope.tail.path)


def copy_tail(tail: BodyFile, n: int) -> BodyFile:
    """A file of its own with the tail's octets, beside it: the n-th copy's (each stored message's tail
    is adopted by the spool, so two copies never share one). Durable when the spool adopts it."""
    path = f"{tail.path}.{n}"
    with open(path, "wb") as f:
        for chunk in tail.chunks():
            f.write(chunk)
    return BodyFile(path, 0, tail.length)


def _printable(text: str) -> str:
    """A reason as one line of visible ASCII (it goes into an SMTP reply): at most 400 characters."""
    return "".join(c if " " <= c <= "~" else "?" for c in text)[:400]


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


def reception(
    envelope: Envelope, message_id: str, rcpt: str, pool: str, now: float, own: dict[str, str] | None = None
) -> Event:
    """The Reception event of one recipient: what came in, from whom, with the sender's labels and
    postmux's `own` (which win a clash, events/types.py)."""
    return Event(
        EventType.RECEPTION,
        id=message_id,
        sender=envelope.sender,
        recipient=rcpt,
        pool=pool,
        queue=f"{pool}/{domain_of(rcpt)}",
        size=envelope.size,
        timestamp=now,
        tags={**envelope.tags, **own} if own else envelope.tags,
        metadata=envelope.metadata,
        message_id=envelope.message_id_header,
        created=now,
        client=envelope.client_ip,
        helo=envelope.helo,
        auth_user=envelope.auth_user,
    )


def _suppressed(envelope: Envelope, message_id: str, stopped: list[Found], now: float) -> list[Event]:
    return [suppressed(envelope, message_id, found, now) for found in stopped]


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


@functools.lru_cache(maxsize=4)
def date_field(second: int) -> str:
    """RFC 5322 3.3's date-time of the Received field, for a whole second since the epoch: the same text as
    formatdate(now) for any `now` within it (to the microsecond, which formatdate rounds to), made once a
    second instead of each message (~10 µs)."""
    return formatdate(second)


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
