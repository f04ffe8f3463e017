"""The one address parser (RFC 5321 4.1.2/4.1.3, RFC 6531): what it takes, what it refuses and why, and that
what it takes is exactly what delivery sends and what routing goes by."""

from __future__ import annotations

import ipaddress

import pytest
from aiosmtplib.email import quote_address
from hypothesis import example, given, settings
from hypothesis import strategies as st

from postmux.address import (
    _PLAIN_MAILBOX,
    Mailbox,
    Malformed,
    Path,
    Role,
    literal_address,
    parse_mailbox,
    parse_path,
    split_mailbox,
    split_path,
    wire_path,
)
from postmux.envelope import domain_of
from postmux.ingress.hygiene import NULL_RECIPIENT, SMTPUTF8_UNDECLARED, read_path

# -- mailboxes the grammar takes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "local", "domain"),
    [
        ("user@dest.test", "user", "dest.test"),
        ("first.last@sub.dest.test", "first.last", "sub.dest.test"),
        ("!#$%&'*+-/=?^_`{|}~@dest.test", "!#$%&'*+-/=?^_`{|}~", "dest.test"),
        ("User@Dest.TEST", "User", "Dest.TEST"),
        ("u@localhost", "u", "localhost"),
        ("u@a-b.c-d.test", "u", "a-b.c-d.test"),
        ("u@1a.test", "u", "1a.test"),
        ("u@xn--exmple-cua.test", "u", "xn--exmple-cua.test"),
        ('"john doe"@dest.test', '"john doe"', "dest.test"),
        ('"user@evil.test"@good.test', '"user@evil.test"', "good.test"),
        ('"a\\"b"@dest.test', '"a\\"b"', "dest.test"),
        ('"a\\\\b"@dest.test', '"a\\\\b"', "dest.test"),
        ('""@dest.test', '""', "dest.test"),
        ('"john..doe"@dest.test', '"john..doe"', "dest.test"),
        ("u@[192.0.2.1]", "u", "[192.0.2.1]"),
        ("u@[IPv6:2001:db8::1]", "u", "[IPv6:2001:db8::1]"),
        ("u@[ipv6:::ffff:192.0.2.1]", "u", "[ipv6:::ffff:192.0.2.1]"),
        ("jörg@exämple.test", "jörg", "exämple.test"),
        ("用户@例子.测试", "用户", "例子.测试"),
        ("u@EXÄMPLE.test", "u", "EXÄMPLE.test"),
        ("u@straße.test", "u", "straße.test"),
        ("postmaster", "postmaster", ""),
        ('"user@evil.test"', '"user@evil.test"', ""),
    ],
)
def test_the_grammar_takes_these_mailboxes_and_keeps_each_part_as_written(
    text: str, local: str, domain: str
) -> None:
    mailbox = parse_mailbox(text)
    assert mailbox == Mailbox(local, domain)
    assert mailbox.text == text
    assert domain_of(text) == domain.lower()


