"""The text of a message as ingress keeps it while reading: in memory up to a point, then in a file.

`[smtp] spill_bytes`: the lines within the first that many octets stay in memory (all of nearly every
message); the rest is written to a new file in the spool's spill directory as it arrives, so a 50 MB
message costs a few blocks of memory, not 50 MB (issue 12). Nothing is fsynced here: the spool takes the
file over (renames it into its own directory) and makes it durable with the message (Spool.store). Until
the text is handed to the acceptor the file is ingress's, and it is deleted with any refusal or failure;
after that it is the spool's, whatever happens (postmux.body).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from postmux.body import BodyFile, write_all


class KeptText:
    """Lines added in order: those within the first `spill_bytes` octets in memory, the rest in a file.

    With no `spill_dir`, or `spill_bytes` 0, everything stays in memory.
    """

    def __init__(self, spill_dir: Path | None = None, spill_bytes: int = 0) -> None:
        self.spill_dir = spill_dir if spill_bytes > 0 else None
        self.spill_bytes = spill_bytes
        self._parts: list[bytes] = []
        self._held = 0  # octets in _parts
        self._fd: int | None = None
        self.path: str | None = None  # the file, while it is ours
        self._written = 0  # octets in the file

    @property
    def size(self) -> int:
        return self._held + self._written

    def add(self, octets: bytes) -> None:
        """Keep `octets` (whole lines) after what is kept. Raises OSError if the file cannot be written."""
        if self.path is None:
            if self.spill_dir is None or self._held + len(octets) <= self.spill_bytes:
                self._parts.append(octets)
                self._held += len(octets)
                return
            # Whole lines stay in memory, up to spill_bytes: the header fields read there (X-Postmux-Pool,
            # acceptor.py) are never cut, and a line is at most 1,000 octets once folded.
            eol = octets.rfind(b"\r\n", 0, self.spill_bytes - self._held)
            if eol >= 0:
                self._parts.append(octets[: eol + 2])
                self._held += eol + 2
                octets = octets[eol + 2 :]
            self._fd, self.path = tempfile.mkstemp(dir=self.spill_dir, prefix="text-", suffix=".tmp")
        assert self._fd is not None, "nothing is added once the tail is taken"
        write_all(self._fd, octets)
        self._written += len(octets)

    def data(self) -> bytes:
        """What is in memory: the whole text, or its lines within the first `spill_bytes` octets."""
        if len(self._parts) > 1:
            self._parts = [b"".join(self._parts)]
        return self._parts[0] if self._parts else b""

    def tail(self) -> BodyFile | None:
        """The rest, in the file (closed: written whole), or None when it all fits in memory."""
        if self.path is None:
            return None
        self._close()
        return BodyFile(self.path, 0, self._written)

    def hand_over(self) -> None:
        """The file is someone else's now (the spool's): it is no longer deleted here."""
        self._close()
        self.path = None

    def discard(self) -> None:
        """Forget everything kept, and delete the file if it is still ours."""
        self._close()
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self.path = None
        self._parts, self._held, self._written = [], 0, 0

    def _close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
