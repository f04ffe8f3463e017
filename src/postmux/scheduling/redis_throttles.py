"""Throttles shared by several nodes through Redis, with each node's share of every limit while it is away.

The contract is scheduling/throttles.py's, unchanged; each call is one Lua script run by EVALSHA (redis-py's
`Script` loads it again after a restart has emptied Redis's script cache), so a decision reads and writes a
key at once whatever other nodes do meanwhile. The store's clock is Redis's TIME, so nodes whose clocks
differ still agree on every rate's turn and every lease's expiry; answers that are waits are relative and
the caller's own clock places them (a lease's `expires_at` is the caller's `now` + its time to live).

- rate: GCRA, a hash {tat, interval} per key (redis-cell's and KumoMTA's model), expiring at its TAT.
- leases: a sorted set per key of lease id -> expiry; the expired are dropped on each call, so a node
  that died stops holding its slots `LEASE_TTL_S` after its last renewal. Ids come from one counter; a
  lease's member in the set is "<node>#<id>", so when a restarted (empty) Redis counts from 1 again, a
  lease granted before the restart can never be taken for another node's new one (renewed or released
  in its place).
- suspensions: a hash {until, reason} per key, expiring at `until`.

Numbers cross the Lua boundary as "%.17g" strings: Redis turns a Lua number into a reply by truncating it
to an integer, and into an argument with "%.14g", and either would make a retry-after inexact.

The calls are synchronous, as the dispatcher's gate asks them within one pass of its loop. On loopback a
script costs about 80-110 us of the event loop, and the same script awaited on redis-py's asyncio client
150-180 us (bench/throttles_redis.py; bench/README.md), so the client is redis-py's synchronous one with a
short timeout, not an asynchronous client behind a local view that would let every node overshoot by
what it sends between refreshes.

When Redis fails a call in any way, the node falls back to `MemoryThrottles` with
its share of each limit: a rate of per_s / live nodes, a burst and a connection limit of limit // live
nodes (at least one: a node must still be able to send). Live nodes are counted from a heartbeat: each
node's id in a sorted set scored by its last beat, every `heartbeat_s`, and those not heard from in
`node_ttl_s` left out. Once fallen back, the node tries Redis again on its next beat, or on the first call
`retry_s` after the last try, and goes back to it when it answers. Each change is told to `on_change`
(the App makes it a log line, a ThrottlesBackendChanged event and the postmux_throttles_backend gauge).

"Fails in any way" is every error redis-py raises, not only a lost connection: a Redis that answers with
an error reply cannot keep the shared limits either, and an error let out of these calls would kill the
loop that asked (the dispatcher's, the heartbeat, the member sharing) while the node went on accepting.
So an unreachable or frozen server (refused, timed out), one starting up (LOADING), one full under
`noeviction` (OOM), a replica or a master demoted by a failover (READONLY), one that cannot persist
(MISCONF), one blocked by another client's script (BUSY), one refusing this user (NOAUTH, NOPERM) and a
key of ours holding another type (WRONGTYPE: written by hand) all fall back the same way, the error named
in the change's reason. A script missing from Redis's cache (NOSCRIPT: a restart, a SCRIPT FLUSH) is not
a failure: redis-py's `Script` loads it again and runs it in the same call; only if that fails too does
the node fall back.

While away: leases granted locally carry negative ids, so they are never confused with Redis's; a Redis
lease that could not be released is released when Redis is back (else its slot would be held for the
rest of its time to live), and one that could not be renewed is kept as it was until it expires.
Suspensions seen or set through Redis are kept in the local store too, so they hold through an outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import date
from typing import Any, Final, Literal

import redis
import redis.exceptions
from redis.backoff import NoBackoff
from redis.commands.core import Script
from redis.retry import Retry

from postmux.config import ThrottlesSettings
from postmux.node import instance_id
from postmux.scheduling.throttles import (
    ALLOWED,
    Allowed,
    Lease,
    MemoryThrottles,
    RetryAfter,
    Suspension,
    Throttles,
)

Clock = Literal["store", "caller"]

# The errors that mean "Redis is not keeping the shared limits now": every one redis-py raises (a lost
# connection, a timeout, an error reply: see the module's docstring) and the socket's own. The node falls
# back on each; none may reach the caller, as the callers are long-lived loops.
_FAILED: Final = (redis.exceptions.RedisError, OSError)

# Shared by every script: the clock ('' = Redis TIME), numbers as exact strings, a key's expiry kept at
# least as long as its state lasts (keys are only ever given longer lives, never cut short).
_PRELUDE = """
local function clock(arg)
  if arg == '' then
    local t = redis.call('TIME')
    return tonumber(t[1]) + tonumber(t[2]) / 1000000
  end
  return tonumber(arg)
