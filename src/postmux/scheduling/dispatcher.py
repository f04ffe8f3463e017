"""The dispatcher: takes ready work per queue, asks the pool for a member, runs the attempt, applies verdicts.

Work arrives two ways: straight from the acceptor (already leased, bytes in memory: the hot path) and
from the spool when deferred work falls due (the scanner). This module owns the loops and the doing; the
deciding is elsewhere, in plain functions that return values:

- ready.py: the ready queues (pool x destination), with MX parking;
- gate.py: which members shaping and warm-up hold back from a destination now;
- Pool.pick: which member takes the work (balancing);
- feedback.py: what the attempt teaches health, latency and shaping (Pool.observe, Shaper.react);
- verdicts.py: what becomes of the work: settlements, events, work for another member at once.

Applying a verdict is always the same steps (`_apply`): emit its events, count its tally, resubmit, then
record its settlements through the spool.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import structlog

from postmux.attempt import AttemptOutcome, Recipient, Transaction
from postmux.balancing.member import Member
from postmux.balancing.pool import Pool
from postmux.config import Settings
from postmux.delivery.mx import MxResolver
from postmux.delivery.transport import MemberTransport
from postmux.envelope import domain_of
from postmux.events.bus import EventBus
from postmux.events.outbox import NO_OUTBOX, EventOutbox
from postmux.events.types import Event, EventType
from postmux.reputation.blocklists import reply_reactions
from postmux.reputation.spf import SpfEvaluator, SpfVerdict
from postmux.reputation.suppression import SuppressionList
from postmux.reputation.verp import VerpCodec
from postmux.scheduling import verdicts
from postmux.scheduling.feedback import learn
from postmux.scheduling.gate import NONE_BARRED, Gate, gate, spf_barred, spf_why
from postmux.scheduling.providers import Providers
from postmux.scheduling.ready import ReadyQueues
from postmux.scheduling.retry import RetrySchedule
from postmux.scheduling.router import Router
from postmux.scheduling.shaping import Lane, Shaper
from postmux.scheduling.throttles import Throttles
from postmux.scheduling.verdicts import Rules, Verdict
from postmux.scheduling.warmup import WarmupLedger
from postmux.spool.base import AttemptView, OutboxRow, Settlement, Spool, SpoolError
from postmux.supervision import Loop
from postmux.work import WorkItem

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
    # How long an outcome the spool could not record is retried (backoff up to RECORD_BACKOFF_MAX_S)
    # before the work is let go (Dispatcher._record).
    record_patience_s: float = 300.0


RECORD_BACKOFF_MAX_S = 5.0
# How often the dispatch loop lets the pools bring back members whose ejection is over (Pool.tick): the
# loop wakes at least every 0.5 s, so MemberUp comes within about a second of an ejection's end.
POOL_TICK_S = 0.5


def transaction_of(item: WorkItem, sender: str | None = None) -> Transaction:
    """What the transport needs of a leased work item: the transaction, none of the spool's bookkeeping.

    `sender` replaces the envelope sender on the wire (a VERP return path), never in the spool.
    """
    return Transaction(
        item.sender if sender is None else sender,
        tuple(Recipient(r.rid, r.address) for r in item.recipients),
        item.data,
        item.domain,
        item.smtputf8,
        item.tail,
        item.clean,
    )


async def _wait(event: asyncio.Event, timeout_s: float) -> None:
    """Until `event` is set or `timeout_s` has passed. Not asyncio.wait_for: on Python 3.11 it swallows a
    cancel that arrives in the turn the event is set (it returns the result instead), so a loop cancelled
    by stop would run on and stop would wait for it forever."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await event.wait()


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
        outbox: EventOutbox = NO_OUTBOX,
        spf: SpfEvaluator | None = None,
        throttles: Throttles | None = None,
        suppressions: SuppressionList | None = None,
    ) -> None:
        self.settings = settings
        # Read once per settings: a pydantic private attribute costs ~1 µs a read, once a verdict.
        self._classifier = settings.bounces.classifier
        self._refuses_member = settings.bounces.refuses_member
        self.suppressions = suppressions
        self.outbox = outbox
        self.spool = spool
        self.pools = pools
        self.transports = transports
        self.router = router
        self.bus = bus
        self.retry = RetrySchedule(settings.retry)
        self.clock = clock
        self.limits = limits or DispatchLimits()
        self._observe = observe_attempt or (lambda pool, member, seconds: None)
        self._wake = asyncio.Event()
        self._scan_now = asyncio.Event()
        self._next_pool_tick = 0.0  # time.monotonic(): when the pools are told the time next (_tick_pools)
        # Running attempts (and the other tasks that end in a settlement), each with the work it holds:
        # with the ready and parked work, what `held_rids` gives the spool's lease renewal.
        self._attempts: dict[asyncio.Task[None], WorkItem] = {}
        self._loops: list[asyncio.Task[None]] = []
        self._accepting_work = True
        self.resolver = resolver or MxResolver(settings.dns, Providers(settings.shaping), clock)
        # Its lanes' shared state (memory, or Redis), and the reactions other sections add (blocklists).
        self.shaper = Shaper(settings.shaping, throttles, extra=reply_reactions(settings.blocklists))
        self.warmup = warmup or WarmupLedger(None)
        self.spf = spf or SpfEvaluator(settings.spf, settings.dns, clock)
        self.verp = VerpCodec(settings.verp)
        # Work whose sender domain has no SPF verdict yet, by domain: it joins its queue again once one
        # evaluation has answered (as ReadyQueues parks work for an MX answer).
        self._spf_parked: dict[str, list[WorkItem]] = {}
        # What the pure judgement said, per (pool, sender domain), for a verdict and a roster (_spf_barred).
        self._spf_judged: dict[tuple[str, str], tuple[SpfVerdict, int, frozenset[str]]] = {}
        self._spf_pool_ips: dict[str, tuple[int, frozenset[str]]] = {}
        self._ready = ReadyQueues(self._destination, self._mx_destination, self._wake.set)
        # Attempts not settled yet, by recipient: their work went at once to another member (_remember_tries).
        self._tries: dict[int, list[AttemptView]] = {}

    # -- intake --------------------------------------------------------------------------------------

    @property
    def ready(self) -> int:
        return self._ready.count

    @property
    def in_flight(self) -> int:
        return len(self._attempts)

    def has_room(self) -> bool:
        return self._ready.count < self.limits.max_ready

    def held_rids(self) -> set[int]:
        """The recipients whose work this dispatcher holds now: waiting in memory (ready, parked for an MX
        or SPF answer) or in a task that has not ended (an attempt, its outcome being recorded).

        The only leases the node renews (Spool.renew). Work dropped from memory without a recorded
        outcome (the spool did not answer for record_patience_s) is no longer here, so its lease runs
        out and the next scan, this node's or another's, takes it: held until a restart otherwise.
        Computed afresh from what is in memory, so nothing can leak into it. Cost: one pass over the work
        in memory, every lease_ttl / 3.
        """
        items = [*self._ready.items(), *self._attempts.values()]
        items += [item for parked in self._spf_parked.values() for item in parked]
        return {r.rid for item in items for r in item.recipients}

    def submit(self, items: Iterable[WorkItem], *, front: bool = False) -> None:
        self._ready.submit(items, front=front)

    def _destination(self, item: WorkItem) -> str | None:
        """The item's shaping key; None while a source pool's MX answer is not known yet."""
        if self._pool_of(item).settings.kind == "relay":
            return self.resolver.providers.destination(item.domain)
        plan = self.resolver.cached(item.domain)
        return plan.destination if plan is not None else None

    async def _mx_destination(self, domain: str) -> str:
        return (await self.resolver.resolve(domain)).destination

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
        self._classifier = settings.bounces.classifier
        self._refuses_member = settings.bounces.refuses_member
        self.retry = RetrySchedule(settings.retry)
        self.shaper.configure(settings.shaping, reply_reactions(settings.blocklists))
        self.spf.reconfigure(settings.spf, settings.dns)
        self.verp = VerpCodec(settings.verp)
        self._spf_judged.clear()
        self._spf_pool_ips.clear()

    # -- lifecycle -----------------------------------------------------------------------------------

    async def start(self, run: Callable[[str, Loop], asyncio.Task[None]] | None = None) -> None:
        """`run` starts each loop as a task (the App's supervision.Supervisor, which restarts a loop that
        crashes); by default a plain task."""
        run = run or (lambda name, loop: asyncio.create_task(loop(), name=name))
        self._loops = [
            run("dispatch", self._dispatch_loop),
            run("scan", self._scan_loop),
            run("reap", self._reap_loop),
        ]

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Stop taking work, let attempts in flight finish for up to `timeout_s`, then cancel the rest.

        Work still in memory stays leased in the spool and is recovered at the next start.
        """
        self._accepting_work = False
        lookups = [*self._ready.lookups, *self.spf.pending]
        for task in [*self._loops, *lookups]:
            task.cancel()
        await asyncio.gather(*self._loops, *lookups, return_exceptions=True)
        self.warmup.flush()
        if self._attempts:
            _, pending = await asyncio.wait(set(self._attempts), timeout=timeout_s)
            for task in pending:
                task.cancel()
            if pending:
                # Bounded: shutdown must end even if an attempt were to swallow its cancellation.
                await asyncio.wait(pending, timeout=5.0)
        await asyncio.gather(*(t.close() for t in self.transports.values()), return_exceptions=True)
        self.shaper.give_back_spares(self.clock())

    # -- the loops -----------------------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        while True:
            self._wake.clear()
            next_turn = self._dispatch_ready()
            self._tick_pools()
            # Wake on new work, a finished attempt or a rate-limited lane's next turn; the timeout also
            # lets ejected members come back on time, in a pool without work too (_tick_pools).
            timeout = min(0.5, max(0.001, next_turn - self.clock()))
            await _wait(self._wake, timeout)

    async def _scan_loop(self) -> None:
        while True:
            # Cleared before the scan, not after it: a wake-up that comes while the scan reads (another
            # node's commit it could not see yet, by NOTIFY) must bring another scan, not wait an interval.
            self._scan_now.clear()
            if self._ready.count < self.limits.max_ready // 2:
                try:
                    items = await self.spool.lease_due(self.clock(), self.limits.scan_batch)
                except SpoolError as e:
                    log.error("spool scan failed", error=str(e))
                    items = []
                if items:
                    self.submit(items)
                if len(items) >= self.limits.scan_batch:
                    continue
            await _wait(self._scan_now, self.limits.scan_interval_s)

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(self.limits.reap_interval_s)
            now = time.monotonic()
            for transport in self.transports.values():
                transport.reap_idle(now)
            self.shaper.prune(self.clock())
            self.resolver.prune()
            self.spf.prune()
            if len(self._spf_judged) > 10_000:  # bounded: judged again at the next pick, cheaply
                self._spf_judged.clear()
            self.warmup.flush()

    def _tick_pools(self) -> None:
        """Tell every pool the time, so an ejection that ends while its pool has no work ends then: its
        MemberUp and slow-start ramp start on time, not at the pool's next pick (Pool.tick). At most every
        POOL_TICK_S however often the loop wakes, so a busy node pays nothing per message for it."""
        tick = time.monotonic()
        if tick < self._next_pool_tick:
            return
        self._next_pool_tick = tick + POOL_TICK_S
        now = self.clock()
        for pool in self.pools.values():
            pool.tick(now)

    def _dispatch_ready(self) -> float:
        """Start every attempt that may start now; returns when a rate-limited lane may go next."""
        now = self.clock()
        next_turn = math.inf
        ready = self._ready
        queues = ready.queues
        for name in list(queues):
            q = queues[name]
            while q and self._accepting_work:
                item = q[0]
                pool = self._pool_of(item)
                barred = self._spf_barred(item, pool, now)
                if barred is None:  # its sender domain's first SPF verdict is on its way
                    self._park_for_spf(ready.take(q), pool)
                    continue
                held = self._gate(pool, item.destination, now)
                # Suspended or capped members are passed over (their mail may go to a lower tier);
                # busy or rate-limited ones are waited for, like a member at its connection limit.
                # Members the SPF record does not permit are passed over as if tried.
                passed_over = item.tried | barred
                member = pool.pick(self._hash_key(pool, item), now, passed_over | held.away, held.closed)
                if member is None:
                    if pool.can_serve(now, passed_over | held.away):
                        next_turn = min(next_turn, held.next_turn)
                        break  # every member that may take it is busy or waits its turn: the queue waits
                    ready.take(q)
                    if held.away and pool.can_serve(now, passed_over):
                        self._hold_back(item, pool, held, now)
                    elif barred and not item.tried and pool.can_serve(now, item.tried | held.away):
                        self._spawn(self._spf_refused(item, pool, barred), item)
                    else:
                        self._spawn(self._no_member(item, pool), item)
                    continue
                ready.take(q)
                item.barred = barred
                self._start(item, pool, member, now, q)
            if not q:
                del queues[name]
        return next_turn

    # -- SPF: members the sender domain does not permit -------------------------------------------------

    def _spf_barred(self, item: WorkItem, pool: Pool, now: float) -> frozenset[str] | None:
        """The members SPF keeps from this work; None while its domain's first verdict is evaluated.

        Never waits: an expired verdict is used while one evaluation refreshes it, so only a domain's
        first message (and what comes with it) waits for DNS, parked apart from the queue.
        The null sender (bounces, DSNs) is exempt: its mail must go out, and what receivers check for
        it is the member's HELO name (RFC 7208 2.3), the operator's own rather than a customer's.
        """
        if not self.spf.enabled:
            return NONE_BARRED
        ips = self._spf_ips(pool)
        domain = self._spf_domain(item, pool)
        if not domain or not ips:
            return NONE_BARRED
        verdict = self.spf.cached(domain)
        if verdict is None:
            self._spf_refresh(domain)
            return None
        # Judged once per verdict and roster: judging afresh cost ~11 us a pick for 10 members (a hit, 1-2).
        key = (pool.name, domain)
        judged = self._spf_judged.get(key)
        if judged is None or judged[0] is not verdict or judged[1] != pool.version:
            if not verdict.covers(ips):  # a member added since: its IPs are judged by the next verdict
                self._spf_refresh(domain)
            judged = (verdict, pool.version, spf_barred(verdict, pool, self.settings.spf))
            self._spf_judged[key] = judged
        if verdict.expires <= now:
            self._spf_refresh(domain)  # this work goes by the expired verdict meanwhile
        return judged[2]

    def _spf_ips(self, pool: Pool) -> frozenset[str]:
        """The IPs SPF judges `pool`'s members by, as of its current roster."""
        known = self._spf_pool_ips.get(pool.name)
        if known is None or known[0] != pool.version:
            known = (pool.version, frozenset(ip for m in pool.members for ip in m.settings.spf_ips))
            self._spf_pool_ips[pool.name] = known
        return known[1]

    def _spf_refresh(self, domain: str) -> None:
        """One evaluation of `domain` for every judged IP of the farm; parked work goes back when it ends."""
        if self.spf.evaluating(domain):  # asked at every pick while a verdict is refreshed: cheap
            return
        ips = {ip for p in self.pools.values() for m in p.members for ip in m.settings.spf_ips}
        task = self.spf.refresh(domain, ips)
        if task is not None:
            task.add_done_callback(lambda _: self._spf_answered(domain))

    def _spf_answered(self, domain: str) -> None:
        items = self._spf_parked.pop(domain, [])
        self._ready.count -= len(items)
        if items:
            self.submit(items, front=True)
        self._wake.set()

    def _park_for_spf(self, item: WorkItem, pool: Pool) -> None:
        self._ready.count += 1  # still work in memory (has_room), though out of its queue
        self._spf_parked.setdefault(self._spf_domain(item, pool), []).append(item)

    def _spf_domain(self, item: WorkItem, pool: Pool) -> str:
        """The domain receivers check SPF for: the MAIL FROM's, which is the VERP return-path domain
        when [verp] rewrites it for this pool."""
        if item.sender and self.verp.applies_to(pool.name) and self.verp.domain:
            return self.verp.domain
        return domain_of(item.sender)

    async def _spf_refused(self, item: WorkItem, pool: Pool, barred: frozenset[str]) -> None:
        """No member the SPF record permits is left for this work: it waits (verdicts.spf_refused)."""
        now = self.clock()
        domain = self._spf_domain(item, pool)
        verdict = self.spf.cached(domain)
        why = spf_why(verdict, pool, self.settings.spf, barred) if verdict else dict.fromkeys(barred, "?")
        log.warning("no member permitted by spf", domain=domain, pool=pool.name, members=why)
        v = verdicts.spf_refused(item, pool, domain, why, self._rules(), now)
        await self._apply(v, pool, None, now)

    def _return_path(self, item: WorkItem, pool: Pool) -> str | None:
        """The VERP return path of a one-recipient item of a [verp] pool; None: the sender as stored.
        The null sender (DSNs) stays null: a bounce of a bounce must not come back (RFC 5321 4.5.5)."""
        if not item.sender or len(item.recipients) != 1 or not self.verp.applies_to(pool.name):
            return None
        return self.verp.return_path(item.message_id, item.recipients[0].address)

    def _gate(self, pool: Pool, destination: str, now: float) -> Gate:
        return gate(self.shaper, self.warmup, pool, destination, now)

    def _start(self, item: WorkItem, pool: Pool, member: Member, now: float, q: deque[WorkItem]) -> None:
        lane = self.shaper.lane(pool.name, member.settings, item.destination, now)
        limit = lane.ceiling.max_recipients
        if item.sender and self.verp.applies_to(pool.name):
            limit = 1  # a VERP return path names one recipient: one transaction each
        if limit is not None and len(item.recipients) > limit:
            # One transaction carries at most `limit` recipients; the rest waits at the queue's head.
            rest = replace(
                item, recipients=item.recipients[limit:], tried=set(item.tried), unfit=set(item.unfit)
            )
            item.recipients = item.recipients[:limit]
            self._ready.put_back(q, rest)
        lane.start(now)
        self.warmup.count(pool.name, member.settings, item.destination, now)
        pool.begin(member)
        self._spawn(self._attempt(item, pool, member, lane), item)

    def _hold_back(self, item: WorkItem, pool: Pool, held: Gate, now: float) -> None:
        """Only suspended or warm-up-capped members could take this: overflow, or wait until one can."""
        moved = verdicts.overflow(item, held, self.pools)
        if moved is not None:
            self.submit([moved])
            return
        self._spawn(self._postpone(item, pool, held.reopen, now), item)

    async def _postpone(self, item: WorkItem, pool: Pool, reopen: float, now: float) -> None:
        """Wait for a suspension or a warm-up day to end (verdicts.postponed)."""
        await self._apply(verdicts.postponed(item, pool, reopen, self._rules(), now), pool, None, now)

    async def _no_member(self, item: WorkItem, pool: Pool) -> None:
        """Every usable member was tried, or none is usable: the work waits (verdicts.no_member)."""
        now = self.clock()
        await self._apply(verdicts.no_member(item, pool, self._rules(), now), pool, None, now)

    def _spawn(self, coro: Coroutine[Any, Any, None], item: WorkItem) -> None:
        """Run `coro`, which ends `item` (an attempt, or a settlement without one); the item counts as held
        (held_rids) until the task ends."""
        task = asyncio.create_task(coro)
        self._attempts[task] = item
        task.add_done_callback(self._forget_task)

    def _forget_task(self, task: asyncio.Task[None]) -> None:
        self._attempts.pop(task, None)

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
            pool.finish(member)
            self._wake.set()

    async def _run_attempt(self, item: WorkItem, pool: Pool, member: Member, lane: Lane) -> None:
        started = time.monotonic()
        started_at = self.clock()
        transport = self.transports[(pool.name, member.name)]
        outcome: AttemptOutcome | Exception
        try:
            outcome = await transport.deliver(
                transaction_of(item, self._return_path(item, pool)),
                per_connection=lane.ceiling.max_messages_per_connection,
            )
        except Exception as e:  # postmux's own code raised (the transport never raises for the network)
            log.exception("delivery attempt crashed", member=member.name, message=item.message_id)
            outcome = e
        finally:
            lane.finish(self.clock())  # the connection is free for the lane's next attempt
        now = self.clock()
        item.tried.add(member.name)
        if isinstance(outcome, Exception):
            # The message's fault, never the member's: nothing is learnt (no health, latency or shaping),
            # or a handful of such messages would eject healthy members.
            await self._apply(
                verdicts.crashed(item, member.name, outcome, pool, self._rules(), now), pool, member, now
            )
            return
        try:
            self._learn(pool, member, lane, outcome, time.monotonic() - started, started_at, now)
        except Exception:  # what the attempt taught is lost, never the outcome: it is still recorded
            log.exception("learning from an attempt failed", member=member.name, message=item.message_id)
        verdict = verdicts.after_attempt(item, member.name, outcome, pool, self._rules(), now)
        if verdict.retry_now is not None:
            self._remember_tries(verdict.retry_now, member.name, outcome, now)
        await self._apply(verdict, pool, member, now)

    def _remember_tries(self, item: WorkItem, member: str, outcome: AttemptOutcome, now: float) -> None:
        """Work that goes at once to another member has no settlement for this attempt: it is kept here
        until the recipients' own, so the spool keeps it too (Settlement.earlier, `postmux queue show`).

        Bounded by the recipients in memory: each entry goes with the recipient's next settlement.
        """
        for r in item.recipients:
            reply = outcome.replies.get(r.rid)
            if reply is not None:
                self._tries.setdefault(r.rid, []).append(AttemptView(r.rid, member, str(reply), now))

    def _with_earlier(self, s: Settlement) -> Settlement:
        earlier = [a for rid in s.rids for a in self._tries.pop(rid, ())]
        return replace(s, earlier=(*s.earlier, *earlier)) if earlier else s

    def _learn(
        self,
        pool: Pool,
        member: Member,
        lane: Lane,
        outcome: AttemptOutcome,
        elapsed: float,
        started_at: float,
        now: float,
    ) -> None:
        """Health, latency and shaping hear how the attempt went; a change of shaping is announced."""
        self._observe(pool.name, member.name, elapsed)
        change = learn(pool, member, self.shaper, lane, outcome, elapsed, started_at, now)
        if change is None:
            return
        log.info(
            "shaping changed",
            pool=lane.pool,
            member=lane.member,
            destination=lane.destination,
            change=change.response.text if change.response else "",
        )
        self.bus.emit(change)

    async def _requeue_after_crash(self, item: WorkItem, pool: Pool, error: Exception) -> None:
        """Deciding or recording an outcome raised: the work waits a round (verdicts.after_crash)."""
        now = self.clock()
        try:
            await self._apply(verdicts.after_crash(item, error, pool, self._rules(), now), pool, None, now)
        except Exception:  # the work is let go: its lease, no longer renewed, runs out (held_rids)
            log.exception("requeueing crashed work failed", message=item.message_id)

    # -- applying a verdict --------------------------------------------------------------------------

    def _rules(self) -> Rules:
        # Read at each verdict: a reload replaces the settings, the retry schedule and the router.
        return Rules(self.retry, self.router, self.settings.smtp.hostname, self._refuses_member)

    async def _apply(self, verdict: Verdict, pool: Pool, member: Member | None, now: float) -> None:
        """Do what `verdict` says, in its order: events, tally, work for another member or a new
        transaction, the record.

        The events' webhook rows are recorded with the settlements, in their transaction (events/outbox.py).
        """
        verdicts.classify_failures(verdict.events, self._classifier)
        if member is not None and member.zone:
            verdicts.place(verdict.events, member.name, member.zone)
        # Only a Bounce can be a hard one: the usual verdict (a delivery) awaits nothing here.
        if self.suppressions is not None and any(e.type is EventType.BOUNCE for e in verdict.events):
            await self._suppress_hard_bounces(verdict.events)
        rows = self.outbox.rows(verdict.events)
        for event in verdict.events:
            self.bus.emit(event)
        if member is not None and verdict.tally is not verdicts.NO_TALLY:
            t = verdict.tally
            pool.tally(member, delivered=t.delivered, deferred=t.deferred, bounced=t.bounced)
        if verdict.held:
            s = verdict.settlements[0]
            log.warning("message held", message=s.message_id, reason="local_error", crashes=s.local_errors)
        if verdict.retry_now is not None:
            self.submit([verdict.retry_now], front=True)
        if verdict.split is not None:  # as _start puts back what a transaction could not carry
            self.submit([verdict.split], front=True)
        await self._record(verdict.settlements, now, rows)

    async def _suppress_hard_bounces(self, events: list[Event]) -> None:
        """A hard bounce's recipient goes on the suppression list before its events are out, so a
        webhook consumer that resends at once is already refused."""
        assert self.suppressions is not None
        try:
            await self.suppressions.note_bounces(events)
        except SpoolError as e:  # the bounce itself is recorded all the same; the entry is lost
            log.error("hard bounce not suppressed", error=str(e))

    async def _record(
        self, settlements: list[Settlement], now: float, rows: Sequence[OutboxRow] = ()
    ) -> None:
        if not settlements and not rows:
            return
        if self._tries:  # empty on the usual path: an attempt retried at once on another member fills it
            settlements = [self._with_earlier(s) for s in settlements]
        # Retried while the spool does not answer, for up to record_patience_s: each try recorded is a
        # delivery not made twice, and meanwhile the work is held (held_rids), so its lease is renewed
        # and no other node takes it. Given up at last (a settlement the spool refuses for good must not
        # hold its recipients forever), the work is let go: its lease runs out and the next scan attempts
        # it again, which may deliver it twice (at least once, never lost, never held until a restart).
        give_up = time.monotonic() + self.limits.record_patience_s
        attempt = 0
        while True:
            try:
                # Events without a settlement (a try passed on to another member) are appended alone.
                # Per message, rows commit in the order events happen: this write joins the spool's one
                # writer queue before `retry_now`'s attempt can even start, let alone settle.
                # again: the try before may have committed with its reply lost; the spool then does
                # nothing, where running it twice would queue a second DSN and append the events twice.
                await self.spool.settle(settlements, now, outbox=rows, again=attempt > 0)
                if rows:
                    self.outbox.committed()
                break
            except SpoolError as e:
                attempt += 1
                pause = min(RECORD_BACKOFF_MAX_S, 0.2 * 2 ** min(attempt - 1, 10))
                if time.monotonic() + pause > give_up:
                    log.error(
                        "outcome not recorded; the work is let go: its lease runs out and it is attempted"
                        " again (possibly delivered twice)",
                        error=str(e),
                        attempts=attempt,
                        messages=sorted({s.message_id for s in settlements}),
                        recipients=sorted(rid for s in settlements for rid in s.rids),
                    )
                    return
                log.error("recording outcome failed", error=str(e), attempt=attempt)
                await asyncio.sleep(pause)
        if any(s.dsn is not None for s in settlements):
            self.scan_soon()
