"""HTTP submission (POST /api/v1/messages): a real node, real HTTP over uvicorn, a loopback upstream.

Every 4xx the API promises is here, each with the JSON body and the field it names; the 202s are checked
at the upstream (what arrived, to whom, with what headers) and in the event log (tags and metadata).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email
import email.policy
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from postmux.app import App
from postmux.config import load_config
from postmux.passwords import hash_password
from postmux.spool.base import SpoolError
from tests.support import StartUpstream, Upstream, make_settings, read_events, wait_until
from tests.webhook_receiver import Receiver

WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"w" * 32).decode()
SHOP_KEY = "shop-" + "k" * 27
BLOG_KEY = "blog-" + "b" * 27
# A cheap scrypt cost: the tests check which key matches, not how slow a guess is.
SHOP_HASH = hash_password(SHOP_KEY, n=16)
BLOG_HASH = hash_password(BLOG_KEY, n=16)


def message(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "envelope_sender": "bounces@shop.test",
        "recipients": [{"email": "alice@dest.test", "name": "Alice"}],
        "content": {
            "from": {"email": "news@shop.test", "name": "Shop"},
            "subject": "Hello",
            "text_body": "Hi there\n",
        },
    }
    body.update(over)
    return body


class Node:
    def __init__(self, app: App, up: Upstream, tmp_path: Path) -> None:
        self.app, self.up, self.tmp_path = app, up, tmp_path
        self.url = f"http://127.0.0.1:{app.http_port}"

    def client(self, key: str | None = SHOP_KEY) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=10)

    async def post(self, body: Any, path: str = "/api/v1/messages", **kw: Any) -> httpx.Response:
        async with self.client(kw.pop("key", SHOP_KEY)) as c:
            return await c.post(path, json=body, **kw)

    def events(self) -> list[dict[str, Any]]:
        return read_events(self.tmp_path / "events.jsonl")


def settings_for(tmp_path: Path, up: Upstream, **sections: Any) -> Any:
    keys = sections.pop(
        "api_key",
        [
            {
                "name": "shop",
                "hash": SHOP_HASH,
                "sender_domains": ["shop.test", "*.shop.test"],
                "pools": ["default", "bulk"],
            },
            {"name": "blog", "hash": BLOG_HASH, "rate": "1/min", "burst": 2},
        ],
    )
    pools = [
        {"name": "default", "members": [{"name": "a", "address": up.address}]},
        {"name": "bulk", "members": [{"name": "b", "address": up.address}]},
        {"name": "secret", "members": [{"name": "c", "address": up.address}]},
    ]
    return make_settings(tmp_path, pools, api_key=keys, **sections)


@pytest.fixture
async def node(tmp_path: Path, upstream: StartUpstream) -> AsyncIterator[Node]:
    up = await upstream("up")
    async with App(settings_for(tmp_path, up, api={"max_request_size": 200_000, "max_batch": 50})) as app:
        yield Node(app, up, tmp_path)


async def test_a_structured_message_is_built_stored_and_delivered_with_its_tags(node: Node) -> None:
    body = message(
        recipients=[{"email": "alice@dest.test", "name": "Alice"}, {"email": "bob@dest.test"}],
        tags={"campaign": "spring"},
        metadata={"order": "1234"},
    )
    body["content"]["html_body"] = "<p>Hi <img src='cid:logo'></p>"
    body["content"]["attachments"] = [
        {"data": base64.b64encode(b"PNG!").decode(), "content_type": "image/png", "content_id": "logo"},
        {"data": base64.b64encode(b"a,b\n").decode(), "content_type": "text/csv", "file_name": "r.csv"},
    ]
    response = await node.post(body)
    assert response.status_code == 202, response.text
    queued = response.json()["messages"]
    # To differs per recipient (each gets their own To:), so each recipient gets a message of their own.
    assert sorted(r for m in queued for r in m["recipients"]) == ["alice@dest.test", "bob@dest.test"]
    await wait_until(lambda: len(node.up.received) == 2)
    got = {r.recipients[0]: r for r in node.up.received}
    alice = email.message_from_bytes(got["alice@dest.test"].data, policy=email.policy.default)
    assert alice["To"] == "Alice <alice@dest.test>" and alice["From"] == "Shop <news@shop.test>"
    assert alice["Message-ID"] and alice["Date"] and alice["Received"]
    assert b"\r\n" in got["alice@dest.test"].data and b"\n" not in got["alice@dest.test"].data.replace(
        b"\r\n", b""
    )
    parts = {p.get_content_type(): p for p in alice.walk()}
    assert parts["image/png"].get_content() == b"PNG!" and parts["image/png"]["Content-ID"] == "<logo>"
    assert parts["text/csv"].get_filename() == "r.csv"
    assert "Hi there" in parts["text/plain"].get_content()
    await wait_until(lambda: sum(e["type"] == "Delivery" for e in node.events()) == 2)
    reception = [e for e in node.events() if e["type"] == "Reception"]
    assert {e["id"] for e in reception} == {m["id"] for m in queued}
    assert all(e["tags"] == {"campaign": "spring"} and e["metadata"] == {"order": "1234"} for e in reception)
    by_id = {e["recipient"]: e["message_id"] for e in reception}
    assert by_id["alice@dest.test"] == alice["Message-ID"].strip("<>")  # the header postmux wrote
    assert all(e["auth_user"] == "shop" for e in reception)  # the API key's name


async def test_substitutions_make_one_message_per_recipient_when_they_differ(node: Node) -> None:
    raw = "From: news@shop.test\nSubject: Hello {{ name }}\n\nDear {{name}} from {{shop}}\n"
    same = await node.post(
        message(content=raw, recipients=[{"email": "a@dest.test"}, {"email": "b@dest.test"}])
    )
    assert same.status_code == 202 and len(same.json()["messages"]) == 1  # no substitutions: one message
    differ = await node.post(
        message(
            content=raw,
            substitutions={"shop": "Shop"},
            recipients=[
                {"email": "c@dest.test", "substitutions": {"name": "Cy"}},
                {"email": "d@dest.test", "substitutions": {"name": "Di"}},
                {"email": "e@dest.test", "substitutions": {"name": "Cy"}},
            ],
        )
    )
    assert differ.status_code == 202
    groups = sorted(m["recipients"] for m in differ.json()["messages"])
    assert groups == [["c@dest.test", "e@dest.test"], ["d@dest.test"]]
    await wait_until(lambda: len(node.up.received) == 3)
    texts = {tuple(r.recipients): r.data for r in node.up.received}
    assert b"Subject: Hello Di\r\n" in texts[("d@dest.test",)]
    assert b"Dear Cy from Shop\r\n" in texts[("c@dest.test", "e@dest.test")]
    assert b"Message-ID: <" in texts[("d@dest.test",)]  # added: the raw text had none


async def test_the_same_mailbox_twice_in_one_message_is_sent_once(node: Node) -> None:
    """As at SMTP: the domain is case-insensitive (RFC 5321 2.4), the local part the receiver's business."""
    rcpts = [{"email": e} for e in ("dup@dest.test", "dup@DEST.test", "Dup@dest.test", "dup@dest.test")]
    answer = await node.post(message(recipients=rcpts))
    assert answer.status_code == 202
    assert sorted(r for m in answer.json()["messages"] for r in m["recipients"]) == [
        "Dup@dest.test",
        "dup@dest.test",
    ]
    await wait_until(lambda: len(node.up.received) == 2)  # a To: field each: two messages, one a mailbox
    assert sorted(r for m in node.up.received for r in m.recipients) == ["Dup@dest.test", "dup@dest.test"]


