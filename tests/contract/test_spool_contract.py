"""The spool's work side, on every backend: durability promises, recovery, atomic bounces, and leases
with an owner and an expiry (renewal, and recovery of leases that ran out).

Every method takes the time it acts at, so the tests move a manual clock by passing `now`.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from postmux.envelope import Envelope, new_message_id
from postmux.spool.base import OutboxRow, RecipientState, Selector, Settlement, SpoolBackend, SpoolError
from tests.contract.conftest import SpoolFactory


def envelope(*rcpts: str, data: bytes = b"Subject: x\r\n\r\nbody\r\n") -> Envelope:
    return Envelope("app@example.com", tuple(rcpts or ("a@one.test",)), data)


async def opened(factory: SpoolFactory, **kw: object) -> SpoolBackend:
    spool = factory(**kw)  # type: ignore[arg-type]
    await spool.open()
    return spool


async def test_store_keeps_bytes_exactly_and_groups_work_by_pool_and_domain(
    spool_factory: SpoolFactory,
) -> None:
    spool = await opened(spool_factory)
    raw = b"Subject: =?utf-8?q?caf=C3=A9?=\r\nX-Odd:   spaced  \r\n\r\n\xc3\xa9 8bit body\r\n"
    env = envelope("a@one.test", "b@one.test", "c@two.test", data=raw)
    pools = {"a@one.test": "default", "b@one.test": "default", "c@two.test": "bulk"}
    mid = new_message_id()
    work = await spool.store(mid, env, pools, now=100.0)
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
    again = await opened(spool_factory)
    shown = await again.show(mid, 100.0)
    assert shown is not None and shown.data == raw
    await again.close()


async def test_open_recovers_work_leased_by_a_process_that_died(spool_factory: SpoolFactory) -> None:
    spool = await opened(spool_factory, owner="node-1")
    await spool.store(
        new_message_id(), envelope("a@one.test", "b@two.test"), {"a@one.test": "p", "b@two.test": "p"}, 5
    )
    await spool.close()  # as if the process died: the work was never settled

    again = spool_factory(owner="node-1")  # the same node, started again
    assert await again.open() == 2
    work = await again.lease_due(now=10, limit=100)
    assert sorted(r.address for w in work for r in w.recipients) == ["a@one.test", "b@two.test"]
    assert await again.lease_due(now=10, limit=100) == []  # leased now: not handed out twice
    await again.close()


async def test_deferred_work_is_due_only_at_its_time_and_finished_messages_are_removed(
    spool: SpoolBackend,
) -> None:
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
    assert await spool.show(mid, 61) is None
    assert (await spool.list_queue(Selector(), 61)).messages == ()


async def test_a_bounce_and_its_dsn_are_recorded_together(spool: SpoolBackend) -> None:
    mid = new_message_id()
    [work] = await spool.store(mid, envelope(), {"a@one.test": "p"}, 0)
    dsn = Envelope("", ("app@example.com",), b"Subject: bounce\r\n\r\n")
    rid = work.recipients[0].rid
    await spool.settle([Settlement(mid, [rid], RecipientState.BOUNCED, "550", dsn=dsn, dsn_pool="p")], now=1)
    [dsn_work] = await spool.lease_due(now=1, limit=10)
    assert dsn_work.sender == "" and [r.address for r in dsn_work.recipients] == ["app@example.com"]
    assert dsn_work.data == dsn.data


async def test_calls_on_a_closed_spool_fail_clearly(spool_factory: SpoolFactory) -> None:
    spool = spool_factory()
    with pytest.raises(SpoolError, match="not open"):
        await spool.counts()
    calls = [
        spool.store(new_message_id(), envelope(), {"a@one.test": "p"}, 0),
        spool.lease_due(0, 10),
        spool.renew(0, [1]),
        spool.list_queue(Selector(), 0),
        spool.show("x", 0),
        spool.hold(Selector(everything=True), 0),
        spool.stats(Selector(), 0),
    ]
    for call in calls:
        with pytest.raises(SpoolError, match="not open"):
            await call
    await spool.open()
    await spool.close()
    with pytest.raises(SpoolError, match="not open"):
        await spool.lease_due(0, 10)


async def test_held_work_is_never_leased_nor_recovered_and_release_makes_it_due_at_once(
    spool_factory: SpoolFactory,
) -> None:
    spool = await opened(spool_factory)
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

    again = await opened(spool_factory)
    assert (await again.counts())["held"] == 1  # held is not a lease a dead process left behind
    assert await again.lease_due(now=10**12, limit=10) == []
    assert await again.release("no-such-message", now=50) == 0
    assert await again.release(mid, now=50) == 1
    assert await again.lease_due(now=49, limit=10) == []
    [released] = await again.lease_due(now=50, limit=10)
    assert [(r.address, r.attempts, r.local_errors) for r in released.recipients] == [("a@one.test", 3, 0)]
    assert await again.release(mid, now=51) == 0  # nothing of it is held any more
    await again.close()


async def test_rounds_and_crashes_in_a_row_are_kept_with_the_recipient_across_a_restart(
    spool_factory: SpoolFactory,
) -> None:
    spool = await opened(spool_factory)
    mid = new_message_id()
    [work] = await spool.store(mid, envelope(), {"a@one.test": "p"}, 0)
    rid = work.recipients[0].rid
    await spool.settle(
        [Settlement(mid, [rid], RecipientState.QUEUED, "451", due=5, attempts=3, rounds=2, local_errors=1)],
        now=1,
    )
    await spool.close()
    again = await opened(spool_factory)
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


# -- leases: owner, expiry, renewal, recovery ----------------------------------------------------------


async def lease_of(spool: SpoolBackend, message_id: str, now: float) -> list[tuple[str, str, float | None]]:
    shown = await spool.show(message_id, now)
    assert shown is not None
    return [(r.state, r.owner, r.lease_until) for r in shown.recipients]


async def test_a_lease_names_its_owner_and_runs_until_now_plus_the_ttl(spool_factory: SpoolFactory) -> None:
    spool = await opened(spool_factory, owner="node-1", lease_ttl_s=60)
    assert (spool.owner, spool.lease_ttl_s) == ("node-1", 60)
    hot, cold = new_message_id(), new_message_id()
    await spool.store(hot, envelope(), {"a@one.test": "p"}, 100)
    await spool.store(cold, envelope(), {"a@one.test": "p"}, 100, lease=False)
    assert await lease_of(spool, hot, 100) == [("leased", "node-1", 160)]
    assert await lease_of(spool, cold, 100) == [("queued", "", None)]  # not leased: nobody holds it
    [item] = await spool.lease_due(now=130, limit=10)
    assert item.message_id == cold
    assert await lease_of(spool, cold, 130) == [("leased", "node-1", 190)]
    rids = [r.rid for r in item.recipients]
    await spool.settle([Settlement(cold, rids, RecipientState.QUEUED, "451", due=500)], now=131)
    assert await lease_of(spool, cold, 131) == [("queued", "", None)]  # settled: the lease is over
    await spool.close()


async def test_a_lease_that_ran_out_is_taken_over_by_the_next_lease_due_with_its_counts(
    spool_factory: SpoolFactory,
) -> None:
    spool = await opened(spool_factory, owner="node-1", lease_ttl_s=60)
    mid = new_message_id()
    [work] = await spool.store(mid, envelope(), {"a@one.test": "p"}, 0)
    rid = work.recipients[0].rid
    await spool.settle(
        [Settlement(mid, [rid], RecipientState.QUEUED, "451", due=10, attempts=2, rounds=1, local_errors=1)],
        now=1,
    )
    [leased] = await spool.lease_due(now=10, limit=10)  # until 70; then its owner stops renewing
    assert await spool.lease_due(now=69.9, limit=10) == []
    [taken_over] = await spool.lease_due(now=70, limit=10)
    assert [r.rid for r in taken_over.recipients] == [r.rid for r in leased.recipients] == [rid]
    assert (taken_over.attempts, taken_over.rounds, taken_over.local_errors) == (2, 1, 1)
    assert taken_over.data == leased.data and taken_over.sender == leased.sender
    assert await lease_of(spool, mid, 70) == [("leased", "node-1", 130)]
    assert await spool.lease_due(now=71, limit=10) == []  # taken over once, not handed out twice
    await spool.close()


async def test_renew_extends_the_leases_its_owner_holds_so_none_is_taken_over(
    spool_factory: SpoolFactory,
) -> None:
    spool = await opened(spool_factory, owner="node-1", lease_ttl_s=60)
    first, second, waiting = new_message_id(), new_message_id(), new_message_id()
    work = await spool.store(
        first, envelope("a@one.test", "b@two.test"), {"a@one.test": "p", "b@two.test": "p"}, 0
    )
    work += await spool.store(second, envelope(), {"a@one.test": "p"}, 30)
    await spool.store(waiting, envelope(), {"a@one.test": "p"}, 0, lease=False)
    await spool.hold(Selector(message_id=waiting), 0)
    [held_rid] = [r.rid for r in (await spool.show(waiting, 0)).recipients]  # type: ignore[union-attr]
    rids = [r.rid for w in work for r in w.recipients]
    assert await spool.renew(now=50, rids=[*rids, held_rid]) == 3  # the held one is nobody's lease
    assert await spool.lease_due(now=109, limit=10) == []
    assert await lease_of(spool, first, 109) == [("leased", "node-1", 110)] * 2
    assert await lease_of(spool, waiting, 109) == [("held", "", None)]
    work = await spool.lease_due(now=110, limit=10)
    assert sorted(w.message_id for w in work) == sorted([first, first, second])
    await spool.close()


async def test_a_lease_its_owner_no_longer_holds_is_not_renewed_and_runs_out(
    spool_factory: SpoolFactory,
) -> None:
    """Outage review item 1: the owner renews what it holds, not every row the store names it the owner
    of. A lease whose work it dropped (an outcome it gave up recording, a store or lease_due whose commit
    reply was lost) runs out at its time and the next lease_due takes it: never held until a restart."""
    spool = await opened(spool_factory, owner="node-1", lease_ttl_s=60)
    kept, dropped = new_message_id(), new_message_id()
    [kept_work] = await spool.store(kept, envelope(), {"a@one.test": "p"}, 0)
    await spool.store(dropped, envelope(), {"a@one.test": "p"}, 0)  # its answer never reached the owner
    for now in (20, 40, 60, 80, 100):  # the owner's heartbeat, every third of the ttl
        assert await spool.renew(now=now, rids=[r.rid for r in kept_work.recipients]) == 1
    assert await lease_of(spool, dropped, 100) == [("leased", "node-1", 60)]  # not pushed on
    [taken] = await spool.lease_due(now=101, limit=10)  # the owner's own scan, or another node's
    assert taken.message_id == dropped
    assert await lease_of(spool, kept, 101) == [("leased", "node-1", 160)]
    await spool.close()


async def test_leases_without_a_ttl_never_run_out_and_renew_has_nothing_to_extend(
    spool: SpoolBackend,
) -> None:
    assert spool.lease_ttl_s is None and spool.owner
    mid = new_message_id()
    await spool.store(mid, envelope(), {"a@one.test": "p"}, 0)
    assert await spool.lease_due(now=10**12, limit=10) == []
    assert await spool.renew(now=10**12, rids=[1, 2]) == 0
    assert await lease_of(spool, mid, 0) == [("leased", spool.owner, None)]


async def test_an_outcome_is_recorded_even_after_its_lease_was_taken_over(
    spool_factory: SpoolFactory,
) -> None:
    spool = await opened(spool_factory, lease_ttl_s=60)
    mid = new_message_id()
    [slow] = await spool.store(mid, envelope(), {"a@one.test": "p"}, 0)
    [_] = await spool.lease_due(now=60, limit=10)  # taken over while the first attempt still ran
    rids = [r.rid for r in slow.recipients]
    await spool.settle([Settlement(mid, rids, RecipientState.DELIVERED, "250 ok", attempts=1)], now=61)
    assert await spool.show(mid, 61) is None  # delivered is a fact, whoever learned it
    await spool.close()


async def test_lease_due_hands_out_at_most_its_limit_of_expired_and_due_work_together(
    spool_factory: SpoolFactory,
) -> None:
    spool = await opened(spool_factory, lease_ttl_s=60)
    for _ in range(3):
        await spool.store(new_message_id(), envelope(), {"a@one.test": "p"}, 0)  # run out at 60
    for _ in range(3):
        await spool.store(new_message_id(), envelope(), {"a@one.test": "p"}, 0, lease=False)
    taken = [len(w.recipients) for w in await spool.lease_due(now=60, limit=4)]
    assert sum(taken) == 4
    taken += [len(w.recipients) for w in await spool.lease_due(now=60, limit=4)]
    assert sum(taken) == 6
    assert await spool.lease_due(now=60, limit=4) == []
    await spool.close()


async def test_the_senders_labels_and_message_id_header_stay_with_the_message_across_a_restart(
    spool_factory: SpoolFactory,
) -> None:
    """Events of every attempt, whenever it runs, carry what the sender attached at accept."""
    spool = await opened(spool_factory)
    env = replace(
        envelope("a@one.test"),
        tags={"campaign": "spring", "ünï": "cödé"},
        metadata={"customer": "42"},
        message_id_header="abc@example.com",
    )
    mid = new_message_id()
    (hot,) = await spool.store(mid, env, {"a@one.test": "p"}, now=1.0)
    assert (hot.tags, hot.metadata, hot.message_id_header) == (env.tags, env.metadata, "abc@example.com")
    await spool.close()
    again = await opened(spool_factory)  # the lease of a process that died is queued again
    (item,) = await again.lease_due(2.0, 10)
    assert (item.tags, item.metadata, item.message_id_header) == (env.tags, env.metadata, "abc@example.com")
    await again.close()


async def test_mail_without_labels_reads_back_with_none(spool_factory: SpoolFactory) -> None:
    spool = await opened(spool_factory)
    await spool.store(new_message_id(), envelope("a@one.test"), {"a@one.test": "p"}, now=1.0, lease=False)
    (item,) = await spool.lease_due(2.0, 10)
    assert (item.tags, item.metadata, item.message_id_header) == ({}, {}, "")
    await spool.close()


# -- a settle retried after a lost commit reply (outage review item 2) ----------------------------------


async def test_a_settle_retried_after_it_committed_queues_no_second_dsn_nor_second_events_or_attempts(
    spool: SpoolBackend,
) -> None:
    """The dispatcher retries a settle that raised, with `again`; the first may have committed with its
    reply lost (PostgreSQL: the link dropped after COMMIT). That retry records nothing twice."""
    mid = new_message_id()
    [work] = await spool.store(
        mid, envelope("a@one.test", "b@one.test"), {"a@one.test": "p", "b@one.test": "p"}, 0
    )
    a, b = (r.rid for r in work.recipients)
    dsn = Envelope("", ("app@example.com",), b"Subject: bounce\r\n\r\n")
    bounced = [Settlement(mid, [a], RecipientState.BOUNCED, "550 no", dsn=dsn, dsn_pool="p", member="m1")]
    rows = [OutboxRow("hook", "ev-bounce", '{"event_id": "ev-bounce"}', 5)]
    await spool.settle(bounced, now=5, outbox=rows)
    await spool.settle(bounced, now=5, outbox=rows, again=True)  # the retry of a commit whose reply was lost
    dsn_work = await spool.lease_due(now=5, limit=10)
    assert [w.sender for w in dsn_work] == [""]  # one DSN
    assert [e.event_id for e in await spool.outbox_head("hook", 0, 10)] == ["ev-bounce"]
    shown = await spool.show(mid, 5)
    assert shown is not None and [(x.rid, x.member) for x in shown.attempts] == [(a, "m1")]
    # The last recipient delivered: the message goes; a retry of that settle finds nothing and does nothing.
    last = [Settlement(mid, [b], RecipientState.DELIVERED, "250 ok", member="m1")]
    await spool.settle(last, now=6)
    await spool.settle(last, now=6, again=True)
    assert await spool.show(mid, 6) is None


async def test_a_settle_retried_after_it_failed_before_its_commit_is_recorded(spool: SpoolBackend) -> None:
    mid = new_message_id()
    [work] = await spool.store(mid, envelope(), {"a@one.test": "p"}, 0)
    rid = work.recipients[0].rid
    dsn = Envelope("", ("app@example.com",), b"Subject: bounce\r\n\r\n")
    await spool.settle(
        [Settlement(mid, [rid], RecipientState.BOUNCED, "550 no", dsn=dsn, dsn_pool="p")], now=5, again=True
    )
    [dsn_work] = await spool.lease_due(now=5, limit=10)
    assert dsn_work.sender == ""
    assert await spool.show(mid, 5) is None  # bounced, its last recipient: the message went
