"""Health as plain functions of state: outlier ejection, success rate, slow start, active-check bookkeeping,
peak EWMA latency and least_latency. No sockets; every call is given its `now`."""

from __future__ import annotations

import math
import random
from collections import Counter
from typing import Any

import pytest

from postmux.balancing.health import FailureKind, PassiveHealth
from postmux.balancing.member import Member
from postmux.balancing.policies import LeastLatencyPolicy
from postmux.balancing.pool import Pool
from postmux.config import HealthSettings, MemberSettings, PoolSettings

LOCAL = FailureKind.LOCAL
REPLY_4XX = FailureKind.REPLY_4XX

Change = tuple[str, bool, str]


def make_pool(
    n: int = 3,
    *,
    policy: str = "weighted",
    health: dict[str, Any] | None = None,
    check: dict[str, Any] | None = None,
    **pool: Any,
) -> tuple[Pool, list[Change]]:
    """A pool of members a, b, c, ... (weight 1, max_connections 10) and the list its on_change fills."""
    settings = PoolSettings.model_validate(
        {
            "name": "p",
            "policy": policy,
            "members": [{"name": chr(ord("a") + i), "address": f"127.0.0.1:{2601 + i}"} for i in range(n)],
            "health": health or {},
            "check": check or {},
            **pool,
        }
    )
    changes: list[Change] = []
    p = Pool(settings, lambda m, up, reason: changes.append((m.name, up, reason)))
    return p, changes


def lone_member(latency_s: float | None = None, *, name: str = "m", weight: int = 1) -> Member:
    m = Member(MemberSettings(name=name, address="127.0.0.1:2601", weight=weight), "p")
    if latency_s is not None:
        m.observe_latency(latency_s, now=1.0, decay_s=10.0)
        m.latency_now_s = m.latency_at(1.0, 10.0)  # as the pool sets it just before a pick
    return m


def names(members: list[Member]) -> set[str]:
    return {m.name for m in members}


# -- consecutive failures ------------------------------------------------------------------------------


def test_consecutive_local_failures_eject_and_a_success_resets_the_count() -> None:
    p, changes = make_pool(health={"consecutive_failures": 3, "base_ejection_time": 10})
    a = p.member("a")
    p.record_failure(a, 1, LOCAL)
    p.record_failure(a, 2, LOCAL)
    p.record_success(a, 3)
    p.record_failure(a, 4, LOCAL)
    p.record_failure(a, 5, LOCAL)
    assert not a.ejected(5) and changes == []
    p.record_failure(a, 6, LOCAL)
    assert a.ejected(6) and a.ejected_until == 16
    assert changes == [("a", False, "ejected: 3 local failures in a row")]
    assert names(p.usable(7)) == {"b", "c"}


def test_consecutive_4xx_attempts_eject_by_their_own_threshold() -> None:
    p, changes = make_pool(health={"consecutive_failures": 2, "consecutive_4xx": 4})
    a = p.member("a")
    for t in range(3):
        p.record_failure(a, t, REPLY_4XX)
    # three 4xx-only attempts are past consecutive_failures (2) but not consecutive_4xx (4)
    assert not a.ejected(3) and a.consecutive_failures == 0
    p.record_failure(a, 3, REPLY_4XX)
    assert a.ejected(3)
    assert changes == [("a", False, "ejected: 4 attempts in a row refused with 4xx")]


def test_a_local_failure_does_not_reset_the_4xx_count_nor_a_4xx_the_local_count() -> None:
    p, changes = make_pool(health={"consecutive_failures": 3, "consecutive_4xx": 3})
    a = p.member("a")
    for t, kind in enumerate([LOCAL, REPLY_4XX, LOCAL, REPLY_4XX]):
        p.record_failure(a, t, kind)
    assert (a.consecutive_failures, a.consecutive_4xx) == (2, 2)
    assert not a.ejected(4)
    p.record_failure(a, 4, LOCAL)
    assert a.ejected(4)
    assert changes == [("a", False, "ejected: 3 local failures in a row")]

    b = p.member("b")
    # max_ejection_percent (50% of 3 -> 1) would refuse b while a is out, so wait for a to come back.
    now = a.ejected_until
    for kind in [REPLY_4XX, LOCAL, REPLY_4XX, LOCAL, REPLY_4XX]:
        p.record_failure(b, now, kind)
    assert b.ejected(now)
    assert changes[-1] == ("b", False, "ejected: 3 attempts in a row refused with 4xx")


