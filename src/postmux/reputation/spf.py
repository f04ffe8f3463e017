"""SPF verdicts per sender domain (RFC 7208), evaluated with pyspf through postmux's configured resolver.

Doing only: this module asks DNS and returns a value, `SpfVerdict` (the SPF result for each sending IP of
the farm); postmux.scheduling.gate judges from it which members may not carry the domain's mail.

Why pyspf: it is the RFC 7208 reference implementation (it passes the RFC's test suite and is what
pypolicyd-spf, Debian's Postfix policy server, runs), it does include, redirect, macros, exists, ptr and
the lookup limits (RFC 7208 4.6.4: 10 DNS mechanisms, 2 void lookups), and its DNS goes through one
module-level function that we can route to our resolver. checkdmarc, the other candidate, checks a
record's syntax and lookup count for the doctor but does not evaluate check_host() for an IP.

pyspf is synchronous and keeps no TTLs, so an evaluation runs in a worker thread with its lookups routed
(through a context variable, so nothing else using pyspf is affected) to a dnspython resolver built from
[dns] nameservers and timeout; the smallest TTL of the answers it saw bounds how long the verdict is kept,
within [dns] min_ttl and max_ttl. A cache keeps one verdict per sender domain; an expired verdict is still
returned while the next one is evaluated (the dispatcher never waits on DNS once a domain was seen).
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

import dns.exception
import dns.resolver
import spf  # type: ignore[import-untyped]
import structlog

from postmux.config import DnsSettings, SpfSettings
from postmux.delivery.mx import nameserver

log = structlog.get_logger("postmux.spf")

Clock = Callable[[], float]

# RFC 7208 2.6: the results check_host() may give.
ERRORS = frozenset({"temperror", "permerror"})


@dataclass(frozen=True, slots=True)
class SpfVerdict:
    """The SPF result (RFC 7208 2.6) of each sending IP for one sender domain, and until when it holds."""

    domain: str
    results: dict[str, str]  # ip -> pass | fail | softfail | neutral | none | temperror | permerror
    expires: float
    explanation: dict[str, str] = field(default_factory=dict)  # ip -> pyspf's words, for the operator

    def covers(self, ips: Iterable[str]) -> bool:
        return all(ip in self.results for ip in ips)


class _Lookups:
    """The DNS of one evaluation: pyspf's lookups answered by our resolver, with the smallest TTL seen."""

    def __init__(self, resolver: dns.resolver.Resolver) -> None:
        self.resolver = resolver
        self.min_ttl: float | None = None
        # Answers shared by the evaluations of the farm's IPs: the record is asked for once, not per IP.
        self._answers: dict[tuple[str, str], list[tuple[tuple[str, str], Any]]] = {}

    def lookup(self, name: str, qtype: str, timeout: float) -> list[tuple[tuple[str, str], Any]]:
        """As pyspf's DNSLookup_dnspython: ((name, type), value) pairs; TempError when DNS fails."""
        key = (name.lower(), qtype)
        if key not in self._answers:
            self._answers[key] = self._ask(name, qtype, timeout)
        return self._answers[key]

    def _ask(self, name: str, qtype: str, timeout: float) -> list[tuple[tuple[str, str], Any]]:
        try:
            # pyspf passes what is left of the evaluation's time; each lookup also stops at [dns] timeout.
            lifetime = min(timeout, self.resolver.lifetime)
            answer = self.resolver.resolve(name, qtype, search=False, lifetime=lifetime)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []  # a void lookup (RFC 7208 4.6.4), counted by pyspf
        except (dns.exception.DNSException, OSError) as e:
            raise spf.TempError(f"DNS {type(e).__name__} for {name} {qtype}") from None
        if answer.rrset is not None:
            ttl = float(answer.rrset.ttl)
            self.min_ttl = ttl if self.min_ttl is None else min(self.min_ttl, ttl)
        out: list[tuple[tuple[str, str], Any]] = []
        for rdata in answer:
            if qtype in ("A", "AAAA"):
                out.append(((name, qtype), rdata.address))
            elif qtype == "MX":
                out.append(((name, qtype), (rdata.preference, rdata.exchange)))
            elif qtype == "PTR":
                out.append(((name, qtype), rdata.target.to_text(True)))
            elif qtype in ("TXT", "SPF"):
                out.append(((name, qtype), rdata.strings))
        return out


_LOOKUPS: contextvars.ContextVar[_Lookups | None] = contextvars.ContextVar("postmux_spf_dns", default=None)
_PYSPF_LOOKUP = spf.DNSLookup


def _routed_lookup(name: str, qtype: str, strict: object = True, timeout: float = 30) -> Any:
    lookups = _LOOKUPS.get()
    if lookups is None:  # someone else's use of pyspf in this process: pyspf's own resolver
        return _PYSPF_LOOKUP(name, qtype, strict, timeout)
    return lookups.lookup(name, qtype, timeout)


