"""PROXY protocol v1/v2 before SMTP ([smtp] proxy_protocol): the client behind a trusted proxy, no one else.

The headers are written by hand here, from HAProxy's doc/proxy-protocol.txt, not by the parser under test.
The proxy is this test's own connection from a loopback address; the client it names is any address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import ssl
import struct
import time
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.security.client import RawClient
from tests.security.conftest import StartGateway
from tests.support import Upstream, read_events, wait_until

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"  # spec 2.2: twelve octets no SMTP or HTTP client would send
PROXY, LOCAL = 0x1, 0x0  # v2 commands
STREAM, DGRAM = 0x1, 0x2  # v2 transport protocols
RELAY_DENIED = "554 5.7.1 <user@dest.test>: Relay access denied"


def proxy_v1(client: str, client_port: int = 40000) -> bytes:
    """`PROXY TCP4|TCP6 client server client_port server_port CRLF` (spec 2.1)."""
    ip = ipaddress.ip_address(client)
    server = "127.0.0.1" if ip.version == 4 else "::1"
    return f"PROXY TCP{ip.version} {client} {server} {client_port} 2525\r\n".encode()


def proxy_v2(
    client: str, client_port: int = 40000, *, command: int = PROXY, transport: int = STREAM, tlvs: bytes = b""
) -> bytes:
    """Signature, version 2 and command, family and transport, length, addresses, ports, TLVs (spec 2.2)."""
    ip = ipaddress.ip_address(client)
    server = ipaddress.ip_address("127.0.0.1" if ip.version == 4 else "::1")
    family = 0x1 if ip.version == 4 else 0x2  # AF_INET, AF_INET6
    block = ip.packed + server.packed + struct.pack("!HH", client_port, 2525) + tlvs
    return (
        V2_SIGNATURE
        + bytes([0x20 | command, family << 4 | transport])
        + struct.pack("!H", len(block))
        + block
    )


async def through_proxy(port: int, header: bytes, proxy: str = "127.0.0.1") -> RawClient:
    """A connection from `proxy` that sends `header` first, as HAProxy does, then reads the greeting."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(proxy, 0))
    writer.write(header)
    client = RawClient(reader, writer, "")
    client.greeting = await client.reply()
    return client


async def said_before_closing(reader: asyncio.StreamReader) -> bytes:
    """All the server wrote until it closed; a reset (it closed with our octets unread) is a close too."""
    try:
        return await asyncio.wait_for(reader.read(), 5)
    except ConnectionResetError:
        return b""


async def send_through(client: RawClient, test_id: str) -> str:
    await client.ehlo_mail_rcpt()
    assert await client.cmd("DATA") == "354 End data with <CR><LF>.<CR><LF>"
    return await client.cmd(f"X-Test-Id: {test_id}\r\n\r\nhello\r\n.\r\n")


def receptions(tmp_path: Path) -> list[dict[str, Any]]:
    return [e for e in read_events(tmp_path / "events.jsonl") if e["type"] == "Reception"]


def _errors(caplog: pytest.LogCaptureFixture, logged: list[dict[str, Any]]) -> list[Any]:
    """Error lines and tracebacks: stdlib loggers (aiosmtpd, asyncio) and postmux's structlog."""
    stdlib = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    ours = [e for e in logged if e["log_level"] in ("error", "critical") or e.get("exc_info")]
    return [*stdlib, *ours]


@pytest.mark.parametrize(
    ("header", "client"),
    [
        (proxy_v1("192.0.2.10"), "192.0.2.10"),
        (proxy_v2("192.0.2.10"), "192.0.2.10"),
        (proxy_v1("2001:db8::7"), "2001:db8::7"),
        (proxy_v2("2001:db8::7", tlvs=b"\x04\x00\x02\x00\x00"), "2001:db8::7"),  # a NOOP TLV is skipped
    ],
    ids=["v1", "v2", "v1-ipv6", "v2-ipv6-tlv"],
)
async def test_the_client_a_trusted_proxy_names_is_the_one_in_the_reception_event_and_received_header(
    gateway: StartGateway, tmp_path: Path, header: bytes, client: str
) -> None:
    app = await gateway(proxy_protocol=True, trusted_networks=["192.0.2.0/24", "2001:db8::/32"])
    proxied = await through_proxy(app.smtp_port, header)
    assert proxied.greeting.startswith("220 postmux.test")
    assert (await send_through(proxied, "behind")).startswith("250 2.0.0 Ok: queued as")
    await proxied.close()
    up: Upstream = app.upstream  # type: ignore[attr-defined]
    await wait_until(lambda: len(up.received) == 1 and len(receptions(tmp_path)) == 1)
    assert [r["client"] for r in receptions(tmp_path)] == [client]
    assert f"from client.test ([{client}])".encode() in up.received[0].data
    assert b"[127.0.0.1]" not in up.received[0].data  # the proxy is not a hop


