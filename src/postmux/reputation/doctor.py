"""The DNS doctor: whether a sending domain's records let its mail through postmux be trusted (MX, SPF, DKIM,
DMARC, the reverse DNS of source IPs, MTA-STS, TLS-RPT), and the Gmail and Yahoo bulk-sender requirements of
2024 judged from those checks.

Deciding only. Everything here is a plain function of the configuration (`DoctorInputs`) and DNS answers in
hand (`Answers`); postmux.reputation.doctor_dns asks DNS. The lookups are found in rounds: `wanted` says
which names the answers so far lead to (an include's record, an MX host's address, a PTR name's address),
the asker gets those, and again, until nothing new is wanted; then `diagnose` judges. Whether each pool IP
passes SPF is pyspf's evaluation (postmux.reputation.spf), handed in as `SpfResults`.

Each check gives rows (`Finding`): pass, warn (mail goes, but something a receiver or a future change may
hold against it) or fail (mail is, or will be, refused or unauthenticated), with what was found and the fix
in one sentence.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import dns.reversename

from postmux import dmarc
from postmux.config import DkimSettings, Settings
from postmux.dkim import RSA_MIN_BITS, signing_domain
from postmux.reputation.records import (
    RecordProblem,
    SpfTerm,
    is_spf,
    mailto_domains,
    spf_terms,
    starts_with,
    tag_list,
)

Status = Literal["pass", "warn", "fail"]
Verdict = Literal["pass", "fail", "unchecked"]
Lookup = tuple[str, str]  # (name, type): lower case, no final dot
SpfResults = Mapping[str, tuple[str, str]]  # ip -> (RFC 7208 2.6 result, pyspf's explanation)

CHECKS = ("mx", "spf", "dkim", "dmarc", "fcrdns", "mta-sts", "tls-rpt")
SPF_MAX_LOOKUPS = 10  # RFC 7208 4.6.4
SPF_MAX_VOIDS = 2  # RFC 7208 4.6.4: "SHOULD" 2; pyspf and most receivers use 2
RSA_GOOD_BITS = 2048  # RFC 8301 3.2: signers use at least 1024, SHOULD use 2048
_ORDER = {"pass": 0, "warn": 1, "fail": 2}


@dataclass(frozen=True, slots=True)
class Answer:
    """One DNS answer in text: TXT as its strings joined (RFC 7208 3.3), MX as "preference host", A/AAAA
    as addresses, PTR as names. `error`: "" answered (no records: no data), "nxdomain", else why the
    lookup failed ("timeout", "SERVFAIL", ...)."""

    records: tuple[str, ...] = ()
    error: str = ""

    @property
    def failed(self) -> bool:
        return self.error not in ("", "nxdomain")

    @property
    def void(self) -> bool:
        """RFC 7208 4.6.4: an answer with no records, or a name that does not exist."""
        return not self.records and not self.failed


Answers = Mapping[Lookup, Answer]
NOT_ASKED = Answer(error="not looked up (the doctor's time ran out)")


# -- what is checked ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DkimKey:
    """A selector postmux signs the domain's mail with: where its record goes, and the key postmux holds."""

    domain: str  # d=
    selector: str
    algorithm: str  # rsa-sha256 | ed25519-sha256
    public: bytes  # the p= of the private key's public half (base64)
    bits: int  # RSA modulus size; 256 for Ed25519
    key_file: str

    @property
    def name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"


@dataclass(frozen=True, slots=True)
class Sender:
    """A member that may carry the domain's mail: the IPs receivers see it send from, its EHLO name."""

    pool: str
    member: str
    kind: str  # relay | source
    ips: tuple[str, ...]  # empty: a relay that declared no sending_ips
    ehlo: str
    tls: str  # the effective [[pool.members]] tls mode


@dataclass(frozen=True, slots=True)
class DoctorInputs:
    domain: str
    keys: tuple[DkimKey, ...]
    signing_domain: str | None  # d= of the [[dkim]] entry that signs the domain's mail; None: unsigned
    senders: tuple[Sender, ...]
    mx_override: tuple[str, ...] = ()  # [dns] overrides: where postmux itself delivers mail to the domain
    # One-click unsubscribe (RFC 8058): True when [unsubscribe] adds the fields to all of the domain's
    # mail; None, "not checked", otherwise (the application may add its own).
    unsubscribe: bool | None = None

    @property
    def source_ips(self) -> list[tuple[Sender, str]]:
        return [(s, ip) for s in self.senders if s.kind == "source" for ip in s.ips]


def doctor_inputs(settings: Settings, domain: str) -> DoctorInputs:
    """What the configuration says about mail from `domain`: its DKIM keys, and the members of the pools
    its mail may be routed to."""
    chosen = signing_domain(domain, settings.dkim)
    entry = next((d for d in settings.dkim if chosen is not None and d.domain == chosen.domain), None)
    senders = tuple(
        Sender(
            pool.name,
            m.name,
            m.kind,
            m.spf_ips,
            (m.ehlo_hostname or settings.ehlo_hostname).lower().rstrip("."),
            m.tls_mode,
        )
        for pool in settings.pool
        if pool.name in pools_for(settings, domain)
        for m in pool.members
    )
    return DoctorInputs(
        domain,
        _keys(entry),
        entry.domain if entry is not None else None,
        senders,
        settings.dns.overrides.get(domain, ()),
        True if unsubscribe_covers(settings, domain) else None,
    )


def unsubscribe_covers(settings: Settings, domain: str) -> bool:
    """Whether [unsubscribe] adds its fields to all mail from `domain`: by its sender domain, or because
    every pool that mail may go through is opted in."""
    table = settings.unsubscribe
    if table is None:
        return False
    # As the acceptor matches them: "example.com", or "*.example.com" for its subdomains.
    if any(domain == d or (d.startswith("*.") and domain.endswith(d[1:])) for d in table.sender_domains):
        return True
    return all(pool in table.pools for pool in pools_for(settings, domain))


