"""The SQLite spool against real files: durability promises, group commit, recovery, atomic bounces."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from postmux.envelope import Envelope, new_message_id
from postmux.spool.base import RecipientState, Settlement, SpoolError
from postmux.spool.sqlite import SqliteSpool


def envelope(*rcpts: str, data: bytes = b"Subject: x\r\n\r\nbody\r\n") -> Envelope:
    return Envelope("app@example.com", tuple(rcpts or ("a@one.test",)), data)


async def open_spool(path: Path, **kw: object) -> SqliteSpool:
    spool = SqliteSpool(path, **kw)  # type: ignore[arg-type]
    await spool.open()
    return spool


async def test_store_keeps_bytes_exactly_and_groups_work_by_pool_and_domain(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path / "s.db")
    raw = b"Subject: =?utf-8?q?caf=C3=A9?=\r\nX-Odd:   spaced  \r\n\r\n\xc3\xa9 8bit body\r\n"
    env = envelope("a@one.test", "b@one.test", "c@two.test", data=raw)
    pools = {"a@one.test": "default", "b@one.test": "default", "c@two.test": "bulk"}
    work = await spool.store(new_message_id(), env, pools, now=100.0)
    groups = {(w.pool, w.domain): [r.address for r in w.recipients] for w in work}
    assert groups == {
        ("default", "one.test"): ["a@one.test", "b@one.test"],
        ("bulk", "two.test"): ["c@two.test"],
    }
    assert all(w.data == raw for w in work)
    assert await spool.counts() == {
        "queued": 0,
        "leased": 3,
        "held": 0,
        "delivered": 0,
        "bounced": 0,
        "expired": 0,
    }
    await spool.close()
    row = sqlite3.connect(tmp_path / "s.db").execute("SELECT data FROM message").fetchone()
    assert row[0] == raw


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


async def test_open_recovers_work_leased_by_a_process_that_died(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path / "s.db")
    await spool.store(
        new_message_id(), envelope("a@one.test", "b@two.test"), {"a@one.test": "p", "b@two.test": "p"}, 5
    )
    await spool.close()  # as if the process died: the work was never settled

    again = SqliteSpool(tmp_path / "s.db")
    assert await again.open() == 2
    work = await again.lease_due(now=10, limit=100)
    assert sorted(r.address for w in work for r in w.recipients) == ["a@one.test", "b@two.test"]
    assert await again.lease_due(now=10, limit=100) == []  # leased now: not handed out twice
    await again.close()


async def test_deferred_work_is_due_only_at_its_time_and_finished_messages_are_removed(
    tmp_path: Path,
) -> None:
    spool = await open_spool(tmp_path / "s.db")
    mid = new_message_id()
    [work] = await spool.store(
        mid, envelope("a@one.test", "b@one.test"), {"a@one.test": "p", "b@one.test": "p"}, 0
    )
    a, b = work.recipients
    await spool.settle(
        [
            Settlement(mid, [a.rid], RecipientState.DELIVERED, "250 ok", attempts=1),
            Settlement(mid, [b.rid], RecipientState.QUEUED, "451 later", due=60, attempts=1),
        ],
        now=1,
    )
    assert await spool.lease_due(now=59, limit=10) == []
    [again] = await spool.lease_due(now=60, limit=10)
    assert [(r.address, r.attempts) for r in again.recipients] == [("b@one.test", 1)]
    await spool.settle([Settlement(mid, [b.rid], RecipientState.DELIVERED, "250 ok", attempts=2)], now=61)
    assert sum((await spool.counts()).values()) == 0
    await spool.close()
    db = sqlite3.connect(tmp_path / "s.db")
    assert db.execute("SELECT count(*) FROM message").fetchone() == (0,)


async def test_a_bounce_and_its_dsn_are_recorded_together(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path / "s.db")
    mid = new_message_id()
    [work] = await spool.store(mid, envelope(), {"a@one.test": "p"}, 0)
    dsn = Envelope("", ("app@example.com",), b"Subject: bounce\r\n\r\n")
    rid = work.recipients[0].rid
    await spool.settle([Settlement(mid, [rid], RecipientState.BOUNCED, "550", dsn=dsn, dsn_pool="p")], now=1)
    [dsn_work] = await spool.lease_due(now=1, limit=10)
    assert dsn_work.sender == "" and [r.address for r in dsn_work.recipients] == ["app@example.com"]
    assert dsn_work.data == dsn.data
    await spool.close()


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


async def test_calls_on_a_closed_spool_fail_clearly(tmp_path: Path) -> None:
    spool = SqliteSpool(tmp_path / "s.db")
    with pytest.raises(SpoolError, match="not open"):
        await spool.counts()


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


async def test_held_work_is_never_leased_nor_recovered_and_release_makes_it_due_at_once(
    tmp_path: Path,
) -> None:
    spool = await open_spool(tmp_path / "s.db")
    mid = new_message_id()
    [work] = await spool.store(
        mid, envelope("a@one.test", "b@one.test"), {"a@one.test": "p", "b@one.test": "p"}, 0
    )
    a, b = work.recipients
    held = Settlement(
        mid, [a.rid], RecipientState.HELD, "451 4.3.0 internal error", attempts=3, local_errors=3
    )
    await spool.settle(
        [held, Settlement(mid, [b.rid], RecipientState.DELIVERED, "250 ok", attempts=1)], now=1
    )
    assert await spool.lease_due(now=10**12, limit=10) == []
    # The message stays while a recipient of it is held, though every other one is final.
    assert (await spool.counts())["held"] == 1
    await spool.close()

    again = SqliteSpool(tmp_path / "s.db")
    assert await again.open() == 0  # held is not a lease a dead process left behind
    assert again.quarantined == 0
    assert (await again.counts())["held"] == 1
    assert await again.lease_due(now=10**12, limit=10) == []
    assert await again.release("no-such-message", now=50) == 0
    assert await again.release(mid, now=50) == 1
    assert await again.lease_due(now=49, limit=10) == []
    [released] = await again.lease_due(now=50, limit=10)
    assert [(r.address, r.attempts, r.local_errors) for r in released.recipients] == [("a@one.test", 3, 0)]
    assert await again.release(mid, now=51) == 0  # nothing of it is held any more
    await again.close()


async def test_rounds_and_crashes_in_a_row_are_kept_with_the_recipient_across_a_restart(
    tmp_path: Path,
) -> None:
    spool = await open_spool(tmp_path / "s.db")
    mid = new_message_id()
    [work] = await spool.store(mid, envelope(), {"a@one.test": "p"}, 0)
    rid = work.recipients[0].rid
    await spool.settle(
        [Settlement(mid, [rid], RecipientState.QUEUED, "451", due=5, attempts=3, rounds=2, local_errors=1)],
        now=1,
    )
    await spool.close()
    again = await open_spool(tmp_path / "s.db")
    [item] = await again.lease_due(now=5, limit=10)
    assert (item.rounds, item.local_errors, item.attempts) == (2, 1, 3)
    # Rounds never go back; the crash count is written as given (an answered attempt clears it).
    await again.settle(
        [Settlement(mid, [rid], RecipientState.QUEUED, "451", due=6, attempts=4, rounds=1, local_errors=0)],
        now=5,
    )
    [item] = await again.lease_due(now=6, limit=10)
    assert (item.rounds, item.local_errors, item.attempts) == (2, 0, 4)
    await again.close()


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
