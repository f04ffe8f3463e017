from __future__ import annotations

import os
import sys

# Tests run against the source tree even when the package is not installed in editable mode.
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))


from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from tests.support import Behaviour, Upstream, accept

StartUpstream = Callable[..., Awaitable[Upstream]]


@pytest.fixture
async def upstream() -> AsyncIterator[StartUpstream]:
    """Start upstream SMTP servers that are stopped (sockets closed) even when the test fails."""
    started: list[Upstream] = []

    async def start(name: str = "up", behaviour: Behaviour = accept, **options: Any) -> Upstream:
        up = await Upstream(name, behaviour, **options).start()
        started.append(up)
        return up

    yield start
    for up in started:
        await up.stop()
