"""judge_header: which client a PROXY header names, per HAProxy's doc/proxy-protocol.txt (headers by hand)."""

from __future__ import annotations

import asyncio
import struct

import pytest

from postmux.ingress.proxy import ProxiedClient, ProxyRefusal, judge_header, read_header

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v2(command: int, family_transport: int, block: bytes) -> bytes:
    return SIGNATURE + bytes([0x20 | command, family_transport]) + struct.pack("!H", len(block)) + block


INET = bytes([192, 0, 2, 10, 127, 0, 0, 1]) + struct.pack("!HH", 40000, 2525)
UNIX = b"/run/client.sock".ljust(108, b"\0") + b"/run/postmux.sock".ljust(108, b"\0")


async def judged(raw: bytes, eof: bool = True) -> ProxiedClient | ProxyRefusal:
    reader = asyncio.StreamReader()
    reader.feed_data(raw)
    if eof:
        reader.feed_eof()
    return judge_header(await read_header(reader), "10.0.0.5")


@pytest.mark.parametrize(
    ("raw", "verdict"),
    [
        (b"PROXY TCP4 192.0.2.10 127.0.0.1 40000 2525\r\n", ProxiedClient("192.0.2.10", 40000)),
        (b"PROXY TCP6 2001:db8::7 ::1 40000 2525\r\n", ProxiedClient("2001:db8::7", 40000)),
        (v2(0x1, 0x11, INET), ProxiedClient("192.0.2.10", 40000)),
        # The proxy speaking for itself: its own address, whatever the block holds.
        (v2(0x0, 0x11, INET), ProxiedClient("10.0.0.5", None)),
        (v2(0x1, 0x00, b""), ProxiedClient("10.0.0.5", None)),
        (v2(0x1, 0x31, UNIX), ProxiedClient("10.0.0.5", None)),
        (b"PROXY UNKNOWN\r\n", ProxiedClient("10.0.0.5", None)),
    ],
    ids=["v1-tcp4", "v1-tcp6", "v2-proxy", "v2-local", "v2-unspec", "v2-unix", "v1-unknown"],
)
async def test_a_valid_header_names_the_client_or_the_proxy_itself(
    raw: bytes, verdict: ProxiedClient | ProxyRefusal
) -> None:
    assert await judged(raw + b"EHLO client.test\r\n") == verdict


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"PRO",
        b"EHLO client.test\r\n",
        b"PROXY TCP4 192.0.2.10 127.0.0.1 40000 99999\r\n",
        v2(0x1, 0x12, INET),  # UDP
        v2(0x2, 0x11, INET),  # no such command
        SIGNATURE + b"\x21\x11\x00\x0c" + INET[:4],  # shorter than it says
    ],
    ids=["nothing", "cut", "smtp", "v1-port", "v2-udp", "v2-command", "v2-short"],
)
async def test_anything_else_is_refused_with_a_reason(raw: bytes) -> None:
    verdict = await judged(raw)
    assert isinstance(verdict, ProxyRefusal) and verdict.reason
