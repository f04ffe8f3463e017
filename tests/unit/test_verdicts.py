"""The verdicts: what becomes of work after an attempt, or when none can be made, as values.

No sockets, no spool, no event bus: a real Pool (pure), a retry schedule without jitter, a manual `now`,
and the facts an attempt would report. Each test reads the verdict the dispatcher would apply.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from postmux.attempt import AttemptOutcome, Breakoff
from postmux.balancing.pool import Pool
from postmux.body import BodyFile
from postmux.config import ConfigError, Settings, settings_from_dict
from postmux.events.types import EventType
from postmux.reply import Reply
from postmux.scheduling import verdicts
from postmux.scheduling.gate import Gate
from postmux.scheduling.retry import RetrySchedule
from postmux.scheduling.router import Router
from postmux.scheduling.verdicts import Rules, Tally, Verdict
from postmux.spool.base import RecipientState
from postmux.work import WorkItem, WorkRecipient

NOW = 1_700_000_000.0
MINUTE = 60.0
OK = Reply(250, "2.0.0", "queued as 1")
NO_SUCH_USER = Reply(550, "5.1.1", "no such user")
TRY_LATER = Reply(451, "4.3.0", "try later")
NO_SMTPUTF8 = Reply(553, "5.6.7", "SMTPUTF8 required but not offered by relay-a")
# A refusal of the sending IP, not of the recipient (bounce class SpamBlock).
BLOCKLISTED = Reply(
    554, "5.7.1", "Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org"
)


def make_settings(members: str = "ab", bounces: dict[str, Any] | None = None, **retry: Any) -> Settings:
    return settings_from_dict(
        {
            "smtp": {"hostname": "relay.example.test"},
            "pool": [
                {
                    "name": "p",
                    "members": [
                        {"name": n, "address": f"127.0.0.1:{2600 + i}"} for i, n in enumerate(members)
                    ],
                },
                {"name": "default", "members": [{"name": "y", "address": "127.0.0.1:2700"}]},
                {"name": "dsn", "members": [{"name": "z", "address": "127.0.0.1:2701"}]},
            ],
            "route": [{"match": {"recipient_domain": "app.example"}, "pool": "dsn"}],
            "retry": {"intervals": ["1m", "5m", "15m"], "max_age": "1d", "jitter": 0, **retry},
            "bounces": bounces or {},
        }
    )


def setup(members: str = "ab", bounces: dict[str, Any] | None = None, **retry: Any) -> tuple[Pool, Rules]:
    s = make_settings(members, bounces, **retry)
    rules = Rules(RetrySchedule(s.retry), Router(s), s.smtp.hostname, s.bounces.refuses_member)
    return Pool(s.pool[0]), rules


def work(
    *rids: int, tried: set[str] | None = None, age_s: float = 10.0, attempts: int = 0, **recipient: int
) -> WorkItem:
    return WorkItem(
        message_id="m1",
        sender="app@app.example",
        pool="p",
        domain="dest.example",
        recipients=[
            WorkRecipient(rid, f"user{rid}@dest.example", attempts, **recipient) for rid in rids or (1,)
        ],
        data=b"Subject: hi\r\n\r\nhello\r\n",
        created=NOW - age_s,
        tried=set(tried or ()),
        destination="dest.example",
    )


def answered(*replies: Reply, tls: str = "TLSv1.3 TLS_AES_256_GCM_SHA384") -> AttemptOutcome:
    return AttemptOutcome({i + 1: r for i, r in enumerate(replies)}, "relay-a", tls=tls)


def kinds(v: Verdict) -> list[tuple[EventType, str, int]]:
    return [(e.type, e.member, e.num_attempts) for e in v.events]


def test_a_recipient_the_member_accepted_is_delivered_and_counted_for_the_member() -> None:
    pool, rules = setup()
    item = work(1, tried={"a"})
    v = verdicts.after_attempt(item, "a", answered(OK), pool, rules, NOW)
    [s] = v.settlements
    assert (s.state, list(s.rids), s.attempts, s.dsn) == (RecipientState.DELIVERED, [1], 1, None)
    assert s.reply == str(OK)  # the attempt's reply, kept while the message stays for others
    assert kinds(v) == [(EventType.DELIVERY, "a", 1)]
    assert v.events[0].tags == {"tls": "TLSv1.3 TLS_AES_256_GCM_SHA384"}
    assert v.tally == Tally(delivered=1) and v.retry_now is None and not v.held


def test_a_permanent_refusal_bounces_with_a_dsn_routed_as_mail_to_the_sender() -> None:
    pool, rules = setup()
    v = verdicts.after_attempt(work(1, 2, tried={"a"}), "a", answered(OK, NO_SUCH_USER), pool, rules, NOW)
    delivered, bounced = v.settlements
    assert (delivered.state, list(delivered.rids)) == (RecipientState.DELIVERED, [1])
    assert (bounced.state, list(bounced.rids), bounced.reply) == (
        RecipientState.BOUNCED,
        [2],
        str(NO_SUCH_USER),
    )
    assert bounced.dsn is not None and bounced.dsn.recipients == ("app@app.example",)
    assert b"user2@dest.example" in bounced.dsn.data and b"relay-a" in bounced.dsn.data  # Remote-MTA
    assert bounced.dsn_pool == "dsn"  # the route for mail to app.example
    assert [e.type for e in v.events] == [EventType.DELIVERY, EventType.BOUNCE]
    assert v.tally == Tally(delivered=1, bounced=1)


def test_a_5xx_refusing_the_member_goes_to_another_member_and_bounces_at_the_last() -> None:
    pool, rules = setup("ab")
    first = verdicts.after_attempt(
        work(1, 2, tried={"a"}), "a", answered(BLOCKLISTED, NO_SUCH_USER), pool, rules, NOW
    )
    # The blocklisted IP's refusal says nothing of recipient 1: member b, another IP, tries it now.
    # Recipient 2's 5.1.1 is about the recipient: it bounces where it was given.
    [bounced] = first.settlements
    assert (bounced.state, list(bounced.rids)) == (RecipientState.BOUNCED, [2])
    assert first.retry_now is not None and [r.rid for r in first.retry_now.recipients] == [1]
    assert [e.type for e in first.events] == [EventType.TRANSIENT_FAILURE, EventType.BOUNCE]
    assert first.events[0].response == BLOCKLISTED and first.tally == Tally(deferred=1, bounced=1)

    second = first.retry_now
    second.tried.add("b")
    last = verdicts.after_attempt(second, "b", answered(BLOCKLISTED), pool, rules, NOW)
    [s] = last.settlements  # no member is left that has not tried: the last refusal bounces
    assert (s.state, s.reply) == (RecipientState.BOUNCED, str(BLOCKLISTED)) and s.dsn is not None
    assert kinds(last) == [(EventType.BOUNCE, "b", 2)] and last.retry_now is None


def test_a_5xx_refusing_the_member_bounces_at_once_with_no_other_member_or_no_class_listed() -> None:
    alone, rules = setup("a")
    v = verdicts.after_attempt(work(1, tried={"a"}), "a", answered(BLOCKLISTED), alone, rules, NOW)
    assert [s.state for s in v.settlements] == [RecipientState.BOUNCED] and v.retry_now is None

    pool, rules = setup("ab", {"try_other_members": []})
    assert rules.refuses_member is None
    v = verdicts.after_attempt(work(1, tried={"a"}), "a", answered(BLOCKLISTED), pool, rules, NOW)
    assert [s.state for s in v.settlements] == [RecipientState.BOUNCED] and v.retry_now is None


def test_try_other_members_takes_only_bounce_classes() -> None:
    with pytest.raises(ConfigError) as caught:
        make_settings("ab", {"try_other_members": ["Spamblock"]})
    [(key, reason)] = caught.value.problems
    assert key == "bounces" and reason.startswith("try_other_members: 'Spamblock' is not a bounce class")


def test_a_bounce_of_a_text_with_a_tail_quotes_the_header_section_from_the_tail(tmp_path: Path) -> None:
    """data may hold only the trace header; the rest of the header section is the tail's first octets.
    The DSN quotes it, never the body; the events say the whole text's size."""
    pool, rules = setup()
    data = b"Received: from client.test\r\n"
    text = b"Subject: from the tail\r\n\r\n" + b"secret body line\r\n" * 10_000
    path = tmp_path / "tail"
    path.write_bytes(text)
    item = replace(work(1, 2, tried={"a"}), data=data, tail=BodyFile(str(path), 0, len(text)))
    v = verdicts.after_attempt(item, "a", answered(OK, NO_SUCH_USER), pool, rules, NOW)
    bounced = v.settlements[1]
    assert bounced.dsn is not None
    assert data + b"Subject: from the tail\r\n" in bounced.dsn.data and b"secret" not in bounced.dsn.data
    assert [e.size for e in v.events] == [len(data) + len(text)] * 2


