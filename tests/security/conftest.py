"""A postmux in front of one recording upstream, with [smtp] keys chosen by each test."""

from __future__ import annotations

import sqlite3
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import trustme

from postmux.app import App
from tests.support import Upstream, make_settings

StartGateway = Callable[..., Awaitable[App]]


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[StartGateway]:
    """start(**smtp_keys) -> a running App whose one member is app.upstream; all stopped at the end."""
    async with AsyncExitStack() as stack:

        async def start(**smtp: Any) -> App:
            up = await Upstream("up").start()
            stack.push_async_callback(up.stop)
            settings = make_settings(
                tmp_path, [{"name": "default", "members": [{"name": "up", "address": up.address}]}], smtp=smtp
            )
            app = await stack.enter_async_context(App(settings))
            app.upstream = up  # type: ignore[attr-defined]
            return app

        yield start


def stored(tmp_path: Path) -> int:
    """Messages in the spool right now (delivered ones are removed, so pair this with upstream.received)."""
    with sqlite3.connect(tmp_path / "spool.db") as db:
        return int(db.execute("SELECT count(*) FROM message").fetchone()[0])


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_files(ca: trustme.CA, tmp_path: Path) -> dict[str, str]:
    """[smtp.tls] keys for a certificate of postmux.test that `client_tls` trusts."""
    cert = ca.issue_cert("postmux.test")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    for i, pem in enumerate(cert.cert_chain_pems):
        pem.write_to_path(str(cert_file), append=i > 0)
    cert.private_key_pem.write_to_path(str(key_file))
    return {"cert_file": str(cert_file), "key_file": str(key_file)}


@pytest.fixture
def client_tls(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context
