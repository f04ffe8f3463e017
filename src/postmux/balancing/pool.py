"""A pool: members, their tiers and health, and the policy that picks among them."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Collection
from dataclasses import dataclass

from postmux.attempt import AttemptOutcome, Breakoff
from postmux.balancing.health import FailureKind, PassiveHealth, classify
from postmux.balancing.member import Member
from postmux.balancing.policies import LeastLatencyPolicy, Policy, make_policy
from postmux.balancing.quorum import SharedVerdict
from postmux.balancing.zones import ZoneRouting, ZoneSplit, routing, split
from postmux.config import MemberSettings, PoolSettings

# Called with (member, up, reason) when a member goes out of service (up=False) or comes back (up=True).
MemberChange = Callable[[Member, bool, str], None]


@dataclass(slots=True)
class _Choice:
    """Who may be given new work, worked out at `since` and true until `until` or the next state change.

    Health, panic and tiers change rarely, while a pool makes a decision for every attempt: working them
    out again for each pick cost about 1.4 µs a member (bench/policy_pick). Only `in_flight` and the
    slow-start ramp move between state changes; the pick reads the first live and refreshes the second.
    """

    members: list[Member]  # the best tier's healthy members, or in panic all of a tier's; never mutated
    ramping: list[Member]  # those of them in slow start: weight and connection cap move with time
    since: float
    until: float  # the first ejection to end: health, panic and tiers may change then
    zones: ZoneSplit | None = None  # the members by zone, when this node prefers its own (zones.py)
    panic: bool = False  # every member of the tier is used, healthy or not (and whatever its zone)


class Pool:
    def __init__(
        self,
        settings: PoolSettings,
        on_change: MemberChange | None = None,
        zone: str | None = None,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self.settings = settings
        self.name = settings.name
        self._zone = zone  # this node's zone ([node] zone): members there are preferred
        self._draw = draw  # uniform in [0, 1): which zone takes a pick while the local one spills
        self.members = [self._adopt(Member(m, settings.name)) for m in settings.members]
        self.policy: Policy = make_policy(settings)
        self.health = PassiveHealth(settings.health)
        self._on_change = on_change or (lambda member, up, reason: None)
        self._ejected: set[str] = set()
        self._next_sweep = 0.0
        # The cached choice and what keeps it honest: every write to a member's draining, removed,
        # check_up, ejected_until, ramp_started or settings calls _invalidate (Member's properties).
        self._choice: _Choice | None = None
        self._epoch = 0
        self._next_return = 0.0  # no ejected member comes back before this: _refresh need not look

    @property
    def zone(self) -> str | None:
        return self._zone

    @zone.setter
    def zone(self, value: str | None) -> None:
        if value != self._zone:
            self._zone = value
            self._invalidate()

    def _adopt(self, member: Member) -> Member:
        member._on_state = self._invalidate
        return member

    @property
    def version(self) -> int:
        """Changes whenever a member's state or the configuration does (the dispatcher's lane groups)."""
        return self._epoch

    def _invalidate(self) -> None:
        """Some member's state changed: work out the choice again at the next pick."""
        self._epoch += 1
        self._choice = None
        self._next_return = 0.0

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
        if self._ejected and now >= self._next_return:
            self._returns(now)

    def tick(self, now: float) -> None:
        """Let members whose ejection is over come back now, whether or not the pool has work.

        pick() and usable() do it too, but a pool without work makes neither: the dispatcher's loop calls
        this about twice a second, so MemberUp, the slow-start ramp and what `postmux members` shows agree
        on when the member came back. Costs one comparison while no ejection is due. The success-rate sweep
        stays with the picks (configuration.md: an idle pool has no attempts to rate).
        """
        if self._ejected and now >= self._next_return:
            self._returns(now)

    def _returns(self, now: float) -> None:
        self._next_return = math.inf
        for m in self.members:
            if m.name not in self._ejected:
                continue
            if m.ejected(now):
                self._next_return = min(self._next_return, m.ejected_until)
                continue
            self._ejected.discard(m.name)
            if m.healthy(now):  # still failing its checks or listed: it comes back when that ends
                self._back(m, now, "ejection time over")  # a state change: looks again next pick

    def _back(self, m: Member, now: float, reason: str) -> None:
        if self.settings.slow_start > 0:
            m.ramp_started = now
        # What it measured before it went out says little about it now: it starts afresh, held back by
        # slow start and by the unknown-latency penalty once it has attempts in flight.
        m.ewma_latency_s, m.ewma_at = 0.0, None
        self._on_change(m, True, reason)

    def observe(
        self, member: Member, outcome: AttemptOutcome, elapsed_s: float, now: float
    ) -> FailureKind | None:
        """What one attempt teaches: its health verdict, the member's latency, counters and TLS.

        The one entry point from the data path (Envoy's outlier detector hears results; it alone decides):
        the facts are classified here (health.classify), and the member is ejected when a rule says so.
        Returns how the attempt counted against the member (None: as a success).
        """
        member.attempts += 1
        failure = classify(outcome, member.settings.kind)
        if _times_the_member(outcome, failure):
            member.observe_latency(elapsed_s, now, self.settings.latency_decay)
        if failure is not None:
            member.last_error = str(next(iter(outcome.replies.values()), ""))
            self.record_failure(member, now, failure)
        else:
            self.record_success(member, now)
        if outcome.tls:
            member.tls = outcome.tls
        return failure

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
        was_healthy = member.healthy(now)
        self.health.eject(member, now)
        self._ejected.add(member.name)
        if was_healthy:  # a member already out (failing checks) is not announced twice
            self._on_change(member, False, f"ejected: {reason}")

    def sweep(self, now: float) -> None:
        """The periodic success-rate rule; called on each pick once its interval has passed."""
        self._next_sweep = now + self.settings.health.success_rate_interval
        for member, reason in self.health.success_rate_outliers(self.members):
            if not member.ejected(now):
                self._eject(member, now, reason)

    def start_sweeping(self, now: float) -> None:
        self._next_sweep = now + self.settings.health.success_rate_interval

    # -- the member's work: what the data path and the operator tell the pool ---------------------------

    def begin(self, member: Member) -> None:
        """An attempt starts on `member`: it holds one of its connections until `finish`."""
        member.in_flight += 1

    def finish(self, member: Member) -> None:
        """An attempt on `member` has ended (its outcome recorded); a removed member goes with its last."""
        member.in_flight -= 1
        if member.removed:
            self.prune()

    def tally(self, member: Member, *, delivered: int = 0, deferred: int = 0, bounced: int = 0) -> None:
        """Count recipients by what became of them (the admin API's and the demo's counters)."""
        member.delivered += delivered
        member.deferred += deferred
        member.bounced += bounced

    def drain(self, name: str) -> bool:
        """The operator drains `name`: it finishes its work in flight and takes nothing new.

        Returns whether that changed anything (False: already draining). Raises KeyError for no such member.
        """
        member = self.member(name)
        if member.draining:
            return False
        member.draining = True
        return True

    def enable(self, name: str) -> bool:
        """The operator takes a drain back; returns whether that changed anything. KeyError: none such."""
        member = self.member(name)
        if not member.draining:
            return False
        member.draining = False
        return True

    def retire(self) -> None:
        """The pool is gone from the configuration: its members take nothing new (work in flight ends)."""
        for m in self.members:
            m.removed = True

    # -- active checks -------------------------------------------------------------------------------

    def record_check(self, member: Member, passed: bool, now: float, detail: str = "") -> None:
        """One active check result; rise passes in a row bring a member back, fall failures take it out."""
        check = self.settings.check
        if passed:
            member.check_streak = max(member.check_streak, 0) + 1
            if not member.check_up and member.check_streak >= check.rise:
                member.check_up = True
                if member.healthy(now):  # else it is announced when the ejection or listing ends
                    self._back(member, now, f"{member.check_streak} checks passed")
        else:
            member.check_streak = min(member.check_streak, 0) - 1
            if member.check_up and -member.check_streak >= check.fall:
                was_healthy = member.healthy(now)
                member.check_up = False
                if was_healthy:
                    self._on_change(
                        member, False, f"{-member.check_streak} checks failed: {detail}".rstrip(": ")
                    )

    def record_shared(self, member: Member, verdict: SharedVerdict | None, now: float) -> None:
        """What the live nodes that probe `member` say of it (balancing/quorum.py), None when not known
        (no shared store, or it is away: this node goes by its own checks): out while most find it down."""
        out = verdict is not None and verdict.out
        member.shared_checks = "" if verdict is None else str(verdict)
        if out == member.peers_down:
            return
        was_healthy = member.healthy(now)
        member.peers_down = out
        if out and was_healthy:
            self._on_change(member, False, f"checks failed on most nodes: {verdict}")
        elif not out and member.healthy(now):
            why = f"checks pass on most nodes: {verdict}" if verdict else "other nodes' checks not known now"
            self._back(member, now, why)

    # -- blocklists ----------------------------------------------------------------------------------

    def record_listing(self, member: Member, listings: tuple[str, ...], now: float) -> None:
        """Where the blocklist watch found the member's sending IPs listed now (() for nowhere): a listed
        member takes no new work (unless the pool is in panic), and comes back when it is delisted."""
        if listings == member.listed:
            return
        was_healthy = member.healthy(now)
        member.listed = listings
        if listings and was_healthy:
            self._on_change(member, False, "listed: " + "; ".join(listings))
        elif not listings and member.healthy(now):
            self._back(member, now, "delisted")

    def forget_checks(self) -> None:
        """Checks were turned off: no checks, no verdict, so no member is held out by old ones."""
        for m in self.members:
            m.check_up, m.check_streak = True, 0

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

    @staticmethod
    def _healthy(members: list[Member], now: float) -> list[Member]:
        return [m for m in members if m.healthy(now)]

    def _panic_tier(self, live: list[Member], now: float) -> list[Member]:
        """In panic, every member in service of the best tier that still has a healthy member, healthy or
        not; of the best tier when no tier has one.

        As Envoy's priority levels in panic: a level gets traffic by its health, so one with no healthy
        host gets none while another has some, and within a level panic spreads over all its hosts rather
        than piling onto the few healthy ones. Panic is no reason to try dead primaries before a backup.
        """
        healthy = self._healthy(live, now)
        if not healthy:
            return live
        tier = min(m.tier for m in healthy)
        return [m for m in live if m.tier == tier]

    def _best_tier(self, members: list[Member], now: float) -> list[Member]:
        if not members:
            return []
        best = min(m.tier for m in members)
        tier = [m for m in members if m.tier == best]
        self._ramp(tier, now)
        return tier

    def _ramp(self, members: list[Member], now: float) -> None:
        """Weight and connection cap after slow start, as the policies and the capacity filter read them."""
        slow_start = self.settings.slow_start
        for m in members:
            share = m.ramp(now, slow_start)
            m.effective_weight = m.weight * share
            # Slow start ramps connections too (as HAProxy's slowstart does with maxconn).
            m.connection_cap = max(1, math.ceil(m.max_connections * share))

    def _current(self, now: float) -> _Choice:
        choice = self._choice
        if choice is not None and choice.since <= now < choice.until:
            return choice
        epoch = self._epoch
        live = self._in_service()
        panic = self.in_panic(now)
        members = self._best_tier(self._panic_tier(live, now) if panic else self._healthy(live, now), now)
        slow_start = self.settings.slow_start
        ramping = [m for m in members if m.ramp_started is not None and slow_start > 0]
        ends = [m.ejected_until for m in self.members if m.ejected_until > now]
        choice = _Choice(members, ramping, now, min(ends, default=math.inf), panic=panic)
        if self._zone is not None and members and not panic:  # in panic the whole tier is used, as Envoy does
            choice.zones = self._split(members)
        if self._epoch == epoch:  # nothing changed while it was worked out (a ramp may end in _ramp)
            self._choice = choice
        return choice

    def _split(self, members: list[Member]) -> ZoneSplit | None:
        """Zone preference within the tier in use; its members that would serve if healthy: its capacity."""
        best = members[0].tier
        tier = [m for m in self.members if m.tier == best and not m.removed and m.weight > 0]
        return split(members, tier, self._zone, self.settings.zone_routing)

    def zone_routing(self, now: float) -> ZoneRouting:
        """Where this node's picks go now, by zone (zones.py), for the operator's views: read off the
        cached choice, worked out again only if a member's state changed since (as the next pick would
        do), so O(1) between state changes. For snapshots; a pick never calls it."""
        choice = self._current(now)
        return routing(self._zone, self.settings.zone_routing, choice.members, choice.zones, choice.panic)

    def usable(self, now: float) -> list[Member]:
        """Members that may be given new work: the best tier's healthy ones, or a whole tier in panic."""
        self._refresh(now)
        choice = self._current(now)
        self._ramp(choice.ramping, now)
        decay = self.settings.latency_decay
        for m in choice.members:  # for callers that hand them to a policy themselves
            m.latency_now_s = m.latency_at(now, decay)
        return list(choice.members)

    def effective_weight(self, m: Member, now: float) -> float:
        """Weight after slow start."""
        return m.weight * m.ramp(now, self.settings.slow_start)

    def max_connections(self, m: Member, now: float) -> int:
        """Slow start ramps connections too (as HAProxy's slowstart does with maxconn)."""
        return max(1, math.ceil(m.max_connections * m.ramp(now, self.settings.slow_start)))

    def pick(
        self, key: str, now: float, exclude: Collection[str] = (), busy: Collection[str] = ()
    ) -> Member | None:
        """A member for one attempt, or None when every usable member is busy or already tried.

        `exclude`d members are passed over, so the pick may go down to a lower tier; `busy` ones count as
        at their connection limit (shaping: a lane full or waiting for its rate's turn), so a busy
        primary makes the item wait for it rather than spill onto the backups.
        """
        self._refresh(now)
        choice = self._current(now)
        if choice.zones is not None:
            return self._pick_by_zone(choice, choice.zones, key, now, exclude, busy)
        usable = choice.members
        if exclude:
            usable = [m for m in usable if m.name not in exclude]
        if not usable:
            # Everyone in the best tier was tried: look further down the tiers before giving up.
            usable = self._untried_any_tier(now, exclude)
        elif choice.ramping:
            self._ramp(choice.ramping, now)
        candidates = [m for m in usable if m.in_flight < m.connection_cap and m.name not in busy]
        if not candidates:
            return None
        return self.policy.pick(candidates, key, usable, now)

    def _pick_by_zone(
        self,
        choice: _Choice,
        zones: ZoneSplit,
        key: str,
        now: float,
        exclude: Collection[str],
        busy: Collection[str],
    ) -> Member | None:
        """Pool.pick with the tier split by zone: the drawn side first, the other when it has no one left
        to try, or (spill_when_full) when everyone on it is at the connection cap or busy."""
        if choice.ramping:
            self._ramp(choice.ramping, now)
        share = zones.local_share
        first, second = zones.first(self._draw() if 0.0 < share < 1.0 else 0.0)
        waited = False
        for side in (first, second):
            usable = [m for m in side if m.name not in exclude] if exclude else side
            if not usable:
                continue
            candidates = [m for m in usable if m.in_flight < m.connection_cap and m.name not in busy]
            if candidates:
                return self.policy.pick(candidates, key, usable, now)
            if not self.settings.zone_routing.spill_when_full:
                return None  # full: the work waits for its zone, as it waits for a tier
            waited = True
        if waited:
            return None
        # Everyone in the best tier was tried, in every zone: look further down the tiers.
        usable = self._untried_any_tier(now, exclude)
        candidates = [m for m in usable if m.in_flight < m.connection_cap and m.name not in busy]
        return self.policy.pick(candidates, key, usable, now) if candidates else None

    def _untried_any_tier(self, now: float, exclude: Collection[str]) -> list[Member]:
        live = [m for m in self._in_service() if m.healthy(now) and m.name not in exclude]
        return self._best_tier(live, now)

    def can_serve(self, now: float, exclude: Collection[str] = ()) -> bool:
        """Whether some usable member, busy or not, has not been tried yet."""
        if any(m.name not in exclude for m in self.usable(now)):
            return True
        return bool(self._untried_any_tier(now, exclude))

    # -- live changes --------------------------------------------------------------------------------

    def reconfigure(self, settings: PoolSettings, now: float) -> list[str]:
        """Apply a reloaded pool: add, reweight and remove members without touching work in flight.

        A removed member stays listed (marked removed, picked no more) until its attempts end; an added
        member ramps up under slow start. Returns what changed, in words for the operator.
        """
        changes: list[str] = []
        wanted = {m.name: m for m in settings.members}
        for m in self.members:
            new = wanted.get(m.name)
            if new is None:
                if not m.removed:
                    m.removed = True
                    changes.append(f"{self.name}/{m.name}: removed")
            elif m.removed:
                changes.append(self._restore(m, new, settings.slow_start, now))
            elif new != m.settings:
                changes.append(f"{self.name}/{m.name}: {_diff(m.settings.model_dump(), new.model_dump())}")
                m.settings, m.removed = new, False
        known = {m.name for m in self.members}
        for new in settings.members:
            if new.name not in known:
                member = self._adopt(Member(new, self.name))
                if settings.slow_start > 0:
                    member.ramp_started = now
                self.members.append(member)
                changes.append(f"{self.name}/{new.name}: added")
        if (
            settings.policy != self.settings.policy
            or settings.hash_balance_factor != self.settings.hash_balance_factor
        ):
            self.policy = make_policy(settings)
            changes.append(f"{self.name}: policy {settings.policy}")
        elif isinstance(self.policy, LeastLatencyPolicy):
            self.policy.decay_s = settings.latency_decay
        self.settings = settings
        self.health = PassiveHealth(settings.health)
        self._invalidate()  # slow start, panic threshold, tiers: anything may have changed
        self.prune()
        return changes

    def _restore(self, m: Member, new: MemberSettings, slow_start: float, now: float) -> str:
        """A member an earlier reload removed is in the file again while still listed (its attempts in
        flight have not ended): it is back in service, ramping up as an added member does, instead of being
        pruned with its last attempt (operations.md, Reload: the running pool follows the file)."""
        what = "restored"
        if new != m.settings:
            what += f", {_diff(m.settings.model_dump(), new.model_dump())}"
        m.settings, m.removed = new, False
        if slow_start > 0:
            m.ramp_started = now
        return f"{self.name}/{m.name}: {what}"

    def prune(self) -> None:
        """Forget removed members once their last attempt has ended."""
        kept = [m for m in self.members if not (m.removed and m.in_flight == 0)]
        if len(kept) != len(self.members):
            self.members = kept
            self._invalidate()


def _times_the_member(outcome: AttemptOutcome, failure: FailureKind | None) -> bool:
    """Whether an attempt's time is a latency sample (configuration.md, Latency average).

    An answer is, whatever it said. So is a timeout, as an attempt at least that slow (Finagle times failed
    requests too): left out, a member that hangs keeps the fast average it had and keeps winning pairs
    until it is ejected (review2/balance.md, finding 3). A member that came back from an ejection starts
    afresh (Pool._back), so one it timed out before is not held against it. A refused or dropped
    connection, a failed TLS or login measure nothing of its work, and an unfit attempt sent nothing: their
    near-zero times would flatter it.
    """
    if outcome.unfit:
        return False
    return failure is not FailureKind.LOCAL or outcome.breakoff is Breakoff.TIMEOUT


def _diff(old: dict[str, object], new: dict[str, object]) -> str:
    return ", ".join(f"{k} {old[k]} -> {new[k]}" for k in new if old.get(k) != new[k])
