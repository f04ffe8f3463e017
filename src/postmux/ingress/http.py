"""The HTTP side: Prometheus metrics, a health check and the admin API, served by uvicorn in our loop."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import socket
from typing import TYPE_CHECKING, Any

import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from postmux.config import HttpSettings, split_hostport
from postmux.events.metrics import Metrics

if TYPE_CHECKING:
    from postmux.control import Control

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
ADMIN_PREFIX = "/api/v1"


def _error(status: int, message: str, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


# RFC 9110 11.6.1: a 401 carries at least one challenge; RFC 6750 3: the Bearer scheme's, with
# error="invalid_token" when a token was given and is wrong (none given: no error code).
_CHALLENGE = 'Bearer realm="postmux"'


def _admin_guard(token: str | None) -> Any:
    """Every admin call carries `Authorization: Bearer TOKEN`; no token configured means no admin API."""

    async def guard(request: Request, call_next: Any) -> Response:
        if not request.url.path.startswith(ADMIN_PREFIX):
            response: Response = await call_next(request)
            return response
        if token is None:
            return _error(403, "the admin API is off: set [http] admin_token to turn it on")
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
            challenge = _CHALLENGE + (', error="invalid_token"' if scheme.lower() == "bearer" else "")
            return _error(401, "missing or wrong bearer token", {"WWW-Authenticate": challenge})
        response = await call_next(request)
        return response

    return guard


def make_http_app(
    metrics: Metrics, control: Control | None = None, admin_token: str | None = None
) -> FastAPI:
    app = FastAPI(title="postmux", docs_url=None, redoc_url=None, openapi_url=None)
    app.middleware("http")(_admin_guard(admin_token))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, "invalid request", details=[str(e.get("msg", "")) for e in exc.errors()])

    @app.get("/metrics")
    def get_metrics() -> Response:
        return Response(metrics.render(), media_type=PROMETHEUS_TEXT)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    if control is not None:
        _admin_routes(app, control)
    return app


def _admin_routes(app: FastAPI, control: Control) -> None:
    from postmux.control import NothingHeld, UnknownMember

    # Every admin route is async: it runs in the event loop that owns the state it reads and changes.
    @app.get(f"{ADMIN_PREFIX}/members")
    async def members() -> dict[str, Any]:
        return {"members": control.members()}

    @app.get(f"{ADMIN_PREFIX}/shaping")
    async def shaping() -> dict[str, Any]:
        return {"lanes": control.shaping()}

    # {name:path}: a name is taken whole, "/" included (the CLI sends it as one encoded segment, which
    # the server decodes before routing); an unknown one is a 404 with the name, never another member.
    def set_draining(name: str, draining: bool) -> Any:
        try:
            return {"members": control.set_draining(name, draining)}
        except UnknownMember:
            return _error(404, f"no member named {name!r}")

    @app.post(f"{ADMIN_PREFIX}/members/{{name:path}}/drain")
    async def drain(name: str) -> Any:
        return set_draining(name, True)

    @app.post(f"{ADMIN_PREFIX}/members/{{name:path}}/enable")
    async def enable(name: str) -> Any:
        return set_draining(name, False)

    # `:path`: an id with a "/" in it (never one of ours, but a typo can be) gets the same clear 404.
    @app.post(f"{ADMIN_PREFIX}/messages/{{message_id:path}}/release")
    async def release(message_id: str) -> Any:
        try:
            return await control.release(message_id)
        except NothingHeld:
            return _error(404, f"no held message with id {message_id!r}")

    _shaping_routes(app, control)

    @app.post(f"{ADMIN_PREFIX}/reload")
    async def reload() -> Any:
        result = control.reload()
        if not result.ok:
            return JSONResponse(
                {"error": "configuration refused; the running one is unchanged", **result.as_dict()}, 400
            )
        return result.as_dict()


def _shaping_routes(app: FastAPI, control: Control) -> None:
    from postmux.config import parse_duration
    from postmux.control import UnknownMember

    @app.post(f"{ADMIN_PREFIX}/members/{{name:path}}/suspend")
    async def suspend(name: str, destination: str = "", duration: str = "1h") -> Any:
        if not destination:
            return _error(400, "suspend needs a destination (a provider such as google, or a domain)")
        try:
            duration_s = parse_duration(duration)
        except ValueError as e:
            return _error(400, f"duration: {e}")
        if duration_s <= 0:
            return _error(400, "duration: a suspension lasts more than 0 s")
        try:
            return {"lanes": control.suspend(name, destination, duration_s)}
        except UnknownMember:
            return _error(404, f"no member named {name!r}")

    @app.post(f"{ADMIN_PREFIX}/members/{{name:path}}/resume")
    async def resume(name: str, destination: str | None = None) -> Any:
        try:
            return {"lanes": control.resume(name, destination or None)}
        except UnknownMember:
            return _error(404, f"no member named {name!r}")


class HttpServer:
    """uvicorn on a socket we bind ourselves, so port 0 works and the bound port is known."""

    def __init__(self, settings: HttpSettings, app: FastAPI) -> None:
        self.listen = settings.listen
        self.socket: socket.socket | None = None
        self.port = 0  # the bound port, known once started (port 0 picks a free one)
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        self._task: asyncio.Task[None] | None = None

    def _bind(self) -> socket.socket:
        """Bound at start, not when built: a port in use is a start failure, reported as one."""
        host, port = split_hostport(self.listen)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
        except BaseException:
            sock.close()
            raise
        return sock

    async def start(self) -> None:
        self.socket = self._bind()
        self.port = self.socket.getsockname()[1]
        # uvicorn must not take over SIGINT/SIGTERM: postmux's own shutdown owns them.
        self._server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
        self._task = asyncio.create_task(self._server.serve(sockets=[self.socket]), name="http")
        while not self._server.started and not self._task.done():
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._task is not None:
            self._server.should_exit = True
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self.socket is not None:
            self.socket.close()
            self.socket = None
