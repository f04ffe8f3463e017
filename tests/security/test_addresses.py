"""Address hygiene: paths that ask for relay tricks, break RFC 5321's grammar or limits, or could never be
sent are refused at MAIL or RCPT; what is taken is routed by its own domain and sent as it was written."""

from __future__ import annotations

from pathlib import Path

import pytest

from postmux.app import App
from postmux.config import RouteSettings
from postmux.ingress.hygiene import NULL_RECIPIENT, SMTPUTF8_UNDECLARED
from tests.security.client import RawClient
from tests.security.conftest import StartGateway, stored
from tests.support import StartUpstream, make_settings, message, wait_until

LONG_LOCAL = "b.6618d93878504e1689c7a.tv4owvhnhflpsctu.firstname.lastname=example.com"  # a VERP path's, 71
LONG_DOMAIN = ".".join(["d" * 63] * 4) + ".test"  # 261 octets


@pytest.mark.parametrize(
    ("rcpt", "expected"),
    [
        ("<@a.test,@b.test:user@dest.test>", "553 5.1.3 <user@dest.test>: source routes"),
        ("<user%other.test@dest.test>", "553 5.1.3 <user%other.test@dest.test>: percent-hack routing"),
        ("<other.test!user>", "553 5.1.3 <other.test!user>: bang paths"),
        ("<other.test!user@dest.test>", "553 5.1.3 <other.test!user@dest.test>: bang paths"),
        ("<postmaster>", "553 5.1.3 <postmaster>: a recipient address needs a domain"),  # no postmaster set
        (
            f"<u@{LONG_DOMAIN}>",
            "553 5.1.3 Domain longer than 253 octets (RFC 1035 2.3.4, RFC 5321 4.5.3.1.2)",
        ),
    ],
    ids=["source-route", "percent-hack", "bang", "bang-at", "no-domain", "long-domain"],
)
async def test_recipient_is_refused(gateway: StartGateway, tmp_path: Path, rcpt: str, expected: str) -> None:
    app = await gateway()
    client = await RawClient.connect(app.smtp_port)
    await client.cmd("EHLO client.test")
    await client.cmd("MAIL FROM:<app@example.com>")
    assert (await client.cmd(f"RCPT TO:{rcpt}")).startswith(expected)
    # Nothing was added: DATA has no recipient to go to.
    assert (await client.cmd("DATA")).startswith("503 5.5.1")
    await client.close()
    assert stored(tmp_path) == 0


@pytest.mark.parametrize(
    ("sender", "expected"),
    [
        ("<@a.test:app@example.com>", "553 5.1.7 <app@example.com>: source routes"),
        (f"<app@{LONG_DOMAIN}>", "553 5.1.7 Domain longer than 253 octets"),
    ],
    ids=["source-route", "long-domain"],
)
async def test_sender_is_refused(gateway: StartGateway, sender: str, expected: str) -> None:
    app = await gateway()
    client = await RawClient.connect(app.smtp_port)
    await client.cmd("EHLO client.test")
    assert (await client.cmd(f"MAIL FROM:{sender}")).startswith(expected)
    assert (await client.cmd("RCPT TO:<u@dest.test>")).startswith("503 5.5.1")
    await client.close()


async def test_limits_themselves_and_the_null_sender_are_accepted(gateway: StartGateway) -> None:
    app = await gateway()
    client = await RawClient.connect(app.smtp_port)
    await client.cmd("EHLO client.test")
    assert (await client.cmd("MAIL FROM:<>")).startswith("250")
    domain = ".".join(["d" * 63] * 3) + "." + "e" * 56 + ".test"
    assert len(domain) == 253  # the longest name DNS can look up
    assert (await client.cmd(f"RCPT TO:<{'l' * 64}@{domain}>")).startswith("250")
    await client.close()


async def test_a_local_part_past_64_octets_is_taken_as_return_paths_make_them(gateway: StartGateway) -> None:
    """RFC 5321 4.5.3.1 asks servers not to enforce 4.5.3.1.1's 64 octets; VERP and SRS return paths (and
    postmux's own, which bounces and complaints come back to) go past it."""
    app = await gateway()
    client = await RawClient.connect(app.smtp_port)
    await client.cmd("EHLO client.test")
    assert (await client.cmd(f"MAIL FROM:<{LONG_LOCAL}@example.com>")).startswith("250")
    assert (await client.cmd(f"RCPT TO:<{LONG_LOCAL}@dest.test>")).startswith("250")
    await client.close()