async def test_a_batch_is_stored_together_and_answered_in_order(node: Node) -> None:
    batch = {"messages": [message(recipients=[{"email": f"u{i}@dest.test"}]) for i in range(5)]}
    response = await node.post(batch, "/api/v1/messages/batch")
    assert response.status_code == 202
    results = response.json()["results"]
    assert [r["messages"][0]["recipients"] for r in results] == [[f"u{i}@dest.test"] for i in range(5)]
    await wait_until(lambda: len(node.up.received) == 5)
    # One bad message refuses the whole batch, naming it; nothing of it is stored.
    batch["messages"][3]["recipients"][0]["email"] = "no-domain"
    refused = await node.post(batch, "/api/v1/messages/batch")
    assert refused.status_code == 422 and refused.json()["field"] == "messages[3].recipients[0].email"
    await asyncio.sleep(0.3)
    assert len(node.up.received) == 5


async def test_the_pool_asked_for_takes_the_message(node: Node) -> None:
    response = await node.post(message(pool="bulk"))
    assert response.status_code == 202
    await wait_until(lambda: any(e["type"] == "Delivery" for e in node.events()))
    [delivery] = [e for e in node.events() if e["type"] == "Delivery"]
    assert delivery["pool"] == "bulk"


# -- 401 and 403 ---------------------------------------------------------------------------------------


