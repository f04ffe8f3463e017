"""A loopback upstream for tests, the demo and the benches: one aiosmtpd server that records what it takes.

postmux is tested against real SMTP servers, never against call-order mocks (docs/testing.md). `Upstream` is
that server, shipped with the package as aiosmtpd ships `aiosmtpd.testing` and httpx its `MockTransport`,
so the test suite, `postmux demo` and the benches share one, and so can an application's own tests:

    async with Upstream("relay-a", fail_ratio(0.2)) as relay:
        ...  # point a member at relay.address, send, then look at relay.received

It listens on 127.0.0.1, port 0, in the running event loop (no thread, unlike aiosmtpd's Controller), and
greets with an explicit hostname: aiosmtpd would otherwise ask the resolver for this machine's name
(`socket.getfqdn()`), which a test must never do.

Its answer to DATA is a *behaviour* (`accept`, `always`, `fail_ratio`, `delay`, `latency`, or any coroutine
of the same shape), which can be swapped while it runs. Other faults: `greeting_refusal`, `close_listener`
/ `reopen_listener`, `stop` (as a crash: open sessions cut). Options: STARTTLS, SMTPUTF8 on or off, AUTH.

This module imports only aiosmtpd and the standard library: no part of postmux that it could be testing.
"""

from __future__ import annotations

import asyncio
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from email.message import Message
from email.parser import BytesHeaderParser
from types import TracebackType
from typing import TYPE_CHECKING, Any

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword, Session
from aiosmtpd.smtp import Envelope as SmtpEnvelope

if TYPE_CHECKING:  # only its type: this module imports aiosmtpd and the standard library, as it says above
    import redis

__all__ = [
    "CHROMIUM",
    "CHROMIUM_ARGS",
    "DROP",
    "DROP_AFTER_STORE",
    "HANG",
    "HANG_LIMIT_S",
    "Behaviour",
    "Received",
    "Upstream",
    "accept",
    "always",
    "delay",
    "fail_ratio",
    "latency",
]

LOOPBACK = "127.0.0.1"
TEST_ID_HEADER = "X-Test-Id"

# Debian's chromium for browser tests of the dashboard, headless, with everything that would reach for the
# network turned off: on a closed machine its background connections only fail, many at a time.
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


@dataclass
class Received:
    """One message an upstream accepted (or stored before hanging up, see DROP_AFTER_STORE)."""

    sender: str  # "" for the null sender
    recipients: list[str]
    data: bytes  # exactly as it came, dot-unstuffed (RFC 5321 4.5.2)
    peer: str
    helo: str = ""
    at: float = 0.0  # time.time() when it was accepted
    dropped: bool = False  # stored, then the connection was cut before the reply (DROP_AFTER_STORE)
    tls: bool = False  # the session had started TLS
    user: str = ""  # the name the client authenticated as

    @property
    def headers(self) -> Message:
        """The header section, parsed at each call (`Upstream.header_values` keeps what a poller needs)."""
        return BytesHeaderParser().parsebytes(self.data)

    def header(self, name: str) -> str:
        """The first value of header `name`, or "" when the message has none."""
        return str(self.headers.get(name, ""))

    @property
    def test_id(self) -> str:
        """The X-Test-Id header, which the test suite's messages carry."""
        return self.header(TEST_ID_HEADER)


DROP = "DROP"  # a behaviour's reply that makes the server hang up instead of answering
# Stores the message, then hangs up before answering: the sender cannot know it was taken, so a copy sent
# again elsewhere is a duplicate no sender can avoid (RFC 1047).
DROP_AFTER_STORE = "DROP_AFTER_STORE"
# Never answers: the server sits on the message until the client gives up and hangs up. Nothing is stored.
HANG = "HANG"
HANG_LIMIT_S = 60.0  # only so that a test cannot hang on it; aiosmtpd cancels the wait when the client leaves

# A behaviour decides the reply to DATA: None means accept (250); a string is the reply to send, or one of
# DROP, DROP_AFTER_STORE, HANG.
Behaviour = Callable[["Upstream", SmtpEnvelope], Awaitable[str | None]]


async def accept(upstream: Upstream, envelope: SmtpEnvelope) -> str | None:
    """Take every message at once."""
    return None


def always(reply: str) -> Behaviour:
    """Answer every DATA with `reply` ("451 4.3.0 ...", or DROP, DROP_AFTER_STORE, HANG)."""

    async def behaviour(upstream: Upstream, envelope: SmtpEnvelope) -> str | None:
        return reply

    return behaviour


def fail_ratio(ratio: float, reply: str = "451 4.3.0 try again later", seed: int = 7) -> Behaviour:
    """Answer `reply` to a share `ratio` of DATA, drawn from a seeded generator, so that two runs refuse the
    same messages in the same order and their figures compare."""
    rng = random.Random(seed)

    async def behaviour(upstream: Upstream, envelope: SmtpEnvelope) -> str | None:
        return reply if rng.random() < ratio else None

    return behaviour


