"""The transport reports what happened to an attempt, against real loopback servers, and judges nothing:
where it broke off (connect, greeting, TLS, AUTH), the receiver's own replies, and which recipients were
refused here before anything was sent. What that means for the member is balancing's to say
(tests/unit/test_pool_observe.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from postmux.attempt import AttemptOutcome, Breakoff, Recipient, Transaction
from postmux.delivery.smtp_client import SmtpTransport
from postmux.reply import Reply
from tests.support import StartUpstream, always, free_port, make_settings

TRANSACTION = Transaction(
    sender="app@example.com",
    recipients=(Recipient(1, "user@dest.test"),),
    data=b"Subject: hi\r\n\r\nhello\r\n",
    domain="dest.test",
)


async def attempt(
    tmp_path: Path, address: str, work: Transaction = TRANSACTION, **member: Any
) -> AttemptOutcome:
    pools = [{"name": "default", "members": [{"name": "up", "address": address, **member}]}]
    settings = make_settings(tmp_path, pools)
    transport = SmtpTransport(settings.pool[0].members[0], settings.delivery, "postmux.test")
    try:
        return await transport.deliver(work)
    finally:
        await transport.close()


async def test_a_refused_connection_is_reported_as_a_connect_breakoff_with_a_reply_made_up_here(
    tmp_path: Path,
) -> None:
    outcome = await attempt(tmp_path, f"127.0.0.1:{free_port()}")
    assert (outcome.breakoff, outcome.local) == (Breakoff.CONNECT, True)
    assert outcome.replies[1].code == 451 and outcome.replies[1].enhanced_code == "4.4.1"


async def test_a_refusing_greeting_is_reported_as_said_by_the_server(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    up = await upstream("busy")
    up.greeting_refusal = "421 4.3.2 busy"
    outcome = await attempt(tmp_path, up.address)
    assert (outcome.breakoff, outcome.local) == (Breakoff.GREETING, False)
    assert outcome.replies[1] == Reply(421, "4.3.2", "busy")


async def test_a_5xx_greeting_defers_with_a_reply_of_ours_that_quotes_the_servers(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    # The next MX host is tried, and the mail waits when none takes it; but the reply must not be a made-up
    # "451 5.7.1": RFC 3463 2 has the enhanced code's class agree with the reply code's.
    up = await upstream("unwelcoming")
    up.greeting_refusal = "554 5.7.1 you are not welcome"
    outcome = await attempt(tmp_path, up.address)
    assert (outcome.breakoff, outcome.local) == (Breakoff.GREETING, False)
    assert outcome.replies[1] == Reply(
        451, "4.4.0", f"{up.address} greeted with: 554 5.7.1 you are not welcome"
    )


async def test_tls_required_but_not_offered_and_a_refused_login_are_reported_where_they_happened(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    plain = await upstream("plain")
    outcome = await attempt(tmp_path, plain.address, tls="required")
    assert (outcome.breakoff, outcome.replies[1].enhanced_code) == (Breakoff.TLS, "4.7.4")
    guarded = await upstream("guarded", users={"app": "right"}, auth_require_tls=False)
    outcome = await attempt(tmp_path, guarded.address, tls="none", username="app", password="wrong")
    assert (outcome.breakoff, outcome.replies[1].enhanced_code) == (Breakoff.AUTH, "4.7.8")


async def test_a_transaction_that_ran_reports_the_receivers_replies_and_the_recipients_never_sent(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    up = await upstream("deferring", behaviour=always("451 4.3.0 try again later"))
    work = Transaction(
        sender="app@example.com",
        recipients=(Recipient(1, "user@dest.test"), Recipient(2, "b\u00e9@dest.test")),  # needs SMTPUTF8
        data=b"Subject: hi\r\n\r\nhello\r\n",
        domain="dest.test",
    )
    outcome = await attempt(tmp_path, up.address, work)
    assert (outcome.breakoff, outcome.local, outcome.unsent) == (None, False, frozenset({2}))
    assert outcome.replies[1] == Reply(451, "4.3.0", "try again later")
    assert outcome.replies[2].enhanced_code == "5.6.7"  # refused here: it never reached the receiver
    assert outcome.said() == [Reply(451, "4.3.0", "try again later")]
