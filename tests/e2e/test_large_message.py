"""A 50 MB message through `postmux serve`: delivered byte for byte, and postmux's memory stays flat.

Issue 12: "a 50 MB message does not cost 50 MB more than once in RAM"; shown here as peak RSS (VmHWM of
postmux and of its ingress workers) growing by less than 10 MB while it passes. Ingress writes the text
to a file as it arrives ([smtp] spill_bytes), the spool adopts that file, delivery streams it.

The upstream is a plain aiosmtpd server in the test process (without aiosmtpd's default 32 MiB limit),
which keeps a digest of what it received.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import sys
from pathlib import Path

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from tests.support import wait_until

SRC = Path(__file__).resolve().parents[2] / "src"
LISTENING = re.compile(r"postmux: smtp on port (\d+), http on port (\d+)")
SIZE = 50 * 1024 * 1024
RSS_GROWTH_LIMIT_KB = 10 * 1024
RECEIVED_HEADER = re.compile(rb"Received: [^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*")


def big_text(size: int) -> bytes:
    """Header, then lines of varied length, some starting with a dot (stuffed on the wire), to `size`."""
    head = (
        b"From: app@example.com\r\nTo: user@dest.test\r\nSubject: large\r\n"
        b"Message-ID: <big@example.com>\r\n\r\n"
    )
    block = b"".join(
        (b"." if i % 97 == 0 else b"") + (b"%06d " % i) + b"abcdefghij" * (i % 9) + b"\r\n"
        for i in range(4096)
    )
    body = block * ((size - len(head)) // len(block) + 1)
    return head + body[: size - len(head) - 2] + b"\r\n"


class DigestHandler:
    def __init__(self) -> None:
        self.digests: list[tuple[int, str, bytes]] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        # Take the Received field postmux prepends off, so what is left must be what the client sent.
        stripped = RECEIVED_HEADER.sub(b"", content, count=1)
        self.digests.append((len(stripped), hashlib.sha256(stripped).hexdigest(), content[:300]))
        return "250 OK"


def vm_hwm_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


async def smtp_send(port: int, text: bytes) -> str:
    """A plain SMTP client that streams the dot-stuffed text, so the test's own memory holds it once."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def reply() -> str:
        lines = []
        while True:
            line = (await reader.readline()).decode()
            lines.append(line)
            if line[3:4] != "-":
                return "".join(lines)

    try:
        assert (await reply()).startswith("220")
        for command in (
            b"EHLO client.test",
            b"MAIL FROM:<app@example.com>",
            b"RCPT TO:<user@dest.test>",
            b"DATA",
        ):
            writer.write(command + b"\r\n")
            answer = await reply()
            assert answer[0] in "23", (command, answer)
        step = 1 << 20
        for start in range(0, len(text), step):
            part = text[start : start + step]
            # RFC 5321 4.5.2; every line of big_text ends with CRLF, so a dot follows "\r\n" or starts it.
            stuffed = part.replace(b"\r\n.", b"\r\n..")
            if part.startswith(b".") and (start == 0 or text[start - 2 : start] == b"\r\n"):
                stuffed = b"." + stuffed
            writer.write(stuffed)
            await writer.drain()
        writer.write(b".\r\n")
        answer = await reply()
        writer.write(b"QUIT\r\n")
        return answer
    finally:
        writer.close()


@pytest.mark.parametrize("workers", [0, 2], ids=["in-process", "2-ingress-workers"])
async def test_a_50_mb_message_is_delivered_byte_identical_with_flat_memory(
    tmp_path: Path, workers: int
) -> None:
    handler = DigestHandler()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="up.test", data_size_limit=None, decode_data=False), "127.0.0.1", 0
    )
    up_port = server.sockets[0].getsockname()[1]
    cfg = tmp_path / "postmux.toml"
    cfg.write_text(
        f"""
[smtp]
listen = "127.0.0.1:0"
hostname = "postmux.test"
workers = {workers}
max_message_size = {SIZE + (1 << 20)}
[http]
listen = "127.0.0.1:0"
[spool]
path = "{tmp_path / "spool.db"}"
[events]
log = "{tmp_path / "events.jsonl"}"
[delivery]
data_timeout = "60s"
[[pool]]
name = "default"
members = [{{ name = "a", address = "127.0.0.1:{up_port}" }}]
"""
    )
    log_path = tmp_path / "postmux.log"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "postmux", "serve", "-c", str(cfg), stderr=log, env=env
        )
    try:
        await wait_until(lambda: LISTENING.search(log_path.read_text(errors="replace")) is not None, 30)
        match = LISTENING.search(log_path.read_text())
        assert match is not None
        port = int(match.group(1))
        small = big_text(200_000)  # warms every path up (imports, buffers) before the baseline
        assert (await smtp_send(port, small)).startswith("250")
        await wait_until(lambda: len(handler.digests) == 1, 30)
        pids = [proc.pid, *children(proc.pid)]
        assert len(pids) == 1 + workers
        before = {pid: vm_hwm_kb(pid) for pid in pids}

        text = big_text(SIZE)
        answer = await smtp_send(port, text)
        assert answer.startswith("250"), answer
        await wait_until(lambda: len(handler.digests) == 2, 120)
        after = {pid: vm_hwm_kb(pid) for pid in pids}

        size, digest, head = handler.digests[1]
        assert head.startswith(b"Received: ")
        assert (size, digest) == (len(text), hashlib.sha256(text).hexdigest())
        growth = {pid: after[pid] - before[pid] for pid in pids}
        print("RSS growth KB", growth)
        assert all(g < RSS_GROWTH_LIMIT_KB for g in growth.values()), growth
        bodies = tmp_path / "spool.db.bodies"
        await wait_until(lambda: not [p for p in bodies.rglob("*") if p.is_file()], 10)  # all removed
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        server.close()
