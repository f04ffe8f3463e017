"""What the submission API builds from a request (ingress/compose.py): pure functions, no sockets."""

from __future__ import annotations

import email
import email.policy
from typing import Any

import pydantic
import pytest

from postmux.ingress.compose import BadInput, Message, Rules, compose, sender_domain_allowed
from postmux.ingress.http import field_name

RULES = Rules(max_message_size=100_000, max_recipients=10, max_hops=5, fold=True, hostname="mx.postmux.test")


def made(content: Any, recipients: list[dict[str, Any]] | None = None, **over: Any) -> list[Any]:
    body = {
        "envelope_sender": "a@shop.test",
        "recipients": recipients or [{"email": "u@dest.test"}],
        "content": content,
    }
    return compose(Message.model_validate({**body, **over}), RULES, 1_700_000_000.0)


def test_raw_content_gets_crlf_and_a_message_id_and_date_only_when_it_has_none() -> None:
    [m] = made("Subject: s\n\nline\n")
    assert m.data.startswith(b"Message-ID: <") and b"@mx.postmux.test>\r\nDate: " in m.data
    assert m.data.endswith(b"Subject: s\r\n\r\nline\r\n")
    [kept] = made(
        "Message-ID: <x@y>\r\nDate: Tue, 1 Jan 2030 00:00:00 +0000\r\n\r\nbody: date: message-id:\r\n"
    )
    assert (
        kept.data
        == b"Message-ID: <x@y>\r\nDate: Tue, 1 Jan 2030 00:00:00 +0000\r\n\r\nbody: date: message-id:\r\n"
    )


def test_long_lines_are_folded_as_over_smtp_or_refused() -> None:
    [m] = made("Subject: s\n\n" + "word " * 400 + "\n")
    assert max(map(len, m.data.split(b"\r\n"))) <= 998
    strict = Rules(100_000, 10, 5, False, "mx.postmux.test")
    with pytest.raises(BadInput) as refused:
        compose(
            Message.model_validate(
                {
                    "envelope_sender": "a@shop.test",
                    "recipients": [{"email": "u@dest.test"}],
                    "content": "x" * 1200,
                }
            ),
            strict,
            0,
        )
    assert refused.value.field == "content"


def test_a_loop_and_an_oversized_message_are_refused_naming_the_content() -> None:
    with pytest.raises(BadInput) as loop:
        made("Received: a\nReceived: b\nReceived: c\nReceived: d\nReceived: e\n\nx\n")
    assert loop.value.field == "content" and "loop" in loop.value.reason
    with pytest.raises(BadInput) as big:
        made("Subject: s\n\n" + "y\n" * 60_000)
    assert big.value.status == 413


def test_recipients_share_a_message_when_their_substitutions_give_the_same_text() -> None:
    rcpts = [
        {"email": "a@dest.test", "substitutions": {"n": "A"}},
        {"email": "b@dest.test", "substitutions": {"n": "B"}},
        {"email": "c@dest.test", "substitutions": {"n": "A"}},
        {"email": "d@dest.test"},
    ]
    out = made("Subject: {{n}}{{missing}}\n\nhi {{ n }}\n", rcpts)
    assert [m.recipients for m in out] == [("a@dest.test", "c@dest.test"), ("b@dest.test",), ("d@dest.test",)]
    assert b"Subject: A\r\n" in out[0].data and b"hi \r\n" in out[2].data


def test_no_substitutions_leaves_braces_alone() -> None:
    [m] = made("Subject: {{n}}\n\n{{x}}\n", [{"email": "a@dest.test"}, {"email": "b@dest.test"}])
    assert b"Subject: {{n}}\r\n" in m.data and m.recipients == ("a@dest.test", "b@dest.test")


def test_structured_content_is_mime_with_crlf_and_headers_that_replace_postmuxs() -> None:
    content = {
        "from": {"email": "n@shop.test", "name": "Shöp"},
        "subject": "Grüße",
        "text_body": "héllo\n",
        "headers": {"To": "list@shop.test", "X-Campaign": "spring", "From": "Other <o@shop.test>"},
    }
    [m] = made(content, [{"email": "a@dest.test"}, {"email": "b@dest.test"}])
    assert m.recipients == ("a@dest.test", "b@dest.test")  # To given: one message for both
    assert m.data.isascii() and b"\n" not in m.data.replace(b"\r\n", b"")
    parsed = email.message_from_bytes(m.data, policy=email.policy.default)
    assert (
        parsed["To"] == "list@shop.test" and parsed["Subject"] == "Grüße" and parsed["X-Campaign"] == "spring"
    )
    assert parsed.get_all("From") == ["Other <o@shop.test>"]
    assert parsed.get_content().replace("\r\n", "\n") == "héllo\n"


@pytest.mark.parametrize(
    "headers", [{"Content-Type": "text/plain"}, {"MIME-Version": "1.0"}, {"Bad:Name": "v"}, {"X": "a\rb"}]
)
def test_structure_headers_bad_names_and_line_breaks_are_refused(headers: dict[str, str]) -> None:
    with pytest.raises(pydantic.ValidationError) as refused:
        made({"from": {"email": "n@shop.test"}, "headers": headers})
    assert field_name(refused.value.errors()[0]["loc"]) == "content.headers"


def test_field_names_are_spelled_as_the_request_spells_them() -> None:
    assert field_name(("body", "messages", 3, "recipients", 0, "email")) == "messages[3].recipients[0].email"
    assert (
        field_name(("body", "content", "structured", "attachments", 1, "data"))
        == "content.attachments[1].data"
    )
    assert field_name(("header", "idempotency-key")) == "Idempotency-Key"


def test_sender_domains_match_exactly_or_by_wildcard() -> None:
    allowed = ("shop.test", "*.mail.test")
    assert sender_domain_allowed("a@SHOP.test", allowed) and sender_domain_allowed("a@x.mail.test", allowed)
    assert not sender_domain_allowed("a@mail.test", allowed) and not sender_domain_allowed(
        "a@evilshop.test", allowed
    )
    assert sender_domain_allowed("a@anything.test", ())