def test_a_success_resets_both_counts_and_an_ejection_starts_from_clean_counts() -> None:
    p, _ = make_pool(health={"consecutive_failures": 3, "consecutive_4xx": 3})
    a = p.member("a")
    for t, kind in enumerate([LOCAL, LOCAL, REPLY_4XX, REPLY_4XX]):
        p.record_failure(a, t, kind)
    p.record_success(a, 4)
    assert (a.consecutive_failures, a.consecutive_4xx) == (0, 0)
    p.record_failure(a, 5, LOCAL)
    p.record_failure(a, 6, REPLY_4XX)
    assert not a.ejected(6)
    p.record_failure(a, 7, LOCAL)
    p.record_failure(a, 8, LOCAL)
    assert a.ejected(8)
    # the 4xx count is cleared too, so one 4xx-only attempt after coming back does not re-eject
    assert (a.consecutive_failures, a.consecutive_4xx) == (0, 0)


def test_every_attempt_counts_in_the_success_rate_window() -> None:
    p, _ = make_pool(health={"consecutive_failures": 100, "consecutive_4xx": 100})
    a = p.member("a")
    p.record_success(a, 0)
    p.record_failure(a, 1, LOCAL)
    p.record_failure(a, 2, REPLY_4XX)
    p.record_success(a, 3)
    assert (a.window_attempts, a.window_successes) == (4, 2)


# -- ejection time -------------------------------------------------------------------------------------


def test_ejection_time_is_base_times_the_ejection_count_capped() -> None:
    health = PassiveHealth(HealthSettings(base_ejection_time=30, max_ejection_time=100))
    assert [health.ejection_time(n) for n in range(6)] == [30, 30, 60, 90, 100, 100]


def test_4xx_ejections_grow_too_and_are_forgiven_by_a_success_after_returning() -> None:
    p, _ = make_pool(
        health={"consecutive_4xx": 1, "base_ejection_time": 10, "max_ejection_time": 35},
    )
    a = p.member("a")
    now = 0.0
    lengths = []
    for _ in range(5):
        p.record_failure(a, now, REPLY_4XX)
        lengths.append(a.ejected_until - now)
        now = a.ejected_until
    assert lengths == [10, 20, 30, 35, 35]
    assert a.ejections == 5

    # a success while still ejected (panic traffic) forgives nothing
    p.record_failure(a, now, REPLY_4XX)
    p.record_success(a, now + 1)
    assert a.ejections == 6
    now = a.ejected_until
    p.record_success(a, now)
    assert a.ejections == 0
    p.record_failure(a, now, REPLY_4XX)
    assert a.ejected_until - now == 10


# -- max_ejection_percent ------------------------------------------------------------------------------


def test_max_ejection_percent_holds_back_a_second_ejection_until_the_first_ends() -> None:
    p, changes = make_pool(
        3, health={"consecutive_failures": 2, "base_ejection_time": 10, "max_ejection_percent": 50}
    )
    a, b = p.member("a"), p.member("b")
    p.record_failure(a, 0)
    p.record_failure(a, 0)
    p.record_failure(b, 1)
    p.record_failure(b, 1)
    p.record_failure(b, 2)
    # floor(3 x 50%) = 1: b has failed past the threshold but stays in
    assert a.ejected(2) and not b.ejected(2)
    assert [c[:2] for c in changes] == [("a", False)]
    assert names(p.usable(3)) == {"b", "c"}
    # once a is back, b's next failure (its count was kept) ejects it
    assert names(p.usable(10)) == {"a", "b", "c"}
    p.record_failure(b, 10)
    assert b.ejected(10) and not a.ejected(10)
    assert [c[:2] for c in changes] == [("a", False), ("a", True), ("b", False)]


