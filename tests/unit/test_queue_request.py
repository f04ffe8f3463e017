"""What an operator's request means (admin/queue.py): its fields to a Selector, a message's header fields
to name/value pairs. Pure functions: no spool, no HTTP."""

from __future__ import annotations

import pytest

from postmux.admin.queue import QueueRequestError, criteria, header_fields, query_fields
from postmux.spool.base import RecipientState, Selector


def test_each_field_becomes_its_criterion_and_a_provider_waits_for_the_queue() -> None:
    chosen = criteria(
        {
            "id": "m1",
            "pool": "bulk",
            "domain": "Example.COM.",
            "provider": "google",
            "member": "relay-a",
            "sender": "",
            "older_than": "2h",
            "state": "HELD",
        }
    )
    assert chosen.selector == Selector(
        message_id="m1",
        pool="bulk",
        domain="example.com",
        sender="",  # the null sender, not "no criterion"
        state=RecipientState.HELD,
        older_than_s=7200,
        member="relay-a",
    )
    assert chosen.provider == "google" and chosen.selector.domains is None
    assert criteria({}).selector.is_empty and not criteria({"all": True}).selector.is_empty
    assert criteria({"pool": ""}).selector.is_empty  # an empty value names nothing
    assert query_fields({"all": "true", "limit": "5", "after": "x", "pool": "p"}) == {
        "all": True,
        "pool": "p",
    }


@pytest.mark.parametrize(
    ("fields", "field", "said"),
    [
        ({"colour": "red"}, "colour", "not a selector"),
        ({"state": "parked"}, "state", "'parked' is not one of queued, leased, held"),
        ({"older_than": "soon"}, "older_than", "not a duration"),
        ({"older_than": "-5m"}, "older_than", ""),
        ({"pool": 3}, "pool", "expected text, not int"),
        ({"sender": "a@x.test\r\nRCPT TO:<b@y>"}, "sender", "CR, LF and NUL are not allowed"),
        ({"domain": "d\udcfc.test"}, "domain", "not valid Unicode"),  # JSON's "\udcfc": a 500 before
        ({"all": "yes"}, "all", "expected true or false"),
    ],
)
def test_a_bad_field_is_refused_by_name(fields: dict[str, object], field: str, said: str) -> None:
    with pytest.raises(QueueRequestError) as refused:
        criteria(fields)
    assert refused.value.field == field and refused.value.status == 422 and said in str(refused.value)


def test_header_fields_come_in_order_with_folded_lines_joined_and_stop_at_the_body() -> None:
    text = (
        b"Subject: a long\r\n  folded subject\r\nFrom: App <app@x.test>\r\nX-Odd: caf\xe9\r\n"
        b"\r\nBody: not a header\r\n"
    )
    assert header_fields(text) == [
        {"name": "Subject", "value": "a long folded subject"},
        {"name": "From", "value": "App <app@x.test>"},
        {"name": "X-Odd", "value": "caf\ufffd"},
    ]
    assert header_fields(b"") == [] and header_fields(b"\r\nbody only\r\n") == []
