"""VERP end to end: mail goes out with a return path per recipient; a DSN and an ARF report sent back to
postmux's return-path domain are matched to the message and the recipient they are about."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiosmtplib

from postmux.app import App
from tests.support import StartUpstream, make_settings, raw_transaction, read_events, send, wait_until
from tests.unit.test_returns import ARF, GLOBAL_DSN, NO_FROM, POSTFIX_DSN, UTF8_FROM

DOMAIN = "bounces.example.com"


def verp_settings(tmp_path: Path, address: str, **sections: Any) -> Any:
    secret = tmp_path / "verp.secret"
    secret.write_bytes(b"0123456789abcdef0123456789abcdef")
    pools = [
        {
            "name": "default",
            "members": [{"name": "relay-a", "address": address, "sending_ips": ["192.0.2.10"]}],
        }
    ]
    return make_settings(tmp_path, pools, verp={"domain": DOMAIN, "secret_file": str(secret)}, **sections)


async def hand_back(port: int, to: str, text: bytes) -> str:
    """What a receiver's MTA does: the report, from the null sender, to the return path."""
    client = aiosmtplib.SMTP(
        hostname="127.0.0.1", port=port, local_hostname="mx.dest.example", start_tls=False
    )
    await client.connect()
    try:
        await client.sendmail("", [to], text)
        reply = await client.quit()
    finally:
        client.close()
    return str(reply)


