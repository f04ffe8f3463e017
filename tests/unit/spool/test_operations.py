"""The words of queue operations, without a spool: what a Selector accepts and how it reads."""

from __future__ import annotations

import pytest

from postmux.spool.operations import RecipientState, Selector


def test_a_selector_compares_domains_as_they_are_stored_and_states_as_the_enum() -> None:
    sel = Selector(domain="Example.COM.", state="held")  # type: ignore[arg-type]
    assert (sel.domain, sel.state) == ("example.com", RecipientState.HELD)
    with pytest.raises(ValueError):
        Selector(state="parked")  # type: ignore[arg-type]


@pytest.mark.parametrize("age", [-1.0, float("inf"), float("nan")])
def test_an_age_must_be_a_finite_number_of_seconds(age: float) -> None:
    with pytest.raises(ValueError, match="older_than_s"):
        Selector(older_than_s=age)


def test_only_a_selector_without_any_criterion_is_empty_and_everything_says_so_on_purpose() -> None:
    assert Selector().is_empty
    assert not Selector(everything=True).is_empty
    assert not Selector(sender="").is_empty  # the null sender is a criterion
    assert not Selector(older_than_s=0).is_empty
    with pytest.raises(ValueError, match="delete with no criterion"):
        Selector().require_criterion("delete")
    Selector(everything=True).require_criterion("delete")
