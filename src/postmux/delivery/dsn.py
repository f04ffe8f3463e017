"""Delivery status notifications (RFC 3464) for recipients that failed for good.

The report is assembled by hand as bytes, not with ``email.message``: the third part must carry the
original header block exactly as received (RFC 3462 text/rfc822-headers), and re-serialising it
through the ``email`` package would re-fold and re-encode headers the sender may want to inspect.
"""

from __future__ import annotations

import os
import re
import textwrap
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from email.utils import formatdate
from typing import Final

from postmux.body import HEADER_LIMIT, BodyFile
from postmux.envelope import Envelope
from postmux.reply import Reply

CRLF: Final = "\r\n"
# RFC 5322 2.1.1: a line MUST NOT exceed 998 octets (CRLF excluded) and SHOULD NOT exceed 78.
MAX_LINE: Final = 998
SOFT_LINE: Final = 78
_TRUNCATED: Final = "..."
# RFC 3464 2.3.4 takes an RFC 3463 status-code; anything else falls back to the generic failure.
_STATUS = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
# The first empty line ends the header block (RFC 5322 2.1); tolerate bare LF from sloppy clients.
_HEADER_END = re.compile(rb"(\r?\n)\r?\n")
_BARE_LF = re.compile(rb"(?<!\r)\n")
# CR, LF and other controls in a value would end a line early or smuggle in a header field.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")

SUBJECT: Final = "Undelivered Mail Returned to Sender"
EXPIRED_SUBJECT: Final = f"Delivery expired: {SUBJECT}"
GENERIC_FAILURE: Final = "5.0.0"
# RFC 3463 3.5: X.4.7 "delivery time expired"; the class stays 4 as the last reply was transient.
EXPIRED_STATUS: Final = "4.4.7"


@dataclass(frozen=True, slots=True)
class FailedRecipient:
    """One recipient the DSN reports on, with its own last reply (RFC 3464 2.3.6: the diagnostic is that
    recipient's).

    `remote_mta`: the server that gave `reply` ("host" or "host:port"); "" when postmux made the reply
    itself (a timeout, a connection that could not be made, SMTPUTF8 not offered, no usable member).
    `expired`: the recipient failed because its queue lifetime ran out, not for its last reply alone.
    """

    address: str
    reply: Reply
    remote_mta: str = ""
    expired: bool = False


def build_dsn(
    *,
    original_sender: str,
    original_message: bytes,
    message_id: str,
    failed: Sequence[FailedRecipient],
    reporting_mta: str,
    arrival: float,
    now: float,
    expired: bool = False,
) -> Envelope | None:
    """The non-delivery report to send back to ``original_sender``, or None when none may be sent.

    ``expired``: every recipient expired (as if each said so); recipients may also say it one by one, so
    that one report can hold bounced and expired recipients of the same message.

    RFC 5321 6.1 / RFC 3464 (and 4.2.5 of RFC 5321): a message from the null sender is itself a
    notification, and answering it could loop forever, so it never gets a DSN.
    """
    if not original_sender or not failed:
        return None
    if expired:
        failed = [replace(r, expired=True) for r in failed]
    expired = all(r.expired for r in failed)  # the subject says so only when it is true of every one
    headers = original_headers(original_message)
    # RFC 6533 3: a report about internationalized mail (a UTF-8 address or diagnostic, UTF-8 header
    # fields, a UTF-8 sender) is a message/global-delivery-status, with message/global-headers.
    international = not (
        original_sender.isascii()
        and headers.isascii()
        and all(r.address.isascii() and str(r.reply).isascii() for r in failed)
    )
    text = _human_part(reporting_mta, failed, arrival)
    status = _status_part(reporting_mta, message_id, failed, arrival, now)
    boundary = _boundary((text, status, headers))
    head = _top_headers(original_sender, reporting_mta, now, expired, boundary)
    data = _assemble(head, boundary, text, status, headers, international=international)
    # RFC 6531 3.2 / RFC 6532 3: UTF-8 in an address or header field needs SMTPUTF8 on the way back;
    # UTF-8 only in the human text body needs no more than 8BITMIME (RFC 6152). A global report is sent
    # with SMTPUTF8 where the next hop offers it, and downgraded (`downgraded`) where it does not.
    return Envelope(sender="", recipients=(original_sender,), data=data, smtputf8=international)


