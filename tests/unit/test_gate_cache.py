"""The dispatcher's shaping gate looks only at lanes that may hold an attempt back: each change that can
close or open a lane must show in the very next gate.

`reference_gate` is the gate as it was worked out before, asking every member's lane on each decision;
every test compares the dispatcher's gate with it after a change (lanes, rules, pool, clock).
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from postmux.balancing.pool import Pool
from postmux.config import Settings, settings_from_dict
from postmux.reply import Reply
from postmux.scheduling.dispatcher import Dispatcher
from postmux.scheduling.gate import next_utc_midnight
from postmux.scheduling.shaping import Admission, Lane
from postmux.scheduling.warmup import WarmupLedger

T0 = 1_700_000_000.0  # 2023-11-14, a manual clock
TODAY = datetime.fromtimestamp(T0, UTC).date().isoformat()
OK = Reply(250, "2.0.0", "ok")
DEFER = Reply(451, "4.3.0", "try later")
SUSPEND = Reply(421, "4.7.28", "unusual rate of unsolicited mail")  # a default reaction: suspend 15 min
THROTTLE = Reply(421, "4.7.0", "too many connections")  # a default reaction: throttle by half
GateView = tuple[set[str], set[str], list[str], float, float]


def member(name: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "kind": "source", "source_address": "127.0.0.2", "max_connections": 3, **kw}


def make_settings(members: list[dict[str, Any]], **shaping: Any) -> Settings:
    return settings_from_dict({"pool": [{"name": "p", "members": members}], "shaping": shaping})


def dispatcher(members: list[dict[str, Any]] | None = None, **shaping: Any) -> tuple[Dispatcher, Pool]:
    s = make_settings(members or [member(n) for n in "abc"], **shaping)
    pool = Pool(s.pool[0])
    d = Dispatcher(
        s,
        None,  # type: ignore[arg-type]  # the gate needs no spool, transport, router or bus
        {"p": pool},
        {},
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        clock=lambda: T0,
        warmup=WarmupLedger(None),
    )
    return d, pool


def view(gate: Any) -> GateView:
    return (set(gate.closed), set(gate.away), [m.name for m in gate.capped], gate.next_turn, gate.reopen)


def reference_gate(d: Dispatcher, pool: Pool, destination: str, now: float) -> GateView:
    closed: set[str] = set()
    away: set[str] = set()
    capped: list[str] = []
    next_turn = reopen = math.inf
    for m in pool.members:
        if m.removed:
            continue
        lane = d.shaper.lane(pool.name, m.settings, destination, now)
        admission, at = lane.admission(now)
        if admission is Admission.OPEN and not d.warmup.allows(pool.name, m.settings, destination, now):
            capped.append(m.name)
            admission, at = Admission.SUSPENDED, next_utc_midnight(now)
        if admission is Admission.OPEN:
            continue
        closed.add(m.name)
        if admission is Admission.SUSPENDED:
            away.add(m.name)
            reopen = min(reopen, at)
        elif admission is Admission.RATE:
            next_turn = min(next_turn, at)
    return closed, away, capped, next_turn, reopen


def check(d: Dispatcher, pool: Pool, destination: str, now: float) -> GateView:
    got = view(d._gate(pool, destination, now))
    assert got == reference_gate(d, pool, destination, now)
    return got


def lane(d: Dispatcher, pool: Pool, name: str, destination: str = "dest") -> Lane:
    return d.shaper.lane("p", pool.member(name).settings, destination, T0)


# -- each trigger, one by one ---------------------------------------------------------------------------


def test_a_quiet_pool_has_an_open_gate_and_every_member_gets_its_lane() -> None:
    d, pool = dispatcher()
    assert check(d, pool, "dest", T0)[0] == set()
    assert sorted(k[1] for k in d.shaper.lanes) == ["a", "b", "c"]  # as the admin API has always listed


def test_a_lane_that_fills_up_closes_and_opens_again_when_an_attempt_ends() -> None:
    d, pool = dispatcher()
    check(d, pool, "dest", T0)
    a = lane(d, pool, "a")
    for _ in range(3):
        a.start(T0)
    assert check(d, pool, "dest", T0)[0] == {"a"}
    assert check(d, pool, "other", T0)[0] == set()  # a lane is one destination's
    a.finish(T0)
    assert check(d, pool, "dest", T0)[0] == set()
    # Left out again: a lane looked at needlessly gives the same gate, only slower.
    assert d.shaper.groups[("p", "dest")].attention == {}


def test_a_suspension_closes_the_lane_until_it_ends() -> None:
    d, pool = dispatcher()
    check(d, pool, "dest", T0)
    d.shaper.react(lane(d, pool, "b"), SUSPEND, T0, T0)
    assert check(d, pool, "dest", T0 + 1)[:2] == ({"b"}, {"b"})
    assert check(d, pool, "dest", T0 + 899)[0] == {"b"}
    assert check(d, pool, "dest", T0 + 900)[0] == set()
    assert lane(d, pool, "b").surely_open  # and it is left out of gates again


def test_an_aimd_cut_rate_limits_the_lane_until_it_recovers() -> None:
    d, pool = dispatcher()
    check(d, pool, "dest", T0)
    c = lane(d, pool, "c")
    c.start(T0)
    c.finish(T0)
    d.shaper.react(c, DEFER, T0, T0)
    assert c.rate is not None
    c.start(T0)  # takes the one token: the next attempt must wait its turn
    c.finish(T0)
    closed, _, _, next_turn, _ = check(d, pool, "dest", T0)
    assert closed == {"c"} and T0 < next_turn < math.inf
    now = T0
    while c.rate is not None:  # deliveries raise it back to no limit
        now += 1
        d.shaper.react(c, OK, now, now)
    assert check(d, pool, "dest", now)[0] == set() and c.surely_open


def test_a_throttle_on_a_lane_aimd_leaves_alone_ends_with_its_duration() -> None:
    d, pool = dispatcher(aimd="off")
    check(d, pool, "dest", T0)
    a = lane(d, pool, "a")
    d.shaper.react(a, THROTTLE, T0, T0)
    assert a.restore_at == T0 + 300
    check(d, pool, "dest", T0 + 1)
    assert check(d, pool, "dest", T0 + 300)[0] == set()
    assert a.surely_open


def test_new_rules_from_a_reload_apply_to_the_next_gate() -> None:
    d, pool = dispatcher()
    check(d, pool, "dest", T0)
    d.shaper.configure(make_settings([member(n) for n in "abc"], rule=[{"rate": "1/s"}]).shaping)
    for name in "abc":
        lane(d, pool, name).start(T0)
    assert check(d, pool, "dest", T0)[0] == {"a", "b", "c"}
    d.shaper.configure(make_settings([member(n) for n in "abc"]).shaping)
    assert check(d, pool, "dest", T0)[0] == set()


def test_a_rule_that_lowers_a_lanes_connections_closes_it_sooner() -> None:
    d, pool = dispatcher(rule=[{"member": "a", "max_connections": 1}])
    check(d, pool, "dest", T0)
    lane(d, pool, "a").start(T0)
    assert check(d, pool, "dest", T0)[0] == {"a"}


def test_pruned_lanes_come_back_in_the_next_gate() -> None:
    d, pool = dispatcher()
    check(d, pool, "dest", T0)
    d.shaper.prune(T0 + 7200)
    assert d.shaper.lanes == {} and d.shaper.groups == {}
    check(d, pool, "dest", T0 + 7200)
    assert len(d.shaper.lanes) == 3


def test_members_added_removed_or_given_a_warmup_by_a_reload() -> None:
    d, pool = dispatcher()
    check(d, pool, "dest", T0)
    pool.member("c").in_flight = 1  # removed below, kept until its attempt ends
    warm = {"start": TODAY, "days": [1]}
    pool.reconfigure(make_settings([member("a"), member("b", warmup=warm), member("d")]).pool[0], T0)
    assert check(d, pool, "dest", T0)[0] == set()
    assert ("p", "d", "dest") in d.shaper.lanes
    d.warmup.count("p", pool.member("b").settings, "dest", T0)  # its one message for today
    closed, away, capped, _, reopen = check(d, pool, "dest", T0)
    assert closed == away == {"b"} and capped == ["b"] and reopen == next_utc_midnight(T0)
    assert pool.member("c").removed
    d.shaper.lanes[("p", "c", "dest")].in_flight = 99  # full, but c is removed: its lane no longer counts
    assert "c" not in check(d, pool, "dest", T0)[0]


# -- everything at once, in random order ----------------------------------------------------------------

DESTS = ("d1.test", "d2.test")
REPLIES = (OK, DEFER, SUSPEND, THROTTLE)
OPS = st.one_of(
    st.tuples(st.just("wait"), st.sampled_from([0.0, 0.5, 1.0, 30.0, 300.0, 900.0])),
    st.tuples(st.just("start"), st.integers(0, 2), st.sampled_from(DESTS)),
    st.tuples(st.just("finish"), st.integers(0, 2), st.sampled_from(DESTS)),
    st.tuples(st.just("react"), st.integers(0, 2), st.sampled_from(DESTS), st.sampled_from(REPLIES)),
    st.tuples(st.just("rules"), st.integers(0, 3)),
    st.tuples(st.just("prune"), st.just(0)),
    st.tuples(st.just("pool"), st.integers(0, 2)),
)
RULES: list[dict[str, Any]] = [
    {},
    {"rule": [{"destination": "d1.test", "rate": "2/s", "burst": 2}]},
    {"rule": [{"member": "b", "max_connections": 1}], "aimd": "off"},
    {"aimd": "all"},
]
WARM = {"start": TODAY, "days": [2]}
ROSTERS = [
    [member("a"), member("b"), member("c")],
    [member("a"), member("b", warmup=WARM), member("c")],
    [member("a"), member("c", max_connections=1)],
]


@settings(max_examples=300, deadline=None)
@given(st.lists(OPS, max_size=50))
def test_the_gate_always_equals_the_one_asked_of_every_lane(ops: list[tuple[Any, ...]]) -> None:
    d, pool = dispatcher()
    now = T0
    started: list[tuple[str, str]] = []
    for op in ops:
        present = [m.name for m in pool.members if not m.removed]
        match op:
            case ("wait", dt):
                now += dt
            case ("start", i, dest) if i < len(present):
                m = pool.member(present[i])
                d.shaper.lane("p", m.settings, dest, now).start(now)
                d.warmup.count("p", m.settings, dest, now)
                started.append((m.name, dest))
            case ("finish", i, dest) if present[i : i + 1] and (present[i], dest) in started:
                started.remove((present[i], dest))
                d.shaper.lanes[("p", present[i], dest)].finish(now)
            case ("react", i, dest, reply) if i < len(present):
                lane = d.shaper.lane("p", pool.member(present[i]).settings, dest, now)
                d.shaper.react(lane, reply, now, now)
            case ("rules", i):
                d.shaper.configure(make_settings(ROSTERS[0], **RULES[i]).shaping)
            case ("prune", _):
                d.shaper.prune(now, idle_s=60.0)
            case ("pool", i):
                pool.reconfigure(make_settings(ROSTERS[i]).pool[0], now)
                pool.prune()
        for dest in DESTS:
            check(d, pool, dest, now)
