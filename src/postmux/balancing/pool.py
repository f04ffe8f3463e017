"""A pool: members, their tiers and health, and the policy that picks among them."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from postmux.balancing.health import PassiveHealth
from postmux.balancing.member import Member
from postmux.balancing.policies import Policy, make_policy
from postmux.config import PoolSettings

# Called with (member, up) when a member is ejected (up=False) or returns (up=True).
MemberChange = Callable[[Member, bool], None]


class Pool:
    def __init__(self, settings: PoolSettings, on_change: MemberChange | None = None) -> None:
        self.settings = settings
        self.name = settings.name
        self.members = [Member(m, settings.name) for m in settings.members]
        self.policy: Policy = make_policy(settings)
        self.health = PassiveHealth(settings.health)
        self._on_change = on_change or (lambda member, up: None)
        self._down: set[str] = set()

    def member(self, name: str) -> Member:
        for m in self.members:
            if m.name == name:
                return m
        raise KeyError(name)

    # -- health --------------------------------------------------------------------------------------

    def _refresh(self, now: float) -> None:
        """Let members whose ejection is over come back, and say so."""
        if not self._down:
            return
        for m in self.members:
            if m.name in self._down and not m.ejected(now):
                self._down.discard(m.name)
                self._on_change(m, True)

    def record_success(self, member: Member, now: float) -> None:
        self.health.record_success(member, now)

    def record_failure(self, member: Member, now: float) -> None:
        if self.health.record_failure(member, now):
            self._down.add(member.name)
            self._on_change(member, False)

    def in_panic(self, now: float) -> bool:
        """Pool health is the sum over tiers of the usable share of each tier, capped at 1 (Envoy's model).

        A healthy backup tier therefore keeps the pool out of panic when the primaries are all down.
        """
        tiers: dict[tuple[bool, int], list[Member]] = {}
        for m in self.members:
            if not m.draining:
                tiers.setdefault(m.tier, []).append(m)
        if not tiers:
            return False
        health = sum(sum(not m.ejected(now) for m in ms) / len(ms) for ms in tiers.values())
        return min(1.0, health) < self.settings.health.panic_threshold

    def usable(self, now: float) -> list[Member]:
        """Members that may be given new work: the best tier that has any, or everyone in panic."""
        self._refresh(now)
        live = [m for m in self.members if not m.draining and m.weight > 0]
        if not self.in_panic(now):
            live = [m for m in live if not m.ejected(now)]
        if not live:
            return []
        best = min(m.tier for m in live)
        return [m for m in live if m.tier == best]

    # -- choosing ------------------------------------------------------------------------------------

    def pick(self, key: str, now: float, exclude: Sequence[str] | set[str] = ()) -> Member | None:
        """A member for one attempt, or None when every usable member is busy or already tried."""
        usable = [m for m in self.usable(now) if m.name not in exclude]
        if not usable:
            # Everyone in the best tier was tried: look further down the tiers before giving up.
            usable = self._untried_any_tier(now, exclude)
        candidates = [m for m in usable if m.has_capacity]
        if not candidates:
            return None
        return self.policy.pick(candidates, key, usable)

    def _untried_any_tier(self, now: float, exclude: Sequence[str] | set[str]) -> list[Member]:
        live = [
            m
            for m in self.members
            if not m.draining and m.weight > 0 and not m.ejected(now) and m.name not in exclude
        ]
        if not live:
            return []
        best = min(m.tier for m in live)
        return [m for m in live if m.tier == best]

    def can_serve(self, now: float, exclude: Sequence[str] | set[str] = ()) -> bool:
        """Whether some usable member, busy or not, has not been tried yet."""
        return any(m.name not in exclude for m in self.usable(now)) or bool(
            self._untried_any_tier(now, exclude)
        )
