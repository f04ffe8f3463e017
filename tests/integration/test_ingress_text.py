"""What the SMTP listener hands the acceptor for a message's text: the bytes, and what it found in them.

A real listener (`start_smtp_server`) on loopback and an acceptor that keeps each envelope it is given.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tracemalloc
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from postmux.config import SmtpSettings
from postmux.envelope import Envelope
from postmux.ingress.folding import fold_long_lines
from postmux.spool.base import SpoolError
from tests.security.client import RawClient
from tests.support import wait_until

HEAD = b"Subject: text\r\n\r\n"


class Keeper:
    """An acceptor that keeps what it is given and answers with a queue id of its own, or fails."""

    def __init__(self, error: Exception | None = None, delay: float = 0.0) -> None:
        self.envelopes: list[Envelope] = []
        self.error = error
        self.delay = delay  # a spool commit that takes this long

    async def accept(self, envelope: Envelope) -> str:
        await asyncio.sleep(self.delay)
        self.envelopes.append(envelope)
        if self.error is not None:
            raise self.error
        return f"q{len(self.envelopes)}"


Listen = Callable[..., Coroutine[Any, Any, tuple[int, Keeper]]]


@pytest.fixture
async def listen() -> AsyncIterator[Listen]:
    from postmux.ingress.smtp import start_smtp_server

    servers: list[asyncio.Server] = []

    async def start(
        spill_dir: Path | None = None, keeper: Keeper | None = None, **smtp: Any
    ) -> tuple[int, Keeper]:
        keeper = keeper or Keeper()
        settings = SmtpSettings(listen="127.0.0.1:0", hostname="postmux.test", **smtp)
        server = await start_smtp_server(settings, keeper, spill_dir=spill_dir)
        servers.append(server)
        return int(server.sockets[0].getsockname()[1]), keeper

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def at_text(port: int) -> RawClient:
    """A client past DATA's 354: what it sends next is its text."""
    client = await RawClient.connect(port)
    await client.ehlo_mail_rcpt()
    assert (await client.cmd("DATA")).startswith("354")
    return client


async def transaction(port: int, text: bytes) -> str:
    """One message whose text is `text` (already dot-stuffed, as a client sends it); the reply to it."""
    client = await at_text(port)
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


LINE = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAxMjM0NTY3\r\n"  # base64's 78


