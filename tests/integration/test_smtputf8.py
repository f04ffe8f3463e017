"""SMTPUTF8 mail goes only to members whose server offers SMTPUTF8 (RFC 6531 3.4), else the sender hears.

Two real upstreams: `narrow` runs aiosmtpd with enable_SMTPUTF8=False, `wide` offers it.
"""

from __future__ import annotations

import email
from pathlib import Path
from typing import Any

import aiosmtplib

from postmux.app import App
from postmux.config import RouteSettings
from tests.support import StartUpstream, Upstream, make_settings, read_events, wait_until


async def send_utf8(
    port: int,
    test_id: str,
    to: str = "jörg@dest.test",
    subject: str = "hello",
    sender: str = "app@example.com",
) -> None:
    """One message with SMTPUTF8 at MAIL, as a client with UTF-8 addresses or headers sends it."""
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, local_hostname="client.test", start_tls=False)
    await client.connect()
    try:
        await client.mail(sender, options=["SMTPUTF8", "BODY=8BITMIME"], encoding="utf-8")
        await client.rcpt(to, encoding="utf-8")
        data = f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\nX-Test-Id: {test_id}\r\n\r\nhi\r\n"
        response = await client.data(data.encode())
        assert response.code == 250
        await client.quit()
    finally:
        client.close()


def events(tmp_path: Path, kind: str) -> list[dict[str, Any]]:
    return [e for e in read_events(tmp_path / "events.jsonl") if e["type"] == kind]


async def two_upstreams(upstream: StartUpstream) -> tuple[Upstream, Upstream]:
    return await upstream("narrow", smtputf8=False), await upstream("wide")


def members(narrow: Upstream, wide: Upstream) -> list[dict[str, Any]]:
    return [{"name": "narrow", "address": narrow.address}, {"name": "wide", "address": wide.address}]


