"""VERP return paths and the reading of returned mail: DSNs (RFC 3464), ARF reports (RFC 5965), and
bounces that are neither (GNU Mailman's detectors)."""

from __future__ import annotations

import base64
import quopri
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postmux.config import ConfigError, VerpSettings, settings_from_dict
from postmux.reputation.returns import Report, is_complaint, match, read_report
from postmux.reputation.verp import VerpCodec

SECRET = b"0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def codec(tmp_path_factory: pytest.TempPathFactory) -> VerpCodec:
    path = tmp_path_factory.mktemp("verp") / "verp.secret"
    path.write_bytes(SECRET)
    return VerpCodec(VerpSettings(domain="bounces.example.com", secret_file=str(path)))


def test_a_return_path_names_the_message_and_the_recipient(codec: VerpCodec) -> None:
    path = codec.return_path("0193a5f2c8b1deadbeef", "Jane.Doe+news@Dest.example")
    assert path is not None
    local, _, domain = path.rpartition("@")
    assert domain == "bounces.example.com" and local.startswith("b.0193a5f2c8b1deadbeef.")
    assert local.endswith(".jane.doe+news=dest.example")
    sent = codec.read(path)
    assert sent is not None
    assert (sent.message_id, sent.recipient) == ("0193a5f2c8b1deadbeef", "jane.doe+news@dest.example")
    assert codec.read(path.upper()) == sent  # a local part whose case was folded on the way still reads


ATEXT = "abcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+/=?^_`{|}~-"


@given(
    st.text(ATEXT, min_size=1, max_size=20),
    st.text(ATEXT, min_size=1, max_size=20),
    st.from_regex(r"[a-z0-9]{1,10}\.[a-z]{2,6}", fullmatch=True),
)
def test_any_dot_atom_recipient_reads_back(codec: VerpCodec, a: str, b: str, domain: str) -> None:
    recipient = f"{a}.{b}@{domain}"
    path = codec.return_path("0193a5f2c8b1deadbeef", recipient)
    assert path is not None
    sent = codec.read(path)
    assert sent is not None and sent.recipient == recipient.lower()


def test_a_forged_or_altered_return_path_reads_as_nothing(codec: VerpCodec) -> None:
    path = codec.return_path("0193a5f2c8b1deadbeef", "user@dest.example")
    assert path is not None
    assert codec.read(path.replace("user=dest", "other=dest")) is None  # another recipient, same mac
    assert codec.read(path.replace("0193a5f2c8b1", "0193a5f2c8b2")) is None  # another message
    assert codec.read("b.0193a5f2c8b1deadbeef.aaaaaaaaaaaaaaaa.user=dest.example@bounces.example.com") is None
    assert codec.read(path.replace("bounces.example.com", "elsewhere.example")) is None
    assert codec.read("postmaster@bounces.example.com") is None


def test_a_quoted_local_part_keeps_the_plain_sender(codec: VerpCodec) -> None:
    assert codec.return_path("0193a5f2c8b1deadbeef", '"john doe"@dest.example') is None


