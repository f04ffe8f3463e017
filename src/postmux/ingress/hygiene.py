"""What postmux refuses to take in, as pure functions of bytes and strings: line endings, hops, addresses.

Each check returns None when the input is fine (`read_path`: the parsed path), else the exact SMTP reply to
refuse it with.
"""

from __future__ import annotations

import re

import idna

from postmux.address import Malformed, Path, Role, parse_path
from postmux.headers import header_section_end

# Lives in postmux.text, since delivery checks it too; re-exported for those who import it from here.
from postmux.text import has_bare_cr_or_lf

# RFC 5321 2.3.8 / 4.1.1.4: CR and LF may only appear together, as CRLF. A lone CR or LF is what the SMTP
# smuggling attacks are made of (SEC Consult 2023; CVE-2023-51764, -51765, -51766, CVE-2024-27305):
# `\n.\n`, `\n.\r\n`, `\r.\r`, `\r\n.\r` ... end DATA on a lenient server but not on a strict one.
_ANY_LINE_END = re.compile(rb"(\r\n|\r|\n)")


BARE_EOL_IN_COMMAND = "500 5.5.2 Bare CR or LF in command line: lines end with CRLF only (RFC 5321 2.3.8)"
NUL_IN_COMMAND = "500 5.5.2 NUL octet in command line"
BARE_EOL_IN_DATA = (
    "550 5.6.11 Message contains a bare CR or LF: lines end with CRLF only (RFC 5321 2.3.8); "
    "refused as possible SMTP smuggling"
)
NUL_IN_DATA = "550 5.6.11 Message contains a NUL octet (RFC 5322 2.3, RFC 6152)"


def command_line_refusal(line: bytes) -> str | None:
    """A command line as read up to its LF: it must end in CRLF and hold no other CR, and no NUL."""
    if not line.endswith(b"\r\n") or b"\r" in line[:-2]:
        return BARE_EOL_IN_COMMAND
    if b"\x00" in line:
        return NUL_IN_COMMAND
    return None


def data_refusal(data: bytes, *, normalize: bool) -> str | None:
    """The message text after the final dot; with `normalize`, bare CR and LF are repaired, not refused."""
    return text_refusal(nul=b"\x00" in data, bare=has_bare_cr_or_lf(data), normalize=normalize)


def text_refusal(*, nul: bool, bare: bool, normalize: bool) -> str | None:
    """`data_refusal` from what the DATA reader found as the text went by (ingress/data.py, DataText)."""
    if nul:
        return NUL_IN_DATA
    if bare and not normalize:
        return BARE_EOL_IN_DATA
    return None


def normalize_line_endings(data: bytes) -> bytes:
    """Every bare CR or LF becomes CRLF, and the dot-stuffing of the lines it starts is undone.

    aiosmtpd only splits (and un-stuffs, RFC 5321 4.5.2) lines at CRLF; a client that ends lines with a bare
    LF stuffed its dots too, so a line after a bare line end that starts with "." and holds more loses that
    one dot here (RFC 5321 4.5.2); a lone "." stays a line of one dot, never an end of data.
    The result holds only CRLF, and delivery stuffs dots again, so no line of it can end DATA downstream.
    """
    if not has_bare_cr_or_lf(data):
        return data
    parts = _ANY_LINE_END.split(data)  # text, separator, text, separator, ..., text
    out = [parts[0]]
    for i in range(1, len(parts), 2):
        separator, text = parts[i], parts[i + 1]
        if separator != b"\r\n" and text.startswith(b".") and len(text) > 1:
            text = text[1:]
        out += [b"\r\n", text]
    return b"".join(out)


HOPS_EXCEEDED = "554 5.4.6 Too many hops: routing loop detected (RFC 5321 6.3)"


def received_count(data: bytes) -> int:
    """How many Received: trace fields the header section holds (RFC 5321 4.4)."""
    head = data[: header_section_end(data)]
    return sum(1 for line in head.splitlines() if line[:9].lower() == b"received:")