@pytest.mark.parametrize("version", [1, 2])
async def test_a_client_outside_trusted_networks_behind_a_trusted_proxy_may_not_relay(
    gateway: StartGateway, version: int
) -> None:
    # The proxy's own address (127.0.0.1) may relay; the client it speaks for may not.
    app = await gateway(proxy_protocol=True, trusted_networks=["127.0.0.0/8"])
    build = proxy_v1 if version == 1 else proxy_v2
    outsider = await through_proxy(app.smtp_port, build("198.51.100.7"))
    await outsider.cmd("EHLO client.test")
    assert (await outsider.cmd("MAIL FROM:<app@example.com>")).startswith("250")
    assert await outsider.cmd("RCPT TO:<user@dest.test>") == RELAY_DENIED
    await outsider.close()
    insider = await through_proxy(app.smtp_port, build("127.0.0.9"))
    await insider.ehlo_mail_rcpt()  # the same proxy, a client inside trusted_networks: 250
    await insider.close()


async def test_a_header_from_a_peer_outside_proxy_trusted_is_never_believed(
    gateway: StartGateway, caplog: pytest.LogCaptureFixture
) -> None:
    app = await gateway(proxy_protocol=True, proxy_trusted=["127.0.0.1/32"], trusted_networks=["127.0.0.0/8"])
    with caplog.at_level(logging.INFO), capture_logs() as logged:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", app.smtp_port, local_addr=("127.0.0.2", 0)
        )
        writer.write(proxy_v2("127.0.0.1"))
        assert await said_before_closing(reader) == b""  # closed, nothing said
        writer.close()
    refused = [e for e in logged if e["event"] == "connection closed: PROXY header refused"]
    assert [(e["proxy"], e["reason"]) for e in refused] == [("127.0.0.2", "peer not in [smtp] proxy_trusted")]
    assert not _errors(caplog, logged)


BAD_HEADERS = {
    "smtp-without-header": b"EHLO client.test\r\n",
    "v1-bad-address": b"PROXY TCP4 300.0.0.1 127.0.0.1 40000 2525\r\n",
    "v1-missing-port": b"PROXY TCP4 192.0.2.10 127.0.0.1 40000\r\n",
    "v1-family-mismatch": b"PROXY TCP4 2001:db8::7 ::1 40000 2525\r\n",
    "v1-bare-lf": b"PROXY TCP4 192.0.2.10 127.0.0.1 40000 2525\n",
    "v1-too-long": b"PROXY TCP4 " + b"1" * 200 + b"\r\n",
    "v2-version-3": proxy_v2("192.0.2.10").replace(V2_SIGNATURE + b"\x21", V2_SIGNATURE + b"\x31"),
    "v2-udp": proxy_v2("192.0.2.10", transport=DGRAM),
    "v2-truncated-address": V2_SIGNATURE + b"\x21\x11\x00\x04" + b"\xc0\x00\x02\x0a",
    "v2-half-signature-then-eof": V2_SIGNATURE[:8],
}


@pytest.mark.parametrize("header", BAD_HEADERS.values(), ids=BAD_HEADERS.keys())
async def test_a_bad_header_closes_the_connection_with_a_log_line_and_no_reply(
    gateway: StartGateway, caplog: pytest.LogCaptureFixture, header: bytes
) -> None:
    app = await gateway(proxy_protocol=True, proxy_timeout=0.5)
    with caplog.at_level(logging.INFO), capture_logs() as logged:
        reader, writer = await asyncio.open_connection("127.0.0.1", app.smtp_port)
        writer.write(header)
        if header == BAD_HEADERS["v2-half-signature-then-eof"]:
            writer.write_eof()
        assert await said_before_closing(reader) == b""  # no greeting, no reply, closed
        writer.close()
        await wait_until(lambda: any(e["event"].startswith("connection closed") for e in logged), timeout=5)
    assert not _errors(caplog, logged)


async def test_a_proxy_that_sends_no_header_in_time_is_closed_without_a_reply(
    gateway: StartGateway, caplog: pytest.LogCaptureFixture
) -> None:
    app = await gateway(proxy_protocol=True, proxy_timeout=0.3)
    with caplog.at_level(logging.INFO), capture_logs() as logged:
        reader, writer = await asyncio.open_connection("127.0.0.1", app.smtp_port)
        started = time.monotonic()
        writer.write(b"PROXY TCP4 192.0.2.10")  # and then nothing more
        assert await said_before_closing(reader) == b""
        waited = time.monotonic() - started
        writer.close()
    assert 0.25 < waited < 2.0
    closed = [e for e in logged if e["event"] == "connection closed: no PROXY header"]
    assert [e["proxy"] for e in closed] == ["127.0.0.1"]
    assert not _errors(caplog, logged)


