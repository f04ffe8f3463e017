"""Delivery toward members: connection reuse and limits, lost connections, the null sender."""

from __future__ import annotations

import asyncio
from pathlib import Path

from postmux.app import App
from tests.support import (
    DROP,
    StartUpstream,
    always,
    delay,
    make_settings,
    read_events,
    send,
    send_many,
    wait_until,
)


def one_pool(*members: dict[str, object], **extra: object) -> list[dict[str, object]]:
    return [{"name": "default", "policy": "round_robin", "members": list(members), **extra}]


async def test_connections_are_reused_and_capped_by_max_connections(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    slow = await upstream("slow", delay(0.05))
    pools = one_pool({"name": "slow", "address": slow.address, "max_connections": 3})
    settings = make_settings(tmp_path, pools, delivery={"max_messages_per_connection": 10})
    async with App(settings) as app:
        await send_many(app.smtp_port, [f"c{i}" for i in range(40)], concurrency=10)
        await wait_until(lambda: len(slow.received) == 40, timeout=20)
        assert app.transports[("default", "slow")].connections <= 3
    assert slow.peak_active <= 3
    # 40 messages, at most 10 per connection, at most 3 at a time: 4 to 6 connections, not 40.
    assert 4 <= slow.connections <= 8, slow.connections


async def test_connection_dropped_during_data_is_retried_on_another_member(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    dropper = await upstream("dropper", always(DROP))
    good = await upstream("good")
    pools = one_pool(
        {"name": "dropper", "address": dropper.address},
        {"name": "good", "address": good.address},
        health={"consecutive_failures": 1000},
    )
    async with App(make_settings(tmp_path, pools)) as app:
        await send_many(app.smtp_port, [f"x{i}" for i in range(10)], concurrency=2)
        await wait_until(lambda: len(good.received) == 10)
    assert dropper.data_commands > 0
    events = read_events(tmp_path / "events.jsonl")
    lost = [e for e in events if e["type"] == "TransientFailure" and e["member"] == "dropper"]
    assert lost and all(e["response"]["text"].startswith("connection lost during DATA") for e in lost)
    assert all(e["peer"] == dropper.address and e["source_ip"] == "127.0.0.1" for e in lost)
    assert sorted(r.test_id for r in good.received) == sorted(f"x{i}" for i in range(10))


async def test_bounce_of_a_null_sender_message_sends_no_dsn(tmp_path: Path, upstream: StartUpstream) -> None:
    rejecting = await upstream("rejecting", always("550 5.1.1 no such user"))
    async with App(make_settings(tmp_path, one_pool({"name": "r", "address": rejecting.address}))) as app:
        await send(app.smtp_port, "n1", sender="")
        await wait_until(
            lambda: any(e["type"] == "Bounce" for e in read_events(tmp_path / "events.jsonl")), 5
        )
        await asyncio.sleep(1.5)  # a DSN, if one were made, would be attempted (and refused) by now
    assert rejecting.data_commands == 1  # the original only: no DSN was queued behind it
    kinds = [e["type"] for e in read_events(tmp_path / "events.jsonl")]
    assert kinds.count("Reception") == 1 and kinds.count("Bounce") == 1
