"""Edges of one SMTP session (issue 10 B6, E): recipient overshoot, AUTH line length, listen backlog,
the HELO in Received, enhanced status codes on every reply."""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import selectors
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from postmux.envelope import Envelope
from postmux.ingress.smtp import ConnectionLimits, start_smtp_server
from postmux.ingress.workers import listening_socket
from postmux.passwords import hash_password
from tests.security.client import RawClient
from tests.security.conftest import StartGateway
from tests.support import Upstream, make_settings, wait_until

USERS = [{"name": "billing", "password_hash": hash_password("s3cret", n=2**10)}]
TOO_MANY = "452 4.5.3 Too many recipients"
POOLS = [{"name": "default", "members": [{"name": "up", "address": "127.0.0.1:9"}]}]
# RFC 3463 2: class.subject.detail, the class the reply's own first digit.
ENHANCED = re.compile(r"^([245])\d\d[ -]\1\.\d{1,3}\.\d{1,3} ")


async def _pipeline(client: RawClient, commands: list[str]) -> list[str]:
    """Send the commands in one write (RFC 2920) and read one reply for each."""
    await client.send("".join(f"{c}\r\n" for c in commands).encode())
    return [await client.reply() for _ in commands]


# -- recipients past the limit ----------------------------------------------------------------------


async def test_pipelined_recipients_past_the_limit_get_452_and_do_not_end_the_session(
    gateway: StartGateway,
) -> None:
    app = await gateway(max_recipients=5, max_errors=3)
    client = await RawClient.connect(app.smtp_port)
    assert (await client.cmd("EHLO client.test")).startswith("250")
    rcpts = [f"RCPT TO:<r{i}@dest.test>" for i in range(15)]
    replies = await _pipeline(client, ["MAIL FROM:<app@example.com>", *rcpts, "DATA"])
    assert replies[:6] == ["250 2.1.0 Ok"] + ["250 2.1.5 Ok"] * 5
    assert replies[6:16] == [TOO_MANY] * 10  # ten over the limit, max_errors is 3: no 421
    assert replies[16].startswith("354")
    assert (await client.cmd(b"X-Test-Id: five\r\n\r\nhi\r\n.\r\n")).startswith("250 2.0.0 Ok: queued as")
    await client.close()
    up: Upstream = app.upstream  # type: ignore[attr-defined]
    await wait_until(
        lambda: (
            sorted(rcpt for r in up.received for rcpt in r.recipients)
            == [f"r{i}@dest.test" for i in range(5)]
        )
    )


async def test_recipients_past_the_overshoot_limit_count_as_errors_again(gateway: StartGateway) -> None:
    app = await gateway(max_recipients=2, max_errors=3, recipient_overshoot_limit=4)
    client = await RawClient.connect(app.smtp_port)
    await client.ehlo_mail_rcpt()
    assert (await client.cmd("RCPT TO:<b@dest.test>")).startswith("250")
    for _ in range(4):  # within the allowance
        assert await client.cmd("RCPT TO:<c@dest.test>") == TOO_MANY
    for _ in range(3):  # then three errors
        assert await client.cmd("RCPT TO:<c@dest.test>") == TOO_MANY
    assert await client.reply() == "421 4.7.0 postmux.test Error: too many errors"
    assert await client.closed()
    await client.close()


async def test_the_overshoot_allowance_is_per_transaction(gateway: StartGateway) -> None:
    app = await gateway(max_recipients=1, max_errors=2, recipient_overshoot_limit=2)
    client = await RawClient.connect(app.smtp_port)
    await client.ehlo_mail_rcpt()
    assert await _pipeline(client, ["RCPT TO:<c@dest.test>"] * 2) == [TOO_MANY] * 2
    assert await client.cmd("RSET") == "250 2.0.0 OK"
    replies = await _pipeline(
        client, ["MAIL FROM:<a@example.com>", "RCPT TO:<b@dest.test>", *["RCPT TO:<c@dest.test>"] * 2]
    )
    assert replies == ["250 2.1.0 Ok", "250 2.1.5 Ok", TOO_MANY, TOO_MANY]
    assert await client.cmd("NOOP") == "250 2.0.0 OK"
    await client.close()


