"""A member's live state, as the balancer and the health tracker see it."""

from __future__ import annotations

from dataclasses import dataclass

from postmux.config import MemberSettings


@dataclass(slots=True)
class Member:
    settings: MemberSettings
    pool: str
    in_flight: int = 0  # attempts running now; never above max_connections
    draining: bool = False
    # passive health
    consecutive_failures: int = 0
    ejected_until: float = 0.0
    ejections: int = 0
    # counters for the demo, the admin API and tests
    attempts: int = 0
    delivered: int = 0
    deferred: int = 0
    bounced: int = 0

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def weight(self) -> int:
        return self.settings.weight

    @property
    def max_connections(self) -> int:
        return self.settings.max_connections

    @property
    def tier(self) -> tuple[bool, int]:
        """Lower sorts first: non-backup members before backups, then by priority number."""
        return (self.settings.backup, self.settings.priority)

    @property
    def has_capacity(self) -> bool:
        return self.in_flight < self.settings.max_connections

    def ejected(self, now: float) -> bool:
        return now < self.ejected_until