def _keys(entry: DkimSettings | None) -> tuple[DkimKey, ...]:
    if entry is None:
        return ()
    return tuple(
        DkimKey(
            entry.domain,
            s.name,
            s.key.algorithm,
            s.key.public,
            s.key.secret.key_size if s.key.algorithm == "rsa-sha256" else 256,
            s.key_file,
        )
        for s in entry.selectors
    )


def pools_for(settings: Settings, domain: str) -> list[str]:
    """The pools mail from `domain` may go through (postmux.scheduling.router's rules, first match wins):
    those of routes that may match a sender at the domain, up to one that takes all of its mail, else
    also the default pool."""
    pools: list[str] = []
    for route in settings.route:
        m = route.match
        sender = m.sender_domain.lower() if m.sender_domain else None
        if sender not in (None, domain):
            continue
        pools.append(route.pool)
        if sender == domain and not (m.recipient_domain or m.client_network or m.pool_header or m.auth_user):
            return list(dict.fromkeys(pools))
    return list(dict.fromkeys([*pools, settings.default_pool]))


def doctor_domain(text: str) -> str:
    """A domain to examine, in A-labels and lower case; ValueError saying why `text` is not one."""
    import idna

    name = text.strip().rstrip(".")
    try:
        ascii_name = idna.encode(name, uts46=True).decode("ascii").lower()
    except idna.IDNAError as e:
        raise ValueError(f"{text!r} is not a domain: {e}") from None
    labels = ascii_name.split(".")
    if len(ascii_name) > 253 or len(labels) < 2:
        raise ValueError(f"{text!r} is not a domain (a name with at least one dot, up to 253 octets)")
    for label in labels:
        if not label or len(label) > 63 or not label.replace("-", "").isalnum() or label[0] == "-":
            raise ValueError(f"{text!r} is not a domain: label {label!r}")
    return ascii_name


# -- what is asked ----------------------------------------------------------------------------------------


def wanted(inputs: DoctorInputs, answers: Answers) -> set[Lookup]:
    """Every lookup the checks need given the answers so far (those already answered included)."""
    d = inputs.domain
    out: set[Lookup] = {
        (d, "MX"),
        (d, "TXT"),
        (f"_mta-sts.{d}", "TXT"),
        (f"_smtp._tls.{d}", "TXT"),
        *((k.name, "TXT") for k in inputs.keys),
        *((reverse_name(ip), "PTR") for _, ip in inputs.source_ips),
    }
    out |= _mx_wanted(d, answers)
    out |= walk_spf(d, answers).asked
    out |= {(name, "TXT") for name in _dmarc_walk(d, answers)[2]}
    out |= {(name, "TXT") for name in _report_authorizations(d, answers).values()}
    for _, ip in inputs.source_ips:
        for name in answers.get((reverse_name(ip), "PTR"), NOT_ASKED).records:
            out |= {(name, "A"), (name, "AAAA")}
    return out


def _mx_wanted(domain: str, answers: Answers) -> set[Lookup]:
    mx = answers.get((domain, "MX"))
    if mx is None or mx.failed:
        return set()
    if not mx.records:  # RFC 5321 5.1: no MX, the domain's own address is its mail server
        return {(domain, "A"), (domain, "AAAA")}
    return {(h, t) for _, h in _mx_hosts(mx) if h != "." for t in ("A", "AAAA")}


def reverse_name(ip: str) -> str:
    return str(dns.reversename.from_address(ip).to_text(omit_final_dot=True)).lower()


# -- findings and the report --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Finding:
    check: str  # one of CHECKS
    subject: str  # what was looked at: "record", "selector rsa1", "member default/a 192.0.2.10"
    status: Status
    found: str
    fix: str = ""  # one sentence; "" when it passes


@dataclass(frozen=True, slots=True)
class Requirement:
    """A row of the Gmail/Yahoo bulk-sender table (February 2024)."""

    requirement: str
    status: Verdict
    found: str
    fix: str = ""


@dataclass(frozen=True, slots=True)
class Report:
    domain: str
    ok: bool  # nothing fails: the CLI's exit code 0
    checks: list[Finding]
    bulk_sender: list[Requirement]


def worst(findings: Iterable[Finding]) -> Status:
    statuses = [f.status for f in findings]
    return max(statuses, key=_ORDER.__getitem__) if statuses else "pass"


def diagnose(inputs: DoctorInputs, answers: Answers, spf_results: SpfResults) -> Report:
    """Every check of `inputs.domain` from the answers in hand, then the bulk-sender table from them."""
    findings = [
        *check_mx(inputs, answers),
        *check_spf(inputs, answers, spf_results),
        *check_dkim(inputs, answers),
        *check_dmarc(inputs, answers),
        *check_fcrdns(inputs, answers),
        *check_mta_sts(inputs.domain, answers),
        *check_tls_rpt(inputs.domain, answers),
    ]
    table = bulk_sender(inputs, findings, answers)
    ok = all(f.status != "fail" for f in findings) and all(r.status != "fail" for r in table)
    return Report(inputs.domain, ok, findings, table)


def _lookup_failed(check: str, subject: str, name: str, rdtype: str, answer: Answer) -> Finding:
    return Finding(
        check,
        subject,
        "fail",
        f"the {rdtype} lookup of {name} failed: {answer.error}",
        "make sure the domain's nameservers answer (receivers defer or reject on the same failure)",
    )


