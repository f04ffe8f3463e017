"""Deferral, retry at the configured intervals, and expiry with one DSN."""

from __future__ import annotations

import email
import sqlite3
import time
from email import policy
from pathlib import Path

from postmux.app import App
from postmux.config import RouteSettings
from tests.support import Upstream, always, make_settings, read_events, send, wait_until


async def test_deferred_message_is_retried_then_expires_with_one_dsn(tmp_path: Path) -> None:
    deferring = await Upstream("deferring", always("421 4.7.0 too busy, come back later")).start()
    bounces = await Upstream("bounces").start()
    pools = [
        {
            "name": "default",
            "members": [{"name": "deferring", "address": deferring.address}],
            "health": {"consecutive_failures": 1000},
        },
        {"name": "return", "members": [{"name": "bounces", "address": bounces.address}]},
    ]
    settings = make_settings(tmp_path, pools, retry={"intervals": ["300ms"], "max_age": "2s", "jitter": 0})
    route = RouteSettings.model_validate({"match": {"recipient_domain": "example.com"}, "pool": "return"})
    settings = settings.model_copy(update={"route": (route,)})
    async with App(settings) as app:
        await send(app.smtp_port, "e1", sender="app@example.com")
        await wait_until(lambda: len(bounces.received) == 1, timeout=10)
        assert deferring.data_commands >= 3  # retried at its intervals before giving up
    [dsn] = bounces.received
    report = email.message_from_bytes(dsn.data, policy=policy.default)
    assert report.get_content_type() == "multipart/report"
    assert b"Status: 4.4.7" in dsn.data  # RFC 3463: delivery time expired
    events = read_events(tmp_path / "events.jsonl")
    kinds = [e["type"] for e in events if e["recipient"] == "user@dest.test"]
    assert kinds[0] == "Reception" and kinds[-1] == "Expiration"
    assert kinds.count("TransientFailure") == deferring.data_commands
    for u in (deferring, bounces):
        await u.stop()


async def test_an_expiry_dsn_gives_each_recipient_its_own_reply_from_the_remote_server(
    tmp_path: Path,
) -> None:
    # Review 5: the relay said something different to each recipient; the DSN and the Expiration events
    # must tell each its own (RFC 3464 2.3.6), as the relay's replies (Remote-MTA, smtp; Diagnostic-Code).
    relay = await Upstream("relay").start()
    relay.rcpt_refusals["full@dest.test"] = "452 4.2.2 <full@dest.test>: mailbox full"
    relay.rcpt_refusals["grey@dest.test"] = "451 4.7.1 <grey@dest.test>: greylisted"
    bounces = await Upstream("bounces").start()
    pools = [
        {
            "name": "default",
            "members": [{"name": "relay", "address": relay.address}],
            "health": {"consecutive_4xx": 1000},
        },
        {"name": "return", "members": [{"name": "bounces", "address": bounces.address}]},
    ]
    settings = make_settings(tmp_path, pools, retry={"intervals": ["300ms"], "max_age": "1s", "jitter": 0})
    route = RouteSettings.model_validate({"match": {"recipient_domain": "example.com"}, "pool": "return"})
    settings = settings.model_copy(update={"route": (route,)})
    async with App(settings) as app:
        await send(app.smtp_port, "e2", sender="app@example.com", to=["full@dest.test", "grey@dest.test"])
        await wait_until(lambda: len(bounces.received) == 1, timeout=10)
    [dsn] = bounces.received
    report = email.message_from_bytes(dsn.data, policy=policy.default)
    status = report.get_payload()[1].get_payload()  # type: ignore[index, union-attr]
    groups = {str(g["Final-Recipient"]): g for g in status[1:]}
    assert (
        groups["rfc822; full@dest.test"]["Diagnostic-Code"]
        == "smtp; 452 4.2.2 <full@dest.test>: mailbox full"
    )
    assert (
        groups["rfc822; grey@dest.test"]["Diagnostic-Code"] == "smtp; 451 4.7.1 <grey@dest.test>: greylisted"
    )
    assert {str(g["Remote-MTA"]) for g in groups.values()} == {"dns; 127.0.0.1"}  # RFC 3464 2.3.5: no port
    assert b"reported by this mail system" not in dsn.data
    expired = {
        e["recipient"]: e["response"]["text"]
        for e in read_events(tmp_path / "events.jsonl")
        if e["type"] == "Expiration"
    }
    assert expired == {
        "full@dest.test": "<full@dest.test>: mailbox full",
        "grey@dest.test": "<grey@dest.test>: greylisted",
    }
    for u in (relay, bounces):
        await u.stop()