# -- what it refuses, and the reason it gives -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("a\x01b@dest.test", "a control character"),
        ("a\tb@dest.test", "a control character"),
        ("a\x7fb@dest.test", "a control character"),
        ("a\x85b@dest.test", "a control character"),
        ("ab@dest.test\x00", "a control character"),
        ("a\u00a0b@dest.test", "a non-ASCII space"),
        ("a\u2003b@dest.test", "a non-ASCII space"),
        ("a\u3000b@dest.test", "a non-ASCII space"),
        ("ab@dest\u2028.test", "a non-ASCII space"),
        ('"a\u00a0b"@dest.test', "a non-ASCII space"),
        ("a\u200bb@dest.test", "an invisible"),
        ("a\u202eb@dest.test", "an invisible"),
        ("a\ufeffb@dest.test", "an invisible"),
        ("a\ue000b@dest.test", "an invisible"),
        ("a\udcffb@dest.test", "not valid UTF-8"),
        ("@dest.test", "an empty local part"),
        ("a b@dest.test", "a space outside quotes"),
        (".a@dest.test", "a dot at the start or end"),
        ("a.@dest.test", "a dot at the start or end"),
        ("a..b@dest.test", "two in a row"),
        ("a(b)@dest.test", "'(' is not allowed in a local part"),
        ("a<b@dest.test", "'<' is not allowed in a local part"),
        ("a,b@dest.test", "',' is not allowed in a local part"),
        ('a"b"@dest.test', "'\"' is not allowed in a local part"),
        ("a\\b@dest.test", "'\\\\' is not allowed in a local part"),
        ('"ab"c@dest.test', "not one quoted string"),
        ('"ab@dest.test', "not one quoted string"),
        ('"a"b"@dest.test', "not one quoted string"),
        ('"a\\é"@dest.test', "not one quoted string"),
        ("u@", "an empty domain"),
        ("u@.dest.test", "an empty label"),
        ("u@dest..test", "an empty label"),
        ("u@dest.test.", "an empty label"),
        ("u@b@dest.test", "not letters, digits and inner hyphens"),
        ("u@-dest.test", "not letters, digits and inner hyphens"),
        ("u@dest-.test", "not letters, digits and inner hyphens"),
        ("u@dest_x.test", "not letters, digits and inner hyphens"),
        ("u@dest test", "not letters, digits and inner hyphens"),
        ("u@" + "d" * 64 + ".test", "a domain label longer than 63 octets"),
        ("u@192.0.2.1", "an IP address goes in brackets"),
        ("u@dest.123", "an IP address goes in brackets"),
        ("u@[192.0.2.256]", "not an IPv4 or IPv6 address literal"),
        ("u@[192.0.2]", "not an IPv4 or IPv6 address literal"),
        ("u@[2001:db8::1]", "not an IPv4 or IPv6 address literal"),
        ("u@[IPv6:fe80::1%eth0]", "not an IPv4 or IPv6 address literal"),
        ("u@[IPv6:2001:db8::g]", "not an IPv4 or IPv6 address literal"),
        ("u@[x-tag:content]", "not an IPv4 or IPv6 address literal"),
        ("u@[]", "not an IPv4 or IPv6 address literal"),
        ("u@[192.0.2.1", "not an IPv4 or IPv6 address literal"),
        ("u@ｅxample.test", "not a valid IDNA 2008 U-label"),
        ("u@exämple\u3002test", "not a valid IDNA 2008 U-label"),
        ("u@-ä.test", "not a valid IDNA 2008 U-label"),
        ("u@" + "ä" * 60 + ".test", "not a valid IDNA 2008 U-label"),
        ("u@a\u0308.test", "not a valid IDNA 2008 U-label"),  # not NFC
        ("u@☃.test", "not a valid IDNA 2008 U-label"),  # a symbol IDNA 2008 disallows
    ],
)
def test_the_grammar_refuses_with_a_reason_that_never_quotes_the_address(text: str, reason: str) -> None:
    malformed = parse_mailbox(text)
    assert isinstance(malformed, Malformed)
    assert reason in malformed.reason
    assert malformed.reason.isprintable() and malformed.reason.isascii()


# -- paths: brackets, parameters, null path, source routes ---------------------------------------------


@pytest.mark.parametrize(
    ("arg", "path", "params"),
    [
        ("<u@dest.test>", "<u@dest.test>", ""),
        ("<u@dest.test> SIZE=100 BODY=8BITMIME", "<u@dest.test>", "SIZE=100 BODY=8BITMIME"),
        ('<"a>b"@dest.test> SMTPUTF8', '<"a>b"@dest.test>', "SMTPUTF8"),
        ('<"a\\">b"@dest.test>', '<"a\\">b"@dest.test>', ""),
        ("<>", "<>", ""),
        ("<> SIZE=1", "<>", "SIZE=1"),
        ("u@dest.test SIZE=1", "u@dest.test", "SIZE=1"),
        ('"a b"@dest.test SIZE=1', '"a b"@dest.test', "SIZE=1"),
        ("<u@dest.test", "<u@dest.test", ""),
    ],
)
def test_a_path_ends_at_the_closing_bracket_outside_quotes(arg: str, path: str, params: str) -> None:
    assert split_path(arg) == (path, params)


