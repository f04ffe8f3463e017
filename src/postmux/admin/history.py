"""The last hour of the node in memory, for the dashboard: per-minute counts and the recent events.

Fed from the event bus (events/bus.py): each event costs a few O(1) steps (a ring slot, a counter, a
deque append), nothing else, so the dashboard costs nothing while nobody watches; the snapshots the
page reads are computed only when asked (admin/dashboard.py, once a second per connected page).

Memory is fixed: 60 minute slots for the node, 60 per member, and `recent` events (1,000 by default).
Counts are of recipients, as the events are (one per recipient per attempt).
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from postmux.events.types import Event, EventType

MINUTES = 60
# Upper bounds (s) of the delivery-latency buckets, from accept to delivery: a fixed histogram per minute
# makes p50/p99 a walk over 32 counts, and an event a bisect and an increment (no samples are kept).
LATENCY_BOUNDS_S: tuple[float, ...] = (
    *(round(0.001 * 2**i, 6) for i in range(0, 18)),  # 1 ms .. 131 s, doubling
    300.0,
    600.0,
    1800.0,
    3600.0,
    7200.0,
    4 * 3600.0,
    8 * 3600.0,
    86400.0,
    2 * 86400.0,
    5 * 86400.0,
)
_OUTCOMES = {
    EventType.DELIVERY: "delivered",
    EventType.TRANSIENT_FAILURE: "deferred",
    EventType.BOUNCE: "bounced",
    EventType.EXPIRATION: "bounced",  # an expiry is a bounce to the sender (a DSN), by the clock
}
SERIES = ("accepted", "delivered", "deferred", "bounced")


@dataclass(slots=True)
class _Minute:
    minute: int = -1
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SERIES, 0))
    latency: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS_S) + 1))

    def reset(self, minute: int) -> None:
        self.minute = minute
        for k in self.counts:
            self.counts[k] = 0
        for i in range(len(self.latency)):
            self.latency[i] = 0


class _MemberMinutes:
    """One member's outcomes per minute for the hour (its observed capacity and its error rate)."""

    __slots__ = ("failed", "minutes", "total")

    def __init__(self) -> None:
        self.minutes = [-1] * MINUTES
        self.total = [0] * MINUTES
        self.failed = [0] * MINUTES

    def add(self, minute: int, failed: bool) -> None:
        slot = minute % MINUTES
        if self.minutes[slot] != minute:
            self.minutes[slot], self.total[slot], self.failed[slot] = minute, 0, 0
        self.total[slot] += 1
        self.failed[slot] += failed

    def peak(self, now_minute: int) -> int:
        return max(
            (t for m, t in zip(self.minutes, self.total, strict=True) if now_minute - m < MINUTES),
            default=0,
        )

    def in_minute(self, minute: int) -> int:
        slot = minute % MINUTES
        return self.total[slot] if self.minutes[slot] == minute else 0

    def error_rate(self, now_minute: int, last: int = 5) -> float | None:
        """Deferred and bounced over all outcomes in the last `last` minutes; None with no outcome."""
        total = failed = 0
        for m, t, f in zip(self.minutes, self.total, self.failed, strict=True):
            if 0 <= now_minute - m < last:
                total, failed = total + t, failed + f
        return failed / total if total else None


def percentile(counts: list[int], q: float) -> float | None:
    """The upper bound of the bucket holding the q-quantile (what Prometheus' histogram_quantile would
    say, without its interpolation); None with no sample."""
    total = sum(counts)
    if not total:
        return None
    rank = math.ceil(q * total)
    seen = 0
    for i, n in enumerate(counts):
        seen += n
        if seen >= rank:
            return LATENCY_BOUNDS_S[i] if i < len(LATENCY_BOUNDS_S) else math.inf
    return math.inf  # not reached: the counts add up to total


