"""IP warm-up: a new sending IP earns receivers' trust by sending a little more each day.

Each warming member has a schedule (day N allows so many messages, some providers their own), counted
per UTC day. A member at its cap is passed over, so its mail overflows to the pool's other members or to
a named overflow pool instead of waiting. Counts are kept in a small JSON file beside the spool, written
every few seconds, so a restart does not hand a young IP a fresh day's allowance; a crash can forget at
most the last few seconds of counts.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import defaultdict
from datetime import UTC, date, datetime
from pathlib import Path

from postmux.config import MemberSettings

_ALL = "*"  # the key of a member's total across providers


def today_utc(now: float) -> date:
    return datetime.fromtimestamp(now, UTC).date()


def day_cap(member: MemberSettings, provider: str, today: date) -> int | None:
    """Messages this member may send today: to `provider` if it has a schedule of its own, else in all.

    Day 1 is the schedule's start (an earlier date counts as day 1); after the last day there is no cap.
    """
    warmup = member.warmup
    if warmup is None:
        return None
    days = warmup.provider.get(provider, warmup.days) if provider != _ALL else warmup.days
    n = max(1, (today - warmup.start).days + 1)
    return days[n - 1] if n <= len(days) else None


class WarmupLedger:
    """Messages started per (pool, member, provider) today, durable across restarts."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        self.day: date | None = None
        self.counts: dict[str, int] = defaultdict(int)
        self._dirty = False
        self._load()

    @staticmethod
    def _key(pool: str, member: str, provider: str) -> str:
        return f"{pool}/{member}/{provider}"

    def _load(self) -> None:
        if self.path is None or not self.path.exists():
            return
        try:
            raw = json.loads(self.path.read_text())
            self.day = date.fromisoformat(raw["day"])
            self.counts.update({str(k): int(v) for k, v in raw["counts"].items()})
        except (OSError, ValueError, KeyError, TypeError):
            # A damaged ledger must not stop the node: start the day afresh (and say so in the log).
            self.day, self.counts = None, defaultdict(int)

    def _roll(self, now: float) -> None:
        today = today_utc(now)
        if self.day != today:
            self.day, self.counts, self._dirty = today, defaultdict(int), True

    def allows(self, pool: str, member: MemberSettings, provider: str, now: float) -> bool:
        if member.warmup is None:
            return True
        self._roll(now)
        assert self.day is not None
        for scope in (_ALL, provider):
            cap = day_cap(member, scope, self.day)
            if cap is not None and self.counts[self._key(pool, member.name, scope)] >= cap:
                return False
        return True

    def count(self, pool: str, member: MemberSettings, provider: str, now: float) -> None:
        if member.warmup is None:
            return
        self._roll(now)
        self.counts[self._key(pool, member.name, _ALL)] += 1
        if provider in member.warmup.provider:
            self.counts[self._key(pool, member.name, provider)] += 1
        self._dirty = True

    def sent_today(self, pool: str, member: str, provider: str = _ALL) -> int:
        return self.counts.get(self._key(pool, member, provider), 0)

    def flush(self) -> None:
        """Write the counts (atomically: a new file renamed over the old) if they changed."""
        if self.path is None or not self._dirty or self.day is None:
            return
        tmp = self.path.with_suffix(".tmp")
        with contextlib.suppress(OSError):
            tmp.write_text(json.dumps({"day": self.day.isoformat(), "counts": dict(self.counts)}))
            os.replace(tmp, self.path)
            self._dirty = False
