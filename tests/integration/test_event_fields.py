"""What events say about each message (issue 13, part 4): the Message-ID, the sender's tags and metadata,
who handed it in, and where each attempt went, on the records a sender's tools read."""

from __future__ import annotations

from pathlib import Path

from aiosmtpd.smtp import Envelope as SmtpEnvelope

from postmux.app import App
from postmux.testing import Behaviour, Upstream
from tests.support import StartUpstream, make_settings, read_events, send, wait_until

LABELS = (
    "X-Postmux-Tag: campaign=spring\r\n"
    "X-Postmux-Tag: transactional\r\n"
    "x-postmux-meta: customer = 42\r\n"
    "X-Postmux-Meta: order=A-1\r\n"
    "\tfolded\r\n"
)


async def test_events_carry_the_message_id_labels_client_and_where_the_attempt_went(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    first = await upstream("first", first_deferred())
    pools = [
        {"name": "default", "policy": "round_robin", "members": [{"name": "a", "address": first.address}]}
    ]
    async with App(make_settings(tmp_path, pools)) as app:
        await send(app.smtp_port, "ev1", to=["u@dest.test"], headers=LABELS)
        log = tmp_path / "events.jsonl"
        await wait_until(lambda: any(e["type"] == "Delivery" for e in read_events(log)), 10)
    (received,) = first.received
    # Requests to postmux, not mail: they never reach a member.
    assert b"x-postmux" not in received.data.lower()
    events = read_events(tmp_path / "events.jsonl")
    by_type = {e["type"]: e for e in events}
    tags = {"campaign": "spring", "transactional": ""}
    metadata = {"customer": "42", "order": "A-1 folded"}
    reception, deferral, delivery = by_type["Reception"], by_type["TransientFailure"], by_type["Delivery"]
    assert (reception["client"], reception["helo"], reception["auth_user"]) == (
        "127.0.0.1",
        "client.test",
        "",
    )
    for e in (reception, deferral, delivery):
        assert e["message_id"] == "ev1@example.com"
        assert e["metadata"] == metadata
        assert {k: e["tags"][k] for k in tags} == tags
        assert e["created"] == reception["created"]
    assert delivery["queue_time_s"] >= 1.0 - 0.05  # the retry interval passed between accept and delivery
    host, port = first.address.rsplit(":", 1)
    for attempt in (deferral, delivery):
        assert attempt["peer"] == f"{host}:{port}"
        assert attempt["mx_host"] == first.address  # a relay member: its address; an MX: the MX's name
        assert attempt["source_ip"] == "127.0.0.1"
        assert attempt["tags"]["tls"] == "none"  # the event's own labels beside the sender's
        assert "client" not in attempt  # who handed it in is said once, on Reception
    # A failure's reply is classed (postmux.reputation.bounces); a delivery has no class.
    assert (deferral["bounce_class"], delivery["bounce_class"]) == ("TransientFailure", "")


def first_deferred() -> Behaviour:
    """Defer the first DATA, take the rest: one message gives a TransientFailure and then a Delivery."""
    answers = ["451 4.3.0 try again"]

    async def behaviour(upstream: Upstream, envelope: SmtpEnvelope) -> str | None:
        return answers.pop() if answers else None

    return behaviour