@pytest.mark.parametrize(
    "header",
    [proxy_v2("192.0.2.10", command=LOCAL), b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN 192.0.2.10 x y z\r\n"],
    ids=["v2-local", "v1-unknown", "v1-unknown-with-junk"],
)
async def test_the_proxys_own_health_check_is_a_session_of_the_proxys_address(
    gateway: StartGateway, header: bytes
) -> None:
    # HAProxy's checks send LOCAL (v2) or UNKNOWN (v1): the spec says to use the connection's own
    # endpoints, and any address in the block is not believed.
    app = await gateway(proxy_protocol=True, trusted_networks=["192.0.2.0/24"])
    check = await through_proxy(app.smtp_port, header)
    assert check.greeting.startswith("220 ")
    await check.cmd("EHLO haproxy.test")
    assert (await check.cmd("MAIL FROM:<app@example.com>")).startswith("250")
    assert await check.cmd("RCPT TO:<user@dest.test>") == RELAY_DENIED  # 127.0.0.1, not 192.0.2.10
    assert await check.cmd("QUIT") == "221 2.0.0 Bye"
    await check.close()


async def test_connection_limits_count_the_client_behind_the_proxy_not_the_proxy(
    gateway: StartGateway,
) -> None:
    app = await gateway(proxy_protocol=True, max_connections_per_ip=1)
    first = await through_proxy(app.smtp_port, proxy_v2("192.0.2.10"))
    other = await through_proxy(app.smtp_port, proxy_v1("192.0.2.11"))
    again = await through_proxy(app.smtp_port, proxy_v1("192.0.2.10"))
    assert first.greeting.startswith("220 ") and other.greeting.startswith("220 ")
    assert again.greeting == "421 4.7.0 postmux.test Too many connections from your address, try again later"
    await again.close()
    await first.close()  # its slot is given back: the same client gets in again

    async def admitted() -> bool:
        client = await through_proxy(app.smtp_port, proxy_v2("192.0.2.10"))
        await client.close()
        return client.greeting.startswith("220 ")

    deadline = time.monotonic() + 5
    while not await admitted():
        assert time.monotonic() < deadline, "the slot of the closed connection was never given back"
        await asyncio.sleep(0.05)
    await other.close()


async def test_starttls_behind_the_proxy_keeps_the_clients_address(
    gateway: StartGateway, tls_files: dict[str, str], client_tls: ssl.SSLContext
) -> None:
    # RFC 3207 4.2 makes a new session after STARTTLS; its peer is the TCP peer, the proxy, which may relay.
    app = await gateway(proxy_protocol=True, trusted_networks=["127.0.0.0/8"], tls=tls_files)
    client = await through_proxy(app.smtp_port, proxy_v2("198.51.100.7"))
    await client.cmd("EHLO client.test")
    assert await client.cmd("STARTTLS") == "220 2.0.0 Ready to start TLS"
    await client.start_tls(client_tls)
    await client.cmd("EHLO client.test")
    assert (await client.cmd("MAIL FROM:<app@example.com>")).startswith("250")
    assert await client.cmd("RCPT TO:<user@dest.test>") == RELAY_DENIED
    await client.close()


async def test_ingress_workers_read_the_header_and_judge_relay_by_the_client(
    gateway: StartGateway, tmp_path: Path
) -> None:
    app = await gateway(workers=1, proxy_protocol=True, trusted_networks=["127.0.0.0/8", "192.0.2.0/24"])
    inside = await through_proxy(app.smtp_port, proxy_v2("192.0.2.10"))
    assert (await send_through(inside, "worker")).startswith("250 2.0.0 Ok: queued as")
    await inside.close()
    outside = await through_proxy(app.smtp_port, proxy_v1("198.51.100.7"))
    await outside.cmd("EHLO client.test")
    await outside.cmd("MAIL FROM:<app@example.com>")
    assert await outside.cmd("RCPT TO:<user@dest.test>") == RELAY_DENIED
    await outside.close()
    up: Upstream = app.upstream  # type: ignore[attr-defined]
    await wait_until(lambda: len(up.received) == 1 and len(receptions(tmp_path)) == 1)
    assert [r["client"] for r in receptions(tmp_path)] == ["192.0.2.10"]