def test_a_deferral_goes_at_once_to_another_member_that_has_not_tried_it() -> None:
    pool, rules = setup("ab")
    item = work(1, 2, tried={"a"})
    v = verdicts.after_attempt(item, "a", answered(OK, TRY_LATER), pool, rules, NOW)
    [delivered] = v.settlements  # the deferred recipient is not recorded: it goes on in memory
    assert list(delivered.rids) == [1]
    assert v.retry_now is not None and [r.rid for r in v.retry_now.recipients] == [2]
    assert v.retry_now.recipients[0].attempts == 1 and v.retry_now.tried == {"a"}
    assert kinds(v) == [(EventType.DELIVERY, "a", 1), (EventType.TRANSIENT_FAILURE, "a", 1)]
    assert v.tally == Tally(delivered=1, deferred=1)
    assert [r.attempts for r in item.recipients] == [0, 0]  # the work given is left as it was


TOO_MANY = Reply(452, "4.5.3", "Too many recipients")


def test_recipients_too_many_for_the_transaction_go_at_once_in_a_new_one_without_ending_a_round() -> None:
    """RFC 5321 4.5.3.1.10, RFC 3463 X.5.3: the receiver took 1 and 2 and would take no more in this
    transaction; 3 and 4 are a transaction of their own, now, on any member (this one too), as a shaping
    split's remainder is: no settlement, no event, no failure counted, no round used up."""
    pool, rules = setup("ab")
    item = work(1, 2, 3, 4, 5, tried={"a"}, rounds=1, attempts=2)
    v = verdicts.after_attempt(item, "a", answered(OK, OK, TOO_MANY, TOO_MANY, TRY_LATER), pool, rules, NOW)
    assert v.split is not None
    assert [(r.rid, r.attempts, r.rounds) for r in v.split.recipients] == [(3, 2, 1), (4, 2, 1)]
    assert v.split.tried == set() and v.split.destination == "dest.example"
    # The others as ever: 1 and 2 delivered, 5 deferred to member b.
    assert [list(s.rids) for s in v.settlements] == [[1, 2]]
    assert v.retry_now is not None and [r.rid for r in v.retry_now.recipients] == [5]
    assert [e.recipient for e in v.events] == [f"user{i}@dest.example" for i in (1, 2, 5)]
    assert v.tally == Tally(delivered=2, deferred=1)


