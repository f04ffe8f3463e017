"""Active checks inside a running postmux: a member killed mid-run is out within fall x interval."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from postmux.app import App
from tests.support import StartUpstream, make_settings, read_events, send, wait_until


async def test_member_killed_mid_run_is_out_within_fall_x_interval_and_nothing_is_lost(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    ups = [await upstream(n) for n in ("a", "b", "c")]
    victim = ups[1]
    interval, fall, timeout = 0.2, 2, 0.2
    pool = {
        "name": "default",
        "policy": "round_robin",
        "members": [{"name": u.name, "address": u.address} for u in ups],
        "check": {"enabled": True, "interval": interval, "timeout": timeout, "rise": 2, "fall": fall},
        # Passive ejection out of the way: this test is about the active checks.
        "health": {"consecutive_failures": 1000},
    }
    sent: list[str] = []
    async with App(make_settings(tmp_path, [pool])) as app:

        async def steady(count: int) -> None:
            for i in range(count):
                test_id = f"{len(sent)}-{i}"
                await send(app.smtp_port, test_id)
                sent.append(test_id)
                await asyncio.sleep(0.01)

        await steady(30)
        await victim.stop()
        killed = time.time()
        await steady(60)
        member = app.pools["default"].member("b")
        await wait_until(lambda: not member.check_up, timeout=5)
        await wait_until(lambda: sum(len(u.received) for u in ups) >= len(sent), timeout=10)
    events = read_events(tmp_path / "events.jsonl")
    [down] = [e for e in events if e["type"] == "MemberDown" and e["member"] == "b"]
    # fall failed checks, each at most one interval (+10% jitter) apart and each bounded by the timeout
    assert down["timestamp"] - killed <= fall * interval * 1.1 + timeout + 0.3, down
    assert "checks failed" in down["tags"]["reason"]
    received = [r.test_id for u in ups for r in u.received]
    assert sorted(set(received)) == sorted(sent)  # nothing lost
    late = [e for e in events if e["member"] == "b" and e["timestamp"] > down["timestamp"] + 0.05]
    assert late == []  # no attempt went to b once it was out