def delay(seconds: float) -> Behaviour:
    """Take every message, `seconds` after its data arrived: a slow relay."""

    async def behaviour(upstream: Upstream, envelope: SmtpEnvelope) -> str | None:
        await asyncio.sleep(seconds)
        return None

    return behaviour


def latency(draw_s: Callable[[random.Random], float], seed: int = 7) -> Behaviour:
    """Take every message after a delay drawn for each from a seeded generator, e.g. a relay whose answer
    takes 2-20 ms: `latency(lambda rng: rng.uniform(0.002, 0.02))`, or a long tail:
    `latency(lambda rng: rng.lognormvariate(math.log(0.01), 1.0))`."""
    rng = random.Random(seed)

    async def behaviour(upstream: Upstream, envelope: SmtpEnvelope) -> str | None:
        await asyncio.sleep(max(0.0, draw_s(rng)))
        return None

    return behaviour


class _Handler:
    """aiosmtpd's handler: asks the upstream's behaviour of the moment, then records or refuses."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: SmtpEnvelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        if not self.upstream.pipelining:
            return responses
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: SmtpEnvelope, address: str, rcpt_options: list[str]
    ) -> str:
        refusal = self.upstream.rcpt_refusals.get(address.lower())
        if refusal is not None:
            return refusal
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: SmtpEnvelope) -> str:
        up = self.upstream
        up.data_commands += 1
        up.active += 1
        up.peak_active = max(up.peak_active, up.active)
        try:
            reply = await up.behaviour(up, envelope)
        finally:
            up.active -= 1
        if reply == DROP:
            # Hang up after the data arrived and before answering: the sender cannot know the outcome.
            _hang_up(server)
            return "421 4.3.0 gone"
        if reply == HANG:
            await asyncio.sleep(HANG_LIMIT_S)
            return "451 4.4.2 too late"
        received = _received(session, envelope)
        if reply == DROP_AFTER_STORE:
            received.dropped = True
            up.record(received)
            _hang_up(server)
            return "421 4.3.0 gone"
        if reply is not None:
            return reply
        up.record(received)
        return "250 2.0.0 Ok: stored"


def _hang_up(server: SMTP) -> None:
    if server.transport is not None:
        server.transport.close()


def _received(session: Session, envelope: SmtpEnvelope) -> Received:
    peer: Any = session.peer  # typed str by aiosmtpd, but it is the socket's (host, port)
    return Received(
        "" if envelope.mail_from == "<>" else str(envelope.mail_from),
        list(envelope.rcpt_tos),
        bytes(envelope.original_content or b""),
        str(peer[0]),
        str(session.host_name or ""),
        time.time(),
        tls=session.ssl is not None,
        user=str(session.auth_data or ""),
    )


class _GreetingRefusal(asyncio.Protocol):
    """A server that is up but takes no mail: it greets with a 4xx/5xx and hangs up (RFC 5321 3.1)."""

    def __init__(self, reply: str) -> None:
        self.reply = reply

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(f"{self.reply}\r\n".encode())
        transport.close()


class _RecordingSMTP(SMTP):
    """aiosmtpd's server, noting each MAIL and RCPT argument exactly as it came (its own parser re-writes
    some addresses, so `Received` cannot show what a client sent)."""

    commands: list[str]

    async def smtp_MAIL(self, arg: str | None) -> None:
        self.commands.append(f"MAIL {arg}")
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str | None) -> None:
        self.commands.append(f"RCPT {arg}")
        await super().smtp_RCPT(arg)


class Upstream:
    """An aiosmtpd server on loopback, port 0, in the running event loop, recording what it accepts.

    What it saw: `received` (the messages it took), `commands` (every MAIL and RCPT argument as sent),
    `connections` (TCP connections, refused greetings included), `data_commands`, `active` and
    `peak_active` (DATA commands being answered at once), `logins` (AUTH exchanges, right or wrong),
    `refused_greetings`.

    Faults besides the behaviours: `rcpt_refusals` (address -> the reply its RCPT gets);
    `greeting_refusal` (e.g. "421 4.3.2 busy") answers every new connection
    with that reply and hangs up; `close_listener` / `reopen_listener` close the port for a while (new
    connections are refused, sessions already open carry on); `stop` then `reopen_listener` is a crash and a
    restart on the same port. `behaviour` may be replaced at any time; the next DATA asks the new one.
    """

    def __init__(
        self,
        name: str = "up",
        behaviour: Behaviour = accept,
        host: str = LOOPBACK,
        *,
        hostname: str | None = None,
        tls: ssl.SSLContext | None = None,
        smtputf8: bool = True,
        users: dict[str, str] | None = None,
        auth_require_tls: bool = True,
        index_headers: Sequence[str] = (),
        pipelining: bool = True,
    ) -> None:
        """`hostname` is the name in the greeting ("<name>.test" by default); `tls` offers STARTTLS with
        that server context; `users` (name -> password) offers AUTH, only after STARTTLS unless
        `auth_require_tls` is False (RFC 4954 4); `index_headers` are read as each message arrives, so that
        `header_values` of them costs nothing more when polled. `pipelining` offers PIPELINING (RFC 2920), as
        real servers do (aiosmtpd reads pipelined commands in order but does not say so)."""
        if hostname == "":
            # aiosmtpd takes an empty hostname as "ask socket.getfqdn()": a lookup no test may make.
            raise ValueError("Upstream hostname must not be empty")
        self.name = name
        self.behaviour = behaviour
        self.host = host
        self.hostname = hostname or f"{name}.test"
        self.tls = tls
        self.smtputf8 = smtputf8
        self.users = users
        self.auth_require_tls = auth_require_tls
        self.pipelining = pipelining
        self.logins = 0  # AUTH exchanges that reached the authenticator, right or wrong
        self.received: list[Received] = []
        self.commands: list[str] = []  # every MAIL and RCPT argument, as sent ("RCPT TO:<u@dest.test>")
        self.data_commands = 0
        self.connections = 0
        self.active = 0  # DATA commands being answered right now
        self.peak_active = 0
        self.greeting_refusal: str | None = None
        self.refused_greetings = 0
        # address (lower case) -> the reply its RCPT gets ("550 5.1.1 no such user"); others are taken.
        self.rcpt_refusals: dict[str, str] = {}
        self._server: asyncio.Server | None = None
        self._bound_port = 0
        self._sessions: list[SMTP] = []
        # Indexed as each message arrives: a poller that parsed a tick's worth of messages at once would
        # stall the event loop it shares with the load for milliseconds, and show in the latency figures.
        self._header_values: dict[str, list[str]] = {name: [] for name in index_headers}

    def record(self, received: Received) -> None:
        """Add a message to `received` (the DATA handler's one way in)."""
        self.received.append(received)
        for name, values in self._header_values.items():
            if len(values) == len(self.received) - 1:
                values.append(received.header(name))

    def header_values(self, name: str) -> list[str]:
        """Header `name` of each message in `received`, in order ("" where a message has none).

        Made for polling while the messages arrive (the demo's progress bars, a bench waiting for its last
        delivery): each message is parsed once, and a call costs only the messages new since the last one
        (none for a header in `index_headers`, or asked for before).
        """
        values = self._header_values.setdefault(name, [])
        if len(values) > len(self.received):
            values.clear()  # someone emptied `received`: start over
        values.extend(r.header(name) for r in self.received[len(values) :])
        return list(values)

    @property
    def port(self) -> int:
        if self._server is None:
            assert self._bound_port, f"upstream {self.name} was never started"
            return self._bound_port  # the port stays this upstream's while the listener is closed
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def address(self) -> str:
        """host:port, as a member's `address` in postmux's configuration."""
        return f"{self.host}:{self.port}"

    async def start(self, port: int = 0) -> Upstream:
        """Listen on `port` (0: one the system picks); returns self, so `up = await Upstream().start()`."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._new_connection, host=self.host, port=port, reuse_address=True
        )
        self._bound_port = self.port
        return self

    def _new_connection(self) -> asyncio.Protocol:
        self.connections += 1
        if self.greeting_refusal is not None:
            self.refused_greetings += 1
            return _GreetingRefusal(self.greeting_refusal)
        protocol = _RecordingSMTP(
            _Handler(self),
            hostname=self.hostname,
            enable_SMTPUTF8=self.smtputf8,
            decode_data=False,
            tls_context=self.tls,
            authenticator=self._authenticate if self.users is not None else None,
            auth_require_tls=self.auth_require_tls,
        )
        protocol.commands = self.commands
        self._sessions.append(protocol)
        return protocol

    @property
    def listening(self) -> bool:
        return self._server is not None

    def close_listener(self) -> None:
        """Close the port: new connections are refused, sessions already open carry on."""
        if self._server is not None:
            self._server.close()
            self._server = None

    async def reopen_listener(self) -> None:
        """Listen again on the same port (raises OSError if something took the port meanwhile)."""
        if self._server is None:
            await self.start(self._bound_port)

    def _authenticate(
        self, server: SMTP, session: Session, envelope: SmtpEnvelope, mechanism: str, data: Any
    ) -> AuthResult:
        self.logins += 1
        ok = (
            isinstance(data, LoginPassword)
            and self.users is not None
            and self.users.get(data.login.decode()) == data.password.decode()
        )
        # handled=False: aiosmtpd answers a failure with its own 535 5.7.8 (handled=True would stay silent).
        return AuthResult(success=ok, handled=False, auth_data=data.login.decode() if ok else None)

    async def stop(self) -> None:
        """Stop listening and drop every open session, as a crashed server would."""
        self.close_listener()
        for session in self._sessions:
            if session.transport is not None:
                session.transport.close()
        self._sessions.clear()

    async def __aenter__(self) -> Upstream:
        return await self.start()

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


def delete_prefix(client: redis.Redis, prefix: str) -> None:
    """Delete every key under `prefix`: how tests and benches that share one Redis leave it,
    each with a prefix of its own, so nothing of anyone else's is touched."""
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)
