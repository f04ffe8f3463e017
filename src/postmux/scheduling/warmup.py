"""IP warm-up: a new sending IP earns receivers' trust by sending a little more each day.

Each warming member has a schedule (day N allows so many messages, some providers their own), counted
per UTC day. A member at its cap is passed over, so its mail overflows to the pool's other members or to
a named overflow pool instead of waiting.

The ledger counts here, where the dispatcher asks on every decision, and keeps the counts in a
`WarmupCounts` store: in memory, or SQLite (`warmup.db` beside the spool), and later a store shared by
several nodes. What was counted since the last flush goes to the store every second and at shutdown, and
the store's totals (every node's, with a shared store) come back: a restart does not hand a young IP a
fresh day's allowance, and a crash forgets at most the last second of counts.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import weakref
from collections import defaultdict
from collections.abc import Iterator, Mapping
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Protocol

import structlog

from postmux.config import MemberSettings

log = structlog.get_logger("postmux.warmup")

_ALL = "*"  # the key of a member's total across providers
_KEEP_DAYS = 7  # past days' counts a store keeps, to look at; the ledger needs only today's


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


# -- the counter store --------------------------------------------------------------------------------


class WarmupCounts(Protocol):
    """Messages started per key ("pool/member/provider") and UTC day.

    Cost: one call per flush (every second while warming members send) and one per day change; each is
    one transaction (SQLite) or one round trip (Redis: HINCRBY per key and HGETALL in one Lua script, the
    day's hash expiring after a week). A store keeps at least today's and yesterday's counts.
    """

    def load(self, day: date) -> dict[str, int]:
        """The day's counts."""
        ...

    def add(self, day: date, deltas: Mapping[str, int]) -> dict[str, int]:
        """Add each delta to its key's count for `day`, all at once; returns all the day's counts after."""
        ...


class MemoryWarmupCounts:
    """Counts in this process's memory: a restart forgets them."""

    def __init__(self) -> None:
        self._days: dict[date, dict[str, int]] = {}

    def load(self, day: date) -> dict[str, int]:
        return dict(self._days.get(day, {}))

    def add(self, day: date, deltas: Mapping[str, int]) -> dict[str, int]:
        counts = self._days.setdefault(day, {})
        for key, n in deltas.items():
            counts[key] = counts.get(key, 0) + n
        oldest = day - timedelta(days=_KEEP_DAYS)
        self._days = {d: c for d, c in self._days.items() if d >= oldest}
        return dict(counts)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS warmup_counts (
    day TEXT NOT NULL,      -- the UTC day, ISO 8601
    key TEXT NOT NULL,      -- pool/member/provider ("*": all providers)
    sent INTEGER NOT NULL,  -- attempts started
    PRIMARY KEY (day, key)
) WITHOUT ROWID
"""


class SqliteWarmupCounts:
    """Counts in a SQLite file of their own (the ledger puts it beside the spool as `warmup.db`).

    Its own file, not a table in the spool's database: the spool has one writer thread, and a second
    writer on its file would have to wait for (or make wait) the spool's commits. WAL with synchronous=NORMAL:
    a commit costs no fsync, and a crash of the process loses nothing committed (as the JSON file it
    replaces, written without fsync). A file that is not a database is set aside and the day starts
    afresh: a damaged ledger must not stop the node. The file is made when first needed (no warming member,
    no file, as before).

    `legacy_json`: the `warmup.json` earlier versions kept; imported at once (an upgrade keeps the day's
    counts), then renamed `.imported`.
    """

    def __init__(self, path: str | Path, legacy_json: str | Path | None = None) -> None:
        self.path = Path(path)
        self._legacy = Path(legacy_json) if legacy_json is not None else None
        self._conn: sqlite3.Connection | None = None
        if self._legacy is not None and self._legacy.exists():
            self._db()

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = conn = self._open()
            # Closed when the store is dropped (the ledger lives as long as the dispatcher).
            weakref.finalize(self, conn.close)
            if self._legacy is not None:
                self._import_json(self._legacy)
        return self._conn

    def _open(self) -> sqlite3.Connection:
        try:
            return self._connect()
        except sqlite3.OperationalError:
            raise  # locked, or no such directory: the file may be sound, so it is left alone
        except sqlite3.DatabaseError as e:  # not a database, or malformed
            aside = self.path.with_name(self.path.name + ".damaged")
            log.error(
                "warm-up counts unreadable; set aside, counting afresh", path=str(self.path), error=str(e)
            )
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(f"{self.path}{suffix}", f"{aside}{suffix}")
            return self._connect()

    def _connect(self) -> sqlite3.Connection:
        # One thread at a time (the event loop's); made in the thread that builds the app.
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(_SCHEMA)
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def load(self, day: date) -> dict[str, int]:
        rows = self._db().execute("SELECT key, sent FROM warmup_counts WHERE day = ?", (day.isoformat(),))
        return {str(k): int(n) for k, n in rows}

    def add(self, day: date, deltas: Mapping[str, int]) -> dict[str, int]:
        iso = day.isoformat()
        with self._transaction() as db:
            db.executemany(
                "INSERT INTO warmup_counts (day, key, sent) VALUES (?, ?, ?)"
                " ON CONFLICT (day, key) DO UPDATE SET sent = sent + excluded.sent",
                [(iso, k, n) for k, n in deltas.items()],
            )
            oldest = (day - timedelta(days=_KEEP_DAYS)).isoformat()
            db.execute("DELETE FROM warmup_counts WHERE day < ?", (oldest,))
            return self.load(day)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _import_json(self, path: Path) -> None:
        """Take over an earlier version's warmup.json: the counts of its day, then rename it.

        Each count is taken as the larger of the file's and the store's, so an import repeated after a
        crash between the commit and the rename counts nothing twice.
        """
        if not path.exists():
            return
        try:
            raw = json.loads(path.read_text())
            day = date.fromisoformat(raw["day"]).isoformat()
            counts = [(day, str(k), int(v)) for k, v in raw["counts"].items()]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.error("warmup.json unreadable; not imported", path=str(path), error=str(e))
            with contextlib.suppress(OSError):
                os.replace(path, path.with_name(path.name + ".unreadable"))
            return
        with self._transaction() as db:
            db.executemany(
                "INSERT INTO warmup_counts (day, key, sent) VALUES (?, ?, ?)"
                " ON CONFLICT (day, key) DO UPDATE SET sent = max(sent, excluded.sent)",
                counts,
            )
        try:
            os.replace(path, path.with_name(path.name + ".imported"))
        except OSError as e:  # imported all the same; the next start imports it again, counting nothing twice
            log.error("warmup.json imported but not renamed", path=str(path), error=str(e))
            return
        log.info("warmup.json imported", path=str(path), day=day, keys=len(counts))


def _store(counts: WarmupCounts | str | Path | None) -> WarmupCounts:
    if counts is None:
        return MemoryWarmupCounts()
    if not isinstance(counts, str | Path):
        return counts
    path = Path(counts)
    return SqliteWarmupCounts(path, legacy_json=path.with_name("warmup.json"))


# -- the ledger -----------------------------------------------------------------------------------------


class WarmupLedger:
    """Messages started per (pool, member, provider) today, durable across restarts in its store.

    `counts`: a store, or the path of a SQLite file (an earlier version's `warmup.json` beside it is
    imported once); None: in memory only.
    """

    def __init__(self, counts: WarmupCounts | str | Path | None = None) -> None:
        self.store = _store(counts)
        self.day: date | None = None
        self.counts: dict[str, int] = defaultdict(int)  # today's, as of the last flush, plus ours since
        self._pending: dict[str, int] = defaultdict(int)  # counted since the last flush

    @staticmethod
    def _key(pool: str, member: str, provider: str) -> str:
        return f"{pool}/{member}/{provider}"

    def _roll(self, now: float) -> None:
        today = today_utc(now)
        if self.day == today:
            return
        self.flush()  # what is left of the day before
        self.day, self._pending = today, defaultdict(int)
        try:
            self.counts = defaultdict(int, self.store.load(today))
        except Exception as e:  # the store is down or damaged: count afresh rather than stop sending
            log.error("warm-up counts not loaded; counting today afresh", error=str(e))
            self.counts = defaultdict(int)

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
        scopes = (_ALL, provider) if provider in member.warmup.provider else (_ALL,)
        for scope in scopes:
            key = self._key(pool, member.name, scope)
            self.counts[key] += 1
            self._pending[key] += 1

    def sent_today(self, pool: str, member: str, provider: str = _ALL) -> int:
        return self.counts.get(self._key(pool, member, provider), 0)

    def flush(self) -> None:
        """Hand what was counted since the last flush to the store, and take its totals back."""
        if not self._pending or self.day is None:
            return
        try:
            totals = self.store.add(self.day, self._pending)
        except Exception as e:  # kept for the next flush: nothing counted is dropped while the node runs
            log.error("warm-up counts not saved; retrying at the next flush", error=str(e))
            return
        self._pending = defaultdict(int)
        self.counts = defaultdict(int, totals)