# -- AUTH exchange lines ----------------------------------------------------------------------------


def _errors(caplog: pytest.LogCaptureFixture, logged: list[dict[str, Any]]) -> list[Any]:
    """Error lines and tracebacks, from the stdlib loggers (aiosmtpd) and from postmux's structlog."""
    stdlib = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    ours = [e for e in logged if e["log_level"] in ("error", "critical") or e.get("exc_info")]
    return [*stdlib, *ours]


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
@pytest.mark.parametrize("length", [1_100, 70_000])
async def test_an_over_long_auth_line_gets_500_5_5_6_and_no_traceback(
    gateway: StartGateway, caplog: pytest.LogCaptureFixture, mechanism: str, length: int
) -> None:
    app = await gateway(users=USERS, auth_require_tls=False, auth_failure_delay=0)
    client = await RawClient.connect(app.smtp_port)
    await client.cmd("EHLO client.test")
    assert (await client.cmd(f"AUTH {mechanism}")).startswith("334 ")
    line = base64.b64encode(b"\0billing\0" + b"p" * length)
    with caplog.at_level(logging.INFO), capture_logs() as logged:
        reply = await client.cmd(line + b"\r\n")
        assert await client.cmd("NOOP") == "250 2.0.0 OK"  # one reply; the rest of the line was not a command
    assert reply == "500 5.5.6 Authentication Exchange line is too long"
    assert not _errors(caplog, logged)
    # The session is still good for a login of the right length.
    plain = base64.b64encode(b"\0billing\0s3cret").decode()
    assert await client.cmd(f"AUTH PLAIN {plain}") == "235 2.7.0 Authentication successful"
    await client.close()


# -- listen backlog ---------------------------------------------------------------------------------


def _handshakes_completed(port: int, count: int, wait_s: float) -> tuple[int, list[socket.socket]]:
    """Open `count` connections at once while nothing accepts them: how many the kernel completes.

    Called from the test's own coroutine, so the event loop serving `port` is busy the whole time, as a
    loop in the middle of a burst is: the kernel's accept queue (listen's backlog) is all there is.
    """
    socks, selector, completed = [], selectors.DefaultSelector(), 0
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.setblocking(False)
            socks.append(sock)
            sock.connect_ex(("127.0.0.1", port))
            selector.register(sock, selectors.EVENT_WRITE)
        deadline = time.monotonic() + wait_s
        while selector.get_map() and (left := deadline - time.monotonic()) > 0:
            for key, _ in selector.select(left):
                selector.unregister(key.fileobj)
                completed += key.fileobj.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0  # type: ignore[union-attr]
    finally:
        selector.close()
    return completed, socks


class _NoMail:
    async def accept(self, envelope: Envelope) -> str:
        raise AssertionError("no message is sent in this test")


@pytest.mark.parametrize("shared_socket", [False, True], ids=["listener", "workers-socket"])
async def test_a_burst_of_connections_waits_in_the_listen_backlog(
    tmp_path: Path, shared_socket: bool
) -> None:
    settings = make_settings(tmp_path, POOLS, smtp={"max_connections": 1000, "max_connections_per_ip": 1000})
    assert settings.smtp.listen_backlog == 1024
    limits = ConnectionLimits(1000, 1000, "postmux.test")
    # The ingress workers' socket is made by the main process and listened on again by each worker.
    sock = listening_socket(settings.smtp.listen, settings.smtp.listen_backlog) if shared_socket else None
    server = await start_smtp_server(settings.smtp, _NoMail(), sock, limits=limits)
    port = int(server.sockets[0].getsockname()[1])
    try:
        completed, socks = _handshakes_completed(port, 400, wait_s=0.5)
        for s in socks:
            s.close()
        # asyncio's default backlog of 100 completes about 101 and leaves the rest to SYN retries (1 s, 3 s).
        assert completed == 400
        await wait_until(lambda: limits.open.total() == 0, timeout=5.0)
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(), timeout=5.0)


