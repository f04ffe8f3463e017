"""RFC 3464 delivery status notifications: structure, per-recipient fields, header copy, line limits."""

from __future__ import annotations

import email
import email.policy
import email.utils
from email.message import EmailMessage, Message
from pathlib import Path

import pytest

from postmux.body import HEADER_LIMIT, BodyFile
from postmux.delivery.dsn import (
    FailedRecipient,
    build_dsn,
    downgraded,
    original_head,
    original_headers,
    status_code,
    utf8_addr_xtext,
)
from postmux.envelope import Envelope
from postmux.reply import Reply

ARRIVAL = 1_700_000_000.0
NOW = ARRIVAL + 3600.0
MTA = "mx1.postmux.example"
SENDER = "alice@example.org"

HEADERS = (
    b"Received: from client.example.org (client.example.org [192.0.2.7])\r\n"
    b"\tby mx1.postmux.example with ESMTPS; Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=sel;\r\n"
    b"  h=from:to:subject; bh=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=; b=abc\r\n"
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.net, carol@example.com\r\n"
    b"Subject:   =?utf-8?q?caf=C3=A9?=  (odd spacing kept)\r\n"
    b"Message-ID: <orig-1@example.org>\r\n"
)
BODY = b"The secret body: launch code 0000.\r\nSecond line.\r\n"
ORIGINAL = HEADERS + b"\r\n" + BODY

BOB = FailedRecipient("bob@example.net", Reply(550, "5.1.1", "User unknown"), remote_mta="mx.example.net")
CAROL = FailedRecipient("carol@example.com", Reply(421, "4.4.2", "Connection timed out"))


def make(
    failed: tuple[FailedRecipient, ...] = (BOB, CAROL),
    *,
    sender: str = SENDER,
    original: bytes = ORIGINAL,
    expired: bool = False,
) -> Envelope:
    envelope = build_dsn(
        original_sender=sender,
        original_message=original,
        message_id="0123456789abcdef0123",
        failed=failed,
        reporting_mta=MTA,
        arrival=ARRIVAL,
        now=NOW,
        expired=expired,
    )
    assert envelope is not None
    return envelope


def parse(envelope: Envelope) -> EmailMessage:
    message = email.message_from_bytes(envelope.data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def parts(envelope: Envelope) -> list[Message]:
    return as_messages(parse(envelope).get_payload())


def status_blocks(envelope: Envelope) -> list[Message]:
    """The per-message block then one block per recipient, as the email package splits them (it does
    not know RFC 6533's message/global-delivery-status: its blocks are split here the same way)."""
    part = parts(envelope)[1]
    if part.get_content_type() != "message/global-delivery-status":
        return as_messages(part.get_payload())
    # The part's body as written: after its own header, up to the next delimiter.
    after = envelope.data.split(b"Content-Type: message/global-delivery-status\r\n", 1)[1]
    body = after.split(b"\r\n\r\n", 1)[1].split(b"\r\n--=_postmux-dsn-", 1)[0]
    return [
        email.message_from_bytes(block + b"\r\n", policy=email.policy.default)
        for block in body.rstrip(b"\r\n").split(b"\r\n\r\n")
    ]


def as_messages(payload: object) -> list[Message]:
    assert isinstance(payload, list)
    assert all(isinstance(item, Message) for item in payload)
    return payload


def test_the_null_sender_never_gets_a_dsn() -> None:
    assert (
        build_dsn(
            original_sender="",
            original_message=ORIGINAL,
            message_id="q1",
            failed=[BOB],
            reporting_mta=MTA,
            arrival=ARRIVAL,
            now=NOW,
        )
        is None
    )


def test_no_failed_recipient_means_no_dsn() -> None:
    assert (
        build_dsn(
            original_sender=SENDER,
            original_message=ORIGINAL,
            message_id="q1",
            failed=[],
            reporting_mta=MTA,
            arrival=ARRIVAL,
            now=NOW,
        )
        is None
    )


def test_the_dsn_goes_from_the_null_sender_to_the_original_sender() -> None:
    envelope = make()
    assert envelope.sender == ""
    assert envelope.recipients == (SENDER,)
    assert envelope.smtputf8 is False


def test_top_level_headers() -> None:
    envelope = make()
    assert (
        b'\r\nFrom: "Mail Delivery System" <MAILER-DAEMON@mx1.postmux.example>\r\n' in b"\r\n" + envelope.data
    )
    message = parse(envelope)
    assert message["From"].addresses[0].addr_spec == f"MAILER-DAEMON@{MTA}"
    assert message["To"].addresses[0].addr_spec == SENDER
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["MIME-Version"] == "1.0"
    assert email.utils.parsedate_to_datetime(message["Date"]).timestamp() == NOW
    assert message["Message-ID"].startswith("<")
    assert message["Message-ID"].endswith(f"@{MTA}>")


def test_message_ids_are_unique() -> None:
    assert parse(make())["Message-ID"] != parse(make())["Message-ID"]


def test_structure_is_a_three_part_delivery_status_report() -> None:
    message = parse(make())
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in parts(make())] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert parts(make())[0].get_content_charset() == "utf-8"


