"""The spool's queue operations, on every backend: list by selector (paged, bounded), show, hold,
release, delete, bounce, flush, move and stats. A leased recipient is in a node's hands: operations
leave it alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from postmux.envelope import Envelope, new_message_id
from postmux.spool.base import (
    DestinationStats,
    MessageView,
    RecipientState,
    RecipientView,
    Selector,
    Settlement,
    SpoolBackend,
)
from postmux.spool.operations import MAX_PAGE

BODY = b"Subject: queue\r\n\r\nbody\r\n"


@dataclass(frozen=True)
class Queue:
    """Three waiting messages and one in flight, accepted at 100, 200, 300 and 400."""

    m1: str  # app@x.test -> r1@one.test (pool p), r2@two.test (pool p)
    m2: str  # news@x.test -> r3@one.test (pool bulk)
    m3: str  # null sender (a DSN) -> r4@two.test (pool p)
    flying: str  # app@x.test -> r5@one.test (pool p), leased


async def fill(spool: SpoolBackend) -> Queue:
    async def add(sender: str, rcpts: dict[str, str], now: float, lease: bool = False) -> str:
        mid = new_message_id()
        env = Envelope(sender, tuple(rcpts), BODY, client_ip="192.0.2.7")
        await spool.store(mid, env, rcpts, now, lease=lease)
        return mid

    m1 = await add("app@x.test", {"r1@one.test": "p", "r2@two.test": "p"}, 100)
    m2 = await add("news@x.test", {"r3@one.test": "bulk"}, 200)
    m3 = await add("", {"r4@two.test": "p"}, 300)
    flying = await add("app@x.test", {"r5@one.test": "p"}, 400, lease=True)
    return Queue(m1, m2, m3, flying)


async def listed(spool: SpoolBackend, selector: Selector, now: float = 1000) -> dict[str, list[str]]:
    page = await spool.list_queue(selector, now)
    assert page.next_after is None
    return {m.message_id: [r.address for r in m.recipients] for m in page.messages}


async def states(spool: SpoolBackend, message_id: str) -> dict[str, str]:
    shown = await spool.show(message_id, 0)
    assert shown is not None
    return {r.address: r.state for r in shown.recipients}


async def test_list_chooses_messages_by_each_criterion_with_the_recipients_it_matched(
    spool: SpoolBackend,
) -> None:
    q = await fill(spool)
    assert await listed(spool, Selector()) == {
        q.m1: ["r1@one.test", "r2@two.test"],
        q.m2: ["r3@one.test"],
        q.m3: ["r4@two.test"],
        q.flying: ["r5@one.test"],
    }
    assert list(await listed(spool, Selector())) == [q.m1, q.m2, q.m3, q.flying]  # in acceptance order
    assert await listed(spool, Selector(message_id=q.m2)) == {q.m2: ["r3@one.test"]}
    assert await listed(spool, Selector(pool="bulk")) == {q.m2: ["r3@one.test"]}
    assert await listed(spool, Selector(domain="ONE.test.")) == {
        q.m1: ["r1@one.test"],
        q.m2: ["r3@one.test"],
        q.flying: ["r5@one.test"],
    }
    assert await listed(spool, Selector(sender="")) == {q.m3: ["r4@two.test"]}
    assert await listed(spool, Selector(sender="app@x.test", state=RecipientState.LEASED)) == {
        q.flying: ["r5@one.test"]
    }
    assert await listed(spool, Selector(older_than_s=750), now=1000) == {
        q.m1: ["r1@one.test", "r2@two.test"],
        q.m2: ["r3@one.test"],
    }
    assert await listed(spool, Selector(pool="p", domain="two.test", older_than_s=750), now=1000) == {
        q.m1: ["r2@two.test"]
    }
    assert await listed(spool, Selector(message_id="no-such-message")) == {}


async def test_a_listing_carries_no_bytes_but_what_a_line_needs(spool: SpoolBackend) -> None:
    q = await fill(spool)
    page = await spool.list_queue(Selector(message_id=q.m1), 1000)
    [m1] = page.messages
    assert (m1.sender, m1.created, m1.size, m1.client_ip, m1.data) == (
        "app@x.test",
        100,
        len(BODY),
        "192.0.2.7",
        None,
    )
    assert m1.age_s(1000) == 900
    with pytest.raises(ValueError, match="show the message"):
        m1.envelope  # noqa: B018


async def test_a_listing_comes_in_pages_that_end_and_never_exceed_the_bound(spool: SpoolBackend) -> None:
    ids = [new_message_id() for _ in range(MAX_PAGE + 5)]
    env = Envelope("a@x.test", ("b@y.test",), BODY)
    await asyncio.gather(*(spool.store(mid, env, {"b@y.test": "p"}, 1, lease=False) for mid in ids))
    ids.sort()
    page = await spool.list_queue(Selector(), 2, limit=MAX_PAGE * 10)
    assert len(page.messages) == MAX_PAGE and page.next_after == ids[MAX_PAGE - 1]
    seen = [m.message_id for m in page.messages]
    after = page.next_after
    for _ in range(10):  # bounded: 5 more by pages of 2 is 3 pages
        page = await spool.list_queue(Selector(), 2, limit=2, after=after)
        seen += [m.message_id for m in page.messages]
        after = page.next_after
        if after is None:
            break
    assert seen == ids
    with pytest.raises(ValueError, match="at least one"):
        await spool.list_queue(Selector(), 2, limit=0)


async def test_show_gives_the_envelope_and_each_recipients_state_attempts_reply_and_due(
    spool: SpoolBackend,
) -> None:
    mid = new_message_id()
    env = Envelope("app@x.test", ("a@one.test", "b@two.test"), BODY, client_ip="192.0.2.7", smtputf8=True)
    [w1, w2] = await spool.store(mid, env, {"a@one.test": "p", "b@two.test": "p"}, 10)
    await spool.settle(
        [
            Settlement(
                mid, [w1.recipients[0].rid], RecipientState.QUEUED, "451 4.2.0 later", due=70, attempts=2
            ),
            Settlement(mid, [w2.recipients[0].rid], RecipientState.DELIVERED, "250 2.0.0 ok", attempts=1),
        ],
        now=11,
    )
    shown = await spool.show(mid, 20)
    assert shown is not None
    assert shown.envelope == Envelope(
        "app@x.test", ("a@one.test", "b@two.test"), BODY, client_ip="192.0.2.7", smtputf8=True
    )
    assert (shown.created, shown.size) == (10, len(BODY))
    assert [
        (r.address, r.pool, r.domain, r.state, r.attempts, r.last_reply, r.due) for r in shown.recipients
    ] == [
        ("a@one.test", "p", "one.test", "queued", 2, "451 4.2.0 later", 70),
        ("b@two.test", "p", "two.test", "delivered", 1, "250 2.0.0 ok", 0),
    ]
    assert await spool.show("no-such-message", 20) is None


async def test_hold_sets_queued_recipients_aside_and_release_brings_them_back_due_now(
    spool: SpoolBackend,
) -> None:
    q = await fill(spool)
    assert await spool.hold(Selector(pool="p"), 1000) == 3  # r1, r2, r4; r5 is in flight
    assert await states(spool, q.m1) == {"r1@one.test": "held", "r2@two.test": "held"}
    assert await states(spool, q.flying) == {"r5@one.test": "leased"}
    assert await spool.hold(Selector(pool="p"), 1000) == 0  # held already
    [work] = await spool.lease_due(now=10**9, limit=10)
    assert work.message_id == q.m2  # only the one not held
    assert await spool.release(Selector(domain="two.test"), 2000) == 2
    assert await states(spool, q.m1) == {"r1@one.test": "held", "r2@two.test": "queued"}
    assert await spool.lease_due(now=1999, limit=10) == []  # due at the release, not before
    work = await spool.lease_due(now=2000, limit=10)
    assert sorted(r.address for w in work for r in w.recipients) == ["r2@two.test", "r4@two.test"]


async def test_delete_removes_waiting_recipients_and_messages_left_with_none(spool: SpoolBackend) -> None:
    q = await fill(spool)
    await spool.hold(Selector(message_id=q.m3), 1000)
    assert await spool.delete(Selector(domain="two.test"), 1000) == 2  # r2 queued, r4 held
    assert await states(spool, q.m1) == {"r1@one.test": "queued"}
    assert await spool.show(q.m3, 1000) is None
    assert await spool.delete(Selector(message_id=q.flying), 1000) == 0  # in flight: left alone
    assert await states(spool, q.flying) == {"r5@one.test": "leased"}
    assert (await spool.counts())["queued"] == 2


async def test_delete_and_bounce_refuse_a_selector_without_any_criterion(spool: SpoolBackend) -> None:
    q = await fill(spool)
    with pytest.raises(ValueError, match="every message"):
        await spool.delete(Selector(), 1000)
    with pytest.raises(ValueError, match="every message"):
        await spool.bounce(Selector(), 1000, reply="550", dsn=lambda m, rs: None, dsn_pool="p")
    assert len((await spool.list_queue(Selector(), 1000)).messages) == 4
    assert await spool.delete(Selector(everything=True), 1000) == 4
    assert [m.message_id for m in (await spool.list_queue(Selector(), 1000)).messages] == [q.flying]


class DsnRecorder:
    """A DSN builder that remembers what it was given, as the admin side's build_dsn adapter would be."""

    def __init__(self) -> None:
        self.calls: list[tuple[MessageView, list[str]]] = []

    def __call__(self, message: MessageView, bounced: Sequence[RecipientView]) -> Envelope | None:
        self.calls.append((message, [r.address for r in bounced]))
        if not message.sender:
            return None  # RFC 5321 6.1: never a DSN to the null sender
        text = b"Subject: Undelivered\r\n\r\n" + b", ".join(r.address.encode() for r in bounced) + b"\r\n"
        return Envelope("", (message.sender,), text)