@pytest.mark.parametrize(
    ("members", "percent", "ejectable"),
    [(3, 50, 1), (3, 0, 1), (3, 34, 1), (3, 67, 2), (3, 100, 3), (4, 50, 2), (10, 25, 2)],
)
def test_max_ejection_percent_limit_is_floor_of_the_share_but_at_least_one(
    members: int, percent: float, ejectable: int
) -> None:
    p, _ = make_pool(members, health={"consecutive_failures": 1, "max_ejection_percent": percent})
    for m in p.members:
        p.record_failure(m, 0)
    assert sum(m.ejected(0) for m in p.members) == ejectable


# -- success rate --------------------------------------------------------------------------------------


def rate_pool(n: int, **health: Any) -> tuple[Pool, list[Change]]:
    """Consecutive rules out of the way, so only the success-rate rule can eject."""
    settings = {
        "consecutive_failures": 10_000,
        "consecutive_4xx": 10_000,
        "success_rate_min_attempts": 100,
        "max_ejection_percent": 100,
        **health,
    }
    return make_pool(n, health=settings)


def feed(p: Pool, m: Member, successes: int, attempts: int, now: float) -> None:
    for _ in range(successes):
        p.record_success(m, now)
    for _ in range(attempts - successes):
        p.record_failure(m, now, REPLY_4XX)


def test_success_rate_ejects_only_the_member_far_below_the_pool_with_a_reason() -> None:
    p, changes = rate_pool(5)
    for m in p.members:
        feed(p, m, 60 if m.name == "e" else 99, 100, now=1)
    # rates .99 x4 and .60: mean .912, stdev .156, floor .912 - 1.9 x .156 = .6156
    p.sweep(10)
    assert [m.name for m in p.members if m.ejected(10)] == ["e"]
    assert changes == [("e", False, "ejected: success rate 60% below the pool's floor 62%")]
    assert all(m.window_attempts == m.window_successes == 0 for m in p.members)


def test_a_lone_outlier_among_four_is_at_most_sqrt3_stdevs_below_the_mean() -> None:
    # With one member apart and the others equal, its z-score is sqrt(n - 1) whatever its rate:
    # 1.73 among four, so the default factor 1.9 never ejects it, and 1.5 does.
    strict, _ = rate_pool(4, success_rate_min_members=4)
    for m in strict.members:
        feed(strict, m, 0 if m.name == "d" else 100, 100, now=1)
    strict.sweep(10)
    assert not any(m.ejected(10) for m in strict.members)

    loose, changes = rate_pool(4, success_rate_stdev_factor=1.5, success_rate_min_members=4)
    for m in loose.members:
        feed(loose, m, 60 if m.name == "d" else 99, 100, now=1)
    loose.sweep(10)
    assert [m.name for m in loose.members if m.ejected(10)] == ["d"]
    assert changes == [("d", False, "ejected: success rate 60% below the pool's floor 64%")]


def test_default_success_rate_settings_can_eject_at_the_minimum_member_count() -> None:
    defaults = HealthSettings()
    p, _ = rate_pool(defaults.success_rate_min_members, success_rate_min_attempts=10)
    for i, m in enumerate(p.members):
        feed(p, m, 0 if i == 0 else 10, 10, now=1)
    p.sweep(10)
    assert p.members[0].ejected(10)


def test_success_rate_ignores_members_below_min_attempts() -> None:
    p, changes = rate_pool(5, success_rate_stdev_factor=1.0)
    for m in p.members:
        feed(p, m, 0 if m.name == "e" else 99, 99, now=1)  # one short of min_attempts (100)
    p.sweep(10)
    assert changes == []
    assert not any(m.ejected(10) for m in p.members)