@pytest.mark.parametrize(
    "replies",
    [
        pytest.param((TOO_MANY, TOO_MANY), id="none delivered"),
        pytest.param((TRY_LATER, TOO_MANY), id="the one taken deferred at DATA"),
    ],
)
def test_too_many_recipients_with_none_delivered_waits_as_any_deferral(replies: tuple[Reply, ...]) -> None:
    """Bounded: only a transaction that delivered someone splits, so a receiver that says 4.5.3 to every
    RCPT cannot keep the work going round at once."""
    pool, rules = setup("a")
    v = verdicts.after_attempt(work(1, 2, tried={"a"}), "a", answered(*replies), pool, rules, NOW)
    assert v.split is None and v.retry_now is None
    assert sorted(r for s in v.settlements for r in s.rids) == [1, 2]
    assert {s.state for s in v.settlements} == {RecipientState.QUEUED}


def test_a_deferral_once_every_member_tried_waits_for_the_next_round_on_the_retry_schedule() -> None:
    pool, rules = setup("ab")
    # The second round: both members tried, and the recipients have ended one round before.
    v = verdicts.after_attempt(
        work(1, tried={"a", "b"}, rounds=1, attempts=2), "b", answered(TRY_LATER), pool, rules, NOW
    )
    [s] = v.settlements
    assert (s.state, s.reply, s.attempts, s.rounds) == (RecipientState.QUEUED, str(TRY_LATER), 3, 2)
    assert s.due == NOW + 5 * MINUTE  # intervals[1]: the wait after the second round, however many tries
    assert v.retry_now is None and v.tally == Tally(deferred=1)
    assert s.member == "b"  # the spool keeps the attempt, and b as the recipient's last member


