"""postmux.testing, the loopback upstream the suite, the demo and the benches share (docs/testing.md)."""

from __future__ import annotations

import asyncio
import random
import re
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from postmux.testing import Upstream, accept, always, latency
from tests.support import StartUpstream

GUIDE = Path(__file__).parents[2] / "docs" / "testing.md"


async def send_direct(up: Upstream, body: str, count: int = 1) -> list[str]:
    """Send `count` messages straight to the upstream over one session; returns the replies to DATA."""
    replies = []
    async with aiosmtplib.SMTP(
        hostname="127.0.0.1", port=up.port, local_hostname="client.test", start_tls=False
    ) as client:
        for _ in range(count):
            try:
                await client.sendmail("app@example.com", ["user@dest.test"], body)
                replies.append("250")
            except aiosmtplib.SMTPResponseException as e:
                replies.append(f"{e.code} {e.message}")
    return replies


async def test_the_example_in_the_testing_guide_runs(tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), re.S)
    assert blocks, "docs/testing.md lost its example"
    namespace: dict[str, Any] = {}
    exec(compile(blocks[0], str(GUIDE), "exec"), namespace)
    await namespace["test_a_flaky_relay_still_gets_every_message"](tmp_path)


async def test_an_upstream_greets_with_its_own_name(upstream: StartUpstream) -> None:
    # The resolver guard (tests/conftest.py) fails this test if aiosmtpd looked up this machine's name.
    up = await upstream("relay", hostname="relay.example.test")
    reader, writer = await asyncio.open_connection("127.0.0.1", up.port)
    try:
        greeting = await asyncio.wait_for(reader.readline(), 5)
    finally:
        writer.close()
    assert greeting.startswith(b"220 relay.example.test ")


def test_an_empty_hostname_is_refused_before_aiosmtpd_could_look_one_up() -> None:
    with pytest.raises(ValueError, match="hostname"):
        Upstream("relay", hostname="")


async def test_latency_draws_one_delay_per_message_from_a_seeded_generator(upstream: StartUpstream) -> None:
    draws: dict[str, list[float]] = {"a": [], "b": []}

    def recording(name: str) -> Any:
        def draw(rng: random.Random) -> float:
            draws[name].append(rng.random())
            return 0.001

        return draw

    a = await upstream("a", latency(recording("a"), seed=3))
    b = await upstream("b", latency(recording("b"), seed=3))
    assert await send_direct(a, "Subject: x\r\n\r\nhi\r\n", 3) == ["250"] * 3
    assert await send_direct(b, "Subject: x\r\n\r\nhi\r\n", 3) == ["250"] * 3

    seeded = random.Random(3)
    assert draws["a"] == draws["b"] == [seeded.random() for _ in range(3)]
    assert len(a.received) == 3


async def test_header_values_follow_the_messages_in_the_order_they_came(upstream: StartUpstream) -> None:
    up = await upstream("up", index_headers=["X-Id"])
    for body in (
        "X-Id: one\r\nSubject: 1\r\n\r\n",
        "Subject: 2\r\n\r\nno id\r\n",
        "X-Id: three\r\n\r\n",
    ):
        assert await send_direct(up, body) == ["250"]

    assert up.header_values("X-Id") == ["one", "", "three"]
    assert up.header_values("Subject") == ["1", "2", ""]  # a header not indexed is read on demand
    assert await send_direct(up, "X-Id: four\r\nSubject: 4\r\n\r\n") == ["250"]
    assert up.header_values("X-Id") == ["one", "", "three", "four"]
    assert up.header_values("Subject") == ["1", "2", "", "4"]
    assert up.received[0].header("x-id") == "one"  # header names are case-insensitive (RFC 5322 1.2.2)


async def test_a_behaviour_swapped_while_running_answers_the_next_message(upstream: StartUpstream) -> None:
    up = await upstream("up", accept)
    assert await send_direct(up, "Subject: 1\r\n\r\n") == ["250"]
    up.behaviour = always("451 4.3.0 not now")
    assert await send_direct(up, "Subject: 2\r\n\r\n") == ["451 4.3.0 not now"]
    assert len(up.received) == 1
    assert (up.data_commands, up.peak_active, up.active) == (2, 1, 0)


async def test_an_upstream_used_with_async_with_is_closed_after_the_block() -> None:
    async with Upstream("up") as up:
        assert up.listening
        assert await send_direct(up, "Subject: 1\r\n\r\n") == ["250"]
    assert not up.listening
    with pytest.raises(OSError):
        await asyncio.wait_for(asyncio.open_connection("127.0.0.1", up.port), 5)
