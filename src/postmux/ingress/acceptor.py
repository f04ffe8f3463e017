"""The one accept path: route each recipient, store durably, hand the work to the dispatcher.

The caller answers 250 only after `accept` returns, which is only after the spool has committed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from email.utils import formatdate
from typing import Protocol

from postmux.envelope import Envelope, domain_of, new_message_id
from postmux.events.bus import EventBus
from postmux.events.types import Event, EventType
from postmux.headers import take_header
from postmux.scheduling.dispatcher import Dispatcher
from postmux.scheduling.router import Router
from postmux.spool.base import Spool

POOL_HEADER = "X-Postmux-Pool"


class Accepts(Protocol):
    """What ingress hands a complete message to: the Acceptor here, or a worker's link to it."""

    async def accept(self, envelope: Envelope) -> str:
        """Store durably and return the queue id; raises SpoolError when it could not."""
        ...


class Acceptor:
    def __init__(
        self,
        spool: Spool,
        router: Router,
        dispatcher: Dispatcher,
        bus: EventBus,
        hostname: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.hostname = hostname
        self.spool = spool
        self.router = router
        self.dispatcher = dispatcher
        self.bus = bus
        self.clock = clock

    async def accept(self, envelope: Envelope) -> str:
        """Store the message durably and return its queue id; raises SpoolError when it could not."""
        sender_domain = envelope.sender_domain
        # The pool header is a request to postmux, not part of the mail: it never reaches a member.
        data, requested = take_header(envelope.data, POOL_HEADER)
        if requested:
            envelope = replace(envelope, data=data)
        pool_header = requested[-1] if requested else ""
        pools = {
            rcpt: self.router.pool_for(
                sender_domain, domain_of(rcpt), envelope.client_ip, pool_header, envelope.auth_user
            )
            for rcpt in envelope.recipients
        }
        now = self.clock()
        message_id = new_message_id()
        envelope = replace(envelope, data=self._received(envelope, message_id, now) + envelope.data)
        hot = self.dispatcher.has_room()
        work = await self.spool.store(message_id, envelope, pools, now, lease=hot)
        if hot:
            self.dispatcher.submit(work)
        else:
            self.dispatcher.scan_soon()
        for rcpt in envelope.recipients:
            self.bus.emit(
                Event(
                    EventType.RECEPTION,
                    id=message_id,
                    sender=envelope.sender,
                    recipient=rcpt,
                    pool=pools[rcpt],
                    queue=f"{pools[rcpt]}/{domain_of(rcpt)}",
                    size=len(envelope.data),
                    timestamp=now,
                    tags=envelope.tags,
                )
            )
        return message_id

    def _received(self, envelope: Envelope, message_id: str, now: float) -> bytes:
        """The trace header every relay prepends (RFC 5321 4.4), the only change made to the bytes here.

        (The SMTP reader has already broken any line over 998 octets, [smtp] long_lines, ingress/folding.py.)

        It carries no recipient (one message, many recipients) and goes before the existing headers, so
        signatures made upstream stay valid.
        """
        helo = envelope.helo or "unknown"
        line = (
            f"Received: from {helo} ([{envelope.client_ip}])\r\n"
            f"\tby {self.hostname} (postmux) with {envelope.protocol} id {message_id};\r\n"
            f"\t{formatdate(now)}\r\n"
        )
        return line.encode("utf-8", "replace")
