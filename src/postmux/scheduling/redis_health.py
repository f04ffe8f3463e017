"""Active health verdicts shared through Redis, beside the throttles: each node publishes what its own
checks say of each member and reads what the others' say; balancing/quorum.py decides what follows.

One hash, `{prefix}health`: a field per node instance x pool x member (a JSON array of the three), its
value "EXPIRY UP" (EXPIRY in Redis's TIME, UP 1 or 0). Every `every_s` (the heartbeat's period) a node
writes its verdicts, each living a few probe intervals, and reads the others' in the same script, which
drops the expired: a node that died, or stopped checking a pool, drops out of the count by itself. The
clock is Redis's, so nodes whose clocks differ agree on what has expired.

A verdict is published only once the node's own checks have one (a member's first probe has finished):
a node that has not probed yet counts for nothing. While Redis is away (the throttles fallen back) no
call is made and each node goes by its own checks alone, as a single node does: a real outage is still
seen by each node's own probes, only later (`fall` of them).

Cost: one script per node every `every_s`; its reply holds every verdict (nodes x checked members).
"""

from __future__ import annotations

import contextlib
import json
from collections import defaultdict
from collections.abc import Mapping

import redis.exceptions

from postmux.balancing.pool import Pool
from postmux.balancing.quorum import shared_verdict
from postmux.scheduling.redis_throttles import RedisAway, RedisThrottles

# KEYS: the verdicts hash. ARGV: then field, ttl, up triplets (this node's verdicts).
# Every verdict still alive, as field, value pairs.
_EXCHANGE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local longest = 0
for i = 1, #ARGV, 3 do
  local ttl = tonumber(ARGV[i + 1])
  redis.call('HSET', KEYS[1], ARGV[i], string.format('%.17g', now + ttl) .. ' ' .. ARGV[i + 2])
  if ttl > longest then longest = ttl end
end
local alive = {}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  if tonumber(string.match(all[i + 1], '^%S+')) <= now then
    redis.call('HDEL', KEYS[1], all[i])
  else
    alive[#alive + 1] = all[i]
    alive[#alive + 1] = all[i + 1]
  end
end
local ms = math.ceil(longest * 1000) + 1000
if longest > 0 and redis.call('PTTL', KEYS[1]) < ms then redis.call('PEXPIRE', KEYS[1], ms) end
return alive
"""

# How many probe rounds a published verdict outlives its node by.
ROUNDS_KEPT = 3

Key = tuple[str, str]  # pool, member


class RedisHealthVerdicts:
    """This node's verdicts out, the other nodes' in, in one round trip (see the module's docstring)."""

    def __init__(self, throttles: RedisThrottles, instance: str) -> None:
        self.throttles = throttles
        self.instance = instance  # this process (postmux.node.instance_id): its verdicts are its own
        self.key = f"{throttles.prefix}health"
        self._exchange = throttles.client.register_script(_EXCHANGE)
        self._published: set[str] = set()

    def exchange(self, own: Mapping[Key, tuple[bool, float]]) -> dict[Key, list[bool]] | None:
        """Publish `own` ((pool, member) -> (up, seconds it holds)); the other instances' live verdicts
        by (pool, member), or None when Redis is away (each node then goes by its own checks)."""
        args: list[str | float | int] = []
        for (pool, member), (up, ttl_s) in own.items():
            args += [json.dumps([self.instance, pool, member]), repr(ttl_s), int(up)]
        try:
            flat = self.throttles.call(self._exchange, [self.key], args)
        except RedisAway:
            return None
        self._published.update(str(args[i]) for i in range(0, len(args), 3))
        others: dict[Key, list[bool]] = defaultdict(list)
        for i in range(0, len(flat), 2):
            instance, pool, member = json.loads(flat[i])
            if instance != self.instance:
                others[(pool, member)].append(flat[i + 1].split()[1] == b"1")
        return dict(others)

    def leave(self) -> None:
        """A clean stop: this node's verdicts go now rather than when they expire."""
        if self._published:
            # Away or failing: they expire in a few probe rounds anyway.
            with contextlib.suppress(redis.exceptions.RedisError, OSError):
                self.throttles.client.hdel(self.key, *self._published)
            self._published.clear()


class SharedChecks:
    """Applies the shared verdicts to a node's pools (Pool.record_shared), every `every_s`."""

    def __init__(self, verdicts: RedisHealthVerdicts, every_s: float) -> None:
        self.verdicts = verdicts
        self.every_s = every_s

    def own(self, pools: Mapping[str, Pool]) -> dict[Key, tuple[bool, float]]:
        """This node's verdicts (after rise/fall), each kept a few probe rounds (or heartbeats: whichever
        is longer, so a verdict does not lapse between two publications)."""
        verdicts = {}
        for pool in pools.values():
            check = pool.settings.check
            if not check.enabled:
                continue
            hold_s = ROUNDS_KEPT * max(check.interval + check.timeout, self.every_s)
            for m in pool.members:
                if not m.removed and m.check_streak != 0:  # 0: no probe has finished yet
                    verdicts[(pool.name, m.name)] = (m.check_up, hold_s)
        return verdicts

    def exchange(self, pools: Mapping[str, Pool], now: float) -> None:
        own = self.own(pools)
        others = self.verdicts.exchange(own)
        for pool in pools.values():
            for m in pool.members:
                key = (pool.name, m.name)
                mine, theirs = own.get(key), (others or {}).get(key, [])
                known = others is not None and (mine is not None or theirs)
                verdict = shared_verdict(None if mine is None else mine[0], theirs) if known else None
                pool.record_shared(m, verdict, now)
