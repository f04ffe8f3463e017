"""Webhook deciding without sockets: the [[webhook]] keys and their errors, the fan-out of events to
endpoints, the request's body, id and signature, and the backoff between tries."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook

from postmux.config import ConfigError, WebhookSettings, settings_from_dict
from postmux.events.outbox import NO_OUTBOX, Fanout
from postmux.events.types import Event, EventType
from postmux.events.webhooks import backoff_s, body_of, shown_url, sign, webhook_id
from postmux.spool.base import OutboxEntry

POOLS: list[dict[str, Any]] = [{"name": "default", "members": [{"name": "a", "address": "127.0.0.1:2601"}]}]
SECRET = "whsec_" + base64.b64encode(b"s" * 32).decode()


def problems(*hooks: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ConfigError) as caught:
        settings_from_dict({"pool": POOLS, "webhook": list(hooks)}, "postmux.toml")
    return dict(caught.value.problems)


def endpoint(**keys: Any) -> WebhookSettings:
    return WebhookSettings.model_validate({"name": "hooks", "url": "http://127.0.0.1:9/h", **keys})


def test_defaults_are_one_signed_record_per_request_of_every_message_event() -> None:
    hook = endpoint(secret=SECRET)
    assert hook.batch_size == 1 and hook.batch_wait == 0.0
    assert set(hook.events) == {
        *(
            "Reception",
            "Delivery",
            "TransientFailure",
            "Bounce",
            "Expiration",
            "Held",
            "Suppressed",
            "Unsubscribe",
        )
    }
    assert hook.signing_secret == SECRET
    assert SECRET not in repr(hook)  # never shown in a log or a dump


def test_the_secret_can_come_from_a_file_so_the_config_need_not_hold_it(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text(SECRET + "\n")
    assert endpoint(secret_file=str(path)).signing_secret == SECRET


@pytest.mark.parametrize(
    ("keys", "key", "reason"),
    [
        ({"url": "ftp://127.0.0.1/x"}, "webhook[0].url", "http:// or https://"),
        ({"url": "http:///path"}, "webhook[0].url", "with a host"),
        ({"name": "two words"}, "webhook[0].name", "is not a webhook name"),
        ({"events": ["Delivered"]}, "webhook[0].events[0]", "Input should be"),
        ({"events": []}, "webhook[0].events", "at least one event type"),
        ({"batch_size": 0}, "webhook[0].batch_size", "greater than or equal to 1"),
        ({"timeout": "0s"}, "webhook[0].timeout", "greater than 0"),
        ({"secret": "s3cret"}, "webhook[0].secret", "starts with 'whsec_'"),
        ({"secret": "whsec_!!!"}, "webhook[0].secret", "not base64"),
        ({"secret": "whsec_" + base64.b64encode(b"short").decode()}, "webhook[0].secret", "24 to 64"),
        ({"secret_file": "/nonexistent/secret"}, "webhook[0].secret_file", "cannot be read"),
        ({"min_backoff": "10m", "max_backoff": "1s"}, "webhook[0]", "min_backoff is longer"),
        ({"color": "red"}, "webhook[0].color", "Extra inputs"),
    ],
)
def test_each_mistake_names_its_key(keys: dict[str, Any], key: str, reason: str) -> None:
    found = problems({"name": "hooks", "url": "http://127.0.0.1:9/h", **keys})
    assert key in found, found
    assert reason in found[key]
    assert "s3cret" not in found[key]  # a wrong secret is not echoed


def test_a_secret_file_is_read_and_checked_and_not_given_beside_a_secret(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("not-a-secret\n")
    found = problems({"name": "h", "url": "http://127.0.0.1:9/h", "secret_file": str(path)})
    assert found["webhook[0].secret_file"].startswith(f"{str(path)!r} does not hold a usable secret: ")
    assert "not-a-secret" not in found["webhook[0].secret_file"]
    path.write_text(SECRET)
    found = problems({"name": "h", "url": "http://127.0.0.1:9/h", "secret_file": str(path), "secret": SECRET})
    assert found == {"webhook[0]": "give secret or secret_file, not both"}


def test_two_endpoints_may_not_share_a_name() -> None:
    found = problems(
        {"name": "a", "url": "http://127.0.0.1:9/1"}, {"name": "a", "url": "http://127.0.0.1:9/2"}
    )
    assert found == {"webhook": "webhook names must be unique; repeated: a"}


def test_fanout_gives_each_endpoint_the_types_it_asked_for_in_order() -> None:
    fanout = Fanout(
        [endpoint(name="all"), endpoint(name="done", events=["Delivery", "MemberDown"])], lambda: 7.0
    )
    events = [Event(EventType.RECEPTION, id="m1", recipient="a@x.test"), Event(EventType.DELIVERY, id="m1")]
    rows = fanout.rows(events)
    assert [(r.endpoint, r.event_id) for r in rows] == [
        ("all", events[0].event_id),
        ("all", events[1].event_id),
        ("done", events[1].event_id),
    ]
    assert json.loads(rows[0].record) == events[0].as_record()  # the event log's shape
    assert rows[1].record is rows[2].record  # encoded once, whatever the number of endpoints
    assert all(r.created == 7.0 for r in rows)
    assert not fanout.wants(EventType.MEMBER_UP) and fanout.wants(EventType.MEMBER_DOWN)


def test_with_no_endpoint_nothing_is_encoded() -> None:
    assert Fanout([]).rows([Event(EventType.DELIVERY, id="m1")]) == []
    assert NO_OUTBOX.rows([Event(EventType.DELIVERY, id="m1")]) == ()


def entries(*ids: str) -> list[OutboxEntry]:
    return [
        OutboxEntry(i + 1, event_id, json.dumps({"event_id": event_id}), 0.0)
        for i, event_id in enumerate(ids)
    ]


def test_one_record_is_an_object_and_a_batch_an_array_of_the_stored_text() -> None:
    assert json.loads(body_of(entries("e1"), as_array=False)) == {"event_id": "e1"}
    assert json.loads(body_of(entries("e1"), as_array=True)) == [{"event_id": "e1"}]
    assert json.loads(body_of(entries("e1", "e2"), as_array=True)) == [{"event_id": "e1"}, {"event_id": "e2"}]
    assert webhook_id(entries("e1")) == "e1"
    assert webhook_id(entries("e1", "e2", "e3")) == "e1_3"


def test_the_signature_is_the_one_standard_webhooks_verifies() -> None:
    body = body_of(entries("e1", "e2"), as_array=True)
    now = int(time.time())
    headers = {
        "webhook-id": "e1_2",
        "webhook-timestamp": str(now),
        "webhook-signature": sign(SECRET, "e1_2", now, body),
    }
    assert Webhook(SECRET).verify(body, headers) == [{"event_id": "e1"}, {"event_id": "e2"}]
    other = "whsec_" + base64.b64encode(b"o" * 32).decode()
    with pytest.raises(Exception, match="No matching signature"):
        Webhook(other).verify(body, headers)


def test_backoff_doubles_up_to_its_cap_with_half_of_it_random() -> None:
    lowest = [backoff_s(n, 1.0, 30.0, lambda: 0.0) for n in range(1, 8)]
    highest = [backoff_s(n, 1.0, 30.0, lambda: 1.0) for n in range(1, 8)]
    assert highest == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert lowest == [h / 2 for h in highest]
    assert backoff_s(10_000, 1.0, 30.0, lambda: 1.0) == 30.0  # no overflow after days of failures


def test_the_cli_table_shows_backlog_errors_and_endpoints_no_longer_configured() -> None:
    import io

    from rich.console import Console

    from postmux.admin.client import webhooks_table

    rows = [
        {
            "endpoint": "crm",
            "url": "http://127.0.0.1:9/h",
            "configured": True,
            "backlog": 3,
            "oldest_pending_age_s": 0.4,
            "last_success": 1.0,
            "last_success_age_s": 1.0,
            "last_error": "HTTP 503: try later",
            "last_error_age_s": 12.0,
            "failures_in_a_row": 2,
            "next_try_in_s": 0.5,
            "acknowledged": 10,
        },
        {
            "endpoint": "old",
            "url": "",
            "configured": False,
            "backlog": 7,
            "oldest_pending_age_s": 300.0,
            "last_success": None,
            "last_success_age_s": None,
            "last_error": "",
            "last_error_age_s": None,
            "failures_in_a_row": 0,
            "next_try_in_s": None,
            "acknowledged": 0,
        },
    ]
    out = io.StringIO()
    Console(file=out, width=200).print(webhooks_table(rows))
    text = out.getvalue()
    assert "12s ago: HTTP 503: try later (2 in a row)" in text
    assert "old (not configured)" in text and "in 0.5s" in text


def test_a_password_in_the_url_is_never_shown() -> None:
    assert (
        shown_url("https://app:s3cret@hooks.example.com:8443/p?x=1")
        == "https://app:***@hooks.example.com:8443/p?x=1"
    )
    assert shown_url("http://127.0.0.1:9/h") == "http://127.0.0.1:9/h"


def test_the_fanout_and_the_bus_stamp_the_node_on_events_that_have_none() -> None:
    from postmux.events.bus import EventBus

    fanout = Fanout([endpoint(name="all")], lambda: 7.0, node="node-1")
    made_here, from_elsewhere = Event(EventType.DELIVERY, id="m1"), Event(EventType.DELIVERY, node="n2")
    rows = fanout.rows([made_here, from_elsewhere])
    assert [json.loads(r.record)["node"] for r in rows] == ["node-1", "n2"]
    bus, seen = EventBus("node-1"), []
    bus.subscribe(lambda e: seen.append(e.as_record()["node"]))
    bus.emit(Event(EventType.MEMBER_UP))
    assert seen == ["node-1"]