def status_code(reply: Reply, *, expired: bool) -> str:
    """The RFC 3464 2.3.4 Status for a recipient whose last reply was ``reply``."""
    if expired and (reply.is_transient or reply.enhanced_code.startswith("4.")):
        return EXPIRED_STATUS
    if _STATUS.match(reply.enhanced_code):
        return reply.enhanced_code
    return GENERIC_FAILURE


def remote_host(remote: str) -> str:
    """The host of a remote as members and MX hosts are named ("relay.example:2525", "192.0.2.1:25",
    "[2001:db8::1]:25", "mx.example"), for Remote-MTA: RFC 3464 2.3.5's "dns" type holds a host name
    (an address literal at most), and a ":port" makes it neither."""
    host = _clean(remote)
    bracketed = re.fullmatch(r"\[([^\]]*)\](?::\d+)?", host)
    if bracketed:
        return bracketed.group(1)
    name, colon, port = host.rpartition(":")
    if colon and port.isdigit() and ":" not in name:  # a bare IPv6 address keeps its colons
        return name
    return host


def original_head(data: bytes, tail: BodyFile | None) -> bytes:
    """What a DSN needs of a message's text (data, then tail): enough to hold its header section.

    `data` alone when the header section ends in it (the usual case: no file is read), else `data` and
    the first HEADER_LIMIT octets of the tail; a large body never enters memory for a bounce. A tail that
    cannot be read leaves what `data` holds: the sender is owed the notification all the same.
    """
    if tail is None or data.startswith((b"\r\n", b"\n")) or _HEADER_END.search(data):
        return data
    try:
        return data + tail.head(HEADER_LIMIT)
    except OSError:
        return data


def original_headers(message: bytes) -> bytes:
    """The header block of ``message`` as received, ending in CRLF, without the blank line or body.

    Only the headers go back (RFC 3462 text/rfc822-headers): the body may be large or private.
    Bytes are copied unchanged except that bare LF line ends become CRLF, because a DSN sent over
    SMTP must not contain bare LF (RFC 5321 2.3.8).
    """
    if message.startswith((b"\r\n", b"\n")):
        return b""  # an empty header block: the message is all body
    match = _HEADER_END.search(message)
    block = message[: match.end(1)] if match else message  # no separator: it is all headers
    if block and not block.endswith(b"\n"):
        block += b"\r\n"
    return _BARE_LF.sub(b"\r\n", block)


def _top_headers(sender: str, reporting_mta: str, now: float, expired: bool, boundary: str) -> bytes:
    mta = _clean(reporting_mta)
    lines = [
        *_field("From", f'"Mail Delivery System" <MAILER-DAEMON@{mta}>'),
        *_field("To", f"<{_clean(sender)}>"),
        *_field("Subject", EXPIRED_SUBJECT if expired else SUBJECT),
        f"Date: {formatdate(now)}",
        *_field("Message-ID", f"<{uuid.uuid4().hex}.dsn@{mta}>"),
        # RFC 3834 5: marks the DSN as automatic so that auto-responders do not answer it.
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        # RFC 3462 (RFC 6522) 3: the report type names the machine-readable second part.
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
    ]
    return _lines(lines)


def _human_part(reporting_mta: str, failed: Sequence[FailedRecipient], arrival: float) -> bytes:
    lines = [
        f"This is the mail system at {_clean(reporting_mta)}.",
        "",
        "Your message could not be delivered to one or more recipients.",
    ]
    if any(r.expired for r in failed):
        lines.append(f"It was retried since {formatdate(arrival)} until its delivery time expired.")
    lines += ["Its headers are attached below; the body is not returned.", ""]
    for recipient in failed:
        lines.append(_clip(f"<{_clean(recipient.address)}>"))
        lines += textwrap.wrap(
            _explanation(recipient),
            width=SOFT_LINE - 2,
            initial_indent="    ",
            subsequent_indent="    ",
            break_on_hyphens=False,  # keeps enhanced codes and host names in one piece
        )
    return _lines(lines)


