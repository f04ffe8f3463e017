"""Folding long text lines (ingress/folding.py): within the limit, nothing lost, nothing that ends DATA."""

from __future__ import annotations

import itertools
import re

from hypothesis import given
from hypothesis import strategies as st

from postmux.delivery.smtp_client import wire_data
from postmux.ingress.folding import FOLD_WIDTH, LongLine, fold_long_lines, line_pieces
from postmux.ingress.hygiene import normalize_line_endings

# Octets the breaks turn on: whitespace runs, dots, UTF-8 characters, bare CR and LF, words of all sizes.
OCTETS = st.sampled_from(
    [b" ", b"\t", b"  ", b".", b"a", b"word", b"x" * 7, "é€📧".encode(), b"\xe2\x82", b"\r", b"\n"]
)
LINES = st.lists(OCTETS, max_size=40).map(b"".join)
TEXTS = st.lists(LINES, max_size=8).map(lambda lines: b"".join(line + b"\r\n" for line in lines))
WIDTHS = st.integers(min_value=2, max_value=40)


def unfold(line: bytes, width: int) -> bytes:
    """The line back from its pieces: each piece's octets, without the SPACE inserted before it."""
    return b"".join(line[p.start : p.stop] for p in line_pieces(line, width))


ANY_LINE_END = re.compile(rb"(\r\n|\r|\n)")  # a bare CR or LF ends a line once repaired (or is refused)


@given(TEXTS, WIDTHS)
def test_folded_lines_fit_and_removing_the_inserted_breaks_gives_the_original(
    text: bytes, width: int
) -> None:
    folded = fold_long_lines(text, width)
    assert all(len(line) <= width for line in ANY_LINE_END.split(folded)[::2])
    parts = ANY_LINE_END.split(text)  # line, end, line, end, ..., line
    expected = b""
    for original, end in zip(parts[::2], [*parts[1::2], b""], strict=True):
        pieces = line_pieces(original, width)
        shown = [b" " * p.spaced + original[p.start : p.stop] for p in pieces]
        # The folded text is each original line's pieces in order, each on a line of its own.
        expected += b"\r\n".join(shown) + end
        assert [p.start for p in pieces[1:]] == [p.stop for p in pieces[:-1]]  # end to end, no gap
        assert pieces[0].start == 0 and pieces[-1].stop == len(original)
        assert unfold(original, width) == original
        assert all(line[:1] in (b" ", b"\t") for line in shown[1:])  # never a header, boundary or "."
        assert len(pieces) == 1 or len(shown[0]) >= 2
    assert folded == expected


@given(TEXTS.filter(lambda text: b"." not in text), WIDTHS)
def test_folding_and_repairing_bare_line_ends_commute(text: bytes, width: int) -> None:
    # [smtp] line_endings = "normalize" repairs bare CR and LF after folding: the same as folding after.
    assert normalize_line_endings(fold_long_lines(text, width)) == fold_long_lines(
        normalize_line_endings(text), width
    )


def test_a_break_never_lands_behind_a_bare_line_end() -> None:
    # LF-only mail is one long line to SMTP; a break before the TAB of "\n\tby b" would leave "\n\r\n",
    # a blank line once repaired: the end of the header section.
    text = b"Received: from a\n\tby b\nSubject: s\n\n" + b"word word\n" * 300 + b"\r\n"
    assert fold_long_lines(text) == text


@given(TEXTS, WIDTHS)
def test_a_folded_text_on_the_wire_ends_only_at_its_end(text: bytes, width: int) -> None:
    folded = fold_long_lines(text, width)
    wire = wire_data(folded)  # dots stuffed, the end line added
    assert wire.find(b"\r\n.\r\n") == len(wire) - 5 and not wire.startswith(b".\r\n")


