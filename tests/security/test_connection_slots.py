"""A connection slot is held only while its client is there (issue 10 B4).

postmux serves on uvloop (cli.py, ingress workers) and the test suite runs on asyncio's own loop: the two
deliver a client's EOF in different orders, so each test here runs on both.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop

from postmux.envelope import Envelope
from postmux.ingress.smtp import ConnectionLimits, start_smtp_server
from tests.security.client import RawClient
from tests.support import make_settings, wait_until

POOLS = [{"name": "default", "members": [{"name": "up", "address": "127.0.0.1:9"}]}]
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}
SOURCES = [f"127.0.0.{i}" for i in range(10, 22)]  # a dozen client addresses


class _NoMail:
    """These clients never reach DATA."""

    async def accept(self, envelope: Envelope) -> str:
        raise AssertionError("no message is sent in these tests")


def _run(loop: str, scenario: Coroutine[Any, Any, None]) -> None:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(scenario)


async def _leave(port: int, source: str, how: int) -> None:
    """Connect and go away: at once, after the greeting, in the middle of a command, or by half-closing."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    if how >= 1:
        await reader.readline()
    if how == 2:
        writer.write(b"EHLO client.te")
    if how == 3:
        # Shut down only the sending side and keep reading: the server must close its side at once.
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), timeout=2.0) == b""
    writer.close()
    await writer.wait_closed()


async def _flood_then_greet(tmp_path: Path, rounds: int) -> None:
    settings = make_settings(tmp_path, POOLS, smtp={"max_connections": 24, "max_connections_per_ip": 4})
    limits = ConnectionLimits(24, 4, "postmux.test")
    server = await start_smtp_server(settings.smtp, _NoMail(), limits=limits)
    port = int(server.sockets[0].getsockname()[1])
    try:
        for _ in range(rounds):  # each round: every source at its per-address limit, twice the total
            await asyncio.gather(*(_leave(port, source, how) for source in SOURCES for how in range(4)))
        started = time.monotonic()
        client = await RawClient.connect(port)
        assert client.greeting == "220 postmux.test postmux"
        assert time.monotonic() - started < 1.0
        await client.close()
        await wait_until(lambda: limits.open.total() == 0, timeout=2.0)
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(), timeout=5.0)


@pytest.mark.parametrize("loop", list(LOOPS))
def test_clients_that_go_away_give_their_slots_back_at_once_so_the_next_is_greeted(
    tmp_path: Path, loop: str
) -> None:
    _run(loop, _flood_then_greet(tmp_path, rounds=5))
