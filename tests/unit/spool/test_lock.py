"""One process per spool file: a second open is refused before it recovers anything."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from postmux.envelope import Envelope, new_message_id
from postmux.spool.lock import SpoolLocked
from postmux.spool.sqlite import SqliteSpool


async def test_a_second_open_of_a_held_spool_is_refused_naming_the_holder_and_recovers_nothing(
    tmp_path: Path,
) -> None:
    first = SqliteSpool(tmp_path / "s.db")
    await first.open()
    env = Envelope("a@one.test", ("b@two.test",), b"Subject: x\r\n\r\nbody\r\n")
    [work] = await first.store(new_message_id(), env, {"b@two.test": "p"}, 1.0)  # leased: in flight
    second = SqliteSpool(tmp_path / "s.db")
    with pytest.raises(SpoolLocked) as refused:
        await second.open()
    assert refused.value.holder == os.getpid()
    assert f"in use by process {os.getpid()}" in str(refused.value)
    assert await first.lease_due(now=10, limit=10) == []  # still leased by the first: not handed back
    await first.close()
    assert (tmp_path / "s.db.lock").read_text() == ""  # released: no holder named any more
    assert await second.open() == 1  # now the work the first left leased is recovered
    await second.close()
    assert work.recipients[0].address == "b@two.test"


@pytest.mark.parametrize("link", ["file", "directory"])
async def test_the_same_spool_through_a_symlink_is_refused_too(tmp_path: Path, link: str) -> None:
    """The lock goes beside the file itself, not beside the path that named it: a second node on a
    symlinked spool took a lock of its own and delivered the first one's work in flight again."""
    (tmp_path / "real").mkdir()
    first = SqliteSpool(tmp_path / "real" / "s.db")
    await first.open()
    if link == "file":
        (tmp_path / "alias.db").symlink_to(tmp_path / "real" / "s.db")
        aliased = tmp_path / "alias.db"
    else:
        (tmp_path / "alias").symlink_to(tmp_path / "real")
        aliased = tmp_path / "alias" / "s.db"
    with pytest.raises(SpoolLocked):
        await SqliteSpool(aliased).open()
    await first.close()
