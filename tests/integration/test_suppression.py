"""The suppression list on a running node (issue 15, part 2): a hard bounce suppresses its recipient; the
next message to it is refused at RCPT (or accepted and dropped with a Suppressed event) while its other
recipients are delivered; an entry that expired stops nothing; the list survives a restart; the admin
API's CSV export and import carry it from one node to another; the HTTP API does as SMTP does."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import aiosmtplib
import httpx
import pytest
from typer.testing import CliRunner

from postmux.app import App
from postmux.cli import app as cli
from postmux.passwords import hash_password
from postmux.testing import Upstream
from tests.integration.test_metrics import samples
from tests.support import StartUpstream, make_settings, message, read_events, send, wait_until

TOKEN = "admin-token-for-suppression-tests"
API_KEY = "sk-suppression-" + "s" * 20
GONE = "gone@dest.test"
REFUSALS: list[str] = []  # what refused RCPTs said, for a test to read


class Clock:
    """The wall clock, moved on by `advance` (expiry without waiting days)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


def settings(tmp_path: Path, up: Upstream, smtp: dict[str, Any] | None = None, **suppression: Any) -> Any:
    pools = [{"name": "default", "members": [{"name": "a", "address": up.address}]}]
    keys = [{"name": "shop", "hash": hash_password(API_KEY, n=16)}]
    return make_settings(
        tmp_path,
        pools,
        suppression=suppression,
        http={"listen": "127.0.0.1:0", "admin_token": TOKEN},
        api_key=keys,
        smtp=smtp or {},
    )


async def rcpt_replies(port: int, test_id: str, rcpts: list[str]) -> dict[str, int]:
    """Send one message with these recipients; the code each RCPT got (DATA only if one was taken)."""
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, local_hostname="client.test", start_tls=False)
    await client.connect()
    codes = {}
    try:
        await client.mail("app@example.com")
        for rcpt in rcpts:
            try:
                codes[rcpt] = (await client.rcpt(rcpt)).code
            except aiosmtplib.SMTPRecipientRefused as e:
                codes[rcpt] = e.code
                assert e.message.startswith(f"5.7.1 <{rcpt}>: suppressed (")
                REFUSALS.append(e.message)
        if any(code == 250 for code in codes.values()):
            await client.data(message(test_id, to=rcpts[0]))
        await client.quit()
    finally:
        client.close()
    return codes


def delivered_to(up: Upstream) -> list[tuple[str, str]]:
    return [(r.test_id, rcpt) for r in up.received for rcpt in r.recipients]


async def metrics(app: App) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}") as client:
        return samples((await client.get("/metrics")).text)


async def bounce_gone(app: App, up: Upstream, log: Path) -> None:
    """The first message: GONE bounces 550 5.1.1 at the upstream, first@ is delivered."""
    up.rcpt_refusals[GONE] = "550 5.1.1 <gone@dest.test>: Recipient address rejected: User unknown"
    await send(app.smtp_port, "m1", to=[GONE, "first@dest.test"])
    await wait_until(lambda: any(e["type"] == "Bounce" and e["recipient"] == GONE for e in read_events(log)))
    await wait_until(lambda: ("m1", "first@dest.test") in delivered_to(up))


