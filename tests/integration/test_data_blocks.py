"""The block reader (BlockDataSMTP) against aiosmtpd's own line reader, on real loopback connections.

The same bytes go to two aiosmtpd servers that differ only in how DATA is read, cut into writes at random
points; the replies, the bytes each DATA hook saw and what the connection does afterwards must be equal,
but where postmux counts as the RFCs do and aiosmtpd does not (`as_aiosmtpd_but_for_the_rfcs`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postmux.ingress.data import BlockDataSMTP, TextEnvelope
from tests.unit.test_data_text import aiosmtpd_model


class Recorder:
    def __init__(self) -> None:
        self.texts: list[bytes] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        # The block reader's text past spill_bytes is in a file (deleted once this hook returns).
        text = envelope.text if isinstance(envelope, TextEnvelope) else None
        tail = text.tail if text is not None else None
        self.texts.append(bytes(envelope.original_content or b"") + (tail.read() if tail else b""))
        return f"250 2.0.0 got {len(self.texts)}"


SPILL_DIR = Path(tempfile.mkdtemp(prefix="postmux-blocks-"))


class SpillingBlockDataSMTP(BlockDataSMTP):
    """The block reader with all but the first few hundred octets of a text written to a file."""

    spill_dir = SPILL_DIR
    spill_bytes = 300


async def serve(cls: type[SMTP], size_limit: int) -> tuple[asyncio.Server, Recorder]:
    recorder = Recorder()

    def factory() -> Any:
        return cls(recorder, hostname="h.test", decode_data=False, data_size_limit=size_limit)

    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    return server, recorder


async def session(port: int, writes: list[bytes]) -> list[str]:
    """EHLO, MAIL, RCPT, DATA, then `writes` one by one (each reaching the server on its own, mostly)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n")
        for chunk in writes:
            writer.write(chunk)
            await writer.drain()
            await asyncio.sleep(0.002)
        replies = []
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while line := await asyncio.wait_for(reader.readline(), 2):
                replies.append(line.decode("utf-8", "replace"))
        return replies
    finally:
        writer.close()
        with contextlib.suppress(ConnectionResetError):
            await writer.wait_closed()


PIECES = st.sampled_from(
    [
        b"\r\n",
        b"\r",
        b"\n",
        b".",
        b"..",
        b"text",
        b"\r\n.\r\n",
        b"\n.\n",
        b"\r.\r",
        b"\r\n.\r",
        b"x" * 998,
        b"x" * 999,
        b"x" * 1000,
        b"x" * 1001,
        b"x" * 3000,
        b"MAIL FROM:<e@f.test>\r\n",
    ]
)


async def both_readers(writes: list[bytes], size_limit: int) -> list[tuple[list[str], list[bytes]]]:
    """(replies, texts the DATA hook saw) from aiosmtpd's line reader, then from the block reader."""
    results = []
    for cls in (SMTP, BlockDataSMTP, SpillingBlockDataSMTP):
        server, recorder = await serve(cls, size_limit)
        try:
            replies = await session(server.sockets[0].getsockname()[1], writes)
        finally:
            server.close()
            await server.wait_closed()
        results.append((replies, recorder.texts))
    return results


def first_outcome(replies: list[str], texts: list[bytes]) -> tuple[str | None, bytes]:
    """The reply to the first message's text and, if it was taken, the text itself."""
    after_354 = replies[[r[:3] for r in replies].index("354") + 1]
    if after_354.startswith("250 2.0.0 got"):
        return None, texts[0]
    return after_354.rstrip("\r\n"), b""


def but_the_outcome(replies: list[str]) -> list[str]:
    """The session's replies with the one to the text left out: the same whichever way it was judged.

    The streams these tests send hold one message at most: its text is the only one a hook can see.
    """
    at = [r[:3] for r in replies].index("354") + 1
    return replies[:at] + replies[at + 1 :]


