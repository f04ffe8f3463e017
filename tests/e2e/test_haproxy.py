"""A real HAProxy (Debian's package) before two postmux nodes: PROXY protocol v1 to one, v2 to the other.

The configuration has docs/deployment.md's shape, on loopback: `mode tcp`, `send-proxy` and
`send-proxy-v2`, health checks with `option smtpchk` (they carry a header too: v1 UNKNOWN, v2 LOCAL).
Clients connect from 127.0.0.2 and 127.0.0.3; HAProxy connects to the nodes from 127.0.0.1. The events
must name the clients.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from postmux.app import App
from tests.support import StartUpstream, free_port, make_settings, read_events, send, wait_until

CLIENTS = ("127.0.0.2", "127.0.0.3")
OUTSIDER = "127.0.0.4"  # not in trusted_networks, though HAProxy's own 127.0.0.1 is


def haproxy_binary() -> str | None:
    # Debian installs it in /usr/sbin, which is not on every user's PATH.
    return shutil.which("haproxy", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin"]))


def haproxy_config(frontend_port: int, node_ports: tuple[int, int], stats: Path) -> str:
    v1, v2 = node_ports
    return f"""
global
    log stderr format raw local0 info
    stats socket {stats} mode 600 level user

defaults
    mode tcp
    log global
    option tcplog
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    # A check's reply may take this long on a busy machine (without it, `inter` bounds the whole check).
    timeout check 5s

frontend smtp
    bind 127.0.0.1:{frontend_port}
    default_backend postmux

backend postmux
    balance roundrobin
    option smtpchk EHLO haproxy.test
    default-server check check-send-proxy inter 300ms fall 3 rise 1
    server node1 127.0.0.1:{v1} send-proxy
    server node2 127.0.0.1:{v2} send-proxy-v2
"""


@asynccontextmanager
async def haproxy(binary: str, cfg: Path, log_path: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """`haproxy -f cfg -db` (foreground) as this test's child, stopped by its PID."""
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            binary, "-f", str(cfg), "-db", stdout=log, stderr=asyncio.subprocess.STDOUT
        )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                os.kill(proc.pid, signal.SIGKILL)
                await proc.wait()


async def frontend_ready(port: int, timeout: float = 10.0) -> None:
    """HAProxy's frontend answers with a node's greeting (so HAProxy is up and a node took the connection)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except ConnectionRefusedError:
            assert time.monotonic() < deadline, "HAProxy never listened"
            await asyncio.sleep(0.05)
            continue
        greeting = await asyncio.wait_for(reader.readline(), 5)
        writer.write(b"QUIT\r\n")
        writer.close()
        await writer.wait_closed()
        if greeting.startswith(b"220 "):
            return
        assert time.monotonic() < deadline, f"no greeting through HAProxy: {greeting!r}"
        await asyncio.sleep(0.05)


async def check_status(stats: Path) -> dict[str, tuple[str, str]]:
    """Each node's (status, last health check's status) from HAProxy's stats socket (`show stat`, CSV)."""
    reader, writer = await asyncio.open_unix_connection(str(stats))
    writer.write(b"show stat\n")
    text = (await asyncio.wait_for(reader.read(), 5)).decode()
    writer.close()
    await writer.wait_closed()
    header, *rows = [line.split(",") for line in text.lstrip("# ").splitlines() if line]
    table = [dict(zip(header, row, strict=False)) for row in rows]
    servers = [r for r in table if r["pxname"] == "postmux" and r["svname"] not in ("FRONTEND", "BACKEND")]
    # "* L7OK": the last check said L7OK and the next one is under way.
    return {r["svname"]: (r["status"], r["check_status"].removeprefix("* ")) for r in servers}


def receptions(path: Path) -> list[dict[str, Any]]:
    return [e for e in read_events(path) if e["type"] == "Reception"]


async def test_events_behind_haproxy_name_the_client_not_haproxy(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    binary = haproxy_binary()
    if binary is None:
        pytest.skip("haproxy is not installed (.ci/run installs Debian's package)")
    up = await upstream("up")
    pools = [{"name": "default", "members": [{"name": "a", "address": up.address}]}]
    smtp = {
        "proxy_protocol": True,
        "proxy_trusted": ["127.0.0.1/32"],
        "trusted_networks": ["127.0.0.1/32", *(f"{c}/32" for c in CLIENTS)],
    }
    async with AsyncExitStack() as stack:
        nodes: list[App] = []
        for name in ("node1", "node2"):
            home = tmp_path / name
            home.mkdir()
            settings = make_settings(home, pools, smtp={**smtp, "hostname": f"{name}.test"})
            nodes.append(await stack.enter_async_context(App(settings)))
        port = free_port()
        cfg = tmp_path / "haproxy.cfg"
        stats = tmp_path / "haproxy.sock"
        cfg.write_text(haproxy_config(port, (nodes[0].smtp_port, nodes[1].smtp_port), stats))
        log_path = tmp_path / "haproxy.log"
        proxy = await stack.enter_async_context(haproxy(binary, cfg, log_path))
        await frontend_ready(port)

        # Round robin alternates the nodes; the clients alternate in pairs, so each node has both.
        sent = [(f"m{i}", CLIENTS[i // 2 % 2]) for i in range(12)]
        for test_id, client in sent:
            assert (await send(port, test_id, source_address=client)).startswith("2.0.0 Ok: queued as")
        outsider = aiosmtplib.SMTP(
            hostname="127.0.0.1",
            port=port,
            local_hostname="client.test",
            start_tls=False,
            source_address=(OUTSIDER, 0),
        )
        await outsider.connect()
        await outsider.mail("app@example.com")
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
            await outsider.rcpt("user@dest.test")
        assert refused.value.code == 554  # relay judged by 127.0.0.4, not by HAProxy's 127.0.0.1
        await outsider.quit()

        await wait_until(lambda: len(up.received) == len(sent))
        events = [tmp_path / name / "events.jsonl" for name in ("node1", "node2")]
        await wait_until(lambda: sum(len(receptions(p)) for p in events) == len(sent))
        # HAProxy's checks (every 300 ms) carry a header too (v1 UNKNOWN, v2 LOCAL) and get a 250 to EHLO.
        deadline = time.monotonic() + 10
        while (status := await check_status(stats)) != {"node1": ("UP", "L7OK"), "node2": ("UP", "L7OK")}:
            assert time.monotonic() < deadline, status
            await asyncio.sleep(0.1)
        assert proxy.returncode is None

    per_node = [receptions(p) for p in events]
    assert [{e["client"] for e in node} for node in per_node] == [set(CLIENTS)] * 2  # over v1, over v2
    by_id = {e["message_id"]: e["client"] for node in per_node for e in node}
    assert by_id == {f"{test_id}@example.com": client for test_id, client in sent}
    assert Counter(by_id.values()) == {"127.0.0.2": 6, "127.0.0.3": 6}  # and never HAProxy's 127.0.0.1
    haproxy_log = log_path.read_text()
    assert "is DOWN" not in haproxy_log, haproxy_log
    assert "node1" in haproxy_log and "node2" in haproxy_log  # tcplog lines name the node each client got