def _txt(answers: Answers, name: str) -> Answer:
    return answers.get((name, "TXT"), NOT_ASKED)


# -- MX ---------------------------------------------------------------------------------------------------


def _mx_hosts(answer: Answer) -> list[tuple[int, str]]:
    hosts = []
    for record in answer.records:
        preference, _, host = record.partition(" ")
        hosts.append((int(preference), host.lower().rstrip(".") or "."))
    return sorted(hosts)


def check_mx(inputs: DoctorInputs, answers: Answers) -> list[Finding]:
    """MX records exist and each host has an address: bounces, replies and DMARC reports reach the domain."""
    d = inputs.domain
    mx = answers.get((d, "MX"), NOT_ASKED)
    note = f" (postmux itself delivers mail to it via [dns] overrides: {', '.join(inputs.mx_override)})"
    note = note if inputs.mx_override else ""
    if mx.failed:
        return [_lookup_failed("mx", "records", d, "MX", mx)]
    if mx.error == "nxdomain":
        fix = "publish the domain in DNS, with MX records for the mail sent back to it"
        return [Finding("mx", "records", "fail", f"{d} does not exist{note}", fix)]
    if not mx.records:
        return [_implicit_mx(d, answers, note)]
    hosts = _mx_hosts(mx)
    if any(h == "." for _, h in hosts) and len(hosts) > 1:
        # RFC 7505 3: a domain with a null MX MUST NOT advertise any other MX. Senders and receivers then
        # disagree whether it takes mail (bounces and DMARC reports to it): a broken setup, not a choice.
        listed = ", ".join(f"{p} {h}" for p, h in hosts)
        fix = "remove the null MX (0 .) if the domain takes mail, or the other MX records if it takes none"
        return [
            Finding(
                "mx", "records", "fail", f"a null MX with other MX records (RFC 7505 3): {listed}{note}", fix
            )
        ]
    if any(h == "." for _, h in hosts):
        # RFC 7505 4.2: a domain that takes no mail; receivers may refuse mail whose sender is at it.
        fix = "give the domain real MX records if its mail is to be accepted: bounces and replies go there"
        return [Finding("mx", "records", "warn", f"null MX (RFC 7505): {d} takes no mail{note}", fix)]
    rows = [Finding("mx", "records", "pass", ", ".join(f"{p} {h}" for p, h in hosts) + note)]
    for _, host in hosts:
        rows.append(_mx_host(host, answers))
    return rows


def _implicit_mx(domain: str, answers: Answers, note: str) -> Finding:
    a, aaaa = answers.get((domain, "A"), NOT_ASKED), answers.get((domain, "AAAA"), NOT_ASKED)
    if a.failed or aaaa.failed:
        return _lookup_failed("mx", "records", domain, "A/AAAA", a if a.failed else aaaa)
    if a.records or aaaa.records:
        found = f"no MX; mail to it goes to its address {', '.join(a.records + aaaa.records)} (RFC 5321 5.1)"
        return Finding("mx", "records", "warn", found + note, f"publish an MX record for {domain}")
    fix = f"publish an MX record for {domain}: bounces, replies and reports to it have nowhere to go"
    return Finding("mx", "records", "fail", f"no MX record and no address{note}", fix)


def _mx_host(host: str, answers: Answers) -> Finding:
    a, aaaa = answers.get((host, "A"), NOT_ASKED), answers.get((host, "AAAA"), NOT_ASKED)
    addresses = a.records + aaaa.records
    if not addresses and (a.failed or aaaa.failed):
        return _lookup_failed("mx", f"host {host}", host, "A/AAAA", a if a.failed else aaaa)
    if not addresses:
        fix = f"give {host} an A or AAAA record, or take it out of the MX records"
        return Finding("mx", f"host {host}", "fail", "no address", fix)
    return Finding("mx", f"host {host}", "pass", ", ".join(addresses))


# -- SPF --------------------------------------------------------------------------------------------------


@dataclass
class SpfWalk:
    """The SPF record of a domain followed through include and redirect (RFC 7208 5.2, 6.1), without an IP:
    every term counted, as a receiver's evaluation that matches nothing early would count them."""

    record: str | None = None
    records: int = 0  # v=spf1 records at the domain (RFC 7208 4.5: exactly one)
    lookups: int = 0  # RFC 7208 4.6.4
    voids: list[str] = field(default_factory=list)  # names whose lookup found nothing
    problems: list[str] = field(default_factory=list)  # each a permerror
    failed: list[str] = field(default_factory=list)  # lookups that failed
    notes: list[str] = field(default_factory=list)  # warnings: ptr, macros not followed
    all_qualifier: str | None = None  # of the record's all, or its redirect's
    open_includes: list[str] = field(default_factory=list)  # include targets that pass every IP (+all)
    asked: set[Lookup] = field(default_factory=set)  # every lookup this walk needs
    missing: bool = False  # some of them are not answered yet


def walk_spf(domain: str, answers: Answers) -> SpfWalk:
    walk = SpfWalk()
    top = _spf_records(domain, answers, walk)
    if top is None:
        return walk
    walk.records = len(top)
    if len(top) != 1:
        return walk
    walk.record = top[0]
    walk.all_qualifier = _visit(domain, top[0], answers, walk, {domain})
    return walk


def _spf_records(name: str, answers: Answers, walk: SpfWalk) -> list[str] | None:
    walk.asked.add((name, "TXT"))
    answer = answers.get((name, "TXT"))
    if answer is None:
        walk.missing = True
        return None
    if answer.failed:
        walk.failed.append(f"TXT of {name}: {answer.error}")
        return None
    return [r for r in answer.records if is_spf(r)]


