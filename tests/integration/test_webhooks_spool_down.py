"""GET /api/v1/webhooks while the spool cannot answer: 503 with the spool's reason, as the queue routes
say it, not a 500 and a traceback in the log (review outage.md item 5)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import httpx

from postmux.app import App
from tests.integration.test_webhooks import SECRET, TOKEN, settings
from tests.support import StartUpstream


async def test_the_webhooks_listing_is_a_503_while_the_spool_cannot_answer(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    up = await upstream("up")
    hook = {"name": "ops", "url": "http://127.0.0.1:9/ops", "secret": SECRET, "events": ["MemberDown"]}
    spool = sqlite3.connect(tmp_path / "spool.db", isolation_level=None)
    try:
        async with App(settings(tmp_path, up.address, [hook])) as app:
            auth = {"Authorization": f"Bearer {TOKEN}"}
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}") as client:
                assert (await client.get("/api/v1/webhooks", headers=auth)).status_code == 200
                # The outbox's table gone from under the reader: every read of it fails, as a spool down.
                spool.execute("ALTER TABLE webhook_outbox RENAME TO webhook_outbox_away")
                try:
                    answer = await client.get("/api/v1/webhooks", headers=auth)
                finally:
                    spool.execute("ALTER TABLE webhook_outbox_away RENAME TO webhook_outbox")
                assert answer.status_code == 503
                assert answer.json()["error"].startswith("the spool could not answer: ")
                assert "webhook_outbox" in answer.json()["error"]
                assert (await client.get("/api/v1/webhooks", headers=auth)).status_code == 200
    finally:
        spool.close()
