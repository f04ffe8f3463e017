"""The DATA text read a block at a time, by aiosmtpd 1.4.6's own line rules but for what it counts.

aiosmtpd reads DATA one line at a time (`StreamReader.readuntil(b"\\r\\n")` and a Python loop per line):
half of postmux's CPU at 50 KB messages (bench/README.md, profile_hotpath). `DataText` applies the same
rules to whatever has arrived, with bytes operations over the whole block; `BlockDataSMTP.smtp_DATA` feeds
it. The rules, which tests/unit/test_data_text.py holds to a line-by-line model of aiosmtpd's loop and
tests/integration/test_data_blocks.py to aiosmtpd itself, byte stream for byte stream:

- The text is a sequence of lines, each ended by CRLF; a CR or LF alone ends nothing (RFC 5321 2.3.8,
  aiosmtpd's fix for CVE-2024-27305). The first line that is exactly "." ends the text: only CRLF.CRLF
  (or "." as the first line) ends DATA, so no SMTP smuggling variant (`\\n.\\n`, `\\r.\\r`, ...) does.
- A line longer than TEXT_LINE_LIMIT (1000) octets with its CRLF refuses the message (500), and so do
  more than `size_limit` octets in all (552, counting the lines with their CRLFs, not the end line); the
  first of the two to happen counts. aiosmtpd's StreamReader gives up on a line of more than
  `line_limit + 2` octets as sent before counting it, and checks a shorter one after counting it; so does
  this.
- Both are counted without the dots that dot-stuffing doubled, where aiosmtpd counts them. The size as
  RFC 1870 4 defines it, the octets "including CR-LF pairs, but not the SMTP DATA command's terminating
  dot or doubled quoting dots", so a message within the SIZE the server advertised is not refused for its
  dot lines. A line as RFC 5321 4.5.3.1.6 limits it: 1000 octets with its CRLF, "not counting the leading
  dot duplicated for transparency". aiosmtpd refuses a line over its `line_length_limit`, 1001 octets as
  sent, so it takes 999 octets and a CRLF. That limit is also its StreamReader's (the reader of commands
  and of the AUTH exchange, too), which is left as it is: `line_limit` here is that one.
- Once refused, the rest is read up to the end and thrown away: memory stays flat, whatever is sent.
  Nothing is kept of a line longer than `line_limit + 2` either, even unfinished.
- A line that starts with "." loses that dot (RFC 5321 4.5.2).

Each block is searched once for a line that starts with "." (`_first_dot_line`): that one search finds
the end of data too, and a block with no such line (nearly every block: base64 has no dot at all) is
kept as it is, with no un-stuffing pass. The facts the hygiene checks need (a NUL, a bare CR or LF,
ingress/hygiene.py) are found here too, in the pieces the line lengths are measured from, so no check
reads the whole text again after the dot.

With `fold` (postmux's `[smtp] long_lines = "fold"`, the default) no line is too long: a long one is kept
as it arrives, and the text's lines longer than 998 octets are broken as Postfix breaks them on the way
out (ingress/folding.py), a block at a time (`LongLine` for one that spans blocks). A text with no such
line costs nothing more: the longest line of each block is measured already.

With `line_endings` "normalize" each bare CR or LF is repaired as its block is kept (hygiene.py); with
"reject" or "normalize", a text that will be refused for a bare line end or a NUL is no longer kept once
one is seen. Every rule that changes the text (un-stuffing, folding, repair) works on one line, so the
text is kept block by block as it will be stored: in memory, then past `spill_bytes` in a file
(ingress/kept.py). What is counted in it (`received`, `dot_line`) is counted as it is kept.
"""

from __future__ import annotations

import asyncio
import errno
import re
from pathlib import Path
from typing import Any, Literal

import structlog
from aiosmtpd.smtp import MISSING, SMTP
from aiosmtpd.smtp import Envelope as SmtpEnvelope

from postmux.body import BodyFile
from postmux.ingress.folding import FOLD_WIDTH, LongLine, fold_long_lines
from postmux.ingress.hygiene import normalize_line_endings
from postmux.ingress.kept import KeptText

log = structlog.get_logger("postmux.smtp")