def test_the_null_path_a_source_route_and_a_bare_mailbox_are_told_apart() -> None:
    assert parse_path("<>") == Path(None)
    assert parse_path("<@a.test,@b.test:u@dest.test>") == Path(
        Mailbox("u", "dest.test"), ("a.test", "b.test")
    )
    assert parse_path("u@dest.test") == Path(Mailbox("u", "dest.test"))
    assert parse_path("<@a.test:u@[IPv6:::1]>") == Path(Mailbox("u", "[IPv6:::1]"), ("a.test",))
    for bad in ("<@a.test>", "<@:u@dest.test>", "<@a..test:u@dest.test>", "<@a.test;u@dest.test>", "<u"):
        assert isinstance(parse_path(bad), Malformed), bad
    assert isinstance(parse_path("<<u@dest.test>>"), Malformed)


# -- the replies ingress refuses with -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "role", "smtputf8", "reply"),
    [
        ("<jörg@exämple.test>", Role.SENDER, False, SMTPUTF8_UNDECLARED),
        ("<b@exämple.test>", Role.RECIPIENT, False, SMTPUTF8_UNDECLARED),
        ("<a\u00a0b@dest.test>", Role.RECIPIENT, False, SMTPUTF8_UNDECLARED),
        ("<a\udcffb@dest.test>", Role.RECIPIENT, False, SMTPUTF8_UNDECLARED),
        (
            "<a\u00a0b@dest.test>",
            Role.RECIPIENT,
            True,
            "501 5.1.3 Bad recipient address syntax: a non-ASCII space in the address",
        ),
        (
            "<a\udcffb@dest.test>",
            Role.SENDER,
            True,
            "501 5.1.7 Bad sender address syntax: the address is not valid UTF-8",
        ),
        ("<>", Role.RECIPIENT, False, NULL_RECIPIENT),
        (
            "<a\x01b@dest.test>",
            Role.SENDER,
            False,
            "501 5.1.7 Bad sender address syntax: a control character in the address",
        ),
        (
            '<"user@evil.test">',
            Role.RECIPIENT,
            False,
            '553 5.1.3 <"user@evil.test">: an @ inside a quoted local part ("user@host") is not accepted',
        ),
        (
            '<"user@evil.test"@good.test>',
            Role.RECIPIENT,
            False,
            '553 5.1.3 <"user@evil.test"@good.test>: an @ inside a quoted local part ("user@host") is not '
            "accepted",
        ),
        ("<app>", Role.SENDER, False, "553 5.1.7 <app>: a sender address needs a domain"),
        ("<postmaster>", Role.RECIPIENT, False, "553 5.1.3 <postmaster>: a recipient address needs a domain"),
    ],
)
def test_ingress_refuses_with_the_exact_reply(raw: str, role: Role, smtputf8: bool, reply: str) -> None:
    assert read_path(raw, role, smtputf8=smtputf8) == reply


def test_ingress_takes_the_null_sender_and_a_quoted_at_in_a_senders_local_part() -> None:
    assert read_path("<>", Role.SENDER, smtputf8=False) == Path(None)
    sender = read_path('<"a@b"@example.com>', Role.SENDER, smtputf8=False)
    assert sender == Path(Mailbox('"a@b"', "example.com"))
    assert read_path("<jörg@exämple.test>", Role.SENDER, smtputf8=True) == Path(
        Mailbox("jörg", "exämple.test")
    )


# -- delivery's guard -----------------------------------------------------------------------------------


def test_delivery_sends_the_mailbox_as_parsed_and_refuses_what_it_cannot_send() -> None:
    assert wire_path("", Role.SENDER, smtputf8=False) == b"<>"
    assert wire_path('"a\\"b"@dest.test', Role.RECIPIENT, smtputf8=False) == b'<"a\\"b"@dest.test>'
    assert wire_path("jörg@exämple.test", Role.RECIPIENT, smtputf8=True) == "<jörg@exämple.test>".encode()
    unicode = wire_path("jörg@exämple.test", Role.RECIPIENT, smtputf8=False)
    assert isinstance(unicode, Malformed) and unicode.needs_smtputf8
    # What older versions stored: the null path as a recipient, a quoted "@" with no domain, control
    # characters, a non-ASCII space.
    for stored in ("", '"user@evil.test"', "a\x01b@dest.test", "a\u00a0b@dest.test", "u@dest.test\r\n"):
        refused = wire_path(stored, Role.RECIPIENT, smtputf8=True)
        assert isinstance(refused, Malformed) and not refused.needs_smtputf8, stored


