"""Limits (RFC 5321 4.5.3): line lengths, message size, recipients, hops, connections, time and errors."""

from __future__ import annotations

import asyncio
import re
import time
import tracemalloc
from pathlib import Path

import pytest

from tests.security.client import RawClient
from tests.security.conftest import StartGateway, stored
from tests.support import Upstream, send, wait_until

TOO_LONG_COMMAND = "500 5.5.2 Command line too long (RFC 5321 4.5.3.1.4: 512 octets)"
TOO_LONG_TEXT_LINE = "500 5.5.2 Text line too long (RFC 5321 4.5.3.1.6: 1000 octets); message refused"
TOO_BIG = "552 5.3.4 Message too big for system"


async def test_command_line_over_512_octets_is_refused(gateway: StartGateway) -> None:
    app = await gateway()
    client = await RawClient.connect(app.smtp_port)
    assert (await client.cmd("EHLO client.test")).startswith("250")
    assert await client.cmd("NOOP " + "x" * 600) == TOO_LONG_COMMAND
    assert await client.cmd("NOOP " + "x" * 5000) == TOO_LONG_COMMAND  # beyond the reader's buffer, too
    assert await client.cmd("NOOP") == "250 2.0.0 OK"
    await client.close()


def _mail_of(octets: int) -> str:
    """A valid MAIL line of `octets` octets before its CRLF (as aiosmtpd measures): SIZE padded with zeros."""
    head = "MAIL FROM:<a@example.com> SIZE="
    return head + "0" * (octets - len(head) - 1) + "1"


async def test_mails_line_limit_is_its_own_in_each_session_and_the_same_at_every_ehlo(
    gateway: StartGateway,
) -> None:
    """512 octets, 26 more for SIZE (RFC 1870 8) and 10 for SMTPUTF8 (RFC 6531 3.4): 548 for MAIL after
    EHLO, whatever other clients do and however often this one says EHLO."""
    app = await gateway()
    a = await RawClient.connect(app.smtp_port)
    assert (await a.cmd("EHLO client.test")).startswith("250")
    assert (await a.cmd(_mail_of(548))).startswith("250 ")
    assert (await a.cmd("RSET")).startswith("250")
    b = await RawClient.connect(app.smtp_port)  # another session begins: it changes nothing of a's
    assert (await a.cmd(_mail_of(548))).startswith("250 ")
    assert (await a.cmd("RSET")).startswith("250")
    for _ in range(13):
        assert (await a.cmd("EHLO client.test")).startswith("250")
    assert await a.cmd(_mail_of(549)) == TOO_LONG_COMMAND
    assert (await b.cmd("EHLO client.test")).startswith("250")
    assert await b.cmd(_mail_of(549)) == TOO_LONG_COMMAND
    await a.close()
    await b.close()


async def test_text_line_over_1000_octets_refuses_the_message_when_long_lines_are_refused(
    gateway: StartGateway, tmp_path: Path
) -> None:
    app = await gateway(long_lines="refuse")
    client = await RawClient.connect(app.smtp_port)
    await client.ehlo_mail_rcpt()
    await client.cmd("DATA")
    reply = await client.cmd(b"Subject: long\r\n\r\n" + b"y" * 1001 + b"\r\nshort\r\n.\r\n")
    assert reply == TOO_LONG_TEXT_LINE
    await client.close()
    assert stored(tmp_path) == 0