# aiosmtpd's own replies, which PostmuxSMTP.push gives an enhanced status code.
LINE_TOO_LONG = "500 Line too long (see RFC5321 4.5.3.1.6)"
TOO_MUCH_DATA = "552 Error: Too much mail data"
# The text could not be kept (its file could not be written): what the spool's failure to store it says.
NO_STORAGE = "452 4.3.1 Insufficient system storage, try again later"
LOCAL_ERROR = "451 4.3.0 Requested action aborted: local error in processing"

BLOCK = 1 << 16  # bytes taken from the reader at a time: whatever has arrived, up to this much

_CRLF = b"\r\n"
_END = b"\r\n.\r\n"  # a CRLF ending a line, then the line "."
# A line that starts with a dot. sre's search for a literal prefix takes half the time bytes.find does
# for these three octets, which it meets at every line end (20 µs for 64 KiB).
_DOT_LINE = re.compile(rb"\r\n\.")
_DOT_HOPS = 8  # dots looked at one by one before that search takes over (_first_dot_line)
# RFC 5321 4.5.3.1.6: "The maximum total length of a text line including the <CRLF> is 1000 octets (not
# counting the leading dot duplicated for transparency)". aiosmtpd's line_length_limit is one more.
TEXT_LINE_LIMIT = 1000

# What happens to a bare CR or LF: kept as it is (aiosmtpd), or the text is refused, or it is repaired.
LineEndings = Literal["keep", "reject", "normalize"]