BAD_RCPT = "501 5.1.3 Bad recipient address syntax: "
BAD_SENDER = "501 5.1.7 Bad sender address syntax: "
QUOTED_AT = '553 5.1.3 <{}>: an @ inside a quoted local part ("user@host") is not accepted'
LDH = "a domain that is not letters, digits and inner hyphens (RFC 5321 4.1.2)"
LITERAL = "not an IPv4 or IPv6 address literal, as [192.0.2.1] or [IPv6:2001:db8::1] (RFC 5321 4.1.3)"
EMPTY_LABEL = "an empty label in the domain (a dot at its start or end, or two in a row)"


@pytest.mark.parametrize(
    ("mail", "rcpt", "expected"),
    [
        # Non-ASCII without SMTPUTF8 at MAIL: aiosmtplib could never encode it (RFC 6531 3.2).
        ("<app@example.com>", "<b@exämple.test>", SMTPUTF8_UNDECLARED),
        ("<app@example.com>", "<jörg@dest.test>", SMTPUTF8_UNDECLARED),
        ("<app@example.com>", "<a\u00a0b@dest.test>", SMTPUTF8_UNDECLARED),
        ("<app@example.com>", b"<a\xffb@dest.test>", SMTPUTF8_UNDECLARED),
        ("<app@example.com>", "<>", NULL_RECIPIENT),
        ("<app@example.com>", "<a\x01b@dest.test>", BAD_RCPT + "a control character in the address"),
        ("<app@example.com>", "<a\tb@dest.test>", BAD_RCPT + "a control character in the address"),
        ("<app@example.com>", "<a\x7fb@dest.test>", BAD_RCPT + "a control character in the address"),
        ("<app@example.com>", '<"user@evil.test">', QUOTED_AT.format('"user@evil.test"')),
        ("<app@example.com>", '<"user@evil.test"@good.test>', QUOTED_AT.format('"user@evil.test"@good.test')),
        ("<app@example.com>", "<a b@dest.test>", BAD_RCPT + "a space outside quotes in the local part"),
        (
            "<app@example.com>",
            "<a..b@dest.test>",
            BAD_RCPT + "a dot at the start or end of the local part, or two in a row (RFC 5321 4.1.2)",
        ),
        (
            "<app@example.com>",
            "<a(c)@dest.test>",
            BAD_RCPT + "'(' is not allowed in a local part outside quotes (RFC 5321 4.1.2)",
        ),
        ("<app@example.com>", "<u@dest..test>", BAD_RCPT + EMPTY_LABEL),
        ("<app@example.com>", "<u@dest.test.>", BAD_RCPT + EMPTY_LABEL),
        ("<app@example.com>", "<u@-dest.test>", BAD_RCPT + LDH),
        ("<app@example.com>", "<u@dest_x.test>", BAD_RCPT + LDH),
        (
            "<app@example.com>",
            "<u@" + "d" * 64 + ".test>",
            BAD_RCPT + "a domain label longer than 63 octets (RFC 1035 2.3.4)",
        ),
        (
            "<app@example.com>",
            "<u@192.0.2.1>",
            BAD_RCPT
            + "a domain ending in a number: an IP address goes in brackets, as [192.0.2.1] (RFC 5321 4.1.3)",
        ),
        ("<app@example.com>", "<u@[192.0.2.256]>", BAD_RCPT + LITERAL),
        ("<app@example.com>", "<u@[IPv6:fe80::1%eth0]>", BAD_RCPT + LITERAL),
        ("<app@example.com>", "<u@[x-tag:abc]>", BAD_RCPT + LITERAL),
        ("<app@example.com>", "<u@dest.test", BAD_RCPT + "the path has no closing >"),
        ("<app@example.com>", "<u@>", BAD_RCPT + "an empty domain"),
        ("<app@example.com>", "<@a.test:@dest.test>", BAD_RCPT + "an empty local part"),
        (
            "<app@example.com>",
            "<@dest.test>",
            BAD_RCPT + "a source route that is not @domain,@domain:mailbox (RFC 5321 4.1.2)",
        ),
        (
            "<app@example.com>",
            '<"ab"c@dest.test>',
            BAD_RCPT + "a quoted local part that is not one quoted string (RFC 5321 4.1.2)",
        ),
        # With SMTPUTF8, UTF-8 is allowed, but not spaces, invisible characters, bytes that are not UTF-8, or
        # a domain IDNA 2008 refuses.
        ("<app@example.com> SMTPUTF8", "<a\u00a0b@dest.test>", BAD_RCPT + "a non-ASCII space in the address"),
        ("<app@example.com> SMTPUTF8", "<a\u2003b@dest.test>", BAD_RCPT + "a non-ASCII space in the address"),
        (
            "<app@example.com> SMTPUTF8",
            "<a\u200bb@dest.test>",
            BAD_RCPT + "an invisible, private-use or unassigned character in the address",
        ),
        ("<app@example.com> SMTPUTF8", b"<a\xffb@dest.test>", BAD_RCPT + "the address is not valid UTF-8"),
        (
            "<app@example.com> SMTPUTF8",
            "<u@\uff45xample.test>",
            BAD_RCPT + "a domain label that is not a valid IDNA 2008 U-label (RFC 5891)",
        ),
    ],
    ids=[
        "unicode-domain",
        "unicode-local",
        "nbsp-without-smtputf8",
        "not-utf8-without-smtputf8",
        "null-recipient",
        "control",
        "tab",
        "del",
        "quoted-at-no-domain",
        "quoted-at-with-domain",
        "space",
        "double-dot",
        "comment",
        "empty-label",
        "trailing-dot",
        "leading-hyphen",
        "underscore",
        "long-label",
        "bare-ip",
        "bad-ipv4-literal",
        "ipv6-zone",
        "general-literal",
        "unclosed",
        "empty-domain",
        "empty-local",
        "route-without-mailbox",
        "broken-quotes",
        "nbsp",
        "em-space",
        "zero-width-space",
        "not-utf8",
        "full-width-letter",
    ],
)
async def test_a_recipient_that_could_never_be_sent_is_refused_with_the_exact_reply(
    gateway: StartGateway, tmp_path: Path, mail: str, rcpt: str | bytes, expected: str
) -> None:
    app = await gateway()
    client = await RawClient.connect(app.smtp_port)
    await client.cmd("EHLO client.test")
    assert (await client.cmd(f"MAIL FROM:{mail}")).startswith("250")
    line = b"RCPT TO:" + rcpt + b"\r\n" if isinstance(rcpt, bytes) else f"RCPT TO:{rcpt}"
    assert await client.cmd(line) == expected
    # The session goes on, and nothing was added: DATA has no recipient to go to.
    assert (await client.cmd("DATA")).startswith("503 5.5.1")
    await client.close()
    assert stored(tmp_path) == 0