async def test_bounce_ends_recipients_as_bounced_with_their_dsn_queued_in_the_same_step(
    spool: SpoolBackend,
) -> None:
    q = await fill(spool)
    build = DsnRecorder()
    reply = "550 5.0.0 bounced by the operator"
    bounced = await spool.bounce(Selector(domain="two.test"), 1000, reply=reply, dsn=build, dsn_pool="dsn")
    assert [(b.message.message_id, [(r.address, r.state) for r in b.recipients]) for b in bounced] == [
        (q.m1, [("r2@two.test", "queued")]),  # as they were: the answer is what the caller reports
        (q.m3, [("r4@two.test", "queued")]),
    ]
    assert [(m.message_id, m.data, rs) for m, rs in build.calls] == [
        (q.m1, BODY, ["r2@two.test"]),
        (q.m3, BODY, ["r4@two.test"]),
    ]
    shown = await spool.show(q.m1, 1000)
    assert shown is not None
    assert [(r.address, r.state, r.last_reply) for r in shown.recipients] == [
        ("r1@one.test", "queued", ""),
        ("r2@two.test", "bounced", reply),
    ]
    assert await spool.show(q.m3, 1000) is None  # every recipient final: removed, and no DSN to "<>"
    dsns = await spool.list_queue(Selector(pool="dsn"), 1000)
    [dsn] = dsns.messages
    assert (dsn.sender, [r.address for r in dsn.recipients]) == ("", ["app@x.test"])
    shown_dsn = await spool.show(dsn.message_id, 1000)
    assert shown_dsn is not None and shown_dsn.data == b"Subject: Undelivered\r\n\r\nr2@two.test\r\n"
    assert (
        await spool.bounce(Selector(message_id=q.flying), 1000, reply=reply, dsn=build, dsn_pool="dsn") == []
    )


