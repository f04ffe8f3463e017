"""PostmuxSMTP's cached method listing and handler tables must give aiosmtpd exactly what it builds itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, Session, auth_mechanism
from aiosmtpd.smtp import Envelope as SmtpEnvelope

from postmux.config import SmtpSettings
from postmux.ingress.smtp import ConnectionLimits, IngressHandler, PostmuxSMTP
from postmux.passwords import hash_password
from tests.support import make_settings


class _Uncached(PostmuxSMTP):
    """aiosmtpd's own discovery: every attribute of the object, and the handler searched by SMTP.__init__."""

    _hooks_found_once = False

    def __dir__(self) -> list[str]:
        return list(object.__dir__(self))


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


async def test_the_handler_is_searched_once_for_all_its_sessions(tmp_path: Path) -> None:
    """aiosmtpd searches the handler (dir, getmembers, signature) in each session's constructor."""
    settings = _smtp_settings(tmp_path, users=False)
    handler = _SearchedHandler(settings)
    limits = ConnectionLimits(10, 10, "postmux.test")
    for _ in range(5):
        PostmuxSMTP(handler, settings, limits, None)
    assert handler.searches == 2  # dir() for the hooks, and inspect.getmembers for auth_*