class DataText:
    """Cuts one message's text out of the bytes that follow the 354, fed to it in blocks of any size."""

    # The longest line taken, with its CRLF and without a stuffed dot: RFC 5321's, unless the reader's
    # own limit (`line_limit`) is less. Never more than that, so a line the reader would overrun is over
    # it too, and the one check of a block's longest line finds both.
    text_line_limit = TEXT_LINE_LIMIT

    def __init__(
        self,
        size_limit: int | None,
        line_limit: int,
        *,
        fold: bool = False,
        line_endings: LineEndings = "keep",
        spill_dir: Path | None = None,
        spill_bytes: int = 0,
    ) -> None:
        self.size_limit = size_limit
        self.line_limit = line_limit  # aiosmtpd's line_length_limit: what its reader holds of a line
        if line_limit < TEXT_LINE_LIMIT:  # (a class attribute otherwise: a message costs no more to begin)
            self.text_line_limit = line_limit
        self.fold = fold  # take lines longer than text_line_limit and fold them, instead of refusing
        self.line_endings = line_endings
        self.refusal: str | None = None  # LINE_TOO_LONG or TOO_MUCH_DATA (or the text not kept), if refused
        self.done = False  # the end-of-data line has been taken
        self.size = 0  # octets counted against size_limit, un-stuffed (RFC 1870 4; while nothing is refused)
        self.nul = False  # the text holds a NUL octet (RFC 5322 2.3)
        self.bare = False  # the text holds a CR or LF that is not part of a CRLF (RFC 5321 2.3.8)
        self.dot_line = False  # a line of the text as kept (un-stuffed, repaired) starts with "."
        # Received: fields in the header section of the text as kept (RFC 5321 4.4): lines before the
        # first empty one, as hygiene.received_count reads them in a CRLF text.
        self.received = 0
        self._kept = KeptText(spill_dir, spill_bytes)  # whole lines, as they will be stored
        self._long: LongLine | None = None  # with `fold`: the long line being taken, while _mid_line
        self._in_head = True  # what is kept so far is all header section
        self._dropped = False  # the text will be refused for a NUL or a bare line end: nothing more is kept
        # The line that has begun but not ended: at most line_limit + 2 octets. Past that it is too long:
        # refused, or with `fold` taken as it is so far; only its last octet is kept if it is a CR (the
        # CRLF that ends the line may be split).
        self._partial = b""
        self._mid_line = False  # _partial is the end of a too-long line, not the start of a line

    @property
    def content(self) -> bytes:
        """The message text kept in memory, once `done` with no `refusal`: all of it, unless `tail`."""
        assert self.done and self.refusal is None
        return self._kept.data()

    @property
    def tail(self) -> BodyFile | None:
        """The rest of the text, past `spill_bytes`, in a file; None when all of it is `content`."""
        assert self.done and self.refusal is None
        return self._kept.tail()

    @property
    def clean(self) -> bool:
        """The text can be sent as it is, then ".\r\n" (postmux.body): CRLF only, no NUL, no dot to stuff.

        Folding keeps it so: the lines it adds start with a space or a tab (ingress/folding.py).
        """
        repaired = self.line_endings == "normalize"
        return not (self.nul or self.dot_line or (self.bare and not repaired))

    def hand_over(self) -> None:
        """`tail`'s file belongs to whoever was given it (the spool): it is no longer deleted here."""
        self._kept.hand_over()

    def discard(self) -> None:
        """Forget the text, and delete its file unless it was handed over. Safe to call again."""
        self._kept.discard()
        self._long = None

    def feed(self, block: bytes) -> int:
        """Takes `block` up to and including the end-of-data line; returns how many octets of it it took.

        Whatever follows the end belongs to the client's next commands and is left to the caller.
        """
        assert not self.done
        carried = len(self._partial)
        data = self._partial + block if carried else block
        dot = self._first_dot_line(data)
        end = _end_line(data, dot) if dot >= 0 else -1
        if end >= 0:
            self._take_lines(data[:end], dot if dot < end else -1)
            self._partial, self.done = b"", True
            return end + 3 - carried
        last_eol = data.rfind(_CRLF)
        whole = last_eol + 2 if last_eol >= 0 else 0  # the lines that have ended, if any
        if whole:
            self._take_lines(data[:whole], dot if dot < whole else -1)
            self._mid_line = False
        self._hold(data[whole:])
        return len(block)

    def _first_dot_line(self, data: bytes) -> int:
        """Where the first line of `data` that starts with "." begins, or -1 if none does."""
        if data[:1] == b"." and not self._mid_line:
            return 0
        # memchr from dot to dot: base64 has no dot at all, and a plain text's few (in the header's
        # Message-ID and addresses, say) are each looked at once, where the search below would read the
        # rest of the block from the first of them (20 µs for 64 KiB). A text with many dots, where a
        # hop a dot would cost more than that search, is left to it after a few.
        first = data.find(b".")
        for _ in range(_DOT_HOPS):
            if first < 0:
                return -1
            if data[first - 2 : first] == _CRLF:
                return first
            first = data.find(b".", first + 1)
        if first < 0:
            return -1
        found = _DOT_LINE.search(data, max(first - 2, 0))
        return found.start() + 2 if found else -1

    def _take_lines(self, lines: bytes, dot: int) -> None:
        """Whole lines (each ended by CRLF), the first beginning a line unless `_mid_line`.

        `dot` is where the first of them that starts with "." begins, or -1 if none does.
        """
        if self.refusal is not None or not lines:
            return
        text = lines
        if dot >= 0:
            # RFC 5321 4.5.2: each line that starts with a dot loses it. Past the first, a "\r\n." found
            # is the start of a line (the line after the last CRLF is not in `lines`). Done before the
            # counting, which is of the text without those dots (RFC 1870 4, RFC 5321 4.5.3.1.6); a block
            # with no dot line (nearly all) pays nothing for it.
            text = lines[:dot] + lines[dot + 1 :].replace(b"\r\n.", _CRLF)
        size = self.size + len(text)
        pieces = text.split(_CRLF)
        longest = max(map(len, pieces)) + 2
        if self.fold:
            if self.size_limit and size > self.size_limit:
                self._refuse(TOO_MUCH_DATA)
                return
        elif (self.size_limit and size > self.size_limit) or longest > self.text_line_limit:
            self._refuse_at_first_fault(lines)
            return
        self.size = size
        # With the CRLFs gone, any CR or LF left is bare: two memchr passes instead of counting CR, LF
        # and CRLF over the whole text (postmux.text.has_bare_cr_or_lf). NUL is looked for the same way.
        bare = self._look_at(b"".join(pieces))
        if not self._dropped:
            self._keep_lines(text, unstuffed=dot >= 0, long=self.fold and longest > FOLD_WIDTH + 2, bare=bare)

    def _look_at(self, octets: bytes) -> bool:
        """Octets of the text with no CRLF in them: a NUL, a bare CR or LF? True if there is a bare one.

        A text that will be refused for what is found here is not kept any further.
        """
        bare = b"\r" in octets or b"\n" in octets
        nul = b"\x00" in octets
        self.nul, self.bare = self.nul or nul, self.bare or bare
        if self.line_endings != "keep" and (nul or (bare and self.line_endings == "reject")):
            self._dropped = True
            self.discard()
        return bare

    def _keep_lines(self, lines: bytes, *, unstuffed: bool, long: bool, bare: bool) -> None:
        """Whole lines, un-stuffed already, kept as they will be stored; `unstuffed` if a dot was taken.

        The dot lines all come after the first line, so what was un-stuffed is in what follows it when
        that first line is the end of a long one.
        """
        if self._long is not None:  # the first line is the end of a long line
            eol = lines.find(_CRLF)
            self._keep(self._long.feed(lines[:eol]) + self._long.end(), changed=True)
            self._long = None
            lines = lines[eol + 2 :]
            if not lines:
                return
        changed = unstuffed or (bare and self.line_endings == "normalize")
        if long:
            lines = fold_long_lines(lines)  # lines it adds start with whitespace: no dot line among them
        if changed and self.line_endings == "normalize":
            lines = normalize_line_endings(lines)  # line by line: the same as on the whole text
        self._keep(lines, changed=changed)

    def _keep(self, lines: bytes, *, changed: bool) -> None:
        """Lines as they will be stored, beginning a line: kept, counted and looked at if `changed`.

        Lines no rule changed were looked at already: none starts with a dot, none is bare.
        """
        if not lines or self.refusal is not None:
            return
        if changed:
            self.dot_line = self.dot_line or lines[:1] == b"." or _DOT_LINE.search(lines) is not None
        if self._in_head:
            self._count_received(lines)
        try:
            self._kept.add(lines)
        except OSError as e:
            log.error("message text could not be written to its file", error=str(e))
            self._refuse(NO_STORAGE if e.errno in (errno.ENOSPC, errno.EDQUOT) else LOCAL_ERROR)

    def _count_received(self, lines: bytes) -> None:
        """The Received: fields among `lines`, up to the first empty line (RFC 5322 2.1, RFC 5321 4.4)."""
        if lines[:2] == _CRLF:
            lines, self._in_head = b"", False
        elif (blank := lines.find(b"\r\n\r\n")) >= 0:
            lines, self._in_head = lines[: blank + 2], False
        head = lines.lower()
        self.received += head.startswith(b"received:") + head.count(b"\r\nreceived:")

    def _refuse_at_first_fault(self, lines: bytes) -> None:
        """Line by line, as aiosmtpd reads them, to say which limit was passed first (rare: refusals).

        `lines` as sent (stuffed), each beginning a line: never the end of a long one (no `fold` here).
        """
        for line in lines.split(_CRLF)[:-1]:
            if len(line) + 2 > self.line_limit + 2:  # aiosmtpd's reader overruns before the line is counted
                self._refuse(LINE_TOO_LONG)
                return
            # RFC 1870 4 and RFC 5321 4.5.3.1.6: both limits are on the line without its stuffed dot.
            length = len(line) + 2 - line.startswith(b".")
            self.size += length
            if self.size_limit and self.size > self.size_limit:
                self._refuse(TOO_MUCH_DATA)
                return
            if length > self.text_line_limit:
                self._refuse(LINE_TOO_LONG)
                return
        raise AssertionError("a block over a limit has a line over it")  # pragma: no cover

    def _hold(self, partial: bytes) -> None:
        if len(partial) < self.line_limit + 2:
            self._partial = partial
            return
        # Whatever ends it, this line is longer than line_limit + 2: refused, and not kept; or, with
        # `fold`, taken as it is so far (a line of one octet to the size limit costs a pass, not a square).
        cr = partial.endswith(b"\r")
        if self.fold:
            # The CR is left for the next block, where it may end the line (CRLF) or turn out bare.
            self._take_long_line(partial[:-1] if cr else partial)
        elif self.refusal is None:
            self._refuse(LINE_TOO_LONG)
        self._partial = b"\r" if cr else b""
        self._mid_line = True

    def _take_long_line(self, octets: bytes) -> None:
        """With `fold`: the part of a long line that has arrived (no CRLF in it), counted and kept."""
        if self.refusal is not None:
            return
        starts = not self._mid_line
        if starts and octets[:1] == b".":
            octets = octets[1:]  # RFC 5321 4.5.2, as in _take_lines; and not counted (RFC 1870 4)
        self.size += len(octets)
        if self.size_limit and self.size > self.size_limit:
            self._refuse(TOO_MUCH_DATA)
            return
        self._look_at(octets)  # no CRLF in it: the line has not ended
        if self._dropped:
            return
        if starts:
            self._long = LongLine(repair=self.line_endings == "normalize")
        assert self._long is not None
        self._keep(self._long.feed(octets), changed=True)

    def _refuse(self, reply: str) -> None:
        self.refusal = reply
        self.discard()  # memory (and disk) stay flat: nothing more of this message is kept