async def test_utf8_mail_goes_only_to_the_member_that_offers_smtputf8(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    narrow, wide = await two_upstreams(upstream)
    pools = [{"name": "default", "policy": "round_robin", "members": members(narrow, wide)}]
    async with App(make_settings(tmp_path, pools)) as app:
        for i in range(6):
            await send_utf8(app.smtp_port, f"u{i}")
        await wait_until(lambda: len(wide.received) == 6)
    assert narrow.data_commands == 0 and narrow.received == []
    assert all(r.recipients == ["jörg@dest.test"] for r in wide.received)
    # Round robin offered some of them to narrow first: each came straight back and went on to wide.
    hops = events(tmp_path, "TransientFailure")
    assert hops and {e["member"] for e in hops} == {"narrow"}
    assert {(e["response"]["code"], e["response"]["enhanced_code"]) for e in hops} == {(553, "5.6.7")}
    assert hops[0]["response"]["text"] == f"SMTPUTF8 required but not offered by {narrow.address}"
    assert events(tmp_path, "Bounce") == []
    assert len(events(tmp_path, "Delivery")) == 6


async def test_ascii_mail_that_only_announced_smtputf8_may_go_to_any_member(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    narrow, wide = await two_upstreams(upstream)
    pools = [{"name": "default", "policy": "round_robin", "members": members(narrow, wide)}]
    async with App(make_settings(tmp_path, pools)) as app:
        for i in range(4):
            await send_utf8(app.smtp_port, f"a{i}", to="plain@dest.test")
        await wait_until(lambda: len(wide.received) + len(narrow.received) == 4)
    assert narrow.received, "all-ASCII mail needs no SMTPUTF8, so narrow takes its share"
    assert events(tmp_path, "TransientFailure") == []


async def test_utf8_mail_bounces_with_5_6_7_when_no_member_of_its_pool_offers_smtputf8(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    narrow, wide = await two_upstreams(upstream)
    narrow2 = await upstream("narrow2", smtputf8=False)
    pools = [
        {"name": "default", "members": [{"name": "wide", "address": wide.address}]},
        {
            "name": "old",
            "members": [
                {"name": "narrow", "address": narrow.address},
                {"name": "narrow2", "address": narrow2.address},
            ],
        },
    ]
    route = RouteSettings.model_validate({"match": {"recipient_domain": "old.test"}, "pool": "old"})
    settings = make_settings(tmp_path, pools).model_copy(update={"route": (route,)})
    async with App(settings) as app:
        # ASCII addresses, a UTF-8 header: that alone needs SMTPUTF8 (RFC 6532).
        await send_utf8(app.smtp_port, "b1", to="user@old.test", subject="Grüße")
        # The DSN goes to app@example.com through the default pool, whose member offers SMTPUTF8.
        await wait_until(lambda: len(wide.received) == 1)
    assert narrow.data_commands == narrow2.data_commands == 0
    (bounce,) = events(tmp_path, "Bounce")
    assert bounce["recipient"] == "user@old.test" and bounce["pool"] == "old"
    assert (bounce["response"]["code"], bounce["response"]["enhanced_code"]) == (553, "5.6.7")
    # Both members were asked, once each, before the verdict: nothing more to wait for.
    assert [e["member"] for e in events(tmp_path, "TransientFailure")] == [
        m for m in ("narrow", "narrow2") if m != bounce["member"]
    ]
    dsn = email.message_from_bytes(wide.received[0].data)
    assert wide.received[0].sender == "" and wide.received[0].recipients == ["app@example.com"]
    assert b"5.6.7" in wide.received[0].data and dsn.get_content_type() == "multipart/report"
    # Review 6: the 553 is postmux's finding from the servers' EHLO, not a reply either of them gave, so
    # it is not an SMTP diagnostic of a remote MTA (RFC 3464 2.3.5/2.3.6).
    assert b"Diagnostic-Code" not in wide.received[0].data and b"Remote-MTA" not in wide.received[0].data
    assert b" said:" not in wide.received[0].data
    assert b"(reported by this mail system)" in b" ".join(wide.received[0].data.split())


async def test_utf8_mail_waits_while_the_only_member_offering_smtputf8_is_drained(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    narrow, wide = await two_upstreams(upstream)
    pools = [{"name": "default", "policy": "round_robin", "members": members(narrow, wide)}]
    async with App(make_settings(tmp_path, pools)) as app:
        app.control.set_draining("wide", True)
        await send_utf8(app.smtp_port, "w1")
        await wait_until(lambda: bool(events(tmp_path, "TransientFailure")))
        (waiting,) = events(tmp_path, "TransientFailure")
        assert (waiting["response"]["code"], waiting["response"]["enhanced_code"]) == (451, "4.4.5")
        assert waiting["response"]["text"] == "no usable member offering SMTPUTF8 in pool default"
        app.control.set_draining("wide", False)
        await wait_until(lambda: len(wide.received) == 1)  # at the next retry, 1 s later
    assert events(tmp_path, "Bounce") == [] and narrow.data_commands == 0


async def test_an_mx_host_without_smtputf8_bounces_at_once_whatever_the_source_ip(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    narrow, wide = await two_upstreams(upstream)
    sources = [
        {"name": "ip2", "kind": "source", "source_address": "127.0.0.2"},
        {"name": "ip3", "kind": "source", "source_address": "127.0.0.3"},
    ]
    # Every source IP reaches the same MX: its lack of SMTPUTF8 is the destination's, not the member's.
    overrides = {"dest.test": narrow.address, "example.com": wide.address}
    pools = [{"name": "default", "members": sources}]
    async with App(make_settings(tmp_path, pools, dns={"overrides": overrides})) as app:
        await send_utf8(app.smtp_port, "mx1")
        await wait_until(lambda: len(wide.received) == 1)  # the DSN, to app@example.com
    (bounce,) = events(tmp_path, "Bounce")
    assert (bounce["response"]["code"], bounce["response"]["enhanced_code"]) == (553, "5.6.7")
    assert events(tmp_path, "TransientFailure") == [] and narrow.data_commands == 0


async def test_a_utf8_recipients_dsn_is_global_or_downgraded_by_what_its_next_hop_offers(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    # Review 7: RFC 6533 3 with SMTPUTF8 on the way back, RFC 6533 6 (an ASCII message/delivery-status,
    # the address in utf-8-addr-xtext) where the hop toward the sender lacks it.
    relay = await upstream("relay")
    relay.rcpt_refusals["jörg@dest.test"] = "550 5.1.1 <jörg@dest.test>: Empfänger unbekannt"
    wide = await upstream("wide")
    narrow = await upstream("narrow", smtputf8=False)
    pools = [
        {"name": "default", "members": [{"name": "relay", "address": relay.address}]},
        {"name": "wide", "members": [{"name": "wide", "address": wide.address}]},
        {"name": "narrow", "members": [{"name": "narrow", "address": narrow.address}]},
    ]
    routes = tuple(
        RouteSettings.model_validate({"match": {"recipient_domain": domain}, "pool": pool})
        for domain, pool in (("example.com", "wide"), ("old.example", "narrow"))
    )
    # The first bounce would suppress jörg@dest.test, and the second message be refused at RCPT if that came
    # first (a race this test is not about): the list is kept but not looked up.
    settings = make_settings(tmp_path, pools, suppression={"enabled": False}).model_copy(
        update={"route": routes}
    )
    async with App(settings) as app:
        await send_utf8(app.smtp_port, "g1", subject="Grüße")
        await send_utf8(app.smtp_port, "g2", subject="Grüße", sender="app@old.example")
        await wait_until(lambda: len(wide.received) == 1 and len(narrow.received) == 1)
    wide_dsn, narrow_dsn = wide.received[0].data, narrow.received[0].data
    assert b"Content-Type: message/global-delivery-status\r\n" in wide_dsn
    assert "Final-Recipient: utf-8; jörg@dest.test".encode() in wide_dsn
    assert b"Content-Type: message/global-headers\r\n" in wide_dsn
    assert any(c.startswith("MAIL FROM:<>") and "SMTPUTF8" in c for c in wide.commands)
    assert b"Content-Type: message/delivery-status\r\n" in narrow_dsn and b"message/global" not in narrow_dsn
    status = narrow_dsn.split(b"Content-Type: message/delivery-status\r\n")[1].split(b"\r\n--=_postmux")[0]
    assert status.isascii() and b"Final-Recipient: utf-8; j\\x{F6}rg@dest.test" in status
    assert b"Content-Type: text/rfc822-headers\r\n" in narrow_dsn
    assert not any("SMTPUTF8" in c for c in narrow.commands)
