"""A crash in postmux's own code during an attempt is the message's fault: never the member's, and a message
that keeps crashing it is held (kept, not retried) until an operator releases it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from postmux.app import App
from postmux.attempt import AttemptOutcome, Transaction
from postmux.balancing.pool import Pool
from postmux.cli import app as cli
from postmux.config import Settings
from postmux.delivery.smtp_client import SmtpTransport
from tests.support import (
    StartUpstream,
    Upstream,
    always,
    make_settings,
    read_events,
    send,
    wait_until,
)

TOKEN = "t0ken-for-the-tests-only"


def pools(*members: Upstream) -> list[dict[str, Any]]:
    # One local failure ejects a member, and every member may be ejected: a crash counted against a
    # member would take it out at once.
    health = {"consecutive_failures": 1, "max_ejection_percent": 100}
    return [
        {
            "name": "default",
            "policy": "round_robin",
            "members": [{"name": u.name, "address": u.address} for u in members],
            "health": health,
        }
    ]


def assert_untouched(pool: Pool) -> None:
    """No member was ejected, nor did its failure counters hear of the crashes."""
    for m in pool.members:
        assert (m.consecutive_failures, m.ejections, m.last_error) == (0, 0, ""), m.name
        assert m.window_attempts == m.window_successes, m.name


def events_of(tmp_path: Path, kind: str, message_id: str) -> list[dict[str, Any]]:
    return [e for e in read_events(tmp_path / "events.jsonl") if e["type"] == kind and e["id"] == message_id]


async def held(app: App) -> int:
    return (await app.spool.counts())["held"]


# Which senders' mail meets the bug, and how often each sender's mail was tried (across restarts).
BROKEN_FOR: set[str] = set()
TRIES: dict[str, int] = {}


class CrashingTransport(SmtpTransport):
    """The real transport, with a bug that only one sender's mail meets: postmux's own code raising."""

    async def deliver(self, work: Transaction, *, per_connection: int | None = None) -> AttemptOutcome:
        TRIES[work.sender] = TRIES.get(work.sender, 0) + 1
        if work.sender in BROKEN_FOR:
            raise RuntimeError("a bug that this message meets")
        return await super().deliver(work, per_connection=per_connection)


def crashing(app: App, settings: Settings) -> App:
    """The app (not started yet: its transports have sent nothing) with crashing transports."""
    for (pool, name), old in list(app.transports.items()):
        member = next(m for m in app.pools[pool].members if m.name == name)
        app.transports[(pool, name)] = CrashingTransport(member.settings, settings.delivery, "postmux.test")
        assert old.connections == 0
    return app


async def test_messages_that_crash_our_sending_code_are_held_and_no_member_is_ejected(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    a, b = await upstream("a"), await upstream("b")
    settings = make_settings(tmp_path, pools(a, b), retry={"intervals": ["200ms"], "max_local_errors": 3})
    # Addresses our client cannot encode no longer crash it (they bounce, tests/security/
    # test_undeliverable_input.py): a bug that some messages meet stands for whatever crash is left.
    bad = [f"bad-{i}@example.com" for i in range(4)]
    BROKEN_FOR.clear()
    BROKEN_FOR.update(bad)
    async with crashing(App(settings), settings) as app:
        for sender in bad:
            await send(app.smtp_port, sender, sender=sender)
        good = [f"good-{i}" for i in range(10)]
        for test_id in good:
            await send(app.smtp_port, test_id)
        await wait_until(lambda: len(a.received) + len(b.received) == len(good), timeout=15)

        async def all_held() -> None:
            while await held(app) < len(bad):
                await asyncio.sleep(0.05)

        await asyncio.wait_for(all_held(), timeout=15)
        assert_untouched(app.pools["default"])
        await wait_until(lambda: app._queue_counts.get("held") == len(bad), timeout=10)
        metrics = app.metrics.render().decode()
    BROKEN_FOR.clear()
    assert 'postmux_messages_held_total{reason="local_error"} 4.0' in metrics
    assert 'postmux_queue_messages{state="held"} 4.0' in metrics
    assert sorted(r.test_id for r in a.received + b.received) == sorted(good)
    events = read_events(tmp_path / "events.jsonl")
    assert not [e for e in events if e["type"] == "MemberDown"]
    for sender in bad:
        message_id = next(e["id"] for e in events if e["type"] == "Reception" and e["sender"] == sender)
        [hold] = events_of(tmp_path, "Held", message_id)
        assert hold["tags"]["reason"] == "local_error"
        assert hold["tags"]["error"] == "RuntimeError: a bug that this message meets"
        assert hold["response"]["code"] == 451 and hold["num_attempts"] == 3
        # The two crashes before: deferrals that name the error, the second after a round's wait.
        deferrals = events_of(tmp_path, "TransientFailure", message_id)
        assert [e["tags"]["local_error"] for e in deferrals] == ["RuntimeError"] * 2


async def test_a_held_message_stays_held_across_restarts_until_release_makes_it_deliverable(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    up = await upstream("only")
    settings = make_settings(
        tmp_path,
        pools(up),
        retry={"intervals": ["1h"], "max_age": "1d", "max_local_errors": 2},
        http={"admin_token": TOKEN},
    )
    BROKEN_FOR.clear()
    BROKEN_FOR.add("bad@example.com")
    TRIES.clear()

    async with crashing(App(settings), settings) as app:
        await send(app.smtp_port, "bad", sender="bad@example.com")
        await send(app.smtp_port, "good-1")
        await wait_until(lambda: len(up.received) == 1, timeout=10)
        await wait_until(lambda: TRIES.get("bad@example.com") == 1, timeout=10)
        assert_untouched(app.pools["default"])
    events = read_events(tmp_path / "events.jsonl")
    bad_id = next(e["id"] for e in events if e["type"] == "Reception" and e["sender"] == "bad@example.com")

    # The count of crashes in a row is stored: the second one, after the restart, holds the message.
    # Restarted two hours on: the deferred message is due again.
    async with crashing(App(settings, clock=lambda: time.time() + 7200), settings) as app:

        async def is_held() -> None:
            while await held(app) != 1:
                await asyncio.sleep(0.05)

        await asyncio.wait_for(is_held(), timeout=10)
        assert TRIES["bad@example.com"] == 2
        assert_untouched(app.pools["default"])

    async with crashing(App(settings, clock=lambda: time.time() + 3 * 3600), settings) as app:
        assert app.recovered == 0 and await held(app) == 1
        await send(app.smtp_port, "good-2")
        await wait_until(lambda: len(up.received) == 2, timeout=10)
        app.dispatcher.scan_soon()
        await send(app.smtp_port, "good-3")
        await wait_until(lambda: len(up.received) == 3, timeout=10)
        assert TRIES["bad@example.com"] == 2  # held: not tried again
        assert await held(app) == 1

        BROKEN_FOR.clear()  # the operator fixed the bug
        url = ["--url", f"http://127.0.0.1:{app.http_port}", "--token", TOKEN]

        def run(*args: str) -> tuple[int, str, str]:
            result = CliRunner().invoke(cli, [*args, *url])
            return result.exit_code, result.stdout, result.stderr

        code, _, err = await asyncio.to_thread(run, "release", "no/such?id")
        assert code == 1 and "no held message with id 'no/such?id'" in err
        code, out, _ = await asyncio.to_thread(run, "release", bad_id)
        assert code == 0 and f"{bad_id}: 1 released" in out
        await wait_until(lambda: any(r.test_id == "bad" for r in up.received), timeout=10)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}/api/v1") as client:
            again = await client.post(
                f"/messages/{bad_id}/release", headers={"Authorization": f"Bearer {TOKEN}"}
            )
        assert again.status_code == 404
        assert_untouched(app.pools["default"])
    assert [e["type"] for e in events_of(tmp_path, "Held", bad_id)] == ["Held"]
    assert events_of(tmp_path, "Delivery", bad_id)
    assert not [e for e in read_events(tmp_path / "events.jsonl") if e["type"] == "MemberDown"]


async def test_a_crash_while_recording_an_outcome_requeues_the_work_and_holds_it_after_max_local_errors(
    tmp_path: Path, upstream: StartUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    from postmux.scheduling import verdicts

    refusing = await upstream("refusing", behaviour=always("550 5.1.1 no such user"))
    settings = make_settings(tmp_path, pools(refusing), retry={"intervals": ["100ms"], "max_local_errors": 2})

    def broken_dsn(**kwargs: Any) -> Any:
        raise RuntimeError("a bug in building the DSN")

    # The bounce's DSN is built while the outcome is decided: a bug there used to leave the work leased
    # (neither retried nor held) until the next restart.
    monkeypatch.setattr(verdicts, "build_dsn", broken_dsn)
    async with App(settings) as app:
        await send(app.smtp_port, "refused")

        async def is_held() -> None:
            while await held(app) != 1:
                await asyncio.sleep(0.05)

        await asyncio.wait_for(is_held(), timeout=10)
        assert refusing.data_commands == 2  # tried once more after the first crash, then set aside
        assert (await app.spool.counts())["leased"] == 0
    [hold] = [e for e in read_events(tmp_path / "events.jsonl") if e["type"] == "Held"]
    assert hold["tags"]["error"] == "RuntimeError: a bug in building the DSN"
