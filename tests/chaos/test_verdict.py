"""The chaos verdict catches each broken promise on its own (a checker that cannot fail proves nothing)."""

from __future__ import annotations

import hashlib

from tests.chaos.verdict import ACKED, IN_DOUBT, REFUSED, RETRY, Copy, Dsn, Key, Ledger, Observed, judge


def digest(key: Key) -> str:
    return hashlib.sha256(repr(key).encode()).hexdigest()


def ledger(outcomes: dict[Key, str], doomed: frozenset[str] = frozenset()) -> Ledger:
    ids = sorted({i for i, _ in outcomes})
    return Ledger(ids, set(doomed), {k: digest(k) for k in outcomes}, dict(outcomes))


def copy(key: Key, *, epoch: int = 0, dropped: bool = False, body: str | None = None) -> Copy:
    return Copy("relay-a", key, body or digest(key), True, dropped, epoch)


def seen(
    copies: list[Copy],
    dsns: tuple[Dsn, ...] = (),
    kills: int = 1,
    in_flight: int = 2,
    left: int = 0,
    strays: int = 0,
) -> Observed:
    return Observed(copies, list(dsns), strays, kills, in_flight, left)


A1, B1, B2, C1, D1 = ("a", 1), ("b", 1), ("b", 2), ("c", 1), ("d", 1)


def test_a_clean_run_has_no_problems_and_counts_each_outcome() -> None:
    book = ledger({A1: ACKED, B1: IN_DOUBT, B2: ACKED, C1: REFUSED, D1: ACKED}, doomed=frozenset("d"))
    verdict = judge(book, seen([copy(A1), copy(B1), copy(B2)], (Dsn(D1, "<x.dsn>"),)))
    assert verdict.problems == []
    assert verdict.counts["bound"] == 2  # 1 kill x 2 in flight
    assert (verdict.counts["accepted"], verdict.counts["delivered"], verdict.counts["dsn"]) == (3, 2, 1)
    assert (verdict.counts["refused"], verdict.counts["resent"], verdict.counts["duplicates"]) == (1, 1, 0)
    assert verdict.summary().startswith("chaos: sent=4 accepted=3 delivered=2 dsn=1 refused=1 duplicates=0")


def test_an_acked_message_never_delivered_is_lost() -> None:
    verdict = judge(ledger({A1: ACKED}), seen([]))
    assert verdict.problems == ["('a', 1): acked but never delivered"]


def test_a_refused_message_must_not_be_delivered() -> None:
    verdict = judge(ledger({A1: REFUSED}), seen([copy(A1)]))
    assert any("refused with a 5xx" in p for p in verdict.problems)


def test_an_attempt_answered_4xx_must_not_be_delivered() -> None:
    verdict = judge(ledger({A1: RETRY, ("a", 2): ACKED}), seen([copy(A1), copy(("a", 2))]))
    assert verdict.problems == ["('a', 1): delivered or reported, but the sender's attempt ended 'retry'"]


def test_a_doomed_message_needs_exactly_one_dsn() -> None:
    book = ledger({D1: ACKED}, doomed=frozenset("d"))
    assert judge(book, seen([])).problems == ["('d', 1): acked and refused by every upstream, 0 DSNs"]
    two = judge(book, seen([], (Dsn(D1, "<x>"), Dsn(D1, "<y>", epoch=1))))
    assert any("2 different DSNs" in p for p in two.problems)
    delivered = judge(book, seen([copy(D1)], (Dsn(D1, "<x>"),)))
    assert any("delivered although every upstream refuses it" in p for p in delivered.problems)


def test_a_dsn_for_a_deliverable_message_is_wrong() -> None:
    verdict = judge(ledger({A1: ACKED}), seen([copy(A1)], (Dsn(A1, "<x>"),)))
    assert verdict.problems == ["('a', 1): a DSN for a message that no upstream refuses"]


def test_a_changed_body_or_extra_header_is_caught() -> None:
    changed = judge(ledger({A1: ACKED}), seen([copy(A1, body="0" * 64)]))
    assert changed.problems == ["('a', 1) via relay-a: body changed in transit"]
    prefixed = judge(ledger({A1: ACKED}), seen([Copy("relay-a", A1, digest(A1), False)]))
    assert any("other than one Received header" in p for p in prefixed.problems)


def test_a_duplicate_needs_a_kill_between_its_copies() -> None:
    across = judge(ledger({A1: ACKED}), seen([copy(A1), copy(A1, epoch=1)]))
    assert across.problems == [] and across.counts["duplicates"] == 1
    within = judge(ledger({A1: ACKED}), seen([copy(A1, epoch=1), copy(A1, epoch=1)]))
    assert any("delivered twice by one process" in p for p in within.problems)


def test_a_copy_an_upstream_kept_before_hanging_up_explains_one_more() -> None:
    verdict = judge(ledger({A1: ACKED}), seen([copy(A1, dropped=True), copy(A1)]))
    assert verdict.problems == []
    assert (verdict.counts["duplicates"], verdict.counts["dropped_after_store"]) == (0, 1)


def test_duplicates_beyond_what_one_kill_can_have_in_flight() -> None:
    keys = [(f"m{i}", 1) for i in range(3)]
    book = ledger(dict.fromkeys(keys, ACKED))
    copies = [c for k in keys for c in (copy(k), copy(k, epoch=1))]
    verdict = judge(book, seen(copies, kills=1, in_flight=2))
    assert verdict.problems == ["3 duplicates, more than 2 (1 kills x 2)"]
    assert verdict.counts["worst_kill"] == 3


def test_repeated_dsn_copies_count_as_duplicates() -> None:
    book = ledger({D1: ACKED}, doomed=frozenset("d"))
    verdict = judge(book, seen([], (Dsn(D1, "<x>"), Dsn(D1, "<x>", epoch=1))))
    assert verdict.problems == [] and verdict.counts["dsn_copies"] == 1 == verdict.counts["duplicates"]


def test_leftovers_and_strays_are_problems() -> None:
    verdict = judge(ledger({A1: ACKED}), seen([copy(A1)], left=3, strays=1))
    assert verdict.problems == ["3 messages left unfinished in the spool", "1 receptions nobody sent"]
