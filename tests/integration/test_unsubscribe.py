"""One-click unsubscribe (RFC 8058) on a running node: the fields added before signing and covered by the
DKIM signature (verified by Perl's Mail::DKIM through a loopback DNS), one copy and one token per
recipient, the sender's own List-Unsubscribe left alone, and POST /unsubscribe/TOKEN recording an
Unsubscribe event in the event log and to a webhook, a forged token refused."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiosmtplib
import httpx
import pytest

from postmux.app import App
from postmux.testing import Received
from postmux.unsubscribe import verify
from tests.dns_server import LoopbackDns
from tests.integration.test_dkim_signing import DOMAIN, Keys, mail_dkim
from tests.integration.test_dkim_signing import pytestmark as pytestmark  # Mail::DKIM or skip
from tests.support import StartUpstream, make_settings, read_events, send, wait_until
from tests.webhook_receiver import Receiver

SECRET = b"k" * 40
URL = "https://mail.example.test/unsubscribe/"
TOKEN_IN = re.compile(rb"<https://mail\.example\.test/unsubscribe/([A-Za-z0-9_.-]+)>")
HOOK_SECRET = "whsec_" + "dGVzdHNlY3JldHRlc3RzZWNyZXR0ZXN0c2VjcmV0"


@pytest.fixture(scope="module")
def dkim_keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return Keys(tmp_path_factory.mktemp("dkim"))


@pytest.fixture(scope="module")
def dkim_dns(dkim_keys: Keys) -> Iterator[LoopbackDns]:
    with LoopbackDns(dkim_keys.zone) as server:
        yield server


def settings(
    tmp_path: Path,
    up_address: str,
    keys: Keys,
    webhook: list[dict[str, Any]] | None = None,
    smtp: dict[str, Any] | None = None,
    **unsubscribe: Any,
) -> Any:
    secret = tmp_path / "unsubscribe.key"
    secret.write_bytes(SECRET)
    pools = [
        {"name": "default", "members": [{"name": "up", "address": up_address}]},
        {"name": "bulk", "members": [{"name": "bulk-up", "address": up_address}]},
    ]
    table = {"url": URL, "secret_file": str(secret), "mailto": "unsub@example.test", "pools": ["bulk"]}
    sections: dict[str, Any] = {
        # The operator's own signed-header list lacks RFC 8058's pair: postmux signs them all the same.
        "dkim": keys.dkim(headers=["From", "To", "Subject", "Message-ID"], oversign=["From"]),
        "route": [{"match": {"recipient_domain": "list.test"}, "pool": "bulk"}],
        "unsubscribe": {**table, **unsubscribe},
        "webhook": webhook or [],
        "smtp": smtp or {},
    }
    return make_settings(tmp_path, pools, **sections)


def token_of(received: Received) -> str:
    found = TOKEN_IN.search(received.data)
    assert found is not None, received.data[:600]
    return found.group(1).decode()


def signed_fields(data: bytes) -> list[list[str]]:
    """Each DKIM-Signature's h= names, lower-cased."""
    out = []
    for sig in re.findall(rb"DKIM-Signature:(.*?)(?=\r\n\S)", data, re.S):
        h = re.search(rb"h=([^;]*);", re.sub(rb"\s+", b"", sig))
        assert h is not None
        out.append(h.group(1).decode().lower().split(":"))
    return out


async def test_each_opted_in_recipient_gets_its_own_copy_and_signed_one_click_link(
    tmp_path: Path, upstream: StartUpstream, dkim_keys: Keys, dkim_dns: LoopbackDns
) -> None:
    up = await upstream("up")
    rcpts = ["ann@list.test", "bob@list.test", "cy@other.test", "di@other.test"]
    async with App(settings(tmp_path, up.address, dkim_keys)) as app:
        reply = await send(app.smtp_port, "split", sender=f"news@{DOMAIN}", to=rcpts)
        assert reply.startswith("2.0.0 Ok: queued as"), reply
        await wait_until(lambda: len(up.received) == 3)
    by_rcpts = {tuple(r.recipients): r for r in up.received}
    # The two list.test recipients (pool bulk, opted in) alone each; the rest together, untouched.
    assert set(by_rcpts) == {("ann@list.test",), ("bob@list.test",), ("cy@other.test", "di@other.test")}
    assert b"List-Unsubscribe" not in by_rcpts[("cy@other.test", "di@other.test")].data
    tokens = {}
    for rcpt in ("ann@list.test", "bob@list.test"):
        copy = by_rcpts[(rcpt,)]
        assert copy.header("List-Unsubscribe-Post") == "List-Unsubscribe=One-Click"
        assert b"<mailto:unsub@example.test?subject=unsubscribe%20" in copy.data
        claim = verify(token_of(copy), (SECRET,), 0, 0)
        assert (claim.recipient, claim.sender_domain, claim.message_id) == (rcpt, DOMAIN, "split@example.com")
        tokens[rcpt] = token_of(copy)
        # RFC 8058 4: each signature covers both fields, and Mail::DKIM finds it good.
        signatures = signed_fields(copy.data)
        assert len(signatures) == 2  # RSA and Ed25519
        for names in signatures:
            assert "list-unsubscribe" in names and "list-unsubscribe-post" in names, names
        assert mail_dkim(copy.data, dkim_dns)["rsa1"] == "pass"
        altered = copy.data.replace(
            b"List-Unsubscribe-Post: List-Unsubscribe=One-Click", b"List-Unsubscribe-Post: x"
        )
        assert mail_dkim(altered, dkim_dns)["rsa1"].startswith("fail")
    assert tokens["ann@list.test"] != tokens["bob@list.test"]
    receptions = [e for e in read_events(tmp_path / "events.jsonl") if e["type"] == "Reception"]
    assert sorted(e["recipient"] for e in receptions) == sorted(rcpts)
    assert len({e["id"] for e in receptions}) == 3  # three stored messages, each its own id


