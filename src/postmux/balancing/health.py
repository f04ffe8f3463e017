"""Passive health: outlier ejection from the outcomes of real attempts (Envoy's consecutive-failure rule)."""

from __future__ import annotations

from postmux.balancing.member import Member
from postmux.config import HealthSettings


class PassiveHealth:
    """Decides when a member is ejected and when it may return. Plain functions of (member, now)."""

    def __init__(self, settings: HealthSettings) -> None:
        self.settings = settings

    def ejection_time(self, ejections: int) -> float:
        """Each ejection in a row lasts longer: base x n, capped (Envoy's base_ejection_time rule)."""
        return min(self.settings.base_ejection_time * max(1, ejections), self.settings.max_ejection_time)

    def record_success(self, member: Member, now: float) -> bool:
        """Returns True when this success ends a streak of ejections (the member is trusted again)."""
        member.consecutive_failures = 0
        if member.ejections and not member.ejected(now):
            member.ejections = 0
            return True
        return False

    def record_failure(self, member: Member, now: float) -> bool:
        """Count a failure of the member as a whole; returns True when it ejects the member now."""
        member.consecutive_failures += 1
        if member.ejected(now) or member.consecutive_failures < self.settings.consecutive_failures:
            return False
        member.ejections += 1
        member.ejected_until = now + self.ejection_time(member.ejections)
        # Back from ejection, a member gets a fresh count: one failure alone does not re-eject it.
        member.consecutive_failures = 0
        return True
