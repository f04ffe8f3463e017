"""A wake-up that comes while the dispatcher's scan of the spool runs is not lost.

With PostgreSQL, another node's commit of due work sends a NOTIFY, and this node's dispatcher scans at once
(`scan_soon`) instead of waiting for its scan interval. A NOTIFY that arrived while a scan was already
reading (a scan that could not see that commit yet) used to be cleared when the scan ended, so the work
waited a whole interval; a test of the PostgreSQL spool failed so under load. Here on a real SQLite spool,
the scan held at its end until the work is stored and the wake-up given, as the race has it.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from postmux.app import App
from postmux.envelope import Envelope, new_message_id
from postmux.scheduling.dispatcher import DispatchLimits
from postmux.spool.base import WorkItem
from tests.support import StartUpstream, make_settings, message, wait_until


async def test_a_wake_up_during_a_scan_leads_to_another_scan_not_to_the_next_interval(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    up = await upstream()
    settings = make_settings(
        tmp_path, [{"name": "default", "members": [{"name": "a", "address": up.address}]}]
    )
    app = App(settings, limits=DispatchLimits(scan_interval_s=30.0))  # no wake-up: 30 s to the next scan
    in_scan, let_go = asyncio.Event(), asyncio.Event()
    real_lease_due = app.spool.lease_due
    armed = False  # only the scan the test asks for is held, once

    async def lease_due(now: float, limit: int) -> list[WorkItem]:
        found = await real_lease_due(now, limit)  # read before the work below is stored: it sees none
        if armed and not in_scan.is_set():
            in_scan.set()
            await let_go.wait()
        return found

    app.spool.lease_due = lease_due  # type: ignore[method-assign]
    async with app:
        await asyncio.sleep(0.1)  # the start's scan is done; the loop waits its interval
        armed = True
        app.dispatcher.scan_soon()
        await asyncio.wait_for(in_scan.wait(), timeout=5)
        # Meanwhile: due work is committed (as another node's), and its NOTIFY reaches this node.
        env = Envelope("app@example.com", ("user@dest.test",), message("woken"))
        await app.spool.store(new_message_id(), env, {"user@dest.test": "default"}, time.time(), lease=False)
        app.dispatcher.scan_soon()
        let_go.set()
        await wait_until(lambda: len(up.received) == 1, timeout=5)