async def test_a_hard_bounce_suppresses_the_recipient_and_the_next_message_is_refused_at_rcpt_for_it_alone(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    up = await upstream("a")
    log = tmp_path / "events.jsonl"
    async with App(settings(tmp_path, up)) as app:
        await bounce_gone(app, up, log)
        (entry,) = app.suppressions.entries()
        assert (entry.address, entry.scope, entry.source) == (GONE, "global", "bounce")
        assert entry.reason.startswith("InvalidRecipient: 550 5.1.1")
        REFUSALS.clear()
        codes = await rcpt_replies(app.smtp_port, "m2", [GONE, "second@dest.test"])
        assert codes == {GONE: 550, "second@dest.test": 250}
        assert REFUSALS[0].startswith(f"5.7.1 <{GONE}>: suppressed (bounce: InvalidRecipient: 550 5.1.1")
        await wait_until(lambda: ("m2", "second@dest.test") in delivered_to(up))
        got = await metrics(app)
        assert got[("postmux_suppressed_recipients_total", (("action", "refuse"), ("source", "bounce")))] == 1
        assert got[("postmux_suppression_entries", ())] == 1
    assert [rcpt for test_id, rcpt in delivered_to(up) if test_id == "m2"] == ["second@dest.test"]
    assert not any(e["type"] == "Suppressed" for e in read_events(log))  # refused: the client knows
    # The entry is in the spool: a restart still refuses.
    async with App(settings(tmp_path, up)) as app:
        assert await rcpt_replies(app.smtp_port, "m3", [GONE]) == {GONE: 550}


async def test_with_action_drop_the_recipient_is_accepted_and_dropped_with_a_suppressed_event(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    up = await upstream("a")
    log = tmp_path / "events.jsonl"
    async with App(settings(tmp_path, up, action="drop")) as app:
        await bounce_gone(app, up, log)
        codes = await rcpt_replies(app.smtp_port, "m2", [GONE, "second@dest.test"])
        assert codes == {GONE: 250, "second@dest.test": 250}
        await wait_until(lambda: ("m2", "second@dest.test") in delivered_to(up))
        await wait_until(lambda: any(e["type"] == "Suppressed" for e in read_events(log)))
        await send(app.smtp_port, "m3", to=[GONE])  # every recipient suppressed: 250, nothing stored
        await wait_until(lambda: sum(e["type"] == "Suppressed" for e in read_events(log)) == 2)
        got = await metrics(app)
        assert got[("postmux_suppressed_recipients_total", (("action", "drop"), ("source", "bounce")))] == 2
    assert [rcpt for test_id, rcpt in delivered_to(up) if test_id in ("m2", "m3")] == ["second@dest.test"]
    dropped = [e for e in read_events(log) if e["type"] == "Suppressed"]
    assert [e["recipient"] for e in dropped] == [GONE, GONE]
    assert [e["message_id"] for e in dropped] == ["m2@example.com", "m3@example.com"]
    assert dropped[0]["tags"]["suppression_source"] == "bounce"
    assert dropped[0]["response"]["code"] == 550 and dropped[0]["response"]["enhanced_code"] == "5.7.1"
    receptions = {(e["message_id"], e["recipient"]) for e in read_events(log) if e["type"] == "Reception"}
    assert ("m2@example.com", GONE) not in receptions and ("m2@example.com", "second@dest.test") in receptions


async def test_an_expired_entry_stops_nothing_and_a_domain_entry_stops_the_whole_domain(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    up = await upstream("a")
    clock = Clock()
    async with App(settings(tmp_path, up), clock=clock) as app:
        await app.suppressions.add("later@dest.test", reason="asked to pause", expires=clock() + 86_400)
        await app.suppressions.add("*@closed.test", reason="the company closed")
        codes = await rcpt_replies(
            app.smtp_port, "m1", ["later@dest.test", "anyone@closed.test", "x@dest.test"]
        )
        assert codes == {"later@dest.test": 550, "anyone@closed.test": 550, "x@dest.test": 250}
        clock.advance(86_400 + 1)
        assert await rcpt_replies(app.smtp_port, "m2", ["later@dest.test"]) == {"later@dest.test": 250}
        await wait_until(lambda: ("m2", "later@dest.test") in delivered_to(up))
        assert [e.address for e in app.suppressions.entries()] == ["*@closed.test"]
        assert len(app.suppressions.entries(expired=True)) == 2


async def test_a_sender_domain_scope_stops_only_that_senders_mail(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    up = await upstream("a")
    async with App(settings(tmp_path, up)) as app:
        await app.suppressions.add(
            "u@dest.test", reason="unsubscribed", scope="sender_domain:news.example.com"
        )
        assert await app.suppressions.add("v@dest.test", reason="x", source="unsubscribe")  # the hook's call
        codes_news = await _codes_from(app.smtp_port, "news@news.example.com", "u@dest.test")
        codes_shop = await _codes_from(app.smtp_port, "shop@example.com", "u@dest.test")
    assert (codes_news, codes_shop) == (550, 250)


async def _codes_from(port: int, sender: str, rcpt: str) -> int:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, local_hostname="client.test", start_tls=False)
    await client.connect()
    try:
        await client.mail(sender)
        try:
            return (await client.rcpt(rcpt)).code
        except aiosmtplib.SMTPRecipientRefused as e:
            return e.code
    finally:
        client.close()


async def test_the_http_api_leaves_out_a_suppressed_recipient_and_names_it(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    up = await upstream("a")
    async with App(settings(tmp_path, up)) as app:
        await app.suppressions.add(GONE, reason="hard bounce last week", source="bounce")
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{app.http_port}", headers={"Authorization": f"Bearer {API_KEY}"}
        ) as client:
            body = {
                "envelope_sender": "app@example.com",
                "recipients": [{"email": GONE}, {"email": "ok@dest.test"}],
                "content": "Subject: hi\r\nX-Test-Id: h1\r\n\r\nhello\r\n",
            }
            response = await client.post("/api/v1/messages", json=body)
            alone = await client.post("/api/v1/messages", json={**body, "recipients": [{"email": GONE}]})
        await wait_until(lambda: len(up.received) == 1)
    assert response.status_code == 202, response.text
    answer = response.json()
    assert answer["messages"][0]["recipients"] == ["ok@dest.test"]
    ((refused),) = answer["suppressed"]
    assert refused["email"] == GONE and "suppressed (bounce: hard bounce last week)" in refused["reason"]
    assert up.received[0].recipients == ["ok@dest.test"]
    assert alone.status_code == 422 and alone.json()["field"] == "recipients"


async def test_the_admin_api_and_cli_list_add_remove_and_carry_the_list_by_csv(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    up = await upstream("a")
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    async with App(settings(first, up)) as app:
        url = ["--url", f"http://127.0.0.1:{app.http_port}", "--token", TOKEN]
        assert (
            await _cli("suppression", "add", "a@dest.test", "--reason", "complained", *url)
        ).exit_code == 0
        await _cli(
            "suppression", "add", "*@gone.test", "--scope", "api_key:shop", "--expires-in", "30d", *url
        )
        await _cli("suppression", "add", 'b "quoted", too@dest.test', *url)  # refused: not an address
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{app.http_port}/api/v1", headers={"Authorization": f"Bearer {TOKEN}"}
        ) as client:
            made = await client.post("/suppressions", json={"address": "c@dest.test", "source": "complaint"})
            bad = await client.post("/suppressions", json={"address": "c@dest.test", "source": "whim"})
            listed = (await client.get("/suppressions")).json()["suppressions"]
            exported = (await client.get("/suppressions.csv")).text
            removed = await client.delete("/suppressions/a@dest.test")
            again = await client.delete("/suppressions/a@dest.test")
        shown = await _cli("suppression", "list", *url, "--json")
    assert made.status_code == 201 and made.json()["suppression"]["source"] == "complaint"
    assert bad.status_code == 422
    assert [(e["address"], e["scope"]) for e in listed] == [
        ("a@dest.test", "global"),
        ("*@gone.test", "api_key:shop"),
        ("c@dest.test", "global"),
    ]
    assert (removed.status_code, again.status_code) == (200, 404)
    assert [e["address"] for e in _json(shown.stdout)["suppressions"]] == ["*@gone.test", "c@dest.test"]
    csv_file = tmp_path / "list.csv"
    csv_file.write_text(exported)
    async with App(settings(second, up)) as other:
        url = ["--url", f"http://127.0.0.1:{other.http_port}", "--token", TOKEN]
        imported = await _cli("suppression", "import", str(csv_file), *url)
        out = await _cli("suppression", "export", *url)
    assert imported.exit_code == 0 and _json(imported.stdout) == {"imported": 3}  # JSON off a terminal
    # The same entries, times and all (to the second, as the CSV has them: so the order of entries made in
    # one second may differ; and the test runner's stdout turns CRLF into LF).
    assert sorted(out.stdout.splitlines()) == sorted(exported.splitlines())
    assert len(exported.splitlines()) == 4
    assert exported.splitlines()[0] == "address,scope,reason,source,created,expires"


async def _cli(*args: str) -> Any:
    import asyncio

    return await asyncio.to_thread(CliRunner().invoke, cli, list(args))


def _json(text: str) -> Any:
    import json

    return json.loads(text)


@pytest.mark.parametrize("action", ["refuse", "drop"])
async def test_a_turned_off_list_stops_nobody_but_still_learns(
    tmp_path: Path, upstream: StartUpstream, action: str
) -> None:
    up = await upstream("a")
    log = tmp_path / "events.jsonl"
    async with App(settings(tmp_path, up, enabled=False, action=action)) as app:
        await bounce_gone(app, up, log)
        assert [e.address for e in app.suppressions.entries()] == [GONE]
        up.rcpt_refusals.clear()
        assert await rcpt_replies(app.smtp_port, "m2", [GONE]) == {GONE: 250}
        await wait_until(lambda: ("m2", GONE) in delivered_to(up))


async def test_with_ingress_workers_a_suppressed_recipient_is_dropped_by_the_main_process(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    # A worker holds no list, so it cannot refuse at RCPT: the one accept path drops, visibly.
    up = await upstream("a")
    log = tmp_path / "events.jsonl"
    async with App(settings(tmp_path, up, smtp={"workers": 1})) as app:
        assert app.workers is not None
        await app.suppressions.add(GONE, reason="bounced before")
        assert await rcpt_replies(app.smtp_port, "w1", [GONE, "ok@dest.test"]) == {
            GONE: 250,
            "ok@dest.test": 250,
        }
        await wait_until(lambda: ("w1", "ok@dest.test") in delivered_to(up), timeout=15)
        await wait_until(lambda: any(e["type"] == "Suppressed" for e in read_events(log)))
    assert [rcpt for _, rcpt in delivered_to(up)] == ["ok@dest.test"]


async def test_with_action_drop_the_http_api_takes_the_recipient_and_drops_it_by_its_keys_entry(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    up = await upstream("a")
    log = tmp_path / "events.jsonl"
    async with App(settings(tmp_path, up, action="drop")) as app:
        await app.suppressions.add("k@dest.test", reason="asked the shop", scope="api_key:shop")
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{app.http_port}", headers={"Authorization": f"Bearer {API_KEY}"}
        ) as client:
            body = {
                "envelope_sender": "app@example.com",
                "recipients": [{"email": "k@dest.test"}, {"email": "ok@dest.test"}],
                "content": "Subject: hi\r\nX-Test-Id: h2\r\n\r\nhello\r\n",
            }
            response = await client.post("/api/v1/messages", json=body)
        await wait_until(lambda: len(up.received) == 1)
        await wait_until(lambda: any(e["type"] == "Suppressed" for e in read_events(log)))
        # The same recipient over SMTP (no API key) is not in the key's scope.
        assert await rcpt_replies(app.smtp_port, "s1", ["k@dest.test"]) == {"k@dest.test": 250}
    assert response.status_code == 202
    ((queued,),) = [response.json()["messages"]]
    assert queued["recipients"] == ["k@dest.test", "ok@dest.test"] and "suppressed" not in response.json()
    (dropped,) = [e for e in read_events(log) if e["type"] == "Suppressed"]
    assert (dropped["id"], dropped["recipient"]) == (queued["id"], "k@dest.test")
    assert dropped["tags"]["suppression_scope"] == "api_key:shop"
    assert up.received[0].recipients == ["ok@dest.test"]
