"""Issue 10 A: input that can never be delivered is refused in the dialogue, or, if an older version stored
it, bounced with an event; it never counts against a member. A pool of healthy members takes a burst of
undeliverable input of many kinds mixed with good mail: every good message arrives, no member is ejected."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

from postmux.admin.control import member_state
from postmux.app import App
from postmux.envelope import Envelope
from tests.security.client import RawClient
from tests.support import StartUpstream, make_settings, message, read_events, wait_until

GOOD_SENDER = "app@example.com"

# (MAIL argument, recipients): every one of these can be sent, and must arrive.
GOOD = [
    ("<app@example.com>", ["<user@dest.test>"]),
    ("<app@example.com> SMTPUTF8", ["<jörg@exämple.test>", "<用户@例子.测试>"]),
    ("<jörg@exämple.test> SMTPUTF8 BODY=8BITMIME", ["<user@dest.test>"]),
    ("<app@example.com>", ['<"john doe"@dest.test>', '<"a\\\\b"@dest.test>']),
    ('<"app@home.test"@example.com>', ["<user@dest.test>"]),
    ("<app@example.com>", ["<user@[127.0.0.1]>", "<user@[IPv6:::1]>"]),
    ("<>", ["<user@dest.test>"]),
    ("<app@example.com>", ["<first.last+tag@sub.dest.test>"]),
]

# Bad senders: refused at MAIL; the same session then sends good mail.
BAD_MAIL: list[str | bytes] = [
    "<jörg@exämple.test>",  # swaks --from 'jörg@exämple.test', no SMTPUTF8
    "<a\x01b@example.com>",
    "<a\tb@example.com>",
    "<app>",
    "<a\u00a0b@example.com> SMTPUTF8",
    b"<\xff\xfe@example.com> SMTPUTF8",
    "<app@example..com>",
    "<app@[192.0.2.300]>",
]

# (MAIL argument, bad recipient): refused at RCPT, next to a good recipient of the same message.
BAD_RCPT: list[tuple[str, str | bytes]] = [
    ("<app@example.com>", "<b@exämple.test>"),
    ("<app@example.com>", "<jörg@dest.test>"),
    ("<app@example.com>", "<>"),
    ("<app@example.com>", "<a\x01b@dest.test>"),
    ("<app@example.com>", "<a\x1bb@dest.test>"),
    ("<app@example.com>", "<a\u00a0b@dest.test>"),
    ("<app@example.com> SMTPUTF8", "<a\u00a0b@dest.test>"),
    ("<app@example.com> SMTPUTF8", "<a\u2003b@dest.test>"),
    ("<app@example.com> SMTPUTF8", "<a\u202eb@dest.test>"),
    ("<app@example.com> SMTPUTF8", b"<a\xc3b@dest.test>"),
    ("<app@example.com>", '<"user@evil.test">'),
    ("<app@example.com>", '<"user@evil.test"@dest.test>'),
    ("<app@example.com>", "<user@dest..test>"),
    ("<app@example.com>", "<user@-dest.test>"),
    ("<app@example.com>", "<user@dest_x.test>"),
    ("<app@example.com>", "<user@192.0.2.1>"),
    ("<app@example.com>", "<user@[192.0.2.256]>"),
    ("<app@example.com>", "<user@[IPv6:fe80::1%eth0]>"),
    ("<app@example.com>", "<user@[x-tag:anything]>"),
    ("<app@example.com> SMTPUTF8", "<user@\uff45xample.test>"),
    ("<app@example.com>", "<a b@dest.test>"),
    ("<app@example.com>", "<user%other.test@dest.test>"),
]

# What an older postmux stored without these checks (or any path around ingress): (sender, recipient,
# smtputf8, the enhanced code its bounce carries).
STORED: list[tuple[str, str, bool, str]] = [
    (GOOD_SENDER, "jörg@dest.test", False, "5.6.7"),
    (GOOD_SENDER, "", False, "5.1.3"),
    (GOOD_SENDER, '"user@evil.test"', False, "5.1.3"),
    (GOOD_SENDER, "a\x01b@dest.test", False, "5.1.3"),
    (GOOD_SENDER, "a\u00a0b@dest.test", True, "5.1.3"),
    (GOOD_SENDER, "a\u2003b@dest.test", False, "5.6.7"),
    ("a\x01b@example.com", "user@dest.test", False, "5.1.7"),
    ("jörg@exämple.test", "user@dest.test", False, "5.6.7"),
]

REFUSALS = ("501 5.1.3 ", "553 5.1.3 ", "553 5.6.7 ", "501 5.1.7 ", "553 5.1.7 ")


def _line(command: str, arg: str | bytes) -> bytes:
    return command.encode() + (arg if isinstance(arg, bytes) else arg.encode()) + b"\r\n"


async def _deliver(client: RawClient, test_id: str) -> None:
    assert (await client.cmd("DATA")).startswith("354")
    await client.send(message(test_id) + b".\r\n")
    assert (await client.reply()).startswith("250"), test_id


async def _good(port: int, mail: str, rcpts: list[str], test_id: str) -> None:
    client = await RawClient.connect(port)
    try:
        assert (await client.cmd("EHLO client.test")).startswith("250")
        assert (await client.cmd(f"MAIL FROM:{mail}")).startswith("250"), mail
        for rcpt in rcpts:
            assert (await client.cmd(f"RCPT TO:{rcpt}")).startswith("250"), rcpt
        await _deliver(client, test_id)
    finally:
        await client.close()


async def _bad_mail(port: int, mail: str | bytes, test_id: str) -> str:
    client = await RawClient.connect(port)
    try:
        assert (await client.cmd("EHLO client.test")).startswith("250")
        refused = await client.cmd(_line("MAIL FROM:", mail))
        # The session goes on: the client's good mail still goes through.
        assert (await client.cmd(f"MAIL FROM:<{GOOD_SENDER}>")).startswith("250")
        assert (await client.cmd("RCPT TO:<user@dest.test>")).startswith("250")
        await _deliver(client, test_id)
        return refused
    finally:
        await client.close()


async def _bad_rcpt(port: int, mail: str, rcpt: str | bytes, test_id: str) -> str:
    client = await RawClient.connect(port)
    try:
        assert (await client.cmd("EHLO client.test")).startswith("250")
        assert (await client.cmd(f"MAIL FROM:{mail}")).startswith("250")
        assert (await client.cmd("RCPT TO:<user@dest.test>")).startswith("250")
        refused = await client.cmd(_line("RCPT TO:", rcpt))
        await _deliver(client, test_id)
        return refused
    finally:
        await client.close()


async def test_a_burst_of_undeliverable_input_is_refused_or_bounced_and_never_hurts_a_healthy_pool(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    ups = [await upstream(n) for n in ("a", "b", "c")]
    pool = {
        "name": "default",
        "policy": "round_robin",
        "members": [{"name": u.name, "address": u.address} for u in ups],
        # Two local failures in a row eject a member: before issue 10, two unsendable addresses did.
        "health": {"consecutive_failures": 2, "consecutive_4xx": 2},
    }
    settings = make_settings(tmp_path, [pool])
    ids = (f"m{i}" for i in itertools.count())
    good_ids: list[str] = []
    refusals: list[tuple[object, str]] = []
    async with App(settings) as app:
        port = app.smtp_port
        sessions = []
        for _ in range(3):
            for mail, rcpts in GOOD:
                good_ids.append(next(ids))
                sessions.append(_good(port, mail, rcpts, good_ids[-1]))
            for bad in BAD_MAIL:
                good_ids.append(next(ids))
                sessions.append(_note(refusals, bad, _bad_mail(port, bad, good_ids[-1])))
            for mail, bad_rcpt in BAD_RCPT:
                good_ids.append(next(ids))
                sessions.append(_note(refusals, bad_rcpt, _bad_rcpt(port, mail, bad_rcpt, good_ids[-1])))
        stored_ids, queue_ids = [], []
        for sender, rcpt, smtputf8, _code in STORED:
            recipients = (rcpt, "user@dest.test") if sender == GOOD_SENDER else (rcpt,)
            stored_ids.append(next(ids))
            envelope = Envelope(sender, recipients, message(stored_ids[-1]), "127.0.0.1", smtputf8)
            queue_ids.append(await app.acceptor.accept(envelope))
        # A burst, within [smtp] max_connections_per_ip: every kind three times, 16 sessions at a time.
        room = asyncio.Semaphore(16)

        async def session(dialogue: Awaitable[None]) -> None:
            async with room:
                await dialogue

        await asyncio.wait_for(asyncio.gather(*(session(s) for s in sessions)), timeout=60)

        def arrived() -> set[str]:
            return {r.test_id for u in ups for r in u.received}

        await wait_until(lambda: set(good_ids) <= arrived(), timeout=30)
        # Stored mail: the sendable recipient arrives, the unsendable one bounces.
        stored_good = [i for i, (s, *_) in zip(stored_ids, STORED, strict=True) if s == GOOD_SENDER]
        await wait_until(lambda: set(stored_good) <= arrived(), timeout=30)
        await wait_until(lambda: len(_bounces(tmp_path, queue_ids)) >= len(STORED), timeout=30)
        now = app.clock()
        members = app.pools["default"].members
        states = {m.name: member_state(m, now, app.pools["default"].settings.slow_start) for m in members}
        counters = {m.name: (m.ejections, m.consecutive_failures, m.consecutive_4xx) for m in members}
    # Each bad input was refused in the dialogue, with a reply that says why (docs/security.md).
    assert len(refusals) == 3 * (len(BAD_MAIL) + len(BAD_RCPT))
    for bad, reply in refusals:
        assert reply.startswith(REFUSALS), (bad, reply)
    # Every good message arrived; nothing was held back by the bad input next to it.
    assert set(good_ids) <= {r.test_id for u in ups for r in u.received}
    # Each stored unsendable address bounced once, permanently, with the code that says why.
    bounces = _bounces(tmp_path, queue_ids)
    for message_id, (_, rcpt, _, code) in zip(queue_ids, STORED, strict=True):
        [bounce] = [b for b in bounces if b["id"] == message_id and b["recipient"] == rcpt]
        assert bounce["response"] == {"code": 553, "enhanced_code": code, "text": bounce["response"]["text"]}
    # No member was ejected or even counted a failure; no event says otherwise.
    assert states == {"a": "up", "b": "up", "c": "up"}
    assert counters == {"a": (0, 0, 0), "b": (0, 0, 0), "c": (0, 0, 0)}
    events = read_events(tmp_path / "events.jsonl")
    assert [e for e in events if e["type"] in ("MemberDown", "TransientFailure")] == []
    # Nothing unsendable reached a member: every address a member saw is one ingress would take.
    for u in ups:
        assert all("evil.test" not in c and "\x01" not in c and "\u00a0" not in c for c in u.commands)


async def _note(refusals: list[tuple[object, str]], bad: object, session: Awaitable[str]) -> None:
    refusals.append((bad, await session))


def _bounces(tmp_path: Path, message_ids: list[str]) -> list[dict[str, Any]]:
    wanted = set(message_ids)
    return [e for e in read_events(tmp_path / "events.jsonl") if e["type"] == "Bounce" and e["id"] in wanted]
