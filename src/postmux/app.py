"""Composition root: builds the components from the settings, starts them in order, stops them in reverse.

Only cli.py imports this module; every other room is given its collaborators (the admin side a NodeView,
the acceptor a WorkSink), never the App. Settings reach the components by one path, `configure`, at build
and at each reload. The shutdown sequence is described at `stop`.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from postmux.admin.api import admin_api
from postmux.admin.control import Control, NodeView
from postmux.admin.dashboard import Dashboard
from postmux.admin.gauges import NodeGauges
from postmux.admin.history import History
from postmux.admin.member_states import DrainedMembers, MemberStates, RedisMemberStates
from postmux.admin.queue import KnownDestinations
from postmux.admin.reload import Reloader, ReloadResult
from postmux.balancing.member import Member
from postmux.balancing.pool import Pool
from postmux.balancing.probes import HealthChecker
from postmux.config import Settings, http_notes, split_hostport
from postmux.delivery.factory import MemberTransports, TransportFactory, smtp_transport
from postmux.delivery.mx import MxResolver
from postmux.delivery.myself import Myself
from postmux.delivery.transport import MemberTransport
from postmux.dkim import DkimSigner
from postmux.events.bus import EventBus
from postmux.events.log import JsonLinesLog
from postmux.events.metrics import Metrics
from postmux.events.types import Event, EventType
from postmux.events.webhooks import Webhooks
from postmux.ingress.acceptor import Acceptor
from postmux.ingress.http import HttpServer, make_http_app, refusal_counter
from postmux.ingress.smtp import start_smtp_server
from postmux.ingress.submission import PUBLIC_ROUTES, Submissions
from postmux.ingress.unsubscribe import Unsubscribes
from postmux.ingress.workers import IngressWorkers
from postmux.node import instance_id, node_name
from postmux.reputation.blocklists import BlocklistWatch
from postmux.reputation.breaker import ReputationBreaker
from postmux.reputation.returns import ReturnedMail
from postmux.reputation.suppression import SuppressionList
from postmux.reputation.verp import VerpCodec
from postmux.scheduling.dispatcher import Dispatcher, DispatchLimits
from postmux.scheduling.providers import Providers
from postmux.scheduling.redis_health import RedisHealthVerdicts, SharedChecks
from postmux.scheduling.redis_throttles import (
    BackendChange,
    RedisThrottles,
    RedisWarmupCounts,
    make_throttles,
)
from postmux.scheduling.router import Router
from postmux.scheduling.throttles import MemoryThrottles, RetryAfter, Throttles
from postmux.scheduling.warmup import WarmupLedger
from postmux.spool.base import SpoolError
from postmux.spool.factory import make_spool
from postmux.spool.lock import SpoolLocked
from postmux.spool.postgres import PostgresSpool
from postmux.supervision import Supervisor

log = structlog.get_logger("postmux.app")


class StartupError(Exception):
    """What only a start can find (a port in use, a spool or event log that cannot be used), in one line
    that names the cause: the operator fixes it without reading a traceback."""


@contextlib.contextmanager
def _starting(what: str, path: str = "") -> Iterator[None]:
    """Turn the failure of one start step into a StartupError that says which step, on what, and why."""
    named = f"{what} {path}".rstrip()
    try:
        yield
    except SpoolLocked as e:
        raise StartupError(str(e)) from e
    except OSError as e:
        # The file the system call failed on, when it is not the one named (a parent in the way, say).
        where = f" ({e.filename})" if e.filename and str(e.filename) != path else ""
        raise StartupError(f"{named}: {(e.strerror or str(e)).lower()}{where}") from e
    except (SpoolError, sqlite3.Error) as e:
        raise StartupError(f"{named}: {e}") from e


class ThrottleTurns:
    """The submission API's rate per key (ingress/submission.Turns) on a Throttles (GCRA)."""

    def __init__(self, throttles: Throttles | None = None) -> None:
        self.throttles = throttles or MemoryThrottles()

    def wait_s(self, key: str, per_s: float, burst: int, now: float, take: int) -> float:
        turn = self.throttles.rate(key, per_s, burst, now, take=take)
        return turn.seconds if isinstance(turn, RetryAfter) else 0.0


