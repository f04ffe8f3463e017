"""A raw SMTP client for security tests: it writes exactly the bytes given and reads whole replies."""

from __future__ import annotations

import asyncio
import contextlib
import ssl


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, greeting: str) -> None:
        self.reader, self.writer, self.greeting = reader, writer, greeting

    @classmethod
    async def connect(cls, port: int, host: str = "127.0.0.1", local_addr: str | None = None) -> RawClient:
        reader, writer = await asyncio.open_connection(
            host, port, local_addr=(local_addr, 0) if local_addr else None
        )
        client = cls(reader, writer, "")
        client.greeting = await client.reply()
        return client

    async def reply(self, timeout: float = 5.0) -> str:
        """One whole reply; a multi-line reply's lines joined with newlines. "" when the server hung up."""
        lines: list[str] = []
        while True:
            raw = await asyncio.wait_for(self.reader.readline(), timeout)
            if not raw:
                return "\n".join(lines)
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(line)
            if len(line) < 4 or line[3] != "-":
                return "\n".join(lines)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def cmd(self, line: bytes | str) -> str:
        """Send one line (CRLF added to a str) and return the reply."""
        await self.send(line.encode() + b"\r\n" if isinstance(line, str) else line)
        return await self.reply()

    async def ehlo_mail_rcpt(self, sender: str = "app@example.com", rcpt: str = "user@dest.test") -> None:
        assert (await self.cmd("EHLO client.test")).startswith("250")
        assert (await self.cmd(f"MAIL FROM:<{sender}>")).startswith("250")
        assert (await self.cmd(f"RCPT TO:<{rcpt}>")).startswith("250")

    async def start_tls(self, context: ssl.SSLContext, server_hostname: str = "postmux.test") -> None:
        await self.writer.start_tls(context, server_hostname=server_hostname)

    async def closed(self, timeout: float = 5.0) -> bool:
        """True once the server has closed the connection (reads EOF), discarding anything before it."""
        try:
            while await asyncio.wait_for(self.reader.read(4096), timeout):
                pass
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionResetError, BrokenPipeError, ssl.SSLError):
            await self.writer.wait_closed()