def _explanation(recipient: FailedRecipient) -> str:
    reply = _truncate(_clean(str(recipient.reply)), MAX_LINE // 2)
    if recipient.remote_mta:
        return f"host {_clean(recipient.remote_mta)} said: {reply}"
    return f"{reply} (reported by this mail system)"


def _status_part(
    reporting_mta: str,
    message_id: str,
    failed: Sequence[FailedRecipient],
    arrival: float,
    now: float,
) -> bytes:
    # RFC 3464 2.2: per-message fields in the grammar's order, extension (X-) fields last.
    lines = [
        *_field("Reporting-MTA", f"dns; {_clean(reporting_mta)}"),
        f"Arrival-Date: {formatdate(arrival)}",
        *_field("X-Postmux-Queue-ID", _clean(message_id)),
    ]
    for recipient in failed:
        lines.append("")  # RFC 3464 2.1: each per-recipient group follows a blank line
        lines += _recipient_fields(recipient, now)
    return _lines(lines)


def _recipient_fields(recipient: FailedRecipient, now: float) -> list[str]:
    # RFC 3464 2.3: fields in the grammar's order; Will-Retry-Until is left out as no retry follows.
    address = _clean(recipient.address)
    # RFC 6533 3: a non-ASCII address has the "utf-8" type (utf-8-addr-unitext in a global report);
    # "rfc822" is for ASCII addresses.
    kind = "rfc822" if address.isascii() else "utf-8"
    lines = [
        *_field("Final-Recipient", f"{kind}; {address}"),
        "Action: failed",
        f"Status: {status_code(recipient.reply, expired=recipient.expired)}",
    ]
    if recipient.remote_mta:
        # RFC 3464 2.3.5/2.3.6: only a reply that really came from a remote server is an SMTP
        # diagnostic; local failures (timeouts, expiry) are explained in the human-readable part.
        lines += _field("Remote-MTA", f"dns; {remote_host(recipient.remote_mta)}")
        lines += _field("Diagnostic-Code", f"smtp; {_clean(str(recipient.reply))}")
    lines.append(f"Last-Attempt-Date: {formatdate(now)}")
    return lines


# The second and third parts' types (RFC 3464 / RFC 6522), and their RFC 6533 3 counterparts.
STATUS_TYPE: Final = "message/delivery-status"
HEADERS_TYPE: Final = "text/rfc822-headers"
GLOBAL_STATUS_TYPE: Final = "message/global-delivery-status"
GLOBAL_HEADERS_TYPE: Final = "message/global-headers"


def _assemble(
    head: bytes, boundary: str, text: bytes, status: bytes, headers: bytes, *, international: bool
) -> bytes:
    parts = (
        _part("text/plain; charset=utf-8", "Notification", text),
        _part(GLOBAL_STATUS_TYPE if international else STATUS_TYPE, "Delivery report", status),
        _part(GLOBAL_HEADERS_TYPE if international else HEADERS_TYPE, "Undelivered Message Headers", headers),
    )
    return _join(head + b"\r\nThis is a MIME-encapsulated message.\r\n", boundary, parts)


def _part(content_type: str, description: str, body: bytes) -> bytes:
    part_head = [
        f"Content-Type: {content_type}",
        f"Content-Description: {description}",
        # RFC 2045 6.2: declare 8bit when UTF-8 is present so relays do not assume 7bit.
        f"Content-Transfer-Encoding: {'7bit' if body.isascii() else '8bit'}",
    ]
    return _lines(part_head) + b"\r\n" + body


def _join(preamble: bytes, boundary: str, parts: Sequence[bytes]) -> bytes:
    # RFC 2046 5.1.1: the CRLF before a delimiter belongs to it, so each body keeps its own final line
    # end by being followed by one more CRLF.
    delimiter = f"\r\n--{boundary}\r\n".encode()
    return preamble + b"".join(delimiter + part for part in parts) + f"\r\n--{boundary}--\r\n".encode()


_OUR_BOUNDARY = re.compile(rb'boundary="(=_postmux-dsn-[0-9a-f]{24})"')
# RFC 6533 3 utf-8-addr-xtext: QCHAR is printable ASCII but "+", "=" and "\"; anything else is
# EmbeddedUnicodeChar, "\x{HEXPOINT}" (upper-case hex, two digits at least).
_NOT_QCHAR = re.compile(r"[^\x21-\x2a\x2c-\x3c\x3e-\x5b\x5d-\x7e]")
_UTF8_ADDRESS = re.compile(r"^((?:Final|Original)-Recipient): utf-8; (.*)$", re.IGNORECASE)


def utf8_addr_xtext(text: str) -> str:
    """`text` as RFC 6533 3 utf-8-addr-xtext: all ASCII, and the original read back from it exactly."""
    return _NOT_QCHAR.sub(_embedded, text)


def _embedded(m: re.Match[str]) -> str:
    """A character as RFC 6533 3's EmbeddedUnicodeChar, "\\x{HEXPOINT}"."""
    return f"\\x{{{ord(m.group()):02X}}}"


def downgraded(data: bytes) -> bytes | None:
    """A global DSN this module wrote, made fit for a next hop without SMTPUTF8 (RFC 6533 6); None when
    `data` is not one (other mail, or an ASCII report: sent as it is).

    The message/global-delivery-status part becomes message/delivery-status, which is ASCII: a UTF-8
    address keeps its "utf-8" type in utf-8-addr-xtext form, other fields (a UTF-8 diagnostic) have their
    non-ASCII characters written the same way. message/global-headers becomes text/rfc822-headers; the
    header fields themselves are kept as they were received, as 8bit text (RFC 6152): rewriting the
    sender's own header fields would say less than they do. The notification stays text/plain in UTF-8.
    """
    end = data.find(b"\r\n\r\n")
    found = _OUR_BOUNDARY.search(data[: max(end, 0)])
    if found is None:
        return None
    boundary = found.group(1).decode()
    preamble, *parts = data.split(f"\r\n--{boundary}\r\n".encode())
    if len(parts) != 3 or not parts[-1].endswith(f"\r\n--{boundary}--\r\n".encode()):
        return None
    text, status, headers = parts
    headers = headers[: -len(f"\r\n--{boundary}--\r\n")]
    status_head, _, status_body = status.partition(b"\r\n\r\n")
    if f"Content-Type: {GLOBAL_STATUS_TYPE}".encode() not in status_head:
        return None
    headers_body = headers.partition(b"\r\n\r\n")[2]
    return _join(
        preamble,
        boundary,
        (
            text,
            _part(STATUS_TYPE, "Delivery report", _ascii_status(status_body)),
            _part(HEADERS_TYPE, "Undelivered Message Headers", headers_body),
        ),
    )


def _ascii_status(body: bytes) -> bytes:
    """A global-delivery-status body as delivery-status fields: unfolded, encoded, folded again."""
    unfolded = body.decode("utf-8", errors="replace").replace("\r\n ", " ")
    lines: list[str] = []
    for line in unfolded.split("\r\n")[:-1]:  # the body ends in CRLF
        if line.isascii():
            lines += _field(*line.split(": ", 1)) if ": " in line else [line]
            continue
        address = _UTF8_ADDRESS.match(line)
        if address:
            lines += _field(address.group(1), f"utf-8; {utf8_addr_xtext(address.group(2))}")
        else:
            name, _, value = line.partition(": ")
            lines += _field(name, _NON_ASCII.sub(_embedded, value))
    return _lines(lines)


_NON_ASCII = re.compile(r"[^\x00-\x7f]")


def _boundary(bodies: Sequence[bytes]) -> str:
    # RFC 2046 5.1.1: the boundary must not occur in any encapsulated part; "=_" never appears in
    # quoted-printable and 96 random bits make a collision with plain text negligible, but check.
    while True:
        boundary = f"=_postmux-dsn-{os.urandom(12).hex()}"
        if not any(boundary.encode() in body for body in bodies):
            return boundary


def _field(name: str, value: str) -> list[str]:
    """One header-style field, truncated to MAX_LINE octets and folded at spaces (RFC 5322 2.2.3)."""
    line = _truncate(f"{name}: {value}", MAX_LINE)
    if len(line) <= SOFT_LINE:
        return [line]
    first, *words = line.split(" ")
    lines = [first]
    for word in words:
        if len(lines[-1]) + 1 + len(word) > SOFT_LINE and lines[-1].strip():
            lines.append(f" {word}")  # a fold: CRLF followed by the space it replaces
        else:
            lines[-1] += f" {word}"
    return lines


def _clean(value: str) -> str:
    """Control characters (CR and LF above all) replaced by a space, runs of space collapsed."""
    return " ".join(_CONTROL.sub(" ", value).split())


def _truncate(value: str, limit: int) -> str:
    """``value`` cut to at most ``limit`` UTF-8 octets, without splitting a character."""
    raw = value.encode()
    if len(raw) <= limit:
        return value
    return raw[: limit - len(_TRUNCATED)].decode(errors="ignore") + _TRUNCATED


def _clip(line: str) -> str:
    return _truncate(line, MAX_LINE)


def _lines(lines: Sequence[str]) -> bytes:
    return "".join(f"{line}{CRLF}" for line in lines).encode()
