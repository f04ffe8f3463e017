"""The dispatcher: takes ready work per queue, asks the pool for a member, runs the attempt, records it.

Work arrives two ways: straight from the acceptor (already leased, bytes in memory: the hot path) and
from the spool when deferred work falls due (the scanner). Deciding (pool.pick, retry.next_due) stays in
plain functions; this module only moves work between them and the transports.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

import structlog

from postmux.balancing.health import FailureKind
from postmux.balancing.member import Member
from postmux.balancing.pool import Pool
from postmux.config import Settings
from postmux.delivery.dsn import FailedRecipient, build_dsn
from postmux.delivery.mx import MxResolver
from postmux.delivery.transport import AttemptOutcome, MemberTransport
from postmux.envelope import domain_of
from postmux.events.bus import EventBus
from postmux.events.types import Event, EventType
from postmux.reply import Reply
from postmux.scheduling.providers import Providers
from postmux.scheduling.retry import RetrySchedule
from postmux.scheduling.router import Router
from postmux.scheduling.shaping import Admission, Lane, LaneGroup, Shaper
from postmux.scheduling.warmup import WarmupLedger
from postmux.spool.base import RecipientState, Settlement, Spool, SpoolError, WorkItem, WorkRecipient

log = structlog.get_logger("postmux.dispatcher")

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class DispatchLimits:
    # Work held in memory at most; above it, new mail is stored as queued and read back when there is room,
    # so memory stays flat however large the backlog (bodies stay on disk).
    max_ready: int = 20_000
    scan_batch: int = 500
    scan_interval_s: float = 1.0
    reap_interval_s: float = 1.0


@dataclass(slots=True)
class _Gate:
    """Which members shaping keeps from one destination right now, and until when."""

    closed: set[str] = field(default_factory=set)  # may not start an attempt now, for any reason
    away: set[str] = field(default_factory=set)  # suspended or at their warm-up cap: not worth waiting for
    capped: list[Member] = field(default_factory=list)
    next_turn: float = math.inf  # when a rate-limited lane may send again
    reopen: float = math.inf  # when the first of the `away` members may send again


# The gate of a decision in which shaping holds no member back; shared, so never mutated.
_OPEN = _Gate()


async def _wait(event: asyncio.Event, timeout_s: float) -> None:
    """Until `event` is set or `timeout_s` has passed. Not asyncio.wait_for: on Python 3.11 it swallows a
    cancel that arrives in the turn the event is set (it returns the result instead), so a loop cancelled
    by stop would run on and stop would wait for it forever."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await event.wait()


def _next_utc_midnight(now: float) -> float:
    tomorrow = datetime.fromtimestamp(now, UTC).date() + timedelta(days=1)
    return datetime(tomorrow.year, tomorrow.month, tomorrow.day, tzinfo=UTC).timestamp()


