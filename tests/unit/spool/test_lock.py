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