def _visit(name: str, record: str, answers: Answers, walk: SpfWalk, seen: set[str]) -> str | None:
    """Count the terms of one record and follow its include and redirect; its effective all's qualifier."""
    try:
        terms = spf_terms(record)
    except RecordProblem as e:
        walk.problems.append(f"{name}: {e}")
        return None
    qualifier = next((t.qualifier for t in terms if t.name == "all" and not t.modifier), None)
    for term in terms:
        if walk.lookups > SPF_MAX_LOOKUPS:
            break  # a permerror already: counting further asks DNS for nothing
        if term.costs_lookup and (not term.modifier or qualifier is None):
            walk.lookups += 1  # RFC 7208 6.1: redirect is ignored when the record has an all
            redirected = _follow(name, term, answers, walk, seen)
            if term.modifier and redirected is not None:
                qualifier = redirected
    return qualifier


def _follow(name: str, term: SpfTerm, answers: Answers, walk: SpfWalk, seen: set[str]) -> str | None:
    if term.name == "ptr":
        walk.notes.append(f"{name} uses ptr, which RFC 7208 5.5 says not to (slow, unreliable)")
        return None
    if term.macro:
        walk.notes.append(f"{name}: {term.name} {term.target} has macros, not followed here")
        return None
    target = (term.target or name).lower().rstrip(".")
    if term.name in ("a", "exists"):
        _void_check(target, ("A", "AAAA") if term.name == "a" else ("A",), answers, walk)
        return None
    if term.name == "mx":
        _void_check(target, ("MX",), answers, walk)
        if len(answers.get((target, "MX"), Answer()).records) > 10:
            walk.problems.append(f"{target} has more than 10 MX records (RFC 7208 4.6.4)")
        return None
    return _include(name, term, target, answers, walk, seen)


def _include(
    name: str, term: SpfTerm, target: str, answers: Answers, walk: SpfWalk, seen: set[str]
) -> str | None:
    """include or redirect: the target's record, counted in turn; the redirect's all qualifier."""
    found = _spf_records(target, answers, walk)
    if found is None:
        return None
    if not found:
        if answers[(target, "TXT")].void:
            walk.voids.append(target)
        # RFC 7208 5.2 and 6.1: an include or redirect whose domain has no record is a permerror.
        walk.problems.append(f"{name}: {term.name} {target} has no SPF record")
        return None
    if len(found) > 1:
        walk.problems.append(f"{target} (by {term.name} from {name}) has {len(found)} SPF records")
        return None
    if target in seen:
        walk.problems.append(f"{name}: {term.name} {target} loops back")
        return None
    qualifier = _visit(target, found[0], answers, walk, seen | {target})
    if term.name == "include" and qualifier == "+":
        # RFC 7208 5.2: include matches when the target's result is pass, and +all (or a bare all) makes
        # it pass for every IP: the including record then passes the whole Internet, as its own +all
        # would. ?all gives neutral, which does not match: harmless. The walk is bounded by _visit's
        # 10 lookups (RFC 7208 4.6.4) and by `seen`.
        walk.open_includes.append(f"{term.name}:{target}")
    return qualifier


def _void_check(target: str, types: tuple[str, ...], answers: Answers, walk: SpfWalk) -> None:
    got = []
    for rdtype in types:
        walk.asked.add((target, rdtype))
        answer = answers.get((target, rdtype))
        if answer is None:
            walk.missing = True
            return
        if answer.failed:
            walk.failed.append(f"{rdtype} of {target}: {answer.error}")
            return
        got.append(answer)
    if all(a.void for a in got):
        walk.voids.append(target)


def check_spf(inputs: DoctorInputs, answers: Answers, results: SpfResults) -> list[Finding]:
    """One v=spf1 record, valid, within 10 lookups and 2 void lookups, passing every IP of the pools."""
    d = inputs.domain
    walk = walk_spf(d, answers)
    rows = [_spf_record(d, walk), *_spf_lookups(walk)]
    for sender in inputs.senders:
        rows.extend(_spf_sender(d, sender, results))
    return rows


def _spf_record(domain: str, walk: SpfWalk) -> Finding:
    if walk.failed or walk.missing:
        what = "; ".join(walk.failed) or NOT_ASKED.error
        fix = "make sure the nameservers of every domain the record names answer"
        return Finding("spf", "record", "fail", f"a lookup failed: {what}", fix)
    if walk.records == 0:
        fix = f'publish a TXT record at {domain}: "v=spf1 ip4:<each sending IP> -all"'
        return Finding("spf", "record", "fail", "no v=spf1 record", fix)
    if walk.records > 1:
        fix = "merge them into one record: two are a permerror, so SPF fails everywhere (RFC 7208 4.5)"
        return Finding("spf", "record", "fail", f"{walk.records} v=spf1 records", fix)
    found = walk.record or ""
    if walk.problems:
        fix = "correct the record: receivers treat it as a permerror, so SPF fails everywhere"
        return Finding("spf", "record", "fail", f"{found} -- {'; '.join(walk.problems)}", fix)
    if walk.all_qualifier == "+":
        fix = "end the record with -all or ~all: +all lets any IP in the world pass"
        return Finding("spf", "record", "fail", f"{found} -- +all passes any sender", fix)
    if walk.open_includes:
        which = ", ".join(walk.open_includes)
        fix = f"remove {which}, or have its record end in -all or ~all: through it any IP in the world passes"
        return Finding("spf", "record", "fail", f"{found} -- {which} ends in +all: every IP passes", fix)
    if walk.all_qualifier in (None, "?"):
        fix = "end the record with -all (or ~all) so that other IPs do not pass as neutral"
        return Finding("spf", "record", "warn", f"{found} -- other IPs get neutral", fix)
    if walk.notes:
        fix = "replace ptr and macro terms with ip4/ip6 or include"
        return Finding("spf", "record", "warn", f"{found} -- {'; '.join(walk.notes)}", fix)
    return Finding("spf", "record", "pass", found)


