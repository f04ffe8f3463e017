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


def first_empty_line_end(data: bytes) -> int:
    """header_section_end as it was: the first CRLF CRLF and the first LF LF, each looked for to the end."""
    if data.startswith((b"\r\n", b"\n")):
        return 0
    candidates = [i + 4 for i in [data.find(b"\r\n\r\n")] if i >= 0]
    candidates += [i + 2 for i in [data.find(b"\n\n")] if i >= 0]
    return min(candidates) if candidates else len(data)


CHUNKS = st.sampled_from([b"\r\n", b"\r", b"\n", b"a", b"\r\n\r\n", b"\n\n", b": "])


@given(st.lists(CHUNKS, max_size=30))
def test_header_section_end_looking_up_to_the_first_crlf_crlf_finds_the_same(chunks: list[bytes]) -> None:
    data = b"".join(chunks)
    assert header_section_end(data) == first_empty_line_end(data)
