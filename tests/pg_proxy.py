"""A loopback TCP proxy in front of the test PostgreSQL, to break the link deterministically.

- `freeze()` / `thaw()`: the link stalls (a dead path, a frozen host: no RST): bytes are read but not
  passed on, either way, until thawed; then they go, in order.
- `cut_after_commit(mark)`: in the first transaction whose client bytes carry `mark`, the COMMIT is
  passed to the server and the server's answer awaited, then the client's socket is aborted: the server
  committed, the client never hears it (a connection dropped mid-commit).

Only 127.0.0.1; the server itself is never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit, urlunsplit


class PgProxy:
    def __init__(self, server_dsn: str) -> None:
        self.server_dsn = server_dsn
        parts = urlsplit(server_dsn)
        self._target = (parts.hostname or "127.0.0.1", parts.port or 5432)
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._mark: bytes | None = None
        self.cuts = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def dsn(self) -> str:
        """The server's DSN with this proxy as host and port."""
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        parts = urlsplit(self.server_dsn)
        netloc = parts.netloc.rsplit("@", 1)
        host = f"127.0.0.1:{port}"
        return urlunsplit((parts.scheme, f"{netloc[0]}@{host}" if len(netloc) == 2 else host, *parts[2:]))

    async def start(self) -> PgProxy:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return self

    async def stop(self) -> None:
        self._flowing.set()
        if self._server is not None:
            self._server.close()
        for w in self._writers:
            w.transport.abort()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def freeze(self) -> None:
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    def cut_after_commit(self, mark: bytes) -> None:
        self._mark = mark

    async def _client(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        s_reader, s_writer = await asyncio.open_connection(*self._target)
        self._writers |= {c_writer, s_writer}
        cut = asyncio.Event()
        up = asyncio.create_task(self._upstream(c_reader, s_writer, c_writer, cut))
        down = asyncio.create_task(self._downstream(s_reader, c_writer, s_writer, cut))
        self._tasks |= {up, down}
        await asyncio.gather(up, down, return_exceptions=True)
        self._tasks -= {up, down}

    async def _upstream(
        self,
        reader: asyncio.StreamReader,
        to_server: asyncio.StreamWriter,
        to_client: asyncio.StreamWriter,
        cut: asyncio.Event,
    ) -> None:
        transaction = b""
        try:
            while chunk := await reader.read(65536):
                await self._flowing.wait()
                if b"BEGIN" in chunk:
                    transaction = b""
                transaction += chunk
                if self._mark is not None and b"COMMIT" in chunk and self._mark in transaction:
                    self._mark = None
                    cut.set()  # the answer to this COMMIT goes nowhere, and the client is cut off
                to_server.write(chunk)
                await to_server.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            # What the client sent before it went is passed on first (once thawed), then the server
            # sees the connection end, and rolls back whatever was not committed.
            await self._flowing.wait()
            with contextlib.suppress(Exception):
                to_server.close()
            if not cut.is_set():
                to_client.transport.abort()

    async def _downstream(
        self,
        reader: asyncio.StreamReader,
        to_client: asyncio.StreamWriter,
        to_server: asyncio.StreamWriter,
        cut: asyncio.Event,
    ) -> None:
        try:
            while chunk := await reader.read(65536):
                await self._flowing.wait()
                if cut.is_set():
                    self.cuts += 1
                    to_client.transport.abort()
                    to_server.transport.abort()
                    return
                to_client.write(chunk)
                await to_client.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            to_client.transport.abort()
