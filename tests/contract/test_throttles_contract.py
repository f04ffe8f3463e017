"""The throttles contract and the warm-up counter contract: every backend runs these unchanged.

Times come from a manual clock passed as `now`. A backend shared between nodes (Redis, issue 17) adds
itself to BACKENDS / COUNT_BACKENDS; under test it must take its times from `now` too. Rates are binary
fractions (2/s: one every 0.5 s) so every retry-after here is exact in floating point.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import date, timedelta

import pytest

from postmux.scheduling.redis_throttles import RedisThrottles, RedisWarmupCounts
from postmux.scheduling.throttles import ALLOWED, Allowed, MemoryThrottles, RetryAfter, Suspension, Throttles
from postmux.scheduling.warmup import MemoryWarmupCounts, SqliteWarmupCounts, WarmupCounts
from tests.redis_support import redis_client, redis_prefix

T0 = 1_700_000_000.0


def _redis(request: pytest.FixtureRequest) -> Throttles:
    """The machine's Redis under a prefix of the test's own, on the test's clock (`now`), not Redis's."""
    client = redis_client()
    request.addfinalizer(client.close)
    return RedisThrottles(client, request.getfixturevalue(redis_prefix.__name__), clock="caller")


def _redis_counts(request: pytest.FixtureRequest) -> WarmupCounts:
    throttles = _redis(request)
    assert isinstance(throttles, RedisThrottles)
    return RedisWarmupCounts(throttles)


BACKENDS: dict[str, Callable[[pytest.FixtureRequest], Throttles]] = {
    "memory": lambda _: MemoryThrottles(),
    "redis": _redis,
}
COUNT_BACKENDS: dict[str, Callable[[pytest.FixtureRequest], WarmupCounts]] = {
    "memory": lambda _: MemoryWarmupCounts(),
    "sqlite": lambda request: SqliteWarmupCounts(request.getfixturevalue("tmp_path") / "warmup.db"),
    "redis": _redis_counts,
}


@pytest.fixture(params=sorted(BACKENDS))
def throttles(request: pytest.FixtureRequest) -> Throttles:
    return BACKENDS[request.param](request)


@pytest.fixture(params=sorted(COUNT_BACKENDS))
def counts(request: pytest.FixtureRequest) -> WarmupCounts:
    return COUNT_BACKENDS[request.param](request)


# -- rate: GCRA -----------------------------------------------------------------------------------------


def test_a_rate_allows_its_burst_at_once_then_one_per_interval(throttles: Throttles) -> None:
    assert [throttles.rate("k", 2.0, 3, T0) for _ in range(3)] == [ALLOWED] * 3
    assert throttles.rate("k", 2.0, 3, T0) == RetryAfter(0.5)
    assert throttles.rate("k", 2.0, 3, T0 + 0.25) == RetryAfter(0.25)
    assert throttles.rate("k", 2.0, 3, T0 + 0.5) == ALLOWED
    assert throttles.rate("k", 2.0, 3, T0 + 0.5) == RetryAfter(0.5)
    assert throttles.rate("k", 2.0, 3, T0 + 1.0) == ALLOWED


def test_a_refused_turn_takes_nothing_and_the_retry_after_is_exact(throttles: Throttles) -> None:
    assert throttles.rate("k", 2.0, 1, T0) == ALLOWED
    for _ in range(5):
        assert throttles.rate("k", 2.0, 1, T0 + 0.125) == RetryAfter(0.375)
    assert throttles.rate("k", 2.0, 1, T0 + 0.5) == ALLOWED


def test_asking_with_take_zero_takes_no_turn(throttles: Throttles) -> None:
    for _ in range(5):
        assert throttles.rate("k", 2.0, 1, T0, take=0) == ALLOWED
    assert throttles.rate("k", 2.0, 1, T0) == ALLOWED
    assert throttles.rate("k", 2.0, 1, T0, take=0) == RetryAfter(0.5)


def test_an_idle_key_fills_up_to_its_burst_and_no_further(throttles: Throttles) -> None:
    assert throttles.rate("k", 2.0, 2, T0) == ALLOWED
    later = T0 + 3600.0
    assert [throttles.rate("k", 2.0, 2, later) for _ in range(3)] == [ALLOWED, ALLOWED, RetryAfter(0.5)]


def test_several_turns_are_taken_at_once_only_if_all_are_free(throttles: Throttles) -> None:
    assert throttles.rate("k", 2.0, 4, T0, take=3) == ALLOWED
    assert throttles.rate("k", 2.0, 4, T0, take=2) == RetryAfter(0.5)
    assert throttles.rate("k", 2.0, 4, T0) == ALLOWED
    assert throttles.rate("k", 2.0, 4, T0) == RetryAfter(0.5)
    assert throttles.rate("other", 2.0, 4, T0, take=5) == RetryAfter(math.inf)  # more than the burst, ever


def test_a_new_rate_keeps_what_is_owed_in_messages(throttles: Throttles) -> None:
    assert throttles.rate("k", 1.0, 1, T0) == ALLOWED  # one taken: the next turn 1 s on at 1/s
    assert throttles.rate("k", 2.0, 1, T0) == RetryAfter(0.5)  # raised: 0.5 s at 2/s, not the old 1 s
    assert throttles.rate("k", 0.5, 1, T0) == RetryAfter(2.0)  # cut: no fresh turn, 2 s at 0.5/s


def test_rate_keys_are_independent(throttles: Throttles) -> None:
    assert throttles.rate("a", 2.0, 1, T0) == ALLOWED
    assert throttles.rate("b", 2.0, 1, T0) == ALLOWED
    assert throttles.rate("a", 2.0, 1, T0) == RetryAfter(0.5)


# -- connection leases ----------------------------------------------------------------------------------


def test_leases_are_granted_up_to_the_limit_and_come_back_when_released(throttles: Throttles) -> None:
    first, second = throttles.lease("k", 2, 60.0, T0), throttles.lease("k", 2, 60.0, T0)
    assert first is not None and second is not None and first != second
    assert throttles.lease("k", 2, 60.0, T0) is None
    assert throttles.leases_held("k", T0) == 2
    assert throttles.lease("other", 2, 60.0, T0) is not None  # a limit is per key
    throttles.release(first)
    assert throttles.leases_held("k", T0) == 1
    assert throttles.lease("k", 2, 60.0, T0) is not None
    assert throttles.lease("k", 2, 60.0, T0) is None
    throttles.release(first)  # twice: no effect
    assert throttles.leases_held("k", T0) == 2


def test_a_lease_expires_after_its_time_to_live_unless_renewed(throttles: Throttles) -> None:
    kept, lost = throttles.lease("k", 2, 60.0, T0), throttles.lease("k", 2, 60.0, T0)
    assert kept is not None and lost is not None and kept.expires_at == T0 + 60.0
    renewed = throttles.renew(kept, 60.0, T0 + 40.0)
    assert renewed is not None and renewed.expires_at == T0 + 100.0
    assert throttles.leases_held("k", T0 + 59.0) == 2
    assert throttles.leases_held("k", T0 + 60.0) == 1  # a dead holder's slot comes free by itself
    assert throttles.renew(lost, 60.0, T0 + 61.0) is None  # too late: it is gone
    throttles.release(lost)  # harmless
    assert throttles.lease("k", 2, 60.0, T0 + 61.0) is not None
    assert throttles.leases_held("k", T0 + 100.0) == 1


def test_a_released_lease_cannot_be_renewed(throttles: Throttles) -> None:
    lease = throttles.lease("k", 1, 60.0, T0)
    assert lease is not None
    throttles.release(lease)
    assert throttles.renew(lease, 60.0, T0 + 1.0) is None
    assert throttles.leases_held("k", T0 + 1.0) == 0


def test_a_limit_lowered_below_the_leases_held_grants_none_until_enough_end(throttles: Throttles) -> None:
    leases = [lease for _ in range(3) if (lease := throttles.lease("k", 3, 60.0, T0)) is not None]
    assert len(leases) == 3 and throttles.lease("k", 2, 60.0, T0) is None
    throttles.release(leases.pop())
    assert throttles.lease("k", 2, 60.0, T0) is None
    throttles.release(leases.pop())
    assert throttles.lease("k", 2, 60.0, T0) is not None


# -- suspensions ----------------------------------------------------------------------------------------


def test_a_suspension_holds_until_its_time(throttles: Throttles) -> None:
    assert throttles.suspended("k", T0) is None
    assert throttles.suspend("k", T0 + 900.0, "421 4.7.28 unusual rate")
    assert throttles.suspended("k", T0 + 899.0) == Suspension(T0 + 900.0, "421 4.7.28 unusual rate")
    assert throttles.suspended("other", T0 + 1.0) is None
    assert throttles.suspended("k", T0 + 900.0) is None


def test_a_suspension_is_lifted_now(throttles: Throttles) -> None:
    throttles.suspend("k", T0 + 900.0, "by operator")
    throttles.lift("k")
    assert throttles.suspended("k", T0) is None
    throttles.lift("k")  # nothing in force: no effect


def test_a_shorter_suspension_does_not_cut_a_longer_one_short(throttles: Throttles) -> None:
    assert throttles.suspend("k", T0 + 900.0, "long")
    assert not throttles.suspend("k", T0 + 60.0, "short")
    assert not throttles.suspend("k", T0 + 900.0, "as long")
    assert throttles.suspended("k", T0 + 100.0) == Suspension(T0 + 900.0, "long")
    assert throttles.suspend("k", T0 + 1000.0, "longer")
    assert throttles.suspended("k", T0 + 950.0) == Suspension(T0 + 1000.0, "longer")
    throttles.lift("k")  # to shorten one: lift it, then suspend again
    assert throttles.suspend("k", T0 + 60.0, "short")
    assert throttles.suspended("k", T0 + 59.0) == Suspension(T0 + 60.0, "short")


def test_suspensions_in_force_are_told_for_many_keys_at_once(throttles: Throttles) -> None:
    assert throttles.suspensions([], T0) == {}
    throttles.suspend("a", T0 + 900.0, "421 4.7.28")
    throttles.suspend("b", T0 + 60.0, "by operator")
    throttles.suspend("c", T0 + 60.0, "lifted")
    throttles.lift("c")
    assert throttles.suspensions(["a", "b", "c", "d"], T0) == {
        "a": Suspension(T0 + 900.0, "421 4.7.28"),
        "b": Suspension(T0 + 60.0, "by operator"),
    }
    assert throttles.suspensions(["a", "b"], T0 + 60.0) == {"a": Suspension(T0 + 900.0, "421 4.7.28")}


def test_the_three_families_do_not_share_keys(throttles: Throttles) -> None:
    throttles.suspend("k", T0 + 900.0, "away")
    assert isinstance(throttles.rate("k", 2.0, 1, T0), Allowed)
    assert throttles.lease("k", 1, 60.0, T0) is not None
    throttles.lift("k")
    assert throttles.leases_held("k", T0) == 1
    assert throttles.rate("k", 2.0, 1, T0) == RetryAfter(0.5)


# -- warm-up counts -------------------------------------------------------------------------------------

DAY = date(2026, 11, 28)


def test_counts_add_up_per_key_and_day_and_come_back_whole(counts: WarmupCounts) -> None:
    assert counts.load(DAY) == {}
    assert counts.add(DAY, {"p/a/*": 3, "p/a/google": 1}) == {"p/a/*": 3, "p/a/google": 1}
    assert counts.add(DAY, {"p/a/*": 2}) == {"p/a/*": 5, "p/a/google": 1}  # every key of the day
    assert counts.add(DAY + timedelta(days=1), {"p/a/*": 1}) == {"p/a/*": 1}  # a day of its own
    assert counts.load(DAY) == {"p/a/*": 5, "p/a/google": 1}
    assert counts.load(DAY + timedelta(days=1)) == {"p/a/*": 1}


def test_an_empty_add_returns_the_days_counts(counts: WarmupCounts) -> None:
    counts.add(DAY, {"p/a/*": 7})
    assert counts.add(DAY, {}) == {"p/a/*": 7}
