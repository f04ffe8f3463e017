"""What only the SQLite spool promises, against real files: group commit, one writer that outlives its
callers, reads beside the writer, the file's rows, upgrade of older files, and the quarantine.

What every backend promises is in tests/contract, which runs on SQLite too.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from postmux.config import SpoolSettings
from postmux.envelope import Envelope, new_message_id
from postmux.spool.base import RecipientState, Selector, Settlement, SpoolError
from postmux.spool.factory import make_spool
from postmux.spool.sqlite import SqliteSpool


def envelope(*rcpts: str, data: bytes = b"Subject: x\r\n\r\nbody\r\n") -> Envelope:
    return Envelope("app@example.com", tuple(rcpts or ("a@one.test",)), data)


async def open_spool(path: Path, **kw: object) -> SqliteSpool:
    spool = SqliteSpool(path, **kw)  # type: ignore[arg-type]
    await spool.open()
    return spool


async def test_concurrent_stores_share_commits(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path / "s.db")
    before = spool.commits
    await asyncio.gather(
        *(spool.store(new_message_id(), envelope(), {"a@one.test": "p"}, 1.0) for _ in range(200))
    )
    grouped = spool.commits - before
    await spool.close()
    single = await open_spool(tmp_path / "t.db", group_commit=False)
    before = single.commits
    await asyncio.gather(
        *(single.store(new_message_id(), envelope(), {"a@one.test": "p"}, 1.0) for _ in range(50))
    )
    assert single.commits - before == 50  # one fsync per message without group commit
    await single.close()
    assert grouped < 200 / 4, grouped


async def test_under_load_the_writer_waits_for_more_requests_before_it_commits(tmp_path: Path) -> None:
    # commit_siblings=1: after the first commit the writer counts as under load, and waits commit_delay for
    # more requests before each commit. Five stores 20 ms apart then share one fsync.
    spool = await open_spool(tmp_path / "s.db", commit_delay_s=0.5, commit_siblings=1)
    await spool.store(new_message_id(), envelope(), {"a@one.test": "p"}, 1.0)
    before, started = spool.commits, time.monotonic()

    async def store_after(delay_s: float) -> float:
        await asyncio.sleep(delay_s)
        await spool.store(new_message_id(), envelope(), {"a@one.test": "p"}, 1.0)
        return time.monotonic() - started

    answered = await asyncio.gather(*(store_after(0.02 * i) for i in range(5)))
    await spool.close()
    assert spool.commits - before == 1
    assert min(answered) >= 0.4  # the first waited for the four after it


async def test_a_lone_caller_never_waits_for_company(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path / "s.db", commit_delay_s=5.0)  # commit_siblings: the default, 4
    started = time.monotonic()
    for _ in range(10):  # one request at a time: each batch is one, so the writer is never under load
        await spool.store(new_message_id(), envelope(), {"a@one.test": "p"}, 1.0)
    await spool.close()
    assert time.monotonic() - started < 5.0


def test_the_commit_delay_is_off_unless_the_spool_section_sets_it(tmp_path: Path) -> None:
    default = make_spool(SpoolSettings(path=str(tmp_path / "a.db")))
    assert isinstance(default, SqliteSpool) and default.commit_delay_s == 0.0
    tuned = make_spool(SpoolSettings(path=str(tmp_path / "b.db"), commit_delay="2ms", commit_siblings=8))
    assert isinstance(tuned, SqliteSpool) and (tuned.commit_delay_s, tuned.commit_siblings) == (0.002, 8)


async def test_a_failing_store_leaves_nothing_half_stored(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path / "s.db")
    # A real SQLite error raised half-way through the store: the message row is written, the recipient not.
    db = sqlite3.connect(tmp_path / "s.db")
    db.execute(
        "CREATE TRIGGER fail BEFORE INSERT ON recipient WHEN NEW.address LIKE 'fail%'"
        " BEGIN SELECT RAISE(ABORT, 'disk on fire'); END"
    )
    db.commit()
    ok = spool.store(new_message_id(), envelope("a@one.test"), {"a@one.test": "p"}, 0)
    bad = spool.store(
        new_message_id(),
        envelope("b@one.test", "fail@one.test"),
        {"b@one.test": "p", "fail@one.test": "p"},
        0,
    )
    results = await asyncio.gather(ok, bad, return_exceptions=True)
    assert isinstance(results[1], SpoolError)
    assert not isinstance(results[0], BaseException)  # the other request in the same batch stands
    await spool.close()
    rows = db.execute("SELECT address FROM recipient").fetchall()
    assert rows == [("a@one.test",)]
    assert db.execute("SELECT count(*) FROM message").fetchone() == (1,)


async def test_a_caller_cancelled_while_waiting_does_not_stop_the_spool(tmp_path: Path) -> None:
    # A cancelled waiter (a client gone, a shutdown) once killed the writer thread with InvalidStateError
    # when its result arrived, and every later request then waited forever.
    spool = await open_spool(tmp_path / "s.db")
    waiters = [
        asyncio.ensure_future(spool.store(new_message_id(), envelope(), {"a@one.test": "p"}, 0))
        for _ in range(50)
    ]
    await asyncio.sleep(0)
    for w in waiters[::2]:
        w.cancel()
    await asyncio.wait_for(asyncio.gather(*waiters, return_exceptions=True), timeout=5)
    counts = await asyncio.wait_for(spool.counts(), timeout=5)
    assert 25 <= counts["leased"] <= 50  # the cancelled ones may or may not have been stored
    assert spool._thread is not None and spool._thread.is_alive()
    await spool.close()


async def test_counting_does_not_wait_for_the_writer(tmp_path: Path) -> None:
    # bench/queue_scale: counting a million rows took 36 ms inside the writer's transaction, holding
    # up every accept; counts now read on a connection of their own while the writer works.
    spool = await open_spool(tmp_path / "s.db")
    await spool.store(
        new_message_id(), envelope("a@one.test", "b@two.test"), {"a@one.test": "p", "b@two.test": "p"}, 0
    )
    writer_busy = asyncio.ensure_future(spool._call(lambda conn: time.sleep(1.0)))
    await asyncio.sleep(0.05)
    counts = await asyncio.wait_for(spool.counts(), timeout=0.5)
    assert counts["leased"] == 2
    assert not writer_busy.done()
    await writer_busy
    await spool.close()


async def test_queue_reads_do_not_wait_for_the_writer(tmp_path: Path) -> None:
    # An operator's listing or stats may pass over the whole queue: like counts, on a connection of its own.
    spool = await open_spool(tmp_path / "s.db")
    mid = new_message_id()
    await spool.store(mid, envelope("a@one.test"), {"a@one.test": "p"}, 0)
    writer_busy = asyncio.ensure_future(spool._call(lambda conn: time.sleep(1.0)))
    await asyncio.sleep(0.05)
    page = await asyncio.wait_for(spool.list_queue(Selector(), 0), timeout=0.5)
    shown = await asyncio.wait_for(spool.show(mid, 0), timeout=0.5)
    stats = await asyncio.wait_for(spool.stats(Selector(), 0), timeout=0.5)
    assert [m.message_id for m in page.messages] == [mid] and shown is not None and len(stats) == 1
    assert not writer_busy.done()
    await writer_busy
    await spool.close()


async def test_the_file_holds_the_bytes_exactly_and_no_row_of_a_finished_message(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path / "s.db")
    raw = b"Subject: =?utf-8?q?caf=C3=A9?=\r\nX-Odd:   spaced  \r\n\r\n\xc3\xa9 8bit body\r\n"
    kept, done = new_message_id(), new_message_id()
    await spool.store(kept, envelope("a@one.test", data=raw), {"a@one.test": "p"}, 0)
    [work] = await spool.store(done, envelope("b@one.test"), {"b@one.test": "p"}, 0)
    rids = [r.rid for r in work.recipients]
    await spool.settle([Settlement(done, rids, RecipientState.DELIVERED, "250 ok", attempts=1)], now=1)
    await spool.close()
    db = sqlite3.connect(tmp_path / "s.db")
    assert db.execute("SELECT id, data FROM message").fetchall() == [(kept, raw)]
    assert db.execute("SELECT message_id FROM recipient").fetchall() == [(kept,)]


async def test_open_takes_back_every_lease_in_the_file_whoever_owned_it(tmp_path: Path) -> None:
    # One process holds a SQLite spool (spool/lock.py): a lease of any other owner is a dead process's.
    first = await open_spool(tmp_path / "s.db", owner="node-a", lease_ttl_s=3600)
    await first.store(new_message_id(), envelope(), {"a@one.test": "p"}, 0)
    await first.close()
    second = SqliteSpool(tmp_path / "s.db", owner="node-b")
    assert await second.open() == 1
    [item] = await second.lease_due(now=1, limit=10)
    await second.close()
    assert [r.address for r in item.recipients] == ["a@one.test"]


def test_a_lease_ttl_must_be_a_positive_finite_time(tmp_path: Path) -> None:
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="lease_ttl_s"):
            SqliteSpool(tmp_path / "s.db", lease_ttl_s=bad)


_OLD_SCHEMA = """
CREATE TABLE message (id TEXT PRIMARY KEY, sender TEXT NOT NULL, client_ip TEXT NOT NULL DEFAULT '',
    smtputf8 INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL, data BLOB NOT NULL);