end
local function exact(x) return string.format('%.17g', x) end
local function keep(key, seconds)
  local ms = math.ceil(seconds * 1000) + 1000
  if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
end
"""

# KEYS: cell. ARGV: now, interval, burst, take. '' when allowed, else the wait in seconds.
_RATE = (
    _PRELUDE
    + """
local now, interval = clock(ARGV[1]), tonumber(ARGV[2])
local burst, take = tonumber(ARGV[3]), tonumber(ARGV[4])
local cell = redis.call('HMGET', KEYS[1], 'tat', 'interval')
local tat = now
if cell[1] then
  local old_tat, old_interval = tonumber(cell[1]), tonumber(cell[2])
  if old_tat > now then
    tat = old_tat
    if old_interval ~= interval then
      -- A new rate: the same number of messages owed, each at the new interval.
      tat = now + (tat - now) * (interval / old_interval)
      redis.call('HSET', KEYS[1], 'tat', exact(tat), 'interval', exact(interval))
    end
  end
end
local turns = take > 0 and take or 1
if turns > burst then return 'inf' end
local wait = tat + (turns - burst) * interval - now
if wait > 0 then return exact(wait) end
if take > 0 then
  tat = tat + take * interval
  redis.call('HSET', KEYS[1], 'tat', exact(tat), 'interval', exact(interval))
  keep(KEYS[1], tat - now)
end
return ''
"""
)

# KEYS: lease set, id counter. ARGV: now, limit, ttl, node. The lease's id; false at the limit.
_LEASE = (
    _PRELUDE
    + """
