"""A message's text: held in memory, or (when large) partly in a file, so memory stays flat.

A word of its own, like envelope.py and work.py: ingress makes it, the spool keeps it, delivery sends it,
and none of them imports another for it. The text of a message is always `data` followed by `tail`:

- `data` (bytes) is in memory: the whole text of nearly every message, or its first part (the trace
  header postmux prepends, and what ingress read before it started writing to a file);
- `tail` (a `BodyFile`, or None) is the rest, in a file on the local disk: ingress writes a text longer
  than `[smtp] spill_bytes` to a file as it arrives, the spool keeps it (spool/bodies.py), delivery
  streams it. A 50 MB message is never whole in memory (issue 12).

`clean` is a fact ingress found while reading the text, so delivery need not look again: every line ends
with CRLF (no bare CR or LF) and no line starts with "." (no dot-stuffing to add, RFC 5321 4.5.2). Text
stored without it (older spools, DSNs) is checked and repaired on the way out, as before.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

CHUNK = 1 << 18  # bytes read from a body file at a time: memory per message in flight stays this small

# How much of a tail is read for a header section that does not end in `data`: Postfix keeps at most
# this much of a header section (header_size_limit, 102400), and discards the excess.
HEADER_LIMIT = 102_400


class BodyUnreadable(Exception):
    """The tail of a message's text could not be read from its file (gone, or shorter than stored).

    The message's fault, never the member's (so not an OSError, which would read as a lost connection):
    it reaches the dispatcher as a crash of the attempt (scheduling.verdicts.crashed), which tries again
    and holds the message after `[retry] max_local_errors` such attempts.
    """

    @classmethod
    def of(cls, tail: BodyFile, error: OSError) -> BodyUnreadable:
        return cls(f"the text's tail {tail.path} cannot be read: {error}")


@dataclass(frozen=True, slots=True)
class BodyFile:
    """`length` octets of a message's text at `offset` in the file at `path` (a local file)."""

    path: str
    offset: int
    length: int

    def chunks(self, size: int = CHUNK) -> Iterator[bytes]:
        """The octets in order, at most `size` at a time. Raises OSError if the file is gone or short."""
        with open(self.path, "rb", buffering=0) as f:
            fd = f.fileno()
            done = 0
            while done < self.length:
                want = min(size, self.length - done)
                chunk = os.pread(fd, want, self.offset + done)
                if not chunk:
                    raise OSError(f"body file {self.path} ends {self.length - done} octets early")
                done += len(chunk)
                yield chunk

    def read(self) -> bytes:
        """All of it in memory: only for what is known to be small, or must be whole (an operator's view)."""
        return b"".join(self.chunks())

    def head(self, limit: int) -> bytes:
        """At most its first `limit` octets (a header section that did not fit in `data`)."""
        return next(self.chunks(min(limit, CHUNK)), b"") if limit > 0 else b""


def write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to `fd` (os.write may take less than it is given)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def text_size(data: bytes, tail: BodyFile | None) -> int:
    """The whole text's length in octets: what SIZE= says (RFC 1870) and events report."""
    return len(data) + (tail.length if tail is not None else 0)
