"""A postmux in front of one recording upstream, with [smtp] keys chosen by each test."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest

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
