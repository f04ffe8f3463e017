"""Outcomes are facts and the pool judges them: health.classify and Pool.observe, and the Pool methods that
are the only writers of a member's state (begin/finish, tally, drain/enable, retire, forget_checks).

Delivery reports where an attempt broke off and what each recipient was told; whether that counts against
the member depends on the member's kind, and only the balancing side says so. No sockets: the facts are
the values a transport would return.
"""

from __future__ import annotations

from typing import Any

import pytest

from postmux.attempt import AttemptOutcome, Breakoff
from postmux.balancing.health import FailureKind, classify
from postmux.balancing.pool import Pool
from postmux.config import PoolSettings
from postmux.reply import Reply

LOCAL, REPLY_4XX = FailureKind.LOCAL, FailureKind.REPLY_4XX
OK = Reply(250, "2.0.0", "ok")
REFUSED = Reply(550, "5.1.1", "no such user")
LATER = Reply(451, "4.3.0", "try later")
BUSY = Reply(421, "4.7.0", "too many connections")
UNSENDABLE = Reply(553, "5.1.3", "recipient address cannot be sent: bad")
NOW = 1_000.0


def broke_off(breakoff: Breakoff, *, said: bool = False) -> AttemptOutcome:
    reply = BUSY if said else Reply(451, "4.4.2", f"{breakoff} with relay")
    return AttemptOutcome({1: reply}, "relay", breakoff, local=not said)


def answered(*replies: Reply, unsent: frozenset[int] = frozenset(), tls: str = "") -> AttemptOutcome:
    return AttemptOutcome({i + 1: r for i, r in enumerate(replies)}, "relay", tls=tls, unsent=unsent)


@pytest.mark.parametrize(
    ("breakoff", "relay", "source"),
    [
        (Breakoff.CONNECT, LOCAL, None),
        (Breakoff.TIMEOUT, LOCAL, None),
        (Breakoff.LOST, LOCAL, None),
        (Breakoff.TLS, LOCAL, None),
        (Breakoff.GREETING, REPLY_4XX, None),
        # The member's own setup is broken: whoever it sends to, it fails the same way.
        (Breakoff.BIND, LOCAL, LOCAL),
        (Breakoff.AUTH, LOCAL, LOCAL),
        (Breakoff.MX, LOCAL, None),
    ],
)
def test_where_an_attempt_broke_off_counts_against_a_relay_but_only_a_broken_setup_against_a_source_ip(
    breakoff: Breakoff, relay: FailureKind | None, source: FailureKind | None
) -> None:
    outcome = broke_off(breakoff, said=breakoff is Breakoff.GREETING)
    assert classify(outcome, "relay") is relay
    assert classify(outcome, "source") is source


def test_a_relay_that_took_nothing_is_refusing_but_a_5xx_about_one_address_is_the_addresses_business() -> (
    None
):
    assert classify(answered(LATER, LATER), "relay") is REPLY_4XX
    assert classify(answered(OK, BUSY), "relay") is REPLY_4XX  # a 421 anywhere: the server is closing
    assert classify(answered(OK, REFUSED), "relay") is None
    assert classify(answered(REFUSED), "relay") is None
    assert classify(answered(LATER, LATER), "source") is None  # about that destination only: shaping's
    assert classify(answered(), "relay") is None


def test_recipients_refused_here_before_sending_say_nothing_about_the_member() -> None:
    # The receiver deferred the one it was sent; the other never left: still only 4xx from the member.
    assert classify(answered(LATER, UNSENDABLE, unsent=frozenset({2})), "relay") is REPLY_4XX
    # Nothing could be sent at all: no connection, nothing to judge.
    nothing = AttemptOutcome({1: UNSENDABLE}, "", local=True, unsent=frozenset({1}))
    assert classify(nothing, "relay") is None
    # A member without SMTPUTF8 sent nothing either.
    unfit = AttemptOutcome({1: Reply(553, "5.6.7", "SMTPUTF8 required")}, "relay", local=True, unfit=True)
    assert classify(unfit, "relay") is None


def make_pool(n: int = 2, **health: Any) -> tuple[Pool, list[tuple[str, bool, str]]]:
    settings = PoolSettings.model_validate(
        {
            "name": "p",
            "members": [{"name": chr(ord("a") + i), "address": f"127.0.0.1:{2601 + i}"} for i in range(n)],
            "health": {"max_ejection_percent": 100, **health},
        }
    )
    changes: list[tuple[str, bool, str]] = []
    return Pool(settings, lambda m, up, reason: changes.append((m.name, up, reason))), changes


