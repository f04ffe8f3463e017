"""SMTP ingress: what a client sees, byte for byte, and what ends up (or not) in the spool."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import aiosmtplib
import pytest

from postmux.app import App
from tests.support import Upstream, make_settings, message, send, wait_until


async def dialogue(port: int, lines: list[bytes], pipelined: bool = False) -> list[str]:
    """Speak raw SMTP; returns every reply line after the greeting."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    replies: list[str] = []

    async def reply() -> None:
        while True:
            line = (await asyncio.wait_for(reader.readline(), 5)).decode().rstrip("\r\n")
            replies.append(line)
            if len(line) < 4 or line[3] != "-":
                return

    await reply()
    replies.clear()
    if pipelined:
        writer.write(b"".join(lines))
        await writer.drain()
        for _ in lines:
            await reply()
    else:
        for line in lines:
            writer.write(line)
            await writer.drain()
            await reply()
    writer.close()
    return replies


@pytest.fixture
async def app(tmp_path: Path):  # type: ignore[no-untyped-def]
    up = await Upstream("a").start()
    settings = make_settings(
        tmp_path,
        [{"name": "default", "members": [{"name": "a", "address": up.address}]}],
        smtp={"max_message_size": 10_000, "max_recipients": 3},
    )
    async with App(settings) as running:
        running.upstream = up  # type: ignore[attr-defined]
        yield running
    await up.stop()


def queued(tmp_path: Path) -> int:
    return int(sqlite3.connect(tmp_path / "spool.db").execute("SELECT count(*) FROM message").fetchone()[0])


async def test_ehlo_offers_size_8bitmime_smtputf8_pipelining(app: App) -> None:
    replies = await dialogue(app.smtp_port, [b"EHLO client.test\r\n"])
    assert replies[0] == "250-postmux.test"
    offered = {r[4:].split()[0] for r in replies[1:]}
    assert {"SIZE", "8BITMIME", "SMTPUTF8", "PIPELINING"} <= offered
    assert "250-SIZE 10000" in replies


async def test_pipelined_transaction_gets_one_reply_per_command(app: App) -> None:
    body = message("pipe1")
    replies = await dialogue(
        app.smtp_port,
        [
            b"EHLO client.test\r\n",
            b"MAIL FROM:<app@example.com>\r\nRCPT TO:<u@dest.test>\r\nRCPT TO:<v@dest.test>\r\nDATA\r\n",
        ],
    )
    assert replies[-1].startswith("250 ")  # the last reply to the first write
    reader_replies = await dialogue(
        app.smtp_port,
        [
            b"EHLO c.test\r\n",
            b"MAIL FROM:<app@example.com>\r\n",
            b"RCPT TO:<u@dest.test>\r\n",
            b"DATA\r\n",
            body + b".\r\n",
            b"QUIT\r\n",
        ],
        pipelined=True,
    )
    codes = [r[:3] for r in reader_replies if r[3:4] == " "]
    assert codes == ["250", "250", "250", "354", "250", "221"]
    up: Upstream = app.upstream  # type: ignore[attr-defined]
    await wait_until(lambda: any(r.test_id == "pipe1" for r in up.received))


async def test_untrusted_client_cannot_relay(tmp_path: Path) -> None:
    up = await Upstream("a").start()
    settings = make_settings(
        tmp_path,
        [{"name": "default", "members": [{"name": "a", "address": up.address}]}],
        smtp={"trusted_networks": ["192.0.2.0/24"]},  # the test client (127.0.0.1) is not in it
    )
    async with App(settings) as app:
        replies = await dialogue(
            app.smtp_port,
            [b"EHLO c.test\r\n", b"MAIL FROM:<a@example.com>\r\n", b"RCPT TO:<u@dest.test>\r\n"],
        )
        assert replies[-1] == "554 5.7.1 <u@dest.test>: Relay access denied"
        replies = await dialogue(
            app.smtp_port, [b"EHLO c.test\r\n", b"MAIL FROM:<a@example.com>\r\n", b"DATA\r\n"]
        )
        assert replies[-1].startswith("503 ")
    assert queued(tmp_path) == 0
    await up.stop()


async def test_too_many_recipients_and_too_big_are_refused(app: App, tmp_path: Path) -> None:
    rcpts = [f"RCPT TO:<u{i}@dest.test>\r\n".encode() for i in range(4)]
    replies = await dialogue(app.smtp_port, [b"EHLO c.test\r\n", b"MAIL FROM:<a@example.com>\r\n", *rcpts])
    assert replies[-1] == "452 4.5.3 Too many recipients"
    replies = await dialogue(app.smtp_port, [b"EHLO c.test\r\n", b"MAIL FROM:<a@example.com> SIZE=20000\r\n"])
    assert replies[-1].startswith("552 ")
    # Without SIZE declared, the size is found out during DATA.
    replies = await dialogue(
        app.smtp_port,
        [
            b"EHLO c.test\r\n",
            b"MAIL FROM:<a@example.com>\r\n",
            b"RCPT TO:<u@dest.test>\r\n",
            b"DATA\r\n",
            message("big", size=20_000) + b".\r\n",
        ],
    )
    assert replies[-1].startswith("552 ")
    assert queued(tmp_path) == 0


async def test_spool_failure_gives_451_and_nothing_is_stored(app: App, tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "spool.db")
    db.execute(
        "CREATE TRIGGER fail BEFORE INSERT ON recipient BEGIN SELECT RAISE(ABORT, 'disk on fire'); END"
    )
    db.commit()
    with pytest.raises(aiosmtplib.SMTPDataError) as caught:
        await send(app.smtp_port, "f1", sender="a@example.com", to=["u@dest.test"])
    assert caught.value.code == 451 and caught.value.message.startswith("4.3.0")
    assert queued(tmp_path) == 0
    db.execute("DROP TRIGGER fail")
    db.commit()
    reply = await send(app.smtp_port, "f2", sender="a@example.com", to=["u@dest.test"])
    assert "queued as" in reply


async def test_smtputf8_message_is_accepted_and_delivered_as_utf8(app: App) -> None:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=app.smtp_port, local_hostname="c.test")
    await client.connect()
    await client.mail("jösé@exämple.test", options=["SMTPUTF8", "BODY=8BITMIME"], encoding="utf-8")
    await client.rcpt("üser@dest.test", encoding="utf-8")
    response = await client.data("From: jösé@exämple.test\r\nX-Test-Id: utf\r\n\r\nhé\r\n".encode())
    assert response.code == 250
    await client.quit()
    up: Upstream = app.upstream  # type: ignore[attr-defined]
    await wait_until(lambda: any(r.test_id == "utf" for r in up.received))
    [got] = [r for r in up.received if r.test_id == "utf"]
    assert got.sender == "jösé@exämple.test" and got.recipients == ["üser@dest.test"]
    assert got.data.endswith("From: jösé@exämple.test\r\nX-Test-Id: utf\r\n\r\nhé\r\n".encode())
