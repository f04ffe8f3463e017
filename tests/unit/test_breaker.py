"""The reputation breaker's deciding half, on a fake clock: windows, thresholds, which lanes it watches."""

from __future__ import annotations

from postmux.config import BreakerSettings
from postmux.events.types import Event, EventType
from postmux.reputation.breaker import ReputationBreaker, Trip, Window


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def sent(kind: EventType, *, ip: str = "192.0.2.10", member: str = "mx-a", klass: str = "") -> Event:
    return Event(kind, pool="direct", member=member, queue="direct/gmail", source_ip=ip, bounce_class=klass)


def breaker(**settings: object) -> tuple[ReputationBreaker, list[Trip], Clock]:
    trips: list[Trip] = []
    clock = Clock()
    defaults: dict[str, object] = {"min_messages": 20, "hard_bounce_rate": 0.1, "window": 600}
    # mx-* are source members, relay-* relays (as the pools would say).
    kinds = {"mx-a": "source", "relay-a": "relay"}
    b = ReputationBreaker(
        BreakerSettings.model_validate({**defaults, **settings}),
        trips.append,
        lambda pool, member: kinds.get(member),
        clock,
    )
    return b, trips, clock


def test_hard_bounces_above_the_rate_trip_the_lane_of_that_ip_and_destination() -> None:
    b, trips, _ = breaker()
    for _ in range(17):
        b(sent(EventType.DELIVERY))
    for _ in range(2):
        b(sent(EventType.BOUNCE, klass="InvalidRecipient"))
    assert not trips  # 19 recipients: below min_messages, no verdict yet
    b(sent(EventType.BOUNCE, klass="BadDomain"))
    assert len(trips) == 1
    t = trips[0]
    assert (t.ip, t.pool, t.destination, t.cooldown_s) == ("192.0.2.10", "direct", "gmail", 4 * 3600)
    assert "hard bounces 3/20 (15.0%)" in t.why and "above 10.0%" in t.why


def test_other_bounces_are_not_hard_and_do_not_trip_it() -> None:
    b, trips, _ = breaker()
    for _ in range(40):
        b(sent(EventType.BOUNCE, klass="SpamBlock"))  # the IP's standing, not a dead address
        b(sent(EventType.BOUNCE, klass=""))
    assert not trips


def test_each_ip_and_destination_is_its_own_lane() -> None:
    b, trips, _ = breaker()
    for i in range(30):
        b(sent(EventType.DELIVERY, ip="192.0.2.10"))
        b(sent(EventType.BOUNCE, ip="192.0.2.11", klass="InvalidRecipient" if i % 4 == 0 else ""))
    assert [t.ip for t in trips] == ["192.0.2.11"]


def test_complaints_above_their_rate_trip_it() -> None:
    b, trips, _ = breaker(complaint_rate=0.01)
    for _ in range(100):
        b(sent(EventType.DELIVERY))
    b(sent(EventType.COMPLAINT))
    assert not trips  # 1 in 100: at the rate, not above it
    b(sent(EventType.COMPLAINT))
    assert len(trips) == 1 and "complaints 2/100 (2.00%)" in trips[0].why


def test_old_minutes_fall_out_of_the_window() -> None:
    b, trips, clock = breaker(window=600)
    for _ in range(5):
        b(sent(EventType.BOUNCE, klass="InvalidRecipient"))
    clock.now += 700  # those bounces are older than the window now
    for _ in range(19):
        b(sent(EventType.DELIVERY))
    b(sent(EventType.BOUNCE, klass="InvalidRecipient"))
    assert not trips  # 1 in 20 within the window


def test_after_a_trip_the_lane_counts_afresh() -> None:
    b, trips, _ = breaker()
    for _ in range(20):
        b(sent(EventType.BOUNCE, klass="InvalidRecipient"))
    assert len(trips) == 1
    for _ in range(19):
        b(sent(EventType.BOUNCE, klass="InvalidRecipient"))
    assert len(trips) == 1  # 19 new ones: below min_messages again


def test_relays_are_judged_by_name_only_when_asked() -> None:
    b, trips, _ = breaker()
    for _ in range(25):
        b(sent(EventType.BOUNCE, ip="127.0.0.1", member="relay-a", klass="InvalidRecipient"))
    assert not trips  # members = "sources": a relay's IP is the relay's business
    b, trips, _ = breaker(members="all")
    for _ in range(25):
        # The event's source_ip is this host's end of the connection to the relay: not the relay's IP.
        b(sent(EventType.BOUNCE, ip="127.0.0.1", member="relay-a", klass="InvalidRecipient"))
    assert [(t.ip, t.member) for t in trips] == [("", "relay-a")]


def test_off_watches_nothing() -> None:
    b, trips, _ = breaker(members="off")
    for _ in range(50):
        b(sent(EventType.BOUNCE, klass="InvalidRecipient"))
    assert not trips and not b.windows


def test_a_window_totals_its_minutes_and_idle_lanes_are_pruned() -> None:
    w = Window(120)
    w.add(0.0, sent=2)
    w.add(59.0, hard=1)
    w.add(60.0, sent=1, complaints=1)
    assert w.totals(100.0) == (3, 1, 1)
    assert w.totals(181.0) == (1, 0, 1)  # the first minute ended more than 120 s ago
    b, _, clock = breaker()
    b(sent(EventType.DELIVERY))
    clock.now += 3600
    b.prune()
    assert not b.windows
