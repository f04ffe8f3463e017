"""Reading and removing header fields in raw message bytes, without re-serialising anything else.

RFC 5322 2.2: a header field is a line `Name: value` plus any continuation lines that start with a space
or a tab (folding); the header section ends at the first empty line. RFC 5322 4.5 (obs-optional,
`field-name *WSP ":"`) lets white space stand before the colon, and section 4 says that obsolete syntax
MUST be understood when a message is read: `From :x` is a From field here as it is to DKIM verifiers and
to mail readers, so it cannot slip past a check that looks for `From:` only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_WSP = b" \t"


def header_section_end(data: bytes) -> int:
    """Offset just past the header section (its empty line included), or len(data) when there is none."""
    if data.startswith((b"\r\n", b"\n")):
        return 0
    crlf = data.find(b"\r\n\r\n")
    # An LF LF can only end it first if it starts before the CRLF CRLF's second LF: looking further would
    # read the whole of a CRLF text, which has none (a pass over 100 KB for every message).
    lf = data.find(b"\n\n", 0, crlf + 3 if crlf >= 0 else len(data))
    ends = [i + 4 for i in (crlf,) if i >= 0] + [i + 2 for i in (lf,) if i >= 0]
    return min(ends) if ends else len(data)


def take_header(data: bytes, name: str) -> tuple[bytes, list[str]]:
    """Remove every field called `name` (case-insensitive) from the header section.

    Returns the message without them and their unfolded values; every other byte stays as it was.
    """
    data, taken = take_fields(data, (name,))
    return data, taken.get(name.lower(), [])


def take_fields(data: bytes, names: Iterable[str], *, prefix: str = "") -> tuple[bytes, dict[str, list[str]]]:
    """Remove every field of the given names (case-insensitive) in one pass over the header section.

    Returns the message without them and each name's unfolded values (keyed by the lower-case name,
    only names found); every other byte stays as it was. `prefix`, when all names share it, is looked
    for first: mail without such a field costs one search.
    """
    end = header_section_end(data)
    head, body = data[:end], data[end:]
    lowered = head.lower()
    wanted = {name.lower().encode() for name in names}
    if prefix and prefix.lower().encode() not in lowered:
        return data, {}
    if not any(w in lowered for w in wanted):
        return data, {}  # the common case
    kept: list[bytes] = []
    taken: dict[str, list[str]] = {}
    values: list[str] | None = None
    for line in head.splitlines(keepends=True):
        if values is not None and line[:1] in (b" ", b"\t"):
            values[-1] += " " + line.strip().decode("utf-8", "replace")
            continue
        name, colon, value = line.partition(b":")
        key = name.rstrip(_WSP).lower()  # `Name :` is field Name (RFC 5322 4.5)
        if colon and key in wanted:
            values = taken.setdefault(key.decode(), [])
            values.append(value.strip().decode("utf-8", "replace"))
        else:
            values = None
            kept.append(line)
    if not taken:
        return data, {}
    return b"".join(kept) + body, taken


def field_value(data: bytes, name: str) -> str:
    """The first `name` field's unfolded value ("" when there is none), the bytes left as they are."""
    head = data[: header_section_end(data)]
    return head_field_value(head, head.lower(), name)


def head_field_value(head: bytes, lowered: bytes, name: str) -> str:
    """field_value of a header section already cut out (`head`) and lower-cased (`lowered`)."""
    wanted = name.lower().encode()
    # The first line that starts `name *WSP ":"` (RFC 5322 4.5), not `names:` or `name-x:`.
    match = next(
        filter(None, (_field_start(wanted).match(lowered, at) for at in _line_starts(lowered, wanted))), None
    )
    if match is None:
        return ""
    at = value_at = match.end()
    line_end = at
    while True:  # a folded field goes on over lines that start with white space (RFC 5322 2.2.3)
        line_end = head.find(b"\n", line_end)
        if line_end < 0 or head[line_end + 1 : line_end + 2] not in (b" ", b"\t"):
            break
        line_end += 1
    value = head[value_at : line_end if line_end >= 0 else len(head)]
    return b" ".join(value.split()).decode("utf-8", "replace")


_FIELD_STARTS: dict[bytes, re.Pattern[bytes]] = {}


def _field_start(name: bytes) -> re.Pattern[bytes]:
    """`name *WSP ":"` at a line's start (`name` lower-case)."""
    pattern = _FIELD_STARTS.get(name)
    if pattern is None:
        pattern = _FIELD_STARTS.setdefault(name, re.compile(re.escape(name) + rb"[ \t]*:"))
    return pattern


def has_field(head: bytes, name: str) -> bool:
    """Whether the header section `head` has a field called `name` (case-insensitive, `Name :` too)."""
    lowered = head.lower()
    wanted = name.lower().encode()
    return any(_field_start(wanted).match(lowered, at) for at in _line_starts(lowered, wanted))


def has_obsolete_field(head: bytes, name: str) -> bool:
    """Whether `head` has a field `name` written with white space before its colon (`Name :`, RFC 5322 4.5
    obs-optional): what a check may refuse that has_field takes as the field."""
    lowered = head.lower()
    wanted = name.lower().encode()
    after = len(wanted)
    return any(
        lowered[at + after : at + after + 1] in (b" ", b"\t") and _field_start(wanted).match(lowered, at)
        for at in _line_starts(lowered, wanted)
    )


def _line_starts(lowered: bytes, name: bytes) -> list[int]:
    """Where the lines that start with `name` start."""
    starts = [0] if lowered.startswith(name) else []
    at = lowered.find(b"\n" + name)
    while at >= 0:
        starts.append(at + 1)
        at = lowered.find(b"\n" + name, at + 1)
    return starts
