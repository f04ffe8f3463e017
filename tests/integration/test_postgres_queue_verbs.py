"""The operator's queue verbs on a PostgreSQL spool shared by nodes, against what the other nodes do at
the same moment: a bounce never takes a recipient another node is leasing (and so delivering), and a
bounce its writer runs twice (a batch run again after a failure) reports each recipient once.

The moment is made, not waited for: a second connection holds a row lock or an uncommitted lease, as
another node's transaction would, while the verb runs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from postmux.app import App
from postmux.envelope import Envelope, new_message_id
from postmux.events.types import Event, EventType
from postmux.spool.base import MessageView, RecipientState, RecipientView, Selector, Settlement
from postmux.spool.postgres import PostgresSpool
from tests.integration.test_control import TOKEN, admin
from tests.integration.test_postgres_spool import node_settings
from tests.support import StartUpstream, message, wait_until

REPLY = "550 5.0.0 bounced by the operator: test"


class Dsns:
    """A DSN builder that keeps the recipients each DSN named (a DSN to the sender, a line each)."""

    def __init__(self) -> None:
        self.named: list[list[str]] = []

    def __call__(self, message: MessageView, recipients: Sequence[RecipientView]) -> Envelope | None:
        self.named.append([r.address for r in recipients])
        return Envelope(
            "",
            (message.sender,),
            b"Subject: failed\r\n\r\n" + b"\r\n".join(r.address.encode() for r in recipients),
        )


@pytest.fixture
async def nodes(postgres_dsn: str) -> AsyncIterator[tuple[PostgresSpool, PostgresSpool]]:
    """Nodes a and b on one spool."""
    a, b = PostgresSpool(postgres_dsn, owner="a", lease_ttl_s=60), PostgresSpool(postgres_dsn, owner="b")
    await a.open()
    await b.open()
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def store(spool: PostgresSpool, now: float, *rcpts: str) -> str:
    mid = new_message_id()
    env = Envelope("app@example.com", rcpts, message(mid))
    await spool.store(mid, env, dict.fromkeys(rcpts, "default"), now, lease=False)
    return mid


async def rids(spool: PostgresSpool, message_id: str) -> dict[str, int]:
    shown = await spool.show(message_id, 0)
    assert shown is not None
    return {r.address: r.rid for r in shown.recipients}


async def states(spool: PostgresSpool, message_id: str) -> dict[str, tuple[str, str]]:
    shown = await spool.show(message_id, 0)
    assert shown is not None, "the message is gone"
    return {r.address: (r.state.value, r.owner) for r in shown.recipients}


async def waits_on(other: asyncpg.Connection, task: asyncio.Task[Any]) -> None:
    """Until `task` is done or a session waits on a lock `other` holds (the verb reached that row)."""
    pid = other.get_server_pid()
    for _ in range(1000):
        if task.done():
            return
        waiting = await other.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))", pid
        )
        if waiting:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the verb neither ended nor reached the locked row")


async def leasing(dsn: str, rid: int) -> tuple[asyncpg.Connection, Any]:
    """Node a's lease of `rid`, not yet committed (what its _lease_due holds while a verb runs on b): the
    connection, to be closed, and its open transaction, to be committed."""
    lessee = await asyncpg.connect(dsn)
    lease = lessee.transaction()
    await lease.start()
    await lessee.execute(
        "UPDATE recipient SET state = 'leased', owner = 'a', lease_until = 2000 WHERE rid = $1", rid
    )
    return lessee, lease


async def test_a_bounce_leaves_a_recipient_another_node_is_leasing_and_its_dsn_does_not_name_it(
    postgres_dsn: str, nodes: tuple[PostgresSpool, PostgresSpool]
) -> None:
    _, b = nodes
    mid = await store(b, 100, "x@one.test", "y@two.test")
    y = (await rids(b, mid))["y@two.test"]
    lessee, lease = await leasing(postgres_dsn, y)
    try:
        dsns = Dsns()
        bounce = asyncio.create_task(
            b.bounce(Selector(message_id=mid), 1000, reply=REPLY, dsn=dsns, dsn_pool="dsn")
        )
        await waits_on(lessee, bounce)
        await lease.commit()  # node a has y now, and delivers it
        bounced = await bounce
    finally:
        await lessee.close()
    assert [(x.message.message_id, [r.address for r in x.recipients]) for x in bounced] == [
        (mid, ["x@one.test"])
    ]
    assert dsns.named == [["x@one.test"]]
    assert await states(b, mid) == {"x@one.test": ("bounced", ""), "y@two.test": ("leased", "a")}
    [dsn] = (await b.list_queue(Selector(pool="dsn"), 1000)).messages
    shown = await b.show(dsn.message_id, 1000)
    assert shown is not None and b"y@two.test" not in (shown.data or b"")


async def test_a_bounce_busy_elsewhere_never_overwrites_what_another_node_leased_meanwhile(
    postgres_dsn: str, nodes: tuple[PostgresSpool, PostgresSpool]
) -> None:
    """The review's reproduction B: the bounce is held up at an earlier message (a row lock stands in
    for the time a large bounce takes) while node a releases and leases a later one."""
    a, b = nodes
    first = await store(b, 100, "one@one.test")
    later = await store(b, 100, "two@one.test")
    assert await b.hold(Selector(everything=True), 100) == 2
    other = await asyncpg.connect(postgres_dsn)
    try:
        busy = other.transaction()
        await busy.start()
        await other.execute("SELECT 1 FROM recipient WHERE message_id = $1 FOR UPDATE", first)
        bounce = asyncio.create_task(
            b.bounce(Selector(everything=True), 1000, reply=REPLY, dsn=Dsns(), dsn_pool="dsn")
        )
        await waits_on(other, bounce)
        await a.release(later, 1000)
        leased = {r.rid for w in await a.lease_due(1000, 10) for r in w.recipients}
        await busy.rollback()
        bounced = await bounce
    finally:
        await other.close()
    bounced_rids = {r.rid for x in bounced for r in x.recipients}
    assert not bounced_rids & leased, "a recipient both bounced and in node a's hands"
    for mid in (first, later):
        shown = await b.show(mid, 1000)
        for r in shown.recipients if shown is not None else ():
            assert (r.rid in leased) == (r.state is RecipientState.LEASED)
    # The locked row was passed over, not waited for: the operator repeats the bounce for it.
    assert await states(b, first) == {"one@one.test": ("held", "")}
    [again] = await b.bounce(Selector(message_id=first), 1001, reply=REPLY, dsn=Dsns(), dsn_pool="dsn")
    assert [r.address for r in again.recipients] == ["one@one.test"]


async def test_a_delete_leaves_a_recipient_another_node_is_leasing_with_its_attempts(
    postgres_dsn: str, nodes: tuple[PostgresSpool, PostgresSpool]
) -> None:
    _, b = nodes
    mid = await store(b, 100, "y@two.test")
    y = (await rids(b, mid))["y@two.test"]
    [work] = await b.lease_due(100, 10)
    await b.settle(
        [Settlement(mid, [y], RecipientState.QUEUED, "451 later", due=100, attempts=1, member="m")], now=101
    )
    lessee, lease = await leasing(postgres_dsn, y)
    try:
        delete = asyncio.create_task(b.delete(Selector(message_id=mid), 1000))
        await waits_on(lessee, delete)
        await lease.commit()
        assert await delete == 0
    finally:
        await lessee.close()
    shown = await b.show(mid, 1000)
    assert shown is not None and [(x.rid, x.reply) for x in shown.attempts] == [(y, "451 later")]
    assert work.recipients[0].rid == y


async def test_a_bounce_the_writer_runs_twice_reports_each_recipient_once(
    tmp_path: Path, postgres_dsn: str, upstream: StartUpstream
) -> None:
    """A batch of two requests runs without savepoints; the second fails, so the writer rolls back and
    runs both again with savepoints (spool/postgres.py): the bounce runs twice, is committed once, and
    its Bounce events must be those of the run committed."""
    up = await upstream()
    app = App(node_settings(tmp_path / "n1", up, postgres_dsn, "n1"))
    events: list[Event] = []
    async with app:
        app.bus.subscribe(events.append)
        spool = app.spool
        assert isinstance(spool, PostgresSpool)
        later = time.time() + 3600  # not due for an hour: the node's dispatcher leaves them alone
        blocker, bounced, broken = [await store(spool, later, f"u{i}@dest.test") for i in range(3)]
        other = await asyncpg.connect(postgres_dsn)
        try:
            tx = other.transaction()
            await tx.start()
            await other.execute("SELECT 1 FROM recipient WHERE message_id = $1 FOR UPDATE", blocker)
            # The writer waits on the lock with a hold; the bounce and a request that fails queue behind it.
            holding = asyncio.create_task(spool.hold(Selector(message_id=blocker), later))
            await waits_on(other, holding)
            operator = asyncio.create_task(app.control.queue.act("bounce", {"id": bounced, "reason": "test"}))

            def refuse(message: MessageView, recipients: Sequence[RecipientView]) -> Envelope | None:
                raise RuntimeError("this DSN cannot be built")

            failing = asyncio.create_task(
                spool.bounce(Selector(message_id=broken), later, reply=REPLY, dsn=refuse, dsn_pool="p")
            )
            for _ in range(500):  # both queued behind the hold: the writer takes them as one batch
                if spool._jobs.qsize() == 2:
                    break
                await asyncio.sleep(0.01)
            assert spool._jobs.qsize() == 2
            await tx.rollback()
            assert await holding == 1
            answer = await operator
            with pytest.raises(RuntimeError, match="cannot be built"):
                await failing
        finally:
            await other.close()
        assert answer["recipients"] == 1
        assert await spool.show(bounced, later) is None  # bounced, its DSN queued: committed once
        # The DSN is due at once: the node delivers it (once) to the one upstream.
        await wait_until(lambda: any(r.sender == "" for r in up.received))
        await asyncio.sleep(0.3)  # a second one would arrive meanwhile
        assert [r.sender for r in up.received] == [""]
    by_operator = [(e.id, e.recipient) for e in events if e.type is EventType.BOUNCE]
    assert by_operator == [(bounced, "u1@dest.test")]


async def test_the_queue_api_answers_what_it_cannot_read_or_find_with_a_4xx_and_the_spool_down_with_503(
    tmp_path: Path, postgres_dsn: str, upstream: StartUpstream
) -> None:
    """Review item 4: no 500 (and no traceback) for a body nested too deeply, for an id with NUL in it
    (PostgreSQL text cannot hold one), or from the older release route when the spool fails."""
    up = await upstream()
    settings = node_settings(tmp_path / "n1", up, postgres_dsn, "n1", http={"admin_token": TOKEN})
    async with App(settings) as app, admin(app) as client:
        mid = await store(app.spool, time.time() + 3600, "u@dest.test")  # {"id": ...} below is real
        for deep in (b"[" * 200_000 + b"]" * 200_000, b'{"id":' * 5000 + b"1" + b"}" * 5000):
            response = await client.post("/queue/hold", content=deep)
            assert response.status_code == 400, response.text
            assert "nested too deeply" in response.json()["error"]
        response = await client.get("/queue/messages/ab%00cd")
        assert response.status_code == 404 and "no message with id" in response.json()["error"]
        response = await client.get("/queue/messages", params={"after": "\x00"})
        assert response.status_code == 200 and [m["id"] for m in response.json()["messages"]] == [mid]
        response = await client.post("/messages/ab%00c/release")
        assert response.status_code == 404 and "no held message" in response.json()["error"]
        await app.spool.close()  # the spool fails every call from here on, as when PostgreSQL is away
        response = await client.post(f"/messages/{mid}/release")
        assert response.status_code == 503, response.text
        assert response.json() == {"error": "the spool could not answer: spool is not open"}
        response = await client.post("/queue/release", json={"id": mid})  # the newer route, the same
        assert response.status_code == 503 and response.json()["error"].startswith("the spool could not")
