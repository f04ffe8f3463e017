"""Resource faults: a full disk or a failing spool is never answered 250, and acceptance comes back by itself;
rows that are unusable at open are quarantined and everything else recovered."""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiosmtplib
import pytest

from postmux.app import App
from postmux.envelope import Envelope
from postmux.spool.sqlite import SqliteSpool
from tests.support import Upstream, make_settings, send, wait_until


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 4 MiB file system (tmpfs), so ENOSPC comes from the kernel, not from a simulation."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(path: Path) -> None:
    """Write until the file system is full, down to the last byte."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as e:
                assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)


async def test_full_disk_gives_452_then_acceptance_resumes_when_space_is_back(
    small_disk: Path, tmp_path: Path
) -> None:
    up = await Upstream("up").start()
    settings = make_settings(
        tmp_path,
        [{"name": "default", "members": [{"name": "up", "address": up.address}]}],
        spool={"path": str(small_disk / "spool.db")},
    )
    try:
        async with App(settings) as app:
            assert "queued as" in await send(app.smtp_port, "before")
            filler = small_disk / "filler"
            fill(filler)
            refused = 0
            for i in range(3):
                with pytest.raises(aiosmtplib.SMTPDataError) as caught:
                    await send(app.smtp_port, f"full{i}")
                assert (caught.value.code, caught.value.message) == (
                    452,
                    "4.3.1 Insufficient system storage, try again later",
                )
                refused += 1
            filler.unlink()
            # No restart, no operator: the next message is simply accepted.
            assert "queued as" in await send(app.smtp_port, "after")
            await wait_until(lambda: sorted(r.test_id for r in up.received) == ["after", "before"])
            assert refused == 3
    finally:
        await up.stop()


async def test_corrupt_rows_are_quarantined_at_open_and_the_rest_recovered(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool = SqliteSpool(path)
    await spool.open()
    for i in range(4):
        env = Envelope("a@example.com", (f"u{i}@dest.test",), f"X-Test-Id: m{i}\r\n\r\nbody\r\n".encode())
        await spool.store(f"m{i}", env, {f"u{i}@dest.test": "default"}, 1.0, lease=False)
    await spool.close()
    with sqlite3.connect(path) as db:  # the damage a bad disk, a bad restore or a hand edit leaves
        db.execute("UPDATE message SET data = 'not bytes' WHERE id = 'm1'")
        db.execute("UPDATE recipient SET state = 'garbage' WHERE message_id = 'm2'")
        db.execute(
            "INSERT INTO recipient (message_id, address, pool, domain, state, due)"
            " VALUES ('gone', 'x@dest.test', 'default', 'dest.test', 'queued', 1.0)"
        )
    spool = SqliteSpool(path)
    await spool.open()
    try:
        # m1 and its recipient; m2's recipient, then m2 left without any; the orphan recipient.
        assert spool.quarantined == 5
        work = await spool.lease_due(now=10.0, limit=100)
        assert sorted(w.message_id for w in work) == ["m0", "m3"]
        assert all(isinstance(w.data, bytes) for w in work)
    finally:
        await spool.close()
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT source, key, reason FROM quarantine ORDER BY qid").fetchall()
        kept = db.execute("SELECT data FROM quarantine WHERE source = 'message'").fetchall()
    reasons = {(source, reason) for source, _, reason in rows}
    assert ("message", "message data is text, not bytes") in reasons
    assert ("recipient", "its message was quarantined") in reasons
    assert ("recipient", "unknown state 'garbage'") in reasons
    assert ("recipient", "its message is missing") in reasons
    # m1's text data is kept in `fields`; m2's bytes are kept in `data`.
    assert sorted(kept, key=repr) == sorted([(None,), (b"X-Test-Id: m2\r\n\r\nbody\r\n",)], key=repr)
    assert ("message", "message has no recipients") in reasons
    # A second open finds nothing more to move.
    spool = SqliteSpool(path)
    await spool.open()
    assert spool.quarantined == 0
    await spool.close()


async def test_corrupt_row_does_not_stop_delivery_of_the_rest_end_to_end(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool = SqliteSpool(path)
    await spool.open()
    for i in range(3):
        env = Envelope("a@example.com", ("u@dest.test",), f"X-Test-Id: e{i}\r\n\r\nbody\r\n".encode())
        await spool.store(f"e{i}", env, {"u@dest.test": "default"}, 1.0, lease=False)
    await spool.close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE message SET data = 42 WHERE id = 'e1'")
    up = await Upstream("up").start()
    settings = make_settings(
        tmp_path, [{"name": "default", "members": [{"name": "up", "address": up.address}]}]
    )
    try:
        async with App(settings):
            await wait_until(lambda: sorted(r.test_id for r in up.received) == ["e0", "e2"])
    finally:
        await up.stop()
    assert os.path.exists(path)
