"""The webhook outbox on every backend: rows commit with the change they report (or not at all), each
endpoint's rows come back in commit order after a sender's place, and only acknowledged rows go.

Every method takes the time it acts at; rows carry their own `created`.
"""

from __future__ import annotations

import json

import pytest

from postmux.envelope import Envelope, new_message_id
from postmux.spool.base import OutboxRow, RecipientState, Settlement, SpoolBackend, SpoolError
from tests.contract.conftest import SpoolFactory


def envelope(*rcpts: str) -> Envelope:
    return Envelope("app@example.com", tuple(rcpts or ("a@one.test",)), b"Subject: x\r\n\r\nbody\r\n")


def row(endpoint: str, event_id: str, created: float = 0.0, **record: object) -> OutboxRow:
    return OutboxRow(endpoint, event_id, json.dumps({"event_id": event_id, **record}), created)


async def event_ids(spool: SpoolBackend, endpoint: str, after: int = 0, limit: int = 100) -> list[str]:
    return [e.event_id for e in await spool.outbox_head(endpoint, after, limit)]


async def test_rows_given_to_store_are_kept_with_the_message_across_a_restart(
    spool_factory: SpoolFactory,
) -> None:
    spool = spool_factory()
    await spool.open()
    mid = new_message_id()
    rows = [row("hooks", "r1", 5.0, type="Reception"), row("audit", "r1", 5.0), row("hooks", "r2", 5.0)]
    await spool.store(
        mid, envelope("a@one.test", "b@one.test"), {"a@one.test": "p", "b@one.test": "p"}, 5, outbox=rows
    )
    await spool.close()  # as kill -9 leaves it: nothing was sent

    again = spool_factory()
    await again.open()
    head = await again.outbox_head("hooks", 0, 10)
    assert [e.event_id for e in head] == ["r1", "r2"]
    assert json.loads(head[0].record) == {"event_id": "r1", "type": "Reception"}
    assert head[0].created == 5.0 and head[0].seq < head[1].seq
    assert await event_ids(again, "audit") == ["r1"]
    assert await again.show(mid, 5) is not None
    await again.close()


async def test_a_store_that_fails_writes_none_of_its_rows(spool: SpoolBackend) -> None:
    mid = new_message_id()
    await spool.store(mid, envelope(), {"a@one.test": "p"}, 1, outbox=[row("hooks", "first")])
    with pytest.raises(SpoolError):
        # The same id again breaks the message table's key: the whole request is rolled back.
        await spool.store(mid, envelope(), {"a@one.test": "p"}, 2, outbox=[row("hooks", "second")])
    assert await event_ids(spool, "hooks") == ["first"]


async def test_rows_given_to_settle_commit_with_the_outcome_and_alone_without_one(
    spool: SpoolBackend,
) -> None:
    mid = new_message_id()
    [work] = await spool.store(mid, envelope(), {"a@one.test": "p"}, 0, outbox=[row("hooks", "rcpt")])
    rid = work.recipients[0].rid
    await spool.settle([], 1, outbox=[row("hooks", "passed-on")])  # a try passed on: no settlement
    await spool.settle(
        [Settlement(mid, [rid], RecipientState.DELIVERED, "250 ok", attempts=1)],
        2,
        outbox=[row("hooks", "dlv")],
    )
    assert await spool.show(mid, 2) is None  # delivered and removed: its events stay until sent
    assert await event_ids(spool, "hooks") == ["rcpt", "passed-on", "dlv"]


async def test_each_endpoint_reads_its_own_rows_in_order_after_its_place(spool: SpoolBackend) -> None:
    await spool.outbox_append([row("a", f"a{i}") for i in range(5)] + [row("b", "b0")])
    await spool.outbox_append([row("a", "a5"), row("b", "b1")])
    first = await spool.outbox_head("a", 0, 2)
    assert [e.event_id for e in first] == ["a0", "a1"]
    # The sender's place moves on before the acknowledgement reaches the disk: rows after it only.
    assert await event_ids(spool, "a", after=first[-1].seq, limit=10) == ["a2", "a3", "a4", "a5"]
    assert await event_ids(spool, "b") == ["b0", "b1"]
    assert await event_ids(spool, "nobody") == []


async def test_only_acknowledged_rows_of_that_endpoint_go(spool: SpoolBackend) -> None:
    await spool.outbox_append(
        [row("a", "a0", 10.0), row("b", "b0", 11.0), row("a", "a1", 12.0), row("a", "a2", 13.0)]
    )
    head = await spool.outbox_head("a", 0, 2)
    b_head = await spool.outbox_head("b", 0, 1)
    assert await spool.outbox_ack("a", [e.seq for e in head] + [b_head[0].seq]) == 2  # b's row is not a's
    assert await event_ids(spool, "a") == ["a2"]
    assert await event_ids(spool, "b") == ["b0"]
    backlog = {b.endpoint: (b.rows, b.oldest_created) for b in await spool.outbox_backlog()}
    assert backlog == {"a": (1, 13.0), "b": (1, 11.0)}
    assert await spool.outbox_ack("a", [e.seq for e in head]) == 0  # twice: nothing more goes


async def test_a_drop_removes_every_row_of_that_endpoint_only(spool: SpoolBackend) -> None:
    await spool.outbox_append([row("gone", f"g{i}") for i in range(3)] + [row("kept", "k0")])
    assert await spool.outbox_drop("gone") == 3
    assert await event_ids(spool, "gone") == []
    assert await event_ids(spool, "kept") == ["k0"]
    assert await spool.outbox_drop("gone") == 0  # twice: nothing more goes
    assert [b.endpoint for b in await spool.outbox_backlog()] == ["kept"]


async def test_a_seq_is_never_given_again_after_every_row_went(spool: SpoolBackend) -> None:
    await spool.outbox_append([row("a", "old")])
    [old] = await spool.outbox_head("a", 0, 1)
    await spool.outbox_ack("a", [old.seq])
    await spool.outbox_append([row("a", "new")])
    # A sender whose place is the old row's seq must still see the new row.
    assert await event_ids(spool, "a", after=old.seq) == ["new"]


async def test_without_rows_nothing_is_written(spool: SpoolBackend) -> None:
    mid = new_message_id()
    [work] = await spool.store(mid, envelope(), {"a@one.test": "p"}, 0)
    await spool.settle([Settlement(mid, [work.recipients[0].rid], RecipientState.DELIVERED, "250")], 1)
    await spool.outbox_append([])
    assert await spool.outbox_backlog() == []