def test_human_part_lists_each_recipient_and_its_reply() -> None:
    text = parts(make())[0].get_payload(decode=True)
    assert isinstance(text, bytes)
    assert b"<bob@example.net>" in text
    assert b"host mx.example.net said: 550 5.1.1 User unknown" in text
    assert b"<carol@example.com>" in text
    assert b"421 4.4.2 Connection timed out" in text


def test_per_message_fields() -> None:
    per_message = status_blocks(make())[0]
    assert per_message["Reporting-MTA"] == f"dns; {MTA}"
    assert per_message["X-Postmux-Queue-ID"] == "0123456789abcdef0123"
    assert email.utils.parsedate_to_datetime(per_message["Arrival-Date"]).timestamp() == ARRIVAL


def test_per_recipient_fields_for_two_failed_recipients() -> None:
    blocks = status_blocks(make())
    assert len(blocks) == 3
    bob, carol = blocks[1], blocks[2]

    assert bob["Final-Recipient"] == "rfc822; bob@example.net"
    assert bob["Action"] == "failed"
    assert bob["Status"] == "5.1.1"
    assert bob["Remote-MTA"] == "dns; mx.example.net"
    assert bob["Diagnostic-Code"] == "smtp; 550 5.1.1 User unknown"
    assert email.utils.parsedate_to_datetime(bob["Last-Attempt-Date"]).timestamp() == NOW
    assert bob["Will-Retry-Until"] is None

    # A local failure names no remote MTA and carries no SMTP diagnostic from one.
    assert carol["Final-Recipient"] == "rfc822; carol@example.com"
    assert carol["Action"] == "failed"
    assert carol["Status"] == "4.4.2"
    assert carol["Remote-MTA"] is None
    assert carol["Diagnostic-Code"] is None
    assert carol["Will-Retry-Until"] is None


def test_status_defaults_to_a_generic_permanent_failure() -> None:
    rcpt = FailedRecipient("dan@example.com", Reply(550, "", "no such user"), remote_mta="mx.example.com")
    assert status_blocks(make((rcpt,)))[1]["Status"] == "5.0.0"
    assert status_code(Reply(550, "not-a-code", "x"), expired=False) == "5.0.0"


def test_expired_with_a_transient_last_reply_gets_4_4_7() -> None:
    envelope = make((CAROL,), expired=True)
    assert parse(envelope)["Subject"].startswith("Delivery expired:")
    assert status_blocks(envelope)[1]["Status"] == "4.4.7"
    assert status_code(Reply(451, "", "try later"), expired=True) == "4.4.7"


def test_expired_with_a_permanent_last_reply_keeps_its_code() -> None:
    assert status_blocks(make((BOB,), expired=True))[1]["Status"] == "5.1.1"


def test_original_headers_are_copied_byte_for_byte_without_the_body() -> None:
    envelope = make()
    assert HEADERS in envelope.data
    assert parts(envelope)[2].get_payload(decode=True) == HEADERS
    assert b"secret body" not in envelope.data
    assert b"Second line." not in envelope.data


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (b"A: 1\r\nB: 2\r\n\r\nbody\r\n", b"A: 1\r\nB: 2\r\n"),
        (b"A: 1\nB: 2\n\nbody\n", b"A: 1\r\nB: 2\r\n"),
        (b"A: 1\r\nB: 2\r\n", b"A: 1\r\nB: 2\r\n"),  # no separator: all headers
        (b"A: 1\r\nB: 2", b"A: 1\r\nB: 2\r\n"),
        (b"\r\nonly a body\r\n", b""),
    ],
)
def test_header_block_extraction(message: bytes, expected: bytes) -> None:
    assert original_headers(message) == expected


def test_bare_lf_original_still_gives_a_crlf_dsn_without_the_body() -> None:
    envelope = make(original=b"From: a@example.org\nSubject: hi\n\nprivate body\n")
    assert b"From: a@example.org\r\nSubject: hi\r\n" in envelope.data
    assert b"private body" not in envelope.data
    assert_crlf_and_short_lines(envelope.data)


