"""Blocklist watch: every member's sending IPs, and the sending domains, asked of DNS blocklists.

A DNSxL (RFC 5782) lists an IPv4 address as `4.3.2.1.zone` (IPv6 by nibbles, 2.4), a domain as
`example.com.zone` (2.2); an A record in 127.0.0.0/8 means listed, a TXT record says why. Each round, every
interval, asks each zone about each subject through the configured resolver ([dns]); a member whose IP is
listed anywhere takes no new work (Pool.record_listing: MemberDown, then MemberUp once delisted), and
every change of a listing is a BlocklistChanged event. Receivers that use the same lists would refuse or
junk that IP's mail, and each refusal hurts the IP's standing with the others too.

What an answer means is decided apart from asking (`judge`, `Round`): a lookup that fails keeps what was
known; a zone that lists RFC 5782's never-listed test entry (127.0.0.1, the name "invalid") lists
everything - a dead list whose domain answers every name - and is not believed for that round.

Receivers also say it in their replies ("blocked using zen.spamhaus.org"): `reply_reactions` makes the
shaping rule that suspends that member x destination at once, before the next round would notice.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import dns.asyncresolver
import dns.exception
import dns.resolver
import structlog
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from postmux.balancing.pool import Pool
from postmux.config import BlocklistSettings, BlocklistZone, DnsSettings, ReactionRule, Settings
from postmux.delivery.mx import dns_resolver
from postmux.events.types import Event, EventType

log = structlog.get_logger("postmux.blocklists")

# RFC 5782 5: an IPv4 list MUST NOT list 127.0.0.1, a domain list MUST NOT list "invalid".
NEVER_LISTED_IP = "127.0.0.1"
NEVER_LISTED_DOMAIN = "invalid"
# Lookups in flight at once in a round: a farm of a hundred IPs and five lists is 500 questions.
_CONCURRENCY = 20

# Names of the lists receivers most often cite, and the words they use: a reply naming one is about the
# sending IP's standing, not about the message or the recipient.
_WELL_KNOWN = (
    r"spamhaus",
    r"spamcop",
    r"barracuda",
    r"sorbs",
    r"uceprotect",
    r"psbl",
    r"abuseat",
    r"mailspike",
    r"block ?list(ed)?",
    r"black ?list(ed)?",
    r"dnsbl",
    r"rbl\b",
    r"blocked using",
    r"banned sending ip",  # Microsoft's own list (5.7.606)
)


def reply_reactions(settings: BlocklistSettings) -> tuple[ReactionRule, ...]:
    """The shaping rule that suspends a member x destination whose receiver names a blocklist (the
    configured zones, and the lists receivers cite most); none when `reply_suspend` is 0."""
    if settings.reply_suspend <= 0:
        return ()
    zones = [re.escape(z.zone) + r"\b" for z in (*settings.zones, *settings.domain_zones)]
    # Open at the end: "barracudacentral.org", "spamhaus.org", "blocklisted" are the same names.
    text = r"\b(" + "|".join((*_WELL_KNOWN, *zones)) + ")"
    return (ReactionRule(text=text, action="suspend", duration=settings.reply_suspend),)


def query_name(subject: str, zone: str) -> str:
    """The name to ask `zone` about an IP address (reversed octets or nibbles) or a domain."""
    try:
        address = ipaddress.ip_address(subject)
    except ValueError:
        return f"{subject.rstrip('.').lower()}.{zone}"
    pointer = address.reverse_pointer  # 4.3.2.1.in-addr.arpa, or the nibbles under ip6.arpa
    return pointer.rsplit(".", 2)[0] + "." + zone


@dataclass(frozen=True, slots=True)
class Finding:
    """What one zone said about one subject at the last look that got an answer."""

    subject: str  # an IP address or a domain
    zone: str
    answers: tuple[str, ...]  # the A answers that mean listed; () for not listed
    text: str = ""  # the list's TXT record: usually a URL saying why and how to be removed
    checked_at: float = 0.0

    @property
    def listed(self) -> bool:
        return bool(self.answers)

    def __str__(self) -> str:
        why = f" ({self.text})" if self.text else ""
        return f"{self.subject} on {self.zone}: {', '.join(self.answers)}{why}"


def judge(zone: BlocklistZone, answers: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The answers that mean listed, and those that are errors (Spamhaus's 127.255.255.x, non-loopback)."""
    listed, errors = [], []
    for a in answers:
        meaning = zone.means_listed(a)
        if meaning is None:
            errors.append(a)
        elif meaning:
            listed.append(a)
    return tuple(listed), tuple(errors)