def test_every_settlement_of_an_attempt_names_its_member_and_one_without_an_attempt_none() -> None:
    pool, rules = setup("a")
    v = verdicts.after_attempt(work(1, 2, tried={"a"}), "a", answered(OK, NO_SUCH_USER), pool, rules, NOW)
    assert [s.member for s in v.settlements] == ["a", "a"]
    v = verdicts.crashed(work(1, tried={"a"}), "a", RuntimeError("bug"), pool, rules, NOW)
    assert [s.member for s in v.settlements] == ["a"]
    pool.drain("a")
    assert [s.member for s in verdicts.no_member(work(1), pool, rules, NOW).settlements] == [""]


def test_no_usable_member_waits_without_using_up_a_round() -> None:
    pool, rules = setup("ab")
    pool.drain("a")
    pool.drain("b")
    v = verdicts.no_member(work(1), pool, rules, NOW)
    [s] = v.settlements
    assert (s.state, s.rounds, s.due) == (RecipientState.QUEUED, 0, NOW + MINUTE)
    assert [(e.type, e.member, e.response) for e in v.events] == [
        (EventType.TRANSIENT_FAILURE, "", Reply(451, "4.4.5", "no usable member in pool p"))
    ]


def test_deferred_work_past_max_age_expires_with_a_dsn() -> None:
    pool, rules = setup("ab")
    v = verdicts.after_attempt(
        work(1, tried={"a", "b"}, age_s=86_400), "b", answered(TRY_LATER), pool, rules, NOW
    )
    [s] = v.settlements
    assert s.state is RecipientState.EXPIRED and s.dsn is not None and s.dsn_pool == "dsn"
    assert kinds(v) == [(EventType.TRANSIENT_FAILURE, "b", 1), (EventType.EXPIRATION, "", 1)]


def unfit(remote: str) -> AttemptOutcome:
    return AttemptOutcome({1: NO_SMTPUTF8}, remote, local=True, unfit=True)


def test_a_member_without_smtputf8_passes_the_work_on_and_the_last_one_bounces_it() -> None:
    pool, rules = setup("ab")
    first = verdicts.after_attempt(work(1, tried={"a"}), "a", unfit("relay-a"), pool, rules, NOW)
    assert first.settlements == [] and first.tally == Tally()
    assert first.retry_now is not None and first.retry_now.unfit == {"a"}
    assert [r.attempts for r in first.retry_now.recipients] == [0]  # nothing was sent: not an attempt

    second = first.retry_now
    second.tried.add("b")
    last = verdicts.after_attempt(second, "b", unfit("relay-b"), pool, rules, NOW)
    [s] = last.settlements
    assert (s.state, s.reply) == (RecipientState.BOUNCED, str(NO_SMTPUTF8)) and s.dsn is not None
    assert kinds(last) == [(EventType.BOUNCE, "b", 1)] and last.tally == Tally(bounced=1)


def test_work_no_member_could_take_waits_for_a_member_out_of_service_that_was_never_asked() -> None:
    pool, rules = setup("abc")
    pool.drain("c")  # c might offer SMTPUTF8: the refusal is not final while it is out
    item = work(1, tried={"a", "b"})
    item.unfit.add("a")
    v = verdicts.after_attempt(item, "b", unfit("relay-b"), pool, rules, NOW)
    [s] = v.settlements
    wait = Reply(451, "4.4.5", "no usable member offering SMTPUTF8 in pool p")
    assert (s.state, s.reply, s.due, s.rounds) == (RecipientState.QUEUED, str(wait), NOW + MINUTE, 1)
    assert [(e.type, e.response) for e in v.events] == [(EventType.TRANSIENT_FAILURE, wait)]


