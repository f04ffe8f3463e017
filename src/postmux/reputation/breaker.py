"""The reputation breaker: protect a sending IP before a mailbox provider blocks it.

Providers judge an IP by what it sends: many messages to addresses that do not exist (a bought or stale
list), or many that recipients report as spam, and the IP's mail goes to the junk folder or is refused,
for every sender on it. The breaker watches, per sending IP x destination (a provider, else a domain), the
share of hard bounces and complaints among the recipients it sent to over a sliding window; past a
threshold it trips, and that lane is suspended for the cool-down (or until an operator resumes it with
`postmux resume`), so the mail goes through the pool's other members or waits, instead of finishing off
the IP. A fuse, not a throttle: it says "stop and look", as the 4.7.x reactions say "slow down".

Hard bounces are the bounce classes that mean the address is dead (InvalidRecipient, BadDomain,
InactiveMailbox); a complaint is a Complaint event (an ARF report matched to the message that calls it
abuse, fraud or virus: a not-spam or auth-failure report is a Feedback event, never counted). Deciding
(`Window`, `ReputationBreaker.observe`) is apart from doing (the `trip` callback, which suspends lanes).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from postmux.config import BreakerSettings
from postmux.events.types import Event, EventType
from postmux.reputation.bounces import HARD_BOUNCE_CLASSES

log = structlog.get_logger("postmux.breaker")

_BUCKET_S = 60.0
_PRUNE_EVERY = 10_000  # events between sweeps of idle lanes


@dataclass(slots=True)
class _Bucket:
    start: float
    sent: int = 0
    hard: int = 0
    complaints: int = 0


class Window:
    """Counts per minute over the last `span_s`: O(1) to add, O(buckets) to total (at most span/60)."""

    def __init__(self, span_s: float) -> None:
        self.span_s = span_s
        self._buckets: deque[_Bucket] = deque()

    def add(self, now: float, *, sent: int = 0, hard: int = 0, complaints: int = 0) -> None:
        start = now - now % _BUCKET_S
        if not self._buckets or self._buckets[-1].start != start:
            self._buckets.append(_Bucket(start))
        b = self._buckets[-1]
        b.sent += sent
        b.hard += hard
        b.complaints += complaints

    def totals(self, now: float) -> tuple[int, int, int]:
        """(recipients sent to, hard bounces, complaints) within the window."""
        while self._buckets and self._buckets[0].start + _BUCKET_S <= now - self.span_s:
            self._buckets.popleft()
        sent = hard = complaints = 0
        for b in self._buckets:
            sent, hard, complaints = sent + b.sent, hard + b.hard, complaints + b.complaints
        return sent, hard, complaints

    @property
    def empty(self) -> bool:
        return not self._buckets


@dataclass(frozen=True, slots=True)
class Trip:
    """The breaker tripped for a sending IP (or a relay, by name) toward a destination."""

    ip: str  # "" for a relay judged by its name
    member: str  # the relay's name when ip is ""; the member whose attempt tripped it otherwise
    pool: str
    destination: str
    why: str
    cooldown_s: float  # how long its lanes stay suspended


KindOf = Callable[[str, str], str | None]  # (pool, member) -> "source" | "relay", None when unknown


def lane_of(event: Event, members: str, kind: str | None) -> tuple[str, str, str] | None:
    """(ip, member, destination) the event counts toward, or None when the breaker does not watch it.

    A source member's mail leaves from its own IP, which the event names: the lane is that IP's. A relay
    chooses its IPs itself (the event's source_ip is only this host's end of the connection), so a relay
    is judged by its name, and only when `members = "all"`.
    """
    if members == "off" or not event.member or kind is None:
        return None
    destination = event.queue.rpartition("/")[2]
    if kind == "source" and event.source_ip:
        return event.source_ip, "", destination
    if kind == "relay" and members == "all":
        return "", event.member, destination
    return None


class ReputationBreaker:
    """Subscribes to the event bus; calls `trip` when a lane's rates pass the thresholds."""

    def __init__(
        self,
        settings: BreakerSettings,
        trip: Callable[[Trip], None],
        kind_of: KindOf,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.trip = trip
        self.kind_of = kind_of
        self.clock = clock
        self.windows: dict[tuple[str, str, str], Window] = {}
        self.trips = 0
        self._seen = 0

    def reconfigure(self, settings: BreakerSettings) -> None:
        if settings.window != self.settings.window or settings.members != self.settings.members:
            self.windows.clear()  # counts over another span, or of other lanes, would mislead
        self.settings = settings

    def __call__(self, event: Event) -> None:
        self._seen += 1
        if self._seen % _PRUNE_EVERY == 0:
            self.prune()
        found = self.observe(event)
        if found is not None:
            self.trips += 1
            log.warning(
                "reputation breaker tripped",
                ip=found.ip,
                member=found.member,
                destination=found.destination,
                reason=found.why,
            )
            self.trip(found)

    def observe(self, event: Event) -> Trip | None:
        """Count one event; a Trip when it takes its lane past a threshold (the lane's counts start over)."""
        if event.type not in (EventType.DELIVERY, EventType.BOUNCE, EventType.COMPLAINT):
            return None
        key = lane_of(event, self.settings.members, self.kind_of(event.pool, event.member))
        if key is None:
            return None
        now = self.clock()
        window = self.windows.get(key)
        if window is None:
            window = self.windows[key] = Window(self.settings.window)
        if event.type is EventType.COMPLAINT:
            window.add(now, complaints=1)
        else:
            hard = event.type is EventType.BOUNCE and event.bounce_class in HARD_BOUNCE_CLASSES
            window.add(now, sent=1, hard=int(hard))
        why = self.judge(*window.totals(now))
        if why is None:
            return None
        del self.windows[key]  # after the pause, a fresh start: old bounces must not trip it again
        ip, member, destination = key
        return Trip(ip, member or event.member, event.pool, destination, why, self.settings.cooldown)

    def judge(self, sent: int, hard: int, complaints: int) -> str | None:
        """Why the lane trips, or None. Rates over recipients sent to, once there are enough of them."""
        s = self.settings
        if sent < s.min_messages:
            return None
        span = f"{s.window / 60:g} min"
        if hard / sent > s.hard_bounce_rate:
            return (
                f"hard bounces {hard}/{sent} ({hard / sent:.1%}) over {span}, above {s.hard_bounce_rate:.1%}"
            )
        if complaints / sent > s.complaint_rate:
            return (
                f"complaints {complaints}/{sent} ({complaints / sent:.2%}) over {span},"
                f" above {s.complaint_rate:.2%}"
            )
        return None

    def prune(self) -> None:
        """Forget lanes with nothing left in their window: lanes come and go with destinations."""
        now = self.clock()
        for key, window in list(self.windows.items()):
            window.totals(now)  # drops the minutes that fell out of the window
            if window.empty:
                del self.windows[key]
