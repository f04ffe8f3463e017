"""postmux's DATA text must be byte for byte what aiosmtplib's own DATA would send, for any message.

This also fails if aiosmtplib changes how it normalizes line endings or stuffs dots (its functions are
called here): `send_data` would then differ from the library it stands in for.
"""

from __future__ import annotations

from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from hypothesis import given
from hypothesis import strategies as st

from postmux.delivery.smtp_client import wire_data


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