def test_a_crash_goes_to_another_member_then_waits_then_is_held_after_max_local_errors() -> None:
    pool, rules = setup("ab", max_local_errors=3)
    bug = RuntimeError("a bug that this message meets")
    again = verdicts.crashed(work(1, tried={"a"}), "a", bug, pool, rules, NOW)
    assert again.retry_now is not None and again.settlements == []
    assert [(r.attempts, r.local_errors) for r in again.retry_now.recipients] == [(1, 1)]
    assert [e.tags for e in again.events] == [{"local_error": "RuntimeError"}]

    waits = verdicts.crashed(
        work(1, tried={"a", "b"}, attempts=1, local_errors=1), "b", bug, pool, rules, NOW
    )
    [s] = waits.settlements
    assert (s.state, s.local_errors, s.rounds, s.due) == (RecipientState.QUEUED, 2, 1, NOW + MINUTE)
    assert not waits.held

    held = verdicts.crashed(
        work(1, tried={"a"}, attempts=2, local_errors=2, rounds=1), "a", bug, pool, rules, NOW
    )
    [s] = held.settlements
    # Held, not deferred: no round ends (the rounds stored are kept for when it is released).
    assert (s.state, s.local_errors, s.attempts, s.rounds, s.due) == (RecipientState.HELD, 3, 3, 1, 0.0)
    assert held.held and held.retry_now is None and held.tally == Tally()
    [e] = held.events
    assert (e.type, e.member, e.num_attempts) == (EventType.HELD, "a", 3)
    assert e.tags == {"reason": "local_error", "error": "RuntimeError: a bug that this message meets"}
    assert e.response == Reply(451, "4.3.0", "internal error: RuntimeError")


def test_a_crash_while_settling_requeues_the_work_for_a_round_and_holds_it_after_max_local_errors() -> None:
    pool, rules = setup("ab", max_local_errors=2)
    bug = RuntimeError("a bug in building the DSN")
    [s] = verdicts.after_crash(work(1, tried={"a"}), bug, pool, rules, NOW).settlements
    assert (s.state, s.local_errors, s.rounds, s.due) == (RecipientState.QUEUED, 1, 1, NOW + MINUTE)
    v = verdicts.after_crash(work(1, tried={"a"}, local_errors=1), bug, pool, rules, NOW)
    [s] = v.settlements
    assert (s.state, s.local_errors, s.due) == (RecipientState.HELD, 2, 0.0)
    assert [e.type for e in v.events] == [EventType.HELD]


def test_work_only_suspended_members_could_take_waits_for_the_first_to_reopen_without_using_up_a_round() -> (
    None
):
    pool, rules = setup("ab")
    reopen = NOW + 15 * MINUTE  # a suspension of 15 minutes
    v = verdicts.postponed(work(1, rounds=2, attempts=4), pool, reopen, rules, NOW)
    [s] = v.settlements
    assert (s.state, s.due, s.rounds, s.attempts) == (RecipientState.QUEUED, reopen, 2, 4)
    held_back = Reply(451, "4.7.0", "p: every member is held back from dest.example")
    assert [(e.type, e.member, e.response) for e in v.events] == [
        (EventType.TRANSIENT_FAILURE, "", held_back)
    ]

    # A member already tried may take it again at its next retry, before the suspension ends.
    [s] = verdicts.postponed(work(1, tried={"a"}), pool, reopen, rules, NOW).settlements
    assert (s.due, s.rounds) == (NOW + MINUTE, 1)

    # Past max_age it expires, as any deferred work does.
    [s] = verdicts.postponed(work(1, age_s=86_400), pool, reopen, rules, NOW).settlements
    assert s.state is RecipientState.EXPIRED and s.dsn is not None


def test_an_attempt_that_broke_off_defers_its_recipients_to_another_member() -> None:
    pool, rules = setup("ab")
    lost = AttemptOutcome(
        {1: Reply(451, "4.4.2", "timeout during DATA with relay-a")}, "relay-a", Breakoff.TIMEOUT, local=True
    )
    v = verdicts.after_attempt(work(1, tried={"a"}), "a", lost, pool, rules, NOW)
    assert v.retry_now is not None and v.tally == Tally(deferred=1)


