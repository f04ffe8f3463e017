"""The pool caches who is usable between state changes: each change must show at the very next pick.

Every test first lets the pool work out and cache its choice (a pick), then makes one change, then
checks the next pick against the choice worked out from scratch by `expected` (the pool's rules before
the cache). A cache that misses one of these would keep picking from a stale set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from postmux.balancing.health import FailureKind
from postmux.balancing.member import Member
from postmux.balancing.policies import HashPolicy, LeastLatencyPolicy
from postmux.balancing.pool import Pool
from postmux.config import MemberSettings, PoolSettings

View = list[tuple[str, float, int]]  # (name, effective weight, connection cap) of each usable member


def settings_for(members: Sequence[dict[str, Any]], **pool: Any) -> PoolSettings:
    return PoolSettings.model_validate(
        {
            "name": "p",
            "policy": "weighted",
            "members": [{"address": f"127.0.0.1:{2601 + i}", **m} for i, m in enumerate(members)],
            "health": {"consecutive_failures": 2, "base_ejection_time": 10, **pool.pop("health", {})},
            **pool,
        }
    )


def three(**pool: Any) -> Pool:
    return Pool(settings_for([{"name": n} for n in "abc"], **pool))


def share(m: Member, now: float, slow_start: float) -> float:
    if m.ramp_started is None or slow_start <= 0:
        return 1.0
    progress = (now - m.ramp_started) / slow_start
    return 1.0 if progress >= 1.0 else max(0.1, progress)


def expected(pool: Pool, now: float) -> View:
    """The usable set worked out from the members' state alone, as Pool did before it cached it."""
    live = [m for m in pool.members if not m.draining and not m.removed and m.weight > 0]
    tiers: dict[tuple[bool, int], list[Member]] = {}
    for m in live:
        tiers.setdefault(m.tier, []).append(m)
    health = sum(sum(m.healthy(now) for m in ms) / len(ms) for ms in tiers.values())
    healthy = [m for m in live if m.healthy(now)]
    if not tiers or min(1.0, health) >= pool.settings.health.panic_threshold:
        live = healthy
    elif healthy:  # panic: the whole of the best tier that has a healthy member
        live = [m for m in live if m.tier == min(h.tier for h in healthy)]
    if not live:
        return []
    best = min(m.tier for m in live)
    slow = pool.settings.slow_start
    return [
        (m.name, m.weight * share(m, now, slow), max(1, math.ceil(m.max_connections * share(m, now, slow))))
        for m in live
        if m.tier == best
    ]


class Spy:
    """A policy that records what the pool handed it and picks the first candidate."""

    def __init__(self) -> None:
        self.everyone: list[Member] = []
        self.candidates: list[Member] = []

    def pick(
        self, candidates: Sequence[Member], key: str, everyone: Sequence[Member], now: float | None = None
    ) -> Member | None:
        self.candidates, self.everyone = list(candidates), list(everyone)
        return candidates[0]


def picked_view(pool: Pool, now: float) -> View:
    """What the next pick sees: the usable members with their weight and cap, via a spy policy."""
    spy = Spy()
    pool.policy = spy
    member = pool.pick("k", now)
    if member is None:  # everyone busy (or nobody usable): the pool's own view, then
        usable = pool.usable(now)
        assert all(m.in_flight >= m.connection_cap for m in usable)
        return [(m.name, m.effective_weight, m.connection_cap) for m in usable]
    assert spy.candidates == [m for m in spy.everyone if m.in_flight < m.connection_cap]
    return [(m.name, m.effective_weight, m.connection_cap) for m in spy.everyone]


def assert_fresh(pool: Pool, now: float) -> View:
    got = picked_view(pool, now)
    assert got == expected(pool, now)
    return got


def names(view: View) -> set[str]:
    return {name for name, _, _ in view}


# -- each trigger, one by one ---------------------------------------------------------------------------


def test_an_ejection_takes_the_member_out_at_the_next_pick() -> None:
    p = three()
    assert names(assert_fresh(p, 1.0)) == {"a", "b", "c"}
    p.record_failure(p.member("a"), 1.0)
    p.record_failure(p.member("a"), 1.0)
    assert names(assert_fresh(p, 1.0)) == {"b", "c"}


