"""Where the SQLite spool keeps message texts too large for a row: segment files, one per group commit.

Measured on this machine kind (bench/README.md, "where a body lives"): a 100 KB text in a SQLite row costs
the writer 0.5 ms of CPU (written to the WAL, then again to the database at checkpoint, 0.4 ms of it in
the kernel) and one file per message with its own fsync 0.25-1.3 ms; appending a group commit's texts to
one file and syncing it once costs 0.07 ms. So the writer thread appends every text longer than
`inline_max` in its batch to one new segment file, syncs the file and its directory, and only then
commits the rows that point at it (a row is never durable before the text it names). A text that ingress
already wrote to a file (longer than `[smtp] spill_bytes`) is adopted as a segment of its own: renamed,
never copied.

A segment is removed once no message row names it, after the commit that let it go (a crash in between
leaves an orphan, which `sweep` removes at the next open). A message that must wait (deferred, held)
moves its text out of a segment it shares into its own row, so a segment lives about as long as the
mail it carried took to deliver, and a deferred message holds no one else's bytes on disk.

Everything here runs in the spool's one writer thread (spool/sqlite.py), except `read`, which any thread
may call.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from postmux.body import BodyFile, write_all

log = structlog.get_logger("postmux.spool")

INLINE_MAX = 8192  # texts up to this many octets stay in their row (1.5 KB: the row is 2x cheaper)
# "seg != ''" lets SQLite use the partial index message_seg: without it, a search that runs at every
# delivered message would read the whole message table (bench/queue_scale's million-message spool).
SEG_IN_USE = "SELECT 1 FROM message WHERE seg = ? AND seg != '' LIMIT 1"
MESSAGES_IN_SEG = "SELECT id FROM message WHERE seg = ? AND seg != ''"
HOLD_MAX = 1 << 20  # a text up to this long is read into memory for delivery; longer ones are streamed


@dataclass(frozen=True, slots=True)
class Placed:
    """Where a message's text went: `inline` in the row, then `length` octets of segment `seg`."""

    inline: bytes
    seg: str = ""
    offset: int = 0
    length: int = 0


