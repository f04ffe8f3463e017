"""postmux's DATA text must be byte for byte what aiosmtplib's own DATA would send, for any message.

This also fails if aiosmtplib changes how it normalizes line endings or stuffs dots (its functions are
called here): `send_data` would then differ from the library it stands in for.
"""

from __future__ import annotations

from itertools import pairwise

from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from hypothesis import given, settings
from hypothesis import strategies as st

from postmux.delivery.smtp_client import WireText, wire_data


def aiosmtplib_text(message: bytes) -> bytes:
    """What aiosmtplib 5's SMTPProtocol.execute_data_command writes after its 354."""
    return PERIOD_REGEX.sub(b"..", normalize_message_line_endings(message)) + b".\r\n"


# Line ends, dots and the smuggling shapes, so that neighbours like "\r\n." and "\n.\r" come up often.
PIECES = st.sampled_from(
    [b"\r\n", b"\r", b"\n", b".", b"..", b"a", b"x" * 80, b"\r\n.\r\n", b"\n.\n", b"\xc3\xa9", b"\x00"]
)


@given(st.lists(PIECES, max_size=40))
def test_same_text_as_aiosmtplib(pieces: list[bytes]) -> None:
    message = b"".join(pieces)
    assert wire_data(message) == aiosmtplib_text(message)


@given(st.binary(max_size=300))
def test_same_text_as_aiosmtplib_for_any_bytes(message: bytes) -> None:
    assert wire_data(message) == aiosmtplib_text(message)


def test_known_cases() -> None:
    assert wire_data(b"") == b"\r\n.\r\n"
    assert wire_data(b".") == b"..\r\n.\r\n"  # the first line is stuffed too, and the end gets its CRLF
    assert wire_data(b".a\r\n.\r\n..\r\nb.\r\n") == b"..a\r\n..\r\n...\r\nb.\r\n.\r\n"
    assert wire_data(b"a\r\nb") == b"a\r\nb\r\n.\r\n"
    # A bare LF in a stored message is repaired, never sent raw (SMTP smuggling).
    assert wire_data(b"a\n.\nb\r\n") == b"a\r\n..\r\nb\r\n.\r\n"


def wire_in_pieces(text: bytes, cuts: list[int], *, clean: bool) -> bytes:
    """The DATA text of `text` given to WireText cut at `cuts` (as data, then a tail's chunks)."""
    wire = WireText(clean=clean)
    bounds = [0, *sorted(c % (len(text) + 1) for c in cuts), len(text)]
    return b"".join(wire.piece(text[a:b]) for a, b in pairwise(bounds)) + wire.end()


# Many examples: each takes microseconds, and the cuts must land on the rare places (between a CR and its
# LF, on a piece that is only an LF) often enough.
@settings(max_examples=2000)
@given(st.lists(PIECES, max_size=40), st.lists(st.integers(min_value=0), max_size=8))
def test_a_text_in_pieces_goes_as_the_whole_would(pieces: list[bytes], cuts: list[int]) -> None:
    """Repair and stuffing carry across the cuts: a CRLF cut in two is one line end, a dot after a cut
    that starts a line is stuffed, a lone CR before a cut is one line end."""
    text = b"".join(pieces)
    assert wire_in_pieces(text, cuts, clean=False) == wire_data(text) == aiosmtplib_text(text)


@settings(max_examples=1000)
@given(st.binary(max_size=300), st.lists(st.integers(min_value=0), max_size=8))
def test_any_bytes_in_pieces_go_as_the_whole_would(text: bytes, cuts: list[int]) -> None:
    assert wire_in_pieces(text, cuts, clean=False) == aiosmtplib_text(text)


# What ingress calls clean: lines that end in CRLF, none starting with "." (postmux.body).
CLEAN_LINE = st.binary(max_size=80).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"").lstrip(b"."))
CLEAN_TEXT = st.lists(CLEAN_LINE, max_size=20).map(lambda lines: b"".join(line + b"\r\n" for line in lines))


@given(CLEAN_TEXT, st.lists(st.integers(min_value=0), max_size=8))
def test_a_clean_text_goes_as_it_is(text: bytes, cuts: list[int]) -> None:
    expected = text + b".\r\n" if text else b"\r\n.\r\n"
    assert wire_in_pieces(text, cuts, clean=True) == aiosmtplib_text(text) == expected


def test_a_clean_piece_is_sent_without_a_copy() -> None:
    data = b"Subject: x\r\n\r\nbody\r\n"
    wire = WireText(clean=True)
    assert wire.piece(data) is data
    assert wire.end() == b".\r\n"
    # aiosmtplib's rules still hold for what ends without a line end, or is empty.
    assert wire_data(b"", clean=True) == b"\r\n.\r\n"
    assert wire_data(b"a", clean=True) == b"a\r\n.\r\n"


def test_known_cuts() -> None:
    # A CRLF cut in two is one line end, and the dot after it is stuffed.
    assert wire_in_pieces(b"a\r\n.b", [2], clean=False) == b"a\r\n..b\r\n.\r\n"
    # A lone CR at the end of a piece is a line end; the CR opening the next piece is another.
    assert wire_in_pieces(b"a\r\r\n.", [2], clean=False) == b"a\r\n\r\n..\r\n.\r\n"
    # A piece that is only the LF of a cut CRLF ends the CR's wait: the LF after it is a line end.
    assert wire_in_pieces(b"a\r\n\n", [2, 3], clean=False) == b"a\r\n\r\n.\r\n"
    # A dot that opens a piece but not a line is left alone.
    assert wire_in_pieces(b"a.b\r\n", [1], clean=False) == b"a.b\r\n.\r\n"