def _spf_lookups(walk: SpfWalk) -> list[Finding]:
    if walk.record is None:
        return []
    found = f"{walk.lookups} of {SPF_MAX_LOOKUPS} DNS lookups, {len(walk.voids)} of {SPF_MAX_VOIDS} void"
    if walk.voids:
        found += f" ({', '.join(walk.voids)})"
    if walk.lookups > SPF_MAX_LOOKUPS:
        fix = (
            "flatten includes into ip4/ip6 terms: past 10 lookups the record is a permerror (RFC 7208 4.6.4)"
        )
        return [Finding("spf", "lookups", "fail", found, fix)]
    if len(walk.voids) > SPF_MAX_VOIDS:
        fix = "remove the terms that name domains without records: past 2 void lookups SPF is a permerror"
        return [Finding("spf", "lookups", "fail", found, fix)]
    return [Finding("spf", "lookups", "pass", found)]


def _spf_sender(domain: str, sender: Sender, results: SpfResults) -> list[Finding]:
    subject = f"member {sender.pool}/{sender.member}"
    if not sender.ips:
        fix = "declare the relay's sending_ips so that the doctor (and SPF-aware routing) can judge it"
        return [Finding("spf", subject, "warn", "the relay's sending IPs are not known", fix)]
    rows = []
    for ip in sender.ips:
        result, words = results.get(ip, ("temperror", "not evaluated"))
        if result == "pass":
            rows.append(Finding("spf", f"{subject} {ip}", "pass", "pass"))
            continue
        mechanism = "ip6" if ":" in ip else "ip4"
        fix = f"add {mechanism}:{ip} (or an include that covers it) to the record of {domain}"
        if result in ("temperror", "permerror"):
            fix = "correct the record (see the record row) so that it can be evaluated"
        rows.append(Finding("spf", f"{subject} {ip}", "fail", f"{result}: {words}".rstrip(": "), fix))
    return rows


# -- DKIM -------------------------------------------------------------------------------------------------


def check_dkim(inputs: DoctorInputs, answers: Answers) -> list[Finding]:
    """Each selector postmux signs with: published, parsed, the key postmux holds, big enough, not testing."""
    d = inputs.domain
    if inputs.signing_domain is None:
        fix = f"add a [[dkim]] entry for {d} (postmux dkim genkey {d} SELECTOR writes a key and its record)"
        return [Finding("dkim", "signing", "fail", f"postmux signs no mail from {d}", fix)]
    rows = []
    if not aligned(inputs.signing_domain, d):
        fix = f"add a [[dkim]] entry of {d} itself so that its signature aligns for DMARC"
        found = f"signed with d={inputs.signing_domain}, which does not align with {d}"
        rows.append(Finding("dkim", "signing", "warn", found, fix))
    return rows + [_dkim_selector(key, answers) for key in inputs.keys]


def _dkim_selector(key: DkimKey, answers: Answers) -> Finding:
    subject = f"selector {key.selector}"
    answer = _txt(answers, key.name)
    publish = f"publish at {key.name} the TXT record of {key.key_file} (`postmux dkim genkey` printed it)"
    if answer.failed:
        return _lookup_failed("dkim", subject, key.name, "TXT", answer)
    if not answer.records:
        return Finding("dkim", subject, "fail", f"no record at {key.name}", publish)
    if len(answer.records) > 1:
        fix = f"keep one TXT record at {key.name}: verifiers may read either"
        return Finding("dkim", subject, "fail", f"{len(answer.records)} records", fix)
    try:
        tags = tag_list(answer.records[0])
    except RecordProblem as e:
        return Finding("dkim", subject, "fail", f"the record does not parse: {e}", publish)
    problem = _dkim_record_problem(key, tags)
    if problem:
        return Finding("dkim", subject, "fail", problem, publish)
    size = f"{key.bits}-bit RSA" if key.algorithm == "rsa-sha256" else "Ed25519"
    found = f"published, the key postmux holds ({size})"
    if "y" in tags.get("t", "").split(":"):
        fix = "remove t=y once signatures verify: in testing mode receivers treat the mail as unsigned"
        return Finding("dkim", subject, "warn", found + "; t=y (testing, RFC 6376 3.6.1)", fix)
    if key.algorithm == "rsa-sha256" and key.bits < RSA_GOOD_BITS:
        fix = "rotate to a 2048-bit key (postmux dkim genkey) under a new selector (RFC 8301 3.2)"
        return Finding("dkim", subject, "warn", found, fix)
    return Finding("dkim", subject, "pass", found)


def _dkim_record_problem(key: DkimKey, tags: dict[str, str]) -> str:
    """What makes the record unusable with postmux's key ("" when nothing): RFC 6376 3.6.1, RFC 8463 4."""
    if "v" in tags and tags["v"] != "DKIM1":
        return f"v={tags['v']}, not DKIM1"
    kind = tags.get("k", "rsa")
    if kind != ("rsa" if key.algorithm == "rsa-sha256" else "ed25519"):
        return f"k={kind}, but postmux signs with {key.algorithm}"
    if "h" in tags and "sha256" not in tags["h"].split(":"):
        return f"h={tags['h']} does not allow sha256"
    if not tags.get("p"):
        return "p= is empty: the key is revoked (RFC 6376 3.6.1)"
    try:
        published = base64.b64decode(tags["p"], validate=True)
    except ValueError:
        return "p= is not base64"
    if published != base64.b64decode(key.public):
        bits = _rsa_bits(published) if kind == "rsa" else None
        size = f" (a {bits}-bit key)" if bits else ""
        weak = f"; below {RSA_MIN_BITS} bits verifiers refuse it (RFC 8301)" if bits and bits < 1024 else ""
        return f"p= is another key than {key.key_file}'s{size}{weak}"
    return ""


