"""Test helpers: real SMTP servers on loopback, a config builder, wait_until. No mocks."""

from __future__ import annotations

import asyncio
import email
import random
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosmtplib
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword, Session
from aiosmtpd.smtp import Envelope as SmtpEnvelope

from postmux.config import Settings, settings_from_dict


@dataclass
class Received:
    sender: str
    recipients: list[str]
    data: bytes
    peer: str
    helo: str = ""
    at: float = 0.0  # time.time() when it was accepted
    dropped: bool = False  # stored, then the connection was cut before the reply (DROP_AFTER_STORE)
    tls: bool = False  # the session had started TLS
    user: str = ""  # the name the client authenticated as

    @property
    def test_id(self) -> str:
        msg = email.message_from_bytes(self.data)
        return str(msg.get("X-Test-Id", ""))


DROP = "DROP"  # a behaviour's reply that makes the server hang up instead of answering
# Stores the message, then hangs up before answering: the sender cannot know it was taken, so a copy sent
# again elsewhere is a duplicate no sender can avoid (RFC 1047).
DROP_AFTER_STORE = "DROP_AFTER_STORE"
# Never answers: the server sits on the message until the client gives up and hangs up. Nothing is stored.
HANG = "HANG"
HANG_LIMIT_S = 60.0  # only so that a test cannot hang on it; aiosmtpd cancels the wait when the client leaves

# A behaviour decides the reply to DATA: None means accept (250); a string is the reply to send.
Behaviour = Callable[["Upstream", SmtpEnvelope], Awaitable[str | None]]


async def accept(upstream: Upstream, envelope: SmtpEnvelope) -> str | None:
    return None


def fail_ratio(ratio: float, reply: str = "451 4.3.0 try again later", seed: int = 7) -> Behaviour:
    rng = random.Random(seed)

    async def behaviour(upstream: Upstream, envelope: SmtpEnvelope) -> str | None:
        return reply if rng.random() < ratio else None

    return behaviour


def always(reply: str) -> Behaviour:
    async def behaviour(upstream: Upstream, envelope: SmtpEnvelope) -> str | None:
        return reply

    return behaviour


def delay(seconds: float) -> Behaviour:
    async def behaviour(upstream: Upstream, envelope: SmtpEnvelope) -> str | None:
        await asyncio.sleep(seconds)
        return None

    return behaviour


class _Handler:
    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream

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
            server.transport.close()
            return "421 4.3.0 gone"
        if reply == HANG:
            await asyncio.sleep(HANG_LIMIT_S)
            return "451 4.4.2 too late"
        data = envelope.original_content or b""
        sender = "" if envelope.mail_from == "<>" else envelope.mail_from
        received = Received(
            sender,
            list(envelope.rcpt_tos),
            bytes(data),
            session.peer[0],
            session.host_name,
            time.time(),
            tls=session.ssl is not None,
            user=str(session.auth_data or ""),
        )
        if reply == DROP_AFTER_STORE:
            received.dropped = True
            up.received.append(received)
            server.transport.close()
            return "421 4.3.0 gone"
        if reply is not None:
            return reply
        up.received.append(received)
        return "250 2.0.0 Ok: stored"


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
    """An aiosmtpd server on 127.0.0.1, port 0, in the test's event loop, recording what it accepts.

    Faults besides the behaviours: `greeting_refusal` (e.g. "421 4.3.2 busy") answers every new connection
    with that reply and hangs up; `close_listener` / `reopen_listener` close the port for a while (new
    connections are refused, sessions already open carry on).
    """

    def __init__(
        self,
        name: str = "up",
        behaviour: Behaviour = accept,
        host: str = "127.0.0.1",
        *,
        tls: ssl.SSLContext | None = None,
        smtputf8: bool = True,
        users: dict[str, str] | None = None,
        auth_require_tls: bool = True,
    ) -> None:
        """`tls` offers STARTTLS with that server context; `users` (name -> password) offers AUTH."""
        self.name = name
        self.behaviour = behaviour
        self.host = host
        self.tls = tls
        self.smtputf8 = smtputf8
        self.users = users
        self.auth_require_tls = auth_require_tls
        self.logins = 0  # AUTH exchanges that reached the authenticator, right or wrong
        self.received: list[Received] = []
        self.commands: list[str] = []  # every MAIL and RCPT argument, as sent ("RCPT TO:<u@dest.test>")
        self.data_commands = 0
        self.connections = 0
        self.active = 0  # DATA commands being answered right now
        self.peak_active = 0
        self.greeting_refusal: str | None = None
        self.refused_greetings = 0
        self._server: asyncio.Server | None = None
        self._bound_port = 0
        self._sessions: list[SMTP] = []

    @property
    def port(self) -> int:
        if self._server is None:
            assert self._bound_port, f"upstream {self.name} was never started"
            return self._bound_port  # the port stays this upstream's while the listener is closed
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self, port: int = 0) -> Upstream:
        handler = _Handler(self)

        def factory() -> Any:
            self.connections += 1
            if self.greeting_refusal is not None:
                self.refused_greetings += 1
                return _GreetingRefusal(self.greeting_refusal)
            protocol = _RecordingSMTP(
                handler,
                hostname=f"{self.name}.test",
                enable_SMTPUTF8=self.smtputf8,
                decode_data=False,
                tls_context=self.tls,
                authenticator=self._authenticate if self.users is not None else None,
                auth_require_tls=self.auth_require_tls,
            )
            protocol.commands = self.commands
            self._sessions.append(protocol)
            return protocol

        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(factory, host=self.host, port=port, reuse_address=True)
        self._bound_port = self.port
        return self

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
        if self._server is not None:
            self._server.close()
            self._server = None
        for session in self._sessions:
            if session.transport is not None:
                session.transport.close()
        self._sessions.clear()


