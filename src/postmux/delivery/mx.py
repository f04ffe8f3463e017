"""Where a domain's mail goes: MX lookup (RFC 5321 5.1) with dnspython's async resolver, cached by TTL.

- MX records, best (lowest) preference first, equal preferences in random order (RFC 5321 5.1);
- no MX record: the domain's own address records are its implicit MX (RFC 5321 5.1);
- a null MX, "0 .", means the domain takes no mail: bounce at once (RFC 7505 3);
- an MX host that is this node itself is dropped with every MX of equal or worse preference; none left,
  the mail loops back to myself: bounce at once (RFC 5321 5.1, postmux.delivery.myself);
- a domain that does not exist bounces; a lookup that fails (timeout, SERVFAIL) defers;
- an address literal, [192.0.2.1] or [IPv6:2001:db8::1], is the host itself: no lookup (RFC 5321 5.1);
- [dns] overrides answer for listed domains without asking DNS (tests, private networks).
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Protocol

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver
import structlog

from postmux.address import literal_address
from postmux.config import DnsSettings, split_hostport
from postmux.delivery.myself import Myself
from postmux.reply import Reply

log = structlog.get_logger("postmux.delivery")

Clock = Callable[[], float]

# How long an answer made of a failed lookup is kept: a short memory, so a sick resolver is not hammered
# and a glitch is forgotten by the next delivery.
_BRIEF = 5.0


class Destinations(Protocol):
    """Names the shaping key of a domain's mail from its MX hosts (postmux.scheduling.providers.Providers).

    Injected, so delivery does not reach back into scheduling: the resolver only says which hosts answer
    for a domain, and whoever shapes the traffic says what that makes the destination. Pure, no I/O.
    """

    def destination(self, domain: str, mx_hosts: Iterable[str] = ()) -> str:
        """The shaping key for mail to `domain`: its provider, else the domain itself."""
        ...


@dataclass(frozen=True, slots=True)
class MxHost:
    name: str
    preference: int
    addresses: tuple[tuple[str, int], ...]  # (ip, port)


@dataclass(frozen=True, slots=True)
class MxPlan:
    """The answer for one domain: hosts to try in order, or the reply every recipient gets instead."""

    domain: str
    destination: str  # the shaping key: provider, else the domain
    hosts: tuple[MxHost, ...] = ()
    error: Reply | None = None
    expires: float = 0.0


@dataclass(frozen=True, slots=True)
class _Found:
    """What the address lookups (A, AAAA) of one host gave."""

    addresses: tuple[str, ...]
    ttl: float  # the least TTL of the answers, CNAME chains included; inf when there were none
    failed: bool  # a lookup failed (timeout, SERVFAIL) rather than found nothing (NXDOMAIN, NODATA)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def nameserver(spec: str) -> dns.nameserver.Nameserver:
    """A [dns] nameservers entry, "ip" or "ip:port" ("[v6]:port"), as dnspython's nameserver."""
    if spec.count(":") == 1 or spec.startswith("["):
        host, port = split_hostport(spec)
        return dns.nameserver.Do53Nameserver(host, port)
    return dns.nameserver.Do53Nameserver(spec, 53)


def dns_resolver(settings: DnsSettings) -> dns.asyncresolver.Resolver:
    """The resolver [dns] configures: its nameservers, else the system's (/etc/resolv.conf); no cache of
    dnspython's (whoever asks keeps answers by its own TTL bounds, or not at all)."""
    if settings.nameservers:
        r = dns.asyncresolver.Resolver(configure=False)
        r.nameservers = [nameserver(ns) for ns in settings.nameservers]
    else:
        r = dns.asyncresolver.Resolver()
    r.lifetime = settings.timeout
    r.cache = None
    return r


