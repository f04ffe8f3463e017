"""Passive health: outlier detection from the outcomes of real attempts, on Envoy's model.

Three rules eject a member: local failures in a row (refused, timeout, reset), attempts in a row that got
only 4xx replies, and a success rate far below the pool's (mean - factor x stdev, over an interval).
Ejections last longer each time, and never take out more than max_ejection_percent of the pool.
"""

from __future__ import annotations

import enum
import statistics
from collections.abc import Sequence

from postmux.attempt import AttemptOutcome, Breakoff
from postmux.balancing.member import Member
from postmux.config import HealthSettings, MemberKind


class FailureKind(enum.StrEnum):
    LOCAL = "local"  # refused, timeout, connection lost: nothing usable came back
    REPLY_4XX = "4xx"  # the member answered, but only with transient refusals


# The member's own setup is broken (its source address is not on this host, its credentials are refused):
# true whoever it sends to, so it counts for either kind of member.
_MEMBER_BROKEN = frozenset({Breakoff.BIND, Breakoff.AUTH})


def classify(outcome: AttemptOutcome, kind: MemberKind) -> FailureKind | None:
    """Whether an attempt counts against the member, and how; None: it does not (a success for health).

    A relay is one server: when it cannot be reached, greets with a refusal, or takes nothing (only 4xx
    back, or a 421 anywhere), the relay is failing. A 5xx about one recipient is a verdict on the address,
    not on the member. A source member is a local IP sending to every destination's MX hosts: a receiver
    that is down or pushes back is about that destination only (shaping reacts to it), and must not take
    the IP out of service for every other destination; only a broken source address or login counts.
    """
    breakoff = outcome.breakoff
    if breakoff in _MEMBER_BROKEN:
        return FailureKind.LOCAL
    if kind == "source":
        return None
    if breakoff is Breakoff.GREETING:
        return FailureKind.REPLY_4XX
    if breakoff is not None:
        return FailureKind.LOCAL
    said = outcome.said()
    if said and (all(r.is_transient for r in said) or any(r.code == 421 for r in said)):
        return FailureKind.REPLY_4XX
    return None


class PassiveHealth:
    """Decides ejections. Plain functions of (member state, now); the pool applies them."""

    def __init__(self, settings: HealthSettings) -> None:
        self.settings = settings

    def ejection_time(self, ejections: int) -> float:
        """Each ejection in a row lasts longer: base x n, capped (Envoy's base_ejection_time rule)."""
        return min(self.settings.base_ejection_time * max(1, ejections), self.settings.max_ejection_time)

    def record_success(self, member: Member, now: float) -> None:
        member.consecutive_failures = 0
        member.consecutive_4xx = 0
        member.window_attempts += 1
        member.window_successes += 1
        if member.ejections and not member.ejected(now):
            member.ejections = 0  # trusted again: the next ejection starts from the base time

    def record_failure(self, member: Member, kind: FailureKind) -> str | None:
        """Count a failed attempt; returns the reason when a consecutive-failure rule now says eject."""
        member.window_attempts += 1
        if kind is FailureKind.LOCAL:
            member.consecutive_failures += 1
            if member.consecutive_failures >= self.settings.consecutive_failures:
                return f"{member.consecutive_failures} local failures in a row"
        else:
            member.consecutive_4xx += 1
            if member.consecutive_4xx >= self.settings.consecutive_4xx:
                return f"{member.consecutive_4xx} attempts in a row refused with 4xx"
        return None

    def eject(self, member: Member, now: float) -> None:
        member.ejections += 1
        member.ejected_until = now + self.ejection_time(member.ejections)
        # Back from ejection, a member starts with clean counts: one failure alone does not re-eject it.
        member.consecutive_failures = 0
        member.consecutive_4xx = 0

    def success_rate_outliers(self, members: Sequence[Member]) -> list[tuple[Member, str]]:
        """Members whose success rate over the last interval is far below the pool's; resets the window."""
        s = self.settings
        rated = [
            (m, m.window_successes / m.window_attempts)
            for m in members
            if m.window_attempts >= s.success_rate_min_attempts
        ]
        for m in members:
            m.window_attempts = m.window_successes = 0
        if len(rated) < s.success_rate_min_members:
            return []
        rates = [rate for _, rate in rated]
        floor = statistics.fmean(rates) - s.success_rate_stdev_factor * statistics.pstdev(rates)
        return [
            (m, f"success rate {rate:.0%} below the pool's floor {floor:.0%}")
            for m, rate in rated
            if rate < floor
        ]