def _rsa_bits(der: bytes) -> int | None:
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.serialization import load_der_public_key

    try:
        key = load_der_public_key(der)
    except (ValueError, TypeError):
        return None
    return key.key_size if isinstance(key, rsa.RSAPublicKey) else None


def aligned(a: str, b: str, strict: bool = False) -> bool:
    """DMARC identifier alignment (RFC 7489 3.1): strict, the same name; relaxed, the same organizational
    domain by the Public Suffix List (postmux.dmarc, as the accept-time check judges it)."""
    return dmarc.aligned(a, b, "strict" if strict else "relaxed")


# -- DMARC ------------------------------------------------------------------------------------------------


def dmarc_names(domain: str) -> list[str]:
    """Where a DMARC record for `domain` may be: its own _dmarc, then each parent's up to the one below the
    top-level domain (DMARCbis's tree walk, which needs no public suffix list, for RFC 7489 6.6.3's
    organizational domain)."""
    labels = domain.split(".")
    return [f"_dmarc.{'.'.join(labels[i:])}" for i in range(len(labels) - 1)][:8]


def _dmarc_walk(domain: str, answers: Answers) -> tuple[str | None, list[str], list[str]]:
    """(where a record was found, its v=DMARC1 records, the names asked so far)."""
    asked = []
    for name in dmarc_names(domain):
        asked.append(name)
        answer = answers.get((name, "TXT"))
        if answer is None or answer.failed:
            return None, [], asked
        records = [r for r in answer.records if starts_with(r, "DMARC1")]
        if records:
            return name, records, asked
    return None, [], asked


def check_dmarc(inputs: DoctorInputs, answers: Answers) -> list[Finding]:
    """A _dmarc record (or the parent's), its policy, alignment modes and aggregate reports."""
    d = inputs.domain
    where, records, asked = _dmarc_walk(d, answers)
    last = _txt(answers, asked[-1])
    if where is None and last.failed:
        return [_lookup_failed("dmarc", "record", asked[-1], "TXT", last)]
    if where is None:
        fix = f'publish a TXT record at _dmarc.{d}: "v=DMARC1; p=none; rua=mailto:dmarc-reports@{d}"'
        return [Finding("dmarc", "record", "fail", "no DMARC record", fix)]
    if len(records) > 1:
        fix = f"keep one v=DMARC1 record at {where}: with two, receivers apply none (RFC 7489 6.6.3)"
        return [Finding("dmarc", "record", "fail", f"{len(records)} records at {where}", fix)]
    try:
        tags = tag_list(records[0])
    except RecordProblem as e:
        fix = f"correct the record at {where}"
        return [Finding("dmarc", "record", "fail", f"{records[0]} -- {e}", fix)]
    inherited = where != f"_dmarc.{d}"
    found = f"{records[0]}" + (f" (at {where}, the parent's)" if inherited else "")
    policy_tag = "sp" if inherited and "sp" in tags else "p"
    published = tags.get(policy_tag)
    # RFC 7489 6.4 writes p=, sp=, adkim= and aspf= values as ABNF quoted strings, which are
    # case-insensitive (RFC 5234 2.3): p=Reject is p=reject to receivers. Shown as published.
    policy = (published or "").lower()
    if policy not in ("none", "quarantine", "reject"):
        fix = f"set p= to none, quarantine or reject in the record at {where} (p= is required, RFC 7489 6.3)"
        return [Finding("dmarc", "record", "fail", f"{found} -- {policy_tag}={published or ''}", fix)]
    return [
        Finding("dmarc", "record", "pass", found),
        _dmarc_policy(policy_tag, policy, tags),
        _dmarc_alignment(inputs, tags, answers),
        _dmarc_reports(d, tags, where, answers),
    ]


def _dmarc_policy(tag: str, policy: str, tags: dict[str, str]) -> Finding:
    pct = tags.get("pct", "100")
    found = f"{tag}={tags.get(tag, policy)}" + (f", pct={pct}" if pct != "100" else "")
    if policy == "none":
        fix = "once aggregate reports show all mail aligned, move to p=quarantine, then p=reject"
        return Finding("dmarc", "policy", "warn", found + ": monitoring only, nothing is enforced", fix)
    return Finding("dmarc", "policy", "pass", found)


def _dmarc_alignment(inputs: DoctorInputs, tags: dict[str, str], answers: Answers) -> Finding:
    published = {t: tags.get(t, "r") for t in ("adkim", "aspf")}
    bad = [f"{t}={v}" for t, v in published.items() if v.lower() not in ("r", "s")]  # case-insensitive
    if bad:
        fix = "set adkim and aspf to r (relaxed) or s (strict)"
        return Finding("dmarc", "alignment", "fail", f"{', '.join(bad)} is not r or s", fix)
    modes = {t: v.lower() for t, v in published.items()}
    found = f"adkim={published['adkim']}, aspf={published['aspf']}"
    d = inputs.domain
    signer = inputs.signing_domain
    if signer is not None and aligned(signer, d, strict=modes["adkim"] == "s"):
        return Finding("dmarc", "alignment", "pass", f"{found}; DKIM d={signer} aligns")
    if walk_spf(d, answers).record is not None:
        # postmux sends with the envelope sender the client gave: at the domain itself, SPF aligns.
        return Finding("dmarc", "alignment", "pass", f"{found}; SPF of {d} aligns (envelope sender at {d})")
    fix = f"sign with d={d} ([[dkim]]) so that DMARC can pass"
    return Finding("dmarc", "alignment", "fail", f"{found}; neither DKIM nor SPF can align", fix)


