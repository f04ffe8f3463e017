"""A member's live state, as the balancer and the health trackers see it."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from postmux.config import MemberSettings

# Called when anything the pool's choice depends on changes: see Pool._invalidate.
StateChange = Callable[[], None]


@dataclass(slots=True)
class Member:
    _settings: MemberSettings
    pool: str
    in_flight: int = 0  # attempts running now; never above max_connections
    # Behind properties below: the pool caches who is usable, so each change must tell it (_on_state).
    _draining: bool = False  # set by an operator: finish the work in flight, take nothing new
    _removed: bool = False  # gone from the config after a reload; kept until its work in flight ends
    # passive health (outlier detection)
    consecutive_failures: int = 0
    consecutive_4xx: int = 0
    _ejected_until: float = 0.0
    ejections: int = 0
    window_attempts: int = 0
    window_successes: int = 0
    # active health checks
    _check_up: bool = True
    check_streak: int = 0  # passes (> 0) or failures (< 0) in a row
    # the other nodes' checks (balancing/quorum.py): out here too when most nodes that probe it find it down
    _peers_down: bool = False
    shared_checks: str = ""  # what the nodes that probe it say, for operators ("down 2/3 nodes"); "": none
    # blocklist watch: where its sending IPs are listed ("192.0.2.10 on zen.example: 127.0.0.2"), or ()
    _listed: tuple[str, ...] = ()
    # slow start: when the member last came back or was added (None: not ramping)
    _ramp_started: float | None = None
    effective_weight: float = 0.0  # weight after slow start, set by the pool before each pick
    connection_cap: int = 0  # max_connections after slow start, set by the pool before each pick
    # least_latency: peak EWMA of attempt latency
    ewma_latency_s: float = 0.0
    ewma_at: float | None = None  # None: no sample yet
    latency_now_s: float = 0.0  # the average decayed to now, set before a least_latency comparison
    # counters for the demo, the admin API and tests
    attempts: int = 0
    delivered: int = 0
    deferred: int = 0
    bounced: int = 0
    last_error: str = ""
    tls: str = ""  # what the last attempt's connection used: "TLSv1.3 <cipher>", "none", "" (not known yet)
    _on_state: StateChange | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.effective_weight = float(self._settings.weight)
        self.connection_cap = max(1, self._settings.max_connections)

    def _changed(self) -> None:
        if self._on_state is not None:
            self._on_state()

    # -- the state the pool's cached choice depends on: every write tells the pool ----------------------

    @property
    def settings(self) -> MemberSettings:
        return self._settings

    @settings.setter
    def settings(self, value: MemberSettings) -> None:
        self._settings = value
        self._changed()

    @property
    def draining(self) -> bool:
        return self._draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self._draining = value
        self._changed()

    @property
    def removed(self) -> bool:
        return self._removed

    @removed.setter
    def removed(self, value: bool) -> None:
        self._removed = value
        self._changed()

    @property
    def ejected_until(self) -> float:
        return self._ejected_until

    @ejected_until.setter
    def ejected_until(self, value: float) -> None:
        self._ejected_until = value
        self._changed()

    @property
    def check_up(self) -> bool:
        return self._check_up

    @check_up.setter
    def check_up(self, value: bool) -> None:
        self._check_up = value
        self._changed()

    @property
    def peers_down(self) -> bool:
        return self._peers_down

    @peers_down.setter
    def peers_down(self, value: bool) -> None:
        self._peers_down = value
        self._changed()

    @property
    def listed(self) -> tuple[str, ...]:
        return self._listed

    @listed.setter
    def listed(self, value: tuple[str, ...]) -> None:
        self._listed = value
        self._changed()

    @property
    def ramp_started(self) -> float | None:
        return self._ramp_started

    @ramp_started.setter
    def ramp_started(self, value: float | None) -> None:
        self._ramp_started = value
        self._changed()

    @property
    def name(self) -> str:
        return self._settings.name

    @property
    def zone(self) -> str | None:
        return self._settings.zone

    @property
    def weight(self) -> int:
        return self._settings.weight

    @property
    def max_connections(self) -> int:
        return self._settings.max_connections

    @property
    def tier(self) -> tuple[bool, int]:
        """Lower sorts first: non-backup members before backups, then by priority number."""
        return (self._settings.backup, self._settings.priority)

    @property
    def has_capacity(self) -> bool:
        return self.in_flight < self._settings.max_connections

    def ejected(self, now: float) -> bool:
        return now < self._ejected_until

    def healthy(self, now: float) -> bool:
        """Neither ejected by outlier detection, nor failing its active checks (its own, or most nodes'),
        nor on a blocklist."""
        return self._check_up and not self._peers_down and not self._listed and not now < self._ejected_until

    def ramp(self, now: float, slow_start_s: float) -> float:
        """Slow start: the share of full weight this member has earned since it came back (0.1 to 1)."""
        if self._ramp_started is None or slow_start_s <= 0:
            return 1.0
        progress = (now - self._ramp_started) / slow_start_s
        if progress >= 1.0:
            self.ramp_started = None
            return 1.0
        return max(0.1, progress)

    def ramping(self, now: float, slow_start_s: float) -> bool:
        """Whether slow start still holds it back, read without ending the ramp (ramp() ends it, and so
        invalidates the pool's choice: a view must not change state)."""
        started = self._ramp_started
        return started is not None and slow_start_s > 0 and now - started < slow_start_s

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