# -- the HELO in Received ---------------------------------------------------------------------------


def _first_received(data: bytes) -> str:
    head = data.split(b"\r\n\r\n", 1)[0].decode()
    fields = re.split(r"\r\n(?![ \t])", head)
    return fields[0]


@pytest.mark.parametrize(
    "helo",
    [
        "a.test ([192.0.2.1]) by mx.victim.test",
        "a.test; Tue, 1 Jan 2030 00:00:00 +0000",
        "a.test (by evil.test) (",
        "by",
        # An IPv6 zone takes any text to ipaddress: the literal must be the address parser's literal.
        "[IPv6:fe80::1%x) by mx.victim.test with ESMTP id 1; Mon, 1 Jan 2001 00:00:00 +0000 (]",
    ],
)
async def test_an_ehlo_cannot_forge_a_second_hop_in_the_received_field(
    gateway: StartGateway, helo: str
) -> None:
    app = await gateway()
    client = await RawClient.connect(app.smtp_port)
    await client.ehlo_mail_rcpt()  # EHLO client.test; then the hostile one starts a new session state
    assert (await client.cmd(f"EHLO {helo}")).startswith("250")
    await client.cmd("MAIL FROM:<app@example.com>")
    await client.cmd("RCPT TO:<user@dest.test>")
    await client.cmd("DATA")
    assert (await client.cmd(b"X-Test-Id: helo\r\n\r\nhi\r\n.\r\n")).startswith("250 2.0.0")
    await client.close()
    up: Upstream = app.upstream  # type: ignore[attr-defined]
    await wait_until(lambda: len(up.received) == 1)
    received = _first_received(up.received[0].data)
    unfolded = re.sub(r"\r\n[ \t]", " ", received)
    without_comments = re.sub(r"\((?:[^()\\]|\\.)*\)", "", unfolded)
    words = without_comments.split()
    assert words[:4] == ["Received:", "from", "unknown", "by"], received
    assert words.count("by") == 1 and words.count("from") == 1
    assert without_comments.count(";") == 1


# -- enhanced status codes (RFC 2034) ---------------------------------------------------------------


async def test_every_final_reply_after_ehlo_carries_an_enhanced_status_code(gateway: StartGateway) -> None:
    app = await gateway(max_errors=100, max_message_size=1000)
    client = await RawClient.connect(app.smtp_port)
    ehlo = await client.cmd("EHLO client.test")
    assert "250-ENHANCEDSTATUSCODES" in ehlo.splitlines()
    commands: list[str | bytes] = [
        "NOOP",
        "HELP",
        "HELP MAIL",
        "HELP NOSUCH",
        "VRFY <a@dest.test>",
        "VRFY",
        "EXPN list",
        "RSET",
        "RCPT TO:<a@dest.test>",
        "DATA",
        "MAIL FROM:<app@example.com> SIZE=5000",
        "MAIL FROM:<app@example.com> NOSUCH=1",
        "MAIL FROM:<app@example.com>",
        "MAIL FROM:<app@example.com>",
        "RCPT TO:<a@dest.test> NOSUCH=1",
        "RCPT TO:<a@dest.test>",
        "STARTTLS",
        "AUTH PLAIN",
        "NOSUCH",
        "DATA",
        b"Subject: x\r\n\r\nhi\r\n.\r\n",
        "QUIT",
    ]
    replies = [await client.cmd(c) for c in commands]
    await client.close()
    without = [
        (c, r) for c, r in zip(commands, replies, strict=True) if not ENHANCED.match(r) and r[:3] != "354"
    ]
    assert not without
    assert replies[commands.index("MAIL FROM:<app@example.com>")] == "250 2.1.0 Ok"
    assert replies[-1] == "221 2.0.0 Bye"
    # RFC 5321 4.2.2, 4.3.2: help is a 214 (aiosmtpd says 250).
    assert replies[1].startswith("214 2.0.0 Supported commands:")
    assert replies[2].startswith("214 2.0.0 Syntax:")