async def test_a_bounce_names_only_the_recipients_it_ended_leaving_one_in_flight_to_its_attempt(
    spool: SpoolBackend,
) -> None:
    mid = new_message_id()
    env = Envelope("app@x.test", ("a@one.test", "b@two.test"), BODY)
    work = await spool.store(mid, env, {"a@one.test": "p", "b@two.test": "p"}, 100)  # both leased
    rids = {r.address: r.rid for w in work for r in w.recipients}
    await spool.settle(
        [Settlement(mid, [rids["a@one.test"]], RecipientState.QUEUED, "451", due=5000)], now=101
    )  # a waits again; b is still in a node's hands
    build = DsnRecorder()
    bounced = await spool.bounce(Selector(message_id=mid), 1000, reply="550", dsn=build, dsn_pool="dsn")
    assert [(x.message.message_id, [r.address for r in x.recipients]) for x in bounced] == [
        (mid, ["a@one.test"])
    ]
    assert [rs for _, rs in build.calls] == [["a@one.test"]]  # the DSN names what was bounced, not b
    assert await states(spool, mid) == {"a@one.test": "bounced", "b@two.test": "leased"}


async def test_a_bounce_whose_dsn_cannot_be_built_changes_nothing(spool: SpoolBackend) -> None:
    q = await fill(spool)

    def broken(message: MessageView, bounced: Sequence[RecipientView]) -> Envelope | None:
        if message.message_id == q.m3:
            raise RuntimeError("cannot build this DSN")
        return Envelope("", (message.sender,), b"Subject: x\r\n\r\n")

    with pytest.raises(RuntimeError, match="cannot build"):
        await spool.bounce(Selector(domain="two.test"), 1000, reply="550", dsn=broken, dsn_pool="dsn")
    assert await states(spool, q.m1) == {"r1@one.test": "queued", "r2@two.test": "queued"}
    assert await states(spool, q.m3) == {"r4@two.test": "queued"}
    assert (await spool.list_queue(Selector(pool="dsn"), 1000)).messages == ()