def test_observe_ejects_a_relay_after_local_failures_in_a_row_and_times_only_its_timeouts() -> None:
    pool, changes = make_pool(consecutive_failures=3)
    a = pool.member("a")
    assert pool.observe(a, answered(OK, tls="TLSv1.3 X"), 0.010, NOW) is None
    assert (a.attempts, a.ewma_latency_s, a.tls) == (1, 0.010, "TLSv1.3 X")
    # Neither the instant refusal nor the dropped connection measures the member's work.
    assert pool.observe(a, broke_off(Breakoff.CONNECT), 0.001, NOW + 1) is LOCAL
    assert pool.observe(a, broke_off(Breakoff.LOST), 0.002, NOW + 2) is LOCAL
    assert a.ewma_latency_s == 0.010 and not a.ejected(NOW + 2)
    # A timeout is a very slow attempt (configuration.md, Latency average): the peak takes it at once.
    assert pool.observe(a, broke_off(Breakoff.TIMEOUT), 30.0, NOW + 3) is LOCAL
    assert a.ewma_latency_s == 30.0 and a.last_error == "451 4.4.2 timeout with relay"
    assert a.ejected(NOW + 3) and changes == [("a", False, "ejected: 3 local failures in a row")]
    assert a.attempts == 4 and a.tls == "TLSv1.3 X"  # no connection: the last TLS seen stands


def test_observe_counts_4xx_only_attempts_but_a_source_ips_deferrals_never_eject_it() -> None:
    pool, changes = make_pool(consecutive_4xx=2)
    a = pool.member("a")
    for i in range(2):
        assert pool.observe(a, answered(LATER), 0.02, NOW + i) is REPLY_4XX
    assert a.ejected(NOW + 1) and a.ewma_latency_s == 0.02  # an answer, however unwelcome, is timed
    assert changes == [("a", False, "ejected: 2 attempts in a row refused with 4xx")]
    source = Pool(
        PoolSettings.model_validate(
            {"name": "s", "members": [{"name": "ip", "kind": "source", "source_address": "127.0.0.2"}]}
        )
    )
    ip = source.member("ip")
    for i in range(20):
        assert source.observe(ip, answered(LATER), 0.02, NOW + i) is None
    assert not ip.ejected(NOW + 20) and ip.consecutive_4xx == 0


def test_begin_and_finish_hold_a_connection_and_a_removed_member_leaves_with_its_last_attempt() -> None:
    pool, _ = make_pool()
    b = pool.member("b")
    pool.begin(b)
    pool.begin(b)
    assert b.in_flight == 2
    pool.reconfigure(pool.settings.model_copy(update={"members": pool.settings.members[:1]}), NOW)
    assert b.removed and b in pool.members  # still listed while its attempts run
    pool.finish(b)
    assert b in pool.members and b.in_flight == 1
    pool.finish(b)
    assert [m.name for m in pool.members] == ["a"]


def test_tally_counts_recipients_by_what_became_of_them() -> None:
    pool, _ = make_pool()
    a = pool.member("a")
    pool.tally(a, delivered=3, deferred=1)
    pool.tally(a, bounced=2)
    assert (a.delivered, a.deferred, a.bounced) == (3, 1, 2)


def test_drain_and_enable_say_whether_they_changed_anything_and_the_next_pick_follows() -> None:
    pool, _ = make_pool()
    assert pool.drain("a") is True and pool.drain("a") is False
    assert [m.name for m in pool.usable(NOW)] == ["b"]
    assert pool.enable("a") is True and pool.enable("a") is False
    assert {m.name for m in pool.usable(NOW)} == {"a", "b"}
    with pytest.raises(KeyError):
        pool.drain("nobody")


def test_a_retired_pool_takes_nothing_new_and_forgotten_checks_hold_no_member_out() -> None:
    pool, _ = make_pool(3)
    pool.record_check(pool.member("c"), False, NOW, "refused")
    pool.member("c").check_up = False  # as `fall` failed checks in a row leave it
    pool.forget_checks()
    assert all(m.check_up and m.check_streak == 0 for m in pool.members)
    pool.retire()
    assert all(m.removed for m in pool.members) and pool.usable(NOW) == []


def test_tick_brings_an_ejected_member_back_when_its_time_is_over_without_a_pick() -> None:
    pool, changes = make_pool(consecutive_failures=1, base_ejection_time=5)
    pool.settings = pool.settings.model_copy(update={"slow_start": 10.0})
    a = pool.member("a")
    pool.observe(a, broke_off(Breakoff.CONNECT), 0.001, NOW)
    pool.tick(NOW + 4.9)
    assert changes == [("a", False, "ejected: 1 local failures in a row")]
    pool.tick(NOW + 5.2)  # the dispatcher's loop, with no work for this pool
    assert changes[1:] == [("a", True, "ejection time over")] and a.ramp_started == NOW + 5.2
    pool.tick(NOW + 6)
    assert len(changes) == 2  # said once
