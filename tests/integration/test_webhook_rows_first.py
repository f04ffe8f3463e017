"""Events that no stored message or settled outcome carries have their webhook rows durable before the
event goes out, and so before the 250 that answers the mail they come from.

A complaint report or a DSN sent back to the return-path domain ends the reporter's part at the 250 (an
ISP's feedback loop does not send a report twice), and a Suppressed recipient's message is answered 250
too. Their rows used to be appended "a moment after" by the bus's loose appender: a crash in that moment
lost the event for good. Here a bus subscriber looks into the spool's file (a connection of its own,
committed rows only) at the moment each such event is emitted: its rows must already be there.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import httpx

from postmux.app import App
from postmux.config import WebhookSettings
from postmux.events.types import Event
from tests.integration.test_returns import DOMAIN, hand_back, verp_settings
from tests.integration.test_suppression import API_KEY
from tests.integration.test_suppression import settings as suppression_settings
from tests.support import StartUpstream, read_events, send, wait_until
from tests.unit.test_returns import ARF, POSTFIX_DSN
from tests.webhook_receiver import Receiver

CHECKED = {"Complaint", "Bounce", "Suppressed"}


class RowsAtEmit:
    """A bus subscriber: for each checked event, whether the spool held its webhook row as it went out."""

    def __init__(self, spool: Path) -> None:
        self.spool = spool
        self.seen: dict[str, bool] = {}  # "type recipient" -> the row was committed

    def __call__(self, event: Event) -> None:
        if event.type.value not in CHECKED:
            return
        conn = sqlite3.connect(f"file:{self.spool}?mode=ro", uri=True)
        try:
            found = conn.execute(
                "SELECT 1 FROM webhook_outbox WHERE event_id = ?", (event.event_id,)
            ).fetchone()
        finally:
            conn.close()
        self.seen[f"{event.type.value} {event.recipient}"] = found is not None


def rows_per_event(spool: Path) -> list[int]:
    """How many rows each event has in the outbox (one endpoint here: one each, never appended again)."""
    conn = sqlite3.connect(f"file:{spool}?mode=ro", uri=True)
    try:
        return [n for (n,) in conn.execute("SELECT count(*) FROM webhook_outbox GROUP BY event_id")]
    finally:
        conn.close()


async def down_endpoint() -> str:
    """A webhook URL nobody answers: the rows stay in the outbox, where the subscriber can see them."""
    receiver = await Receiver().start()
    url = receiver.url("/hooks")
    await receiver.stop()
    return url


async def test_a_complaint_and_a_dsns_bounce_are_in_the_outbox_before_they_go_out(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    up = await upstream("relay-a")
    hook: dict[str, Any] = {"name": "crm", "url": await down_endpoint(), "events": ["Bounce", "Complaint"]}
    settings = verp_settings(tmp_path, up.address, webhook=[hook])
    log = tmp_path / "events.jsonl"
    async with App(settings) as app:
        watch = RowsAtEmit(tmp_path / "spool.db")
        app.bus.subscribe(watch)
        await send(app.smtp_port, "spammy", to=["user@dest.example"])
        await wait_until(lambda: len(up.received) == 1)
        return_path = up.received[0].sender.encode()
        example_path = b"b.0193a5f2c8b1deadbeef.xxxx.user=dest.example@bounces.example.com"
        await hand_back(app.smtp_port, f"fbl@{DOMAIN}", ARF.replace(example_path, return_path))
        await hand_back(app.smtp_port, return_path.decode(), POSTFIX_DSN.replace(example_path, return_path))
        await wait_until(lambda: {"Complaint", "Bounce"} <= {e["type"] for e in read_events(log)})
    assert watch.seen == {"Complaint user@dest.example": True, "Bounce user@dest.example": True}
    assert rows_per_event(tmp_path / "spool.db") == [1, 1]


async def test_suppressed_recipients_rows_commit_with_their_message_or_alone_before_the_250(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    """Over SMTP (Acceptor.accept) and the HTTP API (accept_all): a message that keeps other recipients,
    and one left with none, which is stored as nothing."""
    up = await upstream("a")
    hook: dict[str, Any] = {"name": "crm", "url": await down_endpoint(), "events": ["Suppressed"]}
    settings = suppression_settings(tmp_path, up, action="drop")
    settings = settings.model_copy(update={"webhook": (WebhookSettings.model_validate(hook),)})
    log = tmp_path / "events.jsonl"
    async with App(settings) as app:
        watch = RowsAtEmit(tmp_path / "spool.db")
        app.bus.subscribe(watch)
        for address in ("smtp@dest.test", "alone@dest.test", "api@dest.test", "api-alone@dest.test"):
            await app.suppressions.add(address, reason="asked")
        await send(app.smtp_port, "m1", to=["smtp@dest.test", "kept@dest.test"])
        await send(app.smtp_port, "m2", to=["alone@dest.test"])
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{app.http_port}", headers={"Authorization": f"Bearer {API_KEY}"}
        ) as client:
            for rcpts in (["api@dest.test", "ok@dest.test"], ["api-alone@dest.test"]):
                body = {
                    "envelope_sender": "app@example.com",
                    "recipients": [{"email": r} for r in rcpts],
                    "content": "Subject: hi\r\n\r\nhello\r\n",
                }
                assert (await client.post("/api/v1/messages", json=body)).status_code == 202
        await wait_until(lambda: sum(e["type"] == "Suppressed" for e in read_events(log)) == 4)
    assert watch.seen == {
        f"Suppressed {r}": True
        for r in ("smtp@dest.test", "alone@dest.test", "api@dest.test", "api-alone@dest.test")
    }
    assert rows_per_event(tmp_path / "spool.db") == [1, 1, 1, 1]
