"""PostmuxSMTP's cached method listing must give aiosmtpd exactly the tables it builds by itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from postmux.ingress.smtp import ConnectionLimits, IngressHandler, PostmuxSMTP
from postmux.passwords import hash_password
from tests.support import make_settings


class _Uncached(PostmuxSMTP):
    """aiosmtpd's own discovery: every attribute of the object."""

    def __dir__(self) -> list[str]:
        return list(object.__dir__(self))


def _tables(session: PostmuxSMTP) -> tuple[dict[str, Any], set[str], set[str]]:
    commands = {name: method.__func__ for name, method in session._smtp_methods.items()}
    return commands, set(session._auth_methods), set(session._handle_hooks)


async def test_same_command_auth_and_hook_tables_as_aiosmtpd(tmp_path: Path) -> None:
    pools = [{"name": "p", "members": [{"name": "m", "address": "127.0.0.1:2525"}]}]
    # With a user, AUTH PLAIN and LOGIN are offered: the auth_* table is not empty.
    user = {"name": "app", "password_hash": hash_password("pw", n=2**10)}
    settings = make_settings(tmp_path, pools, smtp={"users": [user]})
    handler = IngressHandler(settings.smtp, None)  # type: ignore[arg-type]
    limits = ConnectionLimits(10, 10, "postmux.test")
    reference = _Uncached(handler, settings.smtp, limits, None)
    first = PostmuxSMTP(handler, settings.smtp, limits, None)
    second = PostmuxSMTP(handler, settings.smtp, limits, None)  # served from the class cache
    assert _tables(first) == _tables(reference) == _tables(second)
    assert {"DATA", "MAIL", "RCPT", "EHLO", "AUTH"} <= set(second._smtp_methods)
    assert {"PLAIN", "LOGIN"} <= set(second._auth_methods)
    assert second._smtp_methods["DATA"].__self__ is second  # bound to its own session, not the first
