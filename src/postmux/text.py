"""Words about text that every room shares: pure checks on bytes, with no I/O and no room of their own.

Ingress refuses or repairs what these find (postmux.ingress.hygiene); delivery repairs it again before it
goes on the wire (postmux.delivery.smtp_client.wire_data). Neither edge imports the other: both import this.
"""

from __future__ import annotations


def has_bare_cr_or_lf(data: bytes) -> bool:
    """Whether some CR or LF is not part of a CRLF (the regex `\\r(?!\\n)|(?<!\\r)\\n`), at memchr speed.

    Every CRLF holds one CR and one LF, so all of them pair up exactly when the three counts are equal.
    The regex, with its look-arounds tried at every byte, cost 11% of postmux's CPU at 50 KB messages
    (bench/README.md, profile_hotpath): 570 µs for 50 KB, the three counts 60 µs.
    """
    pairs = data.count(b"\r\n")
    return data.count(b"\r") != pairs or data.count(b"\n") != pairs


def readable(text: str) -> str:
    """`text` as valid Unicode: each lone surrogate, each octet that was not UTF-8, becomes U+FFFD.

    A server's reply is decoded with "surrogateescape" (aiosmtplib, delivery/pipelining.py), so an old
    receiver answering in Latin-1 ("550 5.1.1 Benutzer unbekannt" with a raw 0xFC) gives a str that no
    UTF-8 writer takes: not the spool's columns, not a DSN (RFC 6533's UTF-8 Diagnostic-Code), not the event
    log or a webhook body. ASCII, almost every reply, returns at once.
    """
    if text.isascii():
        return text
    try:
        octets = text.encode("utf-8", "surrogateescape")  # the octets the server sent, where they came so
    except UnicodeEncodeError:
        octets = text.encode("utf-8", "surrogatepass")  # a surrogate no decoding made: U+FFFD as well
    return octets.decode("utf-8", "replace")
