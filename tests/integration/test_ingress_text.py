"""What the SMTP listener hands the acceptor for a message's text: the bytes, and what it found in them.

A real listener (`start_smtp_server`) on loopback and an acceptor that keeps each envelope it is given.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest

from postmux.config import SmtpSettings
from postmux.envelope import Envelope
from postmux.ingress.folding import fold_long_lines
from tests.security.client import RawClient

HEAD = b"Subject: text\r\n\r\n"


class Keeper:
    """An acceptor that keeps what it is given and answers with a queue id of its own."""

    def __init__(self) -> None:
        self.envelopes: list[Envelope] = []

    async def accept(self, envelope: Envelope) -> str:
        self.envelopes.append(envelope)
        return f"q{len(self.envelopes)}"


Listen = Callable[..., Coroutine[Any, Any, tuple[int, Keeper]]]


@pytest.fixture
async def listen() -> AsyncIterator[Listen]:
    from postmux.ingress.smtp import start_smtp_server

    servers: list[asyncio.Server] = []

    async def start(**smtp: Any) -> tuple[int, Keeper]:
        keeper = Keeper()
        settings = SmtpSettings(listen="127.0.0.1:0", hostname="postmux.test", **smtp)
        server = await start_smtp_server(settings, keeper)
        servers.append(server)
        return int(server.sockets[0].getsockname()[1]), keeper

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def transaction(port: int, text: bytes) -> str:
    """One message whose text is `text` (already dot-stuffed, as a client sends it); the reply to it."""
    client = await RawClient.connect(port)
    await client.ehlo_mail_rcpt()
    assert (await client.cmd("DATA")).startswith("354")
    await client.send(text + b".\r\n")
    reply = await client.reply()
    await client.close()
    return reply


@pytest.mark.parametrize(
    ("sent", "kept", "clean"),
    [
        (HEAD + b"body\r\n", HEAD + b"body\r\n", True),
        (HEAD + b"..leading dot\r\n", HEAD + b".leading dot\r\n", False),  # stuffed once more on the wire
        (HEAD + b".single\r\n", HEAD + b"single\r\n", True),  # a client that stuffs what needs none
        (HEAD + b"x" * 3000 + b"\r\n", fold_long_lines(HEAD + b"x" * 3000 + b"\r\n"), True),
        (HEAD + b".." + b"y" * 3000 + b"\r\n", fold_long_lines(HEAD + b"." + b"y" * 3000 + b"\r\n"), False),
    ],
)
async def test_the_text_kept_and_whether_it_can_be_sent_as_it_is(
    listen: Listen, sent: bytes, kept: bytes, clean: bool
) -> None:
    port, keeper = await listen()
    assert (await transaction(port, sent)).startswith("250 2.0.0 Ok: queued as q1")
    [envelope] = keeper.envelopes
    assert envelope.data == kept and envelope.tail is None
    assert envelope.clean is clean


@pytest.mark.parametrize(
    ("sent", "kept", "clean"),
    [
        (HEAD + b"one\ntwo\r\n", HEAD + b"one\r\ntwo\r\n", True),
        (HEAD + b"one\rtwo\r\n", HEAD + b"one\r\ntwo\r\n", True),
        (HEAD + b"one\n.\ntwo\r\n", HEAD + b"one\r\n.\r\ntwo\r\n", False),  # a lone dot stays a line
        (HEAD + b"one\n..two\r\n", HEAD + b"one\r\n.two\r\n", False),  # stuffed after a bare LF
        (HEAD + b"one\n.two\r\n", HEAD + b"one\r\ntwo\r\n", True),
    ],
)
async def test_repaired_line_ends_are_clean_unless_a_line_starts_with_a_dot(
    listen: Listen, sent: bytes, kept: bytes, clean: bool
) -> None:
    port, keeper = await listen(line_endings="normalize")
    assert (await transaction(port, sent)).startswith("250 2.0.0 Ok: queued as q1")
    [envelope] = keeper.envelopes
    assert envelope.data == kept and envelope.clean is clean
