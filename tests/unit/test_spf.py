"""SPF verdicts through postmux's resolver against a loopback zone, and the pure judgement of members."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
from dnslib import RR

from postmux.balancing.pool import Pool
from postmux.config import DnsSettings, PoolSettings, SpfSettings, settings_from_dict
from postmux.events.bus import EventBus
from postmux.reputation.spf import SpfEvaluator, SpfVerdict
from postmux.scheduling.dispatcher import Dispatcher
from postmux.scheduling.gate import spf_barred, spf_permits
from postmux.scheduling.router import Router
from postmux.work import WorkItem, WorkRecipient
from tests.dns_server import LoopbackDns

ZONE = """
direct.test.       300 IN TXT "v=spf1 ip4:192.0.2.10 ip6:2001:db8::10 -all"
wide.test.         300 IN TXT "v=spf1 ip4:192.0.2.0/28 -all"
soft.test.         300 IN TXT "v=spf1 ip4:192.0.2.10 ~all"
neutral.test.      300 IN TXT "v=spf1 ?all"
inc.test.          120 IN TXT "v=spf1 include:_spf.provider.test -all"
_spf.provider.test. 60 IN TXT "v=spf1 ip4:198.51.100.0/24 ip6:2001:db8:1::/48 -all"
redir.test.        300 IN TXT "v=spf1 redirect=_spf.provider.test"
amech.test.        300 IN TXT "v=spf1 a:mail.amech.test -all"
mail.amech.test.   300 IN A 192.0.2.20
broken.test.       300 IN TXT "v=spf1 ip4:192.0.2.300 -all"
twice.test.        300 IN TXT "v=spf1 -all"
twice.test.        300 IN TXT "v=spf1 +all"
norecord.test.     300 IN TXT "some other text"
"""

IPS = ["192.0.2.10", "192.0.2.20", "198.51.100.7", "2001:db8::10", "2001:db8:1::5", "203.0.113.1"]


@pytest.fixture
def zone() -> Iterator[LoopbackDns]:
    with LoopbackDns(ZONE) as dns:
        yield dns


def evaluator(nameserver: str, **spf: object) -> SpfEvaluator:
    dns = DnsSettings(nameservers=(nameserver,), timeout=2.0, min_ttl=10.0, max_ttl=3600.0)
    return SpfEvaluator(SpfSettings(enabled=True, **spf), dns)  # type: ignore[arg-type]


async def results(ev: SpfEvaluator, domain: str) -> dict[str, str]:
    return (await ev.evaluate(domain, IPS)).results


async def test_ip4_and_ip6_mechanisms_pass_listed_addresses_and_fail_the_rest(zone: LoopbackDns) -> None:
    r = await results(evaluator(zone.address), "direct.test")
    assert r["192.0.2.10"] == "pass" and r["2001:db8::10"] == "pass"
    assert r["192.0.2.20"] == "fail" and r["2001:db8:1::5"] == "fail" and r["203.0.113.1"] == "fail"


async def test_include_is_followed_through_the_configured_resolver(zone: LoopbackDns) -> None:
    r = await results(evaluator(zone.address), "inc.test")
    assert r["198.51.100.7"] == "pass" and r["2001:db8:1::5"] == "pass"
    assert r["192.0.2.10"] == "fail"
    assert zone.queries[("_spf.provider.test", "TXT")] >= 1


async def test_redirect_takes_the_other_domains_record(zone: LoopbackDns) -> None:
    r = await results(evaluator(zone.address), "redir.test")
    assert r["198.51.100.7"] == "pass" and r["192.0.2.10"] == "fail"


async def test_a_mechanism_looks_the_host_up(zone: LoopbackDns) -> None:
    r = await results(evaluator(zone.address), "amech.test")
    assert r["192.0.2.20"] == "pass" and r["192.0.2.10"] == "fail"


async def test_softfail_neutral_none_and_permerror_are_told_apart(zone: LoopbackDns) -> None:
    ev = evaluator(zone.address)
    assert (await results(ev, "soft.test"))["192.0.2.20"] == "softfail"
    assert (await results(ev, "neutral.test"))["192.0.2.20"] == "neutral"
    assert (await results(ev, "norecord.test"))["192.0.2.20"] == "none"
    assert (await results(ev, "nosuch.test"))["192.0.2.20"] == "none"
    assert (await results(ev, "broken.test"))["192.0.2.20"] == "permerror"
    # RFC 7208 4.5: two records are a permerror, not a choice.
    assert (await results(ev, "twice.test"))["192.0.2.20"] == "permerror"


async def test_a_verdict_is_kept_for_the_smallest_ttl_of_its_answers(zone: LoopbackDns) -> None:
    ev = evaluator(zone.address)
    before = time.time()
    verdict = await ev.evaluate("inc.test", IPS)
    # inc.test has 120 s, the included record 60 s: the verdict holds 60 s.
    assert before + 59 <= verdict.expires <= time.time() + 61
    assert ev.cached("inc.test") is verdict


async def test_a_servfail_is_a_temperror_kept_only_for_error_ttl(zone: LoopbackDns) -> None:
    zone.zone.fail.add("_spf.provider.test")
    ev = evaluator(zone.address, error_ttl="5s")
    verdict = await ev.evaluate("inc.test", IPS)
    assert set(verdict.results.values()) == {"temperror"}
    assert verdict.expires <= time.time() + 5.5


async def test_a_lookup_timeout_is_a_temperror_and_ends_in_time() -> None:
    # A nameserver that never answers: every lookup waits out [dns] timeout.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        port = silent.getsockname()[1]
        dns = DnsSettings(nameservers=(f"127.0.0.1:{port}",), timeout=0.3)
        ev = SpfEvaluator(SpfSettings(enabled=True, timeout=1.0), dns)
        started = time.monotonic()
        verdict = await ev.evaluate("direct.test", ["192.0.2.10"])
        elapsed = time.monotonic() - started
    assert verdict.results == {"192.0.2.10": "temperror"}
    assert elapsed < 2.0


async def test_concurrent_refreshes_of_one_domain_share_one_evaluation(zone: LoopbackDns) -> None:
    ev = evaluator(zone.address)
    first = ev.refresh("direct.test", IPS)
    assert first is not None
    assert ev.refresh("direct.test", IPS) is None
    await first
    assert zone.queries[("direct.test", "TXT")] == 1
    assert ev.refresh("direct.test", IPS) is not None  # done: the next refresh asks again


# -- the pure judgement -------------------------------------------------------------------------------------


def test_what_each_result_permits_by_default() -> None:
    rules = SpfSettings(enabled=True)
    assert spf_permits("pass", rules) and spf_permits("none", rules) and spf_permits("neutral", rules)
    assert not spf_permits("fail", rules)
    assert not spf_permits("softfail", rules)  # no SPF pass, so no DMARC alignment on SPF
    assert spf_permits("temperror", rules) and spf_permits("permerror", rules)  # fail-open


def test_softfail_and_errors_follow_the_configuration() -> None:
    rules = SpfSettings(enabled=True, softfail="permitted", on_error="closed")
    assert spf_permits("softfail", rules)
    assert not spf_permits("temperror", rules) and not spf_permits("permerror", rules)


def relay_pool() -> Pool:
    return Pool(
        PoolSettings(
            name="relays",
            members=(
                {"name": "a", "address": "127.0.0.1:2601", "sending_ips": ["192.0.2.10"]},
                {"name": "b", "address": "127.0.0.1:2602", "sending_ips": ["192.0.2.10", "192.0.2.20"]},
                {"name": "c", "address": "127.0.0.1:2603"},  # no sending_ips: not judged
            ),
        )
    )


def test_a_member_is_barred_when_any_of_its_ips_is_not_permitted() -> None:
    verdict = SpfVerdict("x.test", {"192.0.2.10": "pass", "192.0.2.20": "fail"}, expires=0.0)
    assert spf_barred(verdict, relay_pool(), SpfSettings(enabled=True)) == {"b"}


def test_errors_bar_every_judged_member_only_when_closed() -> None:
    verdict = SpfVerdict("x.test", {"192.0.2.10": "temperror", "192.0.2.20": "temperror"}, expires=0.0)
    assert spf_barred(verdict, relay_pool(), SpfSettings(enabled=True)) == set()
    closed = SpfSettings(enabled=True, on_error="closed")
    assert spf_barred(verdict, relay_pool(), closed) == {"a", "b"}


def test_source_members_are_judged_by_their_source_address() -> None:
    pool = Pool(
        PoolSettings(
            name="direct",
            members=(
                {"name": "ip1", "kind": "source", "source_address": "192.0.2.10"},
                {"name": "ip2", "kind": "source", "source_address": "192.0.2.20"},
            ),
        )
    )
    verdict = SpfVerdict("x.test", {"192.0.2.10": "pass", "192.0.2.20": "softfail"}, expires=0.0)
    assert spf_barred(verdict, pool, SpfSettings(enabled=True)) == {"ip2"}
    assert spf_barred(verdict, pool, SpfSettings(enabled=True, softfail="permitted")) == set()


# -- the dispatcher's reading of verdicts: never waiting on DNS once a domain was seen ---------------------


class ManualClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def dispatcher_on(nameserver: str, clock: ManualClock) -> tuple[Dispatcher, Pool]:
    members = [
        {"name": "a", "address": "127.0.0.1:2601", "sending_ips": ["192.0.2.10"]},
        {"name": "b", "address": "127.0.0.1:2602", "sending_ips": ["192.0.2.20"]},
    ]
    s = settings_from_dict(
        {
            "pool": [{"name": "default", "members": members}],
            "dns": {"nameservers": [nameserver], "min_ttl": "10s", "max_ttl": "10s"},
            "spf": {"enabled": True},
        }
    )
    pools = {"default": Pool(s.pool[0])}
    return Dispatcher(s, None, pools, {}, Router(s), EventBus(), clock=clock), pools["default"]  # type: ignore[arg-type]


def mail_from(sender: str) -> WorkItem:
    return WorkItem("m1", sender, "default", "dest.test", [WorkRecipient(1, "u@dest.test", 0)], b"x", 0.0)


async def test_an_expired_verdict_is_used_while_one_evaluation_refreshes_it() -> None:
    with LoopbackDns('example.com. 10 IN TXT "v=spf1 ip4:192.0.2.10 -all"') as dns:
        clock = ManualClock(time.time())
        d, pool = dispatcher_on(dns.address, clock)
        item = mail_from("app@example.com")
        assert d._spf_barred(item, pool, clock.now) is None  # the first: wait for the one evaluation
        first = d.spf._pending["example.com"]
        assert d._spf_barred(item, pool, clock.now) is None and d.spf._pending["example.com"] is first
        await first
        assert d._spf_barred(item, pool, clock.now) == {"b"}
        # The domain moves its mail to b's IP; the verdict expires.
        dns.zone.records = RR.fromZone('example.com. 10 IN TXT "v=spf1 ip4:192.0.2.20 -all"')
        clock.now += 11
        assert d._spf_barred(item, pool, clock.now) == {"b"}  # the old verdict, not a wait
        refresh = d.spf._pending["example.com"]
        await refresh
        assert d._spf_barred(item, pool, clock.now) == {"a"}
        assert dns.queries[("example.com", "TXT")] == 2


def test_the_null_sender_and_unjudged_pools_ask_nothing() -> None:
    clock = ManualClock(time.time())
    d, pool = dispatcher_on("127.0.0.1:9", clock)
    assert d._spf_barred(mail_from(""), pool, clock.now) == frozenset()
    assert not d.spf.pending
