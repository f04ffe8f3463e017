"""SMTP ingress on aiosmtpd, in postmux's own event loop, hardened against bad and hostile clients.

aiosmtpd 1.4.6 already ends DATA only at CRLF.CRLF (its fix for CVE-2024-27305), discards a message's text
once it is too big (memory stays flat), limits command lines to 512 octets and text lines to 1000, and
discards plaintext pipelined behind STARTTLS (CVE-2011-0411); postmux reads the DATA text in blocks by
those same rules (ingress/data.py, BlockDataSMTP), except that a text line over 1000 octets is folded, not
refused, unless [smtp] long_lines = "refuse" (ingress/folding.py). `PostmuxSMTP` adds what it lacks: command
lines held to CRLF, messages with bare CR/LF refused, address hygiene, connection limits (a slot given
back as soon as the client hangs up), an error budget, a whole-session timeout, a 421 on timeouts, scrypt
AUTH checked off the event loop with a delay after each failure and budgets across connections
(ingress/logins.py), enhanced status codes (RFC 3463, RFC 2034) on every reply but the greeting and
EHLO's, and the client's address from a trusted proxy's PROXY header (ingress/proxy.py).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import inspect
import ipaddress
import logging
import socket
import ssl
import types
import warnings
import weakref
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import aiosmtpd.smtp
import structlog
from aiosmtpd.smtp import (
    MISSING,
    SMTP,
    AuthResult,
    LoginPassword,
    Session,
    TLSSetupException,
    _AuthMechAttr,
    syntax,
)
from aiosmtpd.smtp import Envelope as SmtpEnvelope

from postmux.address import Role, mailbox_key, split_path
from postmux.config import SmtpSettings, split_hostport
from postmux.envelope import Envelope
from postmux.ingress.acceptor import AcceptRefused, Accepts
from postmux.ingress.data import LOCAL_ERROR, NO_STORAGE, BlockDataSMTP, DataText, TextEnvelope
from postmux.ingress.hygiene import (
    HOPS_EXCEEDED,
    NON_ASCII_PARAMETERS,
    command_line_refusal,
    declares_smtputf8,
    read_path,
    text_refusal,
)
from postmux.ingress.logins import LoginGuard, LoginOutcome
from postmux.ingress.proxy import ProxyRefusal, judge_header, read_header
from postmux.ingress.replies import enhanced
from postmux.reputation.suppression import SuppressionList
from postmux.spool.base import SpoolError

log = structlog.get_logger("postmux.smtp")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def is_trusted(peer_ip: str, networks: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(peer_ip)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


def _peer_ip(session: Session) -> str:
    peer = session.peer
    return str(peer[0]) if isinstance(peer, tuple) else ""


class SmtpRefusal(Exception):
    """Raised anywhere in a command's handling to answer it with `reply` (IngressHandler.handle_exception)."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


class ConnectionLimits:
    """Open connections, overall and per client IP, shared by every session of one listener."""

    def __init__(self, total: int, per_ip: int, hostname: str) -> None:
        self.total, self.per_ip, self.hostname = total, per_ip, hostname
        self.open: Counter[str] = Counter()

    def admit(self, ip: str) -> str | None:
        """None and the connection counts, or the 421 to close it with."""
        if self.open.total() >= self.total:
            return f"421 4.7.0 {self.hostname} Too many connections, try again later"
        if self.open[ip] >= self.per_ip:
            return f"421 4.7.0 {self.hostname} Too many connections from your address, try again later"
        self.open[ip] += 1
        return None

    def release(self, ip: str) -> None:
        self.open[ip] -= 1
        if self.open[ip] <= 0:
            del self.open[ip]


class _QuietSession(Session):
    """aiosmtpd's Session without the warning its `login_data` logs on every successful AUTH.

    aiosmtpd 1.4's smtp_AUTH still sets the deprecated `session.login_data` after each login, and the
    property logs "Session.login_data is deprecated ..." through the stdlib logger `mail.log`: a line of
    plain text in postmux's JSON log for every client that logs in. postmux reads `auth_data` only.
    """

    @property
    def login_data(self) -> Any:
        return self._login_data

    @login_data.setter
    def login_data(self, value: Any) -> None:
        self._login_data = value


AUTH_LINE_TOO_LONG = "500 5.5.6 Authentication Exchange line is too long"


# RFC 5321 4.5.3.1.4: 512 octets a command line; MAIL may carry 26 more for SIZE (RFC 1870 8) and 10 for
# SMTPUTF8 (RFC 6531 3.4), which aiosmtpd adds at EHLO.
_COMMAND_LINE = 512
_COMMAND_LINE_MAX = {"MAIL": _COMMAND_LINE + 26 + 10}


class _CommandLimits(dict[str, int]):
    """A session's own command-line limits, in place of aiosmtpd's, which is one dict shared by every
    session: each connection cleared it for all (a valid 531-octet MAIL refused with a 500 whenever another
    client connected) and each EHLO added to it again (927 octets taken after 13 EHLOs). Here EHLO's
    additions stop at what the RFCs give."""

    def __missing__(self, command: str) -> int:
        return _COMMAND_LINE

    def __setitem__(self, command: str, octets: int) -> None:
        super().__setitem__(command, min(octets, _COMMAND_LINE_MAX.get(command, _COMMAND_LINE)))


