"""The event log: one JSON object per line, buffered and flushed in the background."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import IO

import structlog

from postmux.events.types import Event

log = structlog.get_logger("postmux.events")

# Lines kept while the file cannot be written (a full disk): about 1 KB each, so at most ~100 MB. Past it
# the oldest go, counted in the log; the mail itself is in the spool, and webhooks have their outbox.
MAX_PENDING = 100_000


class JsonLinesLog:
    """Appends events to a file. Lines are buffered and written every `flush_interval_s`, and at close."""

    def __init__(self, path: str | Path, flush_interval_s: float = 0.2) -> None:
        self.path = Path(path)
        self.flush_interval_s = flush_interval_s
        self._pending: list[str] = []
        self._file: IO[str] | None = None
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0  # lines given up while the file could not be written (MAX_PENDING)

    def __call__(self, event: Event) -> None:
        self._pending.append(event.as_json())

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        self._task = asyncio.create_task(self._flusher(), name="event-log")

    def reopen(self) -> None:
        """Write what is pending to the file as it was, then open the path afresh: after logrotate (or an
        operator) moved the file away, new events go to a new file instead of the moved one. If the path
        cannot be opened, the old file is kept (OSError is raised for the caller to report)."""
        if self._file is None:
            return
        with contextlib.suppress(OSError):
            self.flush()  # what the old file still takes; what it refuses (a full disk) goes to the new one
        fresh = self.path.open("a", encoding="utf-8")
        old, self._file = self._file, fresh
        with contextlib.suppress(OSError):
            old.close()

    def flush(self) -> None:
        """Write the pending lines; raises OSError when the file cannot take them, which then wait for the
        next flush (a line may then be written twice: one cut short by the failure, then whole)."""
        if self._pending and self._file is not None:
            lines, self._pending = self._pending, []
            try:
                self._file.write("\n".join(lines) + "\n")
                self._file.flush()
            except OSError:
                kept = lines + self._pending
                self._pending = kept[-MAX_PENDING:]
                self.dropped += len(kept) - len(self._pending)
                raise

    async def _flusher(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.flush_interval_s)
            try:
                self.flush()
            except OSError as e:
                # A full disk must not end the log until a restart: the lines wait, the next turn tries again.
                if not failing:
                    log.error("event log not written; retrying", path=str(self.path), error=str(e))
                failing = True
                continue
            if failing:
                log.info("event log written again", path=str(self.path), dropped=self.dropped)
            failing = False

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            self.flush()  # a failure is the shutdown's to report; the file is closed all the same
        finally:
            if self._file is not None:
                with contextlib.suppress(OSError):
                    self._file.close()
                self._file = None
