"""Placement by zone in a running postmux (issue 17, part 3): a node in zone a sends only through zone a's
members while they are healthy, moves all of its mail to zone b within the check time when they die, and
brings it back when they return. Real upstreams on loopback, stopped and reopened on their ports."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from postmux.app import App
from postmux.testing import Upstream
from tests.support import StartUpstream, make_settings, read_events, send, wait_until

INTERVAL, FALL, RISE, TIMEOUT = 0.2, 2, 2, 0.2


def zoned_pool(ups: dict[str, Upstream], **pool: Any) -> dict[str, Any]:
    return {
        "name": "default",
        "policy": "round_robin",
        "members": [{"name": n, "address": u.address, "zone": n[0]} for n, u in ups.items()],
        "check": {"enabled": True, "interval": INTERVAL, "timeout": TIMEOUT, "rise": RISE, "fall": FALL},
        **pool,
    }


def where(ups: dict[str, Upstream], test_ids: list[str]) -> dict[str, set[str]]:
    """The zones (the first letter of the member's name) that received each of `test_ids`."""
    wanted = set(test_ids)
    zones: dict[str, set[str]] = {t: set() for t in test_ids}
    for name, u in ups.items():
        for r in u.received:
            if r.test_id in wanted:
                zones[r.test_id].add(name[0])
    return zones


async def test_a_node_keeps_its_mail_in_its_zone_moves_it_when_the_zone_dies_and_brings_it_back(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    ups = {n: await upstream(n) for n in ("a1", "a2", "b1", "b2")}
    # Passive ejection out of the way: the active checks say when zone a is gone and when it is back.
    pool = zoned_pool(ups, health={"consecutive_failures": 1000, "consecutive_4xx": 1000})
    settings = make_settings(tmp_path, [pool], node={"name": "node-a", "zone": "a"})
    sent: list[str] = []

    async def steady(phase: str, count: int) -> list[str]:
        ids = [f"{phase}-{i}" for i in range(count)]
        for test_id in ids:
            await send(app.smtp_port, test_id)
            sent.append(test_id)
            await asyncio.sleep(0.01)
        return ids

    def delivered(ids: list[str]) -> bool:
        return all(where(ups, ids).values())

    async with App(settings) as app:
        members = app.pools["default"]
        healthy = await steady("healthy", 30)
        await wait_until(lambda: delivered(healthy), timeout=10)
        assert all(z == {"a"} for z in where(ups, healthy).values()), where(ups, healthy)

        await ups["a1"].stop()
        await ups["a2"].stop()
        killed = time.time()
        during = await steady("dying", 20)  # sent while the checks find out: tried on a, then b
        await wait_until(lambda: not members.member("a1").check_up and not members.member("a2").check_up, 5)
        gone = await steady("gone", 30)
        await wait_until(lambda: delivered(during + gone), timeout=10)
        assert all(z == {"b"} for z in where(ups, gone).values())

        await ups["a1"].reopen_listener()
        await ups["a2"].reopen_listener()
        await wait_until(lambda: members.member("a1").check_up and members.member("a2").check_up, 5)
        back = await steady("back", 30)
        await wait_until(lambda: delivered(back), timeout=10)
        assert all(z == {"a"} for z in where(ups, back).values()), where(ups, back)

    events = read_events(tmp_path / "events.jsonl")
    downs = [e for e in events if e["type"] == "MemberDown"]
    assert sorted((e["member"], e["zone"]) for e in downs) == [("a1", "a"), ("a2", "a")]
    # Zone a is out, so all of the node's mail goes to zone b, within fall checks of the kill.
    moved = max(e["timestamp"] for e in downs)
    assert moved - killed <= FALL * INTERVAL * 1.1 + TIMEOUT + 0.3, moved - killed
    ups_events = [e for e in events if e["type"] == "MemberUp"]
    assert sorted((e["member"], e["zone"]) for e in ups_events) == [("a1", "a"), ("a2", "a")]
    deliveries = [e for e in events if e["type"] == "Delivery"]
    assert {e["zone"] for e in deliveries if e["member"].startswith("b")} == {"b"}
    assert {e["zone"] for e in deliveries if e["member"].startswith("a")} == {"a"}
    late = [e for e in deliveries if moved + 0.05 < e["timestamp"] < min(u["timestamp"] for u in ups_events)]
    assert late and {e["zone"] for e in late} == {"b"}  # nothing went to zone a while it was out
    # Nothing lost: every message reached an upstream (those in flight at the kill perhaps twice).
    assert all(where(ups, sent).values())


async def test_a_node_without_a_zone_uses_every_zone(tmp_path: Path, upstream: StartUpstream) -> None:
    ups = {n: await upstream(n) for n in ("a1", "b1")}
    async with App(make_settings(tmp_path, [zoned_pool(ups, check={})])) as app:
        ids = [f"any-{i}" for i in range(10)]
        for test_id in ids:
            await send(app.smtp_port, test_id)
        await wait_until(lambda: all(where(ups, ids).values()), timeout=10)
    assert {z for zones in where(ups, ids).values() for z in zones} == {"a", "b"}


async def test_passive_ejection_moves_a_dead_zones_mail_and_its_end_brings_it_back(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    ups = {n: await upstream(n) for n in ("a1", "a2", "b1", "b2")}
    ejection = 3.0
    pool = zoned_pool(ups, check={}, health={"consecutive_failures": 1, "base_ejection_time": ejection})
    settings = make_settings(tmp_path, [pool], node={"zone": "a"})
    async with App(settings) as app:
        members = app.pools["default"]

        async def batch(phase: str, count: int) -> list[str]:
            ids = [f"{phase}-{i}" for i in range(count)]
            for test_id in ids:
                await send(app.smtp_port, test_id)
            await wait_until(lambda: all(where(ups, ids).values()), timeout=10)
            return ids

        assert {z for zs in where(ups, await batch("healthy", 10)).values() for z in zs} == {"a"}
        await ups["a1"].stop()
        await ups["a2"].stop()
        # The first attempts on each dead member fail, eject it, and go on to zone b at once.
        await batch("dying", 4)
        ejected = time.monotonic()
        assert members.member("a1").ejected(app.clock()) and members.member("a2").ejected(app.clock())
        gone = await batch("gone", 10)
        assert time.monotonic() - ejected < ejection  # all sent and delivered while zone a was out
        assert all(z == {"b"} for z in where(ups, gone).values())
        await ups["a1"].reopen_listener()
        await ups["a2"].reopen_listener()
        await wait_until(lambda: members.member("a1").healthy(app.clock()), timeout=ejection + 2)
        await wait_until(lambda: members.member("a2").healthy(app.clock()), timeout=ejection + 2)
        back = await batch("back", 10)
        assert all(z == {"a"} for z in where(ups, back).values()), where(ups, back)
