"""The block reader (BlockDataSMTP) against aiosmtpd's own line reader, on real loopback connections.

The same bytes go to two aiosmtpd servers that differ only in how DATA is read, cut into writes at random
points; the replies, the bytes each DATA hook saw and what the connection does afterwards must be equal.
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
    assert block_reader == line_reader and spilling == line_reader
    assert not os.listdir(SPILL_DIR)
    # The session ended at QUIT, or earlier when an early "." line made the rest bogus commands.
    assert line_reader[0][-1][:3] in ("221", "502"), line_reader[0]
    # The model the unit tests hold DataText to says what aiosmtpd itself did with the first message.
    model = aiosmtpd_model(stream, size_limit)
    assert model is not None
    assert first_outcome(*line_reader) == model[1:]


@pytest.mark.parametrize(
    "writes",
    [
        [b"x" * 3000, b".\r\n", b"still the long line\r\n.\r\nQUIT\r\n"],  # "." mid-line ends nothing
        [b"x" * 1500 + b"\r", b"\n.\r\nQUIT\r\n"],  # a too-long line's CRLF split, then the end
        [b"a\r\n" + b"y" * 997, b"\r\n.\r\nQUIT\r\n"],  # 999 octets with CRLF: taken
        [b"a\r\n" + b"y" * 999, b"\r", b"\n.\r\nQUIT\r\n"],  # 1001: taken
        [b"a\r\n" + b"y" * 1000, b"\r", b"\n.\r\nQUIT\r\n"],  # 1002: refused
        [b"a\r\n.", b"\r", b"\n", b"QUIT\r\n"],  # the end line cut into three writes
        [b"a\r\n.\r\nQU", b"IT\r\n"],  # the next command cut
        [b"a\n.\n", b"b\r.\r", b"c\r\n.\r\nQUIT\r\n"],  # smuggling shapes end nothing
    ],
)
async def test_block_boundaries_as_aiosmtpd(writes: list[bytes]) -> None:
    line_reader, block_reader, spilling = await both_readers(writes, 100_000)
    assert block_reader == line_reader and spilling == line_reader
    assert line_reader[0][-1].startswith("221"), line_reader[0]


async def test_decoded_text_is_not_offered() -> None:  # async: aiosmtpd takes the running loop
    try:
        BlockDataSMTP(Recorder(), hostname="h.test", decode_data=True)
    except ValueError as e:
        assert "decode_data" in str(e)
    else:
        raise AssertionError("BlockDataSMTP accepted decode_data=True")
