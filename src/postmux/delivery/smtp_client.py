"""SMTP delivery over reused connections (aiosmtplib), for both kinds of member.

A relay member always connects to its one upstream. A source member connects from its own local address
to the recipient domain's MX hosts, best first, moving to the next host when one cannot be reached or
greets with a refusal (RFC 5321 5.1); once a host has answered a transaction, its answer stands.

After EHLO each new connection starts TLS as the member's `tls` mode says (postmux.delivery.tls), and
logs in when the member has credentials; both happen once per connection, never per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import re
import ssl
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field, replace
from typing import Protocol, cast

import aiosmtplib
import structlog
from aiosmtplib.protocol import SMTPProtocol

from postmux.address import Malformed, Role, literal_address, wire_path
from postmux.attempt import AttemptOutcome, Breakoff, Recipient, Transaction
from postmux.body import BodyFile, BodyUnreadable
from postmux.config import DeliverySettings, MemberSettings
from postmux.delivery.dsn import downgraded
from postmux.delivery.mx import MxResolver
from postmux.delivery.pipelining import exchange
from postmux.delivery.tls import describe_tls
from postmux.reply import Reply
from postmux.text import has_bare_cr_or_lf
from postmux.tls import client_context

log = structlog.get_logger("postmux.delivery")

# A lost connection says nothing about the message: these are transient, local replies (RFC 3463 4.4.x).
_LOCAL_ERRORS = (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError, TimeoutError)


def local_failure(error: BaseException, where: str) -> tuple[Breakoff, Reply]:
    """Where a connection failed (timeout, refused, lost) and the reply its recipients get for it."""
    if isinstance(error, aiosmtplib.SMTPConnectTimeoutError | aiosmtplib.SMTPTimeoutError | TimeoutError):
        return Breakoff.TIMEOUT, Reply(451, "4.4.2", f"timeout {where}")
    if isinstance(error, aiosmtplib.SMTPConnectError | ConnectionRefusedError):
        return Breakoff.CONNECT, Reply(451, "4.4.1", f"connection refused {where}")
    return Breakoff.LOST, Reply(451, "4.4.2", f"connection lost {where}: {error}".rstrip(": "))


Target = tuple[str, int]  # (host, port) one connection goes to
# Which idle connections a delivery may take: the target, and under tls = "verify" the name its certificate
# was checked for ("" otherwise: any connection to the target will do).
PoolKey = tuple[Target, str]

# Any CR, LF or CRLF: a stored message should hold none but CRLF, but one that does is repaired here.
_ANY_LINE_END = re.compile(rb"\r\n|\r|\n")
END_OF_DATA = b".\r\n"  # RFC 5321 4.1.1.4: the line "." ends the text


class WireText:
    """The DATA text of one message, given piece by piece (data, then each chunk of a tail), as sent.

    What goes on the wire is what aiosmtplib's `execute_data_command` would send for the whole text at once
    (tests/unit/test_wire_data.py compares the two, for random texts cut at random places), at a fraction
    of its cost: aiosmtplib runs a line-ending regex and a dot regex over every byte, 15% of postmux's CPU
    at 50 KB (bench/README.md, profile_hotpath).

    A `clean` text (postmux.body: ingress found CRLF line ends only and no line starting with ".") goes as
    it is, with no search over it: the pieces are the very objects given. Any other text (older spools,
    DSNs) is checked, and repaired where it must be: one bare LF sent raw would let a member read `\n.\n`
    as the end of the message (SMTP smuggling, CVE-2023-51764).
    """

    __slots__ = ("_after_cr", "_clean", "_empty", "_line_start")

    def __init__(self, *, clean: bool) -> None:
        self._clean = clean
        self._empty = True  # nothing of the text seen yet
        self._line_start = True  # the next octet starts a line (the text's first one does)
        # The last piece ended with a CR, already sent as a CRLF: a LF opening the next piece is that
        # CRLF's own, not a line end of its own (a CRLF cut in two must not become two line ends).
        self._after_cr = False

    def piece(self, octets: bytes) -> bytes:
        """What goes on the wire for the next `octets` of the text."""
        if not self._clean:
            octets = self._repaired(octets)
        if octets:
            self._empty = False
            self._line_start = octets.endswith(b"\n")  # every line end on the wire is a CRLF
        return octets

    def end(self) -> bytes:
        """The end-of-data line, after a line end if the text did not end with one.

        As aiosmtplib: an empty text is sent as one empty line (RFC 5321 4.1.1.4 has the text end with
        CRLF, so the "." starts a line of its own).
        """
        return END_OF_DATA if self._line_start and not self._empty else b"\r\n" + END_OF_DATA

    def _repaired(self, octets: bytes) -> bytes:
        if not octets:
            return octets  # nothing to carry on: the state stays as it was
        if self._after_cr and octets.startswith(b"\n"):
            octets = octets[1:]
        self._after_cr = octets.endswith(b"\r")  # a piece that was only that LF ends none
        if not octets:
            return octets
        if has_bare_cr_or_lf(octets):
            octets = _ANY_LINE_END.sub(b"\r\n", octets)
        # RFC 5321 4.5.2: a line that starts with "." gets one more, the first line included.
        stuffed = octets.replace(b"\r\n.", b"\r\n..")
        if self._line_start and stuffed.startswith(b"."):
            stuffed = b"." + stuffed
        return stuffed


def wire_data(message: bytes, *, clean: bool = False) -> bytes:
    """The DATA text for the whole of `message`: CRLF line ends, dots stuffed, the end-of-data line."""
    text = WireText(clean=clean)
    return text.piece(message) + text.end()


async def send_data(
    client: aiosmtplib.SMTP,
    data: bytes,
    *,
    timeout: float,
    tail: BodyFile | None = None,
    clean: bool = False,
) -> aiosmtplib.SMTPResponse:
    """DATA, then the text (`data`, then `tail`'s chunks), then the reply; errors as aiosmtplib's `SMTP.data`.

    Public aiosmtplib API but for the drain (`_drained`): `execute_command` for DATA and its 354, then
    the connection's protocol `write` and `read_response`. `timeout` bounds each wait, as aiosmtplib's
    `data(timeout=)` does: the 354, each wait for the connection to take more of a tail, the reply.

    A text held whole goes in one write. A tail is streamed: its chunks (postmux.body.CHUNK) are read in a
    worker thread (1 MB from the page cache takes 0.25 ms, from a cold disk far more: not on the event
    loop), and
    each is written only once the connection has taken the one before, so memory stays a few chunks
    whatever the size of the message (issue 12).

    Nothing can arrive unread after the last write, as `read_response` marks a reply as expected before
    it yields to the event loop. A reply a receiver sends while a tail is still streaming (RFC 5321
    4.1.1.4 has it answer after the end of data) is dropped as unsolicited by aiosmtplib's protocol, and
    the attempt ends as the receiver then does: it hangs up or stops reading (a lost connection or a
    timeout, transient).

    Whatever breaks off the text on its way (a timeout, a lost connection, a tail that cannot be read, a
    cancelled task) closes the connection: it is in the middle of DATA, and the end-of-data line must
    never follow a text cut short.
    """
    start = await client.execute_command(b"DATA", timeout=timeout)
    if start.code != 354:
        raise aiosmtplib.SMTPDataError(start.code, start.message)
    return await send_text(client, data, timeout=timeout, tail=tail, clean=clean)


async def send_text(
    client: aiosmtplib.SMTP,
    data: bytes,
    *,
    timeout: float,
    tail: BodyFile | None = None,
    clean: bool = False,
) -> aiosmtplib.SMTPResponse:
    """The text after the 354 (`data`, then `tail`'s chunks, then the end-of-data line) and its reply:
    send_data's second half, and what follows a pipelined DATA's 354 (delivery/pipelining.py)."""
    protocol = client.protocol
    if protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    try:
        wire = WireText(clean=clean)
        if tail is None:
            # Written and its reply read as a group of one (delivery/pipelining.py): the same bytes and
            # errors as aiosmtplib's write and read_response, without its wait_for and fresh waiter.
            [response] = await exchange(client, [wire.piece(data) + wire.end()], timeout, strict=False)
        else:
            protocol.write(wire.piece(data))
            await _stream(protocol, wire, tail, timeout)
            protocol.write(wire.end())
            response = await protocol.read_response(timeout=timeout)
    except BaseException:
        # As aiosmtplib does, a connection in an unknown state is not reused; and it is aborted, not
        # closed: close() would keep the socket open until a receiver that stopped reading took the
        # rest of the buffered text, which it never may.
        if protocol.transport is not None:
            cast(asyncio.WriteTransport, protocol.transport).abort()
        client.close()
        raise
    if response.code != 250:
        raise aiosmtplib.SMTPDataError(response.code, response.message)
    return response


async def _stream(protocol: SMTPProtocol, wire: WireText, tail: BodyFile, timeout: float) -> None:
    """Write `tail`'s chunks as `wire` puts them, each after the connection has taken the ones before.

    The next chunk is read (in a thread) while the connection drains the one before it, so a fast
    receiver never waits for the disk. At most three chunks are held: one in the transport's buffer, one
    written, one being read.
    """
    chunks = cast(Generator[bytes, None, None], tail.chunks())  # a generator: closing it closes the file
    reading = asyncio.ensure_future(_read(chunks, tail))
    try:
        await _drained(protocol, timeout)  # `data`, written before
        while (chunk := await reading) is not None:
            reading = asyncio.ensure_future(_read(chunks, tail))
            protocol.write(wire.piece(chunk))
            del chunk
            await _drained(protocol, timeout)
    finally:
        reading.cancel()  # a read still running in its thread finishes there; its chunk is dropped
        if reading.done() and not reading.cancelled():
            reading.exception()  # a read that failed after the text broke off: said by what broke it
        # ValueError: the generator is still running in its thread and cannot be closed under it; once
        # that read is done the generator is collected, and its `with` closes the file.
        with contextlib.suppress(ValueError):
            chunks.close()


async def eight_bit(work: Transaction) -> bool:
    """Whether the text (data, then tail) holds an octet above 127, so that MAIL says BODY=8BITMIME.

    Ingress's `clean` says nothing about it, so a tail is read through, in a worker thread: isascii costs
    0.04 µs per KB, the read from the page cache about 0.25 ms per MB.
    """
    if not work.data.isascii():
        return True
    if work.tail is None:
        return False
    try:
        return await asyncio.to_thread(_tail_eight_bit, work.tail)
    except OSError as e:
        raise BodyUnreadable.of(work.tail, e) from e


def _tail_eight_bit(tail: BodyFile) -> bool:
    return not all(chunk.isascii() for chunk in tail.chunks())


async def _read(chunks: Iterator[bytes], tail: BodyFile) -> bytes | None:
    """The next chunk of a tail, read in a worker thread; None at its end."""
    try:
        return await asyncio.to_thread(next, chunks, None)
    except OSError as e:
        raise BodyUnreadable.of(tail, e) from e


async def _drained(protocol: SMTPProtocol, timeout: float) -> None:
    """Wait, at most `timeout`, until the connection's transport has taken what was written.

    aiosmtplib 5.x has no public drain: its SMTPProtocol carries asyncio's flow control (FlowControlMixin,
    copied from the standard library's streams; pause_writing and resume_writing), and `_drain_helper` is
    the coroutine asyncio's own StreamWriter.drain awaits on it. Wrapping the protocol in a StreamWriter
    would reach the same method, and on newer Pythons its finalizer closes the transport it wraps. Should
    aiosmtplib drop or rename it, tests/unit/test_drain.py fails (and at run time this would raise
    AttributeError: the attempt crashes, never sends unbounded).
    """
    transport = protocol.transport
    if transport is None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    if not cast(asyncio.WriteTransport, transport).get_write_buffer_size():
        return  # all of it is in the kernel's buffer already: no task, no wait
    try:
        await asyncio.wait_for(protocol._drain_helper(), timeout)
    except TimeoutError as e:
        raise aiosmtplib.SMTPTimeoutError("Timed out sending the message text") from e


class _SendsText(Protocol):
    """send_data or send_text: how the text goes, and the reply to it."""

    async def __call__(
        self,
        client: aiosmtplib.SMTP,
        data: bytes,
        *,
        timeout: float,
        tail: BodyFile | None = None,
        clean: bool = False,
    ) -> aiosmtplib.SMTPResponse: ...


@dataclass(frozen=True, slots=True)
class WirePaths:
    """The paths one attempt sends at MAIL and RCPT (postmux.address.wire_path), encoded once; and whether
    its text is 8-bit (MAIL's BODY=8BITMIME, RFC 6152), found once (`eight_bit`).

    An address that cannot be sent as it is (stored before ingress refused such input) is the message's
    fault, not the member's: its recipient is refused here with a permanent reply, so it bounces with a
    DSN, and nothing about it counts against the member (issue 10 A1).
    """

    sender: bytes
    recipients: list[tuple[Recipient, bytes]]
    refused: dict[int, Reply]
    eight_bit: bool = False

    @classmethod
    def of(cls, work: Transaction) -> WirePaths:
        sender = wire_path(work.sender, Role.SENDER, smtputf8=work.smtputf8)
        if isinstance(sender, Malformed):
            reply = _unsendable(sender, "sender", "5.1.7")
            return cls(b"", [], {r.rid: reply for r in work.recipients})
        recipients, refused = [], {}
        for r in work.recipients:
            path = wire_path(r.address, Role.RECIPIENT, smtputf8=work.smtputf8)
            if isinstance(path, Malformed):
                refused[r.rid] = _unsendable(path, "recipient", "5.1.3")
            else:
                recipients.append((r, path))
        return cls(sender, recipients, refused)

    def settle(self, outcome: AttemptOutcome) -> AttemptOutcome:
        """The attempt's outcome with the refused recipients' replies in it; they never judged the member."""
        if not self.refused:
            return outcome
        return replace(outcome, replies={**outcome.replies, **self.refused}, unsent=frozenset(self.refused))


def rcpt_reply(code: int, message: str) -> Reply:
    """The reply to a RCPT as the verdicts are to read it: as said, but a 552 is a 452.

    RFC 5321 4.5.3.1.10: RFC 821 wrongly gave 552 for "too many recipients", the correct code is 452, and
    clients SHOULD treat a 552 to RCPT as temporary: the recipient may well be taken in a transaction of
    its own. Its enhanced code takes the class 4 to match (RFC 3463 2: the class digits agree), keeping the
    server's subject and detail (552 5.5.3 becomes 452 4.5.3, a 552 5.2.2 "over quota" a 452 4.2.2); a
    552 without one becomes 452 4.5.3, too many recipients. The server's text is kept. Only RCPT: a 552 to
    DATA or to the end of data is the message's size or the mailbox's storage, permanent as said.
    """
    reply = Reply.parse(code, message)
    if code != 552:
        return reply
    detail = reply.enhanced_code[2:] if reply.enhanced_code else "5.3"
    return Reply(452, f"4.{detail}", reply.text)


def _closed(
    client: aiosmtplib.SMTP, paths: WirePaths, refused: dict[int, Reply], closing: Reply
) -> dict[int, Reply]:
    """The replies of a transaction the server ended with a 421 (RFC 5321 3.8: it is closing the channel).

    Recipients it refused before keep their own reply; every other one gets the 421, those not answered
    yet and those accepted alike (DATA will not come). It is the receiver's reply, said and not made up
    here: the verdict, the event, a DSN and shaping's reactions and AIMD hear it as it was said (RFC 5321
    4.2.2: 421 is "service not available, closing transmission channel"). The connection is closed, never
    kept for reuse.
    """
    client.close()
    return {r.rid: refused.get(r.rid, closing) for r, _ in paths.recipients}


def _downgraded_dsn(work: Transaction) -> Transaction:
    """A global DSN of ours (RFC 6533 3) whose next hop lacks SMTPUTF8, downgraded as RFC 6533 6 asks:
    its envelope and header section are ASCII (else it would be unfit), but its report parts are not.
    Any other transaction is returned as it is."""
    if work.sender or work.tail is not None:
        return work  # a DSN has the null sender and is small enough to be held whole
    data = downgraded(work.data)
    return work if data is None else replace(work, data=data, clean=False)


def _unsendable(malformed: Malformed, role: str, enhanced_code: str) -> Reply:
    # RFC 3463: X.6.7 a non-ASCII address where SMTPUTF8 is not in use (RFC 6531 3.5), X.1.7 / X.1.3 a bad
    # sender's / recipient's address.
    code = "5.6.7" if malformed.needs_smtputf8 else enhanced_code
    return Reply(553, code, f"{role} address cannot be sent: {malformed.reason}")


async def send_mail(client: aiosmtplib.SMTP, path: bytes, options: list[str]) -> aiosmtplib.SMTPResponse:
    """MAIL FROM with `path` exactly, as aiosmtplib's `SMTP.mail` sends it but for the address.

    aiosmtplib's quote_address reads the address with email.utils.parseaddr and writes it anew: a quoted
    local part goes out re-escaped (`"\\a,b"@x` as `"a,b"@x`). What is sent is what ingress parsed, routed
    and stored, byte for byte, with no second parser to disagree with the first.
    """
    response = await client.execute_command(b"MAIL", b"FROM:" + path, *(o.encode() for o in options))
    if response.code != 250:
        raise aiosmtplib.SMTPSenderRefused(response.code, response.message, path.decode(errors="replace"))
    return response


async def send_rcpt(client: aiosmtplib.SMTP, path: bytes) -> aiosmtplib.SMTPResponse:
    """RCPT TO with `path` exactly; 250 and 251 accept it, as in aiosmtplib's `SMTP.rcpt`."""
    response = await client.execute_command(b"RCPT", b"TO:" + path)
    if response.code not in (250, 251):
        raise aiosmtplib.SMTPRecipientRefused(response.code, response.message, path.decode(errors="replace"))
    return response


def _ends(client: aiosmtplib.SMTP) -> tuple[str, str]:
    """The connection's peer ("ip:port", brackets around IPv6) and local IP, read once when it opens."""
    transport = client.protocol.transport if client.protocol is not None else None
    if transport is None:
        return "", ""
    peer, local = transport.get_extra_info("peername"), transport.get_extra_info("sockname")
    if not peer or not local:
        return "", ""
    ip, port = peer[0], peer[1]
    return (f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"), str(local[0])


@dataclass(slots=True)
class _Connection:
    client: aiosmtplib.SMTP
    key: PoolKey
    tls: str = "none"  # protocol and cipher, or "none"
    peer: str = ""  # "ip:port" connected to
    source_ip: str = ""  # the local address the connection left from
    messages: int = 0
    idle_since: float = field(default_factory=time.monotonic)


class _ConnectionLost(Exception):
    def __init__(self, error: BaseException, stage: str) -> None:
        super().__init__(str(error))
        self.error = error
        self.stage = stage


class _Unreachable(Exception):
    """No connection could be made to any target; carries the reply the recipients get."""

    def __init__(self, reply: Reply, breakoff: Breakoff, *, said: bool = False) -> None:
        super().__init__(str(reply))
        self.reply = reply
        self.breakoff = breakoff
        # The server itself said it (a refusing greeting), rather than postmux making the reply up:
        # shaping's reactions and AIMD hear it ("421 too many connections" comes at the greeting).
        self.said = said


# The member's own setup failed (its source address is not on this host, its login was refused): another MX
# host would fail the same way, so the attempt ends there.
_MEMBER_BROKEN = frozenset({Breakoff.BIND, Breakoff.AUTH})


class _Loop(Exception):
    """The server greeted, or answered EHLO, with this node's own hostname: it is this node."""


class _TlsFallback(Exception):
    """An opportunistic TLS handshake failed: the connection is unusable, a plaintext one may work."""


def _refused_greeting(error: aiosmtplib.SMTPResponseException, where: str) -> Reply:
    """The reply the recipients get when a server greets (or answers EHLO) with a refusal.

    A 4xx stands as the server said it. A 5xx defers all the same: the session never began, so the next MX
    host is tried, and the mail waits when none takes it (RFC 5321 3.1 and 5.1). Its reply is then ours,
    a 451 4.4.0 that quotes the server's: its code and its enhanced code keep the same class (RFC 3463 2),
    and the event and DSN still say what the server said.
    """
    said = Reply.parse(error.code, error.message)
    if error.code < 500:
        return said
    return Reply(451, "4.4.0", f"{where} greeted with: {said}")


def _cannot_bind(error: BaseException) -> bool:
    """The local source address is not on this host: the member itself is broken, not the receiver."""
    for e in (error, error.__cause__, error.__context__):
        if isinstance(e, OSError) and e.errno == errno.EADDRNOTAVAIL:
            return True
    return False


class SmtpTransport:
    """Delivers for one member, keeping up to max_connections reusable connections per target."""

    def __init__(
        self,
        member: MemberSettings,
        delivery: DeliverySettings,
        ehlo_hostname: str,
        resolver: MxResolver | None = None,
    ) -> None:
        if member.kind == "source" and resolver is None:
            raise ValueError(f"member {member.name}: a source member needs an MX resolver")
        self.member = member
        self.delivery = delivery
        self.ehlo_hostname = member.ehlo_hostname or ehlo_hostname
        self.resolver = resolver
        self._tls_context = client_context(member)
        self._idle: dict[PoolKey, list[_Connection]] = {}
        self._busy = 0
        self._closing: set[asyncio.Task[None]] = set()
        self._retired = False
        # A relay member's one target, parsed once (host and port split its address each time they are read).
        self._relay: list[tuple[str, Target]] = (
            [(member.target, (member.host, member.port))] if resolver is None else []
        )

    @property
    def max_messages(self) -> int:
        return self.member.max_messages_per_connection or self.delivery.max_messages_per_connection

    @property
    def connections(self) -> int:
        return self._busy + sum(len(idle) for idle in self._idle.values())

    async def deliver(self, work: Transaction, *, per_connection: int | None = None) -> AttemptOutcome:
        """One transaction for `work`; `per_connection` is the lane's limit of messages per connection."""
        paths = WirePaths.of(work)
        if not paths.recipients:  # nothing can be sent: no connection, and nothing to say about the member
            return AttemptOutcome(paths.refused, "", local=True, unsent=frozenset(paths.refused))
        # Before any connection is taken: a tail that cannot be read ends the attempt here (BodyUnreadable).
        # A text held whole is judged here, without a coroutine (the usual message, on the hot path).
        if not work.data.isascii() if work.tail is None else await eight_bit(work):
            paths = replace(paths, eight_bit=True)
        self._busy += 1
        try:
            targets = await self._targets(work)
            if isinstance(targets, Reply):
                return paths.settle(self._all(work, targets, Breakoff.MX, ""))
            return paths.settle(await self._deliver_to(targets, work, paths, per_connection))
        finally:
            self._busy -= 1

    async def _targets(self, work: Transaction) -> list[tuple[str, Target]] | Reply:
        """(name for the DSN's Remote-MTA, (host, port)) in the order to try, or the reply for everyone."""
        if self.resolver is None:
            return self._relay
        plan = await self.resolver.resolve(work.domain)
        if plan.error is not None:
            return plan.error
        v6 = ":" in (self.member.source_address or "")
        return [
            (host.name, address)
            for host in plan.hosts
            for address in host.addresses
            if (":" in address[0]) == v6  # a v4 source address reaches only v4 hosts, and v6 only v6
        ] or Reply(451, "4.4.4", f"no MX host of {work.domain} reachable from {self.member.source_address}")

    async def _deliver_to(
        self,
        targets: list[tuple[str, Target]],
        work: Transaction,
        paths: WirePaths,
        per_connection: int | None,
    ) -> AttemptOutcome:
        """The attempt at the first target that takes it; the MX hosts passed over on the way go with it."""
        passed: list[str] = []
        outcome = await self._first_taker(targets, work, paths, per_connection, passed)
        return replace(outcome, passed_over=tuple(passed)) if passed else outcome

    async def _first_taker(
        self,
        targets: list[tuple[str, Target]],
        work: Transaction,
        paths: WirePaths,
        per_connection: int | None,
        passed: list[str],
    ) -> AttemptOutcome:
        unreachable: _Unreachable | None = None
        for name, target in targets:
            idle = self._idle.get(self._pool_key(name, target))
            if idle:
                # A reused connection the server has dropped meanwhile fails at MAIL before anything was
                # said about this message: not the member's fault, so try once more on a fresh one.
                outcome = await self._attempt(
                    idle.pop(), work, paths, name, per_connection, fresh_retry_allowed=True
                )
                if outcome is not None:
                    return outcome
            try:
                conn = await self._connect(name, target)
            except _Loop:
                # RFC 5321 5.1: this host is this node; it and every host after it (of equal or worse
                # preference) are dropped. A better host passed over before may yet take the mail: wait.
                reply = Reply(554, "5.4.6", f"mail for {work.domain} loops back to myself")
                if unreachable is not None:
                    self._pass_over(work, name, target, reply, passed)
                    break
                return self._all(work, reply, Breakoff.GREETING, name)
            except _Unreachable as e:
                unreachable = e
                if e.breakoff in _MEMBER_BROKEN:
                    break  # this member's own setup failed: every other MX host would fail alike
                self._pass_over(work, name, target, e.reply, passed)
                continue  # RFC 5321 5.1: try the next MX host
            outcome = await self._attempt(conn, work, paths, name, per_connection, fresh_retry_allowed=False)
            assert outcome is not None
            return outcome
        assert unreachable is not None
        return self._all(
            work, unreachable.reply, unreachable.breakoff, targets[-1][0], local=not unreachable.said
        )

    def _pass_over(
        self, work: Transaction, name: str, target: Target, reply: Reply, passed: list[str]
    ) -> None:
        """Note an MX host that could not take the mail (refused, silent, a refusing greeting, TLS), in the
        log and on the attempt's events (tags.mx_skipped), so a failing primary MX shows (Postfix logs each
        host it passes over). A relay member's one target is its own outcome, not a host passed over."""
        if self.resolver is None:
            return
        ip, port = target
        address = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
        log.info(
            "MX host passed over",
            member=self.member.name,
            domain=work.domain,
            mx_host=name,
            address=address,
            reply=str(reply),
        )
        passed.append(f"{name} {address} {reply}")

    async def _attempt(
        self,
        conn: _Connection,
        work: Transaction,
        paths: WirePaths,
        remote: str,
        per_connection: int | None,
        *,
        fresh_retry_allowed: bool,
    ) -> AttemptOutcome | None:
        try:
            if work.smtputf8 and not conn.client.supports_extension("smtputf8"):
                if work.needs_smtputf8:
                    return self._unfit(conn, work, remote)
                work = _downgraded_dsn(work)
            replies = await self._transaction(conn, work, paths)
        except _ConnectionLost as lost:
            conn.client.close()
            if fresh_retry_allowed and lost.stage == "at MAIL FROM":
                return None
            breakoff, reply = local_failure(lost.error, f"{lost.stage} with {remote}")
            # The connection was made: the event says where it went, though it broke off.
            return replace(self._all(work, reply, breakoff, remote), peer=conn.peer, source_ip=conn.source_ip)
        except BaseException:
            # The attempt crashed (a tail that cannot be read, a bug): the connection, in whatever state
            # it was left, is closed rather than leaked.
            conn.client.close()
            raise
        conn.messages += 1
        self._release(conn, per_connection)
        return AttemptOutcome(replies, remote, tls=conn.tls, peer=conn.peer, source_ip=conn.source_ip)

    def _release(self, conn: _Connection, per_connection: int | None) -> None:
        """Keep the connection for the next message, or say goodbye when it has carried enough."""
        limit = min(self.max_messages, per_connection or self.max_messages)
        if conn.client.is_connected and conn.messages < limit and not self._retired:
            conn.idle_since = time.monotonic()
            self._idle.setdefault(conn.key, []).append(conn)
        else:
            self._quit(conn)

    def _unfit(self, conn: _Connection, work: Transaction, remote: str) -> AttemptOutcome:
        """RFC 6531 3.4: mail that needs SMTPUTF8 must not go to a server that does not offer it.

        Nothing was sent, so the connection stays good for other mail. A relay's lack is that relay's
        alone (another member may offer it: the dispatcher tries it); an MX host's lack is the
        destination's, the same from every source IP, so it is final (553 5.6.7, RFC 6531 3.5).
        """
        self._release(conn, None)
        reply = Reply(553, "5.6.7", f"SMTPUTF8 required but not offered by {remote}")
        return AttemptOutcome(
            {r.rid: reply for r in work.recipients},
            remote,
            local=True,
            tls=conn.tls,
            unfit=self.resolver is None,
            peer=conn.peer,
            source_ip=conn.source_ip,
        )

    async def _connect(self, name: str, target: Target) -> _Connection:
        try:
            return await self._open(name, target, use_tls=self._tls_context is not None)
        except _TlsFallback:
            # Postfix's "may" level (TLS_README, opportunistic TLS): when the handshake fails, rather
            # than give up on delivery, retry with TLS off, so a server with a broken TLS stack still
            # gets its mail. Only this connection goes plain; the next one tries TLS again.
            log.warning("TLS handshake failed, delivering in plaintext", member=self.member.name, target=name)
            return await self._open(name, target, use_tls=False)

    async def _open(self, name: str, target: Target, *, use_tls: bool) -> _Connection:
        host, port = target
        source = self.member.source_address
        client = aiosmtplib.SMTP(
            hostname=host,
            port=port,
            local_hostname=self.ehlo_hostname,
            source_address=(source, 0) if source else None,
            timeout=self.delivery.command_timeout,
            start_tls=False,
        )
        where = f"{host}:{port}"
        try:
            greeting = await client.connect(timeout=self.delivery.connect_timeout)
            try:
                self._not_myself(name, where, greeting, await self._greet(client))
                tls = await self._start_tls(client, name, where) if use_tls else "none"
                await self._log_in(client, where)
            except BaseException:
                client.close()
                raise
        except (_TlsFallback, _Unreachable, _Loop):
            raise
        except (aiosmtplib.SMTPException, *_LOCAL_ERRORS) as e:
            raise self._unreachable(e, where) from e
        return _Connection(client, self._pool_key(name, target), tls, *_ends(client))

    def _pool_key(self, name: str, target: Target) -> PoolKey:
        """Under tls = "verify" a connection is fit only for the name its certificate was checked for: two
        MX names on one IP must not share it, or mail for the second would skip its check. Other modes
        check no name, so any connection to the target will do."""
        return (target, self._server_name(name) if self.member.tls_mode == "verify" else "")

    @staticmethod
    async def _greet(client: aiosmtplib.SMTP) -> aiosmtplib.SMTPResponse:
        try:
            return await client.ehlo()
        except aiosmtplib.SMTPHeloError:
            return await client.helo()  # RFC 5321 3.2: a server that does not know EHLO still knows HELO

    def _not_myself(self, name: str, where: str, *replies: aiosmtplib.SMTPResponse) -> None:
        """Raise _Loop when an MX host greets or answers EHLO with this node's own [smtp] hostname.

        The MX plan drops hosts at this node's own listening addresses (delivery/myself.py); one reached
        by another of its addresses, or through a NAT, is seen only here, by its name (Postfix: "host X
        greeted me with my own hostname"). A relay is the operator's choice and is not checked.
        """
        me = self.resolver.myself if self.resolver is not None else None
        if me is None:
            return
        for reply in replies:
            words = reply.message.split(maxsplit=1)
            if words and me.is_named(words[0]):
                log.warning("MX host greets with this node's own hostname", mx_host=name, target=where)
                raise _Loop(words[0])

    async def _start_tls(self, client: aiosmtplib.SMTP, name: str, where: str) -> str:
        """STARTTLS as the member's mode says; returns "protocol cipher" or "none".

        Codes follow Postfix's: 4.7.4 (RFC 3463 "security features not supported") when TLS is needed
        and not offered, 4.7.5 ("cryptographic failure") when the handshake or the certificate fails.
        All are transient: the mail waits or goes to another member, and a relay that keeps failing
        is ejected like any broken member.
        """
        assert self._tls_context is not None
        opportunistic = self.member.tls_mode == "opportunistic"
        if not client.supports_extension("starttls"):
            if opportunistic:
                return "none"
            raise _Unreachable(
                Reply(451, "4.7.4", f"TLS is required, but {where} does not offer STARTTLS"), Breakoff.TLS
            )
        try:
            await client.starttls(server_hostname=self._server_name(name), tls_context=self._tls_context)
        except aiosmtplib.SMTPResponseException as e:
            if opportunistic and client.is_connected:
                return "none"  # a 454 leaves the session in plaintext and usable (RFC 3207 4)
            reply = Reply(451, "4.7.5", f"{where} refused STARTTLS: {e.code} {e.message}")
            raise _Unreachable(reply, Breakoff.TLS) from e
        except ssl.SSLCertVerificationError as e:
            reply = Reply(451, "4.7.5", f"server certificate not verified ({where}): {e.verify_message}")
            raise _Unreachable(reply, Breakoff.TLS) from e
        except (ssl.SSLError, aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError) as e:
            if opportunistic:
                raise _TlsFallback(str(e)) from e
            reply = Reply(451, "4.7.5", f"TLS handshake with {where} failed: {e}")
            raise _Unreachable(reply, Breakoff.TLS) from e
        # RFC 3207 4.2: everything learnt before TLS is forgotten; ask for the extensions again.
        try:
            await client.ehlo()
        except (aiosmtplib.SMTPException, *_LOCAL_ERRORS) as e:
            if opportunistic:  # a server whose TLS dies right after the handshake: as a failed one
                raise _TlsFallback(str(e)) from e
            raise
        return describe_tls(client)

    def _server_name(self, name: str) -> str:
        """The name the certificate must show: tls_server_name, else the relay's host or the MX's name.

        An address literal's host is its bare IP (RFC 5321 4.1.3): given as server_hostname, Python checks
        it against the certificate's IP addresses and sends no SNI (RFC 6066 3 allows host names only).
        The bracketed form stays the Remote-MTA's name.
        """
        if self.member.tls_server_name:
            return self.member.tls_server_name
        if self.resolver is None:
            return self.member.host
        literal = literal_address(name)
        return name if literal is None else str(literal)

    async def _log_in(self, client: aiosmtplib.SMTP, where: str) -> None:
        """SMTP AUTH (RFC 4954) with the member's credentials; config makes sure TLS is on by now."""
        if self.member.username is None or self.member.password is None:
            return
        if not client.supports_extension("auth"):
            raise _Unreachable(Reply(451, "4.7.4", f"{where} offers no AUTH"), Breakoff.AUTH)
        try:
            await client.login(self.member.username, self.member.password.get_secret_value())
        except aiosmtplib.SMTPAuthenticationError as e:
            # Our credentials are wrong, not the recipients': the mail waits or goes to another member.
            reply = Reply(451, "4.7.8", f"authentication to {where} failed: {e.code} {e.message}")
            raise _Unreachable(reply, Breakoff.AUTH) from e

    def _unreachable(self, error: BaseException, where: str) -> _Unreachable:
        if isinstance(error, aiosmtplib.SMTPResponseException) and error.code >= 400:
            # A 421 or 554 greeting: the server is up but will not take mail now.
            return _Unreachable(_refused_greeting(error, where), Breakoff.GREETING, said=True)
        if _cannot_bind(error):
            reply = Reply(451, "4.4.0", f"cannot send from {self.member.source_address}: {error}")
            return _Unreachable(reply, Breakoff.BIND)
        breakoff, reply = local_failure(error, f"connecting to {where}")
        return _Unreachable(reply, breakoff)

    async def _transaction(self, conn: _Connection, work: Transaction, paths: WirePaths) -> dict[int, Reply]:
        """MAIL, RCPT for each recipient `paths` can send, DATA: a reply for each of those recipients."""
        client = conn.client
        options = self._mail_options(client, work, paths.eight_bit)
        if client.supports_extension("pipelining"):
            return await self._pipelined(client, work, paths, options)
        try:
            await send_mail(client, paths.sender, options)
        except aiosmtplib.SMTPSenderRefused as e:
            await self._reset(client)
            reply = Reply.parse(e.code, e.message)
            return {r.rid: reply for r, _ in paths.recipients}
        except _LOCAL_ERRORS as e:
            raise _ConnectionLost(e, "at MAIL FROM") from e
        replies: dict[int, Reply] = {}
        accepted = []
        for r, path in paths.recipients:
            try:
                await send_rcpt(client, path)
                accepted.append(r.rid)
            except aiosmtplib.SMTPRecipientRefused as e:
                reply = rcpt_reply(e.code, e.message)
                if reply.code == 421:  # aiosmtplib has closed the client already; no RCPT may follow
                    return _closed(client, paths, replies, reply)
                replies[r.rid] = reply
            except _LOCAL_ERRORS as e:
                raise _ConnectionLost(e, "at RCPT TO") from e
        if not accepted:
            await self._reset(client)
            return replies
        reply = await self._text(client, work, send_data)
        for rid in accepted:
            replies[rid] = reply
        return replies

    async def _pipelined(
        self, client: aiosmtplib.SMTP, work: Transaction, paths: WirePaths, options: list[str]
    ) -> dict[int, Reply]:
        """The transaction with MAIL, the RCPTs and DATA in one write (RFC 2920), then the text.

        Each refusal means what it means one command at a time: MAIL refused, every recipient gets its
        reply; a RCPT refused, that recipient; DATA refused, every recipient the server took.
        """
        mail = b" ".join([b"MAIL FROM:" + paths.sender, *(o.encode() for o in options)]) + b"\r\n"
        rcpts = [b"RCPT TO:" + path + b"\r\n" for _, path in paths.recipients]
        try:
            group = await exchange(client, [mail, *rcpts, b"DATA\r\n"], self.delivery.command_timeout)
        except (*_LOCAL_ERRORS, aiosmtplib.SMTPResponseException) as e:
            # A reused connection the server had closed fails here, as at MAIL FROM one command at a time.
            raise _ConnectionLost(e, "at MAIL FROM") from e
        mail_reply, *rcpt_replies, data_reply = group
        if mail_reply.code == 421:
            return _closed(client, paths, {}, Reply.parse(mail_reply.code, mail_reply.message))
        if mail_reply.code != 250:
            await self._abandon(client, data_reply)
            reply = Reply.parse(mail_reply.code, mail_reply.message)
            return {r.rid: reply for r, _ in paths.recipients}
        replies: dict[int, Reply] = {}
        accepted = []
        for (r, _), response in zip(paths.recipients, rcpt_replies, strict=True):
            if response.code in (250, 251):
                accepted.append(r.rid)
                continue
            reply = rcpt_reply(response.code, response.message)
            if reply.code == 421:
                return _closed(client, paths, replies, reply)
            replies[r.rid] = reply
        if data_reply.code == 421:
            return _closed(client, paths, replies, Reply.parse(data_reply.code, data_reply.message))
        if not accepted or data_reply.code != 354:
            await self._abandon(client, data_reply)
            refused = Reply.parse(data_reply.code, data_reply.message)
            return {**replies, **{rid: refused for rid in accepted}}
        reply = await self._text(client, work, send_text)
        return {**replies, **{rid: reply for rid in accepted}}

    async def _text(self, client: aiosmtplib.SMTP, work: Transaction, send: _SendsText) -> Reply:
        """The text sent by `send` (send_data: DATA first; send_text: after a pipelined DATA's 354) and
        the reply every accepted recipient gets; a refusal resets the transaction for the next one."""
        try:
            response = await send(
                client, work.data, timeout=self.delivery.data_timeout, tail=work.tail, clean=work.clean
            )
        except aiosmtplib.SMTPDataError as e:
            if e.code == 421:
                client.close()  # RFC 5321 3.8: the server is closing the channel; no RSET, no reuse
            else:
                await self._reset(client)
            return Reply.parse(e.code, e.message)
        except _LOCAL_ERRORS as e:
            raise _ConnectionLost(e, "during DATA") from e
        return Reply.parse(response.code, response.message)

    async def _abandon(self, client: aiosmtplib.SMTP, data_reply: aiosmtplib.SMTPResponse) -> None:
        """End a pipelined transaction that is not to carry the text, leaving the connection fit for more.

        RFC 2920 3.1: a server may answer DATA with 354 though no recipient was taken; the client then
        sends the end-of-data line alone (an empty text, which the server refuses), then RSET.
        """
        if data_reply.code == 354:
            try:
                await client.execute_command(b".", timeout=self.delivery.data_timeout)
            except (aiosmtplib.SMTPException, *_LOCAL_ERRORS):
                client.close()
                return
        await self._reset(client)

    @staticmethod
    def _mail_options(client: aiosmtplib.SMTP, work: Transaction, eight_bit: bool) -> list[str]:
        options = []
        if client.supports_extension("size"):
            options.append(f"SIZE={work.size}")  # RFC 1870: the text's octets, tail included
        # RFC 6152: say so when the body is not 7-bit, where the server offers 8BITMIME.
        if client.supports_extension("8bitmime") and eight_bit:
            options.append("BODY=8BITMIME")
        if work.smtputf8 and client.supports_extension("smtputf8"):
            options.append("SMTPUTF8")
        return options

    async def _reset(self, client: aiosmtplib.SMTP) -> None:
        try:
            await client.rset()
        except (aiosmtplib.SMTPException, *_LOCAL_ERRORS):
            client.close()

    @staticmethod
    def _all(
        work: Transaction, reply: Reply, breakoff: Breakoff, remote: str, *, local: bool = True
    ) -> AttemptOutcome:
        """The same reply for every recipient: the attempt broke off before the transaction's replies."""
        return AttemptOutcome({r.rid: reply for r in work.recipients}, remote, breakoff, local=local)

    def _quit(self, conn: _Connection) -> None:
        task = asyncio.create_task(self._quit_now(conn))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _quit_now(self, conn: _Connection) -> None:
        if not conn.client.is_connected:
            conn.client.close()
            return
        try:
            await conn.client.quit(timeout=5)
        except (aiosmtplib.SMTPException, *_LOCAL_ERRORS):
            conn.client.close()

    def reap_idle(self, now: float) -> None:
        for key, idle in list(self._idle.items()):
            keep = []
            for conn in idle:
                if now - conn.idle_since >= self.delivery.idle_timeout or not conn.client.is_connected:
                    self._quit(conn)
                else:
                    keep.append(conn)
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]

    def retire(self) -> None:
        self._retired = True

    async def close(self) -> None:
        idle, self._idle = self._idle, {}
        for conn in (c for conns in idle.values() for c in conns):
            self._quit(conn)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
