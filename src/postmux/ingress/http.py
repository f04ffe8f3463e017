"""The HTTP side: Prometheus metrics and a health check, served by uvicorn in our loop.

More routes are mounted by whoever builds the node (the admin API, admin/api.py): this module knows the
server, not what the admin side does.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Collection, Coroutine
from typing import Any

import structlog
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
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


LOCAL_ERROR = "local error in processing; see postmux's log"
NOT_JSON_WE_READ = "not JSON this API reads: nested too deeply, or a number too long"


class GuardedRoute(APIRoute):
    """A route whose own failures are answered where they happen, as JSON.

    A bug in a route is a 500 with JSON; it used to reach Starlette's outermost middleware, which answers
    and then raises again (for the server to log it), and uvicorn then closed the connection: a client
    that reuses connections saw its next request reset. A body FastAPI cannot parse as JSON (nested past
    the recursion limit, an integer past Python's digit limit) is a 422 naming `body`, as other JSON it
    cannot read is, not FastAPI's bare 400.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except StarletteHTTPException as e:
                if e.status_code == 400 and isinstance(e.__cause__, (RecursionError, ValueError)):
                    return json_error(422, f"body: {NOT_JSON_WE_READ}", field="body")
                raise
            except RequestValidationError:
                raise
            except Exception as e:
                log.exception("http request failed", path=request.url.path, error=repr(e))
                return json_error(500, LOCAL_ERROR)

        return guarded


def _validation_error(error: Any) -> dict[str, str]:
    """One of pydantic's (or FastAPI's) validation errors as the API names it: the field and the reason.
    Text that is not JSON is `body`'s (FastAPI's loc is the octet where decoding stopped, no field)."""
    if error.get("type") == "json_invalid":
        where = error.get("loc", ())[-1:]
        reason = str(error.get("ctx", {}).get("error", "JSON decode error"))
        return {"field": "body", "reason": f"not JSON: {reason}" + (f" at octet {where[0]}" if where else "")}
    return {
        "field": field_name(error.get("loc", ())),
        "reason": str(error.get("msg", "")).removeprefix("Value error, "),
    }


def make_http_app(metrics: Metrics, *mounts: Mount) -> FastAPI:
    app = FastAPI(title="postmux", docs_url=None, redoc_url=None, openapi_url=None)
    app.router.route_class = GuardedRoute  # every route added below, the mounts' too

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return json_error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [_validation_error(e) for e in exc.errors()]
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
        # A bug outside any route (a middleware's), not the client's doing: the traceback goes to the log,
        # the client gets JSON. A route's own is answered by GuardedRoute.
        log.exception("http request failed", path=request.url.path, error=repr(exc))
        return json_error(500, LOCAL_ERROR)

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
