"""What a member receives is exactly the stored message: postmux's own DATA writer, against aiosmtpd."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postmux.attempt import Recipient, Transaction
from postmux.delivery.smtp_client import SmtpTransport
from postmux.reply import Reply
from tests.support import DROP, HANG, Upstream, always, make_settings

# Lines as ingress stores them (CRLF only), rich in what dot-stuffing must get right: a leading dot, a
# line that is only ".", "..", a dot after the line's start, and long lines (998 octets, RFC 5322 2.1.1).
LINE = st.one_of(
    st.sampled_from([b"", b".", b"..", b".hidden", b"a.b", b". ", b"From x", b"\xc3\xa9t\xc3\xa9"]),
    st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    st.integers(min_value=900, max_value=998).map(lambda n: b"." + b"x" * (n - 1)),
)
MESSAGE = st.lists(LINE, max_size=30).map(lambda lines: b"".join(line + b"\r\n" for line in lines))


def work_for(data: bytes) -> Transaction:
    return Transaction(
        sender="app@example.com",
        recipients=(Recipient(1, "user@dest.test"),),
        data=data,
        domain="dest.test",
    )


def transport_for(tmp_path: Path, up: Upstream, **delivery: object) -> SmtpTransport:
    pools = [{"name": "default", "members": [{"name": "up", "address": up.address}]}]
    settings = make_settings(tmp_path, pools, delivery=delivery)
    return SmtpTransport(settings.pool[0].members[0], settings.delivery, "postmux.test")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    messages=st.lists(MESSAGE, min_size=1, max_size=3),
    tail=st.sampled_from([b"", b"no final CRLF", b"."]),
)
async def test_upstream_receives_the_stored_bytes(tmp_path: Path, messages: list[bytes], tail: bytes) -> None:
    messages[-1] += tail  # the last one may not end in CRLF: the end of data still starts its own line
    up = await Upstream("up").start()
    transport = transport_for(tmp_path, up)
    try:
        for data in messages:  # several messages over one reused connection
            outcome = await transport.deliver(work_for(data))
            assert outcome.replies[1].code == 250, outcome.replies
    finally:
        await transport.close()
        await up.stop()
    # The end-of-data line starts a line of its own; an empty message goes as one empty line (as aiosmtplib).
    expected = [m if m.endswith(b"\r\n") else m + b"\r\n" for m in messages]
    assert [r.data for r in up.received] == expected
    assert up.connections == 1


async def test_a_refusal_after_the_dot_is_the_reply_and_the_connection_is_reused(tmp_path: Path) -> None:
    up = await Upstream("up", always("554 5.6.0 no thanks")).start()
    transport = transport_for(tmp_path, up)
    try:
        first = await transport.deliver(work_for(b"a\r\n"))
        second = await transport.deliver(work_for(b"b\r\n"))
    finally:
        await transport.close()
        await up.stop()
    for outcome in (first, second):
        assert outcome.replies[1] == Reply(554, "5.6.0", "no thanks"), outcome
    assert up.connections == 1


@pytest.mark.parametrize(
    ("behaviour", "expected"),
    [(DROP, "connection lost during DATA"), (HANG, "timeout during DATA")],
)
async def test_a_member_lost_or_silent_after_the_dot_defers(
    tmp_path: Path, behaviour: str, expected: str
) -> None:
    up = await Upstream("up", always(behaviour)).start()
    transport = transport_for(tmp_path, up, data_timeout="0.5s")
    try:
        outcome = await asyncio.wait_for(transport.deliver(work_for(b"a\r\n")), 10)
        assert transport.connections == 0  # a connection in an unknown state is not kept
    finally:
        await transport.close()
        await up.stop()
    reply = outcome.replies[1]
    assert (reply.code, reply.enhanced_code) == (451, "4.4.2") and reply.text.startswith(expected), reply
