"""The rule by which nodes share active health verdicts (balancing/quorum.py), and how a pool applies it
(Pool.record_shared): plain functions of the verdicts and `now`, no Redis."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from postmux.balancing.quorum import SharedVerdict, shared_verdict
from tests.unit.test_health import make_pool

verdicts = st.lists(st.booleans(), max_size=9)
own_verdict = st.one_of(st.none(), st.booleans())


@given(own_verdict, verdicts)
def test_a_member_is_out_exactly_when_a_strict_majority_of_the_nodes_that_probe_it_find_it_down(
    own: bool | None, others: list[bool]
) -> None:
    counted = ([] if own is None else [own]) + others
    verdict = shared_verdict(own, others)
    assert verdict == SharedVerdict(counted.count(False), len(counted))
    assert verdict.out == (counted.count(False) > len(counted) / 2)


@given(st.integers(min_value=2, max_value=20))
def test_one_node_alone_never_takes_a_member_out_where_another_node_reaches_it(nodes: int) -> None:
    # One broken path among n >= 2 probing nodes: from this node's side (it is the one) or another's.
    assert not shared_verdict(False, [True] * (nodes - 1)).out
    assert not shared_verdict(True, [False] + [True] * (nodes - 2)).out


@given(st.integers(min_value=1, max_value=20), st.integers(min_value=0, max_value=20))
def test_a_majority_down_takes_it_out_even_where_this_nodes_own_check_passes(down: int, up: int) -> None:
    if down > up + 1:  # this node's passing verdict counts among the ups
        assert shared_verdict(True, [False] * down + [True] * up).out


def test_a_node_that_has_not_probed_yet_counts_for_nothing() -> None:
    assert shared_verdict(None, [False]).out  # the only node probing says down
    assert shared_verdict(None, []) == SharedVerdict(0, 0) and not shared_verdict(None, []).out


def test_operators_read_it_as_what_the_nodes_say() -> None:
    assert str(SharedVerdict(2, 3)) == "down 2/3 nodes"
    assert str(SharedVerdict(0, 3)) == "up 3/3 nodes"


def test_the_pool_takes_a_member_out_while_most_nodes_find_it_down_and_says_so_once() -> None:
    pool, changes = make_pool(3, check={"enabled": True, "rise": 1, "fall": 1})
    a = pool.member("a")
    pool.record_shared(a, SharedVerdict(2, 3), now=1.0)
    pool.record_shared(a, SharedVerdict(3, 3), now=2.0)
    assert not a.healthy(2.0) and a.check_up and a.shared_checks == "down 3/3 nodes"
    assert {m.name for m in pool.usable(2.0)} == {"b", "c"}
    pool.record_shared(a, SharedVerdict(1, 3), now=3.0)
    assert a.healthy(3.0) and {m.name for m in pool.usable(3.0)} == {"a", "b", "c"}
    assert changes == [
        ("a", False, "checks failed on most nodes: down 2/3 nodes"),
        ("a", True, "checks pass on most nodes: down 1/3 nodes"),
    ]


def test_a_member_out_by_its_own_checks_is_not_announced_again_by_the_majority_nor_back_by_it() -> None:
    pool, changes = make_pool(3, check={"enabled": True, "rise": 1, "fall": 1})
    a = pool.member("a")
    pool.record_check(a, False, now=1.0, detail="connection refused")
    pool.record_shared(a, SharedVerdict(3, 3), now=1.5)
    pool.record_shared(a, SharedVerdict(0, 3), now=2.0)  # the others recover first: still down here
    assert not a.healthy(2.0)
    pool.record_check(a, True, now=3.0)
    assert a.healthy(3.0)
    assert changes == [("a", False, "1 checks failed: connection refused"), ("a", True, "1 checks passed")]


def test_with_no_shared_verdict_the_node_goes_by_its_own_checks() -> None:
    pool, changes = make_pool(2)
    a = pool.member("a")
    pool.record_shared(a, SharedVerdict(2, 2), now=1.0)
    pool.record_shared(a, None, now=2.0)  # the shared store went away
    assert a.healthy(2.0) and a.shared_checks == ""
    assert changes[-1] == ("a", True, "other nodes' checks not known now")


def test_postmux_members_says_which_node_speaks_and_what_the_nodes_found() -> None:
    from rich.console import Console

    from postmux.admin.client import members_table

    row = {
        "pool": "default",
        "member": "a",
        "weight": 1,
        "effective_weight": 1,
        "connections": 0,
        "max_connections": 10,
        "in_flight": 0,
        "ewma_latency_ms": 1.0,
        "recent_error": "",
        "node": "relay-eu-1",
    }
    console = Console(width=250, record=True)
    console.print(
        members_table(
            [
                {**row, "state": "down-by-majority", "shared_checks": "down 2/3 nodes"},
                {**row, "member": "b", "state": "up", "shared_checks": "up 3/3 nodes"},
            ]
        )
    )
    text = console.export_text()
    assert "as node relay-eu-1 sees them" in text
    assert "down-by-majority (down 2/3 nodes)" in text and "3/3" not in text
