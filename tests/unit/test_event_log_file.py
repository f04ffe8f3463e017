"""The event log's file (events/log.py) when it cannot be written: a full disk (/dev/full answers every
write with ENOSPC) must not end the log until a restart. The lines wait, bounded, and reach the file once
it takes them again (here: after the operator's SIGHUP reopens the path, pointed elsewhere)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from postmux.events import log as event_log
from postmux.events.log import JsonLinesLog
from postmux.events.types import Event, EventType

FULL = Path("/dev/full")
pytestmark = pytest.mark.skipif(not FULL.exists(), reason="needs /dev/full")


async def test_a_full_disk_keeps_the_lines_and_the_flusher_until_the_file_takes_them(tmp_path: Path) -> None:
    log = JsonLinesLog(FULL, flush_interval_s=0.01)
    await log.start()
    try:
        for n in range(3):
            log(Event(EventType.DELIVERY, id=f"m{n}"))
        await asyncio.sleep(0.1)  # several flushes, each refused
        assert log._task is not None and not log._task.done()  # the flusher goes on
        log(Event(EventType.DELIVERY, id="m3"))
        log.path = tmp_path / "events.jsonl"  # the operator points the log elsewhere, then SIGHUP
        log.reopen()
        await asyncio.sleep(0.05)
    finally:
        await log.stop()
    ids = [json.loads(line)["id"] for line in log.path.read_text().splitlines()]
    assert ids == ["m0", "m1", "m2", "m3"]


async def test_lines_past_the_bound_are_dropped_oldest_first_and_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(event_log, "MAX_PENDING", 2)
    log = JsonLinesLog(FULL, flush_interval_s=3600)  # flushed by hand here
    await log.start()
    try:
        for n in range(5):
            log(Event(EventType.DELIVERY, id=f"m{n}"))
        with pytest.raises(OSError):
            log.flush()
        assert log.dropped == 3
        log.path = tmp_path / "events.jsonl"
        log.reopen()
        log.flush()
    finally:
        await log.stop()
    assert [json.loads(line)["id"] for line in log.path.read_text().splitlines()] == ["m3", "m4"]
