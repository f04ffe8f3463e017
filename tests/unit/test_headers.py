from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from postmux.envelope import LABEL_NAME_MAX, LABEL_VALUE_MAX, LABELS_MAX
from postmux.headers import field_value, has_obsolete_field, header_section_end, take_fields, take_header
from postmux.ingress.acceptor import labels


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


def test_take_fields_takes_several_names_in_one_pass_and_keeps_every_other_byte() -> None:
    data = b"A: 1\r\nX-P-One: a\r\n\tb\r\nB:  2 \r\nx-p-two: c\r\nX-P-One: d\r\n\r\nX-P-One: body\r\n"
    kept, taken = take_fields(data, ("X-P-One", "X-P-Two"), prefix="X-P-")
    assert kept == b"A: 1\r\nB:  2 \r\n\r\nX-P-One: body\r\n"
    assert taken == {"x-p-one": ["a b", "d"], "x-p-two": ["c"]}
    assert take_fields(b"A: 1\r\n\r\nX-P-One: body\r\n", ("X-P-One",), prefix="X-P-") == (
        b"A: 1\r\n\r\nX-P-One: body\r\n",
        {},
    )


def test_field_value_reads_the_first_field_unfolded_and_nothing_from_the_body() -> None:
    assert field_value(b"Message-Id:\r\n <a@b>\r\nMessage-ID: <c@d>\r\n\r\n", "Message-ID") == "<a@b>"
    assert field_value(b"X: 1\r\nmessage-id: <e@f>\r\n\r\n", "Message-ID") == "<e@f>"
    assert field_value(b"X: 1\r\n\r\nMessage-ID: <body@x>\r\n", "Message-ID") == ""
    assert field_value(b"X-Message-ID: <no@x>\r\n\r\n", "Message-ID") == ""


def test_labels_are_bounded_as_the_api_bounds_them() -> None:
    values = [f"n{i}=v" for i in range(LABELS_MAX + 5)] + ["n0=again", "bare", "=no name"]
    found = labels(values)
    assert len(found) == LABELS_MAX and found["n0"] == "again" and "bare" not in found
    assert labels(["x" * 100 + "=" + "y" * 2000]) == {"x" * LABEL_NAME_MAX: "y" * LABEL_VALUE_MAX}
    assert labels(["bare", " spaced = out "]) == {"bare": "", "spaced": "out"}


# Lines of a header section with the neighbours that matter: `From :`, `From:`, `from\t:`, `Fromage :`,
# a Received line that holds "from ", folding.
_HEAD_LINES = st.lists(
    st.sampled_from(
        [
            b"From : a@x",
            b"From: a@x",
            b"from\t: a@x",
            b"FROM  :a",
            b"Fromage : x",
            b"Received: from x",
            b" from : folded",
            b"X-From : y",
            b"Subject: hi",
        ]
    ),
    max_size=6,
)


@given(_HEAD_LINES)
def test_an_obsolete_from_is_found_as_a_multiline_pattern_finds_it(lines: list[bytes]) -> None:
    head = b"\r\n".join(lines) + b"\r\n\r\n"
    expected = re.search(rb"(?im)^from[ \t]+:", head) is not None
    assert has_obsolete_field(head, "From") == expected
