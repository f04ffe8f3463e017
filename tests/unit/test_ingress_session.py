"""PostmuxSMTP's session set-up and replies: aiosmtpd's tables found once, each reply in one write.

The cached method listing and handler tables must give aiosmtpd exactly what it builds itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, Session, auth_mechanism
from aiosmtpd.smtp import Envelope as SmtpEnvelope

from postmux.config import SmtpSettings
from postmux.envelope import Envelope
from postmux.ingress.smtp import ConnectionLimits, IngressHandler, PostmuxSMTP
from postmux.passwords import hash_password
from tests.security.client import RawClient
from tests.support import make_settings


class _Uncached(PostmuxSMTP):
    """aiosmtpd's own discovery: SMTP.__init__ searches every attribute of the session, and the handler."""

    _tables_found_once = False


class _SearchedHandler(IngressHandler):
    """An IngressHandler with more for aiosmtpd to find, which counts how often it is searched."""

    def __init__(self, settings: SmtpSettings) -> None:
        super().__init__(settings, None)  # type: ignore[arg-type]
        self.searches = 0

    def __dir__(self) -> list[str]:
        self.searches += 1
        return list(super().__dir__())

    async def handle_NOOP(self, server: SMTP, session: Session, envelope: SmtpEnvelope, arg: str) -> str:
        return "250 2.0.0 noop"

    async def auth_PLAIN(self, server: SMTP, args: list[str]) -> AuthResult:  # takes the session's place
        return AuthResult(success=False)

    async def auth_CRAM__MD5(self, server: SMTP, args: list[str]) -> AuthResult:  # named CRAM-MD5
        return AuthResult(success=False)

    @auth_mechanism("X-TOKEN")
    async def auth_token(self, server: SMTP, args: list[str]) -> AuthResult:
        return AuthResult(success=False)


def _tables(session: PostmuxSMTP) -> dict[str, Any]:
    return {
        "commands": {name: method.__func__ for name, method in session._smtp_methods.items()},
        "command order": list(session._smtp_methods),  # HELP lists them in this order
        "auth": {
            name: (getattr(impl.method, "__func__", impl.method), impl.is_builtin)
            for name, impl in session._auth_methods.items()
        },
        "auth order": list(session._auth_methods),  # EHLO's AUTH line sorts them, but keep it the same
        "hooks": dict(session._handle_hooks),  # bound methods: equal when of the same handler and function
        "ehlo": session._ehlo_hook_ver,
        "handler": session.event_handler,
    }


def _smtp_settings(tmp_path: Path, *, users: bool) -> SmtpSettings:
    pools = [{"name": "p", "members": [{"name": "m", "address": "127.0.0.1:2525"}]}]
    # With a user, AUTH PLAIN and LOGIN are offered: the auth_* table is not empty.
    smtp = {"users": [{"name": "app", "password_hash": hash_password("pw", n=2**10)}]} if users else {}
    return make_settings(tmp_path, pools, smtp=smtp).smtp


async def test_same_command_auth_and_hook_tables_as_aiosmtpd(tmp_path: Path) -> None:
    settings = _smtp_settings(tmp_path, users=True)
    handler = IngressHandler(settings, None)  # type: ignore[arg-type]
    limits = ConnectionLimits(10, 10, "postmux.test")
    reference = _Uncached(handler, settings, limits, None)
    first = PostmuxSMTP(handler, settings, limits, None)
    second = PostmuxSMTP(handler, settings, limits, None)  # served from the class cache
    assert _tables(first) == _tables(reference) == _tables(second)
    assert {"DATA", "MAIL", "RCPT", "EHLO", "AUTH"} <= set(second._smtp_methods)
    assert {"PLAIN", "LOGIN"} <= set(second._auth_methods)
    assert {"EHLO", "MAIL", "RCPT", "DATA", "exception"} <= set(second._handle_hooks)
    assert second._ehlo_hook_ver == "new"
    assert second._smtp_methods["DATA"].__self__ is second  # bound to its own session, not the first
    assert second._handle_hooks is not first._handle_hooks  # each session its own table, as in aiosmtpd