def test_lines_of_998_octets_stay_and_longer_ones_break_after_998_as_postfix() -> None:
    assert fold_long_lines(b"a" * 998 + b"\r\n") == b"a" * 998 + b"\r\n"
    assert fold_long_lines(b"a" * 999 + b"\r\n") == b"a" * 998 + b"\r\n a\r\n"
    # Postfix: 998 octets, then CRLF SPACE and 997 more, the SPACE counted in the line.
    folded = fold_long_lines(b"b" * 5000 + b"\r\nnext\r\n")
    assert [len(line) for line in folded.split(b"\r\n")] == [998, 998, 998, 998, 998, 15, 4, 0]
    assert folded.replace(b"\r\n ", b"") == b"b" * 5000 + b"\r\nnext\r\n"


def test_a_long_header_field_breaks_before_whitespace_and_unfolds_exactly() -> None:
    field = b"To: " + b", ".join(b"person%03d@example.test" % i for i in range(100))
    folded = fold_long_lines(field + b"\r\nSubject: s\r\n\r\nbody\r\n")
    assert max(len(line) for line in folded.split(b"\r\n")) <= FOLD_WIDTH
    assert folded.count(b"\r\n ") == 2  # 2,402 octets: three lines, nothing inserted but the CRLFs
    assert re.sub(rb"\r\n(?=[ \t])", b"", folded) == field + b"\r\nSubject: s\r\n\r\nbody\r\n"


def test_no_utf8_character_is_split_and_no_line_is_a_lone_dot() -> None:
    euro = "€".encode()  # 3 octets
    line = b"x" + euro * 400  # 1,201 octets: 998 falls inside a character
    pieces = line_pieces(line)
    assert [(p.start, p.stop, p.spaced) for p in pieces] == [(0, 997, False), (997, 1201, True)]
    assert all(line[p.start : p.stop].decode() for p in pieces)
    # A dot then a space: the first break must not leave a line of just "." (the end of DATA).
    dotted = b". " + b"y" * 1500
    folded = fold_long_lines(dotted + b"\r\n")
    assert b".\r\n" not in folded and folded.startswith(b". yyy")


def fed_in_parts(line: bytes, cuts: list[int], width: int, *, repair: bool) -> bytes:
    """A LongLine's output for `line` fed cut at `cuts`; what it holds stays within one piece."""
    long_line = LongLine(width, repair=repair)
    bounds = sorted({c for c in cuts if 0 < c < len(line)} | {0, len(line)})
    out = []
    for start, stop in itertools.pairwise(bounds):
        out.append(long_line.feed(line[start:stop]))
        assert len(long_line._rest.rstrip(b" \t")) <= width  # a run of whitespace is held until it ends
    return b"".join(out) + long_line.end()


LONG_LINES = LINES.filter(lambda line: b"\r\n" not in line)  # one line: its CRLF comes after it


@given(LONG_LINES, st.lists(st.integers(min_value=0, max_value=400), max_size=10), WIDTHS)
def test_a_long_line_folded_as_it_arrives_is_folded_as_if_whole(
    line: bytes, cuts: list[int], width: int
) -> None:
    assert fed_in_parts(line, cuts, width, repair=False) == fold_long_lines(line + b"\r\n", width)


@given(LONG_LINES, st.lists(st.integers(min_value=0, max_value=400), max_size=10), WIDTHS)
def test_a_long_line_repaired_as_it_arrives_is_folded_then_repaired_as_if_whole(
    line: bytes, cuts: list[int], width: int
) -> None:
    expected = normalize_line_endings(fold_long_lines(line + b"\r\n", width))
    assert fed_in_parts(line, cuts, width, repair=True) == expected


def test_a_long_line_is_written_out_as_it_arrives() -> None:
    long_line = LongLine()
    first = long_line.feed(b"y" * 5000)
    assert first == b"y" * 998 + b"\r\n" + (b" " + b"y" * 997 + b"\r\n") * 4
    assert len(long_line._rest) == 14
    assert long_line.feed(b" " * 3000) == b""  # whitespace: where the next break goes is not known yet
    then = long_line.feed(b"z")
    assert [len(line) for line in then.split(b"\r\n")] == [998, 998, 998, 0]
    rest = long_line.end()
    assert rest == b" " * 21 + b"z\r\n"
    assert first + then + rest == fold_long_lines(b"y" * 5000 + b" " * 3000 + b"z\r\n")