async def test_the_post_records_an_unsubscribe_event_and_a_forged_or_altered_token_is_refused(
    tmp_path: Path, upstream: StartUpstream, dkim_keys: Keys
) -> None:
    up = await upstream("up")
    receiver = await Receiver(secret=HOOK_SECRET).start()
    try:
        hook = {"name": "hooks", "url": receiver.url("/h"), "secret": HOOK_SECRET, "events": ["Unsubscribe"]}
        cfg = settings(tmp_path, up.address, dkim_keys, webhook=[hook])
        async with App(cfg) as app:
            await send(app.smtp_port, "one", sender=f"news@{DOMAIN}", to=["ann@list.test"])
            await wait_until(lambda: len(up.received) == 1)
            token = token_of(up.received[0])
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}") as client:
                page = await client.get(f"/unsubscribe/{token}")  # a link scanner's fetch: nothing happens
                assert (
                    page.status_code == 200 and 'method="post"' in page.text and "ann@list.test" in page.text
                )
                body = {"content": "List-Unsubscribe=One-Click"}
                forged = token[:-2] + ("AA" if token[-2:] != "AA" else "BB")
                bad = await client.post(f"/unsubscribe/{forged}", **body)
                assert bad.status_code == 400 and "forged, altered or cut" in bad.json()["error"], bad.text
                assert (await client.post("/unsubscribe/nonsense", **body)).status_code == 400
                good = await client.post(
                    f"/unsubscribe/{token}",
                    headers={"Content-Type": "application/x-www-form-urlencoded"},
                    **body,
                )
                assert good.status_code == 200, good.text
                metrics = (await client.get("/metrics")).text
                assert "postmux_unsubscribes_total 1.0" in metrics
                assert good.json() == {
                    "unsubscribed": True,
                    "recipient": "ann@list.test",
                    "sender_domain": DOMAIN,
                }
            await wait_until(lambda: len(receiver.records("/h")) == 1)
            # The suppression list took it, for that sender domain only: the next newsletter to ann is
            # refused at RCPT, mail to her from another domain still goes.
            found = app.suppressions.find("ann@list.test", f"news@{DOMAIN}")
            assert found is not None and found.source == "unsubscribe"
            assert found.scope == f"sender_domain:{DOMAIN}"
            with pytest.raises(aiosmtplib.SMTPRecipientRefused, match="suppressed"):
                await send(app.smtp_port, "two", sender=f"news@{DOMAIN}", to=["ann@list.test"])
            await send(app.smtp_port, "three", sender="shop@other.test", to=["ann@list.test"])
            await wait_until(lambda: len(up.received) == 2)
        # One event: the GET and the refused tokens recorded none.
        (event,) = [e for e in read_events(tmp_path / "events.jsonl") if e["type"] == "Unsubscribe"]
        reception = next(e for e in read_events(tmp_path / "events.jsonl") if e["type"] == "Reception")
        assert event["recipient"] == "ann@list.test" and event["sender_domain"] == DOMAIN
        assert event["id"] == reception["id"] and event["message_id"] == "one@example.com"
        (posted,) = receiver.records("/h")
        assert posted["type"] == "Unsubscribe" and posted["event_id"] == event["event_id"]
        assert receiver.bad_signatures == []
    finally:
        await receiver.stop()


