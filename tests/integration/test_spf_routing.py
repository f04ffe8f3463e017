"""SPF-aware routing end to end: relays declare their sending IPs, a loopback zone holds the records."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

from dnslib import RR

from postmux.app import App
from postmux.config import load_config
from tests.dns_server import LoopbackDns
from tests.support import StartUpstream, make_settings, read_events, send, send_many, wait_until

ZONE = """
example.com.        300 IN TXT "v=spf1 include:_spf.farm.test -all"
_spf.farm.test.     300 IN TXT "v=spf1 ip4:192.0.2.10 ~all"
nobody.test.        300 IN TXT "v=spf1 ip4:203.0.113.0/24 -all"
"""


def relays(a: str, b: str) -> dict[str, Any]:
    return {
        "name": "default",
        "policy": "round_robin",
        "members": [
            {"name": "relay-a", "address": a, "sending_ips": ["192.0.2.10"]},
            {"name": "relay-b", "address": b, "sending_ips": ["192.0.2.20"]},
        ],
    }


async def test_every_message_goes_to_the_one_relay_the_spf_record_permits(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    a, b = await upstream("relay-a"), await upstream("relay-b")
    with LoopbackDns(ZONE) as dns:
        settings = make_settings(
            tmp_path,
            [relays(a.address, b.address)],
            dns={"nameservers": [dns.address]},
            spf={"enabled": True},
        )
        async with App(settings) as app:
            await send_many(app.smtp_port, [f"m{i}" for i in range(20)])
            await wait_until(lambda: len(a.received) == 20)
        # One evaluation served all 20 messages (the record was asked for once, then cached).
        assert dns.queries[("example.com", "TXT")] == 1
    assert len(b.received) == 0


async def test_without_spf_routing_both_relays_share_the_mail(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    a, b = await upstream("relay-a"), await upstream("relay-b")
    with LoopbackDns(ZONE) as dns:
        settings = make_settings(tmp_path, [relays(a.address, b.address)], dns={"nameservers": [dns.address]})
        async with App(settings) as app:
            await send_many(app.smtp_port, [f"m{i}" for i in range(20)])
            await wait_until(lambda: len(a.received) + len(b.received) == 20)
        assert not dns.queries  # off by default: no lookup at all
    assert a.received and b.received


async def test_no_permitted_member_defers_with_the_reason_and_an_event(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    a, b = await upstream("relay-a"), await upstream("relay-b")
    with LoopbackDns(ZONE) as dns:
        settings = make_settings(
            tmp_path,
            [relays(a.address, b.address)],
            dns={"nameservers": [dns.address]},
            spf={"enabled": True},
        )
        async with App(settings) as app:
            await send(app.smtp_port, "refused", sender="app@nobody.test")
            events = tmp_path / "events.jsonl"
            await wait_until(lambda: any(e["type"] == "TransientFailure" for e in read_events(events)))
    deferred = [e for e in read_events(events) if e["type"] == "TransientFailure"]
    e = deferred[0]
    assert e["response"]["code"] == 451 and e["response"]["enhanced_code"] == "4.7.23"
    assert "permitted by the SPF record of nobody.test" in e["response"]["text"]
    assert "relay-a: 192.0.2.10 fail" in e["response"]["text"]
    assert "relay-b: 192.0.2.20 fail" in e["response"]["text"]
    assert e["tags"]["reason"] == "spf_not_permitted" and e["tags"]["spf_domain"] == "nobody.test"
    assert not any(ev["type"] in ("Bounce", "Delivery") for ev in read_events(events))
    assert not a.received and not b.received


async def test_softfail_permitted_by_configuration_lets_the_softfailed_relay_take_mail(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    a, b = await upstream("relay-a"), await upstream("relay-b")
    zone = 'soft.test. 300 IN TXT "v=spf1 ip4:192.0.2.10 ~all"'
    with LoopbackDns(zone) as dns:
        settings = make_settings(
            tmp_path,
            [relays(a.address, b.address)],
            dns={"nameservers": [dns.address]},
            spf={"enabled": True, "softfail": "permitted"},
        )
        async with App(settings) as app:
            await send_many(app.smtp_port, [f"m{i}" for i in range(10)], sender="app@soft.test")
            await wait_until(lambda: len(a.received) + len(b.received) == 10)
    assert a.received and b.received


async def test_the_null_sender_is_not_judged(tmp_path: Path, upstream: StartUpstream) -> None:
    a, b = await upstream("relay-a"), await upstream("relay-b")
    with LoopbackDns(ZONE) as dns:
        settings = make_settings(
            tmp_path,
            [relays(a.address, b.address)],
            dns={"nameservers": [dns.address]},
            spf={"enabled": True},
        )
        async with App(settings) as app:
            await send_many(app.smtp_port, [f"m{i}" for i in range(10)], sender="")
            await wait_until(lambda: len(a.received) + len(b.received) == 10)
        assert not dns.queries
    assert a.received and b.received


async def _with_silent_nameserver(tmp_path: Path, upstream: StartUpstream, on_error: str) -> tuple[int, Path]:
    a = await upstream("relay-a")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        pool = {
            "name": "default",
            "members": [{"name": "relay-a", "address": a.address, "sending_ips": ["192.0.2.10"]}],
        }
        settings = make_settings(
            tmp_path,
            [pool],
            dns={"nameservers": [f"127.0.0.1:{silent.getsockname()[1]}"], "timeout": "0.3s"},
            spf={"enabled": True, "on_error": on_error, "timeout": "1s"},
        )
        events = tmp_path / "events.jsonl"
        async with App(settings) as app:
            await send(app.smtp_port, "timeout")
            await wait_until(
                lambda: (
                    len(a.received) == 1 or any(e["type"] == "TransientFailure" for e in read_events(events))
                )
            )
    return len(a.received), events


async def test_a_lookup_timeout_fails_open_by_default(tmp_path: Path, upstream: StartUpstream) -> None:
    delivered, _ = await _with_silent_nameserver(tmp_path, upstream, "open")
    assert delivered == 1


async def test_a_lookup_timeout_fails_closed_when_configured(tmp_path: Path, upstream: StartUpstream) -> None:
    delivered, events = await _with_silent_nameserver(tmp_path, upstream, "closed")
    assert delivered == 0
    [e] = [e for e in read_events(events) if e["type"] == "TransientFailure"]
    assert e["response"]["enhanced_code"] == "4.7.24" and e["tags"]["reason"] == "spf_not_permitted"
    assert "could not be evaluated (relay-a: 192.0.2.10 temperror)" in e["response"]["text"]


async def test_a_changed_record_takes_effect_once_the_verdict_expires(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    a, b = await upstream("relay-a"), await upstream("relay-b")
    with LoopbackDns('example.com. 1 IN TXT "v=spf1 ip4:192.0.2.10 -all"') as dns:
        settings = make_settings(
            tmp_path,
            [relays(a.address, b.address)],
            dns={"nameservers": [dns.address], "min_ttl": "1s", "max_ttl": "1s"},
            spf={"enabled": True},
        )
        async with App(settings) as app:
            await send_many(app.smtp_port, [f"a{i}" for i in range(5)])
            await wait_until(lambda: len(a.received) == 5)
            # The domain moves its mail to relay-b's IP; within a TTL postmux follows.
            dns.zone.records = RR.fromZone('example.com. 1 IN TXT "v=spf1 ip4:192.0.2.20 -all"')
            await asyncio.sleep(1.2)
            # The first message after expiry may still go by the old verdict while the new one is asked.
            await send(app.smtp_port, "refresh")
            await wait_until(lambda: dns.queries[("example.com", "TXT")] == 2)
            await send_many(app.smtp_port, [f"b{i}" for i in range(5)])
            await wait_until(lambda: len(b.received) >= 5)
    assert {r.test_id for r in b.received} >= {f"b{i}" for i in range(5)}
    assert len(a.received) + len(b.received) == 11


async def test_source_members_are_judged_by_their_own_address(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    mx = await upstream("mx")
    zone = 'example.com. 300 IN TXT "v=spf1 ip4:127.0.0.3 -all"'
    with LoopbackDns(zone) as dns:
        pool = {
            "name": "default",
            "members": [
                {"name": "ip2", "kind": "source", "source_address": "127.0.0.2"},
                {"name": "ip3", "kind": "source", "source_address": "127.0.0.3"},
            ],
        }
        settings = make_settings(
            tmp_path,
            [pool],
            dns={"nameservers": [dns.address], "overrides": {"dest.test": mx.address}},
            spf={"enabled": True},
        )
        async with App(settings) as app:
            await send_many(app.smtp_port, [f"m{i}" for i in range(10)])
            await wait_until(lambda: len(mx.received) == 10)
    assert {r.peer for r in mx.received} == {"127.0.0.3"}


async def test_a_reload_that_moves_sending_ips_moves_the_mail_at_once(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    a, b = await upstream("relay-a"), await upstream("relay-b")
    cfg = tmp_path / "postmux.toml"

    def write(ip_a: str, ip_b: str) -> None:
        cfg.write_text(
            f"""
[smtp]
listen = "127.0.0.1:0"
hostname = "postmux.test"
[http]
listen = "127.0.0.1:0"
[spool]
path = "{tmp_path / "spool.db"}"
[events]
log = "{tmp_path / "events.jsonl"}"
[dns]
nameservers = ["{dns.address}"]
[spf]
enabled = true
[[pool]]
name = "default"
members = [
  {{ name = "relay-a", address = "{a.address}", sending_ips = ["{ip_a}"] }},
  {{ name = "relay-b", address = "{b.address}", sending_ips = ["{ip_b}"] }},
]
"""
        )

    with LoopbackDns('example.com. 300 IN TXT "v=spf1 ip4:192.0.2.10 -all"') as dns:
        write("192.0.2.10", "192.0.2.20")
        async with App(load_config(cfg), config_path=cfg) as app:
            await send_many(app.smtp_port, [f"a{i}" for i in range(5)])
            await wait_until(lambda: len(a.received) == 5)
            write("192.0.2.20", "192.0.2.10")  # the relays' addresses were swapped
            app.control.reload()
            await send_many(app.smtp_port, [f"b{i}" for i in range(5)])
            await wait_until(lambda: len(b.received) == 5)
    assert len(a.received) == 5
