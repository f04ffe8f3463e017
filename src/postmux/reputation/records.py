"""The text of sender-authentication records read as the RFCs write them: SPF terms (RFC 7208 12), and the
tag=value lists of DKIM keys (RFC 6376 3.2), DMARC (RFC 7489 6.4), MTA-STS (RFC 8461 3.1) and TLS-RPT
(RFC 8460 3). Pure text in, values or the reason it is not one out; no DNS here (postmux.reputation.doctor
decides with these, postmux.reputation.doctor_dns asks).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

# RFC 7208 4.6.1: the mechanisms; 4.6.4: those that cost a DNS lookup (and `redirect=`, a modifier).
MECHANISMS = frozenset({"all", "include", "a", "mx", "ptr", "ip4", "ip6", "exists"})
LOOKUP_MECHANISMS = frozenset({"include", "a", "mx", "ptr", "exists"})
_MODIFIER_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")
_TAG_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")
_CIDR = re.compile(r"(/(\d+))?(//(\d+))?\Z")
_DOMAIN_CHARS = re.compile(r"[A-Za-z0-9_.-]+\Z")


class RecordProblem(ValueError):
    """Text that is not the record it claims to be; the message says where and why."""


@dataclass(frozen=True, slots=True)
class SpfTerm:
    """One term of an SPF record: a mechanism with its qualifier, or a modifier (`qualifier` is "=")."""

    qualifier: str  # + - ~ ? for a mechanism; "=" for a modifier
    name: str  # the mechanism or modifier, lower-cased
    target: str = ""  # a domain-spec ("" for a and mx without one: the current domain), or the network

    @property
    def modifier(self) -> bool:
        return self.qualifier == "="

    @property
    def costs_lookup(self) -> bool:
        """RFC 7208 4.6.4: include, a, mx, ptr, exists and redirect each cost one of the 10 lookups."""
        return self.name in LOOKUP_MECHANISMS if not self.modifier else self.name == "redirect"

    @property
    def macro(self) -> bool:
        """A target with macros (RFC 7208 7) names a different domain for each message: not followable."""
        return "%" in self.target


def is_spf(text: str) -> bool:
    """RFC 7208 4.5: a record is SPF when it starts with "v=spf1" and then a space or its end."""
    low = text.lower()
    return low == "v=spf1" or low.startswith("v=spf1 ")


def spf_terms(record: str) -> list[SpfTerm]:
    """The terms of an SPF record (RFC 7208 12); RecordProblem naming the first term that is not one."""
    terms = [spf_term(t) for t in record.split()[1:]]
    for name in ("redirect", "exp"):
        if sum(1 for t in terms if t.modifier and t.name == name) > 1:
            raise RecordProblem(f"{name}= appears twice (RFC 7208 6)")
    return terms


def spf_term(term: str) -> SpfTerm:
    name, eq, value = term.partition("=")
    if eq and _MODIFIER_NAME.match(name) and ":" not in name:
        if name.lower() in ("redirect", "exp"):
            _domain_spec(value, term)
        return SpfTerm("=", name.lower(), value)
    qualifier = term[0] if term[:1] in ("+", "-", "~", "?") else "+"
    body = term[1:] if term[:1] in ("+", "-", "~", "?") else term
    mechanism, colon, argument = body.partition(":")
    cut = re.match(r"[A-Za-z0-9]*", body)
    if not colon and cut is not None:  # a/24, mx//64: the cidr follows the name directly
        mechanism, argument = cut.group(0), body[cut.end() :]
    mechanism = mechanism.lower()
    if mechanism not in MECHANISMS:
        raise RecordProblem(f"{term!r} is not a mechanism (RFC 7208 5)")
    return SpfTerm(qualifier, mechanism, _argument(mechanism, argument, bool(colon), term))


def _argument(mechanism: str, argument: str, colon: bool, term: str) -> str:
    if mechanism == "all":
        if colon or argument:
            raise RecordProblem(f"{term!r}: all takes no argument")
        return ""
    if mechanism in ("ip4", "ip6"):
        return _network(mechanism, argument, term)
    if mechanism in ("a", "mx"):
        cidr = _CIDR.search(argument)
        domain = argument[: cidr.start()] if cidr else argument
        if cidr and (
            (cidr.group(2) and int(cidr.group(2)) > 32) or (cidr.group(4) and int(cidr.group(4)) > 128)
        ):
            raise RecordProblem(f"{term!r}: a prefix length beyond 32 (IPv4) or 128 (IPv6)")
        if colon:
            _domain_spec(domain, term)
        return domain
    if mechanism in ("include", "exists") and not colon:
        raise RecordProblem(f"{term!r}: {mechanism} needs a domain ({mechanism}:example.com)")
    if colon:
        _domain_spec(argument, term)
    return argument


def _network(mechanism: str, argument: str, term: str) -> str:
    try:
        net = ipaddress.ip_network(argument, strict=False)
    except ValueError:
        raise RecordProblem(f"{term!r}: {argument!r} is not an IP network") from None
    if (mechanism == "ip4") != (net.version == 4):
        raise RecordProblem(f"{term!r}: an IPv{net.version} network under {mechanism}")
    return argument


def _domain_spec(spec: str, term: str) -> None:
    """RFC 7208 7.1: a domain, or macros; without macros it ends in a top label (at least one dot)."""
    if not spec:
        raise RecordProblem(f"{term!r}: an empty domain")
    if "%" in spec:
        if re.search(r"%(?![{%_-])", spec) or re.search(r"%\{(?![slodiphcrtv])", spec, re.I):
            raise RecordProblem(f"{term!r}: a malformed macro (RFC 7208 7.1)")
        return
    if not _DOMAIN_CHARS.match(spec) or "." not in spec.strip(".") or ".." in spec:
        raise RecordProblem(f"{term!r}: {spec!r} is not a domain")


def tag_list(record: str) -> dict[str, str]:
    """A tag=value list (RFC 6376 3.2): tag names lower-cased, white space inside a value dropped (a p= split
    over strings); RecordProblem for a part without "=", a bad name, or a tag given twice."""
    tags: dict[str, str] = {}
    for part in record.split(";"):
        if not part.strip():
            continue
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq or not _TAG_NAME.match(name):
            raise RecordProblem(f"{part.strip()!r} is not tag=value")
        if name.lower() in tags:
            raise RecordProblem(f"{name}= appears twice")
        tags[name.lower()] = "".join(value.split())
    return tags


def starts_with(record: str, version: str) -> bool:
    """Whether the record's first tag is v=`version` (DMARC, MTA-STS, TLS-RPT select their records so)."""
    first = record.split(";", 1)[0]
    name, _, value = first.partition("=")
    return name.strip().lower() == "v" and value.strip() == version


def mailto_domains(rua: str) -> list[str]:
    """The domains of a rua= list's mailto: URIs (RFC 7489 6.4, RFC 8460 3): where reports go."""
    out = []
    for uri in rua.split(","):
        address = uri.strip().split("!", 1)[0]
        if address.lower().startswith("mailto:") and "@" in address:
            out.append(address.rpartition("@")[2].lower().rstrip("."))
    return out
