"""PROXY protocol v1 and v2 before SMTP: the client's address when HAProxy stands in front of postmux.

A proxy in TCP mode opens its own connection to postmux; the one address postmux sees is the proxy's. With
`[smtp] proxy_protocol = true` the proxy first sends one header naming the client (HAProxy's `send-proxy`,
`send-proxy-v2`; the spec is HAProxy's doc/proxy-protocol.txt), and that address is the one every check
and record uses: trusted_networks at RCPT, the per-address connection and login limits, the Received
header, the Reception event's `client`, the logs. aiosmtpd parses the header (aiosmtpd.proxy_protocol);
what is believed, and from whom, is decided here.

The spec's rules, as applied: the listener expects the header on every connection and never guesses
whether one came ("The receiver MUST be configured to only receive the protocol described in this
specification and MUST not try to guess whether the protocol header is present or not"); a connection
from a peer outside `proxy_trusted` is closed unheard, since anyone can write a header naming any address;
a header that is missing, late or malformed closes the connection with nothing said, since the peer is a
proxy and not an SMTP client ("the receiver MUST ... abort the connection").
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass

from aiosmtpd.proxy_protocol import AF, PROTO, V2_CMD, AsyncReader, ProxyData, get_proxy


@dataclass(frozen=True, slots=True)
class ProxiedClient:
    """Who a believed header says the client is: its address (`ip`), as every check will use it."""

    ip: str
    port: int | None


@dataclass(frozen=True, slots=True)
class ProxyRefusal:
    """Why a header is not believed; the connection is closed without a word, and this goes to the log."""

    reason: str


def judge_header(header: ProxyData | None, proxy_ip: str) -> ProxiedClient | ProxyRefusal:
    """The client a header from the trusted proxy at `proxy_ip` names, or why it names none.

    A header that names no client address is the proxy speaking for itself: v2's LOCAL command (its
    health checks, spec 2.2: "use the real connection endpoints"), v1's UNKNOWN (spec 2.1: "use the real
    connection's parameters as if there were no PROXY protocol header"), v2's UNSPEC and UNIX families.
    Those sessions are the proxy's own, with the proxy's address. SMTP is TCP: a UDP header is refused.
    """
    if header is None:
        return ProxyRefusal("connection ended before a PROXY header")
    if not header.valid:
        return ProxyRefusal(header.error or "not a PROXY protocol header")
    if header.version == 2 and header.command == V2_CMD.LOCAL:
        return ProxiedClient(proxy_ip, None)
    if header.family in (AF.UNSPEC, AF.UNIX):
        return ProxiedClient(proxy_ip, None)
    if header.protocol != PROTO.STREAM:
        return ProxyRefusal("PROXY header for a datagram (UDP) connection")
    source = header.src_addr
    if not isinstance(source, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return ProxyRefusal("PROXY header without a source address")
    return ProxiedClient(str(source), header.src_port)


async def read_header(reader: AsyncReader) -> ProxyData | None:
    """The header at the start of a connection, parsed by aiosmtpd; None if the connection ends first.

    aiosmtpd's get_proxy catches what goes wrong after the header's first five octets, not a connection that
    ends or breaks before them. Never raises but when cancelled (the proxy_timeout).
    """
    try:
        return await get_proxy(reader)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
