"""The published OpenAPI document held to the running node: schemathesis makes requests from the schema
(valid ones and broken ones) against every /api/v1 route of a live node, real HTTP on loopback, and every
answer must be no 5xx, a documented status, and a body of the documented schema.

The node runs in a thread with its own event loop, since schemathesis calls it synchronously.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import checks
from schemathesis.generation import GenerationMode

from postmux.app import App
from postmux.ingress.submission import PUBLIC_ROUTES
from postmux.passwords import hash_password
from postmux.testing import Upstream, accept
from tests.dns_server import LoopbackDns
from tests.support import make_settings

API_KEY = "fuzz-" + "f" * 27
ADMIN_TOKEN = "admin-token-for-the-fuzz-test"


class LiveNode:
    """A node with one loopback upstream, in a thread of its own, until `stop`."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.url = ""
        self.dns = LoopbackDns("")
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self.loop.run_until_complete, args=(self._run(),), daemon=True)

    async def _run(self) -> None:
        self._stop = asyncio.Event()
        up = await Upstream("up", accept).start()
        pools = [{"name": "default", "members": [{"name": "a", "address": up.address}]}]
        keys = [{"name": "fuzz", "hash": hash_password(API_KEY, n=16), "rate": "1000/s"}]
        # The doctor's lookups go to a loopback zone that knows no name: every answer is NXDOMAIN, at once.
        node_settings = make_settings(
            self.tmp_path,
            pools,
            api_key=keys,
            http={"listen": "127.0.0.1:0", "admin_token": ADMIN_TOKEN},
            dns={"nameservers": [self.dns.address], "timeout": "1s"},
        )
        try:
            async with App(node_settings) as app:
                self.url = f"http://127.0.0.1:{app.http_port}"
                self.ready.set()
                await self._stop.wait()
        finally:
            await up.stop()

    def start(self) -> str:
        self.dns.__enter__()
        self._thread.start()
        assert self.ready.wait(20), "the node did not start"
        return self.url

    def stop(self) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        self.loop.close()
        self.dns.__exit__()


@pytest.fixture(scope="module")
def live_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    node = LiveNode(tmp_path_factory.mktemp("openapi"))
    try:
        yield node.start()
    finally:
        node.stop()


CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
]


@pytest.mark.slow
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_route_answers_as_the_published_schema_says(live_url: str, mode: GenerationMode) -> None:
    # One test walks the operations (schemathesis.pytest's fixture loader does not run on pytest 9).
    schema = schemathesis.openapi.from_url(f"{live_url}/api/v1/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 3
    for operation in operations:
        public = (operation.method.upper(), operation.path) in PUBLIC_ROUTES
        fuzz(operation, mode, live_url, API_KEY if public else ADMIN_TOKEN)


def fuzz(operation: Any, mode: GenerationMode, url: str, token: str) -> None:
    @given(case=operation.as_strategy(mode))
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def answers_as_documented(case: schemathesis.Case) -> None:
        case.call_and_validate(base_url=url, headers={"Authorization": f"Bearer {token}"}, checks=CHECKS)

    answers_as_documented()


def test_the_document_names_every_route_error_and_example(live_url: str) -> None:
    doc = httpx.get(f"{live_url}/api/v1/openapi.json").json()
    operations = [(m, p, op) for p, item in doc["paths"].items() for m, op in item.items()]
    assert {p for _, p, _ in operations} >= {
        "/api/v1/messages",
        "/api/v1/messages/batch",
        "/api/v1/members",
        "/api/v1/doctor/{domain}",
    }
    for method, path, op in operations:
        assert path.startswith("/api/v1/"), path
        assert op["security"], (method, path)
        assert "401" in op["responses"], (method, path)
        assert "HTTPValidationError" not in str(op["responses"]), (method, path)
        for status, response in op["responses"].items():
            if status >= "400":
                assert response["content"]["application/json"]["example"]["error"], (method, path, status)
    for path in ("/api/v1/messages", "/api/v1/messages/batch"):
        op = doc["paths"][path]["post"]
        assert {"202", "401", "403", "413", "422", "429", "503", "507"} <= set(op["responses"])
        assert op["requestBody"]["content"]["application/json"]["example"]
        for status in ("401", "403", "413", "422", "429", "503", "507"):
            assert op["responses"][status]["content"]["application/json"]["example"]["error"]
