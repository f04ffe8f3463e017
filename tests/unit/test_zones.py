"""Placement by zone (balancing/zones.py): who a node in zone A picks, from the members' health and load.

Pure: members' state in, the chosen member out; the random draw that spreads a spilling zone's mail is
a fixed sequence or a seeded generator, so every share is checked exactly or within a stated bound.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from postmux.balancing.pool import Pool
from postmux.balancing.zones import ZoneRouting, local_share, split
from postmux.cli import app
from postmux.config import ConfigError, PoolSettings, ZoneRoutingSettings, settings_from_dict

NOW = 1000.0
ROUTING = ZoneRoutingSettings()  # local_threshold 0.7, local_minimum 0


def pool_of(members: list[dict[str, Any]], zone: str | None = "a", seed: int = 1, **pool: Any) -> Pool:
    settings = PoolSettings.model_validate(
        {
            "name": "p",
            "policy": pool.pop("policy", "round_robin"),
            "members": [{"address": f"127.0.0.1:{2601 + i}", **m} for i, m in enumerate(members)],
            "health": {"max_ejection_percent": 100, "panic_threshold": 0.0, **pool.pop("health", {})},
            **pool,
        }
    )
    return Pool(settings, zone=zone, draw=random.Random(seed).random)


def two_zones(per_zone: int = 2, **pool: Any) -> Pool:
    members = [{"name": f"{z}{i}", "zone": z} for z in "ab" for i in range(1, per_zone + 1)]
    return pool_of(members, **pool)


def down(pool: Pool, *names: str) -> None:
    for name in names:
        pool.member(name).check_up = False


def picks(pool: Pool, n: int = 1000, **kw: Any) -> Counter[str]:
    counted: Counter[str] = Counter()
    for i in range(n):
        m = pool.pick(f"k{i}", NOW, **kw)
        counted[m.name[0] if m else "-"] += 1
    return counted


# -- the share the local zone keeps --------------------------------------------------------------------------


def test_a_healthy_zone_keeps_everything_and_an_empty_or_dead_one_nothing() -> None:
    assert local_share(4, 4, ROUTING) == 1.0
    assert local_share(3, 4, ROUTING) == 1.0  # 75% healthy: above the 70% threshold
    assert local_share(0, 4, ROUTING) == 0.0
    assert local_share(0, 0, ROUTING) == 0.0


def test_below_the_threshold_each_healthy_local_member_takes_at_most_its_load_over_the_threshold() -> None:
    assert local_share(1, 2, ROUTING) == pytest.approx(0.5 / 0.7)


def test_below_the_minimum_other_zones_take_it_all() -> None:
    strict = ZoneRoutingSettings(local_minimum=0.5)
    assert local_share(1, 4, strict) == 0.0
    assert local_share(2, 4, strict) == pytest.approx(0.5 / 0.7)


@settings(max_examples=300, deadline=None)
@given(
    total=st.integers(1, 50),
    data=st.data(),
    threshold=st.floats(0.05, 1.0),
    minimum=st.floats(0.0, 1.0),
)
def test_the_local_share_grows_with_health_and_never_overloads_a_healthy_member(
    total: int, data: st.DataObject, threshold: float, minimum: float
) -> None:
    routing = ZoneRoutingSettings(local_threshold=threshold, local_minimum=min(minimum, threshold))
    healthy = data.draw(st.integers(0, total))
    share = local_share(healthy, total, routing)
    assert 0.0 <= share <= 1.0
    if healthy < total:
        assert share <= local_share(healthy + 1, total, routing)
    if healthy:
        # The load on each healthy local member, as a multiple of its share with everyone healthy.
        assert share * total / healthy <= 1 / threshold + 1e-9
    if healthy / total >= threshold:
        assert share == 1.0
    if healthy == 0 or healthy / total < routing.local_minimum:
        assert share == 0.0


def test_no_split_without_a_node_zone_or_without_another_zone() -> None:
    pool = two_zones()
    members = pool.members
    assert split(members, members, None, ROUTING) is None
    assert split(members[:2], members[:2], "a", ROUTING) is None  # only zone a is left: nowhere else
    assert split(members, members, "a", ZoneRoutingSettings(enabled=False)) is None
    zones = split(members, members, "a", ROUTING)
    assert zones is not None
    assert [m.name for m in zones.local] == ["a1", "a2"]
    assert [m.name for m in zones.remote] == ["b1", "b2"]


def test_members_without_a_zone_belong_to_every_zone() -> None:
    pool = pool_of([{"name": "a1", "zone": "a"}, {"name": "x1"}, {"name": "b1", "zone": "b"}])
    zones = split(pool.members, pool.members, "a", ROUTING)
    assert zones is not None
    assert [m.name for m in zones.local] == ["a1", "x1"]
    assert zones.local_share == 1.0


# -- the pool's picks ----------------------------------------------------------------------------------------


def test_a_node_sends_only_to_its_own_zone_while_it_is_healthy() -> None:
    assert picks(two_zones()) == {"a": 1000}


def test_a_node_in_zone_b_sends_only_to_zone_b() -> None:
    assert picks(two_zones(zone="b")) == {"b": 1000}


def test_without_a_node_zone_every_zone_is_used_as_before() -> None:
    assert picks(two_zones(zone=None)) == {"a": 500, "b": 500}


def test_when_the_local_zone_dies_all_picks_go_to_the_other_and_come_back_after() -> None:
    pool = two_zones()
    picks(pool, 10)
    down(pool, "a1", "a2")
    assert picks(pool) == {"b": 1000}
    for name in ("a1", "a2"):
        pool.member(name).check_up = True
    assert picks(pool) == {"a": 1000}


def test_an_ejected_local_zone_spills_until_its_ejection_ends() -> None:
    pool = two_zones()
    for name in ("a1", "a2"):
        pool.health.eject(pool.member(name), NOW)
        pool._ejected.add(name)
    assert picks(pool) == {"b": 1000}
    later = NOW + pool.settings.health.base_ejection_time
    assert all(pool.pick(f"k{i}", later).name.startswith("a") for i in range(100))  # type: ignore[union-attr]


def test_a_partly_healthy_zone_keeps_its_share_and_the_rest_spills() -> None:
    pool = two_zones()
    down(pool, "a1")  # 50% of zone a healthy, under the 70% threshold: it keeps 0.5 / 0.7 of the picks
    counted = picks(pool, 20_000)
    assert counted["a"] / 20_000 == pytest.approx(0.5 / 0.7, abs=0.015)
    assert counted["a"] + counted["b"] == 20_000


def test_a_zone_below_the_minimum_gives_everything_away() -> None:
    pool = two_zones(per_zone=4, zone_routing={"local_minimum": 0.3})
    down(pool, "a1", "a2", "a3")  # 25% healthy
    assert picks(pool) == {"b": 1000}


def test_weights_are_the_capacity_a_zone_loses() -> None:
    members: list[dict[str, Any]] = [
        {"name": "a1", "zone": "a", "weight": 9},
        {"name": "a2", "zone": "a", "weight": 1},
        {"name": "b1", "zone": "b"},
    ]
    pool = pool_of(members)
    down(pool, "a2")  # 90% of zone a's weight is still healthy
    assert picks(pool) == {"a": 1000}
    pool = pool_of(members)
    down(pool, "a1")  # 10% left: 0.1 / 0.7 of the picks
    assert picks(pool, 20_000)["a"] / 20_000 == pytest.approx(0.1 / 0.7, abs=0.015)


def test_a_draining_local_member_is_capacity_the_zone_has_lost() -> None:
    pool = two_zones()
    pool.drain("a1")
    assert 0 < picks(pool, 2000)["b"] < 2000


def test_a_full_local_zone_spills_and_with_spill_off_the_work_waits() -> None:
    pool = two_zones()
    for name in ("a1", "a2"):
        m = pool.member(name)
        m.in_flight = m.max_connections
    assert picks(pool, 100) == {"b": 100}
    waiting = two_zones(zone_routing={"spill_when_full": False})
    for name in ("a1", "a2"):
        m = waiting.member(name)
        m.in_flight = m.max_connections
    assert picks(waiting, 100) == {"-": 100}


def test_busy_lanes_count_as_full() -> None:
    assert picks(two_zones(), 100, busy={"a1", "a2"}) == {"b": 100}


def test_tried_local_members_pass_the_work_to_the_other_zone() -> None:
    assert picks(two_zones(), 100, exclude={"a1", "a2"}) == {"b": 100}
    assert picks(two_zones(), 100, exclude={"a1"}) == {"a": 100}


def test_every_zone_tried_goes_down_the_tiers() -> None:
    pool = pool_of(
        [
            {"name": "a1", "zone": "a"},
            {"name": "b1", "zone": "b"},
            {"name": "c1", "zone": "b", "backup": True},
        ]
    )
    assert picks(pool, 10, exclude={"a1", "b1"}) == {"c": 10}


def test_zones_apply_within_a_tier_the_tiers_first() -> None:
    members: list[dict[str, Any]] = [
        {"name": "a1", "zone": "a"},
        {"name": "b1", "zone": "b"},
        {"name": "c1", "zone": "a", "backup": True},
    ]
    pool = pool_of(members)
    down(pool, "a1")
    assert picks(pool) == {"b": 1000}  # the other zone's primary before this zone's backup
    down(pool, "b1")
    assert picks(pool) == {"c": 1000}


def test_a_pool_in_panic_uses_every_member_whatever_its_zone() -> None:
    pool = two_zones(health={"panic_threshold": 0.9})
    down(pool, "a1")  # 75% healthy: under 90%, panic
    assert set(picks(pool)) == {"a", "b"}


def test_a_changed_node_zone_or_member_zone_shows_at_the_next_pick() -> None:
    pool = two_zones()
    assert picks(pool, 10) == {"a": 10}
    pool.zone = "b"
    assert picks(pool, 10) == {"b": 10}
    moved = pool.settings.model_copy(
        update={"members": tuple(m.model_copy(update={"zone": "b"}) for m in pool.settings.members)}
    )
    pool.zone = "a"
    pool.reconfigure(moved, NOW)  # every member now in zone b: no split, round robin over all
    assert picks(pool, 100) == {"a": 50, "b": 50}


# -- what the operator is told (Pool.zone_routing, for the dashboard and top) --------------------------------


def test_the_routing_state_says_local_spilling_or_remote_with_the_zones_health_and_share() -> None:
    pool = two_zones()
    assert pool.zone_routing(NOW) == ZoneRouting("local", 1.0, 1.0, 0.7)
    picks(pool, 10)  # the choice is cached now: a change must still show at once
    down(pool, "a1")
    spilling = pool.zone_routing(NOW)
    assert (spilling.state, spilling.local_health) == ("spilling", 0.5)
    assert spilling.local_share == pytest.approx(0.5 / 0.7)
    down(pool, "a2")
    assert pool.zone_routing(NOW) == ZoneRouting("remote", 0.0, 0.0, 0.7)
    down(pool, "b1", "b2")
    assert pool.zone_routing(NOW).state == "down"


def test_the_routing_state_says_why_there_is_no_zone_preference() -> None:
    assert two_zones(zone=None).zone_routing(NOW) == ZoneRouting("none")
    assert two_zones(zone_routing={"enabled": False}).zone_routing(NOW) == ZoneRouting("off")
    panicking = two_zones(health={"panic_threshold": 0.9})
    down(panicking, "a1")
    assert panicking.zone_routing(NOW).state == "panic"
    only_here = pool_of([{"name": "a1", "zone": "a"}, {"name": "x1"}])
    assert only_here.zone_routing(NOW) == ZoneRouting("local", 1.0, None, 0.7)


@settings(max_examples=200, deadline=None)
@given(
    healthy=st.lists(st.booleans(), min_size=6, max_size=6),
    backup=st.lists(st.booleans(), min_size=6, max_size=6),
    full=st.lists(st.booleans(), min_size=6, max_size=6),
)
def test_a_pick_is_local_whenever_the_local_zone_of_the_tier_in_use_is_healthy_enough(
    healthy: list[bool], backup: list[bool], full: list[bool]
) -> None:
    members: list[dict[str, Any]] = [
        {"name": f"{'ab'[i % 2]}{i}", "zone": "ab"[i % 2], "backup": backup[i], "max_connections": 1}
        for i in range(6)
    ]
    pool = pool_of(members)
    for m, passing, busy in zip(pool.members, healthy, full, strict=True):
        m.check_up = passing
        m.in_flight = 1 if busy else 0
    picked = pool.pick("k", NOW)
    live = [m for m in pool.members if m.healthy(NOW)]
    if not live:
        return
    tier = min(m.tier for m in live)
    usable = [m for m in live if m.tier == tier]
    assert picked is None or picked in usable  # tiers first
    free = [m for m in usable if m.in_flight < 1]
    assert (picked is None) == (not free)  # spill_when_full: waits only when the whole tier is full
    local = [m for m in pool.members if m.tier == tier and m.zone == "a"]
    up = [m for m in local if m.healthy(NOW)]
    if picked is not None and local and len(up) / len(local) >= 0.7 and any(m in free for m in up):
        assert picked.zone == "a"
    if picked is not None and not up:
        assert picked.zone == "b"


# -- configuration -------------------------------------------------------------------------------------------


def test_the_node_and_member_zones_are_configured() -> None:
    s = settings_from_dict(
        {
            "node": {"name": "n1", "zone": "eu-1"},
            "pool": [{"name": "p", "members": [{"name": "m", "address": "127.0.0.1:1", "zone": "eu-1"}]}],
        }
    )
    assert (s.node.name, s.node.zone, s.pool[0].members[0].zone) == ("n1", "eu-1", "eu-1")
    assert (
        settings_from_dict({"pool": [{"name": "p", "members": [{"name": "m", "address": "h:1"}]}]}).node.zone
        is None
    )


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"node": {"zone": ""}}, "node.zone"),
        ({"node": {"zone": "eu 1"}}, "node.zone"),
        (
            {"pool": [{"name": "p", "members": [{"name": "m", "address": "h:1", "zone": "a/b"}]}]},
            "pool[0].members[0].zone",
        ),
        (
            {
                "pool": [
                    {
                        "name": "p",
                        "members": [{"name": "m", "address": "h:1"}],
                        "zone_routing": {"local_threshold": 0.5, "local_minimum": 0.6},
                    }
                ]
            },
            "pool[0].zone_routing",
        ),
    ],
)
def test_a_bad_zone_setting_is_refused_by_name(data: dict[str, Any], key: str) -> None:
    data.setdefault("pool", [{"name": "p", "members": [{"name": "m", "address": "h:1"}]}])
    with pytest.raises(ConfigError) as e:
        settings_from_dict(data)
    assert any(k == key for k, _ in e.value.problems), e.value.problems


def test_check_config_warns_of_a_node_zone_no_member_is_in(tmp_path: Path) -> None:
    cfg = tmp_path / "zones.toml"
    members = (
        '[{ name = "a", address = "127.0.0.1:2601", zone = "eu-1" }, '
        '{ name = "x", address = "127.0.0.1:2602" }]'
    )
    cfg.write_text(f'[node]\nzone = "eu-2"\n[[pool]]\nname = "default"\nmembers = {members}\n')
    result = CliRunner().invoke(app, ["check-config", "-c", str(cfg)])
    assert result.exit_code == 0, result.output
    assert (
        f"{cfg}: warning: [node] zone 'eu-2': no member of pool 'default' is in it (its zones: eu-1); "
        "the node prefers its members without a zone"
    ) in result.stderr
    cfg.write_text(cfg.read_text().replace('"eu-2"', '"eu-1"'))
    assert "[node] zone" not in CliRunner().invoke(app, ["check-config", "-c", str(cfg)]).stderr
