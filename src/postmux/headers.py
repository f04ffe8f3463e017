"""Reading and removing header fields in raw message bytes, without re-serialising anything else.

RFC 5322 2.2: a header field is a line `Name: value` plus any continuation lines that start with a space
or a tab (folding); the header section ends at the first empty line.
"""

from __future__ import annotations


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
    end = header_section_end(data)
    head, body = data[:end], data[end:]
    wanted = name.lower().encode() + b":"
    if wanted[:-1] not in head.lower():
        return data, []  # the common case, at the cost of one search
    kept: list[bytes] = []
    values: list[str] = []
    taking = False
    for line in head.splitlines(keepends=True):
        if taking and line[:1] in (b" ", b"\t"):
            values[-1] += " " + line.strip().decode("utf-8", "replace")
            continue
        taking = line.lower().startswith(wanted)
        if taking:
            values.append(line[len(wanted) :].strip().decode("utf-8", "replace"))
        else:
            kept.append(line)
    if not values:
        return data, []
    return b"".join(kept) + body, values
