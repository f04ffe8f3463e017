"""The count-based bare CR / LF check must agree with the regex it replaces, on any bytes."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from postmux.text import has_bare_cr_or_lf

REGEX = re.compile(rb"\r(?!\n)|(?<!\r)\n")  # RFC 5321 2.3.8: CR and LF only together, as CRLF

# Mostly line-ending bytes and dots, so the interesting neighbours (CR CR LF, LF CR, ...) come up often.
CHUNKS = st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"a", b"\x00", b"\r\n.\r\n"]), max_size=40)


@given(CHUNKS)
def test_agrees_with_the_regex(chunks: list[bytes]) -> None:
    data = b"".join(chunks)
    assert has_bare_cr_or_lf(data) == bool(REGEX.search(data))


def test_known_cases() -> None:
    assert not has_bare_cr_or_lf(b"a\r\nb\r\n.\r\n")
    assert not has_bare_cr_or_lf(b"")
    for smuggled in (b"a\n.\nb", b"a\n.\r\nb", b"a\r.\rb", b"a\r\n.\rb", b"\r\r\n", b"\r\n\n"):
        assert has_bare_cr_or_lf(smuggled), smuggled
