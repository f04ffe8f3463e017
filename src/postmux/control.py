"""Live control of a running postmux: member state, drain and enable, configuration reload.

The admin HTTP API and SIGHUP both come here; deciding what a reload changes lives in Pool.reconfigure.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from postmux.balancing.pool import Pool
from postmux.config import ConfigError, MemberSettings, Settings, load_config
from postmux.delivery.smtp_client import SmtpTransport
from postmux.events.types import Event, EventType
from postmux.scheduling.providers import Providers
from postmux.scheduling.retry import RetrySchedule
from postmux.scheduling.router import Router
from postmux.scheduling.shaping import Lane, describe_lane
from postmux.scheduling.warmup import day_cap, today_utc

if TYPE_CHECKING:
    from postmux.app import App

log = structlog.get_logger("postmux.control")

# Sections a running process cannot change: every key in them needs a restart. The SMTP listener (in this
# process or in ingress workers) is built once from [smtp]; the HTTP listener and its admin token, the
# spool and the event log are opened once at start.
_RESTART_ONLY = ("smtp", "http", "spool", "events")


class UnknownMember(KeyError):
    pass


class NothingHeld(KeyError):
    """No recipient of that message is held (no such message, or it is not held)."""


@dataclass
class ReloadResult:
    ok: bool
    changes: list[str] = field(default_factory=list)
    needs_restart: list[str] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "changes": self.changes,
            "needs_restart": self.needs_restart,
            "problems": [{"key": k, "reason": r} for k, r in self.problems],
        }


class Control:
    def __init__(
        self, app: App, config_path: str | Path | None, drains: DrainedMembers | None = None
    ) -> None:
        self.app = app
        self.config_path = Path(config_path) if config_path else None
        # What is running of the restart-only sections: the settings at start, whatever reloads said since.
        self.started = app.settings
        self.drains = drains or DrainedMembers(None)
        self.drained = self.drains.load()

    # -- members -------------------------------------------------------------------------------------

    def members(self) -> list[dict[str, Any]]:
        now = self.app.clock()
        return [self._describe(pool, m, now) for pool in self.app.pools.values() for m in pool.members]

    def _describe(self, pool: Pool, m: Any, now: float) -> dict[str, Any]:
        transport = self.app.transports.get((pool.name, m.name))
        return {
            "pool": pool.name,
            "member": m.name,
            "address": m.settings.target,
            "state": member_state(m, now),
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
        }

    # -- shaping -------------------------------------------------------------------------------------

    def shaping(self) -> list[dict[str, Any]]:
        """Every member x destination lane: its limits now and configured, and what last changed them."""
        now = self.app.clock()
        dispatcher = self.app.dispatcher
        lanes = sorted(dispatcher.shaper.lanes.values(), key=lambda x: (x.pool, x.member, x.destination))
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
        pool = self.app.pools.get(pool_name)
        member = next((m for m in pool.members if m.name == member_name), None) if pool else None
        if member is None or member.settings.warmup is None:
            return None
        ledger = self.app.dispatcher.warmup
        today = today_utc(now)
        return {
            "sent_today": ledger.sent_today(pool_name, member_name),
            "cap_today": day_cap(member.settings, "*", today),
            "provider_cap_today": day_cap(member.settings, destination, today)
            if destination in member.settings.warmup.provider
            else None,
        }

    def _named(self, name: str) -> list[tuple[Pool, Any]]:
        found = [(pool, m) for pool in self.app.pools.values() for m in pool.members if m.name == name]
        if not found:
            raise UnknownMember(name)
        return found

    def set_draining(self, name: str, draining: bool) -> list[dict[str, Any]]:
        """Drain (finish work in flight, take nothing new) or enable a member, in every pool that has it.

        A drain outlives a restart: it is kept in a file beside the spool until `enable`.
        """
        found = self._named(name)
        now = self.app.clock()
        self._remember_drain(name, draining)
        for _, m in found:
            if m.draining != draining:
                m.draining = draining
                self.app.member_changed(
                    m, not draining, "enabled by operator" if not draining else "drained by operator"
                )
        self.app.dispatcher.wake()
        return [self._describe(pool, m, now) for pool, m in found]

    # -- held mail -----------------------------------------------------------------------------------

    async def release(self, message_id: str) -> dict[str, Any]:
        """Queue a held message again, due now (the way out of HELD; fuller queue operations come later)."""
        released = await self.app.spool.release(message_id, self.app.clock())
        if not released:
            raise NothingHeld(message_id)
        log.info("held message released", message=message_id, recipients=released)
        self.app.dispatcher.scan_soon()
        return {"id": message_id, "released": released, "changes": [f"{message_id}: {released} released"]}

    def _remember_drain(self, name: str, draining: bool) -> None:
        wanted = self.drained | {name} if draining else self.drained - {name}
        if wanted == self.drained:
            return
        try:
            self.drains.save(wanted)
        except OSError as e:
            log.error("drain not saved: a restart will forget it", member=name, error=str(e))
        self.drained = wanted

    def restore_drains(self) -> None:
        """At start and after a reload: members drained by an operator stay drained until enabled."""
        for pool in self.app.pools.values():
            for m in pool.members:
                if m.name in self.drained and not m.draining:
                    m.draining = True
                    log.info(
                        "member drained by operator before; still drained", pool=pool.name, member=m.name
                    )

    # -- shaping by hand ------------------------------------------------------------------------------

    def suspend(self, name: str, destination: str, duration_s: float) -> list[dict[str, Any]]:
        """Keep a member (in every pool that has it) from one destination for a while, as a reaction would."""
        now = self.app.clock()
        shaper = self.app.dispatcher.shaper
        lanes = []
        for pool, m in self._named(name):
            lane = shaper.lane(pool.name, m.settings, destination, now)
            self._shaping_event(lane, shaper.suspend(lane, duration_s, "by operator", now), now)
            lanes.append(lane)
        self.app.dispatcher.wake()
        return [describe_lane(lane, now) for lane in lanes]

    def resume(self, name: str, destination: str | None = None) -> list[dict[str, Any]]:
        """Lift a member's suspensions now: toward `destination`, or every one. Returns the lanes lifted."""
        now = self.app.clock()
        shaper = self.app.dispatcher.shaper
        pools = {pool.name for pool, _ in self._named(name)}
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
        self.app.dispatcher.wake()
        return [describe_lane(lane, now) for lane in lifted]

    def _shaping_event(self, lane: Lane, change: str, now: float) -> None:
        log.info(
            "shaping changed", pool=lane.pool, member=lane.member, destination=lane.destination, change=change
        )
        self.app.bus.emit(
            Event(
                EventType.SHAPING_CHANGED,
                queue=f"{lane.pool}/{lane.destination}",
                pool=lane.pool,
                member=lane.member,
                tags={"change": change, "by": "operator"},
                timestamp=now,
            )
        )

    # -- reload --------------------------------------------------------------------------------------

    def reload(self) -> ReloadResult:
        """Read the configuration file again; a file with any error changes nothing."""
        if self.config_path is None:
            return ReloadResult(False, problems=[("(file)", "this process was not started from a file")])
        try:
            settings = load_config(self.config_path)
        except ConfigError as e:
            log.error("reload refused", problems=e.problems)
            return ReloadResult(False, problems=e.problems)
        result = ReloadResult(True, needs_restart=self._restart_only(settings))
        # What runs on: the file's live sections, and the restart-only ones as they were at start.
        running = settings.model_copy(update={s: getattr(self.started, s) for s in _RESTART_ONLY})
        result.changes = self.apply(running)
        log.info("configuration reloaded", changes=result.changes, needs_restart=result.needs_restart)
        return result

    def _restart_only(self, new: Settings) -> list[str]:
        """Restart-only keys whose value in the file differs from what is running.

        Compared with the settings the process started with, never with the last file loaded: a key
        edited, reloaded and edited again still needs a restart until the running value and the file agree.
        """
        return [
            f"{section}.{key}"
            for section in _RESTART_ONLY
            for key, value in getattr(new, section)
            if value != getattr(getattr(self.started, section), key)
        ]

    def apply(self, settings: Settings) -> list[str]:
        app, now = self.app, self.app.clock()
        changes: list[str] = []
        for pool_settings in settings.pool:
            pool = app.pools.get(pool_settings.name)
            if pool is None:
                pool = app.pools[pool_settings.name] = Pool(pool_settings, app.member_changed)
                pool.start_sweeping(now)
                changes.append(f"{pool.name}: added")
            else:
                changes.extend(pool.reconfigure(pool_settings, now))
        for name in [n for n in app.pools if n not in {p.name for p in settings.pool}]:
            for m in app.pools[name].members:
                m.removed = True
            del app.pools[name]  # its queued work falls to the default pool (Dispatcher._pool_of)
            changes.append(f"{name}: removed")
        app.resolver.reconfigure(settings.dns, Providers(settings.shaping))
        app.dispatcher.shaper.configure(settings.shaping)
        self.sync_transports(settings)
        router = Router(settings)
        app.router = app.acceptor.router = app.dispatcher.router = router
        app.dispatcher.settings = settings
        app.dispatcher.retry = RetrySchedule(settings.retry)
        app.settings = settings
        self.restore_drains()
        app.sync_checkers()
        app.dispatcher.wake()
        return changes

    def sync_transports(self, settings: Settings) -> None:
        """One transport per pool member; kept while its connections still fit, else replaced."""
        app = self.app
        hostname = settings.ehlo_hostname
        for pool in app.pools.values():
            for m in pool.members:
                key = (pool.name, m.name)
                old = app.transports.get(key)
                if isinstance(old, SmtpTransport) and _same_connections(old, m.settings, settings):
                    old.member = m.settings  # weight and limits live on the member; connections stay
                    continue
                resolver = app.resolver if m.settings.kind == "source" else None
                app.transports[key] = SmtpTransport(m.settings, settings.delivery, hostname, resolver)
                if old is not None:
                    app.retire_transport(old)


