"""SMTP smuggling (SEC Consult 2023; CVE-2023-51764, -51765, -51766, CVE-2024-27305) and bare line ends.

Each variant hides a second transaction behind a fake end-of-data. A server that ended DATA there would
answer the smuggled MAIL, RCPT and DATA; postmux must read on to the real CRLF.CRLF, then refuse the whole
message with one reply, store nothing and deliver nothing.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from postmux.ingress.hygiene import BARE_EOL_IN_COMMAND, BARE_EOL_IN_DATA, NUL_IN_COMMAND, NUL_IN_DATA
from tests.security.client import RawClient
from tests.security.conftest import StartGateway, stored
from tests.support import Upstream, wait_until

SMUGGLED = (
    b"MAIL FROM:<ceo@bank.test>\r\nRCPT TO:<victim@dest.test>\r\nDATA\r\nFrom: ceo@bank.test\r\n\r\nsmuggled"
)

# (name, fake end of data, the reply postmux must give after the real end)
VARIANTS = [
    ("lf-dot-lf", b"\n.\n", BARE_EOL_IN_DATA),
    ("lf-dot-crlf", b"\n.\r\n", BARE_EOL_IN_DATA),
    ("cr-dot-cr", b"\r.\r", BARE_EOL_IN_DATA),
    ("crlf-dot-cr", b"\r\n.\r", BARE_EOL_IN_DATA),
    ("crlf-dot-lf", b"\r\n.\n", BARE_EOL_IN_DATA),
    ("lf-dot-cr", b"\n.\r", BARE_EOL_IN_DATA),
    ("cr-dot-crlf", b"\r.\r\n", BARE_EOL_IN_DATA),
    ("cr-dot-lf", b"\r.\n", BARE_EOL_IN_DATA),
    ("crlf-dot-cr-cr-lf", b"\r\n.\r\r\n", BARE_EOL_IN_DATA),
    ("crlf-nul-dot-crlf", b"\r\n\x00.\r\n", NUL_IN_DATA),
    ("crlf-dot-nul-crlf", b"\r\n.\x00\r\n", NUL_IN_DATA),
    ("nul-crlf-dot-crlf-nul", b"\x00\r\n.\r\n\x00", None),  # the dot is real: ends DATA, then NUL garbage
]


@pytest.mark.parametrize(("fake_end", "expected"), [v[1:] for v in VARIANTS], ids=[v[0] for v in VARIANTS])
async def test_fake_end_of_data_does_not_end_data_and_the_message_is_refused(
    gateway: StartGateway, tmp_path: Path, fake_end: bytes, expected: str | None
) -> None:
    app = await gateway()
    client = await RawClient.connect(app.smtp_port)
    await client.ehlo_mail_rcpt()
    assert (await client.cmd("DATA")).startswith("354")
    # Everything at once, as an attacker would pipeline it.
    await client.send(b"From: app@example.com\r\n\r\nhello" + fake_end + SMUGGLED + b"\r\n.\r\nQUIT\r\n")
    replies = [await client.reply(), await client.reply()]
    await client.close()
    if expected is None:
        # The real CRLF.CRLF came first: the message holds a NUL, and what follows is one bad command.
        assert replies[0] == NUL_IN_DATA
    else:
        assert replies == [expected, "221 2.0.0 Bye"]
    await asyncio.sleep(0.2)
    up: Upstream = app.upstream  # type: ignore[attr-defined]
    assert stored(tmp_path) == 0 and up.received == []


async def test_clean_message_still_accepted_after_a_refused_one(gateway: StartGateway) -> None:
    app = await gateway()
    client = await RawClient.connect(app.smtp_port)
    await client.ehlo_mail_rcpt()
    await client.cmd("DATA")
    assert await client.cmd(b"Subject: a\r\n\r\nbare\nlf\r\n.\r\n") == BARE_EOL_IN_DATA
    assert (await client.cmd("MAIL FROM:<app@example.com>")).startswith("250")
    assert (await client.cmd("RCPT TO:<user@dest.test>")).startswith("250")
    await client.cmd("DATA")
    assert (await client.cmd(b"X-Test-Id: clean\r\n\r\nfine\r\n.\r\n")).startswith("250 2.0.0 Ok: queued as")
    await client.close()
    up: Upstream = app.upstream  # type: ignore[attr-defined]
    await wait_until(lambda: [r.test_id for r in up.received] == ["clean"])


async def test_normalize_repairs_line_ends_and_downstream_sees_one_message(
    gateway: StartGateway, tmp_path: Path
) -> None:
    app = await gateway(line_endings="normalize")
    client = await RawClient.connect(app.smtp_port)
    await client.ehlo_mail_rcpt()
    await client.cmd("DATA")
    body = b"X-Test-Id: norm\r\n\r\nhello\n.\n" + SMUGGLED + b"\n..dotted\r\n.\r\n"
    assert (await client.cmd(body)).startswith("250 2.0.0 Ok: queued as")
    await client.close()
    up: Upstream = app.upstream  # type: ignore[attr-defined]
    await wait_until(lambda: len(up.received) == 1)
    await asyncio.sleep(0.2)
    [got] = up.received
    assert got.test_id == "norm" and got.recipients == ["user@dest.test"]  # the smuggled RCPT is text
    text = got.data.split(b"\r\n\r\n", 2)[-1]
    assert b"\n" not in text.replace(b"\r\n", b"") and b"\r" not in text.replace(b"\r\n", b"")
    # The fake end became a line holding one dot, sent dot-stuffed: text to the member, not an end.
    assert b"hello\r\n.\r\nMAIL FROM:<ceo@bank.test>\r\n" in got.data
    assert got.data.endswith(b"smuggled\r\n.dotted\r\n")  # the client's stuffed dot was undone once


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"NOOP\n", BARE_EOL_IN_COMMAND),
        (b"NOOP\r\r\n", BARE_EOL_IN_COMMAND),
        (b"MAIL FROM:<a@example.com>\rRCPT TO:<b@dest.test>\r\n", BARE_EOL_IN_COMMAND),
        (b"MAIL FROM:<a@example.com>\n", BARE_EOL_IN_COMMAND),
        (b"NOOP \x00\r\n", NUL_IN_COMMAND),
        (b"RCPT TO:<b\x00@dest.test>\r\n", NUL_IN_COMMAND),
    ],
    ids=["noop-lf", "noop-cr-crlf", "cr-inside", "mail-lf", "nul-noop", "nul-rcpt"],
)
async def test_command_line_with_bare_cr_lf_or_nul_is_refused(
    gateway: StartGateway, tmp_path: Path, line: bytes, expected: str
) -> None:
    app = await gateway()
    client = await RawClient.connect(app.smtp_port)
    assert (await client.cmd("EHLO client.test")).startswith("250")
    assert await client.cmd(line) == expected
    # The session goes on, and nothing from the refused line took effect.
    assert await client.cmd("RCPT TO:<b@dest.test>") == "503 5.5.1 Error: need MAIL command"
    assert await client.cmd("QUIT") == "221 2.0.0 Bye"
    await client.close()
    assert stored(tmp_path) == 0
