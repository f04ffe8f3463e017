"""DATA read in blocks (ingress/data.py): what happens where a read ends must not matter.

postmux takes up to 64 KiB of what has arrived at a time; these put the end of data, a CRLF, a line at the
length limit and the smuggling shapes across that boundary and across separate writes.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from postmux.ingress.data import BLOCK
from postmux.ingress.hygiene import BARE_EOL_IN_DATA
from tests.security.client import RawClient
from tests.security.conftest import StartGateway, stored
from tests.support import Upstream, wait_until

HEAD = b"Subject: blocks\r\n\r\n"
TOO_LONG = "500 5.5.2 Text line too long (RFC 5321 4.5.3.1.6: 1000 octets); message refused"


def filler_to(offset: int) -> bytes:
    """Lines of 100 octets (a stuffed dot first) so that HEAD + filler ends exactly at `offset`."""
    room = offset - len(HEAD)
    line = b".." + b"f" * 96 + b"\r\n"
    return line * (room // 100) + b"g" * (room % 100 - 2) + b"\r\n"


async def transaction(app_port: int, *writes: bytes) -> list[str]:
    client = await RawClient.connect(app_port)
    await client.ehlo_mail_rcpt()
    assert (await client.cmd("DATA")).startswith("354")
    for chunk in writes:
        await client.send(chunk)
        await asyncio.sleep(0.01)
    replies = [await client.reply(), await client.reply()]
    await client.close()
    return replies


def delivered(app: object) -> list[bytes]:
    up: Upstream = app.upstream  # type: ignore[attr-defined]
    return [r.data for r in up.received]


@pytest.mark.parametrize("shift", [-3, -2, -1, 0, 1, 2])
async def test_end_of_data_across_the_block_boundary(gateway: StartGateway, shift: int) -> None:
    app = await gateway()
    body = filler_to(BLOCK + shift - 2)  # the CRLF before the dot ends at BLOCK + shift
    replies = await transaction(app.smtp_port, HEAD + body + b".\r\nQUIT\r\n")
    assert replies[0].startswith("250 2.0.0 Ok: queued as"), replies
    assert replies[1] == "221 2.0.0 Bye"
    await wait_until(lambda: len(delivered(app)) == 1)
    text = delivered(app)[0]
    assert text.endswith((HEAD + body).replace(b"\r\n..", b"\r\n.")), "unstuffed once, nothing lost"


# RFC 5321 4.5.3.1.6: 1000 octets with the CRLF, "not counting the leading dot duplicated for
# transparency" (aiosmtpd's reader takes 1001 as sent).
@pytest.mark.parametrize(("length", "taken"), [(1000, True), (1001, False), (1002, False)])
@pytest.mark.parametrize("stuffed", [False, True], ids=["plain", "dot-stuffed"])
@pytest.mark.parametrize("split", [BLOCK - 500, BLOCK - 1, BLOCK])
async def test_a_line_at_the_length_limit_across_the_block_boundary_when_long_lines_are_refused(
    gateway: StartGateway, tmp_path: Path, length: int, taken: bool, stuffed: bool, split: int
) -> None:
    app = await gateway(long_lines="refuse")
    start = split - 600  # the long line starts before the boundary and ends after it
    line = (b"." if stuffed else b"L") + b"L" * (length - 3) + b"\r\n"  # octets with its CRLF
    sent = b"." + line if stuffed else line  # a stuffed line is one octet longer on the wire
    replies = await transaction(app.smtp_port, HEAD + filler_to(start) + sent + b"end\r\n.\r\nQUIT\r\n")
    assert replies[1] == "221 2.0.0 Bye"
    if taken:
        assert replies[0].startswith("250 "), replies
        await wait_until(lambda: len(delivered(app)) == 1)
        assert b"\r\n" + line + b"end\r\n" in delivered(app)[0]
    else:
        assert replies[0] == TOO_LONG
        await asyncio.sleep(0.2)
        assert stored(tmp_path) == 0 and delivered(app) == []


def broken_as_postfix(octets: int) -> bytes:
    """A line of `octets` "L"s (no whitespace) as Postfix sends it: 998, then SPACE and 997 a line."""
    first, rest = min(octets, 998), max(octets - 998, 0)
    lines = [b"L" * first] + [b" " + b"L" * min(997, rest - done) for done in range(0, rest, 997)]
    return b"\r\n".join(lines) + b"\r\n"


@pytest.mark.parametrize("length", [1000, 1001, 1002, 1003, 1995, 1996, 3 * BLOCK])
@pytest.mark.parametrize("split", [BLOCK - 500, BLOCK - 1, BLOCK])
async def test_a_long_line_across_the_block_boundary_is_taken_and_folded(
    gateway: StartGateway, length: int, split: int
) -> None:
    app = await gateway()  # [smtp] long_lines = "fold", the default
    start = split - 600  # the long line starts before the boundary and ends after it
    line = b"L" * (length - 2) + b"\r\n"  # octets with its CRLF
    replies = await transaction(app.smtp_port, HEAD + filler_to(start) + line + b"end\r\n.\r\nQUIT\r\n")
    assert replies[0].startswith("250 "), replies
    assert replies[1] == "221 2.0.0 Bye"
    await wait_until(lambda: len(delivered(app)) == 1)
    text = delivered(app)[0]
    assert text.endswith(b"\r\n" + broken_as_postfix(length - 2) + b"end\r\n")
    assert max(len(line) for line in text.split(b"\r\n")) <= 998


@pytest.mark.parametrize("fake_end", [b"\n.\n", b"\r.\r", b"\r\n.\r", b"\r\n.\n", b"\n.\r\n"])
async def test_a_fake_end_cut_between_writes_ends_nothing(
    gateway: StartGateway, tmp_path: Path, fake_end: bytes
) -> None:
    app = await gateway()
    smuggled = b"MAIL FROM:<ceo@bank.test>\r\nRCPT TO:<victim@dest.test>\r\nDATA\r\nsmuggled\r\n"
    writes = [HEAD + b"hello" + fake_end[:1], fake_end[1:2], fake_end[2:] + smuggled, b".\r\nQUIT\r\n"]
    replies = await transaction(app.smtp_port, *writes)
    assert replies == [BARE_EOL_IN_DATA, "221 2.0.0 Bye"]
    await asyncio.sleep(0.2)
    assert stored(tmp_path) == 0 and delivered(app) == []


async def test_a_crlf_cut_between_writes_is_one_line_end(gateway: StartGateway) -> None:
    app = await gateway()
    replies = await transaction(app.smtp_port, HEAD + b"one\r", b"\n.two\r", b"\n.", b"\r", b"\nQUIT\r\n")
    assert replies[0].startswith("250 "), replies
    await wait_until(lambda: len(delivered(app)) == 1)
    assert delivered(app)[0].endswith(HEAD + b"one\r\ntwo\r\n")
