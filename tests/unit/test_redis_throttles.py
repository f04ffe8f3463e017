"""RedisThrottles beyond the contract: limits shared between nodes, each node's share while Redis is away,
and the way back. Outages happen on a redis-server of the test's own (tests/redis_support.PrivateRedis),
or on a port where nothing listens, or on one that never answers; never on the machine's shared server."""

from __future__ import annotations

import math
import socket
import time

from postmux.scheduling.redis_throttles import BackendChange, RedisThrottles
from postmux.scheduling.throttles import ALLOWED, RetryAfter, Suspension
from tests.redis_support import PrivateRedis, private_redis
from tests.support import free_port

__all__ = ["private_redis"]  # the fixture, used by name


class Wall:
    """The fallback's own clock (when to try Redis again), moved by hand."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def node(url: str, wall: Wall, changes: list[BackendChange]) -> RedisThrottles:
    return RedisThrottles.from_url(url, "t:", timeout_s=0.5, wall=wall, on_change=changes.append)


def test_nodes_share_one_rate_and_one_set_of_connection_slots(private_redis: PrivateRedis) -> None:
    wall, changes = Wall(), list[BackendChange]()
    a, b = node(private_redis.url, wall, changes), node(private_redis.url, wall, changes)
    now = time.time()
    assert [a.rate("k", 1.0, 4, now) for _ in range(2)] == [ALLOWED, ALLOWED]
    assert [b.rate("k", 1.0, 4, now) for _ in range(2)] == [ALLOWED, ALLOWED]
    turn = a.rate("k", 1.0, 4, now)
    assert isinstance(turn, RetryAfter) and 0.5 < turn.seconds <= 1.0  # Redis's clock: about a second
    assert a.lease("c", 2, 60.0, now) is not None and b.lease("c", 2, 60.0, now) is not None
    assert a.lease("c", 2, 60.0, now) is None and b.leases_held("c", now) == 2
    assert a.suspend("s", now + 900.0, "421 4.7.28") and b.suspended("s", now) == Suspension(
        now + 900.0, "421 4.7.28"
    )
    assert changes == [] and a.state == b.state == "redis"
    for n in (a, b):
        n.close()


def test_while_redis_is_away_a_node_keeps_its_share_and_rejoins_when_it_answers(
    private_redis: PrivateRedis,
) -> None:
    wall, changes = Wall(), list[BackendChange]()
    a, b, c = (node(private_redis.url, wall, changes) for _ in range(3))
    assert [n.beat() for n in (a, b, c, a)] == [1, 2, 3, 3]  # each counts those that beat before it
    now = time.time()
    held = a.lease("c", 6, 60.0, now)
    assert held is not None and held.id > 0
    a.suspend("s", now + 900.0, "421 4.7.28 unusual rate")

    private_redis.stop()
    # A third of each limit: 3/s -> 1/s with a burst of 3 -> 1; 6 connections -> 2, one held already
    # in Redis (its attempt runs on) is not counted by the local share.
    assert a.rate("k", 3.0, 3, now) == ALLOWED
    assert changes == [BackendChange("fallback", changes[0].reason, 3)] and a.state == "fallback"
    assert "ConnectionError" in changes[0].reason
    assert a.rate("k", 3.0, 3, now) == RetryAfter(1.0)
    local = [a.lease("c", 6, 60.0, now) for _ in range(3)]
    assert local[2] is None and all(lease is not None and lease.id < 0 for lease in local[:2])
    assert a.leases_held("c", now) >= 6  # full, measured against the whole limit
    assert a.suspended("s", now) == Suspension(now + 900.0, "421 4.7.28 unusual rate")  # kept through
    assert a.renew(held, 60.0, now) == held  # kept as it was until Redis answers
    a.release(held)  # released when Redis is back

    private_redis.start()
    assert a.rate("k", 3.0, 3, now) == RetryAfter(1.0)  # not tried again before its second is up
    wall.t += 1.0
    assert a.rate("k", 3.0, 3, now) == ALLOWED  # Redis again (restarted empty: a fresh burst)
    assert [ch.state for ch in changes] == ["fallback", "redis"] and a.state == "redis"
    assert a.lease("c", 1, 60.0, now) is not None and b.lease("c", 1, 60.0, now) is None  # shared again
    for lease in local[:2]:
        assert lease is not None
        a.release(lease)  # a local lease goes back to the local store, whatever the state
    for n in (a, b, c):
        n.close()


def test_a_restarted_redis_does_not_make_the_first_node_back_count_itself_alone(
    private_redis: PrivateRedis,
) -> None:
    """Redis comes back empty: the node beating there first would count 1, and if Redis went away again
    before the others beat, its share would be the whole limit. A lower count is believed node_ttl_s
    after the rejoin, when every live node has beaten again."""
    wall, changes = Wall(), list[BackendChange]()
    a, b, c = (node(private_redis.url, wall, changes) for _ in range(3))
    assert [n.beat() for n in (a, b, c, a, b)] == [1, 2, 3, 3, 3]
    private_redis.stop()
    assert a.beat() == 3 and a.state == "fallback"
    private_redis.start()
    assert a.beat() == 3 and a.state == "redis"  # counted alone there, and not believed
    private_redis.stop()
    now = time.time()
    assert [a.rate("k", 3.0, 3, now) for _ in range(2)] == [ALLOWED, RetryAfter(1.0)]  # still a third
    private_redis.start()
    wall.t += 1.0
    assert a.beat() == 3 and a.state == "redis"
    wall.t += a.node_ttl_s
    assert a.beat() == 1  # b and c have not beaten in node_ttl_s: gone
    for n in (a, b, c):
        n.close()


def test_a_lease_from_before_a_redis_restart_never_frees_another_nodes_slot(
    private_redis: PrivateRedis,
) -> None:
    """A restarted Redis counts lease ids from 1 again: a's lease from before (id 1) and b's new one (id 1
    too) must stay two leases, so a's late release does not give back the slot b holds."""
    wall, changes = Wall(), list[BackendChange]()
    a, b = (node(private_redis.url, wall, changes) for _ in range(2))
    now = time.time()
    before = a.lease("k", 2, 30.0, now)
    assert before is not None and before.id > 0
    private_redis.stop()
    private_redis.start()  # empty, its id counter too
    after = b.lease("k", 2, 30.0, now)
    assert after is not None and after.id == before.id
    wall.t += a.retry_s  # a has not noticed the restart: its release goes straight to Redis
    a.release(before)
    assert b.leases_held("k", now) == 1
    assert a.renew(before, 30.0, now) is None  # gone with the restart: not b's lease renewed
    assert b.renew(after, 30.0, now) is not None
    for n in (a, b):
        n.close()