def _report_authorizations(domain: str, answers: Answers) -> dict[str, str]:
    """RFC 7489 7.1: each rua domain outside the domain's own, and where it must say it takes the reports
    (DOMAIN._report._dmarc.RUA-DOMAIN)."""
    where, records, _ = _dmarc_walk(domain, answers)
    if where is None or len(records) != 1:
        return {}
    try:
        rua = tag_list(records[0]).get("rua", "")
    except RecordProblem:
        return {}
    # Relaxed alignment stands in for "the same organizational domain" (see `aligned`).
    return {r: f"{domain}._report._dmarc.{r}" for r in mailto_domains(rua) if not aligned(r, domain)}


def _dmarc_reports(domain: str, tags: dict[str, str], where: str, answers: Answers) -> Finding:
    rua = tags.get("rua", "")
    if not rua:
        fix = f"add rua=mailto:... to the record at {where} to learn who sends as the domain and how it fares"
        return Finding("dmarc", "reports", "warn", "no rua: no aggregate reports", fix)
    if not mailto_domains(rua):
        fix = "write rua as mailto: URIs (RFC 7489 6.4)"
        return Finding("dmarc", "reports", "fail", f"rua={rua} has no mailto: address", fix)
    for rua_domain, name in _report_authorizations(domain, answers).items():
        answer = _txt(answers, name)
        if answer.failed:
            return _lookup_failed("dmarc", "reports", name, "TXT", answer)
        if not any(starts_with(r, "DMARC1") for r in answer.records):
            fix = f'ask {rua_domain} to publish "v=DMARC1" at {name} (RFC 7489 7.1)'
            found = f"rua={rua}: {rua_domain} does not say it takes the domain's reports, so none are sent"
            return Finding("dmarc", "reports", "warn", found, fix)
    return Finding("dmarc", "reports", "pass", f"rua={rua}")


# -- forward-confirmed reverse DNS of source members ----------------------------------------------------


def check_fcrdns(inputs: DoctorInputs, answers: Answers) -> list[Finding]:
    """Each source member's IP: a PTR name whose A/AAAA records lead back to it, and the EHLO name it gives
    equal to that name (Gmail's bulk-sender rules; RFC 1912 2.1)."""
    return [_fcrdns(sender, ip, answers) for sender, ip in inputs.source_ips]


def _fcrdns(sender: Sender, ip: str, answers: Answers) -> Finding:
    subject = f"member {sender.pool}/{sender.member} {ip}"
    reverse = reverse_name(ip)
    ptr = answers.get((reverse, "PTR"), NOT_ASKED)
    if ptr.failed:
        return _lookup_failed("fcrdns", subject, reverse, "PTR", ptr)
    if not ptr.records:
        fix = f"ask whoever runs {ip}'s address block to set its PTR record to {sender.ehlo}"
        return Finding("fcrdns", subject, "fail", "no PTR record", fix)
    confirmed = []
    for name in ptr.records:
        forward = [answers.get((name, t), NOT_ASKED) for t in ("A", "AAAA")]
        if all(a.failed for a in forward):
            return _lookup_failed("fcrdns", subject, name, "A", forward[0])
        if ip in {r for a in forward for r in a.records}:
            confirmed.append(name)
    names = ", ".join(ptr.records)
    if not confirmed:
        fix = f"give {ptr.records[0]} an {'AAAA' if ':' in ip else 'A'} record of {ip}"
        return Finding("fcrdns", subject, "fail", f"PTR {names}, whose address is not {ip}", fix)
    if sender.ehlo not in confirmed:
        fix = f'set ehlo_hostname = "{confirmed[0]}" on the member (or the PTR record to its EHLO name)'
        found = f"PTR {names}, forward-confirmed; EHLO name {sender.ehlo} differs"
        return Finding("fcrdns", subject, "warn", found, fix)
    return Finding("fcrdns", subject, "pass", f"PTR {names}, forward-confirmed, the EHLO name")


# -- MTA-STS and TLS-RPT -----------------------------------------------------------------------------------


def check_mta_sts(domain: str, answers: Answers) -> list[Finding]:
    """The _mta-sts TXT record (RFC 8461 3.1). The policy itself (https://mta-sts.DOMAIN/...) is not fetched:
    the doctor asks DNS only, and never makes a node reach out to the web."""
    name = f"_mta-sts.{domain}"
    answer = _txt(answers, name)
    if answer.failed:
        return [_lookup_failed("mta-sts", "record", name, "TXT", answer)]
    records = [r for r in answer.records if starts_with(r, "STSv1")]
    if not records:
        policy = f"https://mta-sts.{domain}/.well-known/mta-sts.txt"
        fix = f'publish "v=STSv1; id=<serial>" at {name}, and the policy at {policy}'
        return [Finding("mta-sts", "record", "warn", "none: senders to the domain may skip TLS", fix)]
    if len(records) > 1:
        fix = f"keep one v=STSv1 record at {name} (RFC 8461 3.1)"
        return [Finding("mta-sts", "record", "fail", f"{len(records)} records", fix)]
    try:
        tags = tag_list(records[0])
    except RecordProblem as e:
        return [Finding("mta-sts", "record", "fail", f"{records[0]} -- {e}", f"correct the record at {name}")]
    ident = tags.get("id", "")
    if not (0 < len(ident) <= 32 and ident.isalnum()):
        fix = f"give the record at {name} an id= of 1 to 32 letters and digits (RFC 8461 3.1)"
        return [Finding("mta-sts", "record", "fail", f"{records[0]} -- id={ident!r}", fix)]
    return [Finding("mta-sts", "record", "pass", f"{records[0]} (the policy over HTTPS is not fetched)")]