async def test_flush_makes_deferred_recipients_due_now_and_leaves_held_ones(spool: SpoolBackend) -> None:
    q = await fill(spool)
    await spool.lease_due(now=1000, limit=10)
    shown = await spool.show(q.m1, 1000)
    assert shown is not None
    await spool.settle(
        [
            Settlement(q.m1, [r.rid for r in shown.recipients], RecipientState.QUEUED, "451", due=5000),
        ],
        now=1000,
    )
    await spool.hold(Selector(message_id=q.m1, domain="two.test"), 1000)
    assert await spool.lease_due(now=2000, limit=10) == []
    assert await spool.flush(Selector(message_id=q.m1), 2000) == 1  # r1; r2 is held
    assert await spool.flush(Selector(message_id=q.m1), 2000) == 0  # due already
    [work] = await spool.lease_due(now=2000, limit=10)
    assert [r.address for r in work.recipients] == ["r1@one.test"]
    assert await states(spool, q.m1) == {"r1@one.test": "leased", "r2@two.test": "held"}


async def test_move_gives_waiting_recipients_to_another_pool_keeping_their_state(spool: SpoolBackend) -> None:
    q = await fill(spool)
    await spool.hold(Selector(message_id=q.m3), 1000)
    assert await spool.move(Selector(domain="one.test"), "bulk", 1000) == 1  # r1; r3 is there; r5 flies
    assert await spool.move(Selector(sender=""), "bulk", 1000) == 1  # r4, held
    assert await listed(spool, Selector(pool="bulk")) == {
        q.m1: ["r1@one.test"],
        q.m2: ["r3@one.test"],
        q.m3: ["r4@two.test"],
    }
    assert await states(spool, q.m3) == {"r4@two.test": "held"}
    work = await spool.lease_due(now=1000, limit=10)
    assert sorted((w.pool, r.address) for w in work for r in w.recipients) == [
        ("bulk", "r1@one.test"),
        ("bulk", "r3@one.test"),
        ("p", "r2@two.test"),
    ]


