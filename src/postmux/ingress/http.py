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


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


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
            return _error(401, "missing or wrong bearer token")
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

    def set_draining(name: str, draining: bool) -> Any:
        try:
            return {"members": control.set_draining(name, draining)}
        except UnknownMember:
            return _error(404, f"no member named {name!r}")

    @app.post(f"{ADMIN_PREFIX}/members/{{name}}/drain")
    async def drain(name: str) -> Any:
        return set_draining(name, True)

    @app.post(f"{ADMIN_PREFIX}/members/{{name}}/enable")
    async def enable(name: str) -> Any:
        return set_draining(name, False)

    # `:path`: an id with a "/" in it (never one of ours, but a typo can be) gets the same clear 404.
    @app.post(f"{ADMIN_PREFIX}/messages/{{message_id:path}}/release")
    async def release(message_id: str) -> Any:
        try:
            return await control.release(message_id)
        except NothingHeld:
            return _error(404, f"no held message with id {message_id!r}")

    @app.post(f"{ADMIN_PREFIX}/reload")
    async def reload() -> Any:
        result = control.reload()
        if not result.ok:
            return JSONResponse(
                {"error": "configuration refused; the running one is unchanged", **result.as_dict()}, 400
            )
        return result.as_dict()


class HttpServer:
    """uvicorn on a socket we bind ourselves, so port 0 works and the bound port is known."""

    def __init__(self, settings: HttpSettings, app: FastAPI) -> None:
        host, port = split_hostport(settings.listen)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.port: int = self.socket.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # uvicorn must not take over SIGINT/SIGTERM: postmux's own shutdown owns them.
        self._server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
        self._task = asyncio.create_task(self._server.serve(sockets=[self.socket]), name="http")
        while not self._server.started and not self._task.done():
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None
        self.socket.close()