def test_the_end_of_an_ejection_brings_the_member_back_at_exactly_that_time() -> None:
    p = three()
    a = p.member("a")
    p.record_failure(a, 0.0)
    p.record_failure(a, 0.0)  # ejected until 10.0
    assert names(assert_fresh(p, 9.999)) == {"b", "c"}  # cached now, with nothing else to change it
    assert names(assert_fresh(p, 10.0)) == {"a", "b", "c"}


def test_a_member_ejected_directly_is_seen_without_the_pool_being_told() -> None:
    p = three()
    assert_fresh(p, 0.0)
    p.member("b").ejected_until = 5.0  # any write to the field tells the pool
    assert names(assert_fresh(p, 1.0)) == {"a", "c"}
    assert names(assert_fresh(p, 5.0)) == {"a", "b", "c"}


def test_failing_checks_take_a_member_out_and_passing_checks_bring_it_back() -> None:
    p = three(check={"enabled": True, "rise": 2, "fall": 1})
    b = p.member("b")
    assert_fresh(p, 0.0)
    p.record_check(b, False, 0.0, "refused")
    assert names(assert_fresh(p, 0.0)) == {"a", "c"}
    p.record_check(b, True, 1.0)
    assert names(assert_fresh(p, 1.0)) == {"a", "c"}  # one pass of the two needed
    p.record_check(b, True, 2.0)
    assert names(assert_fresh(p, 2.0)) == {"a", "b", "c"}


def test_checks_reset_by_the_app_bring_a_member_back() -> None:
    p = three()
    p.member("c").check_up = False
    assert names(assert_fresh(p, 0.0)) == {"a", "b"}
    p.member("c").check_up = True  # what App.sync_checkers does when checks are turned off
    assert names(assert_fresh(p, 0.0)) == {"a", "b", "c"}


def test_drain_and_enable_show_at_the_next_pick() -> None:
    p = three()
    assert_fresh(p, 0.0)
    p.member("a").draining = True
    assert names(assert_fresh(p, 0.0)) == {"b", "c"}
    p.member("a").draining = False
    assert names(assert_fresh(p, 0.0)) == {"a", "b", "c"}


def test_a_member_of_a_removed_pool_is_picked_no_more() -> None:
    p = three()
    assert_fresh(p, 0.0)
    for m in p.members:
        m.removed = True  # Control.apply, when the pool leaves the configuration
    assert p.pick("k", 0.0) is None


def test_reconfigure_reweights_adds_removes_and_retiers() -> None:
    p = three()
    assert_fresh(p, 0.0)
    p.reconfigure(settings_for([{"name": "a", "weight": 3}, {"name": "b"}, {"name": "d"}]), 1.0)
    view = assert_fresh(p, 1.0)
    assert dict((n, w) for n, w, _ in view) == {"a": 3.0, "b": 1.0, "d": 1.0}
    p.reconfigure(settings_for([{"name": "a", "backup": True}, {"name": "b", "priority": 2}]), 2.0)
    assert names(assert_fresh(p, 2.0)) == {"b"}  # a went to the backups, b stays a primary
    p.reconfigure(settings_for([{"name": "a"}, {"name": "b", "max_connections": 3}]), 3.0)
    assert dict((n, c) for n, _, c in assert_fresh(p, 3.0)) == {"a": 10, "b": 3}


def test_a_removed_member_with_work_in_flight_is_picked_no_more_then_pruned() -> None:
    p = three()
    c = p.member("c")
    c.in_flight = 1
    assert_fresh(p, 0.0)
    p.reconfigure(settings_for([{"name": "a"}, {"name": "b"}]), 1.0)
    assert names(assert_fresh(p, 1.0)) == {"a", "b"} and c in p.members
    c.in_flight = 0
    p.prune()
    assert c not in p.members and names(assert_fresh(p, 1.0)) == {"a", "b"}


def test_a_panic_threshold_change_by_reload_shows_at_once() -> None:
    p = three(health={"panic_threshold": 0.2})
    for name in "ab":
        p.member(name).check_up = False
    assert names(assert_fresh(p, 0.0)) == {"c"}  # health 1/3, above the threshold
    p.reconfigure(settings_for([{"name": n} for n in "abc"], health={"panic_threshold": 0.5}), 0.0)
    assert names(assert_fresh(p, 0.0)) == {"a", "b", "c"}  # in panic now: everyone


