"""Octets that are not UTF-8 where text is expected, on a running node: a receiver's reply in Latin-1
("550 5.1.1 Benutzer unbekannt" with a raw 0xFC), a client's HELO name with one.

aiosmtplib, postmux's pipelined reader and aiosmtpd keep such octets as lone surrogates (surrogateescape),
which no UTF-8 writer takes: the event log's file, the spool's last_reply column, a DSN's Diagnostic-Code
and a webhook's body would each refuse the text. Before, one such reply held its message as a crash
(the DSN could not be made) and one such HELO stopped the event log for good. The text must stay readable
everywhere, its odd octets shown as U+FFFD, and nothing else may be lost for it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import cast

from aiosmtpd.smtp import Envelope as SmtpEnvelope

from postmux.app import App
from postmux.testing import Upstream
from tests.support import StartUpstream, make_settings, read_events, send, wait_until

LATIN_1_REFUSAL = b"550 5.1.1 <gone@dest.test>: Benutzer unbekannt \xfc"


async def refuse_gone_in_latin_1(upstream: Upstream, envelope: SmtpEnvelope) -> str | None:
    if envelope.rcpt_tos == ["gone@dest.test"]:
        # aiosmtpd writes a reply given as bytes as it is: the octet 0xFC, not UTF-8's "ü".
        return cast(str, LATIN_1_REFUSAL)
    return None


async def test_a_reply_in_latin_1_bounces_its_recipient_and_is_logged_with_a_replacement_character(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    up = await upstream("a", refuse_gone_in_latin_1)
    pools = [{"name": "default", "members": [{"name": "a", "address": up.address}]}]
    log = tmp_path / "events.jsonl"
    async with App(make_settings(tmp_path, pools)) as app:
        await send(app.smtp_port, "gone", to=["gone@dest.test"])
        await wait_until(lambda: any(e["type"] == "Bounce" for e in read_events(log)), timeout=15)
        await send(app.smtp_port, "after", to=["someone@dest.test"])
        await wait_until(lambda: any(e["type"] == "Delivery" for e in read_events(log)), timeout=15)
        await wait_until(lambda: len(up.received) >= 2, timeout=15)  # the message after, and the DSN
        counts = await app.spool.counts()
        for _ in range(100):  # the last settle may still be on its way to the spool
            if not any(counts.values()):
                break
            await asyncio.sleep(0.05)
            counts = await app.spool.counts()
    [bounce] = [e for e in read_events(log) if e["type"] == "Bounce"]
    assert bounce["recipient"] == "gone@dest.test"
    assert bounce["response"] == {
        "code": 550,
        "enhanced_code": "5.1.1",
        "text": "<gone@dest.test>: Benutzer unbekannt \ufffd",
    }
    assert not any(counts.values()), counts
    [dsn] = [r for r in up.received if r.sender == ""]
    assert "Benutzer unbekannt \ufffd".encode() in dsn.data


async def test_a_helo_name_with_an_octet_that_is_not_utf_8_is_logged_and_the_log_goes_on(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    up = await upstream("a")
    pools = [{"name": "default", "members": [{"name": "a", "address": up.address}]}]
    log = tmp_path / "events.jsonl"
    async with App(make_settings(tmp_path, pools)) as app:
        reader, writer = await asyncio.open_connection("127.0.0.1", app.smtp_port)
        assert (await reader.readline()).startswith(b"220 ")
        replies = []
        for line in (
            b"HELO h\xfcst.example",
            b"MAIL FROM:<app@example.com>",
            b"RCPT TO:<b@dest.test>",
            b"DATA",
            b"Subject: hi\r\n\r\nhello\r\n.",
            b"QUIT",
        ):
            writer.write(line + b"\r\n")
            replies.append(await reader.readline())
        writer.close()
        await send(app.smtp_port, "after", to=["c@dest.test"])
        await wait_until(lambda: sum(e["type"] == "Delivery" for e in read_events(log)) == 2, timeout=15)
    assert replies[4].startswith(b"250 "), replies
    helos = {e["recipient"]: e["helo"] for e in read_events(log) if e["type"] == "Reception"}
    assert helos["b@dest.test"] == "h\ufffdst.example"
    assert helos["c@dest.test"] != ""
