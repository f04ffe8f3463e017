"""A pool: members, their tiers and health, and the policy that picks among them."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection

from postmux.balancing.health import FailureKind, PassiveHealth
from postmux.balancing.member import Member
from postmux.balancing.policies import Policy, make_policy
from postmux.config import PoolSettings

# Called with (member, up, reason) when a member goes out of service (up=False) or comes back (up=True).
MemberChange = Callable[[Member, bool, str], None]


class Pool:
    def __init__(self, settings: PoolSettings, on_change: MemberChange | None = None) -> None:
        self.settings = settings
        self.name = settings.name
        self.members = [Member(m, settings.name) for m in settings.members]
        self.policy: Policy = make_policy(settings)
        self.health = PassiveHealth(settings.health)
        self._on_change = on_change or (lambda member, up, reason: None)
        self._ejected: set[str] = set()
        self._next_sweep = 0.0

    def member(self, name: str) -> Member:
        for m in self.members:
            if m.name == name:
                return m
        raise KeyError(name)

    # -- passive health ------------------------------------------------------------------------------

    def _refresh(self, now: float) -> None:
        """Let members whose ejection is over come back (ramping up if slow start is on), and say so."""
        if self._next_sweep and now >= self._next_sweep:
            self.sweep(now)
        if not self._ejected:
            return
        for m in self.members:
            if m.name in self._ejected and not m.ejected(now):
                self._ejected.discard(m.name)
                self._back(m, now, "ejection time over")

    def _back(self, m: Member, now: float, reason: str) -> None:
        if self.settings.slow_start > 0:
            m.ramp_started = now
        self._on_change(m, True, reason)

    def record_success(self, member: Member, now: float) -> None:
        self.health.record_success(member, now)

    def record_failure(self, member: Member, now: float, kind: FailureKind = FailureKind.LOCAL) -> None:
        reason = self.health.record_failure(member, kind)
        if reason is not None and not member.ejected(now):
            self._eject(member, now, reason)

    def _eject(self, member: Member, now: float, reason: str) -> None:
        # max_ejection_percent: outlier detection must never empty a pool by itself (one may always go).
        limit = max(1, math.floor(len(self.members) * self.settings.health.max_ejection_percent / 100))
        if sum(m.ejected(now) for m in self.members) >= limit:
            return
        self.health.eject(member, now)
        self._ejected.add(member.name)
        self._on_change(member, False, f"ejected: {reason}")

    def sweep(self, now: float) -> None:
        """The periodic success-rate rule; called on each pick once its interval has passed."""
        self._next_sweep = now + self.settings.health.success_rate_interval
        for member, reason in self.health.success_rate_outliers(self.members):
            if not member.ejected(now):
                self._eject(member, now, reason)

    def start_sweeping(self, now: float) -> None:
        self._next_sweep = now + self.settings.health.success_rate_interval

    # -- active checks -------------------------------------------------------------------------------

    def record_check(self, member: Member, passed: bool, now: float, detail: str = "") -> None:
        """One active check result; rise passes in a row bring a member back, fall failures take it out."""
        check = self.settings.check
        if passed:
            member.check_streak = max(member.check_streak, 0) + 1
            if not member.check_up and member.check_streak >= check.rise:
                member.check_up = True
                self._back(member, now, f"{member.check_streak} checks passed")
        else:
            member.check_streak = min(member.check_streak, 0) - 1
            if member.check_up and -member.check_streak >= check.fall:
                member.check_up = False
                self._on_change(member, False, f"{-member.check_streak} checks failed: {detail}".rstrip(": "))

    # -- choosing ------------------------------------------------------------------------------------

    def in_panic(self, now: float) -> bool:
        """Pool health is the sum over tiers of the healthy share of each tier, capped at 1 (Envoy's model).

        A healthy backup tier therefore keeps the pool out of panic when the primaries are all down.
        """
        tiers: dict[tuple[bool, int], list[Member]] = {}
        for m in self._in_service():
            tiers.setdefault(m.tier, []).append(m)
        if not tiers:
            return False
        health = sum(sum(m.healthy(now) for m in ms) / len(ms) for ms in tiers.values())
        return min(1.0, health) < self.settings.health.panic_threshold

    def _in_service(self) -> list[Member]:
        return [m for m in self.members if not m.draining and not m.removed and m.weight > 0]

    def _best_tier(self, members: list[Member], now: float) -> list[Member]:
        if not members:
            return []
        best = min(m.tier for m in members)
        tier = [m for m in members if m.tier == best]
        for m in tier:
            m.effective_weight = m.weight * m.ramp(now, self.settings.slow_start)
        return tier

    def usable(self, now: float) -> list[Member]:
        """Members that may be given new work: the best tier that has any, or everyone in panic."""
        self._refresh(now)
        live = self._in_service()
        if not self.in_panic(now):
            live = [m for m in live if m.healthy(now)]
        return self._best_tier(live, now)

    def max_connections(self, m: Member, now: float) -> int:
        """Slow start ramps connections too (as HAProxy's slowstart does with maxconn)."""
        return max(1, math.ceil(m.max_connections * m.ramp(now, self.settings.slow_start)))

    def pick(self, key: str, now: float, exclude: Collection[str] = ()) -> Member | None:
        """A member for one attempt, or None when every usable member is busy or already tried."""
        usable = [m for m in self.usable(now) if m.name not in exclude]
        if not usable:
            # Everyone in the best tier was tried: look further down the tiers before giving up.
            usable = self._untried_any_tier(now, exclude)
        candidates = [m for m in usable if m.in_flight < self.max_connections(m, now)]
        if not candidates:
            return None
        return self.policy.pick(candidates, key, usable)

    def _untried_any_tier(self, now: float, exclude: Collection[str]) -> list[Member]:
        live = [m for m in self._in_service() if m.healthy(now) and m.name not in exclude]
        return self._best_tier(live, now)

    def can_serve(self, now: float, exclude: Collection[str] = ()) -> bool:
        """Whether some usable member, busy or not, has not been tried yet."""
        if any(m.name not in exclude for m in self.usable(now)):
            return True
        return bool(self._untried_any_tier(now, exclude))