@pytest.mark.parametrize("users", [True, False])
async def test_a_handlers_own_mechanisms_and_hooks_as_aiosmtpd_finds(tmp_path: Path, users: bool) -> None:
    """A handler's auth_* take the place of the session's, and AUTH's exclusions apply to them too."""
    settings = _smtp_settings(tmp_path, users=users)
    handler = _SearchedHandler(settings)
    limits = ConnectionLimits(10, 10, "postmux.test")
    reference = _Uncached(handler, settings, limits, None)
    session = PostmuxSMTP(handler, settings, limits, None)
    assert _tables(session) == _tables(reference)
    assert session._handle_hooks["NOOP"] == handler.handle_NOOP
    assert {"CRAM-MD5", "X-TOKEN"} <= set(session._auth_methods)
    assert ("PLAIN" in session._auth_methods) is users  # excluded without users, the handler's or not
    if users:
        assert session._auth_methods["PLAIN"] == (handler.auth_PLAIN, False)


class _WithCommand(PostmuxSMTP):
    """A session class with a command of its own, made after PostmuxSMTP's first session."""

    async def smtp_XCLIENT(self, arg: str) -> None:
        await self.push("250 2.0.0 Ok")


class _WithCommandUncached(_WithCommand):
    _tables_found_once = False


async def test_a_subclass_with_a_command_of_its_own_has_it_in_its_table(tmp_path: Path) -> None:
    settings = _smtp_settings(tmp_path, users=True)
    handler = IngressHandler(settings, None)  # type: ignore[arg-type]
    limits = ConnectionLimits(10, 10, "postmux.test")
    PostmuxSMTP(handler, settings, limits, None)  # PostmuxSMTP's listing is made first
    session = _WithCommand(handler, settings, limits, None)
    assert _tables(session) == _tables(_WithCommandUncached(handler, settings, limits, None))
    assert session._smtp_methods["XCLIENT"] == session.smtp_XCLIENT
    assert "XCLIENT" not in PostmuxSMTP(handler, settings, limits, None)._smtp_methods


async def test_a_made_session_lists_its_attributes_as_any_object_does(tmp_path: Path) -> None:
    """Only while SMTP.__init__ runs is dir() of a session empty: after it, debuggers and tests see all."""
    settings = _smtp_settings(tmp_path, users=False)
    session = PostmuxSMTP(IngressHandler(settings, None), settings, ConnectionLimits(1, 1, "h"), None)  # type: ignore[arg-type]
    assert {"settings", "limits", "push", "smtp_DATA", "auth_PLAIN", "_smtp_methods"} <= set(dir(session))


async def test_the_handler_is_searched_once_for_all_its_sessions(tmp_path: Path) -> None:
    """aiosmtpd searches the handler (dir, getmembers, signature) in each session's constructor."""
    settings = _smtp_settings(tmp_path, users=False)
    handler = _SearchedHandler(settings)
    limits = ConnectionLimits(10, 10, "postmux.test")
    for _ in range(5):
        PostmuxSMTP(handler, settings, limits, None)
    assert handler.searches == 2  # dir() for the hooks, and inspect.getmembers for auth_*


class _WritesRecorded(PostmuxSMTP):
    """A session that keeps the octets of each write it makes to its socket, in order."""

    def _cb_client_connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super()._cb_client_connected(reader, writer)
        self.writes: list[bytes] = []
        write = writer.write

        def recorded(data: Any) -> None:
            self.writes.append(bytes(data))
            write(data)

        writer.write = recorded  # type: ignore[method-assign]


class _Queues:
    async def accept(self, envelope: Envelope) -> str:
        return "q1"


@pytest.fixture
async def recorded(tmp_path: Path) -> AsyncIterator[tuple[int, list[_WritesRecorded]]]:
    """A listener on loopback whose sessions record their writes: its port, and its sessions."""
    settings = _smtp_settings(tmp_path, users=False)
    handler = IngressHandler(settings, _Queues())
    limits = ConnectionLimits(10, 10, "postmux.test")
    sessions: list[_WritesRecorded] = []

    def factory() -> _WritesRecorded:
        sessions.append(_WritesRecorded(handler, settings, limits, None))
        return sessions[-1]

    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    yield int(server.sockets[0].getsockname()[1]), sessions
    server.close()
    await server.wait_closed()


def _wire(reply: str) -> bytes:
    """A reply as RawClient.reply gives it (lines joined by newlines), as it went on the wire."""
    return reply.replace("\n", "\r\n").encode() + b"\r\n"