async def test_no_key_or_a_wrong_key_is_401(node: Node) -> None:
    for key in (None, "wrong-key-wrong-key"):
        response = await node.post(message(), key=key)
        assert response.status_code == 401
        assert response.json()["error"] == "missing or unknown API key"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert not node.up.received


async def test_a_sender_domain_or_pool_the_key_may_not_use_is_403(node: Node) -> None:
    cases = [
        (message(envelope_sender="x@other.test"), "envelope_sender"),
        (message(content={"from": {"email": "x@other.test"}, "subject": "s"}), "content.from.email"),
        (message(pool="secret"), "pool"),
    ]
    for body, field in cases:
        response = await node.post(body)
        assert response.status_code == 403, response.text
        assert response.json()["field"] == field
    # A subdomain is allowed by "*.shop.test"; another key with no limits may use any pool.
    assert (await node.post(message(envelope_sender="b@mail.shop.test"))).status_code == 202
    assert (await node.post(message(pool="secret"), key=BLOG_KEY)).status_code == 202


# -- 413 -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["ceo@bank.test", "Shop <n@shop.test>, ceo@bank.test", "not an address"])
async def test_a_from_field_in_headers_is_held_to_the_keys_sender_domains(node: Node, value: str) -> None:
    """A From in `headers` takes content.from's place: a key for shop.test may not send as bank.test."""
    body = message()
    body["content"]["headers"] = {"From": value}
    response = await node.post(body)
    assert response.status_code == 403, response.text
    assert response.json()["field"] == "content.headers.From"
    assert not node.up.received
    body["content"]["headers"] = {"From": "Shop Two <two@mail.shop.test>"}
    assert (await node.post(body)).status_code == 202


async def test_addresses_that_are_not_ascii_go_out_as_utf8_in_an_smtputf8_message(node: Node) -> None:
    """RFC 6531/6532: a UTF-8 address in To, From, Reply-To or a given address field is written as it is,
    and the message is SMTPUTF8 (formataddr took only ASCII: a 500; 7-bit made an encoded word of it)."""
    body = message(recipients=[{"email": "jörg@dest.test", "name": "Jörg"}, {"email": "a@dést.test"}])
    body["content"]["from"] = {"email": "nö@shop.test", "name": 'Shop "Ü"'}
    body["content"]["reply_to"] = {"email": "hilfe@shop.test", "name": "Hilfe"}
    body["content"]["headers"] = {"Cc": "Zoë <zoë@example.test>"}
    response = await node.post(body)
    assert response.status_code == 202, response.text
    # One delivery a domain; the UTF-8 recipients are taken only after MAIL said SMTPUTF8 (RFC 6531 3.4).
    await wait_until(lambda: len(node.up.received) == 2)
    assert sorted(r for got in node.up.received for r in got.recipients) == ["a@dést.test", "jörg@dest.test"]
    got = node.up.received[0]
    parsed = email.message_from_string(got.data.decode(), policy=email.policy.SMTPUTF8)  # UTF-8 fields
    assert parsed["To"].addresses[0].addr_spec == got.recipients[0]
    assert [a.addr_spec for a in parsed["From"].addresses] == ["nö@shop.test"]
    assert parsed["From"].addresses[0].display_name == 'Shop "Ü"'
    assert [a.addr_spec for a in parsed["Cc"].addresses] == ["zoë@example.test"]
    head = got.data.split(b"\r\n\r\n")[0]
    assert "Zoë <zoë@example.test>".encode() in head and b"=?utf-8?" not in head.lower()