def as_aiosmtpd_but_for_the_rfcs(
    stream: bytes,
    size_limit: int,
    line_reader: tuple[list[str], list[bytes]],
    block_reader: tuple[list[str], list[bytes]],
) -> None:
    """The block reader did what aiosmtpd's line reader did, except where postmux departs on purpose.

    The departures, both about a line's stuffed dot and its length, never about where the text ends:
    - the size is counted without the dots that dot-stuffing doubled (RFC 1870 4; aiosmtpd counts the
      line as sent), so a text at the limit with dot lines is taken where aiosmtpd refuses it 552;
    - a line may be 1000 octets with its CRLF, not counting a stuffed dot (RFC 5321 4.5.3.1.6); aiosmtpd
      takes 1001 as sent, so a line of 999 octets and CRLF is refused 500 where aiosmtpd takes it.
    Both readers are held to the line model (tests/unit/test_data_text.py), aiosmtpd's with `rfc=False`:
    where the two models agree, the sessions must be equal in every reply and every octet; where they do
    not, each reader gave its own model's answer to the text and everything else is equal.
    """
    as_aiosmtpd = aiosmtpd_model(stream, size_limit, rfc=False)
    as_postmux = aiosmtpd_model(stream, size_limit)
    assert as_aiosmtpd is not None and as_postmux is not None
    assert as_postmux[0] == as_aiosmtpd[0]  # the text ends at the same place: the rules are only on counts
    assert first_outcome(*line_reader) == as_aiosmtpd[1:]
    assert first_outcome(*block_reader) == as_postmux[1:]
    if as_postmux == as_aiosmtpd:
        assert block_reader == line_reader
    else:
        assert but_the_outcome(block_reader[0]) == but_the_outcome(line_reader[0])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pieces=st.lists(PIECES, max_size=16),
    cuts=st.lists(st.integers(min_value=1, max_value=12000), max_size=5),
    size_limit=st.sampled_from([500, 2500, 100_000]),
)
async def test_same_replies_and_text_as_aiosmtpds_line_reader(
    pieces: list[bytes], cuts: list[int], size_limit: int
) -> None:
    # The real end comes last; after it, commands pipelined in the same write.
    stream = b"".join(pieces) + b"\r\n.\r\nRSET\r\nQUIT\r\n"
    bounds = sorted({c for c in cuts if c < len(stream)} | {0, len(stream)})
    writes = [stream[a:b] for a, b in itertools.pairwise(bounds)]
    line_reader, block_reader, spilling = await both_readers(writes, size_limit)
    assert spilling == block_reader
    assert not os.listdir(SPILL_DIR)
    # The session ended at QUIT, or earlier when an early "." line made the rest bogus commands.
    assert line_reader[0][-1][:3] in ("221", "502"), line_reader[0]
    # The model the unit tests hold DataText to says what aiosmtpd itself did with the first message.
    as_aiosmtpd_but_for_the_rfcs(stream, size_limit, line_reader, block_reader)


@pytest.mark.parametrize(
    "writes",
    [
        [b"x" * 3000, b".\r\n", b"still the long line\r\n.\r\nQUIT\r\n"],  # "." mid-line ends nothing
        [b"x" * 1500 + b"\r", b"\n.\r\nQUIT\r\n"],  # a too-long line's CRLF split, then the end
        [b"a\r\n" + b"y" * 997, b"\r\n.\r\nQUIT\r\n"],  # 999 octets with CRLF: taken
        [b"a\r\n" + b"y" * 998, b"\r", b"\n.\r\nQUIT\r\n"],  # 1000: taken
        [b"a\r\n" + b"y" * 999, b"\r", b"\n.\r\nQUIT\r\n"],  # 1001: aiosmtpd takes it, postmux not
        [b"a\r\n.." + b"y" * 997, b"\r", b"\n.\r\nQUIT\r\n"],  # 1001 as sent, 1000 un-stuffed: taken
        [b"a\r\n.." + b"y" * 998, b"\r", b"\n.\r\nQUIT\r\n"],  # 1002 as sent, 1001: refused
        [b"a\r\n" + b"y" * 1000, b"\r", b"\n.\r\nQUIT\r\n"],  # 1002: refused
        [b"a\r\n.", b"\r", b"\n", b"QUIT\r\n"],  # the end line cut into three writes
        [b"a\r\n.\r\nQU", b"IT\r\n"],  # the next command cut
        [b"a\n.\n", b"b\r.\r", b"c\r\n.\r\nQUIT\r\n"],  # smuggling shapes end nothing
    ],
)
async def test_block_boundaries_as_aiosmtpd(writes: list[bytes]) -> None:
    line_reader, block_reader, spilling = await both_readers(writes, 100_000)
    assert spilling == block_reader
    as_aiosmtpd_but_for_the_rfcs(b"".join(writes), 100_000, line_reader, block_reader)
    assert line_reader[0][-1].startswith("221"), line_reader[0]


DOTTED = b"..a\r\n" * 100  # 500 octets as sent, 400 as RFC 1870 4 counts them


@pytest.mark.parametrize(
    ("size_limit", "aiosmtpd", "postmux"),
    [
        (500, "250", "250"),
        (499, "552", "250"),  # the departure: aiosmtpd counts the 100 doubled dots
        (400, "552", "250"),
        (399, "552", "552"),
    ],
)
@pytest.mark.parametrize("cut", [None, 3, 250])
async def test_a_text_at_the_size_limit_with_dot_lines_is_taken_where_aiosmtpd_refuses_it(
    size_limit: int, aiosmtpd: str, postmux: str, cut: int | None
) -> None:
    stream = DOTTED + b".\r\nRSET\r\nQUIT\r\n"
    writes = [stream] if cut is None else [stream[:cut], stream[cut:]]
    line_reader, block_reader, spilling = await both_readers(writes, size_limit)
    assert spilling == block_reader
    outcomes = [first_outcome(*line_reader), first_outcome(*block_reader)]
    assert [(reply or "250")[:3] for reply, _ in outcomes] == [aiosmtpd, postmux], outcomes
    assert outcomes[1][1] == (b".a\r\n" * 100 if postmux == "250" else b"")
    as_aiosmtpd_but_for_the_rfcs(stream, size_limit, line_reader, block_reader)


async def test_decoded_text_is_not_offered() -> None:  # async: aiosmtpd takes the running loop
    try:
        BlockDataSMTP(Recorder(), hostname="h.test", decode_data=True)
    except ValueError as e:
        assert "decode_data" in str(e)
    else:
        raise AssertionError("BlockDataSMTP accepted decode_data=True")
