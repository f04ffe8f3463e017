"""Blocklist watch, the deciding half: names asked, what answers mean, which replies name a blocklist, and
how a listing takes a member out of rotation and brings it back."""

from __future__ import annotations

import re

import pytest

from postmux.balancing.pool import Pool
from postmux.config import BlocklistSettings, BlocklistZone, PoolSettings, settings_from_dict
from postmux.events.types import Event, EventType
from postmux.reputation.blocklists import BlocklistWatch, Finding, judge, look, query_name, reply_reactions


def test_an_ipv4_address_is_asked_with_its_octets_reversed() -> None:
    assert query_name("192.0.2.10", "zen.example") == "10.2.0.192.zen.example"


def test_an_ipv6_address_is_asked_by_its_nibbles_reversed() -> None:
    # RFC 5782 2.4: 32 nibbles, lowest first.
    name = query_name("2001:db8::1", "v6.example")
    assert name == "1.0.0.0." + "0." * 20 + "8.b.d.0.1.0.0.2.v6.example"


def test_a_domain_is_asked_as_it_is() -> None:
    assert query_name("News.Example.COM.", "dbl.example") == "news.example.com.dbl.example"


def test_answers_in_127_8_list_and_spamhaus_error_answers_do_not() -> None:
    zone = BlocklistZone(zone="zen.example")
    assert judge(zone, ["127.0.0.2", "127.0.0.4"]) == (("127.0.0.2", "127.0.0.4"), ())
    # 127.255.255.254: "you asked through a public resolver"; 10.0.0.1: not a DNSxL answer at all.
    assert judge(zone, ["127.255.255.254", "10.0.0.1"]) == ((), ("127.255.255.254", "10.0.0.1"))


def test_listed_narrows_which_answers_count() -> None:
    zone = BlocklistZone(zone="combined.example", listed=("127.0.0.2", "127.0.0.10/31"))
    assert judge(zone, ["127.0.0.2"])[0] == ("127.0.0.2",)
    assert judge(zone, ["127.0.0.11"])[0] == ("127.0.0.11",)
    assert judge(zone, ["127.0.0.4"]) == ((), ())  # a code this operator does not act on


def test_an_error_answer_is_an_error_whatever_listed_says() -> None:
    """Spamhaus's 127.255.255.254 (a refused query) and an answer outside 127.0.0.0/8 (RFC 5782 2.1) say
    nothing about the listing, also for a zone whose `listed` names the codes it acts on."""
    zone = BlocklistZone(zone="zen.example", listed=("127.0.0.2/31", "127.0.0.4/30", "127.0.0.10/31"))
    assert judge(zone, ["127.255.255.254", "10.0.0.1"]) == ((), ("127.255.255.254", "10.0.0.1"))


async def test_an_error_answer_keeps_a_listing_of_a_zone_with_listed() -> None:
    """A listed IP stays listed (and its member out) while the zone answers with an error code: the round
    keeps what the last one found, as for a lookup that failed."""
    settings = settings_from_dict(
        {
            "pool": [
                {
                    "name": "p",
                    "members": [
                        {"name": "a", "address": "127.0.0.1:2501", "sending_ips": ["192.0.2.10"]},
                        {"name": "b", "address": "127.0.0.1:2502", "sending_ips": ["192.0.2.11"]},
                    ],
                }
            ],
            "blocklists": {"zones": [{"zone": "bl.example", "listed": ["127.0.0.2/31", "127.0.0.4/30"]}]},
        }
    )
    pool = Pool(settings.pool[0])
    events: list[Event] = []
    answers = ZoneAnswers({"10.2.0.192.bl.example": ["127.0.0.2"]})
    watch = BlocklistWatch({"p": pool}, events.append, clock=lambda: 100.0, lookups=lambda _dns: answers)
    watch.reconfigure(settings)
    await watch.check()
    assert [(e.tags["subject"], e.tags["listed"]) for e in events] == [("192.0.2.10", "true")]
    assert pool.usable(100.0) == [pool.member("b")]
    for error in ("127.255.255.254", "10.0.0.1"):
        answers.answers["10.2.0.192.bl.example"] = [error]
        await watch.check()
        assert [e.tags["listed"] for e in events] == ["true"]  # no "delisted"
        assert watch.findings[("192.0.2.10", "bl.example")].listed
        assert pool.usable(100.0) == [pool.member("b")]
    answers.answers["10.2.0.192.bl.example"] = []  # NXDOMAIN: delisted
    await watch.check()
    assert [e.tags["listed"] for e in events] == ["true", "false"]


