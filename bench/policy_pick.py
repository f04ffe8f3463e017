"""Per-decision cost of each balancing policy for a 16-member pool (issue 6: under 10 µs a pick).

    .venv/bin/python bench/policy_pick.py [--members 16] [--picks 200000] [--rounds 5] [--profile POLICY]
                                          [--zones] [--spill]

Three figures per policy, all in ns per pick:
- **policy.pick**: the policy's own `pick(candidates, key, everyone)` on 16 usable members;
- **Pool.pick**: `Pool.pick(key, now)`: usable members (health, panic, tier), slow-start weights,
  decayed latencies, capacity filter, then the policy;
- **gate + Pool.pick**: the whole decision as `Dispatcher._dispatch_ready` makes it for one item:
  `_gate(pool, destination, now)` (which members shaping holds back from the destination: lanes, warm-up)
  then `pool.pick(key, now, tried | gate.closed)`. Default shaping (no rules, so every lane is open and
  unlimited), destinations drawn from 10; each pick starts an attempt on its lane and the oldest attempt
  ends, as `_start` and `_attempt` do, and that lane bookkeeping is measured with the loop and subtracted.

The pool is in a steady state that exercises every branch: weights 1-5, latencies 2-40 ms, and a window
of 5 attempts per member in flight (each pick takes a connection, the oldest attempt gives one back),
keys drawn from 1,000 sender domains. `--zones`: the members alternate between zones a and b and the node
is in zone a (balancing/zones.py), so every pick stays in zone a; `--spill`: 3 of zone a's 8 members fail
their checks as well, so zone a keeps 0.625 / 0.7 of the picks and each pick draws its zone. Each figure
is the median of --rounds rounds of --picks picks, minus the cost of the same loop with a no-op pick (the
bookkeeping), measured the same way.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import random
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence

from postmux.balancing.member import Member
from postmux.balancing.pool import Pool
from postmux.config import MemberSettings, PoolSettings, Settings
from postmux.scheduling.dispatcher import Dispatcher
from postmux.scheduling.shaping import Lane

POLICIES = ("round_robin", "weighted", "least_connections", "least_latency", "hash")
TARGET_NS = 10_000
IN_FLIGHT_PER_MEMBER = 5
NOW = 1_000_000.0


ZONES = False
SPILL = False


def make_pool(policy: str, members: int, seed: int) -> Pool:
    rng = random.Random(seed)
    settings = PoolSettings(
        name="bench",
        policy=policy,  # type: ignore[arg-type]
        members=tuple(
            MemberSettings(
                name=f"m{i:02d}",
                address=f"127.0.0.1:{20000 + i}",
                weight=rng.randint(1, 5),
                max_connections=20,
                zone=("a", "b")[i % 2] if ZONES else None,
            )
            for i in range(members)
        ),
    )
    pool = Pool(settings, zone="a" if ZONES else None)
    if SPILL:
        for m in [m for m in pool.members if m.zone == "a"][:3]:
            m.check_up = False
    for m in pool.members:
        m.observe_latency(rng.uniform(0.002, 0.040), NOW - 1.0, settings.latency_decay)
    return pool


def noop_pick(candidates: Sequence[Member], key: str, everyone: Sequence[Member]) -> Member | None:
    return candidates[0]


def run_policy_only(pool: Pool, keys: list[str], picks: int, pick: Callable[..., Member | None]) -> int:
    """ns for `picks` calls of the policy alone, with in_flight moving as in a steady state."""
    candidates = pool.usable(NOW)
    window: deque[Member] = deque(candidates[i % len(candidates)] for i in range(len(candidates) * 5))
    for m in window:
        m.in_flight += 1
    nkeys = len(keys)
    start = time.perf_counter_ns()
    for i in range(picks):
        member = pick(candidates, keys[i % nkeys], candidates)
        assert member is not None
        member.in_flight += 1
        window.append(member)
        window.popleft().in_flight -= 1
    elapsed = time.perf_counter_ns() - start
    for m in window:
        m.in_flight -= 1
    return elapsed


def run_pool(pool: Pool, keys: list[str], picks: int) -> int:
    """ns for `picks` calls of Pool.pick, the whole decision the dispatcher makes."""
    window: deque[Member] = deque()
    for m in pool.usable(NOW):
        for _ in range(IN_FLIGHT_PER_MEMBER):
            m.in_flight += 1
            window.append(m)
    nkeys = len(keys)
    start = time.perf_counter_ns()
    for i in range(picks):
        member = pool.pick(keys[i % nkeys], NOW)
        assert member is not None
        member.in_flight += 1
        window.append(member)
        window.popleft().in_flight -= 1
    elapsed = time.perf_counter_ns() - start
    for m in window:
        m.in_flight -= 1
    return elapsed


def make_dispatcher(pool: Pool) -> Dispatcher:
    """A dispatcher with default shaping around `pool`; the gate needs no spool, transport or bus."""
    settings = Settings(pool=(pool.settings,))
    return Dispatcher(settings, None, {pool.name: pool}, {}, None, None, clock=lambda: NOW)  # type: ignore[arg-type]


def run_dispatch(pool: Pool, keys: list[str], picks: int, decide: bool) -> int:
    """ns for `picks` decisions as the dispatcher makes them (decide=False: the bookkeeping alone)."""
    dispatcher = make_dispatcher(pool)
    shaper, pool_name = dispatcher.shaper, pool.name
    destinations = [f"dest{i}.test" for i in range(10)]
    window: deque[tuple[Member, Lane]] = deque()
    for i, m in enumerate(pool.usable(NOW) * IN_FLIGHT_PER_MEMBER):
        lane = shaper.lane(pool_name, m.settings, destinations[i % 10], NOW)
        lane.start(NOW)
        m.in_flight += 1
        window.append((m, lane))
    tried: set[str] = set()
    usable = pool.usable(NOW)
    nkeys, nmembers = len(keys), len(usable)
    start = time.perf_counter_ns()
    for i in range(picks):
        destination = destinations[i % 10]
        if decide:
            gate = dispatcher._gate(pool, destination, NOW)
            member = pool.pick(keys[i % nkeys], NOW, tried | gate.closed)
            assert member is not None
        else:
            member = usable[i % nmembers]
        lane = shaper.lane(pool_name, member.settings, destination, NOW)
        lane.start(NOW)
        member.in_flight += 1
        window.append((member, lane))
        m, lane = window.popleft()
        m.in_flight -= 1
        lane.finish(NOW)
    elapsed = time.perf_counter_ns() - start
    for m, lane in window:
        m.in_flight -= 1
        lane.finish(NOW)
    return elapsed


def measure(policy: str, members: int, picks: int, rounds: int) -> dict[str, float]:
    keys = [f"sender{i}.example" for i in range(1000)]
    policy_ns, pool_ns, base_ns, dispatch_ns, dispatch_base_ns = [], [], [], [], []
    for r in range(rounds):
        pool = make_pool(policy, members, seed=r)
        base_ns.append(run_policy_only(pool, keys, picks, noop_pick) / picks)
        policy_ns.append(run_policy_only(pool, keys, picks, pool.policy.pick) / picks)
        pool_ns.append(run_pool(make_pool(policy, members, seed=r), keys, picks) / picks)
        dispatch_base_ns.append(run_dispatch(make_pool(policy, members, seed=r), keys, picks, False) / picks)
        dispatch_ns.append(run_dispatch(make_pool(policy, members, seed=r), keys, picks, True) / picks)
    base = statistics.median(base_ns)
    dispatch_base = statistics.median(dispatch_base_ns)
    return {
        "policy_ns": statistics.median(policy_ns) - base,
        "pool_ns": statistics.median(pool_ns) - base,
        "dispatch_ns": statistics.median(dispatch_ns) - dispatch_base,
        "bookkeeping_ns": base,
        "dispatch_bookkeeping_ns": dispatch_base,
    }


def profile(policy: str, members: int, picks: int) -> str:
    pool = make_pool(policy, members, seed=0)
    keys = [f"sender{i}.example" for i in range(1000)]
    prof = cProfile.Profile()
    prof.enable()
    run_pool(pool, keys, picks)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(15)
    return out.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--members", type=int, default=16)
    p.add_argument("--picks", type=int, default=200_000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--profile", choices=POLICIES, help="also print a cProfile of Pool.pick for one policy")
    p.add_argument("--zones", action="store_true", help="members in zones a and b, the node in zone a")
    p.add_argument("--spill", action="store_true", help="with --zones: zone a spills part of its picks")
    a = p.parse_args(argv)
    global ZONES, SPILL
    ZONES, SPILL = a.zones or a.spill, a.spill
    zones = ", zones a and b (node in a)" + (", zone a spilling" if SPILL else "") if ZONES else ""
    print(
        f"{a.members} members{zones}, {a.picks} picks x {a.rounds} rounds, Python {sys.version.split()[0]}\n"
    )
    print("| policy | policy.pick ns | Pool.pick ns | gate + Pool.pick ns | under 10 µs |")
    print("|---|---:|---:|---:|---|")
    over = []
    for policy in POLICIES:
        r = measure(policy, a.members, a.picks, a.rounds)
        ok = max(r["pool_ns"], r["dispatch_ns"]) < TARGET_NS
        if not ok:
            over.append(policy)
        verdict = "yes" if ok else "NO"
        figures = " | ".join(f"{r[k]:,.0f}" for k in ("policy_ns", "pool_ns", "dispatch_ns"))
        print(f"| {policy} | {figures} | {verdict} |", flush=True)
    print(
        f"\n(loop bookkeeping, subtracted above: {r['bookkeeping_ns']:.0f} ns a pick; with the lanes' "
        f"start and finish, for gate + Pool.pick: {r['dispatch_bookkeeping_ns']:.0f} ns)"
    )
    for policy in [*over, *([a.profile] if a.profile and a.profile not in over else [])]:
        print(f"\ncProfile of Pool.pick, {policy}:\n{profile(policy, a.members, a.picks // 10)}")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