def test_work_only_warm_up_capped_members_could_take_moves_once_to_their_overflow_pool() -> None:
    s = settings_from_dict(
        {
            "pool": [
                {
                    "name": "default",
                    "members": [
                        {
                            "name": "ip1",
                            "kind": "source",
                            "source_address": "127.0.0.2",
                            "warmup": {"start": "2023-11-14", "days": [10], "overflow_pool": "relays"},
                        }
                    ],
                },
                {"name": "relays", "members": [{"name": "r", "address": "127.0.0.1:2601"}]},
            ]
        }
    )
    capped = Gate(closed={"ip1"}, away={"ip1"}, capped=Pool(s.pool[0]).members)
    item = work(1, tried={"ip1"})
    item.pool = "default"
    moved = verdicts.overflow(item, capped, {"default", "relays"})
    assert moved is not None
    assert (moved.pool, moved.overflowed_from, moved.destination, moved.tried) == (
        "relays",
        "default",
        "",
        set(),
    )
    assert item.pool == "default" and item.tried == {"ip1"}  # the work given is left as it was
    assert verdicts.overflow(moved, capped, {"default", "relays"}) is None  # once only
    assert verdicts.overflow(item, capped, {"default"}) is None  # no such pool (any more): it waits


# -- SPF: no member the sender domain permits ---------------------------------------------------------------


def test_work_no_permitted_member_can_take_waits_with_the_spf_reason_and_uses_no_round() -> None:
    pool, rules = setup()
    why = {"a": "192.0.2.10 fail", "b": "192.0.2.20 softfail"}
    v = verdicts.spf_refused(work(1), pool, "app.example", why, rules, NOW)
    [s] = v.settlements
    assert s.state is RecipientState.QUEUED and s.due == NOW + MINUTE and s.rounds == 0 and s.dsn is None
    [e] = v.events
    assert e.type is EventType.TRANSIENT_FAILURE and e.response is not None
    assert (e.response.code, e.response.enhanced_code) == (451, "4.7.23")
    assert "SPF record of app.example (a: 192.0.2.10 fail, b: 192.0.2.20 softfail)" in e.response.text
    assert e.tags == {"reason": "spf_not_permitted", "spf_domain": "app.example"}


def test_a_record_that_could_not_be_evaluated_says_so_with_x_7_24() -> None:
    pool, rules = setup()
    v = verdicts.spf_refused(work(1), pool, "app.example", {"a": "192.0.2.10 temperror"}, rules, NOW)
    assert v.events[0].response == Reply(
        451, "4.7.24", "the SPF record of app.example could not be evaluated (a: 192.0.2.10 temperror)"
    )


def test_work_spf_keeps_from_every_member_expires_with_a_dsn_after_max_age() -> None:
    pool, rules = setup()
    v = verdicts.spf_refused(work(1, age_s=2 * 86400), pool, "app.example", {"a": "x fail"}, rules, NOW)
    [s] = v.settlements
    assert s.state is RecipientState.EXPIRED and s.dsn is not None
    assert [e.type for e in v.events] == [EventType.EXPIRATION]


def test_a_deferral_is_not_passed_on_to_a_member_spf_bars() -> None:
    pool, rules = setup()
    item = replace(work(1, tried={"a"}), barred=frozenset({"b"}))
    v = verdicts.after_attempt(item, "a", answered(TRY_LATER), pool, rules, NOW)
    assert v.retry_now is None  # b is untried but barred: the work waits its round with a's reply
    [s] = v.settlements
    assert s.state is RecipientState.QUEUED and s.reply == str(TRY_LATER)


def dsn_text(v: Verdict) -> str:
    [dsn] = [s.dsn for s in v.settlements if s.dsn is not None]
    return dsn.data.decode()


def test_an_expiry_gives_each_recipient_its_own_last_reply_said_by_the_remote_server() -> None:
    # Review 5 (RFC 3464 2.3.6): one server said "mailbox full" to one, "greylisted" to the other.
    pool, rules = setup("ab")
    full = Reply(452, "4.2.2", "<user1@dest.example>: mailbox full")
    grey = Reply(451, "4.7.1", "<user2@dest.example>: greylisted")
    outcome = AttemptOutcome({1: full, 2: grey}, "relay-b:2525")
    v = verdicts.after_attempt(work(1, 2, tried={"a", "b"}, age_s=86_400), "b", outcome, pool, rules, NOW)
    expirations = [(e.recipient, e.response) for e in v.events if e.type is EventType.EXPIRATION]
    assert expirations == [("user1@dest.example", full), ("user2@dest.example", grey)]
    assert {(s.state, tuple(s.rids), s.reply) for s in v.settlements} == {
        (RecipientState.EXPIRED, (1,), str(full)),
        (RecipientState.EXPIRED, (2,), str(grey)),
    }
    text = dsn_text(v)
    # The remote server's replies: Remote-MTA (a host name, no port: RFC 3464 2.3.5) and smtp; diagnostics.
    assert "Diagnostic-Code: smtp; 452 4.2.2 <user1@dest.example>: mailbox full" in text
    assert "Diagnostic-Code: smtp; 451 4.7.1 <user2@dest.example>: greylisted" in text
    assert text.count("Remote-MTA: dns; relay-b\r\n") == 2 and "Status: 4.4.7" in text
    assert "reported by this mail system" not in text


