from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from postmux.headers import header_section_end, take_header


def test_takes_every_field_of_that_name_folded_or_not_and_keeps_the_rest_byte_for_byte() -> None:
    raw = (
        b"Received: from a\r\n\tby b\r\nX-Postmux-Pool: bulk\r\nSubject:  Hi  there \r\n"
        b"x-postmux-pool: news\r\n  letters\r\nTo: u@x.test\r\n\r\nX-Postmux-Pool: in the body stays\r\n"
    )
    rest, values = take_header(raw, "X-Postmux-Pool")
    assert values == ["bulk", "news letters"]
    assert rest == (
        b"Received: from a\r\n\tby b\r\nSubject:  Hi  there \r\nTo: u@x.test\r\n\r\n"
        b"X-Postmux-Pool: in the body stays\r\n"
    )


def test_a_message_without_the_field_is_returned_as_is() -> None:
    raw = b"Subject: x\r\n\r\nbody\r\n"
    rest, values = take_header(raw, "X-Postmux-Pool")
    assert rest is raw and values == []


def test_header_section_end() -> None:
    assert header_section_end(b"A: b\r\n\r\nbody") == 8
    assert header_section_end(b"A: b\n\nbody") == 6
    assert header_section_end(b"A: b\r\n") == 6  # no body: everything is headers
    assert header_section_end(b"\r\nbody") == 0


@given(st.binary(max_size=300))
def test_never_adds_bytes_and_keeps_the_body(raw: bytes) -> None:
    rest, values = take_header(raw, "X-Postmux-Pool")
    end = header_section_end(raw)
    assert rest.endswith(raw[end:])
    assert len(rest) <= len(raw)
    if not values:
        assert rest == raw