class BodyStore:
    """The segment files of one spool: `<spool file>.bodies/segments`, and `incoming` for ingress."""

    def __init__(self, spool_path: Path, inline_max: int = INLINE_MAX) -> None:
        root = spool_path.with_name(spool_path.name + ".bodies")
        self.segments = root / "segments"
        self.incoming = root / "incoming"
        self.inline_max = inline_max
        self._seq = itertools.count()
        self._open: tuple[str, int] | None = None  # this batch's segment: name and fd
        self._written = 0  # octets in it
        self._adopted: list[str] = []  # segments adopted in this batch: synced before the commit
        self._doomed: list[str] = []  # segments to remove once the batch's outcome is known
        self._undo: list[str] = []  # segments made by jobs that failed: removed whatever the outcome

    def make_dirs(self) -> None:
        self.segments.mkdir(parents=True, exist_ok=True)
        self.incoming.mkdir(parents=True, exist_ok=True)

    def path(self, seg: str) -> Path:
        return self.segments / seg

    def _new_name(self) -> str:
        # Unique across restarts without asking the disk: time, then a counter of this process.
        return f"{time.time_ns():x}-{os.getpid():x}-{next(self._seq):x}"

    # -- a batch: place and adopt, then before_commit, then after_commit --------------------------------

    def mark(self) -> tuple[int, int]:
        """Before each job of a batch: what `undo` takes back if the job fails."""
        return len(self._adopted), len(self._doomed)

    def undo(self, mark: tuple[int, int]) -> None:
        """The job since `mark` failed and its rows were rolled back: the files it adopted go, and the
        segments it let go of stay (the rows that name them are back)."""
        adopted, doomed = mark
        self._undo += self._adopted[adopted:]
        del self._adopted[adopted:]
        del self._doomed[doomed:]

    def place(self, data: bytes, tail: BodyFile | None) -> Placed:
        """Put a new message's text where it belongs; the caller writes the row from the result."""
        if tail is not None:
            return Placed(data, *self._adopt(tail))
        if len(data) <= self.inline_max:
            return Placed(data)
        if self._open is None:
            name = self._new_name()
            fd = os.open(self.path(name), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            self._open, self._written = (name, fd), 0
        name, fd = self._open
        offset = self._written
        write_all(fd, data)
        self._written += len(data)
        return Placed(b"", name, offset, len(data))

    def _adopt(self, tail: BodyFile) -> tuple[str, int, int]:
        """Ingress's file becomes a segment of its own: renamed into place (same file system), not copied."""
        name = self._new_name()
        os.rename(tail.path, self.path(name))
        self._adopted.append(name)
        return name, tail.offset, tail.length

    def before_commit(self) -> None:
        """Make this batch's texts durable before the rows that name them are committed."""
        if self._open is not None:
            os.fdatasync(self._open[1])
        for name in self._adopted:
            fd = os.open(self.path(name), os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
        if self._open is not None or self._adopted:
            self._sync_dir()

    def after_commit(self, committed: bool) -> None:
        """Close the batch: remove what no committed row can name."""
        made: list[str] = []
        if self._open is not None:
            name, fd = self._open
            os.close(fd)
            made.append(name)
        gone = self._undo + (self._doomed if committed else made + self._adopted)
        self._open, self._written, self._adopted, self._doomed, self._undo = None, 0, [], [], []
        for name in gone:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path(name))

    def _sync_dir(self) -> None:
        fd = os.open(self.segments, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)  # the new names themselves must survive a crash, not only the bytes
        finally:
            os.close(fd)

    # -- rows that let go of a segment -----------------------------------------------------------------

    def release(self, conn: sqlite3.Connection, seg: str) -> None:
        """A row naming `seg` was deleted or moved off it: the file goes after the commit if none is left."""
        if not seg or (self._open is not None and self._open[0] == seg):
            return
        if conn.execute(SEG_IN_USE, (seg,)).fetchone() is None:
            self._doomed.append(seg)

    def settle_in_row(self, conn: sqlite3.Connection, message_id: str) -> None:
        """A message that must wait takes its text out of its segment into its own row, so the segment
        (shared with the rest of its group commit) can go as soon as they are delivered. Texts longer
        than HOLD_MAX (ingress's files, each a segment of its own) stay where they are."""
        row = conn.execute(
            "SELECT data, seg, seg_offset, seg_length FROM message WHERE id = ? AND seg != ''", (message_id,)
        ).fetchone()
        if row is None or row[3] > HOLD_MAX:
            return
        data, seg, offset, length = row
        try:
            text = self.joined(data, seg, offset, length)  # in Python, not SQL: `||` makes text of blobs
        except OSError:
            return  # its file is gone: lease_due parks it as a message without its text

        conn.execute(
            "UPDATE message SET data = ?, seg = '', seg_offset = 0, seg_length = 0 WHERE id = ?",
            (text, message_id),
        )
        self.release(conn, seg)

    # -- reading ---------------------------------------------------------------------------------------

    def file(self, seg: str, offset: int, length: int) -> BodyFile:
        return BodyFile(str(self.path(seg)), offset, length)

    def joined(self, data: bytes, seg: str, offset: int, length: int, limit: int | None = None) -> bytes:
        """A row's text in memory: `data`, then its segment's octets (at most `limit` of them).

        OSError if the segment file is gone or shorter (a damaged spool, or a message delivered meanwhile).
        """
        if not seg:
            return bytes(data)
        return bytes(data) + self.file(seg, offset, length if limit is None else min(length, limit)).read()

    # -- at open ---------------------------------------------------------------------------------------

    def sweep(self, conn: sqlite3.Connection) -> tuple[int, set[str]]:
        """At open: remove files no row names (orphans of a crash, ingress files never handed over), and
        return how many went and which named segments are missing (their messages are quarantined)."""
        removed = 0
        for leftover in self.incoming.iterdir():
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
                removed += 1
        named = {seg for (seg,) in conn.execute("SELECT DISTINCT seg FROM message WHERE seg != ''")}
        present = {p.name for p in self.segments.iterdir()}
        for orphan in present - named:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path(orphan))
                removed += 1
        if removed:
            log.info("spool body files removed at open", files=removed)
        return removed, named - present