@pytest.mark.parametrize(
    ("line", "taken"),
    [
        (b"y" * 998 + b"\r\n", True),  # 1000 octets with the CRLF: the limit
        (b"y" * 999 + b"\r\n", False),  # 1001: over it (it was taken: aiosmtpd's line_length_limit)
        (b".." + b"y" * 997 + b"\r\n", True),  # 1001 as sent, 1000 without the stuffed dot
        (b".." + b"y" * 998 + b"\r\n", False),
    ],
    ids=["998+CRLF", "999+CRLF", "stuffed-998+CRLF", "stuffed-999+CRLF"],
)
async def test_text_line_limit_is_1000_octets_with_crlf_not_counting_a_stuffed_dot(
    gateway: StartGateway, tmp_path: Path, line: bytes, taken: bool
) -> None:
    """RFC 5321 4.5.3.1.6: "The maximum total length of a text line including the <CRLF> is 1000 octets
    (not counting the leading dot duplicated for transparency)"; docs/security.md says so too."""
    app = await gateway(long_lines="refuse")
    client = await RawClient.connect(app.smtp_port)
    await client.ehlo_mail_rcpt()
    await client.cmd("DATA")
    reply = await client.cmd(b"Subject: limit\r\nX-Test-Id: limit\r\n\r\n" + line + b"short\r\n.\r\n")
    assert reply.startswith("250 2.0.0 Ok: queued as") if taken else reply == TOO_LONG_TEXT_LINE, reply
    assert (await client.cmd("NOOP")) == "250 2.0.0 OK"
    await client.close()
    up: Upstream = app.upstream  # type: ignore[attr-defined]
    if taken:
        await wait_until(lambda: len(up.received) == 1)
        unstuffed = line[1:] if line.startswith(b"..") else line
        assert up.received[0].data.endswith(b"\r\n" + unstuffed + b"short\r\n")
    else:
        assert stored(tmp_path) == 0 and up.received == []


def thread_references(octets: int) -> bytes:
    """A References field of at least `octets` octets on one line: message ids with a space between."""
    ids, field = 0, b"References:"
    while len(field) < octets:
        field += b" <%05d.thread@example.test>" % ids
        ids += 1
    return field


def unwrapped_html(octets: int) -> bytes:
    """One line of HTML as applications write it, without a line break: at least `octets` octets."""
    html, i = b"<html><body>", 0
    while len(html) < octets:
        html += b'<p class="row"><a href="https://example.test/item/%d">item %d</a></p> ' % (i, i)
        i += 1
    return html + b"</body></html>"


async def test_long_text_lines_are_taken_and_leave_folded_to_1000_octets(gateway: StartGateway) -> None:
    app = await gateway()  # [smtp] long_lines = "fold", the default
    references = thread_references(2_000)
    html = unwrapped_html(5_000)
    token = b"T" * 5_000  # no whitespace anywhere: broken after 998 octets, as Postfix does
    header = b"Subject: long lines\r\n" + references + b"\r\n\r\n"
    original = header + html + b"\r\n--\r\n" + token + b"\r\nend\r\n"
    client = await RawClient.connect(app.smtp_port)
    await client.ehlo_mail_rcpt()
    await client.cmd("DATA")
    reply = await client.cmd(original + b".\r\n")
    assert reply.startswith("250 2.0.0 Ok: queued as"), reply
    await client.close()
    up: Upstream = app.upstream  # type: ignore[attr-defined]
    await wait_until(lambda: len(up.received) == 1)
    data = up.received[0].data
    assert max(len(line) + 2 for line in data.split(b"\r\n")) <= 1000  # octets with the CRLF
    head, _, body = data.partition(b"\r\n\r\n")
    # The header field was folded before spaces: RFC 5322 2.2.3 unfolding gives it back octet for octet.
    assert head.count(b"\r\n ") >= 2
    assert re.sub(rb"\r\n(?=[ \t])", b"", head).endswith(b"\r\nSubject: long lines\r\n" + references)
    html_lines, token_lines = body.split(b"\r\n--\r\n")
    # So was the HTML: each new line starts with the space it was broken before.
    assert html_lines.count(b"\r\n ") >= 5 and html_lines.replace(b"\r\n ", b" ") == html
    # The token had nowhere to break: 998 octets, then lines that start with an inserted space.
    *pieces, end, last = token_lines.split(b"\r\n")
    assert (end, last) == (b"end", b"")
    assert len(pieces[0]) == 998 and all(p.startswith(b" ") for p in pieces[1:])
    assert pieces[0] + b"".join(p[1:] for p in pieces[1:]) == token


