"""SMTP ingress in worker processes: the SMTP work on every core, the spool and delivery in one process.

One Python process runs one core: measured on 2 cores (bench/README.md, profile_hotpath), SMTP parsing in
aiosmtpd is 56-64% of postmux's CPU a message. With `[smtp] workers = N`, the main process binds the
listening socket and starts N workers that inherit it: the kernel hands each new connection to whichever
worker accepts first. A worker speaks SMTP (every check of ingress/smtp.py, AUTH, TLS) and, at the final
dot, sends the envelope to the main process over a socketpair and waits: the main process runs the one accept
path (route, Received header, durable store) and answers with the queue id, and only then does the worker
answer 250. The durability promise is the main process's, unchanged. If the main process dies with messages
sent to it and not answered, the worker ends at once without replying: those messages may have been stored,
so the client must see what it would have seen from a crash (a dropped connection), never a 4xx.

The pipe is a socketpair made before the worker starts, so nothing else can connect to it; frames are a
pickle of our own dataclasses and raw octets after it: a message's text crosses as it is, not pickled.
A worker whose main process is gone (EOF) stops at once, so no 250 can be given without a spool behind
it; a worker that dies is replaced after a second.
Connection limits (`max_connections`, `max_connections_per_ip`) hold per worker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import operator
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import structlog

from postmux.config import SmtpSettings, split_hostport
from postmux.envelope import Envelope
from postmux.heap import settle_heap
from postmux.ingress.acceptor import AcceptRefused, Accepts
from postmux.spool.base import SpoolError

log = structlog.get_logger("postmux.workers")

# A frame is a pickle of plain values, then raw octets (a message's text) that are not pickled: a 100 KB
# text pickled and unpickled cost two more copies and a pass each side, for nothing.
_HEADER = struct.Struct("!II")  # the pickle's length, then the raw octets' length

# An envelope crosses as the tuple of its fields but `data` (which goes as the raw octets), in the order
# Envelope takes them. Not the Envelope itself: pickling a slotted dataclass (copyreg, fields(), a setattr
# a field) and the dataclasses.replace each side cost about 100 µs a message, the tuple 18 (issue 12).
_FIELDS = tuple(f.name for f in fields(Envelope))
assert _FIELDS[2] == "data", "envelope_values and envelope_of put the text third"
_values_of = operator.attrgetter(*(_FIELDS[:2] + _FIELDS[3:]))


def envelope_values(envelope: Envelope) -> tuple[Any, ...]:
    """Every field of `envelope` but its text, for the main process to rebuild it (`envelope_of`)."""
    values: tuple[Any, ...] = _values_of(envelope)
    return values


def envelope_of(values: tuple[Any, ...], data: bytes) -> Envelope:
    """The envelope `envelope_values` gave `values` of, with its text."""
    return Envelope(values[0], values[1], data, *values[2:])


async def _read_frame(reader: asyncio.StreamReader) -> tuple[Any, bytes]:
    """The next frame's object and its raw octets (b"" for a frame that has none)."""
    length, raw_length = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    obj = pickle.loads(await reader.readexactly(length))
    return obj, (await reader.readexactly(raw_length) if raw_length else b"")


def _send(writer: asyncio.StreamWriter, obj: Any, raw: bytes = b"") -> None:
    """Write a frame: `obj` pickled, then `raw` as it is, in one send (uvloop's writelines is one writev,
    so `raw` is not copied to be joined)."""
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    head = _HEADER.pack(len(payload), len(raw)) + payload
    if raw:
        writer.writelines((head, raw))
    else:
        writer.write(head)


def listening_socket(listen: str, backlog: int) -> socket.socket:
    host, port = split_hostport(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)  # [smtp] listen_backlog; each worker's create_server listens with it again
    sock.setblocking(False)
    return sock


# -- the main process's side -------------------------------------------------------------------------


