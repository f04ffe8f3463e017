"""Traffic shaping: what each member may send to each destination, and how receivers' replies change it.

A *lane* is one member x one destination (a provider, else a domain). It has a ceiling (the configured
limits) and what is allowed now, which reactions and AIMD move between the floors and the ceiling:

- a reaction rule that matches a reply suspends the lane or cuts it by a factor;
- otherwise, with AIMD on, a deferral that pushes back (`pushes_back`: not one about a single address or
  mailbox, such as "4.2.2 mailbox full") halves the allowed connections and rate and each delivery adds a
  little back (TCP's congestion control, applied to a receiver's patience). Only replies to attempts that
  started after the last cut count toward another cut, as TCP cuts once per window: a burst of 421s
  answering mail sent at the old rate says nothing about the new one.

What several lanes (later several nodes) must agree on - the rate's turns, the connection slots in use,
suspensions - the lanes ask of a `Throttles` (scheduling/throttles.py: GCRA, leases, suspensions, on
KumoMTA's model); what a lane learnt on its own - ceilings, what AIMD allows now, cuts and when - it keeps.
Everything here is plain state and arithmetic on `now`: the dispatcher does the I/O.
"""

from __future__ import annotations

import enum
import math
import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from postmux.config import MemberSettings, ReactionRule, ShapingRule, ShapingSettings
from postmux.reply import Reply
from postmux.scheduling.throttles import ALLOWED, Lease, MemoryThrottles, RetryAfter, Throttles

# Receivers' well-known ways of saying "slow down". Config reactions are tried first.
DEFAULT_REACTIONS: tuple[ReactionRule, ...] = (
    # Gmail: "Our system has detected an unusual rate of unsolicited mail" - keep away for a while.
    ReactionRule(enhanced_code="4.7.28", action="suspend", duration=900.0),
    ReactionRule(text=r"too many (concurrent )?(connections|sessions)", action="throttle", factor=0.5),
)

# RFC 3463 3.2, 3.3: the subjects of one recipient's address (X.1.x: unknown, moved) and of its mailbox
# (X.2.x: full, disabled, over its own rate): the state of one mailbox, the same at any sending rate.
_MAILBOX_SUBJECTS = frozenset({"1", "2"})
# RFC 3463 3.6 X.5.3: too many recipients for one transaction, the receiver's limit on a transaction's
# size (the rest go in the next one: verdicts' split), not on how fast mail comes.
_TRANSACTION_LIMIT = "5.3"


def pushes_back(reply: Reply) -> bool:
    """Whether a deferral is the receiver asking to be sent less, so that AIMD cuts the lane for it.

    A 421 always is (RFC 5321 3.8: the server closes the channel, "too many connections" comes so), and so
    is any other 4xx but one whose enhanced code is about one address or mailbox: one full mailbox must
    not halve the sending to every domain of its provider. A 4xx with no enhanced code says nothing either
    way and counts, as it always did; 4.7.x (policy, rate), 4.3.x (system) and 4.4.x (network) count.
    """
    if reply.code == 421:
        return True
    if not reply.is_transient:
        return False
    status = reply.enhanced_code.split(".", 1)[1] if "." in reply.enhanced_code else ""  # "2.2" of "4.2.2"
    return status.split(".")[0] not in _MAILBOX_SUBJECTS and status != _TRANSACTION_LIMIT


_OBSERVE_WINDOW_S = 60.0
# A connection lease outlives any attempt: the shaper renews the leases of attempts still running when less
# than half of this is left (Shaper.prune, every second). Only a node that died stops renewing its leases,
# and with a shared store its slots come free this long after: shorter than the spool's default lease_ttl
# (60 s), so by the time the other nodes take a dead node's work over, its slots are theirs again. (At
# 300 s, a node killed in the three-node test left half the farm's slots toward the member held for five
# minutes after its work had been taken over: tests/e2e/test_three_nodes.py.) A renewal is one round trip
# per running attempt every 15 s; a loop stalled for 15 s lets a lease run out, and the limit may then be
# overshot by that attempt until it ends.
LEASE_TTL_S = 30.0
# With a shared store (Redis) a lease is a round trip on the event loop to take it and another to give it
# back: two per message, which bench/nodes measured at about 0.5 ms of a node's CPU a message, and which a
# Redis on another machine would make a wait on every delivery. So a lease whose attempt ended is kept this
# long for the lane's next attempt (under load, milliseconds later) and given back by the shaper's prune
# (every second) if none came: another node sees the slot busy for at most this long, plus the tick,
# after the attempt ended. In-process leases cost a dict lookup and are given back at once.
SPARE_LEASE_S = 1.0


