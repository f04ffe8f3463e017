"""The HTTP side: Prometheus metrics and a health check, served by uvicorn in postmux's own loop."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import uvicorn
from fastapi import FastAPI, Response

from postmux.config import HttpSettings, split_hostport
from postmux.events.metrics import Metrics

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


def make_http_app(metrics: Metrics) -> FastAPI:
    app = FastAPI(title="postmux", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/metrics")
    def get_metrics() -> Response:
        return Response(metrics.render(), media_type=PROMETHEUS_TEXT)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


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
