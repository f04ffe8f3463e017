"""What postmux refuses to take in, as pure functions of bytes and strings: line endings, hops, addresses.

Each check returns None when the input is fine, else the exact SMTP reply to refuse it with.
"""

from __future__ import annotations

import enum
import re

from postmux.headers import header_section_end

# RFC 5321 2.3.8 / 4.1.1.4: CR and LF may only appear together, as CRLF. A lone CR or LF is what the SMTP
# smuggling attacks are made of (SEC Consult 2023; CVE-2023-51764, -51765, -51766, CVE-2024-27305):
# `\n.\n`, `\n.\r\n`, `\r.\r`, `\r\n.\r` ... end DATA on a lenient server but not on a strict one.
_ANY_LINE_END = re.compile(rb"(\r\n|\r|\n)")


def has_bare_cr_or_lf(data: bytes) -> bool:
    """Whether some CR or LF is not part of a CRLF (the regex `\\r(?!\\n)|(?<!\\r)\\n`), at memchr speed.

    Every CRLF holds one CR and one LF, so all of them pair up exactly when the three counts are equal.
    The regex, with its look-arounds tried at every byte, cost 11% of postmux's CPU at 50 KB messages
    (bench/README.md, profile_hotpath): 570 µs for 50 KB, the three counts 60 µs.
    """
    pairs = data.count(b"\r\n")
    return data.count(b"\r") != pairs or data.count(b"\n") != pairs


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
    if b"\x00" in data:
        return NUL_IN_DATA
    if not normalize and has_bare_cr_or_lf(data):
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


class Role(enum.Enum):
    SENDER = "sender"
    RECIPIENT = "recipient"


# RFC 3463: X.1.7 is a bad sender's address, X.1.3 a bad destination address.
_BAD_ADDRESS = {Role.SENDER: "553 5.1.7", Role.RECIPIENT: "553 5.1.3"}
LOCAL_PART_MAX = 64  # RFC 5321 4.5.3.1.1
DOMAIN_MAX = 255  # RFC 5321 4.5.3.1.2


def address_refusal(raw: str, address: str, role: Role) -> str | None:
    """A MAIL FROM or RCPT TO path: `raw` as the client wrote it, `address` as aiosmtpd parsed it.

    The null reverse-path (`<>`) is for the caller to let through before asking.
    """
    code = _BAD_ADDRESS[role]
    if any(c in raw or c in address for c in "\r\n\x00"):
        return f"{code} Address contains CR, LF or NUL"
    if raw.lstrip().startswith("<@"):
        # RFC 5321 4.1.1.3 and appendix C: source routes are obsolete; the email parser would quietly drop
        # the route, so refuse instead of guessing what the client meant.
        return f"{code} <{address}>: source routes (@host,@host:user@domain) are not accepted"
    local, at, domain = address.rpartition("@")
    if not at:
        local, domain = address, ""
    if role is Role.RECIPIENT:
        # Percent-hack and bang paths ask the next server to relay again: a classic open-relay trick.
        if "%" in local:
            return f"{code} <{address}>: percent-hack routing (user%host@relay) is not accepted"
        if "!" in local:
            return f"{code} <{address}>: bang paths (host!user) are not accepted"
        if not domain:
            return f"{code} <{address}>: a recipient address needs a domain"
    if len(local.encode("utf-8", "surrogateescape")) > LOCAL_PART_MAX:
        return f"{code} Local part longer than {LOCAL_PART_MAX} octets (RFC 5321 4.5.3.1.1)"
    if len(domain.encode("utf-8", "surrogateescape")) > DOMAIN_MAX:
        return f"{code} Domain longer than {DOMAIN_MAX} octets (RFC 5321 4.5.3.1.2)"
    return None