async def test_mail_that_carries_its_own_list_unsubscribe_is_left_whole(
    tmp_path: Path, upstream: StartUpstream, dkim_keys: Keys
) -> None:
    up = await upstream("up")
    own = "List-Unsubscribe: <mailto:leave@example.test>\r\n"
    async with App(settings(tmp_path, up.address, dkim_keys)) as app:
        await send(
            app.smtp_port, "own", sender=f"news@{DOMAIN}", to=["ann@list.test", "bob@list.test"], headers=own
        )
        await wait_until(lambda: len(up.received) == 1)
    (received,) = up.received
    assert received.recipients == ["ann@list.test", "bob@list.test"]  # one copy: nothing to split for
    assert received.data.count(b"List-Unsubscribe") == 1 and own.encode() in received.data
    assert b"List-Unsubscribe-Post" not in received.data


async def test_a_senders_list_unsubscribe_post_alone_gives_way_to_ours_not_a_second_one(
    tmp_path: Path, upstream: StartUpstream, dkim_keys: Keys, dkim_dns: LoopbackDns
) -> None:
    # RFC 8058 3.1: one List-Unsubscribe-Post, beside the List-Unsubscribe it refers to. The sender's,
    # without a List-Unsubscribe, means nothing: ours replaces it. `List-Unsubscribe :` (RFC 5322 4.5)
    # is the sender's own List-Unsubscribe, and the mail is left whole.
    up = await upstream("up")
    async with App(settings(tmp_path, up.address, dkim_keys)) as app:
        await send(
            app.smtp_port,
            "post",
            sender=f"news@{DOMAIN}",
            to=["ann@list.test"],
            headers="List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n",
        )
        own = "List-Unsubscribe : <mailto:leave@example.test>\r\n"
        await send(app.smtp_port, "obs", sender=f"news@{DOMAIN}", to=["bob@list.test"], headers=own)
        await wait_until(lambda: len(up.received) == 2)
    by_rcpt = {r.recipients[0]: r for r in up.received}
    stamped = by_rcpt["ann@list.test"].data
    assert len(re.findall(rb"(?im)^List-Unsubscribe-Post[ \t]*:", stamped)) == 1
    assert len(re.findall(rb"(?im)^List-Unsubscribe[ \t]*:", stamped)) == 1
    assert mail_dkim(stamped, dkim_dns)["rsa1"] == "pass"
    left = by_rcpt["bob@list.test"].data
    assert own.encode() in left and b"List-Unsubscribe-Post" not in left and URL.encode() not in left


async def test_the_http_api_answers_one_id_per_copy_each_with_its_recipient(
    tmp_path: Path, upstream: StartUpstream, dkim_keys: Keys
) -> None:
    from tests.integration.test_submission_api import SHOP_KEY, message, settings_for

    up = await upstream("up")
    secret = tmp_path / "unsubscribe.key"
    secret.write_bytes(SECRET)
    table = {"url": URL, "secret_file": str(secret), "sender_domains": ["shop.test"]}
    async with App(settings_for(tmp_path, up, unsubscribe=table)) as app:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{app.http_port}", headers={"Authorization": f"Bearer {SHOP_KEY}"}
        ) as client:
            two = [{"email": "alice@dest.test"}, {"email": "bob@dest.test"}]
            response = await client.post("/api/v1/messages", json=message(recipients=two))
        assert response.status_code == 202, response.text
        answered = response.json()["messages"]
        assert [m["recipients"] for m in answered] == [["alice@dest.test"], ["bob@dest.test"]]
        assert answered[0]["id"] != answered[1]["id"]
        await wait_until(lambda: len(up.received) == 2)
    for received in up.received:
        claim = verify(token_of(received), (SECRET,), 0, 0)
        assert [claim.recipient] == received.recipients and claim.sender_domain == "shop.test"
        assert claim.queue_id in {m["id"] for m in answered}


async def test_a_text_in_a_file_is_copied_whole_for_each_recipient(
    tmp_path: Path, upstream: StartUpstream, dkim_keys: Keys, dkim_dns: LoopbackDns
) -> None:
    up = await upstream("up")
    body = "".join(f"line {i} {'x' * 60}\r\n" for i in range(3000))  # ~200 KB: past spill_bytes
    text = f"From: news@{DOMAIN}\r\nTo: list@list.test\r\nSubject: big\r\n\r\n{body}".encode()
    rcpts = ["ann@list.test", "bob@list.test", "cy@list.test"]
    async with App(settings(tmp_path, up.address, dkim_keys, smtp={"spill_bytes": 4096})) as app:
        client = aiosmtplib.SMTP(
            hostname="127.0.0.1", port=app.smtp_port, local_hostname="c.test", start_tls=False
        )
        await client.connect()
        await client.sendmail(f"news@{DOMAIN}", rcpts, text)
        client.close()
        await wait_until(lambda: len(up.received) == 3)
        assert list(app.spool.spill_dir.iterdir()) == []  # each copy's file adopted by the spool
    for received in up.received:
        assert received.data.endswith(body.encode()), received.recipients
        assert mail_dkim(received.data, dkim_dns)["rsa1"] == "pass"
    assert sorted(r.recipients[0] for r in up.received) == rcpts
