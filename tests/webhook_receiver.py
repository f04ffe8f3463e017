"""A webhook receiver on loopback for tests: real HTTP (uvicorn), signatures checked with the
standardwebhooks package, and a behaviour that decides each request's fate (answer, fail, stall).

Records count as received only from requests it answered 2xx: a request it failed or stalled on is
one postmux must send again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

OK, FAIL, STALL = "ok", "fail", "stall"
Fate = str
Decide = Callable[[int], Fate]  # the request's number (from 1) -> its fate


def always_ok(n: int) -> Fate:
    return OK


def first_fail(count: int) -> Decide:
    """The first `count` requests fail with 503, the rest are acknowledged."""
    return lambda n: FAIL if n <= count else OK


def flaky(fail_ratio: float, stall_ratio: float, seed: int = 13) -> Decide:
    """At random: `fail_ratio` of the requests answered 500/503, `stall_ratio` never answered in time."""
    rng = random.Random(seed)

    def decide(n: int) -> Fate:
        draw = rng.random()
        if draw < stall_ratio:
            return STALL
        return FAIL if draw < stall_ratio + fail_ratio else OK

    return decide


@dataclass
class Arrival:
    """One request answered 2xx: its path (the endpoint), webhook-id, and the records it carried."""

    path: str
    webhook_id: str
    records: list[dict[str, Any]]
    as_array: bool


@dataclass
class Receiver:
    secret: str | None = None
    decide: Decide = always_ok
    stall_s: float = 1.0
    arrivals: list[Arrival] = field(default_factory=list)
    requests: int = 0
    in_flight: int = 0  # requests being answered right now
    fates: dict[Fate, int] = field(default_factory=dict)
    bad_signatures: list[str] = field(default_factory=list)
    port: int = 0
    _server: uvicorn.Server | None = None
    _task: asyncio.Task[None] | None = None
    _socket: socket.socket | None = None

    def url(self, path: str = "/hooks") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def records(self, path: str | None = None) -> list[dict[str, Any]]:
        """Every record acknowledged, in the order they arrived (repeats included)."""
        return [r for a in self.arrivals if path is None or a.path == path for r in a.records]

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                # The sender went away mid-request (a test killed postmux): no server acts on half a body,
                # and a signature checked over it would fail. postmux sends the records again.
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.requests += 1
        self.in_flight += 1
        try:
            await self._handle(scope, body, send)
        finally:
            self.in_flight -= 1

    async def _handle(self, scope: dict[str, Any], body: bytes, send: Any) -> None:
        fate = self.decide(self.requests)
        self.fates[fate] = self.fates.get(fate, 0) + 1
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        if self.secret is not None:
            try:
                Webhook(self.secret).verify(body, headers, json_parse=False)
            except WebhookVerificationError as e:
                self.bad_signatures.append(f"{headers.get('webhook-id')}: {e}")
                await _answer(send, 400, b'{"error": "bad signature"}')
                return
        if fate == STALL:
            await asyncio.sleep(self.stall_s)  # longer than postmux waits: it gave up and will retry
            await _answer(send, 504, b"")
            return
        if fate == FAIL:
            await _answer(send, random.choice([500, 503]), b"try later")
            return
        parsed = json.loads(body)
        records = parsed if isinstance(parsed, list) else [parsed]
        self.arrivals.append(
            Arrival(scope["path"], headers.get("webhook-id", ""), records, isinstance(parsed, list))
        )
        await _answer(send, 204, b"")

    async def start(self) -> Receiver:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self._socket = sock
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self, log_level="warning", access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        self._server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started and not self._task.done():
            await asyncio.sleep(0.01)
        return self

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await asyncio.gather(self._task, return_exceptions=True)
        if self._socket is not None:
            self._socket.close()


async def _answer(send: Callable[[dict[str, Any]], Awaitable[None]], status: int, body: bytes) -> None:
    with contextlib.suppress(Exception):  # the client may have gone (it timed out)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})