# RFC 3463: X.1.7 is a bad sender's address, X.1.3 a bad destination address. As Postfix: 501 when the
# address is not RFC 5321's, 553 when it is but postmux will not take it.
_BAD_SYNTAX = {
    Role.SENDER: "501 5.1.7 Bad sender address syntax",
    Role.RECIPIENT: "501 5.1.3 Bad recipient address syntax",
}
_BAD_ADDRESS = {Role.SENDER: "553 5.1.7", Role.RECIPIENT: "553 5.1.3"}
# Postfix's words (smtpd.c); RFC 6531 3.5 / RFC 3463 X.6.7: a non-ASCII address without SMTPUTF8.
SMTPUTF8_UNDECLARED = "553 5.6.7 Must declare SMTPUTF8 to send unicode address"
NON_ASCII_PARAMETERS = "501 5.5.4 Syntax error in parameters: not ASCII (RFC 5321 4.1.2)"
NULL_RECIPIENT = (
    f"{_BAD_SYNTAX[Role.RECIPIENT]}: <> is the null reverse-path, for MAIL FROM only (RFC 5321 4.5.5)"
)
# RFC 5321 4.5.3.1.2 allows 255 octets, but a name DNS can look up holds at most 253 characters of text
# (255 on the wire, RFC 1035 2.3.4): a longer one is refused at RCPT, not retried for days at MX lookup.
DOMAIN_MAX = 253


def declares_smtputf8(params: str) -> bool:
    """Whether MAIL's parameters hold SMTPUTF8 (RFC 6531 3.4), read as aiosmtpd reads them after the path."""
    return "SMTPUTF8" in params.upper().split()


def read_path(raw: str, role: Role, *, smtputf8: bool) -> Path | str:
    """A MAIL FROM or RCPT TO path as the client wrote it (`split_path`): parsed, or the reply to refuse it.

    Everything taken here can be sent as it is (postmux.address): an address that could not would fail at
    every attempt, and count against the member trying it (issue 10 A1).
    """
    if not smtputf8 and not raw.isascii():
        # Any byte that is not ASCII, UTF-8 or not, needs SMTPUTF8 (RFC 6531 3.2); Postfix checks it first.
        return SMTPUTF8_UNDECLARED
    path = parse_path(raw)
    if isinstance(path, Malformed):
        return f"{_BAD_SYNTAX[role]}: {path.reason}"
    if path.mailbox is None:
        return NULL_RECIPIENT if role is Role.RECIPIENT else path
    refusal = address_refusal(path, role)
    return path if refusal is None else refusal


def address_refusal(path: Path, role: Role) -> str | None:
    """Paths RFC 5321 can write that postmux will not take: relay tricks, no domain, over its limits."""
    assert path.mailbox is not None
    code, mailbox = _BAD_ADDRESS[role], path.mailbox
    address, local = mailbox.text, mailbox.local_part
    if path.route:
        # RFC 5321 4.1.1.3 and appendix C: source routes are obsolete; the email parser would quietly drop
        # the route, so refuse instead of guessing what the client meant.
        return f"{code} <{address}>: source routes (@host,@host:user@domain) are not accepted"
    if role is Role.RECIPIENT:
        # Percent-hack, bang paths and a quoted "user@host" ask the next server to relay again: classic
        # open-relay tricks (Postfix's allow_untrusted_routing), and a domain no route or limit sees.
        if "%" in local:
            return f"{code} <{address}>: percent-hack routing (user%host@relay) is not accepted"
        if "!" in local:
            return f"{code} <{address}>: bang paths (host!user) are not accepted"
        if "@" in local:
            return f'{code} <{address}>: an @ inside a quoted local part ("user@host") is not accepted'
    if not mailbox.domain:
        return f"{code} <{address}>: a {role.value} address needs a domain"
    # No limit on the local part: RFC 5321 4.5.3.1.1's 64 octets is one RFC 5321 4.5.3.1 asks servers not
    # to enforce ("implementation techniques that impose no limits ... SHOULD be used"), and Postfix does
    # not. Return paths made of an address (VERP, SRS, postmux's own [verp] ones) pass it as a rule: taking
    # fewer than postmux sends would refuse the bounces and complaints its own return paths bring back.
    # The command line's limit (RFC 5321 4.5.3.1.4) bounds it.
    if _dns_length(mailbox.domain) > DOMAIN_MAX:
        return f"{code} Domain longer than {DOMAIN_MAX} octets (RFC 1035 2.3.4, RFC 5321 4.5.3.1.2)"
    return None


def _dns_length(domain: str) -> int:
    """The length of the name DNS is asked: its A-labels for a UTF-8 domain (RFC 5890), else its text."""
    if domain.isascii():
        return len(domain)
    try:
        return len(idna.encode(domain))
    except idna.IDNAError:
        return len(domain.encode())