class IngressWorkers:
    """Starts the workers, serves their accept requests, replaces one that dies, stops them by PID."""

    RESPAWN_DELAY_S = 1.0  # a worker that dies at once must not be restarted in a tight loop

    def __init__(
        self,
        settings: SmtpSettings,
        acceptor: Accepts,
        count: int,
        drain_timeout_s: float = 10.0,
        spill_dir: Path | None = None,
        return_domains: Sequence[str] = (),
    ) -> None:
        self.settings = settings
        self.return_domains = tuple(return_domains)  # [verp]'s: their mail is taken from anyone
        self.acceptor = acceptor
        self.count = count
        self.drain_timeout_s = drain_timeout_s
        # Where a worker writes a text past [smtp] spill_bytes (start_smtp_server); the main process's
        # spool takes the file over from there, on the same filesystem.
        self.spill_dir = spill_dir
        self.socket: socket.socket | None = None
        self.processes: list[subprocess.Popen[bytes]] = []
        self._pipes: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self.socket is not None
        return int(self.socket.getsockname()[1])

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    async def start(self) -> None:
        self.socket = listening_socket(self.settings.listen, self.settings.listen_backlog)
        for _ in range(self.count):
            await self._launch()

    async def _launch(self) -> None:
        """One worker: started, handed its settings, ready, then served."""
        assert self.socket is not None
        ours, theirs = socket.socketpair()
        # The worker finishes its sessions a little before this process gives up on it.
        drain = max(1.0, self.drain_timeout_s - 2.0)
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "postmux.ingress.workers",
                f"--listen-fd={self.socket.fileno()}",
                f"--pipe-fd={theirs.fileno()}",
                f"--drain-timeout={drain}",
                *([f"--spill-dir={self.spill_dir}"] if self.spill_dir is not None else []),
                *(f"--return-domain={d}" for d in self.return_domains),
            ],
            stdin=subprocess.PIPE,
            pass_fds=(self.socket.fileno(), theirs.fileno()),
        )
        assert process.stdin is not None
        process.stdin.write(self.settings.model_dump_json().encode())
        process.stdin.close()
        theirs.close()
        self.processes.append(process)
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        self._pipes.append(writer)
        await self._ready(reader, process.pid)
        _send(writer, "go")
        self._spawn(self._serve(reader, writer, process))

    @staticmethod
    async def _ready(reader: asyncio.StreamReader, pid: int) -> None:
        try:
            hello, _ = await asyncio.wait_for(_read_frame(reader), timeout=30)
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            hello = None
        if hello != "ready":
            raise RuntimeError(f"ingress worker {pid} did not start (see its log above)")

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, process: subprocess.Popen[bytes]
    ) -> None:
        try:
            while True:
                (request_id, values), data = await _read_frame(reader)
                self._spawn(self._accept(writer, request_id, envelope_of(values, data)))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        if self.socket is None:
            return  # a shutdown
        # A worker died: reap it and start another, so the shared socket always has someone accepting.
        log.error("ingress worker gone; starting another", pid=process.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(process.wait, 5)
        writer.close()
        if process in self.processes:
            self.processes.remove(process)
        if writer in self._pipes:
            self._pipes.remove(writer)
        await asyncio.sleep(self.RESPAWN_DELAY_S)
        if self.socket is not None:
            try:
                await self._launch()
            except (OSError, RuntimeError) as e:
                log.error("ingress worker could not be started again", error=str(e))

    async def _accept(self, writer: asyncio.StreamWriter, request_id: int, envelope: Envelope) -> None:
        try:
            reply: tuple[Any, ...] = (request_id, "ok", await self.acceptor.accept(envelope), False)
        except AcceptRefused as e:
            reply = (request_id, "refused", e.reply, False)
        except SpoolError as e:
            reply = (request_id, "spool", str(e), e.disk_full)
        except Exception:
            log.exception("accept for an ingress worker failed")
            reply = (request_id, "error", "", False)
        with contextlib.suppress(ConnectionError, RuntimeError):
            _send(writer, reply)

    async def stop(self) -> None:
        """Stop accepting, let workers finish the transactions they are in, then end them."""
        timeout_s = self.drain_timeout_s
        sock, self.socket = self.socket, None
        if sock is not None:
            sock.close()
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for process in self.processes:
            remaining = max(0.1, deadline - time.monotonic())
            try:
                await asyncio.to_thread(process.wait, remaining)
            except subprocess.TimeoutExpired:
                process.kill()
                await asyncio.to_thread(process.wait, 5)
        for writer in self._pipes:
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.processes.clear()
        self._pipes.clear()


# -- the worker's side -------------------------------------------------------------------------------


class RemoteAcceptor:
    """The worker's acceptor: hands the envelope to the main process and waits for its verdict."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[str]] = {}
        self.closed = asyncio.Event()

    def accept(self, envelope: Envelope) -> asyncio.Future[str]:
        """The queue id the main process gives, in a future (Accepts.accept's awaitable).

        A future, not a coroutine: the DATA hook shields what accept returns (a client that hangs up must
        not cancel a store), and asyncio.shield makes a Task of a coroutine, but takes a future as it is.
        """
        if self.closed.is_set():  # nothing was sent: a plain refusal is true
            if envelope.tail is not None:  # handed to accept, so no one else deletes it (postmux.body)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(envelope.tail.path)
            raise SpoolError("the spool process is gone")
        request_id = next(self._ids)
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        # The envelope without its text, then the text as it is: rebuilt on the other side.
        _send(self._writer, (request_id, envelope_values(envelope)), envelope.data)
        return future

    @staticmethod
    def _settle(future: asyncio.Future[str], kind: str, value: str, disk_full: bool) -> None:
        """The main process's verdict (IngressWorkers._accept) as the future's queue id or exception."""
        if kind == "ok":
            future.set_result(value)
        elif kind == "spool":
            future.set_exception(SpoolError(value, disk_full=disk_full))
        elif kind == "refused":
            future.set_exception(AcceptRefused(value, value))
        else:
            future.set_exception(RuntimeError("the spool process could not accept the message"))

    async def read_replies(self) -> None:
        try:
            while True:
                (request_id, kind, value, disk_full), _ = await _read_frame(self._reader)
                future = self._waiting.pop(request_id, None)
                if future is not None and not future.done():
                    self._settle(future, kind, value, disk_full)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        if self._waiting:
            # The spool process died with these messages sent to it: each may or may not be stored, so
            # no reply is true. End now, as the spool process did: the clients see the connection drop
            # (the message is in doubt, RFC 5321 6.1) instead of a 451 that would say it was not taken.
            log.error("spool process gone with messages in doubt", in_doubt=len(self._waiting))
            os._exit(75)  # EX_TEMPFAIL
        self.closed.set()


async def _run_worker(
    settings: SmtpSettings,
    listen_fd: int,
    pipe_fd: int,
    drain_timeout_s: float,
    spill_dir: Path | None,
    return_domains: Sequence[str] = (),
) -> None:
    from postmux.ingress.smtp import start_smtp_server

    pipe = socket.socket(fileno=pipe_fd)
    reader, writer = await asyncio.open_unix_connection(sock=pipe)
    acceptor = RemoteAcceptor(reader, writer)
    listener = socket.socket(fileno=listen_fd)
    listener.setblocking(False)
    server = await start_smtp_server(
        settings, acceptor, sock=listener, spill_dir=spill_dir, return_domains=return_domains
    )
    settle_heap()  # postmux/heap.py: a worker's full collection took 17 ms, a stall for every session
    _send(writer, "ready")
    if (await _read_frame(reader))[0] != "go":
        return
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, lambda: None)  # the main process decides when we stop
    replies = asyncio.create_task(acceptor.read_replies())
    # The main process gone means no spool: stop at once rather than refuse every message with 451.
    await asyncio.wait(
        [asyncio.create_task(stop.wait()), asyncio.create_task(acceptor.closed.wait())],
        return_when=asyncio.FIRST_COMPLETED,
    )
    server.close()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(server.wait_closed(), timeout=drain_timeout_s)
    replies.cancel()
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="postmux SMTP ingress worker (started by postmux serve)")
    parser.add_argument("--listen-fd", type=int, required=True)
    parser.add_argument("--pipe-fd", type=int, required=True)
    parser.add_argument("--drain-timeout", type=float, default=8.0)
    parser.add_argument("--spill-dir", type=Path, default=None)
    parser.add_argument("--return-domain", action="append", default=[])
    args = parser.parse_args()
    settings = SmtpSettings.model_validate(json.loads(sys.stdin.buffer.read()))
    from postmux.logs import configure_logging

    configure_logging()
    worker = _run_worker(
        settings, args.listen_fd, args.pipe_fd, args.drain_timeout, args.spill_dir, args.return_domain
    )
    try:
        import uvloop
    except ImportError:
        asyncio.run(worker)
    else:
        uvloop.run(worker)


if __name__ == "__main__":
    main()