async def test_each_recipient_gets_its_own_return_path_and_a_dsn_to_it_is_matched(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    up = await upstream("relay-a")
    settings = verp_settings(tmp_path, up.address)
    events = tmp_path / "events.jsonl"
    async with App(settings) as app:
        await send(app.smtp_port, "two", to=["user@dest.example", "other@dest.example"])
        await wait_until(lambda: len(up.received) == 2)
        await wait_until(lambda: any(e["type"] == "Delivery" for e in read_events(events)))
        message_id = next(e["id"] for e in read_events(events) if e["type"] == "Reception")
        by_recipient = {tuple(r.recipients): r.sender for r in up.received}
        assert set(by_recipient) == {("user@dest.example",), ("other@dest.example",)}  # one transaction each
        return_path = by_recipient[("user@dest.example",)]
        assert return_path.startswith(f"b.{message_id}.") and return_path.endswith(
            f".user=dest.example@{DOMAIN}"
        )
        assert by_recipient[("other@dest.example",)].endswith(f".other=dest.example@{DOMAIN}")
        assert up.received[0].data == up.received[1].data  # the text is the same; only the envelope differs

        # The receiver later bounces user@dest.example: its DSN goes to that recipient's return path.
        dsn = POSTFIX_DSN.replace(
            b"b.0193a5f2c8b1deadbeef.xxxx.user=dest.example@bounces.example.com", return_path.encode()
        )
        await hand_back(app.smtp_port, return_path, dsn)
        await wait_until(lambda: any(e["type"] == "Bounce" for e in read_events(events)))
        assert len(up.received) == 2  # returned mail is taken, never relayed
        # The hard bounce suppressed its recipient (on disk before the 250): the next message to it is
        # refused at RCPT, its other recipient still goes.
        found = app.suppressions.find("user@dest.example")
        assert found is not None and found.source == "bounce"
        try:
            await send(app.smtp_port, "again", to=["user@dest.example"])
        except aiosmtplib.SMTPRecipientRefused as e:
            assert e.code == 550 and "suppressed (bounce: InvalidRecipient" in e.message
        else:
            raise AssertionError("a suppressed recipient was taken")
        await send(app.smtp_port, "other", to=["other@dest.example"])
        await wait_until(lambda: len(up.received) == 3)
    bounce = next(e for e in read_events(events) if e["type"] == "Bounce")
    assert (bounce["id"], bounce["recipient"]) == (message_id, "user@dest.example")
    assert bounce["bounce_class"] == "InvalidRecipient"
    assert bounce["response"]["code"] == 550 and bounce["response"]["enhanced_code"] == "5.1.1"
    assert bounce["tags"]["async"] == "true" and bounce["tags"]["reporting_mta"] == "mx.dest.example"
    assert bounce["queue"] == "/dest.example"


async def test_an_arf_report_to_the_feedback_address_is_a_complaint_about_the_message(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    up = await upstream("relay-a")
    settings = verp_settings(tmp_path, up.address)
    events = tmp_path / "events.jsonl"
    async with App(settings) as app:
        await send(app.smtp_port, "spammy", to=["user@dest.example"])
        await wait_until(lambda: len(up.received) == 1)
        await wait_until(lambda: any(e["type"] == "Delivery" for e in read_events(events)))
        message_id = next(e["id"] for e in read_events(events) if e["type"] == "Reception")
        report = ARF.replace(
            b"b.0193a5f2c8b1deadbeef.xxxx.user=dest.example@bounces.example.com",
            up.received[0].sender.encode(),
        )
        # Feedback loops send to the address registered with them, not to the return path.
        await hand_back(app.smtp_port, f"fbl@{DOMAIN}", report)
        await wait_until(lambda: any(e["type"] == "Complaint" for e in read_events(events)))
        found = app.suppressions.find("user@dest.example")
        assert found is not None and found.source == "complaint" and found.reason == "complaint (abuse)"
    complaint = next(e for e in read_events(events) if e["type"] == "Complaint")
    assert (complaint["id"], complaint["recipient"]) == (message_id, "user@dest.example")
    assert complaint["source_ip"] == "192.0.2.10" and complaint["member"] == "relay-a"
    assert complaint["pool"] == "default" and complaint["queue"] == "default/dest.example"
    assert complaint["tags"]["feedback_type"] == "abuse"


async def test_a_forged_report_is_taken_and_changes_nothing(tmp_path: Path, upstream: StartUpstream) -> None:
    up = await upstream("relay-a")
    settings = verp_settings(tmp_path, up.address)
    events = tmp_path / "events.jsonl"
    async with App(settings) as app:
        forged = f"b.0193a5f2c8b1deadbeef.aaaaaaaaaaaaaaaa.user=dest.example@{DOMAIN}"
        reply = await hand_back(app.smtp_port, forged, POSTFIX_DSN)
        assert reply.startswith("221")
    assert not [e for e in read_events(events) if e["type"] in ("Bounce", "Complaint", "Reception")]
    assert not up.received


async def test_returned_mail_and_other_mail_are_not_mixed_in_one_transaction(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    up = await upstream("relay-a")
    settings = verp_settings(tmp_path, up.address)
    async with App(settings) as app:
        client = aiosmtplib.SMTP(
            hostname="127.0.0.1", port=app.smtp_port, local_hostname="c.test", start_tls=False
        )
        await client.connect()
        try:
            await client.mail("")
            await client.rcpt(f"fbl@{DOMAIN}")
            try:
                await client.rcpt("user@dest.example")
            except aiosmtplib.SMTPRecipientRefused as e:
                assert e.code == 452 and "transaction of its own" in e.message
            else:
                raise AssertionError("a second kind of recipient was taken")
        finally:
            client.close()


async def test_a_report_that_cannot_be_read_is_answered_250_and_dropped(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    """docs/configuration.md [verp]: logged and dropped. The same text fails the same way each time, so a
    451 (which a crash in the bounce detectors was) would only have the reporter retry it for days."""
    up = await upstream("relay-a")
    settings = verp_settings(tmp_path, up.address)
    events = tmp_path / "events.jsonl"
    async with App(settings) as app:
        await send(app.smtp_port, "hello", to=["user@dest.example"])
        await wait_until(lambda: len(up.received) == 1)
        return_path = up.received[0].sender
        for text in (NO_FROM, UTF8_FROM):
            for to in (return_path, f"fbl@{DOMAIN}"):
                assert (await hand_back(app.smtp_port, to, text)).startswith("221")
        assert app.suppressions.find("user@dest.example") is None
    assert not [e for e in read_events(events) if e["type"] in ("Bounce", "Complaint")]
    assert len(up.received) == 1


async def smtputf8(port: int, sender: str, recipient: str, text: bytes) -> str:
    """One SMTPUTF8 transaction (RFC 6531) over a plain socket; returns the reply to the end of DATA."""
    return await raw_transaction(
        port,
        text,
        sender=sender,
        recipient=recipient,
        options=" SMTPUTF8 BODY=8BITMIME",
        helo="mx.dest.example",
    )


async def test_a_global_dsn_for_smtputf8_mail_is_a_bounce(tmp_path: Path, upstream: StartUpstream) -> None:
    """RFC 6533: what a receiver sends back about SMTPUTF8 mail (message/global-delivery-status, a utf-8
    address type, message/global-headers), here to the feedback address, so that only the Return-Path of
    the returned headers can tie it to the message."""
    up = await upstream("relay-a")
    settings = verp_settings(tmp_path, up.address)
    events = tmp_path / "events.jsonl"
    async with App(settings) as app:
        text = "From: news@example.com\r\nTo: jörg@dest.example\r\nSubject: Grüße\r\n\r\nHallo.\r\n"
        assert (await smtputf8(app.smtp_port, "news@example.com", "jörg@dest.example", text.encode()))[
            :3
        ] == "250"
        await wait_until(lambda: len(up.received) == 1)
        return_path = up.received[0].sender
        assert return_path.endswith(f".jörg=dest.example@{DOMAIN}")
        dsn = GLOBAL_DSN.replace(
            b"b.0193a5f2c8b1deadbeef.xxxx.user=dest.example@bounces.example.com", return_path.encode()
        )
        assert (await smtputf8(app.smtp_port, "", f"fbl@{DOMAIN}", dsn)).startswith("250")
        await wait_until(lambda: any(e["type"] == "Bounce" for e in read_events(events)))
        found = app.suppressions.find("jörg@dest.example")
        assert found is not None and found.source == "bounce"
    message_id = next(e["id"] for e in read_events(events) if e["type"] == "Reception")
    bounce = next(e for e in read_events(events) if e["type"] == "Bounce")
    assert (bounce["id"], bounce["recipient"]) == (message_id, "jörg@dest.example")
    assert bounce["tags"]["async"] == "true" and bounce["bounce_class"] == "InvalidRecipient"
    assert bounce["response"]["code"] == 550 and bounce["response"]["enhanced_code"] == "5.1.1"


def feedback(kind: str, return_path: str, recipient: str) -> bytes:
    """An ARF report of Feedback-Type `kind` about the message sent to `recipient` through `return_path`."""
    text = ARF.replace(
        b"b.0193a5f2c8b1deadbeef.xxxx.user=dest.example@bounces.example.com", return_path.encode()
    ).replace(b"user@dest.example", recipient.encode())
    fields = f"Feedback-Type: {kind}\r\n" + ("Auth-Failure: dkim\r\n" if kind == "auth-failure" else "")
    return text.replace(b"Feedback-Type: abuse\r\n", fields.encode())


async def test_only_a_report_that_calls_the_message_abuse_suppresses_and_counts(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    """A not-spam report (RFC 5965 7.3: the reporter does not consider it spam), an auth-failure report
    (RFC 6591: the sender's DKIM or SPF failed) and an `other` one are Feedback events: the recipient stays,
    the reputation breaker counts nothing. An abuse report is a Complaint: suppressed, and with a breaker
    that trips on more than 40% of 2 recipients, it trips at 1 complaint of 2 (the three before would have
    tripped it already, had they counted)."""
    up = await upstream("relay-a")
    breaker = {"members": "all", "min_messages": 2, "complaint_rate": 0.4, "cooldown": "1h"}
    settings = verp_settings(tmp_path, up.address, breaker=breaker)
    events = tmp_path / "events.jsonl"
    async with App(settings) as app:
        await send(app.smtp_port, "news", to=["liked@dest.example", "hated@dest.example"])
        await wait_until(lambda: len([e for e in read_events(events) if e["type"] == "Delivery"]) == 2)
        path = {r.recipients[0]: r.sender for r in up.received}
        for kind in ("not-spam", "auth-failure", "other"):
            report = feedback(kind, path["liked@dest.example"], "liked@dest.example")
            await hand_back(app.smtp_port, f"fbl@{DOMAIN}", report)
        # The 250 comes after the suppression list and the bus (which runs the breaker) have the events.
        assert app.suppressions.find("liked@dest.example") is None
        assert app.breaker.trips == 0
        await hand_back(
            app.smtp_port,
            f"fbl@{DOMAIN}",
            feedback("abuse", path["hated@dest.example"], "hated@dest.example"),
        )
        found = app.suppressions.find("hated@dest.example")
        assert found is not None and found.source == "complaint" and found.reason == "complaint (abuse)"
        assert app.breaker.trips == 1
    told = [(e["type"], e["recipient"], e["tags"].get("feedback_type")) for e in read_events(events)]
    assert [t for t in told if t[0] in ("Complaint", "Feedback")] == [
        ("Feedback", "liked@dest.example", "not-spam"),
        ("Feedback", "liked@dest.example", "auth-failure"),
        ("Feedback", "liked@dest.example", "other"),
        ("Complaint", "hated@dest.example", "abuse"),
    ]
    auth = next(e for e in read_events(events) if e["tags"].get("feedback_type") == "auth-failure")
    assert auth["tags"]["auth_failure"] == "dkim" and auth["member"] == "relay-a"
    trip = next(e for e in read_events(events) if e["tags"].get("by") == "breaker")
    assert "complaints 1/2" in trip["tags"]["change"]


def dsn(return_path: str, *blocks: tuple[str, str, str, str]) -> bytes:
    """A DSN as Postfix writes it (RFC 3464), sent to `return_path`, with one per-recipient block per
    (recipient, Action, Status, Diagnostic-Code)."""
    per_recipient = "".join(
        f"Final-Recipient: rfc822; {rcpt}\nOriginal-Recipient: rfc822;{rcpt}\nAction: {action}\n"
        f"Status: {status}\nDiagnostic-Code: {diagnostic}\n\n"
        for rcpt, action, status, diagnostic in blocks
    )
    text = f"""\
From: MAILER-DAEMON@mx.dest.example (Mail Delivery System)
Subject: Undelivered Mail Returned to Sender
To: {return_path}
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="B1"

--B1
Content-Type: text/plain; charset=us-ascii

I'm sorry to have to inform you that your message could not be delivered.

--B1
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.dest.example

{per_recipient}--B1
Content-Type: text/rfc822-headers

Return-Path: <{return_path}>
From: news@example.com
Subject: hello

--B1--
"""
    return text.replace("\n", "\r\n").encode()


async def test_a_failed_action_is_a_bounce_whatever_its_status_class(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    """RFC 3464 2.3.3: `failed` means the message could not be delivered, and Postfix says so of mail that
    expired in its queue with the last temporary Status (4.4.7, 4.4.1). Each is a Bounce with the reply as
    reported; a 4.4.x class is no hard bounce, so nobody is suppressed."""
    up = await upstream("relay-a")
    settings = verp_settings(tmp_path, up.address)
    events = tmp_path / "events.jsonl"
    async with App(settings) as app:
        await send(app.smtp_port, "two", to=["expired@dest.example", "timedout@dest.example"])
        await wait_until(lambda: len([e for e in read_events(events) if e["type"] == "Delivery"]) == 2)
        path = {r.recipients[0]: r.sender for r in up.received}
        expiry = "smtp; 451 4.4.7 message expired after 5 days: mailbox temporarily unavailable"
        timeout = "X-Postfix; connect to mx.dest.example[192.0.2.7]:25: Connection timed out"
        for rcpt, status, diagnostic in [
            ("expired@dest.example", "4.4.7", expiry),
            ("timedout@dest.example", "4.4.1", timeout),
        ]:
            text = dsn(path[rcpt], (rcpt, "failed", status, diagnostic))
            assert (await hand_back(app.smtp_port, path[rcpt], text)).startswith("221")
        assert app.suppressions.find("expired@dest.example") is None
        assert app.suppressions.find("timedout@dest.example") is None
    bounces = {e["recipient"]: e for e in read_events(events) if e["type"] == "Bounce"}
    assert set(bounces) == {"expired@dest.example", "timedout@dest.example"}
    expired, timedout = bounces["expired@dest.example"], bounces["timedout@dest.example"]
    assert (expired["response"]["code"], expired["response"]["enhanced_code"]) == (451, "4.4.7")
    assert "message expired after 5 days" in expired["response"]["text"]
    assert (timedout["response"]["code"], timedout["response"]["enhanced_code"]) == (450, "4.4.1")
    assert timedout["bounce_class"] == "NoAnswerFromHost"
    assert all(b["tags"]["async"] == "true" for b in bounces.values())


async def test_a_dsn_of_several_blocks_is_one_bounce_for_the_return_paths_recipient(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    """RFC 3464 2.3: one outcome per recipient. A DSN with three failed blocks to one return path is one
    Bounce, for the recipient the return path names, with its own block's reply; a DSN whose block for
    that recipient says delivered (a list that expanded, one of whose members failed) is no Bounce."""
    up = await upstream("relay-a")
    settings = verp_settings(tmp_path, up.address)
    events = tmp_path / "events.jsonl"
    async with App(settings) as app:
        await send(app.smtp_port, "two", to=["user@dest.example", "list@dest.example"])
        await wait_until(lambda: len([e for e in read_events(events) if e["type"] == "Delivery"]) == 2)
        path = {r.recipients[0]: r.sender for r in up.received}
        unknown = "smtp; 550 5.1.1 user unknown"
        text = dsn(
            path["user@dest.example"],
            ("victim2@dest.example", "failed", "5.2.2", "smtp; 552 5.2.2 mailbox full"),
            ("user@dest.example", "failed", "5.1.1", unknown),
            ("victim3@other.example", "failed", "5.1.1", unknown),
        )
        await hand_back(app.smtp_port, path["user@dest.example"], text)
        text = dsn(
            path["list@dest.example"],
            ("list@dest.example", "expanded", "2.0.0", "smtp; 250 2.0.0 ok"),
            ("member@dest.example", "failed", "5.1.1", unknown),
        )
        await hand_back(app.smtp_port, path["list@dest.example"], text)
        assert app.suppressions.find("list@dest.example") is None
        assert [e.address for e in app.suppressions.entries()] == ["user@dest.example"]
    bounces = [e for e in read_events(events) if e["type"] == "Bounce"]
    assert [(e["recipient"], e["response"]["enhanced_code"]) for e in bounces] == [
        ("user@dest.example", "5.1.1")
    ]