def test_success_rate_needs_min_members_rated_members() -> None:
    def run(min_members: int) -> list[Change]:
        p, changes = rate_pool(5, success_rate_stdev_factor=1.0, success_rate_min_members=min_members)
        for m in p.members:
            # e has too few attempts to be rated: four rated members, d the outlier
            feed(p, m, {"d": 50, "e": 10}.get(m.name, 99), 10 if m.name == "e" else 100, now=1)
        p.sweep(10)
        return changes

    assert run(5) == []
    assert [c[:2] for c in run(4)] == [("d", False)]


def test_success_rate_windows_start_over_after_each_sweep() -> None:
    p, changes = rate_pool(5)
    for _ in range(2):
        for m in p.members:
            # 60 attempts per interval: 120 over both would be rated, but each window holds only 60
            feed(p, m, 0 if m.name == "e" else 60, 60, now=1)
        p.sweep(10)
        assert all(m.window_attempts == 0 for m in p.members)
    assert changes == []


def test_the_sweep_runs_from_picks_once_its_interval_has_passed() -> None:
    p, changes = rate_pool(5, success_rate_interval=10)
    p.start_sweeping(0)
    for m in p.members:
        feed(p, m, 60 if m.name == "e" else 99, 100, now=1)
    assert names(p.usable(9.9)) == {"a", "b", "c", "d", "e"}
    assert changes == []
    assert names(p.usable(10)) == {"a", "b", "c", "d"}
    assert [c[:2] for c in changes] == [("e", False)]


def test_success_rate_ejections_respect_max_ejection_percent() -> None:
    p, changes = rate_pool(10, success_rate_stdev_factor=1.0, max_ejection_percent=10)
    for m in p.members:
        feed(p, m, 50 if m.name in ("a", "b") else 99, 100, now=1)
    p.sweep(10)
    assert [m.name for m in p.members if m.ejected(10)] == ["a"]
    assert [c[:2] for c in changes] == [("a", False)]


# -- slow start ----------------------------------------------------------------------------------------


def eject_a_until_10(slow_start: float) -> tuple[Pool, list[Change]]:
    p, changes = make_pool(
        3, slow_start=slow_start, health={"consecutive_failures": 1, "base_ejection_time": 10}
    )
    p.record_failure(p.member("a"), 0)
    assert names(p.usable(5)) == {"b", "c"}
    return p, changes


def test_slow_start_ramps_weight_and_connections_from_a_tenth_to_full() -> None:
    p, changes = eject_a_until_10(slow_start=10)
    a = p.member("a")
    assert names(p.usable(10)) == {"a", "b", "c"}
    assert changes[-1] == ("a", True, "ejection time over")
    assert a.ramp_started == 10
    ramp = []
    for t in (10, 11, 12.5, 15, 19, 20, 30):
        p.usable(t)
        ramp.append((a.effective_weight, p.max_connections(a, t)))
    assert ramp == [(0.1, 1), (0.1, 1), (0.25, 3), (0.5, 5), (0.9, 9), (1.0, 10), (1.0, 10)]
    assert a.ramp_started is None
    assert p.member("b").effective_weight == 1.0


def test_without_slow_start_a_returning_member_has_its_full_weight_at_once() -> None:
    p, _ = eject_a_until_10(slow_start=0)
    a = p.member("a")
    p.usable(10)
    assert a.ramp_started is None
    assert (a.effective_weight, p.max_connections(a, 10)) == (1.0, 10)


def test_weighted_picks_follow_the_slow_start_ramp() -> None:
    p, _ = eject_a_until_10(slow_start=10)
    assert names(p.usable(10)) == {"a", "b", "c"}

    def share(now: float, picks: int = 420) -> int:
        got = Counter(m.name for m in (p.pick("", now) for _ in range(picks)) if m)
        return got["a"]

    # at +1 s a's weight is 0.1 of b's and c's: 0.1 / 2.1 of 420 picks is 20, against 140 at full share
    assert 18 <= share(11) <= 22
    assert 139 <= share(21) <= 141


