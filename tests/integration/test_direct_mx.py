"""Source members delivering straight to MX hosts from their own addresses (issue 4)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from structlog.testing import capture_logs

from postmux.app import App
from tests.dns_server import LoopbackDns
from tests.support import Upstream, free_port, make_settings, read_events, send, send_many, wait_until

SOURCES = [
    {"name": "ip2", "kind": "source", "source_address": "127.0.0.2", "ehlo_hostname": "mta2.example.test"},
    {"name": "ip3", "kind": "source", "source_address": "127.0.0.3", "ehlo_hostname": "mta3.example.test"},
]


def direct_pool(**extra: Any) -> dict[str, Any]:
    return {"name": "default", "policy": "round_robin", "members": SOURCES, **extra}


async def test_source_members_send_from_their_own_address_and_name(tmp_path: Path) -> None:
    mx = await Upstream("mx").start()
    settings = make_settings(tmp_path, [direct_pool()], dns={"overrides": {"dest.test": mx.address}})
    async with App(settings) as app:
        await send_many(app.smtp_port, [f"m{i}" for i in range(20)])
        await wait_until(lambda: len(mx.received) == 20)
    seen = {(r.peer, r.helo) for r in mx.received}
    assert seen == {("127.0.0.2", "mta2.example.test"), ("127.0.0.3", "mta3.example.test")}
    await mx.stop()


ZONE = """
pref.test.       300 IN MX 10 mx-a.pref.test.
pref.test.       300 IN MX 20 mx-b.pref.test.
mx-a.pref.test.  300 IN A 127.0.0.11
mx-b.pref.test.  300 IN A 127.0.0.12
plain.test.      300 IN A 127.0.0.13
nullmx.test.     300 IN MX 0 .
example.com.     300 IN MX 10 mx.example.com.
mx.example.com.  300 IN A 127.0.0.14
loop.test.       300 IN MX 10 self.loop.test.
self.loop.test.  300 IN A 127.0.0.1
greet.test.      300 IN MX 10 mx.greet.test.
mx.greet.test.   300 IN A 127.0.0.15
skip.test.       300 IN MX 10 mx-a.skip.test.
skip.test.       300 IN MX 20 mx-b.skip.test.
skip.test.       300 IN MX 30 mx-c.skip.test.
mx-a.skip.test.  300 IN A 127.0.0.16
mx-b.skip.test.  300 IN A 127.0.0.17
mx-c.skip.test.  300 IN A 127.0.0.18
"""


async def test_mx_preference_order_and_fallback_through_a_real_resolver(tmp_path: Path) -> None:
    backup = await Upstream("mx-b", host="127.0.0.12").start()
    port = backup.port
    plain = await Upstream("plain", host="127.0.0.13").start(port=port)
    with LoopbackDns(ZONE) as dns:
        settings = make_settings(
            tmp_path, [direct_pool()], dns={"nameservers": [dns.address], "mx_port": port, "min_ttl": "1s"}
        )
        async with App(settings) as app:
            # The preferred MX (127.0.0.11) refuses connections: the next one takes the mail.
            await send(app.smtp_port, "fallback", to=["u@pref.test"])
            await wait_until(lambda: len(backup.received) == 1)
            primary = await Upstream("mx-a", host="127.0.0.11").start(port=port)
            await send(app.smtp_port, "preferred", to=["u@pref.test"])
            await wait_until(lambda: len(primary.received) == 1)
            # No MX record: the domain's own address is its mail server (RFC 5321 5.1).
            await send(app.smtp_port, "implicit", to=["u@plain.test"])
            await wait_until(lambda: len(plain.received) == 1)
    assert [r.test_id for r in backup.received] == ["fallback"]
    assert [r.test_id for r in primary.received] == ["preferred"]
    for u in (backup, primary, plain):
        await u.stop()


async def test_null_mx_bounces_at_once_with_one_dsn(tmp_path: Path) -> None:
    bounces = await Upstream("bounces", host="127.0.0.14").start()
    with LoopbackDns(ZONE) as dns:
        settings = make_settings(
            tmp_path, [direct_pool()], dns={"nameservers": [dns.address], "mx_port": bounces.port}
        )
        async with App(settings) as app:
            await send(app.smtp_port, "nomail", to=["a@nullmx.test", "b@nullmx.test"])
            await wait_until(lambda: len(bounces.received) == 1)
            await wait_until(
                lambda: sum(e["type"] == "Bounce" for e in read_events(tmp_path / "events.jsonl")) == 2
            )
    dsn = bounces.received[0]
    assert dsn.sender == "" and dsn.recipients == ["app@example.com"]
    assert b"5.1.10" in dsn.data and b"a@nullmx.test" in dsn.data and b"b@nullmx.test" in dsn.data
    assert sum(e["type"] == "Delivery" for e in read_events(tmp_path / "events.jsonl")) == 1  # the DSN itself
    await bounces.stop()


def events_of(tmp_path: Path, kind: str) -> list[dict[str, Any]]:
    return [e for e in read_events(tmp_path / "events.jsonl") if e["type"] == kind]


async def test_an_mx_that_points_back_at_this_node_bounces_at_once_instead_of_looping(tmp_path: Path) -> None:
    # loop.test's MX is 127.0.0.1 on the port this node listens on: RFC 5321 5.1, the mail loops back
    # to myself. Before, the node took its own message again and again (a Delivery event each time)
    # until the hop count bounced it.
    port = free_port()
    bounces = await Upstream("bounces", host="127.0.0.14").start(port=port)
    try:
        with LoopbackDns(ZONE) as dns:
            settings = make_settings(
                tmp_path,
                [direct_pool()],
                smtp={"listen": f"127.0.0.1:{port}"},
                dns={"nameservers": [dns.address], "mx_port": port},
            )
            async with App(settings) as app:
                await send(app.smtp_port, "loop", to=["u@loop.test"])
                await wait_until(lambda: len(bounces.received) == 1)
                await wait_until(lambda: bool(events_of(tmp_path, "Delivery")))
    finally:
        await bounces.stop()
    (bounce,) = events_of(tmp_path, "Bounce")
    assert bounce["response"]["code"] == 554 and bounce["response"]["enhanced_code"] == "5.4.6"
    assert bounce["response"]["text"] == "mail for loop.test loops back to myself"
    assert [e["recipient"] for e in events_of(tmp_path, "Delivery")] == ["app@example.com"]  # the DSN only
    assert len(events_of(tmp_path, "Reception")) == 1  # no copies taken in again
    assert b"5.4.6" in bounces.received[0].data


async def test_an_mx_that_greets_with_this_nodes_own_hostname_is_a_loop(tmp_path: Path) -> None:
    # Postfix's check: a server that calls itself by our [smtp] hostname is this node, reached at an
    # address the MX plan cannot tell is ours (another interface, a NAT).
    mirror = await Upstream("mirror", host="127.0.0.15", hostname="postmux.test").start()
    bounces = await Upstream("bounces", host="127.0.0.14").start(port=mirror.port)
    try:
        with LoopbackDns(ZONE) as dns:
            settings = make_settings(
                tmp_path, [direct_pool()], dns={"nameservers": [dns.address], "mx_port": mirror.port}
            )
            async with App(settings) as app:
                await send(app.smtp_port, "mirror", to=["u@greet.test"])
                await wait_until(lambda: len(bounces.received) == 1)
    finally:
        await mirror.stop()
        await bounces.stop()
    assert mirror.received == []
    (bounce,) = events_of(tmp_path, "Bounce")
    assert str(bounce["response"]["code"]) + " " + bounce["response"]["text"] == (
        "554 mail for greet.test loops back to myself"
    )


async def test_mx_hosts_passed_over_are_logged_and_named_on_the_event(tmp_path: Path) -> None:
    # MX 10 refuses the connection, MX 20 greets with 421, MX 30 takes the mail: the operator must be able
    # to see that the primary is failing, not just that MX 30 delivered.
    busy = await Upstream("mx-b", host="127.0.0.17").start()
    busy.greeting_refusal = "421 4.3.2 busy"
    taker = await Upstream("mx-c", host="127.0.0.18").start(port=busy.port)
    try:
        with LoopbackDns(ZONE) as dns, capture_logs() as logs:
            settings = make_settings(
                tmp_path, [direct_pool()], dns={"nameservers": [dns.address], "mx_port": busy.port}
            )
            async with App(settings) as app:
                await send(app.smtp_port, "skip", to=["u@skip.test"])
                await wait_until(lambda: bool(events_of(tmp_path, "Delivery")))
    finally:
        await busy.stop()
        await taker.stop()
    (delivery,) = events_of(tmp_path, "Delivery")
    assert delivery["mx_host"] == "mx-c.skip.test"
    a, b = delivery["tags"]["mx_skipped"].split("; ")
    assert a.startswith(f"mx-a.skip.test 127.0.0.16:{busy.port} 451 4.4.1 connection refused")
    assert b == f"mx-b.skip.test 127.0.0.17:{busy.port} 421 4.3.2 busy"
    passed = [e for e in logs if e["event"] == "MX host passed over"]
    assert [(e["mx_host"], e["log_level"]) for e in passed] == [
        ("mx-a.skip.test", "info"),
        ("mx-b.skip.test", "info"),
    ]
    assert passed[1]["reply"] == "421 4.3.2 busy" and passed[1]["address"] == f"127.0.0.17:{busy.port}"