def lines_of(mib: int) -> Iterator[bytes]:
    """A text of `mib` MiB in chunks of a MiB: the header, then lines of base64."""
    yield HEAD
    chunk = LINE * ((1 << 20) // len(LINE))
    for _ in range(mib):
        yield chunk


def read_back(envelope: Envelope) -> bytes:
    return envelope.data + (envelope.tail.read() if envelope.tail is not None else b"")


async def test_a_50_mb_text_goes_to_a_file_as_it_arrives_and_memory_stays_flat(
    listen: Listen, tmp_path: Path
) -> None:
    port, keeper = await listen(tmp_path, max_message_size=60_000_000)
    expected = hashlib.sha256()
    tracemalloc.start()
    try:
        client = await RawClient.connect(port)
        await client.ehlo_mail_rcpt()
        assert (await client.cmd("DATA")).startswith("354")
        for chunk in lines_of(50):
            expected.update(chunk)
            await client.send(chunk)
        await client.send(b".\r\n")
        reply = await client.reply(timeout=60)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    await client.close()
    assert reply == "250 2.0.0 Ok: queued as q1"
    assert peak < 10_000_000, f"{peak:,} octets at the peak"
    [envelope] = keeper.envelopes
    assert envelope.tail is not None and Path(envelope.tail.path).parent == tmp_path
    assert len(envelope.data) <= 1_048_576 and envelope.size > 50_000_000
    got = hashlib.sha256(envelope.data)
    for chunk in envelope.tail.chunks():
        got.update(chunk)
    assert got.hexdigest() == expected.hexdigest()
    assert envelope.clean


@pytest.mark.parametrize("spill_bytes", [1, 1000, 100_000])
@pytest.mark.parametrize("line_endings", ["reject", "normalize"])
async def test_a_spilled_text_is_the_text_kept_in_memory(
    listen: Listen, tmp_path: Path, spill_bytes: int, line_endings: str
) -> None:
    text = HEAD + b"..dot\r\n" + LINE * 3000 + b"x" * 2500 + b"\r\n" + LINE * 10
    in_memory, whole = await listen(None, line_endings=line_endings)
    spilled, parts = await listen(tmp_path, spill_bytes=spill_bytes, line_endings=line_endings)
    for port in (in_memory, spilled):
        assert (await transaction(port, text)).startswith("250 2.0.0 Ok: queued as q1")
    [expected], [envelope] = whole.envelopes, parts.envelopes
    assert expected.tail is None and envelope.tail is not None
    assert read_back(envelope) == expected.data and envelope.size == len(expected.data)
    assert not envelope.clean and not expected.clean  # the line that was "..dot"
    assert envelope.data.endswith(b"\r\n") or not envelope.data  # whole lines in memory


SPILLED = HEAD + LINE * 4000  # 300 KB: past spill_bytes below


@pytest.mark.parametrize(
    ("smtp", "text", "reply"),
    [
        ({}, SPILLED + b"bare\nLF\r\n", "550 5.6.11"),
        ({"line_endings": "normalize"}, SPILLED + b"NUL\x00\r\n", "550 5.6.11"),
        ({}, b"Received: x\r\n" * 60 + SPILLED, "554 5.4.6"),
        ({"max_message_size": 200_000}, SPILLED, "552 5.3.4"),
        ({"long_lines": "refuse"}, SPILLED + b"y" * 1200 + b"\r\n", "500 5.5.2"),
    ],
)
async def test_a_text_refused_leaves_no_file(
    listen: Listen, tmp_path: Path, smtp: dict[str, Any], text: bytes, reply: str
) -> None:
    port, keeper = await listen(tmp_path, spill_bytes=1000, **smtp)
    assert (await transaction(port, text)).startswith(reply)
    assert os.listdir(tmp_path) == [] and keeper.envelopes == []


async def test_a_client_that_hangs_up_in_the_middle_of_the_text_leaves_no_file(
    listen: Listen, tmp_path: Path
) -> None:
    port, keeper = await listen(tmp_path, spill_bytes=1000)
    client = await at_text(port)
    await client.send(SPILLED)
    await wait_until(lambda: len(os.listdir(tmp_path)) == 1)  # being written
    await client.close()
    await wait_until(lambda: os.listdir(tmp_path) == [])
    assert keeper.envelopes == []


async def test_a_client_that_half_closes_after_its_text_still_gets_the_reply_that_makes_it_ours(
    listen: Listen, tmp_path: Path
) -> None:
    """RFC 5321 4.1.1.4, 6.1: the message is ours only by the 250; a client that never reads it sends the
    message again. Its side closed (shutdown(SHUT_WR), `nc -N`) while the commit is under way."""
    port, keeper = await listen(tmp_path, keeper=Keeper(delay=0.3))
    client = await at_text(port)
    await client.send(HEAD + b"half-closed\r\n.\r\n")
    client.writer.write_eof()
    assert (await client.reply()).startswith("250 ")
    assert await client.closed()  # and then the session ends: nothing more can come
    await client.close()
    assert len(keeper.envelopes) == 1


async def test_a_pipelined_session_and_a_half_close_are_answered_to_the_end(
    listen: Listen, tmp_path: Path
) -> None:
    port, keeper = await listen(tmp_path, keeper=Keeper(delay=0.1))
    client = await RawClient.connect(port)
    await client.send(
        b"EHLO client.test\r\nMAIL FROM:<app@example.com>\r\nRCPT TO:<user@dest.test>\r\nDATA\r\n"
        + HEAD
        + b"pipelined\r\n.\r\nQUIT\r\n"
    )
    client.writer.write_eof()
    replies = [await client.reply() for _ in range(6)]
    assert [r[:3] for r in replies] == ["250", "250", "250", "354", "250", "221"]
    assert await client.closed()
    await client.close()
    assert len(keeper.envelopes) == 1


async def test_a_half_close_in_the_middle_of_the_text_keeps_nothing_and_ends_the_session(
    listen: Listen, tmp_path: Path
) -> None:
    port, keeper = await listen(tmp_path, spill_bytes=1000)
    client = await at_text(port)
    await client.send(HEAD + b"cut short\r\n")
    client.writer.write_eof()
    assert await client.reply() == ""  # no reply, the server closed
    await client.close()
    await wait_until(lambda: os.listdir(tmp_path) == [])
    assert keeper.envelopes == []


async def test_a_client_that_half_closes_between_commands_is_closed_at_once(
    listen: Listen, tmp_path: Path
) -> None:
    port, _ = await listen(tmp_path)
    client = await RawClient.connect(port)
    assert (await client.cmd("EHLO client.test")).startswith("250")
    client.writer.write_eof()
    assert await client.closed(timeout=2.0)
    await client.close()


async def test_once_handed_to_the_acceptor_the_file_is_the_spools_even_if_it_fails(
    listen: Listen, tmp_path: Path
) -> None:
    keeper = Keeper(SpoolError("disk full", disk_full=True))
    port, _ = await listen(tmp_path, spill_bytes=1000, keeper=keeper)
    assert (await transaction(port, SPILLED)).startswith("452 4.3.1")
    [envelope] = keeper.envelopes
    assert envelope.tail is not None and os.listdir(tmp_path) == [Path(envelope.tail.path).name]
    assert read_back(envelope) == SPILLED


async def test_a_text_that_cannot_be_written_to_its_file_is_refused_for_now(
    listen: Listen, tmp_path: Path
) -> None:
    port, keeper = await listen(tmp_path / "gone", spill_bytes=1000)
    assert (await transaction(port, SPILLED)).startswith("451 4.3.0")
    assert keeper.envelopes == []
    assert (await transaction(port, HEAD + b"small\r\n")).startswith("250 ")  # within spill_bytes