async def test_a_multiline_reply_goes_in_one_write(recorded: tuple[int, list[_WritesRecorded]]) -> None:
    """EHLO's reply, line by line in aiosmtpd, is one send: RFC 5321 4.2.1's lines, then its last."""
    port, sessions = recorded
    client = await RawClient.connect(port)
    ehlo = await client.cmd("EHLO client.test")
    assert len(ehlo.splitlines()) >= 5 and "250-PIPELINING" in ehlo
    assert (await client.cmd("QUIT")).startswith("221")
    await client.close()
    assert sessions[0].writes == [_wire(client.greeting), _wire(ehlo), b"221 2.0.0 Bye\r\n"]


async def test_pipelined_commands_have_each_reply_written_as_it_is_made(
    recorded: tuple[int, list[_WritesRecorded]],
) -> None:
    """RFC 2920: a group of commands sent at once gets its replies in order, none held for the next."""
    port, sessions = recorded
    client = await RawClient.connect(port)
    await client.send(b"EHLO client.test\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<u@dest.test>\r\nDATA\r\n")
    replies = [await client.reply() for _ in range(4)]
    assert [r[:4] for r in replies] == ["250-", "250 ", "250 ", "354 "]
    await client.send(b"Subject: s\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    replies += [await client.reply() for _ in range(2)]
    assert replies[-2:] == ["250 2.0.0 Ok: queued as q1", "221 2.0.0 Bye"]
    await client.close()
    assert sessions[0].writes == [_wire(r) for r in [client.greeting, *replies]]


def test_relay_trust_is_worked_out_once_an_address() -> None:
    """RCPT asks whether the client may relay; the answer for an address is kept, not parsed again."""
    settings = SmtpSettings(
        listen="127.0.0.1:0", hostname="postmux.test", trusted_networks=("127.0.0.0/8", "2001:db8::/32")
    )
    handler = IngressHandler(settings, None)  # type: ignore[arg-type]
    answers = {
        "127.0.0.1": True,
        "::ffff:127.0.0.2": True,  # IPv4-mapped (RFC 4291 2.5.5.2): judged as the IPv4 address
        "2001:db8::25": True,
        "192.0.2.1": False,
        "": False,  # no IP peer (a Unix socket)
        "not an address": False,
    }
    for _ in range(3):
        assert {address: handler.trusts(address) for address in answers} == answers
    assert cast(Any, handler.trusts).cache_info().misses == len(answers)


async def test_commands_move_the_idle_deadline_without_a_new_timer_each(
    recorded: tuple[int, list[_WritesRecorded]],
) -> None:
    """aiosmtpd cancels its idle timer and sets another for each command; one timer serves them all."""
    port, sessions = recorded
    client = await RawClient.connect(port)
    assert (await client.cmd("EHLO client.test")).startswith("250")
    session = sessions[0]
    timer, deadline = session._timeout_handle, session._idle_deadline
    for _ in range(5):
        assert await client.cmd("NOOP") == "250 2.0.0 OK"
    assert session._timeout_handle is timer
    assert session._idle_deadline > deadline
    await client.close()


def test_the_command_loop_is_aiosmtpds_own_code_with_only_its_log_sanitizer_replaced() -> None:
    import aiosmtpd.smtp

    from postmux.ingress.smtp import _COMMAND_LOOP, _sanitized_if_logged

    assert _COMMAND_LOOP.__code__ is SMTP._handle_client.__code__
    changed = {
        name
        for name, value in _COMMAND_LOOP.__globals__.items()
        if vars(aiosmtpd.smtp).get(name, _MISSING) is not value
    }
    assert changed == {"sanitized_log"}
    assert _COMMAND_LOOP.__globals__["sanitized_log"] is _sanitized_if_logged


_MISSING = object()


async def test_command_lines_are_sanitized_only_for_a_logger_that_keeps_them(
    recorded: tuple[int, list[_WritesRecorded]], caplog: pytest.LogCaptureFixture, monkeypatch: Any
) -> None:
    """aiosmtpd hides AUTH data in each command line before logging it; a dropped record needs none hidden."""
    import aiosmtpd.smtp

    sanitized: list[str] = []
    original = aiosmtpd.smtp.sanitized_log

    def counting(func: Any, msg: str, *args: Any, **kwargs: Any) -> None:
        sanitized.append(msg)
        original(func, msg, *args, **kwargs)

    monkeypatch.setattr(aiosmtpd.smtp, "sanitized_log", counting)
    port, _ = recorded
    caplog.set_level(logging.WARNING, logger="mail.log")
    client = await RawClient.connect(port)
    assert (await client.cmd("EHLO client.test")).startswith("250")
    assert sanitized == []
    caplog.set_level(logging.INFO, logger="mail.log")
    assert (await client.cmd("AUTH PLAIN c2VjcmV0")).startswith("5")  # no AUTH offered: no users
    assert sanitized == ["%r >> %r"]  # the INFO record, not the DEBUG one
    lines = [r.getMessage() for r in caplog.records if r.name == "mail.log" and ">>" in r.getMessage()]
    assert len(lines) == 1 and "c2VjcmV0" not in lines[0] and "********" in lines[0]
    assert not [r for r in caplog.records if "<<" in r.getMessage()]  # replies are logged at DEBUG
    caplog.set_level(logging.DEBUG, logger="mail.log")
    assert await client.cmd("NOOP") == "250 2.0.0 OK"
    await client.close()
    replies = [r.getMessage() for r in caplog.records if r.name == "mail.log" and "<<" in r.getMessage()]
    assert replies[-1].endswith("<< b'250 2.0.0 OK'")  # as aiosmtpd's push logs it


async def test_an_address_read_before_is_answered_the_same_for_what_mail_declared(
    recorded: tuple[int, list[_WritesRecorded]],
) -> None:
    """MAIL and RCPT paths are parsed once an argument; a UTF-8 recipient still needs SMTPUTF8 each time."""
    from postmux.ingress.smtp import _read_argument

    port, _ = recorded
    client = await RawClient.connect(port)
    assert (await client.cmd("EHLO client.test")).startswith("250")
    for _ in range(2):
        assert (await client.cmd("MAIL FROM:<a@example.com> SMTPUTF8")).startswith("250")
        assert (await client.cmd("RCPT TO:<üser@dest.test>")).startswith("250 2.1.5")
        assert (await client.cmd("RSET")).startswith("250")
        assert (await client.cmd("MAIL FROM:<a@example.com>")).startswith("250")
        assert (await client.cmd("RCPT TO:<üser@dest.test>")).startswith("553 5.6.7")
        assert (await client.cmd("RCPT TO:<u%relay@dest.test>")).startswith("553 5.1.3")  # each time
        assert (await client.cmd("RSET")).startswith("250")
    await client.close()
    assert _read_argument.cache_info().hits >= 5


# What each session has of its own (a new reader, writer, future, bound method): compared by type.
_PER_SESSION = {"_stream_reader_wr", "_strong_reader", "_closed", "_drain_waiters", "_client_connected_cb"}


@pytest.mark.parametrize("users", [False, True])
@pytest.mark.parametrize("tls", [False, True])
async def test_a_session_is_set_up_with_every_attribute_aiosmtpds_constructor_gives_it(
    tmp_path: Path, users: bool, tls: bool
) -> None:
    import ssl

    settings = _smtp_settings(tmp_path, users=users)
    handler = IngressHandler(settings, None)  # type: ignore[arg-type]
    limits = ConnectionLimits(10, 10, "postmux.test")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH) if tls else None
    ours, theirs = (
        PostmuxSMTP(handler, settings, limits, context),
        _Uncached(handler, settings, limits, context),
    )
    assert _tables(ours) == _tables(theirs)
    mine, aiosmtpds = vars(ours), vars(theirs)
    # aiosmtpd keeps one dict of command-line limits for every session (a class attribute); a session of
    # postmux has its own (ingress/smtp.py _CommandLimits), which starts as aiosmtpd's cleared one does.
    limits_of_mine = mine.pop("command_size_limits")
    assert limits_of_mine == {} and limits_of_mine["MAIL"] == 512 == theirs.command_size_limits["MAIL"]
    assert mine.keys() == aiosmtpds.keys()
    for name in mine.keys() - {"_smtp_methods", "_auth_methods", "_handle_hooks", "_authenticator"}:
        if name in _PER_SESSION:
            assert type(mine[name]) is type(aiosmtpds[name]), name
        else:
            assert mine[name] == aiosmtpds[name], name
    assert ours._authenticator == ours._take_credentials and theirs._authenticator == theirs._take_credentials
    assert ours._stream_reader._limit == theirs._stream_reader._limit  # type: ignore[union-attr]
