"""A member's live state, as the balancer and the health trackers see it."""

from __future__ import annotations

import math
from dataclasses import dataclass

from postmux.config import MemberSettings


@dataclass(slots=True)
class Member:
    settings: MemberSettings
    pool: str
    in_flight: int = 0  # attempts running now; never above max_connections
    draining: bool = False  # set by an operator: finish the work in flight, take nothing new
    removed: bool = False  # gone from the config after a reload; kept until its work in flight ends
    # passive health (outlier detection)
    consecutive_failures: int = 0
    consecutive_4xx: int = 0
    ejected_until: float = 0.0
    ejections: int = 0
    window_attempts: int = 0
    window_successes: int = 0
    # active health checks
    check_up: bool = True
    check_streak: int = 0  # passes (> 0) or failures (< 0) in a row
    # slow start: when the member last came back or was added (None: not ramping)
    ramp_started: float | None = None
    effective_weight: float = 0.0  # weight after slow start, set by the pool before each pick
    # least_latency: peak EWMA of attempt latency
    ewma_latency_s: float = 0.0
    ewma_at: float | None = None  # None: no sample yet
    latency_now_s: float = 0.0  # the average decayed to now, set by the pool before each pick
    # counters for the demo, the admin API and tests
    attempts: int = 0
    delivered: int = 0
    deferred: int = 0
    bounced: int = 0
    last_error: str = ""
    tls: str = ""  # what the last attempt's connection used: "TLSv1.3 <cipher>", "none", "" (not known yet)

    def __post_init__(self) -> None:
        self.effective_weight = float(self.settings.weight)

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

    def healthy(self, now: float) -> bool:
        """Neither ejected by outlier detection nor failing its active checks."""
        return self.check_up and not self.ejected(now)

    def ramp(self, now: float, slow_start_s: float) -> float:
        """Slow start: the share of full weight this member has earned since it came back (0.1 to 1)."""
        if self.ramp_started is None or slow_start_s <= 0:
            return 1.0
        progress = (now - self.ramp_started) / slow_start_s
        if progress >= 1.0:
            self.ramp_started = None
            return 1.0
        return max(0.1, progress)

    def observe_latency(self, seconds: float, now: float, decay_s: float) -> None:
        """Peak EWMA (Finagle): a slower sample counts at once, faster ones pull the average down slowly."""
        if self.ewma_at is None or seconds > self.ewma_latency_s:
            self.ewma_latency_s = seconds
        else:
            keep = self._keep(now, decay_s)
            self.ewma_latency_s = self.ewma_latency_s * keep + seconds * (1.0 - keep)
        self.ewma_at = now

    def _keep(self, now: float, decay_s: float) -> float:
        if self.ewma_at is None or decay_s <= 0:
            return 0.0
        return math.exp(-max(0.0, now - self.ewma_at) / decay_s)

    def latency_at(self, now: float, decay_s: float) -> float:
        """The average as of now: it fades while no sample comes (Finagle decays toward 0 on read), so a
        member that was slow once is tried again instead of being starved forever in a quiet pool."""
        return self.ewma_latency_s * self._keep(now, decay_s)