class Dispatcher:
    def __init__(
        self,
        settings: Settings,
        spool: Spool,
        pools: Mapping[str, Pool],
        transports: Mapping[tuple[str, str], MemberTransport],
        router: Router,
        bus: EventBus,
        *,
        observe_attempt: Callable[[str, str, float], None] | None = None,
        clock: Clock = time.time,
        limits: DispatchLimits | None = None,
        resolver: MxResolver | None = None,
        warmup: WarmupLedger | None = None,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.pools = pools
        self.transports = transports
        self.router = router
        self.bus = bus
        self.retry = RetrySchedule(settings.retry)
        self.clock = clock
        self.limits = limits or DispatchLimits()
        self._observe = observe_attempt or (lambda pool, member, seconds: None)
        self._queues: dict[str, deque[WorkItem]] = {}
        self._ready = 0
        self._wake = asyncio.Event()
        self._scan_now = asyncio.Event()
        self._attempts: set[asyncio.Task[None]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._accepting_work = True
        self.resolver = resolver or MxResolver(settings.dns, Providers(settings.shaping), clock)
        self.shaper = Shaper(settings.shaping)
        self.warmup = warmup or WarmupLedger(None)
        # Work for source pools whose domain's MX is being looked up, by (pool, domain).
        self._parked: dict[tuple[str, str], list[WorkItem]] = {}
        self._lookups: set[asyncio.Task[None]] = set()

    # -- intake --------------------------------------------------------------------------------------

    @property
    def ready(self) -> int:
        return self._ready

    @property
    def in_flight(self) -> int:
        return len(self._attempts)

    def has_room(self) -> bool:
        return self._ready < self.limits.max_ready

    def submit(self, items: Iterable[WorkItem], *, front: bool = False) -> None:
        for item in items:
            if not item.destination:
                destination = self._destination(item)
                if destination is None:
                    self._park(item)
                    continue
                item.destination = destination
            q = self._queues.get(item.queue)
            if q is None:
                q = self._queues[item.queue] = deque()
            if front:
                q.appendleft(item)
            else:
                q.append(item)
            self._ready += 1
        self._wake.set()

    def _destination(self, item: WorkItem) -> str | None:
        """The item's shaping key; None while a source pool's MX answer is not known yet."""
        if self._pool_of(item).settings.kind == "relay":
            return self.resolver.providers.destination(item.domain)
        plan = self.resolver.cached(item.domain)
        return plan.destination if plan is not None else None

    def _park(self, item: WorkItem) -> None:
        key = (item.pool, item.domain)
        self._ready += 1
        waiting = self._parked.setdefault(key, [])
        waiting.append(item)
        if len(waiting) == 1:
            task = asyncio.create_task(self._look_up(key), name=f"mx {item.domain}")
            self._lookups.add(task)
            task.add_done_callback(self._lookups.discard)

    async def _look_up(self, key: tuple[str, str]) -> None:
        try:
            destination = (await self.resolver.resolve(key[1])).destination
        except Exception:  # the attempt will meet the same failure and say what it is
            log.exception("MX lookup crashed", domain=key[1])
            destination = key[1]
        items = self._parked.pop(key, [])
        self._ready -= len(items)
        for item in items:
            item.destination = destination
        self.submit(items)

    def wake(self) -> None:
        """Look at the queues again now (a member was enabled, the configuration changed)."""
        self._wake.set()

    def scan_soon(self) -> None:
        self._scan_now.set()

    def reconfigure(self, settings: Settings) -> None:
        """New settings (a reload): retry schedule, shaping rules, expiry, the default pool.

        The pools, router, resolver and transports it was given are reconfigured in place by the node.
        """
        self.settings = settings
        self.retry = RetrySchedule(settings.retry)
        self.shaper.configure(settings.shaping)

    # -- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        self._loops = [
            asyncio.create_task(self._dispatch_loop(), name="dispatch"),
            asyncio.create_task(self._scan_loop(), name="scan"),
            asyncio.create_task(self._reap_loop(), name="reap"),
        ]

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Stop taking work, let attempts in flight finish for up to `timeout_s`, then cancel the rest.

        Work still in memory stays leased in the spool and is recovered at the next start.
        """
        self._accepting_work = False
        for task in [*self._loops, *self._lookups]:
            task.cancel()
        await asyncio.gather(*self._loops, *self._lookups, return_exceptions=True)
        self.warmup.flush()
        if self._attempts:
            _, pending = await asyncio.wait(set(self._attempts), timeout=timeout_s)
            for task in pending:
                task.cancel()
            if pending:
                # Bounded: shutdown must end even if an attempt were to swallow its cancellation.
                await asyncio.wait(pending, timeout=5.0)
        await asyncio.gather(*(t.close() for t in self.transports.values()), return_exceptions=True)

    # -- the loops -----------------------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        while True:
            self._wake.clear()
            next_turn = self._dispatch_ready()
            # Wake on new work, a finished attempt or a rate-limited lane's next turn; the timeout also
            # lets ejected members come back.
            timeout = min(0.5, max(0.001, next_turn - self.clock()))
            await _wait(self._wake, timeout)

    async def _scan_loop(self) -> None:
        while True:
            if self._ready < self.limits.max_ready // 2:
                try:
                    items = await self.spool.lease_due(self.clock(), self.limits.scan_batch)
                except SpoolError as e:
                    log.error("spool scan failed", error=str(e))
                    items = []
                if items:
                    self.submit(items)
                if len(items) >= self.limits.scan_batch:
                    continue
            self._scan_now.clear()
            await _wait(self._scan_now, self.limits.scan_interval_s)

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(self.limits.reap_interval_s)
            now = time.monotonic()
            for transport in self.transports.values():
                transport.reap_idle(now)
            self.shaper.prune(self.clock())
            self.resolver.prune()
            self.warmup.flush()

    def _dispatch_ready(self) -> float:
        """Start every attempt that may start now; returns when a rate-limited lane may go next."""
        now = self.clock()
        next_turn = math.inf
        for name in list(self._queues):
            q = self._queues[name]
            while q and self._accepting_work:
                item = q[0]
                pool = self._pool_of(item)
                gate = self._gate(pool, item.destination, now)
                # Suspended or capped members are passed over (their mail may go to a lower tier);
                # busy or rate-limited ones are waited for, like a member at its connection limit.
                member = pool.pick(self._hash_key(pool, item), now, item.tried | gate.away, gate.closed)
                if member is None:
                    if pool.can_serve(now, item.tried | gate.away):
                        next_turn = min(next_turn, gate.next_turn)
                        break  # every member that may take it is busy or waits its turn: the queue waits
                    q.popleft()
                    self._ready -= 1
                    if gate.away and pool.can_serve(now, item.tried):
                        self._hold_back(item, pool, gate, now)
                    else:
                        self._spawn(self._no_member(item, pool))
                    continue
                q.popleft()
                self._ready -= 1
                self._start(item, pool, member, now, q)
            if not q:
                del self._queues[name]
        return next_turn

    def _gate(self, pool: Pool, destination: str, now: float) -> _Gate:
        group = self._lane_group(pool, destination, now)
        if not group.attention and not group.warming:
            return _OPEN  # every lane open, unlimited, with a connection free: nothing to hold back
        gate = _Gate()
        for m in pool.members:
            if m.removed:
                continue
            # A lane outside `attention` is surely open (Lane.surely_open): asking it would say OPEN.
            lane = group.attention.get(m.name)
            if lane is None and m.settings.warmup is None:
                continue
            admission, at = lane.admission(now) if lane is not None else (Admission.OPEN, 0.0)
            if admission is Admission.OPEN and not self.warmup.allows(
                pool.name, m.settings, destination, now
            ):
                gate.capped.append(m)
                admission, at = Admission.SUSPENDED, _next_utc_midnight(now)
            if admission is Admission.OPEN:
                continue
            gate.closed.add(m.name)
            if admission is Admission.SUSPENDED:
                gate.away.add(m.name)
                gate.reopen = min(gate.reopen, at)
            elif admission is Admission.RATE:
                gate.next_turn = min(gate.next_turn, at)
        return gate

    def _lane_group(self, pool: Pool, destination: str, now: float) -> LaneGroup:
        group = self.shaper.groups.get((pool.name, destination))
        if group is not None and group.roster == pool.version:
            return group
        members = [m.settings for m in pool.members if not m.removed]
        return self.shaper.group(pool.name, members, destination, pool.version, now)

    def _start(self, item: WorkItem, pool: Pool, member: Member, now: float, q: deque[WorkItem]) -> None:
        lane = self.shaper.lane(pool.name, member.settings, item.destination, now)
        limit = lane.ceiling.max_recipients
        if limit is not None and len(item.recipients) > limit:
            # One transaction carries at most `limit` recipients; the rest waits at the queue's head.
            rest = replace(
                item, recipients=item.recipients[limit:], tried=set(item.tried), unfit=set(item.unfit)
            )
            item.recipients = item.recipients[:limit]
            q.appendleft(rest)
            self._ready += 1
        lane.start(now)
        self.warmup.count(pool.name, member.settings, item.destination, now)
        member.in_flight += 1
        self._spawn(self._attempt(item, pool, member, lane))

    def _hold_back(self, item: WorkItem, pool: Pool, gate: _Gate, now: float) -> None:
        """Only suspended or warm-up-capped members could take this: overflow, or wait until one can."""
        overflow = next((m.settings.warmup.overflow_pool for m in gate.capped if m.settings.warmup), None)
        # Once only: two pools that overflow into each other must not pass the work back and forth.
        if overflow is not None and overflow in self.pools and not item.overflowed_from:
            item.overflowed_from = item.pool
            item.pool, item.destination, item.tried, item.unfit = overflow, "", set(), set()
            self.submit([item])
            return
        reply = Reply(451, "4.7.0", f"{pool.name}: every member is held back from {item.destination}")
        due = gate.reopen
        if item.tried:
            # A member already tried may take it again at its next retry, maybe before the others reopen.
            due = min(
                due, self.retry.next_due(_rounds_ended(item, item.recipients), item.created, now) or due
            )
        self._spawn(self._postpone(item, pool, reply, due, now))

    async def _postpone(self, item: WorkItem, pool: Pool, reply: Reply, due: float, now: float) -> None:
        """Wait for a suspension or a warm-up day to end: not an attempt, so no retry step is used up."""
        if now - item.created >= self.settings.retry.max_age:
            await self._record(self._defer_or_expire(item, pool, item.recipients, reply, now), now)
            return
        for r in item.recipients:
            self._emit(EventType.TRANSIENT_FAILURE, item, r, pool, "", reply, now)
        rids = [r.rid for r in item.recipients]
        settlement = Settlement(
            item.message_id,
            rids,
            RecipientState.QUEUED,
            str(reply),
            due,
            attempts=item.attempts,
            rounds=_rounds_ended(item, item.recipients),
            local_errors=item.local_errors,
        )
        await self._record([settlement], now)

    def _spawn(self, coro: object) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)  # type: ignore[arg-type]
        self._attempts.add(task)
        task.add_done_callback(self._attempts.discard)

    def _pool_of(self, item: WorkItem) -> Pool:
        pool = self.pools.get(item.pool)
        if pool is None:
            # The pool was removed from the config while this work waited: the default pool takes it.
            pool = self.pools[self.settings.default_pool]
            item.pool = pool.name
        return pool

    @staticmethod
    def _hash_key(pool: Pool, item: WorkItem) -> str:
        match pool.settings.hash_key:
            case "sender_domain":
                return domain_of(item.sender)
            case "recipient_domain":
                return item.domain
            case "client_ip":
                return item.client_ip

    # -- one attempt and what follows from it --------------------------------------------------------

    async def _attempt(self, item: WorkItem, pool: Pool, member: Member, lane: Lane) -> None:
        try:
            await self._run_attempt(item, pool, member, lane)
        except Exception as e:
            log.exception("settling an attempt crashed", member=member.name, message=item.message_id)
            await self._requeue_after_crash(item, pool, e)
        finally:
            # The member's slot is held until the outcome is recorded durably, so the attempts counted
            # in flight are all the deliveries a kill -9 can leave unrecorded: duplicates after a crash
            # are at most that many (tests/chaos checks the bound).
            member.in_flight -= 1
            if member.removed:
                pool.prune()
            self._wake.set()

    async def _run_attempt(self, item: WorkItem, pool: Pool, member: Member, lane: Lane) -> None:
        started = time.monotonic()
        started_at = self.clock()
        transport = self.transports[(pool.name, member.name)]
        outcome: AttemptOutcome | Exception
        try:
            outcome = await transport.deliver(item, per_connection=lane.ceiling.max_messages_per_connection)
        except Exception as e:  # postmux's own code raised (the transport never raises for the network)
            log.exception("delivery attempt crashed", member=member.name, message=item.message_id)
            outcome = e
        finally:
            lane.finish(self.clock())  # the connection is free for the lane's next attempt
        now = self.clock()
        item.tried.add(member.name)
        if isinstance(outcome, Exception):
            await self._crashed(item, pool, member, outcome, now)
            return
        try:
            self._learn(item, pool, member, lane, outcome, time.monotonic() - started, started_at, now)
        except Exception:  # what the attempt taught is lost, never the outcome: it is still recorded
            log.exception("learning from an attempt failed", member=member.name, message=item.message_id)
        if outcome.unfit:
            await self._unfit(item, pool, member, outcome, now)
            return
        await self._settle(item, pool, member, outcome, now)

    async def _crashed(
        self, item: WorkItem, pool: Pool, member: Member, error: Exception, now: float
    ) -> None:
        """postmux's own code raised during the attempt: the message's fault, never the member's.

        The real cases are messages our sending code cannot put on the wire (aiosmtplib raises
        UnicodeEncodeError for a UTF-8 address without SMTPUTF8, ValueError for an address "not permitted
        in an SMTP mailbox") and our own bugs. Either way the member did nothing wrong: nothing is
        learnt (no health, latency or shaping), or a handful of such messages would eject healthy members.
        A bug may lie in one member's transport, so another member is tried at once, else the work waits
        its round; after `[retry] max_local_errors` crashes in a row it is held (Postfix's hold queue:
        kept, never retried nor expired, until an operator releases it) instead of crashing for days.
        """
        reply = Reply(451, "4.3.0", f"internal error: {type(error).__name__}")
        item.recipients = [
            replace(r, attempts=r.attempts + 1, local_errors=r.local_errors + 1) for r in item.recipients
        ]
        if item.local_errors >= self.settings.retry.max_local_errors:
            await self._hold(item, pool, member, reply, error, now)
            return
        tags = {"local_error": type(error).__name__}
        for r in item.recipients:
            self._emit(EventType.TRANSIENT_FAILURE, item, r, pool, member.name, reply, now, tags=tags)
        if pool.can_serve(now, item.tried):
            self.submit([item], front=True)
            return
        await self._record(self._defer_or_expire(item, pool, item.recipients, reply, now), now)

    async def _hold(
        self, item: WorkItem, pool: Pool, member: Member, reply: Reply, error: Exception, now: float
    ) -> None:
        """Set the work aside (HELD) with an event saying why; `postmux release ID` queues it again."""
        # The full error is for the operator (event log, log); the reply, which a DSN may quote one day,
        # names only its kind.
        tags = {"reason": "local_error", "error": f"{type(error).__name__}: {error}"[:300]}
        log.warning("message held", message=item.message_id, reason="local_error", crashes=item.local_errors)
        for r in item.recipients:
            self._emit(EventType.HELD, item, r, pool, member.name, reply, now, tags=tags)
        settlement = Settlement(
            item.message_id,
            [r.rid for r in item.recipients],
            RecipientState.HELD,
            str(reply),
            attempts=item.attempts,
            rounds=item.rounds,
            local_errors=item.local_errors,
        )
        await self._record([settlement], now)

    async def _requeue_after_crash(self, item: WorkItem, pool: Pool, error: Exception) -> None:
        """Deciding or recording an attempt's outcome raised (our bug, e.g. in building a DSN).

        Left alone, the work would stay leased until a restart. It waits a round instead, counted as one
        of the message's crashes, so a message that keeps doing this is held, as one that crashes the
        sending code is. Nothing of the outcome was recorded, so recipients this attempt delivered are
        tried again: a duplicate is better than mail stuck or lost.
        """
        now = self.clock()
        item.recipients = [replace(r, local_errors=r.local_errors + 1) for r in item.recipients]
        rounds = _rounds_ended(item, item.recipients)
        held = item.local_errors >= self.settings.retry.max_local_errors
        reply = Reply(451, "4.3.0", f"internal error: {type(error).__name__}")
        if held:
            tags = {"reason": "local_error", "error": f"{type(error).__name__}: {error}"[:300]}
            for r in item.recipients:
                self._emit(EventType.HELD, item, r, pool, "", reply, now, tags=tags)
        settlement = Settlement(
            item.message_id,
            [r.rid for r in item.recipients],
            RecipientState.HELD if held else RecipientState.QUEUED,
            str(reply),
            # Not next_due: expiring would build a DSN, which may be the very code that raised.
            0.0 if held else now + self.retry.interval(rounds),
            attempts=item.attempts,
            rounds=rounds,
            local_errors=item.local_errors,
        )
        try:
            await self._record([settlement], now)
        except Exception:  # the lease stays; the next start recovers the work
            log.exception("requeueing crashed work failed", message=item.message_id)

    def _learn(
        self,
        item: WorkItem,
        pool: Pool,
        member: Member,
        lane: Lane,
        outcome: AttemptOutcome,
        elapsed: float,
        started_at: float,
        now: float,
    ) -> None:
        """Health, latency and shaping hear how the attempt went."""
        self._observe(pool.name, member.name, elapsed)
        member.attempts += 1
        if outcome.failure is not FailureKind.LOCAL and not outcome.unfit:
            # Only answered attempts say how fast a member works. A timeout or a refusal is the health
            # rules' business; counted as latency it would keep a recovered member starved long after
            # (bench/balance: a 2 s DATA timeout handed the slow member a third of the picks). An unfit
            # attempt sent nothing: its near-zero time would flatter the member.
            member.observe_latency(elapsed, now, pool.settings.latency_decay)
        if outcome.failure is not None:
            member.last_error = str(next(iter(outcome.replies.values()), ""))
            pool.record_failure(member, now, outcome.failure)
        else:
            pool.record_success(member, now)
        if outcome.tls:
            member.tls = outcome.tls
        if not outcome.local:
            self._react(lane, outcome, started_at, now)

    def _react(self, lane: Lane, outcome: AttemptOutcome, started_at: float, now: float) -> None:
        """Let shaping hear what the receiver said; a change of limits is an event of its own."""
        reply = _telling_reply(list(outcome.replies.values()))
        if reply is None:
            return
        change = self.shaper.react(lane, reply, started_at, now)
        if change is None:
            return
        log.info(
            "shaping changed", pool=lane.pool, member=lane.member, destination=lane.destination, change=change
        )
        self.bus.emit(
            Event(
                EventType.SHAPING_CHANGED,
                queue=f"{lane.pool}/{lane.destination}",
                pool=lane.pool,
                member=lane.member,
                response=Reply(reply.code, reply.enhanced_code, change),
                timestamp=now,
            )
        )

    async def _no_member(self, item: WorkItem, pool: Pool) -> None:
        """Every usable member was tried (or none is usable): the work waits for its next retry."""
        reply = Reply(451, "4.4.5", f"no usable member in pool {pool.name}")
        now = self.clock()
        await self._record(
            self._defer_or_expire(item, pool, item.recipients, reply, now, attempted=False), now
        )

    async def _unfit(
        self, item: WorkItem, pool: Pool, member: Member, outcome: AttemptOutcome, now: float
    ) -> None:
        """The member cannot take this message (its server lacks SMTPUTF8): another member, or a verdict.

        Another untried usable member gets it at once. Once every member of the pool has said it cannot,
        the refusal is final and the sender gets a DSN (RFC 6531 3.5, 5.6.7): retrying would only meet
        the same servers. While some member that was not asked is out of service (ejected, draining),
        the mail waits for it on the normal retry schedule instead, up to the queue lifetime.
        """
        item.unfit.add(member.name)
        if pool.can_serve(now, item.tried):
            for r in item.recipients:
                reply = outcome.replies[r.rid]
                self._emit(EventType.TRANSIENT_FAILURE, item, r, pool, member.name, reply, now, outcome.tls)
            self.submit([item], front=True)
            return
        bumped = [replace(r, attempts=r.attempts + 1, local_errors=0) for r in item.recipients]
        if {m.name for m in pool.members if not m.removed} <= item.unfit:
            failed = [(r, outcome.replies[r.rid]) for r in bumped]
            for r, reply in failed:
                self._emit(EventType.BOUNCE, item, r, pool, member.name, reply, now, outcome.tls)
            member.bounced += len(failed)
            await self._record([self._final(item, failed, RecipientState.BOUNCED, outcome.remote, now)], now)
            return
        wait = Reply(451, "4.4.5", f"no usable member offering SMTPUTF8 in pool {pool.name}")
        for r in bumped:
            self._emit(EventType.TRANSIENT_FAILURE, item, r, pool, member.name, wait, now, outcome.tls)
        await self._record(self._defer_or_expire(item, pool, bumped, wait, now), now)

    async def _settle(
        self, item: WorkItem, pool: Pool, member: Member, outcome: AttemptOutcome, now: float
    ) -> None:
        delivered: list[WorkRecipient] = []
        bounced: list[tuple[WorkRecipient, Reply]] = []
        deferred: list[tuple[WorkRecipient, Reply]] = []
        for r in item.recipients:
            reply = outcome.replies.get(r.rid) or Reply(451, "4.3.0", "no reply recorded")
            bumped = replace(r, attempts=r.attempts + 1, local_errors=0)  # answered: not a crash
            if reply.is_success:
                delivered.append(bumped)
                self._emit(EventType.DELIVERY, item, bumped, pool, member.name, reply, now, outcome.tls)
            elif reply.is_permanent:
                bounced.append((bumped, reply))
                self._emit(EventType.BOUNCE, item, bumped, pool, member.name, reply, now, outcome.tls)
            else:
                deferred.append((bumped, reply))
                self._emit(
                    EventType.TRANSIENT_FAILURE, item, bumped, pool, member.name, reply, now, outcome.tls
                )
        member.delivered += len(delivered)
        member.bounced += len(bounced)
        member.deferred += len(deferred)

        settlements: list[Settlement] = []
        if delivered:
            attempts = max(r.attempts for r in delivered)
            settlements.append(
                Settlement(
                    item.message_id, [r.rid for r in delivered], RecipientState.DELIVERED, attempts=attempts
                )
            )
        if bounced:
            settlements.append(self._final(item, bounced, RecipientState.BOUNCED, outcome.remote, now))
        if deferred:
            retry_now = [r for r, _ in deferred]
            if pool.can_serve(now, item.tried):
                # RFC 5321 4.5.4.1 asks for a wait before retrying the *same* server; another member of the
                # pool is another server, so the work goes there at once, at the front of its queue.
                item.recipients = retry_now
                self.submit([item], front=True)
            else:
                settlements.extend(self._defer_or_expire(item, pool, retry_now, deferred[-1][1], now))
        await self._record(settlements, now)

    def _defer_or_expire(
        self,
        item: WorkItem,
        pool: Pool,
        recipients: list[WorkRecipient],
        reply: Reply,
        now: float,
        attempted: bool = True,
    ) -> list[Settlement]:
        attempts = max((r.attempts for r in recipients), default=0)
        rounds = _rounds_ended(item, recipients)
        due = self.retry.next_due(rounds, item.created, now)
        if due is None:
            for r in recipients:
                self._emit(EventType.EXPIRATION, item, r, pool, "", reply, now)
            return [self._final(item, [(r, reply) for r in recipients], RecipientState.EXPIRED, "", now)]
        if not attempted:
            for r in recipients:
                self._emit(EventType.TRANSIENT_FAILURE, item, r, pool, "", reply, now)
        rids = [r.rid for r in recipients]
        local_errors = max((r.local_errors for r in recipients), default=0)
        return [
            Settlement(
                item.message_id,
                rids,
                RecipientState.QUEUED,
                str(reply),
                due,
                attempts=attempts,
                rounds=rounds,
                local_errors=local_errors,
            )
        ]

    def _final(
        self,
        item: WorkItem,
        failed: list[tuple[WorkRecipient, Reply]],
        state: RecipientState,
        remote: str,
        now: float,
    ) -> Settlement:
        dsn = build_dsn(
            original_sender=item.sender,
            original_message=item.data,
            message_id=item.message_id,
            failed=[FailedRecipient(r.address, reply, remote) for r, reply in failed],
            reporting_mta=self.settings.smtp.hostname,
            arrival=item.created,
            now=now,
            expired=state is RecipientState.EXPIRED,
        )
        dsn_pool = self.router.pool_for("", domain_of(item.sender), "") if dsn else ""
        return Settlement(
            item.message_id,
            [r.rid for r, _ in failed],
            state,
            str(failed[-1][1]),
            attempts=max(r.attempts for r, _ in failed),
            dsn=dsn,
            dsn_pool=dsn_pool,
        )

    async def _record(self, settlements: list[Settlement], now: float) -> None:
        if not settlements:
            return
        for attempt in range(5):
            try:
                await self.spool.settle(settlements, now)
                break
            except SpoolError as e:
                # Until this is recorded the work stays leased, so it is retried after a restart at worst.
                log.error("recording outcome failed", error=str(e), attempt=attempt + 1)
                await asyncio.sleep(0.2 * 2**attempt)
        if any(s.dsn is not None for s in settlements):
            self.scan_soon()

    def _emit(
        self,
        kind: EventType,
        item: WorkItem,
        r: WorkRecipient,
        pool: Pool,
        member: str,
        reply: Reply,
        now: float,
        tls: str = "",
        *,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        self.bus.emit(
            Event(
                kind,
                id=item.message_id,
                sender=item.sender,
                recipient=r.address,
                queue=item.queue,
                pool=pool.name,
                member=member,
                response=reply,
                num_attempts=r.attempts,
                latency_s=now - item.created,
                size=len(item.data),
                # The attempt's TLS ("TLSv1.3 <cipher>" or "none"), when it made a connection.
                tags={**({"tls": tls} if tls else {}), **(tags or {})},
                timestamp=now,
            )
        )


def _rounds_ended(item: WorkItem, recipients: list[WorkRecipient]) -> int:
    """The rounds these recipients will have ended once they go back to the spool to wait.

    A round ends when members were tried and none is left to try at once; work that waits without any
    try (no usable member, every member held back) uses up no round, as a wait for a suspension never did.
    """
    rounds = max((r.rounds for r in recipients), default=0)
    return rounds + 1 if item.tried else rounds


def _telling_reply(replies: list[Reply]) -> Reply | None:
    """The reply that says most about the receiver's mood: a 421, else a deferral of everything, else a
    success, else a refusal (which reaction rules may still match, e.g. a blocklist listing)."""
    if not replies:
        return None
    for r in replies:
        if r.code == 421:
            return r
    if all(r.is_transient for r in replies):
        return replies[0]
    return next((r for r in replies if r.is_success), replies[0])