@pytest.mark.parametrize("text", ["x" * 5000, " ".join(["word"] * 1000), "é" * 5000])
def test_long_reply_text_keeps_lines_under_998_octets(text: str) -> None:
    rcpt = FailedRecipient("bob@example.net", Reply(550, "5.7.1", text), remote_mta="mx.example.net")
    envelope = make((rcpt,))
    assert_crlf_and_short_lines(envelope.data)
    diagnostic = status_blocks(envelope)[1]["Diagnostic-Code"]
    assert diagnostic.startswith("smtp; 550 5.7.1 ")


def test_normal_dsn_has_crlf_line_ends_and_short_lines() -> None:
    assert_crlf_and_short_lines(make().data)


def test_reply_text_cannot_inject_header_fields() -> None:
    rcpt = FailedRecipient(
        "bob@example.net", Reply(550, "5.1.1", "no\r\nStatus: 2.0.0\r\n\r\nx"), remote_mta="mx.example.net"
    )
    envelope = make((rcpt,))
    assert b"\r\nStatus: 2.0.0" not in envelope.data
    assert status_blocks(envelope)[1]["Status"] == "5.1.1"
    assert_crlf_and_short_lines(envelope.data)


def test_utf8_sender_needs_smtputf8() -> None:
    envelope = make(sender="rené@exemple.fr")
    assert envelope.smtputf8 is True
    assert envelope.recipients == ("rené@exemple.fr",)
    assert "rené@exemple.fr".encode() in envelope.data


def assert_crlf_and_short_lines(data: bytes) -> None:
    assert data.endswith(b"\r\n")
    for line in data[:-2].split(b"\r\n"):
        assert b"\r" not in line and b"\n" not in line, line[:80]
        assert len(line) <= 998, len(line)


# -- a text whose header section goes on into a tail in a file (postmux.body) ----------------------------


def test_original_head_is_data_when_the_header_section_ends_there(tmp_path: Path) -> None:
    data = ORIGINAL
    tail = BodyFile(str(tmp_path / "gone"), 0, 10)  # never read
    assert original_head(data, tail) is data
    assert original_head(data, None) is data


@pytest.mark.parametrize(
    ("data", "tail"),
    [
        (b"", HEADERS + b"\r\n" + BODY),  # all of it in the tail
        (HEADERS[:40], HEADERS[40:] + b"\r\n" + BODY),  # cut inside a field
        (HEADERS + b"\r", b"\n" + BODY),  # the empty line's CRLF cut in two
    ],
    ids=["all-in-tail", "cut-in-a-field", "crlf-cut"],
)
def test_a_header_section_going_on_into_the_tail_reaches_the_dsn(
    tmp_path: Path, data: bytes, tail: bytes
) -> None:
    path = tmp_path / "tail"
    path.write_bytes(tail + b"x" * HEADER_LIMIT * 3)  # a long body: only HEADER_LIMIT of it is read
    head = original_head(data, BodyFile(str(path), 0, len(tail) + HEADER_LIMIT * 3))
    assert len(head) <= len(data) + HEADER_LIMIT
    assert original_headers(head) == HEADERS
    dsn = make(original=head)
    assert HEADERS in dsn.data and b"launch code" not in dsn.data


def test_a_tail_that_cannot_be_read_leaves_the_headers_in_data(tmp_path: Path) -> None:
    head = original_head(HEADERS, BodyFile(str(tmp_path / "gone"), 0, 100))
    assert head == HEADERS
    assert HEADERS in make(original=head).data  # the sender still hears of the failure


@pytest.mark.parametrize(
    ("remote", "host"),
    [
        ("127.0.0.1:49846", "127.0.0.1"),
        ("relay.example:2525", "relay.example"),
        ("mx.example.net", "mx.example.net"),
        ("[2001:db8::1]:25", "2001:db8::1"),
        ("2001:db8::1", "2001:db8::1"),
    ],
)
def test_remote_mta_is_a_host_without_its_port(remote: str, host: str) -> None:
    # RFC 3464 2.3.5: the "dns" name type holds a host name; "host:port" is neither a name nor an address.
    rcpt = FailedRecipient("bob@example.net", Reply(550, "5.1.1", "User unknown"), remote_mta=remote)
    assert status_blocks(make((rcpt,)))[1]["Remote-MTA"] == f"dns; {host}"


