"""DMARC identifier alignment (RFC 7489 3.1), judged at accept: deciding only, no I/O.

A receiver applying DMARC passes a message when its From: domain (the author domain, RFC 7489 3.1) aligns
with the d= of a DKIM signature that verifies, or with the domain SPF passed for (the MAIL FROM domain).
postmux knows at accept which d= it will sign with ([[dkim]], postmux.dkim.signing_domain), and which
MAIL FROM domain the mail will carry; this module says whether either aligns with the From: domain, so
mail a receiver's DMARC would fail is told (warn) or refused before it is taken.

What postmux cannot know at accept is the receiver's SPF result: that depends on the IP the mail leaves
from, picked at delivery. An aligned MAIL FROM domain is counted as SPF-aligned (`count_spf`); with
[spf] enabled, routing then only uses members whose IPs that domain's SPF record permits, so the count
holds unless its evaluation failed open ([spf] on_error = "open"). docs/authentication.md says more.

Organizational domains (RFC 7489 3.2) come from the Public Suffix List that the `publicsuffixlist`
package bundles (its releases follow the list); it is never fetched at run time. A domain the list
names as a public suffix itself is its own organizational domain.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from email.utils import getaddresses
from typing import Literal

import idna

from postmux.headers import take_fields

Mode = Literal["relaxed", "strict"]


@functools.cache
def _suffixes() -> object:
    from publicsuffixlist import PublicSuffixList

    # Loaded once (~30 ms, ~10k rules); the ICANN and private sections both, as OpenDMARC reads the list:
    # two customers under one hosting suffix (blogspot.com) are two organizations.
    return PublicSuffixList()


def organizational_domain(domain: str) -> str:
    """The registered domain of `domain` (RFC 7489 3.2): the public suffix and one label more."""
    name = domain.lower().rstrip(".")
    found = _suffixes().privatesuffix(name)  # type: ignore[attr-defined]
    return str(found) if found else name


def aligned(author: str, other: str, mode: Mode) -> bool:
    """Whether `other` (a d= or MAIL FROM domain) aligns with the author domain (RFC 7489 3.1.1, 3.1.2):
    strict, the same name; relaxed, the same organizational domain."""
    a, b = author.lower().rstrip("."), other.lower().rstrip(".")
    if not a or not b:
        return False
    if a == b:
        return True
    return mode == "relaxed" and organizational_domain(a) == organizational_domain(b)


def a_label(domain: str) -> str:
    """A domain in A-labels, lower-cased (d= is written so, RFC 8616 4): a U-label From: domain aligns
    with the d= of its A-label entry."""
    name = domain.strip().rstrip(".").lower()
    try:
        return idna.encode(name, uts46=True).decode("ascii")
    except idna.IDNAError:
        return name


def author_domains(head: bytes) -> tuple[list[str], str]:
    """The domains of the From: field's mailboxes (deduplicated, in order), and a problem ("" when none).

    RFC 5322 3.6 wants exactly one From: field; RFC 7489 6.6.1 leaves a field of several domains to the
    receiver, which may refuse it. A missing field, several fields, or a mailbox without a domain is a
    problem here: no single author domain to align with.
    """
    _, taken = take_fields(head, ("From",))
    fields = taken.get("from", [])
    if not fields:
        return [], "the message has no From: field (RFC 5322 3.6 requires one)"
    if len(fields) > 1:
        return [], f"the message has {len(fields)} From: fields (RFC 5322 3.6 allows one)"
    domains: list[str] = []
    for _, address in getaddresses([fields[0]]):
        _, at, domain = address.rpartition("@")
        if not at or not domain.strip():
            return [], f"the From: field holds {address or 'no address'!r}, which has no domain"
        domains.append(a_label(domain))
    if not domains:
        return [], "the From: field holds no address"
    return list(dict.fromkeys(domains)), ""


@dataclass(frozen=True, slots=True)
class Alignment:
    """The verdict for one message: whether DMARC would find an aligned identifier, by which, and if
    not, why (the words of the event tag and of the refusal)."""

    aligned: bool
    via: str = ""  # "dkim" or "spf" when aligned
    reason: str = ""


def judge(
    head: bytes,
    dkim_domain: str,
    mail_from_domain: str,
    *,
    dkim_mode: Mode = "relaxed",
    spf_mode: Mode = "relaxed",
    count_spf: bool = True,
) -> Alignment:
    """Whether the From: domain(s) of `head` align with the DKIM signing domain postmux will use
    (`dkim_domain`, "" when it will not sign) or, with `count_spf`, the MAIL FROM domain.

    Every author domain must align (a From: of several domains passes only if each would): one that does
    not is mail a receiver's DMARC fails for that author.
    """
    authors, problem = author_domains(head)
    if problem:
        return Alignment(False, reason=problem)
    spf_domain = a_label(mail_from_domain) if count_spf and mail_from_domain else ""
    via = ""
    for author in authors:
        if dkim_domain and aligned(author, dkim_domain, dkim_mode):
            via = via or "dkim"
        elif spf_domain and aligned(author, spf_domain, spf_mode):
            via = via or "spf"
        else:
            return Alignment(False, reason=_misaligned(author, dkim_domain, spf_domain, dkim_mode, spf_mode))
    return Alignment(True, via=via)


def _misaligned(author: str, dkim_domain: str, spf_domain: str, dkim_mode: Mode, spf_mode: Mode) -> str:
    signed = (
        f"DKIM d={dkim_domain} ({dkim_mode})"
        if dkim_domain
        else "a DKIM signature (no [[dkim]] entry signs it)"
    )
    spf = (
        f"MAIL FROM domain {spf_domain} ({spf_mode})"
        if spf_domain
        else "a MAIL FROM domain (the null sender, or [dmarc] count_spf = false)"
    )
    return f"From: domain {author} aligns with neither {signed} nor {spf} (RFC 7489 3.1)"
