"""Throttles: the part of shaping's state that several lanes (later several nodes) must agree on.

KumoMTA's model (its `throttle` crate: GCRA throttles and connection-limit leases, in memory or shared
through Redis), with suspensions beside them. Each shaping lane (scheduling/shaping.py) keeps what it
learnt on its own - its ceilings, what AIMD allows now, its cuts and when - and asks a `Throttles` three
things by the lane's key:

- **rate**: may one more message start now? A Generic Cell Rate Algorithm (GCRA, the ATM Forum's
  virtual scheduling algorithm; redis-cell and KumoMTA use it): the key holds one number, the theoretical
  arrival time (TAT) of the next message at the sustained rate. An attempt is allowed when it comes no
  more than the burst tolerance before its TAT; each one taken moves the TAT one interval on. It is a token
  bucket told the other way round, so `burst` messages may start at once and then one per 1/rate, and a
  refusal says exactly how long to wait.
- **leases**: a connection slot held for the length of an attempt, up to a limit per key. A lease expires
  by itself after its time to live unless renewed, so with a shared store the slots of a node that died
  free themselves (KumoMTA's connection-limit leases, a Redis sorted set of expiry times).
- **suspensions**: the key is kept away until a time, for a reason (a receiver's "4.7.28 unusual rate", an
  operator's `suspend`), until then or until lifted.

Each call is one decision, complete in itself: it reads and writes the key's state at once and returns the
answer, so a Redis implementation is one Lua script per call (EVALSHA, Redis TIME as its clock) and no caller
reads a value in one call to write it back in another. The three families of calls have separate key spaces.

Times are the caller's clock in seconds (`now`, `until`: Unix time); answers that are waits are relative
(`RetryAfter.seconds`, a lease's time to live), so a shared store may use its own clock instead.

The calls are synchronous: the dispatcher's gate asks in one pass of its loop without awaiting, and
`MemoryThrottles` answers with a dict lookup or two. `RedisThrottles` (scheduling/redis_throttles.py), shared
by several nodes, answers in one loopback round trip on a synchronous client with a short timeout, about
0.1 ms of the loop (bench/throttles_redis.py): cheaper than awaiting, and exact where a local view refreshed
in the background would let each node overshoot. The contract (tests/contract/test_throttles_contract.py)
is the same for both.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Final, NamedTuple, Protocol


@dataclass(frozen=True, slots=True)
class Allowed:
    """The message may start now (and, if it was asked to, its turn is taken)."""


# The values made on the hot path (a lease per attempt) are NamedTuples: immutable, and made several
# times faster than frozen dataclasses.


class RetryAfter(NamedTuple):
    """Not now: the earliest turn is this many seconds away (math.inf: never, at this burst)."""

    seconds: float


ALLOWED: Final = Allowed()


class Lease(NamedTuple):
    """One connection slot under `key`, held until released or until `expires_at` (the caller's clock)."""

    key: str
    id: int
    expires_at: float


class Suspension(NamedTuple):
    until: float
    reason: str


class Throttles(Protocol):
    """Rate limits, connection leases and suspensions by key. Every call is one atomic decision.

    Cost: `MemoryThrottles` answers each call in O(1) (a dict lookup; a lease set is swept of expired
    leases only when one may have expired); a Redis implementation, one round trip (one Lua script).
    """

    def rate(self, key: str, per_s: float, burst: int, now: float, take: int = 1) -> Allowed | RetryAfter:
        """GCRA: `burst` messages may start at once, then one every 1/per_s seconds.

        `take` turns are taken if that many are free now (several at once: a lane drawing its burst down
        to one after a cut); none are taken otherwise. `take=0` only asks whether one would be allowed.
        RetryAfter says how long until `max(take, 1)` turns are free (math.inf if more than `burst`).

        A key asked with a new rate keeps what it owes in messages, not in seconds: a lane cut to half its
        rate does not get a fresh burst, and one raised does not wait out the old interval.
        """
        ...

    def lease(self, key: str, limit: int, ttl_s: float, now: float) -> Lease | None:
        """A slot under `key` for `ttl_s` seconds if fewer than `limit` live leases are held; else None."""
        ...

    def renew(self, lease: Lease, ttl_s: float, now: float) -> Lease | None:
        """The same slot for `ttl_s` more seconds from now; None if it has expired or been released."""
        ...

    def release(self, lease: Lease) -> None:
        """Give the slot back (nothing happens if it has expired already)."""
        ...

    def leases_held(self, key: str, now: float) -> int:
        """Live leases under `key`: whether a lease would be granted, without taking one."""
        ...

    def suspend(self, key: str, until: float, reason: str) -> bool:
        """Keep `key` away until `until`; False (and nothing changes) if a suspension that lasts as long
        or longer is in force already. To shorten one, lift it first."""
        ...

    def suspended(self, key: str, now: float) -> Suspension | None:
        """The suspension in force at `now`, if any."""
        ...

    def lift(self, key: str) -> None:
        """End the key's suspension now, whoever set it."""
        ...

    def suspensions(self, keys: Collection[str], now: float) -> dict[str, Suspension]:
        """The suspensions in force at `now` among `keys`, by key: many lanes' in one call (one round
        trip), so a node learns of what another node suspended without asking each lane."""
        ...


@dataclass(slots=True)
class _Cell:
    tat: float  # theoretical arrival time of the next message at the sustained rate
    interval: float  # 1/rate the TAT was worked out with


@dataclass(slots=True)
class _LeaseSet:
    held: dict[int, float]  # lease id -> expiry
    soonest: float  # no lease expires before this: nothing to sweep until then


_SWEEP_EVERY_S = 60.0
_make_lease = tuple.__new__


class MemoryThrottles:
    """Throttles in this process's memory: exact, and shared by every lane of one Shaper.

    State that has run out (a TAT in the past, expired leases, an ended suspension) answers as no state
    does; it is dropped once a minute of the caller's clock, as Redis would expire the keys.
    """

    def __init__(self) -> None:
        self._cells: dict[str, _Cell] = {}
        self._leases: dict[str, _LeaseSet] = {}
        self._suspensions: dict[str, Suspension] = {}
        self._ids = itertools.count(1)
        self._next_sweep = -math.inf

    # -- rate (GCRA) ---------------------------------------------------------------------------------

    def rate(self, key: str, per_s: float, burst: int, now: float, take: int = 1) -> Allowed | RetryAfter:
        if now >= self._next_sweep:
            self._sweep(now)
        interval = 1.0 / per_s
        cell = self._cells.get(key)
        tat = now
        if cell is not None and cell.tat > now:
            tat = cell.tat
            if cell.interval != interval:
                # A new rate: the same number of messages owed, each at the new interval.
                tat = cell.tat = now + (tat - now) * (interval / cell.interval)
                cell.interval = interval
        # Allowed when the last of the turns taken would still fall within the burst tolerance:
        # new TAT - (burst - 1) x interval <= now + interval.
        turns = take if take > 0 else 1
        if turns > burst:
            return RetryAfter(math.inf)
        wait = tat + (turns - burst) * interval - now
        if wait > 0.0:
            return RetryAfter(wait)
        if take:
            if cell is None:
                self._cells[key] = _Cell(tat + take * interval, interval)
            else:
                cell.tat, cell.interval = tat + take * interval, interval
        return ALLOWED

    # -- connection leases ---------------------------------------------------------------------------

    def lease(self, key: str, limit: int, ttl_s: float, now: float) -> Lease | None:
        if now >= self._next_sweep:
            self._sweep(now)
        held = self._leases.get(key)
        if held is None:
            held = self._leases[key] = _LeaseSet({}, math.inf)
        elif now >= held.soonest:
            self._drop_expired(held, now)
        if len(held.held) >= limit:
            return None
        lease_id, expires_at = next(self._ids), now + ttl_s
        held.held[lease_id] = expires_at
        if expires_at < held.soonest:
            held.soonest = expires_at
        # Lease(...) without the NamedTuple's Python-level __new__: half the cost, on every attempt.
        return _make_lease(Lease, (key, lease_id, expires_at))

    def renew(self, lease: Lease, ttl_s: float, now: float) -> Lease | None:
        held = self._live(lease.key, now)
        if held is None or lease.id not in held.held:
            return None
        renewed = Lease(lease.key, lease.id, now + ttl_s)
        held.held[lease.id] = renewed.expires_at
        held.soonest = min(held.soonest, renewed.expires_at)
        return renewed

    def release(self, lease: Lease) -> None:
        held = self._leases.get(lease.key)
        if held is not None:
            held.held.pop(lease.id, None)

    def leases_held(self, key: str, now: float) -> int:
        held = self._live(key, now)
        return 0 if held is None else len(held.held)

    def _live(self, key: str, now: float) -> _LeaseSet | None:
        """The key's lease set with expired leases dropped (looked through only when one may have expired)."""
        held = self._leases.get(key)
        if held is not None and now >= held.soonest:
            self._drop_expired(held, now)
        return held

    @staticmethod
    def _drop_expired(held: _LeaseSet, now: float) -> None:
        held.held = {i: t for i, t in held.held.items() if t > now}
        held.soonest = min(held.held.values(), default=math.inf)

    # -- suspensions ---------------------------------------------------------------------------------

    def suspend(self, key: str, until: float, reason: str) -> bool:
        current = self._suspensions.get(key)
        if current is not None and current.until >= until:
            return False
        self._suspensions[key] = Suspension(until, reason)
        return True

    def suspended(self, key: str, now: float) -> Suspension | None:
        if now >= self._next_sweep:
            self._sweep(now)
        current = self._suspensions.get(key)
        if current is None:
            return None
        if now < current.until:
            return current
        del self._suspensions[key]
        return None

    def lift(self, key: str) -> None:
        self._suspensions.pop(key, None)

    def suspensions(self, keys: Collection[str], now: float) -> dict[str, Suspension]:
        found = {}
        for key in keys:
            current = self._suspensions.get(key)
            if current is not None and now < current.until:
                found[key] = current
        return found

    # -- housekeeping --------------------------------------------------------------------------------

    def _sweep(self, now: float) -> None:
        """Drop what has run out, so keys no longer asked about (lanes forgotten) do not pile up."""
        self._next_sweep = now + _SWEEP_EVERY_S
        self._cells = {k: c for k, c in self._cells.items() if c.tat > now}
        for key in list(self._leases):
            held = self._live(key, now)
            if held is not None and not held.held:
                del self._leases[key]
        self._suspensions = {k: s for k, s in self._suspensions.items() if s.until > now}

    def __len__(self) -> int:
        """Keys holding state (of any family): what a sweep has left."""
        return len(self._cells.keys() | self._leases.keys() | self._suspensions.keys())