async def test_stats_count_the_queue_per_pool_and_domain_with_the_oldest_age(spool: SpoolBackend) -> None:
    q = await fill(spool)
    await spool.hold(Selector(message_id=q.m3), 1000)
    shown = await spool.show(q.m1, 1000)
    assert shown is not None
    r1 = shown.recipients[0]
    await spool.settle(
        [Settlement(q.m1, [r1.rid], RecipientState.DELIVERED, "250")], now=1000
    )  # final: not counted
    assert await spool.stats(Selector(), 1000) == [
        DestinationStats("p", "two.test", {"queued": 1, "held": 1}, 900),
        DestinationStats("bulk", "one.test", {"queued": 1}, 800),
        DestinationStats("p", "one.test", {"leased": 1}, 600),
    ]
    assert await spool.stats(Selector(), 1000, limit=1) == [
        DestinationStats("p", "two.test", {"queued": 1, "held": 1}, 900)
    ]
    assert await spool.stats(Selector(pool="bulk"), 1000) == [
        DestinationStats("bulk", "one.test", {"queued": 1}, 800)
    ]


async def test_show_keeps_each_attempt_with_its_member_reply_and_time_while_the_message_stays(
    spool: SpoolBackend,
) -> None:
    mid = new_message_id()
    env = Envelope("app@x.test", ("a@one.test", "b@two.test"), BODY)
    [w1, w2] = await spool.store(mid, env, {"a@one.test": "p", "b@two.test": "p"}, 10)
    a, b = w1.recipients[0].rid, w2.recipients[0].rid
    later = "451 4.2.0 later"
    await spool.settle(
        [
            Settlement(mid, [a], RecipientState.QUEUED, later, due=15, attempts=1, member="relay-a"),
            Settlement(mid, [b], RecipientState.DELIVERED, "250 2.0.0 ok", attempts=1, member="relay-a"),
        ],
        now=11,
    )
    [again] = await spool.lease_due(now=15, limit=10)
    assert [r.rid for r in again.recipients] == [a]
    await spool.settle(
        [Settlement(mid, [a], RecipientState.QUEUED, "452 4.2.2 full", due=99, attempts=2, member="relay-b")],
        now=20,
    )
    # No attempt was made (no usable member): nothing kept, and the last attempt's member stays.
    await spool.lease_due(now=99, limit=10)
    await spool.settle(
        [Settlement(mid, [a], RecipientState.QUEUED, "451 4.4.5 no usable member", due=200, attempts=2)],
        now=30,
    )
    shown = await spool.show(mid, 40)
    assert shown is not None
    assert [(x.rid, x.member, x.reply, x.at) for x in shown.attempts] == [
        (a, "relay-a", later, 11),
        (b, "relay-a", "250 2.0.0 ok", 11),  # delivered, kept: its message stays in the queue
        (a, "relay-b", "452 4.2.2 full", 20),
    ]
    assert [(r.address, r.last_member, r.last_at) for r in shown.recipients] == [
        ("a@one.test", "relay-b", 30),
        ("b@two.test", "relay-a", 11),
    ]
    listed_page = await spool.list_queue(Selector(message_id=mid), 40)
    assert listed_page.messages[0].attempts == ()  # a listing carries no attempts, as it carries no bytes