CREATE TABLE recipient (rid INTEGER PRIMARY KEY, message_id TEXT NOT NULL, address TEXT NOT NULL,
    pool TEXT NOT NULL, domain TEXT NOT NULL, state TEXT NOT NULL, due REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, last_reply TEXT NOT NULL DEFAULT '');
INSERT INTO message VALUES ('m1', 'app@example.com', '', 0, 1.0, x'5375626a6563743a20780d0a0d0a');
INSERT INTO recipient (message_id, address, pool, domain, state, due, attempts)
    VALUES ('m1', 'a@one.test', 'p', 'one.test', 'queued', 2.0, 4),
           ('m1', 'b@one.test', 'p', 'one.test', 'leased', 2.0, 4);
"""


async def test_a_spool_file_from_before_rounds_and_held_is_upgraded_at_open(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(_OLD_SCHEMA)
    db.close()
    spool = SqliteSpool(path)
    assert await spool.open() == 1
    assert spool.quarantined == 0
    [item] = await spool.lease_due(now=2, limit=10)
    assert sorted((r.address, r.attempts, r.rounds, r.local_errors) for r in item.recipients) == [
        ("a@one.test", 4, 0, 0),
        ("b@one.test", 4, 0, 0),
    ]
    await spool.close()
    again = await open_spool(path)  # a second open finds the columns there and leaves them
    await again.close()


async def test_quarantine_keeps_held_rows_and_moves_rows_whose_counters_are_not_numbers(
    tmp_path: Path,
) -> None:
    spool = await open_spool(tmp_path / "s.db")
    mid = new_message_id()
    [work] = await spool.store(
        mid, envelope("a@one.test", "b@one.test"), {"a@one.test": "p", "b@one.test": "p"}, 0
    )
    a, b = work.recipients
    await spool.settle([Settlement(mid, [a.rid], RecipientState.HELD, "451", local_errors=3)], now=1)
    await spool.close()
    db = sqlite3.connect(tmp_path / "s.db")
    db.execute("UPDATE recipient SET rounds = 'many' WHERE rid = ?", (b.rid,))
    db.commit()
    again = SqliteSpool(tmp_path / "s.db")
    await again.open()
    assert again.quarantined == 1
    assert (await again.counts())["held"] == 1
    await again.close()
    [(key, reason)] = db.execute("SELECT key, reason FROM quarantine").fetchall()
    assert key == str(b.rid) and "rounds" in reason


# The schema before leases had an owner and an expiry (postmux 0.1 up to issue 11).
_SCHEMA_BEFORE_OWNERS = """
CREATE TABLE message (id TEXT PRIMARY KEY, sender TEXT NOT NULL, client_ip TEXT NOT NULL DEFAULT '',
    smtputf8 INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL, data BLOB NOT NULL);
