"""The reputation breaker end to end: a member whose receiver answers 550 5.1.1 for a share of recipients
above the threshold is paused toward that destination, and the rest of the farm keeps sending."""

from __future__ import annotations

from pathlib import Path

from postmux.app import App
from postmux.testing import fail_ratio
from tests.support import StartUpstream, make_settings, read_events, send, wait_until


async def test_a_lane_with_too_many_dead_addresses_is_paused_and_the_farm_keeps_sending(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    dead = fail_ratio(0.5, "550 5.1.1 <user@dest.test>: Recipient address rejected: User unknown")
    a, b = await upstream("relay-a", behaviour=dead), await upstream("relay-b")
    pools = [
        {
            "name": "default",
            "policy": "round_robin",
            "members": [{"name": "relay-a", "address": a.address}, {"name": "relay-b", "address": b.address}],
        }
    ]
    settings = make_settings(
        tmp_path,
        pools,
        breaker={"members": "all", "min_messages": 10, "hard_bounce_rate": 0.2, "cooldown": "1h"},
    )
    events = tmp_path / "events.jsonl"
    async with App(settings) as app:
        # Each message to an address of its own: a dead one is suppressed after its bounce.
        for i in range(30):
            await send(app.smtp_port, f"first{i}", to=[f"user{i}@dest.test"])
        await wait_until(
            lambda: any(e["tags"].get("by") == "breaker" for e in read_events(events)), timeout=15
        )
        tried_a = a.data_commands
        taken_b = len(b.received)
        for i in range(20):
            await send(app.smtp_port, f"after{i}", to=[f"later{i}@dest.test"])
        await wait_until(lambda: len(b.received) == taken_b + 20, timeout=15)
        assert a.data_commands == tried_a  # paused: not one more attempt toward dest.test
        metrics = app.metrics.render().decode()
    trip = next(e for e in read_events(events) if e["tags"].get("by") == "breaker")
    assert trip["type"] == "ShapingChanged" and trip["member"] == "relay-a"
    assert trip["queue"] == "default/dest.test"
    assert "by the reputation breaker: hard bounces" in trip["tags"]["change"]
    assert 'postmux_breaker_trips_total{member="relay-a",pool="default"} 1.0' in metrics
    bounces = [e for e in read_events(events) if e["type"] == "Bounce"]
    assert bounces and all(e["bounce_class"] == "InvalidRecipient" for e in bounces)
    assert not any(e["tags"].get("by") == "breaker" and e["member"] == "relay-b" for e in read_events(events))