class History:
    """A bus subscriber (`bus.subscribe(history)`) that keeps the hour and the recent events."""

    def __init__(self, clock: Callable[[], float], recent: int = 1000) -> None:
        self.clock = clock
        self._minutes = [_Minute() for _ in range(MINUTES)]
        self._members: dict[tuple[str, str], _MemberMinutes] = {}
        self._pools: dict[str, list[tuple[int, int]]] = {}  # pool -> (minute, outcomes) per slot
        self.recent: deque[tuple[int, Event]] = deque(maxlen=recent)
        self.seq = 0  # events seen: a page asks for those after the last seq it has
        # Why each member last went down or up (MemberDown / MemberUp's reason), for the members panel.
        self.why: dict[tuple[str, str], str] = {}

    def _slot(self, minute: int) -> _Minute:
        slot = self._minutes[minute % MINUTES]
        if slot.minute != minute:
            slot.reset(minute)
        return slot

    def __call__(self, event: Event) -> None:
        self.seq += 1
        self.recent.append((self.seq, event))
        minute = int(event.timestamp // 60)
        kind = event.type
        if kind is EventType.RECEPTION:
            self._slot(minute).counts["accepted"] += 1
            return
        if kind in (EventType.MEMBER_DOWN, EventType.MEMBER_UP):
            self.why[(event.pool, event.member)] = event.tags.get("reason", "")
            return
        outcome = _OUTCOMES.get(kind)
        if outcome is None:
            return
        slot = self._slot(minute)
        slot.counts[outcome] += 1
        if kind is EventType.DELIVERY and event.latency_s is not None:
            slot.latency[bisect.bisect_left(LATENCY_BOUNDS_S, event.latency_s)] += 1
        if event.member:  # a bounce by the operator or an expiry has no member
            key = (event.pool, event.member)
            member = self._members.get(key)
            if member is None:
                member = self._members[key] = _MemberMinutes()
            member.add(minute, outcome != "delivered")
        self._pool_add(event.pool, minute)

    def _pool_add(self, pool: str, minute: int) -> None:
        slots = self._pools.get(pool)
        if slots is None:
            slots = self._pools[pool] = [(-1, 0)] * MINUTES
        i = minute % MINUTES
        m, n = slots[i]
        slots[i] = (minute, n + 1 if m == minute else 1)

    # -- reads (only while a page watches) -------------------------------------------------------------

    def series(self) -> dict[str, Any]:
        """The hour as chart columns: minute start times (s), each series per minute, p50/p99 (ms)."""
        now_minute = int(self.clock() // 60)
        minutes = list(range(now_minute - MINUTES + 1, now_minute + 1))
        out: dict[str, list[Any]] = {"t": [m * 60 for m in minutes], **{k: [] for k in SERIES}}
        out["p50_ms"], out["p99_ms"] = [], []
        for m in minutes:
            slot = self._minutes[m % MINUTES]
            live = slot.minute == m
            for k in SERIES:
                out[k].append(slot.counts[k] if live else 0)
            for name, q in (("p50_ms", 0.5), ("p99_ms", 0.99)):
                p = percentile(slot.latency, q) if live else None
                out[name].append(None if p is None or math.isinf(p) else round(p * 1000, 3))
        return out

    def member_peak(self, pool: str, member: str) -> int:
        """The member's busiest minute in the hour (outcomes per minute): what it has shown it carries."""
        m = self._members.get((pool, member))
        return m.peak(int(self.clock() // 60)) if m else 0

    def member_error_rate(self, pool: str, member: str) -> float | None:
        m = self._members.get((pool, member))
        return m.error_rate(int(self.clock() // 60)) if m else None

    def member_last_minute(self, pool: str, member: str) -> float:
        """The member's outcomes in the 60 s up to now, from two minute slots (the sliding window counter
        of Cloudflare's rate limiting): all of this minute's, and the previous minute's in
        proportion to the part of it still inside the window. Two slot reads, nothing kept per event."""
        m = self._members.get((pool, member))
        if m is None:
            return 0.0
        now = self.clock()
        minute = int(now // 60)
        still_in = 1.0 - (now - minute * 60) / 60
        return m.in_minute(minute) + m.in_minute(minute - 1) * still_in

    def pool_peak(self, pool: str) -> int:
        now_minute = int(self.clock() // 60)
        slots = self._pools.get(pool, ())
        return max((n for m, n in slots if now_minute - m < MINUTES), default=0)

    def events_after(self, seq: int, limit: int) -> list[dict[str, Any]]:
        """The recent events after `seq` (the newest `limit` of them), each as the page shows it: the
        fields of its record that the page reads (half the size of the whole record; the event log and
        webhooks have the rest), with `seq`."""
        if seq >= self.seq:
            return []
        newer = min(self.seq - seq, limit, len(self.recent))
        picked = itertools.islice(self.recent, len(self.recent) - newer, None)
        return [_shown(s, e) for s, e in picked]


def _shown(seq: int, e: Event) -> dict[str, Any]:
    return {
        "seq": seq,
        "type": e.type.value,
        "id": e.id,
        "timestamp": e.timestamp,
        "recipient": e.recipient,
        "queue": e.queue,
        "pool": e.pool,
        "member": e.member,
        "message_id": e.message_id,
        "response": e.response.as_dict() if e.response else None,
        "tags": {k: e.tags[k] for k in ("reason", "change") if k in e.tags},
    }