@pytest.mark.parametrize(
    ("mail", "expected"),
    [
        ("<jörg@exämple.test>", SMTPUTF8_UNDECLARED),  # swaks --from 'jörg@exämple.test'
        ("<jörg@exämple.test> SIZE=100", SMTPUTF8_UNDECLARED),
        ("<app>", "553 5.1.7 <app>: a sender address needs a domain"),
        ("<a\x01b@example.com>", BAD_SENDER + "a control character in the address"),
        ("<a\u00a0b@example.com> SMTPUTF8", BAD_SENDER + "a non-ASCII space in the address"),
        (b"<\xff@example.com> SMTPUTF8", BAD_SENDER + "the address is not valid UTF-8"),
        ("<app@example..com>", BAD_SENDER + EMPTY_LABEL),
        ("<app@[1.2.3]>", BAD_SENDER + LITERAL),
    ],
    ids=["unicode", "unicode-size", "no-domain", "control", "nbsp", "not-utf8", "empty-label", "bad-literal"],
)
async def test_a_sender_that_could_never_be_sent_is_refused_with_the_exact_reply(
    gateway: StartGateway, mail: str | bytes, expected: str
) -> None:
    app = await gateway()
    client = await RawClient.connect(app.smtp_port)
    await client.cmd("EHLO client.test")
    line = b"MAIL FROM:" + mail + b"\r\n" if isinstance(mail, bytes) else f"MAIL FROM:{mail}"
    assert await client.cmd(line) == expected
    assert (await client.cmd("RCPT TO:<u@dest.test>")).startswith("503")  # no transaction began
    assert (await client.cmd("MAIL FROM:<app@example.com>")).startswith("250")
    await client.close()


async def test_a_unicode_address_is_taken_with_smtputf8_and_sent_as_written(gateway: StartGateway) -> None:
    app = await gateway()
    client = await RawClient.connect(app.smtp_port)
    await client.cmd("EHLO client.test")
    assert (await client.cmd("MAIL FROM:<jörg@exämple.test> SMTPUTF8")).startswith("250")
    assert (await client.cmd("RCPT TO:<用户@例子.测试>")).startswith("250")
    assert (await client.cmd("DATA")).startswith("354")
    await client.send(message("u1") + b".\r\n")
    assert (await client.reply()).startswith("250")
    await client.close()
    up = app.upstream  # type: ignore[attr-defined]
    await wait_until(lambda: len(up.received) == 1, timeout=10)
    assert up.commands[0].startswith("MAIL FROM:<jörg@exämple.test> ")
    assert up.commands[1] == "RCPT TO:<用户@例子.测试>"


