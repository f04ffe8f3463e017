"""A Redis that answers with an error reply, not only one that cannot be reached, makes the throttles fall
back to this node's share and come back when it answers normally (review outage.md item 4): OOM under
`noeviction`, READONLY after a failover, BUSY behind another client's script, WRONGTYPE on a key of ours.
NOSCRIPT (the script cache emptied) is no failure at all: the script is loaded again in the same call.

Every error is a real reply of a redis-server of the test's own (tests/redis_support.PrivateRedis), never
of the machine's shared server, which is not reconfigured here.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis

from postmux.admin.member_states import DrainedMembers, RedisMemberStates
from postmux.scheduling.redis_health import RedisHealthVerdicts
from postmux.scheduling.redis_throttles import BackendChange, RedisThrottles, RedisWarmupCounts
from postmux.scheduling.throttles import ALLOWED, RetryAfter, Suspension
from tests.redis_support import PrivateRedis, private_redis
from tests.support import free_port
from tests.unit.test_redis_throttles import Wall, node

__all__ = ["private_redis"]  # the fixture, used by name


def admin(server: PrivateRedis) -> redis.Redis:
    return redis.Redis(port=server.port, socket_timeout=5.0, socket_connect_timeout=5.0)


@dataclass
class Failure:
    """One way a running Redis refuses our scripts: `start` makes it so, `end` makes it answer again."""

    name: str
    code: str  # the error's class as redis-py names it, found in the fallback's reason
    start: Callable[[redis.Redis], None]
    end: Callable[[redis.Redis], None]


def _full(r: redis.Redis) -> None:
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", "1")  # any write is over it: OOM command not allowed ...


def _not_full(r: redis.Redis) -> None:
    r.config_set("maxmemory", "0")


def _demoted(r: redis.Redis) -> None:
    # A master turned replica (what a failover does to the old one): writes get READONLY. Its master is a
    # loopback port nothing listens on, so no sync ever replaces what it holds.
    r.replicaof("127.0.0.1", str(free_port()))


def _promoted(r: redis.Redis) -> None:
    r.replicaof("NO", "ONE")


class _Busy:
    """Another client's script that never ends: after busy-reply-threshold every other command is
    refused with BUSY until SCRIPT KILL."""

    def __init__(self) -> None:
        self.thread: threading.Thread | None = None

    def start(self, r: redis.Redis) -> None:
        r.config_set("busy-reply-threshold", "20")
        port = r.connection_pool.connection_kwargs["port"]

        def spin() -> None:
            blocker = redis.Redis(port=port, socket_timeout=30.0)
            with contextlib.suppress(redis.exceptions.ResponseError):  # killed: what we wait for
                blocker.eval("while true do end", 0)
            blocker.close()

        self.thread = threading.Thread(target=spin, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 5.0
        while True:  # until Redis says BUSY to others
            try:
                r.ping()
            except redis.exceptions.ResponseError as e:
                assert "BUSY" in str(e)
                return
            assert time.monotonic() < deadline, "the blocking script never made Redis busy"
            time.sleep(0.01)

    def end(self, r: redis.Redis) -> None:
        r.script_kill()
        assert self.thread is not None
        self.thread.join(timeout=5.0)


_busy = _Busy()

FAILURES = [
    Failure("oom", "OutOfMemoryError", _full, _not_full),
    Failure("readonly", "ReadOnlyError", _demoted, _promoted),
    Failure("busy", "ResponseError", _busy.start, _busy.end),
]


@pytest.fixture(params=FAILURES, ids=lambda f: f.name)
def failure(request: pytest.FixtureRequest) -> Failure:
    return request.param  # type: ignore[no-any-return]


@contextlib.contextmanager
def failing(server: PrivateRedis, failure: Failure) -> Iterator[redis.Redis]:
    r = admin(server)
    failure.start(r)
    try:
        yield r
    finally:
        with contextlib.suppress(redis.exceptions.RedisError):  # ended already by the test
            failure.end(r)
        r.close()


def test_an_error_reply_falls_back_to_the_nodes_share_and_redis_is_rejoined_when_it_answers(
    private_redis: PrivateRedis, failure: Failure
) -> None:
    wall, changes = Wall(), list[BackendChange]()
    a, b = node(private_redis.url, wall, changes), node(private_redis.url, wall, changes)
    assert [a.beat(), b.beat(), a.beat()] == [1, 2, 2]
    now = time.time()
    held = a.lease("c", 4, 60.0, now)
    assert held is not None and held.id > 0
    a.suspend("s", now + 900.0, "421 4.7.28 unusual rate")

    with failing(private_redis, failure) as r:
        # Half of each limit (two nodes counted): 2/s -> 1/s, a burst of 2 -> 1, 4 connections -> 2.
        assert a.rate("k", 2.0, 2, now) == ALLOWED
        assert a.state == "fallback" and changes == [BackendChange("fallback", changes[0].reason, 2)]
        assert failure.code in changes[0].reason
        assert a.rate("k", 2.0, 2, now) == RetryAfter(1.0)  # the local share, not Redis's burst of 2
        local = a.lease("c", 4, 60.0, now)
        assert local is not None and local.id < 0
        assert a.suspended("s", now) == Suspension(now + 900.0, "421 4.7.28 unusual rate")
        assert a.renew(held, 60.0, now) == held  # kept as it was
        a.release(held)  # released once Redis answers again
        wall.t += a.retry_s  # every call below is tried on Redis, and each fails the same way
        assert a.beat() == 2
        assert a.suspend("s2", now + 60.0, "421") and a.suspensions(["s", "s2"], now).keys() == {"s", "s2"}
        a.lift("s2")
        assert a.leases_held("c", now) >= 1
        assert a.state == "fallback" and len(changes) == 1  # said once
        failure.end(r)

    assert a.rate("k", 2.0, 2, now) == RetryAfter(1.0)  # not tried again before retry_s is up
    wall.t += a.retry_s
    assert a.beat() == 2 and a.state == "redis"
    assert [c.state for c in changes] == ["fallback", "redis"]
    assert b.leases_held("c", now) == 0  # the lease released while away is gone from Redis too
    assert a.rate("k", 2.0, 2, now) == ALLOWED  # Redis's cell again
    for n in (a, b):
        n.close()


def test_a_key_of_the_wrong_type_falls_back_rather_than_raise(private_redis: PrivateRedis) -> None:
    """WRONGTYPE: a key under our prefix written by hand. The call falls back; the next normal answer
    (the beat, another key) brings the node back."""
    wall, changes = Wall(), list[BackendChange]()
    a = node(private_redis.url, wall, changes)
    r = admin(private_redis)
    r.set("t:rate:k", "not a hash")
    now = time.time()
    assert a.rate("k", 1.0, 1, now) == ALLOWED
    assert a.state == "fallback" and "WRONGTYPE" in changes[0].reason
    wall.t += a.retry_s
    assert a.beat() == 1 and a.state == "redis"
    a.close()
    r.close()


def test_the_neighbours_of_the_throttles_fall_back_with_them(
    private_redis: PrivateRedis, tmp_path: Path
) -> None:
    """The health exchange, the shared member states and the warm-up counts use the throttles' call: an
    error reply is "Redis away" for them too (each goes by what it knows), never an exception."""
    wall, changes = Wall(), list[BackendChange]()
    a = node(private_redis.url, wall, changes)
    verdicts = RedisHealthVerdicts(a, "node-a")
    states = RedisMemberStates(a, DrainedMembers(tmp_path / "drained.json"), "node-a")
    warmup = RedisWarmupCounts(a)
    assert verdicts.exchange({("p", "m"): (True, 30.0)}) == {}
    assert states.refresh() == {}
    with failing(private_redis, FAILURES[0]):
        assert verdicts.exchange({("p", "m"): (True, 30.0)}) is None
        wall.t += a.retry_s
        states.record("m", True)  # a write refused: held on this node, written when Redis is back
        assert states.refresh() is None
        verdicts.leave()
    assert a.state == "fallback" and len(changes) == 1
    wall.t += a.retry_s
    shared = states.refresh()
    assert shared is not None and shared["m"].draining and a.state == "redis"
    assert warmup.add(datetime.now(UTC).date(), {"p/m/dest": 3}) == {"p/m/dest": 3}
    a.close()


def test_a_script_flushed_from_redis_is_loaded_again_in_the_same_call(private_redis: PrivateRedis) -> None:
    """NOSCRIPT after SCRIPT FLUSH (or a restart): every script runs on Redis at once, no fallback."""
    wall, changes = Wall(), list[BackendChange]()
    a, b = node(private_redis.url, wall, changes), node(private_redis.url, wall, changes)
    now = time.time()
    assert a.rate("k", 1.0, 1, now) == ALLOWED
    r = admin(private_redis)
    r.script_flush()
    turn = b.rate("k", 1.0, 1, now)  # Redis's cell, shared: a took the only turn
    assert isinstance(turn, RetryAfter) and 0.5 < turn.seconds <= 1.0
    r.script_flush()
    assert b.beat() == 1 and a.lease("c", 1, 30.0, now) is not None and b.lease("c", 1, 30.0, now) is None
    assert changes == [] and a.state == b.state == "redis"
    for n in (a, b):
        n.close()
    r.close()


async def test_the_heartbeat_lives_through_an_error_reply(private_redis: PrivateRedis) -> None:
    """The heartbeat task beat once and died on OutOfMemoryError (review item 4); it goes on, and this node
    is counted again once Redis has room."""
    changes = list[BackendChange]()
    a = RedisThrottles.from_url(
        private_redis.url, "t:", timeout_s=0.5, on_change=changes.append, heartbeat_s=0.05, retry_s=0.05
    )
    beating = asyncio.create_task(a.run_heartbeat())
    try:
        with failing(private_redis, FAILURES[0]) as r:
            r.delete("t:nodes")
            deadline = time.monotonic() + 5.0
            while a.state != "fallback":
                assert not beating.done() and time.monotonic() < deadline
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.2)  # a few beats on a full Redis
            assert not beating.done()
        deadline = time.monotonic() + 5.0
        check = admin(private_redis)
        while a.state != "redis" or check.zcard("t:nodes") != 1:
            assert not beating.done() and time.monotonic() < deadline
            await asyncio.sleep(0.02)
        check.close()
    finally:
        beating.cancel()
        await asyncio.gather(beating, return_exceptions=True)
        a.close()
