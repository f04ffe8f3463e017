"""The dashboard's hour in memory (admin/history.py) and its N+1 judgement (admin/dashboard.py), on a
manual clock: counts land in their minute, old minutes fall out, percentiles come from the buckets."""

from __future__ import annotations

from postmux.admin.dashboard import capacity_per_min, redundancy, session_value, zones
from postmux.admin.history import LATENCY_BOUNDS_S, MINUTES, History, percentile
from postmux.events.types import Event, EventType


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def outcome(kind: EventType, at: float, member: str = "a", latency_s: float = 0.5, pool: str = "p") -> Event:
    return Event(kind, id="m", pool=pool, member=member, latency_s=latency_s, timestamp=at)


def test_each_outcome_counts_in_its_minute_and_the_series_ends_at_the_current_minute() -> None:
    clock = Clock()
    history = History(clock)
    history(Event(EventType.RECEPTION, id="m1", timestamp=clock.now))
    history(outcome(EventType.DELIVERY, clock.now))
    history(outcome(EventType.DELIVERY, clock.now - 60))
    history(outcome(EventType.TRANSIENT_FAILURE, clock.now))
    history(outcome(EventType.BOUNCE, clock.now))
    series = history.series()
    assert len(series["t"]) == MINUTES
    assert series["t"][-1] == int(clock.now // 60) * 60
    assert (series["accepted"][-1], series["delivered"][-1], series["deferred"][-1]) == (1, 1, 1)
    assert series["bounced"][-1] == 1
    assert series["delivered"][-2] == 1
    assert series["p50_ms"][-1] == 512.0  # 0.5 s falls in the 0.512 s bucket
    assert series["p50_ms"][0] is None  # no delivery then


def test_a_minute_older_than_the_hour_is_forgotten_when_its_slot_comes_round() -> None:
    clock = Clock()
    history = History(clock)
    history(outcome(EventType.DELIVERY, clock.now))
    clock.now += MINUTES * 60
    assert sum(history.series()["delivered"]) == 0  # out of the window, though still in its slot
    history(outcome(EventType.DELIVERY, clock.now))
    assert sum(history.series()["delivered"]) == 1


def test_percentile_is_the_upper_bound_of_the_bucket_that_holds_the_quantile() -> None:
    counts = [0] * (len(LATENCY_BOUNDS_S) + 1)
    assert percentile(counts, 0.5) is None
    counts[0], counts[5] = 98, 2
    assert percentile(counts, 0.5) == LATENCY_BOUNDS_S[0]
    assert percentile(counts, 0.99) == LATENCY_BOUNDS_S[5]


def test_peaks_error_rates_and_why_per_member() -> None:
    clock = Clock()
    history = History(clock)
    for _ in range(7):
        history(outcome(EventType.DELIVERY, clock.now - 120, member="a"))
    for _ in range(3):
        history(outcome(EventType.DELIVERY, clock.now, member="a"))
    history(outcome(EventType.TRANSIENT_FAILURE, clock.now, member="a"))
    history(Event(EventType.MEMBER_DOWN, pool="p", member="b", tags={"reason": "checks failed"}))
    assert history.member_peak("p", "a") == 7
    assert history.member_peak("p", "nobody") == 0
    assert history.member_error_rate("p", "a") == 1 / 11
    assert history.member_error_rate("p", "nobody") is None
    assert history.pool_peak("p") == 7
    assert history.why[("p", "b")] == "checks failed"


def test_the_last_minute_is_this_minute_and_the_part_of_the_last_still_in_the_window() -> None:
    clock = Clock(1_800_000_000.0)  # a minute's start (30,000,000 minutes)
    history = History(clock)
    for _ in range(6):
        history(outcome(EventType.DELIVERY, clock.now - 30, member="a"))  # the minute before
    for _ in range(2):
        history(outcome(EventType.TRANSIENT_FAILURE, clock.now + 15, member="a"))
    history(outcome(EventType.DELIVERY, clock.now - 90, member="a"))  # two minutes back: out
    clock.now += 15  # a quarter into this minute: three quarters of the last still inside the window
    assert history.member_last_minute("p", "a") == 2 + 6 * 0.75
    clock.now += 45 + 60  # two minutes on: nothing left
    assert history.member_last_minute("p", "a") == 0.0
    assert history.member_last_minute("p", "nobody") == 0.0


def test_zones_count_members_up_and_share_the_attempts_local_zone_first() -> None:
    def row(zone: str, state: str, attempts: float) -> dict[str, object]:
        return {"zone": zone, "state": state, "attempts_last_min": attempts}

    members = [
        row("b", "up", 30.0),
        row("", "up", 10.0),
        row("a", "up", 60.0),
        row("a", "check-failed", 0.0),
        row("b", "ramping", 0.0),
    ]
    summary = zones(members, "a")
    assert [(z["zone"], z["local"], z["up"], z["members"]) for z in summary] == [
        ("a", True, 1, 2),
        ("b", False, 2, 2),
        ("", True, 1, 1),  # without a zone: near to every node, so local too
    ]
    assert [z["share"] for z in summary] == [0.6, 0.3, 0.1]
    idle = zones([row("a", "up", 0.0), row("b", "up", 0.0)], None)
    assert [(z["zone"], z["local"], z["share"]) for z in idle] == [("a", False, None), ("b", False, None)]


def test_recent_events_are_a_fixed_ring_read_after_a_sequence_number() -> None:
    clock = Clock()
    history = History(clock, recent=10)
    for i in range(25):
        history(Event(EventType.RECEPTION, id=f"m{i}", timestamp=clock.now))
    assert len(history.recent) == 10
    assert [e["id"] for e in history.events_after(22, 100)] == ["m22", "m23", "m24"]
    assert [e["seq"] for e in history.events_after(0, 3)] == [23, 24, 25]
    assert len(history.events_after(0, 100)) == 10  # only what the ring still has
    assert history.events_after(25, 100) == []


def member(name: str, state: str, capacity: float) -> dict[str, object]:
    return {"member": name, "state": state, "capacity_per_min": capacity}


def test_n_plus_1_asks_whether_the_members_up_less_the_biggest_carry_the_peak() -> None:
    members = [member("a", "up", 600), member("b", "up", 400), member("c", "up", 300)]
    assert redundancy("p", members, 700)["n_plus_1"] is True  # 400 + 300 without a
    assert redundancy("p", members, 701)["n_plus_1"] is False
    members[2]["state"] = "check-failed"
    judged = redundancy("p", members, 500)
    assert (judged["up"], judged["members"], judged["n_plus_1"]) == (2, 3, False)  # 400 < 500
    assert redundancy("p", members, 0)["n_plus_1"] is None  # no load this hour: nothing to judge
    assert redundancy("p", [], 10)["n_plus_1"] is False


def test_capacity_is_the_observed_peak_or_the_connection_cap_at_its_latency() -> None:
    # 10 connections at 200 ms each: 3000 attempts a minute (Little's law).
    assert capacity_per_min({"ewma_latency_ms": 200.0, "max_connections": 10}, 120) == 3000.0
    assert capacity_per_min({"ewma_latency_ms": 200.0, "max_connections": 10}, 5000) == 5000.0
    assert capacity_per_min({"ewma_latency_ms": 0.0, "max_connections": 10}, 42) == 42.0


def test_the_session_cookie_is_derived_from_the_token_and_is_not_the_token() -> None:
    value = session_value("a-token-of-twenty-chars")
    assert value != "a-token-of-twenty-chars"
    assert "a-token" not in value
    assert value == session_value("a-token-of-twenty-chars")
    assert value != session_value("another-token-of-twenty")