def test_zones_may_be_named_alone_and_bad_codes_are_refused() -> None:
    s = BlocklistSettings.model_validate({"zones": ["a.example", {"zone": "b.example"}], "interval": "5m"})
    assert [z.zone for z in s.zones] == ["a.example", "b.example"] and s.interval == 300
    with pytest.raises(ValueError, match="not an IP address or network"):
        BlocklistSettings.model_validate({"zones": [{"zone": "a.example", "listed": ["nonsense"]}]})


REFUSALS_NAMING_A_LIST = [
    "554 5.7.1 Service unavailable; Client host [192.0.2.10] blocked using zen.spamhaus.org",
    "553 5.7.1 [BL21] Connections will not be accepted from 192.0.2.10, because the ip is in Spamhaus's list",
    "550 5.7.606 Access denied, banned sending IP [192.0.2.10]",
    "554 Your access to this mail system has been rejected due to the sending MTA's poor reputation. "
    "If you believe that this failure is in error, please contact the intended recipient via alternate "
    "means. (listed at b.barracudacentral.org)",
    "550 5.7.1 Rejected: 192.0.2.10 listed at our.private.example",
    "421 4.7.0 Your IP is on a blocklist, try again later",
]
OTHER_REFUSALS = [
    "550 5.1.1 The email account that you tried to reach does not exist",
    "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
    "550 5.1.1 Recipient address rejected: User unknown in virtual alias table",
    "554 5.7.1 Recipient address not listed in public table",
    "452 4.2.2 The email account that you tried to reach is over quota",
]


@pytest.mark.parametrize("text", REFUSALS_NAMING_A_LIST)
def test_a_reply_naming_a_blocklist_matches_the_reaction(text: str) -> None:
    (rule,) = reply_reactions(BlocklistSettings(zones=(BlocklistZone(zone="our.private.example"),)))
    assert rule.action == "suspend" and rule.duration == 3600
    assert rule.text is not None and re.search(rule.text, text, re.IGNORECASE)


@pytest.mark.parametrize("text", OTHER_REFUSALS)
def test_other_refusals_do_not(text: str) -> None:
    (rule,) = reply_reactions(BlocklistSettings())
    assert rule.text is not None and not re.search(rule.text, text, re.IGNORECASE)


def test_reply_suspend_0_makes_no_reaction() -> None:
    assert reply_reactions(BlocklistSettings(reply_suspend=0)) == ()