class _GuardedReader(asyncio.StreamReader):
    """aiosmtpd's own stream reader with a check on each command line (see PostmuxSMTP._cb_client_connected).

    aiosmtpd reads command lines up to a bare LF and strips any CRs before it, so `MAIL FROM:<a>\\n` or a
    CR in the middle of a line would pass. The DATA text is read in blocks (BlockDataSMTP), not here; a
    read of lines up to CRLF (aiosmtpd's own DATA reader) would only reset the idle timer.
    """

    on_data_line: Callable[[], None]
    overrun = False  # the rest of an over-long line is being read to be thrown away, not to be judged

    async def readuntil(self, separator: Any = b"\n") -> bytes:
        try:
            line = await super().readuntil(separator)
        except asyncio.LimitOverrunError:
            self.overrun = True
            raise
        except asyncio.IncompleteReadError:
            # The client closed its side and every whole line it sent is answered (eof_received): the
            # session ends as aiosmtpd ends one whose connection went, by cancellation (it closes the socket).
            raise asyncio.CancelledError from None
        if separator != b"\n":
            self.on_data_line()
            return line
        if self.overrun:
            self.overrun = False
            return line
        refusal = command_line_refusal(line)
        if refusal is not None:
            raise SmtpRefusal(refusal)
        return line

    async def readline(self) -> bytes:
        """A client's line in the AUTH exchange (aiosmtpd's challenge_auth is the one caller).

        StreamReader's own readline answers a line past the reader's limit (aiosmtpd's 1001 octets, far
        more than a PLAIN or LOGIN response needs) with a ValueError, which became a 451 and a traceback,
        and left the rest of the line to be read as commands. RFC 4954 4 has the reply for it.
        """
        try:
            return await self.readuntil(b"\n")
        except asyncio.IncompleteReadError as e:
            return e.partial
        except asyncio.LimitOverrunError as e:
            await self._discard_line(e.consumed)
            raise SmtpRefusal(AUTH_LINE_TOO_LONG) from None

    async def _discard_line(self, consumed: int) -> None:
        """Read and throw away the rest of an over-long line, as aiosmtpd does for a command line."""
        await self.read(consumed)
        while True:
            try:
                await self.readuntil(b"\n")
                return
            except asyncio.LimitOverrunError as e:
                await self.read(e.consumed)


def _mechanism_name(name: str, method: Any) -> str:
    """An auth_* method's AUTH mechanism, as aiosmtpd names it: auth_CRAM__MD5 is CRAM-MD5."""
    return str(getattr(method, "__auth_mechanism_name__", name.replace("auth_", "").replace("__", "-")))


class _SessionMethods:
    """A session class's smtp_* and auth_* methods, by name: what SMTP.__init__ searches each session for.

    aiosmtpd 1.4.6 (aiosmtpd/smtp.py, SMTP.__init__) lists them with inspect.getmembers(self) and dir(self),
    sorted by name; they are the class's, the same for each of its sessions, and only binding them to the
    session is left for each one.
    """

    def __init__(self, cls: type) -> None:
        names = sorted(name for name in dir(cls) if name.startswith(("smtp_", "auth_")))
        self.commands = {n.replace("smtp_", ""): n for n in names if n.startswith("smtp_")}
        self.mechanisms = [(_mechanism_name(n, getattr(cls, n)), n) for n in names if n.startswith("auth_")]


class _Commands(Mapping[str, Any]):
    """A session's smtp_* methods by command, bound when looked up: SMTP.__init__'s `_smtp_methods`.

    aiosmtpd binds every smtp_* method of each new session (fourteen getattr calls), to look up the one or
    two a client uses per transaction step: 4% of an ingress worker's CPU at 1.5 KB (issue 12). aiosmtpd
    reads the table with `get` (each command, HELP) and `items` (HELP): the same answers, bound on demand.
    """

    __slots__ = ("_names", "_session")

    def __init__(self, session: SMTP, names: dict[str, str]) -> None:
        self._session = session
        self._names = names  # command -> method name, in aiosmtpd's order (HELP lists them so)

    def get(self, command: str, default: Any = None) -> Any:
        name = self._names.get(command)
        return default if name is None else getattr(self._session, name)

    def __getitem__(self, command: str) -> Any:
        return getattr(self._session, self._names[command])

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class _HandlerHooks:
    """What aiosmtpd 1.4.6's SMTP.__init__ finds on a handler, found once for all the handler's sessions.

    Its own search (aiosmtpd/smtp.py, SMTP.__init__), as it is written there: the handle_* hooks by dir(),
    the auth_* mechanisms by inspect.getmembers (a handler's take the place of the session's own), and
    the form of handle_EHLO by its signature. What it finds depends on the handler alone.
    """

    @classmethod
    def of(cls, handler: Any) -> _HandlerHooks:
        found = _FOUND.get(handler)
        if found is None:
            found = _FOUND[handler] = cls(handler)
        return found

    def __init__(self, handler: Any) -> None:
        self.hooks: dict[str, Callable[..., Any]] = {
            m.replace("handle_", ""): getattr(handler, m) for m in dir(handler) if m.startswith("handle_")
        }
        self.auth_methods: dict[str, _AuthMechAttr] = {
            _mechanism_name(mname, mfunc): _AuthMechAttr(mfunc, False)
            for mname, mfunc in inspect.getmembers(handler)
            if mname.startswith("auth_")
        }
        self.ehlo_hook_ver: str | None = None
        ehlo_hook = self.hooks.get("EHLO")
        if ehlo_hook is not None:
            params = len(inspect.signature(ehlo_hook).parameters)
            if params not in (4, 5):
                raise RuntimeError("Unsupported EHLO Hook")
            self.ehlo_hook_ver = "old" if params == 4 else "new"
            if params == 4:  # IngressHandler's has 5
                warnings.warn(
                    "Use the 5-argument handle_EHLO() hook instead of the 4-argument handle_EHLO() hook",
                    DeprecationWarning,
                    stacklevel=2,
                )


# Per handler object (one per listener): its hooks are bound methods of it.
_FOUND: weakref.WeakKeyDictionary[Any, _HandlerHooks] = weakref.WeakKeyDictionary()


def _keeps_syntax(original: Any) -> Callable[[Any], Any]:
    """An overriding smtp_* method keeps the @syntax help text aiosmtpd's HELP reads from the original."""

    def decorate(method: Any) -> Any:
        method.__dict__.update(original.__dict__)
        return method

    return decorate


_MAIL_LOG = logging.getLogger("mail.log")  # aiosmtpd's logger
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}


