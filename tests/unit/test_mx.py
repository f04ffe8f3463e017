"""MX resolution against a real DNS server on loopback: order, implicit MX, null MX, NXDOMAIN, TTLs."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from postmux.config import DnsSettings, ShapingSettings
from postmux.delivery.mx import MxResolver
from postmux.delivery.myself import Myself
from postmux.scheduling.providers import Providers
from tests.dns_server import LoopbackDns

ZONE = """
multi.test.        300 IN MX 20 mx-b.multi.test.
multi.test.        300 IN MX 10 mx-a.multi.test.
multi.test.        300 IN MX 30 mx-c.multi.test.
mx-a.multi.test.   300 IN A 127.0.0.11
mx-b.multi.test.   300 IN A 127.0.0.12
mx-c.multi.test.   300 IN A 127.0.0.13
mx-c.multi.test.   300 IN AAAA ::1
nomx.test.         300 IN A 127.0.0.20
nomx.test.         300 IN TXT "v=spf1 -all"
nullmx.test.       300 IN MX 0 .
shortttl.test.     40 IN MX 10 mx.shortttl.test.
mx.shortttl.test.  40 IN A 127.0.0.30
hosted.test.       300 IN MX 5 alt1.aspmx.l.google.com.
alt1.aspmx.l.google.com. 300 IN A 127.0.0.40
dangling.test.     300 IN MX 10 missing.dangling.test.
dangling.test.     300 IN TXT "exists"
broken.test.       300 IN MX 10 mx.broken.test.
move.test.         3600 IN MX 10 mx.move.test.
mx.move.test.      5 IN A 127.0.0.50
alias.test.        3600 IN MX 10 mx.alias.test.
mx.alias.test.     4 IN CNAME real.alias.test.
real.alias.test.   3600 IN A 127.0.0.52
bare.test.         7 IN A 127.0.0.60
flaky.test.        3600 IN MX 10 primary.flaky.test.
flaky.test.        3600 IN MX 20 backup.flaky.test.
primary.flaky.test. 3600 IN A 127.0.0.70
backup.flaky.test. 3600 IN A 127.0.0.71
loop.test.         300 IN MX 10 self.loop.test.
self.loop.test.    300 IN A 127.0.0.1
partial.test.      300 IN MX 10 good.partial.test.
partial.test.      300 IN MX 20 self.loop.test.
partial.test.      300 IN MX 20 peer.partial.test.
partial.test.      300 IN MX 30 worse.partial.test.
good.partial.test. 300 IN A 127.0.0.81
peer.partial.test. 300 IN A 127.0.0.82
worse.partial.test. 300 IN A 127.0.0.83
"""


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def dns_server() -> Iterator[LoopbackDns]:
    with LoopbackDns(ZONE) as server:
        yield server


def resolver(server: LoopbackDns, clock: Clock | None = None, **dns: object) -> MxResolver:
    settings = DnsSettings.model_validate({"nameservers": [server.address], "mx_port": 2525, **dns})
    return MxResolver(settings, Providers(ShapingSettings()), clock or Clock())


async def test_mx_hosts_come_in_preference_order_with_their_addresses(dns_server: LoopbackDns) -> None:
    plan = await resolver(dns_server).resolve("Multi.Test")
    assert plan.error is None
    assert [h.name for h in plan.hosts] == ["mx-a.multi.test", "mx-b.multi.test", "mx-c.multi.test"]
    assert plan.hosts[0].addresses == (("127.0.0.11", 2525),)
    assert set(plan.hosts[2].addresses) == {("127.0.0.13", 2525), ("::1", 2525)}
    assert plan.destination == "multi.test"


async def test_no_mx_falls_back_to_the_domains_own_address(dns_server: LoopbackDns) -> None:
    plan = await resolver(dns_server).resolve("nomx.test")  # RFC 5321 5.1: the implicit MX
    assert [(h.name, h.addresses) for h in plan.hosts] == [("nomx.test", (("127.0.0.20", 2525),))]


async def test_null_mx_nxdomain_and_failures_give_the_right_replies(dns_server: LoopbackDns) -> None:
    r = resolver(dns_server)
    null = await r.resolve("nullmx.test")
    assert null.error is not None and (null.error.code, null.error.enhanced_code) == (556, "5.1.10")
    gone = await r.resolve("nowhere.test")
    assert gone.error is not None and (gone.error.code, gone.error.enhanced_code) == (550, "5.1.2")
    dangling = await r.resolve("dangling.test")  # its only MX host has no address: try again later
    assert dangling.error is not None and dangling.error.code == 451
    dns_server.zone.fail.add("broken.test")
    broken = await r.resolve("broken.test")
    assert broken.error is not None and (broken.error.code, broken.error.enhanced_code) == (451, "4.4.3")


async def test_a_failed_address_lookup_for_an_implicit_mx_defers_instead_of_bouncing(
    dns_server: LoopbackDns,
) -> None:
    # nomx.test has an A record but no MX; if the A query fails, nothing is known: try again later.
    dns_server.zone.fail_types.add(("nomx.test", "A"))
    plan = await resolver(dns_server).resolve("nomx.test")
    assert plan.error is not None and (plan.error.code, plan.error.enhanced_code) == (451, "4.4.3")


async def test_answers_are_cached_for_their_ttl_within_bounds(dns_server: LoopbackDns) -> None:
    clock = Clock()
    r = resolver(dns_server, clock, min_ttl="60s")
    await r.resolve("shortttl.test")
    await r.resolve("shortttl.test")
    assert dns_server.queries[("shortttl.test", "MX")] == 1
    clock.now += 50  # the record's TTL (40 s) is past, but min_ttl (60 s) is not
    await r.resolve("shortttl.test")
    assert dns_server.queries[("shortttl.test", "MX")] == 1
    clock.now += 11
    await r.resolve("shortttl.test")
    assert dns_server.queries[("shortttl.test", "MX")] == 2
    r.prune()  # nothing expired yet: nothing forgotten
    assert r.cached("shortttl.test") is not None
    clock.now += 61
    r.prune()
    assert "shortttl.test" not in r._cache
    # NXDOMAIN is remembered for negative_ttl.
    await r.resolve("nowhere.test")
    await r.resolve("nowhere.test")
    assert dns_server.queries[("nowhere.test", "MX")] == 1


async def test_a_domain_hosted_by_a_provider_takes_the_providers_name(dns_server: LoopbackDns) -> None:
    plan = await resolver(dns_server).resolve("hosted.test")
    assert plan.destination == "google"


async def test_overrides_answer_without_asking_dns(dns_server: LoopbackDns) -> None:
    r = resolver(dns_server, overrides={"Private.Test": ["127.0.0.5:2601", "127.0.0.6:2602"]})
    plan = await r.resolve("private.test")
    assert [h.addresses for h in plan.hosts] == [(("127.0.0.5", 2601),), (("127.0.0.6", 2602),)]
    assert not dns_server.queries


async def test_an_address_literal_is_its_own_host_and_asks_dns_nothing(dns_server: LoopbackDns) -> None:
    mx = resolver(dns_server)
    v4 = await mx.resolve("[127.0.0.7]")
    v6 = await mx.resolve("[IPv6:0:0::1]")
    assert v4.error is None and v4.hosts[0].addresses == (("127.0.0.7", 2525),)
    assert v6.error is None and v6.hosts[0].addresses == (("::1", 2525),)
    assert v4.destination == "[127.0.0.7]"
    assert not dns_server.queries  # RFC 5321 5.1: no MX lookup for a literal


async def test_a_plan_goes_stale_with_its_shortest_address_ttl(dns_server: LoopbackDns) -> None:
    # RFC 2181 5.2: each record is kept for its own TTL. The MX record lives an hour, its host's A record
    # 5 s (a DNS failover): after 5 s the next delivery must find the host's new address.
    clock = Clock()
    r = resolver(dns_server, clock, min_ttl="1s")
    assert (await r.resolve("move.test")).hosts[0].addresses == (("127.0.0.50", 2525),)
    dns_server.remove("mx.move.test")
    dns_server.add("mx.move.test. 5 IN A 127.0.0.51")
    clock.now += 4
    assert (await r.resolve("move.test")).hosts[0].addresses == (("127.0.0.50", 2525),)
    clock.now += 2
    assert (await r.resolve("move.test")).hosts[0].addresses == (("127.0.0.51", 2525),)
    assert dns_server.queries[("mx.move.test", "A")] == 2


async def test_a_cname_in_an_mx_hosts_name_bounds_the_plan_by_its_own_ttl(dns_server: LoopbackDns) -> None:
    clock = Clock()
    r = resolver(dns_server, clock, min_ttl="1s")
    await r.resolve("alias.test")
    clock.now += 5  # the CNAME's 4 s are over, though the A record it leads to lives an hour
    assert r.cached("alias.test") is None


async def test_an_implicit_mx_is_kept_for_its_address_records_ttl(dns_server: LoopbackDns) -> None:
    clock = Clock()
    r = resolver(dns_server, clock, min_ttl="1s")
    await r.resolve("bare.test")
    clock.now += 6
    assert r.cached("bare.test") is not None  # 7 s of TTL, not min_ttl's 1 s
    clock.now += 2
    assert r.cached("bare.test") is None


async def test_a_failed_address_lookup_keeps_the_plan_briefly_so_the_host_is_asked_for_again(
    dns_server: LoopbackDns,
) -> None:
    # SERVFAIL for the primary's A record says nothing about the primary: the backup takes the mail for a
    # few seconds, not for the MX record's hour (RFC 5321 5.1: try the hosts in preference order).
    clock = Clock()
    r = resolver(dns_server, clock, min_ttl="60s")
    dns_server.zone.fail_types.add(("primary.flaky.test", "A"))
    plan = await r.resolve("flaky.test")
    assert [h.name for h in plan.hosts] == ["backup.flaky.test"]
    dns_server.zone.fail_types.clear()
    clock.now += 6
    plan = await r.resolve("flaky.test")
    assert [h.name for h in plan.hosts] == ["primary.flaky.test", "backup.flaky.test"]
    clock.now += 59  # a plan that no lookup failed for is kept for its TTL (here min_ttl) again
    await r.resolve("flaky.test")
    assert dns_server.queries[("flaky.test", "MX")] == 2


async def test_an_mx_host_that_is_this_node_is_dropped_with_every_mx_not_better_than_it(
    dns_server: LoopbackDns,
) -> None:
    # RFC 5321 5.1: the node listens on 127.0.0.1:2525, where self.loop.test's mail would go.
    r = resolver(dns_server)
    r.know_myself(Myself.of("127.0.0.1", 2525, "postmux.test"))
    partial = await r.resolve("partial.test")
    assert [h.name for h in partial.hosts] == ["good.partial.test"]
    looping = await r.resolve("loop.test")
    assert (
        looping.error is not None
        and str(looping.error) == "554 5.4.6 mail for loop.test loops back to myself"
    )
    assert (await r.resolve("[127.0.0.1]")).error is not None  # a literal naming the node loops as well
    r.know_myself(Myself.of("127.0.0.1", 2626, "postmux.test"))  # listening elsewhere: no loop
    assert [h.name for h in (await r.resolve("loop.test")).hosts] == ["self.loop.test"]