async def test_a_quoted_local_part_and_a_literal_are_routed_by_their_own_domain_and_sent_exactly(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    default, routed = await upstream("default"), await upstream("routed")
    pools = [
        {"name": "default", "members": [{"name": "default", "address": default.address}]},
        {"name": "routed", "members": [{"name": "routed", "address": routed.address}]},
    ]
    routes = (
        RouteSettings.model_validate({"match": {"recipient_domain": "dest.test"}, "pool": "routed"}),
        RouteSettings.model_validate({"match": {"recipient_domain": "[127.0.0.1]"}, "pool": "routed"}),
    )
    settings = make_settings(tmp_path, pools).model_copy(update={"route": routes})
    sender = '"app@home.test"@example.com'  # a quoted "@" is a sender's own business: it is sent as is
    # RFC 5321 4.1.2 quoted local parts, written in ways aiosmtplib would re-write; an address literal.
    rcpts = ['"john doe"@Dest.Test', '"\\a,b"@dest.test', '"x\\"y"@dest.test', "u@[127.0.0.1]"]
    async with App(settings) as app:
        client = await RawClient.connect(app.smtp_port)
        await client.cmd("EHLO client.test")
        assert (await client.cmd(f"MAIL FROM:<{sender}>")).startswith("250")
        for rcpt in rcpts:
            assert (await client.cmd(f"RCPT TO:<{rcpt}>")).startswith("250"), rcpt
        assert (await client.cmd("DATA")).startswith("354")
        await client.send(message("q1") + b".\r\n")
        assert (await client.reply()).startswith("250")
        await client.close()
        await wait_until(lambda: sum(len(r.recipients) for r in routed.received) == len(rcpts), timeout=10)
    assert default.received == [] and default.commands == []
    assert {c for c in routed.commands if c.startswith("RCPT")} == {f"RCPT TO:<{r}>" for r in rcpts}
    mails = [c for c in routed.commands if c.startswith("MAIL")]
    assert mails and all(c.startswith(f"MAIL FROM:<{sender}> ") for c in mails)


async def test_the_same_mailbox_twice_is_taken_and_sent_once(gateway: StartGateway) -> None:
    """As Postfix's cleanup: a receiver that does not drop duplicate recipients would deliver twice. The
    domain is case-insensitive (RFC 5321 2.4); the local part is the receiver's business, kept apart."""
    app = await gateway()
    client = await RawClient.connect(app.smtp_port)
    await client.cmd("EHLO client.test")
    await client.cmd("MAIL FROM:<app@example.com>")
    for rcpt in ("dup@dest.test", "dup@dest.test", "dup@DEST.Test", "Dup@dest.test"):
        assert (await client.cmd(f"RCPT TO:<{rcpt}>")).startswith("250 2.1.5")
    assert (await client.cmd("DATA")).startswith("354")
    assert (await client.cmd(b"Subject: dup\r\n\r\nonce\r\n.\r\n")).startswith("250 ")
    await client.close()
    up = app.upstream  # type: ignore[attr-defined]
    await wait_until(lambda: len(up.received) == 1)
    assert sorted(up.received[0].recipients) == ["Dup@dest.test", "dup@dest.test"]


async def test_the_bare_postmaster_goes_to_the_configured_address_from_any_client(
    gateway: StartGateway,
) -> None:
    """RFC 5321 4.5.1: a relay MUST take `RCPT TO:<Postmaster>` (any case, no domain), and from a client it
    does not otherwise relay for; it goes to [smtp] postmaster, and nothing else is opened."""
    app = await gateway(trusted_networks=["192.0.2.0/24"], postmaster="ops@example.net")
    client = await RawClient.connect(app.smtp_port)
    await client.cmd("EHLO client.test")
    await client.cmd("MAIL FROM:<someone@example.org>")
    assert (await client.cmd("RCPT TO:<PostMaster>")).startswith("250 2.1.5")
    assert (await client.cmd("RCPT TO:<user@dest.test>")).startswith("554 5.7.1")  # no relay otherwise
    assert (await client.cmd("DATA")).startswith("354")
    assert (await client.cmd(b"Subject: hello postmaster\r\n\r\nhi\r\n.\r\n")).startswith("250 ")
    await client.close()
    up = app.upstream  # type: ignore[attr-defined]
    await wait_until(lambda: len(up.received) == 1)
    assert up.received[0].recipients == ["ops@example.net"]