async def test_lf_only_mail_is_repaired_not_broken_with_line_endings_normalize(gateway: StartGateway) -> None:
    app = await gateway(line_endings="normalize")  # and long_lines = "fold"
    # To SMTP, mail with LF line ends is one line of 3,000 octets; its own lines are short.
    head = b"Received: from a.test\n\tby b.test; Mon, 1 Jan 2024 00:00:00 +0000\nSubject: lf\n\n"
    message = head + b"a short line\n" * 230
    client = await RawClient.connect(app.smtp_port)
    await client.ehlo_mail_rcpt()
    await client.cmd("DATA")
    assert (await client.cmd(message + b"\r\n.\r\n")).startswith("250 2.0.0 Ok: queued as")
    await client.close()
    up: Upstream = app.upstream  # type: ignore[attr-defined]
    await wait_until(lambda: len(up.received) == 1)
    # Only the line ends were repaired: no break, so no blank line that would end the header section.
    assert up.received[0].data.endswith(message.replace(b"\n", b"\r\n") + b"\r\n")


async def test_declared_size_too_big_is_refused_at_mail(gateway: StartGateway) -> None:
    app = await gateway(max_message_size=10_000)
    client = await RawClient.connect(app.smtp_port)
    assert "250-SIZE 10000" in await client.cmd("EHLO client.test")
    reply = await client.cmd("MAIL FROM:<a@example.com> SIZE=10001")
    assert reply == "552 5.3.4 Message size exceeds fixed maximum message size"
    assert (await client.cmd("MAIL FROM:<a@example.com> SIZE=10000")).startswith("250")
    await client.close()