class App:
    def __init__(
        self,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
        limits: DispatchLimits | None = None,
        config_path: str | Path | None = None,
        transport_factory: TransportFactory = smtp_transport,
    ) -> None:
        self.settings = settings
        self.clock = clock
        # The long-lived loops: a crash is logged and the loop restarted; one that keeps crashing stops the
        # node (postmux/supervision.py). `failed` is set then, with `failure` saying why: `postmux serve`
        # waits on it beside its signals.
        self.supervisor = Supervisor(self._loop_failed)
        self.failed = asyncio.Event()
        self.failure: str | None = None
        # [node] name (else the host's): on events and the admin views; one process of it: `instance`.
        self.node_name = node_name(settings.node)
        self.instance = instance_id(self.node_name)
        self.bus = EventBus(self.node_name)
        self.metrics = Metrics()
        self.event_log = JsonLinesLog(settings.events.log)
        self.bus.subscribe(self.event_log)
        self.bus.subscribe(self.metrics)
        # The dashboard's hour in memory: an O(1) append per event, read only while a page watches.
        self.history = History(clock)
        self.bus.subscribe(self.history)
        self.spool = make_spool(settings.spool, settings.node.name)
        # Read from the spool at start; the accept paths, the dispatcher (hard bounces) and the admin API
        # share it (postmux.reputation.suppression).
        self.suppressions = SuppressionList(
            self.spool, settings.suppression, clock, refused=self.metrics.count_suppressed
        )
        # Webhooks: the accept path and the dispatcher commit their events' rows with their changes; the
        # bus brings the rest (member and shaping events). With no [[webhook]], nothing is written or started.
        self.webhooks = Webhooks(
            settings.webhook, self.spool, self.metrics.count_webhook_request, clock=clock, node=self.node_name
        )
        if settings.webhook:  # [[webhook]] is restart-only: no endpoint now, none until a restart
            self.bus.subscribe(self.webhooks)
        self.metrics.add_live(self.webhooks.gauges)
        # Each component is built from its section and takes later ones through its own method; the
        # pools, their transports and the operator's drains are filled by configure below, the same call
        # a reload makes (admin/reload.py).
        self.router = Router(settings)
        self.resolver = MxResolver(settings.dns, Providers(settings.shaping), clock)
        self.pools: dict[str, Pool] = {}
        self.transports = MemberTransports(transport_factory, self.resolver)
        # [throttles]: the limits this node shares with others (Redis), or keeps alone (memory).
        self.throttles = make_throttles(settings.throttles, self._throttles_changed, self.instance)
        self.metrics.add_live(self._throttles_gauges)
        self.metrics.add_live(self._loop_crashes)
        self.dispatcher = Dispatcher(
            settings,
            self.spool,
            self.pools,
            self.transports,
            self.router,
            self.bus,
            observe_attempt=self.metrics.observe_attempt,
            clock=clock,
            limits=limits or DispatchLimits(),
            resolver=self.resolver,
            warmup=WarmupLedger(
                # With Redis, every node's messages count toward one daily cap.
                RedisWarmupCounts(self.throttles)
                if isinstance(self.throttles, RedisThrottles)
                else Path(settings.spool.path).with_name("warmup.db")
            ),
            outbox=self.webhooks,
            throttles=self.throttles,
            suppressions=self.suppressions,
        )
        self.signer = DkimSigner(settings.dkim, clock)
        self.blocklists = BlocklistWatch(self.pools, self.bus.emit, clock)
        self.metrics.add_live(self.blocklists.gauges)
        self.returns = ReturnedMail(
            VerpCodec(settings.verp),
            self._destination_of,
            self._sending_from,
            classify=lambda reply: self.settings.bounces.classifier.classify(reply),
            clock=clock,
        )
        self.acceptor = Acceptor(
            self.spool,
            self.router,
            self.dispatcher,
            self.bus,
            settings.smtp.hostname,
            clock,
            self.webhooks,
            self.signer,
            suppressions=self.suppressions,
            returns=self.returns,
        )
        self.unsubscribes = Unsubscribes(
            settings.unsubscribe, self.spool, self.bus, self.webhooks, clock, self.suppressions
        )
        node = NodeView(
            pools=self.pools,
            transports=self.transports,
            shaper=self.dispatcher.shaper,
            warmup=self.dispatcher.warmup,
            spool=self.spool,
            bus=self.bus,
            dispatch=self.dispatcher,
            member_changed=self.member_changed,
            clock=clock,
            router=self.router,
            destinations=KnownDestinations(self.resolver),
            reporting_mta=settings.smtp.hostname,
            webhooks=self.webhooks,
            blocklists=self.blocklists,
            suppressions=self.suppressions,
            settings=lambda: self.settings,
            name=self.node_name,
        )
        self.control = Control(node, Reloader(config_path, settings, self.configure), self._member_states())
        self.shared_checks = (
            SharedChecks(RedisHealthVerdicts(self.throttles, self.instance), self.throttles.heartbeat_s)
            if isinstance(self.throttles, RedisThrottles)
            else None
        )
        # Last on the bus: the Bounce that trips it is logged before the ShapingChanged the trip emits.
        self.breaker = ReputationBreaker(settings.breaker, self.control.trip, self._member_kind, clock)
        self.bus.subscribe(self.breaker)
        self.checkers: dict[str, HealthChecker] = {}
        self._checks_on: dict[str, bool] = {}
        self.submissions = Submissions(
            self.acceptor, self.spool, settings, ThrottleTurns(self.throttles), clock
        )
        self.dashboard = Dashboard(self.control, self.history, settings.http.admin_token, clock)
        self.http = HttpServer(
            settings.http,
            make_http_app(
                self.metrics,
                admin_api(self.control, settings.http.admin_token, PUBLIC_ROUTES),
                self.submissions.mount,
                self.dashboard.mount,
                refusal_counter(self.metrics.count_refusal, PUBLIC_ROUTES),
                self.unsubscribes.mount,
            ),
        )
        self.metrics.add_live(self._live_gauges)
        self.node_gauges = NodeGauges(self.control, clock)
        self.metrics.add_live(self.node_gauges.collect)
        self._smtp: asyncio.Server | None = None
        self.workers: IngressWorkers | None = None
        self._queue_counts: dict[str, int] = {}
        self._counter: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._renewing: asyncio.Task[None] | None = None
        self.recovered = 0
        self._spool_opened = False
        # What start did, undone by stop in reverse: (step, its undo), pushed before the step runs, so a
        # step that fails halfway is undone too (each undo is safe on a part that never started).
        self._undo: list[tuple[str, Callable[[], Awaitable[None]]]] = []
        self._quiet = True
        self.running = False  # started in full; a start that failed stops quietly (its error says it all)
        self._checking = False  # health checkers run from start to stop, following reloads meanwhile
        self.configure(settings)

    @property
    def smtp_port(self) -> int:
        if self.workers is not None:
            return self.workers.port
        assert self._smtp is not None
        return int(self._smtp.sockets[0].getsockname()[1])

    @property
    def http_port(self) -> int:
        return self.http.port

    async def __aenter__(self) -> App:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    @property
    def drain_timeout_s(self) -> float:
        return self.settings.shutdown.drain_timeout

    async def start(self) -> None:
        """Start in order; a step that fails stops what already started, in reverse, and raises
        (StartupError for what an operator fixes: a port in use, a spool or event log that cannot be used)."""
        try:
            await self._start()
        except BaseException:
            await self._unwind()  # quietly: the start's own error says what happened
            raise
        self._announce_http()
        self.running = True

    async def _start(self) -> None:
        settings = self.settings
        self._undo.append(("close the spool", self._close_spool))
        with _starting("spool", settings.spool.path):
            self.recovered = await self.spool.open()
        self._spool_opened = True
        self._undo.append(("stop renewing leases", self._stop_renewing))
        self._start_renewing()
        with _starting("suppression list", settings.spool.path):
            await self.suppressions.load()
        if self.recovered:
            log.info("recovered unfinished work", recipients=self.recovered)
        self._undo.append(("close the event log", self.event_log.stop))
        with _starting("event log", settings.events.log):
            await self.event_log.start()
        self._undo.append(("stop the http listener", self.http.stop))
        with _starting(f"[http] listen {settings.http.listen}"):
            await self.http.start()
        self._undo.append(("close the dashboard's pages", self.dashboard.close))
        self._undo.append(("stop counting the queue", self._stop_counting))
        self._undo.append(("leave the shared throttles", self._leave_throttles))
        self._join_throttles()
        self._counter = self.supervisor.start("queue-counts", self._count_queue)
        # Before the dispatcher and the listener, so it stops after them: what they commit last is
        # posted at the next start, and acknowledgements in flight reach the disk before the spool closes.
        self._undo.append(("stop the webhook senders", self.webhooks.stop))
        await self.webhooks.start(lambda name, loop: self.supervisor.start(name, loop, essential=False))
        for pool in self.pools.values():
            pool.start_sweeping(self.clock())
        self._undo.append(("finish attempts in flight", self._finish_attempts))
        await self.dispatcher.start(self.supervisor.start)
        if isinstance(self.spool, PostgresSpool):
            self.spool.on_work(self.dispatcher.scan_soon)  # another node made work due (LISTEN/NOTIFY)
        self._undo.append(("stop the blocklist watch", self.blocklists.stop))
        await self.blocklists.start()
        self._undo.append(("stop health checks", self._stop_checks))
        self._checking = True
        self.sync_checkers()
        self._undo.append(("stop accepting mail", self._stop_accepting))
        with _starting(f"[smtp] listen {settings.smtp.listen}"):
            if settings.smtp.workers:
                self.workers = IngressWorkers(
                    settings.smtp,
                    self.acceptor,
                    settings.smtp.workers,
                    self.drain_timeout_s,
                    spill_dir=self.spool.spill_dir,
                    return_domains=self._return_domains(),
                )
                await self.workers.start()
            else:
                # A long text goes to the spool's own directory as it arrives: the store adopts it by a
                # rename (spool/base.py, Spool.spill_dir).
                self._smtp = await start_smtp_server(
                    settings.smtp,
                    self.acceptor,
                    spill_dir=self.spool.spill_dir,
                    refused=lambda reason: self.metrics.count_refusal("smtp", reason),
                    return_domains=self._return_domains(),
                    suppressions=self.suppressions,
                )
        self.resolver.know_myself(self._myself(settings))  # with the port bound ("host:0" picks one)

    def _myself(self, settings: Settings) -> Myself:
        """How mail would reach this node (delivery/myself.py): [smtp] listen, on the port bound once the
        listener runs ("host:0" picks one at start), [smtp] hostname, and the source members' addresses."""
        host, port = split_hostport(settings.smtp.listen)
        if self._smtp is not None or self.workers is not None:
            port = self.smtp_port
        sources = (m.source_address for p in settings.pool for m in p.members if m.source_address)
        return Myself.of(host, port, settings.smtp.hostname, sources)

    def _return_domains(self) -> tuple[str, ...]:
        domain = self.settings.verp.domain
        return (domain,) if domain else ()

    def _destination_of(self, domain: str) -> str:
        """The destination (provider, else the domain) of a recipient domain, as lanes name it: by the
        resolver's table of providers, the one delivery goes by (kept in step at each reload)."""
        return self.resolver.providers.destination(domain)

    def _member_kind(self, pool: str, member: str) -> str | None:
        """A member's kind ("source", "relay"), None for one no longer configured."""
        try:
            return self.pools[pool].member(member).settings.kind
        except KeyError:
            return None

    def _sending_from(self, ip: str) -> tuple[str, str] | None:
        """The (pool, member) whose mail leaves from `ip`: a source member's address, a relay's."""
        for pool in self.pools.values():
            for m in pool.members:
                if ip and ip in m.settings.spf_ips:
                    return pool.name, m.name
        return None

    def _announce_http(self) -> None:
        """Say at start what the HTTP listener exposes, and warn when that is more than this host."""
        http = self.settings.http
        log.info(
            "http listening",
            listen=http.listen,
            port=self.http_port,
            admin_api="on" if http.admin_token else "off",
            api_keys=len(self.settings.api_key),
        )
        for level, note in http_notes(http):
            if level == "warning":
                log.warning(note, listen=http.listen)

    def hangup(self) -> None:
        """SIGHUP: reopen the event log (after logrotate moved it) and reload the configuration."""
        log.info("signal received", signal=signal.SIGHUP.name, action="reopen event log and reload")
        try:
            self.event_log.reopen()
        except OSError as e:
            log.error("event log not reopened; still writing to the old file", error=str(e))
        self.control.reload()

    async def stop(self) -> None:
        """Stop in the reverse of start, as uvicorn shuts down:

        1. stop accepting: the SMTP listener closes (ingress workers finish their sessions), so no new
           mail comes in; health checks stop;
        2. drain: attempts in flight finish, for up to `[shutdown] drain_timeout`;
        3. cancel: what is still running then is cancelled; its work stays leased in the spool and is
           recovered at the next start (a shared PostgreSQL spool gives it back to the other nodes
           before it closes, step 5);
        4. flush: the warm-up counts are written, the members' idle connections get QUIT;
        5. close: the queue counter and the HTTP listener (which served /metrics and /healthz until
           here) stop, the event log is closed, and the spool last, which releases its lock.

        A step that fails is logged and the later ones still run (the spool is closed whatever happened
        before); the first failure is raised at the end. Each step of a running node's shutdown is
        logged, so an operator who sent SIGTERM sees how far it has got.
        """
        failure = await self._unwind()
        if failure is not None:
            raise failure

    async def _unwind(self) -> BaseException | None:
        """Undo what start did, last first; every undo runs. Returns the first failure, logged."""
        self._quiet = not self.running
        self.running = False
        first: BaseException | None = None
        while self._undo:
            step, undo = self._undo.pop()
            try:
                await undo()
            except BaseException as e:  # a cancelled step too: the spool must still be closed
                log.error("shutdown step failed; going on", step=step, error=repr(e))
                first = first or e
        return first

    def _say(self, event: str, **fields: Any) -> None:
        """A shutdown step of a running node, logged; a start that failed stops quietly."""
        if not self._quiet:
            log.info(event, **fields)

    async def _close_spool(self) -> None:
        if self._spool_opened:
            try:
                given = await self.spool.give_back()
            except SpoolError as e:  # closing goes on: the leases then run out instead
                log.warning("shutdown: work not given back; its leases run out", error=str(e))
            else:
                if given:
                    self._say("shutdown: work given back to the other nodes", recipients=given)
        await self.spool.close()
        if self._spool_opened:
            self._spool_opened = False
            self._say("shutdown: spool closed")

    def _start_renewing(self) -> None:
        """Leases that expire (a shared spool) are renewed every third of their time to live, so work this
        node holds in memory or in an attempt is never taken over by another while this node lives."""
        ttl = self.spool.lease_ttl_s
        if ttl is not None:
            self._renewing = self.supervisor.start("spool-lease-renewal", lambda: self._renew_leases(ttl / 3))

    async def _renew_leases(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            try:
                # Only what the dispatcher holds: a lease the node no longer has work for runs out.
                await self.spool.renew(self.clock(), self.dispatcher.held_rids())
            except SpoolError as e:
                log.error("spool lease renewal failed; retrying at the next turn", error=str(e))

    async def _stop_renewing(self) -> None:
        task, self._renewing = self._renewing, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def _member_states(self) -> MemberStates:
        """Drains kept in drained.json beside the spool; with Redis, shared by the nodes (that file then
        keeps what Redis last said, for a start while it is away)."""
        drained = DrainedMembers(Path(self.settings.spool.path).with_name("drained.json"))
        if isinstance(self.throttles, RedisThrottles):
            return RedisMemberStates(self.throttles, drained, self.node_name)
        return drained

    async def _share_members(self, every_s: float) -> None:
        """With Redis, each heartbeat: follow the other nodes' drains, swap health verdicts with them."""
        while True:
            await asyncio.sleep(every_s)
            try:
                self.control.follow_shared()
                if self.shared_checks is not None:
                    self.shared_checks.exchange(self.pools, self.clock())
            except Exception:  # a loop that died would leave this node deaf to the others for good
                log.exception("following the other nodes failed; trying again at the next heartbeat")

    def _join_throttles(self) -> None:
        """With Redis: count this node in (each node's share while Redis is away) and keep it counted."""
        throttles = self.throttles
        if isinstance(throttles, RedisThrottles):
            live = throttles.beat()
            log.info("throttles shared", backend=throttles.state, live_nodes=live, prefix=throttles.prefix)
            self._tasks.add(self.supervisor.start("throttles-heartbeat", throttles.run_heartbeat))
            sharing = self.supervisor.start(
                "members-shared", lambda: self._share_members(throttles.heartbeat_s)
            )
            self._tasks.add(sharing)

    async def _leave_throttles(self) -> None:
        throttles = self.throttles
        if isinstance(throttles, RedisThrottles):
            beating = [t for t in self._tasks if t.get_name() in ("throttles-heartbeat", "members-shared")]
            for task in beating:
                task.cancel()
                self._tasks.discard(task)
            await asyncio.gather(*beating, return_exceptions=True)
            if self.shared_checks is not None:
                self.shared_checks.verdicts.leave()
            throttles.leave()
            throttles.close()

    def _loop_failed(self, reason: str) -> None:
        """A loop keeps crashing (the Supervisor logged it, critical): this node must stop rather than
        accept mail it may never deliver."""
        self.failure = self.failure or reason
        self.failed.set()

    def _loop_crashes(self) -> Iterable[CounterMetricFamily]:
        crashes = CounterMetricFamily(
            "postmux_loop_crashes",
            "Crashes of the node's background loops (dispatch, scan, heartbeat...), each restarted; "
            "any is a defect to report",
            labels=["loop"],
        )
        for name, n in sorted(self.supervisor.crashes.items()):
            crashes.add_metric([name], n)
        return [crashes]

    def _throttles_changed(self, change: BackendChange) -> None:
        fallen = change.state == "fallback"
        (log.warning if fallen else log.info)(
            "throttles fell back to this node's share" if fallen else "throttles rejoined",
            state=change.state,
            reason=change.reason,
            live_nodes=change.live_nodes,
        )
        tags = {"state": change.state, "reason": change.reason, "live_nodes": str(change.live_nodes)}
        self.bus.emit(Event(EventType.THROTTLES_BACKEND_CHANGED, timestamp=self.clock(), tags=tags))

    def _throttles_gauges(self) -> Iterable[GaugeMetricFamily]:
        throttles = self.throttles
        state = throttles.state if isinstance(throttles, RedisThrottles) else "memory"
        backend = GaugeMetricFamily(
            "postmux_throttles_backend",
            "1 for where shared limits are kept now: memory, redis, or fallback (this node's share)",
            labels=["state"],
        )
        for name in ("memory", "redis", "fallback"):
            backend.add_metric([name], 1 if name == state else 0)
        live = GaugeMetricFamily("postmux_throttles_live_nodes", "Nodes counted live sharing the limits")
        live.add_metric([], throttles.live_nodes if isinstance(throttles, RedisThrottles) else 1)
        return [backend, live]

    async def _stop_counting(self) -> None:
        if self._counter is not None:
            self._counter.cancel()
            await asyncio.gather(self._counter, return_exceptions=True)
            self._counter = None

    async def _finish_attempts(self) -> None:
        """Drain, cancel, flush: Dispatcher.stop lets attempts in flight end for up to the drain timeout,
        cancels the rest, writes the warm-up counts and closes the members' connections."""
        in_flight = sum(m.in_flight for pool in self.pools.values() for m in pool.members)
        self._say(
            "shutdown: finishing attempts in flight", attempts=in_flight, timeout_s=self.drain_timeout_s
        )
        await self.dispatcher.stop(self.drain_timeout_s)

    async def _stop_checks(self) -> None:
        self._checking = False
        await asyncio.gather(*(c.stop() for c in self.checkers.values()))
        self.checkers.clear()

    async def _stop_accepting(self) -> None:
        if self.workers is None and self._smtp is None:
            return
        await self._close_listener()
        self._say("shutdown: stopped accepting mail")

    async def _close_listener(self) -> None:
        if self.workers is not None:
            await self.workers.stop()
            self.workers = None
        if self._smtp is not None:
            self._smtp.close()
            # Bounded: some loops (uvloop) wait here for every client connection to close, and a client
            # that keeps its session open must not hold up shutdown (stop drains and cancels after this).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._smtp.wait_closed(), timeout=self.drain_timeout_s)
            self._smtp = None

    # -- watching ------------------------------------------------------------------------------------

    # -- live changes --------------------------------------------------------------------------------

    def configure(self, settings: Settings) -> list[str]:
        """The one path by which settings reach the components, at build and at each reload.

        Each component takes its section through its own method (Pool.reconfigure, Router.reconfigure,
        MxResolver.reconfigure, Dispatcher.reconfigure, MemberTransports.reconfigure); nothing here builds
        an object to put into another one's field. Returns what changed, in words for the operator.
        """
        changes = self._configure_pools(settings, self.clock())
        providers = Providers(settings.shaping)
        self.resolver.reconfigure(settings.dns, providers)
        self.resolver.know_myself(self._myself(settings))
        self.metrics.providers = providers.names
        self.suppressions.reconfigure(settings.suppression)
        self.sync_transports(settings)
        self.router.reconfigure(settings)
        self.dispatcher.reconfigure(settings)
        self.submissions.reconfigure(settings)
        # [[dkim]]: the keys were read again with the file (config loads them), so a rotated key file
        # is taken at reload even under the same selector name.
        changes.extend(self.signer.reconfigure(settings.dkim))
        # [dmarc] and [unsubscribe]: taken by the next message; a rotated secret file is read again.
        self.acceptor.reconfigure(settings.dmarc, settings.unsubscribe)
        self.unsubscribes.reconfigure(settings.unsubscribe)
        self.blocklists.reconfigure(settings)
        self.breaker.reconfigure(settings.breaker)
        self.returns.codec = VerpCodec(settings.verp)  # the listener's domain itself is restart-only
        self.settings = settings
        self.control.restore_drains()
        if self._checking:
            self.sync_checkers()
        self.dispatcher.wake()
        return changes

    def _configure_pools(self, settings: Settings, now: float) -> list[str]:
        """Pools added, reconfigured (Pool.reconfigure) and removed; the mapping stays the same object."""
        changes: list[str] = []
        for pool_settings in settings.pool:
            pool = self.pools.get(pool_settings.name)
            if pool is None:
                pool = self.pools[pool_settings.name] = Pool(
                    pool_settings, self.member_changed, zone=settings.node.zone
                )
                pool.start_sweeping(now)
                changes.append(f"{pool.name}: added")
            else:
                changes.extend(pool.reconfigure(pool_settings, now))
                pool.zone = settings.node.zone
        for name in [n for n in self.pools if n not in {p.name for p in settings.pool}]:
            self.pools[name].retire()
            del self.pools[name]  # its queued work falls to the default pool (Dispatcher._pool_of)
            changes.append(f"{name}: removed")
        return changes

    def sync_transports(self, settings: Settings) -> None:
        """One transport per pool member; kept while its connections still fit, else replaced."""
        members = [(pool.name, m.settings) for pool in self.pools.values() for m in pool.members]
        for old in self.transports.reconfigure(members, settings.delivery, settings.ehlo_hostname):
            self.retire_transport(old)

    def sync_checkers(self) -> None:
        """One active health checker per pool with checks enabled, following reloads."""
        hostname = self.settings.ehlo_hostname
        for name, pool in self.pools.items():
            checker = self.checkers.get(name)
            enabled = pool.settings.check.enabled
            if checker is None or checker.pool is not pool or self._checks_on.get(name) != enabled:
                if checker is not None:
                    self._background(checker.stop())
                if not enabled:
                    pool.forget_checks()  # no checks, no verdict: a member is not held out by old ones
                checker = self.checkers[name] = HealthChecker(pool, hostname, self.clock)
                self._checks_on[name] = enabled
                self._background(checker.start())
            else:
                checker.sync()
        for name in [n for n in self.checkers if n not in self.pools]:
            self._background(self.checkers.pop(name).stop())

    def retire_transport(self, transport: MemberTransport) -> None:
        """A member's address or limits changed: the old connections end after the work in flight."""
        transport.retire()
        self._background(transport.close())

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def reload(self) -> ReloadResult:
        return self.control.reload()

    def member_changed(self, member: Member, up: bool, reason: str, origin: str = "") -> None:
        """`origin`: the node another operator changed the member on (tags.origin_node), "" for this one."""
        kind = EventType.MEMBER_UP if up else EventType.MEMBER_DOWN
        log.warning("member up" if up else "member down", pool=member.pool, member=member.name, reason=reason)
        event = Event(
            kind,
            pool=member.pool,
            member=member.name,
            timestamp=self.clock(),
            tags={"reason": reason, **({"origin_node": origin} if origin else {})},
            zone=member.zone or "",
        )
        self.bus.emit(event)

    async def _count_queue(self) -> None:
        while True:
            try:
                self._queue_counts = await self.spool.counts()
            except Exception as e:
                log.warning("queue count failed", error=str(e))
            await self.node_gauges.refresh_queue()  # every QUEUE_EVERY_S, not every count
            await asyncio.sleep(2.0)

    def _live_gauges(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        queue = GaugeMetricFamily(
            "postmux_queue_messages",
            "Recipients (not messages: the name is older than this text) in the spool by state; "
            "the same as postmux_queue_recipients",
            labels=["state"],
        )
        recipients = GaugeMetricFamily(
            "postmux_queue_recipients", "Recipients in the spool by state", labels=["state"]
        )
        for state, n in self._queue_counts.items():
            queue.add_metric([state], n)
            recipients.add_metric([state], n)
        up = GaugeMetricFamily(
            "postmux_member_up", "1 when the member may be picked", labels=["pool", "member", "zone"]
        )
        conns = GaugeMetricFamily(
            "postmux_member_connections", "Open connections to the member", labels=["pool", "member"]
        )
        in_flight = GaugeMetricFamily(
            "postmux_member_in_flight", "Attempts running on the member", labels=["pool", "member"]
        )
        now = self.clock()
        for pool in self.pools.values():
            for m in pool.members:
                labels = [pool.name, m.name]
                # A removed member is listed only until its attempts in flight end: it takes nothing new.
                picked = not (m.removed or m.draining) and m.healthy(now)
                up.add_metric([*labels, m.zone or ""], 1 if picked else 0)
                conns.add_metric(labels, self.transports[(pool.name, m.name)].connections)
                in_flight.add_metric(labels, m.in_flight)
        commits = CounterMetricFamily(
            "postmux_spool_commits",
            "Spool transactions committed (fsyncs); messages per commit shows group commit at work",
        )
        commits.add_metric([], self.spool.commits)
        suppression = GaugeMetricFamily(
            "postmux_suppression_entries", "Entries of the suppression list that stop mail (not expired)"
        )
        suppression.add_metric([], self.suppressions.active())
        return [queue, recipients, up, conns, in_flight, commits, suppression]