CREATE TABLE recipient (rid INTEGER PRIMARY KEY, message_id TEXT NOT NULL, address TEXT NOT NULL,
    pool TEXT NOT NULL, domain TEXT NOT NULL, state TEXT NOT NULL, due REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, last_reply TEXT NOT NULL DEFAULT '',
    rounds INTEGER NOT NULL DEFAULT 0, local_errors INTEGER NOT NULL DEFAULT 0);
CREATE INDEX recipient_due ON recipient(state, due);
CREATE INDEX recipient_message ON recipient(message_id);
INSERT INTO message VALUES ('m1', 'app@example.com', '', 0, 1.0, x'5375626a6563743a20780d0a0d0a');
INSERT INTO recipient (message_id, address, pool, domain, state, due, attempts, rounds)
    VALUES ('m1', 'a@one.test', 'p', 'one.test', 'leased', 2.0, 1, 1),
           ('m1', 'b@one.test', 'p', 'one.test', 'held', 2.0, 3, 1);
"""


async def test_a_spool_file_from_before_lease_owners_is_upgraded_at_open_and_leases_can_expire(
    tmp_path: Path,
) -> None:
    path = tmp_path / "before.db"
    db = sqlite3.connect(path)
    db.executescript(_SCHEMA_BEFORE_OWNERS)
    db.close()
    spool = SqliteSpool(path, owner="node-1", lease_ttl_s=60)
    assert await spool.open() == 1
    assert spool.quarantined == 0
    [item] = await spool.lease_due(now=2, limit=10)
    assert [(r.address, r.attempts, r.rounds) for r in item.recipients] == [("a@one.test", 1, 1)]
    [taken_over] = await spool.lease_due(now=62, limit=10)  # the new columns and index work
    assert [r.address for r in taken_over.recipients] == ["a@one.test"]
    shown = await spool.show("m1", 62)
    await spool.close()
    assert shown is not None
    assert [(r.state, r.owner, r.lease_until) for r in shown.recipients] == [
        ("leased", "node-1", 122),
        ("held", "", None),
    ]


async def test_a_spool_file_from_before_attempts_were_kept_gets_the_table_and_columns_at_open(
    tmp_path: Path,
) -> None:
    path = tmp_path / "before.db"
    db = sqlite3.connect(path)
    db.executescript(_SCHEMA_BEFORE_OWNERS)
    db.close()
    spool = await open_spool(path)
    [item] = await spool.lease_due(now=2, limit=10)
    [a] = item.recipients
    shown = await spool.show("m1", 2)
    assert shown is not None and shown.attempts == ()
    assert [(r.last_member, r.last_at) for r in shown.recipients] == [("", None), ("", None)]
    await spool.settle([Settlement("m1", [a.rid], RecipientState.QUEUED, "451", due=9, member="x")], now=3)
    shown = await spool.show("m1", 3)
    await spool.close()
    assert shown is not None
    assert [(x.member, x.reply, x.at) for x in shown.attempts] == [("x", "451", 3)]
    assert shown.recipients[0].last_member == "x"


async def test_a_message_delivered_at_its_first_attempt_writes_no_attempt_row(tmp_path: Path) -> None:
    # The hot path: a delivered recipient's attempt is kept only when its message stays in the queue.
    spool = await open_spool(tmp_path / "s.db")
    mid = new_message_id()
    [work] = await spool.store(
        mid, envelope("a@one.test", "b@one.test"), {"a@one.test": "p", "b@one.test": "p"}, 0
    )
    a, b = (r.rid for r in work.recipients)
    await spool.settle(
        [
            Settlement(mid, [a], RecipientState.DELIVERED, "250", member="m"),
            Settlement(mid, [b], RecipientState.DELIVERED, "250", member="m"),
        ],
        now=1,
    )
    bounced = new_message_id()
    [work] = await spool.store(bounced, envelope("c@one.test"), {"c@one.test": "p"}, 0)
    await spool.settle(
        [Settlement(bounced, [work.recipients[0].rid], RecipientState.BOUNCED, "550", member="m")], now=1
    )
    await spool.close()
    db = sqlite3.connect(tmp_path / "s.db")
    assert db.execute("SELECT count(*) FROM attempt").fetchone() == (0,)  # written and removed with it


async def test_the_checkpointer_copies_the_wal_into_the_database_beside_the_writer(tmp_path: Path) -> None:
    import os
    import threading

    spool = await open_spool(tmp_path / "s.db")
    empty = os.path.getsize(tmp_path / "s.db")
    await asyncio.gather(
        *(spool.store(new_message_id(), envelope(), {"a@one.test": "p"}, 1.0) for _ in range(300))
    )
    # The writer's own checkpoint waits for 64 MB of WAL: only the checkpointer thread can have grown the
    # database file this soon.
    deadline = time.monotonic() + 5
    while os.path.getsize(tmp_path / "s.db") <= empty and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert os.path.getsize(tmp_path / "s.db") > empty
    await spool.close()
    assert not [t for t in threading.enumerate() if t.name == "postmux-spool-ckpt"]


async def test_a_message_goes_with_its_last_recipient_and_stays_while_another_is_open(tmp_path: Path) -> None:
    # The usual settlement (the message's last recipients, final) deletes at once instead of updating
    # first; the count it goes by leaves the settled recipients out, so one already final cannot hide
    # another still open.
    spool = await open_spool(tmp_path / "s.db")
    rcpts = ("a@one.test", "b@one.test")
    [item] = await spool.store("m1", envelope(*rcpts), dict.fromkeys(rcpts, "p"), 1.0)
    a, b = (r.rid for r in item.recipients)
    await spool.settle([Settlement("m1", [a], RecipientState.BOUNCED, "550 no")], 2.0)
    await spool.settle([Settlement("m1", [a], RecipientState.DELIVERED, "250 ok", member="x")], 3.0)
    db = sqlite3.connect(tmp_path / "s.db")
    assert db.execute("SELECT rid, state FROM recipient ORDER BY rid").fetchall() == [
        (a, "delivered"),
        (b, "leased"),
    ]
    await spool.settle([Settlement("m1", [b], RecipientState.DELIVERED, "250 ok", member="x")], 4.0)
    assert db.execute("SELECT count(*) FROM recipient").fetchone() == (0,)
    assert db.execute("SELECT count(*) FROM message").fetchone() == (0,)
    await spool.close()