def test_a_deferral_keeps_each_recipient_its_own_reply_in_the_spool() -> None:
    pool, rules = setup("ab")
    full = Reply(452, "4.2.2", "mailbox full")
    outcome = AttemptOutcome({1: full, 2: TRY_LATER}, "relay-b")
    v = verdicts.after_attempt(work(1, 2, tried={"a", "b"}), "b", outcome, pool, rules, NOW)
    assert sorted((tuple(s.rids), s.reply, s.state) for s in v.settlements) == [
        ((1,), str(full), RecipientState.QUEUED),
        ((2,), str(TRY_LATER), RecipientState.QUEUED),
    ]


def test_an_attempt_that_bounces_some_and_expires_others_sends_one_dsn_for_them_all() -> None:
    pool, rules = setup("ab")
    outcome = AttemptOutcome({1: NO_SUCH_USER, 2: TRY_LATER}, "relay-b")
    v = verdicts.after_attempt(work(1, 2, tried={"a", "b"}, age_s=86_400), "b", outcome, pool, rules, NOW)
    assert {s.state for s in v.settlements} == {RecipientState.BOUNCED, RecipientState.EXPIRED}
    text = dsn_text(v)  # exactly one DSN
    assert "Final-Recipient: rfc822; user1@dest.example" in text and "Status: 5.1.1" in text
    assert "Final-Recipient: rfc822; user2@dest.example" in text and "Status: 4.4.7" in text
    assert "Subject: Undelivered Mail Returned to Sender" in text  # not every recipient expired


def test_a_refusal_postmux_made_is_not_shown_as_the_remote_servers_reply() -> None:
    # Review 6: the 553 5.6.7 comes from the servers' EHLO, not from any reply they gave (RFC 3464 2.3.6).
    pool, rules = setup("a")
    v = verdicts.after_attempt(work(1, tried={"a"}), "a", unfit("127.0.0.1:2600"), pool, rules, NOW)
    text = dsn_text(v)
    assert "Remote-MTA" not in text and "Diagnostic-Code" not in text and " said:" not in text
    explained = "553 5.6.7 SMTPUTF8 required but not offered by relay-a (reported by this mail system)"
    assert explained in " ".join(text.split())  # the human part, folded at 76


@pytest.mark.parametrize("breakoff", [Breakoff.CONNECT, Breakoff.TIMEOUT, Breakoff.LOST])
def test_a_bounce_with_a_reply_postmux_made_has_no_smtp_diagnostic(breakoff: Breakoff) -> None:
    pool, rules = setup("a")
    made = Reply(554, "5.4.4", "could not connect to relay-a")
    outcome = AttemptOutcome({1: made}, "relay-a", breakoff, local=True)
    text = dsn_text(verdicts.after_attempt(work(1, tried={"a"}), "a", outcome, pool, rules, NOW))
    assert "Remote-MTA" not in text and "Diagnostic-Code" not in text and "reported by this mail" in text


def test_an_address_refused_before_sending_is_postmuxs_finding_though_others_were_sent() -> None:
    pool, rules = setup("a")
    unsendable = Reply(553, "5.1.3", "recipient address cannot be sent")
    outcome = AttemptOutcome({1: NO_SUCH_USER, 2: unsendable}, "relay-a", unsent=frozenset({2}))
    text = dsn_text(verdicts.after_attempt(work(1, 2, tried={"a"}), "a", outcome, pool, rules, NOW))
    assert text.count("Remote-MTA: dns; relay-a") == 1
    assert "Diagnostic-Code: smtp; 550 5.1.1 no such user" in text
    assert "Diagnostic-Code: smtp; 553" not in text