async def test_a_message_removed_takes_its_attempts_and_a_deleted_recipient_its_own(
    spool: SpoolBackend,
) -> None:
    first = new_message_id()
    env = Envelope("app@x.test", ("a@one.test", "b@two.test"), BODY)
    pools = {"a@one.test": "p", "b@two.test": "p"}
    [w1, w2] = await spool.store(first, env, pools, 10)
    a, b = w1.recipients[0].rid, w2.recipients[0].rid
    await spool.settle(
        [Settlement(first, [a, b], RecipientState.QUEUED, "451", due=50, attempts=1, member="m")], now=11
    )
    assert await spool.delete(Selector(message_id=first, domain="one.test"), 12) == 1
    shown = await spool.show(first, 12)
    assert shown is not None and [x.rid for x in shown.attempts] == [b]
    [leased] = await spool.lease_due(now=50, limit=10)
    assert [r.rid for r in leased.recipients] == [b]
    await spool.settle([Settlement(first, [b], RecipientState.DELIVERED, "250", member="m")], now=51)
    assert await spool.show(first, 51) is None
    # The same id again (never done by postmux, but it shows nothing of the first is left behind).
    await spool.store(first, Envelope("app@x.test", ("c@one.test",), BODY), {"c@one.test": "p"}, 60)
    shown = await spool.show(first, 60)
    assert shown is not None and shown.attempts == ()


async def test_member_and_domains_choose_recipients_and_an_empty_set_of_domains_chooses_none(
    spool: SpoolBackend,
) -> None:
    q = await fill(spool)
    await spool.lease_due(now=1000, limit=10)
    shown = await spool.show(q.m1, 1000)
    assert shown is not None
    r1, r2 = (r.rid for r in shown.recipients)
    await spool.settle(
        [
            Settlement(q.m1, [r1], RecipientState.QUEUED, "451", due=5000, member="relay-a"),
            Settlement(q.m1, [r2], RecipientState.QUEUED, "451", due=5000, member="relay-b"),
        ],
        now=1000,
    )
    assert await listed(spool, Selector(member="relay-b")) == {q.m1: ["r2@two.test"]}
    assert await listed(spool, Selector(domains=frozenset({"ONE.test.", "nowhere.test"}))) == {
        q.m1: ["r1@one.test"],
        q.m2: ["r3@one.test"],
        q.flying: ["r5@one.test"],
    }
    none = Selector(domains=frozenset())
    assert not none.is_empty  # a provider whose domains are not in the queue chooses nothing, not all
    assert await listed(spool, none) == {}
    assert await spool.hold(none, 1000) == 0
    assert await spool.flush(Selector(member="relay-a"), 2000) == 1
    assert [r.address for w in await spool.lease_due(now=2000, limit=10) for r in w.recipients] == [
        "r1@one.test"
    ]


async def test_every_mass_action_refuses_a_selector_without_any_criterion(spool: SpoolBackend) -> None:
    await fill(spool)
    empty = Selector()
    calls = {
        "hold": lambda: spool.hold(empty, 1000),
        "release": lambda: spool.release(empty, 1000),
        "flush": lambda: spool.flush(empty, 1000),
        "move": lambda: spool.move(empty, "bulk", 1000),
        "delete": lambda: spool.delete(empty, 1000),
        "bounce": lambda: spool.bounce(empty, 1000, reply="550", dsn=lambda m, rs: None, dsn_pool="p"),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=f"{name} with no criterion"):
            await call()
    assert await spool.hold(Selector(everything=True), 1000) == 4  # all but r5, in flight
    assert await spool.flush(Selector(everything=True), 1000) == 0  # held: flush leaves them
    assert await spool.release(Selector(everything=True), 1000) == 4
    assert await spool.move(Selector(everything=True), "bulk", 1000) == 3  # r3 is in bulk already


async def test_a_bounce_queues_each_dsn_to_the_pool_its_sender_routes_to(spool: SpoolBackend) -> None:
    q = await fill(spool)
    pools = {"app@x.test": "app-dsn", "news@x.test": "news-dsn"}
    bounced = await spool.bounce(
        Selector(older_than_s=0),
        1000,
        reply="550 5.0.0 bounced by the operator",
        dsn=DsnRecorder(),
        dsn_pool=lambda message: pools[message.sender],
    )
    assert sum(len(b.recipients) for b in bounced) == 4  # r1, r2, r3, r4 (r5 flies)
    for pool, sender in (("app-dsn", "app@x.test"), ("news-dsn", "news@x.test")):
        [dsn] = (await spool.list_queue(Selector(pool=pool), 1000)).messages
        assert [r.address for r in dsn.recipients] == [sender]
    assert await listed(spool, Selector(sender="app@x.test")) == {q.flying: ["r5@one.test"]}