async def test_a_date_given_in_headers_is_kept(node: Node) -> None:
    body = message()
    body["content"]["headers"] = {"Date": "Tue, 01 Dec 2026 10:00:00 +0100"}
    assert (await node.post(body)).status_code == 202
    await wait_until(lambda: len(node.up.received) == 1)
    parsed = email.message_from_bytes(node.up.received[0].data, policy=email.policy.SMTP)
    assert parsed["Date"] == "Tue, 01 Dec 2026 10:00:00 +0100"


async def test_a_body_over_the_limit_is_413_before_it_is_read(node: Node) -> None:
    # Content-Length says 10 MB and nothing follows: the answer comes without waiting for the body.
    reader, writer = await asyncio.open_connection("127.0.0.1", node.app.http_port)
    writer.write(
        b"POST /api/v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 10000000\r\n\r\n"
    )
    head = await asyncio.wait_for(reader.read(4096), 5)
    writer.close()
    with contextlib.suppress(OSError):  # the server may reset a connection it did not read to the end
        await writer.wait_closed()
    assert head.startswith(b"HTTP/1.1 413")
    assert b"max_request_size" in head


async def test_a_chunked_body_over_the_limit_is_413_once_counted(node: Node) -> None:
    # No Content-Length: 250 KB arrive in chunks (the limit is 200 KB), and the body never ends.
    reader, writer = await asyncio.open_connection("127.0.0.1", node.app.http_port)
    writer.write(
        b"POST /api/v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {SHOP_KEY}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    )
    for _ in range(25):
        writer.write(b"%x\r\n%s\r\n" % (10_000, b"x" * 10_000))
    await writer.drain()
    head = await asyncio.wait_for(reader.read(4096), 5)
    writer.close()
    with contextlib.suppress(OSError):  # the server may reset a connection it did not read to the end
        await writer.wait_closed()
    assert head.startswith(b"HTTP/1.1 413") and b"max_request_size" in head


async def test_a_message_over_the_size_limit_is_413_naming_the_content(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    up = await upstream("up")
    async with App(settings_for(tmp_path, up, smtp={"max_message_size": 2000})) as app:
        response = await Node(app, up, tmp_path).post(message(content="Subject: big\n\n" + "y\n" * 2000))
    assert response.status_code == 413 and response.json()["field"] == "content"


# -- 422 -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"recipients": [{"email": "alice@"}]}, "recipients[0].email"),
        ({"recipients": [{"email": "a%b@dest.test"}]}, "recipients[0].email"),
        ({"envelope_sender": "bounces@shop.test\r\nBcc: victim@dest.test"}, "envelope_sender"),
        ({"recipients": [{"email": "alice@dest.test", "name": "A\nBcc: v@dest.test"}]}, "recipients[0].name"),
        (
            {"content": {"from": {"email": "n@shop.test"}, "headers": {"X-A": "a\r\nBcc: v@x.test"}}},
            "content.headers",
        ),
        ({"content": {"from": {"email": "n@shop.test"}, "headers": {"Bad Name": "v"}}}, "content.headers"),
        ({"content": {"from": {"email": "n@shop.test"}, "subject": "a\u0000b"}}, "content.subject"),
        (
            {"content": {"from": {"email": "n@shop.test"}, "attachments": [{"data": "%%%"}]}},
            "content.attachments[0].data",
        ),
        ({"content": "Subject: x\r\rbody"}, "content"),
        ({"content": "Subject: x\n\nnul \u0000 here"}, "content"),
        ({"pool": "nowhere"}, "pool"),
        ({"tags": {"bad key": "v"}}, "tags"),
        ({"metadata": {"k": "v\nX-Injected: 1"}}, "metadata"),
        ({"unknown_field": 1}, "unknown_field"),
        ({"recipients": []}, "recipients"),
        ({"envelope_sender": ""}, "envelope_sender"),
        ({"content": {"from": {"email": "n@shop.test"}, "headers": {"Date": "tomorrow"}}}, "content.headers"),
        (
            {
                "content": {
                    "from": {"email": "n@shop.test"},
                    "attachments": [{"data": "", "content_type": "multipart/mixed"}],
                }
            },
            "content.attachments[0].content_type",
        ),
        (
            {
                "content": {
                    "from": {"email": "n@shop.test"},
                    "attachments": [{"data": "", "content_type": "message/rfc822"}],
                }
            },
            "content.attachments[0].content_type",
        ),
    ],
)
async def test_bad_input_is_422_naming_the_field(node: Node, change: dict[str, Any], field: str) -> None:
    response = await node.post(message(**change))
    assert response.status_code == 422, response.text
    answer = response.json()
    assert answer["field"] == field, answer
    assert answer["error"].startswith(field)
    assert not node.up.received


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"content": {"from": {"email": "n@shop.test"}, "text_body": "x\udcfcy"}}, "content.text_body"),
        ({"content": {"from": {"email": "n@shop.test"}, "subject": "x\udcfcy"}}, "content.subject"),
        ({"recipients": [{"email": "alice@dest.test", "name": "A\ud800"}]}, "recipients[0].name"),
        ({"tags": {"k": "x\udcfc"}}, "tags.k"),
        ({"metadata": {"k": "x\udcfc"}}, "metadata.k"),
    ],
)
async def test_a_lone_surrogate_is_422_naming_the_field(
    node: Node, change: dict[str, Any], field: str
) -> None:
    """JSON may escape a lone surrogate, which is no character (RFC 7493 2.1): the text body's was a 500
    from the email package, a tag's was taken into events that no UTF-8 writer could write."""
    async with node.client() as c:
        response = await c.post(
            "/api/v1/messages",
            content=json.dumps(message(**change)).encode(),  # ASCII: the surrogate as a \u escape
            headers={"Content-Type": "application/json"},
        )
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field
    assert not node.up.received


