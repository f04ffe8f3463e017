"""Command pipelining (RFC 2920): MAIL, every RCPT and DATA in one write, their replies read together.

Without it a message costs a round trip per command, and on loopback or a LAN the round trip is mostly
the two ends' system calls: sending MAIL, RCPT and DATA apiece was 38% of the event loop's samples at
1.5 KB (bench/README.md, issue 12). Toward a real MX far away it is 4 round trips a message instead of 2.

aiosmtplib 5 reads one reply per command written: a reply that arrives while none is awaited, or after
the one awaited was parsed but not yet picked up, is dropped as unsolicited. So while the replies to a
group are read, a `GroupReader` stands in for aiosmtplib's protocol on the connection's transport
(asyncio's `set_protocol`), and hands it back after the last of them; connect, EHLO, STARTTLS, AUTH,
the text and QUIT stay aiosmtplib's.
"""

from __future__ import annotations

import asyncio
from typing import cast

import aiosmtplib
from aiosmtplib.protocol import SMTPProtocol

# What a group's replies may take: a few hundred octets each. More is not an SMTP server answering.
MAX_GROUP_REPLIES = 64 * 1024
MAX_REPLY_LINE = 1024  # RFC 5321 4.5.3.1.5: 512 octets a reply line; twice that, for the generous


class GroupReader(asyncio.Protocol):
    """Reads `wanted` replies off a connection in place of aiosmtplib's protocol (`inner`).

    The connection's end (a reset, the server hanging up) fails the read and is passed on to `inner`, so
    aiosmtplib's client knows it is disconnected; so is flow control, so a drain works as before.
    """

    def __init__(self, inner: SMTPProtocol, wanted: int, timeout: float, *, strict: bool = True) -> None:
        self.inner = inner
        self.wanted = wanted
        self.strict = strict
        self.replies: list[aiosmtplib.SMTPResponse] = []
        loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = loop.create_future()
        self._buffer = bytearray()
        # `timeout` bounds each wait for the next reply: one timer, which at its end fails the group if no
        # reply came since it was set, and else is set again (cheaper than a wait per reply: the usual
        # group is answered in one read, before the timer ever ends).
        self._timeout = timeout
        self._seen = 0
        self._timer = loop.call_later(timeout, self._check_progress)

    def _check_progress(self) -> None:
        if self.done.done():
            return
        if len(self.replies) == self._seen:
            self._fail(aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response"))
            return
        self._seen = len(self.replies)
        self._timer = asyncio.get_running_loop().call_later(self._timeout, self._check_progress)

    def stop(self) -> None:
        """The group is over (answered, failed or given up): its timer goes."""
        self._timer.cancel()

    def data_received(self, data: bytes) -> None:
        if self.done.done():
            return  # failed already (a reply past what was asked for fails the group: see _take)
        self._buffer += data
        try:
            self._take()
        except aiosmtplib.SMTPResponseException as e:
            self._fail(e)

    def _take(self) -> None:
        if len(self._buffer) > MAX_GROUP_REPLIES:
            raise aiosmtplib.SMTPResponseException(-1, "Response too long")
        while len(self.replies) < self.wanted:
            reply = take_reply(self._buffer)
            if reply is None:
                return
            self.replies.append(reply)
            if reply.code == 421:
                self._closing(reply)
                return
        if self._buffer and self.strict:
            # A reply to no command: the server and postmux no longer agree on which reply is whose.
            raise aiosmtplib.SMTPResponseException(-1, "Unsolicited reply after pipelined commands")
        self._buffer.clear()  # not strict: dropped, as aiosmtplib drops a reply that none awaits
        self.done.set_result(None)

    def _closing(self, reply: aiosmtplib.SMTPResponse) -> None:
        """A 421: the server is closing the channel (RFC 5321 3.8), so nothing after it will be answered.

        The group ends here with the replies read so far, and the commands not answered yet get that same
        421: it is the receiver's reply to them, which must reach the verdict and shaping as it was said,
        not be lost to the hang-up that follows (a "connection lost" made up here). What is left in the
        buffer is dropped: the session is over, and the caller closes the connection.
        """
        self.replies += [reply] * (self.wanted - len(self.replies))
        self._buffer.clear()
        self.done.set_result(None)

    def _fail(self, error: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(error)
            self.done.exception()  # retrieved: nobody may await it if the attempt was cancelled meanwhile

    def eof_received(self) -> bool:
        self._fail(aiosmtplib.SMTPServerDisconnected("Unexpected EOF received"))
        return False  # the transport closes; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(aiosmtplib.SMTPServerDisconnected(f"Connection lost: {exc}" if exc else "Connection lost"))
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


def take_reply(buffer: bytearray) -> aiosmtplib.SMTPResponse | None:
    """The first whole reply in `buffer`, removed from it; None while it is incomplete.

    RFC 5321 4.2.1: every line is a code and "-" or " " (or nothing) and text; the last line has no "-".
    The lines' texts are joined with "\\n", as aiosmtplib joins them.
    """
    offset, code, lines = 0, -1, []
    while (end := buffer.find(b"\n", offset)) >= 0:
        line = bytes(buffer[offset : end + 1])
        if len(line) > MAX_REPLY_LINE:
            raise aiosmtplib.SMTPResponseException(-1, "Response too long")
        if not line[:3].isdigit():
            shown = line.decode("utf-8", "replace").strip()
            raise aiosmtplib.SMTPResponseException(-1, f"Malformed SMTP response line: {shown}")
        code = int(line[:3])
        lines.append(line[4:].strip(b" \t\r\n"))
        offset = end + 1
        if line[3:4] != b"-":
            del buffer[:offset]
            return aiosmtplib.SMTPResponse(code, b"\n".join(lines).decode("utf-8", "surrogateescape"))
    return None


async def exchange(
    client: aiosmtplib.SMTP, commands: list[bytes], timeout: float, *, strict: bool = True
) -> list[aiosmtplib.SMTPResponse]:
    """Write `commands` (each ending in CRLF) at once and return a reply to each, in order.

    `strict`: a reply past the last one asked for fails the group (the server and postmux no longer agree
    on which reply is whose); else it is dropped, as aiosmtplib drops one that no command awaits (the one
    reply to a message's text, which nothing after it can make ambiguous).

    `timeout` bounds each wait for the next reply, as each command's own timeout would: a group of many
    RCPTs may take as long as they would one by one, a server that stops answering is found as soon.
    Raises as aiosmtplib does: SMTPServerDisconnected, SMTPReadTimeoutError, SMTPResponseException for
    a reply that cannot be read. After an error the connection's state is unknown: close it.

    A 421 ends the group (RFC 5321 3.8: the server is closing the channel): it is the reply to its own
    command and to every command after it. The connection is then as good as closed: close it.
    """
    protocol = client.protocol
    transport = protocol.transport if protocol is not None else None
    if protocol is None or transport is None or transport.is_closing():
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    reader = GroupReader(protocol, len(commands), timeout, strict=strict)
    transport.set_protocol(reader)
    try:
        cast(asyncio.WriteTransport, transport).write(b"".join(commands))
        await reader.done
    finally:
        reader.stop()
        if not transport.is_closing():
            transport.set_protocol(protocol)
    return reader.replies