def dotted_message(octets: int) -> bytes:
    """A message of exactly `octets` octets (RFC 1870 4), nearly all of its lines starting with ".":
    sent dot-stuffed, it is about 1% longer on the wire."""
    head = b"Subject: dots\r\nX-Test-Id: dotted\r\n\r\n"
    line = b"." + b"d" * 97 + b"\r\n"  # 100 octets
    body = line * ((octets - len(head)) // 100)
    rest = octets - len(head) - len(body)
    return head + body + (b"." + b"e" * (rest - 3) + b"\r\n" if rest else b"")


@pytest.mark.parametrize("long_lines", ["fold", "refuse"])
async def test_a_message_exactly_at_the_advertised_size_with_dot_lines_is_accepted(
    gateway: StartGateway, tmp_path: Path, long_lines: str
) -> None:
    """RFC 1870 4: the size is the octets "including CR-LF pairs, but not the SMTP DATA command's
    terminating dot or doubled quoting dots". It was counted with the doubled dots (as aiosmtpd does): a
    message that fit the SIZE it declared at MAIL and the one advertised got 552 after the dot."""
    app = await gateway(max_message_size=10_000, long_lines=long_lines)
    message = dotted_message(10_000)
    assert len(message) == 10_000 and message.count(b"\r\n.") == 100
    stuffed = message.replace(b"\r\n.", b"\r\n..")
    client = await RawClient.connect(app.smtp_port)
    assert "250-SIZE 10000" in await client.cmd("EHLO client.test")
    assert (await client.cmd("MAIL FROM:<app@example.com> SIZE=10000")).startswith("250")
    assert (await client.cmd("RCPT TO:<user@dest.test>")).startswith("250")
    assert (await client.cmd("DATA")).startswith("354")
    assert (await client.cmd(stuffed + b".\r\n")).startswith("250 2.0.0 Ok: queued as")
    # One octet more is over the limit, however it is counted.
    await client.ehlo_mail_rcpt()
    assert (await client.cmd("DATA")).startswith("354")
    over = dotted_message(10_001).replace(b"\r\n.", b"\r\n..")
    assert await client.cmd(over + b".\r\n") == TOO_BIG
    await client.close()
    up: Upstream = app.upstream  # type: ignore[attr-defined]
    await wait_until(lambda: len(up.received) == 1)
    assert up.received[0].data.endswith(message), "unstuffed once, nothing lost"
    await asyncio.sleep(0.2)
    assert len(up.received) == 1


@pytest.mark.parametrize(
    ("line", "long_lines", "refusal"),
    [
        (b"z" * 998 + b"\r\n", "fold", TOO_BIG),
        (b"z" * 1000, "fold", TOO_BIG),  # one line of 20 MB: kept as it comes, until over the limit
        (b"z" * 1000, "refuse", TOO_LONG_TEXT_LINE),
    ],
    ids=["short-lines", "one-20-MB-line-folded", "one-20-MB-line-refused"],
)
async def test_message_too_big_is_refused_after_data_with_memory_flat(
    gateway: StartGateway, tmp_path: Path, line: bytes, long_lines: str, refusal: str
) -> None:
    app = await gateway(max_message_size=100_000, long_lines=long_lines)
    client = await RawClient.connect(app.smtp_port)
    await client.ehlo_mail_rcpt()
    await client.cmd("DATA")
    tracemalloc.start()
    try:
        await client.send(b"Subject: big\r\n\r\n")
        for _ in range(200):  # 20 MB, 200 times the limit, in 100 kB writes
            await client.send(line * 100)
        reply = await client.cmd(b"\r\n.\r\n" if not line.endswith(b"\r\n") else b".\r\n")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reply == refusal
    assert peak < 3_000_000, f"peak {peak} bytes while 20 MB went through"
    assert (await client.cmd("NOOP")) == "250 2.0.0 OK"
    await client.close()
    assert stored(tmp_path) == 0


async def test_recipients_beyond_the_limit_get_452(gateway: StartGateway) -> None:
    app = await gateway(max_recipients=2)
    client = await RawClient.connect(app.smtp_port)
    await client.ehlo_mail_rcpt()
    assert (await client.cmd("RCPT TO:<b@dest.test>")).startswith("250")
    assert await client.cmd("RCPT TO:<c@dest.test>") == "452 4.5.3 Too many recipients"
    await client.close()


async def test_message_at_the_hop_limit_is_refused(gateway: StartGateway, tmp_path: Path) -> None:
    app = await gateway(max_hops=3)
    client = await RawClient.connect(app.smtp_port)
    hop = b"Received: from a.test by b.test; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    await client.ehlo_mail_rcpt()
    await client.cmd("DATA")
    reply = await client.cmd(hop * 3 + b"X-Test-Id: loop\r\n\r\nagain\r\n.\r\n")
    assert reply == "554 5.4.6 Too many hops: routing loop detected (RFC 5321 6.3)"
    await client.ehlo_mail_rcpt()
    await client.cmd("DATA")
    assert (await client.cmd(hop * 2 + b"X-Test-Id: ok\r\n\r\nfine\r\n.\r\n")).startswith("250 ")
    await client.close()
    up: Upstream = app.upstream  # type: ignore[attr-defined]
    await wait_until(lambda: [r.test_id for r in up.received] == ["ok"])


async def test_connections_over_the_total_get_421_and_are_closed(gateway: StartGateway) -> None:
    app = await gateway(max_connections=3)
    clients = [await RawClient.connect(app.smtp_port) for _ in range(3)]
    refused = await RawClient.connect(app.smtp_port)
    assert refused.greeting == "421 4.7.0 postmux.test Too many connections, try again later"
    assert await refused.closed()
    await clients.pop().close()
    await asyncio.sleep(0.1)
    again = await RawClient.connect(app.smtp_port)
    assert again.greeting.startswith("220 ")
    for c in [*clients, again, refused]:
        await c.close()


async def test_connections_over_the_per_ip_limit_get_421_other_clients_are_served(
    gateway: StartGateway,
) -> None:
    app = await gateway(max_connections_per_ip=2)
    clients = [await RawClient.connect(app.smtp_port, local_addr="127.0.0.2") for _ in range(2)]
    refused = await RawClient.connect(app.smtp_port, local_addr="127.0.0.2")
    expected = "421 4.7.0 postmux.test Too many connections from your address, try again later"
    assert refused.greeting == expected
    assert await refused.closed()
    assert "queued as" in await send(app.smtp_port, "other-ip")
    for c in [*clients, refused]:
        await c.close()


async def test_idle_client_gets_421_after_the_command_timeout(gateway: StartGateway) -> None:
    app = await gateway(timeout=0.3)
    client = await RawClient.connect(app.smtp_port)
    started = time.monotonic()
    assert await client.reply() == "421 4.4.2 postmux.test Error: timeout exceeded"
    assert 0.25 < time.monotonic() - started < 2
    assert await client.closed()
    await client.close()


async def test_the_command_timeout_counts_from_the_last_command(gateway: StartGateway) -> None:
    """A client that keeps talking outlasts the timeout; once it stops, the 421 comes a timeout later."""
    app = await gateway(timeout=0.5)
    client = await RawClient.connect(app.smtp_port)
    for _ in range(6):  # 1.2 s in all, never 0.5 s without a command
        assert await client.cmd("NOOP") == "250 2.0.0 OK"
        await asyncio.sleep(0.2)
    last = time.monotonic()
    assert await client.cmd("NOOP") == "250 2.0.0 OK"
    assert await client.reply() == "421 4.4.2 postmux.test Error: timeout exceeded"
    assert 0.45 < time.monotonic() - last < 1.5
    assert await client.closed()
    await client.close()


async def test_slow_message_is_not_cut_by_the_command_timeout(gateway: StartGateway) -> None:
    app = await gateway(timeout=0.4)
    client = await RawClient.connect(app.smtp_port)
    await client.ehlo_mail_rcpt()
    await client.cmd("DATA")
    for i in range(5):  # 1.25 s in all, never 0.4 s without a line
        await client.send(f"X-Line-{i}: slow\r\n".encode())
        await asyncio.sleep(0.25)
    assert (await client.cmd(b"\r\nbody\r\n.\r\n")).startswith("250 ")
    await client.close()


async def test_busy_client_is_closed_at_the_session_time_limit(gateway: StartGateway) -> None:
    app = await gateway(session_timeout=0.8)
    client = await RawClient.connect(app.smtp_port)
    started = time.monotonic()
    replies = []
    while len(replies) < 50:
        reply = await client.cmd("NOOP")
        replies.append(reply)
        if reply != "250 2.0.0 OK":
            break
        await asyncio.sleep(0.1)
    assert replies[-1] == "421 4.4.2 postmux.test Error: session time limit exceeded"
    assert 0.7 < time.monotonic() - started < 3
    assert await client.closed()
    await client.close()


async def test_too_many_errors_close_the_connection_with_421(gateway: StartGateway) -> None:
    app = await gateway(max_errors=3)
    client = await RawClient.connect(app.smtp_port)
    await client.cmd("EHLO client.test")
    assert (await client.cmd("MAIL")).startswith("501 5.5.4 Syntax: MAIL FROM: <address>")
    assert (await client.cmd("RCPT TO:<a@dest.test>")).startswith("503 5.5.1")
    assert (await client.cmd("MAIL")).startswith("501 5.5.4")
    assert await client.reply() == "421 4.7.0 postmux.test Error: too many errors"
    assert await client.closed()
    await client.close()


async def test_slowloris_idle_connections_do_not_starve_a_normal_client(gateway: StartGateway) -> None:
    app = await gateway(timeout=1.5, max_connections_per_ip=150)
    idle = []
    for _ in range(150):  # each sends half a command and then nothing
        c = await RawClient.connect(app.smtp_port, local_addr="127.0.0.3")
        await c.send(b"EH")
        idle.append(c)
    started = time.monotonic()
    assert "queued as" in await send(app.smtp_port, "while-idle")
    assert time.monotonic() - started < 1.0
    up: Upstream = app.upstream  # type: ignore[attr-defined]
    await wait_until(lambda: [r.test_id for r in up.received] == ["while-idle"])
    # And the idle ones are shown the door by the command timeout.
    replies = await asyncio.gather(*(c.reply(timeout=5) for c in idle))
    assert set(replies) == {"421 4.4.2 postmux.test Error: timeout exceeded"}
    for c in idle:
        await c.close()
