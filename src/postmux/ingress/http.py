"""The HTTP side: Prometheus metrics and a health check, served by uvicorn in our loop.

More routes are mounted by whoever builds the node (the admin API, admin/api.py): this module knows the
server, not what the admin side does.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Collection
from typing import Any

import structlog
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from postmux.config import HttpSettings, split_hostport
from postmux.events.metrics import Metrics

log = structlog.get_logger("postmux.http")

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"

# Adds routes (and their middleware) to the HTTP app before it serves.
Mount = Callable[[FastAPI], None]


def json_error(
    status: int, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    """Every HTTP error postmux gives is JSON: `{"error": "..."}`, never a traceback."""
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


# Parts of pydantic's loc that name no field: where the value came from, and the tags of a union's arms.
_UNION_TAGS = frozenset({"raw", "structured"})


def field_name(loc: Any) -> str:
    """pydantic's loc as the request spells the field: ("body", "recipients", 0, "email") ->
    "recipients[0].email"; a header as its name ("header", "idempotency-key" -> "Idempotency-Key")."""
    parts = list(loc)
    if parts[:1] == ["header"] and len(parts) > 1:
        return "-".join(w.capitalize() for w in str(parts[1]).split("-"))
    out = ""
    for i, part in enumerate(parts):
        if isinstance(part, int):
            out += f"[{part}]"
        elif not ((i == 0 and part in ("body", "query", "path")) or part in _UNION_TAGS):
            out += ("." if out else "") + str(part)
    return out


def make_http_app(metrics: Metrics, *mounts: Mount) -> FastAPI:
    app = FastAPI(title="postmux", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return json_error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {
                "field": field_name(e.get("loc", ())),
                "reason": str(e.get("msg", "")).removeprefix("Value error, "),
            }
            for e in exc.errors()
        ]
        first = errors[0] if errors else {"field": "", "reason": "invalid request"}
        return json_error(
            422,
            f"{first['field']}: {first['reason']}" if first["field"] else first["reason"],
            field=first["field"] or None,
            errors=errors,
            details=[e["reason"] for e in errors],
        )

    @app.exception_handler(Exception)
    async def local_error(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not the client's doing: the traceback goes to the log, the client gets JSON.
        log.exception("http request failed", path=request.url.path, error=repr(exc))
        return json_error(500, "local error in processing; see postmux's log")

    @app.get("/metrics")
    def get_metrics() -> Response:
        return Response(metrics.render(), media_type=PROMETHEUS_TEXT)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    for mount in mounts:
        mount(app)
    return app


def refusal_counter(count: Callable[[str, str], None], routes: Collection[tuple[str, str]]) -> Mount:
    """Counts the 4xx and 5xx answers of `routes` ((method, path) pairs: the submission API), by status."""
    watched = frozenset(routes)

    def mount(app: FastAPI) -> None:
        @app.middleware("http")
        async def refusals(request: Request, call_next: Any) -> Response:
            response: Response = await call_next(request)
            if response.status_code >= 400 and (request.method, request.url.path) in watched:
                count("http", str(response.status_code))
            return response

    return mount


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
