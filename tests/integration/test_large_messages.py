"""A text with a tail in a file (postmux.body) reaches the member byte for byte, streamed in flat memory.

Real aiosmtpd upstreams on loopback; the 20 MB ones run in a process of their own (upstream_process.py),
so that what they take in does not count in the memory of the process that delivers.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import time
import tracemalloc
from dataclasses import replace
from pathlib import Path

import pytest
import trustme
from aiosmtplib.protocol import normalize_message_line_endings

from postmux.attempt import Recipient, Transaction
from postmux.body import CHUNK, BodyFile, BodyUnreadable
from postmux.delivery.memory import MemoryFarm
from postmux.delivery.smtp_client import SmtpTransport
from tests.security.test_outbound_tls import server_tls
from tests.support import StartUpstream, make_settings
from tests.unit.test_wire_data import aiosmtplib_text

HEAD = b"From: app@example.com\r\nTo: user@dest.test\r\nSubject: large\r\n\r\n"
ROOT = Path(__file__).resolve().parents[2]


def work_for(data: bytes, tail: BodyFile | None, *, clean: bool) -> Transaction:
    return Transaction(
        sender="app@example.com",
        recipients=(Recipient(1, "user@dest.test"),),
        data=data,
        domain="dest.test",
        tail=tail,
        clean=clean,
    )


def transport_to(tmp_path: Path, address: str, **delivery: object) -> SmtpTransport:
    pools = [{"name": "default", "members": [{"name": "up", "address": address}]}]
    settings = make_settings(tmp_path, pools, delivery=delivery)
    return SmtpTransport(settings.pool[0].members[0], settings.delivery, "postmux.test")


def tail_file(path: Path, text: bytes, offset: int = 0) -> BodyFile:
    """`text` stored at `offset` in the file at `path` (what comes before it is another message's)."""
    path.write_bytes(b"z" * offset + text + b"trailing octets of the next message")
    return BodyFile(str(path), offset, len(text))


def large_text(size: int, *, dots: bool) -> bytes:
    """CRLF lines of 1000 octets; with `dots`, every fifth starts with "." and, where chunks meet, a
    line starts right at a chunk's first octet and a CRLF is cut in two (its LF is the next chunk's first)."""
    lines = [(b"." if dots and i % 5 == 0 else b"y") + b"y" * 997 + b"\r\n" for i in range(size // 1000)]
    text = bytearray(b"".join(lines))
    if dots:
        # Both cuts fall inside a line of 1000 octets (1048576 = 1048 lines + 576 octets), so the patches
        # leave every line end a CRLF.
        text[CHUNK - 2 : CHUNK + 1] = b"\r\n."
        text[2 * CHUNK - 1 : 2 * CHUNK + 2] = b"\r\n."
    return bytes(text)


def digest(data: bytes, tail: BodyFile) -> tuple[int, str]:
    sha = hashlib.sha256(data)
    for chunk in tail.chunks():
        sha.update(chunk)
    return len(data) + tail.length, sha.hexdigest()


# -- through an upstream in this process --------------------------------------------------------------


# (data, tail, clean): texts cut between data and tail where repair and stuffing must carry across.
TEXTS = pytest.mark.parametrize(
    ("data", "tail", "clean"),
    [
        (HEAD, b"body\r\n.dot line\r\n", False),  # a dot to stuff in the tail
        (HEAD, b"body\r\nmore\r\n", True),
        (HEAD + b"a\r", b"\n.b\r\n", False),  # a CRLF cut between data and tail, then a dot line
        (HEAD + b"a\r", b"\r\n", False),  # a lone CR ending data is a line end of its own
        (HEAD + b"a\n", b"..b\nc", False),  # bare LFs repaired, and the missing last line end added
        (HEAD, b"", False),  # an empty tail
        (b"", b"Subject: only a tail\r\n\r\nbody\r\n", True),  # no data at all
    ],
    ids=["dot", "clean", "crlf-cut", "lone-cr", "bare-lf", "empty-tail", "no-data"],
)


@TEXTS
async def test_data_then_tail_reach_the_upstream_as_the_whole_text_would(
    tmp_path: Path, upstream: StartUpstream, data: bytes, tail: bytes, clean: bool
) -> None:
    up = await upstream("up")
    transport = transport_to(tmp_path, up.address)
    try:
        outcome = await transport.deliver(work_for(data, tail_file(tmp_path / "tail", tail, 7), clean=clean))
        again = await transport.deliver(work_for(b"next\r\n", None, clean=True))  # the connection is reused
    finally:
        await transport.close()
    assert outcome.replies[1].code == 250 and again.replies[1].code == 250, (outcome, again)
    assert [r.data for r in up.received] == [normalize_message_line_endings(data + tail), b"next\r\n"]
    assert up.connections == 1


class _RecordsData(asyncio.Protocol):
    """An SMTP server that keeps the raw octets of each DATA text, end-of-data line included."""

    def __init__(self, texts: list[bytes]) -> None:
        self.texts = texts
        self.text: bytearray | None = None
        self.lines = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(b"220 record.test ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        if self.text is not None:
            self.text += data
            if self.text.endswith(b"\r\n.\r\n"):
                self.texts.append(bytes(self.text))
                self.text = None
                self.transport.write(b"250 ok\r\n")
            return
        self.lines += data
        while b"\r\n" in self.lines and self.text is None:
            line, self.lines = self.lines.split(b"\r\n", 1)
            verb = line[:4].upper()
            if verb == b"EHLO":
                self.transport.write(b"250-record.test\r\n250 8BITMIME\r\n")
            elif verb == b"DATA":
                self.transport.write(b"354 go ahead\r\n")
                self.text = bytearray()
            elif verb == b"QUIT":
                self.transport.write(b"221 bye\r\n")
                self.transport.close()
            else:
                self.transport.write(b"250 ok\r\n")


@TEXTS
@pytest.mark.parametrize("split", [True, False], ids=["with-tail", "whole-in-data"])
async def test_the_wire_octets_are_the_whole_texts_as_aiosmtplib_would_send_them(
    tmp_path: Path, data: bytes, tail: bytes, clean: bool, split: bool
) -> None:
    loop = asyncio.get_running_loop()
    texts: list[bytes] = []
    server = await loop.create_server(lambda: _RecordsData(texts), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport = transport_to(tmp_path, f"127.0.0.1:{port}")
    work = work_for(data, tail_file(tmp_path / "tail", tail), clean=clean) if split else None
    try:
        outcome = await transport.deliver(work or work_for(data + tail, None, clean=clean))
    finally:
        await transport.close()
        server.close()
        await server.wait_closed()
    assert outcome.replies[1].code == 250, outcome
    assert texts == [aiosmtplib_text(data + tail)]


async def test_a_tail_streams_through_tls(tmp_path: Path, upstream: StartUpstream) -> None:
    # asyncio's TLS transport has its own write buffer and flow control: the stream waits on it the same.
    up = await upstream("up", tls=server_tls(trustme.CA(), "elsewhere.test"))
    text = large_text(3 * CHUNK + 500, dots=True)
    transport = transport_to(tmp_path, up.address)
    try:
        outcome = await transport.deliver(work_for(HEAD, tail_file(tmp_path / "tail", text), clean=False))
    finally:
        await transport.close()
    assert outcome.replies[1].code == 250, outcome
    assert outcome.tls.startswith("TLS"), outcome.tls
    assert [r.data for r in up.received] == [HEAD + text]


@pytest.mark.parametrize("damage", ["gone", "short"])
async def test_a_tail_that_cannot_be_read_crashes_the_attempt_and_ends_no_text(
    tmp_path: Path, upstream: StartUpstream, damage: str
) -> None:
    """The message's fault, not the member's: the attempt raises (the dispatcher's crash path), the
    connection is closed mid-DATA, and the upstream never sees an end-of-data line, so stores nothing."""
    up = await upstream("up")
    path = tmp_path / "tail"
    tail = tail_file(path, large_text(3 * CHUNK, dots=False))
    if damage == "gone":
        path.unlink()
    else:
        os.truncate(path, CHUNK + 10)  # the first chunk is sent, the second comes up short
    transport = transport_to(tmp_path, up.address)
    try:
        with pytest.raises(BodyUnreadable):
            await transport.deliver(work_for(HEAD, tail, clean=True))
        assert transport.connections == 0
        await asyncio.sleep(0.1)
    finally:
        await transport.close()
    assert up.received == []
    assert up.data_commands == 0  # aiosmtpd answers DATA only after the end-of-data line


@pytest.mark.parametrize(
    ("data", "tail", "body"),
    [
        (HEAD, b"plain\r\n" * 100, ""),
        (HEAD, b"plain\r\n" * 100 + b"caf\xc3\xa9\r\n", " BODY=8BITMIME"),  # 8-bit only in the tail
        (HEAD + b"caf\xc3\xa9\r\n", b"plain\r\n", " BODY=8BITMIME"),
    ],
    ids=["ascii", "8bit-tail", "8bit-data"],
)
async def test_mail_says_the_whole_texts_size_and_8bit_body(
    tmp_path: Path, upstream: StartUpstream, data: bytes, tail: bytes, body: str
) -> None:
    up = await upstream("up")
    transport = transport_to(tmp_path, up.address)
    try:
        outcome = await transport.deliver(work_for(data, tail_file(tmp_path / "tail", tail, 3), clean=True))
    finally:
        await transport.close()
    assert outcome.replies[1].code == 250, outcome
    # RFC 1870: SIZE= counts every octet of the text, data and tail.
    assert up.commands[0] == f"MAIL FROM:<app@example.com> SIZE={len(data) + len(tail)}{body}"


async def test_a_tail_gone_before_the_attempt_crashes_it_before_any_connection(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    up = await upstream("up")
    tail = BodyFile(str(tmp_path / "gone"), 0, 100)
    transport = transport_to(tmp_path, up.address)
    try:
        with pytest.raises(BodyUnreadable):
            await transport.deliver(work_for(HEAD, tail, clean=True))
    finally:
        await transport.close()
    assert up.connections == 0


@pytest.mark.parametrize(
    ("tail", "needs"),
    [
        (b"Subject: caf\xc3\xa9\r\n\r\nbody\r\n", True),  # UTF-8 in the header section, all in the tail
        (b"Subject: cafe\r\n\r\ncaf\xc3\xa9\r\n", False),  # UTF-8 in the body only: 8BITMIME is enough
        (b"\nSubject: caf\xc3\xa9\r\n", False),  # data's CR and the tail's LF end the header section
    ],
    ids=["utf8-header", "utf8-body", "header-ends-across"],
)
async def test_smtputf8_is_needed_for_utf8_in_a_header_section_that_goes_on_into_the_tail(
    tmp_path: Path, upstream: StartUpstream, tail: bytes, needs: bool
) -> None:
    data = b"Received: from client.test\r\n" + (b"\r" if tail.startswith(b"\n") else b"")
    work = replace(work_for(data, tail_file(tmp_path / "tail", tail), clean=False), smtputf8=True)
    assert work.needs_smtputf8 is needs
    narrow = await upstream("narrow", smtputf8=False)
    transport = transport_to(tmp_path, narrow.address)
    try:
        outcome = await transport.deliver(work)
    finally:
        await transport.close()
    if needs:
        assert outcome.replies[1].enhanced_code == "5.6.7" and narrow.received == [], outcome
    else:
        assert outcome.replies[1].code == 250, outcome


async def test_a_memory_farm_records_the_whole_text(tmp_path: Path) -> None:
    pools = [{"name": "default", "members": [{"name": "m", "address": "127.0.0.1:1"}]}]
    settings = make_settings(tmp_path, pools)
    farm = MemoryFarm()
    transport = farm(settings.pool[0].members[0], settings.delivery, "postmux.test", None)
    tail = tail_file(tmp_path / "tail", b"the tail\r\n", 5)
    outcome = await transport.deliver(work_for(HEAD, tail, clean=True))
    assert outcome.replies[1].code == 250
    assert [d.data for d in farm.delivered] == [HEAD + b"the tail\r\n"]
    with pytest.raises(BodyUnreadable):
        await transport.deliver(work_for(HEAD, BodyFile(str(tmp_path / "gone"), 0, 9), clean=True))


# -- a receiver that stops reading ---------------------------------------------------------------------


class _StopsReadingAfterData(asyncio.Protocol):
    """An SMTP server that says yes to everything up to DATA's 354, then never reads again."""

    def __init__(self, sessions: list[asyncio.Transport]) -> None:
        self.sessions = sessions

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.sessions.append(transport)
        transport.write(b"220 stall.test ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        for line in data.split(b"\r\n"):
            verb = line[:4].upper()
            if verb == b"EHLO":
                self.transport.write(b"250-stall.test\r\n250 SIZE 100000000\r\n")
            elif verb in (b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                self.transport.write(b"250 ok\r\n")
            elif verb == b"DATA":
                self.transport.write(b"354 go ahead\r\n")
                self.transport.pause_reading()
                return


async def test_a_receiver_that_stops_reading_times_out_once_within_the_data_timeout(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    sessions: list[asyncio.Transport] = []
    server = await loop.create_server(lambda: _StopsReadingAfterData(sessions), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    tail = tail_file(tmp_path / "tail", large_text(20 * CHUNK, dots=False))
    transport = transport_to(tmp_path, f"127.0.0.1:{port}", data_timeout="0.5s")
    try:
        started = time.monotonic()
        outcome = await asyncio.wait_for(transport.deliver(work_for(HEAD, tail, clean=True)), 10)
        elapsed = time.monotonic() - started
        assert transport.connections == 0  # a connection stuck in DATA is not kept
    finally:
        await transport.close()
        server.close()
        for session in sessions:
            session.abort()
        await server.wait_closed()
    reply = outcome.replies[1]
    assert (reply.code, reply.enhanced_code) == (451, "4.4.2") and "timeout during DATA" in reply.text, reply
    assert 0.5 <= elapsed < 3, elapsed  # one wait bounded by data_timeout, not one per chunk


# -- 20 MB, through an upstream in a process of its own -----------------------------------------------


@pytest.mark.parametrize("clean", [True, False], ids=["clean", "stuffed"])
async def test_a_20_mb_tail_arrives_byte_identical_in_flat_memory(tmp_path: Path, clean: bool) -> None:
    tail = tail_file(tmp_path / "tail", large_text(20_000_000, dots=not clean), offset=4096)
    expected = digest(HEAD, tail)
    far = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.integration.upstream_process",
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert far.stdin is not None and far.stdout is not None
    try:
        port = int(await asyncio.wait_for(far.stdout.readline(), 30))
        transport = transport_to(tmp_path, f"127.0.0.1:{port}", data_timeout="30s")
        tracemalloc.start()
        try:
            outcome = await transport.deliver(work_for(HEAD, tail, clean=clean))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
            await transport.close()
        far.stdin.close()
        received = (await asyncio.wait_for(far.stdout.read(), 30)).decode().split()
    finally:
        if far.returncode is None:
            far.kill()
        await far.wait()
    assert outcome.replies[1].code == 250, outcome
    assert received == [str(expected[0]), expected[1]]
    assert peak < 10_000_000, f"delivering a 20 MB tail traced a peak of {peak / 1e6:.1f} MB"