@dataclass(frozen=True, slots=True)
class Limits:
    max_connections: int
    max_messages_per_connection: int | None = None
    max_recipients: int | None = None
    rate: float | None = None  # messages per second
    burst: int = 1


class Admission(enum.Enum):
    OPEN = "open"
    BUSY = "busy"  # every allowed connection is in use: wait for one to end
    RATE = "rate"  # over the rate: wait until the next message's turn
    SUSPENDED = "suspended"  # a reaction keeps this member away from this destination for a while


@dataclass(slots=True)
class Lane:
    pool: str
    member: str
    destination: str
    ceiling: Limits
    kind: str = "relay"
    member_connections: int = 1  # the member's own max_connections, above every lane's ceiling
    adaptive: bool = True  # AIMD applies to this lane ([shaping] aimd and the member's kind)
    connections: float = 0.0  # allowed now, AIMD-adjusted (a float so additive increase can be gradual)
    rate: float | None = None  # allowed now, messages per second; None: no limit
    in_flight: int = 0  # attempts this node runs on the lane; each holds one of `leases`, if granted
    owed: int = 0  # rate turns of attempts that started after another node took the turn (see start)
    contended: bool = False  # the last attempt found every shared slot taken by other nodes (see start)
    suspended_until: float = 0.0  # the suspension as the lane last saw it in the throttles (0.0: none)
    cut_at: float = -math.inf
    restore_at: float = 0.0  # when a throttle ends on a lane that AIMD does not raise by itself
    last_change: str = ""
    last_change_at: float = 0.0
    started: deque[float] = field(default_factory=deque)  # start times in the last minute
    accepted: deque[float] = field(default_factory=deque)  # delivery times in the last minute
    first_start: float | None = None
    delivered: int = 0
    deferred: int = 0
    touched_at: float = 0.0
    group: LaneGroup | None = field(default=None, repr=False, compare=False)
    throttles: Throttles = field(default_factory=MemoryThrottles, repr=False, compare=False)
    leases: list[Lease] = field(default_factory=list, repr=False, compare=False)
    # Leases of attempts that ended, kept for the next one (SPARE_LEASE_S), with when each was kept; only
    # with a shared store (keep_spares).
    spares: list[tuple[Lease, float]] = field(default_factory=list, repr=False, compare=False)
    keep_spares: bool = field(default=False, repr=False, compare=False)
    key: str = field(init=False, default="")  # the lane's key in the throttles

    def __post_init__(self) -> None:
        self.key = f"{self.pool}/{self.member}/{self.destination}"

    @property
    def allowed_connections(self) -> int:
        return max(1, math.floor(self.connections))

    @property
    def surely_open(self) -> bool:
        """Open now and until its own state changes: no suspension, throttle or rate, a connection free.

        Only such a lane's admission is independent of the clock, so only it may be left out of a gate.
        It is this node's view: with throttles shared between nodes, another node's suspension or leases
        show only when the lane is asked. A lane whose last attempt found every slot taken elsewhere is
        asked from then on (`contended`), until one of its attempts gets a slot again; another node's
        suspension shows once the lane is asked, or when this node's own reply says the same.
        """
        return (
            not self.contended
            and self.rate is None
            and not self.suspended_until
            and not self.restore_at
            and self.in_flight < self.allowed_connections
        )

    def _mark(self) -> None:
        """Tell the lane's group whether this lane needs looking at on each decision (after any change)."""
        group = self.group
        if group is None:
            return
        if self.surely_open:
            group.attention.pop(self.member, None)
        else:
            group.attention[self.member] = self

    def admission(self, now: float) -> tuple[Admission, float]:
        """Whether an attempt may start now; if not, the earliest time worth asking again (0: unknown).

        Asks the throttles (suspension, connection leases, the rate's next turn) and takes nothing.
        """
        throttles = self.throttles
        suspension = throttles.suspended(self.key, now)
        if suspension is not None:
            if suspension.until != self.suspended_until:
                self.suspended_until = suspension.until
                self._mark()
            return Admission.SUSPENDED, suspension.until
        if self.suspended_until:
            # Over: forgetting the time changes no answer (it is in the past) and lets the lane be left
            # out of gates again.
            self.suspended_until = 0.0
            self._mark()
        if self.restore_at and now >= self.restore_at:
            self.restore()
        allowed = self.allowed_connections
        # This node's own attempts first: those over the limit hold no lease (see finish). A spare lease is
        # a slot this node holds already: with one, the shared count need not be asked.
        if self.in_flight >= allowed or (not self.spares and throttles.leases_held(self.key, now) >= allowed):
            return Admission.BUSY, 0.0
        if self.rate is not None:
            while self.owed:  # paid first, from the next free turns: the rate holds over time
                turn = throttles.rate(self.key, self.rate, self.ceiling.burst, now)
                if isinstance(turn, RetryAfter):
                    return Admission.RATE, now + turn.seconds
                self.owed -= 1
            turn = throttles.rate(self.key, self.rate, self.ceiling.burst, now, take=0)
            if isinstance(turn, RetryAfter):
                return Admission.RATE, now + turn.seconds
        return Admission.OPEN, 0.0

    def restore(self) -> None:
        """Back to the ceiling: the end of a throttle's duration on a lane AIMD does not adapt."""
        self.connections, self.rate, self.restore_at = (
            float(self.ceiling.max_connections),
            self.ceiling.rate,
            0.0,
        )
        self._mark()

    def start(self, now: float) -> None:
        """An attempt starts: it takes a connection lease and the rate's turn (the gate said OPEN)."""
        self.in_flight += 1
        self.touched_at = now
        throttles = self.throttles
        lease = self._spare(now) or throttles.lease(self.key, self.allowed_connections, LEASE_TTL_S, now)
        if lease is not None:
            self.leases.append(lease)
        # No slot while this node had one free by its own count: other nodes hold them (shared throttles).
        self.contended = lease is None and self.in_flight <= self.allowed_connections
        if (
            self.rate is not None
            and throttles.rate(self.key, self.rate, self.ceiling.burst, now) is not ALLOWED
        ):
            # With throttles shared between nodes, another node may take the turn between this node's
            # asking (admission) and starting: the attempt has started, so its turn is owed.
            self.owed += 1
        self.started.append(now)
        if self.first_start is None:
            self.first_start = now
        while self.started and self.started[0] <= now - _OBSERVE_WINDOW_S:
            self.started.popleft()
        self._mark()

    def finish(self, now: float) -> None:
        """An attempt ended: its connection slot is free.

        An attempt started without a lease (over the limit: a caller that did not ask first, or another
        node took the last slot meanwhile) is taken to be the first to end, so the lane stays busy while
        this node alone runs as many attempts as it allows, as it always did.
        """
        self.in_flight = max(0, self.in_flight - 1)
        self.touched_at = now
        if len(self.leases) > self.in_flight:
            lease = self.leases.pop()
            if self.keep_spares:
                self.spares.append((lease, now))
            else:
                self.throttles.release(lease)
        self._mark()

    def _spare(self, now: float) -> Lease | None:
        """A kept lease with most of its time to live left (the others go back: prune renews only the
        leases of running attempts, and one spared near its end would run out under the next attempt)."""
        while self.spares:
            lease, _ = self.spares.pop()
            if lease.expires_at - now > LEASE_TTL_S / 2:
                return lease
            self.throttles.release(lease)
        return None

    def give_back_spares(self, now: float, older_than_s: float = SPARE_LEASE_S) -> None:
        """Give back the leases kept longer than `older_than_s` with no attempt to take them (0: all)."""
        if not self.spares:
            return
        keep = [(lease, at) for lease, at in self.spares if now - at < older_than_s]
        for lease, at in self.spares:
            if now - at >= older_than_s:
                self.throttles.release(lease)
        self.spares = keep

    def renew_leases(self, now: float) -> None:
        """Keep the leases of attempts still running; one found expired is dropped (its attempt runs on)."""
        throttles = self.throttles
        kept = (throttles.renew(lease, LEASE_TTL_S, now) for lease in self.leases)
        self.leases = [lease for lease in kept if lease is not None]

    def draw_burst_down(self, now: float) -> None:
        """Leave one turn of the burst: a lane that had no rate gets one after a cut, without a burst."""
        assert self.rate is not None
        if self.ceiling.burst > 1:
            self.throttles.rate(self.key, self.rate, self.ceiling.burst, now, take=self.ceiling.burst - 1)

    def observed_rate(self, now: float) -> float:
        """Attempts per second over the last minute (or since the first, if that is sooner)."""
        if self.first_start is None:
            return 0.0
        span = min(_OBSERVE_WINDOW_S, max(1.0, now - self.first_start))
        return sum(1 for t in self.started if t > now - _OBSERVE_WINDOW_S) / span

    def record_delivery(self, now: float) -> None:
        self.delivered += 1
        self.accepted.append(now)
        while self.accepted and self.accepted[0] <= now - _OBSERVE_WINDOW_S:
            self.accepted.popleft()

    def accepted_rate(self, now: float) -> float:
        """Deliveries per second over the last minute: what the receiver has shown it will take."""
        return sum(1 for t in self.accepted if t > now - _OBSERVE_WINDOW_S) / _OBSERVE_WINDOW_S

    def _note(self, what: str, now: float) -> str:
        self.last_change, self.last_change_at = what, now
        return what