def test_a_ramping_member_at_its_reduced_connection_limit_is_not_picked() -> None:
    p, _ = eject_a_until_10(slow_start=10)
    a = p.member("a")
    p.usable(10)
    a.in_flight = 1  # the limit at +1 s: ceil(10 x 0.1)
    assert {p.pick("", 11).name for _ in range(20)} == {"b", "c"}  # type: ignore[union-attr]
    assert "a" in {p.pick("", 15).name for _ in range(20)}  # type: ignore[union-attr]


def test_slow_start_also_follows_a_return_from_failing_checks() -> None:
    p, _ = make_pool(3, slow_start=20, check={"enabled": True, "rise": 1, "fall": 1})
    a = p.member("a")
    p.record_check(a, False, 0)
    p.record_check(a, True, 100)
    assert a.ramp_started == 100
    p.usable(110)
    assert (a.effective_weight, p.max_connections(a, 110)) == (0.5, 5)


# -- active checks -------------------------------------------------------------------------------------


def test_fall_failed_checks_in_a_row_take_a_member_out_and_rise_passes_bring_it_back() -> None:
    p, changes = make_pool(3, check={"enabled": True, "rise": 2, "fall": 3})
    a = p.member("a")
    p.record_check(a, False, 1, "connection refused")
    p.record_check(a, False, 2, "connection refused")
    p.record_check(a, True, 3)  # breaks the run of failures
    p.record_check(a, False, 4, "connection refused")
    p.record_check(a, False, 5, "connection refused")
    assert a.check_up and changes == []
    p.record_check(a, False, 6, "connection refused")
    assert not a.check_up
    assert changes == [("a", False, "3 checks failed: connection refused")]
    assert not a.healthy(6)
    assert names(p.usable(6)) == {"b", "c"}
    p.record_check(a, False, 7, "timeout")  # already out: no second announcement
    assert len(changes) == 1

    p.record_check(a, True, 8)
    p.record_check(a, False, 9, "timeout")  # breaks the run of passes
    p.record_check(a, True, 10)
    assert not a.check_up and names(p.usable(10)) == {"b", "c"}
    p.record_check(a, True, 11)
    assert a.check_up and a.healthy(11)
    assert changes[-1] == ("a", True, "2 checks passed")
    assert names(p.usable(11)) == {"a", "b", "c"}


def test_a_check_failure_without_detail_gives_a_clean_reason() -> None:
    p, changes = make_pool(3, check={"enabled": True, "fall": 1})
    p.record_check(p.member("a"), False, 1)
    assert changes == [("a", False, "1 checks failed")]


def test_usable_needs_both_passing_checks_and_no_ejection() -> None:
    p, _ = make_pool(
        4, check={"enabled": True, "fall": 1}, health={"consecutive_failures": 1, "base_ejection_time": 10}
    )
    a, b, c = p.member("a"), p.member("b"), p.member("c")
    p.record_check(a, False, 0)
    p.record_failure(b, 0)
    p.record_check(c, True, 0)
    assert [m.healthy(1) for m in p.members] == [False, False, True, True]
    assert names(p.usable(1)) == {"c", "d"}


def test_members_failing_checks_count_as_unhealthy_for_the_panic_threshold() -> None:
    p, _ = make_pool(3, check={"enabled": True, "fall": 1}, health={"panic_threshold": 0.5})
    p.record_check(p.member("a"), False, 0)
    assert not p.in_panic(0)  # 2/3 healthy
    assert names(p.usable(0)) == {"b", "c"}
    p.record_check(p.member("b"), False, 0)
    assert p.in_panic(0)  # 1/3 healthy: everyone is used
    assert names(p.usable(0)) == {"a", "b", "c"}


def test_an_ejection_ending_while_checks_fail_does_not_announce_the_member_up() -> None:
    p, changes = make_pool(
        3, check={"enabled": True, "fall": 1}, health={"consecutive_failures": 1, "base_ejection_time": 10}
    )
    a = p.member("a")
    p.record_failure(a, 0)
    p.record_check(a, False, 1, "timeout")
    assert "a" not in names(p.usable(10))
    assert not any(name == "a" and up for name, up, _ in changes)