def test_a_node_that_never_reached_redis_counts_itself_alone() -> None:
    wall, changes = Wall(), list[BackendChange]()
    lone = node(f"redis://127.0.0.1:{free_port()}/0", wall, changes)
    assert lone.beat() == 1 and lone.state == "fallback"
    now = time.time()
    assert [lone.rate("k", 2.0, 2, now) for _ in range(3)] == [ALLOWED, ALLOWED, RetryAfter(0.5)]
    assert lone.rate("k", 2.0, 2, now, take=3) == RetryAfter(math.inf)
    assert [ch.state for ch in changes] == ["fallback"]
    lone.close()


def test_a_redis_that_never_answers_costs_one_timeout_then_nothing_until_the_retry() -> None:
    wall, changes = Wall(), list[BackendChange]()
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        stuck = RedisThrottles.from_url(
            f"redis://127.0.0.1:{silent.getsockname()[1]}/0",
            timeout_s=0.1,
            wall=wall,
            on_change=changes.append,
        )
        started = time.monotonic()
        assert stuck.rate("k", 2.0, 1, time.time()) == ALLOWED
        first = time.monotonic() - started
        started = time.monotonic()
        for _ in range(100):
            stuck.rate("k", 2.0, 1, time.time())
        rest = time.monotonic() - started
        stuck.close()
    assert 0.09 <= first < 1.0 and rest < 0.05
    assert [ch.state for ch in changes] == ["fallback"] and "Timeout" in changes[0].reason