async def test_stats_give_each_destinations_last_error(spool: SpoolBackend) -> None:
    q = await fill(spool)
    await spool.lease_due(now=1000, limit=10)
    shown = await spool.show(q.m1, 1000)
    assert shown is not None
    r1, r2 = (r.rid for r in shown.recipients)
    await spool.settle(
        [Settlement(q.m1, [r1], RecipientState.QUEUED, "421 4.7.0 try later", due=5000, member="a")],
        now=1001,
    )
    await spool.settle(
        [Settlement(q.m1, [r2], RecipientState.QUEUED, "451 4.3.0 first", due=5000, member="a")], now=1002
    )
    m2 = await spool.show(q.m2, 1000)
    assert m2 is not None
    await spool.settle(
        [Settlement(q.m2, [m2.recipients[0].rid], RecipientState.QUEUED, "452 later", due=5000, member="a")],
        now=1003,
    )
    by_destination = {(d.pool, d.domain): d.last_error for d in await spool.stats(Selector(), 1100)}
    assert by_destination == {
        ("p", "one.test"): "421 4.7.0 try later",
        ("p", "two.test"): "451 4.3.0 first",
        ("bulk", "one.test"): "452 later",
    }


async def test_a_view_carries_the_message_id_field_tags_and_metadata_for_events(spool: SpoolBackend) -> None:
    mid = new_message_id()
    env = Envelope(
        "app@x.test",
        ("a@one.test",),
        BODY,
        tags={"campaign": "spring"},
        metadata={"customer": "42"},
        message_id_header="abc@x.test",
    )
    await spool.store(mid, env, {"a@one.test": "p"}, 10, lease=False)
    [listed_view] = (await spool.list_queue(Selector(message_id=mid), 20)).messages
    shown = await spool.show(mid, 20)
    for view in (listed_view, shown):
        assert view is not None
        assert (view.message_id_header, view.tags, view.metadata) == (
            "abc@x.test",
            {"campaign": "spring"},
            {"customer": "42"},
        )


async def test_text_with_nul_names_no_message_and_chooses_nothing(spool: SpoolBackend) -> None:
    """No id, address, pool or member holds NUL (PostgreSQL text cannot): asked for one, every spool
    answers as for any other unknown one, never with an error."""
    q = await fill(spool)
    assert await spool.show("ab\x00cd", 1000) is None
    assert await spool.show(q.m1 + "\x00", 1000) is None
    everything = [q.m1, q.m2, q.m3, q.flying]
    assert [
        m.message_id for m in (await spool.list_queue(Selector(), 1000, after="\x00")).messages
    ] == everything
    after_m1 = await spool.list_queue(Selector(), 1000, after=q.m1 + "\x00z")
    assert [m.message_id for m in after_m1.messages] == everything[1:]
    for nul in (
        Selector(message_id="ab\x00c"),
        Selector(pool="p\x00"),
        Selector(domain="one.test\x00"),
        Selector(sender="\x00"),
        Selector(member="a\x00"),
    ):
        assert (await spool.list_queue(nul, 1000)).messages == ()
        assert await spool.stats(nul, 1000) == []
        assert await spool.hold(nul, 1000) == 0
        assert await spool.release(nul, 1000) == 0
        assert await spool.flush(nul, 1000) == 0
        assert await spool.move(nul, "bulk", 1000) == 0
        assert await spool.delete(nul, 1000) == 0
        assert await spool.bounce(nul, 1000, reply="550", dsn=DsnRecorder(), dsn_pool="dsn") == []
    assert await spool.release("ab\x00c", 1000) == 0
    assert await listed(spool, Selector(domains=frozenset({"one.test\x00", "two.test"}))) == {
        q.m1: ["r2@two.test"],
        q.m3: ["r4@two.test"],
    }
    assert (await spool.counts())["queued"] == 4  # nothing changed
