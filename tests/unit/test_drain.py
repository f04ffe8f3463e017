"""The one private piece of aiosmtplib that delivery leans on: its protocol's drain (smtp_client._drained).

aiosmtplib 5.x's SMTPProtocol has asyncio's flow control (FlowControlMixin: pause_writing, resume_writing
and `_drain_helper`, the coroutine asyncio's StreamWriter.drain awaits) but no public drain. A tail is
streamed a chunk at a time, each after the connection took the one before; if aiosmtplib drops or changes
this, these fail, before a large message could fill memory with its whole text.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiosmtplib
import pytest
from aiosmtplib.protocol import SMTPProtocol

from postmux.delivery.smtp_client import _drained

MORE_THAN_SOCKETS_BUFFER = 32 << 20  # loopback's send and receive buffers together hold a few MB


class _Sink(asyncio.Protocol):
    """Reads nothing until told to, then throws away what it reads."""

    paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        # Paused after the transport has set itself up: before Python 3.11.3 (Debian 12 ships 3.11.2) the
        # selector transport added its reader after connection_made, undoing a pause made in it.
        asyncio.get_running_loop().call_soon(self._pause)

    def _pause(self) -> None:
        self.transport.pause_reading()
        self.paused = True

    def data_received(self, data: bytes) -> None:
        pass


Connection = tuple[asyncio.WriteTransport, SMTPProtocol, list[_Sink]]


@pytest.fixture
async def connection() -> AsyncIterator[Connection]:
    loop = asyncio.get_running_loop()
    sinks: list[_Sink] = []

    def sink() -> _Sink:
        sinks.append(_Sink())
        return sinks[-1]

    server = await loop.create_server(sink, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport, protocol = await loop.create_connection(lambda: SMTPProtocol(loop=loop), "127.0.0.1", port)
    assert isinstance(transport, asyncio.WriteTransport)
    while not (sinks and sinks[0].paused):  # the receiver reads nothing from the first octet on
        await asyncio.sleep(0.001)
    try:
        yield transport, protocol, sinks
    finally:
        transport.abort()
        server.close()
        for s in sinks:
            s.transport.abort()
        await server.wait_closed()


async def test_aiosmtplib_protocol_drains_as_asyncio_streams_do(connection: Connection) -> None:
    transport, protocol, sinks = connection
    protocol.write(b"x" * MORE_THAN_SOCKETS_BUFFER)
    assert transport.get_write_buffer_size() > 0
    with pytest.raises(TimeoutError):  # paused: the receiver reads nothing
        await asyncio.wait_for(protocol._drain_helper(), 0.2)
    sinks[0].transport.resume_reading()
    await asyncio.wait_for(protocol._drain_helper(), 10)  # resumed once the buffer fell to its low mark
    assert transport.get_write_buffer_size() <= transport.get_write_buffer_limits()[0]


async def test_a_drain_that_outlasts_the_timeout_is_an_smtp_timeout(connection: Connection) -> None:
    _, protocol, _ = connection
    await _drained(protocol, 0.1)  # nothing written: nothing to wait for
    protocol.write(b"x" * MORE_THAN_SOCKETS_BUFFER)
    with pytest.raises(aiosmtplib.SMTPTimeoutError):
        await _drained(protocol, 0.2)
