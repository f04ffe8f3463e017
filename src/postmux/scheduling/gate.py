"""The gate: which members shaping and warm-up hold back from one destination now, and until when; and which
members the sender domain's SPF record does not permit (spf_barred), from a verdict evaluated beforehand.

Deciding only: it reads the lanes (postmux.scheduling.shaping) and the warm-up ledger and returns a value;
the dispatcher passes the held-back members to Pool.pick. It runs once per decision, so its cost is the
dispatch path's (bench/policy_pick, "gate + Pool.pick"): a destination whose lanes are all open and
unlimited costs one dictionary look-up, and only lanes that may hold an attempt back are asked.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from postmux.balancing.member import Member
from postmux.balancing.pool import Pool
from postmux.config import SpfSettings
from postmux.reputation.spf import SpfVerdict
from postmux.scheduling.shaping import Admission, LaneGroup, Shaper
from postmux.scheduling.warmup import WarmupLedger


@dataclass(slots=True)
class Gate:
    """Which members shaping keeps from one destination right now, and until when."""

    closed: set[str] = field(default_factory=set)  # may not start an attempt now, for any reason
    away: set[str] = field(default_factory=set)  # suspended or at their warm-up cap: not worth waiting for
    capped: list[Member] = field(default_factory=list)
    next_turn: float = math.inf  # when a rate-limited lane may send again
    reopen: float = math.inf  # when the first of the `away` members may send again


# The gate of a decision in which shaping holds no member back; shared, so never mutated.
OPEN = Gate()


def next_utc_midnight(now: float) -> float:
    """When a warm-up day ends: the caps count per UTC day (postmux.scheduling.warmup)."""
    tomorrow = datetime.fromtimestamp(now, UTC).date() + timedelta(days=1)
    return datetime(tomorrow.year, tomorrow.month, tomorrow.day, tzinfo=UTC).timestamp()


def lane_group(shaper: Shaper, pool: Pool, destination: str, now: float) -> LaneGroup:
    """The lanes of `pool`'s members toward `destination`, as of the pool's current roster."""
    group = shaper.groups.get((pool.name, destination))
    if group is not None and group.roster == pool.version:
        return group
    members = [m.settings for m in pool.members if not m.removed]
    return shaper.group(pool.name, members, destination, pool.version, now)


def gate(shaper: Shaper, warmup: WarmupLedger, pool: Pool, destination: str, now: float) -> Gate:
    """Which of `pool`'s members may not start an attempt toward `destination` now."""
    group = lane_group(shaper, pool, destination, now)
    if not group.attention and not group.warming:
        return OPEN  # every lane open, unlimited, with a connection free: nothing to hold back
    held = Gate()
    for m in pool.members:
        if m.removed:
            continue
        # A lane outside `attention` is surely open (Lane.surely_open): asking it would say OPEN.
        lane = group.attention.get(m.name)
        if lane is None and m.settings.warmup is None:
            continue
        admission, at = lane.admission(now) if lane is not None else (Admission.OPEN, 0.0)
        if admission is Admission.OPEN and not warmup.allows(pool.name, m.settings, destination, now):
            held.capped.append(m)
            admission, at = Admission.SUSPENDED, next_utc_midnight(now)
        if admission is Admission.OPEN:
            continue
        held.closed.add(m.name)
        if admission is Admission.SUSPENDED:
            held.away.add(m.name)
            held.reopen = min(held.reopen, at)
        elif admission is Admission.RATE:
            held.next_turn = min(held.next_turn, at)
    return held


# -- SPF: which members the sender domain's SPF record does not permit --------------------------------------


def spf_permits(result: str, rules: SpfSettings) -> bool:
    """Whether an SPF result (RFC 7208 2.6) lets a member carry the domain's mail."""
    match result:
        case "pass":
            return True
        case "fail":
            return False
        case "softfail":
            return rules.softfail == "permitted"
        case "temperror" | "permerror":
            return rules.on_error == "open"
        case _:
            # none: the domain publishes no record, so no member can pass and none is singled out;
            # neutral "MUST be treated exactly like none" (RFC 7208 8.2).
            return True


def spf_barred(verdict: SpfVerdict, pool: Pool, rules: SpfSettings) -> frozenset[str]:
    """The members of `pool` that may not carry mail from `verdict`'s domain.

    A member is judged by every IP it may send from (a relay's `sending_ips`, a source's address): one
    IP not permitted is enough to keep it out, since the relay may pick that one. A member without known
    IPs is not judged. An IP the verdict does not cover (added by a reload since) is judged at the next one.
    """
    barred = {
        m.name
        for m in pool.members
        if not m.removed
        and any(not spf_permits(verdict.results.get(ip, "none"), rules) for ip in m.settings.spf_ips)
    }
    return frozenset(barred) if barred else NONE_BARRED


NONE_BARRED: frozenset[str] = frozenset()


def spf_why(verdict: SpfVerdict, pool: Pool, rules: SpfSettings, barred: Collection[str]) -> dict[str, str]:
    """For the operator: each barred member and the SPF result that keeps it out (its first such IP)."""
    why: dict[str, str] = {}
    for m in pool.members:
        if m.name in barred:
            for ip in m.settings.spf_ips:
                result = verdict.results.get(ip, "none")
                if not spf_permits(result, rules):
                    why[m.name] = f"{ip} {result}"
                    break
    return why