spf.DNSLookup = _routed_lookup


def check_host(
    ip: str, domain: str, lookups: _Lookups, settings: SpfSettings, dns_timeout: float
) -> tuple[str, str]:
    """RFC 7208 4: the result and pyspf's explanation for mail from `domain` sent by `ip` (blocking I/O)."""
    _LOOKUPS.set(lookups)  # in the worker thread's own copy of the context
    query = spf.query(
        i=ip, s=f"postmaster@{domain}", h=domain, timeout=dns_timeout, querytime=settings.timeout
    )
    result, _code, explanation = query.check()
    return str(result), str(explanation)


class SpfEvaluator:
    """One verdict per sender domain, kept by TTL; concurrent refreshes of one domain share one evaluation."""

    def __init__(self, settings: SpfSettings, dns_settings: DnsSettings, clock: Clock = time.time) -> None:
        self.settings = settings
        self.dns_settings = dns_settings
        self.clock = clock
        self._cache: dict[str, SpfVerdict] = {}
        self._pending: dict[str, asyncio.Task[SpfVerdict]] = {}
        self._resolver: dns.resolver.Resolver | None = None

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    def reconfigure(self, settings: SpfSettings, dns_settings: DnsSettings) -> None:
        """A reload: verdicts made under other rules, resolvers or members are forgotten."""
        if dns_settings != self.dns_settings:
            self._resolver = None
        self.settings, self.dns_settings = settings, dns_settings
        self._cache.clear()

    def cached(self, domain: str) -> SpfVerdict | None:
        """The last verdict for `domain`, expired or not (the caller refreshes an expired one)."""
        return self._cache.get(domain)

    def prune(self, keep_s: float = 3600.0) -> None:
        """Forget verdicts expired for a while, so the cache holds the domains mail comes from now."""
        now = self.clock()
        for d in [d for d, v in self._cache.items() if v.expires + keep_s <= now]:
            del self._cache[d]

    @property
    def pending(self) -> list[asyncio.Task[SpfVerdict]]:
        return list(self._pending.values())

    def evaluating(self, domain: str) -> bool:
        return domain in self._pending

    def refresh(self, domain: str, ips: Collection[str]) -> asyncio.Task[SpfVerdict] | None:
        """Start evaluating `domain` for `ips`; None when an evaluation of it is under way already."""
        if domain in self._pending:
            return None
        task = asyncio.create_task(self.evaluate(domain, ips), name=f"spf {domain}")
        self._pending[domain] = task
        task.add_done_callback(lambda _: self._pending.pop(domain, None))
        return task

    async def evaluate(self, domain: str, ips: Collection[str]) -> SpfVerdict:
        """Evaluate the SPF record of `domain` for each of `ips` and keep the verdict.

        Never raises but for cancellation: whatever goes wrong is a temperror, judged per [spf] on_error.
        """
        lookups = _Lookups(self._dns())
        timeout = self.dns_settings.timeout

        def run() -> tuple[dict[str, str], dict[str, str]]:
            results: dict[str, str] = {}
            words: dict[str, str] = {}
            for ip in sorted(set(ips)):
                try:
                    results[ip], words[ip] = check_host(ip, domain, lookups, self.settings, timeout)
                except Exception as e:  # pyspf's own bug on an odd record: say so, judge as an error
                    results[ip], words[ip] = "temperror", f"evaluation crashed: {type(e).__name__}"
            return results, words

        try:
            results, words = await asyncio.to_thread(run)
        except Exception as e:  # no thread to run in (shutting down): an error for a short while
            results = dict.fromkeys(ips, "temperror")
            words = dict.fromkeys(ips, f"evaluation failed: {type(e).__name__}")
        verdict = SpfVerdict(domain, results, self._expires(results, lookups.min_ttl), words)
        self._cache[domain] = verdict
        log.info("spf evaluated", domain=domain, results=results)
        return verdict

    def _expires(self, results: dict[str, str], min_ttl: float | None) -> float:
        if any(r == "temperror" for r in results.values()):
            return self.clock() + self.settings.error_ttl
        d = self.dns_settings
        ttl = d.min_ttl if min_ttl is None else min(d.max_ttl, max(d.min_ttl, min_ttl))
        return self.clock() + ttl

    def _dns(self) -> dns.resolver.Resolver:
        if self._resolver is None:
            if self.dns_settings.nameservers:
                r = dns.resolver.Resolver(configure=False)
                r.nameservers = [nameserver(ns) for ns in self.dns_settings.nameservers]
            else:
                r = dns.resolver.Resolver()
            r.lifetime = self.dns_settings.timeout
            r.cache = None  # the verdict is what is cached, by the answers' smallest TTL
            self._resolver = r
        return self._resolver
