"""SMTP ingress on aiosmtpd, in postmux's own event loop."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Sequence
from typing import Any

import structlog
from aiosmtpd.smtp import SMTP, Session
from aiosmtpd.smtp import Envelope as SmtpEnvelope

from postmux.config import SmtpSettings, split_hostport
from postmux.envelope import Envelope
from postmux.ingress.acceptor import Acceptor
from postmux.spool.base import SpoolError

log = structlog.get_logger("postmux.smtp")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def is_trusted(peer_ip: str, networks: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(peer_ip)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


def _peer_ip(session: Session) -> str:
    peer = session.peer
    return str(peer[0]) if isinstance(peer, tuple) else ""


class IngressHandler:
    """aiosmtpd hooks: relay policy at RCPT, the durable accept at the final dot."""

    def __init__(self, settings: SmtpSettings, acceptor: Acceptor) -> None:
        self.settings = settings
        self.acceptor = acceptor
        self.trusted_networks = settings.trusted()

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: SmtpEnvelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        # aiosmtpd reads pipelined commands in order but does not advertise it (RFC 2920).
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: SmtpEnvelope, address: str, rcpt_options: list[str]
    ) -> str:
        if not is_trusted(_peer_ip(session), self.trusted_networks):
            # RFC 5321 3.6.2 / 7.1: an open relay is a spam source; only trusted clients may relay.
            return f"554 5.7.1 <{address}>: Relay access denied"
        if len(envelope.rcpt_tos) >= self.settings.max_recipients:
            return "452 4.5.3 Too many recipients"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: SmtpEnvelope) -> str:
        if not envelope.rcpt_tos:
            return "554 5.5.1 No valid recipients"
        data = envelope.original_content if envelope.original_content is not None else envelope.content
        if isinstance(data, str):
            data = data.encode("utf-8", "surrogateescape")
        sender = envelope.mail_from or ""
        message = Envelope(
            sender="" if sender == "<>" else sender,  # the null reverse-path (RFC 5321 4.5.5)
            recipients=tuple(envelope.rcpt_tos),
            data=bytes(data or b""),
            client_ip=_peer_ip(session),
            smtputf8="SMTPUTF8" in (o.upper() for o in envelope.mail_options),
            helo=session.host_name or "",
            protocol="ESMTP" if session.extended_smtp else "SMTP",
        )
        try:
            queue_id = await self.acceptor.accept(message)
        except SpoolError as e:
            log.error("spool refused a message", error=str(e))
            return "451 4.3.0 Requested action aborted: local error in processing"
        except Exception:
            log.exception("accept failed")
            return "451 4.3.0 Requested action aborted: local error in processing"
        return f"250 2.0.0 Ok: queued as {queue_id}"


async def start_smtp_server(settings: SmtpSettings, acceptor: Acceptor) -> asyncio.Server:
    handler = IngressHandler(settings, acceptor)
    host, port = split_hostport(settings.listen)

    def factory() -> Any:
        return SMTP(
            handler,
            hostname=settings.hostname,
            ident="postmux",
            data_size_limit=settings.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            timeout=settings.timeout,
        )

    return await asyncio.get_running_loop().create_server(factory, host=host, port=port, reuse_address=True)
