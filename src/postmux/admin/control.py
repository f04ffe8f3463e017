"""Live control of a running postmux: member state, drain and enable, shaping by hand, held mail, reload.

The admin HTTP API (admin/api.py) and SIGHUP both come here. Control is given the node's parts it reads
and steers (NodeView), never the App; what a reload changes is decided by each component's own
`reconfigure` (Pool.reconfigure, Router.reconfigure, ...), which App.configure calls (admin/reload.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from postmux.admin.member_states import DrainedMembers, MemberStates, OperatorState
from postmux.admin.queue import KnownDestinations, QueueControl, QueueNode
from postmux.admin.reload import Reloader, ReloadResult
from postmux.balancing.member import Member
from postmux.balancing.pool import Pool
from postmux.config import Settings
from postmux.delivery.transport import MemberTransport
from postmux.events.bus import EventBus
from postmux.events.types import Event, EventType
from postmux.reputation.breaker import Trip
from postmux.reputation.doctor import Report, doctor_domain
from postmux.reputation.doctor_dns import DnsDoctor
from postmux.reputation.suppression import SuppressionList
from postmux.scheduling.router import Router
from postmux.scheduling.shaping import Lane, Shaper, describe_lane
from postmux.scheduling.warmup import WarmupLedger, day_cap, today_utc
from postmux.spool.base import SpoolBackend

log = structlog.get_logger("postmux.control")

__all__ = ["Control", "DrainedMembers", "NodeView", "member_state"]  # DrainedMembers: where it was before


class UnknownMember(KeyError):
    pass


class NothingHeld(KeyError):
    """No recipient of that message is held (no such message, or it is not held)."""


class Dispatch(Protocol):
    """What an operator's change asks of the dispatcher: look at the queues again, or at the spool."""

    def wake(self) -> None:
        """Look at the ready queues again now (a member was enabled, a suspension lifted)."""
        ...

    def scan_soon(self) -> None:
        """Read due work from the spool soon (held mail was released)."""
        ...


class WebhookStatus(Protocol):
    """What the admin side reads of the webhook senders (events/webhooks.py Webhooks)."""

    async def status(self) -> list[dict[str, Any]]:
        """Each endpoint: backlog, oldest pending age, last success, last error."""
        ...

    async def drop(self, endpoint: str) -> int:
        """Delete the records of an endpoint no longer configured; ValueError for a configured one."""
        ...


class BlocklistStatus(Protocol):
    """What the admin side reads of the blocklist watch (reputation/blocklists.py BlocklistWatch)."""

    def status(self) -> dict[str, object]:
        """Zones, the last round's time, every subject x zone answered, zones not believed."""
        ...


class MemberChanged(Protocol):
    def __call__(self, member: Member, up: bool, reason: str, origin: str = "") -> None:
        """A member went up or down; `origin`: the node an operator changed it on, when another one."""
        ...


@dataclass(frozen=True, slots=True)
class NodeView:
    """The parts of a running node the admin side reads and steers; each is the live object, not a copy.

    `pools` is the node's own mapping: a reload that adds or removes a pool shows here at once.
    """

    pools: Mapping[str, Pool]
    transports: Mapping[tuple[str, str], MemberTransport]
    shaper: Shaper
    warmup: WarmupLedger
    spool: SpoolBackend
    bus: EventBus
    dispatch: Dispatch
    # Says that a member went up or down (log line and MemberUp/MemberDown event).
    member_changed: MemberChanged
    clock: Callable[[], float]
    # For the queue operations (admin/queue.py): where a bounce's DSN goes, which provider a domain's
    # mail goes to, and the name a DSN says it comes from.
    router: Router
    destinations: KnownDestinations
    reporting_mta: str
    webhooks: WebhookStatus | None = None
    blocklists: BlocklistStatus | None = None
    suppressions: SuppressionList | None = None
    # The settings running now (a reload's included): what the doctor examines a domain against.
    settings: Callable[[], Settings] | None = None
    # This node's name ([node] name, else its host's): shown with what it says of its members.
    name: str = ""