class ZoneAnswers:
    """Lookups answered from a table (a fake of pure data; the real resolver is tested end to end)."""

    def __init__(self, answers: dict[str, list[str] | None]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    async def a(self, name: str) -> list[str] | None:
        self.asked.append(name)
        return self.answers.get(name, [])

    async def txt(self, name: str) -> str:
        return f"see https://lists.example/{name}"


async def test_a_round_finds_listings_failures_and_zones_that_list_everything() -> None:
    good, dead = BlocklistZone(zone="good.example"), BlocklistZone(zone="dead.example")
    lookups = ZoneAnswers(
        {
            "10.2.0.192.good.example": ["127.0.0.2"],
            "11.2.0.192.good.example": None,  # the lookup failed
            "1.0.0.127.dead.example": ["127.0.0.2"],  # lists 127.0.0.1: lists everything
            "10.2.0.192.dead.example": ["127.0.0.2"],
        }
    )
    found = await look(lookups, [good, dead], ["192.0.2.10", "192.0.2.11", "192.0.2.12"], "127.0.0.1", 5.0)
    assert found.findings[("192.0.2.10", "good.example")].listed
    assert found.findings[("192.0.2.10", "good.example")].text.startswith("see https://")
    assert not found.findings[("192.0.2.12", "good.example")].listed
    assert found.failed == {("192.0.2.11", "good.example")}
    assert "dead.example" in found.broken_zones
    assert not any(zone == "dead.example" for _, zone in found.findings)
    assert "10.2.0.192.dead.example" not in lookups.asked  # a zone not believed is not asked further


def _pool() -> tuple[Pool, list[tuple[str, bool, str]]]:
    changes: list[tuple[str, bool, str]] = []
    settings = settings_from_dict(
        {
            "pool": [
                {
                    "name": "p",
                    "members": [
                        {"name": "a", "address": "127.0.0.1:2501", "sending_ips": ["192.0.2.10"]},
                        {"name": "b", "address": "127.0.0.1:2502", "sending_ips": ["192.0.2.11"]},
                        {"name": "c", "address": "127.0.0.1:2503", "sending_ips": ["192.0.2.12"]},
                    ],
                    "health": {"panic_threshold": 0.5},
                }
            ]
        }
    )
    pool_settings: PoolSettings = settings.pool[0]
    return Pool(pool_settings, lambda m, up, why: changes.append((m.name, up, why))), changes


def test_a_listed_member_leaves_rotation_and_comes_back_when_delisted() -> None:
    pool, changes = _pool()
    a = pool.member("a")
    finding = str(Finding("192.0.2.10", "zen.example", ("127.0.0.2",), "https://why", 1.0))
    pool.record_listing(a, (finding,), 10.0)
    assert [m.name for m in pool.usable(10.0)] == ["b", "c"]
    assert changes == [("a", False, "listed: 192.0.2.10 on zen.example: 127.0.0.2 (https://why)")]
    pool.record_listing(a, (finding,), 11.0)  # the same listing again says nothing new
    assert len(changes) == 1
    pool.record_listing(a, (), 20.0)
    assert [m.name for m in pool.usable(20.0)] == ["a", "b", "c"]
    assert changes[-1] == ("a", True, "delisted")


def test_a_member_failing_its_checks_is_not_announced_back_while_listed() -> None:
    pool, changes = _pool()
    a = pool.member("a")
    pool.record_listing(a, ("192.0.2.10 on zen.example: 127.0.0.2",), 10.0)
    for _ in range(pool.settings.check.fall):
        pool.record_check(a, False, 11.0)
    for _ in range(pool.settings.check.rise):
        pool.record_check(a, True, 12.0)
    assert [c[1] for c in changes] == [False]  # passing its checks again: still listed, still out
    pool.record_listing(a, (), 13.0)
    assert changes[-1] == ("a", True, "delisted")


def test_when_too_many_are_listed_the_pool_panics_and_uses_them_all() -> None:
    # Envoy's panic threshold: better to send from listed IPs than to send nothing at all.
    pool, _ = _pool()
    for name in ("a", "b"):
        pool.record_listing(pool.member(name), ("listed",), 10.0)
    assert pool.in_panic(10.0)
    assert [m.name for m in pool.usable(10.0)] == ["a", "b", "c"]


async def test_a_listed_signing_domain_is_reported_and_takes_no_member_out() -> None:
    settings = settings_from_dict(
        {
            "pool": [{"name": "p", "members": [{"name": "a", "address": "127.0.0.1:2501"}]}],
            "blocklists": {"domain_zones": ["dbl.example"], "domains": ["news.example.com"]},
        }
    )
    pool = Pool(settings.pool[0])
    events: list[Event] = []
    answers = ZoneAnswers({"news.example.com.dbl.example": ["127.0.1.2"]})
    watch = BlocklistWatch({"p": pool}, events.append, clock=lambda: 100.0, lookups=lambda _dns: answers)
    watch.reconfigure(settings)
    await watch.check()
    assert [(e.type, e.tags["subject"], e.tags["listed"]) for e in events] == [
        (EventType.BLOCKLIST_CHANGED, "news.example.com", "true")
    ]
    assert "invalid.dbl.example" in answers.asked  # the never-listed name, asked first
    assert pool.usable(100.0) == [pool.member("a")]
    answers.answers.clear()
    await watch.check()
    assert [e.tags["listed"] for e in events] == ["true", "false"]