def test_bounced_and_expired_recipients_in_one_report_keep_their_own_status() -> None:
    expired = FailedRecipient("carol@example.com", Reply(451, "4.2.0", "try later"), expired=True)
    envelope = make((BOB, expired))
    assert parse(envelope)["Subject"] == "Undelivered Mail Returned to Sender"  # not all of them expired
    assert [b["Status"] for b in status_blocks(envelope)[1:]] == ["5.1.1", "4.4.7"]


# -- RFC 6533: internationalized reports ----------------------------------------------------------------

JOERG = FailedRecipient(
    "jörg@dest.test", Reply(550, "5.1.1", "<jörg@dest.test>: Empfänger unbekannt"), remote_mta="mx.dest.test"
)


def test_a_utf8_recipient_makes_a_global_report_with_the_utf8_address_type() -> None:
    # Review 7, RFC 6533 3: message/global-delivery-status, "utf-8" for the non-ASCII address only.
    envelope = make((JOERG, BOB))
    assert [p.get_content_type() for p in parts(envelope)] == [
        "text/plain",
        "message/global-delivery-status",
        "message/global-headers",
    ]
    joerg, bob = status_blocks(envelope)[1:]
    assert joerg["Final-Recipient"] == "utf-8; jörg@dest.test"
    assert joerg["Diagnostic-Code"] == "smtp; 550 5.1.1 <jörg@dest.test>: Empfänger unbekannt"
    assert bob["Final-Recipient"] == "rfc822; bob@example.net"
    assert parse(envelope).get_param("report-type") == "delivery-status"  # RFC 6533 keeps the type
    assert envelope.smtputf8  # sent with SMTPUTF8 where the next hop offers it


@pytest.mark.parametrize(
    "case",
    [
        FailedRecipient("bob@example.net", Reply(550, "5.1.1", "Benutzer unbekannt – désolé")),
        "utf-8 headers",
    ],
)
def test_a_utf8_diagnostic_or_utf8_headers_make_a_global_report(case: FailedRecipient | str) -> None:
    if isinstance(case, FailedRecipient):
        envelope = make((case,))
    else:
        envelope = make((BOB,), original="Subject: Grüße\r\n\r\nbody\r\n".encode())
    assert [p.get_content_type() for p in parts(envelope)][1:] == [
        "message/global-delivery-status",
        "message/global-headers",
    ]


def test_an_ascii_report_stays_a_plain_delivery_status() -> None:
    envelope = make()
    assert b"message/global" not in envelope.data and not envelope.smtputf8
    assert downgraded(envelope.data) is None  # nothing to downgrade: it goes as it is


@pytest.mark.parametrize(
    ("text", "xtext"),
    [
        ("jörg@dest.test", "j\\x{F6}rg@dest.test"),
        ("a+b=c\\d@x", "a\\x{2B}b\\x{3D}c\\x{5C}d@x"),
        ("用户@例子", "\\x{7528}\\x{6237}@\\x{4F8B}\\x{5B50}"),
    ],
)
def test_utf8_addr_xtext(text: str, xtext: str) -> None:
    assert utf8_addr_xtext(text) == xtext


def test_a_global_report_downgraded_for_a_hop_without_smtputf8_has_an_ascii_delivery_status() -> None:
    # RFC 6533 6: message/delivery-status is ASCII; the UTF-8 address keeps its type in xtext form.
    original = make((JOERG, BOB), original="Subject: Grüße\r\n\r\nbody\r\n".encode())
    data = downgraded(original.data)
    assert data is not None
    envelope = Envelope(sender="", recipients=original.recipients, data=data)
    assert [p.get_content_type() for p in parts(envelope)] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    status = data.split(b"Content-Type: message/delivery-status\r\n")[1].split(b"\r\n--=_postmux")[0]
    assert status.isascii()
    joerg, bob = status_blocks(envelope)[1:]
    assert joerg["Final-Recipient"] == "utf-8; j\\x{F6}rg@dest.test"
    assert joerg["Diagnostic-Code"] == "smtp; 550 5.1.1 <j\\x{F6}rg@dest.test>: Empf\\x{E4}nger unbekannt"
    assert joerg["Remote-MTA"] == "dns; mx.dest.test" and joerg["Status"] == "5.1.1"
    assert bob["Final-Recipient"] == "rfc822; bob@example.net"
    assert "Subject: Grüße".encode() in data  # the sender's header fields as received, 8bit (RFC 6152)
    assert_crlf_and_short_lines(data)
    assert data.split(b"\r\n\r\n")[0] == original.data.split(b"\r\n\r\n")[0]  # same top header
