"""The suppression list's rules without a node: which entry stops which mail, expiry on a fake clock,
hard bounces by class, entries checked, and the CSV both ways (issue 15, part 2). The store is a real
SQLite spool in a temporary directory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from postmux.config import SuppressionSettings
from postmux.events.types import Event, EventType
from postmux.reply import Reply
from postmux.reputation.suppression import SuppressionError, SuppressionList, entry, from_csv, to_csv
from postmux.spool.sqlite import SqliteSpool


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[SqliteSpool]:
    spool = SqliteSpool(tmp_path / "spool.db")
    await spool.open()
    yield spool
    await spool.close()


async def test_global_sender_domain_and_api_key_scopes_and_domain_entries(spool: SqliteSpool) -> None:
    listed = SuppressionList(spool, SuppressionSettings(), Clock())
    await listed.add("Gone@Example.COM", reason="bounced")
    await listed.add("*@closed.test", reason="company closed")
    await listed.add(
        "u@dest.test", reason="unsubscribed", scope="sender_domain:News.Example.org", source="unsubscribe"
    )
    await listed.add("k@dest.test", reason="asked the shop", scope="api_key:shop")
    assert listed.find("gone@example.com") is not None  # addresses compare in lower case
    assert listed.find("<GONE@example.com>") is not None
    assert listed.find("anyone@closed.test") is not None
    assert listed.find("anyone@sub.closed.test") is None  # a domain entry is that domain only
    assert listed.find("u@dest.test", sender="a@news.example.org") is not None
    assert listed.find("u@dest.test", sender="a@shop.example.org") is None
    assert listed.find("k@dest.test", sender="a@x.test", api_key="shop") is not None
    assert listed.find("k@dest.test", sender="a@x.test", api_key="other") is None
    # A new list reads them back from the spool.
    again = SuppressionList(spool, SuppressionSettings(), Clock())
    assert await again.load() == 4


async def test_an_entry_stops_mail_until_it_expires(spool: SqliteSpool) -> None:
    clock = Clock()
    listed = SuppressionList(spool, SuppressionSettings(), clock)
    await listed.add("a@dest.test", reason="pause", expires=clock.now + 60)
    assert listed.find("a@dest.test") is not None
    clock.now += 60
    assert listed.find("a@dest.test") is None
    assert listed.entries() == [] and len(listed.entries(expired=True)) == 1


async def test_refuse_and_drop_and_off(spool: SqliteSpool) -> None:
    listed = SuppressionList(spool, SuppressionSettings(), Clock())
    await listed.add("a@dest.test", reason="bounced")
    found = listed.refusal("a@dest.test")
    assert found is not None and found.smtp_reply() == "550 5.7.1 <a@dest.test>: suppressed (manual: bounced)"
    listed.reconfigure(SuppressionSettings(action="drop"))
    assert listed.refusal("a@dest.test") is None and listed.stopped("a@dest.test") is not None
    listed.reconfigure(SuppressionSettings(enabled=False))
    assert listed.stopped("a@dest.test") is None


def bounce(recipient: str, bounce_class: str, kind: EventType = EventType.BOUNCE) -> Event:
    return Event(
        kind, recipient=recipient, response=Reply(550, "5.1.1", "no such user"), bounce_class=bounce_class
    )


async def test_only_hard_bounces_suppress_and_for_as_long_as_configured(spool: SqliteSpool) -> None:
    clock = Clock()
    listed = SuppressionList(spool, SuppressionSettings(hard_bounce_expiry=3600), clock)
    made = await listed.note_bounces(
        [
            bounce("a@dest.test", "InvalidRecipient"),
            bounce("b@dest.test", "BadDomain"),
            bounce("c@dest.test", "InactiveMailbox"),
            bounce("d@dest.test", "QuotaIssues"),
            bounce("e@dest.test", "SpamBlock"),
            bounce("f@dest.test", "AdminBounce"),
            bounce("g@dest.test", "InvalidRecipient", EventType.TRANSIENT_FAILURE),
            bounce('"a b"@dest.test', "InvalidRecipient"),  # no entry can hold it: skipped, not raised
        ]
    )
    assert [e.address for e in made] == ["a@dest.test", "b@dest.test", "c@dest.test"]
    assert made[0].reason == "InvalidRecipient: 550 5.1.1 no such user" and made[0].source == "bounce"
    assert made[0].expires == clock.now + 3600
    off = SuppressionList(spool, SuppressionSettings(hard_bounces=False), clock)
    assert await off.note_bounces([bounce("h@dest.test", "InvalidRecipient")]) == []


@pytest.mark.parametrize(
    ("address", "keys", "field"),
    [
        ("no-at-sign", {}, "address"),
        ("a@localhost", {}, "address"),
        ("a b@dest.test", {}, "address"),
        ("a@dest.test", {"source": "whim"}, "source"),
        ("a@dest.test", {"scope": "pool:x"}, "scope"),
        ("a@dest.test", {"scope": "api_key:"}, "scope"),
        ("a@dest.test", {"expires": 5.0}, "expires"),
    ],
)
def test_an_entry_that_cannot_be_one_is_refused_naming_the_field(
    address: str, keys: dict, field: str
) -> None:
    with pytest.raises(SuppressionError) as e:
        entry(address, reason="r", created=10.0, **{"source": "manual", **keys})
    assert e.value.field == field


def test_csv_round_trip_and_what_an_import_may_leave_out() -> None:
    entries = [
        entry("a@dest.test", reason='says "no", twice', source="complaint", created=1_700_000_000.0),
        entry(
            "*@gone.test",
            reason="closed",
            source="manual",
            scope="api_key:shop",
            created=1_700_000_000.0,
            expires=1_800_000_000.0,
        ),
    ]
    text = to_csv(entries)
    assert text.splitlines()[1] == 'a@dest.test,global,"says ""no"", twice",complaint,2023-11-14T22:13:20Z,'
    assert from_csv(text, now=5.0) == entries
    bare = from_csv("address\r\nB@Dest.test\r\n", now=5.0)
    assert bare == [entry("b@dest.test", reason="imported", source="manual", created=5.0)]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "line 1: a header row naming at least the address column"),
        ("email\r\na@dest.test\r\n", "line 1: a header row"),
        ("address,colour\r\na@dest.test,red\r\n", "line 1: unknown column 'colour'"),
        ("address\r\na@dest.test\r\nnot-an-address\r\n", "line 3: address: 'not-an-address' is not"),
        ("address,expires\r\na@dest.test,next week\r\n", "line 2: expires: 'next week' is not an ISO 8601"),
    ],
)
def test_a_bad_csv_is_refused_naming_the_line(text: str, message: str) -> None:
    with pytest.raises(SuppressionError) as e:
        from_csv(text, now=5.0)
    assert str(e.value).startswith(message)
