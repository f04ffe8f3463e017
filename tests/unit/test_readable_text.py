"""postmux.text.readable: a server's reply, decoded with surrogateescape, made valid Unicode for every
writer it goes to (the spool, a DSN, the event log, webhooks)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from postmux.reply import Reply
from postmux.text import readable


@given(st.binary(max_size=200))
def test_octets_a_server_sent_read_as_utf_8_with_replacement_characters(octets: bytes) -> None:
    kept = octets.decode("utf-8", "surrogateescape")  # as aiosmtplib and delivery/pipelining.py decode
    assert readable(kept) == octets.decode("utf-8", "replace")
    readable(kept).encode("utf-8")  # strict: no surrogate left


@given(st.text(max_size=200))
def test_text_that_is_already_valid_is_left_as_it_is(text: str) -> None:
    valid = text.encode("utf-8", "replace").decode("utf-8")  # st.text may draw lone surrogates itself
    assert readable(valid) == valid


def test_a_surrogate_no_decoding_made_is_replaced_too() -> None:
    assert readable("a\ud800b") == "a\ufffd\ufffd\ufffdb"  # the three octets of its UTF-8 form, each invalid
    readable("a\ud800b").encode("utf-8")


def test_a_latin_1_reply_parses_into_readable_text() -> None:
    latin_1 = b"550 5.1.1 Benutzer unbekannt \xfc".decode("utf-8", "surrogateescape")
    assert Reply.parse(550, latin_1[4:]) == Reply(550, "5.1.1", "Benutzer unbekannt \ufffd")