class Control:
    def __init__(self, node: NodeView, reloader: Reloader, drains: MemberStates | None = None) -> None:
        self.node = node
        self.reloader = reloader
        self.drains = drains or DrainedMembers(None)
        self.drained = self.drains.load()
        self.queue = QueueControl(
            QueueNode(
                node.spool,
                node.pools,
                node.router,
                node.destinations,
                node.bus,
                node.dispatch,
                node.clock,
                node.reporting_mta,
            )
        )

    # -- members -------------------------------------------------------------------------------------

    def members(self) -> list[dict[str, Any]]:
        now = self.node.clock()
        return [self._describe(pool, m, now) for pool in self.node.pools.values() for m in pool.members]

    def _describe(self, pool: Pool, m: Any, now: float) -> dict[str, Any]:
        transport = self.node.transports.get((pool.name, m.name))
        return {
            "pool": pool.name,
            "member": m.name,
            "address": m.settings.target,
            "zone": m.zone or "",
            "state": member_state(m, now, pool.settings.slow_start),
            "weight": m.weight,
            "effective_weight": round(pool.effective_weight(m, now), 2),
            "max_connections": m.max_connections,
            "connections": transport.connections if transport else 0,
            "in_flight": m.in_flight,
            "ewma_latency_ms": round(m.ewma_latency_s * 1000, 2),
            "attempts": m.attempts,
            "delivered": m.delivered,
            "deferred": m.deferred,
            "bounced": m.bounced,
            "recent_error": m.last_error,
            "tls_mode": m.settings.tls_mode,
            "tls": m.tls,
            "ejected_for_s": round(max(0.0, m.ejected_until - now), 1),
            "listed": list(m.listed),
            # What the nodes that probe it say ("down 2/3 nodes"); "" without a shared store.
            "shared_checks": m.shared_checks,
            "node": self.node.name,
        }

    # -- shaping -------------------------------------------------------------------------------------

    def shaping(self) -> list[dict[str, Any]]:
        """Every member x destination lane: its limits now and configured, and what last changed them."""
        now = self.node.clock()
        lanes = sorted(self.node.shaper.lanes.values(), key=lambda x: (x.pool, x.member, x.destination))
        return [
            {
                **describe_lane(lane, now),
                "warmup": self._warmup(lane.pool, lane.member, lane.destination, now),
            }
            for lane in lanes
        ]

    def _warmup(
        self, pool_name: str, member_name: str, destination: str, now: float
    ) -> dict[str, Any] | None:
        pool = self.node.pools.get(pool_name)
        member = next((m for m in pool.members if m.name == member_name), None) if pool else None
        if member is None or member.settings.warmup is None:
            return None
        ledger = self.node.warmup
        today = today_utc(now)
        return {
            "sent_today": ledger.sent_today(pool_name, member_name),
            "cap_today": day_cap(member.settings, "*", today),
            "provider_cap_today": day_cap(member.settings, destination, today)
            if destination in member.settings.warmup.provider
            else None,
        }

    def _named(self, name: str) -> list[tuple[Pool, Any]]:
        found = [(pool, m) for pool in self.node.pools.values() for m in pool.members if m.name == name]
        if not found:
            raise UnknownMember(name)
        return found

    def set_draining(self, name: str, draining: bool) -> list[dict[str, Any]]:
        """Drain (finish work in flight, take nothing new) or enable a member, in every pool that has it.

        A drain outlives a restart: it is kept in a file beside the spool until `enable`.
        """
        found = self._named(name)
        now = self.node.clock()
        self._remember_drain(name, draining)
        for pool, m in found:
            if pool.drain(m.name) if draining else pool.enable(m.name):
                self.node.member_changed(
                    m, not draining, "enabled by operator" if not draining else "drained by operator"
                )
        self.node.dispatch.wake()
        return [self._describe(pool, m, now) for pool, m in found]

    # -- held mail -----------------------------------------------------------------------------------

    async def release(self, message_id: str) -> dict[str, Any]:
        """Queue a held message again, due now (the way out of HELD; fuller queue operations come later)."""
        released = await self.node.spool.release(message_id, self.node.clock())
        if not released:
            raise NothingHeld(message_id)
        log.info("held message released", message=message_id, recipients=released)
        self.node.dispatch.scan_soon()
        return {"id": message_id, "released": released, "changes": [f"{message_id}: {released} released"]}

    def _remember_drain(self, name: str, draining: bool) -> None:
        wanted = self.drained | {name} if draining else self.drained - {name}
        if wanted == self.drained:
            return
        try:
            self.drains.record(name, draining)
        except OSError as e:
            log.error("drain not saved: a restart will forget it", member=name, error=str(e))
        self.drained = wanted

    def follow_shared(self) -> None:
        """Take the drains and enables other nodes' operators made (MemberStates.refresh), each said by a
        MemberDown or MemberUp whose tags.origin_node names the node it was made on."""
        states = self.drains.refresh()
        if states is None:
            return
        self.drained = {name for name, state in states.items() if state.draining}
        changed = False
        for pool in self.node.pools.values():
            for m in pool.members:
                state = states.get(m.name, OperatorState(False))
                if m.draining != state.draining and self._apply(pool, m, state):
                    changed = True
        if changed:
            self.node.dispatch.wake()

    def _apply(self, pool: Pool, m: Member, state: OperatorState) -> bool:
        if not (pool.drain(m.name) if state.draining else pool.enable(m.name)):
            return False
        by = f"by operator on {state.node}" if state.node else "by operator on another node"
        reason = f"{'drained' if state.draining else 'enabled'} {by}"
        self.node.member_changed(m, not state.draining, reason, state.node)
        return True

    def restore_drains(self) -> None:
        """At start and after a reload: members drained by an operator stay drained until enabled."""
        for pool in self.node.pools.values():
            for m in pool.members:
                if m.name in self.drained and pool.drain(m.name):
                    log.info(
                        "member drained by operator before; still drained", pool=pool.name, member=m.name
                    )

    # -- shaping by hand ------------------------------------------------------------------------------

    def suspend(self, name: str, destination: str, duration_s: float) -> list[dict[str, Any]]:
        """Keep a member (in every pool that has it) from one destination for a while, as a reaction would.
        ValueError for a destination that is neither a provider nor a domain."""
        lane = self.lane_destination(destination)
        return self._suspend(self._named(name), lane, duration_s, "by operator", "operator")

    def lane_destination(self, destination: str) -> str:
        """What an operator names (a provider, or a domain) as the lane the mail goes by: gmail.com's mail
        goes by the google lane, so suspending "gmail.com" suspended a lane no mail used (and a misspelt
        provider one that nothing ever would), answered as done. A domain whose MX postmux has looked up
        goes by its provider as delivery judges it (a Workspace domain: google)."""
        name = destination.strip().lower().rstrip(".")
        known = self.node.destinations
        if name in known.names:
            return name
        if "." not in name:
            providers = ", ".join(sorted(known.names)) or "none configured"
            raise ValueError(f"{destination!r} is no provider ({providers}) and no domain")
        return known.destination_of(name)

    def trip(self, trip: Trip) -> None:
        """The reputation breaker tripped: the lanes of the IP (every source member sending from it), or of
        the relay, toward that destination are suspended for the cool-down; `resume` lifts them earlier."""
        members = [
            (pool, m)
            for pool in self.node.pools.values()
            for m in pool.members
            if (trip.ip and m.settings.kind == "source" and m.settings.source_address == trip.ip)
            or (not trip.ip and pool.name == trip.pool and m.name == trip.member)
        ]
        why = f"by the reputation breaker: {trip.why}"
        self._suspend(members, trip.destination, trip.cooldown_s, why, "breaker")

    def _suspend(
        self, members: Iterable[tuple[Pool, Member]], destination: str, duration_s: float, why: str, by: str
    ) -> list[dict[str, Any]]:
        now = self.node.clock()
        shaper = self.node.shaper
        lanes = []
        for pool, m in members:
            lane = shaper.lane(pool.name, m.settings, destination, now)
            self._shaping_event(lane, shaper.suspend(lane, duration_s, why, now), now, by)
            lanes.append(lane)
        self.node.dispatch.wake()
        return [describe_lane(lane, now) for lane in lanes]

    def resume(self, name: str, destination: str | None = None) -> list[dict[str, Any]]:
        """Lift a member's suspensions now: toward `destination`, or every one. Returns the lanes lifted."""
        now = self.node.clock()
        shaper = self.node.shaper
        pools = {pool.name for pool, _ in self._named(name)}
        if destination is not None:
            destination = self.lane_destination(destination)
        lifted = []
        for lane in list(shaper.lanes.values()):
            if lane.member != name or lane.pool not in pools:
                continue
            if destination is not None and lane.destination != destination:
                continue
            change = shaper.resume(lane, "by operator", now)
            if change is not None:
                self._shaping_event(lane, change, now)
                lifted.append(lane)
        self.node.dispatch.wake()
        return [describe_lane(lane, now) for lane in lifted]

    def _shaping_event(self, lane: Lane, change: str, now: float, by: str = "operator") -> None:
        log.info(
            "shaping changed", pool=lane.pool, member=lane.member, destination=lane.destination, change=change
        )
        self.node.bus.emit(
            Event(
                EventType.SHAPING_CHANGED,
                queue=f"{lane.pool}/{lane.destination}",
                pool=lane.pool,
                member=lane.member,
                tags={"change": change, "by": by},
                timestamp=now,
            )
        )

    # -- webhooks ------------------------------------------------------------------------------------

    async def webhooks(self) -> list[dict[str, Any]]:
        """Each webhook endpoint's backlog and how its last requests went (`postmux webhooks`)."""
        if self.node.webhooks is None:
            return []
        return await self.node.webhooks.status()

    async def drop_webhook_records(self, endpoint: str) -> int:
        """Delete the records of an endpoint no longer configured (`postmux webhooks --drop NAME`)."""
        if self.node.webhooks is None:
            return 0
        return await self.node.webhooks.drop(endpoint)

    # -- blocklists ----------------------------------------------------------------------------------

    def blocklists(self) -> dict[str, Any]:
        """What the blocklist watch last found: each subject x zone, listed or not; zones not believed."""
        if self.node.blocklists is None:
            return {"enabled": False, "checked": []}
        return dict(self.node.blocklists.status())

    # -- the DNS doctor ------------------------------------------------------------------------------

    async def doctor(self, domain: str) -> Report:
        """Every DNS check of a sending domain against the settings running now (`postmux doctor`).
        ValueError when `domain` is not a domain name."""
        name = doctor_domain(domain)
        if self.node.settings is None:
            raise ValueError("this node was built without its settings: no doctor")
        return await DnsDoctor(self.node.settings()).examine(name)

    # -- reload --------------------------------------------------------------------------------------

    def reload(self) -> ReloadResult:
        """Read the configuration file again (the admin API and SIGHUP both); a bad file changes nothing."""
        return self.reloader.reload()


def member_state(m: Any, now: float, slow_start: float) -> str:
    """The word `postmux members` shows; `slow_start`: the pool's. Ramping is judged by the time: ramp_started
    stays set until a pick reads the ramp, so in a pool without mail it outlives the ramp."""
    if m.removed:
        return "removed"
    if m.draining:
        return "draining"
    if m.ejected(now):
        return "ejected"
    if m.listed:
        return "listed"
    if not m.check_up:
        return "check-failed"
    if m.peers_down:  # its own checks pass, but most nodes' fail (balancing/quorum.py)
        return "down-by-majority"
    if m.ramping(now, slow_start):
        return "ramping"
    return "up"