def test_weights_follow_the_ramp_pick_by_pick_and_the_end_of_the_ramp_clears_it() -> None:
    p = three(slow_start=10)
    a = p.member("a")
    p.record_failure(a, 0.0)
    p.record_failure(a, 0.0)
    assert_fresh(p, 10.0)  # back, ramping from 10.0
    assert a.ramp_started == 10.0
    for now in (11.0, 12.5, 15.0, 19.9):
        assert assert_fresh(p, now)[0] == ("a", pytest_approx(now - 10.0), math.ceil(10 * (now - 10) / 10))
    assert assert_fresh(p, 20.0)[0] == ("a", 1.0, 10)
    assert a.ramp_started is None
    assert p._choice is None or not p._choice.ramping  # the ramp's end was a state change


def pytest_approx(progress: float) -> float:
    return max(0.1, progress / 10)


def test_an_added_member_ramps_under_slow_start() -> None:
    p = three(slow_start=10)
    assert_fresh(p, 0.0)
    p.reconfigure(settings_for([{"name": n} for n in "abcd"], slow_start=10), 5.0)
    assert dict((n, w) for n, w, _ in assert_fresh(p, 6.0))["d"] == 0.1
    assert dict((n, w) for n, w, _ in assert_fresh(p, 10.0))["d"] == 0.5


def test_the_success_rate_sweep_ejects_from_inside_a_pick() -> None:
    health = {
        "success_rate_min_members": 3,
        "success_rate_min_attempts": 5,
        "success_rate_interval": 10,
        "success_rate_stdev_factor": 1.0,
    }
    p = three(health=health)
    p.start_sweeping(0.0)
    assert_fresh(p, 1.0)
    for m in p.members:
        for _ in range(10):  # straight to the window counts: no consecutive-failure ejection
            if m.name == "c":
                p.health.record_failure(m, FailureKind.LOCAL)
                m.consecutive_failures = 0
            else:
                p.health.record_success(m, 1.0)
    assert names(assert_fresh(p, 9.0)) == {"a", "b", "c"}
    assert names(assert_fresh(p, 10.0)) == {"a", "b"}  # the sweep ran inside this pick


def test_time_going_backwards_works_the_choice_out_again() -> None:
    p = three()
    a = p.member("a")
    a.ejected_until = 10.0
    assert names(assert_fresh(p, 20.0)) == {"a", "b", "c"}
    assert names(assert_fresh(p, 5.0)) == {"b", "c"}  # a test clock may step back: still right


def test_excluded_members_and_the_fallback_to_a_lower_tier_still_apply() -> None:
    p = Pool(settings_for([{"name": "a"}, {"name": "b", "backup": True}]))
    assert p.pick("k", 0.0) is p.member("a")
    assert p.pick("k", 0.0, exclude={"a"}) is p.member("b")
    assert p.pick("k", 0.0) is p.member("a")


# -- policies that read cached or decayed state ---------------------------------------------------------


def test_least_latency_decays_the_two_members_it_compares_to_the_pick_time() -> None:
    p = Pool(settings_for([{"name": "a"}, {"name": "b"}], policy="least_latency", latency_decay=10))
    a, b = p.members
    a.observe_latency(1.0, 0.0, 10.0)
    b.observe_latency(0.5, 100.0, 10.0)
    # At 100 a's average has faded to 1.0 x e^-10, far below b's fresh 0.5: a must win every pair.
    assert all(p.pick("k", 100.0) is a for _ in range(20))
    assert a.latency_now_s == a.latency_at(100.0, 10.0) and b.latency_now_s == b.latency_at(100.0, 10.0)


def test_a_reload_that_changes_only_the_latency_decay_reaches_the_policy() -> None:
    p = Pool(settings_for([{"name": "a"}, {"name": "b"}], policy="least_latency", latency_decay=10))
    p.reconfigure(settings_for([{"name": "a"}, {"name": "b"}], policy="least_latency", latency_decay=1), 0.0)
    assert isinstance(p.policy, LeastLatencyPolicy) and p.policy.decay_s == 1.0


