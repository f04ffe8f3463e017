"""Blocklist watch end to end: a DNSBL zone served on loopback lists one relay's sending IP; that relay gets
no new attempt within one check interval, and takes mail again after it is delisted."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx

from postmux.app import App
from tests.dns_server import LoopbackDns
from tests.integration.test_spf_routing import relays  # relay-a sends from 192.0.2.10, relay-b .20
from tests.support import StartUpstream, Upstream, make_settings, read_events, send, send_many, wait_until

INTERVAL_S = 0.5
TOKEN = "blocklist-test-token-0123456789"
LISTING = """
10.2.0.192.zen.test.  60 IN A   127.0.0.2
10.2.0.192.zen.test.  60 IN TXT "https://zen.test/lookup?ip=192.0.2.10"
"""


async def test_a_listed_relay_gets_nothing_new_and_takes_mail_again_once_delisted(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    a, b = await upstream("relay-a"), await upstream("relay-b")
    with LoopbackDns('zen.test. 60 IN TXT "a test DNSBL"') as dns:
        settings = make_settings(
            tmp_path,
            [relays(a.address, b.address)],
            dns={"nameservers": [dns.address]},
            blocklists={"zones": ["zen.test"], "interval": f"{INTERVAL_S}s"},
            http={"admin_token": TOKEN},
        )
        events = tmp_path / "events.jsonl"
        async with App(settings) as app:
            # Not listed: both relays share the mail.
            await send_many(app.smtp_port, [f"before{i}" for i in range(10)])
            await wait_until(lambda: len(a.received) + len(b.received) == 10)
            assert a.received and b.received

            dns.add(LISTING)
            listed_at = time.monotonic()
            await wait_until(lambda: app.pools["default"].member("relay-a").listed, timeout=5)
            assert time.monotonic() - listed_at < INTERVAL_S + 1.0  # within one check interval (+ slack)
            seen_a = len(a.received)
            await send_many(app.smtp_port, [f"listed{i}" for i in range(10)])
            await wait_until(lambda: len(a.received) + len(b.received) == 20)
            assert len(a.received) == seen_a  # not one new attempt on the listed relay

            admin = httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{app.http_port}", headers={"Authorization": f"Bearer {TOKEN}"}
            )
            async with admin:
                status = (await admin.get("/api/v1/blocklists")).json()
                members = (await admin.get("/api/v1/members")).json()["members"]
                metrics = (await admin.get("/metrics")).text
            listed = [c for c in status["checked"] if c["listed"]]
            assert [(c["subject"], c["zone"], c["answers"]) for c in listed] == [
                ("192.0.2.10", "zen.test", ["127.0.0.2"])
            ]
            assert listed[0]["text"] == "https://zen.test/lookup?ip=192.0.2.10"
            row = next(m for m in members if m["member"] == "relay-a")
            assert row["state"] == "listed" and "192.0.2.10 on zen.test: 127.0.0.2" in row["listed"][0]
            assert 'postmux_blocklist_listed{subject="192.0.2.10",zone="zen.test"} 1.0' in metrics
            assert 'postmux_blocklist_listed{subject="192.0.2.20",zone="zen.test"} 0.0' in metrics

            dns.remove("10.2.0.192.zen.test")
            await wait_until(lambda: not app.pools["default"].member("relay-a").listed, timeout=5)
            await send_many(app.smtp_port, [f"after{i}" for i in range(10)])
            await wait_until(lambda: len(a.received) + len(b.received) == 30)
            assert len(a.received) > seen_a  # back in rotation
        # Lists are asked about the never-listed 127.0.0.1 each round, to catch a list that lists everything.
        assert dns.queries[("1.0.0.127.zen.test", "A")] >= 2
    kinds = [(e["type"], e["member"], e["tags"].get("reason", "")) for e in read_events(events)]
    assert (
        "MemberDown",
        "relay-a",
        "listed: 192.0.2.10 on zen.test: 127.0.0.2 (https://zen.test/lookup?ip=192.0.2.10)",
    ) in kinds
    assert ("MemberUp", "relay-a", "delisted") in kinds
    changes = [e["tags"] for e in read_events(events) if e["type"] == "BlocklistChanged"]
    assert [(c["subject"], c["zone"], c["listed"]) for c in changes] == [
        ("192.0.2.10", "zen.test", "true"),
        ("192.0.2.10", "zen.test", "false"),
    ]


async def test_a_list_that_lists_everything_is_not_believed(tmp_path: Path, upstream: StartUpstream) -> None:
    a, b = await upstream("relay-a"), await upstream("relay-b")
    # A dead list whose domain now answers every name with 127.0.0.2, 127.0.0.1 included (RFC 5782 5).
    zone = "\n".join(
        f"{name}.dead.test. 60 IN A 127.0.0.2" for name in ("1.0.0.127", "10.2.0.192", "20.2.0.192")
    )
    with LoopbackDns(zone) as dns:
        settings = make_settings(
            tmp_path,
            [relays(a.address, b.address)],
            dns={"nameservers": [dns.address]},
            blocklists={"zones": ["dead.test"], "interval": f"{INTERVAL_S}s"},
        )
        async with App(settings) as app:
            await wait_until(lambda: app.blocklists.last_round is not None)
            await asyncio.sleep(INTERVAL_S * 2)
            assert not any(m.listed for m in app.pools["default"].members)
            assert "dead.test" in app.blocklists.status()["not_believed"]  # type: ignore[operator]
            await send_many(app.smtp_port, [f"m{i}" for i in range(6)])
            await wait_until(lambda: len(a.received) + len(b.received) == 6)
        assert dns.queries[("10.2.0.192.dead.test", "A")] == 0


async def blocked_and_clean(upstream: StartUpstream) -> tuple[Upstream, Upstream]:
    """relay-a, whose receiver refuses the sending IP as listed (bounce class SpamBlock), and relay-b."""

    async def blocked(_up: Any, _envelope: Any) -> str:
        return "554 5.7.1 Service unavailable; Client host [192.0.2.10] blocked using zen.spamhaus.org"

    return await upstream("relay-a", behaviour=blocked), await upstream("relay-b")


async def test_a_reply_naming_a_blocklist_suspends_that_member_for_that_destination(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    a, b = await blocked_and_clean(upstream)
    settings = make_settings(tmp_path, [relays(a.address, b.address)])
    events = tmp_path / "events.jsonl"
    async with App(settings) as app:
        await send(app.smtp_port, "first")
        await wait_until(lambda: any(e["type"] == "ShapingChanged" for e in read_events(events)))
        await send_many(app.smtp_port, [f"m{i}" for i in range(8)])
        await wait_until(lambda: len(b.received) >= 8)
        tried_a = a.data_commands
        assert tried_a <= 1  # the first refusal suspended relay-a for dest.test at once
    change = next(e for e in read_events(events) if e["type"] == "ShapingChanged")
    assert change["member"] == "relay-a" and "suspended for 3600s" in change["response"]["text"]


async def test_mail_refused_for_the_sending_ips_listing_is_delivered_by_another_member_without_a_dsn(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    a, b = await blocked_and_clean(upstream)
    # No suspension: every message that relay-a is given is refused there, and must move on.
    settings = make_settings(tmp_path, [relays(a.address, b.address)], blocklists={"reply_suspend": "0s"})
    events = tmp_path / "events.jsonl"
    async with App(settings) as app:
        await send_many(app.smtp_port, [f"m{i}" for i in range(6)])
        await wait_until(lambda: len(b.received) == 6)
        await asyncio.sleep(0.2)  # a bounce, had there been one, would be written by now
    seen = read_events(events)
    refused = [e for e in seen if e["type"] == "TransientFailure"]
    assert refused and a.data_commands == len(refused)  # round robin gave relay-a some of the six
    assert all(e["member"] == "relay-a" and e["response"]["code"] == 554 for e in refused)
    assert {e["bounce_class"] for e in refused} == {"SpamBlock"}
    assert sorted(e["member"] for e in seen if e["type"] == "Delivery") == ["relay-b"] * 6
    assert not [e for e in seen if e["type"] == "Bounce"]  # nothing bounced, so no DSN went out
