"""The pool's policies and health, end to end: real SMTP servers on loopback, postmux in the same loop."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import aiosmtplib
import pytest

from postmux.app import App
from postmux.passwords import hash_password
from postmux.testing import delay
from tests.support import (
    StartUpstream,
    Upstream,
    always,
    free_port,
    make_settings,
    message,
    read_events,
    send,
    send_many,
    wait_until,
)


def member(name: str, address: str, **extra: object) -> dict[str, object]:
    return {"name": name, "address": address, **extra}


def total_received(*ups: Upstream) -> int:
    return sum(len(u.received) for u in ups)


@pytest.mark.slow
async def test_weights_3_1_1_give_shares_within_5_points(tmp_path: Path) -> None:
    ups = [await Upstream(n).start() for n in ("a", "b", "c")]
    pool = {
        "name": "default",
        "policy": "weighted",
        # Room enough that no member is ever full: a full member is skipped (as nginx and HAProxy do),
        # which is the right thing for mail but would blur what this test measures.
        "members": [
            member(u.name, u.address, weight=w, max_connections=50)
            for u, w in zip(ups, (3, 1, 1), strict=True)
        ],
    }
    async with App(make_settings(tmp_path, [pool])) as app:
        n = 3000
        await send_many(app.smtp_port, [f"w{i}" for i in range(n)], concurrency=20)
        await wait_until(lambda: total_received(*ups) == n, timeout=60)
    shares = [len(u.received) / n for u in ups]
    for share, expected in zip(shares, (0.6, 0.2, 0.2), strict=True):
        assert abs(share - expected) <= 0.05, shares
    for u in ups:
        await u.stop()


async def test_refusing_member_is_ejected_and_its_share_moves(tmp_path: Path) -> None:
    a, b = await Upstream("a").start(), await Upstream("b").start()
    dead = f"127.0.0.1:{free_port()}"
    pool = {
        "name": "default",
        "policy": "round_robin",
        "members": [member("a", a.address), member("b", b.address), member("dead", dead)],
        "health": {"consecutive_failures": 3, "base_ejection_time": "1h"},
    }
    settings = make_settings(tmp_path, [pool])
    async with App(settings) as app:
        first = [f"r{i}" for i in range(60)]
        await send_many(app.smtp_port, first, concurrency=5)
        await wait_until(lambda: total_received(a, b) == 60)
        dead_member = app.pools["default"].member("dead")
        attempts_at_ejection = dead_member.attempts
        assert dead_member.ejected(app.clock())
        second = [f"s{i}" for i in range(90)]
        await send_many(app.smtp_port, second, concurrency=5)
        await wait_until(lambda: total_received(a, b) == 150)
        # Once ejected, the dead member gets no new attempts: a and b share everything.
        assert dead_member.attempts == attempts_at_ejection
        assert abs(len(a.received) - len(b.received)) <= 10
    events = read_events(tmp_path / "events.jsonl")
    downs = [e for e in events if e["type"] == "MemberDown"]
    assert [(e["pool"], e["member"]) for e in downs] == [("default", "dead")]
    failures = [e for e in events if e["type"] == "TransientFailure" and e["member"] == "dead"]
    assert failures and all(e["response"]["enhanced_code"] == "4.4.1" for e in failures)
    assert len(failures) == attempts_at_ejection
    for u in (a, b):
        await u.stop()


async def test_message_deferred_by_one_member_is_delivered_by_another(tmp_path: Path) -> None:
    deferring = await Upstream("deferring", always("451 4.7.1 greylisted, try again later")).start()
    good = await Upstream("good").start()
    pool = {
        "name": "default",
        "policy": "round_robin",
        "members": [member("deferring", deferring.address), member("good", good.address)],
        "health": {"consecutive_failures": 1000},
    }
    async with App(make_settings(tmp_path, [pool])) as app:
        await send_many(app.smtp_port, [f"d{i}" for i in range(20)], concurrency=4)
        await wait_until(lambda: len(good.received) == 20)
    assert deferring.received == []
    assert deferring.data_commands > 0
    events = read_events(tmp_path / "events.jsonl")
    deferred_ids = {e["id"] for e in events if e["type"] == "TransientFailure"}
    delivered = {e["id"]: e for e in events if e["type"] == "Delivery"}
    assert deferred_ids and deferred_ids <= set(delivered)
    for message_id in deferred_ids:
        assert delivered[message_id]["member"] == "good"
        assert delivered[message_id]["num_attempts"] == 2
    for u in (deferring, good):
        await u.stop()


async def test_5xx_gives_exactly_one_dsn_to_the_sender(tmp_path: Path) -> None:
    rejecting = await Upstream("rejecting", always("550 5.1.1 mailbox unavailable")).start()
    bounces = await Upstream("bounces").start()
    pools = [
        {"name": "default", "members": [member("rejecting", rejecting.address)]},
        # DSNs go to the sender's domain, routed here so the test can read them.
        {"name": "return", "members": [member("bounces", bounces.address)]},
    ]
    route = [{"match": {"recipient_domain": "example.com"}, "pool": "return"}]
    settings = make_settings(tmp_path, pools)
    settings = settings.model_copy(update={"route": tuple(make_route(r) for r in route)})
    async with App(settings) as app:
        await send(app.smtp_port, "b1", sender="app@example.com", to=["x@dest.test", "y@dest.test"])
        await wait_until(lambda: len(bounces.received) == 1)
        await asyncio.sleep(1.5)  # a second DSN, if there were one, would have come by now
        assert app.dispatcher.ready == 0
    assert len(bounces.received) == 1
    dsn = bounces.received[0]
    assert dsn.sender == "" and dsn.recipients == ["app@example.com"]
    assert b"multipart/report; report-type=delivery-status" in dsn.data
    assert b"Final-Recipient: rfc822; x@dest.test" in dsn.data
    assert b"Final-Recipient: rfc822; y@dest.test" in dsn.data
    assert b"Status: 5.1.1" in dsn.data
    assert b"X-Test-Id: b1" in dsn.data  # the original headers ride along
    events = read_events(tmp_path / "events.jsonl")
    assert sorted(e["recipient"] for e in events if e["type"] == "Bounce") == ["x@dest.test", "y@dest.test"]
    for u in (rejecting, bounces):
        await u.stop()


def make_route(data: dict[str, object]) -> object:
    from postmux.config import RouteSettings

    return RouteSettings.model_validate(data)


async def test_hash_policy_keeps_each_sender_domain_on_one_member(tmp_path: Path) -> None:
    ups = [await Upstream(n).start() for n in ("a", "b", "c")]
    pool = {
        "name": "default",
        "policy": "hash",
        "hash_key": "sender_domain",
        "members": [member(u.name, u.address) for u in ups],
    }
    domains = [f"sender{i}.example" for i in range(8)]
    async with App(make_settings(tmp_path, [pool])) as app:
        for round_ in range(5):
            for d in domains:
                await send(app.smtp_port, f"{d}-{round_}", sender=f"app@{d}")
        await wait_until(lambda: total_received(*ups) == 40)
    homes: dict[str, set[str]] = {}
    for u in ups:
        for r in u.received:
            homes.setdefault(r.sender.split("@")[1], set()).add(u.name)
    assert all(len(members) == 1 for members in homes.values()), homes
    assert len({next(iter(m)) for m in homes.values()}) >= 2  # the keys do spread over members
    for u in ups:
        await u.stop()


async def test_hash_policy_moves_only_the_keys_of_a_dead_member(tmp_path: Path) -> None:
    ups = [await Upstream(n).start() for n in ("a", "b", "c")]
    pool = {
        "name": "default",
        "policy": "hash",
        "members": [member(u.name, u.address) for u in ups],
        "health": {"consecutive_failures": 1, "base_ejection_time": "1h"},
    }
    domains = [f"s{i}.example" for i in range(12)]
    async with App(make_settings(tmp_path, [pool])) as app:
        for d in domains:
            await send(app.smtp_port, f"{d}-before", sender=f"app@{d}")
        await wait_until(lambda: total_received(*ups) == 12)
        before = {r.sender.split("@")[1]: u.name for u in ups for r in u.received}
        busiest = Counter(before.values()).most_common(1)[0][0]
        victim = next(u for u in ups if u.name == busiest)
        await victim.stop()
        for d in domains:
            await send(app.smtp_port, f"{d}-after", sender=f"app@{d}")
        await wait_until(lambda: total_received(*ups) == 24)
    after = {r.sender.split("@")[1]: u.name for u in ups for r in u.received if r.test_id.endswith("after")}
    for d in domains:
        if before[d] != victim.name:
            assert after[d] == before[d], (d, before[d], after[d])
        else:
            assert after[d] != victim.name
    for u in ups:
        await u.stop()


async def test_priority_pool_uses_backup_only_while_primaries_are_down(tmp_path: Path) -> None:
    p1, p2, backup = [await Upstream(n).start() for n in ("p1", "p2", "backup")]
    pool = {
        "name": "default",
        "policy": "priority",
        "members": [
            member("p1", p1.address),
            member("p2", p2.address),
            member("backup", backup.address, backup=True),
        ],
        "health": {"consecutive_failures": 2, "base_ejection_time": "1s", "max_ejection_time": "1s"},
    }
    async with App(make_settings(tmp_path, [pool])) as app:
        await send_many(app.smtp_port, [f"up{i}" for i in range(30)], concurrency=3)
        await wait_until(lambda: total_received(p1, p2) == 30)
        assert backup.received == []

        ports = (p1.port, p2.port)
        await p1.stop()
        await p2.stop()
        await send_many(app.smtp_port, [f"down{i}" for i in range(30)], concurrency=3)
        await wait_until(lambda: len(backup.received) == 30)

        await p1.start(port=ports[0])
        await p2.start(port=ports[1])
        await asyncio.sleep(1.2)  # the ejection (1 s) runs out; the primaries are picked again
        await send_many(app.smtp_port, [f"back{i}" for i in range(30)], concurrency=3)
        await wait_until(lambda: sum(r.test_id.startswith("back") for r in p1.received + p2.received) == 30)
    assert {r.test_id[:4] for r in backup.received} == {"down"}
    for u in (p1, p2, backup):
        await u.stop()


async def test_in_panic_a_healthy_backup_tier_takes_the_mail_and_the_dead_primaries_none(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    ups = {n: await upstream(n) for n in ("a", "b", "c1", "c2", "c3")}
    for name in ("a", "b", "c2", "c3"):
        ups[name].greeting_refusal = "421 4.3.2 busy"
    pool = {
        "name": "default",
        "policy": "round_robin",
        "members": [member(n, u.address, backup=n.startswith("c")) for n, u in ups.items()],
        "check": {"enabled": True, "interval": "0.2s", "rise": 1, "fall": 1},
    }
    async with App(make_settings(tmp_path, [pool])) as app:
        p = app.pools["default"]
        down = [p.member(n) for n in ("a", "b", "c2", "c3")]
        await wait_until(lambda: not any(m.check_up for m in down))
        assert p.in_panic(app.clock())  # 0/2 + 1/3 healthy, below the default 0.5
        await send_many(app.smtp_port, [f"p{i}" for i in range(12)], concurrency=3)
        await wait_until(lambda: len(ups["c1"].received) == 12, timeout=20)
        # Envoy's model: no traffic to a tier without a healthy member while another has one; within the
        # backup tier, panic spreads the load over all of it rather than piling it on c1 alone.
        assert (p.member("a").attempts, p.member("b").attempts) == (0, 0)
        assert p.member("c2").attempts + p.member("c3").attempts > 0


async def test_least_latency_counts_a_data_timeout_as_a_slow_attempt_and_turns_to_the_other_member(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    slow, fast = await upstream("slow", delay(0.1)), await upstream("fast")
    pool = {
        "name": "default",
        "policy": "least_latency",
        "members": [member("slow", slow.address), member("fast", fast.address)],
    }
    delivery = {"data_timeout": "1s"}
    async with App(make_settings(tmp_path, [pool], delivery=delivery)) as app:
        p = app.pools["default"]
        for i in range(4):  # both measured: "fast" answers at once, so it wins every pair from then on
            await send(app.smtp_port, f"warm{i}")
            await wait_until(lambda i=i: len(slow.received) + len(fast.received) == i + 1)
        assert len(fast.received) >= 2 and p.member("fast").ewma_latency_s < 0.1
        fast.behaviour = delay(3)  # now it hangs past data_timeout
        await send(app.smtp_port, "hung")
        await wait_until(lambda: p.member("fast").consecutive_failures == 1, timeout=5)
        # configuration.md, Latency average: a timeout counts as a very slow attempt.
        assert p.member("fast").ewma_latency_s >= 0.9
        attempts = p.member("fast").attempts
        for i in range(4):
            await send(app.smtp_port, f"after{i}")
            await wait_until(lambda i=i: f"after{i}" in {r.test_id for r in slow.received}, timeout=5)
        assert p.member("fast").attempts == attempts  # the pairs go to the member that answers


async def test_pool_header_routes_the_message_and_never_reaches_the_member(tmp_path: Path) -> None:
    main, bulk = await Upstream("main").start(), await Upstream("bulk").start()
    pools = [
        {"name": "default", "members": [member("main", main.address)]},
        {"name": "bulk", "members": [member("bulk", bulk.address)]},
    ]
    settings = make_settings(tmp_path, pools)
    route = make_route({"match": {"pool_header": "Bulk"}, "pool": "bulk"})
    settings = settings.model_copy(update={"route": (route,)})
    async with App(settings) as app:
        for test_id, header in (("h1", "bulk"), ("h2", "other"), ("h3", "")):
            data = message(test_id)
            if header:
                data = data.replace(b"Subject:", f"X-Postmux-Pool: {header}\r\nSubject:".encode(), 1)
            await aiosmtplib.send(
                data,
                sender="app@example.com",
                recipients=["u@dest.test"],
                hostname="127.0.0.1",
                port=app.smtp_port,
                local_hostname="client.test",
            )
        await wait_until(lambda: total_received(main, bulk) == 3)
    assert [r.test_id for r in bulk.received] == ["h1"]
    assert sorted(r.test_id for r in main.received) == ["h2", "h3"]
    assert all(b"x-postmux-pool" not in r.data.lower() for r in main.received + bulk.received)
    for u in (main, bulk):
        await u.stop()


async def test_each_route_kind_picks_its_pool_first_match_winning(tmp_path: Path) -> None:
    names = ("default", "by_sender", "by_recipient", "by_network", "by_header")
    ups = {n: await Upstream(n).start() for n in names}
    pools = [{"name": n, "members": [member(n, ups[n].address)]} for n in names]
    routes = [
        make_route({"match": {"pool_header": "urgent"}, "pool": "by_header"}),
        make_route({"match": {"sender_domain": "news.example.com"}, "pool": "by_sender"}),
        make_route({"match": {"recipient_domain": "corp.test"}, "pool": "by_recipient"}),
        make_route({"match": {"client_network": "127.0.0.9/32"}, "pool": "by_network"}),
    ]
    settings = make_settings(tmp_path, pools).model_copy(update={"route": tuple(routes)})
    async with App(settings) as app:
        port = app.smtp_port
        await send(port, "sender", sender="x@news.example.com")
        await send(port, "recipient", to=["boss@corp.test"])
        await send(port, "network", source_address="127.0.0.9")
        await send(port, "header", sender="x@news.example.com", headers="X-Postmux-Pool: Urgent\r\n")
        await send(port, "rest")
        await wait_until(lambda: sum(len(u.received) for u in ups.values()) == 5)
    got = {name: [r.test_id for r in u.received] for name, u in ups.items()}
    assert got == {
        "default": ["rest"],
        "by_sender": ["sender"],
        "by_recipient": ["recipient"],
        "by_network": ["network"],
        "by_header": ["header"],  # the first matching rule wins over the sender rule below it
    }
    assert all(b"x-postmux-pool" not in r.data.lower() for u in ups.values() for r in u.received)
    for u in ups.values():
        await u.stop()


async def test_a_route_on_the_authenticated_user_picks_its_pool(tmp_path: Path) -> None:
    main, billing = await Upstream("main").start(), await Upstream("billing").start()
    pools = [
        {"name": "default", "members": [member("main", main.address)]},
        {"name": "billing", "members": [member("billing", billing.address)]},
    ]
    smtp = {
        "users": [{"name": "billing-app", "password_hash": hash_password("pw", n=2**10)}],
        "auth_require_tls": False,  # loopback only; the TLS cases are in tests/security
    }
    settings = make_settings(tmp_path, pools, smtp=smtp)
    route = make_route({"match": {"auth_user": "billing-app"}, "pool": "billing"})
    settings = settings.model_copy(update={"route": (route,)})
    async with App(settings) as app:
        client = aiosmtplib.SMTP(
            hostname="127.0.0.1", port=app.smtp_port, local_hostname="client.test", start_tls=False
        )
        await client.connect()
        await client.login("billing-app", "pw")
        await client.sendmail("app@example.com", ["u@dest.test"], message("authed"))
        await client.quit()
        await send(app.smtp_port, "anonymous")  # a trusted network, no AUTH: the default pool
        await wait_until(lambda: total_received(main, billing) == 2)
    assert [r.test_id for r in billing.received] == ["authed"]
    assert [r.test_id for r in main.received] == ["anonymous"]
    for u in (main, billing):
        await u.stop()
