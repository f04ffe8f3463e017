"""A member's way in and out of service, end to end: a real App, real loopback upstreams, reloads from a
real file. What the pool does must agree with the file, the events, `postmux members` and /metrics."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from postmux.app import App
from postmux.config import load_config
from postmux.testing import accept, delay
from tests.integration.test_control import TOKEN, admin
from tests.support import StartUpstream, Upstream, read_events, send, send_many, toml_head, wait_until


def write_pool(
    cfg: Path, tmp_path: Path, members: list[Upstream], pool: str = "", *, checks: bool = True
) -> None:
    """A node whose one pool has `members` (round robin), with fast active checks unless not `checks`;
    `pool`: more keys of the pool."""
    rows = ",\n".join(f'  {{ name = "{u.name}", address = "{u.address}" }}' for u in members)
    cfg.write_text(
        toml_head(tmp_path, token=TOKEN)
        + f"""[[pool]]
name = "default"
policy = "round_robin"
{pool}
members = [
{rows}
]
[pool.check]
enabled = {"true" if checks else "false"}
interval = "0.2s"
rise = 1
fall = 1
"""
    )


async def states(app: App) -> dict[str, str]:
    async with admin(app) as client:
        return {row["member"]: row["state"] for row in (await client.get("/members")).json()["members"]}


async def test_a_member_removed_and_put_back_while_in_flight_is_restored_and_checked_again(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    a, b, c = await upstream("a"), await upstream("b"), await upstream("c", delay(1.5))
    cfg = tmp_path / "postmux.toml"
    write_pool(cfg, tmp_path, [a, b, c], pool='slow_start = "1m"')
    async with App(load_config(cfg), config_path=cfg) as app:
        pool = app.pools["default"]
        await send_many(app.smtp_port, [f"r{i}" for i in range(3)], concurrency=3)
        await wait_until(lambda: pool.member("c").in_flight > 0)

        write_pool(cfg, tmp_path, [a, b], pool='slow_start = "1m"')
        assert app.control.reload().changes == ["default/c: removed"]
        write_pool(cfg, tmp_path, [a, b, c], pool='slow_start = "1m"')
        assert app.control.reload().changes == ["default/c: restored"]
        assert (await states(app))["c"] == "ramping"  # back as an added member comes: under slow start

        # Its last attempt from before ends: it stays, in service, and its checks run again.
        await wait_until(lambda: len(c.received) == 1 and pool.member("c").in_flight == 0)
        assert [m.name for m in pool.members] == ["a", "b", "c"] and not pool.member("c").removed
        probes = c.connections
        await wait_until(lambda: c.connections >= probes + 2, timeout=5)

        c.behaviour = accept
        for i in range(6):
            await send(app.smtp_port, f"s{i}")
        await wait_until(lambda: sum(len(u.received) for u in (a, b, c)) == 9)
        assert len(c.received) > 1


async def test_an_ejection_that_ends_while_the_pool_is_idle_is_announced_when_it_ends(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    a, b = await upstream("a"), await upstream("b")
    b.close_listener()  # connections refused: local failures
    cfg = tmp_path / "postmux.toml"
    write_pool(
        cfg,
        tmp_path,
        [a, b],
        pool='slow_start = "10s"\nhealth = { consecutive_failures = 2, base_ejection_time = "2s" }',
        checks=False,  # only the ejection takes it out and brings it back
    )
    events = tmp_path / "events.jsonl"

    def member_events(kind: str) -> list[dict[str, Any]]:
        return [e for e in read_events(events) if e["type"] == kind and e["member"] == "b"]

    async with App(load_config(cfg), config_path=cfg) as app:
        pool = app.pools["default"]
        await send_many(app.smtp_port, [f"e{i}" for i in range(4)], concurrency=1)
        await wait_until(lambda: len(member_events("MemberDown")) == 1 and len(a.received) == 4)
        ends = pool.member("b").ejected_until
        await b.reopen_listener()
        # No mail from here on: nothing picks. The return is still noticed when the ejection ends.
        await wait_until(lambda: len(member_events("MemberUp")) == 1, timeout=6)
        [up] = member_events("MemberUp")
        assert up["tags"]["reason"] == "ejection time over"
        assert ends <= up["timestamp"] < ends + 1.5
        assert (await states(app))["b"] == "ramping"  # the ramp started then too
        ramp = pool.member("b").ramp_started
        assert ramp is not None and ends <= ramp < ends + 1.5


async def test_members_says_up_once_the_ramp_is_over_though_no_mail_came(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    a, b = await upstream("a"), await upstream("b")
    cfg = tmp_path / "postmux.toml"
    write_pool(cfg, tmp_path, [a], pool='slow_start = "1s"')
    async with App(load_config(cfg), config_path=cfg) as app:
        write_pool(cfg, tmp_path, [a, b], pool='slow_start = "1s"')
        assert app.control.reload().changes == ["default/b: added"]
        assert (await states(app))["b"] == "ramping"
        await asyncio.sleep(1.2)
        assert (await states(app))["b"] == "up"  # the first look after the ramp, not the second


async def test_a_removed_member_with_attempts_in_flight_is_not_up_in_the_metrics(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    a, c = await upstream("a"), await upstream("c", delay(1.5))
    cfg = tmp_path / "postmux.toml"
    write_pool(cfg, tmp_path, [a, c])
    async with App(load_config(cfg), config_path=cfg) as app:
        await send_many(app.smtp_port, ["r0", "r1"], concurrency=2)
        await wait_until(lambda: app.pools["default"].member("c").in_flight > 0)
        write_pool(cfg, tmp_path, [a])
        assert app.control.reload().changes == ["default/c: removed"]
        assert (await states(app))["c"] == "removed"
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}") as client:
            text = (await client.get("/metrics")).text
        up = {
            s.labels["member"]: s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "postmux_member_up"
        }
        assert up == {"a": 1, "c": 0}  # listed until its last attempt ends, but picked no more