StartUpstream = Callable[..., Awaitable[Upstream]]  # the `upstream` fixture (tests/conftest.py)


def free_port() -> int:
    """A loopback port with nothing listening on it (connections to it are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_settings(tmp_path: Path, pools: list[dict[str, Any]], **sections: Any) -> Settings:
    data: dict[str, Any] = {
        "smtp": {"listen": "127.0.0.1:0", "hostname": "postmux.test"},
        "http": {"listen": "127.0.0.1:0"},
        "spool": {"path": str(tmp_path / "spool.db")},
        "events": {"log": str(tmp_path / "events.jsonl")},
        "retry": {"intervals": ["1s"], "max_age": "1h", "jitter": 0},
        "delivery": {"connect_timeout": "2s", "command_timeout": "5s", "data_timeout": "5s"},
        "pool": pools,
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return settings_from_dict(data)


def message(
    test_id: str, sender: str = "app@example.com", to: str = "user@dest.test", size: int = 0
) -> bytes:
    body = ("x" * 70 + "\r\n") * (size // 72) if size else "hello\r\n"
    return (
        f"From: {sender}\r\nTo: {to}\r\nSubject: test {test_id}\r\nX-Test-Id: {test_id}\r\n"
        f"Message-ID: <{test_id}@example.com>\r\n\r\n{body}"
    ).encode()


async def send(
    port: int,
    test_id: str,
    sender: str = "app@example.com",
    to: list[str] | None = None,
    *,
    source_address: str | None = None,
    headers: str = "",
) -> str:
    """Send one message over SMTP to postmux; returns the 250 reply text. sender "" is the null sender.

    `source_address` sends from another loopback address; `headers` are put before the others.
    """
    rcpts = to or ["user@dest.test"]
    # local_hostname: aiosmtplib would otherwise ask the resolver for this machine's name.
    client = aiosmtplib.SMTP(
        hostname="127.0.0.1",
        port=port,
        local_hostname="client.test",
        start_tls=False,
        source_address=(source_address, 0) if source_address else None,
    )
    await client.connect()
    try:
        await client.mail(sender)
        for rcpt in rcpts:
            await client.rcpt(rcpt)
        response = await client.data(headers.encode() + message(test_id, sender, rcpts[0]))
        await client.quit()
    finally:
        client.close()
    return response.message


async def send_many(port: int, ids: list[str], concurrency: int = 10, **kwargs: Any) -> None:
    sem = asyncio.Semaphore(concurrency)

    async def one(i: str) -> None:
        async with sem:
            await send(port, i, **kwargs)

    await asyncio.gather(*(one(i) for i in ids))


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


@dataclass
class Farm:
    upstreams: list[Upstream] = field(default_factory=list)

    async def stop(self) -> None:
        for u in self.upstreams:
            await u.stop()


def read_events(path: Path) -> list[dict[str, Any]]:
    import json

    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