def test_checks_passing_again_during_an_ejection_do_not_announce_the_member_up() -> None:
    p, changes = make_pool(
        3,
        check={"enabled": True, "rise": 1, "fall": 1},
        health={"consecutive_failures": 1, "base_ejection_time": 100},
    )
    a = p.member("a")
    p.record_check(a, False, 1, "timeout")
    p.record_failure(a, 2)
    p.record_check(a, True, 3)
    assert "a" not in names(p.usable(4))
    assert not any(name == "a" and up for name, up, _ in changes)


# -- peak EWMA latency ---------------------------------------------------------------------------------


def test_peak_ewma_takes_a_slower_sample_at_once_and_decays_toward_faster_ones() -> None:
    m = lone_member()
    m.observe_latency(1.0, now=100, decay_s=10)
    assert m.ewma_latency_s == 1.0
    m.observe_latency(3.0, now=101, decay_s=10)
    assert m.ewma_latency_s == 3.0  # the peak counts at once, however little time passed
    m.observe_latency(1.0, now=111, decay_s=10)
    assert m.ewma_latency_s == pytest.approx(3.0 * math.exp(-1) + 1.0 * (1 - math.exp(-1)))
    before = m.ewma_latency_s
    m.observe_latency(1.0, now=111, decay_s=10)
    assert m.ewma_latency_s == pytest.approx(before)  # no time passed: a faster sample moves nothing
    m.observe_latency(0.5, now=141, decay_s=10)
    assert m.ewma_latency_s == pytest.approx(before * math.exp(-3) + 0.5 * (1 - math.exp(-3)))
    assert m.ewma_at == 141


def test_a_longer_decay_forgets_more_slowly_and_zero_decay_forgets_at_once() -> None:
    slow, fast, none = lone_member(), lone_member(), lone_member()
    for m, decay in ((slow, 100.0), (fast, 1.0), (none, 0.0)):
        m.observe_latency(2.0, now=10, decay_s=decay)
        m.observe_latency(1.0, now=15, decay_s=decay)
    assert slow.ewma_latency_s == pytest.approx(2.0 * math.exp(-0.05) + 1.0 * (1 - math.exp(-0.05)))
    assert fast.ewma_latency_s == pytest.approx(2.0 * math.exp(-5) + 1.0 * (1 - math.exp(-5)))
    assert none.ewma_latency_s == 1.0


def test_a_sample_at_time_zero_still_counts_as_a_sample() -> None:
    m = lone_member()
    m.observe_latency(5.0, now=0.0, decay_s=10)
    m.observe_latency(1.0, now=10.0, decay_s=10)
    assert m.ewma_latency_s == pytest.approx(5.0 * math.exp(-1) + 1.0 * (1 - math.exp(-1)))


# -- least_latency -------------------------------------------------------------------------------------


def picks(policy: LeastLatencyPolicy, ms: list[Member], n: int = 1000) -> Counter[str]:
    return Counter(m.name for m in (policy.pick(ms, "", ms) for _ in range(n)) if m)


def test_least_latency_never_picks_the_slowest_when_idle_since_p2c_always_pairs_it_lower() -> None:
    # Two of three are drawn each time; the slowest is in two pairs out of three and loses both.
    ms = [lone_member(0.1, name="a"), lone_member(0.1, name="b"), lone_member(1.0, name="slow")]
    got = picks(LeastLatencyPolicy(random.Random(1)), ms)
    assert got["slow"] == 0
    assert got["a"] + got["b"] == 1000
    assert 400 <= got["a"] <= 600  # ties go to the first of the pair, drawn at random


