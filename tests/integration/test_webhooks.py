"""Webhooks end to end in one process: a running node posts its events to a receiver on loopback, signed,
in order per message, retried until acknowledged, kept across a restart; `postmux webhooks` and the
metrics say how each endpoint is doing; with no endpoint nothing is written at all."""

from __future__ import annotations

import asyncio
import base64
import re
import sqlite3
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import pytest

from postmux.app import App
from postmux.config import Settings, load_config, settings_from_dict
from postmux.events.types import Event, EventType
from tests.integration.test_operator_control import body, cli_runner
from tests.support import StartUpstream, always, send, wait_until
from tests.webhook_receiver import FAIL, Receiver, first_fail

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()
TOKEN = "t0ken-for-the-tests-only"


def settings(tmp_path: Path, member: str, webhooks: list[dict[str, Any]], retry: str = "1s") -> Settings:
    return settings_from_dict(
        {
            "smtp": {"listen": "127.0.0.1:0", "hostname": "postmux.test"},
            "http": {"listen": "127.0.0.1:0", "admin_token": TOKEN},
            "spool": {"path": str(tmp_path / "spool.db")},
            "events": {"log": str(tmp_path / "events.jsonl")},
            "retry": {"intervals": [retry], "max_age": "1h", "jitter": 0},
            "pool": [{"name": "default", "members": [{"name": "up", "address": member}]}],
            "webhook": webhooks,
        }
    )


def hook(receiver: Receiver, name: str, **keys: Any) -> dict[str, Any]:
    return {"name": name, "url": receiver.url(f"/{name}"), "secret": SECRET, **keys}


