"""The DNS doctor's lookups: postmux.reputation.doctor says what to ask and judges; this module asks.

Every lookup goes through postmux's configured resolver ([dns] nameservers and timeout; the system's
resolver only when none is configured, as for MX), never through another path. The lookups of a round are
made concurrently, each bounded by [dns] timeout, and the rounds (an include's record, then what it names)
by DOCTOR_TIME_S in all: a lookup that times out or fails is an answer saying so, which the checks turn
into a finding, never an exception. Whether each pool IP passes SPF is asked of pyspf through the same
resolver (postmux.reputation.spf), at the same time as the rounds.
"""

from __future__ import annotations

import asyncio
import time

import dns.asyncresolver
import dns.exception
import dns.resolver

from postmux.config import Settings
from postmux.delivery.mx import dns_resolver
from postmux.reputation.doctor import (
    NOT_ASKED,
    Answer,
    DoctorInputs,
    Lookup,
    Report,
    SpfResults,
    diagnose,
    doctor_inputs,
    wanted,
)
from postmux.reputation.spf import SpfEvaluator

# The rounds a domain's records lead to are few (SPF includes nest at most 10 deep before the record is
# a permerror); the bound keeps a slow resolver from holding an operator's command for minutes.
MAX_ROUNDS = 14
DOCTOR_TIME_S = 30.0


class DnsDoctor:
    """Examines sending domains with the node's settings. Cost: a few dozen DNS queries per domain."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._resolver = dns_resolver(settings.dns)

    async def examine(self, domain: str) -> Report:
        """Every check of `domain` (in A-labels, see postmux.reputation.doctor.doctor_domain)."""
        inputs = doctor_inputs(self.settings, domain)
        ips = sorted({ip for s in inputs.senders for ip in s.ips})
        answers, spf = await asyncio.gather(self._answers(inputs), self._spf(domain, ips))
        return diagnose(inputs, answers, spf)

    async def _answers(self, inputs: DoctorInputs) -> dict[Lookup, Answer]:
        answers: dict[Lookup, Answer] = {}
        deadline = time.monotonic() + DOCTOR_TIME_S
        for _ in range(MAX_ROUNDS):
            todo = sorted(wanted(inputs, answers) - answers.keys())
            left = deadline - time.monotonic()
            if not todo or left <= 0:
                break
            timeout = min(self.settings.dns.timeout, left)
            got = await asyncio.gather(*(self.ask(name, rdtype, timeout) for name, rdtype in todo))
            answers.update(zip(todo, got, strict=True))
        for lookup in wanted(inputs, answers) - answers.keys():
            answers[lookup] = NOT_ASKED
        return answers

    async def ask(self, name: str, rdtype: str, timeout: float) -> Answer:
        """One lookup as an Answer: its records in text, or what went wrong."""
        try:
            async with asyncio.timeout(timeout + 0.5):  # dnspython's lifetime, and a guard on it
                answer = await self._resolver.resolve(name, rdtype, search=False, lifetime=timeout)
        except dns.resolver.NXDOMAIN:
            return Answer(error="nxdomain")
        except dns.resolver.NoAnswer:
            return Answer()
        except (dns.exception.Timeout, TimeoutError):
            return Answer(error=f"no answer within {timeout:g} s")
        except dns.resolver.NoNameservers:
            return Answer(error="SERVFAIL")
        except (dns.exception.DNSException, OSError) as e:
            return Answer(error=type(e).__name__)
        return Answer(tuple(_text(rdtype, r) for r in answer))

    async def _spf(self, domain: str, ips: list[str]) -> SpfResults:
        if not ips:
            return {}
        verdict = await SpfEvaluator(self.settings.spf, self.settings.dns).evaluate(domain, ips)
        return {ip: (verdict.results[ip], verdict.explanation.get(ip, "")) for ip in ips}


def _text(rdtype: str, rdata: object) -> str:
    if rdtype == "TXT":
        # RFC 7208 3.3, RFC 6376 3.6.2.2: a record's strings are joined without spaces.
        return b"".join(rdata.strings).decode("utf-8", "replace")  # type: ignore[attr-defined]
    if rdtype == "MX":
        exchange = rdata.exchange.to_text(omit_final_dot=True)  # type: ignore[attr-defined]
        return f"{rdata.preference} {exchange.lower()}"  # type: ignore[attr-defined]
    if rdtype == "PTR":
        return str(rdata.target.to_text(omit_final_dot=True)).lower()  # type: ignore[attr-defined]
    return str(rdata.to_text())  # type: ignore[attr-defined]