async def test_a_login_writes_no_aiosmtpd_warning_into_the_log(
    gateway: StartGateway, caplog: pytest.LogCaptureFixture
) -> None:
    app = await gateway(users=USERS, auth_require_tls=False)
    client = await RawClient.connect(app.smtp_port)
    await client.cmd("EHLO client.test")
    plain = base64.b64encode(b"\0billing\0s3cret").decode()
    with caplog.at_level(logging.WARNING):
        assert await client.cmd(f"AUTH PLAIN {plain}") == "235 2.7.0 Authentication successful"
        assert await client.cmd("NOOP") == "250 2.0.0 OK"
    await client.close()
    # aiosmtpd's "Session.login_data is deprecated ..." came through the stdlib logger as plain text.
    assert [r.getMessage() for r in caplog.records if r.name == "mail.log"] == []


async def test_a_client_that_leaves_during_the_tls_handshake_leaves_no_traceback(
    gateway: StartGateway, tls_files: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    app = await gateway(tls=tls_files)
    with caplog.at_level(logging.INFO), capture_logs() as logged:
        for _ in range(3):
            client = await RawClient.connect(app.smtp_port)
            await client.cmd("EHLO client.test")
            assert await client.cmd("STARTTLS") == "220 2.0.0 Ready to start TLS"
            await client.send(b"this is not a TLS ClientHello\r\n")
            assert await client.closed()
            await client.close()
        after = await RawClient.connect(app.smtp_port)  # and the listener is fine
        assert after.greeting.startswith("220 ")
        await after.close()
    assert not _errors(caplog, logged)


@pytest.mark.parametrize(
    "params",
    ["SIZE=\u00b2", "SIZE=\u0661\u0662", "\u017fmtputf8", "BODY=8BITM\u0131ME", b"SIZE=1\xff"],
    ids=["superscript-two", "arabic-indic-digits", "long-s", "dotless-i", "not-utf-8"],
)
async def test_a_mail_parameter_that_is_not_ascii_is_a_syntax_error(
    gateway: StartGateway, params: str | bytes
) -> None:
    """RFC 5321 4.1.2: ESMTP keywords and values are ASCII; aiosmtpd read them with Unicode's isdigit and
    upper (a 451 and a traceback for "²", a SIZE of "١٢", SMTPUTF8 from "ſmtputf8"). Postfix: 501 too."""
    app = await gateway()
    client = await RawClient.connect(app.smtp_port)
    await client.cmd("EHLO client.test")
    raw = params if isinstance(params, bytes) else params.encode()
    reply = await client.cmd(b"MAIL FROM:<app@example.com> " + raw + b"\r\n")
    assert reply == "501 5.5.4 Syntax error in parameters: not ASCII (RFC 5321 4.1.2)"
    assert (await client.cmd("MAIL FROM:<app@example.com> SIZE=12")).startswith("250 ")
    await client.close()


async def test_the_fifth_unknown_command_is_a_421_and_the_connection_closes(gateway: StartGateway) -> None:
    """aiosmtpd's budget of unknown commands ends in a close; RFC 5321 3.8: the reply that comes with it is
    a 421."""
    app = await gateway()
    client = await RawClient.connect(app.smtp_port)
    await client.cmd("EHLO client.test")
    replies = [await client.cmd(f"NOSUCH{i}") for i in range(5)]
    assert all(r.startswith("500 5.5.2") for r in replies[:4])
    assert replies[4] == "421 4.7.0 Error: too many unrecognized commands, closing connection"
    assert await client.closed()
    await client.close()
