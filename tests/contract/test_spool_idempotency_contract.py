"""The spool's idempotency records, on every backend: a request's messages and its answer are stored in one
transaction, a replay stores nothing twice (across a restart too), and records expire.

Every method takes the time it acts at, so the tests move a manual clock by passing `now`.
"""

from __future__ import annotations

import asyncio

from postmux.envelope import Envelope, new_message_id
from postmux.spool.base import Answered, NewMessage, SpoolBackend
from tests.contract.conftest import SpoolFactory


def new_message(rcpt: str = "a@one.test") -> NewMessage:
    env = Envelope("app@example.com", (rcpt,), b"Subject: x\r\n\r\nbody\r\n")
    return NewMessage(new_message_id(), env, {rcpt: "default"})


def answer(
    key: str = "k1", client: str = "shop", body: str = '{"ids": ["x"]}', now: float = 100.0
) -> Answered:
    return Answered(client, key, "hash-1", body, now, now + 3600)


async def opened(factory: SpoolFactory) -> SpoolBackend:
    spool = factory()
    await spool.open()
    return spool


async def test_store_all_stores_every_message_with_its_answer(spool_factory: SpoolFactory) -> None:
    spool = await opened(spool_factory)
    batch = [new_message("a@one.test"), new_message("b@two.test")]
    stored = await spool.store_all(batch, 100.0, answer=answer())
    assert stored.answered is None
    assert sorted(w.recipients[0].address for w in stored.work) == ["a@one.test", "b@two.test"]
    await spool.close()
    again = await opened(spool_factory)  # a restart: both the messages and the answer are there
    assert all([await again.show(m.message_id, 100.0) for m in batch])
    found = await again.answered("shop", "k1", 101.0)
    assert found == answer()
    await again.close()


async def test_a_replay_stores_nothing_and_gets_the_first_answer(spool: SpoolBackend) -> None:
    first = new_message()
    await spool.store_all([first], 100.0, lease=False, answer=answer(body="first"))
    replay = new_message()
    stored = await spool.store_all([replay], 101.0, lease=False, answer=answer(body="second"))
    assert stored.work == [] and stored.answered is not None and stored.answered.answer == "first"
    assert await spool.show(replay.message_id, 101.0) is None
    assert (await spool.counts())["queued"] == 1


async def test_two_racing_requests_with_one_key_store_once(spool: SpoolBackend) -> None:
    results = await asyncio.gather(
        *(spool.store_all([new_message()], 100.0, answer=answer(body=str(i))) for i in range(5))
    )
    assert sum(1 for r in results if r.answered is None) == 1
    winner = next(r for r in results if r.answered is None)
    assert len(winner.work) == 1
    assert len({r.answered.answer for r in results if r.answered is not None}) == 1
    assert (await spool.counts())["leased"] == 1


async def test_keys_are_per_client(spool: SpoolBackend) -> None:
    await spool.store_all([new_message()], 100.0, answer=answer(client="shop"))
    stored = await spool.store_all([new_message()], 100.0, answer=answer(client="blog"))
    assert stored.answered is None
    assert await spool.answered("blog", "k1", 100.0) is not None
    assert await spool.answered("news", "k1", 100.0) is None


async def test_an_expired_record_frees_its_key(spool: SpoolBackend) -> None:
    await spool.store_all([new_message()], 100.0, answer=answer(body="old", now=100.0))
    assert await spool.answered("shop", "k1", 3699.0) is not None
    assert await spool.answered("shop", "k1", 3700.0) is None  # expires = created + 3600
    stored = await spool.store_all([new_message()], 5000.0, answer=answer(body="new", now=5000.0))
    assert stored.answered is None
    found = await spool.answered("shop", "k1", 5001.0)
    assert found is not None and found.answer == "new"


async def test_store_all_without_an_answer_is_plain_storage(spool: SpoolBackend) -> None:
    stored = await spool.store_all([new_message(), new_message()], 100.0)
    assert stored.answered is None and len(stored.work) == 2