def _end_line(data: bytes, dot: int) -> int:
    """Where the first line of `data` that is just "." begins, at or after `dot` (a line start), or -1."""
    if data.startswith(b".\r\n", dot):
        return dot
    found = data.find(_END, dot)
    return found + 2 if found >= 0 else -1


def unread(reader: asyncio.StreamReader, data: bytes) -> None:
    """Put `data` back at the front of `reader`'s buffer, to be read again before anything else.

    The block taken after the end of data may hold the client's next commands (RFC 2920 pipelining):
    they go back for aiosmtpd's command loop. StreamReader has no public way to do this; `_buffer` is
    the bytearray aiosmtpd itself clears on STARTTLS. tests/unit/test_data_text.py fails if it changes.
    """
    buffer: bytearray = reader._buffer  # type: ignore[attr-defined]
    buffer[:0] = data


class TextEnvelope(SmtpEnvelope):
    """aiosmtpd's envelope, with the DataText its message was read by: the DATA hook reads its facts."""

    def __init__(self) -> None:
        super().__init__()
        self.text: DataText | None = None
        self.mailboxes: set[str] = set()  # rcpt_tos as compared (PostmuxSMTP's handler: one copy a mailbox)


class BlockDataSMTP(SMTP):
    """aiosmtpd's SMTP with DATA read in blocks: the same replies, the same text for the DATA hook.

    But for what it counts (DataText): the size without the doubled quoting dots (RFC 1870 4), and a line
    to 1000 octets with its CRLF, not its stuffed dot (RFC 5321 4.5.3.1.6), where aiosmtpd counts the
    dots and takes 1001. And unless `long_lines` is "fold": then a longer text line is taken, and folded.
    With `line_endings` other than "keep", or a `spill_dir`, see DataText: the DATA hook then reads the
    text from `envelope.text` (a TextEnvelope), which it must hand over or leave to be discarded.
    """

    long_lines: Literal["fold", "refuse"] = "refuse"
    line_endings: LineEndings = "keep"
    spill_dir: Path | None = None  # where a text past spill_bytes goes on (None: it all stays in memory)
    spill_bytes = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self._decode_data:
            raise ValueError("BlockDataSMTP keeps the message text as bytes: decode_data must be False")

    def _create_envelope(self) -> TextEnvelope:
        return TextEnvelope()

    def data_received_hook(self) -> None:
        """Called after each block of DATA text: a subclass can tell that the client is not idle."""

    async def smtp_DATA(self, arg: str) -> None:
        # Up to the 354, aiosmtpd 1.4.6's smtp_DATA word for word.
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert isinstance(self.envelope, TextEnvelope)
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        text = DataText(
            self.data_size_limit,
            self.line_length_limit,
            fold=self.long_lines == "fold",
            line_endings=self.line_endings,
            spill_dir=self.spill_dir,
            spill_bytes=self.spill_bytes,
        )
        try:
            await self._read_text(text)
        finally:
            text.discard()  # its file is deleted, unless the DATA hook handed it over (to the spool)

    async def _read_text(self, text: DataText) -> None:
        assert isinstance(self.envelope, TextEnvelope)
        while not text.done:
            block = await self._reader.read(BLOCK)
            if not block:
                # The client closed its side with its text unfinished: nothing is kept, and the session ends
                # as aiosmtpd ends one whose connection went (PostmuxSMTP.eof_received).
                raise asyncio.CancelledError
            taken = text.feed(block)
            if taken < len(block):
                unread(self._reader, block[taken:])
            self.data_received_hook()
        if text.refusal is not None:
            await self.push(text.refusal)
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        # After the text, aiosmtpd's own steps again (decode_data=False: the content stays bytes).
        self.envelope.content = self.envelope.original_content = text.content
        self.envelope.text = text
        status = await self._call_handler_hook("DATA") if "DATA" in self._handle_hooks else MISSING
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push("250 OK" if status is MISSING else status)
