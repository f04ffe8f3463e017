"""Deferral, retry at the configured intervals, and expiry with one DSN."""

from __future__ import annotations

import email
from email import policy
from pathlib import Path

from postmux.app import App
from postmux.config import RouteSettings
from tests.support import Upstream, always, make_settings, read_events, send, wait_until


async def test_deferred_message_is_retried_then_expires_with_one_dsn(tmp_path: Path) -> None:
    deferring = await Upstream("deferring", always("421 4.7.0 too busy, come back later")).start()
    bounces = await Upstream("bounces").start()
    pools = [
        {
            "name": "default",
            "members": [{"name": "deferring", "address": deferring.address}],
            "health": {"consecutive_failures": 1000},
        },
        {"name": "return", "members": [{"name": "bounces", "address": bounces.address}]},
    ]
    settings = make_settings(tmp_path, pools, retry={"intervals": ["300ms"], "max_age": "2s", "jitter": 0})
    route = RouteSettings.model_validate({"match": {"recipient_domain": "example.com"}, "pool": "return"})
    settings = settings.model_copy(update={"route": (route,)})
    async with App(settings) as app:
        await send(app.smtp_port, "e1", sender="app@example.com")
        await wait_until(lambda: len(bounces.received) == 1, timeout=10)
        assert deferring.data_commands >= 3  # retried at its intervals before giving up
    [dsn] = bounces.received
    report = email.message_from_bytes(dsn.data, policy=policy.default)
    assert report.get_content_type() == "multipart/report"
    assert b"Status: 4.4.7" in dsn.data  # RFC 3463: delivery time expired
    events = read_events(tmp_path / "events.jsonl")
    kinds = [e["type"] for e in events if e["recipient"] == "user@dest.test"]
    assert kinds[0] == "Reception" and kinds[-1] == "Expiration"
    assert kinds.count("TransientFailure") == deferring.data_commands
    for u in (deferring, bounces):
        await u.stop()


async def test_deferral_waits_for_the_interval_when_no_other_member_is_left(tmp_path: Path) -> None:
    flip = {"fail": True}

    async def first_fails(up: Upstream, env: object) -> str | None:
        return "451 4.3.0 later" if flip["fail"] else None

    up = await Upstream("only", first_fails).start()
    pools = [{"name": "default", "members": [{"name": "only", "address": up.address}]}]
    settings = make_settings(tmp_path, pools, retry={"intervals": ["1s"], "max_age": "1h", "jitter": 0})
    async with App(settings) as app:
        await send(app.smtp_port, "r1")
        await wait_until(lambda: up.data_commands == 1)
        flip["fail"] = False
        await wait_until(lambda: len(up.received) == 1, timeout=5)
    events = read_events(tmp_path / "events.jsonl")
    failed = next(e for e in events if e["type"] == "TransientFailure")
    delivered = next(e for e in events if e["type"] == "Delivery")
    assert 0.9 <= delivered["timestamp"] - failed["timestamp"] <= 2.5
    assert delivered["num_attempts"] == 2
    await up.stop()
