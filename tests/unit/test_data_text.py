"""DataText (the DATA text read in blocks) against a line-by-line model of aiosmtpd 1.4.6's smtp_DATA loop.

tests/integration/test_data_blocks.py compares the two readers on real connections; this one is the
fast, exhaustive side: every way of cutting a stream into blocks must give the model's answer. The model
counts as the RFCs do where postmux departs from aiosmtpd on purpose (`aiosmtpd_model`'s `rfc`).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from postmux.ingress.data import LINE_TOO_LONG, TOO_MUCH_DATA, DataText, LineEndings, unread
from postmux.ingress.folding import fold_long_lines
from postmux.ingress.hygiene import normalize_line_endings, received_count

LINE_LIMIT = 1001  # aiosmtpd's line_length_limit (and its StreamReader's limit)
TEXT_LINE = 1000  # RFC 5321 4.5.3.1.6: a text line's octets with its CRLF, not counting a stuffed dot
BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")  # RFC 5321 2.3.8: CR and LF only together, as CRLF


def aiosmtpd_model(
    stream: bytes, size_limit: int | None, *, rfc: bool = True
) -> tuple[int, str | None, bytes] | None:
    """aiosmtpd 1.4.6's smtp_DATA over a stream: (octets taken, refusal, text), or None before the end.

    Its StreamReader (limit 1001) raises LimitOverrunError for a line of more than 1003 octets before the
    line is counted; the loop counts a line, then checks the size, then the line's length.

    With `rfc` (postmux's DataText) a line's stuffed dot is not counted: not in the size, as RFC 1870 4
    defines it ("not the SMTP DATA command's terminating dot or doubled quoting dots"), and not in the
    line's length, which may be 1000 octets with its CRLF (RFC 5321 4.5.3.1.6, "not counting the leading
    dot duplicated for transparency"). aiosmtpd (`rfc=False`) counts the line as sent, in both, and takes
    a line of 1001 octets (its line_length_limit).
    """
    pos, num, refusal, kept = 0, 0, None, []
    while True:
        eol = stream.find(b"\r\n", pos)
        if eol < 0:
            return None
        line, pos = stream[pos : eol + 2], eol + 2
        if line == b".\r\n":
            return pos, refusal, b"".join(kept) if refusal is None else b""
        if len(line) > LINE_LIMIT + 2 and refusal is None:
            refusal = LINE_TOO_LONG
        length = len(line) - (rfc and line.startswith(b"."))
        num += length
        if refusal is None and size_limit and num > size_limit:
            refusal = TOO_MUCH_DATA
        if refusal is None and length > (TEXT_LINE if rfc else LINE_LIMIT):
            refusal = LINE_TOO_LONG
        if refusal is None:
            kept.append(line[1:] if line.startswith(b".") else line)


def folding_model(stream: bytes, size_limit: int | None) -> tuple[int, str | None, bytes] | None:
    """The same loop with [smtp] long_lines = "fold": no line is too long, and the text is folded whole.

    The size as with `rfc` above: the lines without their stuffed dots (RFC 1870 4), before folding.
    """
    pos, num, refusal, kept = 0, 0, None, []
    while True:
        eol = stream.find(b"\r\n", pos)
        if eol < 0:
            return None
        line, pos = stream[pos : eol + 2], eol + 2
        if line == b".\r\n":
            return pos, refusal, fold_long_lines(b"".join(kept)) if refusal is None else b""
        num += len(line) - line.startswith(b".")
        if refusal is None and size_limit and num > size_limit:
            refusal = TOO_MUCH_DATA
        if refusal is None:
            kept.append(line[1:] if line.startswith(b".") else line)


def read_blocks(
    stream: bytes, cuts: list[int], size_limit: int | None, *, fold: bool = False
) -> tuple[int, str | None, bytes] | None:
    """Feed `stream` cut at `cuts` (offsets) to a DataText: what the model returns, or None if not done."""
    text = DataText(size_limit, LINE_LIMIT, fold=fold)
    bounds = sorted({c for c in cuts if 0 < c < len(stream)} | {0, len(stream)})
    taken = 0
    for start, stop in itertools.pairwise(bounds):
        used = text.feed(stream[start:stop])
        assert 0 < used <= stop - start
        taken += used
        if text.done:
            if text.refusal is not None:
                return taken, text.refusal, b""
            # What the hygiene checks need was found on the way, as the regex finds it in the whole text.
            assert text.nul == (b"\x00" in text.content)
            assert text.bare == bool(BARE.search(text.content))
            dot_line = re.search(rb"(?:\A|\r\n)\.", text.content) is not None
            assert text.clean == (not text.nul and not text.bare and not dot_line)
            if not fold:  # RFC 1870 4: the size is the text's, as kept (un-stuffed), CRLFs and all
                assert text.size == len(text.content)
            return taken, text.refusal, text.content
        assert used == stop - start
        assert len(text._partial) <= LINE_LIMIT + 2  # memory stays flat, whatever the line
    return None


# The bytes the rules turn on: line ends whole and bare, dots, the smuggling shapes, lines around the limit.
PIECES = st.sampled_from(
    [
        b"\r\n",
        b"\r",
        b"\n",
        b".",
        b"..",
        b"a",
        b"\x00",
        b"\r\n.\r\n",
        b"\n.\n",
        b"\r.\r",
        b"\r\n.\r",
        b"x" * 997,
        b"x" * 998,
        b"x" * 999,
        b"x" * 1000,
        b"x" * 1001,
        b"x" * 1002,
        b"x" * 2500,
    ]
)
STREAMS = st.lists(PIECES, max_size=30).map(b"".join)
LIMITS = st.one_of(st.none(), st.integers(min_value=1, max_value=6000))


@settings(max_examples=400)
@given(STREAMS, st.lists(st.integers(min_value=0, max_value=40000), max_size=8), LIMITS, st.booleans())
def test_any_cutting_gives_aiosmtpds_answer(
    stream: bytes, cuts: list[int], size_limit: int | None, ended: bool
) -> None:
    if ended:
        stream += b"\r\n.\r\nQUIT\r\n"  # the real end, then a pipelined command that is not the text's
    assert read_blocks(stream, cuts, size_limit) == aiosmtpd_model(stream, size_limit)


@given(STREAMS, LIMITS)
def test_one_octet_at_a_time(stream: bytes, size_limit: int | None) -> None:
    stream += b"\r\n.\r\nMAIL FROM:<a@b.test>\r\n"
    cuts = list(range(len(stream)))
    assert read_blocks(stream, cuts, size_limit) == aiosmtpd_model(stream, size_limit)


@settings(max_examples=400)
@given(STREAMS, st.lists(st.integers(min_value=0, max_value=40000), max_size=8), LIMITS, st.booleans())
def test_folding_any_cutting_gives_the_whole_text_folded(
    stream: bytes, cuts: list[int], size_limit: int | None, ended: bool
) -> None:
    if ended:
        stream += b"\r\n.\r\nQUIT\r\n"
    assert read_blocks(stream, cuts, size_limit, fold=True) == folding_model(stream, size_limit)


@given(STREAMS, LIMITS)
def test_folding_one_octet_at_a_time(stream: bytes, size_limit: int | None) -> None:
    stream += b"\r\n.\r\nMAIL FROM:<a@b.test>\r\n"
    cuts = list(range(len(stream)))
    assert read_blocks(stream, cuts, size_limit, fold=True) == folding_model(stream, size_limit)


def as_kept(
    stream: bytes, size_limit: int | None, *, fold: bool, line_endings: LineEndings
) -> tuple[int, str | None, bytes] | None:
    """The model's text as DataText keeps it: repaired, or nothing of a text that will be refused."""
    model = (folding_model if fold else aiosmtpd_model)(stream, size_limit)
    if model is None or model[1] is not None:
        return model
    taken, _, text = model
    nul, bare = b"\x00" in text, BARE.search(text) is not None
    if line_endings != "keep" and (nul or (bare and line_endings == "reject")):
        return taken, None, b""  # refused after the dot for it (hygiene.text_refusal): not kept
    if line_endings == "normalize":
        text = normalize_line_endings(text)
    return taken, None, text


SPILL_DIR = Path(tempfile.mkdtemp(prefix="postmux-spill-test-"))


def read_kept(
    stream: bytes,
    cuts: list[int],
    size_limit: int | None,
    *,
    fold: bool,
    line_endings: LineEndings,
    spill_bytes: int,
) -> tuple[int, str | None, bytes] | None:
    """Like read_blocks, with a text past `spill_bytes` in a file: the text read back from both."""
    text = DataText(
        size_limit,
        LINE_LIMIT,
        fold=fold,
        line_endings=line_endings,
        spill_dir=SPILL_DIR,
        spill_bytes=spill_bytes,
    )
    bounds = sorted({c for c in cuts if 0 < c < len(stream)} | {0, len(stream)})
    taken = 0
    try:
        for start, stop in itertools.pairwise(bounds):
            taken += text.feed(stream[start:stop])
            if text.done:
                break
        else:
            return None
        if text.refusal is not None:
            assert not os.listdir(SPILL_DIR)  # deleted at once
            return taken, text.refusal, b""
        data, tail = text.content, text.tail
        kept = data + (tail.read() if tail is not None else b"")
        # In memory: all of it (spill_bytes 0: never a file), or the whole lines within spill_bytes.
        assert (tail is not None) == (0 < spill_bytes < len(kept))
        if tail is not None:
            eol = kept.rfind(b"\r\n", 0, spill_bytes)
            assert data == (kept[: eol + 2] if eol >= 0 else b"") and tail.length > 0
        else:
            assert data == kept
        dropped = text.nul or (text.bare and line_endings == "reject")
        if not dropped and (line_endings == "normalize" or not text.bare):
            assert text.received == received_count(kept)
            dot_line = re.search(rb"(?:\A|\r\n)\.", kept) is not None
            assert text.clean == (not dot_line)
        else:
            assert not text.clean
        return taken, None, kept
    finally:
        text.discard()
        assert not os.listdir(SPILL_DIR)


# With trace fields and blank lines, for the count of Received: fields in the header section.
KEPT_STREAMS = st.lists(
    st.one_of(PIECES, st.sampled_from([b"Received: a\r\n", b"rECEIVED:", b"\r\n\r\n"])), max_size=30
).map(b"".join)


@settings(max_examples=400)
@given(
    KEPT_STREAMS,
    st.lists(st.integers(min_value=0, max_value=40000), max_size=8),
    LIMITS,
    st.booleans(),
    st.sampled_from(["keep", "reject", "normalize"]),
    st.sampled_from([0, 1, 5, 100, 1500, 5000]),
)
def test_the_text_is_kept_as_it_will_be_stored_in_memory_or_in_a_file(
    stream: bytes,
    cuts: list[int],
    size_limit: int | None,
    fold: bool,
    line_endings: LineEndings,
    spill_bytes: int,
) -> None:
    stream += b"\r\n.\r\nQUIT\r\n"
    read = read_kept(stream, cuts, size_limit, fold=fold, line_endings=line_endings, spill_bytes=spill_bytes)
    assert read == as_kept(stream, size_limit, fold=fold, line_endings=line_endings)


MESSAGE = b"Subject: s\r\n\r\n.leading dot\r\n..\r\nbody\r\n"
STREAM = MESSAGE + b".\r\nQUIT\r\n"


def test_the_end_marker_split_at_every_point() -> None:
    end = len(MESSAGE)
    for cut in range(end - 2, end + 4):  # inside the CRLF before the dot, at the dot, inside its CRLF
        assert read_blocks(STREAM, [cut], 1000) == (
            end + 3,
            None,
            b"Subject: s\r\n\r\nleading dot\r\n.\r\nbody\r\n",
        )


def test_a_crlf_split_between_blocks_still_ends_the_line_and_bare_ones_do_not() -> None:
    text = DataText(None, LINE_LIMIT)
    assert text.feed(b"a\r") == 2 and not text.done
    assert text.feed(b"\n.") == 2 and not text.done  # "a\r\n", then a line that starts with "."
    assert text.feed(b"\r\nQUIT\r\n") == 2 and text.done  # ".\r\n" ends it; QUIT is left over
    assert text.content == b"a\r\n"
    for fake in (b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\r", b"\r\n.\n"):
        text = DataText(None, LINE_LIMIT)
        assert text.feed(b"a" + fake[:2]) == 3 and text.feed(fake[2:]) == len(fake) - 2
        assert not text.done, fake  # no smuggling variant ends DATA, however it is cut


def test_lines_of_1000_octets_are_taken_1001_refused_not_counting_a_stuffed_dot_across_a_boundary() -> None:
    # RFC 5321 4.5.3.1.6: "The maximum total length of a text line including the <CRLF> is 1000 octets
    # (not counting the leading dot duplicated for transparency)". aiosmtpd takes 1001 as sent.
    for stuffed in (False, True):
        for length, refusal in ((999, None), (1000, None), (1001, LINE_TOO_LONG), (1002, LINE_TOO_LONG)):
            line = (b"." if stuffed else b"x") + b"x" * (length - 3) + b"\r\n"  # `length` octets
            sent = b"." + line if stuffed else line
            stream = b"head\r\n" + sent + b"tail\r\n.\r\n"
            for cut in (6, 7, 500, 6 + len(sent) - 2, 6 + len(sent) - 1, 6 + len(sent)):
                result = read_blocks(stream, [cut, cut + 1], 100_000)
                expected = b"head\r\n" + line + b"tail\r\n" if refusal is None else b""
                assert result == (len(stream), refusal, expected), (stuffed, length, cut)


def test_a_reader_limit_under_1000_octets_is_the_line_limit() -> None:
    # The text's line limit is never above what the reader holds (aiosmtpd's line_length_limit), so a
    # line the reader would overrun is always refused, found by the one check of a block's longest line.
    for length, refusal in ((100, None), (101, LINE_TOO_LONG), (102, LINE_TOO_LONG), (500, LINE_TOO_LONG)):
        for stuffed in (False, True):
            line = (b"." if stuffed else b"z") + b"z" * (length - 3) + b"\r\n"  # `length` octets
            stream = (b"." + line if stuffed else line) + b".\r\n"
            text = DataText(None, 100)
            assert text.feed(stream) == len(stream) and text.done
            assert text.refusal == refusal, (length, stuffed)


def test_an_endless_line_keeps_memory_flat_and_the_end_still_ends() -> None:
    text = DataText(10_000, LINE_LIMIT)
    for _ in range(300):  # 19 MB with no line end
        assert text.feed(b"y" * 65536) == 65536
        assert len(text._partial) <= 1 and text._kept.size == 0
    assert text.refusal == LINE_TOO_LONG
    assert text.feed(b".\r\n") == 3 and not text.done  # still the too-long line, not a line of its own
    assert text.feed(b".\r\nRSET\r\n") == 3 and text.done


def test_folding_an_endless_line_is_kept_a_block_at_a_time_then_refused_at_the_size_limit() -> None:
    text = DataText(1_000_000, LINE_LIMIT, fold=True)
    for i in range(300):  # 19 MB with no line end
        assert text.feed(b"y" * 65535 + b"\r") == 65536
        assert text._partial == b"\r"  # each block is taken as it comes, never joined to the last
        assert (text.refusal is None) == (i < 15) and ((text._kept.size > 0) == (i < 15))
    assert text.refusal == TOO_MUCH_DATA
    assert text.feed(b".\r\n") == 3 and not text.done  # "\r." is still the long line
    assert text.feed(b".\r\nRSET\r\n") == 3 and text.done


def test_folding_a_long_line_across_blocks_keeps_its_dots() -> None:
    text = DataText(None, LINE_LIMIT, fold=True)
    assert text.feed(b"..dot-stuffed\r\n.." + b"z" * 1500) == 1517  # the long line starts stuffed
    assert text.feed(b"." * 1500) == 1500  # a dot in the middle of a line is not stuffing
    assert text.feed(b"\r\n.\r\n") == 5 and text.done and text.refusal is None
    line = b"." + b"z" * 1500 + b"." * 1500
    assert text.content == b".dot-stuffed\r\n" + fold_long_lines(line + b"\r\n")


def test_a_dot_line_is_found_behind_any_number_of_dots_inside_lines() -> None:
    # Dots inside lines are hopped over one by one up to _DOT_HOPS, then searched past: both find the line.
    for inside in (0, 1, 7, 8, 9, 40):
        head = b"Message-Id: <" + b"1." * inside + b"x@vm>\r\n\r\n"
        stream = head + b"body\r\n..stuffed\r\n.\r\nQUIT\r\n"
        expected = head + b"body\r\n.stuffed\r\n"
        assert read_blocks(stream, [], None) == (len(stream) - 6, None, expected)


DOTTED = b"Subject: dots\r\n\r\n" + b"..leading dot\r\n" * 40 + b"..\r\n" * 40 + b"end\r\n"
DOTTED_SIZE = len(DOTTED) - 80  # RFC 1870 4: the size without the 80 doubled quoting dots


def test_a_text_exactly_at_the_size_limit_is_taken_however_many_of_its_lines_are_dot_stuffed() -> None:
    # RFC 1870 4: the size "not [counting] the SMTP DATA command's terminating dot or doubled quoting
    # dots". aiosmtpd counts the dots, so a message at the SIZE limit was refused for its dot lines.
    unstuffed = DOTTED.replace(b"\r\n..", b"\r\n.")
    assert len(unstuffed) == DOTTED_SIZE
    stream = DOTTED + b".\r\nQUIT\r\n"
    for fold in (False, True):
        for cuts in ([], [20], [21, 22, 23], list(range(0, len(stream), 7)), list(range(len(stream)))):
            assert read_blocks(stream, cuts, DOTTED_SIZE, fold=fold) == (len(stream) - 6, None, unstuffed)
            refused = read_blocks(stream, cuts, DOTTED_SIZE - 1, fold=fold)
            assert refused == (len(stream) - 6, TOO_MUCH_DATA, b""), (fold, cuts)


def test_a_long_line_starting_with_a_dot_is_counted_without_it_when_folded() -> None:
    line = b"." + b"w" * 4000 + b"\r\n"  # a long line is taken in pieces (_take_long_line) as it comes
    stream = b".." + b"w" * 4000 + b"\r\n.\r\n"
    for cuts in ([], [1], [1500], [1500, 3000], list(range(0, len(stream), 1100))):
        assert read_blocks(stream, cuts, len(line), fold=True) == (len(stream), None, fold_long_lines(line))
        assert read_blocks(stream, cuts, len(line) - 1, fold=True) == (len(stream), TOO_MUCH_DATA, b"")


def test_too_much_data_is_refused_and_thrown_away() -> None:
    text = DataText(100, LINE_LIMIT)
    assert text.feed(b"z" * 98 + b"\r\n") == 100 and text.refusal is None
    assert text.feed(b"z\r\n") == 3 and text.refusal == TOO_MUCH_DATA and text._kept.size == 0
    assert text.feed(b"\r\n.\r\n") == 5 and text.done


async def test_unread_puts_bytes_back_in_front() -> None:
    # Fails if asyncio.StreamReader stops keeping its buffer where data.unread expects it.
    reader = asyncio.StreamReader()
    reader.feed_data(b"abcdef")
    assert await reader.read(4) == b"abcd"
    unread(reader, b"cd")
    reader.feed_data(b"gh")
    assert await reader.read(100) == b"cdefgh"
    unread(reader, b"QUIT\r\n")
    assert await reader.readuntil(b"\r\n") == b"QUIT\r\n"