@dataclass(slots=True)
class LaneGroup:
    """One pool's lanes toward one destination, and which of them may hold an attempt back.

    The dispatcher asks on every decision which members shaping keeps from the destination. Usually no
    lane is suspended, throttled, rate-limited or full, and looking at every member's lane each time
    cost more than the balancing decision itself; a lane tells its group when that changes (_mark).
    """

    roster: int  # the pool's version when the group was made: members, their settings, removals
    lanes: list[Lane]
    warming: bool  # some member has a warm-up schedule: its daily cap must be asked on each decision
    attention: dict[str, Lane] = field(default_factory=dict)  # by member name: lanes not surely open


def _rate_words(per_s: float | None) -> str:
    return "unlimited" if per_s is None else f"{per_s * 60:.4g}/min"


@dataclass(frozen=True, slots=True)
class _Reaction:
    rule: ReactionRule
    text: re.Pattern[str] | None

    def matches(self, reply: Reply, destination: str) -> bool:
        r = self.rule
        return (
            (r.destination in ("*", destination))
            and (r.code is None or r.code == reply.code)
            and (r.enhanced_code is None or r.enhanced_code == reply.enhanced_code)
            and (self.text is None or self.text.search(reply.text) is not None)
        )


class Shaper:
    """Every lane, created on first use from the rules, kept while it has state worth keeping.

    Its lanes share `throttles` (in this process's memory unless a shared store is given). Lanes keep the
    leases of ended attempts for the next (SPARE_LEASE_S) when `keep_spares`, by default when the store
    is not this process's memory.
    """

    def __init__(
        self,
        settings: ShapingSettings,
        throttles: Throttles | None = None,
        extra: Sequence[ReactionRule] = (),
        keep_spares: bool | None = None,
    ) -> None:
        self.throttles: Throttles = throttles if throttles is not None else MemoryThrottles()
        self.keep_spares = (
            not isinstance(self.throttles, MemoryThrottles) if keep_spares is None else keep_spares
        )
        self.lanes: dict[tuple[str, str, str], Lane] = {}
        self.groups: dict[tuple[str, str], LaneGroup] = {}
        self.configure(settings, extra)

    def _forget_groups(self) -> None:
        """Lanes changed wholesale (new rules, pruning): groups are made afresh when next asked for."""
        for lane in self.lanes.values():
            lane.group = None
        self.groups.clear()

    def configure(self, settings: ShapingSettings, extra: Sequence[ReactionRule] = ()) -> None:
        """Take new rules; existing lanes get their new ceilings, keeping suspensions and in-flight counts.

        `extra` reactions come from other sections (a blocklist named in a reply: reputation/blocklists),
        tried after the operator's own and before the shipped defaults.
        """
        self._forget_groups()
        self.settings = settings
        defaults = DEFAULT_REACTIONS if settings.default_reactions else ()
        rules = (*settings.reaction, *extra, *defaults)
        self._reactions = [_Reaction(r, re.compile(r.text, re.IGNORECASE) if r.text else None) for r in rules]
        for lane in self.lanes.values():
            self._refit(lane)

    def _refit(self, lane: Lane) -> None:
        """New ceilings for a lane (new rules, or its member's new limit or kind), keeping what AIMD and
        reactions taught it, within the new ceiling; a lane that was not cut takes the new ceiling as is."""
        old = lane.ceiling
        lane.ceiling = self._limits(lane.pool, lane.member, lane.destination, lane.member_connections)
        lane.adaptive = self._adaptive(lane.kind)
        cut = lane.allowed_connections < old.max_connections or lane.rate != old.rate
        if cut and lane.adaptive:
            lane.connections = min(lane.connections, lane.ceiling.max_connections)
            if lane.ceiling.rate is not None:
                lane.rate = min(lane.rate or lane.ceiling.rate, lane.ceiling.rate)
            lane._mark()
        else:
            lane.restore()

    # -- limits --------------------------------------------------------------------------------------

    def _limits(self, pool: str, member: str, destination: str, member_max_connections: int) -> Limits:
        """Merge the matching rules key by key, the most specific rule (then the later one) winning."""

        def specificity(rule: ShapingRule) -> int:
            return (2 if rule.destination != "*" else 0) + (1 if rule.member is not None else 0)

        matching = [
            (specificity(r), i, r)
            for i, r in enumerate(self.settings.rule)
            if r.destination in ("*", destination) and r.member in (None, member) and r.pool in (None, pool)
        ]
        merged: dict[str, object] = {"max_connections": member_max_connections}
        for _, _, rule in sorted(matching, key=lambda t: (t[0], t[1])):
            for key in ("max_connections", "max_messages_per_connection", "max_recipients", "rate", "burst"):
                value = getattr(rule, key)
                if value is not None and key in rule.model_fields_set:
                    merged[key] = value
        # A lane never has more connections than its member.
        merged["max_connections"] = min(int(merged["max_connections"]), member_max_connections)  # type: ignore[call-overload]
        return Limits(**merged)  # type: ignore[arg-type]

    def _adaptive(self, kind: str) -> bool:
        return self.settings.aimd == "all" or (self.settings.aimd == "sources" and kind == "source")

    def lane(self, pool: str, member: MemberSettings, destination: str, now: float) -> Lane:
        key = (pool, member.name, destination)
        lane = self.lanes.get(key)
        if lane is not None and (lane.member_connections, lane.kind) != (member.max_connections, member.kind):
            # A reload changed the member's own connection limit or kind.
            lane.member_connections, lane.kind = member.max_connections, member.kind
            self._refit(lane)
        if lane is None:
            limits = self._limits(pool, member.name, destination, member.max_connections)
            lane = Lane(
                pool,
                member.name,
                destination,
                limits,
                kind=member.kind,
                member_connections=member.max_connections,
                adaptive=self._adaptive(member.kind),
                connections=float(limits.max_connections),
                rate=limits.rate,
                touched_at=now,
                throttles=self.throttles,
                keep_spares=self.keep_spares,
            )
            self.lanes[key] = lane
        return lane

    def group(
        self, pool: str, members: list[MemberSettings], destination: str, roster: int, now: float
    ) -> LaneGroup:
        """The lanes of `members` (the pool's members in service, at version `roster`) toward `destination`.

        Made again when the pool's version has moved; every member gets its lane, as a gate always did.
        """
        group = self.groups.get((pool, destination))
        if group is not None and group.roster == roster:
            return group
        if group is not None:
            for lane in group.lanes:
                lane.group = None
        lanes = [self.lane(pool, m, destination, now) for m in members]
        group = LaneGroup(roster, lanes, warming=any(m.warmup is not None for m in members))
        for lane in lanes:
            lane.group = group
            lane._mark()
        self.groups[(pool, destination)] = group
        return group

    # -- reactions -----------------------------------------------------------------------------------

    def react(self, lane: Lane, reply: Reply, started_at: float, now: float) -> str | None:
        """Apply what a receiver's reply says to the lane; returns what changed, in words, if anything."""
        change = self._react(lane, reply, started_at, now)
        lane._mark()  # a suspension, cut or increase may open or close it
        return change

    def _react(self, lane: Lane, reply: Reply, started_at: float, now: float) -> str | None:
        for reaction in self._reactions:
            if reaction.matches(reply, lane.destination):
                return self._apply(lane, reaction.rule, reply, now)
        if reply.is_success:
            lane.record_delivery(now)
            if lane.adaptive:
                self._increase(lane, now)
            return None
        if reply.is_transient:
            lane.deferred += 1
            if lane.adaptive and started_at >= lane.cut_at and pushes_back(reply):
                return self._cut(lane, 0.5, f"deferred ({reply})", now)
        return None

    def _apply(self, lane: Lane, rule: ReactionRule, reply: Reply, now: float) -> str | None:
        if not reply.is_success:
            lane.deferred += 1
        if rule.action == "suspend":
            until = now + rule.duration
            why = f"suspended for {rule.duration:g}s after '{reply}'"
            if not lane.throttles.suspend(lane.key, until, why):
                # One as long or longer is in force already (perhaps set elsewhere): keep it in view.
                lane.suspended_until = max(lane.suspended_until, until)
                return None
            lane.suspended_until = until
            return lane._note(why, now)
        change = self._cut(lane, rule.factor, f"throttled for {rule.duration:g}s after '{reply}'", now)
        if not lane.adaptive:
            lane.restore_at = now + rule.duration  # nothing else would ever raise it again
        return change

    def _cut(self, lane: Lane, factor: float, why: str, now: float) -> str | None:
        """Multiplicative decrease of both connections and rate, never below the floors.

        Nor below `factor` x what the receiver accepted over the last minute: a receiver that counts
        per minute refuses everything until its minute has passed, whatever we send meanwhile, and
        halving on each of those refusals would drive the rate to the floor for nothing.
        """
        before = (lane.allowed_connections, lane.rate)
        lane.connections = max(float(self.settings.min_connections), lane.connections * factor)
        base = lane.rate if lane.rate is not None else max(lane.observed_rate(now), self.settings.min_rate)
        lane.rate = max(self.settings.min_rate, base * factor, min(base, lane.accepted_rate(now) * factor))
        if before[1] is None:
            lane.draw_burst_down(now)
        lane.cut_at = now
        if (lane.allowed_connections, lane.rate) == before:
            return None  # already at the floors: nothing to announce
        return lane._note(
            f"{why}: connections {before[0]} -> {lane.allowed_connections}, "
            f"rate {_rate_words(before[1])} -> {_rate_words(lane.rate)}",
            now,
        )

    def _increase(self, lane: Lane, now: float) -> None:
        """Additive increase per delivery: +1 connection per window of deliveries, + aimd_increase rate."""
        ceiling = lane.ceiling
        lane.connections = min(float(ceiling.max_connections), lane.connections + 1.0 / lane.connections)
        if lane.rate is None:
            return
        lane.rate += self.settings.aimd_increase
        if ceiling.rate is not None:
            lane.rate = min(lane.rate, ceiling.rate)
        elif lane.rate > 2.0 * lane.observed_rate(now) + self.settings.aimd_increase * 60:
            # No configured rate and the cut one no longer binds: back to no limit.
            lane.rate = None
            lane._note("recovered: rate unlimited", now)

    # -- by hand -------------------------------------------------------------------------------------

    def suspend(self, lane: Lane, duration_s: float, why: str, now: float) -> str:
        """An operator's suspension: as a reaction's, for `duration_s` from now (replacing one in force)."""
        change = f"suspended for {duration_s:g}s {why}"
        lane.throttles.lift(lane.key)
        lane.throttles.suspend(lane.key, now + duration_s, change)
        lane.suspended_until = now + duration_s
        lane._mark()
        return lane._note(change, now)

    def resume(self, lane: Lane, why: str, now: float) -> str | None:
        """Lift a suspension now, whoever set it; None when the lane was not suspended."""
        in_force = lane.throttles.suspended(lane.key, now) is not None
        if in_force:
            lane.throttles.lift(lane.key)
        if lane.suspended_until:
            lane.suspended_until = 0.0
            lane._mark()
        return lane._note(f"suspension lifted {why}", now) if in_force else None

    # -- housekeeping --------------------------------------------------------------------------------

    def prune(self, now: float, idle_s: float = 3600.0) -> None:
        """Forget lanes that are idle, unsuspended and at their ceiling: a new lane would be the same.

        And renew the connection leases of attempts still running once half their time to live is gone
        (the dispatcher calls this every second), and learn of suspensions in force that this node's
        lanes have not seen (set by another node sharing the throttles, or an operator there).
        """
        self._learn_suspensions(now)
        idle = []
        renew_before = now + LEASE_TTL_S / 2
        for key, lane in self.lanes.items():
            lane.give_back_spares(now)
            if lane.leases:
                if lane.leases[0].expires_at < renew_before:
                    lane.renew_leases(now)
            elif (
                lane.in_flight == 0
                and now >= lane.suspended_until
                and now - lane.touched_at > idle_s
                and lane.rate == lane.ceiling.rate
                and lane.allowed_connections >= lane.ceiling.max_connections
            ):
                idle.append(key)
        if idle:
            self._forget_groups()
        for key in idle:
            del self.lanes[key]

    def give_back_spares(self, now: float) -> None:
        """Every kept lease back to the store: the node stops, and other nodes need not wait them out."""
        for lane in self.lanes.values():
            lane.give_back_spares(now, older_than_s=0.0)

    def _learn_suspensions(self, now: float) -> None:
        """One question for every lane not known to be suspended: a lane left out of gates (surely open)
        would otherwise go on sending where another node was told to stop, until its own reply said so."""
        unaware = [lane for lane in self.lanes.values() if not lane.suspended_until]
        if not unaware:
            return
        found = self.throttles.suspensions([lane.key for lane in unaware], now)
        for lane in unaware:
            suspension = found.get(lane.key)
            if suspension is not None:
                lane.suspended_until = suspension.until
                lane._mark()


def describe_lane(lane: Lane, now: float) -> dict[str, object]:
    """A lane as the admin API and `postmux shaping` show it (rates per minute, times as ages)."""
    admission, _ = lane.admission(now)
    return {
        "pool": lane.pool,
        "member": lane.member,
        "destination": lane.destination,
        "state": admission.value,
        "in_flight": lane.in_flight,
        "connections": lane.allowed_connections,
        "max_connections": lane.ceiling.max_connections,
        "rate_per_min": None if lane.rate is None else round(lane.rate * 60, 2),
        "max_rate_per_min": None if lane.ceiling.rate is None else round(lane.ceiling.rate * 60, 2),
        "max_messages_per_connection": lane.ceiling.max_messages_per_connection,
        "max_recipients": lane.ceiling.max_recipients,
        "suspended_for_s": round(max(0.0, lane.suspended_until - now), 1),
        "delivered": lane.delivered,
        "deferred": lane.deferred,
        "last_change": lane.last_change,
        "last_change_age_s": round(now - lane.last_change_at, 1) if lane.last_change else None,
    }