def test_aiosmtplib_would_re_escape_a_quoted_local_part_so_delivery_sends_the_path_itself() -> None:
    # aiosmtplib's quote_address reads the address with email.utils.parseaddr and writes it anew: the same
    # mailbox to RFC 5321, other bytes than the ones parsed, routed and stored.
    assert quote_address('"\\a,b"@dest.test') == '<"a,b"@dest.test>'
    assert wire_path('"\\a,b"@dest.test', Role.RECIPIENT, smtputf8=False) == b'<"\\a,b"@dest.test>'


def test_a_quoted_at_does_not_move_the_routing_domain() -> None:
    assert domain_of('"user@evil.test"@Good.Test') == "good.test"
    assert domain_of('"user@evil.test"') == ""
    assert domain_of('"a\\"@evil.test"@good.test') == "good.test"
    assert domain_of("User@Dest.Test") == "dest.test"
    assert domain_of("") == ""
    assert split_mailbox('"x@y"@z.test') == ('"x@y"', "@", "z.test")


def test_an_address_literal_names_its_address() -> None:
    assert literal_address("[192.0.2.1]") == ipaddress.IPv4Address("192.0.2.1")
    assert literal_address("[ipv6:2001:DB8::1]") == ipaddress.IPv6Address("2001:db8::1")
    for not_literal in ("dest.test", "[192.0.2.1", "[tag:x]", "[IPv6:1.2.3.4]", "[]"):
        assert literal_address(not_literal) is None


# -- the property: whatever ingress takes, delivery sends exactly and routing agrees ------------------

_PIECES = [
    "a", "B", "z9", ".", "..", "@", '"', "\\", " ", "<", ">", "[", "]", ":", ",", "(", "-", "_", "%", "!",
    "x.test", "dest.test", "IPv6:", "::1", "192.0.2.1", "ä", "é", "例", "ß", "ｅ", "\u00a0", "\u2003",
    "\u200b", "\u202e", "\t", "\x01", "\x7f", "\udcff", "\u3002", "xn--", "+tag", "'", "{", "~",
]  # fmt: skip
_noise = st.lists(st.sampled_from(_PIECES), max_size=12).map("".join)
_label = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9-]{0,8}[A-Za-z0-9])?", fullmatch=True) | st.sampled_from(
    ["exämple", "例子", "straße", "xn--zca"]
)
_domain = st.lists(_label, min_size=1, max_size=4).map(".".join) | st.sampled_from(
    ["[192.0.2.1]", "[IPv6:::1]", "[IPv6:2001:db8::ff00:42:8329]", "[IPv6:::ffff:192.0.2.1]"]
)
_atom = st.from_regex(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]{1,6}", fullmatch=True) | st.sampled_from(
    ["jörg", "例"]
)
_quoted = st.lists(
    st.sampled_from(["a", " ", "@", "\\\\", '\\"', "(", ">", "ä", ".", "\\a", ","]), max_size=6
).map(lambda parts: '"' + "".join(parts) + '"')
_local = st.lists(_atom, min_size=1, max_size=3).map(".".join) | _quoted
_mailbox = st.builds(lambda local, domain: f"{local}@{domain}", _local, _domain)
_candidate = st.one_of(
    _mailbox,
    _mailbox,
    st.builds(lambda a, b: a + b, _mailbox, _noise),
    st.builds(lambda a, b: a + b, _noise, _mailbox),
    _noise,
)


