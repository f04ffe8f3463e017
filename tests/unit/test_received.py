"""The Received field's `from` clause: a client's HELO never makes it read as a second hop (issue 10 B6)."""

from __future__ import annotations

import re
from email.utils import formatdate

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postmux.ingress.acceptor import date_field, is_helo_name, received_from

HOSTILE = [
    "a.test ([192.0.2.1]) by mx.victim.test",
    "a.test ([1.2.3.4])\r\n\tby evil",
    "a.test\r\nReceived: from forged.test",
    "a.test; Mon, 1 Jan 2024 00:00:00 +0000",
    "a.test (comment",
    "a.test) by evil.test (",
    'a.test "quoted (x)"',
    "a.test\\) by evil",
    "by",
    "FROM",
    "a.test\tby\tevil.test",
    "jörg.exämple.test",
    "[1.2.3.4] by evil.test",
    "[not an address]",
    "x" * 600,
]


def _outside_comments(text: str) -> str:
    """RFC 5322 3.2.2: comments nest, and a backslash quotes the next character."""
    out, depth, i = [], 0, 0
    while i < len(text):
        c = text[i]
        if c == "\\" and depth:
            i += 2
            continue
        if c == "(":
            depth += 1
        elif c == ")" and depth:
            depth -= 1
        elif not depth:
            out.append(c)
        i += 1
    assert depth == 0, f"unclosed comment in {text!r}"
    return "".join(out)


@pytest.mark.parametrize("helo", HOSTILE)
def test_a_hostile_helo_stays_inside_one_comment_of_one_from_clause(helo: str) -> None:
    clause = received_from(helo, "127.0.0.1")
    assert clause.isprintable() and clause.isascii()  # no CR, LF, tab or 8-bit octet: no new line or field
    outside = _outside_comments(clause)
    assert outside.split() == ["from", "unknown"], clause
    assert ";" not in clause and '"' not in clause
    assert len(clause) < 120


@pytest.mark.parametrize(
    "helo",
    [
        "mail.example.com",
        "client.test",
        "host_1.corp.test.",
        "[192.0.2.1]",
        "[IPv6:2001:db8::1]",
        "localhost",
    ],
)
def test_a_helo_that_is_a_name_or_an_address_literal_is_written_as_it_is(helo: str) -> None:
    assert is_helo_name(helo)
    assert received_from(helo, "192.0.2.7") == f"from {helo} ([192.0.2.7])"


@pytest.mark.parametrize(
    "helo", ["-a.test", "a-.test", "a..test", "[2001:db8::1]", "[300.1.1.1]", "a" * 256, "[IPv6:fe80::1%x y]"]
)
def test_names_outside_rfc_5321_syntax_are_shown_in_the_comment(helo: str) -> None:
    assert not is_helo_name(helo)
    clause = received_from(helo, "192.0.2.7")
    assert re.fullmatch(r"from unknown \(\[192\.0\.2\.7\] helo=[A-Za-z0-9.:_\[\]@?-]{1,64}\)", clause), clause


@given(st.integers(min_value=0, max_value=4_102_444_800), st.integers(min_value=0, max_value=999_998))
def test_the_date_made_once_a_second_is_formatdates_for_any_moment_in_that_second(
    second: int, us: int
) -> None:
    """To 2100, to the microsecond (formatdate rounds to it first: within the last half microsecond of a
    second it names the next one, where the second the moment is in is named here)."""
    assert date_field(second) == formatdate(second + us / 1_000_000)