def _sanitized_if_logged(func: Callable[..., None], msg: str, *args: Any, **kwargs: Any) -> None:
    """aiosmtpd's sanitized_log, only when the logger would keep the record.

    aiosmtpd's command loop passes every command line through `sanitized_log` twice (at DEBUG and at INFO),
    and it hides AUTH data in the line with a regex match before the logger decides anything: 3-6% of an
    ingress worker's CPU at 1.5 KB (issue 12), for records postmux never keeps (logs.py: libraries at
    WARNING). The logger is asked first; what it keeps is sanitized as before.
    """
    logger = getattr(func, "__self__", None)
    level = _LEVELS.get(getattr(func, "__name__", ""), logging.CRITICAL)
    if isinstance(logger, logging.Logger) and not logger.isEnabledFor(level):
        return
    aiosmtpd.smtp.sanitized_log(func, msg, *args, **kwargs)


def _quietly(function: types.FunctionType) -> types.FunctionType:
    """aiosmtpd's own `function` (its code object, as it is), with `_sanitized_if_logged` for sanitized_log.

    Not a copy of aiosmtpd's command loop to keep in step: the same code, run with the module's globals
    but for that one name (tests/unit/test_ingress_session.py checks both).
    """
    namespace = {**vars(aiosmtpd.smtp), "sanitized_log": _sanitized_if_logged}
    quiet = types.FunctionType(
        function.__code__, namespace, function.__name__, function.__defaults__, function.__closure__
    )
    quiet.__qualname__ = function.__qualname__
    return quiet


_COMMAND_LOOP = _quietly(SMTP._handle_client)  # type: ignore[arg-type]


def _to_postmaster(arg: str, postmaster: str) -> str:
    """RCPT's argument with the bare `<Postmaster>` (any case, RFC 5321 4.5.1) made `postmaster`."""
    path, params = split_path(arg)
    if path.lower() not in ("<postmaster>", "postmaster"):
        return arg
    return f"<{postmaster}> {params}" if params else f"<{postmaster}>"


@functools.lru_cache(maxsize=1024)
def _read_argument(arg: str, recipient: bool, smtputf8_declared: bool) -> tuple[str, str] | str:
    """MAIL's (or RCPT's) argument as aiosmtpd stores it, (mailbox, ESMTP parameters), or the refusal.

    A pure function of its arguments (`smtputf8_declared`: what MAIL declared, for a recipient), so its
    answers are kept: the RFC 5321 parse of a path (postmux.address) was 8% of an ingress worker's CPU at
    1.5 KB (issue 12), and a sender, often a recipient too, comes back message after message. Bounded:
    a client sending new addresses only pushes old ones out. (Not keyed by the Role: an Enum's hash is a
    Python call.)
    """
    role = Role.RECIPIENT if recipient else Role.SENDER
    path_text, params = split_path(arg)
    if not params.isascii():
        # RFC 5321 4.1.2: ESMTP keywords and values are ASCII. aiosmtpd reads them with Unicode's rules: "²"
        # passed its isdigit() and failed its int() (a 451 and a traceback), "١٢" was a SIZE, "ſmtputf8"
        # upper-cased to SMTPUTF8. Postfix answers 501 too.
        return NON_ASCII_PARAMETERS
    smtputf8 = smtputf8_declared if recipient else declares_smtputf8(params)
    path = read_path(path_text, role, smtputf8=smtputf8)
    if isinstance(path, str):
        return path
    return (path.mailbox.text if path.mailbox is not None else "<>"), params