def test_verp_needs_a_readable_secret_of_16_octets(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_bytes(b"tooshort")
    base = {"pool": [{"name": "default", "members": [{"name": "a", "address": "127.0.0.1:25"}]}]}
    for verp, why in [
        ({"domain": "b.example"}, "needs a secret_file"),
        ({"domain": "b.example", "secret_file": str(short)}, "16 or more"),
        ({"domain": "b.example", "secret_file": str(tmp_path / "none")}, "cannot be read"),
        ({"domain": "b.example", "secret_file": str(short), "pools": ["nope"]}, "16 or more"),
    ]:
        with pytest.raises(ConfigError, match=why):
            settings_from_dict({**base, "verp": verp})
    (tmp_path / "good").write_bytes(SECRET)
    with pytest.raises(ConfigError, match="no pool named 'nope'"):
        settings_from_dict(
            {
                **base,
                "verp": {"domain": "b.example", "secret_file": str(tmp_path / "good"), "pools": ["nope"]},
            }
        )


POSTFIX_DSN = b"""\
From: MAILER-DAEMON@mx.dest.example (Mail Delivery System)
Subject: Undelivered Mail Returned to Sender
To: b.0193a5f2c8b1deadbeef.xxxx.user=dest.example@bounces.example.com
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status;
\tboundary="B1"

--B1
Content-Description: Notification
Content-Type: text/plain; charset=us-ascii

This is the mail system at host mx.dest.example.

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients.

<user@dest.example>: host store.dest.example[10.0.0.5] said: 550 5.1.1
    <user@dest.example>: Recipient address rejected: User unknown in local
    recipient table (in reply to RCPT TO command)

--B1
Content-Description: Delivery report
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.dest.example
X-Postfix-Queue-ID: 4F3A2B1C
Arrival-Date: Mon, 30 Nov 2026 20:00:00 +0000 (UTC)

Final-Recipient: rfc822; user@dest.example
Original-Recipient: rfc822;user@dest.example
Action: failed
Status: 5.1.1
Remote-MTA: dns; store.dest.example
Diagnostic-Code: smtp; 550 5.1.1 <user@dest.example>: Recipient address rejected:
    User unknown in local recipient table

Final-Recipient: rfc822; slow@dest.example
Action: delayed
Status: 4.4.1
Diagnostic-Code: X-Postfix; connect to store.dest.example[10.0.0.5]:25: Connection timed out

--B1
Content-Description: Undelivered Message Headers
Content-Type: text/rfc822-headers

Return-Path: <b.0193a5f2c8b1deadbeef.xxxx.user=dest.example@bounces.example.com>
From: news@example.com
To: user@dest.example
Subject: hello

--B1--
""".replace(b"\n", b"\r\n")


def test_a_dsn_says_who_failed_why_and_who_is_still_tried() -> None:
    failed, delayed = read_report(POSTFIX_DSN)
    assert (failed.kind, failed.recipient, failed.status) == ("bounce", "user@dest.example", "5.1.1")
    assert failed.reporting_mta == "mx.dest.example"
    assert failed.return_path.startswith("b.0193a5f2c8b1deadbeef.")
    reply = failed.reply()
    assert (reply.code, reply.enhanced_code) == (550, "5.1.1")
    assert reply.text.startswith("<user@dest.example>: Recipient address rejected: User unknown")
    assert (delayed.kind, delayed.recipient, delayed.status) == ("delayed", "slow@dest.example", "4.4.1")


ARF = b"""\
From: <staff@hotmail.example>
To: <fbl@bounces.example.com>
Subject: complaint about message from 192.0.2.10
MIME-Version: 1.0
Content-Type: multipart/report; report-type=feedback-report;
\tboundary="part1"

--part1
Content-Type: text/plain; charset="US-ASCII"

This is an email abuse report for an email message received from IP 192.0.2.10.

--part1
Content-Type: message/feedback-report

Feedback-Type: abuse
User-Agent: SomeGenerator/1.0
Version: 1
Original-Mail-From: <b.0193a5f2c8b1deadbeef.xxxx.user=dest.example@bounces.example.com>
Original-Rcpt-To: <user@dest.example>
Arrival-Date: Mon, 30 Nov 2026 20:00:00 +0000
Source-IP: 192.0.2.10
Reported-Domain: example.com

--part1
Content-Type: message/rfc822
Content-Disposition: inline

Return-Path: <b.0193a5f2c8b1deadbeef.xxxx.user=dest.example@bounces.example.com>
From: <news@example.com>
To: <user@dest.example>
Subject: buy now

Spam body.
--part1--
""".replace(b"\n", b"\r\n")


def test_an_arf_report_is_a_complaint_with_its_source_ip() -> None:
    (report,) = read_report(ARF)
    assert report.kind == "complaint" and report.feedback_type == "abuse"
    assert report.recipient == "user@dest.example" and report.source_ip == "192.0.2.10"
    assert report.return_path.startswith("b.0193a5f2c8b1deadbeef.")


def test_the_feedback_type_says_whether_a_report_is_a_complaint() -> None:
    """RFC 5965 7.3: abuse, fraud and virus call the message abuse; not-spam says the opposite, auth-failure
    (RFC 6591) is about the sender's authentication, other says neither. No type at all: abuse."""
    for kind, complaint in [
        ("abuse", True),
        ("fraud", True),
        ("virus", True),
        ("", True),
        ("not-spam", False),
        ("auth-failure", False),
        ("other", False),
        ("opt-out", False),
    ]:
        assert is_complaint(kind) is complaint, kind
    text = ARF.replace(b"Feedback-Type: abuse\r\n", b"Feedback-Type: Auth-Failure\r\nAuth-Failure: DKIM\r\n")
    (report,) = read_report(text)
    assert (report.kind, report.feedback_type, report.auth_failure) == ("complaint", "auth-failure", "dkim")


QMAIL = b"""\
From: MAILER-DAEMON@mail.dest.example
To: b.x@bounces.example.com
Subject: failure notice

Hi. This is the qmail-send program at mail.dest.example.
I'm afraid I wasn't able to deliver your message to the following addresses.
This is a permanent error; I've given up. Sorry it didn't work out.

<gone@dest.example>:
Sorry, no mailbox here by that name. (#5.1.1)

--- Below this line is a copy of the message.
""".replace(b"\n", b"\r\n")


def test_a_bounce_that_is_no_dsn_is_read_by_mailmans_detectors() -> None:
    (report,) = read_report(QMAIL)
    assert (report.kind, report.recipient) == ("bounce", "gone@dest.example")
    assert report.reply().code == 550


def test_reports_match_through_the_return_path_they_were_sent_to_or_carry(codec: VerpCodec) -> None:
    path = codec.return_path("0193a5f2c8b1deadbeef", "user@dest.example")
    assert path is not None
    bounce = Report("bounce", "user@dest.example", "5.1.1")
    # Sent to the return path itself.
    (m,) = match([bounce], [path], codec)
    assert (m.sent.message_id, m.sent.recipient) == ("0193a5f2c8b1deadbeef", "user@dest.example")
    # Sent to another address of the domain (a feedback loop's), the original's Return-Path names it.
    complaint = Report("complaint", "", return_path=path)
    assert match([complaint], ["fbl@bounces.example.com"], codec)[0].sent == m.sent
    # Neither: nothing to act on (a forged report, or one about mail that was not ours).
    assert match([bounce], ["fbl@bounces.example.com"], codec) == []


def test_a_report_of_several_blocks_is_one_outcome_for_the_return_paths_recipient(codec: VerpCodec) -> None:
    """RFC 3464 2.3: a block per recipient. With VERP the report is about the one recipient the return path
    names: its own block if the report has one (Final-Recipient or Original-Recipient), else the worst."""
    path = codec.return_path("0193a5f2c8b1deadbeef", "user@dest.example")
    assert path is not None
    own = Report("bounce", "forwarded@elsewhere.example", "5.2.2", original_recipient="User@dest.example")
    others = [
        Report("delayed", "v1@dest.example", "4.4.1"),
        Report("bounce", "v2@dest.example", "4.4.7"),
        Report("bounce", "v3@other.example", "5.1.1"),
        Report("bounce", "v4@other.example", "5.7.1"),
    ]
    (m,) = match([*others, own], [path], codec)
    assert m.report is own and m.sent.recipient == "user@dest.example"
    (m,) = match(others, [path], codec)
    assert m.report is others[2]  # failed before delayed, 5.x.x before 4.x.x, the first of equals
    # The recipient's own block says delivered: that is its outcome, whatever the others say.
    delivered = Report("delivered", "user@dest.example", "2.0.0")
    (m,) = match([*others, delivered], [path], codec)
    assert m.report is delivered


# An auto-reply with no From: field, and one whose From: is raw UTF-8 (RFC 6532): flufl.bounce's detectors
# raised on both (an IndexError in its Yale detector; `.lower()` on the Header compat32 made of 8-bit text).
NO_FROM = b"Subject: Auto reply\r\nTo: b.x@bounces.example.com\r\n\r\nI am away.\r\n"
UTF8_FROM = "From: Jérôme <jerome@dest.example>\r\nSubject: Re: hi\r\n\r\nMerci.\r\n".encode()


def test_a_text_the_bounce_detectors_fail_on_is_read_as_no_bounce() -> None:
    assert read_report(NO_FROM) == []
    assert read_report(UTF8_FROM) == []
    # Truncated or unbounded reports, as the reviewer's mutations of real DSNs and ARF reports made them.
    assert read_report(POSTFIX_DSN[:700]) == []
    unbounded = b"Content-Type: multipart/report; report-type=delivery-status\r\n\r\nno boundary\r\n"
    assert read_report(unbounded) == []


def test_a_utf8_field_is_read_as_text() -> None:
    # A DSN whose recipient is raw UTF-8 in an rfc822-typed field (what some MTAs write): text, not a Header.
    dsn = POSTFIX_DSN.replace(b"rfc822; user@dest.example", "rfc822; jörg@dest.example".encode())
    failed, _ = read_report(dsn)
    assert failed.recipient == "jörg@dest.example"


# What damaged reports are made of: line ends, boundaries, structure, 8-bit and RFC 2047 garbage.
TOKENS = (
    b"\r\n",
    b"\r\n\r\n",
    b"--B1\r\n",
    b"--B1--",
    b"--part1\r\n",
    b"=?utf-8?q?=FF?=",
    b"=?x-unknown?b?////?=",
    b"\xff",
    b"\xc3",
    b";",
    b'"',
    b":",
    b"From: \r\n",
    b"From: J\xc3\xa9r\xc3\xb4me <\xc3\xa9@x>\r\n",
    b"Content-Type: message/rfc822\r\n\r\n",
    b"Content-Type: message/global\r\n",
    b"Content-Type: message/global-headers\r\n",
    b"Content-Type: message/global-delivery-status\r\n",
    b"Content-Type: multipart/report; report-type=delivery-status; boundary=B1\r\n\r\n",
    b"Content-Transfer-Encoding: base64\r\n",
    b"Content-Transfer-Encoding: quoted-printable\r\n",
    b"Final-Recipient: utf-8; \\x{110000}\\x{D800}@x\r\n",
)


# RFC 6533: the DSN Postfix writes when the bounced message needed SMTPUTF8 (as out/dsn/0016.eml of the
# review): message/global-delivery-status, utf-8 address types, message/global-headers.
GLOBAL_DSN = """\
From: MAILER-DAEMON@mx.dest.example (Mail Delivery System)
To: b.0193a5f2c8b1deadbeef.xxxx.user=dest.example@bounces.example.com
Subject: Undelivered Mail Returned to Sender
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="B"

--B
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: 8bit

<jörg@dest.example>: host store.dest.example[10.0.0.5] said: 550 5.1.1 unknown user: "jörg"

--B
Content-Type: message/global-delivery-status
Content-Transfer-Encoding: 8bit

Reporting-MTA: dns; mx.dest.example
Arrival-Date: Tue,  1 Dec 2026 07:00:00 +0000

Final-Recipient: utf-8; jörg@dest.example
Original-Recipient: utf-8;jörg@dest.example
Action: failed
Status: 5.1.1
Remote-MTA: dns; store.dest.example
Diagnostic-Code: smtp; 550 5.1.1 unknown user: "jörg"

--B
Content-Type: message/global-headers
Content-Transfer-Encoding: 8bit

Return-Path: <b.0193a5f2c8b1deadbeef.xxxx.user=dest.example@bounces.example.com>
From: news@example.com
To: jörg@dest.example
Subject: Grüße

--B--
""".replace("\n", "\r\n").encode()


def test_a_global_dsn_is_read_as_a_dsn() -> None:
    (failed,) = read_report(GLOBAL_DSN)
    assert (failed.kind, failed.recipient, failed.status) == ("bounce", "jörg@dest.example", "5.1.1")
    assert failed.reporting_mta == "mx.dest.example"
    assert failed.return_path == "b.0193a5f2c8b1deadbeef.xxxx.user=dest.example@bounces.example.com"
    assert failed.reply().code == 550 and "unknown user" in failed.reply().text


def _encoded(text: bytes, part: bytes, encoding: str) -> bytes:
    """`text` with the body of its `part` transfer-encoded (base64 or quoted-printable)."""
    head, _, rest = text.partition(b"Content-Type: " + part + b"\r\nContent-Transfer-Encoding: 8bit\r\n\r\n")
    body, _, tail = rest.partition(b"\r\n--B")
    # base64 encodes the canonical form, CRLFs and all; quoted-printable keeps the lines as lines.
    coded = (
        base64.encodebytes(body)
        if encoding == "base64"
        else quopri.encodestring(body.replace(b"\r\n", b"\n"))
    )
    coded = coded.replace(b"\n", b"\r\n")
    fields = b"Content-Type: " + part + b"\r\nContent-Transfer-Encoding: " + encoding.encode() + b"\r\n\r\n"
    return head + fields + coded + b"\r\n--B" + tail


@pytest.mark.parametrize("encoding", ["base64", "quoted-printable"])
def test_a_global_dsn_may_be_transfer_encoded(encoding: str) -> None:
    """RFC 6533 6: message/global-delivery-status and message/global-headers may be base64 or
    quoted-printable on a 7-bit path (message/delivery-status may not)."""
    text = _encoded(
        _encoded(GLOBAL_DSN, b"message/global-delivery-status", encoding), b"message/global-headers", encoding
    )
    (failed,) = read_report(text)
    assert (failed.recipient, failed.status) == ("jörg@dest.example", "5.1.1")
    assert failed.return_path.startswith("b.0193a5f2c8b1deadbeef.")


def test_the_returned_original_may_be_a_global_message() -> None:
    """RFC 6532 3.7: the original returned whole, as message/global (here base64), holds the Return-Path."""
    original = b"Return-Path: <b.0193a5f2c8b1deadbeef.xxxx.user=dest.example@bounces.example.com>\r\n"
    original += "Subject: Grüße\r\n\r\nHallo.\r\n".encode()
    whole = GLOBAL_DSN.split(b"--B\r\nContent-Type: message/global-headers")[0] + (
        b"--B\r\nContent-Type: message/global\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + base64.encodebytes(original).replace(b"\n", b"\r\n")
        + b"\r\n--B--\r\n"
    )
    (failed,) = read_report(whole)
    assert failed.return_path == "b.0193a5f2c8b1deadbeef.xxxx.user=dest.example@bounces.example.com"


def test_a_utf8_address_type_may_carry_escaped_characters() -> None:
    """RFC 6533 3: utf-8-addr-xtext / -unitext write a character as \\x{HEX}; nonsense stays as it is."""
    dsn = GLOBAL_DSN.replace("utf-8; jörg@".encode(), b"UTF-8; j\\x{F6}rg@")
    assert read_report(dsn)[0].recipient == "jörg@dest.example"
    dsn = GLOBAL_DSN.replace("utf-8; jörg@".encode(), b"utf-8; j\\x{D800}\\x{110000}@")
    assert read_report(dsn)[0].recipient == "j\\x{D800}\\x{110000}@dest.example"


SAMPLES = (POSTFIX_DSN, ARF, QMAIL, NO_FROM, UTF8_FROM, GLOBAL_DSN)


@st.composite
def damaged_reports(draw: st.DrawFn) -> bytes:
    """A real report, damaged: bytes replaced, cut out, truncated, repeated, and tokens put in."""
    text = bytearray(draw(st.sampled_from(SAMPLES)))
    for op in draw(st.lists(st.integers(0, 4), min_size=1, max_size=8)):
        i = draw(st.integers(0, len(text)))
        if op == 0 and i < len(text):
            text[i] = draw(st.integers(0, 255))
        elif op == 1:
            del text[i : i + draw(st.integers(1, 60))]
        elif op == 2:
            text[i:i] = draw(st.sampled_from(TOKENS) | st.binary(max_size=20))
        elif op == 3:
            del text[i:]
        else:
            text[i:i] = text[i : i + draw(st.integers(1, 300))] * draw(st.integers(1, 4))
    return bytes(text)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(damaged_reports() | st.binary(max_size=2000))
def test_no_text_makes_the_reading_raise(text: bytes) -> None:
    """Whatever comes to the return-path domain is read or found unreadable, never an exception (which the
    SMTP listener answers 451, again and again for the same text)."""
    reports = read_report(text)
    assert all(isinstance(r, Report) and isinstance(r.recipient, str) for r in reports)
