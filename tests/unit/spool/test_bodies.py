"""Where the SQLite spool keeps large texts (spool/bodies.py), against real files: segments written with
the group commit, taken back when no row names them, a waiting message moved into its row, ingress's
files adopted, and what open finds after a crash."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from pathlib import Path

from postmux.body import BodyFile
from postmux.envelope import Envelope, new_message_id
from postmux.spool.base import RecipientState, Selector, Settlement
from postmux.spool.bodies import BodyStore
from postmux.spool.sqlite import SqliteSpool
from postmux.work import WorkItem

POOLS = {"a@one.test": "p"}


def text(n: int, seed: int = 0) -> bytes:
    line = (f"line {seed} " + "x" * 70 + "\r\n").encode()
    head = f"Subject: m{seed}\r\n\r\n".encode()
    return head + (line * (n // len(line) + 1))[: n - len(head) - 2] + b"\r\n"


def envelope(data: bytes, tail: BodyFile | None = None, clean: bool = True) -> Envelope:
    return Envelope("app@example.com", ("a@one.test",), data, tail=tail, clean=clean)


async def open_spool(path: Path, **kw: object) -> SqliteSpool:
    spool = SqliteSpool(path, **kw)  # type: ignore[arg-type]
    await spool.open()
    return spool


def segments(spool: SqliteSpool) -> list[str]:
    return segments_in(spool.bodies)


def segments_in(bodies: BodyStore) -> list[str]:
    return sorted(os.listdir(bodies.segments))


def rows(path: Path) -> list[tuple[str, int, str, int]]:
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT id, length(data), seg, seg_length FROM message ORDER BY id").fetchall()
    finally:
        db.close()


def whole(item: WorkItem) -> bytes:
    return item.data + (item.tail.read() if item.tail is not None else b"")


def delivered(item: WorkItem) -> Settlement:
    return Settlement(item.message_id, [r.rid for r in item.recipients], RecipientState.DELIVERED, "250 ok")


async def test_a_small_text_stays_in_its_row_and_a_large_one_goes_to_a_segment(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path / "s.db")
    small, large = text(1500, 1), text(100_000, 2)
    await spool.store("m1", envelope(small), POOLS, 1.0, lease=False)
    await spool.store("m2", envelope(large), POOLS, 1.0, lease=False)
    assert rows(tmp_path / "s.db") == [("m1", len(small), "", 0), ("m2", 0, segments(spool)[0], len(large))]
    items = sorted(await spool.lease_due(2.0, 10), key=lambda i: i.message_id)
    assert [whole(i) for i in items] == [small, large]
    assert all(i.clean for i in items)
    await spool.settle([delivered(i) for i in items], 3.0)
    assert segments(spool) == []  # the segment went with the last row that named it
    await spool.close()


async def test_one_group_commit_writes_one_segment_and_it_survives_a_restart(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path / "s.db")
    texts = [text(60_000, i) for i in range(20)]
    await asyncio.gather(
        *(spool.store(new_message_id(), envelope(t), POOLS, 1.0, lease=False) for t in texts)
    )
    assert 1 <= len(segments(spool)) < len(texts) / 2  # the batches shared their files
    await spool.close()
    again = await open_spool(tmp_path / "s.db")
    items = await again.lease_due(2.0, 100)
    assert sorted(whole(i) for i in items) == sorted(texts)
    await again.settle([delivered(i) for i in items], 3.0)
    assert segments(again) == []
    await again.close()


async def test_a_deferred_message_moves_into_its_row_and_frees_the_segment(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path / "s.db")
    texts = [text(50_000, i) for i in range(6)]
    await asyncio.gather(
        *(spool.store(f"m{i}", envelope(t), POOLS, 1.0, lease=False) for i, t in enumerate(texts))
    )
    items = sorted(await spool.lease_due(2.0, 100), key=lambda i: i.message_id)
    later, now = items[0], items[1:]
    deferred = Settlement(
        later.message_id, [later.recipients[0].rid], RecipientState.QUEUED, "451 later", due=500
    )
    await spool.settle([deferred, *(delivered(i) for i in now)], 3.0)
    assert segments(spool) == []  # nothing else holds the files: the deferred text is in its row
    assert rows(tmp_path / "s.db") == [("m0", len(texts[0]), "", 0)]
    (again,) = await spool.lease_due(600.0, 10)
    assert whole(again) == texts[0]
    await spool.close()


async def test_ingress_files_are_adopted_and_streamed_not_read_into_memory(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path / "s.db")
    head, rest = text(4000, 1), os.urandom(3 << 20)  # longer than what is read into memory for delivery
    path = spool.spill_dir / "incoming-1"
    path.write_bytes(rest)
    (hot,) = await spool.store("m1", envelope(head, BodyFile(str(path), 0, len(rest))), POOLS, 1.0)
    assert not path.exists()  # renamed, not copied
    assert hot.tail is not None and Path(hot.tail.path).parent == spool.bodies.segments
    assert hot.data == head and hot.tail.read() == rest and hot.size == len(head) + len(rest)
    await spool.close()
    again = await open_spool(tmp_path / "s.db")
    (cold,) = await again.lease_due(2.0, 10)  # the lease was recovered: read back from the spool
    assert cold.data == head and cold.tail is not None and cold.tail.read() == rest
    view = await again.show("m1", 3.0)
    assert view is not None and view.data == head + rest and view.size == len(head) + len(rest)
    await again.settle([delivered(cold)], 3.0)
    assert segments(again) == []
    await again.close()


async def test_a_store_that_fails_removes_the_file_it_was_given(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path / "s.db")
    path = spool.spill_dir / "incoming-1"
    path.write_bytes(b"x" * 10_000)
    bad = envelope(b"Subject: x\r\n\r\n", BodyFile(str(path), 0, 10_000))
    try:
        await spool.store("m1", bad, {}, 1.0)  # no pool for the recipient: the store fails half-way
    except KeyError:
        pass
    else:
        raise AssertionError("the store should have failed")
    assert not path.exists() and segments(spool) == [] and rows(tmp_path / "s.db") == []
    await spool.close()


async def test_open_removes_orphans_and_quarantines_a_message_whose_file_is_gone(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path / "s.db")
    await spool.store("m1", envelope(text(30_000, 1)), POOLS, 1.0, lease=False)
    await spool.store("m2", envelope(text(30_000, 2)), POOLS, 1.0, lease=False)
    named = dict((r[0], r[2]) for r in rows(tmp_path / "s.db"))
    await spool.close()
    os.unlink(spool.bodies.segments / named["m1"])  # a damaged spool
    (spool.bodies.segments / "orphan").write_bytes(b"left by a crash before its commit")
    (spool.bodies.incoming / "half").write_bytes(b"a session cut off mid-DATA")
    again = await open_spool(tmp_path / "s.db")
    assert again.swept == 2 and again.quarantined == 2  # m1 and its recipient
    assert sorted(os.listdir(again.bodies.incoming)) == []
    assert segments(again) == [named["m2"]]
    (item,) = await again.lease_due(2.0, 10)
    assert item.message_id == "m2" and whole(item) == text(30_000, 2)
    page = await again.list_queue(Selector(), 3.0)
    assert [m.message_id for m in page.messages] == ["m2"]
    await again.close()


def test_the_searches_run_at_every_delivery_use_the_segment_index(tmp_path: Path) -> None:
    from postmux.spool.bodies import MESSAGES_IN_SEG, SEG_IN_USE
    from postmux.spool.sqlite_schema import prepare

    db = sqlite3.connect(tmp_path / "plan.db")
    prepare(db)
    for query in (SEG_IN_USE, MESSAGES_IN_SEG):
        plan = " ".join(row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {query}", ("x",)))
        assert "INDEX message_seg (seg=?)" in plan, plan  # a search, not a SCAN of every message
    db.close()


async def test_a_bounce_reads_only_the_head_of_a_long_text_for_its_dsn(tmp_path: Path) -> None:
    from postmux.body import HEADER_LIMIT

    spool = await open_spool(tmp_path / "s.db")
    head, rest = text(4000, 1), os.urandom(3 << 20)
    path = spool.spill_dir / "incoming-1"
    path.write_bytes(rest)
    await spool.store("m1", envelope(head, BodyFile(str(path), 0, len(rest))), POOLS, 1.0, lease=False)
    seen: list[int] = []

    def dsn(message: object, recipients: object) -> None:
        seen.append(len(message.data))  # type: ignore[attr-defined]

    [bounced] = await spool.bounce(Selector(message_id="m1"), 2.0, reply="550 gone", dsn=dsn, dsn_pool="p")
    assert len(bounced.recipients) == 1
    assert seen == [len(head) + HEADER_LIMIT]  # not the 3 MB
    assert segments(spool) == []
    await spool.close()


async def test_a_segment_that_cannot_be_written_is_a_spool_error_and_stores_nothing(tmp_path: Path) -> None:
    import shutil

    import pytest

    from postmux.spool.base import SpoolError

    spool = await open_spool(tmp_path / "s.db")
    shutil.rmtree(spool.bodies.segments)
    spool.bodies.segments.write_bytes(b"not a directory")  # every write under it fails (ENOTDIR)
    with pytest.raises(SpoolError) as failed:
        await spool.store("m1", envelope(text(50_000, 1)), POOLS, 1.0)
    assert not failed.value.disk_full
    await spool.store("m2", envelope(text(1500, 2)), POOLS, 1.0)  # a text kept in its row still goes in
    assert [r[0] for r in rows(tmp_path / "s.db")] == ["m2"]
    await spool.close()


def test_a_job_that_fails_after_letting_go_of_a_segment_keeps_the_segment(tmp_path: Path) -> None:
    """The writer rolls a failed job's rows back (SAVEPOINT); the segment those rows name must stay."""
    from postmux.spool.sqlite_schema import delete_message, insert_message, prepare

    db = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
    prepare(db)
    bodies = BodyStore(tmp_path / "s.db")
    bodies.make_dirs()
    db.execute("BEGIN")
    insert_message(db, bodies, "m1", envelope(text(20_000, 1)), 1.0)
    bodies.before_commit()
    db.execute("COMMIT")
    bodies.after_commit(committed=True)
    (seg,) = segments_in(bodies)
    db.execute("BEGIN")
    db.execute("SAVEPOINT job")
    mark = bodies.mark()
    delete_message(db, bodies, "m1")  # the last row naming the segment: it is let go of ...
    db.execute("ROLLBACK TO job")  # ... and then the job fails, and the row is back
    db.execute("RELEASE job")
    bodies.undo(mark)
    bodies.before_commit()
    db.execute("COMMIT")
    bodies.after_commit(committed=True)
    assert segments_in(bodies) == [seg]
    assert bodies.joined(b"", seg, 0, 20_000) == text(20_000, 1)
    db.close()