class PostmuxSMTP(BlockDataSMTP):
    """One client connection."""

    # aiosmtpd's SMTP.__init__ builds its tables on every connection: the session's smtp_* and auth_*
    # methods with inspect.getmembers(self) and dir(self), the handler's hooks and AUTH mechanisms with
    # inspect.getmembers, dir() and the signature of handle_EHLO: 11% of postmux's serial CPU with one message
    # a connection (bench/README.md, profile_hotpath), a fifth of an ingress worker's at 1.5 KB (issue 12).
    # What it finds is the same for every session of a class and handler. So a session is set up with what
    # SMTP.__init__ sets (_set_up), its tables built from names listed once per class (_SessionMethods) and
    # hooks found once per handler (_HandlerHooks): what aiosmtpd would build and set
    # (tests/unit/test_ingress_session.py). False: SMTP.__init__ runs and searches, as it does by itself.
    _tables_found_once = True
    _methods: ClassVar[_SessionMethods]  # in each class's own __dict__, once its first session is made

    def __init__(
        self,
        handler: IngressHandler,
        settings: SmtpSettings,
        limits: ConnectionLimits,
        tls_context: ssl.SSLContext | None,
        spill_dir: Path | None = None,
        refused: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.refused = refused  # told each refusing reply's reason ("550 5.7.1"), for the metrics
        self.limits = limits
        self.logins = handler.logins
        self.proxy_trusted = handler.proxy_trusted
        self.errors = 0
        # Not "auth_failures": aiosmtpd takes every auth_* attribute of the protocol for an AUTH mechanism.
        self.failed_logins = 0
        self.recipients_overshot = 0  # 452s for too many recipients in this transaction
        self.client_ip = ""
        self._refused: str | None = "421 4.3.2 not yet admitted"
        self._awaiting_proxy = False  # [smtp] proxy_protocol: no client known until the proxy's header
        self._proxied: tuple[str, int] | None = None  # the client a trusted proxy's header named
        self._session_timer: asyncio.TimerHandle | None = None
        self._address_role: Role | None = None  # set by MAIL and RCPT for _getaddr
        self._offered: LoginPassword | None = None
        self._idle_deadline = 0.0  # loop time: the client is hung up on if it says nothing until then
        self._held = bytearray()  # the lines of a multiline reply so far (push)
        self.long_lines = settings.long_lines
        self.line_endings = settings.line_endings
        self.spill_dir, self.spill_bytes = spill_dir, settings.spill_bytes
        # Without users there is nothing to log in as: AUTH is not offered.
        excluded = () if settings.users else ("PLAIN", "LOGIN")
        if self._tables_found_once:
            self._set_up(handler, settings, tls_context, excluded)
            return
        super().__init__(
            handler,
            hostname=settings.hostname,
            ident="postmux",
            data_size_limit=settings.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            timeout=settings.timeout,
            tls_context=tls_context,
            require_starttls=settings.tls is not None and settings.tls.required,
            auth_require_tls=settings.auth_require_tls,
            auth_exclude_mechanism=excluded,
            authenticator=self._take_credentials,
            # A session is made by its listener's protocol factory, in the running loop. Without it,
            # aiosmtpd looks for a loop with asyncio.get_event_loop under catch_warnings, 2 µs a session.
            loop=asyncio.get_running_loop(),
        )

    def _set_up(
        self,
        handler: IngressHandler,
        settings: SmtpSettings,
        tls_context: ssl.SSLContext | None,
        excluded: Sequence[str],
    ) -> None:
        """What aiosmtpd 1.4.6's SMTP.__init__ sets, for the arguments __init__ above gives it, without its
        searches and its INFO line of AUTH mechanisms (built even when dropped).

        SMTP.__init__ was a tenth of an ingress worker's CPU at 1.5 KB, a session a message (issue 12);
        tests/unit/test_ingress_session.py holds every attribute to what aiosmtpd's own sets.
        """
        loop = asyncio.get_running_loop()
        self.__ident__ = "postmux"
        self.loop = loop
        asyncio.StreamReaderProtocol.__init__(
            self,
            asyncio.StreamReader(loop=loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected,
            loop=loop,
        )
        self.data_size_limit = settings.max_message_size
        self.enable_SMTPUTF8 = True
        self._decode_data = False
        self.command_size_limits = _CommandLimits()
        self.hostname = settings.hostname
        self.tls_context = tls_context
        if tls_context:  # as aiosmtpd warns (tls_context() below makes neither kind)
            if tls_context.verify_mode not in {ssl.CERT_NONE, ssl.CERT_OPTIONAL}:
                _MAIL_LOG.warning(
                    "tls_context.verify_mode not in {CERT_NONE, CERT_OPTIONAL}; "
                    "this might cause client connection problems"
                )
            elif tls_context.check_hostname:
                _MAIL_LOG.warning(
                    "tls_context.check_hostname == True; this might cause client connection problems"
                )
        self.require_starttls = tls_context and settings.tls is not None and settings.tls.required
        self._timeout_duration = settings.timeout
        self._timeout_handle = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._auth_require_tls = settings.auth_require_tls
        self._proxy_timeout = None
        self._authenticator = self._take_credentials
        self._auth_callback = None
        self._auth_required = False
        self._enforce_call_limit = False
        self._take_tables(handler, excluded)

    def _take_tables(self, handler: IngressHandler, excluded: Sequence[str]) -> None:
        """The tables SMTP.__init__ would have built by searching this session and `handler`."""
        cls = type(self)
        methods = cls.__dict__.get("_methods")  # a subclass has methods of its own: its own listing
        if methods is None:
            methods = _SessionMethods(cls)
            cls._methods = methods
        found = _HandlerHooks.of(handler)
        self._smtp_methods = _Commands(self, methods.commands)  # type: ignore[assignment]  # aiosmtpd: a dict
        auth = {mechanism: _AuthMechAttr(getattr(self, name), True) for mechanism, name in methods.mechanisms}
        auth.update(found.auth_methods)
        for mechanism in excluded:
            auth.pop(mechanism, None)
        self._auth_methods = auth
        self.event_handler = handler
        self._handle_hooks = dict(found.hooks)
        self._ehlo_hook_ver = found.ehlo_hook_ver

    # -- connection life -------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None  # a second call comes when STARTTLS swaps in the TLS transport
        super().connection_made(transport)
        assert self.session is not None
        if first:
            self.client_ip = _peer_ip(self.session)
            if self.settings.proxy_protocol:
                self._awaiting_proxy = True  # admitted by the client's address, once a header names it
            else:
                self._refused = self.limits.admit(self.client_ip)
            self._session_timer = self.loop.call_later(
                self.settings.session_timeout,
                self._hang_up,
                f"421 4.4.2 {self.hostname} Error: session time limit exceeded",
            )
        elif self._proxied is not None:
            # STARTTLS starts a new session (RFC 3207 4.2) whose peer is the TCP peer: the proxy.
            self.session.peer = self._proxied  # type: ignore[assignment]  # a peername tuple, typed str

    def _create_session(self) -> Session:
        return _QuietSession(self.loop)

    def _set_post_data_state(self) -> None:
        # aiosmtpd starts a new envelope here: after DATA, RSET, HELO/EHLO and at connection.
        super()._set_post_data_state()  # type: ignore[no-untyped-call]
        self.recipients_overshot = 0

    def connection_lost(self, error: Exception | None) -> None:
        if self._session_timer is not None:
            self._session_timer.cancel()
            if self._refused is None:
                self.limits.release(self.client_ip)
            self._session_timer = None
        super().connection_lost(error)

    def eof_received(self) -> bool:
        """The client has closed its side (a half-close: `nc -N`, `socat`, a script's shutdown(SHUT_WR)).

        It may still be reading, and it is owed a reply to each whole command it sent, above all the reply
        to its text's end: a message is ours only by that reply (RFC 5321 4.1.1.4, 6.1), and a client that
        never gets it sends the message again, a duplicate. aiosmtpd cancels the session's task here, which
        stored and delivered such a message without a word. So the reader is told of the end and the task
        goes on: it answers what it has, and ends (closing the socket, giving the connection slot back) when
        it next needs a line that will never come (_GuardedReader.readuntil) or finds a text cut short
        (BlockDataSMTP._read_text). uvloop delivers the EOF of a client that connects and hangs up even
        before the task starts (issue 10 B4): it starts, and ends at its first read.

        Over TLS there is no half-close (RFC 8446 6.1: close_notify ends the connection both ways), and a
        proxy that hangs up mid-header owes nothing an answer: those close at once, as aiosmtpd does.
        """
        if self._awaiting_proxy:  # a plain TCP check, or a proxy gone mid-header: nothing to answer
            log.info("connection closed: no PROXY header", proxy=self.client_ip, reason="the peer hung up")
        if self._awaiting_proxy or self._tls_protocol is not None or self._handler_coroutine is None:
            super().eof_received()
            return False
        asyncio.StreamReaderProtocol.eof_received(self)  # the reader ends: a read past it ends the task
        return True  # our side stays open for the replies

    def _cb_client_connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # aiosmtpd builds its StreamReader in its constructor; giving that very object the checking class
        # keeps every attribute aiosmtpd relies on (STARTTLS clears its buffer), with no copy to keep in step.
        reader.__class__ = _GuardedReader
        assert isinstance(reader, _GuardedReader)
        reader.on_data_line = self._data_line
        super()._cb_client_connected(reader, writer)

    def data_received_hook(self) -> None:
        self._data_line()  # called for each block of DATA text (BlockDataSMTP)

    def _data_line(self) -> None:
        """A client sending a message is not idle: its idle deadline moves back, for each block.

        Re-arming the timer (cancel, then call_later) for each line cost 10% of postmux's CPU at 50 KB
        messages (bench/README.md, profile_hotpath); moving the deadline (_reset_timeout) costs a clock read.
        """
        self._reset_timeout()

    async def _handle_client(self) -> None:
        if self._awaiting_proxy and not await self._take_proxy_header():
            return
        if self._refused is not None:
            # Instead of the greeting (RFC 5321 3.1): the client may try again later.
            self._count_refusal(self._refused)
            await super().push(self._refused)
            assert self.transport is not None
            self.transport.close()
            return
        await _COMMAND_LOOP(self)

    async def _take_proxy_header(self) -> bool:
        """The client's address from a trusted proxy's header (ingress/proxy.py), and its admission.

        False: the connection is closed.

        Not aiosmtpd's own `proxy_protocol_timeout`, which reads the header after postmux's admission (by the
        proxy's address) and from any peer: here the peer is checked first and the client admitted after.
        """
        assert self.session is not None and self.transport is not None
        proxy_ip, header = self.client_ip, None
        if is_trusted(proxy_ip, self.proxy_trusted):
            self._reset_timeout(self.settings.proxy_timeout)
            header = await read_header(self._reader)
            verdict = judge_header(header, proxy_ip)
        else:  # anyone can write a header naming any address: only a trusted proxy's is read
            verdict = ProxyRefusal("peer not in [smtp] proxy_trusted")
        if isinstance(verdict, ProxyRefusal):
            log.warning("connection closed: PROXY header refused", proxy=proxy_ip, reason=verdict.reason)
            self.transport.close()
            return False
        self._awaiting_proxy = False
        self._proxied = (verdict.ip, verdict.port or 0)
        self.session.peer = self._proxied  # type: ignore[assignment]  # a peername tuple, typed str
        self.session.proxy_data = header
        self.client_ip = verdict.ip
        self._refused = self.limits.admit(self.client_ip)
        self._reset_timeout()
        return True

    def _reset_timeout(self, duration: float | None = None) -> None:
        """The client is not idle: it is hung up on if it says nothing for `duration` (the timeout) from now.

        aiosmtpd cancels its timer and sets a new one for each command: 2% of an ingress worker's CPU at
        1.5 KB messages (issue 12). A deadline that only moves later needs no new timer: the one set fires,
        finds the deadline moved (_timeout_cb) and waits out the rest. Only a deadline sooner than the
        timer's, or no timer, sets one.
        """
        self._idle_deadline = self.loop.time() + (duration or self._timeout_duration)
        timer = self._timeout_handle
        if timer is None or timer.cancelled() or timer.when() > self._idle_deadline:
            super()._reset_timeout(duration)

    def _timeout_cb(self) -> None:
        remaining = self._idle_deadline - self.loop.time()
        if remaining > 0:  # the client has spoken since the timer was set
            super()._reset_timeout(remaining)
            return
        # RFC 5321 4.5.3.2: a server that times out should say so (421) rather than just hang up.
        self._hang_up(f"421 4.4.2 {self.hostname} Error: timeout exceeded")

    def _hang_up(self, reply: str) -> None:
        """Say `reply` and close, from inside the session's task or from a timer."""
        if self.transport is None or self.transport.is_closing():
            return
        if self._awaiting_proxy:
            # A proxy is no SMTP client: it hears no reply, whatever the reason (ingress/proxy.py).
            log.warning("connection closed: no PROXY header", proxy=self.client_ip, reason=reply)
            self.transport.close()
            if self._handler_coroutine is not None:
                self._handler_coroutine.cancel()
            return
        log.info("closing connection", client=self.client_ip, reply=reply)
        self._held.clear()  # never half a reply, then another (RFC 5321 4.2.1); none is held between pushes
        self._writer.write(reply.encode() + b"\r\n")
        self.transport.close()
        if self._handler_coroutine is not None:
            self._handler_coroutine.cancel()

    # -- replies ---------------------------------------------------------------------------------------

    def _count_refusal(self, reply: str) -> None:
        if self.refused is not None and reply[:1] in ("4", "5"):
            code, _, rest = reply.partition(" ")
            enhanced_code = rest.split(" ", 1)[0]
            self.refused(f"{code} {enhanced_code}" if enhanced_code[:1] in ("4", "5") else code)

    async def push(self, status: str | bytes) -> None:
        """Write one line of a reply; a multiline reply's lines wait for its last and go in one write.

        aiosmtpd writes each line by itself: a send syscall a line, eight for EHLO's reply. A line with
        "-" after its code is followed by more of the same reply (RFC 5321 4.2.1), which is pushed next,
        with nothing awaited between: it is held until then. A reply's last line is written at once, so
        the replies to pipelined commands (RFC 2920) still go as each is made.
        """
        if isinstance(status, bytes):  # AUTH challenges (334)
            await super().push(status)
            return
        reply = enhanced(status)
        if reply[3:4] == "-":
            self._held += self._encode(reply) + b"\r\n"
            return
        self._count_refusal(reply)
        if self._held:
            whole, self._held = bytes(self._held) + self._encode(reply), bytearray()
            await self._write_reply(whole)
        else:
            await self._write_reply(self._encode(reply))
        if reply[:1] in ("4", "5") and not reply.startswith("421") and not self._overshoot(reply):
            self.errors += 1
            if self.errors >= self.settings.max_errors:
                # Postfix's smtpd_hard_error_limit: a client that keeps failing is broken or probing.
                self._hang_up(f"421 4.7.0 {self.hostname} Error: too many errors")

    async def _write_reply(self, reply: bytes) -> None:
        """aiosmtpd's SMTP.push once the reply is encoded: written with its CRLF, logged, drained.

        Its DEBUG record only for a logger that keeps it (the call and its arguments, a reply at a time,
        were 2% of an ingress worker's CPU at 1.5 KB, issue 12).
        """
        self._writer.write(reply + b"\r\n")
        if _MAIL_LOG.isEnabledFor(logging.DEBUG):
            assert self.session is not None
            _MAIL_LOG.debug("%r << %r", self.session.peer, reply)
        # StreamWriter.drain returns at once, without a turn of the loop, unless the transport's buffer is
        # over its high-water mark (asyncio's FlowControlMixin sets _paused) or it is closing (drain then
        # raises or waits for the close): only then is it called. -2.4% of a worker's instructions.
        if self._paused or self._writer.transport.is_closing():  # type: ignore[attr-defined]
            await self._writer.drain()

    def _encode(self, reply: str) -> bytes:
        return reply.encode("utf-8" if self.enable_SMTPUTF8 else "ascii")  # as aiosmtpd's push encodes

    def _overshoot(self, reply: str) -> bool:
        """Whether `reply` refuses a recipient past max_recipients within the overshoot allowance.

        Postfix's smtpd_recipient_overshoot_limit: a client that pipelines its RCPTs (RFC 2920) hears of
        the limit only after sending more, and those 452s are the limit working, not the client failing.
        Past the allowance each one counts toward max_errors again.
        """
        if (
            reply != TOO_MANY_RECIPIENTS
            or self.recipients_overshot >= self.settings.recipient_overshoot_limit
        ):
            return False
        self.recipients_overshot += 1
        return True

    # -- commands --------------------------------------------------------------------------------------

    @_keeps_syntax(SMTP.smtp_STARTTLS)
    async def smtp_STARTTLS(self, arg: str) -> None:
        if self._tls_protocol is not None:
            await self.push("503 5.5.1 TLS already active")  # RFC 3207 4.2: no second STARTTLS
            return
        await super().smtp_STARTTLS(arg)

    def _strip_command_keyword(self, keyword: str, arg: str) -> str | None:
        # aiosmtpd strips FROM: or TO: just before it parses the address: the one place that knows which.
        self._address_role = Role.RECIPIENT if keyword == "TO:" else Role.SENDER
        result: str | None = super()._strip_command_keyword(keyword, arg)
        if result is None:  # not FROM:/TO: at all: no path follows, and the next VRFY is not one either
            self._address_role = None
        return result

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """The path of MAIL or RCPT by RFC 5321's grammar (postmux.address), not by the email header parser.

        Returns what aiosmtpd stores: the mailbox exactly as it will be sent (`<>` for the null sender), and
        the ESMTP parameters for aiosmtpd to judge. A path that cannot be sent is refused here.
        """
        role, self._address_role = self._address_role, None
        if role is None or not arg:  # VRFY asks too; an empty path is aiosmtpd's syntax error
            parsed: tuple[str | None, str | None] = super()._getaddr(arg)
            return parsed
        # aiosmtpd reads MAIL's parameters only after the path, so SMTPUTF8 is read from them (in
        # _read_argument); a recipient goes by what the transaction's MAIL declared.
        assert self.envelope is not None
        recipient = role is Role.RECIPIENT
        if recipient and self.settings.postmaster is not None:
            arg = _to_postmaster(arg, self.settings.postmaster)
        read = _read_argument(arg, recipient, recipient and bool(self.envelope.smtp_utf8))
        if isinstance(read, str):
            raise SmtpRefusal(read)
        return read

    # -- AUTH (RFC 4954) -------------------------------------------------------------------------------

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str) -> None:
        # RFC 4954 4: "An AUTH command issued during a mail transaction MUST be rejected with a 503 reply"
        # (aiosmtpd took it: a transaction half unauthenticated, its MAIL, and half authenticated).
        if self.envelope is not None and self.envelope.mail_from is not None:
            await self.push("503 5.5.1 Error: MAIL transaction in progress")
            return
        if not self._auth_methods:
            # No [[smtp.users]]: AUTH is not offered at all, and no TLS would change that (aiosmtpd answered
            # 538 "encryption required" before it looked). Postfix's words for it.
            await self.push("503 5.5.1 Error: authentication not enabled")
            return
        await super().smtp_AUTH(arg)

    def _take_credentials(
        self, server: SMTP, session: Session, envelope: SmtpEnvelope, mechanism: str, data: Any
    ) -> AuthResult:
        # aiosmtpd's PLAIN and LOGIN parse the exchange and call this synchronously. scrypt costs tens of
        # milliseconds of CPU by design, too long for the event loop: the check runs in a thread below.
        self._offered = data
        return AuthResult(success=False, handled=True)

    async def auth_PLAIN(self, server: SMTP, args: list[str]) -> AuthResult:
        # aiosmtpd 1.4.6's auth_PLAIN step for step and reply for reply, but that it keeps the
        # authorization identity, which aiosmtpd splits off and drops ("currently ignored").
        response: object
        if len(args) == 1:
            response = await self.challenge_auth("")  # answers '*' and bad base64 itself (MISSING)
        else:
            try:
                response = base64.b64decode(args[1].encode(), validate=True)
            except ValueError:  # binascii.Error, or a UnicodeEncodeError from a non-ASCII argument
                await self.push("501 5.5.2 Can't decode base64")
                response = MISSING
        if response is MISSING:
            return AuthResult(success=False, handled=True)
        assert isinstance(response, bytes)
        try:
            # RFC 4616 2: message = [authzid] UTF8NUL authcid UTF8NUL passwd
            authzid, login, password = response.split(b"\x00")
        except ValueError:
            await self.push("501 5.5.2 Can't split auth value")
            return AuthResult(success=False, handled=True)
        # RFC 4616 2: "If the authorization identity (authzid) is provided and the client is not
        # permitted to act as it, the server MUST fail the exchange" (aiosmtpd logged the client in as
        # the authcid, whatever it asked to act as). postmux lets no user act as another, so an authzid
        # other than none or the authcid itself (octet for octet) fails as a wrong password does: 535
        # after the delay, counted in every budget (LoginGuard.check).
        authorized = authzid in (b"", login)
        return await self._check_offered(
            self._authenticate("PLAIN", LoginPassword(login, password)), authorized
        )

    async def auth_LOGIN(self, server: SMTP, args: list[str]) -> AuthResult:
        return await self._check_offered(await super().auth_LOGIN(server, args))

    async def _check_offered(self, parsed: AuthResult, authorized: bool = True) -> AuthResult:
        """The credentials _take_credentials was handed, checked; `authorized` False fails them anyway."""
        offered, self._offered = self._offered, None
        if offered is None:
            # The exchange itself failed (bad base64, '*'): aiosmtpd has answered it already.
            return AuthResult(success=False, handled=True)
        name = offered.login.decode("utf-8", "replace")
        outcome = await self.logins.check(self.client_ip, name, offered.password, authorized=authorized)
        if outcome is LoginOutcome.OK:
            log.info("client authenticated", client=self.client_ip, user=name)
            return AuthResult(success=True, auth_data=name)
        if outcome is LoginOutcome.ADDRESS_THROTTLED:
            # Across connections (anvil.py): this address has failed too often; more guessing is not heard.
            self._hang_up(ADDRESS_THROTTLED.format(hostname=self.hostname))
            return AuthResult(success=False, handled=True)
        if outcome is LoginOutcome.USER_THROTTLED:
            return AuthResult(success=False, handled=False, message=USER_THROTTLED)
        self.failed_logins += 1
        log.warning(
            "authentication failed",
            client=self.client_ip,
            user=name,
            failures=self.failed_logins,
            **({} if authorized else {"reason": "authorization identity is not the user (RFC 4616 2)"}),
        )
        # A pause before each "no" makes guessing slow; a client that keeps guessing is shown the door.
        await asyncio.sleep(self.settings.auth_failure_delay)
        if self.failed_logins >= self.settings.max_auth_failures:
            await SMTP.push(self, _INVALID_CREDENTIALS)
            self._hang_up(f"421 4.7.0 {self.hostname} Error: too many failed authentications")
            return AuthResult(success=False, handled=True)
        return AuthResult(success=False, handled=False, message=_INVALID_CREDENTIALS)


_INVALID_CREDENTIALS = "535 5.7.8 Authentication credentials invalid"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
# RFC 4954 6: 454 4.7.0 is a temporary authentication failure; the session goes on.
USER_THROTTLED = "454 4.7.0 Too many failed authentications for this user, try again later"
ADDRESS_THROTTLED = (
    "421 4.7.0 {hostname} Error: too many failed authentications from your address, try again later"
)


class IngressHandler:
    """aiosmtpd hooks: relay policy and the suppression list at RCPT, the durable accept at the final dot."""

    def __init__(
        self,
        settings: SmtpSettings,
        acceptor: Accepts,
        suppressions: SuppressionList | None = None,
        return_domains: Collection[str] = (),
    ) -> None:
        self.settings = settings
        self.acceptor = acceptor
        # None in an ingress worker (ingress/workers.py), which has no list: the main process's accept
        # drops what it would have refused, with a Suppressed event (Acceptor.accept).
        self.suppressions = suppressions
        # [verp]'s return-path domain: postmux's own destination, whose mail (DSNs, complaint reports)
        # comes from anywhere and is taken, not relayed.
        self.return_domains = frozenset(d.lower() for d in return_domains)
        self.trusted_networks = settings.trusted()
        # Whether a client address may relay, asked at every RCPT: ipaddress parses the address each time
        # (3.5 µs), for an answer that depends on the address string alone. Bounded, so a client with many
        # addresses (an IPv6 prefix) cannot make it grow.
        self.trusts: Callable[[str], bool] = functools.lru_cache(maxsize=4096)(
            functools.partial(is_trusted, networks=tuple(self.trusted_networks))
        )
        self.logins = LoginGuard(settings)  # shared by the listener's sessions, like ConnectionLimits
        self.proxy_trusted = tuple(settings.proxies())  # who may name the client ([smtp] proxy_protocol)

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, SmtpRefusal):
            return error.reply
        if isinstance(error, TLSSetupException):
            # The client's doing (it hung up or spoke no TLS after STARTTLS): aiosmtpd closes the
            # connection and sends nothing; a traceback per such client would only flood the log.
            log.info("TLS handshake failed", error=repr(error.__cause__))
            return "454 4.7.0 TLS not available due to temporary reason"
        # Never a traceback or an exception's text to the client: they are for the log.
        log.exception("smtp session error", error=repr(error))
        return LOCAL_ERROR

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: SmtpEnvelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        offered = [r for r in responses[:-1] if r.strip() != "250-AUTH"]  # AUTH with no mechanism left
        # aiosmtpd reads pipelined commands in order but does not advertise it (RFC 2920); every reply
        # but the greeting and this one carries an enhanced status code (RFC 2034, `enhanced`).
        return [*offered, "250-PIPELINING", "250-ENHANCEDSTATUSCODES", responses[-1]]

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: SmtpEnvelope, address: str, mail_options: list[str]
    ) -> str:
        # What aiosmtpd does without this hook, with the enhanced code its "250 OK" lacks (RFC 3463 X.1.0).
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: SmtpEnvelope, address: str, rcpt_options: list[str]
    ) -> str:
        returned = self._returned(address)
        if envelope.rcpt_tos and self._returned(envelope.rcpt_tos[0]) != returned:
            # Returned mail is taken here, other mail is queued: one or the other per transaction. A 452
            # makes the client send the rest in another (RFC 5321 4.5.3.1.10).
            return "452 4.5.3 Mail to the return-path domain goes in a transaction of its own"
        if (
            not returned
            and address != self.settings.postmaster  # RFC 5321 4.5.1: postmaster takes mail from anyone
            and not (session.authenticated or self.trusts(_peer_ip(session)))
        ):
            # RFC 5321 3.6.2 / 7.1: an open relay is a spam source; only trusted or logged-in clients relay.
            return f"554 5.7.1 <{address}>: Relay access denied"
        mailbox = mailbox_key(address)
        assert isinstance(envelope, TextEnvelope)
        if mailbox in envelope.mailboxes:
            # The same mailbox again (a domain is case-insensitive, RFC 5321 2.4): taken, and sent once, as
            # Postfix's cleanup does; a receiver that does not drop duplicates would deliver it twice.
            return "250 2.1.5 Ok"
        if len(envelope.rcpt_tos) >= self.settings.max_recipients:
            return TOO_MANY_RECIPIENTS
        if self.suppressions is not None:
            # Refused alone: the message's other recipients carry on (RFC 5321 3.3: RCPT by RCPT).
            found = self.suppressions.refusal(address, envelope.mail_from or "")
            if found is not None:
                return found.smtp_reply()
        envelope.rcpt_tos.append(address)
        envelope.mailboxes.add(mailbox)
        return "250 2.1.5 Ok"

    def _returned(self, address: str) -> bool:
        return (
            bool(self.return_domains)
            and address.rpartition("@")[2].lower().rstrip(".") in self.return_domains
        )

    async def handle_DATA(self, server: SMTP, session: Session, envelope: SmtpEnvelope) -> str:
        if not envelope.rcpt_tos:
            return "554 5.5.1 No valid recipients"
        # BlockDataSMTP read the text and looked at every octet of it on the way (ingress/data.py).
        assert isinstance(envelope, TextEnvelope) and envelope.text is not None
        text = envelope.text
        refusal = text_refusal(
            nul=text.nul, bare=text.bare, normalize=self.settings.line_endings == "normalize"
        )
        if refusal is not None:
            log.warning("message refused", client=_peer_ip(session), reply=refusal)
            return refusal
        if text.received >= self.settings.max_hops:
            return HOPS_EXCEEDED
        message = self._envelope(session, envelope, text)
        # From here the text's file (if any) is the spool's, whatever accept does (Spool.store); until
        # here any refusal or failure leaves it to BlockDataSMTP, which deletes it.
        text.hand_over()
        try:
            # Shielded: a client that hangs up (or times out) while the spool commits must not cancel a
            # store that may already be durable; the message is then delivered, never half-stored.
            queue_id = await asyncio.shield(self.acceptor.accept(message))
        except AcceptRefused as e:
            # Before any 250 (RFC 5321 4.2.5: the reply to the final dot is the one that counts); nothing
            # was stored.
            return e.reply
        except SpoolError as e:
            log.error("spool refused a message", error=str(e), disk_full=e.disk_full)
            if e.disk_full:
                return NO_STORAGE
            return LOCAL_ERROR
        except Exception:
            log.exception("accept failed")
            return LOCAL_ERROR
        return f"250 2.0.0 Ok: queued as {queue_id}"

    def _envelope(self, session: Session, envelope: SmtpEnvelope, text: DataText) -> Envelope:
        sender = envelope.mail_from or ""
        # RFC 3848: ESMTPS with TLS, ESMTPA after AUTH, ESMTPSA with both.
        protocol = "ESMTP" if session.extended_smtp else "SMTP"
        if session.extended_smtp:
            protocol += ("S" if session.ssl is not None else "") + ("A" if session.authenticated else "")
        return Envelope(
            sender="" if sender == "<>" else sender,  # the null reverse-path (RFC 5321 4.5.5)
            recipients=tuple(envelope.rcpt_tos),
            data=text.content,
            tail=text.tail,
            clean=text.clean,
            client_ip=_peer_ip(session),
            smtputf8="SMTPUTF8" in (o.upper() for o in envelope.mail_options),
            helo=session.host_name or "",
            protocol=protocol,
            auth_user=str(session.auth_data) if session.authenticated else "",
        )