local now, limit, ttl = clock(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', exact(now))
if redis.call('ZCARD', KEYS[1]) >= limit then return false end
local id = redis.call('INCR', KEYS[2])
redis.call('ZADD', KEYS[1], exact(now + ttl), ARGV[4] .. '#' .. id)
keep(KEYS[1], ttl)
return id
"""
)

# KEYS: lease set. ARGV: now, id, ttl. 1 if renewed, false if the lease is gone.
_RENEW = (
    _PRELUDE
    + """
local now, ttl = clock(ARGV[1]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', exact(now))
if not redis.call('ZSCORE', KEYS[1], ARGV[2]) then return false end
redis.call('ZADD', KEYS[1], 'XX', exact(now + ttl), ARGV[2])
keep(KEYS[1], ttl)
return 1
"""
)

# KEYS: lease set. ARGV: now. Live leases.
_HELD = (
    _PRELUDE
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', exact(clock(ARGV[1])))
return redis.call('ZCARD', KEYS[1])
"""
)

# KEYS: suspension. ARGV: until, reason, clock. 1 if set; 0 if one as long or longer is in force.
_SUSPEND = (
    _PRELUDE
    + """
local current = redis.call('HGET', KEYS[1], 'until')
if current and tonumber(current) >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'until', ARGV[1], 'reason', ARGV[2])
if ARGV[3] == '' then
  keep(KEYS[1], math.max(0, tonumber(ARGV[1]) - clock('')))
else
  keep(KEYS[1], 86400)  -- the caller's clock (tests) says nothing of Redis's: keep it a day
end
return 1
"""
)

# KEYS: suspension. ARGV: now. {until, reason} in force, or false.
_SUSPENDED = (
    _PRELUDE
    + """
local s = redis.call('HMGET', KEYS[1], 'until', 'reason')
if s[1] and clock(ARGV[1]) < tonumber(s[1]) then return s end
return false
"""
)

# KEYS: suspensions. ARGV: now. For each in force: its index (from 1), until, reason.
_SUSPENSIONS = (
    _PRELUDE
    + """
local now, found = clock(ARGV[1]), {}
for i, key in ipairs(KEYS) do
  local s = redis.call('HMGET', key, 'until', 'reason')
  if s[1] and now < tonumber(s[1]) then
    found[#found + 1] = i
    found[#found + 1] = s[1]
    found[#found + 1] = s[2]
  end
end
return found
"""
)

# KEYS: the node set. ARGV: node id, node ttl. How many nodes have beaten within the ttl, this one included.
_BEAT = (
    _PRELUDE
    + """
local now, ttl = clock(''), tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], exact(now), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', exact(now - ttl))
keep(KEYS[1], ttl)
return redis.call('ZCARD', KEYS[1])
"""
)

# KEYS: the day's hash. ARGV: ttl, then key, delta pairs. Every count of the day after the deltas.
_WARMUP_ADD = """
for i = 2, #ARGV, 2 do redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) end
if #ARGV > 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return redis.call('HGETALL', KEYS[1])
"""
_WARMUP_KEEP_S = 8 * 86400  # a week of past days to look at, as the other stores keep (warmup._KEEP_DAYS)


@dataclass(frozen=True, slots=True)
class BackendChange:
    """The node went over to its local share ("fallback") or back to the shared store ("redis")."""

    state: Literal["redis", "fallback"]
    reason: str
    live_nodes: int


class RedisThrottles:
    """Throttles in Redis, shared by every node that uses the same server and prefix.

    `clock="store"` takes every time from Redis (the nodes' `now` is ignored); `clock="caller"` takes the
    caller's `now`, for tests on a manual clock (the contract suite). Cost: one round trip per call, and
    a beat every `heartbeat_s` (`beat`, run by the owner's loop: see `run_heartbeat`).
    """

    def __init__(
        self,
        client: redis.Redis,
        prefix: str = "postmux:",
        *,
        clock: Clock = "store",
        node: str | None = None,
        on_change: Callable[[BackendChange], None] | None = None,
        heartbeat_s: float = 2.0,
        node_ttl_s: float = 10.0,
        retry_s: float = 1.0,
        wall: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.prefix = prefix
        # This process in the heartbeat set (postmux/node.py): the App gives its [node] name's instance.
        self.node = node or instance_id(socket.gethostname())
        self.heartbeat_s, self.node_ttl_s, self.retry_s = heartbeat_s, node_ttl_s, retry_s
        self._caller_clock = clock == "caller"
        self._on_change = on_change or (lambda change: None)
        self._wall = wall
        self._rate, self._lease, self._renew, self._held = (
            client.register_script(s) for s in (_RATE, _LEASE, _RENEW, _HELD)
        )
        self._suspend, self._suspended, self._suspensions, self._beat = (
            client.register_script(s) for s in (_SUSPEND, _SUSPENDED, _SUSPENSIONS, _BEAT)
        )
        self._ids_key = f"{prefix}lease-ids"
        self._nodes_key = f"{prefix}nodes"
        self.local = MemoryThrottles()  # the fallback, and the suspensions kept for it
        self.live_nodes = 1  # as last counted; a node that never reached Redis counts itself alone
        self.fallen_back = False
        self._next_try = -math.inf
        self._rejoined_at = -math.inf
        self._unreleased: list[Lease] = []
        self._limits: dict[str, int] = {}  # each lease key's limit as last asked: its local share

    @classmethod
    def from_url(
        cls, url: str, prefix: str = "postmux:", *, timeout_s: float = 0.1, **kwargs: Any
    ) -> RedisThrottles:
        """A client that gives up after `timeout_s` (connecting or waiting for a reply) and does not retry:
        a call that blocks the event loop must fail fast, and the fallback is the retry."""
        client = redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        return cls(client, prefix, **kwargs)

    @property
    def state(self) -> Literal["redis", "fallback"]:
        return "fallback" if self.fallen_back else "redis"

    # -- the round trip and the fallback -------------------------------------------------------------

    def _now(self, now: float) -> str:
        return repr(now) if self._caller_clock else ""

    def _ask(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        """The script's answer; raises _Away if Redis is not being used now (fallen back, or failing)."""
        if self.fallen_back and self._wall() < self._next_try:
            raise _Away
        try:
            answer = script(keys=keys, args=args)
        except _FAILED as e:
            self._fall_back(e)
            raise _Away from e
        if self.fallen_back:
            self._rejoin()
        return answer

    def _fall_back(self, error: BaseException) -> None:
        self._next_try = self._wall() + self.retry_s
        if not self.fallen_back:
            self.fallen_back = True
            reason = f"{type(error).__name__}: {error}"
            self._on_change(BackendChange("fallback", reason, self.live_nodes))

    def _rejoin(self) -> None:
        self.fallen_back = False
        self._rejoined_at = self._wall()
        unreleased, self._unreleased = self._unreleased, []
        for lease in unreleased:
            self.release(lease)
        self._on_change(BackendChange("redis", "Redis answers again", self.live_nodes))

    def _share(self, limit: int) -> int:
        return max(1, limit // self.live_nodes)

    def beat(self) -> int:
        """Say this node is alive and count the live nodes (and try Redis again, if fallen back)."""
        self._next_try = -math.inf
        with contextlib.suppress(_Away):
            counted = max(1, int(self._ask(self._beat, [self._nodes_key], [self.node, self.node_ttl_s])))
            if self._wall() < self._rejoined_at + self.node_ttl_s:
                # A Redis back from an outage may be a restarted one, empty: until every node has had time
                # to beat there, a lower count is not believed (it would be this node's share if Redis
                # went away again: the whole limit, counted alone).
                counted = max(counted, self.live_nodes)
            self.live_nodes = counted
        return self.live_nodes

    def leave(self) -> None:
        """Take this node out of the count now (a clean stop), rather than after `node_ttl_s`."""
        with contextlib.suppress(*_FAILED):
            self.client.zrem(self._nodes_key, self.node)

    def close(self) -> None:
        self.client.close()

    async def run_heartbeat(self) -> None:
        """Beat every `heartbeat_s` until cancelled (the App owns the task)."""
        while True:
            self.beat()
            await asyncio.sleep(self.heartbeat_s)

    def call(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        """One script on the shared store for a neighbour of the throttles (shared member states and
        health verdicts), with the throttles' fallback: raises RedisAway while they are fallen back or
        when Redis does not answer, and a call that answers brings them back."""
        try:
            return self._ask(script, keys, args)
        except _Away as e:
            raise RedisAway(f"Redis is not answering ({self.state})") from e

    # -- rate (GCRA) ---------------------------------------------------------------------------------

    def rate(self, key: str, per_s: float, burst: int, now: float, take: int = 1) -> Allowed | RetryAfter:
        try:
            wait = self._ask(
                self._rate, [f"{self.prefix}rate:{key}"], [self._now(now), repr(1.0 / per_s), burst, take]
            )
        except _Away:
            return self.local.rate(key, per_s / self.live_nodes, self._share(burst), now, take)
        return ALLOWED if wait == b"" else RetryAfter(float(wait))

    # -- connection leases ---------------------------------------------------------------------------

    def lease(self, key: str, limit: int, ttl_s: float, now: float) -> Lease | None:
        self._limits[key] = limit
        try:
            keys = [f"{self.prefix}lease:{key}", self._ids_key]
            lease_id = self._ask(self._lease, keys, [self._now(now), limit, repr(ttl_s), self.node])
        except _Away:
            local = self.local.lease(key, self._share(limit), ttl_s, now)
            return None if local is None else Lease(key, -local.id, local.expires_at)
        return None if lease_id is None else Lease(key, int(lease_id), now + ttl_s)

    def renew(self, lease: Lease, ttl_s: float, now: float) -> Lease | None:
        if lease.id < 0:
            local = self.local.renew(Lease(lease.key, -lease.id, lease.expires_at), ttl_s, now)
            return None if local is None else Lease(lease.key, lease.id, local.expires_at)
        try:
            renewed = self._ask(
                self._renew,
                [f"{self.prefix}lease:{lease.key}"],
                [self._now(now), self._member(lease), repr(ttl_s)],
            )
        except _Away:
            return lease if lease.expires_at > now else None  # renewed when Redis is back, if still alive
        return None if renewed is None else Lease(lease.key, lease.id, now + ttl_s)

    def release(self, lease: Lease) -> None:
        if lease.id < 0:
            self.local.release(Lease(lease.key, -lease.id, lease.expires_at))
            return
        if self.fallen_back and self._wall() < self._next_try:
            self._unreleased.append(lease)
            return
        try:
            self.client.zrem(f"{self.prefix}lease:{lease.key}", self._member(lease))
        except _FAILED as e:
            self._unreleased.append(lease)
            self._fall_back(e)

    def _member(self, lease: Lease) -> str:
        """The lease's name in its set: this node's id with it (see the module's docstring)."""
        return f"{self.node}#{lease.id}"

    def leases_held(self, key: str, now: float) -> int:
        try:
            return int(self._ask(self._held, [f"{self.prefix}lease:{key}"], [self._now(now)]))
        except _Away:
            # The caller measures the answer against the whole limit: a node whose share is taken says full.
            held, limit = self.local.leases_held(key, now), self._limits.get(key)
            return max(held, limit) if limit is not None and held >= self._share(limit) else held

    # -- suspensions ---------------------------------------------------------------------------------

    def suspend(self, key: str, until: float, reason: str) -> bool:
        self.local.suspend(key, until, reason)  # kept through an outage
        try:
            args = [repr(until), reason, self._now(0.0)]
            return bool(self._ask(self._suspend, [f"{self.prefix}suspend:{key}"], args))
        except _Away:
            return True

    def suspended(self, key: str, now: float) -> Suspension | None:
        try:
            answer = self._ask(self._suspended, [f"{self.prefix}suspend:{key}"], [self._now(now)])
        except _Away:
            return self.local.suspended(key, now)
        if answer is None:
            return None
        suspension = Suspension(float(answer[0]), answer[1].decode())
        if self.local.suspended(key, now) != suspension:
            self.local.lift(key)
            self.local.suspend(key, suspension.until, suspension.reason)
        return suspension

    def suspensions(self, keys: Collection[str], now: float) -> dict[str, Suspension]:
        if not keys:
            return {}
        ordered = list(keys)
        try:
            flat = self._ask(
                self._suspensions, [f"{self.prefix}suspend:{k}" for k in ordered], [self._now(now)]
            )
        except _Away:
            return self.local.suspensions(ordered, now)
        found = {}
        for i in range(0, len(flat), 3):
            key, suspension = ordered[int(flat[i]) - 1], Suspension(float(flat[i + 1]), flat[i + 2].decode())
            found[key] = suspension
            if self.local.suspended(key, now) != suspension:  # kept for an outage, as `suspended` does
                self.local.lift(key)
                self.local.suspend(key, suspension.until, suspension.reason)
        return found

    def lift(self, key: str) -> None:
        self.local.lift(key)
        if self.fallen_back and self._wall() < self._next_try:
            return
        try:
            self.client.delete(f"{self.prefix}suspend:{key}")
        except _FAILED as e:
            self._fall_back(e)


class RedisAway(Exception):
    """Redis is not being used now (the throttles are fallen back): keep what was last known."""


class WarmupCountsAway(Exception):
    """Redis is not answering: the warm-up ledger keeps its counts for its next flush."""


class RedisWarmupCounts:
    """The warm-up counts (scheduling/warmup.py) in Redis beside the throttles, so every node's messages
    count toward one daily cap: a hash per UTC day, `{prefix}warmup:{day}`, kept a week.

    Shares the throttles' client and their fallback: while they are fallen back no call is tried (the
    ledger keeps what it counted and flushes it when Redis is back); each node then goes by the totals
    it last saw plus its own counts.
    """

    def __init__(self, throttles: RedisThrottles) -> None:
        self.throttles = throttles
        self._add = throttles.client.register_script(_WARMUP_ADD)

    def load(self, day: date) -> dict[str, int]:
        return self.add(day, {})

    def add(self, day: date, deltas: Mapping[str, int]) -> dict[str, int]:
        args: list[Any] = [_WARMUP_KEEP_S]
        for key, n in deltas.items():
            args += [key, n]
        try:
            flat = self.throttles._ask(self._add, [f"{self.throttles.prefix}warmup:{day.isoformat()}"], args)
        except _Away as e:
            raise WarmupCountsAway(f"Redis is not answering ({self.throttles.state})") from e
        return {flat[i].decode(): int(flat[i + 1]) for i in range(0, len(flat), 2)}


def make_throttles(
    settings: ThrottlesSettings,
    on_change: Callable[[BackendChange], None] | None = None,
    node: str | None = None,
) -> Throttles:
    """[throttles]: this process's memory, or Redis (connected lazily: the first call or beat connects).
    `node`: this process's id in the heartbeat set (postmux.node.instance_id); None: host:PID:random."""
    if settings.backend == "memory":
        return MemoryThrottles()
    return RedisThrottles.from_url(
        settings.url, settings.prefix, timeout_s=settings.timeout, on_change=on_change, node=node
    )


class _Away(Exception):
    """Redis is not being used for this call: answer from the local share."""
