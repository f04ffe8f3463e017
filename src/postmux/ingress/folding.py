"""Long text lines broken into lines of at most 998 octets, as Postfix's smtp_line_length_limit does.

RFC 5321 4.5.3.1.6 and RFC 5322 2.1.1 allow 998 octets a line before the CRLF. Applications write more
(unwrapped HTML, long To: or References: fields); Postfix accepts them and, on the way out, breaks each
line longer than 998 octets by inserting CRLF SPACE ("to minimize the damage to MIME formatted mail",
postconf(5)): every line it adds starts with whitespace, so none can be read as a header field, a MIME
boundary or the "." that ends DATA. postmux does the same once, when it takes the message in
(`DataText` in ingress/data.py), so what is stored is what goes on the wire and any later signature
covers it. One refinement: where the part that fits holds a space or a tab, the break goes just before
the last one, and nothing is inserted but the CRLF. RFC 5322 2.2.3 unfolding (removing a CRLF that is
followed by whitespace) then gives a header field back octet for octet, and HTML renders as before;
only a line with no whitespace to break at gets Postfix's inserted SPACE (after 998 octets, moved back
so as not to split a UTF-8 character).

A receiver cannot undo the breaks in a message's body: it cannot tell an inserted CRLF from one the
sender wrote. The sender who needs long lines kept must encode them (quoted-printable or base64).
"""

from __future__ import annotations

import re
from typing import NamedTuple

FOLD_WIDTH = 998  # RFC 5321 4.5.3.1.6 / RFC 5322 2.1.1: octets in a line, the CRLF not counted

_CRLF = b"\r\n"
_WSP = b" \t"  # RFC 5322 2.2.3: folding whitespace
_BARE_LINE_END = re.compile(rb"(\r|\n)")  # in a line split at CRLF, every CR or LF left is bare


class Piece(NamedTuple):
    """One line of a folded line: `line[start:stop]`, after an inserted SPACE if `spaced`."""

    start: int
    stop: int
    spaced: bool


def line_pieces(line: bytes, width: int = FOLD_WIDTH) -> list[Piece]:
    """How `line` (a text line without its CRLF) is broken into lines of at most `width` octets (>= 2).

    The pieces cover `line` end to end, in order; every one but the first starts with a space or tab,
    its own or an inserted one, and the first holds at least two octets, so none is a lone ".".
    """
    pieces: list[Piece] = []
    start, spaced = 0, False
    last = len(line.rstrip(_WSP))  # a break needs something other than whitespace after it
    while len(line) - start + spaced > width:
        end = start + width - spaced  # line[start:end] fills the line
        stop = _before_whitespace(line, start, end, last)
        if stop is None:
            stop = _after_octets(line, start, end)
        pieces.append(Piece(start, stop, spaced))
        start, spaced = stop, line[stop] not in _WSP
    pieces.append(Piece(start, len(line), spaced))
    return pieces


def _before_whitespace(line: bytes, start: int, end: int, last: int) -> int | None:
    """The last space or tab in line[start:end + 1] after something that is not whitespace, if any."""
    segment = line[start:end]
    first = start + len(segment) - len(segment.lstrip(_WSP))  # the piece's first octet that is not WSP
    low, high = max(first + 1, start + 2), min(end + 1, last)
    at = max(line.rfind(b" ", low, high), line.rfind(b"\t", low, high))
    return at if at >= 0 else None


def _after_octets(line: bytes, start: int, end: int) -> int:
    """`end`, or up to 3 octets before it when line[end] continues a UTF-8 character (RFC 3629 3)."""
    for stop in range(end, max(start + 1, end - 4), -1):
        if not 0x80 <= line[stop] <= 0xBF:
            return stop
    return end  # not UTF-8: cut where the room ends, as Postfix does


def fold_long_lines(text: bytes, width: int = FOLD_WIDTH) -> bytes:
    """`text` (lines ended by CRLF) with every line longer than `width` octets broken by `line_pieces`.

    Nothing else changes: only CRLF, and SPACE where there was no whitespace to break at, are inserted.
    """
    lines = text.split(_CRLF)
    for i, line in enumerate(lines):
        if len(line) > width:
            lines[i] = _fold(line, width)
    return _CRLF.join(lines)


def _fold(line: bytes, width: int) -> bytes:
    if b"\r" in line or b"\n" in line:
        # A bare CR or LF is a line end once [smtp] line_endings = "normalize" repairs it into CRLF (else
        # the message is refused): fold the lines between them, or a break just after one would become a
        # blank line, which ends a message's header section (RFC 5322 2.1).
        parts = _BARE_LINE_END.split(line)  # line, bare end, line, ..., line
        parts[::2] = [_fold(part, width) if len(part) > width else part for part in parts[::2]]
        return b"".join(parts)
    pieces = line_pieces(line, width)
    return _CRLF.join(b" " * p.spaced + line[p.start : p.stop] for p in pieces)
