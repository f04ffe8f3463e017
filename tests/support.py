"""Test helpers: real SMTP servers on loopback, a config builder, wait_until. No mocks.

The upstream server and its behaviours live in `postmux.testing` (the demo and the benches use it too);
they are re-exported here so that tests import every helper from one place.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosmtplib

from postmux.config import Settings, settings_from_dict
from postmux.testing import (
    DROP,
    DROP_AFTER_STORE,
    HANG,
    HANG_LIMIT_S,
    Behaviour,
    Received,
    Upstream,
    accept,
    always,
    delay,
    fail_ratio,
    latency,
)

__all__ = [
    "DROP",
    "DROP_AFTER_STORE",
    "HANG",
    "HANG_LIMIT_S",
    "Behaviour",
    "Farm",
    "Received",
    "StartUpstream",
    "Upstream",
    "accept",
    "always",
    "delay",
    "fail_ratio",
    "free_port",
    "latency",
    "make_settings",
    "message",
    "read_events",
    "send",
    "send_many",
    "wait_until",
]


StartUpstream = Callable[..., Awaitable[Upstream]]  # the `upstream` fixture (tests/conftest.py)


def free_port() -> int:
    """A loopback port with nothing listening on it (connections to it are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def toml_head(
    tmp_path: Path,
    *,
    token: str | None = None,
    retry: str | None = "1s",
    smtp: str = "127.0.0.1:0",
    http: str = "127.0.0.1:0",
) -> str:
    """The sections a test node's TOML file starts with, for tests that reload or run `postmux serve`
    from a file: listeners on loopback, the admin token if any, its own spool and event log, one retry
    interval without jitter (none with `retry=None`). The test writes its pools after it."""
    admin = f'admin_token = "{token}"\n' if token else ""
    retries = f'[retry]\nintervals = ["{retry}"]\njitter = 0\n' if retry else ""
    return (
        f'\n[smtp]\nlisten = "{smtp}"\nhostname = "postmux.test"\n[http]\nlisten = "{http}"\n{admin}'
        f'[spool]\npath = "{tmp_path / "spool.db"}"\n[events]\nlog = "{tmp_path / "events.jsonl"}"\n{retries}'
    )


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
        # A table is merged into the defaults; an array of tables ([[api_key]]) is taken as it is.
        data[key] = value if isinstance(value, list) else {**data.get(key, {}), **value}
    return settings_from_dict(data)


async def zoned_node(
    tmp_path: Path, upstream: StartUpstream, **sections: Any
) -> tuple[Settings, dict[str, Upstream]]:
    """node-a in zone a, round robin over a1 and a2 (zone a) and b1 (zone b), each a real upstream."""
    ups = {n: await upstream(n) for n in ("a1", "a2", "b1")}
    members = [{"name": n, "address": u.address, "zone": n[0]} for n, u in ups.items()]
    pool = {"name": "default", "policy": "round_robin", "members": members}
    return make_settings(tmp_path, [pool], node={"name": "node-a", "zone": "a"}, **sections), ups


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


async def raw_transaction(
    port: int,
    data: bytes,
    *,
    sender: str = "app@example.test",
    recipient: str = "user@dest.test",
    options: str = "",
    helo: str = "client.test",
) -> str:
    """One message over a plain socket, its text sent as given (dot-stuffed here, bare LFs and all: what
    aiosmtplib would repair before sending, ingress must meet); the reply to the end of its data.

    `options`: MAIL's parameters, with their leading space (" SMTPUTF8 BODY=8BITMIME"). Each command before
    the text must be answered 2xx or 3xx.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def reply() -> str:
        while True:
            line = (await asyncio.wait_for(reader.readline(), 10)).decode()
            if line[3:4] != "-":
                return line

    try:
        await reply()
        for command in (
            f"EHLO {helo}\r\n".encode(),
            f"MAIL FROM:<{sender}>{options}\r\n".encode(),
            f"RCPT TO:<{recipient}>\r\n".encode(),
            b"DATA\r\n",
        ):
            writer.write(command)
            assert (await reply())[0] in "23", command
        stuffed = data.replace(b"\n.", b"\n..")
        stuffed = b"." + stuffed if stuffed.startswith(b".") else stuffed
        writer.write(stuffed + (b"" if stuffed.endswith(b"\n") else b"\r\n") + b".\r\n")
        answer = await reply()
        writer.write(b"QUIT\r\n")
        await reply()
    finally:
        writer.close()
        await writer.wait_closed()
    return answer