def _same_connections(transport: SmtpTransport, member: MemberSettings, settings: Settings) -> bool:
    """Whether the open connections still fit: same place, per-connection limit, timeouts, TLS, login."""
    return (
        transport.member.address == member.address
        and transport.member.source_address == member.source_address
        and transport.member.ehlo_hostname == member.ehlo_hostname
        and transport.member.max_messages_per_connection == member.max_messages_per_connection
        # TLS and credentials are settled when a connection opens: a change needs new connections.
        and transport.member.tls_mode == member.tls_mode
        and transport.member.tls_ca_file == member.tls_ca_file
        and transport.member.tls_server_name == member.tls_server_name
        and transport.member.username == member.username
        and transport.member.password == member.password
        and transport.delivery == settings.delivery
    )


def member_state(m: Any, now: float) -> str:
    if m.removed:
        return "removed"
    if m.draining:
        return "draining"
    if m.ejected(now):
        return "ejected"
    if not m.check_up:
        return "check-failed"
    if m.ramp_started is not None:
        return "ramping"
    return "up"


class DrainedMembers:
    """The members an operator drained, in a small JSON file beside the spool (as warmup.json is).

    Written atomically on each drain and enable: a new file, fsync'd, renamed over the old, so a crash
    leaves the old list or the new one, never half of one.
    """

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None

    def load(self) -> set[str]:
        if self.path is None or not self.path.exists():
            return set()
        try:
            names = json.loads(self.path.read_text())["drained"]
            return {str(n) for n in names}
        except (OSError, ValueError, KeyError, TypeError) as e:
            # Unreadable: start with every member in service, and say so (a drain may need repeating).
            log.error(
                "drained members file unreadable; no member is drained", path=str(self.path), error=str(e)
            )
            return set()

    def save(self, names: set[str]) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w") as f:
            json.dump({"drained": sorted(names)}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
