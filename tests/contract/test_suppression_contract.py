"""The suppression list's store on every backend: entries kept across a restart, one per address and
scope (a second put replaces the first), removal of one entry, nothing else touched."""

from __future__ import annotations

from postmux.spool.base import SpoolBackend, Suppression
from tests.contract.conftest import SpoolFactory


def entry(
    address: str, scope: str = "global", reason: str = "r", expires: float | None = None
) -> Suppression:
    return Suppression(address, scope, reason, "manual", 10.0, expires)


async def test_entries_are_kept_across_a_restart_one_per_address_and_scope(
    spool_factory: SpoolFactory,
) -> None:
    spool = spool_factory()
    await spool.open()
    await spool.suppression_put([entry("a@x.test"), entry("a@x.test", "api_key:shop"), entry("*@y.test")])
    await spool.suppression_put([entry("a@x.test", reason="again", expires=99.5)])  # replaces
    await spool.close()
    again = spool_factory()
    await again.open()
    kept = await again.suppressions()
    await again.close()
    assert sorted(kept, key=lambda e: (e.address, e.scope)) == [
        entry("*@y.test"),
        entry("a@x.test", "api_key:shop"),
        entry("a@x.test", reason="again", expires=99.5),
    ]


async def test_remove_takes_one_entry_and_says_whether_there_was_one(spool: SpoolBackend) -> None:
    await spool.suppression_put([entry("a@x.test"), entry("a@x.test", "sender_domain:s.test")])
    assert await spool.suppression_remove("a@x.test", "global") is True
    assert await spool.suppression_remove("a@x.test", "global") is False
    assert await spool.suppressions() == [entry("a@x.test", "sender_domain:s.test")]
