"""Shaping end to end: rates per provider, reactions to receivers, recipients per message, warm-up."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import Envelope as SmtpEnvelope

from postmux.app import App
from postmux.config import RouteSettings
from postmux.scheduling.warmup import SqliteWarmupCounts
from tests.support import StartUpstream, Upstream, make_settings, read_events, send, send_many, wait_until

PROVIDERS = [
    {"name": "slowprov", "domains": ["slow.test"]},
    {"name": "fastprov", "domains": ["fast.test"]},
]


def relay(name: str, up: Upstream, **extra: Any) -> dict[str, Any]:
    return {"name": name, "address": up.address, **extra}


async def test_a_providers_rate_holds_while_another_provider_is_not_slowed(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    up = await upstream("up")  # stopped by the fixture, even when the test fails
    shaping = {"aimd": "off", "provider": PROVIDERS, "rule": [{"destination": "slowprov", "rate": "360/min"}]}
    settings = make_settings(tmp_path, [{"name": "default", "members": [relay("a", up)]}], shaping=shaping)
    async with App(settings) as app:
        start = time.time()
        await send_many(app.smtp_port, [f"s{i}" for i in range(50)], to=["u@slow.test"])
        await send_many(app.smtp_port, [f"f{i}" for i in range(50)], to=["u@fast.test"])
        await wait_until(lambda: sum(r.test_id.startswith("f") for r in up.received) == 50, timeout=5)
        fast_done = time.time() - start
        await wait_until(lambda: len(up.received) == 100, timeout=15)
    slow = sorted(r.at for r in up.received if r.test_id.startswith("s"))
    # 360/min is one every 1/6 s, evenly spaced: 50 take about 49/6 = 8.2 s, never faster.
    span = slow[-1] - slow[0]
    assert 49 / 6 * 0.9 <= span <= 49 / 6 * 1.1 + 0.5, span
    # Never a burst: no 7 in under a second (one gap may look short at the receiver when the message
    # before it took longer on the way, but the rate's turns are never taken early).
    assert all(b - a >= 0.8 for a, b in zip(slow, slow[6:], strict=False))
    assert fast_done < 4.0  # the other provider went at full speed meanwhile


def refuse_domain(domain: str, reply: str) -> Any:
    async def behaviour(upstream: Upstream, envelope: SmtpEnvelope) -> str | None:
        return reply if any(r.endswith("@" + domain) for r in envelope.rcpt_tos) else None

    return behaviour


async def test_a_421_suspends_only_that_member_and_provider_and_its_mail_moves(tmp_path: Path) -> None:
    a = await Upstream("a", refuse_domain("slow.test", "421 4.7.0 Try again later, too fast")).start()
    b = await Upstream("b").start()
    pool = {
        "name": "default",
        "policy": "priority",
        "members": [relay("a", a), relay("b", b, backup=True)],
    }
    shaping = {
        "provider": PROVIDERS,
        "reaction": [{"code": 421, "enhanced_code": "4.7.0", "action": "suspend", "duration": "10m"}],
    }
    async with App(make_settings(tmp_path, [pool], shaping=shaping)) as app:
        for i in range(5):
            await send(app.smtp_port, f"s{i}", to=["u@slow.test"])
            await send(app.smtp_port, f"f{i}", to=["u@fast.test"])
        await wait_until(lambda: len(a.received) + len(b.received) == 10)
        lanes = {(lane["member"], lane["destination"]): lane for lane in app.control.shaping()}
        metrics = app.metrics.render().decode()
    assert sorted(r.test_id for r in b.received) == [f"s{i}" for i in range(5)]
    assert sorted(r.test_id for r in a.received) == [f"f{i}" for i in range(5)]
    assert a.data_commands == 6  # one slow.test message met the 421; the rest never went to a
    suspended = lanes[("a", "slowprov")]
    assert suspended["state"] == "suspended" and suspended["suspended_for_s"] > 500
    assert "421 4.7.0" in suspended["last_change"]
    assert lanes[("a", "fastprov")]["state"] == "open"
    changes = [e for e in read_events(tmp_path / "events.jsonl") if e["type"] == "ShapingChanged"]
    assert [(e["member"], e["queue"]) for e in changes] == [("a", "default/slowprov")]
    assert 'postmux_shaping_changes_total{member="a",pool="default"} 1.0' in metrics
    for u in (a, b):
        await u.stop()


async def test_max_recipients_splits_a_message_into_transactions(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    up = await upstream("up")  # stopped by the fixture, even when the test fails
    shaping = {"rule": [{"destination": "dest.test", "max_recipients": 2}]}
    settings = make_settings(tmp_path, [{"name": "default", "members": [relay("a", up)]}], shaping=shaping)
    async with App(settings) as app:
        await send(app.smtp_port, "many", to=[f"u{i}@dest.test" for i in range(5)])
        await wait_until(lambda: sum(len(r.recipients) for r in up.received) == 5)
    assert sorted(len(r.recipients) for r in up.received) == [1, 2, 2]
    await up.stop()


async def test_messages_per_connection_is_a_lane_limit(tmp_path: Path, upstream: StartUpstream) -> None:
    up = await upstream("up")  # stopped by the fixture, even when the test fails
    shaping = {"rule": [{"destination": "dest.test", "max_messages_per_connection": 2}]}
    settings = make_settings(tmp_path, [{"name": "default", "members": [relay("a", up)]}], shaping=shaping)
    async with App(settings) as app:
        for i in range(6):
            await send(app.smtp_port, f"m{i}")
            await wait_until(lambda n=i + 1: len(up.received) == n)
    assert up.connections == 3
    await up.stop()


def today() -> str:
    return datetime.now(UTC).date().isoformat()


async def test_a_warming_member_sends_its_days_cap_and_the_rest_overflows(tmp_path: Path) -> None:
    new, old = await Upstream("new").start(), await Upstream("old").start()
    warmup = {"start": today(), "days": [100, 1000], "overflow_pool": "default"}
    pools = [
        {"name": "default", "members": [relay("old", old)]},
        {"name": "warm", "members": [relay("new", new, warmup=warmup)]},
    ]
    settings = make_settings(tmp_path, pools)
    route = RouteSettings.model_validate({"match": {"sender_domain": "example.com"}, "pool": "warm"})
    settings = settings.model_copy(update={"route": (route,)})
    async with App(settings) as app:
        await send_many(app.smtp_port, [f"w{i}" for i in range(150)], concurrency=10)
        await wait_until(lambda: len(new.received) + len(old.received) == 150, timeout=20)
    assert len(new.received) == 100
    assert len(old.received) == 50
    ledger = SqliteWarmupCounts(tmp_path / "warmup.db").load(datetime.now(UTC).date())
    assert ledger["warm/new/*"] == 100
    for u in (new, old):
        await u.stop()


async def test_a_capped_member_leaves_the_rest_to_its_pool_mates(tmp_path: Path) -> None:
    new, old = await Upstream("new").start(), await Upstream("old").start()
    pool = {
        "name": "default",
        "policy": "weighted",
        "members": [
            relay("new", new, weight=100, warmup={"start": today(), "days": [30]}),
            relay("old", old),
        ],
    }
    async with App(make_settings(tmp_path, [pool])) as app:
        await send_many(app.smtp_port, [f"w{i}" for i in range(60)], concurrency=5)
        await wait_until(lambda: len(new.received) + len(old.received) == 60, timeout=20)
    assert len(new.received) == 30
    for u in (new, old):
        await u.stop()


async def test_pools_overflowing_into_each_other_pass_work_once_then_it_waits_for_tomorrow(
    tmp_path: Path,
) -> None:
    a, b = await Upstream("a").start(), await Upstream("b").start()
    pools = [
        {
            "name": "default",
            "members": [relay("a", a, warmup={"start": today(), "days": [2], "overflow_pool": "warm"})],
        },
        {
            "name": "warm",
            "members": [relay("b", b, warmup={"start": today(), "days": [2], "overflow_pool": "default"})],
        },
    ]
    settings = make_settings(tmp_path, pools)
    route = RouteSettings.model_validate({"match": {"sender_domain": "example.com"}, "pool": "warm"})
    settings = settings.model_copy(update={"route": (route,)})
    async with App(settings) as app:
        await send_many(app.smtp_port, [f"w{i}" for i in range(6)], concurrency=1)
        await wait_until(lambda: len(a.received) + len(b.received) == 4)
        await wait_until(lambda: app.dispatcher.ready == 0 and app.dispatcher.in_flight == 0)
        counts = await app.spool.counts()
    assert (len(a.received), len(b.received)) == (2, 2)
    assert counts.get("queued") == 2  # held until the next UTC day, not bounced, not spinning
    held = [e for e in read_events(tmp_path / "events.jsonl") if e["type"] == "TransientFailure"]
    assert {e["response"]["enhanced_code"] for e in held} == {"4.7.0"}
    for u in (a, b):
        await u.stop()


async def test_a_refusing_greeting_reaches_the_reactions(tmp_path: Path) -> None:
    a, b = await Upstream("a").start(), await Upstream("b").start()
    a.greeting_refusal = "421 4.7.0 Too many connections from your IP"
    pool = {"name": "default", "policy": "priority", "members": [relay("a", a), relay("b", b, backup=True)]}
    async with App(make_settings(tmp_path, [pool])) as app:
        await send(app.smtp_port, "g1")
        await wait_until(lambda: len(b.received) == 1)
        lanes = {lane["member"]: lane for lane in app.control.shaping()}
    assert "throttled" in lanes["a"]["last_change"] and "Too many connections" in lanes["a"]["last_change"]
    changes = [e for e in read_events(tmp_path / "events.jsonl") if e["type"] == "ShapingChanged"]
    assert [e["member"] for e in changes] == ["a"]
    for u in (a, b):
        await u.stop()


async def test_a_primary_waiting_for_its_rate_keeps_its_mail_from_the_backup(tmp_path: Path) -> None:
    primary, backup = await Upstream("primary").start(), await Upstream("backup").start()
    pool = {
        "name": "default",
        "policy": "priority",
        "members": [relay("p", primary), relay("q", backup, backup=True)],
    }
    shaping = {"rule": [{"member": "p", "rate": "240/min"}]}  # one every 0.25 s
    async with App(make_settings(tmp_path, [pool], shaping=shaping)) as app:
        await send_many(app.smtp_port, [f"r{i}" for i in range(6)], concurrency=6)
        await wait_until(lambda: len(primary.received) == 6, timeout=10)
    assert backup.received == []
    for u in (primary, backup):
        await u.stop()