def test_least_latency_sends_to_a_slow_member_once_the_fast_ones_are_loaded() -> None:
    ms = [lone_member(0.1, name="a"), lone_member(0.1, name="b"), lone_member(1.0, name="slow")]
    fast_a, fast_b = ms[0], ms[1]
    fast_a.in_flight = fast_b.in_flight = 10  # cost 0.1 x 11 = 1.1 > 1.0
    got = picks(LeastLatencyPolicy(random.Random(2)), ms)
    assert 600 <= got["slow"] <= 730  # it wins every pair it is in: 2/3 of the draws


def test_least_latency_cost_is_latency_times_load_over_weight() -> None:
    m = lone_member(0.2, weight=2)
    assert LeastLatencyPolicy.cost(m) == pytest.approx(0.1)
    m.in_flight = 3
    assert LeastLatencyPolicy.cost(m) == pytest.approx(0.4)
    m.effective_weight = 0.2  # slow start
    assert LeastLatencyPolicy.cost(m) == pytest.approx(4.0)


def test_in_flight_attempts_turn_least_latency_away_from_a_fast_member() -> None:
    a, b = lone_member(0.1, name="a"), lone_member(0.15, name="b")
    policy = LeastLatencyPolicy(random.Random(3))
    assert set(picks(policy, [a, b], 50)) == {"a"}
    a.in_flight = 1  # 0.1 x 2 = 0.2 > 0.15
    assert set(picks(policy, [a, b], 50)) == {"b"}


def test_a_member_without_samples_but_with_attempts_in_flight_pays_a_penalty() -> None:
    fresh = lone_member(name="fresh")
    fresh.in_flight = 1
    assert LeastLatencyPolicy.cost(fresh) == LeastLatencyPolicy.UNKNOWN_LATENCY_S * 2


def test_latency_fades_while_no_sample_comes_so_a_once_slow_member_is_tried_again() -> None:
    m = lone_member(30.0)  # one 30 s timeout at t=1
    assert m.latency_at(1.0, 10.0) == 30.0
    assert m.latency_at(61.0, 10.0) == pytest.approx(30.0 * math.exp(-6))


def test_least_latency_tries_a_member_without_samples() -> None:
    fresh = lone_member(name="fresh")
    assert fresh.ewma_latency_s == 0.0
    two = [lone_member(0.1, name="a"), fresh]
    assert set(picks(LeastLatencyPolicy(random.Random(4)), two, 50)) == {"fresh"}
    three = [lone_member(0.1, name="a"), lone_member(0.1, name="b"), fresh]
    got = picks(LeastLatencyPolicy(random.Random(5)), three)
    assert 600 <= got["fresh"] <= 730  # it wins every pair it is drawn into


def test_least_latency_skips_members_without_weight_and_handles_one_candidate() -> None:
    a, b = lone_member(0.1, name="a"), lone_member(5.0, name="b")
    policy = LeastLatencyPolicy(random.Random(6))
    assert policy.pick([b], "", [b]) is b
    a.effective_weight = 0.0
    assert set(picks(policy, [a, b], 20)) == {"b"}
    b.effective_weight = 0.0
    assert policy.pick([a, b], "", [a, b]) is None


def test_in_flight_attempts_raise_the_cost_of_a_member_without_samples() -> None:
    fresh, a = lone_member(name="fresh"), lone_member(0.1, name="a")
    fresh.in_flight = 9
    assert set(picks(LeastLatencyPolicy(random.Random(7)), [fresh, a], 20)) == {"a"}


def test_a_member_that_was_slow_once_is_tried_again_after_many_decay_times() -> None:
    p, _ = make_pool(3, policy="least_latency", latency_decay=10)
    p.policy = LeastLatencyPolicy(random.Random(8))
    a, b, c = p.member("a"), p.member("b"), p.member("c")
    a.observe_latency(30.0, now=1, decay_s=10)
    for t in range(1, 1001):
        b.observe_latency(0.05, now=t, decay_s=10)
        c.observe_latency(0.05, now=t, decay_s=10)
    got = Counter(p.pick("", 1000).name for _ in range(300))  # type: ignore[union-attr]
    assert got["a"] > 0
