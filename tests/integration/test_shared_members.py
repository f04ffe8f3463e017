"""Several nodes sharing one Redis share what operators and health checks say of members (issue 17): a
drain made on one node holds on every node within a heartbeat and across restarts, and a member most
nodes' checks find down is out on every node, while one node's broken path takes it out there only.

Apps in this process, each with its own SQLite spool, listener and [node] name, over one Redis prefix.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from postmux.admin.member_states import DrainedMembers, OperatorState, RedisMemberStates
from postmux.app import App
from postmux.events.types import Event, EventType
from postmux.node import instance_id
from postmux.scheduling.redis_health import RedisHealthVerdicts
from postmux.scheduling.redis_throttles import RedisThrottles
from tests.redis_support import REDIS_URL, PrivateRedis, private_redis, redis_prefix
from tests.support import (
    StartUpstream,
    Upstream,
    free_port,
    make_settings,
    read_events,
    send_many,
    wait_until,
)

__all__ = ["private_redis", "redis_prefix"]  # fixtures, used by name

HEARTBEAT_S = 2.0  # RedisThrottles' default, the period at which nodes follow each other
SEEN_WITHIN_S = 2 * HEARTBEAT_S + 1.0


def node_settings(
    home: Path, name: str, members: list[dict[str, Any]], url: str, prefix: str, **pool: Any
) -> Any:
    home.mkdir(exist_ok=True)
    return make_settings(
        home,
        [{"name": "default", "policy": "round_robin", "members": members, **pool}],
        node={"name": name},
        throttles={"backend": "redis", "url": url, "prefix": prefix, "timeout": "1s"},
    )


@contextlib.asynccontextmanager
async def nodes(settings: list[Any]) -> AsyncIterator[list[App]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(App(s)) for s in settings]


def watch(app: App) -> list[Event]:
    seen: list[Event] = []
    app.bus.subscribe(seen.append)
    return seen


def member_events(seen: list[Event], member: str) -> list[Event]:
    kinds = (EventType.MEMBER_DOWN, EventType.MEMBER_UP)
    return [e for e in seen if e.type in kinds and e.member == member]


async def test_a_drain_on_one_node_is_followed_by_the_others_within_a_heartbeat_and_so_is_enable(
    tmp_path: Path, upstream: StartUpstream, redis_prefix: str
) -> None:
    a, b = await upstream("a"), await upstream("b")
    members = [{"name": "a", "address": a.address}, {"name": "b", "address": b.address}]
    settings = [
        node_settings(tmp_path / n, n, members, REDIS_URL, redis_prefix)
        for n in ("node-1", "node-2", "node-3")
    ]
    async with nodes(settings) as apps:
        seen = watch(apps[1])
        apps[0].control.set_draining("b", True)
        await wait_until(
            lambda: all(app.pools["default"].member("b").draining for app in apps), timeout=SEEN_WITHIN_S
        )
        [down] = member_events(seen, "b")
        assert down.type is EventType.MEMBER_DOWN
        assert down.node == "node-2" and down.tags["origin_node"] == "node-1"
        assert down.tags["reason"] == "drained by operator on node-1"
        assert down.as_record()["node"] == "node-2"
        # The node that followed sends nothing new to the drained member.
        await send_many(apps[1].smtp_port, [f"d{i}" for i in range(6)], concurrency=2)
        await wait_until(lambda: len(a.received) == 6)
        assert b.received == []
        view = apps[2].control.members()
        assert {(m["member"], m["state"], m["node"]) for m in view} == {
            ("a", "up", "node-3"),
            ("b", "draining", "node-3"),
        }

        apps[2].control.set_draining("b", False)  # enable on another node than the one that drained
        await wait_until(
            lambda: not any(app.pools["default"].member("b").draining for app in apps), timeout=SEEN_WITHIN_S
        )
        up = member_events(seen, "b")[-1]
        assert up.type is EventType.MEMBER_UP and up.tags["origin_node"] == "node-3"
        assert len(member_events(seen, "b")) == 2  # each change said once, not at every heartbeat


async def test_a_drain_outlives_the_restart_of_any_node(
    tmp_path: Path, upstream: StartUpstream, redis_prefix: str
) -> None:
    a, b = await upstream("a"), await upstream("b")
    members = [{"name": "a", "address": a.address}, {"name": "b", "address": b.address}]
    one, two = (
        node_settings(tmp_path / n, n, members, REDIS_URL, redis_prefix) for n in ("node-1", "node-2")
    )
    async with App(one) as first:
        first.control.set_draining("a", True)
    # The node that drained is gone; one that never saw the drain starts, and so does the first again.
    async with App(two) as second, App(one) as again:
        for app in (second, again):
            assert app.pools["default"].member("a").draining
            assert app.pools["default"].member("b").draining is False
        second.control.set_draining("a", False)
        await wait_until(lambda: not again.pools["default"].member("a").draining, timeout=SEEN_WITHIN_S)


async def test_with_redis_away_a_drain_holds_where_it_was_made_and_reaches_the_others_when_it_is_back(
    tmp_path: Path, upstream: StartUpstream, private_redis: PrivateRedis
) -> None:
    a, b = await upstream("a"), await upstream("b")
    members = [{"name": "a", "address": a.address}, {"name": "b", "address": b.address}]
    settings = [node_settings(tmp_path / n, n, members, private_redis.url, "postmux:") for n in ("n1", "n2")]
    async with nodes(settings) as apps:
        apps[0].control.set_draining("b", True)
        await wait_until(lambda: apps[1].pools["default"].member("b").draining, timeout=SEEN_WITHIN_S)

        private_redis.stop()  # a restart without persistence: Redis forgets the drain of b
        apps[0].control.set_draining("a", True)  # made while Redis is away: holds here at once
        assert apps[0].pools["default"].member("a").draining
        await wait_until(
            lambda: all(app.throttles.state == "fallback" for app in apps), timeout=SEEN_WITHIN_S
        )
        assert not apps[1].pools["default"].member("a").draining  # nothing reached the other node
        assert apps[1].pools["default"].member("b").draining  # which keeps what it knew

        private_redis.start()
        # Back: the change made while away is written, and the drain Redis lost is given back to it.
        await wait_until(lambda: apps[1].pools["default"].member("a").draining, timeout=3 * SEEN_WITHIN_S)
        for app in apps:
            assert app.pools["default"].member("b").draining
        assert {name for name, state in apps[1].control.drains.refresh().items() if state.draining} == {
            "a",
            "b",
        }


def checked(interval_s: float = 0.2) -> dict[str, Any]:
    # Passive ejection out of the way: these tests are about the active checks.
    return {
        "check": {"enabled": True, "interval": interval_s, "timeout": 0.5, "rise": 1, "fall": 1},
        "health": {"consecutive_failures": 1000},
    }


def split(tmp_path: Path, a: Upstream, b: Upstream, prefix: str, broken_on: tuple[str, ...]) -> list[Any]:
    """Three checked nodes n1-n3 with members a and b, where the nodes `broken_on` cannot reach a (their
    path to it is broken: a closed port stands for it)."""
    reachable = [{"name": "a", "address": a.address}, {"name": "b", "address": b.address}]
    broken = [{"name": "a", "address": f"127.0.0.1:{free_port()}"}, {"name": "b", "address": b.address}]
    return [
        node_settings(
            tmp_path / n, n, broken if n in broken_on else reachable, REDIS_URL, prefix, **checked()
        )
        for n in ("n1", "n2", "n3")
    ]


async def test_a_member_most_nodes_find_down_is_out_on_every_node_even_where_its_own_checks_pass(
    tmp_path: Path, upstream: StartUpstream, redis_prefix: str
) -> None:
    a, b = await upstream("a"), await upstream("b")
    settings = split(tmp_path, a, b, redis_prefix, broken_on=("n2", "n3"))
    async with nodes(settings) as apps:
        seen = watch(apps[0])
        member = apps[0].pools["default"].member("a")
        await wait_until(lambda: member.peers_down, timeout=SEEN_WITHIN_S + 2)
        assert member.check_up  # its own checks still pass
        [row] = [m for m in apps[0].control.members() if m["member"] == "a"]
        assert (row["state"], row["shared_checks"]) == ("down-by-majority", "down 2/3 nodes")
        [down] = member_events(seen, "a")
        assert down.type is EventType.MEMBER_DOWN and down.node == "n1"
        assert down.tags["reason"] == "checks failed on most nodes: down 2/3 nodes"
        await send_many(apps[0].smtp_port, [f"m{i}" for i in range(6)], concurrency=2)
        await wait_until(lambda: len(b.received) == 6)
        assert a.received == []

        await apps[2].stop()  # one of the two leaves: its verdicts go with it, 1 of 2 is no majority
        await wait_until(lambda: not member.peers_down, timeout=SEEN_WITHIN_S)
        assert member_events(seen, "a")[-1].type is EventType.MEMBER_UP
        assert member.shared_checks == "down 1/2 nodes"


async def test_one_nodes_broken_path_takes_the_member_out_on_that_node_only(
    tmp_path: Path, upstream: StartUpstream, redis_prefix: str
) -> None:
    a, b = await upstream("a"), await upstream("b")
    settings = split(tmp_path, a, b, redis_prefix, broken_on=("n3",))
    async with nodes(settings) as apps:
        members = [app.pools["default"].member("a") for app in apps]
        await wait_until(
            lambda: all(m.shared_checks == "down 1/3 nodes" for m in members), timeout=SEEN_WITHIN_S + 2
        )
        assert [m.healthy(app.clock()) for m, app in zip(members, apps, strict=True)] == [True, True, False]
        assert [m.peers_down for m in members] == [False, False, False]
        assert not members[2].check_up  # out on n3 by its own checks alone

        await a.stop()  # now a real outage: every node's checks fail
        await wait_until(
            lambda: all(not m.healthy(app.clock()) for m, app in zip(members, apps, strict=True)),
            timeout=SEEN_WITHIN_S,
        )
        await wait_until(
            lambda: all(m.shared_checks == "down 3/3 nodes" for m in members), timeout=SEEN_WITHIN_S
        )


def throttles_on(prefix: str, node: str) -> RedisThrottles:
    return RedisThrottles.from_url(REDIS_URL, prefix, timeout_s=1.0, node=instance_id(node))


async def test_a_nodes_verdicts_expire_by_redis_time_and_go_at_once_when_it_leaves(redis_prefix: str) -> None:
    one, two = throttles_on(redis_prefix, "n1"), throttles_on(redis_prefix, "n2")
    try:
        first, second = RedisHealthVerdicts(one, one.node), RedisHealthVerdicts(two, two.node)
        assert first.exchange({("p", "a"): (False, 0.4)}) == {}  # its own verdicts are not others'
        assert second.exchange({("p", "a"): (True, 30.0)}) == {("p", "a"): [False]}
        await asyncio.sleep(0.6)
        assert second.exchange({}) == {}  # n1 stopped publishing: its verdict expired
        assert first.exchange({}) == {("p", "a"): [True]}
        second.leave()
        assert first.exchange({}) == {}
    finally:
        one.close()
        two.close()


def test_of_two_changes_to_one_member_the_later_wins_on_every_node(tmp_path: Path, redis_prefix: str) -> None:
    one, two = throttles_on(redis_prefix, "n1"), throttles_on(redis_prefix, "n2")
    clock = [100.0]
    try:
        first = RedisMemberStates(one, DrainedMembers(tmp_path / "1.json"), "n1", lambda: clock[0])
        second = RedisMemberStates(two, DrainedMembers(tmp_path / "2.json"), "n2", lambda: clock[0] - 50)
        first.record("a", True)  # at 100
        second.record("a", False)  # at 50 by n2's clock: made earlier, written later
        states = second.refresh()
        assert states == {"a": OperatorState(True, "n1", 100.0)}
        assert second.load() == {"a"}
        assert json.loads((tmp_path / "2.json").read_text()) == {"drained": ["a"]}  # kept for a start
    finally:
        one.close()
        two.close()


async def test_events_in_the_log_carry_the_node_that_emitted_them(
    tmp_path: Path, upstream: StartUpstream, redis_prefix: str
) -> None:
    a = await upstream("a")
    settings = node_settings(
        tmp_path, "relay-eu-1", [{"name": "a", "address": a.address}], REDIS_URL, redis_prefix
    )
    async with App(settings) as app:
        await send_many(app.smtp_port, ["e1"])
        await wait_until(lambda: len(a.received) == 1)
    events = read_events(tmp_path / "events.jsonl")
    assert {e["type"] for e in events} >= {"Reception", "Delivery"}
    assert {e["node"] for e in events} == {"relay-eu-1"}