@settings(max_examples=600, deadline=None)
@given(text=_candidate, role=st.sampled_from(Role), smtputf8=st.booleans())
@example(text='"user@evil.test"', role=Role.RECIPIENT, smtputf8=False)
@example(text='"a\\"b"@dest.test', role=Role.RECIPIENT, smtputf8=False)
@example(text="jörg@exämple.test", role=Role.SENDER, smtputf8=False)
@example(text="a\u00a0b@dest.test", role=Role.RECIPIENT, smtputf8=True)
def test_whatever_ingress_takes_is_sent_exactly_and_routed_by_its_own_domain(
    text: str, role: Role, smtputf8: bool
) -> None:
    arg = f"<{text}>" + (" SMTPUTF8" if smtputf8 else "")
    raw, _ = split_path(arg)
    taken = read_path(raw, role, smtputf8=smtputf8)
    if isinstance(taken, str):
        assert taken[:3] in ("501", "553") and "\r" not in taken and "\n" not in taken
        return
    if taken.mailbox is None:  # the null reverse-path, MAIL only
        assert role is Role.SENDER and raw == "<>"
        return
    mailbox = taken.mailbox
    # What delivery sends at MAIL/RCPT is this mailbox, byte for byte, in the charset the client declared
    # (aiosmtplib encodes ASCII unless SMTPUTF8): no UnicodeEncodeError, no rewriting.
    sent = wire_path(mailbox.text, role, smtputf8=smtputf8)
    assert sent == f"<{mailbox.text}>".encode("utf-8" if smtputf8 else "ascii")
    assert not any(b in sent for b in (b"\r", b"\n", b"\x00"))
    # aiosmtplib's own address check takes it too; it rewrites quoted local parts (below), so delivery
    # sends the path itself (smtp_client.send_mail), but a dot-string goes through it unchanged.
    quoted = quote_address(mailbox.text)
    assert quoted == f"<{mailbox.text}>" or mailbox.local_part.startswith('"')
    # A server reading that line finds the same mailbox, and the same path end.
    assert split_path(sent.decode() + " SIZE=1") == (sent.decode(), "SIZE=1")
    assert parse_path(sent.decode()) == Path(mailbox)
    # Routing, queues, shaping and MX use the domain the parser found.
    assert domain_of(mailbox.text) == mailbox.routing_domain == mailbox.domain.lower()
    assert mailbox.domain  # hygiene took no domainless address


_ascii_noise = st.text(alphabet='aZ9.-@_+"[]:\\ \x01', max_size=12)


@settings(max_examples=800, deadline=None)
@given(text=st.one_of(_candidate, _ascii_noise, st.builds(lambda a, b: a + b, _mailbox, _ascii_noise)))
@example(text="a@b.123")  # a last label of digits only: the parser refuses it
@example(text="a@b.1-2")
@example(text="u@" + "d" * 64 + ".test")  # a label past 63 octets
@example(text="a..b@dest.test")
@example(text="a@-dest.test")
def test_the_usual_address_skips_the_parser_only_where_the_parser_takes_it_as_it_is(text: str) -> None:
    # wire_path's shortcut (_PLAIN_MAILBOX) must never send what the parser would refuse or write otherwise.
    if not _PLAIN_MAILBOX.fullmatch(text):
        return
    mailbox = parse_mailbox(text)
    assert isinstance(mailbox, Mailbox) and mailbox.text == text and mailbox.domain
    for role in Role:
        assert wire_path(text, role, smtputf8=False) == f"<{text}>".encode("ascii")


def test_a_domain_is_as_long_as_dns_can_look_up_and_no_longer_counted_in_a_labels() -> None:
    longest = ".".join(["d" * 63] * 3) + "." + "e" * 56 + ".test"  # 253: DNS's limit (RFC 1035 2.3.4)
    assert not isinstance(read_path(f"<u@{longest}>", Role.RECIPIENT, smtputf8=False), str)
    one_more = ".".join(["d" * 63] * 3) + "." + "e" * 57 + ".test"
    refused = read_path(f"<u@{one_more}>", Role.RECIPIENT, smtputf8=False)
    assert refused == "553 5.1.3 Domain longer than 253 octets (RFC 1035 2.3.4, RFC 5321 4.5.3.1.2)"
    # 239 characters of text, but its A-labels (what DNS is asked: xn--...) come to 275.
    unicode = ".".join(["ä" * 39] * 6)
    assert len(unicode) < 253 and isinstance(read_path(f"<u@{unicode}>", Role.RECIPIENT, smtputf8=True), str)
