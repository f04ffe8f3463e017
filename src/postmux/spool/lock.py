"""One process per spool: an exclusive lock on a file beside it, taken before recovery.

Recovery at open hands every leased recipient back to the queue, because the process that leased it is
presumed dead. A second process on a live spool would "recover" the first one's attempts in flight and
deliver them twice; the lock makes it refuse to start instead, naming the holder.

flock(2) rather than a PID file alone: the kernel drops the lock when its process dies in any way
(kill -9, power loss of the process), so a stale file never keeps the next start out. The PID written
into the file is only there to name the holder in the refusal.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from postmux.spool.base import SpoolError


class SpoolLocked(SpoolError):
    """Another process holds the spool: starting would deliver its work twice."""

    def __init__(self, spool: Path, lock_path: Path, holder: int | None) -> None:
        who = f"process {holder}" if holder is not None else "another process"
        super().__init__(f"spool {spool} is in use by {who} (lock {lock_path}); stop it first")
        self.holder = holder


def lock_path_of(spool: Path) -> Path:
    """`spool.db` -> `spool.db.lock`, in the same directory (a lock elsewhere would not follow a move)."""
    return spool.with_name(spool.name + ".lock")


class SpoolLock:
    """Held from acquire() to release(); a second acquire() anywhere else raises SpoolLocked.

    Locks are per open file, so two SqliteSpools in one process on the same file exclude each other too.
    The descriptor is close-on-exec (Python's default), so children such as ingress workers never keep
    the lock alive after their parent is gone.
    """

    def __init__(self, spool: str | Path) -> None:
        self.spool = Path(spool)
        # Beside the file itself, whatever path named it: a spool reached through a symlink (of the file or
        # of a directory above it) took a lock of its own beside the link, and a second node on it started
        # and delivered the first one's work in flight again.
        self.path = lock_path_of(self.spool.resolve())
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise SpoolLocked(self.spool, self.path, holder) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        """Unlock and close. The file stays: removing it would race with a process about to lock it."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing the last descriptor of the open file drops the lock

    @property
    def held(self) -> bool:
        return self._fd is not None


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