async def test_deferral_waits_for_the_interval_when_no_other_member_is_left(tmp_path: Path) -> None:
    flip = {"fail": True}

    async def first_fails(up: Upstream, env: object) -> str | None:
        return "451 4.3.0 later" if flip["fail"] else None

    up = await Upstream("only", first_fails).start()
    pools = [{"name": "default", "members": [{"name": "only", "address": up.address}]}]
    settings = make_settings(tmp_path, pools, retry={"intervals": ["1s"], "max_age": "1h", "jitter": 0})
    async with App(settings) as app:
        await send(app.smtp_port, "r1")
        await wait_until(lambda: up.data_commands == 1)
        flip["fail"] = False
        await wait_until(lambda: len(up.received) == 1, timeout=5)
    events = read_events(tmp_path / "events.jsonl")
    failed = next(e for e in events if e["type"] == "TransientFailure")
    delivered = next(e for e in events if e["type"] == "Delivery")
    assert 0.9 <= delivered["timestamp"] - failed["timestamp"] <= 2.5
    assert delivered["num_attempts"] == 2
    await up.stop()


def _recipient_row(db: Path) -> tuple[str, float, int]:
    conn = sqlite3.connect(db)
    try:
        row = conn.execute("SELECT state, due, attempts FROM recipient").fetchone()
    finally:
        conn.close()
    return (str(row[0]), float(row[1]), int(row[2])) if row else ("", 0.0, 0)


async def test_each_round_through_every_member_waits_the_next_interval_not_one_per_member(
    tmp_path: Path,
) -> None:
    # Three members refuse: a round tries each once, then the work waits. The first wait is intervals[0]
    # (5 s), the second intervals[1] (60 s); counting members tried, the first wait was intervals[2].
    refusing = [await Upstream(n, always("451 4.7.0 try again later")).start() for n in ("a", "b", "c")]
    pools = [
        {
            "name": "default",
            "policy": "round_robin",
            "members": [{"name": u.name, "address": u.address} for u in refusing],
            "health": {"consecutive_4xx": 1000},
        }
    ]
    settings = make_settings(
        tmp_path, pools, retry={"intervals": ["5s", "60s", "120s"], "max_age": "1d", "jitter": 0}
    )
    now = [time.time()]
    start = now[0]
    db = tmp_path / "spool.db"

    def waiting_after(tries: int) -> bool:
        state, _, attempts = _recipient_row(db)
        return state == "queued" and attempts == tries

    async with App(settings, clock=lambda: now[0]) as app:
        await send(app.smtp_port, "rounds")
        await wait_until(lambda: waiting_after(3), timeout=10)
        assert [u.data_commands for u in refusing] == [1, 1, 1]
        assert _recipient_row(db)[1] == start + 5
        now[0] = start + 5  # due: the second round
        app.dispatcher.scan_soon()
        await wait_until(lambda: waiting_after(6), timeout=10)
        assert [u.data_commands for u in refusing] == [2, 2, 2]
        assert _recipient_row(db)[1] == start + 5 + 60
        now[0] = start + 65
        app.dispatcher.scan_soon()
        await wait_until(lambda: waiting_after(9), timeout=10)
        assert _recipient_row(db)[1] == start + 65 + 120
    events = read_events(tmp_path / "events.jsonl")
    tries = [e["num_attempts"] for e in events if e["type"] == "TransientFailure"]
    assert tries == list(range(1, 10))  # events still count attempts, one per member tried
    for u in refusing:
        await u.stop()
