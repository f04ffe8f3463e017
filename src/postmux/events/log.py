"""The event log: one JSON object per line, buffered and flushed in the background."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import IO

from postmux.events.types import Event


class JsonLinesLog:
    """Appends events to a file. Lines are buffered and written every `flush_interval_s`, and at close."""

    def __init__(self, path: str | Path, flush_interval_s: float = 0.2) -> None:
        self.path = Path(path)
        self.flush_interval_s = flush_interval_s
        self._pending: list[str] = []
        self._file: IO[str] | None = None
        self._task: asyncio.Task[None] | None = None

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
        self.flush()
        fresh = self.path.open("a", encoding="utf-8")
        old, self._file = self._file, fresh
        old.close()

    def flush(self) -> None:
        if self._pending and self._file is not None:
            lines, self._pending = self._pending, []
            self._file.write("\n".join(lines) + "\n")
            self._file.flush()

    async def _flusher(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval_s)
            self.flush()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None