class MxResolver:
    def __init__(self, settings: DnsSettings, providers: Destinations, clock: Clock = time.time) -> None:
        self.settings = settings
        self.providers = providers
        self.clock = clock
        self._cache: dict[str, MxPlan] = {}
        self._pending: dict[str, asyncio.Future[MxPlan]] = {}
        self._resolver: dns.asyncresolver.Resolver | None = None
        # How mail would reach this node itself (RFC 5321 5.1's loop check); None: not known, no check.
        self.myself: Myself | None = None

    def know_myself(self, myself: Myself) -> None:
        """Where this node listens and what it is called (at start, once the port is bound, and at each
        reload): plans made without it may name the node itself, so they are forgotten."""
        if myself != self.myself:
            self.myself = myself
            self._cache.clear()

    def reconfigure(self, settings: DnsSettings, providers: Destinations) -> None:
        """New settings (a reload): what was learnt under the old ones is forgotten."""
        if settings != self.settings:
            self._resolver = None
        self.settings, self.providers = settings, providers
        self._cache.clear()

    def _dns(self) -> dns.asyncresolver.Resolver:
        # Built on first use: a node with only relay members never reads /etc/resolv.conf.
        if self._resolver is None:
            self._resolver = dns_resolver(self.settings)  # postmux keeps its own cache, by its TTL bounds
        return self._resolver

    def prune(self) -> None:
        """Forget expired answers, so the cache holds the domains mail goes to now, not every one ever."""
        now = self.clock()
        for domain in [d for d, plan in self._cache.items() if plan.expires <= now]:
            del self._cache[domain]

    def cached(self, domain: str) -> MxPlan | None:
        plan = self._cache.get(domain.lower().rstrip("."))
        return plan if plan is not None and plan.expires > self.clock() else None

    async def resolve(self, domain: str) -> MxPlan:
        """The plan for `domain`, from the cache when fresh; concurrent callers share one lookup."""
        domain = domain.lower().rstrip(".")
        plan = self.cached(domain)
        if plan is not None:
            return plan
        pending = self._pending.get(domain)
        if pending is None:
            pending = asyncio.ensure_future(self._lookup(domain))
            self._pending[domain] = pending
            pending.add_done_callback(lambda _: self._pending.pop(domain, None))
        return await asyncio.shield(pending)

    async def _lookup(self, domain: str) -> MxPlan:
        override = self.settings.overrides.get(domain)
        literal = literal_address(domain)
        if override is not None:
            plan = await self._from_override(domain, override)
        elif literal is not None:
            host = MxHost(domain, 0, ((str(literal), self.settings.mx_port),))
            plan = self._plan(domain, [host], self.settings.max_ttl, [])
        else:
            plan = await self._from_dns(domain)
        plan = self._without_myself(plan)
        self._cache[domain] = plan
        return plan

    def _without_myself(self, plan: MxPlan) -> MxPlan:
        """RFC 5321 5.1: an MX host that is this node, and every MX of equal or worse preference, are
        dropped; when none is left the mail loops back to myself, a permanent failure (RFC 3463 X.4.6),
        rather than a message sent round through the node until its hop count bounces it."""
        me = self.myself
        if me is None or plan.error is not None:
            return plan
        mine = [h for h in plan.hosts if any(me.listens_at(ip, port) for ip, port in h.addresses)]
        if not mine:
            return plan
        worst = min(h.preference for h in mine)
        hosts = tuple(h for h in plan.hosts if h.preference < worst)
        log.info(
            "MX host is this node", domain=plan.domain, mx_host=mine[0].name, kept=[h.name for h in hosts]
        )
        if hosts:
            return replace(plan, hosts=hosts)
        reply = Reply(554, "5.4.6", f"mail for {plan.domain} loops back to myself")
        return replace(plan, hosts=(), error=reply)

    def _ttl(self, ttl: float) -> float:
        return self.clock() + min(self.settings.max_ttl, max(self.settings.min_ttl, ttl))

    async def _from_override(self, domain: str, hosts: tuple[str, ...]) -> MxPlan:
        mx: list[MxHost] = []
        found: list[_Found] = []
        for i, spec in enumerate(hosts):
            host, port = split_hostport(spec)
            if _is_ip(host):
                mx.append(MxHost(host, i * 10, ((host, port),)))
                continue
            found.append(await self._lookup_addresses(host))
            mx.append(MxHost(host, i * 10, tuple((a, port) for a in found[-1].addresses)))
        dest = self.providers.destination(domain, (h.name for h in mx if not _is_ip(h.name)))
        # The listed names' addresses still come from DNS: they are kept no longer than their TTLs.
        return MxPlan(domain, dest, tuple(mx), expires=self._expires(self.settings.max_ttl, found))

    async def _from_dns(self, domain: str) -> MxPlan:
        try:
            answer = await self._dns().resolve(domain, "MX", search=False)
        except dns.resolver.NXDOMAIN:
            reply = Reply(550, "5.1.2", f"domain {domain} does not exist")
            return self._failed(domain, reply, self.settings.negative_ttl)
        except dns.resolver.NoAnswer:
            return await self._implicit_mx(domain)
        except (dns.exception.DNSException, OSError) as e:
            reply = Reply(451, "4.4.3", f"MX lookup for {domain} failed: {type(e).__name__}")
            return self._failed(domain, reply, _BRIEF)  # a short memory: do not hammer a sick resolver
        records = sorted(
            ((r.preference, random.random(), r.exchange.to_text(omit_final_dot=True)) for r in answer),
        )
        if any(name in ("", ".") for _, _, name in records):
            # RFC 7505 3: a null MX says the domain accepts no mail; bounce without trying.
            reply = Reply(556, "5.1.10", f"domain {domain} accepts no mail (null MX)")
            return self._failed(domain, reply, answer.rrset.ttl if answer.rrset else 0)
        found = await asyncio.gather(*(self._lookup_addresses(name) for _, _, name in records))
        hosts = [
            MxHost(name, pref, self._at_mx_port(f)) for (pref, _, name), f in zip(records, found, strict=True)
        ]
        return self._plan(domain, hosts, answer.chaining_result.minimum_ttl, found)

    async def _implicit_mx(self, domain: str) -> MxPlan:
        found = await self._lookup_addresses(domain)
        if not found.addresses:
            if found.failed:  # a lookup that failed says nothing about the domain: try again later
                reply = Reply(451, "4.4.3", f"address lookup for {domain} failed")
                return self._failed(domain, reply, _BRIEF)
            reply = Reply(550, "5.1.2", f"domain {domain} has no MX and no address records")
            return self._failed(domain, reply, self.settings.negative_ttl)
        # The implicit MX is the domain's own address records: the plan lives as long as they do.
        return self._plan(domain, [MxHost(domain, 0, self._at_mx_port(found))], found.ttl, [found])

    def _plan(self, domain: str, hosts: list[MxHost], ttl: float, found: list[_Found]) -> MxPlan:
        """The plan of the hosts that have addresses, kept for the least of `ttl` and the addresses' TTLs."""
        hosts = [h for h in hosts if h.addresses]
        if not hosts:
            reply = Reply(451, "4.4.4", f"no address for any MX host of {domain}")
            return self._failed(domain, reply, _BRIEF)
        dest = self.providers.destination(domain, (h.name for h in hosts))
        return MxPlan(domain, dest, tuple(hosts), expires=self._expires(ttl, found))

    def _expires(self, ttl: float, found: list[_Found]) -> float:
        """When a plan made of an MX answer with `ttl` and the address answers `found` expires.

        A resolver keeps each record for its own TTL (RFC 2181 5.2): the plan, which holds them all, goes
        stale with the first of them. A host whose address lookup failed (SERVFAIL, timeout) is missing
        from it for no reason of its own: the plan is then kept only briefly, so the next delivery asks
        again rather than sending to a backup MX for the whole TTL (RFC 5321 5.1's order).
        """
        expires = self._ttl(min([ttl, *(f.ttl for f in found)]))
        if any(f.failed for f in found):
            return min(expires, self.clock() + _BRIEF)
        return expires

    def _failed(self, domain: str, reply: Reply, ttl: float) -> MxPlan:
        expires = self.clock() + max(0.0, min(self.settings.max_ttl, ttl))
        return MxPlan(domain, self.providers.destination(domain), error=reply, expires=expires)

    def _at_mx_port(self, found: _Found) -> tuple[tuple[str, int], ...]:
        return tuple((a, self.settings.mx_port) for a in found.addresses)

    async def _lookup_addresses(self, name: str) -> _Found:
        """A and AAAA records of an MX host, their least TTL, and whether a lookup failed.

        A host none of whose lookups found an address is left out of the plan (the next MX is tried).
        """
        out: list[str] = []
        ttl = math.inf  # no answer, no bound: the MX answer's TTL (or max_ttl) rules
        failed = False
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self._dns().resolve(name, rdtype, search=False)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue
            except (dns.exception.DNSException, OSError):
                failed = True
                continue
            out.extend(r.to_text() for r in answer)
            ttl = min(ttl, answer.chaining_result.minimum_ttl)  # the CNAME chain's TTLs count too
        return _Found(tuple(out), ttl, failed)
