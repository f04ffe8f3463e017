"""SMTP replies with enhanced status codes (RFC 5321 4.2, RFC 3463)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from postmux.text import readable

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b\s*")


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    enhanced_code: str
    text: str

    @classmethod
    def parse(cls, code: int, message: str) -> Reply:
        """Split a server's reply text into its enhanced code and the rest (RFC 2034 3); octets that are not
        UTF-8 read as U+FFFD (postmux.text.readable), so the reply can go wherever text goes."""
        first = readable(message.strip().splitlines()[0]) if message.strip() else ""
        m = _ENHANCED.match(first)
        if m:
            return cls(code, f"{m.group(1)}.{m.group(2)}.{m.group(3)}", first[m.end() :])
        return cls(code, "", first)

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
