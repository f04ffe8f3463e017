"""Balancing policies. Each picks one member from candidates that are already usable and have capacity.

One Protocol, one class per policy; a policy keeps only its own bookkeeping (a cursor, current weights,
a ring), never health or capacity, which the pool has already applied.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from postmux.balancing.member import Member
from postmux.config import PoolSettings


class Policy(Protocol):
    def pick(
        self, candidates: Sequence[Member], key: str, everyone: Sequence[Member], now: float | None = None
    ) -> Member | None:
        """Choose among `candidates` (non-empty, all usable, all with capacity).

        `everyone` is the whole usable set, busy members included, for policies whose decision depends
        on load across the pool (hash with bounded load). `now` is the pool's clock, for policies that
        read time-decayed state (least_latency); None: the caller has set that state itself.
        Cost: O(len(candidates)) at most.
        """
        ...


class RoundRobinPolicy:
    """Members in turn, ignoring weight; a member that is out is simply skipped."""

    def __init__(self) -> None:
        self._turn = 0

    def pick(
        self, candidates: Sequence[Member], key: str, everyone: Sequence[Member], now: float | None = None
    ) -> Member | None:
        member = candidates[self._turn % len(candidates)]
        self._turn += 1
        return member


class WeightedPolicy:
    """Smooth weighted round-robin (nginx): weights 3:1:1 give a a b a c a ..., never long runs of one."""

    def __init__(self) -> None:
        self._current: dict[str, float] = {}

    def pick(
        self, candidates: Sequence[Member], key: str, everyone: Sequence[Member], now: float | None = None
    ) -> Member | None:
        total = 0.0
        best: Member | None = None
        best_weight = 0.0
        for m in candidates:
            if m.effective_weight <= 0:
                continue
            w = self._current.get(m.name, 0.0) + m.effective_weight
            self._current[m.name] = w
            total += m.effective_weight
            if best is None or w > best_weight:
                best, best_weight = m, w
        if best is not None:
            self._current[best.name] = best_weight - total
        return best


class LeastConnectionsPolicy:
    """Fewest attempts in flight per unit of weight; ties go round-robin so idle pools still spread."""

    def __init__(self) -> None:
        self._turn = 0

    def pick(
        self, candidates: Sequence[Member], key: str, everyone: Sequence[Member], now: float | None = None
    ) -> Member | None:
        weighted = [m for m in candidates if m.effective_weight > 0]
        if not weighted:
            return None
        best_load = min(m.in_flight / m.effective_weight for m in weighted)
        tied = [m for m in weighted if m.in_flight / m.effective_weight == best_load]
        self._turn += 1
        return tied[self._turn % len(tied)]


class HashPolicy:
    """Consistent hashing with bounded load (Mirrokni, Thorup, Zadimoghaddam 2016).

    Each member holds points on a ring in proportion to its weight. A key goes to the first member
    clockwise from its hash whose load is under `factor` x the mean load, so a key stays with its member
    while that member is healthy and not swamped, and only keys of a lost member move.
    """

    POINTS_PER_WEIGHT = 40
    RINGS_KEPT = 2  # one per side of a zone split (balancing/zones.py), which alternate while spilling

    def __init__(self, factor: float) -> None:
        self.factor = factor
        # The rings last built, newest first. The pool hands the same list object as `everyone` for every
        # pick until its membership, health or weights change, and then a new one: checking the object
        # (and its length, against a caller that appends to its own list) skips the sort and the
        # signature on each pick. A pool split by zone hands one of two lists: a ring for each.
        self._rings: list[_Ring] = []

    @staticmethod
    def _hash(text: str) -> int:
        return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")

    def _ring_of(self, everyone: Sequence[Member]) -> _Ring:
        for ring in self._rings:
            if ring.everyone is everyone and ring.size == len(everyone):
                return ring
        # The ring is built over every usable member so that a busy member keeps its keys.
        members = sorted(everyone, key=lambda m: m.name)
        signature = tuple((m.name, m.weight) for m in members)
        built = next((r for r in self._rings if r.signature == signature), None)
        if built is None:
            points = sorted(
                (self._hash(f"{m.name}#{i}"), m.name)
                for m in members
                for i in range(m.weight * self.POINTS_PER_WEIGHT)
            )
            built = _Ring(points, [h for h, _ in points], signature)
        ring = _Ring(built.points, built.hashes, signature, everyone, len(everyone))
        ring.by_name = {m.name: m for m in everyone}
        self._rings = [ring, *(r for r in self._rings if r.signature != signature)][: self.RINGS_KEPT]
        return ring

    def pick(
        self, candidates: Sequence[Member], key: str, everyone: Sequence[Member], now: float | None = None
    ) -> Member | None:
        ring = self._rings[0] if self._rings else None
        if ring is None or ring.everyone is not everyone or ring.size != len(everyone):
            ring = self._ring_of(everyone)
        points = ring.points
        if not points:
            return None
        # Candidates are the members of `everyone` with capacity: when they are as many, they are all.
        by_name = ring.by_name if len(candidates) == len(everyone) else {m.name: m for m in candidates}
        total = sum(m.in_flight for m in everyone) + 1
        bound = math.ceil(self.factor * total / max(1, len(everyone)))
        start = bisect.bisect_left(ring.hashes, self._hash(key)) % len(points)
        seen: set[str] = set()
        fallback: Member | None = None
        for i in range(len(points)):
            name = points[(start + i) % len(points)][1]
            if name in seen:
                continue
            seen.add(name)
            member = by_name.get(name)
            if member is None:
                continue
            if member.in_flight + 1 <= bound:
                return member
            fallback = fallback or member
            if len(seen) == len(everyone):
                break
        return fallback


@dataclass(slots=True)
class _Ring:
    """A hash ring: points (hash, member name) sorted, for the members of one `everyone` list."""

    points: list[tuple[int, str]]
    hashes: list[int]
    signature: tuple[tuple[str, int], ...]
    everyone: Sequence[Member] = ()
    size: int = 0
    by_name: dict[str, Member] = field(default_factory=dict)


class LeastLatencyPolicy:
    """Power of two choices over a peak EWMA of latency, weighted by outstanding attempts (Finagle, Linkerd).

    Two candidates drawn at random; the one with the lower expected wait, latency x (in flight + 1) /
    weight, wins. Random pairs keep a fast member from taking everything the moment it looks fastest
    (the herd effect of a pure "pick the fastest"), and slow members get proportionally less.
    """

    def __init__(self, rng: random.Random | None = None, decay_s: float | None = None) -> None:
        self._rng = rng or random.Random()
        self.decay_s = decay_s  # the pool's latency_decay; None: callers set latency_now_s themselves

    # Finagle's penalty: a member with no latency yet but attempts in flight must not win every pair
    # until its first answer (it could be hanging); one second is slow for a relay on a LAN.
    UNKNOWN_LATENCY_S = 1.0

    @classmethod
    def cost(cls, m: Member) -> float:
        latency = m.latency_now_s
        if latency == 0.0 and m.in_flight > 0:
            latency = cls.UNKNOWN_LATENCY_S
        return latency * (m.in_flight + 1) / max(m.effective_weight, 1e-9)

    def pick(
        self, candidates: Sequence[Member], key: str, everyone: Sequence[Member], now: float | None = None
    ) -> Member | None:
        weighted = [m for m in candidates if m.effective_weight > 0]
        if len(weighted) <= 1:
            return weighted[0] if weighted else None
        a, b = self._rng.sample(weighted, 2)
        if now is not None and self.decay_s is not None:
            # Only the two drawn are compared, so only they need their average decayed to now.
            a.latency_now_s = a.latency_at(now, self.decay_s)
            b.latency_now_s = b.latency_at(now, self.decay_s)
        return a if self.cost(a) <= self.cost(b) else b


def make_policy(settings: PoolSettings) -> Policy:
    match settings.policy:
        case "round_robin":
            return RoundRobinPolicy()
        case "weighted" | "priority":
            return WeightedPolicy()
        case "least_connections":
            return LeastConnectionsPolicy()
        case "least_latency":
            return LeastLatencyPolicy(decay_s=settings.latency_decay)
        case "hash":
            return HashPolicy(settings.hash_balance_factor)