def test_hash_rebuilds_its_ring_for_a_new_list_or_a_list_that_grew() -> None:
    def member(name: str, weight: int = 1) -> Member:
        return Member(MemberSettings(name=name, address="127.0.0.1:2601", weight=weight), "p")

    policy = HashPolicy(100.0)
    ms = [member("a"), member("b")]
    keys = [f"d{i}.example" for i in range(200)]
    before = {k: policy.pick(ms, k, ms).name for k in keys}  # type: ignore[union-attr]
    assert set(before.values()) == {"a", "b"}
    heavier = [member("a", weight=50), ms[1]]
    after = {k: policy.pick(heavier, k, heavier).name for k in keys}  # type: ignore[union-attr]
    assert sum(v == "a" for v in after.values()) > sum(v == "a" for v in before.values())
    ms.append(member("c"))  # the same list object, one more member
    assert "c" in {policy.pick(ms, k, ms).name for k in keys}  # type: ignore[union-attr]


def test_the_pool_hands_hash_a_new_list_when_a_weight_changes() -> None:
    p = Pool(settings_for([{"name": "a"}, {"name": "b"}], policy="hash"))
    keys = [f"d{i}.example" for i in range(200)]
    before = sum(p.pick(k, 0.0) is p.member("a") for k in keys)
    p.reconfigure(settings_for([{"name": "a", "weight": 50}, {"name": "b"}], policy="hash"), 0.0)
    after = sum(p.pick(k, 0.0) is p.member("a") for k in keys)
    assert after > before


# -- everything at once, in random order ----------------------------------------------------------------

OPS = st.one_of(
    st.tuples(st.just("wait"), st.integers(0, 12)),
    st.tuples(st.just("fail"), st.integers(0, 3)),
    st.tuples(st.just("succeed"), st.integers(0, 3)),
    st.tuples(st.just("check"), st.integers(0, 3), st.booleans()),
    st.tuples(st.just("drain"), st.integers(0, 3), st.booleans()),
    st.tuples(st.just("load"), st.integers(0, 3), st.integers(0, 6)),
    st.tuples(st.just("reload"), st.integers(0, 3), st.integers(0, 3), st.booleans(), st.integers(0, 1)),
    st.tuples(st.just("drop"), st.integers(0, 3)),
)

BASE = [
    {"name": "a", "max_connections": 5},
    {"name": "b", "weight": 2, "max_connections": 5},
    {"name": "c", "priority": 2, "max_connections": 5},
    {"name": "d", "backup": True, "max_connections": 5},
]


@settings(max_examples=300, deadline=None)
@given(st.lists(OPS, max_size=40), st.sampled_from([0, 5]))
def test_the_cached_choice_always_equals_the_one_worked_out_from_scratch(
    ops: list[tuple[Any, ...]], slow_start: int
) -> None:
    extra = {"slow_start": slow_start, "check": {"enabled": True, "rise": 1, "fall": 1}}
    configured = [dict(m) for m in BASE]
    p = Pool(settings_for(configured, **extra))
    now = 0.0
    for op in ops:
        names_now = [m.name for m in p.members]
        match op:
            case ("wait", dt):
                now += dt
            case ("fail", i) if i < len(names_now):
                p.record_failure(p.member(names_now[i]), now)
            case ("succeed", i) if i < len(names_now):
                p.record_success(p.member(names_now[i]), now)
            case ("check", i, passed) if i < len(names_now):
                p.record_check(p.member(names_now[i]), passed, now)
            case ("drain", i, on) if i < len(names_now):
                p.member(names_now[i]).draining = on
            case ("load", i, n) if i < len(names_now):
                p.member(names_now[i]).in_flight = n
            case ("reload", i, weight, backup, priority) if i < len(configured):
                configured[i] = {**configured[i], "weight": weight, "backup": backup, "priority": priority}
                if any(m.get("weight", 1) > 0 for m in configured):
                    p.reconfigure(settings_for(configured, **extra), now)
            case ("drop", i) if i < len(configured) and len(configured) > 1:
                gone = configured.pop(i)
                if any(m.get("weight", 1) > 0 for m in configured):
                    p.reconfigure(settings_for(configured, **extra), now)
                else:
                    configured.insert(i, gone)
        assert_fresh(p, now)