def by_message(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        out[r["id"]].append(r)
    return out


async def test_every_message_event_reaches_the_endpoint_signed_and_in_order(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    up = await upstream("up")
    receiver = await Receiver(secret=SECRET).start()
    try:
        cfg = settings(
            tmp_path,
            up.address,
            [
                hook(receiver, "each"),
                hook(receiver, "batched", batch_size=50, batch_wait="200ms", events=["Delivery"]),
            ],
        )
        async with App(cfg) as app:
            ids = [await send(app.smtp_port, f"m{i}", to=["a@dest.test", "b@dest.test"]) for i in range(3)]
            await wait_until(lambda: len(receiver.records("/each")) >= 12, timeout=10)
            await wait_until(lambda: len(receiver.records("/batched")) >= 6, timeout=10)
        assert receiver.bad_signatures == []
        each = receiver.records("/each")
        assert all(not a.as_array for a in receiver.arrivals if a.path == "/each")
        assert all(a.as_array for a in receiver.arrivals if a.path == "/batched")
        # One record per request: the request's webhook-id is the record's event_id (stable on retries).
        assert all(a.webhook_id == a.records[0]["event_id"] for a in receiver.arrivals if a.path == "/each")
        queue_ids = {re.search(r"queued as (\S+)", text).group(1) for text in ids}  # type: ignore[union-attr]
        messages = by_message(each)
        assert set(messages) == queue_ids
        for records in messages.values():
            kinds = [(r["type"], r["recipient"]) for r in records]
            assert sorted(kinds) == sorted(
                [(t, rcpt) for t in ("Reception", "Delivery") for rcpt in ("a@dest.test", "b@dest.test")]
            )
            assert [r["type"] for r in records[:2]] == ["Reception", "Reception"]  # before any outcome
        assert {r["type"] for r in receiver.records("/batched")} == {"Delivery"}
    finally:
        await receiver.stop()


async def test_failed_requests_are_retried_until_acknowledged_and_shown_meanwhile(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    up = await upstream("up")
    receiver = await Receiver(secret=SECRET, decide=first_fail(4)).start()
    try:
        cfg = settings(
            tmp_path, up.address, [hook(receiver, "slow", min_backoff="50ms", max_backoff="200ms")]
        )
        async with App(cfg) as app:
            await send(app.smtp_port, "m1")
            await wait_until(lambda: receiver.requests >= 2, timeout=10)
            run = cli_runner(app)
            code, out, _ = await run("webhooks")  # type: ignore[operator]
            assert code == 0
            [shown] = body(out)["webhooks"]
            assert shown["endpoint"] == "slow" and shown["configured"] is True
            assert shown["backlog"] >= 1 and shown["oldest_pending_age_s"] is not None
            assert shown["last_error"].startswith("HTTP 5") and shown["failures_in_a_row"] >= 1
            await wait_until(lambda: len(receiver.records()) >= 2, timeout=10)
            await wait_until(lambda: app.webhooks.senders["slow"].state.failures == 0, timeout=5)

            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}") as client:

                async def drained() -> dict[str, Any]:
                    answer = await client.get(
                        "/api/v1/webhooks", headers={"Authorization": f"Bearer {TOKEN}"}
                    )
                    [status] = answer.json()["webhooks"]
                    return status  # type: ignore[no-any-return]

                for _ in range(100):
                    status = await drained()
                    if status["backlog"] == 0:
                        break
                    await asyncio.sleep(0.05)
                assert status["backlog"] == 0 and status["last_success_age_s"] is not None
                metrics = (await client.get("/metrics")).text
        assert 'postmux_webhook_requests_total{endpoint="slow",result="5xx"} 4.0' in metrics
        assert 'postmux_webhook_requests_total{endpoint="slow",result="2xx"} 2.0' in metrics
        assert re.search(r'postmux_webhook_backlog\{endpoint="slow"\} \d', metrics)
        assert [r["type"] for r in receiver.records()] == ["Reception", "Delivery"]
    finally:
        await receiver.stop()


async def test_events_wait_in_the_spool_across_a_restart_until_the_endpoint_answers(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    up = await upstream("up")
    receiver = Receiver(secret=SECRET)
    await receiver.start()
    url_port = receiver.port
    await receiver.stop()  # nobody listens: connections are refused
    cfg = settings(tmp_path, up.address, [hook(receiver, "later", min_backoff="50ms", max_backoff="100ms")])
    async with App(cfg) as app:
        await send(app.smtp_port, "m1")
        await wait_until(lambda: len(up.received) == 1, timeout=10)
        await wait_until(lambda: app.webhooks.senders["later"].state.failures >= 2, timeout=10)
        assert "ConnectError" in app.webhooks.senders["later"].state.last_error
    again = Receiver(secret=SECRET, port=url_port)
    await again.start()
    try:
        async with App(cfg):
            await wait_until(lambda: len(again.records()) >= 2, timeout=10)
        assert [r["type"] for r in again.records()] == ["Reception", "Delivery"]
    finally:
        await again.stop()


async def test_with_no_webhook_nothing_is_written_to_the_outbox(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    up = await upstream("up")
    async with App(settings(tmp_path, up.address, [])) as app:
        await send(app.smtp_port, "m1", to=["a@dest.test", "b@dest.test"])
        await wait_until(lambda: len(up.received) == 1, timeout=10)
        assert await app.spool.outbox_backlog() == []
        assert app.webhooks.senders == {}


async def test_a_changed_webhook_needs_a_restart_and_the_running_one_goes_on(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    up = await upstream("up")
    cfg = tmp_path / "postmux.toml"
    text = f"""
[smtp]
listen = "127.0.0.1:0"
[http]
listen = "127.0.0.1:0"
[spool]
path = "{tmp_path / "spool.db"}"
[events]
log = "{tmp_path / "events.jsonl"}"
[[pool]]
name = "default"
members = [{{ name = "up", address = "{up.address}" }}]
[[webhook]]
name = "hooks"
url = "http://127.0.0.1:9/one"
"""
    cfg.write_text(text)
    async with App(load_config(cfg), config_path=cfg) as app:
        cfg.write_text(text.replace("/one", "/two"))
        result = app.control.reload()
        assert result.ok and result.needs_restart == ["webhook"]
        assert app.webhooks.senders["hooks"].settings.url == "http://127.0.0.1:9/one"
        assert app.settings.webhook[0].url == "http://127.0.0.1:9/one"


async def test_events_only_the_bus_brings_are_appended_once_and_those_with_their_change_not_again(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    up = await upstream("up")
    receiver = await Receiver(secret=SECRET).start()
    try:
        events = ["Reception", "Delivery", "Bounce", "MemberDown"]
        cfg = settings(tmp_path, up.address, [hook(receiver, "ops", events=events)])
        async with App(cfg) as app:
            await send(app.smtp_port, "m1")
            await wait_until(lambda: len(receiver.records()) >= 2, timeout=10)
            # An operator's action (a path that hands no rows to the spool) and a member event.
            app.bus.emit(Event(EventType.BOUNCE, id="by-operator", recipient="x@dest.test"))
            app.bus.emit(Event(EventType.MEMBER_DOWN, pool="default", member="up"))
            app.bus.emit(Event(EventType.MEMBER_UP, pool="default", member="up"))  # not asked for
            await wait_until(lambda: len(receiver.records()) >= 4, timeout=10)
            await asyncio.sleep(0.3)  # anything appended twice would arrive meanwhile
        kinds = [(r["type"], r["id"]) for r in receiver.records()]
        assert [k for k, _ in kinds] == ["Reception", "Delivery", "Bounce", "MemberDown"]
        assert kinds[2] == ("Bounce", "by-operator")
        assert len({r["event_id"] for r in receiver.records()}) == 4
    finally:
        await receiver.stop()


async def test_events_the_spool_refused_a_moment_are_appended_once_it_takes_them_again(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    """A member event the spool could not append (a PostgreSQL restart, a locked file) waits and is tried
    again, not dropped: here a trigger another connection puts on the outbox table refuses every row."""
    up = await upstream("up")
    receiver = await Receiver(secret=SECRET).start()
    refuse = sqlite3.connect(tmp_path / "spool.db", isolation_level=None)
    try:
        cfg = settings(tmp_path, up.address, [hook(receiver, "ops", events=["MemberDown", "MemberUp"])])
        async with App(cfg) as app:
            refuse.execute(
                "CREATE TRIGGER refuse BEFORE INSERT ON webhook_outbox"
                " BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
            )
            app.bus.emit(Event(EventType.MEMBER_DOWN, pool="default", member="up"))
            await wait_until(lambda: app.webhooks.loose_failures >= 1, timeout=5)
            app.bus.emit(Event(EventType.MEMBER_UP, pool="default", member="up"))  # meanwhile: after it
            await asyncio.sleep(0.2)
            assert receiver.records() == []
            refuse.execute("DROP TRIGGER refuse")
            await wait_until(lambda: len(receiver.records()) >= 2, timeout=10)
            await asyncio.sleep(0.3)  # anything appended twice would arrive meanwhile
            assert app.webhooks.loose_dropped == 0
        assert [r["type"] for r in receiver.records()] == ["MemberDown", "MemberUp"]
    finally:
        refuse.close()
        await receiver.stop()


async def test_an_operators_bounce_through_the_queue_api_reaches_the_endpoint(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    up = await upstream("up", always("451 4.3.0 not now"))
    receiver = await Receiver(secret=SECRET).start()
    try:
        # Deferred for a minute: queued, not leased, when the operator bounces it.
        cfg = settings(tmp_path, up.address, [hook(receiver, "ops")], retry="1m")
        async with App(cfg) as app:
            reply = await send(app.smtp_port, "m1")
            queue_id = reply.rsplit(" ", 1)[-1]
            await wait_until(
                lambda: "TransientFailure" in {r["type"] for r in receiver.records()}, timeout=10
            )
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}") as client:
                answer = await client.post(
                    "/api/v1/queue/bounce",
                    json={"id": queue_id, "reason": "by the operator"},
                    headers={"Authorization": f"Bearer {TOKEN}"},
                )
                assert answer.status_code == 200, answer.text
            await wait_until(lambda: "Bounce" in {r["type"] for r in receiver.records()}, timeout=10)
        [bounce] = [r for r in receiver.records() if r["type"] == "Bounce"]
        assert bounce["id"] == queue_id and bounce["recipient"] == "user@dest.test"
        types = [r["type"] for r in receiver.records() if r["id"] == queue_id]
        assert types[0] == "Reception" and types[-1] == "Bounce"
    finally:
        await receiver.stop()


async def test_a_sender_that_crashes_is_started_again_and_posts_its_batch_without_stopping_the_node(
    tmp_path: Path, upstream: StartUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A defect in a webhook sender (here: building the first body fails) is logged, counted and the
    sender started again from the last acknowledged record: nothing is skipped, the node goes on."""
    import postmux.events.webhooks as webhooks_module

    real, failures = webhooks_module.body_of, [1]

    def body_of_once_broken(*args: Any, **kwargs: Any) -> str:
        if failures:
            failures.pop()
            raise RuntimeError("a defect in building the body")
        return real(*args, **kwargs)

    monkeypatch.setattr(webhooks_module, "body_of", body_of_once_broken)
    up = await upstream("up")
    receiver = await Receiver(secret=SECRET).start()
    try:
        cfg = settings(tmp_path, up.address, [hook(receiver, "ops", events=["Reception", "Delivery"])])
        async with App(cfg) as app:
            await send(app.smtp_port, "m1")
            await wait_until(lambda: len(receiver.records()) >= 2, timeout=10)
            assert 'postmux_loop_crashes_total{loop="webhook-ops"} 1.0' in app.metrics.render().decode()
            assert not app.failed.is_set()
        assert [r["type"] for r in receiver.records()] == ["Reception", "Delivery"]
    finally:
        await receiver.stop()


async def test_the_records_of_an_endpoint_no_longer_configured_can_be_dropped_and_only_those(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    """[[webhook]] is restart-only: an endpoint removed with records waiting keeps them for ever (they
    wait for that name), until the operator drops them; a configured endpoint's are its sender's."""
    up = await upstream("up")
    down = await Receiver(secret=SECRET, decide=lambda n: FAIL).start()  # never acknowledges
    kept = await Receiver(secret=SECRET).start()
    try:
        async with App(settings(tmp_path, up.address, [hook(down, "old")])) as app:
            await send(app.smtp_port, "m1")
            await wait_until(lambda: down.requests >= 1, timeout=10)
        async with App(settings(tmp_path, up.address, [hook(kept, "new")])) as app:
            run = cli_runner(app)
            code, out, _ = await run("webhooks")  # type: ignore[operator]
            old = next(w for w in body(out)["webhooks"] if w["endpoint"] == "old")
            assert old["configured"] is False and old["backlog"] >= 2  # Reception and Delivery
            code, _, err = await run("webhooks", "--drop", "new")  # type: ignore[operator]
            assert code != 0 and "configured here" in err
            code, out, _ = await run("webhooks", "--drop", "old")  # type: ignore[operator]
            assert code == 0 and body(out) == {"endpoint": "old", "dropped": old["backlog"]}
            code, out, _ = await run("webhooks")  # type: ignore[operator]
            assert [w["endpoint"] for w in body(out)["webhooks"]] == ["new"]
            assert await app.spool.outbox_head("old", 0, 10) == []
    finally:
        await down.stop()
        await kept.stop()