def check_tls_rpt(domain: str, answers: Answers) -> list[Finding]:
    """The _smtp._tls TXT record (RFC 8460 3): v=TLSRPTv1 with a rua= where reports go."""
    name = f"_smtp._tls.{domain}"
    answer = _txt(answers, name)
    if answer.failed:
        return [_lookup_failed("tls-rpt", "record", name, "TXT", answer)]
    records = [r for r in answer.records if starts_with(r, "TLSRPTv1")]
    if not records:
        fix = f'publish "v=TLSRPTv1; rua=mailto:tls-reports@{domain}" at {name}'
        return [
            Finding("tls-rpt", "record", "warn", "none: no reports of TLS failures toward the domain", fix)
        ]
    if len(records) > 1:
        fix = f"keep one v=TLSRPTv1 record at {name} (RFC 8460 3)"
        return [Finding("tls-rpt", "record", "fail", f"{len(records)} records", fix)]
    try:
        rua = tag_list(records[0]).get("rua", "")
    except RecordProblem as e:
        return [Finding("tls-rpt", "record", "fail", f"{records[0]} -- {e}", f"correct the record at {name}")]
    if not any(u.strip().lower().startswith(("mailto:", "https:")) for u in rua.split(",")):
        fix = f"add rua=mailto:... (or https:) to the record at {name}: without it the record is void"
        return [Finding("tls-rpt", "record", "fail", f"{records[0]} -- no rua", fix)]
    return [Finding("tls-rpt", "record", "pass", records[0])]


# -- the bulk-sender requirements ------------------------------------------------------------------------


def bulk_sender(inputs: DoctorInputs, findings: list[Finding], answers: Answers) -> list[Requirement]:
    """Gmail's and Yahoo's rules for bulk senders (from February 2024), each from the checks above."""
    by_check = {c: [f for f in findings if f.check == c] for c in CHECKS}
    return [
        _from_check("SPF", by_check["spf"], "one valid record, and every pool IP passes"),
        _dkim_requirement(inputs, by_check["dkim"]),
        _dmarc_requirement(by_check["dmarc"]),
        _unsubscribe(inputs),
        _tls(inputs),
        _fcrdns_requirement(inputs, by_check["fcrdns"]),
        Requirement(
            "spam rate below 0.3%",
            "unchecked",
            "not measurable here: it is what recipients report",
            "watch Gmail Postmaster Tools and Yahoo Sender Hub; keep it under 0.1%",
        ),
    ]


def _first_failure(findings: list[Finding]) -> Finding | None:
    return next((f for f in findings if f.status == "fail"), None)


def _from_check(name: str, findings: list[Finding], passed: str) -> Requirement:
    failed = _first_failure(findings)
    if failed is not None:
        return Requirement(name, "fail", f"{failed.subject}: {failed.found}", failed.fix)
    return Requirement(name, "pass", passed)


def _dkim_requirement(inputs: DoctorInputs, findings: list[Finding]) -> Requirement:
    failed = _first_failure(findings)
    if failed is not None and not any(
        f.status != "fail" and f.subject.startswith("selector") for f in findings
    ):
        return Requirement("DKIM", "fail", f"{failed.subject}: {failed.found}", failed.fix)
    if inputs.signing_domain is None or not aligned(inputs.signing_domain, inputs.domain):
        fix = f"add a [[dkim]] entry of {inputs.domain}"
        return Requirement("DKIM", "fail", f"signed with d={inputs.signing_domain}, not aligned", fix)
    return Requirement("DKIM", "pass", f"signed with d={inputs.signing_domain}")


def _dmarc_requirement(findings: list[Finding]) -> Requirement:
    # A DMARC record (p=none is enough for the rule) and alignment that can pass.
    failed = _first_failure(findings)
    if failed is not None:
        return Requirement("DMARC with alignment", "fail", f"{failed.subject}: {failed.found}", failed.fix)
    policy = next((f.found for f in findings if f.subject == "policy"), "")
    return Requirement("DMARC with alignment", "pass", policy.split(":")[0])


def _unsubscribe(inputs: DoctorInputs) -> Requirement:
    name = "one-click unsubscribe (RFC 8058)"
    if inputs.unsubscribe is None:
        fix = "make sure the application adds List-Unsubscribe and List-Unsubscribe-Post to marketing mail"
        return Requirement(name, "unchecked", "not checked by this version of postmux", fix)
    if not inputs.unsubscribe:
        return Requirement(name, "fail", "not turned on for this domain's pools", "turn it on")
    return Requirement(name, "pass", "postmux adds List-Unsubscribe and List-Unsubscribe-Post")


def _tls(inputs: DoctorInputs) -> Requirement:
    clear = [s for s in inputs.senders if s.tls == "none"]
    if clear:
        names = ", ".join(f"{s.pool}/{s.member}" for s in clear)
        return Requirement("TLS", "fail", f"tls = none on {names}", 'set tls = "opportunistic" or stronger')
    relays = any(s.kind == "relay" for s in inputs.senders)
    found = "every member uses STARTTLS when offered" + (
        "; relays' own delivery onward is theirs to secure" if relays else ""
    )
    return Requirement("TLS", "pass", found)


def _fcrdns_requirement(inputs: DoctorInputs, findings: list[Finding]) -> Requirement:
    if not inputs.source_ips:
        found = "no source members: the relays' reverse DNS is their operator's to keep"
        return Requirement("forward-confirmed reverse DNS", "unchecked", found)
    return _from_check(
        "forward-confirmed reverse DNS", findings, "every source IP's PTR name leads back to it"
    )