def tls_context(settings: SmtpSettings) -> ssl.SSLContext | None:
    if settings.tls is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)  # TLS 1.2 at least, no client certs
    context.load_cert_chain(settings.tls.cert_file, settings.tls.key_file)
    return context


async def start_smtp_server(
    settings: SmtpSettings,
    acceptor: Accepts,
    sock: socket.socket | None = None,
    *,
    limits: ConnectionLimits | None = None,
    spill_dir: Path | None = None,
    refused: Callable[[str], None] | None = None,
    suppressions: SuppressionList | None = None,
    return_domains: Collection[str] = (),
) -> asyncio.Server:
    """Listen on [smtp] listen, or on `sock` (an ingress worker's inherited listening socket).

    `limits` is for a caller that watches the open connections (tests); by default the listener has its own.
    `spill_dir` is where a text past [smtp] spill_bytes is written (the spool's spill directory, on its
    filesystem, so the spool takes the file over with a rename); None keeps every text in memory.
    """
    handler = IngressHandler(settings, acceptor, suppressions, return_domains)
    limits = limits or ConnectionLimits(
        settings.max_connections, settings.max_connections_per_ip, settings.hostname
    )
    context = tls_context(settings)
    host, port = split_hostport(settings.listen)

    def factory() -> PostmuxSMTP:
        return PostmuxSMTP(handler, settings, limits, context, spill_dir, refused)

    loop = asyncio.get_running_loop()
    # create_server calls listen() on `sock` too: without the backlog it would be cut back to asyncio's 100.
    backlog = settings.listen_backlog
    if sock is not None:
        return await loop.create_server(factory, sock=sock, backlog=backlog)
    return await loop.create_server(factory, host=host, port=port, reuse_address=True, backlog=backlog)
