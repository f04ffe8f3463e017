"""Mailboxes as RFC 5321 writes them (4.1.2, 4.1.3), extended to UTF-8 by RFC 6531: parsed once, at MAIL/RCPT.

What the parser accepts is what delivery sends at MAIL and RCPT, character for character, and the domain it
finds is the one routes, queues, shaping and MX go by (`domain_of`): no second reading of an address can
disagree with the first (a quoted local part holding "@" once routed by `evil.test"`, issue 10 A3).

    Path           = "<" [ A-d-l ":" ] Mailbox ">"
    Mailbox        = Local-part "@" ( Domain / address-literal )
    Local-part     = Dot-string / Quoted-string
    Domain         = sub-domain *("." sub-domain)            ; LDH labels; U-labels with SMTPUTF8 (RFC 6531)
    address-literal = "[" ( IPv4-address-literal / "IPv6:" IPv6-addr ) "]"

The grammar is read in its RFC 6531 form always; whether UTF-8 was allowed (SMTPUTF8 at MAIL) is the
caller's question (ingress/hygiene.read_path, wire_path below). Pure functions of strings, no I/O.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import unicodedata
from dataclasses import dataclass

import idna  # IDNA 2008 (RFC 5891) and UTS 46; the stdlib's encodings.idna only knows IDNA 2003


class Role(enum.Enum):
    SENDER = "sender"
    RECIPIENT = "recipient"


@dataclass(frozen=True, slots=True)
class Mailbox:
    """A parsed mailbox, each part exactly as the client wrote it.

    `domain` is "" only for a bare local part (RFC 5321 4.1.1.3 allows `<Postmaster>` alone); hygiene
    refuses those, and delivery never sends one as a recipient.
    """

    local_part: str  # a Dot-string, or a Quoted-string with its quotes and backslashes
    domain: str  # a Domain (A-labels, or U-labels with SMTPUTF8) or an address literal with its brackets

    @property
    def text(self) -> str:
        """What is stored and sent at MAIL or RCPT (between the angle brackets)."""
        return f"{self.local_part}@{self.domain}" if self.domain else self.local_part

    @property
    def routing_domain(self) -> str:
        """The domain routes, queues, shaping and MX go by: the written one, lower-cased."""
        return self.domain.lower()


@dataclass(frozen=True, slots=True)
class Path:
    """A MAIL FROM or RCPT TO path: its mailbox (None for the null path `<>`) and any source route."""

    mailbox: Mailbox | None
    route: tuple[str, ...] = ()  # the domains of an obsolete source route (RFC 5321 4.1.1.3, appendix C)


@dataclass(frozen=True, slots=True)
class Malformed:
    """Why a text is not an RFC 5321 path or mailbox; the reason is safe to show (it never quotes input)."""

    reason: str
    needs_smtputf8: bool = False  # it would be one, but it is not ASCII and SMTPUTF8 was not declared


# RFC 5322 3.2.3 atext, and RFC 6531 3.3's UTF8-non-ascii (the characters below are judged separately).
_ATEXT = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~\u0080-\U0010ffff]"
_DOT_STRING = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")
# RFC 5321 4.1.2: qtextSMTP is %d32-33 / %d35-91 / %d93-126, quoted-pairSMTP a backslash and %d32-126;
# RFC 6531 3.3 adds UTF8-non-ascii to qtextSMTP.
_QUOTED_STRING = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"')
# RFC 5321 4.1.2 sub-domain = Let-dig [Ldh-str]: letters, digits and inner hyphens (RFC 1035 2.3.1).
_LDH_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")
LABEL_MAX = 63  # RFC 1035 2.3.4
_IPV6_TEXT = re.compile(r"[0-9A-Fa-f:.]+")  # no zone index ("%eth0"): RFC 5321 4.1.3 has none

# Zero width (non-)joiners are part of how some scripts are written (IDNA 2008 CONTEXTJ, RFC 5892 A.1-2).
_JOINERS = frozenset("\u200c\u200d")


def _character_fault(text: str) -> str | None:
    """Characters no mailbox may hold, whatever the grammar around them: invisible, control, spacing."""
    for c in text:
        if c.isascii():
            if c < " " or c == "\x7f":
                return "a control character in the address"
            continue
        category = unicodedata.category(c)
        if category == "Cs":  # aiosmtpd decodes bytes that are not UTF-8 as lone surrogates
            return "the address is not valid UTF-8"
        if category == "Cc":
            return "a control character in the address"
        if category[0] == "Z":
            return "a non-ASCII space in the address"
        if category[0] == "C" and c not in _JOINERS:
            # Cf (bidi overrides, zero width space), Co (private use), Cn (unassigned): a reader sees an
            # address other than the one sent (RFC 6530 10.1, spoofing).
            return "an invisible, private-use or unassigned character in the address"
    return None


def split_path(arg: str) -> tuple[str, str]:
    """A MAIL or RCPT argument as (path, ESMTP parameters): the path ends at the ">" outside quotes.

    A path without angle brackets (as lenient clients write it, and aiosmtpd and Postfix take it) ends at
    the first space outside quotes.
    """
    in_quotes = escaped = False
    closer = ">" if arg.startswith("<") else " "
    for i, c in enumerate(arg):
        if escaped:
            escaped = False
        elif in_quotes and c == "\\":
            escaped = True
        elif c == '"':
            in_quotes = not in_quotes
        elif c == closer and not in_quotes:
            end = i + 1 if closer == ">" else i
            return arg[:end], arg[end:].lstrip()
    return arg, ""


def parse_path(text: str) -> Path | Malformed:
    """`<mailbox>`, `<>`, `<@a,@b:mailbox>` or a bare mailbox, as `split_path` cut it."""
    if text.startswith("<"):
        if not text.endswith(">") or len(text) < 2:
            return Malformed("the path has no closing >")
        text = text[1:-1]
        if not text:
            return Path(None)
    route: tuple[str, ...] = ()
    if text.startswith("@"):
        # RFC 5321 4.1.2 A-d-l: "@" Domain *( "," "@" Domain ) ":" before the mailbox.
        adl, colon, text = text.partition(":")
        route = tuple(hop[1:] for hop in adl.split(","))
        if not colon or not all(h.startswith("@") and _domain_fault(h[1:]) is None for h in adl.split(",")):
            return Malformed("a source route that is not @domain,@domain:mailbox (RFC 5321 4.1.2)")
    mailbox = parse_mailbox(text)
    if isinstance(mailbox, Malformed):
        return mailbox
    return Path(mailbox, route)


def parse_mailbox(text: str) -> Mailbox | Malformed:
    """`local@domain` (or a bare local part) by RFC 5321 4.1.2 and RFC 6531 3.3, or why it is not one."""
    fault = _character_fault(text)
    if fault is not None:
        return Malformed(fault)
    local, at, domain = split_mailbox(text)
    if not local:
        return Malformed("an empty local part")
    if local.startswith('"'):
        if not _QUOTED_STRING.fullmatch(local):
            return Malformed("a quoted local part that is not one quoted string (RFC 5321 4.1.2)")
    elif not _DOT_STRING.fullmatch(local):
        return Malformed(_dot_string_fault(local))
    if not at:
        return Mailbox(local, "")
    fault = _domain_fault(domain)
    if fault is not None:
        return Malformed(fault)
    return Mailbox(local, domain)


def split_mailbox(text: str) -> tuple[str, str, str]:
    """(local part, "@", domain) split at the "@" after the local part: a quoted local part may hold "@".

    A text with no "@" outside quotes gives ("text", "", ""). Any "@" inside the domain stays there for
    the domain check to refuse.
    """
    if text.startswith('"'):
        quoted = _QUOTED_STRING.match(text)
        if quoted is not None:
            end = quoted.end()
            if end == len(text):
                return text, "", ""
            if text[end] == "@":
                return text[:end], "@", text[end + 1 :]
    local, at, domain = text.partition("@")
    return local, at, domain


# The usual address, ASCII `dot-string@ldh.labels` (a last label not all digits), which parse_mailbox
# takes as it is: wire_path sends it without the parser's passes (10-20 µs an address, twice a message on
# delivery's hot path; tests/unit/test_address.py holds the two to the same answers).
_ASCII_ATEXT = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]"
_LDH_LABEL63 = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_PLAIN_MAILBOX = re.compile(
    rf"{_ASCII_ATEXT}+(?:\.{_ASCII_ATEXT}+)*@(?:{_LDH_LABEL63}\.)*(?=[A-Za-z0-9-]*[A-Za-z-]){_LDH_LABEL63}"
)


def wire_path(address: str, role: Role, *, smtputf8: bool) -> bytes | Malformed:
    """`<address>` as delivery sends it at MAIL or RCPT, or why it cannot be sent as it is.

    Ingress takes only addresses that pass; this guards what was stored before it did (issue 10 A1).
    A recipient needs a domain; the empty sender is the null reverse-path `<>` (RFC 5321 4.5.5).
    """
    if _PLAIN_MAILBOX.fullmatch(address):
        return b"<" + address.encode("ascii") + b">"
    if not address and role is Role.SENDER:
        return b"<>"
    if not smtputf8 and not address.isascii():
        return Malformed("not ASCII, and the message came without SMTPUTF8 (RFC 6531 3.2)", True)
    mailbox = parse_mailbox(address)
    if isinstance(mailbox, Malformed):
        return mailbox
    if role is Role.RECIPIENT and not mailbox.domain:
        return Malformed("a recipient address needs a domain")
    return b"<" + mailbox.text.encode() + b">"


def domain_of(address: str) -> str:
    """The routing domain of a stored address, split as the parser splits it; "" when it has none."""
    if '"' not in address:  # the usual case: no quoted local part, no "@" but the one before the domain
        _, at, domain = address.rpartition("@")
        return domain.lower() if at else ""
    return split_mailbox(address)[2].lower()


def _dot_string_fault(local: str) -> str:
    if " " in local:
        return "a space outside quotes in the local part"
    if "." in (local[0], local[-1]) or ".." in local:
        return "a dot at the start or end of the local part, or two in a row (RFC 5321 4.1.2)"
    bad = next((c for c in local if c != "." and not re.fullmatch(_ATEXT, c)), "")
    return f"{bad!r} is not allowed in a local part outside quotes (RFC 5321 4.1.2)"


def _domain_fault(domain: str) -> str | None:
    if not domain:
        return "an empty domain"
    if domain.startswith("["):
        return _literal_fault(domain)
    labels = domain.split(".")
    if any(not label for label in labels):
        return "an empty label in the domain (a dot at its start or end, or two in a row)"
    for label in labels:
        if label.isascii():
            if len(label) > LABEL_MAX:
                return f"a domain label longer than {LABEL_MAX} octets (RFC 1035 2.3.4)"
            if not _LDH_LABEL.fullmatch(label):
                return "a domain that is not letters, digits and inner hyphens (RFC 5321 4.1.2)"
        elif not _is_u_label(label):
            return "a domain label that is not a valid IDNA 2008 U-label (RFC 5891)"
    if labels[-1].isdigit():
        return "a domain ending in a number: an IP address goes in brackets, as [192.0.2.1] (RFC 5321 4.1.3)"
    return None


def _is_u_label(label: str) -> bool:
    """A label of an internationalized domain name (RFC 5890 2.3.2.1), judged in lower case.

    idna checks what IDNA 2008 asks (RFC 5891 5.4): permitted code points only, NFC, hyphen rules,
    CONTEXTJ/CONTEXTO and bidi rules, 63 octets once encoded. No UTS 46 mapping: a label that only mapping
    would make valid (a full-width "ｅ") routes and sends as a different name than DNS looks up.
    """
    try:
        idna.alabel(label.lower())
    except (idna.IDNAError, UnicodeError, ValueError):
        return False
    return True


def _literal_fault(domain: str) -> str | None:
    if literal_address(domain) is None:
        return "not an IPv4 or IPv6 address literal, as [192.0.2.1] or [IPv6:2001:db8::1] (RFC 5321 4.1.3)"
    return None


def literal_address(domain: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address an address literal names (RFC 5321 4.1.3), or None when `domain` is not one.

    General address literals (`[tag:content]`) name no address postmux can reach, so they are not one.
    """
    if len(domain) < 3 or domain[0] != "[" or domain[-1] != "]":
        return None
    inner = domain[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            v6 = inner[5:]
            return ipaddress.IPv6Address(v6) if _IPV6_TEXT.fullmatch(v6) else None
        return ipaddress.IPv4Address(inner)
    except ValueError:
        return None


def mailbox_key(address: str) -> str:
    """An address as compared for duplicate recipients: its local part as it is (RFC 5321 2.4: a receiver's
    business), its domain in lower case."""
    local, at, domain = address.rpartition("@")
    return f"{local}{at}{domain.lower()}"
