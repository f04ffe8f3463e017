"""Balancing decisions as plain functions of state: no sockets, no clock but the one passed in."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from postmux.balancing.member import Member
from postmux.balancing.policies import HashPolicy, LeastConnectionsPolicy, RoundRobinPolicy, WeightedPolicy
from postmux.balancing.pool import Pool
from postmux.config import MemberSettings, PoolSettings


def members(*weights: int) -> list[Member]:
    return [
        Member(MemberSettings(name=f"m{i}", address=f"127.0.0.1:{2600 + i}", weight=w), "p")
        for i, w in enumerate(weights)
    ]


def pool(policy: str = "weighted", **health: object) -> Pool:
    return Pool(
        PoolSettings.model_validate(
            {
                "name": "p",
                "policy": policy,
                "members": [
                    {"name": "a", "address": "127.0.0.1:1"},
                    {"name": "b", "address": "127.0.0.1:2"},
                    {"name": "c", "address": "127.0.0.1:3"},
                ],
                "health": {"consecutive_failures": 2, "base_ejection_time": 10, **health},
            }
        )
    )


def test_smooth_weighted_round_robin_spreads_picks_evenly() -> None:
    ms = members(3, 1, 1)
    policy = WeightedPolicy()
    order = [policy.pick(ms, "", ms) for _ in range(10)]
    assert [m.name for m in order if m] == ["m0", "m1", "m0", "m2", "m0"] * 2


@given(st.lists(st.integers(min_value=1, max_value=20), min_size=1, max_size=8))
@settings(max_examples=50)
def test_weighted_shares_are_exact_over_one_cycle(weights: list[int]) -> None:
    ms = members(*weights)
    policy = WeightedPolicy()
    picks = Counter(m.name for m in (policy.pick(ms, "", ms) for _ in range(sum(weights))) if m)
    assert picks == {f"m{i}": w for i, w in enumerate(weights)}


def test_round_robin_takes_turns() -> None:
    ms = members(5, 1, 1)
    policy = RoundRobinPolicy()
    assert [policy.pick(ms, "", ms).name for _ in range(6)] == ["m0", "m1", "m2"] * 2  # type: ignore[union-attr]


def test_least_connections_prefers_the_least_loaded_per_weight() -> None:
    ms = members(2, 1, 1)
    ms[0].in_flight, ms[1].in_flight, ms[2].in_flight = 2, 1, 0
    assert LeastConnectionsPolicy().pick(ms, "", ms) is ms[2]
    ms[2].in_flight = 2
    # m0 carries 2 at weight 2 (load 1.0), the others load 1.0 and 2.0: ties go round-robin among m0, m1
    picks = {LeastConnectionsPolicy().pick(ms, "", ms).name for _ in range(2)}  # type: ignore[union-attr]
    assert picks <= {"m0", "m1"}


def test_hash_is_sticky_and_moves_only_lost_keys() -> None:
    ms = members(1, 1, 1)
    policy = HashPolicy(1.25)
    keys = [f"d{i}.example" for i in range(300)]
    home = {k: policy.pick(ms, k, ms).name for k in keys}  # type: ignore[union-attr]
    assert home == {k: policy.pick(ms, k, ms).name for k in keys}  # type: ignore[union-attr]
    counts = Counter(home.values())
    assert all(60 <= n <= 140 for n in counts.values()), counts
    survivors = [m for m in ms if m.name != "m1"]
    moved = {k: policy.pick(survivors, k, survivors).name for k in keys}  # type: ignore[union-attr]
    for k in keys:
        if home[k] != "m1":
            assert moved[k] == home[k]


def test_hash_bounded_load_keeps_one_hot_key_from_swamping_a_member() -> None:
    ms = members(1, 1, 1)
    policy = HashPolicy(1.25)
    placed: Counter[str] = Counter()
    for _ in range(30):  # 30 concurrent attempts, all for one key
        m = policy.pick(ms, "hot.example", ms)
        assert m is not None
        m.in_flight += 1
        placed[m.name] += 1
    # no member holds more than ceil(1.25 x mean) of the load
    assert max(placed.values()) <= 13, placed
    assert len(placed) == 3


def test_pool_ejects_after_consecutive_failures_and_returns_after_the_ejection_time() -> None:
    changes: list[tuple[str, bool]] = []
    p = pool()
    p._on_change = lambda m, up, reason: changes.append((m.name, up))
    a = p.member("a")
    p.record_failure(a, now=0)
    assert not a.ejected(0)
    p.record_failure(a, now=1)
    assert a.ejected(1) and changes == [("a", False)]
    assert {m.name for m in p.usable(5)} == {"b", "c"}
    assert {m.name for m in p.usable(11)} == {"a", "b", "c"}
    assert changes == [("a", False), ("a", True)]


def test_ejection_time_grows_and_is_capped() -> None:
    p = pool(base_ejection_time=10, max_ejection_time=25)
    a = p.member("a")
    now = 0.0
    lengths = []
    for _ in range(4):
        p.record_failure(a, now)
        p.record_failure(a, now)
        lengths.append(a.ejected_until - now)
        now = a.ejected_until
    assert lengths == [10, 20, 25, 25]
    p.record_success(a, now)
    p.record_failure(a, now)
    p.record_failure(a, now)
    assert a.ejected_until - now == 10  # a success after returning forgives the past ejections


def test_panic_uses_every_member_when_most_are_ejected() -> None:
    p = pool(panic_threshold=0.5, max_ejection_percent=100)
    for name in ("a", "b"):
        m = p.member(name)
        p.record_failure(m, 0)
        p.record_failure(m, 0)
    assert p.in_panic(1)
    assert {m.name for m in p.usable(1)} == {"a", "b", "c"}
    calm = pool(panic_threshold=0.0, max_ejection_percent=100)
    for name in ("a", "b"):
        m = calm.member(name)
        calm.record_failure(m, 0)
        calm.record_failure(m, 0)
    assert {m.name for m in calm.usable(1)} == {"c"}


def test_backup_tier_is_used_only_when_no_primary_is_usable_and_keeps_the_pool_out_of_panic() -> None:
    p = Pool(
        PoolSettings.model_validate(
            {
                "name": "p",
                "policy": "priority",
                "members": [
                    {"name": "a", "address": "127.0.0.1:1"},
                    {"name": "b", "address": "127.0.0.1:2"},
                    {"name": "spare", "address": "127.0.0.1:3", "backup": True},
                ],
                "health": {"consecutive_failures": 1, "max_ejection_percent": 100},
            }
        )
    )
    assert {p.pick("", 0).name for _ in range(10)} == {"a", "b"}  # type: ignore[union-attr]
    p.record_failure(p.member("a"), 0)
    p.record_failure(p.member("b"), 0)
    assert not p.in_panic(1)
    assert {p.pick("", 1).name for _ in range(5)} == {"spare"}  # type: ignore[union-attr]


def test_panic_takes_the_whole_best_tier_that_has_a_healthy_member_or_the_first_when_none_has() -> None:
    p = Pool(
        PoolSettings.model_validate(
            {
                "name": "p",
                "members": [
                    {"name": "a", "address": "127.0.0.1:1"},
                    {"name": "b", "address": "127.0.0.1:2"},
                    {"name": "c1", "address": "127.0.0.1:3", "backup": True},
                    {"name": "c2", "address": "127.0.0.1:4", "backup": True},
                    {"name": "c3", "address": "127.0.0.1:5", "backup": True},
                ],
                "health": {"consecutive_failures": 1, "max_ejection_percent": 100},
            }
        )
    )
    for name in ("a", "b", "c2", "c3"):
        p.record_failure(p.member(name), 0)
    assert p.in_panic(1)  # 0/2 + 1/3 healthy, below 0.5
    # Not the dead primaries first (Envoy gives a level with no healthy host no traffic while another has
    # some), and not only c1: within the tier, panic spreads the load over every member.
    assert {m.name for m in p.usable(1)} == {"c1", "c2", "c3"}
    p.record_failure(p.member("c1"), 1)
    assert {m.name for m in p.usable(2)} == {"a", "b"}  # nobody healthy: the best tier, whole


def test_pick_skips_full_members_and_tried_members() -> None:
    p = pool("round_robin")
    p.member("a").in_flight = p.member("a").max_connections
    assert {p.pick("", 0).name for _ in range(6)} == {"b", "c"}  # type: ignore[union-attr]
    assert p.pick("", 0, exclude={"b", "c"}) is None
    assert p.can_serve(0, exclude={"b", "c"})  # a is busy, not unusable: the work waits for it
    assert not p.can_serve(0, exclude={"a", "b", "c"})


def test_draining_member_gets_nothing_new() -> None:
    p = pool("round_robin")
    p.member("b").draining = True
    assert {p.pick("", 0).name for _ in range(6)} == {"a", "c"}  # type: ignore[union-attr]