class Lookups(Protocol):
    """The doing: A and TXT answers for a name; [] when the name does not exist, None when DNS failed."""

    async def a(self, name: str) -> list[str] | None: ...

    async def txt(self, name: str) -> str: ...


class DnsLookups:
    """Lookups through dnspython's async resolver, built from [dns] (never the system's when nameservers
    are given), uncached: each round asks afresh, as often as `interval` says."""

    def __init__(self, settings: DnsSettings) -> None:
        self.resolver: dns.asyncresolver.Resolver = dns_resolver(settings)

    async def a(self, name: str) -> list[str] | None:
        try:
            answer = await self.resolver.resolve(name, "A", search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.exception.DNSException as e:
            log.warning("blocklist lookup failed", name=name, error=str(e) or type(e).__name__)
            return None
        return [r.address for r in answer]

    async def txt(self, name: str) -> str:
        try:
            answer = await self.resolver.resolve(name, "TXT", search=False)
        except dns.exception.DNSException:
            return ""
        return " ".join(b"".join(r.strings).decode(errors="replace") for r in answer)[:300]


@dataclass(slots=True)
class Round:
    """One look at every zone: what was found, which zones were not believed, which lookups failed."""

    findings: dict[tuple[str, str], Finding] = field(default_factory=dict)
    broken_zones: dict[str, str] = field(default_factory=dict)  # zone -> why it was not believed
    failed: set[tuple[str, str]] = field(default_factory=set)  # (subject, zone) that got no answer


async def look(
    lookups: Lookups,
    zones: Sequence[BlocklistZone],
    subjects: Iterable[str],
    sentinel: str,
    now: float,
) -> Round:
    """Ask each zone about each subject (and about its never-listed `sentinel` first)."""
    result = Round()
    subjects = sorted(set(subjects))
    if not subjects:
        return result
    limit = asyncio.Semaphore(_CONCURRENCY)

    async def one(zone: BlocklistZone, subject: str) -> None:
        name = query_name(subject, zone.zone)
        async with limit:
            answers = await lookups.a(name)
        if answers is None:
            result.failed.add((subject, zone.zone))
            return
        listed, errors = judge(zone, answers)
        if errors and not listed:
            log.warning("blocklist answered with an error code", zone=zone.zone, name=name, answers=errors)
            result.failed.add((subject, zone.zone))
            return
        text = await lookups.txt(name) if listed else ""
        result.findings[(subject, zone.zone)] = Finding(subject, zone.zone, listed, text, now)

    async def sane(zone: BlocklistZone) -> bool:
        answers = await lookups.a(query_name(sentinel, zone.zone))
        if answers and judge(zone, answers)[0]:
            result.broken_zones[zone.zone] = f"lists {sentinel}, which RFC 5782 says it never may"
            return False
        return True

    believed = [z for z, ok in zip(zones, await asyncio.gather(*(sane(z) for z in zones)), strict=True) if ok]
    await asyncio.gather(*(one(z, s) for z in believed for s in subjects))
    return result


class BlocklistWatch:
    """Runs the rounds, keeps what they found, and tells the pools and the event bus of changes."""

    def __init__(
        self,
        pools: Mapping[str, Pool],
        emit: Callable[[Event], None],
        clock: Callable[[], float] = time.time,
        lookups: Callable[[DnsSettings], Lookups] = DnsLookups,
    ) -> None:
        self.pools = pools
        self.emit = emit
        self.clock = clock
        self._make_lookups = lookups
        self.settings = BlocklistSettings()
        self._dns: DnsSettings | None = None
        self._lookups: Lookups | None = None
        self.domains: tuple[str, ...] = ()
        self.findings: dict[tuple[str, str], Finding] = {}
        self.broken_zones: dict[str, str] = {}
        self.last_round: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def reconfigure(self, settings: Settings) -> None:
        """Take [blocklists], [dns] and the [[dkim]] domains (checked against domain zones); the next round
        comes at once, and forgets what zones no longer configured said."""
        self.settings = settings.blocklists
        if settings.dns != self._dns:
            self._dns, self._lookups = settings.dns, None
        dkim = tuple(d.domain for d in settings.dkim)
        self.domains = tuple(dict.fromkeys((*settings.blocklists.domains, *dkim)))
        zones = {z.zone for z in (*self.settings.zones, *self.settings.domain_zones)}
        self.findings = {k: f for k, f in self.findings.items() if f.zone in zones}
        self._wake.set()

    def _ips(self) -> set[str]:
        return {ip for pool in self.pools.values() for m in pool.members for ip in m.settings.spf_ips}

    # -- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="blocklist-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _loop(self) -> None:
        while True:
            self._wake.clear()
            if self.settings.enabled:
                try:
                    await self.check()
                except Exception:  # a bug here must not end the watch: the next round tries again
                    log.exception("blocklist round failed")
            else:
                self.apply({})  # turned off: nobody stays out on an old listing
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.settings.interval)

    # -- one round -----------------------------------------------------------------------------------

    async def check(self) -> None:
        """One round: every IP against every IP zone, every domain against every domain zone."""
        if self._lookups is None:
            self._lookups = self._make_lookups(self._dns or DnsSettings())
        now = self.clock()
        s = self.settings
        ips = await look(self._lookups, s.zones, self._ips(), NEVER_LISTED_IP, now)
        names = await look(self._lookups, s.domain_zones, self.domains, NEVER_LISTED_DOMAIN, now)
        found: dict[tuple[str, str], Finding] = {}
        for part in (ips, names):
            # A lookup that failed keeps what was known; a zone not believed says nothing this round.
            found.update({k: f for k, f in self.findings.items() if k in part.failed})
            found.update(part.findings)
        broken = {**ips.broken_zones, **names.broken_zones}
        for zone, why in broken.items():
            if zone not in self.broken_zones:
                log.error("blocklist zone not believed", zone=zone, reason=why)
        self.broken_zones = broken
        self.last_round = now
        self.apply(found)

    def apply(self, found: dict[tuple[str, str], Finding]) -> None:
        """Take a round's findings: events for what changed, members in or out of rotation."""
        now = self.clock()
        before = {k for k, f in self.findings.items() if f.listed}
        after = {k for k, f in found.items() if f.listed}
        for key in sorted(after - before):
            self._announce(found[key], now)
        for key in sorted(before - after):
            self._announce(Finding(key[0], key[1], (), "", now), now)
        self.findings = found
        listed_ips: dict[str, list[str]] = {}
        for f in found.values():
            if f.listed:
                listed_ips.setdefault(f.subject, []).append(str(f))
        for pool in self.pools.values():
            for m in pool.members:
                listings = tuple(w for ip in m.settings.spf_ips for w in listed_ips.get(ip, ()))
                pool.record_listing(m, listings, now)

    def _announce(self, f: Finding, now: float) -> None:
        words = "listed" if f.listed else "delisted"
        (log.warning if f.listed else log.info)(words, subject=f.subject, zone=f.zone, answers=f.answers)
        tags = {"subject": f.subject, "zone": f.zone, "listed": "true" if f.listed else "false"}
        if f.answers:
            tags["answers"] = ",".join(f.answers)
        if f.text:
            tags["reason"] = f.text
        self.emit(Event(EventType.BLOCKLIST_CHANGED, timestamp=now, tags=tags))

    # -- what the operator sees ----------------------------------------------------------------------

    def gauges(self) -> Iterable[Metric]:
        """postmux_blocklist_listed{zone, subject}: 1 listed, 0 not, for every pair the last rounds answered
        (the subjects are the configured members' IPs and domains: a bounded set)."""
        listed = GaugeMetricFamily(
            "postmux_blocklist_listed",
            "1 when the zone lists the subject (a sending IP or domain) at the last look, else 0",
            labels=["zone", "subject"],
        )
        for (subject, zone), f in sorted(self.findings.items()):
            listed.add_metric([zone, subject], 1 if f.listed else 0)
        return [listed]

    def status(self) -> dict[str, object]:
        now = self.clock()
        return {
            "enabled": self.settings.enabled,
            "interval_s": self.settings.interval,
            "last_round": self.last_round,
            "zones": [z.zone for z in self.settings.zones],
            "domain_zones": [z.zone for z in self.settings.domain_zones],
            "not_believed": dict(self.broken_zones),
            "checked": [
                {
                    "subject": f.subject,
                    "zone": f.zone,
                    "listed": f.listed,
                    "answers": list(f.answers),
                    "text": f.text,
                    "checked_at": f.checked_at,
                    "age_s": round(now - f.checked_at, 1),
                }
                for _, f in sorted(self.findings.items())
            ],
        }
