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


def line_pieces(line: bytes, width: int = FOLD_WIDTH, spaced: bool = False) -> list[Piece]:
    """How `line` (a text line without its CRLF) is broken into lines of at most `width` octets (>= 2).

    The pieces cover `line` end to end, in order; every one but the first starts with a space or tab,
    its own or an inserted one, and the first holds at least two octets, so none is a lone ".".
    (`spaced`: `line` is the rest of a longer one, after a break that inserts a SPACE; see LongLine.)
    """
    pieces: list[Piece] = []
    start = 0
    last = len(line.rstrip(_WSP))  # a break needs something other than whitespace after it
    while len(line) - start + spaced > width:
        stop = _next_stop(line, start, spaced, width, last)
        pieces.append(Piece(start, stop, spaced))
        start, spaced = stop, line[stop] not in _WSP
    pieces.append(Piece(start, len(line), spaced))
    return pieces


def _next_stop(line: bytes, start: int, spaced: bool, width: int, last: int) -> int:
    """Where the piece that starts at `start` ends: it fills a line of `width` octets at most."""
    end = start + width - spaced  # line[start:end] fills the line
    stop = _before_whitespace(line, start, end, last)
    return _after_octets(line, start, end) if stop is None else stop


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


class LongLine:
    """One long text line folded as it arrives, a part at a time: `fold_long_lines` for a line of any size.

    `feed` gives the line's octets in order (no CRLF among them), `end` says it has ended; each returns
    the folded text that is certain by then, so only the line's last unfinished piece is held: what
    `fold_long_lines` makes of the line and its CRLF, cut into parts. A piece is certain once something
    other than whitespace follows where it must end (`line_pieces` breaks before the last space or tab
    that fits, and only before something that is not whitespace); a run of spaces or tabs is held
    until the line goes on past it or ends.

    With `repair` ([smtp] line_endings = "normalize", hygiene.normalize_line_endings after folding),
    each bare CR or LF becomes CRLF and a part of the line that follows one loses a leading dot when it
    holds more than the dot (RFC 5321 4.5.2).
    """

    def __init__(self, width: int = FOLD_WIDTH, *, repair: bool = False) -> None:
        self.width = width
        self.repair = repair
        # The part of the line between bare line ends (`_fold`'s unit) that is not yet written out.
        self._rest = b""
        self._spaced = False  # _rest's first piece gets an inserted SPACE
        self._after_bare = False  # this part follows a bare CR or LF
        self._begun = False  # some of this part has been written out

    def feed(self, octets: bytes) -> bytes:
        if b"\r" not in octets and b"\n" not in octets:
            self._rest += octets
            return self._certain()
        parts = _BARE_LINE_END.split(octets)  # text, bare end, text, ..., text
        out = []
        for i in range(0, len(parts), 2):
            if i:
                out += [self._finish(), _CRLF if self.repair else parts[i - 1]]
                self._rest, self._spaced, self._after_bare, self._begun = b"", False, True, False
            self._rest += parts[i]
            out.append(self._certain())
        return b"".join(out)

    def end(self) -> bytes:
        """The rest of the line, folded, with its CRLF."""
        return self._finish() + _CRLF

    def _certain(self) -> bytes:
        rest, start, spaced, width = self._rest, 0, self._spaced, self.width
        last = len(rest.rstrip(_WSP))  # what follows can only move it further on
        pieces = []
        while last > start + width - spaced:  # the piece's end is known: line_pieces makes the same cut
            stop = _next_stop(rest, start, spaced, width, last)
            pieces.append(b" " * spaced + rest[start:stop])
            start, spaced = stop, rest[stop] not in _WSP
        if not pieces:
            return b""
        pieces[0] = self._undotted(pieces[0])
        self._begun = True
        self._rest, self._spaced = rest[start:], spaced
        pieces.append(b"")
        return _CRLF.join(pieces)

    def _finish(self) -> bytes:
        rest = self._rest
        folded = [
            b" " * p.spaced + rest[p.start : p.stop] for p in line_pieces(rest, self.width, self._spaced)
        ]
        folded[0] = self._undotted(folded[0])
        return _CRLF.join(folded)

    def _undotted(self, first: bytes) -> bytes:
        """The first piece written out of a part: without its dot, if repair takes it (see the class)."""
        if self.repair and self._after_bare and not self._begun and first[:1] == b"." and len(first) > 1:
            return first[1:]
        return first
