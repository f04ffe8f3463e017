from __future__ import annotations

from pathlib import Path

from postmux.app import App
from tests.support import Upstream, make_settings, send, wait_until


async def test_one_message_goes_through(tmp_path: Path) -> None:
    up = await Upstream("a").start()
    settings = make_settings(
        tmp_path, [{"name": "default", "members": [{"name": "a", "address": up.address}]}]
    )
    async with App(settings) as app:
        reply = await send(app.smtp_port, "m1")
        assert "queued as" in reply
        await wait_until(lambda: len(up.received) == 1)
    assert up.received[0].test_id == "m1"
    assert up.received[0].data.startswith(b"Received: from ")
    await up.stop()
