"""SMTP replies with enhanced status codes (RFC 5321 4.2, RFC 3463)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from postmux.text import readable

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b\s*")
# A reply's text is kept whole, up to this many characters: enough for any receiver's words and help URL
# (Gmail's longest are about 400), bounded for the events, the spool's rows and the DSNs that carry it.
MAX_TEXT = 1000


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    enhanced_code: str
    text: str

    @classmethod
    def parse(cls, code: int, message: str) -> Reply:
        """Split a server's reply text into its enhanced code and the rest (RFC 2034 3); octets that are not
        UTF-8 read as U+FFFD (postmux.text.readable), so the reply can go wherever text goes.

        A multi-line reply (RFC 5321 4.2.1) comes as its lines' texts joined with newlines. Its words are
        often on the later lines (Gmail's "likely unsolicited mail", "very low reputation", its help URL), so
        the whole text is kept: the lines joined with single spaces, each later line without the reply code
        and enhanced code it repeats, and cut at MAX_TEXT characters."""
        text = readable(message).strip()
        lines = [line.strip() for line in text.splitlines()] if "\n" in text or "\r" in text else [text]
        lines = [line for line in lines if line]
        if not lines:
            return cls(code, "", "")
        m = _ENHANCED.match(lines[0])
        enhanced = f"{m.group(1)}.{m.group(2)}.{m.group(3)}" if m else ""
        words = [lines[0][m.end() :] if m else lines[0]]
        if len(lines) == 1:  # nearly every reply (each 250 of a delivery): no pattern to build
            return cls(code, enhanced, bounded(words[0]))
        # A later line may still carry the reply code ("550-", "550 ": aiosmtplib and delivery/pipelining.py
        # strip it, a test's or a DSN's text may not), then the enhanced code again (RFC 2034 3: each line
        # repeats it); both go, so the words read on.
        again = rf"(?:{re.escape(enhanced)}\b)?" if enhanced else ""
        repeated = re.compile(rf"\A(?:{code}(?:[ -]|\Z))?\s*{again}\s*")
        words.extend(repeated.sub("", line, count=1) for line in lines[1:])
        return cls(code, enhanced, bounded(" ".join(w for w in words if w)))

    @classmethod
    def local(cls, code: int, enhanced_code: str, text: str) -> Reply:
        """A reply postmux makes up itself (refused connection, timeout), told apart by its text."""
        return cls(code, enhanced_code, text)

    @property
    def is_success(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def __str__(self) -> str:
        return " ".join(p for p in (str(self.code), self.enhanced_code, self.text) if p)

    def as_dict(self) -> dict[str, object]:
        return {"code": self.code, "enhanced_code": self.enhanced_code, "text": self.text}


def bounded(text: str) -> str:
    """`text` cut to MAX_TEXT characters, "..." saying it was."""
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 3].rstrip() + "..."