async def test_an_empty_envelope_sender_is_422_saying_why(node: Node) -> None:
    response = await node.post(message(envelope_sender=""))
    assert response.status_code == 422
    assert "null path" in response.json()["error"], response.text  # was "Assertion failed, "


async def test_a_subject_made_multiline_by_a_substitution_is_422(node: Node) -> None:
    body = message(recipients=[{"email": "a@dest.test", "substitutions": {"n": "x\r\nBcc: v@dest.test"}}])
    body["content"]["subject"] = "Hi {{n}}"
    response = await node.post(body)
    assert response.status_code == 422 and response.json()["field"] == "recipients[0].substitutions"


async def test_a_bad_idempotency_key_or_json_is_422(node: Node) -> None:
    response = await node.post(message(), headers={"Idempotency-Key": "has space"})
    assert response.status_code == 422 and response.json()["field"] == "Idempotency-Key"
    async with node.client() as c:
        broken = await c.post(
            "/api/v1/messages", content=b"{not json", headers={"Content-Type": "application/json"}
        )
    assert broken.status_code == 422 and broken.json()["field"] == "body", broken.text


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"envelope_sender": ' + "9" * 5000 + "}"])
async def test_json_nested_too_deep_or_a_number_too_long_is_422_naming_the_body(
    node: Node, text: str
) -> None:
    """FastAPI answers what its JSON parser raises on (RecursionError, the int digit limit) with a bare
    400; the API's table says input that is not JSON it reads is a 422."""
    async with node.client() as c:
        response = await c.post(
            "/api/v1/messages", content=text, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 422, response.text
        assert response.json()["field"] == "body"


async def test_too_many_messages_in_one_request_is_422(node: Node) -> None:
    batch = {"messages": [message() for _ in range(51)]}  # [api] max_batch = 50
    response = await node.post(batch, "/api/v1/messages/batch")
    assert response.status_code == 422 and response.json()["field"] == "messages"


# -- 429 -----------------------------------------------------------------------------------------------


async def test_a_key_over_its_rate_is_429_with_retry_after(node: Node) -> None:
    # blog: 1/min, burst 2. Two go at once, the third waits about a minute.
    for _ in range(2):
        assert (await node.post(message(), key=BLOG_KEY)).status_code == 202
    response = await node.post(message(), key=BLOG_KEY)
    assert response.status_code == 429
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    assert "rate" in response.json()["error"]
    assert (await node.post(message())).status_code == 202  # another key has its own rate


# -- idempotency ---------------------------------------------------------------------------------------


async def test_an_idempotent_replay_answers_the_first_answer_and_stores_nothing(node: Node) -> None:
    headers = {"Idempotency-Key": "order-1234"}
    first = await node.post(message(), headers=headers)
    assert first.status_code == 202
    replays = await asyncio.gather(*(node.post(message(), headers=headers) for _ in range(4)))
    assert all(r.status_code == 202 and r.json() == first.json() for r in replays)
    assert all(r.headers.get("Idempotent-Replayed") == "true" for r in replays)
    other = await node.post(message(recipients=[{"email": "carol@dest.test"}]), headers=headers)
    assert other.status_code == 422 and other.json()["field"] == "Idempotency-Key"
    # The same key from another API key is another request.
    assert (await node.post(message(), headers=headers, key=BLOG_KEY)).json() != first.json()
    await wait_until(lambda: len(node.up.received) == 2)
    await asyncio.sleep(0.3)
    assert len(node.up.received) == 2


async def test_concurrent_requests_with_one_key_store_once(node: Node) -> None:
    headers = {"Idempotency-Key": "race"}
    answers = await asyncio.gather(*(node.post(message(), headers=headers) for _ in range(8)))
    assert {json.dumps(a.json()) for a in answers} == {json.dumps(answers[0].json())}
    await wait_until(lambda: len(node.up.received) == 1)
    await asyncio.sleep(0.3)
    assert len(node.up.received) == 1


# -- spool failures ------------------------------------------------------------------------------------


class FailingStore:
    """The spool's store_all failing as a full disk, or any other error, would (pure stand-in)."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise self.error


@pytest.mark.parametrize(("disk_full", "status"), [(True, 507), (False, 503)])
async def test_a_spool_failure_is_json_with_retry_after(node: Node, disk_full: bool, status: int) -> None:
    node.app.spool.store_all = FailingStore(SpoolError("boom", disk_full=disk_full))  # type: ignore[method-assign]
    response = await node.post(message())
    assert response.status_code == status
    assert response.headers["Retry-After"] == "30"
    assert "nothing was stored" in response.json()["error"]


async def test_a_bug_is_a_json_500_never_a_traceback(node: Node) -> None:
    node.app.spool.store_all = FailingStore(RuntimeError("a bug"))  # type: ignore[method-assign,arg-type]
    response = await node.post(message())
    assert response.status_code == 500
    assert response.json() == {"error": "local error in processing; see postmux's log"}


async def test_a_500_leaves_the_connection_open_for_the_next_request(node: Node) -> None:
    """The 500 used to reach Starlette's outermost middleware, which raised again after answering, and
    uvicorn then closed the connection: a client reusing it saw its next request reset. On one raw
    connection (an HTTP client would quietly open another), the next request is answered."""
    node.app.spool.store_all = FailingStore(RuntimeError("a bug"))  # type: ignore[method-assign,arg-type]
    body = json.dumps(message()).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", node.app.http_port)
    try:
        writer.write(
            b"POST /api/v1/messages HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {SHOP_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert (await _response(reader))[0] == 500
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        assert await _response(reader) == (200, b'{"status":"ok"}')
    finally:
        writer.close()


async def _response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One HTTP/1.1 response with a Content-Length: its status and body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status = int(head.split(b" ", 2)[1])
    length = next(
        int(line.split(b":")[1])
        for line in head.lower().split(b"\r\n")
        if line.startswith(b"content-length:")
    )
    return status, await reader.readexactly(length)


async def test_the_submission_api_needs_no_admin_token_and_the_admin_api_no_api_key(node: Node) -> None:
    async with node.client() as c:
        assert (await c.get("/api/v1/members")).status_code == 403  # admin API off: no admin_token
        doc = await c.get("/api/v1/openapi.json")
    assert doc.status_code == 200
    paths = doc.json()["paths"]
    assert {"/api/v1/messages", "/api/v1/messages/batch", "/api/v1/members"} <= set(paths)
    assert set(paths["/api/v1/messages"]["post"]["responses"]) >= {
        "202",
        "401",
        "403",
        "413",
        "422",
        "429",
        "503",
        "507",
    }


async def test_a_reload_takes_new_keys_and_drops_removed_ones(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    up = await upstream("up")
    cfg = tmp_path / "postmux.toml"

    def write(name: str, key_hash: str) -> None:
        cfg.write_text(
            f"""
[smtp]
listen = "127.0.0.1:0"
hostname = "postmux.test"
[http]
listen = "127.0.0.1:0"
[spool]
path = "{tmp_path / "spool.db"}"
[events]
log = "{tmp_path / "events.jsonl"}"
[[pool]]
name = "default"
members = [{{ name = "a", address = "{up.address}" }}]
[[api_key]]
name = "{name}"
hash = "{key_hash}"
"""
        )

    write("shop", SHOP_HASH)
    async with App(load_config(cfg), config_path=cfg) as app:
        node = Node(app, up, tmp_path)
        assert (await node.post(message())).status_code == 202
        assert (await node.post(message(), key=BLOG_KEY)).status_code == 401
        write("blog", BLOG_HASH)
        assert (await app.reload()).ok
        assert (await node.post(message(), key=BLOG_KEY)).status_code == 202
        assert (await node.post(message())).status_code == 401  # remembered no longer: the key is gone


async def test_a_batchs_events_reach_a_webhook_with_their_tags(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    up = await upstream("up")
    receiver = await Receiver(secret=WEBHOOK_SECRET).start()
    try:
        hook = {"name": "each", "url": receiver.url("/each"), "secret": WEBHOOK_SECRET}
        async with App(settings_for(tmp_path, up, webhook=[hook])) as app:
            batch = {
                "messages": [
                    message(
                        recipients=[{"email": f"u{i}@dest.test"}], tags={"n": str(i)}, metadata={"k": "v"}
                    )
                    for i in range(3)
                ]
            }
            response = await Node(app, up, tmp_path).post(batch, "/api/v1/messages/batch")
            assert response.status_code == 202
            ids = {r["messages"][0]["id"] for r in response.json()["results"]}
            await wait_until(lambda: len(receiver.records("/each")) >= 6, timeout=10)
        records = receiver.records("/each")
        assert receiver.bad_signatures == []
        assert {(r["id"], r["type"]) for r in records} == {
            (i, t) for i in ids for t in ("Reception", "Delivery")
        }
        assert all(
            r["metadata"] == {"k": "v"} and r["auth_user"] == "shop"
            for r in records
            if r["type"] == "Reception"
        )
    finally:
        await receiver.stop()
